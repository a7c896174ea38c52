"""Every script in examples/ run as a user would, against one real ``kvruntime serve`` process
on SmolLM2: each completes, and each model request after the first reuses the previous
request's prompt (the examples print their per-turn reuse as a ``REUSE_JSON`` line).

Also what the frameworks rely on from the server: a malformed tool call from the model comes
back as well-formed content (streamed or not, and through LangChain), and the ``developer``
role is the system role.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from server_fixtures import ServerProcess, start_server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PAGE = 16  # the server's default page size: a trailing partial page may be recomputed
FRAMEWORK_EXAMPLES = ["openai_tool_loop.py", "openai_agents_sdk.py", "langchain_agent.py"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("serve-examples"), model="smollm2")
    yield server
    server.stop()


def run_example(script: str, *args: str) -> list[dict[str, int]]:
    """Run ``examples/script``; its per-turn reuse rows, checked for consistency."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REUSE_JSON ")]
    assert len(lines) == 1, proc.stdout[-2000:]
    turns: list[dict[str, int]] = json.loads(lines[0].removeprefix("REUSE_JSON "))["turns"]
    for t in turns:
        assert t["device"] + t["host"] + t["redis"] == t["cached_tokens"], t
        assert t["cached_tokens"] + t["recomputed"] == t["prompt_tokens"], t
    return turns


@pytest.mark.parametrize("script", FRAMEWORK_EXAMPLES)
def test_framework_example_reuses_each_previous_prompt(server: ServerProcess, script: str) -> None:
    turns = run_example(script, "--base-url", server.url + "/v1", "--model", server.name)
    assert len(turns) >= 4, turns  # one request per user turn at least
    for i, (prev, cur) in enumerate(itertools.pairwise(turns), 2):
        # the conversation only grows, so all of the previous prompt but a partial page is reused
        assert cur["cached_tokens"] >= prev["prompt_tokens"] - PAGE, (script, i, turns)


def test_subagents_inprocess_reuse_the_planner_prompt() -> None:
    planner, *subagents = run_example("subagents_inprocess.py")
    assert len(subagents) == 3
    for sub in subagents:
        assert sub["cached_tokens"] >= planner["prompt_tokens"] - PAGE, (planner, subagents)


def malformed_call_messages() -> list[dict[str, Any]]:
    """A conversation after which SmolLM2 (greedy) opens a ``<tool_call>`` block but writes a
    tool *result* into it (no function name): a malformed call."""
    args = json.dumps({"city": "Rome"})
    call = {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    return [
        {"role": "system", "content": "You are a weather assistant. Use the tools."},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": "c0",
            "content": json.dumps({"city": "Rome", "temp_c": 25}),
        },
        {"role": "assistant", "content": "It is 25°C in Rome."},
        {"role": "user", "content": "Weather in Paris?"},
    ]


def test_a_malformed_tool_call_is_well_formed_content(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    msgs = malformed_call_messages()
    kw: dict[str, Any] = dict(
        model=server.name, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=40
    )
    raw = client.chat.completions.create(**kw, extra_body={"parse_tool_calls": False})
    text = raw.choices[0].message.content or ""
    assert "<tool_call>" in text and '"name"' not in text, f"the model's output changed: {text!r}"

    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == text and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == raw.choices[0].finish_reason != "tool_calls"

    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == text  # held back, then sent whole
    assert not any(d.tool_calls for d in deltas)
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

    llm = ChatOpenAI(
        model=server.name, base_url=server.url + "/v1", api_key="unused",  # type: ignore[arg-type]
        temperature=0, max_tokens=40, max_retries=0,  # type: ignore[call-arg]
    )  # fmt: skip
    reply = llm.bind_tools([WEATHER]).invoke(msgs)
    assert isinstance(reply, AIMessage)
    assert reply.content == text and not reply.tool_calls and not reply.invalid_tool_calls


def test_the_developer_role_is_the_system_role(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    usage = []
    for role in ("system", "developer"):
        msgs: Any = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        r = client.chat.completions.create(
            model=server.name, messages=msgs, max_tokens=1, temperature=0
        )
        assert r.usage is not None
        usage.append(r.usage)
    assert usage[1].prompt_tokens == usage[0].prompt_tokens
    assert usage[1].prompt_tokens_details is not None
    assert usage[1].prompt_tokens_details.cached_tokens >= usage[0].prompt_tokens - PAGE


def test_fields_frameworks_send_are_accepted(server: ServerProcess) -> None:
    """What the Agents SDK and LangChain may send beside the messages: accepted (ignored
    where only a hint, see docs/server.md), streamed or not."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    schema = {"name": "answer", "schema": {"type": "object"}, "strict": True}
    extra: dict[str, Any] = {
        "parallel_tool_calls": False,
        "tool_choice": "required",
        "response_format": {"type": "json_schema", "json_schema": schema},
        "metadata": {"run": "test"},
        "store": False,
        "user": "someone",
        "service_tier": "auto",
        "reasoning_effort": "low",
        "prompt_cache_key": "k",
    }
    msgs: Any = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for stream in (False, True):
        r = client.chat.completions.create(
            model=server.name, messages=msgs, tools=[WEATHER], max_tokens=2, temperature=0,  # type: ignore[list-item]
            stream=stream, stream_options={"include_usage": True} if stream else None,
            extra_body=extra,
        )  # fmt: skip
        if stream:
            chunks = list(r)  # type: ignore[arg-type]
            assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
        else:
            assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")  # type: ignore[union-attr]
