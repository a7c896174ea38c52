"""Page codecs: how one page of KV becomes one fixed-size uint8 block and back.

A codec turns pages ``[n, L, 2, H, P, D]`` into blocks ``[n, page_nbytes]`` (uint8, one row per
page, the unit the host tier, the wire format and Redis store) and back. The math runs in
``kvruntime.kernels`` (Triton on GPU, torch on CPU, same bytes); the fused pool paths read or
write the device pool directly with no page-first staging copy. Block layouts are described in
``kvruntime.kernels.quantized``.

Each lossy codec states an error bound per element ``x`` (``x̂`` its decoded value, ``u`` the
unit roundoff of the KV dtype: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32) and ``error_bound`` computes
it from the original pages, so tests and benchmarks check the statement itself::

    |x̂ - x| <= b + u * (|x| + b) + 2^-24      with the codec's b below.

Codecs are stateless; all methods are safe to call from any thread. Bad input raises
BadRequest (shapes, dtypes, devices, block sizes); an unknown name raises UnknownName.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvruntime import kernels
from kvruntime.errors import BadRequest
from kvruntime.kernels.layout import PageLayout
from kvruntime.kernels.quantized import PageFormat, QuantizedPages, page_format, pages_layout
from kvruntime.registry import Registry

_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
_SLOP = 2.0**-20  # fp32 arithmetic of scale, division and product, relative to the group size


class Codec:
    """A page codec. Subclasses set ``name``, ``lossless`` and define ``_bound``."""

    name: str = ""
    lossless: bool = False

    def format(self, layout: PageLayout) -> PageFormat:
        """Block layout for ``layout``; BadRequest when the layout does not fit the codec."""
        return page_format(self.name, layout)

    def page_nbytes(self, layout: PageLayout) -> int:
        """Encoded bytes of one page: fixed for a layout."""
        return self.format(layout).page_nbytes

    def bytes_per_token(self, layout: PageLayout) -> float:
        return self.format(layout).bytes_per_token

    def encode(self, pages: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode pages [n, L, 2, H, P, D] into uint8 blocks [n, page_nbytes] on their device
        (into ``out`` when given: rows of a preallocated buffer)."""
        q_out = self._wrap(out, pages_layout(pages)) if out is not None else None
        return kernels.quantize_pages(pages, self.name, q_out).blocks

    def decode(self, blocks: torch.Tensor, layout: PageLayout, out: torch.Tensor) -> torch.Tensor:
        """Decode blocks [n, page_nbytes] into ``out`` [n, L, 2, H, P, D] (same device).
        Returns ``out``; changes nothing else."""
        return kernels.dequantize_pages(self._wrap(blocks, layout), out)

    def encode_from_pool(
        self,
        pool: torch.Tensor,
        page_ids: torch.Tensor,
        layout: PageLayout,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode pool [L, 2, N, H, P, D] pages ``page_ids`` in one fused pass; reads only."""
        self._check_pool(pool, layout)
        q_out = self._wrap(out, layout) if out is not None else None
        return kernels.gather_quantize(pool, page_ids, self.name, q_out).blocks

    def decode_into_pool(
        self, blocks: torch.Tensor, page_ids: torch.Tensor, pool: torch.Tensor, layout: PageLayout
    ) -> None:
        """Decode blocks straight into pool pages ``page_ids``; changes only those pages."""
        self._check_pool(pool, layout)
        kernels.dequantize_scatter(self._wrap(blocks, layout), page_ids, pool)

    def error_bound(self, pages: torch.Tensor) -> torch.Tensor:
        """Per-element bound on |decode(encode(pages)) - pages|: fp32, the shape of ``pages``."""
        layout = pages_layout(pages)
        x = pages.float()
        b = torch.stack(
            (self._bound(x[:, :, 0], layout, True), self._bound(x[:, :, 1], layout, False)), 2
        )
        return b + _UNIT_ROUNDOFF[layout.dtype] * (x.abs() + b) + 2.0**-24

    def _bound(self, x: torch.Tensor, layout: PageLayout, keys: bool) -> torch.Tensor:
        """The codec's ``b`` for keys or values x [n, L, H, P, D] (fp32)."""
        raise NotImplementedError

    def _wrap(self, blocks: torch.Tensor, layout: PageLayout) -> QuantizedPages:
        if not isinstance(blocks, torch.Tensor):
            raise BadRequest(f"blocks must be a uint8 tensor, got {type(blocks).__name__}")
        return QuantizedPages.from_blocks(self.format(layout), blocks)

    @staticmethod
    def _check_pool(pool: torch.Tensor, layout: PageLayout) -> None:
        if kernels.pool_layout(pool) != layout:
            raise BadRequest(f"pool {tuple(pool.shape)} {pool.dtype} is not {layout.describe()}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---- group statistics broadcast back to elements (x: [n, L, H, P, D] fp32) -------------------

Reduce = Callable[[torch.Tensor, int], torch.Tensor]


def _amax(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.abs().amax(dim, keepdim=True)


def _range(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.amax(dim, keepdim=True) - t.amin(dim, keepdim=True)


def _per_token(x: torch.Tensor, fn: Reduce) -> torch.Tensor:
    return fn(x, -1).expand_as(x)


def _per_key_group(x: torch.Tensor, group: int, fn: Reduce) -> torch.Tensor:
    g = x.unflatten(3, (x.shape[3] // group, group))
    return fn(g, 4).expand_as(g).flatten(3, 4)


def _per_value_group(x: torch.Tensor, group: int, fn: Reduce) -> torch.Tensor:
    g = x.unflatten(-1, (x.shape[-1] // group, group))
    return fn(g, -1).expand_as(g).flatten(-2)


# ---- the codecs ------------------------------------------------------------------------------


class NoneCodec(Codec):
    """Raw KV in its dtype: decode(encode(x)) == x bit for bit (b = 0)."""

    name = "none"
    lossless = True

    def error_bound(self, pages: torch.Tensor) -> torch.Tensor:
        pages_layout(pages)
        return torch.zeros(pages.shape, dtype=torch.float32, device=pages.device)


class Fp8Codec(Codec):
    """float8_e4m3fn codes with an fp32 scale per (layer, K|V, head, token) = absmax / 448.

    b = 2^-4 * |x| + 2^-10 * scale + 2^-20 * absmax (3 mantissa bits; subnormal step 2^-9 * scale).
    Relative precision does not depend on the scale, so outlier channels cost nothing extra.
    """

    name = "fp8"

    def _bound(self, x: torch.Tensor, layout: PageLayout, keys: bool) -> torch.Tensor:
        amax = _per_token(x, _amax)
        return 2.0**-4 * x.abs() + 2.0**-10 * amax / 448 + _SLOP * amax


class Int8Codec(Codec):
    """Symmetric int8 (codes -127..127), fp16 scales = absmax / 127 rounded to fp16 (the codes
    are computed with the rounded scale; scales saturate at 65504, i.e. absmax 8.3e6). Keys:
    one scale per (layer, head, channel, group of min(32, P) tokens) — KIVI's per-channel
    grouping, so outlier channels do not widen other channels' steps. Values: one scale per
    (layer, head, token) over head_dim.

    b = absmax / 254 + 2^-11 * absmax + 2^-18 + 2^-20 * absmax over the element's group: half
    a step, widened by the fp16 rounding of the scale (relative 2^-11, or 2^-25 absolute where
    the scale is subnormal; a code clipped at ±127 by a scale rounded down errs by at most
    127 times that rounding).
    """

    name = "int8"

    def _bound(self, x: torch.Tensor, layout: PageLayout, keys: bool) -> torch.Tensor:
        group = min(32, layout.page_size)
        amax = _per_key_group(x, group, _amax) if keys else _per_token(x, _amax)
        return amax / 254 + 2.0**-11 * amax + 2.0**-18 + _SLOP * amax


class Int4Codec(Codec):
    """Asymmetric 4-bit (KIVI): codes 0..15, x̂ = code * scale + zero, scale = range / 15 and
    zero = group minimum, both fp16 (values saturate at ±65504). Keys: groups of min(32, P)
    tokens per (layer, head, channel); values: groups of min(128, D) channels per
    (layer, head, token), i.e. one group per token for head_dim <= 128 (format 2; it was 32
    channels, whose metadata made a 16-token page 0.344x of bf16 instead of 0.320x). Two codes
    per byte.

    b = range / 30 + 2^-10 * (range + absmax) + 2^-20 over the element's group
    (the 2^-10 terms cover fp16 rounding of scale and zero).
    """

    name = "int4"

    def _bound(self, x: torch.Tensor, layout: PageLayout, keys: bool) -> torch.Tensor:
        if keys:
            group = min(32, layout.page_size)
            rng, amax = _per_key_group(x, group, _range), _per_key_group(x, group, _amax)
        else:
            group = page_format(self.name, layout).value_group
            rng, amax = _per_value_group(x, group, _range), _per_value_group(x, group, _amax)
        return rng / 30 + 2.0**-10 * (rng + amax) + 2.0**-20


CODECS: Registry[Codec] = Registry("codec")
for _codec in (NoneCodec(), Fp8Codec(), Int8Codec(), Int4Codec()):
    CODECS.add(_codec.name, _codec)


def get_codec(name: str) -> Codec:
    """The codec called ``name``; UnknownName (listing the known ones) otherwise."""
    return CODECS.get(name)


def codec_names() -> list[str]:
    return CODECS.names()
