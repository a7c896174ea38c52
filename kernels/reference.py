"""Pure-torch reference of every kernel, same signatures as the Triton launchers.

This is what CPU users run, so it is vectorized over all pages and layers at once. Inputs are
validated by ``kvruntime.kernels.dispatch``; here they are assumed well formed. The arithmetic
is written step for step like the Triton kernels (fp32, one reciprocal per group then
multiplications, floor(y + 0.5) rounding, fp16 scale storage), so both backends produce the
same bytes.

Memory: the lossy paths hold a few fp32 copies of the batch; callers bound the batch size.
"""

from __future__ import annotations

import dataclasses

import torch

from kvruntime.kernels.quantized import QuantizedPages, page_format, pages_layout, pool_layout

FP8_MAX = 448.0
FP16_MAX = 65504.0


def _page_first(pool: torch.Tensor) -> torch.Tensor:
    """[L, 2, N, H, P, D] pool seen as [N, L, 2, H, P, D] (a view)."""
    return pool.permute(2, 0, 1, 3, 4, 5)


def gather_pages(pool: torch.Tensor, page_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if out.is_contiguous():
        return torch.index_select(_page_first(pool), 0, page_ids, out=out)
    return out.copy_(_page_first(pool).index_select(0, page_ids))


def scatter_pages(pages: torch.Tensor, page_ids: torch.Tensor, pool: torch.Tensor) -> None:
    _page_first(pool).index_copy_(0, page_ids, pages)


# ---- quantization math on fp32 tensors -------------------------------------------------------


def _inv(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale (1 where the scale is 0): one division per group, then multiplications."""
    return 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale))


def _round(y: torch.Tensor) -> torch.Tensor:
    return torch.floor(y + 0.5)


def _key_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[n, L, H, P, D] -> [n, L, H, P/group, group, D]: tokens grouped for per-channel scales."""
    return x.unflatten(3, (x.shape[3] // group, group))


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D] of 4-bit codes -> uint8 [..., D/2]: even channel low, odd channel high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D/2] -> uint8 [..., D]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _int8_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp16 scale of symmetric int8 groups; the codes are computed with this rounded scale."""
    return (amax / 127).clamp(max=FP16_MAX).to(torch.float16)


def _int4_params(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero (group minimum) of asymmetric 4-bit groups; saturated to fp16."""
    scale = ((mx - mn) / 15).clamp(max=FP16_MAX).to(torch.float16)
    zero = mn.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    return scale, zero


def _int4_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return _round((x - zero.float()) * _inv(scale.float())).clamp(0, 15).to(torch.uint8)


def _encode(k: torch.Tensor, v: torch.Tensor, q: QuantizedPages) -> None:
    """Quantize fp32 keys/values [n, L, H, P, D] into the views of ``q``."""
    fmt = q.fmt
    g = fmt.key_group
    if fmt.codec == "fp8":
        assert q.k_scale is not None and q.v_scale is not None
        for x, scale_out, kv in ((k, q.k_scale, 0), (v, q.v_scale, 1)):
            scale = x.abs().amax(-1) / FP8_MAX
            y = (x * _inv(scale).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
            q.data[:, :, kv].copy_(y.to(torch.float8_e4m3fn))
            scale_out.copy_(scale)
    elif fmt.codec == "int8":
        assert q.k_scale is not None and q.v_scale is not None
        kg = _key_groups(k, g)  # [n, L, H, P/G, G, D]
        k_scale = _int8_scale(kg.abs().amax(4))  # [n, L, H, P/G, D] fp16
        k_codes = _round(kg * _inv(k_scale.float()).unsqueeze(4)).clamp(-127, 127)
        q.data[:, :, 0].copy_(k_codes.flatten(3, 4))
        q.k_scale.copy_(k_scale)
        v_scale = _int8_scale(v.abs().amax(-1))  # [n, L, H, P] fp16
        q.data[:, :, 1].copy_(_round(v * _inv(v_scale.float()).unsqueeze(-1)).clamp(-127, 127))
        q.v_scale.copy_(v_scale)
    elif fmt.codec == "int4":
        assert q.k_scale is not None and q.k_zero is not None
        assert q.v_scale is not None and q.v_zero is not None
        kg = _key_groups(k, g)
        k_scale, k_zero = _int4_params(kg.amin(4), kg.amax(4))  # [n, L, H, P/G, D]
        k_codes = _int4_codes(kg, k_scale.unsqueeze(4), k_zero.unsqueeze(4)).flatten(3, 4)
        q.data[:, :, 0].copy_(_pack(k_codes))
        q.k_scale.copy_(k_scale)
        q.k_zero.copy_(k_zero)
        vg = v.unflatten(-1, (v.shape[-1] // fmt.value_group, fmt.value_group))
        v_scale, v_zero = _int4_params(vg.amin(-1), vg.amax(-1))  # [n, L, H, P, D/C]
        v_codes = _int4_codes(vg, v_scale.unsqueeze(-1), v_zero.unsqueeze(-1)).flatten(-2)
        q.data[:, :, 1].copy_(_pack(v_codes))
        q.v_scale.copy_(v_scale)
        q.v_zero.copy_(v_zero)
    else:
        raise AssertionError(f"_encode got codec {fmt.codec!r}")


def _decode(q: QuantizedPages) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 keys and values [n, L, H, P, D] of ``q`` (a lossy codec)."""
    fmt = q.fmt
    g = fmt.key_group
    assert q.k_scale is not None and q.v_scale is not None
    if fmt.codec == "fp8":
        data = q.data.float()
        k = data[:, :, 0] * q.k_scale.unsqueeze(-1)
        v = data[:, :, 1] * q.v_scale.unsqueeze(-1)
    elif fmt.codec == "int8":
        data = q.data.float()
        k = (_key_groups(data[:, :, 0], g) * q.k_scale.float().unsqueeze(4)).flatten(3, 4)
        v = data[:, :, 1] * q.v_scale.float().unsqueeze(-1)
    elif fmt.codec == "int4":
        assert q.k_zero is not None and q.v_zero is not None
        codes = _unpack(q.data).float()  # [n, L, 2, H, P, D]
        kg = _key_groups(codes[:, :, 0], g) * q.k_scale.float().unsqueeze(4)
        k = (kg + q.k_zero.float().unsqueeze(4)).flatten(3, 4)
        c = fmt.value_group
        vg = codes[:, :, 1].unflatten(-1, (codes.shape[-1] // c, c))
        vg = vg * q.v_scale.float().unsqueeze(-1) + q.v_zero.float().unsqueeze(-1)
        v = vg.flatten(-2)
    else:
        raise AssertionError(f"_decode got codec {fmt.codec!r}")
    return k, v


# ---- public reference kernels ----------------------------------------------------------------


def quantize_pages(
    pages: torch.Tensor, codec: str, out: QuantizedPages | None = None
) -> QuantizedPages:
    fmt = page_format(codec, pages_layout(pages))
    q = out if out is not None else QuantizedPages.empty(fmt, pages.shape[0], pages.device)
    if codec == "none":
        q.data.copy_(pages)
    else:
        _encode(pages[:, :, 0].float(), pages[:, :, 1].float(), q)
    return q


def dequantize_pages(q: QuantizedPages, out: torch.Tensor) -> torch.Tensor:
    if q.codec == "none":
        return out.copy_(q.data)
    k, v = _decode(q)
    out[:, :, 0].copy_(k)
    out[:, :, 1].copy_(v)
    return out


def gather_quantize(
    pool: torch.Tensor, page_ids: torch.Tensor, codec: str, out: QuantizedPages | None = None
) -> QuantizedPages:
    fmt = page_format(codec, pool_layout(pool))
    q = out if out is not None else QuantizedPages.empty(fmt, page_ids.shape[0], pool.device)
    if codec == "none":
        gather_pages(pool, page_ids, q.data)
    else:
        # [L, N, H, P, D] -> [n, L, H, P, D]
        k = pool[:, 0].index_select(1, page_ids).transpose(0, 1).float()
        v = pool[:, 1].index_select(1, page_ids).transpose(0, 1).float()
        _encode(k, v, q)
    return q


def dequantize_scatter(q: QuantizedPages, page_ids: torch.Tensor, pool: torch.Tensor) -> None:
    if q.codec == "none":
        scatter_pages(q.data, page_ids, pool)
        return
    k, v = _decode(q)
    pages = torch.stack((k, v), dim=2).to(pool.dtype)  # [n, L, 2, H, P, D]
    scatter_pages(pages, page_ids, pool)


def _layers(part: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return part[:, lo:hi] if part is not None else None


def rehydrate_pages(
    blocks: torch.Tensor,
    slots: torch.Tensor,
    codec: str,
    pool: torch.Tensor,
    page_ids: torch.Tensor | None = None,
    layers: tuple[int, int] | None = None,
    tune: object = None,
) -> None:
    """Decode ``blocks[slots]`` (encoded pages, any device) into pool pages ``page_ids`` (None:
    page j gets ``slots[j]``) for layers ``[lo, hi)``: the host-side gather + copy a user would
    write, then the same decode as ``dequantize_scatter``. ``tune`` (a launch shape) is ignored."""
    fmt = page_format(codec, pool_layout(pool))
    lo, hi = layers if layers is not None else (0, fmt.layout.num_layers)
    n = slots.shape[0]
    if n == 0 or hi == lo:
        return
    # [n, page_nbytes] uint8 on the pool's device
    picked = blocks.index_select(0, slots.to(blocks.device)).to(pool.device)
    q = QuantizedPages.from_blocks(fmt, picked)
    ids = page_ids if page_ids is not None else torch.arange(n, device=pool.device)
    if codec == "none":
        pages = q.data[:, lo:hi]  # [n, hi-lo, 2, H, P, D]
    else:
        k, v = _decode(
            dataclasses.replace(
                q,
                data=q.data[:, lo:hi],
                k_scale=_layers(q.k_scale, lo, hi),
                k_zero=_layers(q.k_zero, lo, hi),
                v_scale=_layers(q.v_scale, lo, hi),
                v_zero=_layers(q.v_zero, lo, hi),
            )
        )
        pages = torch.stack((k, v), dim=2).to(pool.dtype)
    _page_first(pool[lo:hi]).index_copy_(0, ids, pages)


def offload_pages(
    pool: torch.Tensor,
    page_ids: torch.Tensor | None,
    blocks: torch.Tensor,
    slots: torch.Tensor,
    layers: tuple[int, int] | None = None,
    tune: object = None,
) -> None:
    """Raw (codec ``none``) pool pages ``page_ids`` (None: page j) into rows ``slots`` of
    ``blocks``, layers ``[lo, hi)`` only: gather on the pool's device, one copy, index_copy_."""
    fmt = page_format("none", pool_layout(pool))
    lo, hi = layers if layers is not None else (0, fmt.layout.num_layers)
    n = slots.shape[0]
    if n == 0 or hi == lo:
        return
    ids = page_ids if page_ids is not None else torch.arange(n, device=pool.device)
    at = slots.to(blocks.device)
    rows = blocks.index_select(0, at)  # [n, page_nbytes]: other layers keep their bytes
    q = QuantizedPages.from_blocks(fmt, rows)
    q.data[:, lo:hi].copy_(_page_first(pool[lo:hi]).index_select(0, ids))
    blocks.index_copy_(0, at, rows)
