"""The tree's books: its nodes and the counts kept in step with them (internal to the tree).

``num_nodes``, ``num_pages``, the per-tier totals and the eviction queue describe the nodes
under ``root``. Every change to a node's structure or copies goes through a ``Ledger``
method, so none of them drifts; ``RadixTree.check_integrity()`` recounts them all.
"""

from __future__ import annotations

import itertools

from kvruntime.radix.eviction import EvictionQueue
from kvruntime.radix.hashing import TOKEN_BYTES
from kvruntime.radix.location import TIERS
from kvruntime.radix.node import Node
from kvruntime.radix.policy import EvictionPolicy
from kvruntime.radix.results import Duplicate, PageInfo, RadixStats


class Ledger:
    """A bare root (namespace roots below it, pages below those) and its counts.

    Not thread-safe: the tree's one owner calls it through the tree.
    """

    def __init__(self, page_size: int, policy: EvictionPolicy) -> None:
        self.page_size = page_size
        self.page_bytes = page_size * TOKEN_BYTES
        self.queue = EvictionQueue(policy)
        self._serials = itertools.count()
        self.root = Node(
            None, b"", b"", [[], [], []], exact=0, start=0, now=0.0, serial=next(self._serials)
        )
        self.num_nodes = 0  # page-holding nodes (not the root, not namespace roots)
        self.num_pages = 0
        self.totals = [0, 0, 0]  # pages holding a copy, per tier

    # ---------------------------------------------------------------- growth

    def namespace_root(self, digest: bytes, now: float) -> Node:
        """The root of namespace ``digest``, made (holding no pages) if it has none yet."""
        node = self.root.children.get(digest)
        if node is None:
            node = Node(
                self.root, b"", b"", [[], [], []], exact=0, start=0, now=now,
                serial=next(self._serials),
            )  # fmt: skip
            node.seed = digest
            self.root.add_child(digest, node)
        return node

    def add_child(
        self,
        parent: Node,
        key: bytes,
        hashes: bytes,
        locs: list[list],
        *,
        exact: int,
        start: int,
        now: float,
    ) -> Node:
        """A new node of pages under ``parent`` (the caller checked none of them is cached)."""
        new = Node(
            parent, key, hashes, locs, exact=exact, start=start, now=now,
            serial=next(self._serials),
        )  # fmt: skip
        parent.add_child(new.key[: self.page_bytes], new)
        self.num_nodes += 1
        self.num_pages += new.num_pages
        self.recount(new, fresh=True)
        return new

    def split(self, node: Node, pages: int) -> Node:
        """Move ``node``'s first ``pages`` pages into a new parent node and return it."""
        top = node.split(pages, self.page_bytes, next(self._serials))
        self.num_nodes += 1
        self.queue.touch(top)
        return top

    # ---------------------------------------------------------------- copies

    def recount(self, node: Node, fresh: bool = False) -> None:
        """Bring ``node.counts`` and the per-tier totals up to date with its columns."""
        before = [0, 0, 0] if fresh else node.counts
        node.counts = [len(col) - col.count(None) for col in node.locs]
        for t in range(3):
            self.totals[t] += node.counts[t] - before[t]
        self.queue.touch(node)  # it may hold a tier it did not, or drop more now

    def adopt(
        self, node: Node, columns: list[list], first: int, exact: bool, duplicates: list[Duplicate]
    ) -> None:
        """Fill tiers a cached page lacks from an insert's locations; report the rest."""
        count = len(node.locs[0])
        changed = False
        for t, col in enumerate(columns):
            stored, given = node.locs[t], col[first : first + count]
            if stored == given:
                continue
            for j, value in enumerate(given):
                if value is None or value == stored[j]:
                    continue
                # a copy of other lineage than the page's would mislabel the page's KV
                if stored[j] is None and (j < node.exact) == exact:
                    stored[j] = value
                    changed = True
                else:
                    duplicates.append(Duplicate(first + j, TIERS[t], value))
        if changed:
            self.recount(node)

    # ---------------------------------------------------------------- removal

    def truncate(self, node: Node, pages: int) -> None:
        """Drop ``node``'s last ``pages`` pages (the caller checked nothing depends on them)."""
        node.truncate(pages, self.page_bytes)
        self.num_pages -= pages

    def unlink(self, node: Node, edge: bytes | None = None) -> None:
        """Cut ``node`` (keyed ``edge`` under its parent) loose; drop an emptied namespace."""
        parent = node.parent
        assert parent is not None
        parent.drop_child(node.key[: self.page_bytes] if edge is None else edge)
        if parent.parent is self.root and not parent.children:  # an emptied namespace
            self.root.drop_child(parent.seed)
            parent.alive = False

    def forget(self, node: Node) -> None:
        """``node`` left the tree: take its pages and copies off the books."""
        node.alive = False
        if node.parent is self.root or node is self.root:
            return
        self.num_nodes -= 1
        self.num_pages -= node.num_pages
        for t in range(3):
            self.totals[t] -= node.counts[t]
        self.queue.forget(node)

    def clear(self) -> tuple[PageInfo, ...]:
        """Forget every page (the caller checked none is locked); returns them for release."""
        root = self.root
        forgotten = tuple(info for n in root.walk() for info in n.page_infos())
        for n in list(root.walk()):
            if n is not root:
                self.forget(n)
        root.children.clear()
        root.sorted_keys.clear()
        self.queue.clear()
        return forgotten

    # ---------------------------------------------------------------- figures

    def stats(self) -> RadixStats:
        """The counts, plus the pages under a lock (walks the tree)."""
        nodes = list(self.root.walk())
        return RadixStats(
            namespaces=len(self.root.children),
            nodes=self.num_nodes,
            pages=self.num_pages,
            pages_by_tier=dict(zip(TIERS, self.totals, strict=True)),
            locked_pages=sum(n.num_pages for n in nodes if n.lock_ref),
        )
