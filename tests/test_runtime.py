"""The turn lifecycle on a real (random-weight) transformers model: reuse never changes output,
budgets hold, tiers spill and come back, sessions and tenants stay apart."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import tiny, tiny_dir, tiny_engine  # noqa: F401

from kvruntime.config import RuntimeConfig
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.errors import BadRequest, Overloaded
from kvruntime.runtime import Runtime

PAGE = 4
SYSTEM = "You are a careful agent. Tools: search(query), read(path), write(path, text). " * 2


def page_bytes(engine: TransformersEngine) -> int:
    return engine.layout.page_layout(PAGE, engine.dtype).page_nbytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MakeRuntime = Callable[..., Runtime]


@pytest.fixture
def make_runtime(tiny_engine: TransformersEngine, tiny: LoadedModel) -> Iterator[MakeRuntime]:  # noqa: F811
    made: list[Runtime] = []

    def make(clock: Callable[[], float] | None = None, **fields: Any) -> Runtime:
        fields.setdefault("page_size", PAGE)
        fields.setdefault("prefill_tokens_per_s", 1000.0)
        fields.setdefault("host_bytes_per_s", 1e9)
        kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
        rt = Runtime(tiny_engine, tiny.tokenizer, RuntimeConfig(**fields), **kwargs)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def conversation(
    rt: Runtime, turns: int, tag: str = "", session_id: str | None = None
) -> list[Any]:
    s = rt.session(session_id)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    results = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"{tag}step {t}: list the files please"})
        r = s.chat(msgs, max_tokens=6)
        results.append(r)
        msgs.append({"role": "assistant", "content": r.text})
        msgs.append({"role": "tool", "content": f"file_{t}.txt"})
    rt.cache.flush()
    return results


def test_reuse_gives_the_same_tokens_as_recompute_with_host_spill(
    make_runtime: MakeRuntime,
) -> None:
    base = make_runtime(reuse=False)
    want = [r.token_ids for r in conversation(base, 5)]
    assert base.stats().cached_tokens == 0
    # a device pool of 12 pages holds less than one turn's prompt: pages spill to the host
    rt = make_runtime(device_kv_bytes=12 * page_bytes(base.engine), host_kv_bytes=1 << 22)
    got = conversation(rt, 5)
    assert [r.token_ids for r in got] == want
    assert got[0].usage.cached_tokens == 0
    for r in got[1:]:
        assert r.usage.cached_tokens >= r.usage.prompt_tokens * 0.6, r.usage
        assert r.usage.cached_tokens % PAGE == 0
    by_tier = rt.stats().cached_tokens_by_tier
    assert by_tier["device"] > 0 and by_tier["host"] > 0


def test_budgets_hold_under_pressure(make_runtime: MakeRuntime) -> None:
    pb = page_bytes(make_runtime(reuse=False).engine)
    rt = make_runtime(device_kv_bytes=10 * pb + pb // 2, host_kv_bytes=30 * pb)
    for i in range(3):
        conversation(rt, 3, tag=f"session {i} ")
        usage = rt.tier_usage()
        assert usage["device"]["used_bytes"] <= rt.config.device_kv_bytes
        assert usage["device"]["pages"] == 10
        assert usage["host"]["used_bytes"] <= rt.config.host_kv_bytes
    rt.cache.tree.check_integrity()


def test_fork_shares_the_parents_prefix(make_runtime: MakeRuntime) -> None:
    rt = make_runtime()
    base = make_runtime(reuse=False)
    parent = rt.session()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "plan the work"}]
    parent.chat(msgs, max_tokens=4)
    children = [parent.fork(), parent.fork()]
    for i, child in enumerate(children):
        branch = [*msgs, {"role": "user", "content": f"sub-agent {i}: do part {i}"}]
        r = child.chat(branch, max_tokens=5)
        assert r.usage.cached_tokens >= 100
        assert r.token_ids == base.session().chat(branch, max_tokens=5).token_ids
        assert child.session_id != parent.session_id


def test_tenants_never_share_kv(make_runtime: MakeRuntime) -> None:
    rt = make_runtime()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    rt.session(tenant="acme").chat(msgs, max_tokens=2)
    assert rt.session(tenant="acme").chat(msgs, max_tokens=2).usage.cached_tokens > 0
    assert rt.session(tenant="globex").chat(msgs, max_tokens=2).usage.cached_tokens == 0
    with pytest.raises(BadRequest, match="another tenant"):
        rt.session("s1", tenant="acme") and rt.session("s1", tenant="globex")


def test_concurrent_sessions_match_sequential_runs(make_runtime: MakeRuntime) -> None:
    pb = page_bytes(make_runtime(reuse=False).engine)
    sequential = make_runtime(reuse=False)
    want = {
        i: [r.token_ids for r in conversation(sequential, 3, tag=f"agent {i} ")] for i in range(4)
    }
    rt = make_runtime(device_kv_bytes=40 * pb, host_kv_bytes=200 * pb)
    got: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            got[i] = [r.token_ids for r in conversation(rt, 3, tag=f"agent {i} ")]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == want
    assert rt.stats().turns == 12 and rt.stats().cached_tokens > 0


def test_full_queue_is_a_clear_overload(make_runtime: MakeRuntime) -> None:
    rt = make_runtime(max_queue=1)
    gate = threading.Event()
    blocker = rt.queue.submit(lambda _wait: gate.wait(10))
    with pytest.raises(Overloaded, match="already queued"):
        rt.session().chat([{"role": "user", "content": "hi"}], max_tokens=1)
    gate.set()
    blocker.result()
    assert rt.session().chat([{"role": "user", "content": "hi"}], max_tokens=1).usage.prompt_tokens


def test_divergence_points_at_the_changed_system_prompt(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    rt = make_runtime()
    s = rt.session()
    first = [
        {"role": "system", "content": f"Time: 10:00. {SYSTEM}"},
        {"role": "user", "content": "go"},
    ]
    s.chat(first, max_tokens=2)
    second = [
        {"role": "system", "content": f"Time: 10:05. {SYSTEM}"},
        {"role": "user", "content": "go"},
    ]
    r = s.chat(second, max_tokens=2)
    record = rt.analytics.records()[-1]
    assert record.divergence is not None
    d = record.divergence
    assert d.before.endswith("Time: 10:0"), d
    assert d.previous_text.startswith("0.") and d.current_text.startswith("5."), d
    assert r.usage.cached_tokens <= record.divergence.token_index
    out = tmp_path / "turns.jsonl"
    assert rt.analytics.export_jsonl(out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["divergence"] is None and rows[1]["divergence"]["token_index"] > 0
    assert rows[1]["cached_tokens"] == r.usage.cached_tokens
    assert set(rows[1]["timings"]) >= {"queue_s", "match_s", "rehydrate_s", "prefill_s", "ttft_s"}


def test_pin_keeps_a_waiting_session_on_the_device_until_its_ttl(make_runtime: MakeRuntime) -> None:
    pb = page_bytes(make_runtime(reuse=False).engine)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "run the tool"}]
    follow = [*msgs, {"role": "tool", "content": "done"}]

    def tool_wait(pin: bool) -> tuple[Runtime, Clock, Any]:
        clock = Clock()
        rt = make_runtime(clock=clock, device_kv_bytes=60 * pb, host_kv_bytes=400 * pb)
        waiting = rt.session()
        waiting.chat(msgs, max_tokens=3)
        rt.cache.flush()
        if pin:
            assert waiting.pin(ttl_s=30) > 0
        conversation(rt, 2, tag="a noisy neighbour with a long and different prompt ")
        return rt, clock, waiting.chat(follow, max_tokens=2).usage

    _, _, unpinned = tool_wait(pin=False)
    assert unpinned.cached_tokens_by_tier["host"] > 0  # the neighbour pushed it off the device
    rt, clock, pinned = tool_wait(pin=True)
    assert pinned.cached_tokens == unpinned.cached_tokens >= 180
    assert pinned.cached_tokens_by_tier["device"] == pinned.cached_tokens
    assert len(rt.pins.pinned()) == 1
    clock.now += 31
    rt.stats()  # pins expire lazily against the clock
    assert rt.pins.pinned() == {}


def test_prefetch_brings_spilled_pages_back_to_the_device(make_runtime: MakeRuntime) -> None:
    pb = page_bytes(make_runtime(reuse=False).engine)
    rt = make_runtime(device_kv_bytes=45 * pb, host_kv_bytes=400 * pb)
    s = rt.session()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"}]
    s.chat(msgs, max_tokens=3)
    conversation(rt, 2, tag="another agent pushes the first one out of the device pool ")
    s.prefetch()
    rt.queue.call(lambda _wait: None)  # the prefetch ran before this
    rt.cache.flush()
    r = s.chat([*msgs, {"role": "user", "content": "second"}], max_tokens=2)
    assert r.usage.cached_tokens_by_tier["device"] >= 100
    assert r.usage.cached_tokens_by_tier["host"] == 0


def test_bad_input_is_refused_clearly(make_runtime: MakeRuntime) -> None:
    rt = make_runtime()
    s = rt.session()
    with pytest.raises(BadRequest):
        s.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(BadRequest, match="context"):
        rt.generate(list(range(5, 105)) * 6, max_tokens=1)  # 600 tokens > 512
    with pytest.raises(BadRequest, match="max_tokens"):
        s.chat([{"role": "user", "content": "hi"}], max_tokens=-1)
    s.close()
    with pytest.raises(BadRequest, match="closed"):
        s.chat([{"role": "user", "content": "hi"}])


def test_generate_and_stop_strings(make_runtime: MakeRuntime) -> None:
    rt = make_runtime()
    prompt = list(range(10, 90))
    r1 = rt.generate(prompt, max_tokens=8)
    r2 = rt.generate(prompt, max_tokens=8)
    assert r1.token_ids == r2.token_ids and r2.usage.cached_tokens == 76
    assert r1.finish_reason == "length" and len(r1.token_ids) == 8
    stop = r1.text[2:4]
    if stop:
        r3 = rt.generate(prompt, max_tokens=8)
        s = rt.session()
        r3 = s.run_tokens(prompt, rt_params(stop))
        assert r3.finish_reason == "stop" and stop not in r3.text


def rt_params(stop: str) -> Any:
    from kvruntime.runtime import SamplingParams

    return SamplingParams(max_tokens=8, stop=(stop,))


def test_session_bookkeeping_is_bounded(make_runtime: MakeRuntime) -> None:
    rt = make_runtime(max_sessions=3)
    sessions = [rt.session(f"s{i}") for i in range(5)]
    assert rt.session("s4") is sessions[4]  # remembered
    assert rt.session("s0") is not sessions[0]  # dropped: the oldest went first
    assert rt.active_sessions == 3
    sessions[4].close()
    assert rt.active_sessions == 2
    assert rt.session("s4") is not sessions[4]  # a closed session is never handed out again
