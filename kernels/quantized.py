"""Encoded pages: the fixed per-page byte layout of each codec and its named tensor views.

Every codec stores one page as ONE contiguous uint8 block of ``page_nbytes`` bytes, so a page
is one unit for host memory, Redis and the wire format, read back into a buffer of known size.
Inside a block the parts follow each other in a fixed order: fp32 scales first, then fp16
scales/zeros, then the codes, so each part starts aligned to its element size without gaps;
the block is padded with zeros to a multiple of 16 bytes. ``QuantizedPages`` holds views of
these parts into a batch of blocks ``[n, page_nbytes]``: no copies either way.

Per-codec parts (per page; L layers, H kv heads, P tokens, D head_dim, G = min(32, P) tokens
per key group, C = min(128, D) channels per int4 value group):

=====  ========================================  ==========================================
codec  scales                                    codes
=====  ========================================  ==========================================
none   —                                         kv dtype ``[L, 2, H, P, D]``
fp8    k_scale, v_scale fp32 ``[L, H, P]``       float8_e4m3fn ``[L, 2, H, P, D]``
int8   k_scale fp16 ``[L, H, P/G, D]``,          int8 ``[L, 2, H, P, D]``
       v_scale fp16 ``[L, H, P]``
int4   k_scale, k_zero fp16 ``[L, H, P/G, D]``,  uint8 ``[L, 2, H, P, D/2]`` (low nibble =
       v_scale, v_zero fp16 ``[L, H, P, D/C]``   even channel, high nibble = odd channel)
=====  ========================================  ==========================================

Metadata is what keeps the small-page blocks from shrinking with the codes: on Llama-3.1-8B's
layout at P = 16 the blocks are 0.516x (fp8), 0.535x (int8) and 0.320x (int4) of bf16; before
format 2 (fp32 int8 scales, int4 values in 32-channel groups) int8/int4 were 0.570x/0.344x.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvruntime.errors import BadRequest, UnknownName
from kvruntime.kernels.layout import PageLayout

CODEC_NAMES = ("none", "fp8", "int8", "int4")
PART_NAMES = ("k_scale", "k_zero", "v_scale", "v_zero", "data")
BLOCK_ALIGN = 16
GROUP_MAX = 32  # tokens per key group
VALUE_GROUP_MAX = 128  # channels per int4 value group: one group per token for head_dim <= 128


@dataclass(frozen=True)
class Part:
    """One tensor of an encoded page: where it sits in the block and its per-page shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class PageFormat:
    """The byte layout of one encoded page for a (codec, layout) pair."""

    codec: str
    layout: PageLayout
    parts: tuple[Part, ...]
    page_nbytes: int

    @property
    def key_group(self) -> int:
        """Tokens per key group (per-channel key scales): min(32, page_size)."""
        return min(GROUP_MAX, self.layout.page_size)

    @property
    def value_group(self) -> int:
        """Channels per int4 value group (per-token value scales): min(128, head_dim)."""
        return min(VALUE_GROUP_MAX, self.layout.head_dim)

    @property
    def bytes_per_token(self) -> float:
        return self.page_nbytes / self.layout.page_size

    def part(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)


def _check_groups(codec: str, layout: PageLayout, value_groups: bool) -> None:
    p, d = layout.page_size, layout.head_dim
    if p > GROUP_MAX and p % GROUP_MAX:
        raise BadRequest(
            f"codec {codec!r} groups keys by min(32, page_size) tokens: page_size {p} must be"
            " <= 32 or a multiple of 32"
        )
    if value_groups and (d % 2 or (d > VALUE_GROUP_MAX and d % VALUE_GROUP_MAX)):
        raise BadRequest(
            f"codec {codec!r} packs two channels per byte in groups of min(128, head_dim):"
            f" head_dim {d} must be even and <= 128 or a multiple of 128"
        )


@functools.lru_cache(maxsize=256)
def page_format(codec: str, layout: PageLayout) -> PageFormat:
    """The block layout of ``codec`` for ``layout``. Raises UnknownName for an unknown codec
    and BadRequest when the layout does not fit the codec's grouping."""
    L, H, P, D = layout.num_layers, layout.kv_heads, layout.page_size, layout.head_dim
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    if codec == "none":
        specs = [("data", layout.dtype, layout.page_shape)]
    elif codec == "fp8":
        specs = [
            ("k_scale", torch.float32, (L, H, P)),
            ("v_scale", torch.float32, (L, H, P)),
            ("data", torch.float8_e4m3fn, layout.page_shape),
        ]
    elif codec == "int8":
        _check_groups(codec, layout, value_groups=False)
        groups = P // min(GROUP_MAX, P)
        specs = [
            ("k_scale", torch.float16, (L, H, groups, D)),
            ("v_scale", torch.float16, (L, H, P)),
            ("data", torch.int8, layout.page_shape),
        ]
    elif codec == "int4":
        _check_groups(codec, layout, value_groups=True)
        groups = P // min(GROUP_MAX, P)
        vgroups = D // min(VALUE_GROUP_MAX, D)
        specs = [
            ("k_scale", torch.float16, (L, H, groups, D)),
            ("k_zero", torch.float16, (L, H, groups, D)),
            ("v_scale", torch.float16, (L, H, P, vgroups)),
            ("v_zero", torch.float16, (L, H, P, vgroups)),
            ("data", torch.uint8, (L, 2, H, P, D // 2)),
        ]
    else:
        raise UnknownName(f"unknown codec {codec!r}; known: {', '.join(sorted(CODEC_NAMES))}")
    parts: list[Part] = []
    offset = 0
    for name, dtype, shape in specs:
        part = Part(name, dtype, shape, offset)
        parts.append(part)
        offset += part.nbytes
    page_nbytes = -(-offset // BLOCK_ALIGN) * BLOCK_ALIGN
    return PageFormat(codec, layout, tuple(parts), page_nbytes)


@dataclass(frozen=True)
class QuantizedPages:
    """A batch of ``n`` encoded pages: ``blocks`` (uint8 ``[n, page_nbytes]``) and named views
    of its parts. Writing a view writes the block; a part a codec lacks is None."""

    fmt: PageFormat
    blocks: torch.Tensor
    data: torch.Tensor
    k_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None

    @property
    def codec(self) -> str:
        return self.fmt.codec

    @property
    def layout(self) -> PageLayout:
        return self.fmt.layout

    @property
    def num_pages(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @classmethod
    def from_blocks(cls, fmt: PageFormat, blocks: torch.Tensor) -> QuantizedPages:
        """Views of ``blocks`` (uint8 ``[n, page_nbytes]`` or one ``[page_nbytes]`` page, rows
        contiguous); no copy. Raises BadRequest for a wrong dtype, size or stride."""
        if blocks.dtype != torch.uint8:
            raise BadRequest(f"page blocks must be uint8, got {blocks.dtype}")
        if blocks.dim() == 1:
            blocks = blocks.unsqueeze(0)
        if blocks.dim() != 2 or blocks.shape[1] != fmt.page_nbytes:
            raise BadRequest(
                f"page blocks of shape {tuple(blocks.shape)}; codec {fmt.codec!r} on"
                f" {fmt.layout.describe()} needs [n, {fmt.page_nbytes}]"
            )
        n = blocks.shape[0]
        if blocks.stride(1) != 1 or (n > 1 and blocks.stride(0) % BLOCK_ALIGN):
            raise BadRequest(
                f"page blocks need contiguous rows and a row stride that is a multiple of"
                f" {BLOCK_ALIGN}; got strides {blocks.stride()}"
            )
        views: dict[str, torch.Tensor] = {}
        for part in fmt.parts:
            raw = blocks[:, part.offset : part.offset + part.nbytes]
            try:
                views[part.name] = raw.view(part.dtype).view(n, *part.shape)
            except RuntimeError as exc:  # misaligned storage offset
                raise BadRequest(f"page blocks cannot be viewed as {part.name}: {exc}") from None
        return cls(fmt=fmt, blocks=blocks, **views)

    @classmethod
    def empty(
        cls, fmt: PageFormat, num_pages: int, device: torch.device | str, pin_memory: bool = False
    ) -> QuantizedPages:
        """Fresh blocks (contents undefined except the zeroed tail padding)."""
        # uint8 [n, page_nbytes] on `device`
        blocks = torch.empty(
            (num_pages, fmt.page_nbytes), dtype=torch.uint8, device=device, pin_memory=pin_memory
        )
        used = fmt.parts[-1].offset + fmt.parts[-1].nbytes
        if used < fmt.page_nbytes:
            blocks[:, used:].zero_()  # padding must not leak memory or break checksums
        return cls.from_blocks(fmt, blocks)


def pages_layout(pages: torch.Tensor) -> PageLayout:
    """The layout of a page-first batch ``[n, L, 2, H, P, D]``; BadRequest if it is not one."""
    if pages.dim() != 6 or pages.shape[2] != 2:
        raise BadRequest(f"pages must be [n, L, 2, H, P, D]; got shape {tuple(pages.shape)}")
    _, L, _, H, P, D = pages.shape
    return PageLayout(num_layers=L, kv_heads=H, head_dim=D, page_size=P, dtype=pages.dtype)


def pool_layout(pool: torch.Tensor) -> PageLayout:
    """The layout of a layer-first pool ``[L, 2, N, H, P, D]``; BadRequest if it is not one."""
    if pool.dim() != 6 or pool.shape[1] != 2:
        raise BadRequest(f"pool must be [L, 2, N, H, P, D]; got shape {tuple(pool.shape)}")
    L, _, _, H, P, D = pool.shape
    return PageLayout(num_layers=L, kv_heads=H, head_dim=D, page_size=P, dtype=pool.dtype)
