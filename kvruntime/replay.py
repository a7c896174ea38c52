"""Replay agent sessions against a Runtime and measure them: per-turn TTFT, end-to-end
throughput, reuse by tier, bytes moved. Also the comparison of runtime configurations under
memory pressure that ``benchmarks/bench_agent_workload.py`` runs.

Prompts are rendered to token ids before the clock starts, so every configuration replays the
very same tokens; assistant turns are scripted (the model's output is generated and timed but
not fed back), which keeps a replay identical across configurations and codecs. Sessions run
concurrently, one thread each; a tool's wait is slept for ``wait_s * time_scale``.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvruntime.config import RuntimeConfig
from kvruntime.engines.base import Engine
from kvruntime.errors import ConfigError, KVRuntimeError
from kvruntime.results import TIERS, ChatResult
from kvruntime.runtime import Runtime
from kvruntime.trace import ChatSession, SessionTrace, TokenRenderer

ChatRender = Callable[[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]], list[int]]
CONFIG_NAMES = ("recompute", "device", "host", "redis-int8", "redis-int4")


@dataclass(frozen=True)
class ReplayTurn:
    tokens: tuple[int, ...]
    max_tokens: int
    wait_s: float  # before sending, unscaled
    event: str


@dataclass(frozen=True)
class ReplaySession:
    session_id: str
    turns: tuple[ReplayTurn, ...]


def from_trace(trace: Sequence[SessionTrace], renderer: TokenRenderer) -> list[ReplaySession]:
    return [
        ReplaySession(
            s.session_id,
            tuple(
                ReplayTurn(tuple(renderer.prompt(t)), t.max_tokens, t.wait_s, t.event)
                for t in s.turns
            ),
        )
        for s in trace
    ]


def from_chats(
    chats: Sequence[ChatSession], render: ChatRender, max_prompt_tokens: int | None = None
) -> list[ReplaySession]:
    """Render chat sessions (``render(messages, tools) -> ids``). A session is cut before its
    first prompt longer than ``max_prompt_tokens`` (a model's context); empty ones are dropped."""
    out = []
    for chat in chats:
        turns = []
        for t in chat.turns:
            ids = render(t.messages, t.tools)
            if max_prompt_tokens is not None and len(ids) + t.max_tokens > max_prompt_tokens:
                break
            turns.append(ReplayTurn(tuple(ids), t.max_tokens, t.wait_s, t.event))
        if turns:
            out.append(ReplaySession(chat.session_id, tuple(turns)))
    return out


def working_set_pages(sessions: Sequence[ReplaySession], page_size: int) -> int:
    """Distinct full pages (as prefix chains) over every prompt: all the KV the replay
    computes, including prefixes that an edit or a compaction left behind."""
    return _distinct_pages((t.tokens for s in sessions for t in s.turns), page_size)


def live_kv_pages(sessions: Sequence[ReplaySession], page_size: int) -> int:
    """The most KV the sessions hold live at the same time, in full pages: the sessions start
    together and take one turn per step; at step k each session that still has a turn k
    holds that turn's prompt (a finished session holds nothing). The peak over the steps of
    the distinct pages held (shared pages, such as a common system prompt, counted once).

    Each session's longest prompt summed would overstate it: sessions grow at different
    paces and end at different turns, so their longest prompts are not live together (on
    the H200 trace: 178,784 tokens that way against a peak of 110,240 held at one step)."""
    steps = max((len(s.turns) for s in sessions), default=0)
    return max(
        (
            _distinct_pages((s.turns[k].tokens for s in sessions if k < len(s.turns)), page_size)
            for k in range(steps)
        ),
        default=0,
    )


def _distinct_pages(prompts: Iterable[Sequence[int]], page_size: int) -> int:
    ids: dict[tuple[int, tuple[int, ...]], int] = {}
    for tokens in prompts:
        parent = -1
        for i in range(0, len(tokens) - page_size + 1, page_size):
            key = (parent, tuple(tokens[i : i + page_size]))
            parent = ids.setdefault(key, len(ids))
    return len(ids)


# ---------------------------------------------------------------------------- the replay


@dataclass(frozen=True)
class ReplayConfig:
    time_scale: float = 0.0  # tool waits are slept for wait_s * time_scale (0: no waits)
    tenant: str = "default"
    flush_timeout_s: float = 120.0  # write-back drained after the run (not timed)

    def __post_init__(self) -> None:
        if self.time_scale < 0:
            raise ConfigError(f"ReplayConfig.time_scale must be >= 0, got {self.time_scale}")


class TurnRow(NamedTuple):
    session_id: str
    turn: int
    event: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens_by_tier: dict[str, int]
    ttft_s: float  # submission to first token, queueing behind other sessions included
    queue_s: float
    bytes_moved: dict[str, int]  # read from each tier into the device (analytics)
    bytes_written: dict[str, int]  # queued for write-back to each tier (analytics)
    engine_s: float = 0.0  # the engine's time on the turn: queue_s to its result
    commit_s: float = 0.0  # of which caching its pages after the decode

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached_tokens_by_tier.values())

    @property
    def service_ttft_s(self) -> float:
        """TTFT once the engine took the turn: what the turn itself cost."""
        return self.ttft_s - self.queue_s


class ReplaySummary(NamedTuple):
    turns: int
    errors: int
    prompt_tokens: int
    cached_tokens: int
    cached_tokens_by_tier: dict[str, int]
    reuse: float  # cached / prompt tokens
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    service_ttft_p50_s: float
    service_ttft_p90_s: float
    service_ttft_p99_s: float
    service_ttft_mean_s: float
    engine_mean_s: float  # the engine's time per turn (a turn's share of what others wait for)
    commit_mean_s: float
    wall_s: float
    prompt_tokens_per_s: float  # end to end: prompt tokens served per second of the run
    turns_per_s: float
    bytes_moved: dict[str, int]
    bytes_written: dict[str, int]


@dataclass(frozen=True)
class ReplayResult:
    rows: tuple[TurnRow, ...]
    wall_s: float
    errors: tuple[str, ...]

    def summary(self) -> ReplaySummary:
        rows = self.rows
        ttft = sorted(r.ttft_s for r in rows)
        service = sorted(r.service_ttft_s for r in rows)
        prompt = sum(r.prompt_tokens for r in rows)
        cached = sum(r.cached_tokens for r in rows)
        wall = max(self.wall_s, 1e-9)
        return ReplaySummary(
            turns=len(rows),
            errors=len(self.errors),
            prompt_tokens=prompt,
            cached_tokens=cached,
            cached_tokens_by_tier=_total(r.cached_tokens_by_tier for r in rows),
            reuse=cached / prompt if prompt else 0.0,
            ttft_p50_s=quantile(ttft, 0.5),
            ttft_p90_s=quantile(ttft, 0.9),
            ttft_p99_s=quantile(ttft, 0.99),
            ttft_mean_s=statistics.fmean(ttft) if ttft else 0.0,
            service_ttft_p50_s=quantile(service, 0.5),
            service_ttft_p90_s=quantile(service, 0.9),
            service_ttft_p99_s=quantile(service, 0.99),
            service_ttft_mean_s=statistics.fmean(service) if service else 0.0,
            engine_mean_s=statistics.fmean(r.engine_s for r in rows) if rows else 0.0,
            commit_mean_s=statistics.fmean(r.commit_s for r in rows) if rows else 0.0,
            wall_s=self.wall_s,
            prompt_tokens_per_s=prompt / wall,
            turns_per_s=len(rows) / wall,
            bytes_moved=_total(r.bytes_moved for r in rows),
            bytes_written=_total(r.bytes_written for r in rows),
        )


def replay(
    rt: Runtime,
    sessions: Sequence[ReplaySession],
    config: ReplayConfig | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.perf_counter,
) -> ReplayResult:
    """Run every session on ``rt`` at once (a thread each) and wait for all of them; then
    drain write-back. A turn that raises a ``KVRuntimeError`` ends its session and is listed
    in ``errors``. Bytes come from ``rt.analytics``, which must keep the run's records."""
    config = config or ReplayConfig()
    done: list[tuple[str, int, str, ChatResult]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(s: ReplaySession) -> None:
        session = rt.session(s.session_id, tenant=config.tenant)
        for i, turn in enumerate(s.turns):
            if turn.wait_s and config.time_scale:
                sleep(turn.wait_s * config.time_scale)
            try:
                r = rt.generate(turn.tokens, max_tokens=turn.max_tokens, session=session)
            except KVRuntimeError as exc:
                with lock:
                    errors.append(f"{s.session_id} turn {i}: {type(exc).__name__}: {exc}")
                return
            with lock:
                done.append((s.session_id, i, turn.event, r))
        session.close()

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in sessions]
    start = clock()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = clock() - start
    rt.cache.flush(config.flush_timeout_s)
    records = {(r.session_id, r.turn): r for r in rt.analytics.records()}
    rows = []
    for sid, i, event, r in sorted(done, key=lambda d: (d[0], d[1])):
        rec = records.get((sid, i))
        rows.append(
            TurnRow(
                session_id=sid,
                turn=i,
                event=event,
                prompt_tokens=r.usage.prompt_tokens,
                completion_tokens=r.usage.completion_tokens,
                cached_tokens_by_tier=dict(r.usage.cached_tokens_by_tier),
                ttft_s=r.timings.ttft_s,
                queue_s=r.timings.queue_s,
                bytes_moved=dict(rec.bytes_moved) if rec else {},
                bytes_written=dict(rec.bytes_written) if rec else {},
                engine_s=r.timings.total_s - r.timings.queue_s,
                commit_s=r.timings.commit_s,
            )
        )
    return ReplayResult(tuple(rows), wall, tuple(errors))


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the sorted ``values``' order statistics (0 if empty)."""
    if not values:
        return 0.0
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _total(dicts: Any) -> dict[str, int]:
    out = dict.fromkeys(TIERS, 0)
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


# ---------------------------------------------------------------------------- comparison


def comparison_configs(
    base: RuntimeConfig,
    live_kv_bytes: int,
    redis_url: str | None,
    device_fraction: float = 0.25,
    host_fraction: float = 0.5,
    names: Sequence[str] = CONFIG_NAMES,
) -> dict[str, RuntimeConfig]:
    """The compared configurations under memory pressure: the device pool holds
    ``device_fraction`` of the live KV (``live_kv_pages``), the host tier ``host_fraction``
    (uncompressed). ``recompute``: ``reuse=False``; ``device``: no host tier, no Redis;
    ``host``: device and host; ``redis-<codec>``: device, host and Redis with that codec.
    Redis configurations are left out when ``redis_url`` is None. Each gets its own Redis
    namespace (no cross-hits)."""
    if device_fraction <= 0 or host_fraction < 0:
        raise ConfigError("device_fraction must be > 0 and host_fraction >= 0")
    device = max(1, int(live_kv_bytes * device_fraction))
    host = int(live_kv_bytes * host_fraction)
    run = uuid.uuid4().hex[:8]
    out: dict[str, RuntimeConfig] = {}
    for name in names:
        fields: dict[str, Any] = {"device_kv_bytes": device, "host_kv_bytes": host}
        if name == "recompute":
            fields.update(reuse=False, host_kv_bytes=0)
        elif name == "device":
            fields.update(host_kv_bytes=0)
        elif name.startswith("redis-"):
            if redis_url is None:
                continue
            ns = f"{base.redis_namespace}-{run}-{name}"
            fields.update(redis_url=redis_url, redis_codec=name[6:], redis_namespace=ns)
        elif name != "host":
            raise ConfigError(f"unknown configuration {name!r}; known: {', '.join(CONFIG_NAMES)}")
        out[name] = dataclasses.replace(base, **fields)
    return out


def compare(
    engine: Engine,
    tokenizer: Any,
    sessions: Sequence[ReplaySession],
    configs: Mapping[str, RuntimeConfig],
    replay_config: ReplayConfig | None = None,
    progress: Callable[[str, ReplayResult], None] | None = None,
) -> dict[str, ReplayResult]:
    """Replay ``sessions`` on a fresh Runtime per configuration, one after the other, on one
    engine (warmed up first, so no configuration pays for the first forward pass)."""
    engine.prefill(list(sessions[0].turns[0].tokens[:64]) if sessions else [1, 2, 3])
    results: dict[str, ReplayResult] = {}
    for name, config in configs.items():
        with Runtime(engine, tokenizer, config) as rt:
            results[name] = replay(rt, sessions, replay_config)
        if progress is not None:
            progress(name, results[name])
    return results
