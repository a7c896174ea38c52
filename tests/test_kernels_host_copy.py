"""Rehydrate (encoded host blocks at scattered slots -> pool or per-layer caches, fused decode):
Triton (interpreter) against the torch reference, byte for byte, and against the original
pages: exact for ``none``, within the codec's stated bound otherwise."""

from __future__ import annotations

import pytest
import torch

import kvruntime.kernels as K
from kvruntime.errors import BadRequest, UnknownName
from kvruntime.kernels import host_copy, reference
from kvruntime.kernels.host_copy import Tune
from kvruntime.kernels.layout import PageLayout
from kvruntime.store.codec import get_codec

CODECS = ["none", "fp8", "int8", "int4"]
# (L, H, P, D, host slots, pages moved, pool pages): odd heads, a page size that is no power
# of two (12: key groups of 12 rows) and one above 32 (64: two key groups per head)
SHAPES = [(2, 3, 16, 64, 9, 5, 7), (1, 2, 12, 64, 5, 3, 4), (2, 1, 64, 32, 4, 3, 5)]
_INT = {2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.element_size()])


def _case(
    shape: tuple[int, ...], dtype: torch.dtype, codec: str, seed: int
) -> tuple[PageLayout, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layout, pages [n, L, 2, H, P, D], host blocks [S, nbytes], slots [n], page ids [n])."""
    L, H, P, D, S, n, N = shape
    layout = PageLayout(num_layers=L, kv_heads=H, head_dim=D, page_size=P, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    pages = (torch.randn((n, *layout.page_shape), generator=g) * 3).to(dtype)
    pages[:, :, 0, :, :, 1] *= 40  # an outlier key channel, as real keys have
    blocks = torch.randint(0, 256, (S, get_codec(codec).page_nbytes(layout)), generator=g)
    blocks = blocks.to(torch.uint8)  # foreign rows hold garbage: only `slots` may be read
    slots = torch.randperm(S, generator=g)[:n]
    blocks[slots] = get_codec(codec).encode(pages)
    ids = torch.randperm(N, generator=g)[:n]
    return layout, pages, blocks, slots, ids


def _check_values(got: torch.Tensor, pages: torch.Tensor, codec: str, where: str) -> None:
    if codec == "none":
        assert torch.equal(_bits(got), _bits(pages)), where
        return
    err = (got.float() - pages.float()).abs()
    bound = get_codec(codec).error_bound(pages)
    assert bool((err <= bound).all()), f"{where}: worst err/bound {(err / bound).max():.3f}"


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rehydrate_into_pool_matches_reference(codec: str, shape: tuple[int, ...]) -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        layout, pages, blocks, slots, ids = _case(shape, dtype, codec, seed=SHAPES.index(shape))
        N = shape[6]
        where = f"{layout.describe()} codec={codec} n={len(slots)}"
        pool = torch.full(layout.pool_shape(N), float("nan"), dtype=dtype)
        expected = pool.clone()
        host_copy.rehydrate_pages(blocks, slots, codec, pool, ids)
        reference.rehydrate_pages(blocks, slots, codec, expected, ids)
        assert torch.equal(_bits(pool), _bits(expected)), where
        _check_values(pool.permute(2, 0, 1, 3, 4, 5)[ids], pages, codec, where)
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[ids] = False
        assert bool(pool[:, :, untouched].isnan().all()), f"{where}: other pages changed"


@pytest.mark.parametrize("codec", CODECS)
def test_layer_ranges_and_gpu_launch_shapes(codec: str) -> None:
    """Layer by layer, with tiles smaller than a slab and several units per program (the GPU
    launch shapes), into per-layer caches [L, 2, H, T, D] through ``token_view``."""
    shape = (3, 1, 64, 32, 5, 3, 3)
    layout, pages, blocks, slots, _ = _case(shape, torch.bfloat16, codec, seed=5)
    L, H, P, D, n = 3, 1, 64, 32, 3
    T = n * P + 7  # room past the restored pages stays untouched
    # 2 tiles per (page, layer); 2 programs of 4 units each, the last units empty
    for tune in (Tune(rows=32, warps=1, programs=2),):
        kv = torch.full((L, 2, H, T, D), float("nan"), dtype=torch.bfloat16)
        expected = kv.clone()
        view = K.token_view(kv, P)  # [L, 2, T // P, H, P, D]
        for layer in (2, 0, 1):  # any order: each launch touches its layer only
            host_copy.rehydrate_pages(blocks, slots, codec, view, None, (layer, layer + 1), tune)
            if layer == 2:
                assert bool(kv[:2].isnan().all()), f"layers 0-1 changed by layer 2's launch {tune}"
        reference.rehydrate_pages(blocks, slots, codec, K.token_view(expected, P))
        where = f"{layout.describe()} codec={codec} {tune}"
        assert torch.equal(_bits(kv), _bits(expected)), where
        got = kv[:, :, :, : n * P].unflatten(3, (n, P)).permute(3, 0, 1, 2, 4, 5)
        _check_values(got, pages, codec, where)
        assert bool(kv[:, :, :, n * P :].isnan().all()), f"{where}: rows past the pages changed"


@pytest.mark.parametrize("tune", [None, Tune(rows=32, warps=1, programs=3)], ids=str)
def test_store_is_the_inverse_for_raw_pages(tune: Tune | None) -> None:
    """Pool pages (or per-layer caches) -> block rows at scattered slots, codec none."""
    layout, pages, blocks, slots, ids = _case(SHAPES[2], torch.float16, "none", seed=6)
    N = SHAPES[2][6]
    pool = torch.randn(layout.pool_shape(N)).to(torch.float16)
    pool[:, :, ids] = pages.permute(1, 2, 0, 3, 4, 5)
    got, want = blocks.clone(), blocks.clone()
    host_copy.offload_pages(pool, ids, got, slots, (1, 2), tune)
    reference.offload_pages(pool, ids, want, slots, (1, 2))
    assert torch.equal(got, want), f"{tune}"
    assert torch.equal(got, blocks), "the rows already held these pages: nothing may change"
    got.zero_()
    want.zero_()
    host_copy.offload_pages(pool, ids, got, slots, None, tune)
    reference.offload_pages(pool, ids, want, slots)
    assert torch.equal(got, want) and torch.equal(got[slots], blocks[slots]), f"{tune}"
    others = torch.ones(got.shape[0], dtype=torch.bool)
    others[slots] = False
    assert not got[others].any()


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KVR_KERNELS", request.param)
    return str(request.param)


def test_public_api_both_backends(backend: str) -> None:
    layout, _, blocks, slots, ids = _case(SHAPES[0], torch.bfloat16, "int8", seed=3)
    pool = torch.zeros(layout.pool_shape(7), dtype=torch.bfloat16)
    job = K.prepare_rehydrate(blocks, slots, "int8", pool, ids)
    assert job.backend == backend and job.num_pages == len(slots)
    job.run((1, 2))
    assert not pool[0].any(), "layer 0 was not asked for"
    job.run((0, 1))
    want = torch.zeros_like(pool)
    reference.rehydrate_pages(blocks, slots, "int8", want, ids)
    assert torch.equal(_bits(pool), _bits(want)), backend
    pool[1] = 0
    K.rehydrate_pages(blocks, slots, "int8", pool, ids, (1, 2))
    assert torch.equal(_bits(pool), _bits(want)), backend


def test_bad_arguments_say_what_is_wrong() -> None:
    layout, _, blocks, slots, ids = _case(SHAPES[0], torch.bfloat16, "int4", seed=4)
    pool = torch.zeros(layout.pool_shape(7), dtype=torch.bfloat16)
    with pytest.raises(UnknownName, match="zstd"):
        K.prepare_rehydrate(blocks, slots, "zstd", pool, ids)
    with pytest.raises(BadRequest, match="rows of"):
        K.prepare_rehydrate(blocks, slots, "int8", pool, ids)  # int4 blocks, int8 asked
    with pytest.raises(BadRequest, match="uint8"):
        K.prepare_rehydrate(blocks.view(torch.int16), slots, "int4", pool, ids)
    with pytest.raises(BadRequest, match="slots span"):
        K.prepare_rehydrate(blocks, slots + 100, "int4", pool, ids)
    with pytest.raises(BadRequest, match="page_ids span"):
        K.prepare_rehydrate(blocks, slots, "int4", pool, ids + 7)
    with pytest.raises(BadRequest, match="holds 2 ids"):
        K.prepare_rehydrate(blocks, slots, "int4", pool, ids[:2])
    with pytest.raises(BadRequest, match="int64"):
        K.prepare_rehydrate(blocks, slots.int(), "int4", pool, ids)
    with pytest.raises(BadRequest, match="do not fit"):
        K.prepare_rehydrate(blocks, slots, "int4", pool[:, :, :2])
    with pytest.raises(BadRequest, match="dense"):
        K.prepare_rehydrate(blocks, slots, "int4", pool.transpose(4, 5), ids)
    with pytest.raises(BadRequest, match="outside"):
        K.prepare_rehydrate(blocks, slots, "int4", pool, ids).run((1, 3))
    with pytest.raises(BadRequest, match="encode"):
        K.prepare_rehydrate(blocks, slots, "int4", pool, ids).store()
    with pytest.raises(BadRequest, match=r"\[L, 2, H, T, D\]"):
        K.token_view(pool, 16)
