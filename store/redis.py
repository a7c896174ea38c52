"""Redis connector: moves opaque values by key, batched and pipelined; standalone or cluster.

It knows nothing of pages, namespaces or TTL policy (the tier's job) and never raises for a
server problem: every call returns an ``Outcome`` whose ``values`` hold one entry per key
(a miss / False where the key could not be served) and whose ``faults`` say what went wrong,
by kind and node. Bad arguments (buffer count differs from key count, a read-only buffer)
raise BadRequest.

URLs (``RedisURL.parse``)::

    redis://[[user]:password@]host[:port][/db]      plain TCP, default port 6379, db 0
    rediss://...                                    TLS (``?ssl_cert_reqs=none`` skips
                                                    verification, ``?ssl_ca_certs=path``)
    unix://[[user]:password@]/path/redis.sock[?db=N]
    redis+cluster://host:port,host:port,...          Redis Cluster (seed nodes; also
    redis://host:port,...?cluster=true               rediss+cluster:// for TLS)

Cluster: a key's slot is CRC16(key) mod 16384, hashing only the part inside the first
``{...}`` when present. The slot map comes from CLUSTER SLOTS on first use and again after
MOVED replies or connection failures (throttled); a batch is grouped by node, each node's
share is pipelined on its own thread, MOVED/ASK redirects are followed a few times.
"""

from __future__ import annotations

import binascii
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Generic, NamedTuple, TypeVar
from urllib.parse import parse_qsl, unquote

from kvruntime.errors import BadRequest, ConfigError
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
SLOTS = 16384
_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_QUERY = ("cluster", "db", "ssl_cert_reqs", "ssl_ca_certs")
_TRUE = ("1", "true", "yes", "on")
# Connection problems that say the server itself is in trouble (the pool backs off).
_SERVER_DOWN = frozenset({"closed", "timeout", "tls", "protocol"})


@dataclass(frozen=True)
class RedisURL:
    addresses: tuple[Address, ...]
    tls: bool = False
    cluster: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls_verify: bool = True
    tls_ca_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """Parse one of the forms in the module docstring; raises ConfigError saying why."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in _SCHEMES:
            raise ConfigError(f"redis URL {url!r}: scheme must be one of {', '.join(_SCHEMES)}")
        rest, _, query_text = rest.partition("?")
        query = dict(parse_qsl(query_text, keep_blank_values=True))
        unknown = sorted(set(query) - set(_QUERY))
        if unknown:
            raise ConfigError(f"redis URL: unknown parameter(s) {unknown}; known: {_QUERY}")
        userinfo, at, rest = rest.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else unquote(user)
            username = username if colon else None
        db_text = query.get("db", "")
        if scheme == "unix":
            if not rest.startswith("/"):
                raise ConfigError(f"redis URL {cls._redact(url)!r}: unix:// needs an absolute path")
            addresses: tuple[Address, ...] = (Address("", 0, unquote(rest)),)
        else:
            hosts, _, path = rest.partition("/")
            db_text = path or db_text
            addresses = tuple(cls._host(h, url) for h in hosts.split(","))
        try:
            db = int(db_text or 0)
        except ValueError:
            raise ConfigError(f"redis URL: db must be an integer, got {db_text!r}") from None
        cluster = scheme.endswith("+cluster") or query.get("cluster", "").lower() in _TRUE
        if len(addresses) > 1 and not cluster:
            raise ConfigError("redis URL: several hosts need cluster mode (redis+cluster://)")
        if cluster and (db or scheme == "unix"):
            raise ConfigError("redis URL: cluster mode supports only TCP and db 0")
        reqs = query.get("ssl_cert_reqs", "required").lower()
        if reqs not in ("none", "optional", "required"):
            raise ConfigError(f"redis URL: ssl_cert_reqs must be none|optional|required: {reqs!r}")
        return cls(
            addresses=addresses,
            tls=scheme.startswith("rediss"),
            cluster=cluster,
            db=db,
            username=username,
            password=password,
            tls_verify=reqs != "none",
            tls_ca_file=query.get("ssl_ca_certs") or None,
        )

    @staticmethod
    def _host(text: str, url: str) -> Address:
        if text.startswith("["):  # [ipv6]:port
            host, _, port = text[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
        try:
            number = int(port) if port else 6379
        except ValueError:
            raise ConfigError(f"redis URL {RedisURL._redact(url)!r}: bad port {port!r}") from None
        if not host or not 0 < number < 65536:
            raise ConfigError(f"redis URL {RedisURL._redact(url)!r}: bad host/port {text!r}")
        return Address(host, number)

    @staticmethod
    def _redact(url: str) -> str:
        head, at, tail = url.rpartition("@")
        return url if not at else head.split("://")[0] + "://***@" + tail

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca_file)
        if not self.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def __str__(self) -> str:
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        auth = "***@" if self.password is not None else ""
        return f"{scheme}://{auth}{','.join(map(str, self.addresses))}/{self.db}"


def key_slot(key: bytes) -> int:
    """Redis Cluster slot: CRC16-XMODEM (= binascii.crc_hqx from 0) of the hash tag or key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


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
class _Job(Generic[T]):
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
        self, job: _Job[T], keys: Sequence[bytes], todo: list[int]
    ) -> dict[Address, list[int]]:
        return {self.url.addresses[0]: todo}

    def _after_round(self, job: _Job[T]) -> None:
        """Cluster hook: learn from redirects and connection failures."""

    def _run_groups(self, job: _Job[T], groups: dict[Address, list[int]]) -> None:
        for address, idxs in groups.items():
            self._run_group(job, address, idxs, set())

    def _execute(
        self, keys: Sequence[bytes], parts: Parts, read: Reader, default: T, deadline: float
    ) -> Outcome[T]:
        job: _Job[T] = _Job([default] * len(keys), parts, read, deadline)
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

    def _run_group(self, job: _Job[T], address: Address, idxs: list[int], asking: set[int]) -> None:
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
                if exc.kind in _SERVER_DOWN:
                    pool.failed()
                return
            finally:
                pool.release(conn)

    def _settle(self, job: _Job[T], i: int, reply: object, node: str) -> None:
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

    def _redirect(self, job: _Job[T], i: int, reply: ReplyError, node: str) -> None:
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


class RedisClusterConnector(RedisConnector):
    """Redis Cluster: routes each key to its slot's master, one pipeline per node."""

    refresh_interval_s = 0.5  # at most one slot-map refresh per interval (injected clock)

    def __init__(
        self,
        url: RedisURL,
        options: ConnectOptions,
        pool_size: int = 4,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(url, options, pool_size, backoff, clock)
        self._slots: list[Address | None] | None = None
        self._stale = True
        self._refreshed_at = float("-inf")
        self._refresh_error = RespError("route", "slot map not loaded yet")
        self._map_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kvr-redis")

    def slot_owner(self, key: bytes) -> Address | None:
        """The node the current slot map sends ``key`` to (None before discovery)."""
        slots = self._slots
        return None if slots is None else slots[key_slot(key)]

    def close(self) -> None:
        super().close()
        self._executor.shutdown(wait=True)

    def _route(
        self, job: _Job[T], keys: Sequence[bytes], todo: list[int]
    ) -> dict[Address, list[int]]:
        refresh = self._stale and self.clock() - self._refreshed_at >= self.refresh_interval_s
        if refresh:
            self._refresh(job.deadline)
        slots = self._slots
        groups: dict[Address, list[int]] = {}
        job.asking.clear()
        unrouted = 0
        for i in todo:
            target = job.redirects.get(i)
            if target is not None and target[1]:  # ASK: this key only, to that node
                groups.setdefault(target[0], []).append(i)
                job.asking.setdefault(target[0], set()).add(i)
                continue
            owner = slots[key_slot(keys[i])] if slots is not None else None
            if owner is None:
                unrouted += 1
            else:
                groups.setdefault(owner, []).append(i)
        job.redirects.clear()
        if unrouted:
            self._stale = True
            if slots is None:  # discovery failed (now: why; throttled since: "down")
                err = self._refresh_error
                kind = err.kind if refresh else "down"
                job.fault(kind, "-", unrouted, f"cluster slot discovery: {err.detail}")
            else:
                job.fault("route", "-", unrouted, "no node serves the slot in the slot map")
        return groups

    def _run_groups(self, job: _Job[T], groups: dict[Address, list[int]]) -> None:
        asking = job.asking
        items = list(groups.items())
        if len(items) == 1:
            self._run_group(job, items[0][0], items[0][1], asking.get(items[0][0], set()))
            return
        futures = [
            self._executor.submit(self._run_group, job, a, idxs, asking.get(a, set()))
            for a, idxs in items
        ]
        for future in futures:
            future.result()

    def _redirect(self, job: _Job[T], i: int, reply: ReplyError, node: str) -> None:
        parts = reply.message.split(" ")
        try:
            slot, host, port = int(parts[1]), *parts[2].rsplit(":", 1)
            target = Address(host or self.url.addresses[0].host, int(port))
        except (IndexError, ValueError):
            job.fault("protocol", node, 1, f"bad redirect {reply.message!r}")
            return
        ask = reply.code == "ASK"
        with job.lock:
            job.redirects[i] = (target, ask)
            if not ask:
                job.moved[slot] = target

    def _after_round(self, job: _Job[T]) -> None:
        if job.moved:
            with self._map_lock:
                if self._slots is not None:
                    for slot, owner in job.moved.items():
                        self._slots[slot] = owner
            job.moved.clear()
            self._stale = True
        if any(k in _SERVER_DOWN or k == "connect" for k, _ in job.faults):
            self._stale = True  # a failover may have moved slots

    def _refresh(self, deadline: float) -> None:
        with self._map_lock:
            self._refreshed_at = self.clock()
            known = {a for a in (self._slots or ()) if a is not None}
            candidates = list(self.url.addresses) + sorted(known - set(self.url.addresses))
        for address in candidates:
            pool = self._pool(address)
            try:
                conn = pool.acquire(deadline).conn
            except RespError as exc:
                self._refresh_error = exc
                continue
            try:
                conn.send([pack_command(b"CLUSTER", b"SLOTS")], deadline)
                reply = conn.read_reply(deadline)
            except RespError as exc:
                self._refresh_error = exc
                if exc.kind in _SERVER_DOWN:
                    pool.failed()
                continue
            finally:
                pool.release(conn)
            slots = self._parse_slots(reply, address)
            if slots is None:
                self._refresh_error = RespError("route", f"{address}: CLUSTER SLOTS: {reply!r:.80}")
                continue
            with self._map_lock:
                self._slots = slots
                self._stale = False
            return

    @staticmethod
    def _parse_slots(reply: object, asked: Address) -> list[Address | None] | None:
        if not isinstance(reply, list):
            return None
        slots: list[Address | None] = [None] * SLOTS
        try:
            for entry in reply:
                start, end, master = entry[0], entry[1], entry[2]
                host = master[0].decode() or asked.host
                owner = Address(host, int(master[1]))
                for slot in range(int(start), int(end) + 1):
                    slots[slot] = owner
        except (TypeError, IndexError, ValueError, AttributeError):
            return None
        return slots


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
