"""Eviction order: which unlocked pages leave a tier first.

A policy maps a tree node's access statistics to a priority; the smallest priority is evicted
first (ties: the older node). All pages of one node share its statistics, and a node is always
touched together with its ancestors, so lru, lfu and fifo order a parent no earlier than its
children: leaves go before the prefixes they extend. Whatever the policy, a page whose
descendants stay cached can only lose a tier's copy when another tier still holds one.
Choose one by name through ``POLICIES``; register your own with ``POLICIES.add(name, obj)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvruntime.registry import Registry


class PolicyNode(Protocol):
    """What a policy may read of a node."""

    @property
    def last_access(self) -> float: ...  # clock time of the last match or insert through it

    @property
    def hits(self) -> int: ...  # matches that reused it

    @property
    def created(self) -> float: ...  # clock time its pages were first inserted


class EvictionPolicy(Protocol):
    def priority(self, node: PolicyNode) -> tuple[float, ...]:
        """Sort key; smaller is evicted sooner. Must not change the node."""
        ...


@dataclass(frozen=True)
class LRU:
    """Least recently used first (the default)."""

    def priority(self, node: PolicyNode) -> tuple[float, ...]:
        return (node.last_access,)


@dataclass(frozen=True)
class LFU:
    """Fewest hits first; among equals, least recently used."""

    def priority(self, node: PolicyNode) -> tuple[float, ...]:
        return (node.hits, node.last_access)


@dataclass(frozen=True)
class FIFO:
    """Oldest insert first, whatever its use."""

    def priority(self, node: PolicyNode) -> tuple[float, ...]:
        return (node.created,)


@dataclass(frozen=True)
class MRU:
    """Most recently used first (scans that will not come back)."""

    def priority(self, node: PolicyNode) -> tuple[float, ...]:
        return (-node.last_access,)


POLICIES: Registry[EvictionPolicy] = Registry("eviction policy")
POLICIES.add("lru", LRU())
POLICIES.add("lfu", LFU())
POLICIES.add("fifo", FIFO())
POLICIES.add("mru", MRU())
