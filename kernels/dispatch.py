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
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from kvruntime.env import kernel_backend, triton_interpret
from kvruntime.errors import BadRequest, ConfigError
from kvruntime.kernels import reference
from kvruntime.kernels.layout import PageLayout
from kvruntime.kernels.quantized import (
    PageFormat,
    QuantizedPages,
    page_format,
    pages_layout,
    pool_layout,
)


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


# ---- rehydrate: encoded page blocks (pinned host or device) -> pool or per-layer caches -------


def token_view(kv: torch.Tensor, page_size: int) -> torch.Tensor:
    """Per-layer caches ``kv`` [L, 2, H, T, D] seen as a pool [L, 2, T // P, H, P, D] (a view):
    pool page j is tokens ``[j * P, (j + 1) * P)``, so ``rehydrate_pages`` can restore a
    prefix straight into the tensors attention reads. Raises BadRequest for a bad shape."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
        raise BadRequest(f"kv must be [L, 2, H, T, D]; got {getattr(kv, 'shape', kv)}")
    if page_size <= 0 or kv.stride(4) != 1 or kv.stride(3) != kv.shape[4]:
        raise BadRequest(
            f"page_size {page_size} > 0 and dense [T, D] needed; strides {kv.stride()}"
        )
    pages = kv.shape[3] // page_size
    return kv[:, :, :, : pages * page_size].unflatten(3, (pages, page_size)).transpose(2, 3)


@dataclass(frozen=True)
class Rehydrate:
    """A validated mapping between block rows ``slots`` and ``pool`` pages: ``run`` decodes the
    rows into the pages for a range of layers, so a caller can load layer by layer (each on its
    own stream and event) with one validation; ``store`` writes pages back (codec none). The
    caller keeps ``blocks`` rows unchanged (and, for ``store``, the slots distinct) until the
    launches finish."""

    blocks: torch.Tensor  # uint8 [S, page_nbytes]; pinned host or on the pool's device
    slots: torch.Tensor  # int64 [n] on the pool's device: block row of page j
    fmt: PageFormat
    pool: torch.Tensor  # [L, 2, N, H, P, D], [P, D] dense
    page_ids: torch.Tensor | None  # int64 [n] on the pool's device; None: page j
    backend: str

    @property
    def num_pages(self) -> int:
        return int(self.slots.shape[0])

    def run(self, layers: tuple[int, int] | None = None, tune: object = None) -> None:
        """Decode layers ``[lo, hi)`` (default all) of every page; changes only those pool
        slabs. Asynchronous on CUDA (the current stream). ``tune``: the Triton launch shape
        (``host_copy.Tune``; e.g. ``LOAD_BESIDE_COMPUTE`` leaves most SMs to compute)."""
        fn = _impl_of("rehydrate_pages", self.backend)
        fn(
            self.blocks,
            self.slots,
            self.fmt.codec,
            self.pool,
            self.page_ids,
            self._layers(layers),
            tune,
        )

    def store(self, layers: tuple[int, int] | None = None, tune: object = None) -> None:
        """The inverse, codec ``none`` only: pool pages -> their block rows (write-back),
        layers ``[lo, hi)``; changes only those bytes of those rows. Raises BadRequest for
        another codec (encode on the device first)."""
        if self.fmt.codec != "none":
            raise BadRequest(f"store writes raw pages; encode {self.fmt.codec!r} pages first")
        fn = _impl_of("offload_pages", self.backend)
        fn(self.pool, self.page_ids, self.blocks, self.slots, self._layers(layers), tune)

    def _layers(self, layers: tuple[int, int] | None) -> tuple[int, int]:
        lo, hi = layers if layers is not None else (0, self.fmt.layout.num_layers)
        if not 0 <= lo <= hi <= self.fmt.layout.num_layers:
            raise BadRequest(f"layers [{lo}, {hi}) outside [0, {self.fmt.layout.num_layers})")
        return lo, hi


def _impl_of(name: str, backend: str) -> Callable[..., Any]:
    module: ModuleType = reference
    if backend == "triton":
        from kvruntime.kernels import host_copy

        module = host_copy
    fn: Callable[..., Any] = getattr(module, name)
    return fn


def _index_tensor(
    t: torch.Tensor | None, what: str, n: int | None, limit: int, device: torch.device
) -> torch.Tensor | None:
    """``t`` as int64 [n] on ``device``, each value in [0, limit) (checked before moving)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise BadRequest(f"{what} must be an int64 [n] tensor, got {got}")
    if n is not None and t.shape[0] != n:
        raise BadRequest(f"{what} holds {t.shape[0]} ids; {n} expected")
    if t.numel():
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or hi >= limit:
            raise BadRequest(f"{what} span [{lo}, {hi}]; valid ids are [0, {limit})")
    return t.to(device, non_blocking=True)


def prepare_rehydrate(
    blocks: torch.Tensor,
    slots: torch.Tensor,
    codec: str,
    pool: torch.Tensor,
    page_ids: torch.Tensor | None = None,
) -> Rehydrate:
    """Validate a rehydrate of encoded blocks ``blocks[slots]`` (uint8 [S, page_nbytes] in
    ``codec``'s format) into pool pages ``page_ids`` (None: page j gets ``slots[j]``).

    ``pool`` is any [L, 2, N, H, P, D] tensor with dense [P, D] (the device pool, or
    ``token_view`` of per-layer caches). ``blocks`` live on the pool's device, or in pinned host
    memory for a CUDA pool (the kernel reads them over PCIe, no staging copy). ``slots`` and
    ``page_ids`` may live anywhere; ids are range-checked (one small sync when on CUDA).
    Raises UnknownName for an unknown codec and BadRequest for anything that does not fit."""
    if not isinstance(pool, torch.Tensor):
        raise BadRequest(f"pool must be a tensor, got {type(pool).__name__}")
    layout = pool_layout(pool)
    fmt = page_format(codec, layout)
    if pool.stride(5) != 1 or pool.stride(4) != pool.shape[5]:
        raise BadRequest(f"pool's [P, D] dims must be dense; strides {pool.stride()}")
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise BadRequest("blocks must be a uint8 [S, page_nbytes] tensor")
    if blocks.shape[1] != fmt.page_nbytes or blocks.stride(1) != 1 or blocks.stride(0) % 16:
        raise BadRequest(
            f"blocks {tuple(blocks.shape)} strides {blocks.stride()}: codec {codec!r} on"
            f" {layout.describe()} needs dense rows of {fmt.page_nbytes} bytes, row stride a"
            " multiple of 16"
        )
    host_pinned = pool.is_cuda and blocks.device.type == "cpu" and blocks.is_pinned()
    if blocks.device != pool.device and not host_pinned:
        raise BadRequest(
            f"blocks on {blocks.device}, pool on {pool.device}: host blocks must be pinned"
            " (HostTierConfig(pin_memory=True)) for a CUDA pool to read them"
        )
    slot_ids = _index_tensor(slots, "slots", None, blocks.shape[0], pool.device)
    assert slot_ids is not None
    n = slot_ids.shape[0]
    ids = _index_tensor(page_ids, "page_ids", n, pool.shape[2], pool.device)
    if ids is None and n > pool.shape[2]:
        raise BadRequest(f"{n} pages do not fit in a pool of {pool.shape[2]} pages")
    return Rehydrate(blocks, slot_ids, fmt, pool, ids, backend_for(pool))


def rehydrate_pages(
    blocks: torch.Tensor,
    slots: torch.Tensor,
    codec: str,
    pool: torch.Tensor,
    page_ids: torch.Tensor | None = None,
    layers: tuple[int, int] | None = None,
) -> None:
    """``prepare_rehydrate(...).run(layers)``: decode ``blocks[slots]`` into pool pages
    ``page_ids``, layers ``[lo, hi)`` (default all). Exact for ``none``; the codec's bound
    otherwise (same bytes as ``dequantize_scatter``). Changes only those pool slabs."""
    prepare_rehydrate(blocks, slots, codec, pool, page_ids).run(layers)
