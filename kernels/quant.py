"""Launchers of the quantize/dequantize kernels and the public Triton codec functions.

Each launcher asserts shapes, strides, dtypes and devices, then launches one kernel of
``kvruntime.kernels.quant_jit`` for K or V. The public functions have the same signatures as
``reference.py``; ``dispatch`` validates user input before calling them. This module imports
triton; ``dispatch`` imports it lazily.
"""

from __future__ import annotations

import torch

from kvruntime.env import triton_interpret
from kvruntime.kernels import paged_copy
from kvruntime.kernels.quant_jit import (
    FP8,
    INT4,
    INT8,
    dequant_cols,
    dequant_rows,
    quant_cols,
    quant_rows,
)
from kvruntime.kernels.quantized import QuantizedPages, page_format, pages_layout, pool_layout

# ---- launchers -------------------------------------------------------------------------------


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _tail_contiguous(t: torch.Tensor, first: int) -> bool:
    """True when dims ``first..`` of ``t`` are laid out like a contiguous tensor."""
    expected, step = [], 1
    for size in reversed(t.shape[first:]):
        expected.append(step)
        step *= size
    return all(
        size == 1 or st == ex
        for size, st, ex in zip(
            t.shape[first:], t.stride()[first:], reversed(expected), strict=True
        )
    )


def _check(kv: torch.Tensor, codes: torch.Tensor, scales: list[torch.Tensor], mode: int) -> None:
    """kv: [N|n, L, H, P, D] source or destination; codes [n, L, H, P, DC]; scales [n, L, ...]."""
    assert kv.dim() == 5 and codes.dim() == 5, f"kv {tuple(kv.shape)}, codes {tuple(codes.shape)}"
    assert kv.dtype in (torch.bfloat16, torch.float16, torch.float32), f"kv dtype {kv.dtype}"
    code_dtype = {INT8: torch.int8, FP8: torch.uint8, INT4: torch.uint8}[mode]
    assert codes.dtype == code_dtype, f"codes dtype {codes.dtype}, expected {code_dtype}"
    dc = kv.shape[4] // 2 if mode == INT4 else kv.shape[4]
    assert tuple(codes.shape[1:]) == (*kv.shape[1:4], dc), (
        f"codes {tuple(codes.shape)} do not match kv {tuple(kv.shape)}"
    )
    for t in (kv, codes, *scales):
        assert t.device == codes.device, f"devices differ: {t.device} vs {codes.device}"
        assert t.shape[0] == codes.shape[0] or t is kv, f"{tuple(t.shape)}: wrong page count"
        assert _tail_contiguous(t, 2), (
            f"shape {tuple(t.shape)} strides {t.stride()}: need [2:] dense"
        )


def _rows_args(kv: torch.Tensor, codes: torch.Tensor, group: int, mode: int) -> dict[str, int]:
    """Constexprs of the rows kernels. A GPU program takes one tile of ~4K elements (the grid's
    third axis walks the slab); the interpreter pays per program, so it takes the whole slab."""
    _, _, h, p, d = kv.shape
    ng = d // group
    width = _pow2(ng) * _pow2(group)
    block_r = max(1, min(_pow2(h * p), (16384 if triton_interpret() else 4096) // width))
    tiles = -(-h * p // block_r) if triton_interpret() else 1
    return dict(
        R=h * p, D=d, DC=codes.shape[4], NG=ng, GS=group, BLOCK_R=block_r, TILES=tiles,
        NG_P=_pow2(ng), GS_P=_pow2(group), MODE=mode,
    )  # fmt: skip


def _cols_args(kv: torch.Tensor, codes: torch.Tensor, group: int, mode: int) -> dict[str, int]:
    """Constexprs of the cols kernels: one [G, D] token group per GPU program, a slab's
    ``H * P / G`` groups per program in the interpreter."""
    _, _, h, p, d = kv.shape
    ngrp = h * p // group
    return dict(
        NGRP=ngrp, G=group, D=d, DC=codes.shape[4], G_P=_pow2(group), D_P=_pow2(d),
        GPP=ngrp if triton_interpret() else 1, MODE=mode,
    )  # fmt: skip


def _grid(n: int, layers: int, args: dict[str, int]) -> tuple[int, int, int]:
    if "NGRP" in args:
        return (n, layers, args["NGRP"] // args["GPP"])
    return (n, layers, -(-args["R"] // (args["BLOCK_R"] * args["TILES"])))


def _quantize(
    src: torch.Tensor,
    ids: torch.Tensor | None,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    mode: int,
    group: int,
    per_channel: bool,
) -> None:
    """Quantize src [N|n, L, H, P, D] (pages ``ids`` of it, when given) into codes/scale/zero."""
    _check(src, codes, [scale] if zero is None else [scale, zero], mode)
    n, L = codes.shape[:2]
    if n == 0:
        return
    if ids is not None:
        assert ids.dtype == torch.int64 and ids.shape == (n,), f"ids {ids.dtype} {ids.shape}"
    kernel, args = (
        (quant_cols, _cols_args(src, codes, group, mode))
        if per_channel
        else (quant_rows, _rows_args(src, codes, group, mode))
    )
    # One warp per [G, D] tile: the token reduction then stays inside the warp; 4 warps made
    # the key kernels 3-5x slower on an H200 (Llama-8B layout, 256 pages).
    warps = 1 if per_channel else 4
    kernel[_grid(n, L, args)](
        src, ids if ids is not None else codes, codes, scale, zero if zero is not None else scale,
        src.stride(0), src.stride(1), codes.stride(0), codes.stride(1),
        scale.stride(0), scale.stride(1), GATHER=ids is not None, enable_fp_fusion=False,
        num_warps=warps, **args,
    )  # fmt: skip


def _dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    dst: torch.Tensor,
    ids: torch.Tensor | None,
    mode: int,
    group: int,
    per_channel: bool,
) -> None:
    """Dequantize codes/scale/zero into dst [N|n, L, H, P, D] (pages ``ids`` of it, when given)."""
    _check(dst, codes, [scale] if zero is None else [scale, zero], mode)
    n, L = codes.shape[:2]
    if n == 0:
        return
    if ids is not None:
        assert ids.dtype == torch.int64 and ids.shape == (n,), f"ids {ids.dtype} {ids.shape}"
    kernel, args = (
        (dequant_cols, _cols_args(dst, codes, group, mode))
        if per_channel
        else (dequant_rows, _rows_args(dst, codes, group, mode))
    )
    bf16 = dst.dtype == torch.bfloat16
    kernel[_grid(n, L, args)](
        codes, scale, zero if zero is not None else scale, dst.view(torch.int16) if bf16 else dst,
        ids if ids is not None else codes, codes.stride(0), codes.stride(1),
        scale.stride(0), scale.stride(1), dst.stride(0), dst.stride(1),
        SCATTER=ids is not None, OUT_BF16=bf16, enable_fp_fusion=False, **args,
    )  # fmt: skip


def _codes(q: QuantizedPages, kv: int) -> torch.Tensor:
    data = q.data.view(torch.uint8) if q.data.dtype == torch.float8_e4m3fn else q.data
    return data[:, :, kv]


def _run(
    q: QuantizedPages, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor | None, enc: bool
) -> None:
    """Encode k/v views [N|n, L, H, P, D] into ``q`` (enc) or decode ``q`` into them."""
    fmt = q.fmt
    parts = {
        # codec: ((mode, key group, keys per channel), (mode, value group))
        "fp8": ((FP8, fmt.layout.head_dim, False), (FP8, fmt.layout.head_dim)),
        "int8": ((INT8, fmt.key_group, True), (INT8, fmt.layout.head_dim)),
        "int4": ((INT4, fmt.key_group, True), (INT4, fmt.value_group)),
    }
    (k_mode, k_group, k_cols), (v_mode, v_group) = parts[fmt.codec]
    assert q.k_scale is not None and q.v_scale is not None
    if enc:
        _quantize(k, ids, _codes(q, 0), q.k_scale, q.k_zero, k_mode, k_group, k_cols)
        _quantize(v, ids, _codes(q, 1), q.v_scale, q.v_zero, v_mode, v_group, False)
    else:
        _dequantize(_codes(q, 0), q.k_scale, q.k_zero, k, ids, k_mode, k_group, k_cols)
        _dequantize(_codes(q, 1), q.v_scale, q.v_zero, v, ids, v_mode, v_group, False)


# ---- public Triton kernels (same signatures as reference.py) ---------------------------------


def quantize_pages(
    pages: torch.Tensor, codec: str, out: QuantizedPages | None = None
) -> QuantizedPages:
    fmt = page_format(codec, pages_layout(pages))
    q = out if out is not None else QuantizedPages.empty(fmt, pages.shape[0], pages.device)
    if codec == "none":
        q.data.copy_(pages)
    else:
        _run(q, pages[:, :, 0], pages[:, :, 1], None, enc=True)
    return q


def dequantize_pages(q: QuantizedPages, out: torch.Tensor) -> torch.Tensor:
    if q.codec == "none":
        return out.copy_(q.data)
    _run(q, out[:, :, 0], out[:, :, 1], None, enc=False)
    return out


def gather_quantize(
    pool: torch.Tensor, page_ids: torch.Tensor, codec: str, out: QuantizedPages | None = None
) -> QuantizedPages:
    fmt = page_format(codec, pool_layout(pool))
    q = out if out is not None else QuantizedPages.empty(fmt, page_ids.shape[0], pool.device)
    if codec == "none":
        paged_copy.gather_pages(pool, page_ids, q.data)
    else:
        k, v = pool[:, 0].transpose(0, 1), pool[:, 1].transpose(0, 1)  # [N, L, H, P, D] views
        _run(q, k, v, page_ids, enc=True)
    return q


def dequantize_scatter(q: QuantizedPages, page_ids: torch.Tensor, pool: torch.Tensor) -> None:
    if q.codec == "none":
        paged_copy.scatter_pages(q.data, page_ids, pool)
        return
    k, v = pool[:, 0].transpose(0, 1), pool[:, 1].transpose(0, 1)
    _run(q, k, v, page_ids, enc=False)
