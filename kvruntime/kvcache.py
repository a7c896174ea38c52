"""The runtime's KV cache: the radix index over a device page pool, a host tier and Redis.

One turn calls ``lookup`` (what is cached where, and whether restoring each tier beats
recomputing), ``restore`` (the reusable prefix as pages on the engine's device), then, after
the engine ran, ``commit`` (new and restored pages into the device pool and the index, and
write-back to host and Redis in the background) and ``release``.

Lineage: a page restored from a lossy tier is approximate KV. Such a page is used but not put
back on the device as if it were the exact page, and everything computed on top of it is
inserted as approximate, so an exact lookup never gets it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvruntime.config import RuntimeConfig
from kvruntime.cost import CostModel, Decision
from kvruntime.engines.base import KVPrefix
from kvruntime.engines.layered import HostKVPrefix
from kvruntime.errors import BadRequest, CorruptPage
from kvruntime.kernels import gather_pages, rehydrate_pages, scatter_pages
from kvruntime.kernels.layout import PageLayout, dtype_name
from kvruntime.radix import (
    Handle,
    MatchResult,
    Namespace,
    PageLocation,
    storage_key,
)
from kvruntime.radix import page_hashes as chain_hashes
from kvruntime.results import TIERS
from kvruntime.store.host import runs_of
from kvruntime.store.wire import decode_page
from kvruntime.tiers import Tiers

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
_TENANT_PERSON = b"kvr-tenant-v1"  # keeps tenant salts apart from every other blake2b use


@dataclass
class Lookup:
    """What a prompt can reuse. ``sources[i]`` says where page i is read from."""

    namespace: Namespace
    tokens: list[int]
    match: MatchResult
    handle: Handle | None  # locked while the turn runs
    sources: list[tuple[str, int | str]] = field(default_factory=list)  # (tier, value)
    redis_hashes: list[bytes] = field(default_factory=list)  # pages past the tree, in Redis
    decisions: list[Decision] = field(default_factory=list)
    exact_only: bool = False
    lossy_from: int | None = None  # first page restored through a lossy codec
    # tree pages read from Redis, {index: key}; and those whose value was found gone or bad
    tree_redis: dict[int, str] = field(default_factory=dict)
    stale: dict[int, str] = field(default_factory=dict)

    @property
    def num_pages(self) -> int:
        return len(self.sources)


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


class KVCache:
    """Thread-safe: one lock guards the index, the allocator and the host tier's books."""

    def __init__(
        self,
        layout: PageLayout,
        fingerprint: str,
        config: RuntimeConfig,
        cost: CostModel,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.fingerprint = fingerprint
        self.config = config
        self.cost = cost
        self._clock = clock
        self.tiers = Tiers(layout, config, clock)
        # the same objects, named here for the turn's code and for tests
        self.tree, self.pool = self.tiers.tree, self.tiers.pool
        self.host, self.redis = self.tiers.host, self.tiers.redis
        self.host_codec, self.redis_codec = self.tiers.host_codec, self.tiers.redis_codec
        self._lock = self.tiers.lock

    # ------------------------------------------------------------------ lookup

    def namespace(self, tenant: str) -> Namespace:
        """The tenant's key space: its page hashes are seeded with a salt keyed on the
        deployment secret ``config.tenant_salt``, so without the secret nobody can compute
        a tenant's keys (or tell from a key whose it is). The same secret gives the same
        keys in every process: a warm restart needs it unchanged (docs/security.md)."""
        salt = tenant_salt(self.config.tenant_salt, tenant)
        return Namespace(self.fingerprint, self.layout.describe(), tenant, salt)

    def lookup(self, tokens: Sequence[int], tenant: str, exact_only: bool = False) -> Lookup:
        """Find the reusable prefix of ``tokens`` (whole pages, at most ``len - 1`` tokens, so
        the engine computes at least the last one) and lock it. Never raises for tier faults."""
        ns = self.namespace(tenant)
        tokens = list(tokens)
        P = self.layout.page_size
        limit = (len(tokens) - 1) // P  # pages that may be reused
        with self._lock:
            self.tiers.forget_redis_after_outage()
            match = self.tree.match(tokens, ns, exact_only=exact_only)
            handle = match.handle if match.num_pages else None
            if handle is not None:
                self.tree.lock(handle)
        found = Lookup(ns, tokens, match, handle, exact_only=exact_only)
        pages: list[tuple[str, int | str, bool]] = []  # (tier, value, lossy)
        for i, loc in enumerate(match.locations[:limit]):
            exact_page = i < match.num_exact
            if loc.device is not None:
                pages.append(("device", loc.device, False))
            elif (
                loc.host is not None
                and self.host is not None
                and not (exact_only and not self.host_codec.lossless)
            ):
                pages.append(("host", loc.host, not self.host_codec.lossless and exact_page))
            elif (
                loc.redis is not None
                and self.redis is not None
                and not (exact_only and not self.redis_codec.lossless)
            ):
                pages.append(("redis", loc.redis, not self.redis_codec.lossless and exact_page))
            else:
                break
        pages = self._check_redis(found, pages)
        if len(pages) == match.num_pages and len(pages) < limit and self.redis is not None:
            pages += self._probe_redis(found, tokens, len(pages), limit)
        self._decide(found, pages)
        found.tree_redis = {
            i: str(value)
            for i, (tier, value) in enumerate(found.sources[: match.num_pages])
            if tier == "redis"
        }
        return found

    def _check_redis(
        self, found: Lookup, pages: list[tuple[str, int | str, bool]]
    ) -> list[tuple[str, int | str, bool]]:
        """Cut ``pages`` before the first tree page whose Redis value is gone (evicted,
        expired, lost with a restart): one EXISTS batch, so a lost page is neither read nor
        trusted. Such pages go to ``found.stale``; commit and release drop their locations."""
        at = [i for i, (tier, _, _) in enumerate(pages) if tier == "redis"]
        if not at or self.redis is None:
            return pages
        present = self.redis.exists_many([str(pages[i][1]) for i in at])
        missing = [i for i, ok in zip(at, present, strict=True) if not ok]
        if not missing:
            return pages
        found.stale.update({i: str(pages[i][1]) for i in missing})
        return pages[: missing[0]]

    def _probe_redis(
        self, found: Lookup, tokens: list[int], start: int, limit: int
    ) -> list[tuple[str, int | str, bool]]:
        """Pages past the local tree that another process (or an earlier life of this one)
        stored in Redis: exact keys first, approximate ones where allowed."""
        assert self.redis is not None
        if self.redis_codec.lossless is False and found.exact_only:
            return []
        P = self.layout.page_size
        parent = found.match.page_hashes[start - 1] if start else None
        hashes = chain_hashes(found.namespace, tokens[start * P : limit * P], P, parent=parent)
        exact_chain = start == 0 or found.match.num_exact == found.match.num_pages
        out: list[tuple[str, int | str, bool]] = []
        if exact_chain:
            keys = [storage_key(h, self.redis_codec.name, True) for h in hashes]
            hits = self.redis.leading_hits(keys)
            out += [("redis", k, not self.redis_codec.lossless) for k in keys[:hits]]
        if not found.exact_only and len(out) < len(hashes):
            rest = hashes[len(out) :]
            keys = [storage_key(h, self.redis_codec.name, False) for h in rest]
            hits = self.redis.leading_hits(keys)
            out += [("redis", k, False) for k in keys[:hits]]
            if hits and found.lossy_from is None:
                found.lossy_from = start + len(out) - hits  # approximate lineage from here
        found.redis_hashes = hashes[: len(out)]
        return out

    def _decide(self, found: Lookup, pages: list[tuple[str, int | str, bool]]) -> None:
        """Keep the longest prefix whose tiers are each worth restoring (cost model)."""
        P = self.layout.page_size
        counts = dict.fromkeys(("host", "redis"), 0)
        for tier, _, _ in pages:
            if tier in counts:
                counts[tier] += 1
        allowed = {"device"}
        for tier, n in counts.items():
            if not n:
                continue
            codec = self.host_codec if tier == "host" else self.redis_codec
            nbytes = n * codec.page_nbytes(self.layout)
            min_tokens = self.config.min_redis_hit_tokens if tier == "redis" else 0
            decision = self.cost.decide(tier, n * P, nbytes, min_tokens)
            found.decisions.append(decision)
            if decision.rehydrate:
                allowed.add(tier)
        for i, (tier, value, lossy) in enumerate(pages):
            if tier not in allowed:
                break
            found.sources.append((tier, value))
            if lossy and found.lossy_from is None:
                found.lossy_from = i
        if found.match.num_exact < min(found.match.num_pages, len(found.sources)):
            # approximate pages in the tree: lineage already approximate from there on
            first_approx = found.match.num_exact
            if found.lossy_from is None or first_approx < found.lossy_from:
                found.lossy_from = first_approx
        found.redis_hashes = found.redis_hashes[
            : max(0, len(found.sources) - found.match.num_pages)
        ]

    # ------------------------------------------------------------------ restore

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

    # ------------------------------------------------------------------ commit

    def commit(
        self,
        found: Lookup,
        token_ids: Sequence[int],
        export: Callable[[int, int], torch.Tensor],
    ) -> dict[str, int]:
        """Cache the whole pages of ``token_ids`` (the turn's prompt and output whose KV the
        engine holds): pages not on the device are exported (``export(first_page, count)``
        gives [count, L, 2, H, P, D]) into newly allocated pool pages, inserted into the
        index, and queued for write-back. Returns bytes queued per tier. Never raises for
        lack of space: what does not fit is simply not cached."""
        P = self.layout.page_size
        tokens = list(token_ids)
        total = len(tokens) // P
        if total == 0:
            return {}
        lossy_from = found.lossy_from if found.lossy_from is not None else total
        stale = dict(found.stale)
        failed = len(found.sources)  # restore stopped here when this Redis page was bad
        if failed in found.tree_redis:
            stale[failed] = found.tree_redis[failed]
        # a page whose Redis value is gone is placed (device, or spilled) like a new one
        known: list[PageLocation] = [
            loc._replace(redis=None) if i in stale else loc
            for i, loc in enumerate(found.match.locations[: found.match.num_pages])
        ]
        # which pages need a device copy: not on device, and not exact pages whose only
        # restored KV was lossy (that would pass approximate KV off as exact)
        need: list[int] = []
        for i in range(total):
            loc = known[i] if i < len(known) else None
            if loc is not None and loc.device is not None:
                continue
            restored = i < len(found.sources) and found.sources[i][0] != "device"
            if restored and lossy_from <= i < found.match.num_exact:
                continue  # an exact page restored lossily: its lower-tier copy stays
            need.append(i)
        with self._lock:
            ids = self.tiers.alloc(len(need))
        new_device = dict(zip(need, ids, strict=False))
        for first, _, count in runs_of(need[: len(ids)]):
            pages = export(first, count)
            dst = self.pool.ids_tensor([new_device[j] for j in range(first, first + count)])
            scatter_pages(pages.to(self.pool.kv.device, self.layout.dtype), dst, self.pool.kv)
        # pages the device pool could not take spill straight to the host tier
        spill = [i for i in need[len(ids) :] if i >= len(known) or known[i] == PageLocation()]
        spilled, staged = self._spill(spill, export, found, tokens, lossy_from)
        locations: list[PageLocation] = []
        redis_start = found.match.num_pages
        for i in range(total):
            loc = known[i] if i < len(known) else PageLocation()
            if i in new_device:
                loc = loc._replace(device=new_device[i])
            if i in spilled:
                loc = loc._replace(host=spilled[i].host, redis=spilled[i].redis)
            if redis_start <= i < redis_start + len(found.redis_hashes) and loc.redis is None:
                loc = loc._replace(redis=str(found.sources[i][1]))
            if loc == PageLocation():
                break  # nothing holds this page: cache the prefix before it
            locations.append(loc)
        n = len(locations)
        with self._lock:
            unused = [new_device[i] for i in new_device if i >= n]
            if unused:
                self.pool.free(unused)
            orphans = [int(v.host) for i, v in spilled.items() if i >= n and v.host is not None]
            if orphans and self.host is not None:
                self.host.discard_slots(orphans)
            split = min(lossy_from, n)
            if split:
                split = self._upgrade(tokens[: split * P], found.namespace, split)
            result = None
            if split:
                result = self.tree.insert(
                    tokens[: split * P], locations[:split], found.namespace, exact=True
                )
                self.tiers.free_duplicates(result.duplicates)
            if n > split:
                result = self.tree.insert(tokens[: n * P], locations, found.namespace, exact=False)
                self.tiers.free_duplicates(result.duplicates)
            if stale and found.handle is not None:
                # before write-back is queued, so it stores those pages again
                stored = {i for i, loc in spilled.items() if loc.redis is not None}
                found.stale = self.tiers.drop_stale_redis(
                    found.handle, {i: k for i, k in stale.items() if i not in stored}
                )
            if result is None:
                self.tiers.trim_redis_index()
                return {}
            staged = {i: t for i, t in staged.items() if i < n}
            written = self.tiers.writer.queue(result.handle, tokens[: n * P], staged)
            self.tiers.trim_redis_index()  # after write-back locked what it will store
            return written

    def _spill(
        self,
        spill: list[int],
        export: Callable[[int, int], torch.Tensor],
        found: Lookup,
        tokens: list[int],
        lossy_from: int,
    ) -> tuple[dict[int, PageLocation], dict[int, torch.Tensor]]:
        """Store pages that found no device page (they exist nowhere else) in the host tier
        now, and hand what the host cannot take to the Redis writer. Returns the locations of
        the pages placed and, with a Redis tier, the host-held pages themselves on the CPU
        (write-back sends them to Redis)."""
        if not spill or (self.host is None and self.redis is None):
            return {}, {}
        exported: dict[int, torch.Tensor] = {}  # page index -> [L, 2, H, P, D], engine device
        for first, _, count in runs_of(spill):
            pages = export(first, count).to(self.layout.dtype)
            for j in range(count):
                exported[first + j] = pages[j]
        placed = self._spill_host(spill, exported) if self.host is not None else {}
        staged: dict[int, torch.Tensor] = {}
        if self.redis is None:
            return placed, staged
        if placed:
            held = sorted(placed)
            for i, page in zip(held, torch.stack([exported[i] for i in held]).cpu(), strict=True):
                staged[i] = page
        rest = [i for i in spill if i not in placed]
        if rest:
            # sent by the Redis writer thread (never waited for here), unindexed: the probe
            # of a later lookup finds them by hash; indexed only when stored synchronously
            P = self.layout.page_size
            hashes = chain_hashes(found.namespace, tokens[: (rest[-1] + 1) * P], P)
            meta = [(i, hashes[i], i < lossy_from) for i in rest]
            blocks = self.redis_codec.encode(torch.stack([exported[i] for i in rest])).cpu()
            for i, key in self.tiers.writer.send_redis(meta, blocks, tokens).items():
                placed[i] = PageLocation(redis=key)
        return placed, staged

    def _spill_host(
        self, spill: list[int], exported: dict[int, torch.Tensor]
    ) -> dict[int, PageLocation]:
        """The leading spilled pages the host tier has room for, encoded where they are and
        copied straight into reserved rows (from CUDA: one DMA per run of rows, no pageable
        staging), filled outside the lock and published under it."""
        assert self.host is not None
        with self._lock:
            room = self.tiers.make_host_room(len(spill))
            slots = self.host.reserve(room) if room else []
        if not slots:
            return {}
        take = spill[: len(slots)]
        try:
            blocks = self.host_codec.encode(torch.stack([exported[i] for i in take]))
            self.host.write_rows(slots, blocks)
        except BaseException:
            with self._lock:
                self.host.release(slots)
            raise
        keys = [f"spill:{next(self.tiers.spill_ids)}" for _ in take]
        with self._lock:
            held = self.host.publish(keys, slots)
        return {i: PageLocation(host=slot) for i, slot in zip(take, held, strict=True)}

    def _upgrade(self, tokens: list[int], ns: Namespace, split: int) -> int:
        """Exact KV replaces approximate KV cached for the same tokens: drop the approximate
        pages (and everything below them) so the exact ones can take their place. Returns how
        many leading pages may be inserted as exact (fewer when approximate ones are locked)."""
        current = self.tree.match(tokens, ns)
        if current.num_exact >= min(current.num_pages, split):
            return split
        try:
            dropped = self.tree.remove(current.handle, current.num_exact)
        except BadRequest:  # another turn is using them right now
            return current.num_exact
        self.tiers.release_copies(dropped)
        return split

    def pin(self, tokens: Sequence[int], tenant: str) -> Handle | None:
        """Lock the cached prefix of ``tokens`` (a tool-call wait); None if nothing is cached."""
        with self._lock:
            match = self.tree.match(list(tokens), self.namespace(tenant))
            if not match.num_pages:
                return None
            self.tree.lock(match.handle)
            return match.handle

    def unpin(self, handle: Handle) -> None:
        with self._lock:
            self.tree.unlock(handle)

    def release(self, found: Lookup) -> None:
        if found.handle is not None:
            with self._lock:
                self.tree.unlock(found.handle)
                if found.stale:  # Redis-only pages gone from Redis that commit could not drop
                    with contextlib.suppress(BadRequest):  # the handle's pages left the tree
                        self.tiers.drop_stale_redis(found.handle, found.stale)
            found.handle = None

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued write-backs are done (tests, shutdown)."""
        return self.tiers.flush(timeout_s)

    def close(self) -> None:
        self.tiers.close()


def layered_restore_applies(
    device: torch.device, blocks: torch.Tensor, dtype: torch.dtype, kv_dtype: torch.dtype
) -> bool:
    """Whether host pages should stay in the host tier for the engine to load layer by layer
    (``KVCache.restore(layered=True)``): on CUDA from pinned rows (the rehydrate kernel reads
    them over PCIe while earlier layers compute), into caches of the KV dtype. On the CPU a
    layered load has nothing to overlap with, so pages are decoded up front."""
    return device.type == "cuda" and blocks.is_pinned() and dtype == kv_dtype


def tenant_salt(secret: bytes, tenant: str) -> bytes:
    """A tenant's 16-byte salt: blake2b of its name keyed with ``secret`` (a secret longer
    than blake2b's 64-byte key is hashed first). Raises BadRequest for a non-str tenant."""
    if not isinstance(tenant, str):
        raise BadRequest(f"tenant must be a str, got {type(tenant).__name__}")
    key = secret if len(secret) <= 64 else hashlib.blake2b(secret).digest()
    h = hashlib.blake2b(tenant.encode(), key=key, digest_size=16, person=_TENANT_PERSON)
    return h.digest()
