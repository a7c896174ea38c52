"""Device page pool: preallocated KV pages and their allocator.

Layout is layer-first, for the attention side: ``[L, 2, N, H, P, D]`` (layers, K/V, pages,
kv_heads, page_size, head_dim). ``pool.kv[l, 0, ids]`` are layer l's keys for pages ``ids``;
one (layer, K|V, page) slab of H*P*D elements is contiguous, which is the unit the gather and
scatter kernels copy to and from page-first staging ``[n, L, 2, H, P, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvruntime.errors import CapacityError, ConfigError
from kvruntime.kernels.layout import PageLayout


@dataclass(frozen=True)
class PoolConfig:
    layout: PageLayout
    num_pages: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_pages <= 0:
            raise ConfigError(f"PoolConfig.num_pages must be positive, got {self.num_pages}")

    @classmethod
    def from_budget(cls, layout: PageLayout, kv_bytes: int, device: str = "cpu") -> PoolConfig:
        """As many pages as fit in ``kv_bytes``; at least one page must fit."""
        pages = kv_bytes // layout.page_nbytes
        if pages < 1:
            raise ConfigError(
                f"device KV budget of {kv_bytes} bytes holds no page of {layout.page_nbytes} bytes"
                f" ({layout.describe()})"
            )
        return cls(layout=layout, num_pages=int(pages), device=device)

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.layout.page_nbytes


class DevicePagePool:
    """Owns the KV tensor and a free list. Not thread-safe: the runtime serialises access."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.layout = config.layout
        # [L, 2, N, H, P, D] in the model's KV dtype, on the engine's device
        self.kv = torch.zeros(
            config.layout.pool_shape(config.num_pages),
            dtype=config.layout.dtype,
            device=config.device,
        )
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free: list[int] = list(range(config.num_pages - 1, -1, -1))
        self._used = bytearray(config.num_pages)

    @property
    def num_pages(self) -> int:
        return self.config.num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.num_used * self.layout.page_nbytes

    def alloc(self, n: int) -> list[int]:
        """Take ``n`` free pages. Raises ``CapacityError`` (taking nothing) if fewer are free;
        the caller evicts from the index and retries."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise CapacityError(f"device pool has {len(self._free)} free pages; {n} requested")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._used[i] = 1
        return ids

    def free(self, ids: Sequence[int]) -> None:
        """Return pages to the free list. Freeing a page twice or an unknown id raises, since
        either means two owners think they hold the same KV."""
        for i in ids:
            if not 0 <= i < self.num_pages:
                raise ValueError(f"page id {i} outside pool of {self.num_pages} pages")
            if not self._used[i]:
                raise ValueError(f"page {i} freed twice")
            self._used[i] = 0
            self._free.append(i)

    def ids_tensor(self, ids: Sequence[int]) -> torch.Tensor:
        # [n] int64 on the pool's device, the kernels' page-id format
        return torch.as_tensor(list(ids), dtype=torch.int64, device=self.kv.device)
