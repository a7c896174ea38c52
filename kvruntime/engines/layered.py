"""Resumed turns straight from the host tier, layer by layer, and write-back during decode.

A ``HostKVPrefix`` names a cached prefix by where its encoded pages sit in host memory (the
host tier's pinned page-first slots). ``restore_layered`` builds the engine's per-layer caches
from it without a staging copy: one ``[L, 2, H, T, D]`` buffer (room for the prompt and some
decoding) whose first tokens the rehydrate kernel fills, decoding the codec on the way, straight
from pinned memory over PCIe. On CUDA each layer is one launch on a high-priority side stream
followed by an event; a layer's cache waits for its event at its first ``update`` — inside the
attention of that layer — so layer i+1 loads while layer i computes and the compute stream never
waits for more than the layer it needs. On the CPU the same code runs synchronously.

``write_pages_async`` is the other direction: full pages of a live cache go to host blocks on a
side stream (device gather + codec, then D2H copies of runs of consecutive slots on the copy
engine), so storing a finished turn does not stall the decode that follows it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from kvruntime.engines.models import KVShape
from kvruntime.errors import BadRequest
from kvruntime.kernels import page_format, prepare_rehydrate, token_view
from kvruntime.store.codec import get_codec
from kvruntime.store.host import runs_of

DECODE_HEADROOM = 256  # tokens of decoding the restored caches take before their first regrowth


class HostKVPrefix(NamedTuple):
    """KV of the first ``num_tokens`` tokens of a prompt as encoded page blocks in host memory.

    ``blocks``: uint8 ``[S, page_nbytes]``, one page of ``codec`` per row (e.g.
    ``HostTier.blocks``); pinned for a CUDA engine. ``slots``: block row of page j (token t in
    page ``t // page_size``), as int64 [n] or a list; -1 marks a page already decoded in
    ``resident`` (``[m, L, 2, H, P, D]`` in the engine's dtype, the -1 pages in order: pages a
    runtime found on the device or fetched from Redis), which is copied in before the loads
    start. The caller keeps the rows unchanged (pinned in the tier) until ``prefill`` returns;
    the engine only reads them.
    """

    blocks: torch.Tensor
    slots: torch.Tensor | Sequence[int]
    codec: str
    page_size: int
    num_tokens: int
    resident: torch.Tensor | None = None


def check_host_prefix(past: HostKVPrefix, layout: KVShape, dtype: torch.dtype) -> torch.Tensor:
    """Validate ``past`` for a model of ``layout``/``dtype``; returns slots as int64 [n].
    Raises BadRequest (UnknownName for an unknown codec) naming what does not fit."""
    if not isinstance(past.page_size, int) or past.page_size <= 0:
        raise BadRequest(f"page_size must be a positive int, got {past.page_size!r}")
    fmt = page_format(past.codec, layout.page_layout(past.page_size, dtype))
    blocks = past.blocks
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise BadRequest("HostKVPrefix.blocks must be a uint8 [S, page_nbytes] tensor")
    if blocks.shape[1] != fmt.page_nbytes:
        raise BadRequest(
            f"blocks rows of {blocks.shape[1]} bytes; codec {past.codec!r} on"
            f" {fmt.layout.describe()} stores {fmt.page_nbytes} bytes per page"
        )
    slots = torch.as_tensor(past.slots, dtype=torch.int64)
    if slots.dim() != 1:
        raise BadRequest(f"slots must be one-dimensional, got shape {tuple(slots.shape)}")
    if not 0 <= past.num_tokens <= slots.shape[0] * past.page_size:
        raise BadRequest(
            f"{past.num_tokens} past tokens do not fit in {slots.shape[0]} pages of"
            f" {past.page_size}"
        )
    marked = int((slots < 0).sum())
    held = 0 if past.resident is None else past.resident.shape[0]
    if marked and held < marked:
        raise BadRequest(f"{marked} pages marked resident (slot -1), {held} resident pages")
    if past.resident is not None:
        page = (held, *fmt.layout.page_shape)
        if tuple(past.resident.shape) != page or past.resident.dtype != dtype:
            raise BadRequest(
                f"resident pages {tuple(past.resident.shape)} {past.resident.dtype}; expected"
                f" {page} {dtype}"
            )
    return slots


class LayerLoader:
    """Runs a rehydrate one layer at a time on its own stream; ``wait(i)`` makes the current
    stream wait for layer i only. Synchronous (and ``wait`` a no-op) off CUDA."""

    def __init__(self, run: Callable[[int], None], num_layers: int, device: torch.device) -> None:
        self._run = run
        self._num_layers = num_layers
        self._device = device
        self._events: list[torch.cuda.Event] = []
        self.stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            # High priority: the block scheduler places the loads ahead of compute waiting on them.
            self.stream = torch.cuda.Stream(device=device, priority=-1)

    def start(self, keep_alive: Sequence[torch.Tensor] = ()) -> None:
        """Launch every layer's load. ``keep_alive``: tensors the loads touch that the current
        stream allocated; they are not reused until the loads finish."""
        if self.stream is None:
            for layer in range(self._num_layers):
                self._run(layer)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self._device))  # ids uploads, buffer
        with torch.cuda.stream(self.stream):
            for layer in range(self._num_layers):
                self._run(layer)
                event = torch.cuda.Event()
                event.record(self.stream)
                self._events.append(event)
        for t in keep_alive:
            t.record_stream(self.stream)

    def wait(self, layer: int) -> None:
        if self._events:
            torch.cuda.current_stream(self._device).wait_event(self._events[layer])


def beside_compute(device: torch.device, store: bool = False, codec: str = "none") -> object:
    """The launch shape for loads of ``codec`` blocks (``store``: write-backs) that run beside
    compute on ``device``: a few programs on CUDA (``host_copy.LOAD_BESIDE_COMPUTE``, more for
    a lossy decode: ``LOAD_LOSSY_BESIDE_COMPUTE``; ``STORE_BESIDE_COMPUTE``), the default
    elsewhere (None)."""
    if device.type != "cuda":
        return None
    from kvruntime.kernels import host_copy

    if store:
        return host_copy.STORE_BESIDE_COMPUTE
    if get_codec(codec).lossless:
        return host_copy.LOAD_BESIDE_COMPUTE
    return host_copy.LOAD_LOSSY_BESIDE_COMPUTE


def restore_layered(
    past: HostKVPrefix,
    num_tokens: int,
    config: Any,
    layout: KVShape,
    dtype: torch.dtype,
    device: torch.device,
    capacity: int,
    tune: object = None,
) -> Any:
    """A ``DynamicCache`` holding the first ``num_tokens`` tokens of ``past`` (at most its own),
    loading asynchronously on CUDA, over a ``buffered_cache`` of ``capacity`` tokens. Validates
    ``past``.
    ``tune``: the loads' launch shape (None: ``beside_compute(device, codec=past.codec)``)."""
    slots = check_host_prefix(past, layout, dtype)
    num_tokens = min(num_tokens, past.num_tokens)
    P = past.page_size
    pages = -(-num_tokens // P)
    L, H, D = layout
    # [L, 2, H, T, D]: every layer's keys and values, room for whole pages and the suffix
    kv = torch.empty((L, 2, H, max(capacity, pages * P), D), dtype=dtype, device=device)
    loader: LayerLoader | None = None
    used = slots[:pages]
    view = token_view(kv, P)[:, :, :pages]  # [L, 2, pages, H, P, D] view of kv
    resident = (used < 0).nonzero().flatten()
    if resident.numel():  # decoded already: one device copy before the loads
        assert past.resident is not None  # check_host_prefix
        src = past.resident[: resident.numel()].to(device).permute(1, 2, 0, 3, 4, 5)
        view[:, :, resident.to(device)] = src
    loaded = (used >= 0).nonzero().flatten()
    if loaded.numel():
        whole = loaded.numel() == pages
        job = prepare_rehydrate(
            past.blocks, used[loaded], past.codec, view, None if whole else loaded
        )
        shape = tune if tune is not None else beside_compute(device, codec=past.codec)
        loader = LayerLoader(lambda layer: job.run((layer, layer + 1), shape), L, device)
        loader.start(keep_alive=[t for t in (kv, job.slots, job.page_ids) if t is not None])
    return buffered_cache(kv, num_tokens, config, loader.wait if loader is not None else None)


def buffered_cache(
    kv: torch.Tensor, num_tokens: int, config: Any, wait: Callable[[int], None] | None = None
) -> Any:
    """A ``DynamicCache`` whose layer i holds the first ``num_tokens`` tokens of ``kv[i]``
    (``[L, 2, H, T, D]``) and writes new tokens into the rows after them (regrowing only past
    ``T``) instead of concatenating a new tensor at every forward. ``wait(i)``: called before
    layer i is first read or written (its rows may still be loading)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.kvr_buffer = kv  # type: ignore[attr-defined]  # write_pages_async copies out of it
    layer_cls = prefetched_layer_class()
    cache.layers[:] = [
        layer_cls(
            kv[i, 0].unsqueeze(0),
            kv[i, 1].unsqueeze(0),
            num_tokens,
            functools.partial(wait, i) if wait is not None else None,
        )
        for i in range(kv.shape[0])
    ]
    return cache


@functools.cache
def prefetched_layer_class() -> type:
    """``PrefetchedLayer``: built on first use so importing this module needs no transformers."""
    from transformers.cache_utils import DynamicLayer

    class PrefetchedLayer(DynamicLayer):
        """A ``DynamicLayer`` over buffers ``[B, H, capacity, D]`` whose first ``length``
        tokens may still be loading: ``ready()`` (once, before the first write or reset) makes
        the current stream wait for them. ``keys``/``values`` are views of the used rows."""

        def __init__(
            self,
            keys: torch.Tensor,
            values: torch.Tensor,
            length: int,
            ready: Callable[[], None] | None,
        ) -> None:
            super().__init__()
            self._buffers = (keys, values)
            self._ready = ready
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]
            self.is_initialized = True

        def _sync(self) -> None:
            if self._ready is not None:
                ready, self._ready = self._ready, None
                ready()

        def _room(self, need: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Buffers holding ``self.keys``/``values`` as their first rows, >= ``need`` rows."""
            kb, vb = self._buffers
            k = self.keys
            own = (
                k is not None
                and k.data_ptr() == kb.data_ptr()
                and k.shape[:2] == kb.shape[:2]
                and k.stride() == kb.stride()
            )
            if own and need <= kb.shape[2]:
                return kb, vb
            size = max(need, kb.shape[2] + kb.shape[2] // 2 + DECODE_HEADROOM)
            ref = k if k is not None else kb
            # [B, H, size, D] each; the used rows move over once
            new_k = ref.new_empty((ref.shape[0], ref.shape[1], size, ref.shape[3]))
            new_v = torch.empty_like(new_k)
            if k is not None and self.values is not None and k.shape[2]:
                new_k[:, :, : k.shape[2]].copy_(k)
                new_v[:, :, : k.shape[2]].copy_(self.values)
            self._buffers = (new_k, new_v)
            return new_k, new_v

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            self._sync()
            n = self.keys.shape[2] if self.keys is not None else 0
            end = n + key_states.shape[2]
            kb, vb = self._room(end)
            kb[:, :, n:end].copy_(key_states)
            vb[:, :, n:end].copy_(value_states)
            self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
            self.is_initialized = True
            return self.keys, self.values

        def reset(self) -> None:
            self._sync()
            kb, vb = self._buffers
            self.keys, self.values = kb[:, :, :0], vb[:, :, :0]

    return PrefetchedLayer


# ---- write-back ------------------------------------------------------------------------------


class PendingWrite:
    """Write-back in flight: ``done()`` polls, ``wait()`` blocks until the host rows hold it."""

    def __init__(self, event: torch.cuda.Event | None) -> None:
        self._event = event

    def done(self) -> bool:
        return self._event is None or bool(self._event.query())

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


def shared_buffer(cache: Any) -> torch.Tensor | None:
    """The ``[L, 2, H, T, D]`` buffer of a cache made by ``restore_layered`` while every layer
    still lives in it (no regrowth), else None."""
    kv = getattr(cache, "kvr_buffer", None)
    if not isinstance(kv, torch.Tensor):
        return None
    for i, layer in enumerate(cache.layers):
        for j, t in enumerate((layer.keys, layer.values)):
            home = kv[i, j].unsqueeze(0)  # [1, H, T, D]
            if t is None or t.data_ptr() != home.data_ptr() or t.stride() != home.stride():
                return None
    return kv


def write_pages_async(
    cache: Any,
    blocks: torch.Tensor,
    slots: Sequence[int],
    codec: str,
    page_size: int,
    start_token: int = 0,
    chunk_pages: int = 128,
    tune: object = None,
) -> PendingWrite:
    """Encode full pages ``start_token // P + j`` of a live ``cache`` (``DynamicCache``, layer
    i keys/values ``[1, H, T, D]``) into host ``blocks`` rows ``slots[j]`` (distinct),
    asynchronously on CUDA (a side stream after the work queued so far; ``blocks`` must be
    pinned), at once elsewhere. Decoding may go on meanwhile: it appends rows past these pages.
    Nothing else may change these rows of ``blocks`` before ``wait()``.

    Codec ``none`` from a ``restore_layered`` cache is one kernel writing the host rows over
    PCIe from a few programs (the decode keeps the other SMs and the copy engines); otherwise
    ``chunk_pages`` pages at a time are gathered on the device, encoded and copied to the host
    rows by the copy engine. ``tune``: the kernel's launch shape (None: ``beside_compute``).
    Raises BadRequest for partial pages, a misaligned start or rows
    that do not fit the codec."""
    layers = cache.layers
    first = layers[0].keys
    L, (_, H, T, D) = len(layers), tuple(first.shape)
    fmt = get_codec(codec).format(KVShape(L, H, D).page_layout(page_size, first.dtype))
    n = len(slots)
    if start_token % page_size or start_token + n * page_size > T:
        raise BadRequest(
            f"{n} full pages of {page_size} from token {start_token} need a cache of"
            f" {start_token + n * page_size} tokens aligned to pages; it holds {T}"
        )
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != fmt.page_nbytes:
        raise BadRequest(f"blocks must be uint8 [S, {fmt.page_nbytes}] for {codec!r}")
    device = first.device
    kv = shared_buffer(cache) if codec == "none" else None
    job = None
    if kv is not None:
        p0 = start_token // page_size
        ids = torch.as_tensor([int(s) for s in slots], dtype=torch.int64)
        job = prepare_rehydrate(blocks, ids, codec, token_view(kv, page_size)[:, :, p0 : p0 + n])
    stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
        for layer in layers:  # decode may regrow these buffers; keep them until the copies ran
            layer.keys.record_stream(stream)
            layer.values.record_stream(stream)
        if job is not None:
            job.slots.record_stream(stream)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if job is not None:
            job.store(tune=tune if tune is not None else beside_compute(device, store=True))
        else:
            _staged_copy(
                layers,
                blocks,
                slots,
                codec,
                fmt.page_nbytes,
                start_token,
                page_size,
                chunk_pages,
                stream is not None,
            )
    if stream is None:
        return PendingWrite(None)
    event = torch.cuda.Event()
    event.record(stream)
    return PendingWrite(event)


def _staged_copy(
    layers: Sequence[Any],
    blocks: torch.Tensor,
    slots: Sequence[int],
    codec: str,
    page_nbytes: int,
    start_token: int,
    page_size: int,
    chunk_pages: int,
    non_blocking: bool,
) -> None:
    """Gather ``chunk_pages`` pages at a time into page-first staging, encode, copy each run of
    consecutive slots to the host rows with one copy."""
    first = layers[0].keys
    _, H, _, D = first.shape
    n = len(slots)
    for a in range(0, n, chunk_pages):
        m = min(chunk_pages, n - a)
        t0 = start_token + a * page_size
        # [m, L, 2, H, P, D] page-first staging on the cache's device
        staging = first.new_empty((m, len(layers), 2, H, page_size, D))
        for i, layer in enumerate(layers):
            for kv, src in enumerate((layer.keys, layer.values)):
                rows = src[0, :, t0 : t0 + m * page_size]  # [H, m*P, D]
                staging[:, i, kv].copy_(rows.unflatten(1, (m, page_size)).transpose(0, 1))
        if codec == "none" and staging[0].nbytes == page_nbytes:
            encoded = staging.view(torch.uint8).view(m, -1)  # the raw bytes are the block
        else:
            encoded = get_codec(codec).encode(staging)  # [m, page_nbytes] uint8
        for slot, index, count in runs_of([int(s) for s in slots[a : a + m]]):
            blocks[slot : slot + count].copy_(
                encoded[index : index + count], non_blocking=non_blocking
            )
