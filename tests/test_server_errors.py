"""Bad input and overload against a real server (``--max-queue 1``): every failure is OpenAI's
error shape with the right status, and the server keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from redis_servers import wait_until
from server_fixtures import CONTEXT, ServerProcess, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(tmp_path_factory.mktemp("serve-errors"), "--max-queue", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    # no retries: the client would otherwise retry 503s and hide them
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


HI = [{"role": "user", "content": "hi"}]


def post(server: ServerProcess, body: Any, path: str = "/v1/chat/completions") -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(
            server.url + path, content=body, headers={"content-type": "application/json"}
        )
    return httpx.post(server.url + path, json=body)


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role"),
        ({"model": "tiny", "messages": [{"role": "user"}]}, "messages", "no content"),
        ({"model": "tiny", "messages": "hi"}, "messages", "valid list"),
        ({"model": "tiny", "messages": []}, "messages", "non-empty"),
        ({"model": "tiny"}, "messages", "required"),
        ({"model": "tiny", "messages": HI, "max_tokens": -1}, "max_tokens", "greater"),
        ({"model": "tiny", "messages": HI, "temperature": "hot"}, "temperature", "number"),
        ({"model": "tiny", "messages": HI, "top_p": 0}, "top_p", "greater"),
        ({"model": "tiny", "messages": HI, "n": 2}, "n", "n must be 1"),
        ({"model": "tiny", "messages": HI, "tools": [{"type": "function"}]}, "tools", "name"),
        ({"model": "tiny", "messages": HI, "stop": [""]}, "stop", "non-empty"),
        ({"model": "tiny", "messages": HI, "seed": 2**64}, "seed", "less than"),
        (
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
            None,
            "Unicode",
        ),
        ("{not json", None, "not valid JSON"),
    ],
)
def test_malformed_requests_are_400s(
    server: ServerProcess, body: Any, param: str | None, says: str
) -> None:
    err = assert_error(post(server, body), 400, param)
    assert err["type"] == "invalid_request_error" and says in err["message"], err


def test_errors_through_the_openai_package(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])  # type: ignore[list-item]
    assert "unknown role" in str(bad.value)
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="gpt-9", messages=HI)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found" and "'tiny'" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")


def test_a_prompt_longer_than_the_context_is_a_400_naming_the_limit(oai: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "x" * (CONTEXT + 10)}]
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model="tiny", messages=long, max_tokens=1)  # type: ignore[arg-type]
    assert exc.value.code == "context_length_exceeded" and str(CONTEXT) in exc.value.message
    fits = [{"role": "user", "content": "x" * (CONTEXT - 100)}]
    with pytest.raises(openai.BadRequestError) as room:
        oai.chat.completions.create(model="tiny", messages=fits, max_tokens=500)  # type: ignore[arg-type]
    assert room.value.param == "max_tokens" and str(CONTEXT) in room.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model="tiny", prompt=[7] * (CONTEXT + 1), max_tokens=1)
    assert exc.value.code == "context_length_exceeded"


def test_bad_completion_prompts(server: ServerProcess) -> None:
    path = "/v1/completions"
    assert_error(post(server, {"model": "tiny", "prompt": [5, 6, 999]}, path), 400)
    assert_error(post(server, {"model": "tiny", "prompt": ["a", "b"]}, path), 400, "prompt")
    assert_error(post(server, {"model": "tiny", "prompt": ""}, path), 400)
    assert_error(post(server, {"model": "tiny", "prompt": {"x": 1}}, path), 400, "prompt")


def test_unknown_routes_and_methods_keep_the_error_shape(server: ServerProcess) -> None:
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert_error(post(server, HI), 400)  # the messages alone, not a request object
    assert_error(
        httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": HI},
            headers={"x-tenant": ""},
        ),
        400,
        "x-tenant",
    )


def test_a_full_queue_is_a_503_and_the_server_recovers(
    server: ServerProcess, oai: openai.OpenAI
) -> None:
    # The one queue slot is held by a long streamed turn (its first chunk proves it runs; this
    # prompt decodes ~2,000 tokens greedily, seconds here, before the random model's end
    # token); any other turn meanwhile finds the queue full.
    warm = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=1)  # type: ignore[arg-type]
    assert warm.usage is not None
    msgs = [{"role": "user", "content": "1"}]
    long = {"model": "tiny", "messages": msgs, "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        resp = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a"})
        err = assert_error(resp, 503)
        assert err["code"] == "overloaded" and resp.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError) as busy:
            oai.chat.completions.create(model="tiny", messages=HI, max_tokens=1)  # type: ignore[arg-type]
        assert busy.value.status_code == 503 and "already queued" in busy.value.message
        assert "[DONE]" not in next(lines)  # the long turn was still decoding all along
    # the stream was dropped: its turn stops and frees the slot
    wait_until(lambda: httpx.get(server.url + "/health").json()["turns_in_progress"] == 0, 30)
    r2 = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    assert r2.usage is not None and r2.usage.completion_tokens == 2
    metrics = httpx.get(server.url + "/metrics").text
    assert 'kvruntime_http_requests_total{path="/v1/chat/completions",status="503"} 1.0' in metrics
    assert 'kvruntime_http_requests_total{path="/v1/completions",status="503"} 1.0' in metrics
    assert server.alive()
