"""Eviction bookkeeping: per-tier heaps of nodes in policy order, and what a node can give up.

The heaps persist between ``evict`` calls, so an eviction costs O(changed nodes + popped
nodes x log n) rather than a sort of the whole tree. A node whose priority or copies changed
is only marked (``touch``, a set add on the match path); ``sync`` re-queues the marked nodes
before the next eviction. Outdated heap entries are skipped when popped: only the entry in
``live`` counts.
"""

from __future__ import annotations

import heapq

from kvruntime.radix.node import Node
from kvruntime.radix.policy import EvictionPolicy

Entry = tuple[tuple[float, ...], int, Node]  # (policy priority, node serial, node)


class EvictionQueue:
    def __init__(self, policy: EvictionPolicy) -> None:
        self._policy = policy
        self._heaps: tuple[list[Entry], ...] = ([], [], [])
        self._live: tuple[dict[Node, Entry], ...] = ({}, {}, {})  # node -> its valid entry
        self._dirty: set[Node] = set()

    def touch(self, node: Node) -> None:
        """``node`` is new, or its access statistics or copies changed."""
        self._dirty.add(node)

    def forget(self, node: Node) -> None:
        """``node`` left the tree."""
        self._dirty.discard(node)
        for live in self._live:
            live.pop(node, None)

    def clear(self) -> None:
        self._dirty.clear()
        for heap, live in zip(self._heaps, self._live, strict=True):
            heap.clear()
            live.clear()

    def tracked(self, t: int, node: Node) -> bool:
        """True if ``node`` will be offered by ``pop(t)`` (after the next ``sync``)."""
        return node in self._dirty or node in self._live[t]

    def sync(self) -> None:
        """Queue every touched node in each tier it holds copies in; drop outdated entries."""
        for node in self._dirty:
            for t in range(3):
                if node.counts[t]:
                    self.push(t, node)
        self._dirty.clear()
        for heap, live in zip(self._heaps, self._live, strict=True):
            if len(heap) > 2 * len(live) + 64:  # mostly outdated entries: rebuild
                heap[:] = live.values()
                heapq.heapify(heap)

    def push(self, t: int, node: Node) -> None:
        """(Re)queue ``node`` for tier ``t`` with its current priority."""
        entry = (self._policy.priority(node), node.serial, node)
        self._live[t][node] = entry
        heapq.heappush(self._heaps[t], entry)

    def ensure(self, t: int, node: Node) -> None:
        if node not in self._live[t]:
            self.push(t, node)

    def pop(self, t: int) -> Node | None:
        """The queued node of lowest priority for tier ``t`` (dequeued), or None."""
        heap, live = self._heaps[t], self._live[t]
        while heap:
            entry = heapq.heappop(heap)
            node = entry[2]
            if live.get(node) is entry:
                del live[node]
                return node
        return None


def plan(
    node: Node, t: int, budget: int, tail_free: bool, keep_shared: bool = False
) -> tuple[list[int], int, bool]:
    """What evicting tier ``t`` from ``node`` would do, tail first, up to ``budget`` pages.

    Returns (pages that only lose the tier, trailing pages that leave the tree, whether every
    page leaves). A page leaves only if tier ``t`` holds its last copy and nothing after it
    remains: ``tail_free`` says nothing below the node will (no children, or all leaving).
    ``keep_shared``: pages with a copy elsewhere keep this tier's (no drops).
    """
    col = node.locs[t]
    a, b = (node.locs[u] for u in range(3) if u != t)
    j = len(col) - 1
    removed = 0
    if tail_free:
        while j >= 0 and removed < budget and col[j] is not None and a[j] is None and b[j] is None:
            removed += 1
            j -= 1
    drops: list[int] = []
    if not keep_shared and sum(node.counts) > node.counts[t]:  # copies elsewhere: drops
        while j >= 0 and removed + len(drops) < budget:
            if col[j] is not None and (a[j] is not None or b[j] is not None):
                drops.append(j)
            j -= 1
    return drops, removed, tail_free and removed == len(col)
