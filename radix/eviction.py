"""Eviction: per-tier heaps of nodes in policy order, what a node can give up, and the drop.

The heaps persist between ``evict`` calls, so an eviction costs O(changed nodes + popped
nodes x log n) rather than a sort of the whole tree. A node whose priority or copies changed
is only marked (``touch``, a set add on the match path); ``sync`` re-queues the marked nodes
before the next eviction. Outdated heap entries are skipped when popped: only the entry in
``live`` counts.

``evict`` and ``evictable`` do the work of ``RadixTree.evict`` and ``evictable_pages``.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from kvruntime.radix.node import Node
from kvruntime.radix.policy import EvictionPolicy
from kvruntime.radix.results import EvictedPage

if TYPE_CHECKING:  # the ledger owns a queue, so it imports this module
    from kvruntime.radix.ledger import Ledger

Entry = tuple[tuple[float, ...], int, Node]  # (policy priority, node serial, node)


class EvictionQueue:
    """Per tier, the nodes holding copies there, lowest policy priority first."""

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


def evict(ledger: Ledger, t: int, num_pages: int, sole: bool) -> list[EvictedPage]:
    """Drop up to ``num_pages`` copies from tier ``t``, in policy order, unlocked pages only.

    See ``RadixTree.evict`` (which checked the arguments). Nodes popped but kept (locked, or
    still holding copies) go back in line for later calls.
    """
    freed: list[EvictedPage] = []
    queue = ledger.queue
    queue.sync()
    popped: list[Node] = []
    while len(freed) < num_pages:
        node = queue.pop(t)
        if node is None:
            break
        if not node.alive or not node.counts[t]:
            continue
        popped.append(node)
        if node.lock_ref:
            continue
        budget = num_pages - len(freed)
        drops, removed, _ = plan(node, t, budget, not node.children, keep_shared=sole)
        edge = node.key[: ledger.page_bytes]  # its key under the parent, before truncation
        col = node.locs[t]
        top = node.num_pages
        freed += [
            EvictedPage(node.page_hash(j), col[j], True)
            for j in range(top - 1, top - removed - 1, -1)
        ]
        for j in drops:
            freed.append(EvictedPage(node.page_hash(j), col[j], False))
            col[j] = None
        if removed:
            ledger.truncate(node, removed)
        ledger.recount(node)
        parent = node.parent
        assert parent is not None
        if node.num_pages == 0:
            ledger.unlink(node, edge)
            ledger.forget(node)
            if parent.num_pages and not parent.children and parent.counts[t]:
                queue.push(t, parent)  # its tail may go now: offer it again in this call
    for node in popped:  # back in line, for later calls
        if node.alive and node.counts[t]:
            queue.ensure(t, node)
    return freed


def evictable(root: Node, t: int) -> int:
    """How many copies ``evict`` of tier ``t`` could drop now, for any budget (walks the tree)."""
    whole: dict[int, bool] = {}  # id(node) -> its whole subtree would leave the tree
    total = 0
    for node in reversed(list(root.walk())):
        if not node.num_pages:
            continue
        children_go = all(whole[id(c)] for c in node.children.values())
        if node.lock_ref or not node.counts[t]:
            whole[id(node)] = False
            continue
        drops, removed, gone = plan(node, t, node.num_pages, tail_free=children_go)
        whole[id(node)] = gone
        total += len(drops) + removed
    return total
