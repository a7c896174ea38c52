"""Background write-back: pages of finished turns go to the host tier and Redis on their own
threads, so storing never blocks the next token.

A ``WriteJob`` (a committed turn's pages, locked) runs on the write-back thread: it fills the
host tier and encodes the Redis blocks, then unlocks the pages. The encoded blocks go on as a
``RedisWrite`` to a second thread that sends them, so a slow Redis never keeps pages locked
(which would stop the device pool and the host tier from evicting them)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from kvruntime.radix import Handle, PageInfo

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
