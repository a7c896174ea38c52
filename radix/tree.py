"""The token prefix tree: longest cached prefix, insert, locks, per-tier eviction.

The tree maps token prefixes to page locations and nothing else: it never allocates, copies
or frees KV. Only whole pages are stored. Nodes (node.py) hold compressed runs of pages and
split where a prompt diverges; handles (never nodes) are handed out. The nodes and the counts
kept over them live in a ledger (ledger.py); eviction's order and work are in eviction.py.

Costs: ``match`` and ``insert`` convert the prompt to bytes once and compare whole runs with
memcmp, never token by token; hashes are computed at insert only, for new pages. ``evict``
keeps its policy-ordered heaps between calls (see eviction.py), so it costs O(nodes touched
since the last call + nodes popped), not a sort of the tree. ``evictable_pages``, ``stats``
and ``check_integrity`` walk everything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from kvruntime.errors import BadRequest
from kvruntime.radix.config import RadixConfig
from kvruntime.radix.eviction import evict, evictable
from kvruntime.radix.hashing import TOKEN_BYTES, Namespace, chain_blob, encode_tokens
from kvruntime.radix.integrity import check_tree
from kvruntime.radix.ledger import Ledger
from kvruntime.radix.location import TIERS, PageLocation, check_value, tier_index, to_columns
from kvruntime.radix.node import Node
from kvruntime.radix.policy import POLICIES
from kvruntime.radix.prefix import common_prefix, descend
from kvruntime.radix.results import (
    Duplicate,
    EvictResult,
    Handle,
    InsertResult,
    MatchResult,
    PageInfo,
    RadixStats,
)


class RadixTree:
    """Token prefixes -> whole pages -> locations in the device, host and Redis tiers.

    Not thread-safe: one owner (the runtime's scheduler) calls it. Every method either
    succeeds or raises before changing anything.
    """

    def __init__(self, config: RadixConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._books = Ledger(config.page_size, POLICIES.get(config.eviction))
        self._page_bytes = self._books.page_bytes
        self._root = self._books.root  # the same node for the tree's life (clear empties it)

    # ---------------------------------------------------------------- queries

    def match(
        self,
        tokens: Iterable[int],
        namespace: Namespace | None = None,
        *,
        exact_only: bool = False,
    ) -> MatchResult:
        """Longest cached prefix of ``tokens``; ``exact_only`` stops before approximate pages.

        Changes: the matched nodes' access time and hit count (eviction order); a node the
        prefix ends inside is split so the handle covers exactly the cached pages.
        """
        enc = encode_tokens(tokens)
        ns_root = self._root.children.get(self._namespace(namespace).digest)
        path, matched = descend(ns_root, enc, self._page_bytes, exact_only)
        if path and path[-1][1] < path[-1][0].num_pages:
            last, pages = path[-1]
            path[-1] = (self._books.split(last, pages), pages)
        now = self._clock()
        nodes = [node for node, _ in path]
        touch = self._books.queue.touch
        for node in nodes:
            node.last_access = now
            node.hits += 1
            touch(node)
        device: list[int | None] = []
        host: list[int | None] = []
        redis: list[str | None] = []
        for node in nodes:
            device += node.locs[0]
            host += node.locs[1]
            redis += node.locs[2]
        num_pages = len(device)
        return MatchResult(
            matched_tokens=matched // TOKEN_BYTES,
            cached_tokens=num_pages * self.config.page_size,
            handle=self._handle(nodes[-1] if nodes else self._root),
            hash_blob=b"".join(node.hashes for node in nodes),
            device=tuple(device),
            host=tuple(host),
            redis=tuple(redis),
            num_exact=sum(node.exact for node in nodes),
        )

    def pages(self, handle: Handle) -> tuple[PageInfo, ...]:
        """Every page of a handle's prefix, first to last (no access-time change)."""
        node: Node | None = self._node_of(handle)
        chunks = []
        while node is not None and node.num_pages:
            chunks.append(node.page_infos())
            node = node.parent
        return tuple(info for chunk in reversed(chunks) for info in chunk)

    # ---------------------------------------------------------------- changes

    def insert(
        self,
        tokens: Iterable[int],
        locations: Sequence[PageLocation],
        namespace: Namespace | None = None,
        *,
        exact: bool = True,
    ) -> InsertResult:
        """Cache the whole pages of ``tokens``; ``locations[i]`` holds page i (one per page).

        Pages already cached keep their locations; a tier they lack is filled from the given
        location when its lineage matches, and every given value the tree did not keep comes
        back in ``duplicates`` for the caller to free. New pages below an approximate page are
        approximate whatever ``exact`` says. Raises BadRequest (tree unchanged) on a wrong
        number of locations, a location with no copy, or a bad value.
        """
        enc = encode_tokens(tokens)
        ns = self._namespace(namespace)
        pb, ps = self._page_bytes, self.config.page_size
        num_pages = len(enc) // pb
        if len(locations) != num_pages:
            raise BadRequest(
                f"insert got {len(locations)} locations for {num_pages} whole pages "
                f"({len(enc) // TOKEN_BYTES} tokens, page_size {ps}); give one per whole page"
            )
        if num_pages == 0:
            return InsertResult(self._handle(self._root), 0, 0, b"", 0, ())
        columns = to_columns(locations)
        now = self._clock()
        books = self._books
        node = books.namespace_root(ns.digest, now)
        node.last_access = now
        end = num_pages * pb
        pos = 0
        duplicates: list[Duplicate] = []
        while pos < end:
            child = node.children.get(enc[pos : pos + pb])
            if child is None:
                break
            klen = len(child.key)
            if pos + klen <= end and enc[pos : pos + klen] == child.key:
                pages = klen // pb
            else:  # diverges inside the node, or the prompt ends there: split
                pages = common_prefix(child.key, enc[pos:end]) // pb
                child = books.split(child, pages)
            books.adopt(child, columns, pos // pb, exact, duplicates)
            child.last_access = now
            books.queue.touch(child)
            pos += pages * pb
            node = child
        num_existing = pos // pb
        if pos < end:
            first = num_existing
            lineage = num_pages - first if exact and (node.fully_exact) else 0
            node = books.add_child(
                node,
                enc[pos:end],
                chain_blob(node.last_hash, memoryview(enc)[pos:end], ps),
                [col[first:] for col in columns],
                exact=lineage,
                start=first,
                now=now,
            )
        chain = node.path()
        return InsertResult(
            handle=self._handle(node),
            num_existing=num_existing,
            num_new=num_pages - num_existing,
            hash_blob=b"".join(n.hashes for n in chain),
            num_exact=sum(n.exact for n in chain),
            duplicates=tuple(duplicates),
        )

    def lock(self, handle: Handle) -> None:
        """Protect the handle's pages (and their prefix) from eviction and removal."""
        self._node_of(handle).pin()

    def unlock(self, handle: Handle) -> None:
        """Undo one ``lock`` of this handle; more unlocks than locks raise BadRequest."""
        node = self._node_of(handle)
        if node.pins == 0:
            raise BadRequest(f"unlock of {handle!r} without a matching lock")
        node.unpin()

    def set_location(
        self, handle: Handle, tier: str, updates: Mapping[int, int | str | None]
    ) -> dict[int, int | str | None]:
        """Record ``tier`` copies of pages of a handle's prefix: ``{page index: value}``.

        Returns the previous values (a replaced value is the caller's to free). None removes
        a tier's copy, but never the last copy of a page: use ``remove`` for that.
        """
        node = self._node_of(handle)
        t = tier_index(tier)
        plan: list[tuple[Node, int, int | str | None]] = []
        for index in updates:
            if type(index) is not int or not 0 <= index < handle.num_pages:
                raise BadRequest(f"page index {index!r} outside the handle's {handle.num_pages}")
            check_value(t, updates[index])
        for index in sorted(updates, reverse=True):
            while node.start > index:
                assert node.parent is not None
                node = node.parent
            j, value = index - node.start, updates[index]
            if value is None and all(node.locs[u][j] is None for u in range(3) if u != t):
                raise BadRequest(f"page {index} would be left without a copy; use remove()")
            plan.append((node, j, value))
        old: dict[int, int | str | None] = {}
        for node, j, value in plan:
            old[node.start + j] = node.locs[t][j]
            node.locs[t][j] = value
        for node in {id(n): n for n, _, _ in plan}.values():
            self._books.recount(node)
        return old

    def evict(self, tier: str, num_pages: int, *, sole: bool = False) -> EvictResult:
        """Drop up to ``num_pages`` copies from ``tier``, in policy order, unlocked pages only.

        A page with a copy in another tier only loses this tier's; a page left with no copy
        leaves the tree, which only happens once nothing below it remains. ``sole`` drops
        only such pages (whose last copy is in ``tier``), so copies held elsewhere keep this
        tier's too. Returns what was dropped; the caller releases those values (device
        pages, host slots, Redis keys).
        """
        t = tier_index(tier)
        if type(num_pages) is not int or num_pages < 0:
            raise BadRequest(f"num_pages must be an int >= 0, got {num_pages!r}")
        return EvictResult(TIERS[t], tuple(evict(self._books, t, num_pages, sole)))

    def remove(self, handle: Handle, start: int) -> tuple[PageInfo, ...]:
        """Forget page ``start`` of a handle's prefix and everything cached after it.

        For pages found corrupt or dropped by their tier. Raises BadRequest if any of them is
        locked. Returns the forgotten pages; the caller releases their copies.
        """
        node = self._node_of(handle)
        if type(start) is not int or not 0 <= start < handle.num_pages:
            raise BadRequest(f"start {start!r} outside the handle's {handle.num_pages} pages")
        while node.start > start:
            assert node.parent is not None
            node = node.parent
        if node.lock_ref:
            raise BadRequest(f"pages from {start} on are locked")
        if start > node.start:
            self._books.split(node, start - node.start)
        subtree = list(node.walk())
        self._books.unlink(node)
        for n in subtree:
            self._books.forget(n)
        return tuple(info for n in subtree for info in n.page_infos())

    def clear(self) -> tuple[PageInfo, ...]:
        """Forget every page (BadRequest if any is locked); returns them for release."""
        if self._root.lock_ref:
            raise BadRequest("clear() with locked pages")
        return self._books.clear()

    # ---------------------------------------------------------------- figures

    @property
    def num_pages(self) -> int:
        return self._books.num_pages

    @property
    def num_nodes(self) -> int:
        return self._books.num_nodes

    def pages_in(self, tier: str) -> int:
        """Pages holding a copy in ``tier``."""
        return self._books.totals[tier_index(tier)]

    def evictable_pages(self, tier: str) -> int:
        """How many copies ``evict(tier, n)`` could drop now, for any n (walks the tree)."""
        return evictable(self._root, tier_index(tier))

    def stats(self) -> RadixStats:
        """Namespaces, nodes, pages, pages per tier and locked pages (walks the tree)."""
        return self._books.stats()

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (walks the whole tree)."""
        check_tree(self._books)

    # ---------------------------------------------------------------- internals

    def _namespace(self, namespace: Namespace | None) -> Namespace:
        ns = namespace or self.config.namespace
        if not isinstance(ns, Namespace):
            raise BadRequest("no namespace: pass namespace= or set RadixConfig.namespace")
        return ns

    def _handle(self, node: Node) -> Handle:
        return Handle(self, node, node.end, node.end * self.config.page_size)

    def _node_of(self, handle: Handle) -> Node:
        if not isinstance(handle, Handle) or handle._owner is not self:
            raise BadRequest(f"{handle!r} is not a handle of this tree")
        node = handle._node
        if not node.alive or node.end != handle.num_pages:
            raise BadRequest(f"{handle!r} is stale: its pages left the tree; match again")
        return node
