"""The RESP connector against a real redis-server: URLs, slots, buffers, auth, db, TLS."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
import torch
from redis.crc import key_slot as redis_key_slot
from redis_servers import RedisServer, TlsProxy
from redis_servers import redis_server as redis_server  # fixture

from kvruntime.errors import BadRequest, ConfigError
from kvruntime.store.redis import RedisConnector, open_connector
from kvruntime.store.redis_cluster import key_slot
from kvruntime.store.redis_url import RedisURL
from kvruntime.store.resp import Address, ConnectOptions, pack_around, pack_command

MiB = 2**20
OPTS = ConnectOptions(connect_timeout_s=2.0, op_timeout_s=5.0)


def deadline(seconds: float = 20.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture
def connector(redis_server: RedisServer) -> Iterator[RedisConnector]:
    conn = open_connector(redis_server.url, OPTS)
    try:
        yield conn
    finally:
        conn.close()


# -- URLs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("redis://localhost", RedisURL((Address("localhost", 6379),))),
        ("redis://h:7000/3", RedisURL((Address("h", 7000),), db=3)),
        ("redis://:s%40cret@h:1", RedisURL((Address("h", 1),), password="s@cret")),
        ("redis://u:p@h:1?db=2", RedisURL((Address("h", 1),), db=2, username="u", password="p")),
        ("redis://[::1]:7000", RedisURL((Address("::1", 7000),))),
        (
            "rediss://h:1?ssl_cert_reqs=none",
            RedisURL((Address("h", 1),), tls=True, tls_verify=False),
        ),
        ("unix:///tmp/r.sock?db=1", RedisURL((Address("", 0, "/tmp/r.sock"),), db=1)),
        ("unix://:pw@/tmp/r.sock", RedisURL((Address("", 0, "/tmp/r.sock"),), password="pw")),
        (
            "redis+cluster://a:1,b:2",
            RedisURL((Address("a", 1), Address("b", 2)), cluster=True),
        ),
        (
            "redis://a:1,b:2?cluster=true",
            RedisURL((Address("a", 1), Address("b", 2)), cluster=True),
        ),
        ("rediss+cluster://a:1", RedisURL((Address("a", 1),), tls=True, cluster=True)),
    ],
)
def test_url_forms(url: str, want: RedisURL) -> None:
    assert RedisURL.parse(url) == want


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:1", "scheme"),
        ("redis://h:notaport", "bad port"),
        ("redis://h:1/x", "db must be an integer"),
        ("redis://a:1,b:2", "cluster mode"),
        ("redis+cluster://a:1/2", "db 0"),
        ("redis://h:1?timeout=3", "unknown parameter"),
        ("unix://relative.sock", "absolute path"),
        ("rediss://h:1?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ],
)
def test_bad_urls_name_the_problem(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RedisURL.parse(url)


def test_url_str_hides_password() -> None:
    text = str(RedisURL.parse("redis://user:hunter2@h:1/0"))
    assert "hunter2" not in text and "h:1" in text


# -- protocol helpers ----------------------------------------------------------------------
def test_key_slot_matches_redis_py_and_hash_tags() -> None:
    assert key_slot(b"123456789") == 0x31C3  # CRC16-XMODEM check value
    assert key_slot(b"foo") == 12182
    rng = np.random.default_rng(0)
    for n in range(200):
        key = bytes(rng.integers(0, 256, size=n % 40 + 1, dtype=np.uint8))
        assert key_slot(key) == redis_key_slot(key), key
    assert key_slot(b"user:{42}:a") == key_slot(b"other{42}") == key_slot(b"42")
    assert key_slot(b"{}x") != key_slot(b"")  # empty tag: hash the whole key


def test_pack_command_and_around() -> None:
    assert pack_command("SET", b"k", 5) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    head, tail = pack_around([b"SET", b"k"], 3, [b"PX", b"10"])
    assert head + b"abc" + tail == pack_command("SET", "k", "abc", "PX", 10)


# -- round trips ---------------------------------------------------------------------------
def test_round_trip_small_and_multi_mib(
    redis_server: RedisServer, connector: RedisConnector
) -> None:
    rng = np.random.default_rng(1)
    sizes = [0, 1, 100, 16 * 1024 - 1, 16 * 1024, 300_000, 3 * MiB + 7, 9 * MiB]
    values = [rng.integers(0, 256, size=s, dtype=np.uint8).tobytes() for s in sizes]
    keys = [f"rt:{i}".encode() for i in range(len(sizes))]
    out = connector.set_many(keys, values, None, deadline())
    assert out.values == [True] * len(keys) and not out.faults
    # independent check with redis-py: the bytes on the server are exactly ours
    assert redis_server.client().get("rt:6") == values[6]
    buffers = [bytearray(s + 5) for s in sizes]
    got = connector.get_into([*keys, b"absent"], [*buffers, bytearray(4)], deadline())
    assert got.values == [*sizes, None] and not got.faults
    for buf, value in zip(buffers, values, strict=True):
        assert bytes(buf[: len(value)]) == value
    assert connector.get_many(keys, deadline()).values == values


def test_get_into_numpy_torch_and_memoryview_slices(connector: RedisConnector) -> None:
    payload = [os.urandom(1000), os.urandom(2 * MiB), os.urandom(12345)]
    keys = [b"b:0", b"b:1", b"b:2"]
    connector.set_many(keys, payload, None, deadline())
    arena = np.zeros(3 * MiB, dtype=np.uint8)  # [3 MiB] uint8 host arena, pages carved out
    tensor = torch.zeros(20000, dtype=torch.uint8)  # [20000] uint8 (pinned on CUDA hosts)
    targets = [arena.data[10:2000], arena[4096 : 4096 + 2 * MiB], tensor.numpy()]
    assert connector.get_into(keys, targets, deadline()).values == [1000, 2 * MiB, 12345]
    assert arena[10:1010].tobytes() == payload[0]
    assert arena[4096 : 4096 + 2 * MiB].tobytes() == payload[1]
    assert tensor[:12345].numpy().tobytes() == payload[2]


def test_too_small_buffer_is_a_miss_and_keeps_the_connection(connector: RedisConnector) -> None:
    connector.set_many([b"s:big", b"s:next"], [b"x" * 5000, b"after"], None, deadline())
    small, nxt = bytearray(b"\0" * 4999), bytearray(10)
    out = connector.get_into([b"s:big", b"s:next"], [small, nxt], deadline())
    assert out.values == [None, 5]
    assert [(f.kind, f.keys) for f in out.faults] == [("too_large", 1)]
    assert small == bytearray(4999)  # untouched, never a partial write
    assert bytes(nxt[:5]) == b"after"  # the reply stream stayed aligned


def test_exists_delete_ttl(connector: RedisConnector) -> None:
    keys = [b"e:1", b"e:2", b"e:3"]
    connector.set_many(keys[:2], [b"a", b"b"], None, deadline())
    assert connector.exists_many(keys, deadline()).values == [True, True, False]
    assert connector.delete_many(keys, deadline()).values == [True, True, False]
    assert connector.exists_many(keys, deadline()).values == [False] * 3
    connector.set_many([b"e:ttl"], [b"v"], 50, deadline())
    assert connector.exists_many([b"e:ttl"], deadline()).values == [True]


def test_bad_arguments_raise_bad_request(connector: RedisConnector) -> None:
    with pytest.raises(BadRequest, match="2 keys but 1 buffers"):
        connector.get_into([b"a", b"b"], [bytearray(1)], deadline())
    with pytest.raises(BadRequest, match="read-only"):
        connector.get_into([b"a"], [b"immutable"], deadline())
    with pytest.raises(BadRequest, match="contiguous"):
        connector.get_into([b"a"], [np.zeros((4, 4), dtype=np.uint8)[:, 1]], deadline())
    with pytest.raises(BadRequest, match="1 keys but 2 values"):
        connector.set_many([b"a"], [b"x", b"y"], None, deadline())


def test_unix_socket(redis_server: RedisServer) -> None:
    conn = open_connector(redis_server.unix_url, OPTS)
    try:
        assert conn.set_many([b"u"], [b"over unix"], None, deadline()).values == [True]
        assert redis_server.client().get("u") == b"over unix"
        assert conn.get_many([b"u"], deadline()).values == [b"over unix"]
    finally:
        conn.close()


def test_db_and_auth_from_url() -> None:
    server = RedisServer("--requirepass", "p@ss")
    try:
        admin = redis.Redis(port=server.port, password="p@ss")
        admin.execute_command("ACL", "SETUSER", "kv", "on", ">kvpw", "~*", "+@all")
        conn = open_connector(f"redis://:p%40ss@127.0.0.1:{server.port}/2", OPTS)
        assert conn.set_many([b"k"], [b"in db 2"], None, deadline()).values == [True]
        assert redis.Redis(port=server.port, password="p@ss", db=2).get("k") == b"in db 2"
        assert admin.get("k") is None
        user = open_connector(f"redis://kv:kvpw@127.0.0.1:{server.port}", OPTS)
        assert user.get_many([b"k", b"nope"], deadline()).values == [None, None]
        wrong = open_connector(f"redis://:bad@127.0.0.1:{server.port}", OPTS)
        out = wrong.get_many([b"k"], deadline())
        assert out.values == [None] and out.faults[0].kind == "auth"
        for c in (conn, user, wrong):
            c.close()
    finally:
        server.close()


def test_tls_round_trip_through_terminator(redis_server: RedisServer) -> None:
    proxy = TlsProxy(redis_server.port)
    try:
        verified = open_connector(
            f"rediss://localhost:{proxy.port}?ssl_ca_certs={proxy.cert}", OPTS
        )
        big = os.urandom(3 * MiB)
        assert verified.set_many([b"t"], [big], None, deadline()).values == [True]
        buf = bytearray(3 * MiB)
        assert verified.get_into([b"t"], [buf], deadline()).values == [3 * MiB]
        assert buf == big and redis_server.client().get("t") == big
        unverified = open_connector(f"rediss://127.0.0.1:{proxy.port}?ssl_cert_reqs=none", OPTS)
        assert unverified.exists_many([b"t"], deadline()).values == [True]
        untrusted = open_connector(f"rediss://localhost:{proxy.port}", OPTS)  # system CAs only
        out = untrusted.get_many([b"t"], deadline())
        assert out.values == [None] and out.faults[0].kind == "tls"
        for c in (verified, unverified, untrusted):
            c.close()
    finally:
        proxy.close()


def test_tls_to_a_plain_server_is_a_clean_miss(redis_server: RedisServer) -> None:
    # The server reads the ClientHello as an inline command and waits for a newline: the
    # handshake ends by the connect timeout, as a "tls" fault, not a hang or an exception.
    url = f"rediss://127.0.0.1:{redis_server.port}?ssl_cert_reqs=none"
    conn = open_connector(url, ConnectOptions(connect_timeout_s=0.3, op_timeout_s=1.0))
    start = time.monotonic()
    out = conn.get_many([b"k"], deadline())
    assert out.values == [None] and out.faults[0].kind == "tls"
    assert time.monotonic() - start < 2
    conn.close()
