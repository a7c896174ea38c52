"""The tiers under the runtime's index: the device page pool, the host tier and the Redis
tier, with the operations that move pages between them (allocation with eviction, host room,
Redis stores, background write-back). The radix index says where each page lives; the tiers
hold the bytes. One re-entrant lock guards the index, the allocator and the host tier's books.
Write-back copies outside it: host slots are reserved under the lock, filled without it (on CUDA
on write-back's own low-priority stream, after an event recorded at commit, into pinned rows),
and published under it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from kvruntime.config import RuntimeConfig
from kvruntime.errors import BadRequest, CapacityError
from kvruntime.kernels.dispatch import backend_for, prepare_rehydrate
from kvruntime.kernels.layout import PageLayout, dtype_name
from kvruntime.radix import Handle, PageInfo, RadixConfig, RadixTree, storage_key
from kvruntime.store.codec import Codec, get_codec
from kvruntime.store.host import HostTier, HostTierConfig
from kvruntime.store.pool import DevicePagePool, PoolConfig
from kvruntime.store.wire import PREAMBLE_BYTES, encode_header
from kvruntime.writeback import RedisWrite, WriteBack, WriteJob

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
        self._writeback: WriteBack[WriteJob] | None = None
        self._sender: WriteBack[RedisWrite] | None = None  # Redis puts, on their own thread
        if config.write_back:
            self._writeback = WriteBack(self._write_job)
            if self.redis is not None:
                self._sender = WriteBack(self._send_redis, name="kvr-redis-writer")
        # bytes encoded for Redis and not yet sent; a job that would pass the limit is not
        # sent (its pages stay in the device/host tiers), counted in ``redis_writes_skipped``
        self.redis_backlog_limit = config.redis_write_backlog_bytes
        self.redis_backlog_bytes = 0
        self.redis_writes_skipped = 0  # pages
        self._backlog_lock = threading.Lock()
        # write-back's own CUDA stream, lowest priority: its copies queue behind nothing of the
        # turn's and never stall the compute stream (None on CPU, where copies are plain)
        self._side: torch.cuda.Stream | None = None
        if self.pool.kv.is_cuda and self._writeback is not None:
            self._side = torch.cuda.Stream(self.pool.kv.device, priority=0)

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

    def queue_write_back(
        self, handle: Handle, tokens: list[int], staged: dict[int, torch.Tensor]
    ) -> dict[str, int]:
        if self._writeback is None:
            return {}
        pages = self.tree.pages(handle)
        todo = [
            p
            for p in pages
            if (p.location.device is not None or p.index in staged)
            and (
                (self.host is not None and p.location.host is None)
                or (self.redis is not None and p.location.redis is None)
            )
        ]
        if not todo:
            return {}
        self.tree.lock(handle)
        ready = None
        if self._side is not None:  # the pages were written on the committer's stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.pool.kv.device))
        job = WriteJob(
            handle=handle,
            pages=tuple(todo),
            tokens=tokens,
            staged={p.index: staged[p.index] for p in todo if p.index in staged},
            ready=ready,
        )
        self._writeback.submit(job)
        out: dict[str, int] = {}
        if self.host is not None:
            out["host"] = len(todo) * self.host_codec.page_nbytes(self.layout)
        if self.redis is not None:
            out["redis"] = len(todo) * self.redis_codec.page_nbytes(self.layout)
        return out

    def _write_job(self, job: WriteJob) -> None:
        """Runs on the write-back thread: encode the pages from the pool (they are locked, so
        their device pages stay put), fill the host tier, record the new locations, unlock;
        the Redis blocks go to the sender thread once the pages are unlocked."""
        send: RedisWrite | None = None
        try:
            if self.host is not None:
                self._write_host(job, [p for p in job.pages if p.location.host is None])
            if self.redis is not None:
                send = self._encode_redis(job, [p for p in job.pages if p.location.redis is None])
        except Exception:  # write-back must never take the runtime down
            log.exception("write-back failed; pages stay on the device only")
        finally:
            with self.lock:
                self.tree.unlock(job.handle)
                self.trim_redis_index()  # the job's pages may leave now
        if send is not None:
            if self._sender is not None:
                self._sender.submit(send)
            else:  # pragma: no cover - a Redis tier with write-back always has a sender
                self._send_redis(send)

    def _encode(self, codec: Codec, pages: Sequence[PageInfo], job: WriteJob) -> torch.Tensor:
        """[n, page_nbytes] uint8 on the host (pinned on CUDA): from the pool (device pages
        are locked by the job) or from the job's staged copies of pages that never reached
        the device."""
        out = torch.empty(
            (len(pages), codec.page_nbytes(self.layout)),
            dtype=torch.uint8,
            pin_memory=self._side is not None,
        )
        staged = [j for j, p in enumerate(pages) if p.index in job.staged]
        pooled = [j for j, p in enumerate(pages) if p.index not in job.staged]
        if staged:
            stack = torch.stack([job.staged[pages[j].index] for j in staged])
            out[staged] = codec.encode(stack).cpu()
        if pooled:
            device = [pages[j].location.device for j in pooled]
            ids = [d for d in device if d is not None]  # locked: all set
            if self._side is None:
                out[pooled] = codec.encode_from_pool(
                    self.pool.kv, self.pool.ids_tensor(ids), self.layout
                )
            else:
                # all pages pooled (the usual case): straight into ``out``; else a pinned buffer
                rows = out
                if len(pooled) < len(pages):
                    rows = torch.empty(
                        (len(pooled), out.shape[1]), dtype=torch.uint8, pin_memory=True
                    )
                self._on_side(job, lambda: self._encode_into(codec, ids, rows, None))
                if rows is not out:
                    out[pooled] = rows
        return out

    def _on_side(self, job: WriteJob, launch: Callable[[], None]) -> None:
        """Run ``launch`` on write-back's stream after the job's pages were written, and
        wait for that stream's work only (never the device)."""
        side = self._side
        assert side is not None
        with torch.cuda.stream(side):
            if job.ready is not None:
                side.wait_event(job.ready)
            launch()
            done = torch.cuda.Event()
            done.record(side)
        done.synchronize()

    def _encode_into(
        self, codec: Codec, ids: list[int], host: torch.Tensor, slots: list[int] | None
    ) -> None:
        """On the current (side) stream: encode pool pages ``ids`` and copy them into pinned
        ``host`` rows (``slots``, or rows 0..n-1), asynchronously. The caller waits."""
        dev = codec.encode_from_pool(self.pool.kv, self.pool.ids_tensor(ids), self.layout)
        if slots is None:
            host[: len(ids)].copy_(dev, non_blocking=True)
        else:
            assert self.host is not None and host is self.host.blocks
            self.host.write_rows(slots, dev, non_blocking=True)
        # the side stream's allocator owns ``dev``; it is freed once the caller has waited

    def _fill_host(self, job: WriteJob, pages: Sequence[PageInfo], slots: list[int]) -> None:
        """Write the pages' host-codec blocks into reserved rows ``slots`` (outside the lock:
        reserved rows are neither read nor evicted until published)."""
        assert self.host is not None
        rows = self.host.blocks
        if self._side is None or not rows.is_pinned():
            idx = torch.as_tensor(slots, dtype=torch.int64)
            rows.index_copy_(0, idx, self._encode(self.host_codec, pages, job))
            return
        staged = [j for j, p in enumerate(pages) if p.index in job.staged]
        if staged:
            stack = torch.stack([job.staged[pages[j].index] for j in staged])
            idx = torch.as_tensor([slots[j] for j in staged], dtype=torch.int64)
            rows.index_copy_(0, idx, self.host_codec.encode(stack).cpu())
        pooled = [j for j, p in enumerate(pages) if p.index not in job.staged]
        if not pooled:
            return
        device = [pages[j].location.device for j in pooled]
        ids = [d for d in device if d is not None]  # locked: all set
        dst = [slots[j] for j in pooled]
        if self.host_codec.name == "none" and backend_for(self.pool.kv) == "triton":
            from kvruntime.kernels.host_copy import STORE_BESIDE_COMPUTE

            # the kernel writes pool pages straight into the pinned rows over PCIe; its index
            # tensors go to the device on the side stream, not behind the turn's kernels
            def offload() -> None:
                plan = prepare_rehydrate(
                    rows,
                    torch.as_tensor(dst, dtype=torch.int64),
                    "none",
                    self.pool.kv,
                    torch.as_tensor(ids, dtype=torch.int64),
                )
                plan.store(tune=STORE_BESIDE_COMPUTE)

            self._on_side(job, offload)
        else:
            self._on_side(job, lambda: self._encode_into(self.host_codec, ids, rows, dst))

    def _write_host(self, job: WriteJob, pages: Sequence[PageInfo]) -> None:
        """Reserve slots under the lock, fill them outside it, publish under it."""
        assert self.host is not None
        if not pages:
            return
        with self.lock:
            room = self.make_host_room(len(pages))
            if room < len(pages):
                log.info("host tier full of locked pages; %d pages not written", len(pages) - room)
            if not room:
                return
            slots = self.host.reserve(room)
        pages = pages[:room]
        try:
            self._fill_host(job, pages, slots)
        except BaseException:
            with self.lock:
                self.host.release(slots)
            raise
        keys = [storage_key(p.page_hash, self.host_codec.name, p.exact) for p in pages]
        with self.lock:
            placed = self.host.publish(keys, slots)
            updates = {p.index: s for p, s in zip(pages, placed, strict=True)}
            self.tree.set_location(job.handle, "host", updates)

    def _encode_redis(self, job: WriteJob, pages: Sequence[PageInfo]) -> RedisWrite | None:
        """The pages' Redis blocks (read while the job's lock holds them), or None when there
        are none or the sender's backlog has no room for them (counted, not sent)."""
        if not pages:
            return None
        nbytes = len(pages) * self.redis_codec.page_nbytes(self.layout)
        if not self._reserve_backlog(nbytes, len(pages)):
            return None
        try:
            blocks = self._encode(self.redis_codec, pages, job)
        except BaseException:
            self._sent(nbytes)
            raise
        meta = tuple((p.index, p.page_hash, p.exact) for p in pages)
        return RedisWrite(job.handle, meta, blocks, job.tokens)

    def send_redis(
        self, pages: Sequence[tuple[int, bytes, bool]], blocks: torch.Tensor, tokens: list[int]
    ) -> dict[int, str]:
        """Store pages in Redis without an index entry (a lookup's probe finds them by hash):
        queued for the sender thread when write-back runs (returns {}; skipped and counted
        when the backlog is full), else stored now (returns the keys stored, by page index)."""
        if self._sender is None:
            return self.store_redis(pages, blocks, tokens)
        nbytes = len(pages) * self.redis_codec.page_nbytes(self.layout)
        if self._reserve_backlog(nbytes, len(pages)):
            self._sender.submit(RedisWrite(None, tuple(pages), blocks, tokens))
        return {}

    def _reserve_backlog(self, nbytes: int, num_pages: int) -> bool:
        """Count ``nbytes`` into the send backlog; False (pages counted as skipped) when that
        would pass the limit. A batch finding the backlog empty always goes."""
        with self._backlog_lock:
            if self.redis_backlog_bytes and self.redis_backlog_bytes + nbytes > (
                self.redis_backlog_limit
            ):
                self.redis_writes_skipped += num_pages
                log.info("Redis send backlog full; %d pages not sent", num_pages)
                return False
            self.redis_backlog_bytes += nbytes
            return True

    def _send_redis(self, write: RedisWrite) -> None:
        """Runs on the sender thread: store the blocks, then record the Redis locations of
        pages still indexed under the write's handle."""
        try:
            stored = self.store_redis(write.pages, write.blocks, write.tokens)
            if stored and write.handle is not None:
                # evicted meanwhile (a stale handle): the lookup's probe finds them by hash
                with self.lock, contextlib.suppress(BadRequest):
                    self.tree.set_location(write.handle, "redis", dict(stored))
                    self.trim_redis_index()
        except Exception:
            log.exception("Redis write-back failed; pages stay in the device/host tiers")
        finally:
            self._sent(len(write.pages) * self.redis_codec.page_nbytes(self.layout))

    def _sent(self, nbytes: int) -> None:
        with self._backlog_lock:
            self.redis_backlog_bytes -= nbytes

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued write-backs are done, Redis sends included (tests, shutdown)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._writeback is not None and not self._writeback.flush(timeout_s):
            return False
        if self._sender is None:
            return True
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._sender.flush(left)

    def close(self) -> None:
        if self._writeback is not None:
            self._writeback.close()  # its last jobs may still hand blocks to the sender
        if self._sender is not None:
            self._sender.close()
        if self.redis is not None:
            self.redis.close()
