"""The synthetic agent trace: deterministic for a seed (in any process), and it meets the
parameters it states: turn counts, the shared system prompt, 85-95% prefix overlap on append
turns, waits from milliseconds to tens of seconds, prefix breaks, the prompt cap."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from model_fixtures import tiny_tokenizer

from kvruntime.engines.chat import check_messages, check_tools, render
from kvruntime.errors import ConfigError
from kvruntime.trace import (
    Chunk,
    TextRenderer,
    TokenRenderer,
    TraceConfig,
    common_prefix,
    generate,
)

CONFIG = TraceConfig(seed=7, sessions=24)  # the public-figure defaults, 24 sessions
VOCAB = 128256


@pytest.fixture(scope="module")
def trace() -> list:
    return generate(CONFIG)


@pytest.fixture(scope="module")
def prompts(trace: list) -> list[list[list[int]]]:
    r = TokenRenderer(VOCAB)
    return [[r.prompt(t) for t in s.turns] for s in trace]


DIGEST = """
import hashlib
from kvruntime.trace import TokenRenderer, TraceConfig, generate

def digest(config):
    r = TokenRenderer(128256)
    h = hashlib.sha256()
    for s in generate(config):
        for t in s.turns:
            h.update(repr((s.session_id, t.event, round(t.wait_s, 9), t.max_tokens)).encode())
            h.update(bytes(str(r.prompt(t)), "ascii"))
    return h.hexdigest()
"""


def digest(config: TraceConfig) -> str:
    scope: dict = {}
    exec(DIGEST, scope)  # the same code runs in the other process below
    return str(scope["digest"](config))


def test_same_seed_same_trace_in_another_process() -> None:
    config = TraceConfig(seed=3, sessions=6, turns=(3, 6))
    here = digest(config)
    assert digest(config) == here
    assert digest(dataclasses.replace(config, seed=4)) != here
    code = DIGEST + "print(digest(TraceConfig(seed=3, sessions=6, turns=(3, 6))))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == here


def test_sessions_turns_and_the_shared_system_prompt(trace: list, prompts: list) -> None:
    assert len(trace) == CONFIG.sessions
    assert len({s.session_id for s in trace}) == CONFIG.sessions
    lo, hi = CONFIG.turns
    counts = [len(s.turns) for s in trace]
    assert all(lo <= n <= hi for n in counts), counts
    assert min(counts) < 12 and max(counts) > 22  # the whole range is used
    system = trace[0].turns[0].blocks[0]
    assert system.tokens == CONFIG.system_tokens
    assert len(system.tools) == CONFIG.tools
    # every session starts with the same system prompt, token for token
    first = [p[0] for p in prompts]
    assert all(common_prefix(first[0], f) >= CONFIG.system_tokens for f in first)
    for s, ps in zip(trace, prompts, strict=True):
        for t, p in zip(s.turns, ps, strict=True):
            assert len(p) == t.tokens  # nominal lengths are exact for the token renderer
            assert t.max_tokens == CONFIG.output_tokens


def test_append_turns_overlap_85_to_95_percent(trace: list, prompts: list) -> None:
    overlaps = []
    for s, ps in zip(trace, prompts, strict=True):
        assert s.turns[0].event == "start"
        for t, prev, cur in zip(s.turns[1:], ps[:-1], ps[1:], strict=True):
            if t.event in ("tool", "user"):
                shared = common_prefix(prev, cur)
                assert shared == len(prev)  # the whole previous prompt is reused
                overlaps.append(shared / len(cur))
    assert len(overlaps) > 250
    assert min(overlaps) >= 0.85 - 1e-3 and max(overlaps) <= 0.95 + 1e-3
    assert min(overlaps) < 0.86 and max(overlaps) > 0.94  # spread over the range


def test_breaks_edit_the_system_prompt_or_compact(trace: list, prompts: list) -> None:
    events = [t.event for s in trace for t in s.turns]
    edits = events.count("edit")
    assert 0.02 * len(events) < edits < 0.09 * len(events)  # edit_prob 0.05
    assert events.count("compact") >= 1
    assert events.count("user") > 0.04 * len(events)
    for s, ps in zip(trace, prompts, strict=True):
        for i, t in enumerate(s.turns[1:], 1):
            shared = common_prefix(ps[i - 1], ps[i])
            assert len(ps[i]) <= CONFIG.max_prompt_tokens
            if t.event == "edit":
                assert shared < min(len(ps[i - 1]), CONFIG.system_tokens)  # breaks inside it
                assert t.blocks[0] != s.turns[i - 1].blocks[0]
            if t.event == "compact":
                assert len(ps[i]) < len(ps[i - 1])
                # only the system prompt (and the next block's role marker) survives
                assert shared <= CONFIG.system_tokens + 1


def test_waits_span_milliseconds_to_tens_of_seconds(trace: list) -> None:
    lo, hi = CONFIG.tool_wait_s
    starts = [s.turns[0].wait_s for s in trace]
    waits = [t.wait_s for s in trace for t in s.turns[1:]]
    assert all(0 <= w <= CONFIG.arrival_s for w in starts)
    assert all(lo <= w <= hi for w in waits)
    assert min(waits) < 0.01 and max(waits) > 10
    assert sum(w < 0.1 for w in waits) > 0.2 * len(waits)  # log-uniform: many short ones


def test_cpu_preset_and_scaling() -> None:
    cpu = TraceConfig.cpu()
    assert (cpu.sessions, cpu.turns) == (8, (4, 6))
    lengths = [t.tokens for s in generate(cpu) for t in s.turns]
    assert min(lengths) >= 800 and max(lengths) <= 2000  # chat rendering adds ~350
    half = CONFIG.scaled(0.5)
    assert half.system_tokens == CONFIG.system_tokens // 2
    assert half.max_prompt_tokens == CONFIG.max_prompt_tokens // 2
    assert half.overlap == CONFIG.overlap and half.sessions == CONFIG.sessions


@pytest.mark.parametrize(
    "fields",
    [
        {"sessions": 0},
        {"turns": (5, 3)},
        {"overlap": (0.9, 0.8)},
        {"overlap": (0.9, 1.0)},
        {"tool_wait_s": (0.0, 1.0)},
        {"edit_prob": 1.5},
        {"max_prompt_tokens": 4096},
        {"system_tokens": 64},
    ],
)
def test_bad_configs_are_refused(fields: dict) -> None:
    with pytest.raises(ConfigError):
        TraceConfig(**fields)


def test_token_renderer_keeps_content_above_reserved_ids() -> None:
    r = TokenRenderer(1024, reserved=16)
    ids = r.chunk(Chunk(99, 500))
    assert len(ids) == 500 and min(ids) >= 16 and max(ids) < 1024
    assert r.chunk(Chunk(99, 500)) == TokenRenderer(1024).chunk(Chunk(99, 500))
    assert r.chunk(Chunk(100, 500)) != ids
    with pytest.raises(ConfigError):
        TokenRenderer(16, reserved=16)


def test_text_rendering_gives_valid_chats_that_extend_each_other() -> None:
    config = TraceConfig(
        seed=1, sessions=2, turns=(4, 5), system_tokens=300, tools=4,
        task_tokens=(20, 40), call_tokens=(8, 16), max_prompt_tokens=4000,
    )  # fmt: skip
    trace = generate(config)
    tok = tiny_tokenizer()
    words = TextRenderer.fit(lambda s: len(s.split()))
    assert words.tokens_per_word == pytest.approx(1.0)
    assert 10 < words.tool_overhead < 40  # the schema's JSON around its description
    chats = words.sessions(trace)
    for s, chat in zip(trace, chats, strict=True):
        previous: list[int] = []
        for t, ct in zip(s.turns, chat.turns, strict=True):
            check_messages(ct.messages)
            check_tools(ct.tools)
            assert len(ct.tools) == config.tools and ct.event == t.event
            assert [m["role"] for m in ct.messages] == [b.role for b in t.blocks]
            for block, m in zip(t.blocks, ct.messages, strict=True):
                if block.kind == "call":
                    text = m["tool_calls"][0]["function"]["arguments"]["query"]
                else:
                    text = m["content"]
                assert len(text.split()) == sum(c.tokens for c in block.chunks)
            for chunk, tool in zip(t.blocks[0].tools, ct.tools, strict=True):
                described = tool["function"]["description"].split()
                assert len(described) == max(1, chunk.tokens - words.tool_overhead)
            ids = render(tok, ct.messages, ct.tools)
            if t.event in ("tool", "user"):
                assert common_prefix(previous, ids) == len(previous)
            previous = ids


def test_chat_token_rendering_is_deterministic_and_appends() -> None:
    r = TokenRenderer(VOCAB)
    tools = [{"type": "function", "function": {"name": "ls", "parameters": {}}}]
    msgs = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "List it"}]
    first = r.chat(msgs, tools)
    assert first == TokenRenderer(VOCAB).chat(msgs, tools)
    call = {"type": "function", "function": {"name": "ls", "arguments": "{}"}}
    longer = [*msgs, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "content": '{"files": ["a.txt"]}'}]  # fmt: skip
    second = r.chat(longer, tools)
    assert second[: len(first)] == first and len(second) > len(first) + 10
    assert r.chat(msgs, []) != first  # the schemas are part of the prompt
    assert r.words("read the file") == r.words("read  the\nfile")
