"""Background write-back: pages of finished turns go to the host tier and Redis on their own
threads, so storing never blocks the next token.

A ``WriteJob`` (a committed turn's pages, locked) runs on the write-back thread: it fills the
host tier and encodes the Redis blocks, then unlocks the pages. The encoded blocks go on as a
``RedisWrite`` to a second thread that sends them, so a slow Redis never keeps pages locked
(which would stop the device pool and the host tier from evicting them)."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from kvruntime.errors import BadRequest
from kvruntime.kernels.dispatch import backend_for, prepare_rehydrate
from kvruntime.radix import Handle, PageInfo, storage_key
from kvruntime.store.codec import Codec

if TYPE_CHECKING:
    from kvruntime.tiers import Tiers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteJob:
    handle: Handle  # locked by the submitter; the job's runner unlocks it
    pages: tuple[PageInfo, ...]
    tokens: list[int]  # the committed tokens; page i is tokens[i*P:(i+1)*P]
    # pages that never reached the device pool, by page index: [L, 2, H, P, D] each
    staged: dict[int, torch.Tensor] = field(default_factory=dict)
    # CUDA pool: an event recorded on the committing stream after the pages were written; the
    # job's copies wait on it (on their own stream) so they read finished pages. None on CPU.
    ready: torch.cuda.Event | None = None

    def tokens_of(self, index: int, page_size: int) -> list[int]:
        return self.tokens[index * page_size : (index + 1) * page_size]


@dataclass(frozen=True)
class RedisWrite:
    """Pages encoded for Redis, to be sent. The handle is not locked: pages evicted meanwhile
    keep their Redis values (a lookup's probe finds them by hash), only their locations are
    not recorded. None: pages with no index entry (spilled at commit), found by the probe."""

    handle: Handle | None
    pages: tuple[tuple[int, bytes, bool], ...]  # (page index, page hash, exact)
    blocks: torch.Tensor  # [n, page_nbytes] uint8 on the host, in the Redis codec
    tokens: list[int]  # the committed tokens (each value's header carries its page's ids)


J = TypeVar("J")


class WriteBack(Generic[J]):
    """One worker thread running ``run(job)`` for each submitted job, in order."""

    def __init__(self, run: Callable[[J], None], name: str = "kvr-writeback") -> None:
        self._run = run
        self._queue: queue.Queue[J | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job: J) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(job)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted job ran; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:  # the runner logs its own; keep the thread alive regardless
                log.exception("write-back job failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


class Writer:
    """Moves committed pages down the tiers in the background. ``queue`` locks a turn's new
    pages and hands them to the write-back thread, which fills the host tier (host slots are
    reserved under the tiers' lock, filled outside it: on CUDA on write-back's own
    low-priority stream, after an event recorded at commit, into pinned rows; then published
    under it), encodes the Redis blocks and unlocks; the sender thread stores those in Redis.
    ``send_redis`` stores spilled pages through the same sender."""

    def __init__(self, tiers: Tiers, enabled: bool, redis_backlog_bytes: int) -> None:
        self.tiers = tiers
        self._writeback: WriteBack[WriteJob] | None = None
        self._sender: WriteBack[RedisWrite] | None = None  # Redis puts, on their own thread
        if enabled:
            self._writeback = WriteBack(self._write_job)
            if tiers.redis is not None:
                self._sender = WriteBack(self._send_redis, name="kvr-redis-writer")
        # bytes encoded for Redis and not yet sent; a job that would pass the limit is not
        # sent (its pages stay in the device/host tiers), counted in ``redis_writes_skipped``
        self.redis_backlog_limit = redis_backlog_bytes
        self.redis_backlog_bytes = 0
        self.redis_writes_skipped = 0  # pages
        self._backlog_lock = threading.Lock()
        # write-back's own CUDA stream, lowest priority: its copies queue behind nothing of the
        # turn's and never stall the compute stream (None on CPU, where copies are plain)
        self._side: torch.cuda.Stream | None = None
        if tiers.pool.kv.is_cuda and self._writeback is not None:
            self._side = torch.cuda.Stream(tiers.pool.kv.device, priority=0)

    def queue(
        self, handle: Handle, tokens: list[int], staged: dict[int, torch.Tensor]
    ) -> dict[str, int]:
        """Queue the handle's pages that lack a host or Redis copy (they stay locked until
        the write-back thread has read them). ``staged``: pages that never reached the device
        pool, by page index. Returns the bytes queued per tier."""
        if self._writeback is None:
            return {}
        pages = self.tiers.tree.pages(handle)
        todo = [
            p
            for p in pages
            if (p.location.device is not None or p.index in staged)
            and (
                (self.tiers.host is not None and p.location.host is None)
                or (self.tiers.redis is not None and p.location.redis is None)
            )
        ]
        if not todo:
            return {}
        self.tiers.tree.lock(handle)
        ready = None
        if self._side is not None:  # the pages were written on the committer's stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.tiers.pool.kv.device))
        job = WriteJob(
            handle=handle,
            pages=tuple(todo),
            tokens=tokens,
            staged={p.index: staged[p.index] for p in todo if p.index in staged},
            ready=ready,
        )
        self._writeback.submit(job)
        out: dict[str, int] = {}
        if self.tiers.host is not None:
            out["host"] = len(todo) * self.tiers.host_codec.page_nbytes(self.tiers.layout)
        if self.tiers.redis is not None:
            out["redis"] = self._redis_bytes(len(todo))
        return out

    def _write_job(self, job: WriteJob) -> None:
        """Runs on the write-back thread: encode the pages from the pool (they are locked, so
        their device pages stay put), fill the host tier, record the new locations, unlock;
        the Redis blocks go to the sender thread once the pages are unlocked."""
        send: RedisWrite | None = None
        try:
            if self.tiers.host is not None:
                self._write_host(job, [p for p in job.pages if p.location.host is None])
            if self.tiers.redis is not None:
                send = self._encode_redis(job, [p for p in job.pages if p.location.redis is None])
        except Exception:  # write-back must never take the runtime down
            log.exception("write-back failed; pages stay on the device only")
        finally:
            with self.tiers.lock:
                self.tiers.tree.unlock(job.handle)
                self.tiers.trim_redis_index()  # the job's pages may leave now
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
            (len(pages), codec.page_nbytes(self.tiers.layout)),
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
                    self.tiers.pool.kv, self.tiers.pool.ids_tensor(ids), self.tiers.layout
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
        dev = codec.encode_from_pool(
            self.tiers.pool.kv, self.tiers.pool.ids_tensor(ids), self.tiers.layout
        )
        if slots is None:
            host[: len(ids)].copy_(dev, non_blocking=True)
        else:
            assert self.tiers.host is not None and host is self.tiers.host.blocks
            self.tiers.host.write_rows(slots, dev, non_blocking=True)
        # the side stream's allocator owns ``dev``; it is freed once the caller has waited

    def _fill_host(self, job: WriteJob, pages: Sequence[PageInfo], slots: list[int]) -> None:
        """Write the pages' host-codec blocks into reserved rows ``slots`` (outside the lock:
        reserved rows are neither read nor evicted until published)."""
        assert self.tiers.host is not None
        rows = self.tiers.host.blocks
        if self._side is None or not rows.is_pinned():
            idx = torch.as_tensor(slots, dtype=torch.int64)
            rows.index_copy_(0, idx, self._encode(self.tiers.host_codec, pages, job))
            return
        staged = [j for j, p in enumerate(pages) if p.index in job.staged]
        if staged:
            stack = torch.stack([job.staged[pages[j].index] for j in staged])
            idx = torch.as_tensor([slots[j] for j in staged], dtype=torch.int64)
            rows.index_copy_(0, idx, self.tiers.host_codec.encode(stack).cpu())
        pooled = [j for j, p in enumerate(pages) if p.index not in job.staged]
        if not pooled:
            return
        device = [pages[j].location.device for j in pooled]
        ids = [d for d in device if d is not None]  # locked: all set
        dst = [slots[j] for j in pooled]
        if self.tiers.host_codec.name == "none" and backend_for(self.tiers.pool.kv) == "triton":
            from kvruntime.kernels.host_copy import STORE_BESIDE_COMPUTE

            # the kernel writes pool pages straight into the pinned rows over PCIe; its index
            # tensors go to the device on the side stream, not behind the turn's kernels
            def offload() -> None:
                plan = prepare_rehydrate(
                    rows,
                    torch.as_tensor(dst, dtype=torch.int64),
                    "none",
                    self.tiers.pool.kv,
                    torch.as_tensor(ids, dtype=torch.int64),
                )
                plan.store(tune=STORE_BESIDE_COMPUTE)

            self._on_side(job, offload)
        else:
            self._on_side(job, lambda: self._encode_into(self.tiers.host_codec, ids, rows, dst))

    def _write_host(self, job: WriteJob, pages: Sequence[PageInfo]) -> None:
        """Reserve slots under the lock, fill them outside it, publish under it."""
        assert self.tiers.host is not None
        if not pages:
            return
        with self.tiers.lock:
            room = self.tiers.make_host_room(len(pages))
            if room < len(pages):
                log.info("host tier full of locked pages; %d pages not written", len(pages) - room)
            if not room:
                return
            slots = self.tiers.host.reserve(room)
        pages = pages[:room]
        try:
            self._fill_host(job, pages, slots)
        except BaseException:
            with self.tiers.lock:
                self.tiers.host.release(slots)
            raise
        keys = [storage_key(p.page_hash, self.tiers.host_codec.name, p.exact) for p in pages]
        with self.tiers.lock:
            placed = self.tiers.host.publish(keys, slots)
            updates = {p.index: s for p, s in zip(pages, placed, strict=True)}
            self.tiers.tree.set_location(job.handle, "host", updates)

    def _encode_redis(self, job: WriteJob, pages: Sequence[PageInfo]) -> RedisWrite | None:
        """The pages' Redis blocks (read while the job's lock holds them), or None when there
        are none or the sender's backlog has no room for them (counted, not sent)."""
        if not pages:
            return None
        nbytes = self._redis_bytes(len(pages))
        if not self._reserve_backlog(nbytes, len(pages)):
            return None
        try:
            blocks = self._encode(self.tiers.redis_codec, pages, job)
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
            return self.tiers.store_redis(pages, blocks, tokens)
        nbytes = self._redis_bytes(len(pages))
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
            stored = self.tiers.store_redis(write.pages, write.blocks, write.tokens)
            if stored and write.handle is not None:
                with self.tiers.lock:
                    # evicted meanwhile (a stale handle): the lookup's probe finds them by hash
                    with contextlib.suppress(BadRequest):
                        self.tiers.tree.set_location(write.handle, "redis", dict(stored))
                    self.tiers.trim_redis_index()
        except Exception:
            log.exception("Redis write-back failed; pages stay in the device/host tiers")
        finally:
            self._sent(self._redis_bytes(len(write.pages)))

    def _redis_bytes(self, num_pages: int) -> int:
        return num_pages * self.tiers.redis_codec.page_nbytes(self.tiers.layout)

    def _sent(self, nbytes: int) -> None:
        with self._backlog_lock:
            self.redis_backlog_bytes -= nbytes

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued write-backs are done, Redis sends included."""
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
