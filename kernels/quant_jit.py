"""Triton quantize/dequantize kernels for the lossy codecs, fused with paged gather/scatter.

Two kernel shapes cover every codec part (see ``kvruntime.kernels.quantized`` for formats):

* rows: one scale per (token, channel group) — fp8 and int8 values/keys per token, int4
  values per min(128, D) channels. Tile ``[BLOCK_R tokens, groups, channels]``.
* cols: one scale per (channel, group of G tokens) — int8/int4 keys (KIVI). Tile
  ``[G tokens, D channels]``, looped over the slab's ``H * P / G`` token groups.

The grid is (pages, layers, tiles of the slab); one launch handles K or V. On GPU a program
takes one tile; in the interpreter, which pays per program, one program takes a whole slab.
The source (or destination) is either a page-first batch or the pool addressed through
``page_ids`` (``GATHER``/``SCATTER``). The arithmetic matches ``reference.py`` step for step
(IEEE division for each group's scale and its reciprocal, FMA contraction off), and the
conversions the interpreter gets wrong (fp32 -> fp8, fp32 -> bf16) are done with integer ops,
so both backends write the same bytes.
Launchers live in ``kvruntime.kernels.quant``. This module imports triton; ``dispatch``
imports it lazily.
"""

# Triton reads the annotations of @triton.jit parameters (constexpr), so those stay unannotated.
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import triton
import triton.language as tl

INT8, FP8, INT4 = 0, 1, 2  # the MODE constexpr


@triton.jit
def _f32_to_e4m3(y):
    """|y| <= 448 -> float8_e4m3fn bits (uint8), round to nearest even."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # normal range: round the mantissa to 3 bits on the raw bits, rebias exponent 127 -> 7
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal range (< 2^-6): multiples of 2^-9; adding 2^23 rounds to an integer (RNE)
    ay = mag.to(tl.float32, bitcast=True)
    sub = ((ay * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    return (tl.where(ay < 0.015625, sub, normal) | sign).to(tl.uint8)


@triton.jit
def _e4m3_to_f32(c):
    c = c.to(tl.uint32)
    exp = (c >> 3) & 0xF
    normal = ((exp + 120) << 23) | ((c & 7) << 20)
    sub = ((c & 7).to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)
    bits = tl.where(exp == 0, sub, normal) | ((c & 0x80) << 24)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_out(ptr, val, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:  # ptr is an int16 view; round to nearest even by hand (the interpreter truncates)
        bits = val.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(val != val, 0x7FC0, rounded)
        tl.store(ptr, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _page(ids, i, INDIRECT: tl.constexpr):
    if INDIRECT:
        return tl.load(ids + i).to(tl.int64)
    else:
        return i.to(tl.int64)


@triton.jit
def _asym4(lo, hi):
    """fp16-rounded scale and zero (as fp32) of a 4-bit group spanning [lo, hi]."""
    scale = tl.minimum(tl.math.div_rn(hi - lo, 15.0), 65504.0).to(tl.float16).to(tl.float32)
    zero = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _scale8(amax):
    """fp16-rounded scale (as fp32) of a symmetric int8 group; codes use the rounded scale."""
    return tl.minimum(tl.math.div_rn(amax, 127.0), 65504.0).to(tl.float16).to(tl.float32)


@triton.jit
def quant_rows(
    src, ids, codes, scale, zero, s_page, s_layer, c_page, c_layer, sc_page, sc_layer,
    R: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
    BLOCK_R: tl.constexpr, TILES: tl.constexpr, NG_P: tl.constexpr, GS_P: tl.constexpr,
    MODE: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    src_base = src + _page(ids, i, GATHER) * s_page + layer * s_layer
    c_base = codes + i.to(tl.int64) * c_page + layer * c_layer
    sc_off = i.to(tl.int64) * sc_page + layer * sc_layer
    g3 = tl.arange(0, NG_P)[None, :, None]
    c3 = tl.arange(0, GS_P)[None, None, :]
    g2 = tl.arange(0, NG_P)[None, :]
    r_first = tl.program_id(2) * (BLOCK_R * TILES)
    for tile in range(TILES):  # constexpr bounds: the interpreter cannot range over tensors
        r0 = r_first + tile * BLOCK_R
        rows = r0 + tl.arange(0, BLOCK_R)[:, None, None]
        mask = (rows < R) & (g3 < NG) & (c3 < GS)
        rows2 = r0 + tl.arange(0, BLOCK_R)[:, None]
        mask2 = (rows2 < R) & (g2 < NG)
        x = tl.load(src_base + rows * D + g3 * GS + c3, mask=mask, other=0.0).to(tl.float32)
        if MODE == 2:
            lo = tl.min(tl.where(mask, x, float("inf")), axis=2)
            hi = tl.max(tl.where(mask, x, float("-inf")), axis=2)
            s, z = _asym4(lo, hi)
            inv = tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0))[:, :, None]
            q = tl.floor((x - z[:, :, None]) * inv + 0.5)
            q = tl.minimum(tl.maximum(q, 0.0), 15.0).to(tl.uint8)
            even, odd = tl.split(tl.reshape(q, [BLOCK_R, NG_P, GS_P // 2, 2]))
            j3 = tl.arange(0, GS_P // 2)[None, None, :]
            pmask = (rows < R) & (g3 < NG) & (j3 < GS // 2)
            tl.store(c_base + rows * DC + g3 * (GS // 2) + j3, even | (odd << 4), mask=pmask)
            tl.store(zero + sc_off + rows2 * NG + g2, z.to(tl.float16), mask=mask2)
            tl.store(scale + sc_off + rows2 * NG + g2, s.to(tl.float16), mask=mask2)
        else:
            amax = tl.max(tl.abs(x), axis=2)
            if MODE == 0:
                s = _scale8(amax)
                inv = tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0))[:, :, None]
                q = tl.minimum(tl.maximum(tl.floor(x * inv + 0.5), -127.0), 127.0).to(tl.int8)
            else:
                s = tl.math.div_rn(amax, 448.0)
                inv = tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0))[:, :, None]
                q = _f32_to_e4m3(tl.minimum(tl.maximum(x * inv, -448.0), 448.0))
            tl.store(c_base + rows * DC + g3 * GS + c3, q, mask=mask)
            tl.store(scale + sc_off + rows2 * NG + g2, s.to(scale.dtype.element_ty), mask=mask2)


@triton.jit
def dequant_rows(
    codes, scale, zero, dst, ids, c_page, c_layer, sc_page, sc_layer, d_page, d_layer,
    R: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
    BLOCK_R: tl.constexpr, TILES: tl.constexpr, NG_P: tl.constexpr, GS_P: tl.constexpr,
    MODE: tl.constexpr, SCATTER: tl.constexpr, OUT_BF16: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    d_base = dst + _page(ids, i, SCATTER) * d_page + layer * d_layer
    c_base = codes + i.to(tl.int64) * c_page + layer * c_layer
    sc_off = i.to(tl.int64) * sc_page + layer * sc_layer
    g3 = tl.arange(0, NG_P)[None, :, None]
    c3 = tl.arange(0, GS_P)[None, None, :]
    r_first = tl.program_id(2) * (BLOCK_R * TILES)
    for tile in range(TILES):  # constexpr bounds: the interpreter cannot range over tensors
        r0 = r_first + tile * BLOCK_R
        rows = r0 + tl.arange(0, BLOCK_R)[:, None, None]
        mask = (rows < R) & (g3 < NG) & (c3 < GS)
        smask = (rows < R) & (g3 < NG)
        s = tl.load(scale + sc_off + rows * NG + g3, mask=smask, other=0.0).to(tl.float32)
        if MODE == 2:
            z = tl.load(zero + sc_off + rows * NG + g3, mask=smask, other=0.0).to(tl.float32)
            j3 = tl.arange(0, GS_P // 2)[None, None, :]
            pmask = smask & (j3 < GS // 2)
            packed = tl.load(c_base + rows * DC + g3 * (GS // 2) + j3, mask=pmask, other=0)
            q = tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK_R, NG_P, GS_P])
            val = q.to(tl.float32) * s + z
        elif MODE == 0:
            c_off = rows * DC + g3 * GS + c3
            val = tl.load(c_base + c_off, mask=mask, other=0).to(tl.float32) * s
        else:
            c_off = rows * DC + g3 * GS + c3
            val = _e4m3_to_f32(tl.load(c_base + c_off, mask=mask, other=0)) * s
        _store_out(d_base + rows * D + g3 * GS + c3, val, mask, OUT_BF16)


@triton.jit
def quant_cols(
    src, ids, codes, scale, zero, s_page, s_layer, c_page, c_layer, sc_page, sc_layer,
    NGRP: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    G_P: tl.constexpr, D_P: tl.constexpr, GPP: tl.constexpr, MODE: tl.constexpr,
    GATHER: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    src_base = src + _page(ids, i, GATHER) * s_page + layer * s_layer
    c_base = codes + i.to(tl.int64) * c_page + layer * c_layer
    sc_base = i.to(tl.int64) * sc_page + layer * sc_layer
    tok = tl.arange(0, G_P)[:, None]
    ch = tl.arange(0, D_P)[None, :]
    ch1 = tl.arange(0, D_P)
    mask = (tok < G) & (ch < D)
    t_first = tl.program_id(2) * GPP
    for step in range(GPP):
        t = t_first + step
        rows = t * G + tok
        x = tl.load(src_base + rows * D + ch, mask=mask, other=0.0).to(tl.float32)
        if MODE == 2:
            lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
            hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
            s, z = _asym4(lo, hi)
            inv = tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0))[None, :]
            q = tl.floor((x - z[None, :]) * inv + 0.5)
            q = tl.minimum(tl.maximum(q, 0.0), 15.0).to(tl.uint8)
            even, odd = tl.split(tl.reshape(q, [G_P, D_P // 2, 2]))
            jj = tl.arange(0, D_P // 2)[None, :]
            tl.store(c_base + rows * DC + jj, even | (odd << 4), mask=(tok < G) & (jj < D // 2))
            tl.store(zero + sc_base + t * D + ch1, z.to(tl.float16), mask=ch1 < D)
            tl.store(scale + sc_base + t * D + ch1, s.to(tl.float16), mask=ch1 < D)
        else:
            s = _scale8(tl.max(tl.abs(x), axis=0))
            inv = tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0))[None, :]
            q = tl.minimum(tl.maximum(tl.floor(x * inv + 0.5), -127.0), 127.0).to(tl.int8)
            tl.store(c_base + rows * DC + ch, q, mask=mask)
            tl.store(scale + sc_base + t * D + ch1, s.to(tl.float16), mask=ch1 < D)


@triton.jit
def dequant_cols(
    codes, scale, zero, dst, ids, c_page, c_layer, sc_page, sc_layer, d_page, d_layer,
    NGRP: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    G_P: tl.constexpr, D_P: tl.constexpr, GPP: tl.constexpr, MODE: tl.constexpr,
    SCATTER: tl.constexpr, OUT_BF16: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    d_base = dst + _page(ids, i, SCATTER) * d_page + layer * d_layer
    c_base = codes + i.to(tl.int64) * c_page + layer * c_layer
    sc_base = i.to(tl.int64) * sc_page + layer * sc_layer
    tok = tl.arange(0, G_P)[:, None]
    ch = tl.arange(0, D_P)[None, :]
    mask = (tok < G) & (ch < D)
    t_first = tl.program_id(2) * GPP
    for step in range(GPP):
        t = t_first + step
        rows = t * G + tok
        s = tl.load(scale + sc_base + t * D + ch, mask=ch < D, other=0.0).to(tl.float32)
        if MODE == 2:
            z = tl.load(zero + sc_base + t * D + ch, mask=ch < D, other=0.0).to(tl.float32)
            jj = tl.arange(0, D_P // 2)[None, :]
            packed = tl.load(c_base + rows * DC + jj, mask=(tok < G) & (jj < D // 2), other=0)
            q = tl.reshape(tl.join(packed & 15, packed >> 4), [G_P, D_P])
            val = q.to(tl.float32) * s + z
        else:
            val = tl.load(c_base + rows * DC + ch, mask=mask, other=0).to(tl.float32) * s
        _store_out(d_base + rows * D + ch, val, mask, OUT_BF16)
