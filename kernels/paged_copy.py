"""Triton paged gather/scatter between the layer-first pool and page-first batches.

One program copies one (page, layer, K|V) slab of ``H * P * D`` contiguous elements in
``BLOCK``-element chunks; the grid is (pages, layers * 2). Data moves as same-width integers,
so the copy is bit-exact for every dtype (NaN payloads included), on GPU and in the
interpreter. This module imports triton; ``kvruntime.kernels.dispatch`` imports it lazily, so
``import kvruntime.kernels`` works without triton.
"""

# Triton reads the annotations of @triton.jit parameters (constexpr), so those stay unannotated.
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import torch
import triton
import triton.language as tl

COPY_BLOCK = 4096
COPY_WARPS = 4
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_slabs(
    src,
    dst,
    ids,
    s_page,
    s_layer,
    s_kv,
    d_page,
    d_layer,
    d_kv,
    SLAB: tl.constexpr,
    BLOCK: tl.constexpr,
    IDS_ON_SRC: tl.constexpr,
):
    i = tl.program_id(0)
    lk = tl.program_id(1)
    layer = (lk // 2).to(tl.int64)
    kv = (lk % 2).to(tl.int64)
    page = tl.load(ids + i).to(tl.int64)
    if IDS_ON_SRC:
        src_page = page
        dst_page = i.to(tl.int64)
    else:
        src_page = i.to(tl.int64)
        dst_page = page
    src_base = src + src_page * s_page + layer * s_layer + kv * s_kv
    dst_base = dst + dst_page * d_page + layer * d_layer + kv * d_kv
    for start in range(0, SLAB, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < SLAB
        tl.store(dst_base + offs, tl.load(src_base + offs, mask=mask), mask=mask)


def _slab_contiguous(t: torch.Tensor, first: int) -> bool:
    """True when dims ``first..`` (H, P, D) of ``t`` are laid out contiguously."""
    h, p, d = t.shape[first:]
    return t.stride()[first:] == (p * d, d, 1) or h * p * d <= 1


def _check(pool: torch.Tensor, page_ids: torch.Tensor, pages: torch.Tensor) -> None:
    assert pool.dim() == 6 and pages.dim() == 6, f"pool {pool.shape} / pages {pages.shape}"
    assert pool.shape[1] == 2 and pages.shape[2] == 2, "K/V axis must have size 2"
    assert pool.shape[0] == pages.shape[1] and pool.shape[3:] == pages.shape[3:], (
        f"pool {tuple(pool.shape)} and pages {tuple(pages.shape)} differ in [L, H, P, D]"
    )
    assert pool.dtype == pages.dtype, f"pool {pool.dtype} vs pages {pages.dtype}"
    assert page_ids.dtype == torch.int64 and page_ids.dim() == 1, "page_ids must be int64 [n]"
    assert page_ids.shape[0] == pages.shape[0], f"{page_ids.shape[0]} ids, {pages.shape[0]} pages"
    assert pool.device == pages.device == page_ids.device, (
        f"devices differ: pool {pool.device}, pages {pages.device}, ids {page_ids.device}"
    )
    assert _slab_contiguous(pool, 3) and _slab_contiguous(pages, 3), (
        f"[H, P, D] must be contiguous: pool strides {pool.stride()}, pages {pages.stride()}"
    )


def _launch(
    pool: torch.Tensor,
    page_ids: torch.Tensor,
    pages: torch.Tensor,
    gather: bool,
    block: int = COPY_BLOCK,
    warps: int = COPY_WARPS,
) -> None:
    """``block``/``warps``: elements per loop step and warps per program (benchmarks sweep
    them; the defaults are what docs/KERNEL_NOTES.md measured best)."""
    _check(pool, page_ids, pages)
    n, L = pages.shape[0], pages.shape[1]
    if n == 0:
        return
    as_int = _INT_OF_WIDTH[pool.element_size()]
    pool_i, pages_i = pool.view(as_int), pages.view(as_int)
    pool_strides = (pool.stride(2), pool.stride(0), pool.stride(1))
    page_strides = (pages.stride(0), pages.stride(1), pages.stride(2))
    src, dst = (pool_i, pages_i) if gather else (pages_i, pool_i)
    s, d = (pool_strides, page_strides) if gather else (page_strides, pool_strides)
    slab = pages.shape[3] * pages.shape[4] * pages.shape[5]
    _copy_slabs[(n, L * 2)](
        src, dst, page_ids, *s, *d, SLAB=slab, BLOCK=min(block, _pow2(slab)),
        IDS_ON_SRC=gather, num_warps=warps,
    )  # fmt: skip


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def gather_pages(pool: torch.Tensor, page_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """pool[:, :, page_ids] -> out [n, L, 2, H, P, D] (Triton)."""
    _launch(pool, page_ids, out, gather=True)
    return out


def scatter_pages(pages: torch.Tensor, page_ids: torch.Tensor, pool: torch.Tensor) -> None:
    """pages [n, L, 2, H, P, D] -> pool[:, :, page_ids] (Triton)."""
    _launch(pool, page_ids, pages, gather=False)
