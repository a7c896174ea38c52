"""A bounded queue in front of the engine: one worker runs turns one at a time, so sessions
driven from many threads get the same results as run one by one; a full queue raises
``Overloaded`` at once instead of growing memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from kvruntime.errors import KVRuntimeError, Overloaded

T = TypeVar("T")


class TurnQueue:
    def __init__(self, max_queue: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.max_queue = max_queue
        self._clock = clock
        self._slots = threading.BoundedSemaphore(max_queue)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvr-engine")
        self._closed = False
        self._engine_thread: int | None = None

    def submit(self, fn: Callable[[float], T]) -> Future[T]:
        """Queue ``fn(queue_wait_s)``. Raises ``Overloaded`` when ``max_queue`` turns are
        already waiting or running; never blocks."""
        if self._closed:
            raise KVRuntimeError("runtime is closed")
        if not self._slots.acquire(blocking=False):
            raise Overloaded(f"{self.max_queue} turns are already queued; retry later")
        submitted = self._clock()

        def run() -> T:
            self._engine_thread = threading.get_ident()
            try:
                return fn(self._clock() - submitted)
            finally:
                self._slots.release()

        try:
            return self._pool.submit(run)
        except RuntimeError as exc:  # executor shut down between the check and the submit
            self._slots.release()
            raise KVRuntimeError("runtime is closed") from exc

    def call(self, fn: Callable[[float], T]) -> T:
        """Submit and wait. Called from the engine thread itself (a nested turn) it runs inline,
        which would otherwise deadlock."""
        if threading.get_ident() == self._engine_thread:
            return fn(0.0)
        return self.submit(fn).result()

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
