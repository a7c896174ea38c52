"""The HTTP API under bad input, against a real ``kvruntime serve`` process on the tiny model.

schemathesis generates requests from the server's own OpenAPI schema, valid ones and ones
that break it (wrong types, missing fields, out-of-range values, odd strings), for every
operation; the server must never answer 5xx other than 503 (overload), and must still be
healthy and serving afterwards. Oversized prompts are refused with the limit in the message.
Hand-made malformed bodies (not JSON, deeply nested, huge numbers) round it off.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_fixtures import tiny, tiny_dir, tiny_engine  # noqa: F401
from redis_servers import RedisServer
from schemathesis import GenerationMode
from server_fixtures import CONTEXT, ServerProcess, start_server
from starlette.testclient import TestClient

from kvruntime.config import RuntimeConfig
from kvruntime.errors import ConfigError
from kvruntime.runtime import Runtime
from kvruntime.server import ServerConfig, create_app

EXAMPLES = 250  # inputs per run (deterministic: derandomized), over every operation
GENERATION_CAP = 8  # max_tokens above this is lowered, to keep the run CI-sized


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    r = RedisServer()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[ServerProcess]:
    # with a Redis tier (lossless, so answers can be compared), fuzzed with it in place
    args = ("--max-queue", "8", "--redis-url", redis.url, "--redis-codec", "none")
    s = start_server(tmp_path_factory.mktemp("fuzz"), *args)
    yield s
    s.stop()


def _assert_serving(server: ServerProcess) -> None:
    assert server.alive(), server.log_tail()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        # greedy: sampled at OpenAI's default temperature 1, the tiny model's first token is
        # its end-of-turn token about 1% of the time, and the answer would have no tokens
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, "temperature": 0}  # fmt: skip
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2


def test_schema_driven_fuzzing_finds_no_server_error(server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = {f"{op.method.upper()} {op.path}" for op in _operations(schema)}
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= operations
    strategy = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(
        GenerationMode.NEGATIVE
    )
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        body = case.body
        if isinstance(body, dict):
            # a random model name only ever meets the 404: name the served one instead
            if isinstance(body.get("model"), str):
                body["model"] = "tiny"
            if isinstance(body.get("max_tokens"), int):
                body["max_tokens"] = min(body["max_tokens"], GENERATION_CAP)
        response = case.call(base_url=server.url, timeout=60)
        seen[(case.path, response.status_code)] += 1
        status = response.status_code
        if status >= 500 and status != 503:
            failures.append(f"{case.method} {case.path} -> {status}: {response.text[:300]}")

    fuzz()
    print(f"\nschemathesis {schemathesis.__version__}: {sum(seen.values())} requests", dict(seen))
    assert not failures, failures[:5]
    assert sum(seen.values()) >= EXAMPLES
    assert len({path for path, _ in seen}) >= len(operations) - 2  # nearly every operation
    _assert_serving(server)


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize(
    ("path", "field"), [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")]
)
def test_an_oversized_prompt_is_refused_with_the_limit(
    server: ServerProcess, path: str, field: str
) -> None:
    text = "x" * (CONTEXT + 500)  # one token per character
    value: Any = [{"role": "user", "content": text}] if field == "messages" else text
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(path, json={"model": "tiny", field: value, "max_tokens": 2})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded", error
        assert str(CONTEXT) in error["message"], error
        # max_tokens beyond the room the prompt leaves: refused, saying how much is left
        short: Any = [{"role": "user", "content": "hi"}] if field == "messages" else "hi"
        r = c.post(path, json={"model": "tiny", field: short, "max_tokens": CONTEXT * 2})
        assert r.status_code == 400 and str(CONTEXT) in r.json()["error"]["message"], r.text
    _assert_serving(server)


# mostly well-formed (to reach the engine), sometimes not (unknown roles, missing, null or
# mistyped content, tool calls in the wrong shape)
TEXT = st.text(max_size=60)
CALL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": TEXT, "arguments": TEXT}),
    },
    optional={"id": TEXT},
)
PLAIN = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": TEXT}
)
CALLS = st.fixed_dictionaries(
    {
        "role": st.just("assistant"),
        "content": TEXT | st.none(),
        "tool_calls": st.lists(CALL, max_size=2),
    }
)
ODD = st.fixed_dictionaries(
    {"role": st.sampled_from(["developer", "wizard", "user", "tool"])},
    optional={
        "content": st.none() | st.integers() | st.lists(TEXT, max_size=2),
        "tool_calls": TEXT,
        "name": TEXT,
    },
)
MESSAGE = st.one_of(PLAIN, PLAIN, PLAIN, PLAIN, CALLS, ODD)
TOOL = st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True), "parameters": st.just({})})}
)  # fmt: skip
CHAT = st.fixed_dictionaries(
    {"model": st.just("tiny"), "messages": st.lists(MESSAGE, min_size=1, max_size=4)},
    optional={
        "max_tokens": st.integers(0, GENERATION_CAP),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "seed": st.integers(0, 2**32),
        "stop": TEXT.filter(bool) | st.lists(TEXT.filter(bool), max_size=3),
        "stream": st.booleans(),
        "tools": st.lists(TOOL, max_size=2),
        "session_id": st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
        "return_token_ids": st.booleans(),
    },
)
HEADERS = st.fixed_dictionaries(
    {}, optional={"x-tenant": st.sampled_from(["acme", "globex", "", "a" * 200, "t\x01"])}
)


def test_chat_shaped_requests_complete_or_are_refused_cleanly(server: ServerProcess) -> None:
    """Requests built like chats (valid and invalid roles, contents, tool calls, sampling,
    streaming, tenants, sessions): each ends in a whole response or a 400, never a 5xx."""
    statuses: collections.Counter[int] = collections.Counter()
    client = httpx.Client(base_url=server.url, timeout=60)

    @settings(max_examples=80, deadline=None, derandomize=True, database=None)
    @given(body=CHAT, headers=HEADERS)
    def fuzz(body: dict[str, Any], headers: dict[str, str]) -> None:
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        statuses[r.status_code] += 1
        assert r.status_code in (200, 400), (r.status_code, r.text[:300])
        if r.status_code == 400:
            assert r.json()["error"]["message"]
        elif body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        else:
            out = r.json()
            assert out["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
            assert out["usage"]["completion_tokens"] <= body.get("max_tokens", 4096)

    try:
        fuzz()
    finally:
        client.close()
    print(f"\nchat-shaped requests by status: {dict(statuses)}")
    assert statuses[200] >= 20 and statuses[400] >= 10  # both paths were exercised
    _assert_serving(server)


MALFORMED = {
    "not json": b"\xff\xfe not json at all",
    "a json array": b"[1, 2, 3]",
    "deeply nested": b'{"model":"tiny","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge integer": b'{"model":"tiny","messages":[],"max_tokens":1' + b"0" * 5000 + b"}",
    "NaN": b'{"model":"tiny","messages":[{"role":"user","content":"a"}],"temperature":NaN}',
    "lone surrogate": b'{"model":"tiny","messages":[{"role":"user","content":"\\ud800"}]}',
    "truncated": b'{"model":"tiny","messages":[{"role":"user","cont',
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_bodies_are_a_clear_400(server: ServerProcess, name: str) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(
            "/v1/chat/completions",
            content=MALFORMED[name],
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    assert server.alive()


# the server's default body limit for the tiny model's context: 1 MiB + 64 B a token
BODY_LIMIT = (1 << 20) + 64 * CONTEXT


@pytest.mark.parametrize("how", ["content-length", "chunked"])
def test_an_oversized_body_is_refused_before_it_is_read(server: ServerProcess, how: str) -> None:
    # 32 MiB of whitespace inside an open JSON array: valid so far, so only the size refuses it
    head = b'{"model": "tiny", "messages": ['
    chunk = b" " * (1 << 20)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is met while streaming
        yield head
        for _ in range(32):
            yield chunk

    body: Any = head + chunk * 32 if how == "content-length" else chunks()
    start = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert str(BODY_LIMIT) in error["message"] and error["code"] == "request_too_large", error
    assert time.monotonic() - start < 30  # refused, not parsed and tokenized
    _assert_serving(server)


def _metric(text: str, name: str, label: str) -> float:
    """The value of ``name{label}`` in a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(f"{name}{{{label}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_dead_redis_costs_no_request_and_shows_in_metrics(
    server: ServerProcess, redis: RedisServer
) -> None:
    """Runs last: kills the module's Redis under the running server."""
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": "Reply briefly. " * 20},
                     {"role": "user", "content": "status?"}],
        "max_tokens": 4,
        "temperature": 0,
    }  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=60) as c:
        before = c.post("/v1/chat/completions", json=body, headers={"x-tenant": "ops"})
        assert before.status_code == 200, before.text
        redis.kill()
        # another tenant: nothing of "ops" is reused, the server must go to Redis (dead)
        after = c.post("/v1/chat/completions", json=body, headers={"x-tenant": "ops2"})
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["message"] == before.json()["choices"][0]["message"]
        metrics = c.get("/metrics").text
    errors = sum(
        _metric(metrics, "kvruntime_redis_errors_total", f'kind="{kind}"')
        for kind in ("connect", "down", "closed", "timeout")
    )
    assert errors > 0, [m for m in metrics.splitlines() if "redis_errors" in m]
    _assert_serving(server)


def test_configured_prompt_and_body_limits(tiny_engine: Any, tiny: Any) -> None:  # noqa: F811
    """``ServerConfig.max_prompt_tokens`` and ``max_body_bytes``, in-process."""
    with pytest.raises(ConfigError, match="max_body_bytes"):
        ServerConfig("tiny", max_body_bytes=0)
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        ServerConfig("tiny", max_prompt_tokens=-1)
    config = RuntimeConfig(page_size=4, prefill_tokens_per_s=1000.0, host_bytes_per_s=1e9)
    rt = Runtime(tiny_engine, tiny.tokenizer, config)
    app = create_app(rt, ServerConfig("tiny", max_body_bytes=4096, max_prompt_tokens=40))
    try:
        with TestClient(app) as c:
            long = [{"role": "user", "content": "word " * 100}]
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": long})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert "limit of 40" in error["message"] and error["param"] == "messages", error
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": list(range(41))})
            assert r.status_code == 400 and "limit of 40" in r.text, r.text
            assert r.json()["error"]["param"] == "prompt"
            big = [{"role": "user", "content": "x" * 5000}]
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": big})
            assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"], r.text
            hi = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 2, "temperature": 0}  # fmt: skip
            r = c.post("/v1/chat/completions", json=hi)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": list(range(40))})
            assert r.status_code == 200, r.text  # at the limit: served
    finally:
        rt.close()


def test_serve_flags_set_the_limits(tmp_path: Any) -> None:
    """``kvruntime serve --max-body-bytes/--max-prompt-tokens/--max-redis-index-pages``."""
    s = start_server(
        tmp_path,
        "--max-body-bytes", "4KiB", "--max-prompt-tokens", "40", "--max-redis-index-pages", "64",
    )  # fmt: skip
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            big = [{"role": "user", "content": "x" * 5000}]
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": big})
            assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"], r.text
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": list(range(41))})
            assert r.status_code == 400 and "limit of 40" in r.text, r.text
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": list(range(40))})
            assert r.status_code == 200, r.text
    finally:
        s.stop()
