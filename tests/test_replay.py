"""The replay harness on a real runtime and a tiny random-weight model: every configuration
replays the same prompts; ``reuse=False`` reuses nothing, the kvruntime configurations reuse
from the tiers they have; per-turn bytes agree with the tokens each tier served and with the
runtime's own statistics; tool waits are slept scaled; the benchmark command runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import tiny, tiny_dir, tiny_engine  # noqa: F401
from redis_servers import RedisServer, redis_server  # noqa: F401

from kvruntime.config import RuntimeConfig
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.errors import ConfigError
from kvruntime.replay import (
    CONFIG_NAMES,
    ReplayConfig,
    ReplayResult,
    ReplaySession,
    ReplayTurn,
    compare,
    comparison_configs,
    from_chats,
    from_trace,
    live_kv_pages,
    quantile,
    replay,
    working_set_pages,
)
from kvruntime.runtime import Runtime
from kvruntime.store.codec import get_codec
from kvruntime.trace import ChatSession, ChatTurn, TokenRenderer, TraceConfig, generate

PAGE = 4
TRACE = TraceConfig(seed=5, sessions=4, turns=(3, 4), system_tokens=120, tools=2,
                    task_tokens=(8, 16), call_tokens=(4, 8), max_prompt_tokens=400,
                    output_tokens=3, edit_prob=0.0, arrival_s=0.0)  # fmt: skip
BASE = RuntimeConfig(page_size=PAGE, prefill_tokens_per_s=1000.0, host_bytes_per_s=1e9,
                     redis_bytes_per_s=1e9)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sessions() -> list[ReplaySession]:
    return from_trace(generate(TRACE), TokenRenderer(128, reserved=16))


def working_set_bytes(engine: TransformersEngine, sessions: list[ReplaySession]) -> int:
    layout = engine.layout.page_layout(PAGE, engine.dtype)
    return working_set_pages(sessions, PAGE) * layout.page_nbytes


def assert_bytes_match_tokens(result: ReplayResult, config: RuntimeConfig, engine: Any) -> None:
    layout = engine.layout.page_layout(PAGE, engine.dtype)
    page_bytes = {
        "device": layout.page_nbytes,
        "host": get_codec(config.host_codec).page_nbytes(layout),
        "redis": get_codec(config.redis_codec).page_nbytes(layout),
    }
    for row in result.rows:
        for tier, tokens in row.cached_tokens_by_tier.items():
            assert tokens % PAGE == 0, row
            moved = row.bytes_moved.get(tier, 0)
            if tier == "redis" and tokens:  # a value: its payload plus a header of < 1 KiB
                assert tokens // PAGE * page_bytes[tier] <= moved, row
                assert moved < tokens // PAGE * (page_bytes[tier] + 1024), row
            else:
                assert moved == tokens // PAGE * page_bytes[tier], row


def test_every_configuration_on_a_real_runtime(
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
    sessions: list[ReplaySession],
) -> None:
    configs = comparison_configs(
        BASE, working_set_bytes(tiny_engine, sessions), redis_server.url, host_fraction=0.1
    )
    assert list(configs) == list(CONFIG_NAMES)
    seen: list[str] = []
    results = compare(
        tiny_engine, tiny.tokenizer, sessions, configs, progress=lambda n, _r: seen.append(n)
    )
    assert seen == list(CONFIG_NAMES)
    turns = sum(len(s.turns) for s in sessions)
    prompts = {(s.session_id, i): len(t.tokens) for s in sessions for i, t in enumerate(s.turns)}
    for name, result in results.items():
        s = result.summary()
        assert result.errors == () and s.turns == turns, name
        assert {(r.session_id, r.turn): r.prompt_tokens for r in result.rows} == prompts
        assert s.prompt_tokens == sum(prompts.values())
        assert s.wall_s > 0 and s.prompt_tokens_per_s == pytest.approx(s.prompt_tokens / s.wall_s)
        for row in result.rows:
            assert 0 <= row.queue_s <= row.ttft_s and row.service_ttft_s >= 0
            assert row.cached_tokens <= row.prompt_tokens - 1
        assert_bytes_match_tokens(result, configs[name], tiny_engine)
    by = {name: r.summary().cached_tokens_by_tier for name, r in results.items()}
    moved = {name: r.summary().bytes_moved for name, r in results.items()}
    written = {name: r.summary().bytes_written for name, r in results.items()}
    assert results["recompute"].summary().cached_tokens == 0
    assert sum(moved["recompute"].values()) == 0 and sum(written["recompute"].values()) == 0
    for name in CONFIG_NAMES[1:]:
        assert results[name].summary().cached_tokens > 0, name
        assert by[name]["device"] > 0, name
    assert by["device"]["host"] == by["device"]["redis"] == 0
    assert by["host"]["redis"] == 0 and by["host"]["host"] > 0
    assert written["device"].get("host", 0) == 0 and written["host"]["host"] > 0
    for name in ("redis-int8", "redis-int4"):
        assert by[name]["redis"] > 0 and written[name]["redis"] > 0, name
    # int4 pages are smaller than int8 ones: fewer bytes read per token restored from Redis
    # (by how much depends on the scales' share of a page, large for this tiny shape)
    per_token = {n: moved[n]["redis"] / by[n]["redis"] for n in ("redis-int8", "redis-int4")}
    assert per_token["redis-int4"] < per_token["redis-int8"]


def test_summary_agrees_with_the_runtime_stats(
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
    sessions: list[ReplaySession],
) -> None:
    config = comparison_configs(
        BASE, working_set_bytes(tiny_engine, sessions), redis_server.url, names=["redis-int8"]
    )["redis-int8"]
    with Runtime(tiny_engine, tiny.tokenizer, config) as rt:
        result = replay(rt, sessions)
        stats = rt.stats()
    s = result.summary()
    assert stats.turns == s.turns and stats.prompt_tokens == s.prompt_tokens
    assert stats.cached_tokens_by_tier == s.cached_tokens_by_tier
    assert {k: v for k, v in stats.bytes_moved.items() if v} == {
        k: v for k, v in s.bytes_moved.items() if v
    }
    assert 0 < s.reuse == pytest.approx(stats.reuse_ratio)
    assert s.ttft_p50_s <= s.ttft_p90_s <= s.ttft_p99_s <= max(r.ttft_s for r in result.rows)
    assert s.service_ttft_p50_s <= s.service_ttft_p90_s <= s.service_ttft_p99_s
    assert s.service_ttft_mean_s <= s.ttft_mean_s


def test_tool_waits_are_slept_scaled(
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
    sessions: list[ReplaySession],
) -> None:
    slept: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            slept.append(seconds)

    few = sessions[:2]
    with Runtime(tiny_engine, tiny.tokenizer, BASE) as rt:
        result = replay(rt, few, ReplayConfig(time_scale=0.5), sleep=sleep)
    want = sorted(t.wait_s * 0.5 for s in few for t in s.turns if t.wait_s > 0)
    assert sorted(slept) == pytest.approx(want) and len(want) >= 2
    assert len(result.rows) == sum(len(s.turns) for s in few)
    with pytest.raises(ConfigError):
        ReplayConfig(time_scale=-1)


def test_working_set_chat_cut_and_quantiles() -> None:
    a = ReplayTurn(tuple(range(1, 10)), 1, 0.0, "start")  # 2 full pages + 1 token
    b = ReplayTurn((1, 2, 3, 4, 9, 9, 9, 9), 1, 0.0, "tool")
    c = ReplayTurn((5, 6, 7, 8, 1, 2, 3, 4), 1, 0.0, "start")  # same tokens, other chain
    x, y = ReplaySession("x", (a, b)), ReplaySession("y", (c,))
    assert working_set_pages([x, y], 4) == 5
    # live: the peak over steps of what the sessions hold together (step 0: a and c), pages
    # shared across sessions counted once
    assert live_kv_pages([x, y], 4) == 4
    assert live_kv_pages([x, y, ReplaySession("z", (a,))], 4) == 4
    assert live_kv_pages([], 4) == 0
    # longest prompts not live together: step 0 holds a + e (3 pages), step 1 short + c (3);
    # the longest prompts a and c would make 4
    e = ReplayTurn((9, 9, 9, 9), 1, 0.0, "start")
    short = ReplayTurn((1, 2, 3, 4), 1, 0.0, "tool")
    grows = [ReplaySession("x", (a, short)), ReplaySession("y", (e, c))]
    assert live_kv_pages(grows, 4) == 3
    # a finished session holds nothing: y's one turn is not live at step 1
    assert live_kv_pages([ReplaySession("x", (short, a)), ReplaySession("y", (c,))], 4) == 3
    msgs = ({"role": "user", "content": "one two three"},)
    longer = (*msgs, {"role": "assistant", "content": "four five six seven eight nine"})
    chat = ChatSession(
        "c", (ChatTurn(msgs, (), 0.0, 2, "start"), ChatTurn(longer, (), 1.0, 2, "user"))
    )
    r = TokenRenderer(128)
    cut = from_chats([chat], r.chat, max_prompt_tokens=len(r.chat(msgs, ())) + 2)
    assert len(cut) == 1 and len(cut[0].turns) == 1
    assert from_chats([chat], r.chat, max_prompt_tokens=3) == []
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and quantile([], 0.9) == 0.0
    assert quantile([5.0], 0.9) == 5.0
    with pytest.raises(ConfigError, match="unknown configuration"):
        comparison_configs(BASE, 1 << 20, None, names=["gpu-only"])
    no_redis = comparison_configs(BASE, 1 << 20, None)
    assert list(no_redis) == ["recompute", "device", "host"]
    assert no_redis["recompute"].reuse is False and no_redis["device"].host_kv_bytes == 0
    assert no_redis["host"].device_kv_bytes == 1 << 18 and no_redis["host"].host_kv_bytes == 1 << 19


def test_benchmark_command_runs_the_gpu_path_on_a_tiny_llama(tmp_path: Path) -> None:
    out = tmp_path / "agent.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "bench_agent_workload.py"), "--tiny",
        "--no-record", "--time-scale", "0", "--sessions", "2", "--turns", "2,3", "--size", "0.25",
        "--redis", "none", "--configs", "recompute,host", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads(out.read_text())["runs"]["synthetic"]
    assert list(runs) == ["recompute", "host"]
    assert runs["recompute"]["summary"]["cached_tokens"] == 0
    assert runs["host"]["summary"]["cached_tokens"] > 0
    assert all(not r["errors"] for r in runs.values())
    turns = {n: len(r["rows"]) for n, r in runs.items()}
    assert len(set(turns.values())) == 1 and 4 <= turns["host"] <= 6
    # memory pressure as stated: the device pool a quarter of the live KV, the host tier half
    info = json.loads(out.read_text())["workloads"]["synthetic"]
    assert 0 < info["live_kv_tokens"] <= info["all_kv_tokens"]
    assert info["device_kv_bytes"] == info["live_kv_bytes"] // 4
    assert info["host_kv_bytes"] == info["live_kv_bytes"] // 2
    # the saved run is published again from its JSON (here without touching docs/)
    again = subprocess.run(
        [*cmd[:2], "--from-json", str(out), "--no-record"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "TTFT p99 ms" in again.stdout and "host" in again.stdout
