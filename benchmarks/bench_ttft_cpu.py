"""TTFT with reuse against recompute on the CPU, SmolLM2-135M-Instruct, 1K and 2K contexts.

A turn re-sends a cached context of N tokens plus a new 64-token user message (the agent
pattern). Compared in the same run, on the same engine:
- recompute: ``reuse=False``, the whole prompt is prefilled (what a user gets without kvruntime);
- device: the context's pages are in the device pool;
- host: the device pool holds almost nothing, the pages come back from the host tier;
- redis none / int8: a fresh runtime (empty index, no host tier) finds the pages in Redis.

Run: ``.venv/bin/python benchmarks/bench_ttft_cpu.py``
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from record import markdown_table, print_table, record

from kvruntime.config import MiB, RuntimeConfig
from kvruntime.engines.models import load_model
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.local_redis import LocalRedis
from kvruntime.runtime import Runtime

CONTEXTS = tuple(int(a) for a in sys.argv[1:]) or (1024, 2048)
NEW_TOKENS = 64
REPEATS = 1 if len(sys.argv) > 1 else 3
TEXT = (
    "The agent read the file, ran the tests, and reported that two of them failed because the "
    "date parser did not accept a trailing Z. It proposed a fix, applied it, and ran the suite "
    "again; all forty-eight tests passed. "
)


def prompt_tokens(tokenizer: Any, n: int, salt: int) -> list[int]:
    ids: list[int] = tokenizer.encode(f"Session {salt}. " + TEXT * (n // 20 + 8))
    return ids[:n]


def main() -> int:
    loaded = load_model("smollm2")
    engine = TransformersEngine(loaded)
    tok = loaded.tokenizer
    fixed = dict(prefill_tokens_per_s=500.0, host_bytes_per_s=2e9, redis_bytes_per_s=5e8)
    rows: list[list[object]] = []
    with LocalRedis() as redis:

        def rt(**fields: Any) -> Runtime:
            return Runtime(engine, tok, RuntimeConfig(**{**fixed, **fields}))

        for n in CONTEXTS:
            times: dict[str, list[float]] = {}
            cached: dict[str, int] = {}
            for rep in range(REPEATS):
                context = prompt_tokens(tok, n, salt=n * 100 + rep)
                turn = context + prompt_tokens(tok, NEW_TOKENS, salt=rep + 7)

                with rt(reuse=False) as base:
                    measure(times, cached, "recompute", base, turn, None)
                with rt(device_kv_bytes=256 * MiB) as dev:
                    measure(times, cached, "device", dev, turn, context)
                with rt(device_kv_bytes=2 * MiB, host_kv_bytes=512 * MiB) as host:
                    measure(times, cached, "host", host, turn, context)
                for codec in ("none", "int8"):
                    ns = f"bench{n}{rep}{codec}"
                    fields = dict(redis_url=redis.url, redis_codec=codec, redis_namespace=ns)
                    with rt(host_kv_bytes=0, **fields) as writer:
                        _touch(writer, context)
                        writer.cache.flush(60)
                    with rt(host_kv_bytes=0, **fields) as reader:
                        measure(times, cached, f"redis {codec}", reader, turn, None)
            base_s = statistics.median(times["recompute"])
            for name, values in times.items():
                median = statistics.median(values)
                rows.append([n + NEW_TOKENS, name, cached[name], median * 1000, base_s / median])
    headers = ["prompt tokens", "path", "reused tokens", "TTFT ms (median)", "vs recompute"]
    print_table(headers, rows)
    body = (
        f"SmolLM2-135M-Instruct (fp32) on the CPU. A cached context plus {NEW_TOKENS} new "
        f"tokens; median of {REPEATS} runs with different contexts. *recompute*: `reuse=False` "
        "(the whole prompt prefilled). *device*: the context is in the device pool. *host*: a "
        "2 MiB device pool, the context comes back from the host tier. *redis*: a new runtime "
        "with an empty index and no host tier finds the context in a local redis-server "
        "(codec `none` or `int8`). *vs recompute*: recompute TTFT / this TTFT.\n\n"
        + markdown_table(headers, rows)
    )
    record("TTFT on the CPU: reuse against recompute (SmolLM2)", body,
           "python benchmarks/bench_ttft_cpu.py")  # fmt: skip
    return 0


def measure(
    times: dict[str, list[float]],
    cached: dict[str, int],
    name: str,
    runtime: Runtime,
    turn: list[int],
    warm_context: list[int] | None,
) -> None:
    """TTFT of ``turn`` on ``runtime``, after caching ``warm_context`` there if given."""
    if warm_context is not None:
        _touch(runtime, warm_context)
        runtime.cache.flush(60)
    r = runtime.generate(turn, max_tokens=1)
    times.setdefault(name, []).append(r.timings.ttft_s)
    cached[name] = r.usage.cached_tokens


def _touch(runtime: Runtime, context: list[int]) -> None:
    runtime.generate(context, max_tokens=1)


if __name__ == "__main__":
    sys.exit(main())
