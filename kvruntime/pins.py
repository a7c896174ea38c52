"""Tool-call waits: a session's cached pages pinned on the device until a deadline.

Pins expire lazily against the runtime's clock (checked at every turn and ``stats``), so a
test with an injected clock sees them expire exactly. An expired pin unlocks the pages; they
are then demoted like any others, not dropped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvruntime.kvcache import KVCache
from kvruntime.radix import Handle


@dataclass
class Pin:
    handle: Handle
    tokens: int
    deadline: float


class PinTable:
    def __init__(self, cache: KVCache, clock: Callable[[], float]) -> None:
        self._cache = cache
        self._clock = clock
        self._pins: dict[str, Pin] = {}
        self._lock = threading.Lock()

    def pin(self, session_id: str, tenant: str, tokens: Sequence[int], ttl_s: float) -> int:
        self.unpin(session_id)
        handle = self._cache.pin(tokens, tenant)
        if handle is None:
            return 0
        with self._lock:
            self._pins[session_id] = Pin(handle, handle.num_tokens, self._clock() + ttl_s)
        return handle.num_tokens

    def unpin(self, session_id: str) -> None:
        with self._lock:
            pin = self._pins.pop(session_id, None)
        if pin is not None:
            self._cache.unpin(pin.handle)

    def expire(self) -> int:
        now = self._clock()
        with self._lock:
            done = [sid for sid, p in self._pins.items() if p.deadline <= now]
            pins = [self._pins.pop(sid) for sid in done]
        for p in pins:
            self._cache.unpin(p.handle)
        return len(pins)

    def pinned(self) -> dict[str, int]:
        with self._lock:
            return {sid: p.tokens for sid, p in self._pins.items()}
