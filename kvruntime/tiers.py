"""The tiers under the runtime's index: the device page pool, the host tier and the Redis
tier, with the operations that move pages between them (allocation with eviction, host room,
Redis stores; background write-back is ``Tiers.writer``, in kvruntime/writeback.py). The radix
index says where each page lives; the tiers hold the bytes. One re-entrant lock guards the
index, the allocator and the host tier's books.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from kvruntime.config import RuntimeConfig
from kvruntime.errors import BadRequest, CapacityError
from kvruntime.kernels.layout import PageLayout, dtype_name
from kvruntime.radix import Handle, PageInfo, RadixConfig, RadixTree, storage_key
from kvruntime.store.codec import Codec, get_codec
from kvruntime.store.host import HostTier, HostTierConfig
from kvruntime.store.pool import DevicePagePool, PoolConfig
from kvruntime.store.wire import PREAMBLE_BYTES, encode_header
from kvruntime.writeback import Writer

if TYPE_CHECKING:
    from kvruntime.store.redis_tier import RedisTier

log = logging.getLogger(__name__)


class Tiers:
    def __init__(
        self, layout: PageLayout, config: RuntimeConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.layout = layout
        self.lock = threading.RLock()
        self.tree = RadixTree(RadixConfig(layout.page_size, config.eviction_policy), clock=clock)
        self.pool = DevicePagePool(
            PoolConfig.from_budget(layout, config.device_kv_bytes, config.device)
        )
        self.host_codec: Codec = get_codec(config.host_codec)
        self.redis_codec: Codec = get_codec(config.redis_codec)
        self.host: HostTier | None = None
        if config.has_host_tier:
            block = self.host_codec.page_nbytes(layout)
            if config.host_kv_bytes >= block:
                self.host = HostTier(HostTierConfig(config.host_kv_bytes, block, self_evict=False))
        self.redis: RedisTier | None = None
        if config.redis_url is not None:
            from kvruntime.store.redis_tier import RedisTier, RedisTierConfig

            self.redis = RedisTier(
                RedisTierConfig(
                    url=config.redis_url, namespace=config.redis_namespace, ttl_s=config.redis_ttl_s
                )
            )
        # a Redis value: preamble, header (fields + the page's token ids), payload
        self.redis_value_bytes = (
            PREAMBLE_BYTES + 256 + 4 * layout.page_size + self.redis_codec.page_nbytes(layout)
        )
        self.max_redis_index_pages = config.max_redis_index_pages
        self._recoveries_seen = 0
        self.spill_ids = itertools.count()
        self.writer = Writer(self, config.write_back, config.redis_write_backlog_bytes)

    def alloc(self, n: int) -> list[int]:
        """Up to ``n`` device pages, evicting unlocked pages as the policy orders."""
        short = n - self.pool.num_free
        if short > 0:
            evicted = self.tree.evict("device", short)
            self.pool.free([int(v) for v in evicted.values])
            if evicted.num_removed:
                log.debug("dropped %d pages with no other copy", evicted.num_removed)
        try:
            return self.pool.alloc(min(n, self.pool.num_free))
        except CapacityError:  # pragma: no cover - guarded by the min above
            return []

    def free_duplicates(self, duplicates: Sequence[object]) -> None:
        dev = [int(d.value) for d in duplicates if d.tier == "device"]  # type: ignore[attr-defined]
        if dev:
            self.pool.free(dev)

    def release_copies(self, pages: Sequence[PageInfo]) -> None:
        device = [int(p.location.device) for p in pages if p.location.device is not None]
        if device:
            self.pool.free(device)
        host = [int(p.location.host) for p in pages if p.location.host is not None]
        if host and self.host is not None:
            self.host.discard_slots(host)

    def make_host_room(self, n: int) -> int:
        """Evict host copies (policy order) until ``n`` slots are free; returns free slots."""
        assert self.host is not None
        short = n - self.host.num_free
        if short > 0:
            freed = self.tree.evict("host", short)
            self.host.discard_slots([int(v) for v in freed.values])
        return min(n, self.host.num_free)

    def trim_redis_index(self) -> int:
        """Forget the least recently used index entries whose only copy is in Redis once
        there are more than ``max_redis_index_pages`` (down to 7/8 of it, so trimming is not
        a per-page affair). Pages with no device or host copy number at least ``pages -
        device - host``; that is what is counted, so the index holds at most device pages +
        host slots + the cap. Redis keeps the values. Call under the lock; returns how many
        entries left the index."""
        tree, cap = self.tree, self.max_redis_index_pages
        over = tree.num_pages - tree.pages_in("device") - tree.pages_in("host") - cap
        if over <= 0 or self.redis is None:
            return 0
        return len(tree.evict("redis", over + cap // 8, sole=True))

    def forget_redis_after_outage(self) -> int:
        """Once the Redis tier recovered from losing its server, forget every Redis location
        in the index (unlocked pages): a server that went away may have come back empty, and
        a location with no value behind it is neither read nor ever written again. Pages on
        the device or host keep those copies and are written again by write-back; Redis-only
        entries leave (a lookup's probe finds by hash what Redis still has). Call under the
        lock; returns the locations forgotten."""
        if self.redis is None or self.redis.recoveries == self._recoveries_seen:
            return 0
        self._recoveries_seen = self.redis.recoveries
        forgotten = len(self.tree.evict("redis", self.tree.pages_in("redis")))
        log.info("redis tier recovered: %d index locations forgotten", forgotten)
        return forgotten

    def drop_stale_redis(self, handle: Handle, stale: dict[int, str]) -> dict[int, str]:
        """Pages of ``handle``'s prefix whose Redis value ``{index: key}`` was found missing
        or bad lose that location: pages held elsewhere keep their other copies (write-back
        stores them again); Redis-only ones leave the index, from the first of them on,
        unless locked. Returns the pages still pointing at their stale key (locked). Call
        under the lock."""
        if not stale:
            return {}
        pages = self.tree.pages(handle)
        gone = {i: k for i, k in stale.items() if i < len(pages) and pages[i].location.redis == k}
        shared = {i: None for i in gone if pages[i].location.tiers != ("redis",)}
        if shared:
            self.tree.set_location(handle, "redis", shared)
        alone = sorted(i for i in gone if i not in shared)
        if not alone:
            return {}
        try:
            self.release_copies(self.tree.remove(handle, alone[0]))
        except BadRequest:  # locked (this turn, or another): retried at release
            return {i: gone[i] for i in alone}
        return {}

    def store_redis(
        self, pages: Sequence[tuple[int, bytes, bool]], blocks: torch.Tensor, tokens: list[int]
    ) -> dict[int, str]:
        """Store pages (index, page hash, exact) already encoded with the Redis codec
        (``blocks`` [n, page_nbytes] uint8 on the host) in the wire format; returns the keys
        stored, by page index (none when the batch failed)."""
        assert self.redis is not None
        L = self.layout
        items: list[tuple[str, bytes]] = []
        for (i, page_hash, exact), block in zip(pages, blocks, strict=True):
            payload = memoryview(block.numpy())
            head = encode_header(
                codec=self.redis_codec.name,
                dtype=dtype_name(L.dtype),
                shape=L.page_shape,
                layout=L.describe(),
                tokens=tokens[i * L.page_size : (i + 1) * L.page_size],
                payload=payload,
            )
            items.append(
                (storage_key(page_hash, self.redis_codec.name, exact), head + payload.tobytes())
            )
        # the tier reports a count: trust locations only when the whole batch was stored
        if self.redis.put_many(items) != len(items):
            return {}
        return {i: key for (i, _, _), (key, _) in zip(pages, items, strict=True)}

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued write-backs are done, Redis sends included (tests, shutdown)."""
        return self.writer.flush(timeout_s)

    def close(self) -> None:
        self.writer.close()
        if self.redis is not None:
            self.redis.close()
