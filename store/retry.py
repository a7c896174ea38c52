"""Retry and backoff strategy for store connections.

Two small pieces, both with injected time so tests are exact:

- ``RetryGate`` remembers consecutive failures of one endpoint and says when the next attempt
  is allowed. A tier consults it before dialling, so a dead server costs one connect timeout
  per backoff period instead of one per call, and the tier recovers by itself once an attempt
  after the backoff succeeds.
- ``retry_call`` runs a blocking operation a few times with backoff sleeps in between, bounded
  by a deadline (control-plane work such as waiting for a server to come up).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kvruntime.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``base_s * factor**(n-1)`` after ``n`` failures, capped at
    ``cap_s``; ``jitter`` spreads each delay by up to that fraction (0 = exact delays)."""

    base_s: float = 0.05
    factor: float = 2.0
    cap_s: float = 5.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < self.base_s:
            raise ConfigError(
                f"Backoff needs 0 <= base_s <= cap_s, got {self.base_s}, {self.cap_s}"
            )
        if self.factor < 1.0:
            raise ConfigError(f"Backoff.factor must be >= 1, got {self.factor}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"Backoff.jitter must be in [0, 1], got {self.jitter}")

    def delay(self, failures: int, rand: float = 0.5) -> float:
        """Seconds to wait after ``failures`` consecutive failures (0 failures: no wait).
        ``rand`` in [0, 1) picks the point inside the jitter band."""
        if failures <= 0:
            return 0.0
        exact = min(self.cap_s, self.base_s * self.factor ** min(failures - 1, 64))
        return exact * (1.0 + self.jitter * (2.0 * rand - 1.0))


class RetryGate:
    """Consecutive-failure state of one endpoint. Thread-safe.

    ``ready()`` is true while no failure is pending or once the backoff delay since the last
    failure has passed; ``failure()`` pushes the next attempt out; ``success()`` resets.
    """

    def __init__(
        self,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.backoff = backoff
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._failures = 0
        self._not_before = 0.0

    @property
    def failures(self) -> int:
        return self._failures

    def ready(self) -> bool:
        with self._lock:
            return self._failures == 0 or self._clock() >= self._not_before

    def retry_in(self) -> float:
        """Seconds until ``ready()`` turns true (0 when it already is)."""
        with self._lock:
            return 0.0 if self._failures == 0 else max(0.0, self._not_before - self._clock())

    def failure(self) -> float:
        """Record a failed attempt; returns the delay before the next one is allowed."""
        with self._lock:
            self._failures += 1
            wait = self.backoff.delay(self._failures, self._rng())
            self._not_before = self._clock() + wait
            return wait

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._not_before = 0.0


def retry_call(
    fn: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff,
    deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it returns, sleeping per ``backoff`` after each exception listed in
    ``retry_on``. Blocks for at most about ``deadline_s``; then the last exception propagates
    (exceptions not in ``retry_on`` propagate at once)."""
    end = clock() + deadline_s
    failures = 0
    while True:
        try:
            return fn()
        except retry_on:
            failures += 1
            left = end - clock()
            if left <= 0:
                raise
            sleep(min(left, backoff.delay(failures)))
