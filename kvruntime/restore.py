"""Restore: the chosen prefix pages, read from their tiers onto the engine's device.

Device pages are gathered from the pool, host pages decoded from the host tier's rows (or,
for a layered restore on CUDA, left in pinned rows for the engine to load layer by layer
beside its forward), Redis pages fetched, verified against their tokens and decoded. A page
that is gone or fails verification shortens the prefix; the rest is recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvruntime.engines.base import KVPrefix
from kvruntime.engines.layered import HostKVPrefix
from kvruntime.errors import CorruptPage
from kvruntime.kernels import gather_pages, rehydrate_pages
from kvruntime.kernels.layout import PageLayout, dtype_name
from kvruntime.lookup import Lookup
from kvruntime.results import TIERS
from kvruntime.store.wire import decode_page
from kvruntime.tiers import Tiers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    pages: torch.Tensor | None  # [n, L, 2, H, P, D] on the engine's device, or None
    num_tokens: int
    tokens_by_tier: dict[str, int]
    bytes_by_tier: dict[str, int]
    seconds: float
    # layered restore: host pages left in the host tier's rows (``pages`` is then None)
    host_prefix: HostKVPrefix | None = None

    @property
    def prefix(self) -> KVPrefix | HostKVPrefix | None:
        """What the engine's ``prefill`` takes as ``past``; None when nothing was restored."""
        if self.host_prefix is not None:
            return self.host_prefix
        return KVPrefix(self.pages, self.num_tokens) if self.pages is not None else None


class Restorer:
    """Reads a ``Lookup``'s pages (``KVCache.restore``). The tiers' lock is held while device
    and host pages are read; Redis is read outside it."""

    def __init__(
        self, tiers: Tiers, layout: PageLayout, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tiers, self.layout, self._clock = tiers, layout, clock
        self.pool, self.host, self.redis = tiers.pool, tiers.host, tiers.redis
        self.host_codec, self.redis_codec = tiers.host_codec, tiers.redis_codec
        self._lock = tiers.lock

    def restore(
        self, found: Lookup, device: torch.device, dtype: torch.dtype, layered: bool = False
    ) -> Restored:
        """Read the chosen pages into one page-first tensor on the engine's device. A Redis
        value that is missing or fails verification shortens the prefix (recomputed).

        Host pages are decoded straight from the host tier's rows (one rehydrate launch; over
        PCIe from pinned rows on CUDA). ``layered`` (the engine takes a ``HostKVPrefix``):
        where ``layered_restore_applies`` (CUDA, pinned host rows, the KV dtype), host pages are
        not read here at all: ``Restored.host_prefix`` names their rows (other pages decoded as
        ``resident``) and the engine loads them layer by layer beside its forward. The turn's
        lock on the prefix keeps those rows in place until ``release``."""
        t0 = self._clock()
        n = found.num_pages
        tokens_by = dict.fromkeys(TIERS, 0)
        bytes_by = dict.fromkeys(TIERS, 0)
        if n == 0:
            return Restored(None, 0, tokens_by, bytes_by, 0.0)
        L = self.layout
        by_tier: dict[str, list[int]] = {t: [] for t in TIERS}
        for i, (tier, _) in enumerate(found.sources):
            by_tier[tier].append(i)
        host = self.host if by_tier["host"] else None
        lazy = (
            layered
            and host is not None
            and layered_restore_applies(device, host.blocks, dtype, L.dtype)
        )
        # rows of ``out`` per page: every page, or (lazy) only those not left in the host tier
        kept = [i for i in range(n) if not (lazy and found.sources[i][0] == "host")]
        row_of = {i: r for r, i in enumerate(kept)}
        # [len(kept), L, 2, H, P, D] in the engine's dtype on its device
        out = torch.empty((len(kept), *L.page_shape), dtype=dtype, device=device)
        good = n
        slots: list[int] = []
        with self._lock:
            if by_tier["device"]:
                idx = by_tier["device"]
                ids = self.pool.ids_tensor([int(found.sources[i][1]) for i in idx])
                tmp = torch.empty(
                    (len(idx), *L.page_shape), dtype=L.dtype, device=self.pool.kv.device
                )
                gather_pages(self.pool.kv, ids, tmp)
                out[[row_of[i] for i in idx]] = tmp.to(device=device, dtype=dtype)
                bytes_by["device"] += len(idx) * L.page_nbytes
            if host is not None:
                idx = by_tier["host"]
                slots = [int(found.sources[i][1]) for i in idx]
                if not lazy:
                    self._read_host(slots, [row_of[i] for i in idx], out)
                bytes_by["host"] += len(idx) * self.host_codec.page_nbytes(L)
        if by_tier["redis"]:
            rows = [row_of[i] for i in by_tier["redis"]]
            good = min(good, self._restore_redis(found, by_tier["redis"], out, bytes_by, rows))
        if good < n:
            found.sources = found.sources[:good]
            found.redis_hashes = found.redis_hashes[: max(0, good - found.match.num_pages)]
        for tier, _ in found.sources:
            tokens_by[tier] += L.page_size
        if found.lossy_from is not None and found.lossy_from >= good:
            found.lossy_from = None
        seconds = self._clock() - t0
        if lazy and good:
            assert host is not None
            marks = iter(slots)
            page_slots = [next(marks) if t == "host" else -1 for t, _ in found.sources]
            resident = out[: sum(1 for s in page_slots if s < 0)] if len(kept) else None
            past = HostKVPrefix(
                host.blocks, page_slots, self.host_codec.name, L.page_size, good * L.page_size,
                resident if resident is not None and resident.shape[0] else None,
            )  # fmt: skip
            return Restored(None, good * L.page_size, tokens_by, bytes_by, seconds, past)
        out = out[:good]
        return Restored(out if good else None, good * L.page_size, tokens_by, bytes_by, seconds)

    def _read_host(self, slots: list[int], rows: list[int], out: torch.Tensor) -> None:
        """Decode host-tier rows ``slots`` into ``out[rows]`` with one rehydrate: on CUDA the
        kernel reads pinned rows over PCIe (no host gather, no staging copy)."""
        assert self.host is not None
        L = self.layout
        blocks = self.host.blocks
        at = torch.as_tensor(slots, dtype=torch.int64)
        if out.is_cuda and not blocks.is_pinned():  # the kernel cannot read pageable rows
            blocks, at = blocks.index_select(0, at).to(out.device), torch.arange(len(slots))
        # [m, L, 2, H, P, D] pages seen layer-first, as the rehydrate writes them
        target = out if out.dtype == L.dtype else torch.empty_like(out, dtype=L.dtype)
        ids = torch.as_tensor(rows, dtype=torch.int64)
        rehydrate_pages(blocks, at, self.host_codec.name, target.permute(1, 2, 0, 3, 4, 5), ids)
        if target is not out:
            out[rows] = target[rows].to(out.dtype)

    def _restore_redis(
        self,
        found: Lookup,
        idx: list[int],
        out: torch.Tensor,
        bytes_by: dict[str, int],
        rows: list[int] | None = None,
    ) -> int:
        """Fetch, verify and decode Redis pages ``idx`` into ``out[rows]`` (default
        ``out[idx]``); returns the first page index that failed (``found.num_pages``: none)."""
        assert self.redis is not None
        L = self.layout
        P = L.page_size
        keys = [str(found.sources[i][1]) for i in idx]
        buf = torch.empty((len(keys), self.tiers.redis_value_bytes), dtype=torch.uint8)
        views = [buf[j].numpy().data for j in range(len(keys))]
        sizes = self.redis.get_into(keys, views)
        blocks = torch.empty((len(keys), self.redis_codec.page_nbytes(L)), dtype=torch.uint8)
        ok = 0
        for j, (i, size) in enumerate(zip(idx, sizes, strict=True)):
            if size is None:
                break
            try:
                payload = decode_page(
                    views[j][:size],
                    codec=self.redis_codec.name,
                    dtype=dtype_name(L.dtype),
                    shape=L.page_shape,
                    layout=L.describe(),
                    tokens=found.tokens[i * P : (i + 1) * P],
                )
            except CorruptPage as exc:
                log.warning("Redis page %s rejected, recomputing: %s", keys[j], exc)
                break
            blocks[j] = torch.frombuffer(payload, dtype=torch.uint8)
            bytes_by["redis"] += size
            ok += 1
        if ok:
            tmp = torch.empty((ok, *L.page_shape), dtype=L.dtype, device=out.device)
            self.redis_codec.decode(blocks[:ok].to(out.device), L, tmp)
            out[(rows if rows is not None else idx)[:ok]] = tmp.to(out.dtype)
        return idx[ok] if ok < len(idx) else found.num_pages


def layered_restore_applies(
    device: torch.device, blocks: torch.Tensor, dtype: torch.dtype, kv_dtype: torch.dtype
) -> bool:
    """Whether host pages should stay in the host tier for the engine to load layer by layer
    (``KVCache.restore(layered=True)``): on CUDA from pinned rows (the rehydrate kernel reads
    them over PCIe while earlier layers compute), into caches of the KV dtype. On the CPU a
    layered load has nothing to overlap with, so pages are decoded up front."""
    return device.type == "cuda" and blocks.is_pinned() and dtype == kv_dtype
