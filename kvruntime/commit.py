"""Commit: a finished turn's pages into the device pool and the index, and on to write-back.

Pages the engine computed (or restored from a lower tier) get device pages where the pool has
room; what it cannot take spills straight to the host tier and, past that, to the Redis
writer. Exact pages restored through a lossy codec are never put back as if exact; exact KV
replaces approximate KV cached for the same tokens (``_upgrade``). The new pages are queued
for background write-back (``kvruntime/writeback.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvruntime.errors import BadRequest
from kvruntime.kernels import scatter_pages
from kvruntime.kernels.layout import PageLayout
from kvruntime.lookup import Lookup
from kvruntime.radix import Namespace, PageLocation
from kvruntime.radix import page_hashes as chain_hashes
from kvruntime.store.host import runs_of
from kvruntime.tiers import Tiers


class Committer:
    """Caches a turn's pages (``KVCache.commit``). Takes the tiers' lock for the allocator
    and the index; exports and spills run outside it."""

    def __init__(self, tiers: Tiers, layout: PageLayout) -> None:
        self.tiers, self.layout = tiers, layout
        self.tree, self.pool = tiers.tree, tiers.pool
        self.host, self.redis = tiers.host, tiers.redis
        self.host_codec, self.redis_codec = tiers.host_codec, tiers.redis_codec
        self._lock = tiers.lock

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
