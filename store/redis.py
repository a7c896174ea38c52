"""Redis connector: moves opaque values by key, batched and pipelined, to one server.

It knows nothing of pages, namespaces or TTL policy (the tier's job) and never raises for a
server problem: every call returns an ``Outcome`` whose ``values`` hold one entry per key
(a miss / False where the key could not be served) and whose ``faults`` say what went wrong,
by kind and node. Bad arguments (buffer count differs from key count, a read-only buffer)
raise BadRequest.

A call runs in rounds (``RedisConnector._execute``): route the keys to nodes, pipeline each
node's share, settle the replies, and repeat for redirected keys. The standalone connector
sends everything to its one server; ``redis_cluster.RedisClusterConnector`` overrides the
routing. URLs: ``redis_url.RedisURL``; ``open_connector`` picks the connector for a URL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, NamedTuple, TypeVar

from kvruntime.errors import BadRequest
from kvruntime.store.redis_url import RedisURL
from kvruntime.store.resp import (
    Address,
    ConnectionPool,
    ConnectOptions,
    Oversize,
    ReplyError,
    RespConnection,
    RespError,
    byte_view,
    pack_around,
    pack_command,
)
from kvruntime.store.retry import Backoff, RetryGate

T = TypeVar("T")
# Connection problems that say the server itself is in trouble (the pool backs off).
SERVER_DOWN = frozenset({"closed", "timeout", "tls", "protocol"})


class Fault(NamedTuple):
    kind: str  # connect, tls, auth, timeout, deadline, closed, protocol, pool, down, oom,
    # server, too_large, route
    node: str
    keys: int  # keys of the batch this fault left unserved
    detail: str


@dataclass(frozen=True)
class Outcome(Generic[T]):
    values: list[T]  # one per key, in key order
    faults: tuple[Fault, ...] = ()

    @property
    def failed_keys(self) -> int:
        return sum(f.keys for f in self.faults)


Parts = Callable[[int], list["bytes | memoryview"]]
Reader = Callable[[RespConnection, int, float], object]


@dataclass
class Job(Generic[T]):
    values: list[T]
    parts: Parts
    read: Reader
    deadline: float
    redirects: dict[int, tuple[Address, bool]] = field(default_factory=dict)  # i -> (to, ask)
    moved: dict[int, Address] = field(default_factory=dict)  # slot -> owner
    asking: dict[Address, set[int]] = field(default_factory=dict)  # ASK targets this round
    faults: dict[tuple[str, str], Fault] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fault(self, kind: str, node: str, keys: int, detail: str) -> None:
        with self.lock:
            old = self.faults.get((kind, node))
            count = keys + (old.keys if old else 0)
            self.faults[(kind, node)] = Fault(kind, node, count, old.detail if old else detail)


class RedisConnector:
    """Standalone Redis (one server). Thread-safe; each call borrows pooled connections."""

    def __init__(
        self,
        url: RedisURL,
        options: ConnectOptions,
        pool_size: int = 4,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.options = options
        self.pool_size = pool_size
        self.backoff = backoff or Backoff()
        self.clock = clock
        self._pools: dict[Address, ConnectionPool] = {}
        self._lock = threading.Lock()
        self._closed = False
        # pooled connections found dead (and replaced): the server went away meanwhile,
        # maybe restarting empty. Only counted (an int += under the GIL races harmlessly).
        self.dead_connections = 0

    # -- public batch API -----------------------------------------------------------------
    def get_into(
        self, keys: Sequence[bytes], buffers: Sequence[object], deadline: float
    ) -> Outcome[int | None]:
        """Read each key's value into its buffer; values[i] = bytes written, None = miss.
        A value longer than its buffer is a miss (fault ``too_large``); a key whose reply
        did not arrive complete is a miss even if part of its buffer was written."""
        if len(buffers) != len(keys):
            raise BadRequest(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        try:
            views = [byte_view(b, writable=True) for b in buffers]
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"get_into: unusable buffer: {exc}") from None
        return self._execute(
            keys,
            lambda i: [pack_command(b"GET", keys[i])],
            lambda c, i, d: c.read_bulk_into(views[i], d),
            None,
            deadline,
        )

    def get_many(self, keys: Sequence[bytes], deadline: float) -> Outcome[bytes | None]:
        return self._execute(
            keys, lambda i: [pack_command(b"GET", keys[i])], _read_any, None, deadline
        )

    def set_many(
        self,
        keys: Sequence[bytes],
        values: Sequence[object],
        ttl_ms: int | None,
        deadline: float,
    ) -> Outcome[bool]:
        """SET each key (PX ``ttl_ms`` when given); values[i] = stored. Values are sent from
        the caller's buffers; the caller must not modify them until this returns."""
        if len(values) != len(keys):
            raise BadRequest(f"set_many: {len(keys)} keys but {len(values)} values")
        try:
            views = [byte_view(v, writable=False) for v in values]
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"set_many: unusable value: {exc}") from None
        tail = [b"PX", b"%d" % ttl_ms] if ttl_ms is not None else []

        def parts(i: int) -> list[bytes | memoryview]:
            head, after = pack_around([b"SET", keys[i]], len(views[i]), tail)
            return [head, views[i], after]

        return self._execute(keys, parts, _read_ok, False, deadline)

    def exists_many(self, keys: Sequence[bytes], deadline: float) -> Outcome[bool]:
        return self._execute(
            keys, lambda i: [pack_command(b"EXISTS", keys[i])], _read_flag, False, deadline
        )

    def delete_many(self, keys: Sequence[bytes], deadline: float) -> Outcome[bool]:
        """UNLINK each key (the server frees large values off its main thread)."""
        return self._execute(
            keys, lambda i: [pack_command(b"UNLINK", keys[i])], _read_flag, False, deadline
        )

    def close(self) -> None:
        """Close every pooled connection; later calls fail with fault ``closed``."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
        for pool in pools:
            pool.close()

    # -- machinery ------------------------------------------------------------------------
    def _pool(self, address: Address) -> ConnectionPool:
        with self._lock:
            pool = self._pools.get(address)
            if pool is None:
                gate = RetryGate(self.backoff, clock=self.clock)
                pool = ConnectionPool(address, self.options, self.pool_size, gate)
                if self._closed:
                    pool.close()
                self._pools[address] = pool
            return pool

    def _route(
        self, job: Job[T], keys: Sequence[bytes], todo: list[int]
    ) -> dict[Address, list[int]]:
        return {self.url.addresses[0]: todo}

    def _after_round(self, job: Job[T]) -> None:
        """Cluster hook: learn from redirects and connection failures."""

    def _run_groups(self, job: Job[T], groups: dict[Address, list[int]]) -> None:
        for address, idxs in groups.items():
            self._run_group(job, address, idxs, set())

    def _execute(
        self, keys: Sequence[bytes], parts: Parts, read: Reader, default: T, deadline: float
    ) -> Outcome[T]:
        job: Job[T] = Job([default] * len(keys), parts, read, deadline)
        todo = list(range(len(keys)))
        for _ in range(4):  # first try + up to 3 rounds of redirects
            if not todo:
                break
            groups = self._route(job, keys, todo)
            if groups:
                self._run_groups(job, groups)
            self._after_round(job)
            todo = sorted(job.redirects)
        else:
            if todo:
                job.fault("route", "-", len(todo), "too many MOVED/ASK redirects")
        return Outcome(job.values, tuple(job.faults.values()))

    def _run_group(self, job: Job[T], address: Address, idxs: list[int], asking: set[int]) -> None:
        pool = self._pool(address)
        node = str(address)
        for attempt in (0, 1):
            try:
                conn, reused = pool.acquire(job.deadline)  # a Lease
            except RespError as exc:
                job.fault(exc.kind, node, len(idxs), exc.detail)
                return
            done = 0
            try:
                out: list[bytes | memoryview] = []
                for i in idxs:
                    if i in asking:
                        out.append(_ASKING)
                    out.extend(job.parts(i))
                conn.send(out, job.deadline)
                for i in idxs:
                    if i in asking:
                        conn.read_reply(job.deadline)  # +OK of ASKING
                    reply = job.read(conn, i, job.deadline)
                    done += 1
                    self._settle(job, i, reply, node)
                return
            except RespError as exc:
                # An idle pooled socket may have died with a restarted server: retry once on
                # a fresh connection before any reply was consumed (all commands idempotent).
                if attempt == 0 and reused and done == 0 and exc.kind == "closed":
                    self.dead_connections += 1
                    continue
                job.fault(exc.kind, node, len(idxs) - done, exc.detail)
                if exc.kind in SERVER_DOWN:
                    pool.failed()
                return
            finally:
                pool.release(conn)

    def _settle(self, job: Job[T], i: int, reply: object, node: str) -> None:
        if isinstance(reply, ReplyError):
            code = reply.code
            if code in ("MOVED", "ASK"):
                self._redirect(job, i, reply, node)
            else:
                kind = "oom" if code == "OOM" else "server"
                job.fault(kind, node, 1, reply.message)
        elif isinstance(reply, Oversize):
            job.fault("too_large", node, 1, f"value of {reply.size} bytes exceeds its buffer")
        else:
            job.values[i] = reply  # type: ignore[assignment]

    def _redirect(self, job: Job[T], i: int, reply: ReplyError, node: str) -> None:
        job.fault("server", node, 1, f"unexpected redirect from a standalone server: {reply}")


_ASKING = pack_command(b"ASKING")


def _read_any(conn: RespConnection, i: int, deadline: float) -> object:
    reply = conn.read_reply(deadline)
    if reply is None or isinstance(reply, bytes | ReplyError):
        return reply
    raise _unexpected(conn, reply)


def _read_ok(conn: RespConnection, i: int, deadline: float) -> object:
    reply = conn.read_reply(deadline)
    if reply == "OK":
        return True
    if isinstance(reply, ReplyError):
        return reply
    raise _unexpected(conn, reply)


def _read_flag(conn: RespConnection, i: int, deadline: float) -> object:
    reply = conn.read_reply(deadline)
    if isinstance(reply, int):
        return reply > 0
    if isinstance(reply, ReplyError):
        return reply
    raise _unexpected(conn, reply)


def _unexpected(conn: RespConnection, reply: object) -> RespError:
    conn.close()  # the server is not speaking the protocol we expect: never reuse
    return RespError("protocol", f"{conn.address}: unexpected reply {reply!r:.60}")


def open_connector(
    url: RedisURL | str,
    options: ConnectOptions,
    pool_size: int = 4,
    backoff: Backoff | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RedisConnector:
    """The connector for ``url``: cluster or standalone. The URL's TLS, credentials and db
    fill the options left unset. Connects lazily (never raises for a server that is down);
    raises ConfigError for a malformed URL."""
    from kvruntime.store.redis_cluster import RedisClusterConnector  # it subclasses ours

    parsed = RedisURL.parse(url) if isinstance(url, str) else url
    options = replace(
        options,
        ssl_context=options.ssl_context or parsed.ssl_context(),
        username=options.username or parsed.username,
        password=options.password if options.password is not None else parsed.password,
        db=options.db or parsed.db,
    )
    kind = RedisClusterConnector if parsed.cluster else RedisConnector
    return kind(parsed, options, pool_size, backoff, clock)
