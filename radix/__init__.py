"""kvruntime.radix: the token prefix tree (token prefixes -> pages -> tier locations).

Knows nothing of tensors, GPUs, Redis or requests: it records where pages live and hands
back what it evicted; callers own the memory.
"""

from __future__ import annotations

from kvruntime.radix.config import RadixConfig
from kvruntime.radix.hashing import (
    HASH_BYTES,
    Namespace,
    decode_tokens,
    encode_tokens,
    page_hashes,
    storage_key,
)
from kvruntime.radix.location import TIERS, PageLocation
from kvruntime.radix.policy import POLICIES, EvictionPolicy
from kvruntime.radix.results import (
    Duplicate,
    EvictedPage,
    EvictResult,
    Handle,
    InsertResult,
    MatchResult,
    PageInfo,
    RadixStats,
)
from kvruntime.radix.tree import RadixTree

__all__ = [
    "HASH_BYTES",
    "POLICIES",
    "TIERS",
    "Duplicate",
    "EvictResult",
    "EvictedPage",
    "EvictionPolicy",
    "Handle",
    "InsertResult",
    "MatchResult",
    "Namespace",
    "PageInfo",
    "PageLocation",
    "RadixConfig",
    "RadixStats",
    "RadixTree",
    "decode_tokens",
    "encode_tokens",
    "page_hashes",
    "storage_key",
]
