"""One node of the radix tree: a compressed run of whole pages (internal to the tree).

Per page a node keeps its tokens (``key``: little-endian uint32 bytes, so matching compares
memory with memcmp), its chained hash (``hashes``: 16-byte digests concatenated) and one
location column per tier. A node is never handed out; handles point at it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from kvruntime.radix.hashing import HASH_BYTES, decode_tokens
from kvruntime.radix.location import PageLocation
from kvruntime.radix.results import PageInfo


class Node:
    __slots__ = (
        "alive",
        "children",
        "counts",
        "created",
        "exact",
        "hashes",
        "hits",
        "key",
        "last_access",
        "lock_ref",
        "locs",
        "parent",
        "pins",
        "seed",
        "serial",
        "sorted_keys",
        "start",
    )

    def __init__(
        self,
        parent: Node | None,
        key: bytes,
        hashes: bytes,
        locs: list[list],
        *,
        exact: int,
        start: int,
        now: float,
        serial: int,
        seed: bytes = b"",
    ) -> None:
        self.parent = parent
        # children are keyed by their first page's bytes; sorted_keys holds the same keys in
        # byte order, so the closest child of a diverging page is a bisect away
        self.children: dict[bytes, Node] = {}
        self.sorted_keys: list[bytes] = []
        self.key = key
        self.hashes = hashes
        self.locs = locs  # [device, host, redis] columns, one entry per page
        self.counts = [len(col) - col.count(None) for col in locs]
        self.exact = exact  # leading pages computed exactly (lineage); the rest approximate
        self.start = start  # page index of this node's first page, counted from the namespace
        self.lock_ref = 0  # locks at this node or below it
        self.pins = 0  # locks taken through handles to this very node
        self.last_access = now
        self.hits = 0
        self.created = now
        self.serial = serial  # creation order: ties in eviction order go to older nodes
        self.seed = seed  # namespace roots only: the digest their hash chains start from
        self.alive = True

    @property
    def num_pages(self) -> int:
        return len(self.hashes) // HASH_BYTES

    @property
    def end(self) -> int:
        return self.start + self.num_pages

    @property
    def last_hash(self) -> bytes:
        """The hash a child's chain continues from."""
        return self.hashes[-HASH_BYTES:] if self.hashes else self.seed

    @property
    def fully_exact(self) -> bool:
        return self.exact == self.num_pages

    def page_hash(self, j: int) -> bytes:
        return self.hashes[j * HASH_BYTES : (j + 1) * HASH_BYTES]

    def page_tokens(self, j: int) -> list[int]:
        page_bytes = len(self.key) // self.num_pages
        return decode_tokens(self.key[j * page_bytes : (j + 1) * page_bytes])

    def page_infos(self) -> list[PageInfo]:
        """This node's pages as handed out, indexed from the namespace's first page."""
        dev, host, redis = self.locs
        return [
            PageInfo(
                self.start + j,
                self.page_hash(j),
                PageLocation(dev[j], host[j], redis[j]),
                j < self.exact,
            )
            for j in range(self.num_pages)
        ]

    def walk(self) -> Iterator[Node]:
        """This node and its descendants, parents before children (no recursion: trees get deep)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def path(self) -> list[Node]:
        """Page-holding nodes from the namespace root down to this one."""
        chain = []
        cur: Node | None = self
        while cur is not None and cur.hashes:
            chain.append(cur)
            cur = cur.parent
        return chain[::-1]

    def pin(self) -> None:
        """Count one more lock through a handle to this node, here and in every ancestor."""
        self.pins += 1
        node: Node | None = self
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unpin(self) -> None:
        """Undo one ``pin`` (the caller checked ``pins`` is positive)."""
        self.pins -= 1
        node: Node | None = self
        while node is not None:
            node.lock_ref -= 1
            node = node.parent

    def add_child(self, key: bytes, child: Node) -> None:
        self.children[key] = child
        bisect.insort(self.sorted_keys, key)

    def drop_child(self, key: bytes) -> None:
        del self.children[key]
        del self.sorted_keys[bisect.bisect_left(self.sorted_keys, key)]

    def split(self, pages: int, page_bytes: int, serial: int) -> Node:
        """Move this node's first ``pages`` pages into a new parent node and return it.

        This node keeps the deeper part and its identity, so handles to it stay valid.
        """
        cut = pages * HASH_BYTES
        top = Node(
            self.parent,
            self.key[: pages * page_bytes],
            self.hashes[:cut],
            [col[:pages] for col in self.locs],
            exact=min(self.exact, pages),
            start=self.start,
            now=self.last_access,
            serial=serial,
        )
        top.created, top.hits, top.lock_ref = self.created, self.hits, self.lock_ref
        self.key = self.key[pages * page_bytes :]
        self.hashes = self.hashes[cut:]
        for col in self.locs:
            del col[:pages]
        self.counts = [len(col) - col.count(None) for col in self.locs]
        self.exact = max(0, self.exact - pages)
        self.start += pages
        assert self.parent is not None  # namespace roots hold no pages and never split
        # the first page is unchanged, so top takes this node's slot under the same key
        self.parent.children[top.key[:page_bytes]] = top
        top.children[self.key[:page_bytes]] = self
        top.sorted_keys.append(self.key[:page_bytes])
        self.parent = top
        return top

    def truncate(self, pages: int, page_bytes: int) -> None:
        """Drop this node's last ``pages`` pages (the caller checked nothing depends on them)."""
        keep = self.num_pages - pages
        self.key = self.key[: keep * page_bytes]
        self.hashes = self.hashes[: keep * HASH_BYTES]
        for col in self.locs:
            del col[keep:]
        self.exact = min(self.exact, keep)
