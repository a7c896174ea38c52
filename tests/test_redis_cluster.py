"""RedisTier and the cluster connector against a real 3-master Redis Cluster."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from redis_servers import RedisCluster, RedisServer, free_port
from redis_servers import redis_cluster as redis_cluster  # fixture (module scope)

from kvruntime.store.redis import open_connector
from kvruntime.store.redis_cluster import RedisClusterConnector, key_slot
from kvruntime.store.redis_tier import RedisTier, RedisTierConfig
from kvruntime.store.resp import ConnectOptions

MiB = 2**20


@pytest.fixture
def tier(redis_cluster: RedisCluster) -> Iterator[RedisTier]:
    t = RedisTier(RedisTierConfig(url=redis_cluster.url, namespace="c"))
    try:
        yield t
    finally:
        t.close()


def test_round_trip_across_all_nodes(redis_cluster: RedisCluster, tier: RedisTier) -> None:
    values = {f"page-{i}": os.urandom(1000 + i) for i in range(120)}
    values |= {f"big-{i}": os.urandom(3 * MiB + i) for i in range(3)}
    assert tier.put_many(list(values.items())) == len(values)
    per_node = Counter(redis_cluster.node_of(key_slot(b"c:" + k.encode())) for k in values)
    assert len(per_node) == 3  # the batch really spans every master
    for node in redis_cluster.nodes:  # each master holds exactly the keys of its slots
        assert node.client().dbsize() == per_node[node]
    keys = list(values)
    buffers = [bytearray(len(v)) for v in values.values()]
    assert tier.get_into(keys, buffers) == [len(v) for v in values.values()]
    assert all(bytes(b) == v for b, v in zip(buffers, values.values(), strict=True))
    assert tier.exists_many([*keys[:5], "absent"]) == [True] * 5 + [False]
    assert tier.delete_many(keys) == len(keys)
    assert sum(n.client().dbsize() for n in redis_cluster.nodes) == 0
    assert tier.stats().errors == {}


def test_slots_agree_with_the_server(redis_cluster: RedisCluster) -> None:
    client = redis_cluster.nodes[0].client()
    for key in [b"a", b"c:page-1", b"{tag}x", b"x{tag}", b"{}y", b"\xff\x00bin"]:
        assert client.execute_command("CLUSTER", "KEYSLOT", key) == key_slot(key)


def test_hash_tags_keep_a_group_on_one_node(redis_cluster: RedisCluster, tier: RedisTier) -> None:
    group = [f"{{session-7}}:{i}" for i in range(20)]
    tier.put_many([(k, b"v") for k in group])
    owner = redis_cluster.node_of(key_slot(b"{session-7}"))
    assert owner.client().dbsize() == 20
    assert tier.leading_hits(group) == 20
    tier.delete_many(group)


def test_redis_py_reads_what_we_wrote(redis_cluster: RedisCluster, tier: RedisTier) -> None:
    tier.put_many([("interop", b"same bytes")])
    rc = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[1].port)
    try:
        assert rc.get("c:interop") == b"same bytes"
    finally:
        rc.close()


def _node_ids(cluster: RedisCluster) -> list[str]:
    return [n.client().execute_command("CLUSTER", "MYID").decode() for n in cluster.nodes]


def test_moved_and_ask_redirects_are_followed() -> None:
    cluster = RedisCluster(3)  # own cluster: this test moves a slot
    conn = open_connector(cluster.url, ConnectOptions(op_timeout_s=5.0))
    assert isinstance(conn, RedisClusterConnector)
    try:
        deadline = time.monotonic() + 30
        keys = [b"{mv}a", b"{mv}b"]
        slot = key_slot(keys[0])
        src = cluster.node_of(slot)
        dst = cluster.nodes[(cluster.nodes.index(src) + 1) % 3]
        assert conn.set_many(keys, [b"A", b"B"], None, deadline).values == [True, True]
        assert conn.slot_owner(keys[0]) == ("127.0.0.1", src.port, None)
        ids = dict(zip(cluster.nodes, _node_ids(cluster), strict=True))
        s, d = src.client(), dst.client()
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
        s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", keys[0])
        # mid-migration: the source answers ASK for the moved key, serves the other itself
        got = conn.get_many(keys, deadline)
        assert got.values == [b"A", b"B"] and not got.faults
        s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", keys[1])
        for node in cluster.nodes:
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
        # migration done: the source answers MOVED; the connector follows and learns
        bufs = [bytearray(1), bytearray(1)]
        got_into = conn.get_into(keys, bufs, deadline)
        assert got_into.values == [1, 1] and bytes(bufs[0] + bufs[1]) == b"AB"
        assert conn.slot_owner(keys[0]) == ("127.0.0.1", dst.port, None)
        assert conn.exists_many(keys, deadline).values == [True, True]
    finally:
        conn.close()
        cluster.close()


def test_discovery_failures_are_misses_with_a_reason() -> None:
    config = RedisTierConfig(url=f"redis+cluster://127.0.0.1:{free_port()}")
    nowhere = RedisTier(config, clock=lambda: 0.0)  # frozen clock: no second discovery
    assert nowhere.get_many(["k"]) == [None] and nowhere.put_many([("k", b"v")]) == 0
    assert nowhere.stats().errors == {"connect": 1, "down": 1}
    nowhere.close()
    standalone = RedisServer()  # answers CLUSTER SLOTS with an error: cluster disabled
    try:
        t = RedisTier(RedisTierConfig(url=f"redis://127.0.0.1:{standalone.port}?cluster=true"))
        assert t.exists_many(["k"]) == [False] and t.stats().errors == {"route": 1}
        t.close()
    finally:
        standalone.close()
