"""RedisTier against a real redis-server: round trips, namespace, TTL, counters, warnings."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from redis_servers import RedisServer, free_port, wait_until
from redis_servers import redis_server as redis_server  # fixture

from kvruntime.errors import BadRequest, ConfigError
from kvruntime.store.redis_tier import RedisTier, RedisTierConfig
from kvruntime.store.retry import Backoff

MiB = 2**20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tier(redis_server: RedisServer) -> Iterator[RedisTier]:
    t = RedisTier(RedisTierConfig(url=redis_server.url, namespace="t"))
    try:
        yield t
    finally:
        t.close()


def pages(n: int, size: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {
        f"{seed}-{i:04x}": rng.integers(0, 256, size, dtype=np.uint8).tobytes() for i in range(n)
    }


def test_round_trip_many_small_and_multi_mib(tier: RedisTier) -> None:
    values = pages(200, 4096) | pages(4, 5 * MiB + 3, seed=1)
    assert tier.put_many(list(values.items())) == len(values)
    keys = list(values)
    buffers = [bytearray(len(v)) for v in values.values()]
    assert tier.get_into(keys, buffers) == [len(v) for v in values.values()]
    assert all(bytes(b) == v for b, v in zip(buffers, values.values(), strict=True))
    assert tier.get_many(keys[::7]) == [values[k] for k in keys[::7]]
    s = tier.stats()
    total = sum(map(len, values.values()))
    assert (s.puts, s.failed_puts, s.bytes_out) == (len(values), 0, total)
    assert s.hits == len(keys) + len(keys[::7]) and s.misses == 0 and s.errors == {}
    assert s.bytes_in == total + sum(len(values[k]) for k in keys[::7])


def test_namespace_isolation_and_prefix(redis_server: RedisServer) -> None:
    a = RedisTier(RedisTierConfig(url=redis_server.url, namespace="tenant-a"))
    b = RedisTier(RedisTierConfig(url=redis_server.url, namespace="tenant-b"))
    try:
        a.put_many([("page", b"A's KV")])
        assert b.get_many(["page"]) == [None] and b.exists_many(["page"]) == [False]
        b.put_many([("page", b"B's KV")])
        assert a.get_many(["page"]) == [b"A's KV"] and b.get_many(["page"]) == [b"B's KV"]
        assert sorted(redis_server.client().keys()) == [b"tenant-a:page", b"tenant-b:page"]
        assert b.delete_many(["page"]) == 1 and a.get_many(["page"]) == [b"A's KV"]
    finally:
        a.close()
        b.close()


def test_ttl_expires_keys(redis_server: RedisServer) -> None:
    t = RedisTier(RedisTierConfig(url=redis_server.url, namespace="ttl", ttl_s=0.15))
    try:
        assert t.put_many([("short", b"lived")]) == 1
        assert 0 < redis_server.client().pttl("ttl:short") <= 150
        wait_until(lambda: t.exists_many(["short"]) == [False], timeout_s=5)
        assert t.get_many(["short"]) == [None]
    finally:
        t.close()
    forever = RedisTier(RedisTierConfig(url=redis_server.url, namespace="ttl"))
    forever.put_many([("long", b"x")])
    assert redis_server.client().pttl("ttl:long") == -1  # no TTL configured: none set
    forever.close()


def test_exists_leading_hits_delete(tier: RedisTier) -> None:
    chain = [f"h{i}" for i in range(6)]
    tier.put_many([(k, b"v") for k in chain[:3]] + [(chain[4], b"v")])
    assert tier.exists_many(chain) == [True, True, True, False, True, False]
    assert tier.leading_hits(chain) == 3
    assert tier.leading_hits(chain[3:]) == 0
    assert tier.leading_hits([]) == 0
    assert tier.delete_many(chain) == 4
    assert tier.exists_many(chain) == [False] * 6


def test_buffer_too_small_is_a_miss_never_a_partial_hit(
    tier: RedisTier, caplog: pytest.LogCaptureFixture
) -> None:
    tier.put_many([("big", b"b" * 10_000), ("fits", b"f" * 100)])
    small = bytearray(9_999)
    with caplog.at_level(logging.WARNING):
        assert tier.get_into(["big", "fits"], [small, bytearray(100)]) == [None, 100]
    assert small == bytearray(9_999)
    s = tier.stats()
    assert (s.hits, s.misses, s.errors) == (1, 1, {"too_large": 1})
    assert "too_large" in caplog.text


def test_max_value_bytes_refuses_big_puts(redis_server: RedisServer) -> None:
    t = RedisTier(RedisTierConfig(url=redis_server.url, max_value_bytes=1000))
    try:
        stored = t.put_many([("ok", b"x" * 1000), ("big", b"x" * 1001)])
        assert stored == 1 and t.exists_many(["ok", "big"]) == [True, False]
        s = t.stats()
        assert (s.puts, s.failed_puts, s.errors) == (1, 1, {"too_large": 1})
    finally:
        t.close()


def test_accepts_numpy_and_memoryview_values(tier: RedisTier) -> None:
    page = np.arange(4096, dtype=np.uint8)  # [4096] uint8, one encoded page
    assert tier.put_many([("np", page), ("mv", page.data[100:200])]) == 2
    out = np.zeros(4096, dtype=np.uint8)
    assert tier.get_into(["np"], [out]) == [4096] and (out == page).all()
    assert tier.get_many(["mv"]) == [page[100:200].tobytes()]


def test_bad_arguments_raise(tier: RedisTier) -> None:
    with pytest.raises(BadRequest, match="keys are str"):
        tier.get_many([b"bytes-key"])
    with pytest.raises(BadRequest, match="not bytes-like"):
        tier.put_many([("k", "a str value")])
    with pytest.raises(BadRequest, match="1 keys but 2 buffers"):
        tier.get_into(["k"], [bytearray(1), bytearray(1)])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("url", "http://x", "scheme"),
        ("pool_size", 0, "pool_size must be positive"),
        ("op_timeout_s", -1.0, "op_timeout_s"),
        ("ttl_s", 0.0, "ttl_s"),
        ("max_value_bytes", 0, "max_value_bytes"),
    ],
)
def test_config_checks(field: str, value: object, message: str) -> None:
    kwargs: dict[str, object] = {"url": "redis://localhost", field: value}
    with pytest.raises(ConfigError, match=message):
        RedisTierConfig(**kwargs)


def test_config_derived_values() -> None:
    c = RedisTierConfig(url="redis://h", namespace="ns", ttl_s=1.5)
    assert (c.ttl_ms, c.prefix) == (1500, b"ns:")
    assert RedisTierConfig(url="redis://h", namespace="").prefix == b""


def test_closed_tier_answers_misses(redis_server: RedisServer) -> None:
    t = RedisTier(RedisTierConfig(url=redis_server.url))
    t.put_many([("k", b"v")])
    t.close()
    t.close()
    assert t.get_many(["k"]) == [None] and t.put_many([("k", b"v")]) == 0
    assert t.exists_many(["k"]) == [False] and t.stats().errors == {"closed": 3}


def test_concurrent_callers_share_a_small_pool(redis_server: RedisServer) -> None:
    t = RedisTier(RedisTierConfig(url=redis_server.url, pool_size=2))
    values = pages(40, 50_000, seed=3)
    errors: list[BaseException] = []

    def worker(part: list[str]) -> None:
        try:
            for _ in range(5):
                assert t.put_many([(k, values[k]) for k in part]) == len(part)
                bufs = [bytearray(50_000) for _ in part]
                assert t.get_into(part, bufs) == [50_000] * len(part)
                assert all(bytes(b) == values[k] for b, k in zip(bufs, part, strict=True))
        except BaseException as exc:
            errors.append(exc)

    keys = list(values)
    threads = [threading.Thread(target=worker, args=(keys[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    t.close()
    assert not errors, errors
    assert t.stats().errors == {}


def test_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    t = RedisTier(RedisTierConfig(url=url, warn_interval_s=10, backoff=Backoff(1.0)), clock=clock)
    with caplog.at_level(logging.WARNING, logger="kvruntime.store.redis_tier"):
        for _ in range(5):
            t.get_many(["k"])  # first: connection refused, then "down" while backing off
        kinds = [r.getMessage().split(": ")[1].split(" ")[0] for r in caplog.records]
        assert kinds == ["connect", "down"]
        clock.now += 11
        t.get_many(["k"])  # backoff over: dials again, refused again
        t.get_many(["k"])  # down again; its warning reports the 3 it held back
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4 and "3 similar warnings suppressed" in messages[-1], messages
    assert t.stats().errors == {"connect": 2, "down": 5}
    t.close()


def test_payload_is_opaque_bytes(tier: RedisTier) -> None:
    blob = os.urandom(777) + b"\r\n$-1\r\n*3\r\n"  # RESP-looking bytes inside a value
    tier.put_many([("opaque", blob)])
    assert tier.get_many(["opaque"]) == [blob]
