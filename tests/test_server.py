"""The OpenAI-compatible server, as a real ``kvruntime serve`` process (tiny random-weight model,
real redis-server), driven with the official ``openai`` package: reuse shows in
``cached_tokens``, streaming adds up to the non-streamed answer, tools render, metrics agree
with what was sent, the event loop keeps serving while a turn runs, a lost Redis is a miss."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from model_fixtures import tiny_tokenizer
from prometheus_client.parser import text_string_to_metric_families
from redis_servers import RedisServer, wait_until
from server_fixtures import ServerProcess, start_server

from kvruntime.server.streaming import DeltaFilter
from kvruntime.server.tool_calls import parse_tool_calls, tag_format, tool_names

PAGE = 16
SYSTEM = "You are a careful agent. Tools: search(query), read(path), write(path, text). " * 3
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[ServerProcess]:
    args = ["--redis-url", redis.url, "--redis-codec", "none", "--page-size", str(PAGE)]
    s = start_server(tmp_path_factory.mktemp("serve"), *args)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


def ext(usage: Any) -> dict[str, Any]:
    """The ``usage.kvruntime`` extension (kept by the openai package as an extra field)."""
    return dict(usage.model_extra["kvruntime"])


def chat(oai: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> Any:
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0.0)
    return oai.chat.completions.create(model="tiny", messages=messages, **kw)  # type: ignore[call-overload]


def metrics(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_models_and_health(server: ServerProcess, oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["turns_in_progress"] == 0


def test_later_turns_reuse_the_previous_prompt_and_report_divergence(oai: openai.OpenAI) -> None:
    headers = {"x-session-id": "agent-1"}
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "list the files"}]
    r1 = chat(oai, msgs, extra_headers=headers)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    msgs += [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "tool", "content": "a.txt b.txt"},
        {"role": "user", "content": "read a.txt"},
    ]
    r2 = chat(oai, msgs, extra_headers=headers)
    cached, p1 = r2.usage.prompt_tokens_details.cached_tokens, r1.usage.prompt_tokens
    assert p1 - PAGE < cached < r2.usage.prompt_tokens, (p1, cached)  # all whole pages of turn 1
    e = ext(r2.usage)
    assert sum(e["cached_tokens_by_tier"].values()) == cached
    assert e["computed_tokens"] == r2.usage.prompt_tokens - cached
    assert (e["session_id"], e["turn"], e["divergence"]) == ("agent-1", 1, None)
    assert e["timings"]["ttft_s"] >= e["timings"]["prefill_s"] > 0
    # a changed system prompt breaks the prefix: the break is reported with its text
    msgs[0] = {"role": "system", "content": "Time: 10:05. " + SYSTEM}
    r3 = chat(oai, msgs, extra_headers=headers)
    d = ext(r3.usage)["divergence"]
    assert d["token_index"] == 1 + len("system\n")  # <|im_start|> is one token
    assert d["current_text"].startswith("Time: 10:05") and d["before"].endswith("system\n")
    assert r3.usage.prompt_tokens_details.cached_tokens <= d["token_index"]


def test_reuse_works_by_content_without_a_session(oai: openai.OpenAI) -> None:
    shared = [{"role": "system", "content": "Anonymous agent. " + SYSTEM}]
    r1 = chat(oai, [*shared, {"role": "user", "content": "first question"}])
    r2 = chat(oai, [*shared, {"role": "user", "content": "second question"}])
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    # after the shared prefix: the question, <|im_end|> \n <|im_start|> assistant\n
    shared_tokens = r1.usage.prompt_tokens - (len("first question") + 3 + len("assistant\n"))
    assert r2.usage.prompt_tokens_details.cached_tokens > shared_tokens - PAGE
    assert ext(r2.usage)["session_id"] is None and ext(r2.usage)["divergence"] is None


def stream_text(oai: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> Any:
    chunks = list(chat(oai, messages, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert not chunks[-1].choices and chunks[-1].usage is not None  # the usage-only chunk
    return text, finish, chunks[-1].usage, chunks


def test_streaming_adds_up_to_the_non_streamed_answer(oai: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "stream this"}]
    r = chat(oai, msgs, max_tokens=24)
    text, finish, usage, chunks = stream_text(oai, msgs, max_tokens=24)
    assert text == r.choices[0].message.content and len(text) > 0
    assert finish == [r.choices[0].finish_reason] == ["length"]
    assert usage.prompt_tokens == r.usage.prompt_tokens and usage.completion_tokens == 24
    assert usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - PAGE
    assert len(chunks) >= 4  # role, several deltas, finish, usage


def test_stop_strings_cut_the_same_text_streamed_or_not(oai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "say something long " * 4}]
    full = chat(oai, msgs, max_tokens=40).choices[0].message.content
    assert len(full) >= 16, full
    stop = full[10:13]  # three characters: three tokens of the char-level tokenizer
    want = full[: full.find(stop)]
    r = chat(oai, msgs, max_tokens=40, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    text, finish, _, _ = stream_text(oai, msgs, max_tokens=40, stop=stop)
    assert text == want and finish == ["stop"]


def test_tools_are_rendered_and_a_tool_call_history_is_reused(oai: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "weather in Paris?"}]
    plain = chat(oai, msgs)
    r1 = chat(oai, msgs, tools=[WEATHER], extra_headers={"x-session-id": "tools-1"})
    assert r1.usage.prompt_tokens > plain.usage.prompt_tokens + len(json.dumps(WEATHER))
    m = r1.choices[0].message
    assert isinstance(m.content, str) or m.tool_calls  # well-formed either way
    history = [
        *msgs,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    r2 = chat(oai, history, tools=[WEATHER], extra_headers={"x-session-id": "tools-1"})
    # the system prompt with the folded tool schemas and the user turn come from the cache
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - PAGE
    text, _, _, _ = stream_text(oai, history, tools=[WEATHER])
    assert text == (r2.choices[0].message.content or "")


def test_tool_call_output_is_parsed_or_left_as_content() -> None:
    tok = tiny_tokenizer()
    assert tag_format(tok.chat_template)  # type: ignore[attr-defined]  # tools get folded
    allowed = tool_names([WEATHER])
    good = (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    parsed = parse_tool_calls(good, allowed)
    assert parsed.content == "Sure.\n" and len(parsed.tool_calls) == 1
    call = parsed.tool_calls[0].as_dict()
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_") and call["type"] == "function"
    # the model stopped before the closing tag; arguments sent as a JSON string
    cut = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'
    assert json.loads(parse_tool_calls(cut, allowed).tool_calls[0].arguments) == {"city": "Oslo"}
    assert parse_tool_calls(cut, allowed).content is None
    for bad in (
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # bad JSON
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',  # not offered
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',  # not an object
    ):
        assert parse_tool_calls(bad, allowed) == (bad, [])
    assert parse_tool_calls(good, frozenset()) == (good, [])  # no tools offered


def test_delta_filter_holds_back_what_may_become_a_stop_or_a_tag() -> None:
    f = DeltaFilter(stops=["END"])
    assert [f.push(d) for d in ["ab", "cE", "N", "x", "E"]] == ["ab", "c", "", "ENx", ""]
    assert f.rest("abcENx") == "" and f.rest("abcENxE") == "E"
    t = DeltaFilter(tags=["<tool_call>"])
    assert [t.push(d) for d in ["Hi <", "tool", "_call>{", "}"]] == ["Hi ", "", "", ""]
    assert t.rest("Hi ") == "" and t.rest("Hi <tool_call>{}") == "<tool_call>{}"


def test_completions_take_text_or_token_ids(oai: openai.OpenAI) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    r1 = oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    ids = tiny_tokenizer().encode(prompt)  # type: ignore[attr-defined]
    r2 = oai.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert r2.usage is not None and r2.usage.prompt_tokens_details is not None
    assert r2.choices[0].text == r1.choices[0].text and r2.usage.prompt_tokens == len(ids)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(ids) - PAGE
    chunks = list(
        oai.completions.create(
            model="tiny", prompt=ids, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r1.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6  # type: ignore[union-attr]


def test_the_event_loop_serves_while_turns_run(server: ServerProcess) -> None:
    prompts = [f"agent {i}: " + SYSTEM for i in range(4)]
    bodies = [
        {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 12,
         "temperature": 0}
        for p in prompts
    ]  # fmt: skip
    url = server.url + "/v1/chat/completions"
    sequential = [httpx.post(url, json=b).json()["choices"][0]["message"] for b in bodies]

    async def concurrent() -> list[Any]:
        async with httpx.AsyncClient(timeout=60) as c:
            replies = await asyncio.gather(*(c.post(url, json=b) for b in bodies))
        return [r.json()["choices"][0]["message"] for r in replies]

    assert asyncio.run(concurrent()) == sequential
    before = metrics(server)[("kvruntime_turns_total", ())]
    long = {**bodies[0], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", url, json=long, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the turn is decoding
        health = httpx.get(server.url + "/health").json()
        assert health["turns_in_progress"] == 1  # answered while the turn runs
    # the client left: the server stops decoding and records nothing for that turn
    wait_until(lambda: httpx.get(server.url + "/health").json()["turns_in_progress"] == 0, 30)
    assert metrics(server)[("kvruntime_turns_total", ())] == before


def test_metrics_agree_with_what_was_sent(server: ServerProcess, oai: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "count files"}]
    chat(oai, msgs, max_tokens=5)  # caches the prompt: the measured turn reuses it
    m0 = metrics(server)
    r = chat(oai, msgs, max_tokens=5, extra_headers={"x-session-id": "metrics-1"})
    m1 = metrics(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    by_tier = ext(r.usage)["cached_tokens_by_tier"]
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert delta("kvruntime_prefix_cache_queries_tokens_total") == r.usage.prompt_tokens
    for tier, n in by_tier.items():
        assert delta("kvruntime_prefix_cache_hits_tokens_total", tier=tier) == n
    assert delta("kvruntime_turns_total") == 1
    assert delta("kvruntime_completion_tokens_total") == r.usage.completion_tokens
    for hist in ("time_to_first_token", "rehydrate", "prefill", "queue_wait"):
        assert delta(f"kvruntime_{hist}_seconds_count") == 1
    ttft = ext(r.usage)["timings"]["ttft_s"]
    assert delta("kvruntime_time_to_first_token_seconds_sum") == pytest.approx(ttft, abs=1e-5)
    assert delta("kvruntime_http_requests_total", path="/v1/chat/completions", status="200") == 1
    assert delta("kvruntime_kv_moved_bytes_total", tier="device") > 0
    assert m1[("kvruntime_kv_used_bytes", (("tier", "device"),))] > 0
    assert m1[("kvruntime_kv_budget_bytes", (("tier", "host"),))] == 1 << 30
    assert m1[("kvruntime_sessions_active", ())] >= 1
    stats = httpx.get(server.url + "/v1/kvruntime/stats").json()
    assert m1[("kvruntime_prefix_cache_queries_tokens_total", ())] == stats["prompt_tokens"]
    assert m1[("kvruntime_redis_bytes_total", (("direction", "write"),))] > 0  # write-back ran
    # nothing skipped, and the sender's backlog is a gauge (0 once the send is done)
    assert m1[("kvruntime_redis_keys_total", (("outcome", "write_skipped"),))] == 0
    assert ("kvruntime_redis_write_backlog_bytes", ()) in m1


def test_session_pin_and_prefetch_endpoints(server: ServerProcess, oai: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "run the tool"}]
    chat(oai, msgs, extra_body={"session_id": "pin-1"})
    base = server.url + "/v1/kvruntime/sessions/pin-1"
    pinned = httpx.post(base + "/pin", json={"ttl_s": 60}).json()["pinned_tokens"]
    assert pinned >= len(SYSTEM) - PAGE
    assert metrics(server)[("kvruntime_pinned_tokens", ())] == pinned
    assert httpx.post(base + "/pin", json={"ttl_s": -1}).status_code == 400
    assert httpx.delete(base + "/pin").status_code == 200
    assert metrics(server)[("kvruntime_pinned_tokens", ())] == 0
    assert httpx.post(base + "/prefetch").json() == {"queued": True}
    other = httpx.post(base + "/pin", json={"ttl_s": 5}, headers={"x-tenant": "globex"})
    assert other.status_code == 400 and "another tenant" in other.json()["error"]["message"]
    assert httpx.delete(base).json() == {"closed": True}


def test_a_lost_redis_is_a_miss_and_is_counted(
    server: ServerProcess, oai: openai.OpenAI, redis: RedisServer
) -> None:
    redis.kill()
    r = chat(oai, [{"role": "user", "content": "after redis died: " + SYSTEM}])
    assert r.choices[0].finish_reason == "length"  # served, by recomputing
    errors = {k: v for k, v in metrics(server).items() if k[0] == "kvruntime_redis_errors_total"}
    assert sum(errors.values()) > 0, errors
    assert server.alive()


def test_smollm2_tool_call_is_parsed_streamed_and_pins_the_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The real model, shown two worked examples, calls the tool in the format the folded
    tools block asks for; the server returns it as OpenAI ``tool_calls`` and pins the session."""
    server = start_server(tmp_path_factory.mktemp("serve-smollm2"), model="smollm2")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a weather assistant."}]
        for i, (city, temp) in enumerate([("Rome", 25), ("Berlin", 14)]):
            args = json.dumps({"city": city})
            call = {"id": f"c{i}", "type": "function",
                    "function": {"name": "get_weather", "arguments": args}}  # fmt: skip
            msgs += [
                {"role": "user", "content": f"Weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"temp_c": temp})},
                {"role": "assistant", "content": f"It is {temp}°C in {city}."},
            ]
        msgs.append({"role": "user", "content": "Weather in Paris?"})
        r = client.chat.completions.create(
            model="smollm2", messages=msgs, tools=[WEATHER], max_tokens=40, temperature=0,  # type: ignore[arg-type, list-item]
            extra_headers={"x-session-id": "weather"}, extra_body={"pin_ttl_s": 60},
        )  # fmt: skip
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls, r.choices[0].message
        assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        assert isinstance(json.loads(calls[0].function.arguments), dict)  # type: ignore[union-attr]
        assert r.usage is not None
        pinned = ext(r.usage)["pinned_tokens"]
        assert pinned >= r.usage.prompt_tokens - PAGE
        assert metrics(server)[("kvruntime_pinned_tokens", ())] == pinned
        chunks = list(
            client.chat.completions.create(
                model="smollm2", messages=msgs, tools=[WEATHER], max_tokens=40, temperature=0,  # type: ignore[arg-type, list-item]
                stream=True,
            )
        )  # fmt: skip
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not "".join(d.content or "" for d in deltas).strip()  # the call is not content
        streamed = [tc for d in deltas for tc in d.tool_calls or []]
        assert [tc.function.name for tc in streamed] == ["get_weather"]  # type: ignore[union-attr]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    finally:
        server.stop()
