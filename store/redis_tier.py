"""Redis tier: pages as opaque values under a namespace, with TTL, counters and the rule that
a Redis problem is a miss, never an exception.

One value per page (the wire format's header + payload); the tier neither parses nor checks
it. A server that is down, slow or full turns into misses / failed puts, a rate-limited
warning and counters; every call ends by ``batch_deadline_s``. After connection failures the
tier stops dialling for a backoff period (``Backoff``, injected clock) and recovers by itself
once the server answers again.

Socket timeouts and batch deadlines use real time (``time.monotonic``); the injected
``clock`` drives only backoff and warning rate limits, so tests can step it exactly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple, TypeVar

from kvruntime.errors import BadRequest, ConfigError
from kvruntime.store.redis import Fault, Outcome, open_connector
from kvruntime.store.redis_url import RedisURL
from kvruntime.store.resp import ConnectOptions
from kvruntime.store.retry import Backoff

log = logging.getLogger(__name__)
T = TypeVar("T")
# faults that mean the server could not be talked to (not a refusal such as oom)
_LOST = frozenset({"connect", "down", "closed", "timeout", "tls", "protocol"})


@dataclass(frozen=True)
class RedisTierConfig:
    url: str  # see kvruntime.store.redis_url for the accepted forms
    namespace: str = "kvr"  # key prefix "namespace:key"; "" = none
    ttl_s: float | None = None  # None: keys live until Redis evicts them
    pool_size: int = 4  # connections per server
    connect_timeout_s: float = 1.0
    op_timeout_s: float = 2.0  # longest wait for one send/recv
    batch_deadline_s: float = 10.0  # a whole call returns by then
    max_value_bytes: int = 512 * 2**20  # Redis' default proto-max-bulk-len
    backoff: Backoff = field(default_factory=Backoff)
    warn_interval_s: float = 30.0  # at most one warning per error kind per interval
    socket_buffer_bytes: int | None = None  # SO_SNDBUF/SO_RCVBUF; None keeps autotuning

    def __post_init__(self) -> None:
        self.parsed_url  # noqa: B018 - parse now so a bad URL fails at construction
        positive = ("pool_size", "connect_timeout_s", "op_timeout_s", "batch_deadline_s")
        for name in (*positive, "max_value_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"RedisTierConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ConfigError(f"RedisTierConfig.ttl_s must be positive or None, got {self.ttl_s}")
        if self.warn_interval_s < 0:
            raise ConfigError("RedisTierConfig.warn_interval_s must be >= 0")

    @cached_property
    def parsed_url(self) -> RedisURL:
        return RedisURL.parse(self.url)

    @property
    def ttl_ms(self) -> int | None:
        return None if self.ttl_s is None else max(1, round(self.ttl_s * 1000))

    @property
    def prefix(self) -> bytes:
        return f"{self.namespace}:".encode() if self.namespace else b""


class RedisTierStats(NamedTuple):
    hits: int  # keys read (get_into / get_many)
    misses: int  # keys not read: absent, expired, too large, or failed
    puts: int  # values stored
    failed_puts: int  # values not stored (server error, too large, connection trouble)
    bytes_in: int  # value bytes read from Redis
    bytes_out: int  # value bytes stored in Redis
    errors: dict[str, int]  # keys affected, by fault kind (see kvruntime.store.redis.Fault)


class RedisTier:
    """A namespace of pages in Redis (standalone or cluster). Thread-safe.

    Public calls never raise for a server problem; they raise BadRequest only for bad
    arguments (wrong types, mismatched lengths, unusable buffers).
    """

    def __init__(self, config: RedisTierConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        options = ConnectOptions(
            connect_timeout_s=config.connect_timeout_s,
            op_timeout_s=config.op_timeout_s,
            socket_buffer_bytes=config.socket_buffer_bytes,
        )
        self._connector = open_connector(
            config.parsed_url, options, config.pool_size, config.backoff, clock
        )
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._warned_at: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._closed = False
        self._lost = False  # the last call could not reach (every) server
        self._dead_seen = 0
        self._recoveries = 0

    def put_many(self, items: Sequence[tuple[str, object]]) -> int:
        """Store each (key, value) pair (value: any contiguous bytes-like: bytes, bytearray,
        memoryview, numpy array); overwrites existing keys and sets the TTL. Returns how many
        were stored. The values must stay unchanged until the call returns."""
        limit = self.config.max_value_bytes
        keys, values, big = [], [], 0
        for key, value in items:
            size = _nbytes(value)
            if size > limit:
                big += 1
                continue
            keys.append(self._key(key))
            values.append(value)
        if big:
            self._fault(Fault("too_large", "-", big, f"value above max_value_bytes={limit}"))
        outcome = self._call(
            lambda d: self._connector.set_many(keys, values, self.config.ttl_ms, d), keys, False
        )
        stored = sum(outcome.values)
        written = sum(_nbytes(v) for v, ok in zip(values, outcome.values, strict=True) if ok)
        self._count(puts=stored, failed_puts=len(items) - stored, bytes_out=written)
        return stored

    def get_into(self, keys: Sequence[str], buffers: Sequence[object]) -> list[int | None]:
        """Read each key's value into its buffer (writable, contiguous: bytearray, memoryview,
        numpy array, a uint8 tensor's ``.numpy()``); returns bytes written per key or None
        for a miss. A value larger than its buffer is a miss; so is a key whose reply broke
        off, even if part of its buffer was overwritten. Buffers of misses hold garbage."""
        if len(buffers) != len(keys):
            raise BadRequest(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        raw = [self._key(k) for k in keys]
        outcome = self._call(lambda d: self._connector.get_into(raw, buffers, d), raw, None)
        return self._count_reads(outcome.values, sum(v for v in outcome.values if v is not None))

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` as bytes (None = miss). Simple path: copies each value."""
        raw = [self._key(k) for k in keys]
        outcome = self._call(lambda d: self._connector.get_many(raw, d), raw, None)
        return self._count_reads(outcome.values, sum(len(v) for v in outcome.values if v))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is present now (an unreachable server answers False)."""
        raw = [self._key(k) for k in keys]
        return self._call(lambda d: self._connector.exists_many(raw, d), raw, False).values

    def leading_hits(self, keys: Sequence[str]) -> int:
        """How many keys, from the first, are all present (a chained prefix's usable part)."""
        count = 0
        for present in self.exists_many(keys):
            if not present:
                break
            count += 1
        return count

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove keys; returns how many existed. Failures count as not deleted."""
        raw = [self._key(k) for k in keys]
        return sum(self._call(lambda d: self._connector.delete_many(raw, d), raw, False).values)

    @property
    def recoveries(self) -> int:
        """How many times the tier reached its server(s) again after losing them: a call that
        met connection faults followed by one that met none, or pooled connections found dead
        (a restart between two calls). Values stored before a recovery may be gone (a
        restarted server can come back empty): callers re-check what they recorded."""
        return self._recoveries

    def stats(self) -> RedisTierStats:
        with self._lock:
            c = self._counts
            return RedisTierStats(
                c["hits"], c["misses"], c["puts"], c["failed_puts"],
                c["bytes_in"], c["bytes_out"], dict(self._errors),
            )  # fmt: skip

    def close(self) -> None:
        """Close connections. Idempotent; later calls return misses (error kind ``closed``)."""
        self._closed = True
        self._connector.close()

    # -- internals ------------------------------------------------------------------------
    def _key(self, key: str) -> bytes:
        if not isinstance(key, str):
            raise BadRequest(f"RedisTier keys are str, got {type(key).__name__}")
        return self.config.prefix + key.encode()

    def _call(
        self, op: Callable[[float], Outcome[T]], keys: Sequence[bytes], default: T
    ) -> Outcome[T]:
        if not keys:
            return Outcome([])
        if self._closed:
            outcome: Outcome[T] = Outcome(
                [default] * len(keys), (Fault("closed", "-", len(keys), "tier closed"),)
            )
        else:
            try:
                outcome = op(time.monotonic() + self.config.batch_deadline_s)
            except BadRequest:
                raise
            except Exception as exc:  # a bug must not take the caller down with Redis
                log.exception("redis tier: unexpected error")
                outcome = Outcome(
                    [default] * len(keys), (Fault("internal", "-", len(keys), repr(exc)),)
                )
        for fault in outcome.faults:
            self._fault(fault)
        self._note_health(any(f.kind in _LOST for f in outcome.faults))
        return outcome

    def _note_health(self, lost: bool) -> None:
        dead = self._connector.dead_connections
        with self._lock:
            dropped, self._dead_seen = dead != self._dead_seen, dead
            if lost:
                self._lost = True
            elif self._lost or dropped:
                self._lost = False
                self._recoveries += 1

    def _count_reads(self, values: list[T], nbytes: int) -> list[T]:
        hits = sum(v is not None for v in values)
        self._count(hits=hits, misses=len(values) - hits, bytes_in=nbytes)
        return values

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._counts.update(deltas)

    def _fault(self, fault: Fault) -> None:
        now = self._clock()
        with self._lock:
            self._errors[fault.kind] += fault.keys
            last = self._warned_at.get(fault.kind)
            if last is not None and now - last < self.config.warn_interval_s:
                self._suppressed[fault.kind] += 1
                return
            self._warned_at[fault.kind] = now
            suppressed = self._suppressed.pop(fault.kind, 0)
        log.warning(
            "redis tier %s: %s on %s, %d key(s): %s%s",
            self.config.parsed_url, fault.kind, fault.node, fault.keys, fault.detail,
            f" ({suppressed} similar warnings suppressed)" if suppressed else "",
        )  # fmt: skip


def _nbytes(value: object) -> int:
    try:
        return memoryview(value).nbytes  # type: ignore[arg-type]
    except TypeError:
        raise BadRequest(f"value of type {type(value).__name__} is not bytes-like") from None
