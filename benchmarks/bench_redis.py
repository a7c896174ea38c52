"""Redis tier throughput: kvruntime's RESP client against redis-py, on a local redis-server.

Puts and gets of 5.6 MiB and 32 MiB values, several per batch, median of ``--runs`` runs:

- kvruntime (RedisTier): pipelined SET via sendmsg; get_into preallocated buffers
  (TCP loopback, and a unix socket row);
- redis-py with hiredis, the way a user would: pipelined SETs, MGET;
- redis-py with its pure-Python RESP parser: same calls.

Run: ``.venv/bin/python benchmarks/bench_redis.py`` (starts and stops its own server).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import redis
from record import markdown_table, print_table, record
from redis._parsers import _RESP2Parser

from kvruntime.store.redis_tier import RedisTier, RedisTierConfig

MiB = 2**20
CASES = ((int(5.6 * MiB), 8), (32 * MiB, 4))  # (value bytes, values per batch)


def load_servers() -> ModuleType:
    """tests/redis_servers.py starts real servers; loaded by path (tests is no package)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "redis_servers.py"
    spec = importlib.util.spec_from_file_location("redis_servers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up: connections, server-side allocations
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_tier(
    url: str, size: int, count: int, values: list[bytes], runs: int
) -> tuple[float, float]:
    tier = RedisTier(RedisTierConfig(url=url, namespace="bench", batch_deadline_s=120))
    keys = [f"v{size}-{i}" for i in range(count)]
    items = list(zip(keys, values, strict=True))
    buffers = [bytearray(size) for _ in range(count)]  # preallocated destinations
    put = median_seconds(lambda: tier.put_many(items), runs)
    get = median_seconds(lambda: tier.get_into(keys, buffers), runs)
    assert tier.get_into(keys, buffers) == [size] * count and buffers[-1] == values[-1]
    errors = tier.stats().errors
    tier.close()
    assert not errors, errors
    return put, get


def bench_redis_py(
    client: redis.Redis, size: int, count: int, values: list[bytes], runs: int
) -> tuple[float, float]:
    keys = [f"py{size}-{i}" for i in range(count)]

    def put() -> None:
        pipe = client.pipeline(transaction=False)
        for key, value in zip(keys, values, strict=True):
            pipe.set(key, value)
        pipe.execute()

    put_s = median_seconds(put, runs)
    get_s = median_seconds(lambda: client.mget(keys), runs)
    got = client.mget(keys)
    assert isinstance(got, list) and got[-1] == values[-1]
    return put_s, get_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--untuned", action="store_true", help="server with default glibc malloc")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    servers = load_servers()
    server = servers.RedisServer(unix_socket=True, tuned_malloc=not args.untuned)
    load_before = os.getloadavg()[0]
    rows = []
    try:
        hiredis = redis.Redis(port=server.port)
        pool = redis.ConnectionPool(port=server.port, parser_class=_RESP2Parser)
        pure = redis.Redis(connection_pool=pool)
        for size, count in CASES:
            values = [os.urandom(size) for _ in range(count)]
            results = {
                "kvruntime tcp": bench_tier(server.url, size, count, values, args.runs),
                "kvruntime unix": bench_tier(server.unix_url, size, count, values, args.runs),
                "redis-py+hiredis": bench_redis_py(hiredis, size, count, values, args.runs),
                "redis-py pure": bench_redis_py(pure, size, count, values, args.runs),
            }
            base_put, base_get = results["redis-py+hiredis"]
            for name, (put_s, get_s) in results.items():
                mb = size * count / 1e6
                rows.append([
                    name, f"{size / MiB:.1f} MiB x {count}",
                    mb / put_s, mb / get_s, base_put / put_s, base_get / get_s,
                ])  # fmt: skip
    finally:
        server.close()
    load_after = os.getloadavg()[0]
    headers = ["client", "batch", "put MB/s", "get MB/s", "put vs redis-py", "get vs redis-py"]
    print_table(headers, rows)
    malloc = "default glibc malloc" if args.untuned else "glibc malloc tuned (MALLOC_*_ env)"
    notes = (
        f"\n\nServer: `{servers.server_binary()}` ({malloc}), loopback, one connection per "
        f"client. Median of {args.runs} runs after a warm-up. Load average "
        f"{load_before:.2f} before / {load_after:.2f} after (other jobs share the cores)."
        "\nkvruntime rows go through RedisTier (namespace, counters, deadline included): "
        "pipelined SET sent with sendmsg from the caller's buffers; GET replies recv_into'd "
        "into preallocated bytearrays. redis-py: pipeline of SETs, MGET."
        "\nredislite's redis-server uses glibc malloc, which mmaps every multi-MiB reply "
        "buffer afresh and page-faults once per 4 KiB of it (measured), capping GET near "
        "1.2 GB/s for any client; the server here raises MALLOC_MMAP_THRESHOLD_/"
        "MALLOC_TRIM_THRESHOLD_ so big buffers are reused, as a jemalloc build does. "
        "`--untuned` measures the default."
    )
    if not args.no_record:
        record("Redis tier throughput", markdown_table(headers, rows) + notes)
    print(notes.strip())


if __name__ == "__main__":
    main()
