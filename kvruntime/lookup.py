"""Lookup: what a prompt can reuse, from which tier, and whether restoring it beats recomputing.

``Finder.find`` matches the prompt against the radix index, locks the matched prefix for the
turn, checks that tree pages held only by Redis are still there (one EXISTS batch), probes
Redis for pages past the local tree (stored by another process, or by an earlier life of
this one), and keeps the longest prefix whose tiers the cost model says are worth reading.
Tenants' keys are salted (``tenant_salt``) so one tenant can neither compute nor recognise
another's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvruntime.config import RuntimeConfig
from kvruntime.cost import CostModel, Decision
from kvruntime.errors import BadRequest
from kvruntime.kernels.layout import PageLayout
from kvruntime.radix import Handle, MatchResult, Namespace, storage_key
from kvruntime.radix import page_hashes as chain_hashes
from kvruntime.tiers import Tiers

_TENANT_PERSON = b"kvr-tenant-v1"  # keeps tenant salts apart from every other blake2b use


@dataclass
class Lookup:
    """What a prompt can reuse. ``sources[i]`` says where page i is read from."""

    namespace: Namespace
    tokens: list[int]
    match: MatchResult
    handle: Handle | None  # locked while the turn runs
    sources: list[tuple[str, int | str]] = field(default_factory=list)  # (tier, value)
    redis_hashes: list[bytes] = field(default_factory=list)  # pages past the tree, in Redis
    decisions: list[Decision] = field(default_factory=list)
    exact_only: bool = False
    lossy_from: int | None = None  # first page restored through a lossy codec
    # tree pages read from Redis, {index: key}; and those whose value was found gone or bad
    tree_redis: dict[int, str] = field(default_factory=dict)
    stale: dict[int, str] = field(default_factory=dict)

    @property
    def num_pages(self) -> int:
        return len(self.sources)


class Finder:
    """Finds and locks the reusable prefix of a prompt (``KVCache.lookup``). Uses the tiers'
    lock for the index; never raises for tier faults."""

    def __init__(
        self,
        tiers: Tiers,
        layout: PageLayout,
        config: RuntimeConfig,
        cost: CostModel,
    ) -> None:
        self.tiers, self.layout, self.config, self.cost = tiers, layout, config, cost
        self.tree, self.host, self.redis = tiers.tree, tiers.host, tiers.redis
        self.host_codec, self.redis_codec = tiers.host_codec, tiers.redis_codec
        self._lock = tiers.lock

    def find(self, tokens: Sequence[int], ns: Namespace, exact_only: bool = False) -> Lookup:
        """Find the reusable prefix of ``tokens`` (whole pages, at most ``len - 1`` tokens, so
        the engine computes at least the last one) and lock it. Never raises for tier faults."""
        tokens = list(tokens)
        P = self.layout.page_size
        limit = (len(tokens) - 1) // P  # pages that may be reused
        with self._lock:
            self.tiers.forget_redis_after_outage()
            match = self.tree.match(tokens, ns, exact_only=exact_only)
            handle = match.handle if match.num_pages else None
            if handle is not None:
                self.tree.lock(handle)
        found = Lookup(ns, tokens, match, handle, exact_only=exact_only)
        pages: list[tuple[str, int | str, bool]] = []  # (tier, value, lossy)
        for i, loc in enumerate(match.locations[:limit]):
            exact_page = i < match.num_exact
            if loc.device is not None:
                pages.append(("device", loc.device, False))
            elif (
                loc.host is not None
                and self.host is not None
                and not (exact_only and not self.host_codec.lossless)
            ):
                pages.append(("host", loc.host, not self.host_codec.lossless and exact_page))
            elif (
                loc.redis is not None
                and self.redis is not None
                and not (exact_only and not self.redis_codec.lossless)
            ):
                pages.append(("redis", loc.redis, not self.redis_codec.lossless and exact_page))
            else:
                break
        pages = self._check_redis(found, pages)
        if len(pages) == match.num_pages and len(pages) < limit and self.redis is not None:
            pages += self._probe_redis(found, tokens, len(pages), limit)
        self._decide(found, pages)
        found.tree_redis = {
            i: str(value)
            for i, (tier, value) in enumerate(found.sources[: match.num_pages])
            if tier == "redis"
        }
        return found

    def _check_redis(
        self, found: Lookup, pages: list[tuple[str, int | str, bool]]
    ) -> list[tuple[str, int | str, bool]]:
        """Cut ``pages`` before the first tree page whose Redis value is gone (evicted,
        expired, lost with a restart): one EXISTS batch, so a lost page is neither read nor
        trusted. Such pages go to ``found.stale``; commit and release drop their locations."""
        at = [i for i, (tier, _, _) in enumerate(pages) if tier == "redis"]
        if not at or self.redis is None:
            return pages
        present = self.redis.exists_many([str(pages[i][1]) for i in at])
        missing = [i for i, ok in zip(at, present, strict=True) if not ok]
        if not missing:
            return pages
        found.stale.update({i: str(pages[i][1]) for i in missing})
        return pages[: missing[0]]

    def _probe_redis(
        self, found: Lookup, tokens: list[int], start: int, limit: int
    ) -> list[tuple[str, int | str, bool]]:
        """Pages past the local tree that another process (or an earlier life of this one)
        stored in Redis: exact keys first, approximate ones where allowed."""
        assert self.redis is not None
        if self.redis_codec.lossless is False and found.exact_only:
            return []
        P = self.layout.page_size
        parent = found.match.page_hashes[start - 1] if start else None
        hashes = chain_hashes(found.namespace, tokens[start * P : limit * P], P, parent=parent)
        exact_chain = start == 0 or found.match.num_exact == found.match.num_pages
        out: list[tuple[str, int | str, bool]] = []
        if exact_chain:
            keys = [storage_key(h, self.redis_codec.name, True) for h in hashes]
            hits = self.redis.leading_hits(keys)
            out += [("redis", k, not self.redis_codec.lossless) for k in keys[:hits]]
        if not found.exact_only and len(out) < len(hashes):
            rest = hashes[len(out) :]
            keys = [storage_key(h, self.redis_codec.name, False) for h in rest]
            hits = self.redis.leading_hits(keys)
            out += [("redis", k, False) for k in keys[:hits]]
            if hits and found.lossy_from is None:
                found.lossy_from = start + len(out) - hits  # approximate lineage from here
        found.redis_hashes = hashes[: len(out)]
        return out

    def _decide(self, found: Lookup, pages: list[tuple[str, int | str, bool]]) -> None:
        """Keep the longest prefix whose tiers are each worth restoring (cost model)."""
        P = self.layout.page_size
        counts = dict.fromkeys(("host", "redis"), 0)
        for tier, _, _ in pages:
            if tier in counts:
                counts[tier] += 1
        allowed = {"device"}
        for tier, n in counts.items():
            if not n:
                continue
            codec = self.host_codec if tier == "host" else self.redis_codec
            nbytes = n * codec.page_nbytes(self.layout)
            min_tokens = self.config.min_redis_hit_tokens if tier == "redis" else 0
            decision = self.cost.decide(tier, n * P, nbytes, min_tokens)
            found.decisions.append(decision)
            if decision.rehydrate:
                allowed.add(tier)
        for i, (tier, value, lossy) in enumerate(pages):
            if tier not in allowed:
                break
            found.sources.append((tier, value))
            if lossy and found.lossy_from is None:
                found.lossy_from = i
        if found.match.num_exact < min(found.match.num_pages, len(found.sources)):
            # approximate pages in the tree: lineage already approximate from there on
            first_approx = found.match.num_exact
            if found.lossy_from is None or first_approx < found.lossy_from:
                found.lossy_from = first_approx
        found.redis_hashes = found.redis_hashes[
            : max(0, len(found.sources) - found.match.num_pages)
        ]


def tenant_salt(secret: bytes, tenant: str) -> bytes:
    """A tenant's 16-byte salt: blake2b of its name keyed with ``secret`` (a secret longer
    than blake2b's 64-byte key is hashed first). Raises BadRequest for a non-str tenant."""
    if not isinstance(tenant, str):
        raise BadRequest(f"tenant must be a str, got {type(tenant).__name__}")
    key = secret if len(secret) <= 64 else hashlib.blake2b(secret).digest()
    h = hashlib.blake2b(tenant.encode(), key=key, digest_size=16, person=_TENANT_PERSON)
    return h.digest()
