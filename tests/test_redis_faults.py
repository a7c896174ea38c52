"""Failure semantics of RedisTier with real servers: killed, hung, absent, full, restarted.

Every case asserts: no exception out of the tier, no hang (a time bound), misses / failed
puts, counters by error kind, and recovery once the server is back and the backoff passed.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
from redis_servers import RedisCluster, RedisServer, free_port

from kvruntime.store.redis_cluster import key_slot
from kvruntime.store.redis_tier import RedisTier, RedisTierConfig
from kvruntime.store.retry import Backoff

MiB = 2**20


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def make_tier(url: str, clock: FakeClock, **kwargs: object) -> RedisTier:
    fields: dict[str, object] = {
        "url": url,
        "namespace": "f",
        "connect_timeout_s": 0.5,
        "op_timeout_s": 0.5,
        "batch_deadline_s": 5.0,
        "backoff": Backoff(base_s=1.0, cap_s=8.0),
    }
    return RedisTier(RedisTierConfig(**{**fields, **kwargs}), clock=clock)


def test_server_killed_mid_batch() -> None:
    server = RedisServer()
    clock = FakeClock()
    tier = make_tier(server.url, clock)
    try:
        n, size = 24, 4 * MiB
        values = [os.urandom(size - 1) + b"\x01" for _ in range(n)]  # last byte never 0
        keys = [f"k{i}" for i in range(n)]
        assert tier.put_many(list(zip(keys, values, strict=True))) == n
        buffers = [bytearray(size) for _ in range(n)]

        def kill_once_first_value_landed() -> None:
            give_up = time.monotonic() + 10
            while buffers[0][-1] != 1 and time.monotonic() < give_up:
                time.sleep(0.0005)  # tight poll: the rest of the batch takes >= 40 ms
            server.kill()

        killer = threading.Thread(target=kill_once_first_value_landed)
        killer.start()
        start = time.monotonic()
        got = tier.get_into(keys, buffers)
        elapsed = time.monotonic() - start
        killer.join()
        assert elapsed < 3.0
        hits = [i for i, g in enumerate(got) if g is not None]
        assert len(hits) < n  # the kill landed inside the batch
        assert all(got[i] == size and buffers[i] == values[i] for i in hits)  # hits are whole
        s = tier.stats()
        assert s.misses == n - len(hits) and set(s.errors) <= {"closed", "connect"}
        assert sum(s.errors.values()) == n - len(hits)
        # down now: fails fast without dialling until the backoff passes
        start = time.monotonic()
        assert tier.get_many(keys[:2]) == [None, None]
        assert time.monotonic() - start < 0.2 and tier.stats().errors["down"] == 2
        # back on the same port (empty: no persistence); the tier waits out its backoff
        server.start()
        assert tier.put_many([("after", b"restart")]) == 0
        clock.now += 1.0
        assert tier.put_many([("after", b"restart")]) == 1
        assert tier.get_many(["after", "k0"]) == [b"restart", None]
    finally:
        tier.close()
        server.close()


def test_hung_server_times_out_then_recovers() -> None:
    server = RedisServer()
    clock = FakeClock()
    tier = make_tier(server.url, clock)
    try:
        tier.put_many([("a", b"A"), ("b", b"B"), ("c", b"C")])
        assert tier.get_many(["a"]) == [b"A"]  # leaves a pooled, idle connection
        server.pause()
        start = time.monotonic()
        assert tier.get_many(["a", "b"]) == [None, None]
        assert 0.4 < time.monotonic() - start < 2.0  # op_timeout_s=0.5, not a hang
        assert tier.stats().errors == {"timeout": 2}
        server.resume()
        assert tier.exists_many(["c"]) == [False]  # backing off: "down", no dialling
        clock.now += 1.0
        # The timed-out socket still had two replies in flight; had it been reused, "c"
        # would read "A". A fresh connection answers for the right keys.
        assert tier.get_many(["c", "b"]) == [b"C", b"B"]
        assert tier.stats().errors == {"timeout": 2, "down": 1}
    finally:
        tier.close()
        server.close()


def test_batch_deadline_bounds_a_slow_batch() -> None:
    server = RedisServer()
    tier = make_tier(server.url, FakeClock(), op_timeout_s=30.0, batch_deadline_s=0.4)
    try:
        tier.put_many([("k", b"v")])
        server.pause()
        start = time.monotonic()
        assert tier.put_many([("k2", b"v")]) == 0
        assert time.monotonic() - start < 1.5
        assert tier.stats().errors == {"deadline": 1}
    finally:
        server.resume()
        tier.close()
        server.close()


def test_server_down_at_start_then_appears() -> None:
    port = free_port()
    clock = FakeClock()
    tier = make_tier(f"redis://127.0.0.1:{port}/0", clock)
    try:
        assert tier.get_into(["x"], [bytearray(8)]) == [None]
        assert tier.put_many([("x", b"1")]) == 0
        assert tier.exists_many(["x"]) == [False] and tier.leading_hits(["x"]) == 0
        assert tier.delete_many(["x"]) == 0
        errors = tier.stats().errors
        assert errors["connect"] == 1 and errors["down"] == 4
        server = RedisServer(port=port)
        try:
            clock.now += 1.0
            assert tier.put_many([("x", b"1")]) == 1
            assert tier.get_many(["x"]) == [b"1"]
        finally:
            server.close()
    finally:
        tier.close()


def test_idle_connections_survive_a_server_restart() -> None:
    server = RedisServer()
    tier = make_tier(server.url, FakeClock())
    try:
        assert tier.put_many([("k", b"v")]) == 1  # pools a connection
        server.kill()
        server.start()
        # the pooled socket is dead; the tier retries once on a fresh one, transparently
        assert tier.put_many([("k", b"again")]) == 1
        assert tier.get_many(["k"]) == [b"again"] and tier.stats().errors == {}
    finally:
        tier.close()
        server.close()


def test_full_server_fails_puts_and_keeps_serving() -> None:
    server = RedisServer("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    tier = make_tier(server.url, FakeClock())
    try:
        items = [(f"p{i}", np.full(MiB, i, dtype=np.uint8)) for i in range(8)]
        stored = tier.put_many(items)
        assert 0 < stored < 8
        s = tier.stats()
        assert (s.puts, s.failed_puts, s.errors.get("oom")) == (stored, 8 - stored, 8 - stored)
        present = tier.exists_many([k for k, _ in items])
        assert sum(present) == stored
        first = present.index(True)
        buf = np.zeros(MiB, dtype=np.uint8)
        assert tier.get_into([f"p{first}"], [buf]) == [MiB] and (buf == first).all()
    finally:
        tier.close()
        server.close()


def test_cluster_node_killed_other_nodes_still_serve() -> None:
    cluster = RedisCluster(3)
    clock = FakeClock()
    tier = make_tier(cluster.url, clock)
    try:
        values = {f"n{i}": os.urandom(2000) for i in range(90)}
        assert tier.put_many(list(values.items())) == len(values)
        victim = cluster.nodes[1]
        on_victim = {k for k in values if cluster.node_of(key_slot(b"f:" + k.encode())) is victim}
        assert 0 < len(on_victim) < len(values)
        victim.kill()
        for _ in range(2):  # first: refused; then fast "down" while backing off
            start = time.monotonic()
            got = tier.get_many(list(values))
            assert time.monotonic() - start < 2.0
            for key, value in zip(values, got, strict=True):
                assert value == (None if key in on_victim else values[key])
        errors = tier.stats().errors
        assert set(errors) <= {"connect", "closed", "down"}
        assert sum(errors.values()) == 2 * len(on_victim)
        stored = tier.put_many([(k, b"new") for k in values])
        assert stored == len(values) - len(on_victim)
    finally:
        tier.close()
        cluster.close()
