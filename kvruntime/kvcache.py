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
import time
from collections.abc import Callable, Sequence

import torch

from kvruntime.commit import Committer
from kvruntime.config import RuntimeConfig
from kvruntime.cost import CostModel
from kvruntime.errors import BadRequest
from kvruntime.kernels.layout import PageLayout
from kvruntime.lookup import Finder, Lookup, tenant_salt
from kvruntime.radix import Handle, Namespace
from kvruntime.restore import Restored, Restorer
from kvruntime.tiers import Tiers


class KVCache:
    """Thread-safe: one lock guards the index, the allocator and the host tier's books.
    The three steps of a turn live in their own modules: ``lookup.Finder``,
    ``restore.Restorer``, ``commit.Committer``."""

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
        self.tiers = Tiers(layout, config, clock)
        # the same objects, named here for the turn's code and for tests
        self.tree, self.pool = self.tiers.tree, self.tiers.pool
        self.host, self.redis = self.tiers.host, self.tiers.redis
        self.host_codec, self.redis_codec = self.tiers.host_codec, self.tiers.redis_codec
        self._lock = self.tiers.lock
        self._finder = Finder(self.tiers, layout, config, cost)
        self._restorer = Restorer(self.tiers, layout, clock)
        self._committer = Committer(self.tiers, layout)

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
        return self._finder.find(tokens, self.namespace(tenant), exact_only)

    def restore(
        self, found: Lookup, device: torch.device, dtype: torch.dtype, layered: bool = False
    ) -> Restored:
        """The chosen pages on the engine's device (``restore.Restorer.restore``); a page that
        is gone or fails verification shortens the prefix."""
        return self._restorer.restore(found, device, dtype, layered)

    def commit(
        self,
        found: Lookup,
        token_ids: Sequence[int],
        export: Callable[[int, int], torch.Tensor],
    ) -> dict[str, int]:
        """Cache the whole pages of ``token_ids`` (``commit.Committer.commit``); returns bytes
        queued for write-back per tier. Never raises for lack of space."""
        return self._committer.commit(found, token_ids, export)

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
