"""Paged gather/scatter: Triton (interpreter) and the torch reference, bit-exact, every dtype."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kvruntime.kernels as K
from kvruntime.errors import BadRequest, ConfigError
from kvruntime.kernels import paged_copy, reference
from kvruntime.kernels.layout import PageLayout

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (L, H, P, D, pool pages, gathered pages): small but varied for the interpreter
SHAPES = [(1, 1, 4, 32, 3, 1), (2, 3, 4, 64, 9, 5), (3, 1, 16, 32, 6, 6), (3, 3, 16, 64, 5, 2)]
_INT = {2: torch.int16, 4: torch.int32}


def _random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Any bit pattern of ``dtype``, NaN payloads and infinities included."""
    g = torch.Generator().manual_seed(seed)
    itype = _INT[dtype.itemsize]
    info = torch.iinfo(itype)
    return torch.randint(info.min, info.max, shape, dtype=itype, generator=g).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()])


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KVR_KERNELS", request.param)
    return str(request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_scatter_bit_exact(backend: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    L, H, P, D, N, n = shape
    layout = PageLayout(num_layers=L, kv_heads=H, head_dim=D, page_size=P, dtype=dtype)
    pool = _random_bits(layout.pool_shape(N), dtype, seed=N * 7 + n)
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(n))[:n]
    where = f"{layout.describe()} n={n} backend={backend}"
    assert K.backend_for(pool) == backend

    out = torch.empty((n, *layout.page_shape), dtype=dtype)
    assert K.gather_pages(pool, ids, out) is out
    expected = pool[:, :, ids].permute(2, 0, 1, 3, 4, 5)
    assert torch.equal(_bits(out), _bits(expected)), where

    target = _random_bits(layout.pool_shape(N), dtype, seed=99)
    before = target.clone()
    K.scatter_pages(out, ids, target)
    assert torch.equal(_bits(target[:, :, ids]), _bits(pool[:, :, ids])), where
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(_bits(target[:, :, untouched]), _bits(before[:, :, untouched])), where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference_on_strided_views(dtype: torch.dtype) -> None:
    """A pool that is a slice of a bigger tensor and a staging buffer that is a row slice."""
    big = torch.randn(3, 2, 12, 3, 4, 32).to(dtype)
    pool = big[:, :, 2:9]  # non-contiguous along N
    ids = torch.tensor([6, 0, 3, 3])
    staging = torch.zeros(7, 3, 2, 3, 4, 32, dtype=dtype)
    got, want = staging[1:5], staging.clone()[1:5]
    paged_copy.gather_pages(pool, ids, got)
    reference.gather_pages(pool, ids, want)
    assert torch.equal(got, want), f"L3-H3-D32-P4 n=4 {dtype}"
    assert not staging[0].any() and not staging[5:].any()

    target_t, target_r = torch.zeros_like(big), torch.zeros_like(big)
    paged_copy.scatter_pages(got[:3], ids[:3], target_t[:, :, 2:9])
    reference.scatter_pages(got[:3], ids[:3], target_r[:, :, 2:9])
    assert torch.equal(target_t, target_r)


def test_empty_batch_is_a_no_op(backend: str) -> None:
    pool = torch.randn(2, 2, 4, 1, 4, 32)
    out = torch.empty(0, 2, 2, 1, 4, 32)
    K.gather_pages(pool, torch.empty(0, dtype=torch.int64), out)
    before = pool.clone()
    K.scatter_pages(out, torch.empty(0, dtype=torch.int64), pool)
    assert torch.equal(pool, before)


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.setenv("KVR_KERNELS", "auto")
    assert K.backend_for(cpu) == "torch"
    monkeypatch.setenv("KVR_KERNELS", "triton")
    assert K.backend_for(cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        K.backend_for(cpu)
    monkeypatch.setenv("KVR_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="auto, torch, triton"):
        K.backend_for(cpu)


def test_bad_arguments_raise_bad_request(backend: str) -> None:
    pool = torch.randn(2, 2, 5, 3, 4, 32)
    out = torch.empty(2, 2, 2, 3, 4, 32)
    ids = torch.tensor([1, 4])
    with pytest.raises(BadRequest, match="int64"):
        K.gather_pages(pool, ids.int(), out)
    with pytest.raises(BadRequest, match=r"span \[1, 5\]; the pool has 5 pages"):
        K.gather_pages(pool, torch.tensor([1, 5]), out)
    with pytest.raises(BadRequest, match="span"):
        K.scatter_pages(out, torch.tensor([-1, 0]), pool)
    with pytest.raises(BadRequest, match=r"page_ids must be \[2\]"):
        K.gather_pages(pool, torch.tensor([1, 2, 3]), out)
    with pytest.raises(BadRequest, match="do not match layout"):
        K.gather_pages(pool, ids, out.half())
    with pytest.raises(BadRequest, match="do not match layout"):
        K.scatter_pages(torch.empty(2, 2, 2, 3, 4, 64), ids, pool)
    with pytest.raises(BadRequest, match=r"pool must be \[L, 2, N, H, P, D\]"):
        K.gather_pages(pool[0], ids, out)
    with pytest.raises(BadRequest, match="contiguous"):
        K.gather_pages(pool.transpose(4, 5).contiguous().transpose(4, 5), ids, out)
    with pytest.raises(BadRequest, match="page_ids on meta"):
        K.gather_pages(pool, ids.to("meta"), out)
    with pytest.raises(BadRequest, match="different devices"):
        K.gather_pages(pool, ids, out.to("meta"))
    with pytest.raises(ConfigError, match="unsupported KV dtype"):
        K.gather_pages(pool.double(), ids, out.double())


def test_launcher_asserts_name_the_problem() -> None:
    pool = torch.randn(2, 2, 5, 3, 4, 32)
    out = torch.empty(2, 2, 2, 3, 4, 32)
    with pytest.raises(AssertionError, match="int64"):
        paged_copy.gather_pages(pool, torch.tensor([0, 1], dtype=torch.int32), out)
    with pytest.raises(AssertionError, match="differ in"):
        paged_copy.gather_pages(pool, torch.tensor([0, 1]), torch.empty(2, 2, 2, 3, 4, 64))
    with pytest.raises(AssertionError, match="must be contiguous"):
        paged_copy.scatter_pages(out.transpose(4, 5), torch.tensor([0, 1]), pool.transpose(4, 5))


def test_import_needs_no_triton() -> None:
    code = (
        "import sys, kvruntime.kernels, kvruntime.store.codec; "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
