"""The token prefix tree: longest cached prefix, insert, locks, per-tier eviction.

The tree maps token prefixes to page locations and nothing else: it never allocates, copies
or frees KV. Only whole pages are stored. Nodes hold compressed runs of pages and split where
a prompt diverges; handles (never nodes) are handed out.

Costs: ``match`` and ``insert`` convert the prompt to bytes once and compare whole runs with
memcmp, never token by token; hashes are computed at insert only, for new pages. ``evict``
keeps its policy-ordered heaps between calls (see eviction.py), so it costs O(nodes touched
since the last call + nodes popped), not a sort of the tree. ``evictable_pages``, ``stats``
and ``check_integrity`` walk everything.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from kvruntime.errors import BadRequest
from kvruntime.radix.config import RadixConfig
from kvruntime.radix.eviction import EvictionQueue, plan
from kvruntime.radix.hashing import TOKEN_BYTES, Namespace, chain_blob, encode_tokens
from kvruntime.radix.integrity import check_tree
from kvruntime.radix.location import (
    NOWHERE,
    TIERS,
    PageLocation,
    check_column,
    check_value,
    tier_index,
)
from kvruntime.radix.node import Node
from kvruntime.radix.policy import POLICIES
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


def _lcp(a: bytes, b: bytes) -> int:
    """Length in bytes of the common prefix of ``a`` and ``b``, by bisection over memcmp."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo]; the first difference lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RadixTree:
    """Token prefixes -> whole pages -> locations in the device, host and Redis tiers.

    Not thread-safe: one owner (the runtime's scheduler) calls it. Every method either
    succeeds or raises before changing anything.
    """

    def __init__(self, config: RadixConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._policy = POLICIES.get(config.eviction)
        self._page_bytes = config.page_size * TOKEN_BYTES
        self._serials = itertools.count()
        self._root = self._new_node(None, b"", b"", [[], [], []], exact=0, start=0, now=0.0)
        self._num_nodes = 0  # page-holding nodes (not the root, not namespace roots)
        self._num_pages = 0
        self._totals = [0, 0, 0]  # pages holding a copy, per tier
        self._queue = EvictionQueue(self._policy)

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
        pb = self._page_bytes
        path: list[tuple[Node, int]] = []  # (node, pages of it matched)
        pos = matched = 0
        node = ns_root
        while node is not None:
            probe = enc[pos : pos + pb]
            child = node.children.get(probe) if len(probe) == pb else None
            if child is None:  # diverges at a node boundary: closest sibling key by bisection
                keys = node.sorted_keys
                i = bisect.bisect_left(keys, probe)
                best = max(
                    (_lcp(keys[k], probe) for k in (i - 1, i) if 0 <= k < len(keys)), default=0
                )
                matched = pos + best
                break
            klen = len(child.key)
            if enc[pos : pos + klen] == child.key:
                path.append((child, klen // pb))
                pos += klen
                node = child
                continue
            common = _lcp(child.key, enc[pos : pos + klen])
            path.append((child, common // pb))
            pos += common // pb * pb
            matched = pos + common % pb
            break
        if exact_only:
            for i, (node, pages) in enumerate(path):
                if node.exact < pages:
                    path[i:] = [(node, node.exact)] if node.exact else []
                    break
        if path and path[-1][1] < path[-1][0].num_pages:
            last, pages = path[-1]
            path[-1] = (self._split(last, pages), pages)
        now = self._clock()
        nodes = [node for node, _ in path]
        touch = self._queue.touch
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
            chunks.append(self._page_infos(node))
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
        if set(map(type, locations)) != {PageLocation}:
            raise BadRequest("insert locations must be PageLocation values")
        if NOWHERE in locations:
            bad = next(i for i, loc in enumerate(locations) if loc == NOWHERE)
            raise BadRequest(f"location of page {bad} names no tier")
        columns = [list(col) for col in zip(*locations, strict=True)]
        for t, col in enumerate(columns):
            check_column(t, col)
        now = self._clock()
        node = self._root.children.get(ns.digest)
        if node is None:
            node = self._new_node(self._root, b"", b"", [[], [], []], exact=0, start=0, now=now)
            node.seed = ns.digest
            self._root.add_child(ns.digest, node)
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
                pages = _lcp(child.key, enc[pos:end]) // pb
                child = self._split(child, pages)
            self._adopt(child, columns, pos // pb, exact, duplicates)
            child.last_access = now
            self._queue.touch(child)
            pos += pages * pb
            node = child
        num_existing = pos // pb
        if pos < end:
            first = num_existing
            lineage = num_pages - first if exact and (node.fully_exact) else 0
            new = self._new_node(
                node,
                enc[pos:end],
                chain_blob(node.last_hash, memoryview(enc)[pos:end], ps),
                [col[first:] for col in columns],
                exact=lineage,
                start=first,
                now=now,
            )
            node.add_child(new.key[:pb], new)
            self._num_nodes += 1
            self._num_pages += new.num_pages
            self._recount(new, fresh=True)
            node = new
        chain = self._path(node)
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
        node: Node | None = self._node_of(handle)
        assert node is not None
        node.pins += 1
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, handle: Handle) -> None:
        """Undo one ``lock`` of this handle; more unlocks than locks raise BadRequest."""
        node: Node | None = self._node_of(handle)
        assert node is not None
        if node.pins == 0:
            raise BadRequest(f"unlock of {handle!r} without a matching lock")
        node.pins -= 1
        while node is not None:
            node.lock_ref -= 1
            node = node.parent

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
            self._recount(node)
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
        freed: list[EvictedPage] = []
        queue = self._queue
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
            edge = node.key[: self._page_bytes]  # its key under the parent, before truncation
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
                node.truncate(removed, self._page_bytes)
                self._num_pages -= removed
            self._recount(node)
            parent = node.parent
            assert parent is not None
            if node.num_pages == 0:
                self._unlink(node, edge)
                self._forget(node)
                if parent.num_pages and not parent.children and parent.counts[t]:
                    queue.push(t, parent)  # its tail may go now: offer it again in this call
        for node in popped:  # back in line, for later calls
            if node.alive and node.counts[t]:
                queue.ensure(t, node)
        return EvictResult(TIERS[t], tuple(freed))

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
            self._split(node, start - node.start)
        subtree = list(self._walk(node))
        self._unlink(node)
        for n in subtree:
            self._forget(n)
        return tuple(info for n in subtree for info in self._page_infos(n))

    def clear(self) -> tuple[PageInfo, ...]:
        """Forget every page (BadRequest if any is locked); returns them for release."""
        if self._root.lock_ref:
            raise BadRequest("clear() with locked pages")
        forgotten = tuple(info for n in self._walk(self._root) for info in self._page_infos(n))
        for n in list(self._walk(self._root)):
            if n is not self._root:
                self._forget(n)
        self._root.children.clear()
        self._root.sorted_keys.clear()
        self._queue.clear()
        return forgotten

    # ---------------------------------------------------------------- figures

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    def pages_in(self, tier: str) -> int:
        """Pages holding a copy in ``tier``."""
        return self._totals[tier_index(tier)]

    def evictable_pages(self, tier: str) -> int:
        """How many copies ``evict(tier, n)`` could drop now, for any n (walks the tree)."""
        t = tier_index(tier)
        whole: dict[int, bool] = {}  # id(node) -> its whole subtree would leave the tree
        total = 0
        for node in reversed(list(self._walk(self._root))):
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

    def stats(self) -> RadixStats:
        nodes = list(self._walk(self._root))
        return RadixStats(
            namespaces=len(self._root.children),
            nodes=self._num_nodes,
            pages=self._num_pages,
            pages_by_tier=dict(zip(TIERS, self._totals, strict=True)),
            locked_pages=sum(n.num_pages for n in nodes if n.lock_ref),
        )

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (walks the whole tree)."""
        check_tree(
            self._root,
            self.config.page_size,
            self._totals,
            self._queue,
            self._num_nodes,
            self._num_pages,
        )

    # ---------------------------------------------------------------- internals

    def _namespace(self, namespace: Namespace | None) -> Namespace:
        ns = namespace or self.config.namespace
        if not isinstance(ns, Namespace):
            raise BadRequest("no namespace: pass namespace= or set RadixConfig.namespace")
        return ns

    def _new_node(
        self,
        parent: Node | None,
        key: bytes,
        hashes: bytes,
        locs: list[list],
        *,
        exact: int,
        start: int,
        now: float,
    ) -> Node:
        return Node(
            parent, key, hashes, locs, exact=exact, start=start, now=now, serial=next(self._serials)
        )

    def _handle(self, node: Node) -> Handle:
        return Handle(self, node, node.end, node.end * self.config.page_size)

    def _node_of(self, handle: Handle) -> Node:
        if not isinstance(handle, Handle) or handle._owner is not self:
            raise BadRequest(f"{handle!r} is not a handle of this tree")
        node = handle._node
        if not node.alive or node.end != handle.num_pages:
            raise BadRequest(f"{handle!r} is stale: its pages left the tree; match again")
        return node

    def _split(self, node: Node, pages: int) -> Node:
        top = node.split(pages, self._page_bytes, next(self._serials))
        self._num_nodes += 1
        self._queue.touch(top)
        return top

    def _recount(self, node: Node, fresh: bool = False) -> None:
        """Bring ``node.counts`` and the per-tier totals up to date with its columns."""
        before = [0, 0, 0] if fresh else node.counts
        node.counts = [len(col) - col.count(None) for col in node.locs]
        for t in range(3):
            self._totals[t] += node.counts[t] - before[t]
        self._queue.touch(node)  # it may hold a tier it did not, or drop more now

    def _adopt(
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
            self._recount(node)

    def _unlink(self, node: Node, edge: bytes | None = None) -> None:
        """Cut ``node`` (keyed ``edge`` under its parent) loose; drop an emptied namespace."""
        parent = node.parent
        assert parent is not None
        parent.drop_child(node.key[: self._page_bytes] if edge is None else edge)
        if parent.parent is self._root and not parent.children:  # an emptied namespace
            self._root.drop_child(parent.seed)
            parent.alive = False

    def _forget(self, node: Node) -> None:
        node.alive = False
        if node.parent is self._root or node is self._root:
            return
        self._num_nodes -= 1
        self._num_pages -= node.num_pages
        for t in range(3):
            self._totals[t] -= node.counts[t]
        self._queue.forget(node)

    def _walk(self, top: Node) -> Iterator[Node]:
        """``top`` and its descendants, parents before children (no recursion: trees get deep)."""
        stack = [top]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _path(self, node: Node) -> list[Node]:
        """Page-holding nodes from the namespace root down to ``node``."""
        chain = []
        cur: Node | None = node
        while cur is not None and cur.hashes:
            chain.append(cur)
            cur = cur.parent
        return chain[::-1]

    def _page_infos(self, node: Node) -> list[PageInfo]:
        dev, host, redis = node.locs
        return [
            PageInfo(
                node.start + j,
                node.page_hash(j),
                PageLocation(dev[j], host[j], redis[j]),
                j < node.exact,
            )
            for j in range(node.num_pages)
        ]
