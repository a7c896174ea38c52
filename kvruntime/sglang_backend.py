"""kvruntime as an SGLang HiCache storage backend (L3): SGLang's pages in kvruntime's Redis tier.

SGLang loads it by configuration (docs/sglang.md)::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
    '{"backend_name": "kvruntime", "module_path": "kvruntime.sglang_backend",
      "class_name": "KVRuntimeHiCacheStorage", "interface_v1": 1,
      "redis_url": "redis://10.0.0.5:6379/0", "codec": "int8"}'

Every page is one Redis value in kvruntime's wire format (header with codec, shape and an
xxh3 checksum, then the payload) under a kvruntime storage key derived from SGLang's page
hash within a namespace of (model, page geometry and dtype, parallel shard, tenant), so
ranks, models and layouts never read each other's pages. Page formats and their moves live
in ``kvruntime.sglang_layout``. Redis faults and corrupt values are misses / failed writes,
never exceptions. This module imports SGLang; ``import kvruntime`` does not.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

from kvruntime.errors import BadRequest, ConfigError, CorruptPage
from kvruntime.radix.hashing import HASH_BYTES, Namespace, storage_key
from kvruntime.sglang_layout import (
    Buffer,
    DecodedPages,
    HostPageFormat,
    RawPageFormat,
    page_starts,
)
from kvruntime.store.codec import get_codec
from kvruntime.store.redis_tier import RedisTier, RedisTierConfig, RedisTierStats

try:
    from sglang.srt.mem_cache.hicache_storage import (
        HiCacheStorage,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvruntime.sglang_backend needs SGLang: pip install 'kvruntime[sglang]' (docs/sglang.md)"
    ) from exc

log = logging.getLogger(__name__)
# extra-config keys that SGLang itself reads; the rest configure this backend
SGLANG_KEYS = frozenset(
    {
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "tp_lcm_size",
        "file_storage_path",
    }
)
_KEY_PERSON = b"kvr-sglang-v1"
Format = HostPageFormat | RawPageFormat


@dataclass(frozen=True)
class SGLangStorageConfig:
    """The backend's options, read from SGLang's extra-config JSON (same names)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    codec: str = "none"  # applied to MHA pages; "int8" halves bf16 pages
    namespace: str = "kvr"  # Redis key prefix
    tenant: str = "default"  # instances share pages only within one tenant
    model: str | None = None  # replaces SGLang's model name in keys (same weights, other name)
    ttl_s: float | None = None  # None: pages live until Redis evicts them
    skip_existing: bool = True  # writes store only the pages Redis lacks
    pool_size: int = 4
    connect_timeout_s: float = 1.0
    op_timeout_s: float = 2.0
    batch_deadline_s: float = 5.0

    def __post_init__(self) -> None:
        get_codec(self.codec)  # UnknownName lists the codecs
        if not isinstance(self.skip_existing, bool):  # JSON "false" would be truthy
            raise ConfigError(f"skip_existing must be true or false, got {self.skip_existing!r}")
        if not self.tenant or (self.model is not None and not self.model):
            raise ConfigError("SGLangStorageConfig.tenant and .model must not be empty")
        self.tier_config  # noqa: B018 - RedisTierConfig checks URL, TTL and timeouts now

    @property
    def tier_config(self) -> RedisTierConfig:
        return RedisTierConfig(
            url=self.redis_url, namespace=self.namespace, ttl_s=self.ttl_s,
            pool_size=self.pool_size, connect_timeout_s=self.connect_timeout_s,
            op_timeout_s=self.op_timeout_s, batch_deadline_s=self.batch_deadline_s,
        )  # fmt: skip

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> SGLangStorageConfig:
        """Options from the extra-config dict. SGLang's own keys are skipped; unknown keys
        are logged, not refused (SGLang adds keys of its own); bad values raise ConfigError."""
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known - SGLANG_KEYS)
        if unknown:
            log.warning("kvruntime HiCache backend ignores unknown extra-config keys %s", unknown)
        try:
            return cls(**{k: v for k, v in extra.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"bad kvruntime extra-config: {exc}") from None


class SGLangStorageStats(NamedTuple):
    hits: int  # pages delivered to SGLang
    misses: int  # pages asked for and not delivered (absent, corrupt, Redis trouble)
    corrupt: int  # values that failed verification (also counted as misses)
    puts: int  # pages stored
    skipped: int  # pages not written because Redis held them already
    failed_puts: int  # pages not stored
    bytes_in: int  # wire bytes of delivered pages
    bytes_out: int  # wire bytes stored
    redis: RedisTierStats


class TransferWindow(NamedTuple):
    """Per-call figures since the last ``get_stats()``: SGLang's ``StorageMetrics`` fields."""

    prefetch_pgs: list[int]
    backup_pgs: list[int]
    prefetch_bandwidth: list[float]  # GiB/s of host pages
    backup_bandwidth: list[float]


class KVRuntimeHiCacheStorage(HiCacheStorage):
    """SGLang's storage interface over one kvruntime Redis tier. Thread-safe.

    Constructed as SGLang's ``dynamic`` loader does, ``cls(storage_config, kwargs)``: options
    come from ``storage_config.extra_config``, overridden by ``kwargs``. SGLang then calls
    ``register_mem_pool_host``, which fixes the page format and key namespace; before that
    values are stored raw under an "unregistered" namespace and the v1 paths miss.
    """

    def __init__(
        self,
        storage_config: HiCacheStorageConfig | None = None,
        kwargs: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self.config = SGLangStorageConfig.from_extra_config({**extra, **(kwargs or {})})
        self.storage_config = storage_config
        self.codec = get_codec(self.config.codec)
        self.tier = RedisTier(self.config.tier_config, clock)
        self.mem_pool_host: Any = None
        self._model = self.config.model or getattr(storage_config, "model_name", None) or "unknown"
        self._shard = shard_text(storage_config)
        self._metrics = bool(getattr(storage_config, "enable_storage_metrics", False))
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._window = TransferWindow([], [], [], [])
        self._use(RawPageFormat("unregistered"))

    # -- SGLang's interface ---------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Adopt SGLang's host pool. Raises BadRequest when the configured codec cannot
        encode this pool's pages (SGLang then fails to attach the backend)."""
        super().register_mem_pool_host(mem_pool_host)
        fmt = HostPageFormat.of_pool(mem_pool_host, self.codec.name)
        if fmt is None and not self.codec.lossless:
            log.warning("kvruntime HiCache backend: %s pages are stored raw, without codec %s",
                        type(mem_pool_host).__name__, self.codec.name)  # fmt: skip
        self._use(fmt or RawPageFormat.of_pool(mem_pool_host))

    def exists(self, key: str) -> bool:
        return self.tier.exists_many([self._key(key)])[0]

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many of ``keys``, from the first, are stored (SGLang's chained prefix)."""
        return self.tier.leading_hits([self._key(k) for k in keys])

    def get(
        self, key: str, target_location: Any = None, target_sizes: Any = None
    ) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        """Pages as flat tensors in the host pool's order, written into ``target_locations``
        (SGLang passes dummy flat pages) when given; None for a miss."""
        fmt, started = self._format, time.perf_counter()
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        if len(targets) != len(keys):
            raise BadRequest(f"batch_get: {len(keys)} keys but {len(targets)} targets")
        values = self._read(keys, fmt)
        out: list[torch.Tensor | None] = [None] * len(keys)
        if isinstance(fmt, HostPageFormat):
            decoded = self._decode(keys, values, fmt)
            for j, i in enumerate(decoded.hits):
                target = targets[i]
                if target is None:
                    target = torch.empty(fmt.flat_numel, dtype=fmt.dtype)  # [numel] flat page
                fmt.flat_view(target).copy_(decoded.pages[j])
                out[i] = target
        else:
            for i, value in enumerate(values):
                out[i] = self._decode_raw(keys[i], value, fmt, targets[i])
        self._count_reads(values, [i for i, v in enumerate(out) if v is not None], started)
        return out

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        return value is not None and self.batch_set([key], [value])

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:  # fmt: skip
        """Store flat pages (the host pool's ``get_data_page``); True when all are stored.
        A tensor that is not a page of the registered pool is refused (False)."""
        fmt, values = self._format, list(values or [])
        if len(values) != len(keys) or not all(isinstance(v, torch.Tensor) for v in values):
            raise BadRequest(f"batch_set: {len(keys)} keys need as many tensors")
        for v in values:
            if not fmt.fits(v):
                log.warning("batch_set: %s %s is not a page of %s", tuple(v.shape), v.dtype, fmt)
                return False

        def encode(todo: list[int]) -> list[bytearray]:
            if isinstance(fmt, HostPageFormat):
                flats = [fmt.flat_view(values[i].contiguous()) for i in todo]
                return fmt.encode(torch.stack(flats))  # [n, L, 2, H, P, D]
            return [fmt.encode(values[i]) for i in todo]

        return all(self._write(keys, encode))

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Load pages straight into the registered host pool at ``host_indices`` (token
        slots, page after page); per key whether its page was loaded."""
        pool, fmt, started = self.mem_pool_host, self._format, time.perf_counter()
        if pool is None:
            log.warning("batch_get_v1 before register_mem_pool_host: all misses")
            return [False] * len(keys)
        starts = page_starts(host_indices, len(keys), pool.page_size)
        values = self._read(keys, fmt)
        hits: list[int] = []
        if isinstance(fmt, HostPageFormat):
            decoded = self._decode(keys, values, fmt)
            hits = decoded.hits
            if hits:
                fmt.scatter(pool.kv_buffer, [starts[i] for i in hits], decoded.pages)
        else:
            for i, value in enumerate(values):
                page = self._decode_raw(keys[i], value, fmt, None)
                if page is not None:
                    pool.set_from_flat_data_page(starts[i], page)
                    hits.append(i)
        self._count_reads(values, hits, started)
        found = set(hits)
        return [i in found for i in range(len(keys))]

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Store the host pool's pages at ``host_indices``; per key whether it is stored."""
        pool, fmt = self.mem_pool_host, self._format
        if pool is None:
            log.warning("batch_set_v1 before register_mem_pool_host: nothing stored")
            return [False] * len(keys)
        starts = page_starts(host_indices, len(keys), pool.page_size)

        def encode(todo: list[int]) -> list[bytearray]:
            if isinstance(fmt, HostPageFormat):
                return fmt.encode(fmt.gather(pool.kv_buffer, [starts[i] for i in todo]))
            return [fmt.encode(pool.get_data_page(starts[i], flat=True)) for i in todo]

        return self._write(keys, encode)

    def clear(self) -> None:
        """Deletes nothing: the pages are shared with every instance using this Redis.
        Bound them with ``ttl_s`` or Redis' own eviction (maxmemory-policy) instead."""
        log.warning("kvruntime HiCache backend: clear() keeps the shared Redis pages")

    def get_stats(self) -> Any:
        """Figures since the last call, as SGLang's ``StorageMetrics`` when SGLang's metrics
        module is loaded (a server with storage metrics on), else as a TransferWindow."""
        with self._lock:
            window, self._window = self._window, TransferWindow([], [], [], [])
        module = sys.modules.get("sglang.srt.observability.metrics_collector")
        metrics_cls = getattr(module, "StorageMetrics", None)
        return window if metrics_cls is None else metrics_cls(**window._asdict())

    def close(self) -> None:
        self.tier.close()

    # -- kvruntime's side -----------------------------------------------------------------
    def stats(self) -> SGLangStorageStats:
        """Counters since construction (kvruntime's view: pages, bytes, Redis faults)."""
        with self._lock:
            c = self._counts
            return SGLangStorageStats(
                c["hits"], c["misses"], c["corrupt"], c["puts"], c["skipped"],
                c["failed_puts"], c["bytes_in"], c["bytes_out"], self.tier.stats(),
            )  # fmt: skip

    @property
    def namespace(self) -> Namespace:
        return self._namespace

    def storage_key(self, key: str) -> str:
        """The Redis key (without the tier's prefix) of SGLang's page hash ``key``."""
        return self._key(key)

    # -- internals ------------------------------------------------------------------------
    def _use(self, fmt: Format) -> None:
        self._namespace = Namespace(
            model=str(self._model), layout=f"{fmt.describe()}|{self._shard}",
            tenant=self.config.tenant,
        )  # fmt: skip
        self._format = fmt
        log.info("kvruntime HiCache backend: %s, codec %s", self._namespace, fmt.codec)

    def _key(self, key: str) -> str:
        if not isinstance(key, str):
            raise BadRequest(f"page keys are str, got {type(key).__name__}")
        ns, codec = self._namespace, self._format.codec
        digest = hashlib.blake2b(
            key.encode(), digest_size=HASH_BYTES, key=ns.digest, person=_KEY_PERSON
        ).digest()
        # with a lossy codec configured, pages may be computed on lossily restored KV: they
        # are approximate whatever their own codec (DESIGN.md, lineage)
        return storage_key(digest, codec, exact=self.codec.lossless, prefix="sglang")

    def _read(self, keys: Sequence[str], fmt: Format) -> list[Buffer | None]:
        """Wire values of ``keys`` (None = miss), landed in one preallocated buffer."""
        raw = [self._key(k) for k in keys]
        bound = fmt.value_bound
        if bound is None:  # unregistered: sizes unknown, take copies
            return list(self.tier.get_many(raw))
        landing = torch.empty((len(keys), bound), dtype=torch.uint8)  # [n, bound] wire values
        views = [landing[i].numpy().data for i in range(len(keys))]
        sizes = self.tier.get_into(raw, views)
        return [None if s is None else views[i][:s] for i, s in enumerate(sizes)]

    def _decode(
        self, keys: Sequence[str], values: Sequence[Buffer | None], fmt: HostPageFormat
    ) -> DecodedPages:
        decoded = fmt.decode(values)
        for i, reason in decoded.rejected:
            self._corrupt(keys[i], reason)
        return decoded

    def _decode_raw(
        self, key: str, value: Buffer | None, fmt: RawPageFormat, target: torch.Tensor | None
    ) -> torch.Tensor | None:
        if value is None:
            return None
        try:
            return fmt.decode(value, target)
        except CorruptPage as exc:
            self._corrupt(key, str(exc))
            return None

    def _write(
        self, keys: Sequence[str], encode: Callable[[list[int]], list[bytearray]]
    ) -> list[bool]:
        """Store the pages of ``keys`` that Redis lacks (all of them with skip_existing
        off); ``encode`` makes the wire values of positions. A batch is stored whole or
        reported failed whole, since the tier reports a count."""
        started = time.perf_counter()
        raw = [self._key(k) for k in keys]
        done = self.tier.exists_many(raw) if self.config.skip_existing else [False] * len(raw)
        todo = [i for i, present in enumerate(done) if not present]
        stored = written = 0
        if todo:
            values = encode(todo)
            stored = self.tier.put_many([(raw[i], v) for i, v in zip(todo, values, strict=True)])
            if stored == len(todo):
                written = sum(len(v) for v in values)
                for i in todo:
                    done[i] = True
        self._count(puts=stored, skipped=len(keys) - len(todo),
                    failed_puts=len(todo) - stored, bytes_out=written)  # fmt: skip
        if self._metrics and stored:
            self._record("backup", stored, started)
        return done

    def _count_reads(
        self, values: Sequence[Buffer | None], hits: list[int], started: float
    ) -> None:
        nbytes = sum(len(memoryview(values[i] or b"")) for i in hits)
        self._count(hits=len(hits), misses=len(values) - len(hits), bytes_in=nbytes)
        if self._metrics:
            self._record("prefetch", len(hits), started)

    def _record(self, kind: str, n: int, started: float) -> None:
        """One call's pages and GiB/s of host pages into the window (kind: prefetch|backup)."""
        page_bytes = self._format.value_nbytes or 0
        elapsed = max(time.perf_counter() - started, 1e-9)
        with self._lock:
            getattr(self._window, f"{kind}_pgs").append(n)
            getattr(self._window, f"{kind}_bandwidth").append(n * page_bytes / elapsed / 2**30)

    def _corrupt(self, key: str, reason: str) -> None:
        self._count(corrupt=1)
        log.warning("kvruntime HiCache backend: page %s rejected, a miss: %s", key, reason)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._counts.update(deltas)


def shard_text(config: HiCacheStorageConfig | None) -> str:
    """Which slice of the model's KV a rank holds: TP rank (MLA KV is the same on every TP
    rank, so all share it), pipeline stage, context-parallel rank."""
    if config is None:
        return "tp0of1"
    parts = ["tp-all" if config.is_mla_model else f"tp{config.tp_rank}of{config.tp_size}"]
    for name, rank, size in (
        ("pp", config.pp_rank, config.pp_size),
        ("cp", config.attn_cp_rank, config.attn_cp_size),
        ("dcp", getattr(config, "dcp_rank", 0), getattr(config, "dcp_size", 1)),
    ):
        if size > 1:
            parts.append(f"{name}{rank}of{size}")
    return "-".join(parts)
