"""What the tree hands out: handles and named results (never its nodes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from kvruntime.radix.hashing import HASH_BYTES, split_blob
from kvruntime.radix.location import TIERS, PageLocation

if TYPE_CHECKING:
    from kvruntime.radix.node import Node


class Handle:
    """An opaque reference to a cached prefix of ``num_pages`` whole pages.

    Pass it to ``lock``/``unlock``/``set_location``/``remove``. It stays valid while its pages
    stay cached (a locked handle always does); a handle whose pages were evicted is stale and
    the tree refuses it with BadRequest.
    """

    __slots__ = ("_node", "_owner", "num_pages", "num_tokens")

    def __init__(self, owner: object, node: Node, num_pages: int, num_tokens: int) -> None:
        self._owner = owner
        self._node = node
        self.num_pages = num_pages
        self.num_tokens = num_tokens

    def __repr__(self) -> str:
        return f"Handle(num_pages={self.num_pages}, num_tokens={self.num_tokens})"


@dataclass(frozen=True, slots=True)
class PageInfo:
    """One cached page: position in its prompt, chained hash, copies, lineage."""

    index: int
    page_hash: bytes
    location: PageLocation
    exact: bool


@dataclass(frozen=True, slots=True)
class MatchResult:
    """The longest cached prefix of a prompt.

    ``matched_tokens``: token-level common prefix with anything cached (may end mid-page;
    for divergence analytics). ``cached_tokens``: the whole pages that can be reused, with one
    entry per page in the columns ``device``/``host``/``redis`` and in ``page_hashes``.
    """

    matched_tokens: int
    cached_tokens: int
    handle: Handle
    hash_blob: bytes  # 16-byte page hashes, concatenated
    device: tuple[int | None, ...]
    host: tuple[int | None, ...]
    redis: tuple[str | None, ...]
    num_exact: int  # leading pages computed exactly; later ones are approximate

    @property
    def num_pages(self) -> int:
        return len(self.device)

    @property
    def page_hashes(self) -> list[bytes]:
        return split_blob(self.hash_blob)

    @property
    def locations(self) -> list[PageLocation]:
        return list(map(PageLocation._make, zip(self.device, self.host, self.redis, strict=True)))

    @property
    def pages(self) -> tuple[PageInfo, ...]:
        hashes, locations = self.page_hashes, self.locations
        return tuple(
            PageInfo(i, hashes[i], locations[i], i < self.num_exact) for i in range(self.num_pages)
        )

    def pages_by_tier(self) -> dict[str, int]:
        """Pages per fastest tier holding them (where a reuse reads them from)."""
        out = dict.fromkeys(TIERS, 0)
        for location in self.locations:
            fastest = location.fastest
            if fastest is not None:
                out[fastest] += 1
        return out


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A location given to ``insert`` that the tree did not keep: the caller frees ``value``."""

    index: int
    tier: str
    value: int | str


@dataclass(frozen=True, slots=True)
class InsertResult:
    """Pages ``[0, num_existing)`` were cached already, ``[num_existing, num_pages)`` are new."""

    handle: Handle
    num_existing: int
    num_new: int
    hash_blob: bytes  # hashes of all num_pages pages, concatenated
    num_exact: int
    duplicates: tuple[Duplicate, ...]

    @property
    def num_pages(self) -> int:
        return self.num_existing + self.num_new

    @property
    def page_hashes(self) -> list[bytes]:
        return split_blob(self.hash_blob)

    def page_hash(self, index: int) -> bytes:
        return self.hash_blob[index * HASH_BYTES : (index + 1) * HASH_BYTES]


class EvictedPage(NamedTuple):
    """A copy evict() dropped: release ``value`` in that tier. ``removed``: page left the tree."""

    page_hash: bytes
    value: int | str
    removed: bool


@dataclass(frozen=True, slots=True)
class EvictResult:
    tier: str
    pages: tuple[EvictedPage, ...]

    def __len__(self) -> int:
        return len(self.pages)

    @property
    def values(self) -> list[int | str]:
        """The freed tier values (device page indices, host slots or Redis keys)."""
        return [page.value for page in self.pages]

    @property
    def num_removed(self) -> int:
        return sum(page.removed for page in self.pages)


class RadixStats(NamedTuple):
    namespaces: int
    nodes: int
    pages: int
    pages_by_tier: dict[str, int]
    locked_pages: int
