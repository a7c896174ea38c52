"""Fused quantize/dequantize kernels: Triton (interpreter) against the torch reference.

Both backends do the same fp32 steps and round with integer ops where the interpreter's float
conversions are off, so blocks and decoded pages must agree byte for byte.
"""

from __future__ import annotations

import pytest
import torch

import kvruntime.kernels as K
from kvruntime.errors import BadRequest, UnknownName
from kvruntime.kernels import quant, reference
from kvruntime.kernels.layout import PageLayout
from kvruntime.kernels.quantized import QuantizedPages, page_format

LOSSY = ["fp8", "int8", "int4"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (L, H, P, D, n): P=12/D=24 exercise masks (non powers of two), P=64 two key groups,
# D=256 two int4 value groups
SHAPES = [
    (1, 1, 4, 32, 2),
    (2, 3, 16, 64, 3),
    (3, 3, 4, 32, 1),
    (1, 2, 12, 24, 2),
    (1, 1, 64, 32, 1),
    (1, 1, 4, 256, 1),
]


def _layout(shape: tuple[int, ...], dtype: torch.dtype) -> PageLayout:
    L, H, P, D, _ = shape
    return PageLayout(num_layers=L, kv_heads=H, head_dim=D, page_size=P, dtype=dtype)


def _kv_pool(layout: PageLayout, num_pages: int, seed: int) -> torch.Tensor:
    """Keys with a few outlier channels (up to 80x), values plain normal, per-token spread."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(layout.pool_shape(num_pages), generator=g)
    pool[:, 0, ..., :: max(1, layout.head_dim // 3)] *= 80.0
    pool *= torch.rand(layout.pool_shape(num_pages)[:-1], generator=g)[..., None] * 4
    return pool.to(layout.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(codec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    layout = _layout(shape, dtype)
    n = shape[-1]
    pool = _kv_pool(layout, n + 2, seed=n)
    ids = torch.randperm(n + 2, generator=torch.Generator().manual_seed(1))[:n]
    where = f"{codec} {layout.describe()} n={n}"

    want = reference.gather_quantize(pool, ids, codec)
    got = quant.gather_quantize(pool, ids, codec)
    assert torch.equal(got.blocks, want.blocks), where
    pages = pool[:, :, ids].permute(2, 0, 1, 3, 4, 5).contiguous()
    assert torch.equal(quant.quantize_pages(pages, codec).blocks, want.blocks), where

    out_t, out_r = torch.empty_like(pages), torch.empty_like(pages)
    quant.dequantize_pages(want, out_t)
    reference.dequantize_pages(want, out_r)
    assert torch.equal(out_t, out_r), where

    pool_t, pool_r = torch.zeros_like(pool), torch.zeros_like(pool)
    quant.dequantize_scatter(want, ids, pool_t)
    reference.dequantize_scatter(want, ids, pool_r)
    assert torch.equal(pool_t, pool_r), where
    assert torch.equal(pool_t[:, :, ids].permute(2, 0, 1, 3, 4, 5), out_r), where


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_codes_round_like_torch(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose absmax is 448 have scale 1, so codes must equal torch's own conversion,
    ties to even and subnormals included."""
    monkeypatch.setenv("KVR_KERNELS", backend)
    specials = torch.tensor(
        [1.0625, 1.1875, -3.25, 2**-10, 3 * 2**-10, 2**-6 - 2**-11, 2**-6 + 2**-10, 0.0, -0.0,
         1e-30, 447.0, 200.0, -17.0, 2**-9 * 1.5, 440.0, 0.3]
    )  # fmt: skip
    rows = torch.cat([specials, torch.randn(112) * 30]).clamp(-447, 447).view(4, 32)
    rows[:, 0] = 448.0
    pages = rows.view(1, 1, 2, 1, 2, 32)  # [n, L, 2, H, P, D]
    q = K.quantize_pages(pages, "fp8")
    assert torch.equal(q.data.view(torch.uint8), pages.to(torch.float8_e4m3fn).view(torch.uint8))
    assert q.k_scale is not None and torch.equal(q.k_scale, torch.ones(1, 1, 1, 2))


@pytest.mark.parametrize("codec", LOSSY)
def test_zero_and_constant_pages(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVR_KERNELS", "triton")
    pages = torch.zeros(2, 1, 2, 1, 4, 32)
    pages[1] = 3.0
    q = K.quantize_pages(pages, codec)
    out = K.dequantize_pages(q, torch.empty_like(pages))
    assert torch.equal(out[0], pages[0]), codec  # scale 0 must not divide by zero
    if codec == "int8":  # 127 * fp16(3/127) is 3 only to within fp16's rounding of the scale
        assert float((out[1] - 3.0).abs().max()) <= 3.0 * 2**-11, codec
    else:
        assert torch.equal(out[1], pages[1]), codec  # fp8: 448 * 3/448; int4: the zero is 3.0


def test_quantized_pages_are_views_of_blocks() -> None:
    layout = PageLayout(num_layers=2, kv_heads=3, head_dim=32, page_size=4)
    fmt = page_format("int4", layout)
    q = QuantizedPages.empty(fmt, 3, "cpu")
    assert q.blocks.shape == (3, fmt.page_nbytes) and fmt.page_nbytes % 16 == 0
    assert q.data.shape == (3, 2, 2, 3, 4, 16) and q.k_scale is not None
    assert q.k_scale.shape == (3, 2, 3, 1, 32) and q.k_scale.dtype == torch.float16
    q.blocks.fill_(7)
    assert bool((q.data == 7).all())  # the view sees writes to the block
    single = QuantizedPages.from_blocks(fmt, q.blocks[1])
    assert single.num_pages == 1 and single.data.data_ptr() == q.data[1].data_ptr()
    used = fmt.parts[-1].offset + fmt.parts[-1].nbytes
    fresh = QuantizedPages.empty(fmt, 2, "cpu")
    assert not fresh.blocks[:, used:].any(), "tail padding must be zeroed"
    with pytest.raises(BadRequest, match=rf"needs \[n, {fmt.page_nbytes}\]"):
        QuantizedPages.from_blocks(fmt, q.blocks[:, 1:])
    with pytest.raises(BadRequest, match="uint8"):
        QuantizedPages.from_blocks(fmt, q.blocks.view(torch.int8))


def test_fused_paths_equal_unfused_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVR_KERNELS", "triton")
    layout = PageLayout(num_layers=2, kv_heads=1, head_dim=64, page_size=16)
    pool = _kv_pool(layout, 4, seed=3)
    ids = torch.tensor([3, 1])
    staged = K.gather_pages(pool, ids, torch.empty(2, *layout.page_shape, dtype=layout.dtype))
    for codec in ("none", *LOSSY):
        fused = K.gather_quantize(pool, ids, codec)
        assert torch.equal(fused.blocks, K.quantize_pages(staged, codec).blocks), codec
        a, b = torch.zeros_like(pool), torch.zeros_like(pool)
        K.dequantize_scatter(fused, ids, a)
        K.scatter_pages(K.dequantize_pages(fused, torch.empty_like(staged)), ids, b)
        assert torch.equal(a, b), codec


def test_format_checks() -> None:
    layout = PageLayout(num_layers=1, kv_heads=1, head_dim=32, page_size=48)
    with pytest.raises(UnknownName, match="known: fp8, int4, int8, none"):
        page_format("zstd", layout)
    with pytest.raises(BadRequest, match="page_size 48"):
        page_format("int8", layout)
    assert page_format("fp8", layout).page_nbytes > 0  # fp8 has no token groups
    with pytest.raises(BadRequest, match="head_dim 160"):
        page_format("int4", PageLayout(num_layers=1, kv_heads=1, head_dim=160, page_size=16))
    assert page_format("int4", PageLayout(1, 1, head_dim=40, page_size=16)).value_group == 40
    with pytest.raises(BadRequest, match="head_dim 33"):
        page_format("int4", PageLayout(num_layers=1, kv_heads=1, head_dim=33, page_size=16))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVR_KERNELS", backend)
    layout = PageLayout(num_layers=2, kv_heads=1, head_dim=32, page_size=4)
    pool = torch.randn(layout.pool_shape(3)).bfloat16()
    ids = torch.tensor([0, 2])
    q = K.gather_quantize(pool, ids, "int8")
    with pytest.raises(UnknownName, match="known"):
        K.gather_quantize(pool, ids, "int3")
    with pytest.raises(BadRequest, match="encoded pages are for"):
        K.dequantize_scatter(q, ids, pool.half())
    with pytest.raises(BadRequest, match=r"page_ids must be \[2\]"):
        K.dequantize_scatter(q, ids[:1], pool)
    with pytest.raises(BadRequest, match="hold 2 pages; 3 expected"):
        K.dequantize_pages(q, torch.empty(3, *layout.page_shape, dtype=torch.bfloat16))
    with pytest.raises(BadRequest, match="out holds codec 'int8'"):
        K.gather_quantize(pool, ids, "int4", out=q)
    with pytest.raises(BadRequest, match="span"):
        K.gather_quantize(pool, torch.tensor([3]), "fp8")


def test_launcher_asserts_name_the_problem() -> None:
    src = torch.randn(2, 1, 1, 4, 32)
    codes = torch.empty(2, 1, 1, 4, 32, dtype=torch.uint8)
    scale = torch.empty(2, 1, 1, 4)
    with pytest.raises(AssertionError, match=r"codes dtype torch\.uint8, expected torch\.int8"):
        quant._quantize(src, None, codes, scale, None, quant.INT8, 32, False)
    with pytest.raises(AssertionError, match="do not match"):
        quant._quantize(src, None, codes[..., :16], scale, None, quant.FP8, 32, False)
    with pytest.raises(AssertionError, match="need \\[2:\\] dense"):
        strided = torch.randn(2, 1, 1, 32, 4).transpose(3, 4)
        quant._quantize(strided, None, codes, scale, None, quant.FP8, 32, False)
