"""The public kernel entry points: validate arguments, then run Triton or the torch reference.

``KVR_KERNELS`` (read through ``kvruntime.env.kernel_backend()`` at every call) picks the
backend: ``torch`` forces the reference, ``triton`` forces Triton (CPU tensors then need
``TRITON_INTERPRET=1``), ``auto`` runs Triton on CUDA tensors and the reference on CPU tensors.
Both backends write the same bytes. Bad arguments raise ``BadRequest`` naming what is wrong,
whatever the backend. Triton is imported only when a Triton backend is chosen.

Page ids are checked against the pool size (one small device sync on CUDA), because an
out-of-range id would otherwise read or write foreign memory. Scattering the same page id
twice in one call leaves either page's contents there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from kvruntime.env import kernel_backend, triton_interpret
from kvruntime.errors import BadRequest, ConfigError
from kvruntime.kernels import reference
from kvruntime.kernels.layout import PageLayout
from kvruntime.kernels.quantized import QuantizedPages, page_format, pages_layout, pool_layout


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the backend a call on tensors living where ``t`` lives uses."""
    choice = kernel_backend()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not _triton_available():
            raise ConfigError("KVR_KERNELS=triton but triton is not installed")
        if not t.is_cuda and not triton_interpret():
            raise ConfigError("KVR_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    return "triton" if t.is_cuda and _triton_available() else "torch"


def _impl(name: str, t: torch.Tensor) -> Callable[..., Any]:
    module: ModuleType = reference
    if backend_for(t) == "triton":
        from kvruntime.kernels import paged_copy, quant

        module = paged_copy if name in ("gather_pages", "scatter_pages") else quant
    fn: Callable[..., Any] = getattr(module, name)
    return fn


# ---- argument checks -------------------------------------------------------------------------


def _dense_tail(t: torch.Tensor, what: str) -> None:
    h, p, d = t.shape[-3:]
    if t.stride()[-3:] != (p * d, d, 1) and h * p * d > 1:
        raise BadRequest(f"{what}'s [H, P, D] dims must be contiguous; strides {t.stride()}")


def _check_pool(pool: torch.Tensor) -> PageLayout:
    if not isinstance(pool, torch.Tensor):
        raise BadRequest(f"pool must be a tensor, got {type(pool).__name__}")
    layout = pool_layout(pool)
    _dense_tail(pool, "pool")
    return layout


def _check_pages(pages: torch.Tensor, what: str, layout: PageLayout | None = None) -> PageLayout:
    if not isinstance(pages, torch.Tensor):
        raise BadRequest(f"{what} must be a tensor, got {type(pages).__name__}")
    got = pages_layout(pages)
    if layout is not None and got != layout:
        raise BadRequest(
            f"{what} {tuple(pages.shape)} {pages.dtype} do not match layout {layout.describe()}"
            f" (pages [n, {', '.join(map(str, layout.page_shape))}] {layout.dtype})"
        )
    _dense_tail(pages, what)
    return got


def _check_ids(page_ids: torch.Tensor, n: int | None, pool: torch.Tensor) -> None:
    if not isinstance(page_ids, torch.Tensor) or page_ids.dtype != torch.int64:
        got = page_ids.dtype if isinstance(page_ids, torch.Tensor) else type(page_ids).__name__
        raise BadRequest(f"page_ids must be an int64 tensor, got {got}")
    if page_ids.dim() != 1 or (n is not None and page_ids.shape[0] != n):
        raise BadRequest(f"page_ids must be [{n if n is not None else 'n'}]; got {page_ids.shape}")
    if page_ids.device != pool.device:
        raise BadRequest(f"page_ids on {page_ids.device}, pool on {pool.device}")
    if page_ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(page_ids))
        if lo < 0 or hi >= pool.shape[2]:
            raise BadRequest(f"page ids span [{lo}, {hi}]; the pool has {pool.shape[2]} pages")


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise BadRequest(f"tensors on different devices: {sorted(map(str, devices))}")


def _check_quantized(q: QuantizedPages, layout: PageLayout, n: int | None = None) -> None:
    if not isinstance(q, QuantizedPages):
        raise BadRequest(f"expected QuantizedPages, got {type(q).__name__}")
    if q.layout != layout:
        raise BadRequest(
            f"encoded pages are for {q.layout.describe()}, the target is {layout.describe()}"
        )
    if n is not None and q.num_pages != n:
        raise BadRequest(f"encoded pages hold {q.num_pages} pages; {n} expected")


# ---- public kernels --------------------------------------------------------------------------


def gather_pages(pool: torch.Tensor, page_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Copy pool [L, 2, N, H, P, D] pages ``page_ids`` [n] into ``out`` [n, L, 2, H, P, D].

    Exact copy; changes only ``out``. Returns ``out``."""
    layout = _check_pool(pool)
    _check_pages(out, "out", layout)
    _check_ids(page_ids, out.shape[0], pool)
    _same_device(pool, out)
    return _impl("gather_pages", pool)(pool, page_ids, out)


def scatter_pages(pages: torch.Tensor, page_ids: torch.Tensor, pool: torch.Tensor) -> None:
    """Copy ``pages`` [n, L, 2, H, P, D] into pool pages ``page_ids``: the inverse of gather.

    Changes only those pool pages; safe while other pages are read."""
    layout = _check_pool(pool)
    _check_pages(pages, "pages", layout)
    _check_ids(page_ids, pages.shape[0], pool)
    _same_device(pool, pages)
    _impl("scatter_pages", pool)(pages, page_ids, pool)


def _check_out(out: QuantizedPages | None, codec: str, layout: PageLayout, n: int) -> None:
    page_format(codec, layout)  # UnknownName / BadRequest first
    if out is not None:
        _check_quantized(out, layout, n)
        if out.codec != codec:
            raise BadRequest(f"out holds codec {out.codec!r}, asked for {codec!r}")


def quantize_pages(
    pages: torch.Tensor, codec: str, out: QuantizedPages | None = None
) -> QuantizedPages:
    """Encode ``pages`` [n, L, 2, H, P, D] with ``codec`` into fresh blocks (or ``out``'s).

    Raises UnknownName for an unknown codec, BadRequest for bad shapes."""
    layout = _check_pages(pages, "pages")
    _check_out(out, codec, layout, pages.shape[0])
    if out is not None:
        _same_device(pages, out.blocks)
    return _impl("quantize_pages", pages)(pages, codec, out)


def dequantize_pages(q: QuantizedPages, out: torch.Tensor) -> torch.Tensor:
    """Decode ``q`` into ``out`` [n, L, 2, H, P, D] (the layout's dtype). Returns ``out``."""
    layout = _check_pages(out, "out")
    _check_quantized(q, layout, out.shape[0])
    _same_device(q.blocks, out)
    return _impl("dequantize_pages", out)(q, out)


def gather_quantize(
    pool: torch.Tensor, page_ids: torch.Tensor, codec: str, out: QuantizedPages | None = None
) -> QuantizedPages:
    """Encode pool pages ``page_ids`` with ``codec`` in one pass (no page-first staging copy).

    Reads the pool only. Returns blocks on the pool's device."""
    layout = _check_pool(pool)
    _check_ids(page_ids, None, pool)
    _check_out(out, codec, layout, page_ids.shape[0])
    if out is not None:
        _same_device(pool, out.blocks)
    return _impl("gather_quantize", pool)(pool, page_ids, codec, out)


def dequantize_scatter(q: QuantizedPages, page_ids: torch.Tensor, pool: torch.Tensor) -> None:
    """Decode ``q`` straight into pool pages ``page_ids``; changes only those pages."""
    layout = _check_pool(pool)
    _check_quantized(q, layout)
    _check_ids(page_ids, q.num_pages, pool)
    _same_device(pool, q.blocks)
    _impl("dequantize_scatter", pool)(q, page_ids, pool)
