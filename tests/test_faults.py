"""Faults under a running runtime, against real redis-server processes: Redis killed and
restarted mid-session, slowed (``CLIENT PAUSE``, ``DEBUG SLEEP``), full (``maxmemory`` with
``noeviction``), and a cluster node killed.

Every turn is checked against an oracle (a ``reuse=False`` runtime on the same model: with
codec ``none`` reuse must give identical greedy tokens), the errors must show in the runtime's
stats, and the tier must come back by itself once Redis does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from model_fixtures import tiny, tiny_dir, tiny_engine  # noqa: F401
from redis_servers import RedisCluster, RedisServer, wait_until

from kvruntime.config import RuntimeConfig
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.errors import ConfigError
from kvruntime.results import ChatResult
from kvruntime.runtime import Runtime
from kvruntime.store.redis_cluster import key_slot

PAGE = 4
SYSTEM = "You are a careful agent. Tools: search(query), read(path), write(path, text)."
# fixed rates: no calibration at start, and Redis always worth restoring
FIXED = dict(
    page_size=PAGE, prefill_tokens_per_s=1000.0, host_bytes_per_s=1e9, redis_bytes_per_s=1e9
)
MAX_TOKENS = 3
# A turn must end even when Redis hangs: op timeout (2 s) per call, a few calls per turn.
TURN_BOUND_S = 15.0


class Oracle:
    """The greedy tokens each prompt must produce: a ``reuse=False`` runtime."""

    def __init__(self, engine: TransformersEngine, model: LoadedModel) -> None:
        self.rt = Runtime(engine, model.tokenizer, RuntimeConfig(reuse=False, **FIXED))  # type: ignore[arg-type]
        self.turns = 0

    def check(self, result: ChatResult, messages: list[dict[str, Any]]) -> None:
        want = self.rt.session().chat(messages, max_tokens=MAX_TOKENS).token_ids
        assert result.token_ids == want, f"turn {result.turn}: {result.usage}"
        self.turns += 1

    def close(self) -> None:
        self.rt.close()


class Agent:
    """One conversation that re-sends its growing history each turn, as agents do."""

    def __init__(self, rt: Runtime, oracle: Oracle, tag: str) -> None:
        self.session = rt.session()
        self.oracle = oracle
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": f"{tag}. {SYSTEM}"}]

    def turn(self, text: str) -> ChatResult:
        self.messages.append({"role": "user", "content": text})
        start = time.monotonic()
        r = self.session.chat(self.messages, max_tokens=MAX_TOKENS)
        assert time.monotonic() - start < TURN_BOUND_S, "a turn hung on a Redis fault"
        self.oracle.check(r, self.messages)
        self.messages.append({"role": "assistant", "content": r.text})
        return r


@pytest.fixture
def oracle(tiny_engine: TransformersEngine, tiny: LoadedModel) -> Iterator[Oracle]:  # noqa: F811
    o = Oracle(tiny_engine, tiny)
    yield o
    o.close()


@pytest.fixture
def make(tiny_engine: TransformersEngine, tiny: LoadedModel) -> Iterator[Any]:  # noqa: F811
    """Runtimes with a Redis tier (codec none, no host tier) and a small device pool, so
    most of every prompt lives in Redis only and each turn reads it back."""
    made: list[Runtime] = []
    page = tiny_engine.layout.page_layout(PAGE, tiny_engine.dtype).page_nbytes

    def build(url: str, device_pages: int = 24, **fields: Any) -> Runtime:
        fields = {"redis_codec": "none", "host_kv_bytes": 0, **FIXED, **fields}
        config = RuntimeConfig(redis_url=url, device_kv_bytes=device_pages * page, **fields)
        rt = Runtime(tiny_engine, tiny.tokenizer, config)
        made.append(rt)
        return rt

    yield build
    for rt in made:
        rt.close()


def redis_stats(rt: Runtime) -> dict[str, Any]:
    return dict(rt.stats().tiers["redis"])


def wait_reconnected(rt: Runtime, timeout_s: float = 20.0) -> None:
    """Poll until the runtime's own tier stores a value again (its backoff has passed)."""
    assert rt.cache.redis is not None
    tier = rt.cache.redis
    wait_until(lambda: tier.put_many([("probe", b"1")]) == 1, timeout_s)


def test_redis_killed_and_restarted_mid_session(make: Any, oracle: Oracle) -> None:
    server = RedisServer()
    try:
        rt = make(server.url)
        a, b = Agent(rt, oracle, "agent a"), Agent(rt, oracle, "agent b")
        for t in range(3):
            a.turn(f"step {t}")
            b.turn(f"step {t}")
        rt.cache.flush(10)
        before = redis_stats(rt)
        assert before["hits"] > 0 and not before["errors"]  # Redis served part of each turn
        server.kill()  # write-back of b's last turn may still be in flight: it must not matter
        for t in range(3, 6):
            assert a.turn(f"step {t}").usage.cached_tokens_by_tier["redis"] == 0
            b.turn(f"step {t}")
        rt.cache.flush(10)
        down = redis_stats(rt)
        assert set(down["errors"]) <= {"connect", "down", "closed", "timeout"}
        # counted; locations checked (EXISTS) before a read, so no page is read from it
        assert sum(down["errors"].values()) > 0 and down["hits"] == before["hits"]
        server.start()  # same port, empty (no persistence)
        wait_reconnected(rt)
        # the tier stores and serves again: a new conversation goes to Redis (the device
        # holds 24 pages of its ~30) and its next turn reads the spilled pages back
        back = redis_stats(rt)
        settled = back["errors"]
        c = Agent(rt, oracle, "agent c")
        c.turn("step 0")
        rt.cache.flush(10)
        puts = redis_stats(rt)["puts"]
        assert puts > back["puts"]
        assert c.turn("step 1").usage.cached_tokens_by_tier["redis"] > 0
        for t in range(6, 8):  # the old conversations go on, correct
            a.turn(f"step {t}")
            b.turn(f"step {t}")
        rt.cache.flush(10)
        after = redis_stats(rt)
        assert after["errors"] == settled  # no new errors once Redis is back
        assert after["puts"] > puts and after["hits"] > down["hits"]
    finally:
        server.close()
    assert oracle.turns == 2 * 8 + 2


def test_pages_lost_with_redis_data_are_stored_again_once_it_returns(
    make: Any, oracle: Oracle
) -> None:
    server = RedisServer()
    try:
        rt = make(server.url)
        a = Agent(rt, oracle, "agent a")
        a.turn("step 0")
        rt.cache.flush(10)
        server.kill()
        assert rt.cache.redis is not None
        recoveries = rt.cache.redis.recoveries
        server.start()  # back, empty
        wait_reconnected(rt)
        # a pooled connection found dead: the tier knows its server went away
        assert rt.cache.redis.recoveries > recoveries
        messages = list(a.messages[:-1])
        for _ in range(2):
            oracle.check(rt.session().chat(messages, max_tokens=MAX_TOKENS), messages)
        rt.cache.flush(10)
        fresh = make(server.url)  # another process over the same Redis
        r = fresh.session().chat(messages, max_tokens=MAX_TOKENS)
        oracle.check(r, messages)
        assert r.usage.cached_tokens_by_tier["redis"] >= 0.8 * r.usage.prompt_tokens, r.usage
    finally:
        server.close()


def test_pages_redis_dropped_are_stored_again_and_read_back(make: Any, oracle: Oracle) -> None:
    """Redis loses values without an outage (eviction, TTL; here FLUSHALL): the next turn
    checks the index's Redis pages before reading them, recomputes from the first gone,
    stores those pages again, and the turn after reads them back from Redis."""
    server = RedisServer()
    try:
        rt = make(server.url)
        messages = [*Agent(rt, oracle, "agent").messages, {"role": "user", "content": "go"}]
        oracle.check(rt.session().chat(messages, max_tokens=MAX_TOKENS), messages)
        rt.cache.flush(10)
        tier = rt.cache.redis
        assert tier is not None
        recoveries = tier.recoveries
        server.client().flushall()
        before = redis_stats(rt)
        r = rt.session().chat(messages, max_tokens=MAX_TOKENS)
        oracle.check(r, messages)
        assert r.usage.cached_tokens_by_tier["redis"] == 0
        rt.cache.flush(10)
        after = redis_stats(rt)
        assert after["misses"] == before["misses"]  # nothing was read that is not there
        assert after["puts"] > before["puts"] and not after["errors"]
        assert tier.recoveries == recoveries  # found per page, not by an outage
        r = rt.session().chat(messages, max_tokens=MAX_TOKENS)
        oracle.check(r, messages)
        assert r.usage.cached_tokens_by_tier["redis"] > 0, r.usage
        rt.cache.tree.check_integrity()
    finally:
        server.close()


def test_the_index_forgets_redis_only_pages_beyond_its_cap(make: Any, oracle: Oracle) -> None:
    server = RedisServer()
    try:
        rt = make(server.url, device_pages=16, max_redis_index_pages=8)
        for tag in ("first", "second", "third"):
            Agent(rt, oracle, tag).turn("step 0")
            rt.cache.flush(10)
            tree = rt.cache.tree
            assert tree.num_pages - tree.pages_in("device") <= 8, tree.stats()
        assert redis_stats(rt)["puts"] > 3 * 8  # many more pages went to Redis than that
        # forgotten by the index, still in Redis: the probe finds them by hash
        fresh = make(server.url, device_pages=16, max_redis_index_pages=8)
        r = Agent(fresh, oracle, "first").turn("step 0")
        assert r.usage.cached_tokens_by_tier["redis"] >= 0.8 * r.usage.prompt_tokens, r.usage
        again = Agent(rt, oracle, "first").turn("step 0")
        assert again.usage.cached_tokens >= 0.8 * again.usage.prompt_tokens, again.usage
        rt.cache.tree.check_integrity()
    finally:
        server.close()


def test_redis_slowed_by_client_pause_still_serves(make: Any, oracle: Oracle) -> None:
    server = RedisServer()
    try:
        writer = make(server.url)
        Agent(writer, oracle, "stored").turn("step 0")
        writer.cache.flush(10)
        rt = make(server.url)
        # 1 s: slower than usual, within the 2 s operation timeout: a slow hit, not a fault
        server.client().execute_command("CLIENT", "PAUSE", "1000", "ALL")
        start = time.monotonic()
        r = Agent(rt, oracle, "stored").turn("step 0")
        assert time.monotonic() - start >= 0.5  # the pause did hold the turn up
        assert r.usage.cached_tokens_by_tier["redis"] >= 0.8 * r.usage.prompt_tokens, r.usage
        assert not redis_stats(rt)["errors"]
    finally:
        server.close()


def test_a_write_paused_redis_holds_no_page_locks(make: Any, oracle: Oracle) -> None:
    """Write-back hands the encoded blocks to the Redis sender thread and unlocks the pages at
    once: while Redis takes no writes the turn's pages stay evictable and later turns run; the
    blocks land once it does, and another runtime reads them back."""
    server = RedisServer()
    tokens = [(7 * i) % 120 + 3 for i in range(61)]  # no session: nothing pins the prefix
    want = oracle.rt.generate(tokens, max_tokens=MAX_TOKENS).token_ids
    try:
        rt = make(server.url)
        tiers = rt.cache.tiers
        # 1.5 s: within the tier's 2 s operation timeout, so the held send succeeds after
        server.client().execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        paused = time.monotonic()
        assert rt.generate(tokens, max_tokens=MAX_TOKENS).token_ids == want
        # the send is held by the pause, and no page is locked meanwhile
        wait_until(
            lambda: tiers.writer.redis_backlog_bytes > 0 and not tiers.tree.stats().locked_pages
        )
        assert tiers.tree.evictable_pages("device") == tiers.tree.stats().pages_by_tier["device"]
        Agent(rt, oracle, "meanwhile").turn("step 0")
        assert time.monotonic() - paused < 1.4, "the turns waited for the paused Redis"
        assert redis_stats(rt)["puts"] == 0  # nothing was sent yet
        assert rt.cache.flush(10)
        stats = redis_stats(rt)
        assert stats["puts"] > 0 and stats["write_backlog_bytes"] == 0
        assert stats["writes_skipped"] == 0 and not stats["errors"]
        r = make(server.url).generate(tokens, max_tokens=MAX_TOKENS)
        assert r.token_ids == want
        assert r.usage.cached_tokens_by_tier["redis"] >= 0.8 * len(tokens), r.usage
    finally:
        server.close()


def test_a_full_redis_send_backlog_skips_and_counts(make: Any, oracle: Oracle) -> None:
    """With the send backlog full, a write-back is not sent to Redis: counted, and its pages
    stay where they are; turns are unaffected and the backlog drains once Redis is back."""
    server = RedisServer()
    try:
        # one byte: only a job that finds the backlog empty is sent; a pool that takes every
        # page, so nothing spills and each turn makes one write-back job
        rt = make(server.url, device_pages=256, redis_write_backlog_bytes=1)
        server.client().execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        # write-back runs the jobs in order: the first reserves the backlog and its send waits
        # for the pause; the next ones find it taken
        for i in range(3):
            Agent(rt, oracle, f"agent {i}").turn("step 0")
        assert rt.cache.flush(10)
        stats = redis_stats(rt)
        assert stats["writes_skipped"] > 0 and stats["write_backlog_bytes"] == 0
        assert stats["puts"] > 0  # the first job, sent once Redis took writes again
        fresh = make(server.url)
        first = Agent(fresh, oracle, "agent 0").turn("step 0")
        assert first.usage.cached_tokens_by_tier["redis"] > 0, first.usage
        last = Agent(fresh, oracle, "agent 2").turn("step 0")
        assert last.usage.cached_tokens_by_tier["redis"] == 0, last.usage  # never sent
        with pytest.raises(ConfigError):
            RuntimeConfig(redis_write_backlog_bytes=0)
    finally:
        server.close()


@pytest.mark.parametrize("how", ["client-pause", "debug-sleep"])
def test_redis_slower_than_the_timeout_costs_reuse_not_turns(
    make: Any, oracle: Oracle, how: str
) -> None:
    server = RedisServer()
    try:
        writer = make(server.url)
        for tag in ("first", "second"):
            Agent(writer, oracle, tag).turn("step 0")
        writer.cache.flush(10)
        rt = make(server.url)
        # 3 s: past the tier's 2 s operation timeout
        held_until = time.monotonic() + 3.0
        if how == "client-pause":
            server.client().execute_command("CLIENT", "PAUSE", "3000", "ALL")
        else:
            sleeper = threading.Thread(
                target=lambda: server.client().execute_command("DEBUG", "SLEEP", "3")
            )
            sleeper.start()
            wait_until(lambda: _blocked(server))
        r = Agent(rt, oracle, "first").turn("step 0")
        assert r.usage.cached_tokens_by_tier["redis"] == 0
        errors = redis_stats(rt)["errors"]
        assert errors.get("timeout", 0) > 0, errors
        if how == "debug-sleep":
            sleeper.join()
        time.sleep(max(0.0, held_until - time.monotonic()))
        wait_reconnected(rt)
        r = Agent(rt, oracle, "second").turn("step 0")
        assert r.usage.cached_tokens_by_tier["redis"] >= 0.8 * r.usage.prompt_tokens, r.usage
    finally:
        server.close()


def _blocked(server: RedisServer) -> bool:
    """True once the server stops answering (DEBUG SLEEP holds its only thread)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=1) as s:
        s.settimeout(0.2)
        s.sendall(b"PING\r\n")
        try:
            s.recv(16)
        except TimeoutError:
            return True
    return False


def test_full_redis_with_noeviction(make: Any, oracle: Oracle) -> None:
    server = RedisServer("--maxmemory-policy", "noeviction")
    try:
        client = server.client()
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used // 2)  # already over: every write is refused
        rt = make(server.url)
        agent = Agent(rt, oracle, "agent")
        for t in range(3):
            r = agent.turn(f"step {t}")
            assert r.usage.cached_tokens_by_tier["redis"] == 0
        rt.cache.flush(10)
        full = redis_stats(rt)
        assert full["puts"] == 0 and full["failed_puts"] > 0
        assert full["errors"].get("oom", 0) > 0, full["errors"]
        client.config_set("maxmemory", 0)  # room again: no backoff for a server's refusal
        agent.turn("step 3")
        rt.cache.flush(10)
        after = redis_stats(rt)
        assert after["puts"] > 0 and after["failed_puts"] == full["failed_puts"]
        assert agent.turn("step 4").usage.cached_tokens_by_tier["redis"] > 0
    finally:
        server.close()


def test_cluster_node_killed_and_restarted(make: Any, oracle: Oracle) -> None:
    cluster = RedisCluster(3)
    try:
        writer = make(cluster.url)
        Agent(writer, oracle, "stored").turn("step 0")
        writer.cache.flush(10)
        assert redis_stats(writer)["puts"] >= 20  # spread over the three nodes
        victim = cluster.nodes[1]
        victim.kill()
        rt = make(cluster.url)
        agent = Agent(rt, oracle, "stored")
        agent.turn("step 0")
        other = Agent(rt, oracle, "new while a node is down")
        other.turn("step 0")
        rt.cache.flush(10)
        down = redis_stats(rt)
        assert down["errors"].get("connect", 0) + down["errors"].get("down", 0) > 0
        # the live nodes still take their share of the new pages
        assert down["puts"] > 0 and down["failed_puts"] > 0
        victim.start()  # rejoins with its nodes.conf: same identity, same slots
        wait_until(
            lambda: b"cluster_state:ok" in victim.client().execute_command("CLUSTER", "INFO")
        )
        assert rt.cache.redis is not None
        tier = rt.cache.redis
        probe = next(
            f"probe{i}"
            for i in range(10_000)
            if cluster.node_of(key_slot(b"kvr:probe%d" % i)) is victim
        )
        wait_until(lambda: tier.put_many([(probe, b"1")]) == 1, 20.0)
        Agent(rt, oracle, "after the node came back").turn("step 0")
        rt.cache.flush(10)
        assert redis_stats(rt)["failed_puts"] == down["failed_puts"]
        reader = make(cluster.url)
        r = Agent(reader, oracle, "after the node came back").turn("step 0")
        assert r.usage.cached_tokens_by_tier["redis"] >= 0.8 * r.usage.prompt_tokens, r.usage
    finally:
        cluster.close()
