"""Host tier: a byte budget of fixed-size page blocks in (pinned, where CUDA is present)
host memory, page-first, keyed by storage key, with LRU eviction.

Each slot holds one page as one contiguous block of ``block_bytes`` (a codec's page block),
so a page is one unit to copy to the device or send to Redis.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvruntime.errors import CapacityError, ConfigError


@dataclass(frozen=True)
class HostTierConfig:
    capacity_bytes: int
    block_bytes: int
    pin_memory: bool | None = None  # None: pin when CUDA is available
    # False: never evict on its own (an index outside decides what leaves); a put that does
    # not fit raises CapacityError instead
    self_evict: bool = True

    def __post_init__(self) -> None:
        if self.block_bytes <= 0:
            raise ConfigError(
                f"HostTierConfig.block_bytes must be positive, got {self.block_bytes}"
            )
        if self.capacity_bytes < 0:
            raise ConfigError(
                f"HostTierConfig.capacity_bytes must be >= 0, got {self.capacity_bytes}"
            )

    @property
    def num_slots(self) -> int:
        return self.capacity_bytes // self.block_bytes

    @property
    def pinned(self) -> bool:
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory


class HostPutResult(NamedTuple):
    stored: list[str]  # keys now resident (new or refreshed)
    evicted: list[str]  # keys pushed out to make room; the caller updates its index


class HostStats(NamedTuple):
    slots: int
    used_slots: int
    used_bytes: int
    hits: int
    misses: int
    evictions: int


class HostTier:
    """Not thread-safe: the runtime serialises access."""

    def __init__(self, config: HostTierConfig) -> None:
        self.config = config
        # [slots, block_bytes] uint8, page-first: one row is one page
        self.blocks = torch.empty(
            (config.num_slots, config.block_bytes), dtype=torch.uint8, pin_memory=config.pinned
        )
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._pinned_keys: dict[str, int] = {}
        self._free = list(range(config.num_slots - 1, -1, -1))
        self._reserved: set[int] = set()  # slots being filled outside the caller's lock
        self._hits = self._misses = self._evictions = 0

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def put_many(self, keys: Sequence[str], blocks: torch.Tensor) -> HostPutResult:
        """Store ``blocks`` ([n, block_bytes] uint8) under ``keys``, evicting least recently
        used unpinned pages as needed. Keys already present are refreshed, not copied again.
        Raises ``CapacityError`` (storing nothing) if the tier cannot hold the batch."""
        if blocks.dim() != 2 or blocks.shape[1] != self.config.block_bytes:
            raise ValueError(
                f"blocks must be [n, {self.config.block_bytes}], got {tuple(blocks.shape)}"
            )
        if len(keys) != blocks.shape[0]:
            raise ValueError(f"{len(keys)} keys for {blocks.shape[0]} blocks")
        new = [i for i, k in enumerate(keys) if k not in self._slot_of]
        evictable = len(self._slot_of) - len(self._pinned_keys) if self.config.self_evict else 0
        if len(new) > len(self._free) + evictable:
            raise CapacityError(
                f"host tier holds {self.config.num_slots} pages; {len(new)} new pages do not fit"
            )
        for k in keys:
            if k in self._slot_of:
                self._slot_of.move_to_end(k)
        evicted = self._make_room(len(new))
        slots = [self._free.pop() for _ in new]
        for i, slot in zip(new, slots, strict=True):
            self._slot_of[keys[i]] = slot
        if new:
            idx = torch.as_tensor(slots, dtype=torch.int64)
            self.blocks.index_copy_(0, idx, blocks[torch.as_tensor(new, dtype=torch.int64)].cpu())
        return HostPutResult(stored=list(keys), evicted=evicted)

    def _make_room(self, n: int) -> list[str]:
        evicted: list[str] = []
        it = iter(list(self._slot_of))
        while len(self._free) < n:
            key = next(it)
            if key in self._pinned_keys:
                continue
            self._free.append(self._slot_of.pop(key))
            evicted.append(key)
        self._evictions += len(evicted)
        return evicted

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """Views of the stored blocks ([block_bytes] uint8), None for misses. A view stays
        valid until that key is evicted: pin the key (``pin``) while copying from it."""
        out: list[torch.Tensor | None] = []
        for k in keys:
            slot = self._slot_of.get(k)
            if slot is None:
                self._misses += 1
                out.append(None)
            else:
                self._hits += 1
                self._slot_of.move_to_end(k)
                out.append(self.blocks[slot])
        return out

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def reserve(self, n: int) -> list[int]:
        """Take ``n`` free slots for a caller to fill outside its lock (``blocks[slot]``), then
        ``publish`` or ``release``. A reserved slot has no key: lookups cannot see it and
        eviction cannot take it. Evicts nothing (make room first); raises ``CapacityError``
        (reserving nothing) when fewer than ``n`` slots are free."""
        if n > len(self._free):
            raise CapacityError(f"{n} slots wanted, {len(self._free)} free")
        slots = [self._free.pop() for _ in range(n)]
        self._reserved.update(slots)
        return slots

    def write_rows(
        self, slots: Sequence[int], blocks: torch.Tensor, non_blocking: bool = False
    ) -> None:
        """Copy ``blocks`` ([n, block_bytes] uint8, on any device) into rows ``slots`` (e.g.
        reserved ones), one copy per run of consecutive slots: from a CUDA tensor into pinned
        rows each run is one DMA transfer. ``non_blocking`` leaves CUDA copies in flight on
        the current stream (the caller syncs before the rows are read or ``blocks`` freed)."""
        if blocks.dim() != 2 or blocks.shape != (len(slots), self.config.block_bytes):
            raise ValueError(
                f"blocks must be [{len(slots)}, {self.config.block_bytes}], got"
                f" {tuple(blocks.shape)}"
            )
        for slot, index, count in runs_of(slots):
            self.blocks[slot : slot + count].copy_(
                blocks[index : index + count], non_blocking=non_blocking
            )

    def publish(self, keys: Sequence[str], slots: Sequence[int]) -> list[int]:
        """Make reserved ``slots`` (now filled) resident under ``keys``. A key that became
        resident meanwhile keeps its slot (refreshed) and the reserved one is freed. Returns
        each key's slot. Raises ValueError (changing nothing) for a slot not reserved."""
        if len(keys) != len(slots):
            raise ValueError(f"{len(keys)} keys for {len(slots)} slots")
        if not self._reserved.issuperset(slots) or len(set(slots)) != len(slots):
            raise ValueError(f"publish of slots not reserved: {sorted(slots)}")
        out: list[int] = []
        for k, slot in zip(keys, slots, strict=True):
            self._reserved.discard(slot)
            if k in self._slot_of:
                self._slot_of.move_to_end(k)
                self._free.append(slot)
                out.append(self._slot_of[k])
            else:
                self._slot_of[k] = slot
                out.append(slot)
        return out

    def release(self, slots: Sequence[int]) -> None:
        """Give reserved ``slots`` back unpublished (the fill failed). Slots not reserved are
        ignored, so a cleanup path may call it twice."""
        for slot in slots:
            if slot in self._reserved:
                self._reserved.discard(slot)
                self._free.append(slot)

    def discard_slots(self, slots: Sequence[int]) -> int:
        """Drop the pages in ``slots`` (the runtime's index decided which); returns how many."""
        wanted = set(slots)
        keys = [k for k, s in self._slot_of.items() if s in wanted]
        return self.discard(keys)

    def slots_of(self, keys: Sequence[str]) -> list[int | None]:
        return [self._slot_of.get(k) for k in keys]

    def pin(self, keys: Sequence[str]) -> None:
        """Protect keys from eviction (e.g. while an async copy reads them). Counted."""
        for k in keys:
            if k not in self._slot_of:
                raise KeyError(f"cannot pin {k!r}: not in the host tier")
            self._pinned_keys[k] = self._pinned_keys.get(k, 0) + 1

    def unpin(self, keys: Sequence[str]) -> None:
        for k in keys:
            count = self._pinned_keys.get(k, 0)
            if count <= 0:
                raise ValueError(f"unpin of {k!r} without a matching pin")
            if count == 1:
                del self._pinned_keys[k]
            else:
                self._pinned_keys[k] = count - 1

    def discard(self, keys: Sequence[str]) -> int:
        """Drop keys (not pinned ones); returns how many were dropped."""
        dropped = 0
        for k in keys:
            if k in self._pinned_keys:
                continue
            slot = self._slot_of.pop(k, None)
            if slot is not None:
                self._free.append(slot)
                dropped += 1
        return dropped

    def stats(self) -> HostStats:
        used = len(self._slot_of)
        return HostStats(
            slots=self.config.num_slots,
            used_slots=used,
            used_bytes=used * self.config.block_bytes,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
        )


def runs_of(values: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first value, its position, count) of each run of consecutive values, in order: the
    copies a list of slots or page indices needs, one per run."""
    runs: list[tuple[int, int, int]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][0] + runs[-1][2] == v:
            first, index, count = runs[-1]
            runs[-1] = (first, index, count + 1)
        else:
            runs.append((v, i, 1))
    return runs
