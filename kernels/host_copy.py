"""Triton rehydrate: encoded page blocks (pinned host or device) -> layer-first KV, fused decode.

Source: rows of page-first blocks ``[S, page_nbytes]`` (uint8, one encoded page per row, the
host tier's slots), picked by ``slots``. When the blocks live in pinned host memory the kernel
reads them straight over PCIe through unified virtual addressing (a pinned allocation's host
pointer is valid on the device), so a scattered set of slots needs no host-side gather and no
staging copy; one launch moves any set of pages and layers.

Destination: any ``[L, 2, N, H, P, D]`` tensor whose ``[P, D]`` dims are dense — the device
pool, or a ``token_view`` of per-layer caches ``[L, 2, H, T, D]`` (page j = tokens jP..jP+P-1),
which is what lets a resumed turn land directly in the tensors attention reads.

Work unit: (page, layer, tile of rows) with both K and V, where the H*P rows of one
(page, layer, K|V) are split into tiles of ``TG`` groups of ``G = min(32, P)`` rows (a key
scale group, so per-channel key scales are loaded once per group). The grid is 1-D: one
program per unit, or (``Tune.programs``) a few programs each walking ``UPP`` units with the
grid as stride, which leaves the other SMs to compute running beside a transfer. All loads of
a unit (K and V) are issued before its stores so many PCIe reads are in flight per thread.
Byte offsets are int64. Run backwards (``offload_pages``, codec none) it writes pool pages into
block rows: the write-back.

The decode arithmetic is ``quant_jit``'s (fp32 products, no FMA contraction, bf16 rounding by
integer ops), so the bytes equal ``reference.rehydrate_pages`` on GPU and in the interpreter.
This module imports triton; ``dispatch`` imports it lazily.
"""

# Triton reads the annotations of @triton.jit parameters (constexpr), so those stay unannotated.
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvruntime.env import triton_interpret
from kvruntime.kernels.quant_jit import _e4m3_to_f32, _store_out
from kvruntime.kernels.quantized import PageFormat, page_format, pool_layout

NONE, INT8, FP8, INT4 = 3, 0, 1, 2  # the CODEC constexpr (quant_jit's modes, plus a raw copy)
_CODEC_MODE = {"none": NONE, "int8": INT8, "fp8": FP8, "int4": INT4}
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32}


@dataclass(frozen=True)
class Tune:
    """Launch shape. ``rows``: rows of one K or V tile (rounded to whole key groups, power of
    two); ``warps``: warps per program; ``programs``: 0 = one program per work unit (the whole
    GPU), n > 0 = at most n programs, each walking a power-of-two number of units with a stride
    of the grid: a transfer that leaves the other multiprocessors to compute running beside
    it (PCIe, not the SMs, bounds it)."""

    rows: int = 64
    warps: int = 4
    programs: int = 0


DEFAULT_TUNE = Tune()  # H200: as fast as any shape tried for none/int8/fp8, 8% ahead for int4
# Beside compute: few programs. PCIe bounds the rate from 4 programs up (50.8 GB/s either way on
# an H200) while every program more takes SMs from the model: a resumed 32K turn took 90 ms
# with loads on 4 programs, 112 on 8 or 16, 148 on the whole grid; a write-back during decode
# cost 2.9% of decode speed on 8 programs (docs/KERNEL_NOTES.md).
LOAD_BESIDE_COMPUTE = Tune(rows=128, warps=8, programs=4)
# A lossy decode does more arithmetic per byte than a copy: on 4 programs the SMs, not PCIe,
# bound it (a resumed 32K turn from fp8/int8/int4 blocks took 164/106/184 ms); on 16 programs
# 88/87/87 ms, as fast as 32 and lighter on the model (docs/KERNEL_NOTES.md, run 5).
LOAD_LOSSY_BESIDE_COMPUTE = Tune(rows=128, warps=8, programs=16)
STORE_BESIDE_COMPUTE = Tune(rows=128, warps=8, programs=8)


# The unit count, grid size and layer range change from call to call (a layer-by-layer restore
# walks layer0 over 0..L-1): not specialized, so they share one compiled kernel.
@triton.jit(do_not_specialize=["n_units", "n_prog", "layer0", "num_layers"])
def _rehydrate(
    blocks, slots, dst, page_ids, row_stride, d_page, d_layer, d_kv, d_head, n_units, n_prog,
    layer0, num_layers, H: tl.constexpr, P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    G: tl.constexpr, GP: tl.constexpr, TG: tl.constexpr, TILES: tl.constexpr,
    UPP: tl.constexpr, CODEC: tl.constexpr, INDIRECT: tl.constexpr, OUT_BF16: tl.constexpr,
    K_SCALE: tl.constexpr, K_ZERO: tl.constexpr, V_SCALE: tl.constexpr, V_ZERO: tl.constexpr,
    DATA: tl.constexpr, NGV: tl.constexpr, CV: tl.constexpr, TO_BLOCKS: tl.constexpr,
):  # fmt: skip
    R: tl.constexpr = H * P
    grp = tl.arange(0, TG)[:, None, None]
    row_in = tl.arange(0, GP)[None, :, None]
    col = tl.arange(0, DP)[None, None, :]
    for step in range(UPP):  # constexpr trip count: the interpreter cannot loop over a tensor
        u = tl.program_id(0) + step * n_prog
        valid = u < n_units
        tile = u % TILES
        rest = u // TILES
        layer = (rest % num_layers + layer0).to(tl.int64)
        j = rest // num_layers
        slot = tl.load(slots + j, mask=valid, other=0).to(tl.int64)
        if INDIRECT:
            page = tl.load(page_ids + j, mask=valid, other=0).to(tl.int64)
        else:
            page = j.to(tl.int64)
        g = tile * TG + grp  # [TG, 1, 1] key group within the (page, layer) slab
        r = g * G + row_in  # [TG, GP, 1] row = head * P + token
        rmask = valid & (row_in < G) & (r < R)
        # D == DP: a mask constant along the row keeps 16-byte vector accesses
        mask = rmask & (col >= 0) if D == DP else rmask & (col < D)
        head = r // P
        d_off = page * d_page + layer * d_layer + head.to(tl.int64) * d_head + (r - head * P) * D
        d_base = dst + d_off + col
        src = blocks + slot * row_stride
        if CODEC == 3:  # none: blocks come as same-width integers (bit-exact for every dtype)
            k_src = src + (layer * 2 * R + r) * D + col
            v_src = src + ((layer * 2 + 1) * R + r) * D + col
            if TO_BLOCKS:  # the inverse: pool pages -> block rows (write-back)
                k = tl.load(d_base, mask=mask)
                v = tl.load(d_base + d_kv, mask=mask)
                tl.store(k_src, k, mask=mask)
                tl.store(v_src, v, mask=mask)
            else:
                k = tl.load(k_src, mask=mask)
                v = tl.load(v_src, mask=mask)
                tl.store(d_base, k, mask=mask)
                tl.store(d_base + d_kv, v, mask=mask)
        elif CODEC == 2:  # int4: keys per-channel groups, values per (token, channel group)
            cc = tl.arange(0, DP // 2)[None, None, :]
            pmask = rmask & (cc < D // 2)
            gmask = valid & (g * G < R) & (col < D)
            ks_off = (layer * (R // G) + g) * D + col
            vs_off = (layer * R + r) * NGV + col // CV
            packed_k = tl.load(src + DATA + (layer * 2 * R + r) * (D // 2) + cc, mask=pmask)
            packed_v = tl.load(src + DATA + ((layer * 2 + 1) * R + r) * (D // 2) + cc, mask=pmask)
            f16 = tl.pointer_type(tl.float16)
            ks = tl.load((src + K_SCALE).to(f16, bitcast=True) + ks_off, mask=gmask)
            kz = tl.load((src + K_ZERO).to(f16, bitcast=True) + ks_off, mask=gmask)
            vs = tl.load((src + V_SCALE).to(f16, bitcast=True) + vs_off, mask=mask)
            vz = tl.load((src + V_ZERO).to(f16, bitcast=True) + vs_off, mask=mask)
            qk = tl.reshape(tl.join(packed_k & 15, packed_k >> 4), [TG, GP, DP])
            qv = tl.reshape(tl.join(packed_v & 15, packed_v >> 4), [TG, GP, DP])
            k_val = qk.to(tl.float32) * ks.to(tl.float32) + kz.to(tl.float32)
            v_val = qv.to(tl.float32) * vs.to(tl.float32) + vz.to(tl.float32)
            _store_out(d_base, k_val, mask, OUT_BF16)
            _store_out(d_base + d_kv, v_val, mask, OUT_BF16)
        else:  # int8 (fp16 scales: keys per-channel groups, values per token) or fp8 (fp32)
            f32 = tl.pointer_type(tl.float32)
            k_off = (layer * 2 * R + r) * D + col
            v_off = ((layer * 2 + 1) * R + r) * D + col
            if CODEC == 0:  # uint8 loads (no pointer cast), then the int8 value of the byte
                f16 = tl.pointer_type(tl.float16)
                vs = tl.load((src + V_SCALE).to(f16, bitcast=True) + layer * R + r, mask=rmask)
                gmask = valid & (g * G < R) & (col < D)
                ks_off = (layer * (R // G) + g) * D + col
                ks = tl.load((src + K_SCALE).to(f16, bitcast=True) + ks_off, mask=gmask)
                k_code = tl.load(src + DATA + k_off, mask=mask).to(tl.int8, bitcast=True)
                v_code = tl.load(src + DATA + v_off, mask=mask).to(tl.int8, bitcast=True)
                k_val = k_code.to(tl.float32) * ks.to(tl.float32)
                v_val = v_code.to(tl.float32) * vs.to(tl.float32)
            else:
                vs = tl.load((src + V_SCALE).to(f32, bitcast=True) + layer * R + r, mask=rmask)
                ks = tl.load((src + K_SCALE).to(f32, bitcast=True) + layer * R + r, mask=rmask)
                k_val = _e4m3_to_f32(tl.load(src + DATA + k_off, mask=mask)) * ks
                v_val = _e4m3_to_f32(tl.load(src + DATA + v_off, mask=mask)) * vs
            _store_out(d_base, k_val, mask, OUT_BF16)
            _store_out(d_base + d_kv, v_val, mask, OUT_BF16)


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _offset(fmt: PageFormat, name: str) -> int:
    part = fmt.part(name)
    return part.offset if part is not None else 0


def _check(
    blocks: torch.Tensor,
    slots: torch.Tensor,
    fmt: PageFormat,
    pool: torch.Tensor,
    page_ids: torch.Tensor | None,
    layers: tuple[int, int],
) -> None:
    assert blocks.dtype == torch.uint8 and blocks.dim() == 2, (
        f"blocks {blocks.dtype} {blocks.dim()}D"
    )
    assert blocks.shape[1] == fmt.page_nbytes and blocks.stride(1) == 1, (
        f"blocks {tuple(blocks.shape)} strides {blocks.stride()}; rows of {fmt.page_nbytes} bytes"
    )
    assert blocks.stride(0) % 16 == 0, f"block row stride {blocks.stride(0)} not a multiple of 16"
    assert pool.dim() == 6 and pool.stride(5) == 1 and pool.stride(4) == pool.shape[5], (
        f"pool {tuple(pool.shape)} strides {pool.stride()}: [P, D] must be dense"
    )
    assert slots.dtype == torch.int64 and slots.dim() == 1, f"slots {slots.dtype} {slots.shape}"
    assert slots.device == pool.device, f"slots on {slots.device}, pool on {pool.device}"
    if page_ids is not None:
        assert page_ids.dtype == torch.int64 and page_ids.shape == slots.shape, "page_ids [n] int64"
        assert page_ids.device == pool.device, f"page_ids on {page_ids.device}"
    else:
        assert slots.shape[0] <= pool.shape[2], f"{slots.shape[0]} pages, pool of {pool.shape[2]}"
    assert 0 <= layers[0] <= layers[1] <= pool.shape[0], f"layers {layers} of {pool.shape[0]}"


def rehydrate_pages(
    blocks: torch.Tensor,
    slots: torch.Tensor,
    codec: str,
    pool: torch.Tensor,
    page_ids: torch.Tensor | None = None,
    layers: tuple[int, int] | None = None,
    tune: Tune | None = None,
) -> None:
    """Decode ``blocks[slots]`` into pool pages ``page_ids`` (None: page j) for layers
    ``[lo, hi)`` (Triton; arguments validated by ``dispatch``). ``tune`` None: ``DEFAULT_TUNE``
    on a GPU, one whole (page, layer) per program in the interpreter, which pays per program."""
    _launch(blocks, slots, codec, pool, page_ids, layers, tune, to_blocks=False)


def offload_pages(
    pool: torch.Tensor,
    page_ids: torch.Tensor | None,
    blocks: torch.Tensor,
    slots: torch.Tensor,
    layers: tuple[int, int] | None = None,
    tune: Tune | None = None,
) -> None:
    """The inverse of ``rehydrate_pages`` for codec ``none``: pool pages ``page_ids`` (None:
    page j) -> rows ``slots`` of ``blocks`` (pinned host memory is written over PCIe)."""
    _launch(blocks, slots, "none", pool, page_ids, layers, tune, to_blocks=True)


def _launch(
    blocks: torch.Tensor,
    slots: torch.Tensor,
    codec: str,
    pool: torch.Tensor,
    page_ids: torch.Tensor | None,
    layers: tuple[int, int] | None,
    tune: Tune | None,
    to_blocks: bool,
) -> None:
    layout = pool_layout(pool)
    fmt = page_format(codec, layout)
    lo, hi = layers if layers is not None else (0, layout.num_layers)
    _check(blocks, slots, fmt, pool, page_ids, (lo, hi))
    n = slots.shape[0]
    if n == 0 or hi == lo:
        return
    H, P, D = layout.kv_heads, layout.page_size, layout.head_dim
    G = min(32, P)
    groups = -(-H * P // G)  # key groups per (page, layer) slab, the last one maybe partial
    if tune is None:
        tune = Tune(rows=_pow2(groups) * _pow2(G), warps=1) if triton_interpret() else DEFAULT_TUNE
    TG = max(1, min(_pow2(groups), _pow2(tune.rows) // _pow2(G)))
    tiles = -(-groups // TG)
    units = n * (hi - lo) * tiles
    # a power of two per program keeps the compiled variants few as sizes vary
    upp = _pow2(-(-units // tune.programs)) if tune.programs > 0 else 1
    grid = -(-units // upp)
    src, out, row_stride = blocks, pool, blocks.stride(0)
    if codec == "none":  # copy same-width integers: no pointer casts, 16-byte accesses
        as_int = _INT_OF_WIDTH[pool.element_size()]
        src, out = blocks.view(as_int), pool.view(as_int)
        row_stride //= pool.element_size()
    bf16 = codec != "none" and pool.dtype == torch.bfloat16
    if bf16:
        out = pool.view(torch.int16)  # rounded by integer ops in _store_out
    vgroup = page_format("int4", layout).value_group if codec == "int4" else D
    _rehydrate[(grid,)](
        src, slots, out, page_ids if page_ids is not None else slots, row_stride,
        pool.stride(2), pool.stride(0), pool.stride(1), pool.stride(3), units, grid, lo, hi - lo,
        H=H, P=P, D=D, DP=_pow2(D), G=G, GP=_pow2(G), TG=TG, TILES=tiles, UPP=upp,
        CODEC=_CODEC_MODE[codec], INDIRECT=page_ids is not None, OUT_BF16=bf16,
        K_SCALE=_offset(fmt, "k_scale"), K_ZERO=_offset(fmt, "k_zero"),
        V_SCALE=_offset(fmt, "v_scale"), V_ZERO=_offset(fmt, "v_zero"),
        DATA=_offset(fmt, "data"), NGV=D // vgroup, CV=vgroup, TO_BLOCKS=to_blocks,
        num_warps=tune.warps, enable_fp_fusion=False,
    )  # fmt: skip
