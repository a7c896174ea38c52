"""Page geometry shared by kernels, codecs and tiers.

A *page* holds the KV of ``page_size`` consecutive tokens for every layer:
``[num_layers, 2 (K, V), kv_heads, page_size, head_dim]`` — the page-first unit that the
host tier, the wire format and Redis move as one contiguous block.

The device pool is layer-first for the attention side:
``[num_layers, 2, num_pages, kv_heads, page_size, head_dim]``; one (layer, K|V, page) slab of
``kv_heads * page_size * head_dim`` elements is contiguous in both layouts, which is the unit
the gather/scatter kernels copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvruntime.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"unsupported KV dtype {dtype}; supported: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class PageLayout:
    num_layers: int
    kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"PageLayout.{name} must be a positive int, got {value!r}")
        dtype_name(self.dtype)

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one page-first page: [L, 2, H, P, D]."""
        return (self.num_layers, 2, self.kv_heads, self.page_size, self.head_dim)

    @property
    def slab_numel(self) -> int:
        """Elements of one (layer, K|V, page) slab: H * P * D."""
        return self.kv_heads * self.page_size * self.head_dim

    @property
    def page_numel(self) -> int:
        return self.num_layers * 2 * self.slab_numel

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_nbytes(self) -> int:
        return self.page_numel * self.element_size

    @property
    def bytes_per_token(self) -> int:
        return self.page_nbytes // self.page_size

    def pool_shape(self, num_pages: int) -> tuple[int, int, int, int, int, int]:
        """Shape of a layer-first device pool of ``num_pages`` pages: [L, 2, N, H, P, D]."""
        return (self.num_layers, 2, num_pages, self.kv_heads, self.page_size, self.head_dim)

    def describe(self) -> str:
        """Stable text naming this layout; part of every page key's namespace."""
        return (
            f"L{self.num_layers}-H{self.kv_heads}-D{self.head_dim}-P{self.page_size}"
            f"-{dtype_name(self.dtype)}"
        )
