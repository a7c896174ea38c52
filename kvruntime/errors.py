"""The one error hierarchy of kvruntime.

Every layer (radix, kernels, store, runtime, server) raises these, so a caller can catch
``KVRuntimeError`` for anything kvruntime-specific. This module imports nothing of the
project, so any layer may use it without breaking the one-way dependency rule.
"""

from __future__ import annotations


class KVRuntimeError(Exception):
    """Base of every error kvruntime raises on purpose."""


class BadRequest(KVRuntimeError, ValueError):
    """The caller passed something invalid; the message says what and what is allowed."""


class ConfigError(BadRequest):
    """A config dataclass was given an invalid field value."""


class UnknownName(BadRequest, KeyError):
    """A registry lookup (codec, tier, eviction policy, model alias) found no such name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CapacityError(KVRuntimeError):
    """A pool, tier or queue is full and nothing could be freed."""


class Overloaded(CapacityError):
    """The runtime's bounded queue is full; retry later (HTTP 503)."""


class StoreUnavailable(KVRuntimeError):
    """A storage backend (Redis) could not be reached in time. Tiers turn it into misses."""


class CorruptPage(KVRuntimeError):
    """A stored page failed verification (magic, version, checksum, tokens, shape).

    Never returned as data: callers treat it as a miss and recompute.
    """
