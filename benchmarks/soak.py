"""Soak: thousands of agent sessions through one runtime, with every tier on a budget.

Sessions (several tenants, a few shared system prompts, short user turns, 1-4 generated
tokens) run from several threads at once through one runtime whose device pool, host tier and
Redis (``maxmemory`` + ``allkeys-lru``) are all small, so pages keep spilling, coming back and
being evicted. Samples of resident memory and tier usage are taken as sessions complete;
growth after warm-up must stay within a stated margin. Every turn of a sample of the sessions
is then computed again, one at a time, on a ``reuse=False`` runtime (the sequential baseline):
each must give identical tokens. Finally a new process over the same Redis replays the last
sessions: the warm restart must reuse what the first one stored, with the same tokens.

The machinery (``SoakPlan``, ``soak``, ``recompute``, ``growth``, the ``--replay`` mode) is
also driven by tests/test_soak.py at CI size.

Run (the figures in docs/RELIABILITY.md):
``nice .venv/bin/python benchmarks/soak.py --sessions 2000 --verify-every 10``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvruntime.runtime import Runtime

Tokens = tuple[tuple[int, ...], ...]  # generated token ids, one tuple per turn

WORDS = (
    "read", "list", "open", "check", "grep", "run", "test", "fix", "build", "diff", "push", "pull",
    "merge", "plan", "note", "file", "dir", "log", "config", "cache", "index", "page", "row",
    "item", "task", "step", "retry", "wait", "done", "ok", "next",
)  # fmt: skip


class SessionScript(NamedTuple):
    number: int
    tenant: str
    system: str
    users: tuple[str, ...]  # one user message per turn
    max_tokens: int


@dataclass(frozen=True)
class SoakPlan:
    """Deterministic sessions: the same plan gives the same scripts in every process."""

    sessions: int
    min_turns: int = 3
    max_turns: int = 9
    systems: int = 6  # distinct system prompts, shared across sessions (reusable prefixes)
    tenants: int = 3
    max_tokens: tuple[int, int] = (1, 2)
    words: tuple[int, int] = (1, 4)  # words per user message
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sessions <= 0 or not 0 < self.min_turns <= self.max_turns:
            raise ValueError(f"bad soak plan {self}")

    def script(self, i: int) -> SessionScript:
        rng = random.Random(self.seed * 1_000_003 + i)
        s = rng.randrange(self.systems)
        system = f"Agent profile {s}. Use tools {', '.join(WORDS[s : s + 4])}. Be brief."
        users = tuple(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(*self.words)))
            for _ in range(rng.randint(self.min_turns, self.max_turns))
        )
        tenant = f"tenant{rng.randrange(self.tenants)}"
        return SessionScript(i, tenant, system, users, rng.randint(*self.max_tokens))

    @property
    def turns(self) -> int:
        return sum(len(self.script(i).users) for i in range(self.sessions))


def run_session(
    rt: Runtime, script: SessionScript, prompts: list[array[int]] | None = None
) -> Tokens:
    """One agent conversation: each turn re-sends the whole history. Appends each turn's
    prompt token ids to ``prompts`` when given (compact: 4 bytes a token)."""
    session = rt.session(tenant=script.tenant)
    messages: list[dict[str, Any]] = [{"role": "system", "content": script.system}]
    out = []
    try:
        for text in script.users:
            messages.append({"role": "user", "content": text})
            r = session.chat(messages, max_tokens=script.max_tokens)
            out.append(tuple(r.token_ids))
            if prompts is not None:
                prompts.append(array("i", session.last_prompt or ()))
            messages.append({"role": "assistant", "content": r.text})
    finally:
        session.close()
    return tuple(out)


class Sample(NamedTuple):
    sessions: int  # completed when sampled
    turns: int
    rss_bytes: int
    device_used_bytes: int
    host_used_bytes: int
    redis_used_bytes: int  # Redis' used_memory (0 without a Redis tier)
    index_pages: int  # pages the radix index knows (any tier)


class SoakResult(NamedTuple):
    results: dict[int, Tokens]
    prompts: dict[int, list[array[int]]]  # of the sessions kept for checking
    samples: list[Sample]
    turns: int
    wall_s: float
    errors: list[str]


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sample(rt: Runtime, sessions: int, turns: int, redis_memory: Callable[[], int]) -> Sample:
    usage = rt.tier_usage()
    return Sample(
        sessions,
        turns,
        rss_bytes(),
        int(usage["device"]["used_bytes"]),
        int(usage.get("host", {}).get("used_bytes", 0)),
        redis_memory(),
        rt.cache.tree.num_pages,
    )


def soak(
    rt: Runtime,
    plan: SoakPlan,
    threads: int = 4,
    samples: int = 20,
    redis_memory: Callable[[], int] = lambda: 0,
    progress: Callable[[Sample], None] | None = None,
    keep_prompts_every: int = 1,
    max_s: float | None = None,
) -> SoakResult:
    """Run every session of ``plan`` from ``threads`` threads at once (the engine still
    runs one turn at a time; sessions interleave). Exceptions are collected, not raised.
    The prompts of every ``keep_prompts_every``-th session are kept for ``recompute``.
    After ``max_s`` seconds no new session starts (those running finish)."""
    ids = iter(range(plan.sessions))
    lock = threading.Lock()
    results: dict[int, Tokens] = {}
    prompts: dict[int, list[array[int]]] = {}
    errors: list[str] = []
    taken: list[Sample] = [sample(rt, 0, 0, redis_memory)]
    every = max(1, plan.sessions // samples)
    done = [0, 0]  # sessions, turns
    start = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                late = max_s is not None and time.perf_counter() - start > max_s
                i = None if late else next(ids, None)
            if i is None:
                return
            kept: list[array[int]] | None = [] if i % keep_prompts_every == 0 else None
            try:
                tokens = run_session(rt, plan.script(i), kept)
            except Exception as exc:  # reported with the session it broke
                with lock:
                    errors.append(f"session {i}: {exc!r}")
                continue
            with lock:
                results[i] = tokens
                if kept is not None:
                    prompts[i] = kept
                done[0] += 1
                done[1] += len(tokens)
                if done[0] % every == 0:
                    taken.append(sample(rt, done[0], done[1], redis_memory))
                    if progress is not None:
                        progress(taken[-1])

    pool = [threading.Thread(target=worker, name=f"soak-{t}") for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    rt.cache.flush(60)
    wall = time.perf_counter() - start
    taken.append(sample(rt, done[0], done[1], redis_memory))
    return SoakResult(results, prompts, taken, done[1], wall, errors)


def sequential(rt: Runtime, plan: SoakPlan, indices: Sequence[int]) -> dict[int, Tokens]:
    """The same sessions, one after another, on ``rt``."""
    return {i: run_session(rt, plan.script(i)) for i in indices}


def recompute(rt: Runtime, plan: SoakPlan, result: SoakResult) -> tuple[int, list[int]]:
    """The sequential baseline, on ``rt`` (``reuse=False``): every kept turn is computed
    again from its exact prompt, one at a time. Returns (turns checked, sessions that
    differ). Turn by turn this equals running the sessions sequentially: the first prompts
    are the same, and while the outputs agree so do the next prompts."""
    checked, bad = 0, []
    for i, prompts in sorted(result.prompts.items()):
        script, got = plan.script(i), result.results[i]
        for k, prompt in enumerate(prompts):
            checked += 1
            want = rt.generate(prompt.tolist(), max_tokens=script.max_tokens, tenant=script.tenant)
            if tuple(want.token_ids) != got[k]:
                bad.append(i)
                break
    return checked, bad


class Growth(NamedTuple):
    rss_bytes: int  # peak after warm-up minus the value at the end of warm-up
    device_bytes: int
    host_bytes: int
    redis_bytes: int
    index_pages: int


def growth(samples: Sequence[Sample], warmup: float = 0.3) -> Growth:
    """How much each figure grew after the first ``warmup`` fraction of the samples."""
    cut = max(1, int(len(samples) * warmup))
    base, after = samples[cut - 1], samples[cut:]
    if not after:
        return Growth(0, 0, 0, 0, 0)

    def up(field: str) -> int:
        return max(getattr(s, field) for s in after) - getattr(base, field)

    return Growth(
        up("rss_bytes"),
        up("device_used_bytes"),
        up("host_used_bytes"),
        up("redis_used_bytes"),
        up("index_pages"),
    )


def mismatches(got: dict[int, Tokens], want: dict[int, Tokens]) -> list[int]:
    return sorted(i for i in want if got.get(i) != want[i])


# ---------------------------------------------------------------------------- the benchmark

SECRET = b"soak secret"  # tenant_salt: the replaying process must use the same one
FIXED_RATES = dict(prefill_tokens_per_s=500.0, host_bytes_per_s=2e9, redis_bytes_per_s=5e8)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default="smollm2", help="alias or local path")
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--turns", type=int, nargs=2, default=(3, 9), metavar=("MIN", "MAX"))
    p.add_argument("--words", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=(1, 2), metavar=("MIN", "MAX"))
    p.add_argument("--threads", type=int, default=8, help="sessions in flight")
    p.add_argument("--page-size", type=int, default=8)
    p.add_argument("--device-mib", type=float, default=24.0)
    p.add_argument("--host-mib", type=float, default=64.0)
    p.add_argument("--redis-mib", type=int, default=96, help="Redis maxmemory (allkeys-lru)")
    p.add_argument("--redis-codec", default="none", help="lossless, so every turn is exact")
    p.add_argument(
        "--redis-index-pages",
        type=int,
        default=None,
        help="RuntimeConfig.max_redis_index_pages (default: the runtime's)",
    )
    p.add_argument("--verify-every", type=int, default=10, help="recompute every Nth session")
    p.add_argument("--restart-sessions", type=int, default=50)
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--minutes", type=float, default=None, help="start no session after this")
    p.add_argument("--sample-every", type=int, default=10, help="sessions, with --minutes")
    p.add_argument(
        "--replay",
        type=int,
        nargs=2,
        metavar=("FIRST", "END"),
        help="warm restart mode: run sessions FIRST..END-1 against --redis-url, print JSON",
    )
    p.add_argument("--redis-url", default=None, help="with --replay: the soak's Redis")
    return p


def plan_of(args: argparse.Namespace) -> SoakPlan:
    return SoakPlan(
        args.sessions,
        min_turns=args.turns[0],
        max_turns=args.turns[1],
        max_tokens=(args.max_tokens[0], args.max_tokens[1]),
        words=(args.words[0], args.words[1]),
    )


def config_of(args: argparse.Namespace, redis_url: str) -> Any:
    from kvruntime.config import MiB, RuntimeConfig

    return RuntimeConfig(
        page_size=args.page_size,
        device_kv_bytes=int(args.device_mib * MiB),
        host_kv_bytes=int(args.host_mib * MiB),
        redis_url=redis_url,
        redis_codec=args.redis_codec,
        tenant_salt=SECRET,
        **FIXED_RATES,  # type: ignore[arg-type]
        **({"max_redis_index_pages": args.redis_index_pages} if args.redis_index_pages else {}),
    )


def baseline_config(args: argparse.Namespace) -> Any:
    """The sequential baseline's config: nothing reused, same page size."""
    from kvruntime.config import RuntimeConfig

    return RuntimeConfig(reuse=False, page_size=args.page_size, **FIXED_RATES)  # type: ignore[arg-type]


def replay(args: argparse.Namespace) -> int:
    """The warm restart, in this (new) process: print the sessions' tokens and how much of
    their prompts came from Redis, as JSON on stdout."""
    from kvruntime.engines.models import load_model
    from kvruntime.engines.transformers import TransformersEngine

    loaded = load_model(args.model)
    engine = TransformersEngine(loaded)
    with Runtime(engine, loaded.tokenizer, config_of(args, args.redis_url)) as rt:
        tokens = sequential(rt, plan_of(args), range(*args.replay))
        stats = rt.stats()
    out = {
        "tokens": {str(i): [list(t) for t in turns] for i, turns in tokens.items()},
        "prompt_tokens": stats.prompt_tokens,
        "cached_tokens_by_tier": stats.cached_tokens_by_tier,
    }
    print(json.dumps(out))
    return 0


def replay_in_new_process(argv: Sequence[str], first: int, end: int, url: str) -> dict[str, Any]:
    """Run ``--replay`` in a child interpreter (same arguments otherwise)."""
    cmd = [sys.executable, __file__, *argv, "--replay", str(first), str(end), "--redis-url", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"replay failed ({done.returncode}): {done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    out["tokens"] = {int(i): tuple(map(tuple, t)) for i, t in out["tokens"].items()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.replay:
        return replay(args)
    from record import markdown_table, print_table

    from kvruntime.config import MiB
    from kvruntime.engines.models import load_model
    from kvruntime.engines.transformers import TransformersEngine
    from kvruntime.local_redis import LocalRedis

    loaded = load_model(args.model)
    engine = TransformersEngine(loaded)
    plan = plan_of(args)
    redis_args = ["--maxmemory", f"{args.redis_mib}mb", "--maxmemory-policy", "allkeys-lru"]
    with LocalRedis(args=redis_args) as redis:
        import redis as redis_py

        client = redis_py.Redis(host=redis.host, port=redis.port)

        def used() -> int:
            info: dict[str, Any] = client.info("memory")  # type: ignore[assignment]
            return int(info["used_memory"])

        def show(s: Sample) -> None:
            print(
                f"  {s.sessions:6d} sessions {s.turns:7d} turns  rss {s.rss_bytes / MiB:7.1f} MiB"
                f"  redis {s.redis_used_bytes / MiB:6.1f} MiB  index {s.index_pages} pages",
                flush=True,
            )

        print(f"soak: {plan.sessions} sessions, {plan.turns} turns, {args.threads} threads")
        with Runtime(engine, loaded.tokenizer, config_of(args, redis.url)) as rt:
            max_s = args.minutes * 60 if args.minutes else None
            # about 40 samples over the run (fewer sessions than planned when time-bounded)
            samples = 40 if not args.minutes else max(2, plan.sessions // args.sample_every)
            result = soak(rt, plan, args.threads, samples, used, show, args.verify_every, max_s)
            stats = rt.stats()
            redis_stats = dict(rt.tier_usage()["redis"])
        g = growth(result.samples)
        print(f"soak done in {result.wall_s:.0f} s, errors: {len(result.errors)}", flush=True)

        t0 = time.perf_counter()
        with Runtime(engine, loaded.tokenizer, baseline_config(args)) as base:
            turns_checked, bad = recompute(base, plan, result)
        verify_s = time.perf_counter() - t0
        print(f"recomputed {turns_checked} turns in {verify_s:.0f} s: {len(bad)} sessions differ")

        # warm restart: a new process over the same Redis replays the last sessions
        end = max(result.results) + 1
        first = max(0, end - args.restart_sessions)
        again = replay_in_new_process(argv, first, end, redis.url)
        last = range(first, end)
        restart_bad = mismatches(
            again["tokens"], {i: result.results[i] for i in last if i in result.results}
        )

    restart_redis = again["cached_tokens_by_tier"]["redis"]
    tiers = "{hits} / {misses} / {puts} / {failed_puts}".format(**redis_stats)
    rows = [
        ["sessions / turns", f"{len(result.results):,} / {result.turns:,}"],
        ["threads (sessions in flight)", args.threads],
        ["wall time", f"{result.wall_s:.0f} s ({result.turns / result.wall_s:.1f} turns/s)"],
        ["errors", len(result.errors)],
        ["reuse ratio", f"{stats.reuse_ratio:.3f}"],
        ["cached tokens by tier", json.dumps(stats.cached_tokens_by_tier)],
        ["redis hits / misses / puts / failed puts", tiers],
        ["redis errors", json.dumps(redis_stats["errors"])],
        ["RSS at warm-up end -> peak after", _mib(result.samples, g.rss_bytes)],
        ["device used: growth after warm-up", _grew(g.device_bytes, args.device_mib, "budget")],
        ["host used: growth after warm-up", _grew(g.host_bytes, args.host_mib, "budget")],
        ["redis used_memory: growth after warm-up", _grew(g.redis_bytes, args.redis_mib, "max")],
        ["index pages: growth after warm-up", f"{g.index_pages:,}"],
        [
            "sequential recompute check",
            f"{len(result.prompts)} sessions / {turns_checked:,} turns"
            f" in {verify_s:.0f} s, {len(bad)} differ",
        ],
        [
            "warm restart (new process, same Redis)",
            f"{len(last)} sessions, {restart_redis:,} of {again['prompt_tokens']:,} prompt tokens"
            f" from Redis, {len(restart_bad)} differ",
        ],
    ]
    print_table(["figure", "value"], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "rows": rows,
                    "samples": [s._asdict() for s in result.samples],
                    "errors": result.errors[:20],
                    "mismatches": bad[:20],
                    "markdown": markdown_table(["figure", "value"], rows),
                },
                f,
                indent=1,
            )
    return 1 if result.errors or bad or restart_bad else 0


def _grew(nbytes: int, budget_mib: float, what: str) -> str:
    return f"{nbytes / 2**20:+.1f} MiB ({what} {budget_mib:g} MiB)"


def _mib(samples: Sequence[Sample], grew: int) -> str:
    cut = max(1, int(len(samples) * 0.3))
    base = samples[cut - 1].rss_bytes
    return f"{base / 2**20:.0f} MiB -> {(base + grew) / 2**20:.0f} MiB (+{grew / 2**20:.1f} MiB)"


if __name__ == "__main__":
    sys.exit(main())
