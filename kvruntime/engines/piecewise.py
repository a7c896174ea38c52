"""A decoder forward split at attention, replayed from CUDA graphs between the splits.

Why: transformers runs a forward as ~1,000 small kernels launched one by one from Python. On
the H200 (Llama-8B shape, 12K cached) a decode step took 33-39 ms and a suffix of 16-256 tokens
25-47 ms, where reading the weights once takes 3.7 ms (``benchmarks/bench_forward_overhead.py``):
an agent turn (a short new suffix, a few tokens out) was bound by launching kernels, in every
configuration alike. Piecewise: 8.4 ms and 10-17 ms, the same logits.

How: for Llama-shaped decoders (``SUPPORTED``: pre-norm layers of q/k/v/o projections and an
MLP, full attention, rotary positions) a forward of ``n`` tokens is cut into ``L + 1`` pieces
at the attention of each layer:

- piece 0: embedding, rotary tables, layer 0 up to its rotated q/k/v;
- piece i: the rest of layer i-1 (output projection, residual, MLP), then layer i up to q/k/v;
- piece L: the rest of the last layer.

Every piece works on each token row alone, so a piece captured for ``B >= n`` rows computes
the ``n`` real rows exactly and padding rows that nothing reads. What depends on the cache
runs eagerly between the pieces: the cache update and attention over the ``n`` real rows
(new tokens after cached ones through the flash kernel directly on CUDA, else
``attention.causal_attention_forward``). On CUDA the pieces of each row bucket (``BUCKETS``,
up to ``graph_tokens``) are captured once, on first use, as CUDA graphs over static buffers
shared by all buckets; a forward then launches ``L + 1`` graphs and a few kernels per layer.
Longer forwards, and every forward on the CPU, run the same pieces eagerly on exactly ``n``
rows. The final norm and vocabulary projection run on the last real row only.

Not thread-safe across forwards by design of the static buffers: one lock serialises them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvruntime.engines.attention import ATTENTION, causal_attention_forward, without_cudnn
from kvruntime.errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2")  # config.model_type values with this layer shape
BUCKETS = (1, 16, 64, 128, 256, 512, 768, 1024, 1536, 2048)  # rows of the captured pieces
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def unsupported(model: Any) -> str | None:
    """Why ``model`` cannot run piecewise, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return f"model type {config.model_type!r} is not one of {SUPPORTED}"
    if config._attn_implementation != ATTENTION:
        return f"attention is {config._attn_implementation!r}, not {ATTENTION!r}"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "some layers use sliding-window attention"
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return "mistral with a sliding window"
    inner = getattr(model, "model", None)
    if inner is None or not all(
        hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm")
    ):
        return "no embed_tokens/rotary_emb/layers/norm under model.model"
    for layer in inner.layers:
        if not all(hasattr(layer, a) for a in _LAYER_PARTS) or not all(
            hasattr(layer.self_attn, a) for a in _ATTN_PARTS
        ):
            return f"decoder layer {type(layer).__name__} is not of the Llama shape"
    return None


@dataclass(eq=False)
class _Rows:
    """The tensors one forward of ``B`` token rows passes between its pieces (static for a
    captured bucket). ``graphs``: the captured pieces, empty when they run eagerly."""

    ids: torch.Tensor  # [1, B] int64
    positions: torch.Tensor  # [1, B] int64
    hidden: torch.Tensor  # [1, B, d] the residual stream
    cos: torch.Tensor  # [1, B, D]
    sin: torch.Tensor  # [1, B, D]
    q: torch.Tensor  # [1, Hq, B, D] rotated
    k: torch.Tensor  # [1, Hkv, B, D] rotated
    v: torch.Tensor  # [1, Hkv, B, D]
    attn: torch.Tensor  # [1, B, Hq * D] attention output, before the output projection
    graphs: list[torch.cuda.CUDAGraph]

    @property
    def size(self) -> int:
        return int(self.ids.shape[1])


class PiecewiseForward:
    """``forward(cache, tokens, offset)`` of ``model`` (see the module docstring): the logits
    of the last token, like the model with ``logits_to_keep=1``. Check ``unsupported(model)``
    first. ``graph_tokens``: the largest forward replayed from CUDA graphs (0: none)."""

    def __init__(self, model: Any, device: torch.device, graph_tokens: int = 2048) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ConfigError(f"cannot run piecewise: {reason}")
        self.model = model
        self.device = device
        inner = model.model
        self._embed, self._rotary, self._norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self._layers = list(inner.layers)
        attn = self._layers[0].self_attn
        self._head_dim = int(attn.head_dim)
        self._heads = attn.q_proj.out_features // self._head_dim
        self._kv_heads = attn.k_proj.out_features // self._head_dim
        self._hidden = int(model.config.hidden_size)
        self._dtype = self._embed.weight.dtype
        # The flash op of PyTorch's CUDA build takes fewer K/V heads than query heads (GQA)
        # and aligns its causal mask to the bottom right (as FlashAttention 2 does).
        self._flash_gqa = device.type == "cuda" and self._head_dim <= 256
        self._buckets = tuple(b for b in BUCKETS if b <= graph_tokens)
        if device.type != "cuda":
            self._buckets = ()
        self._captured: dict[int, _Rows] = {}
        self._storage: dict[str, torch.Tensor] = {}
        self._pool: Any = None
        self._lock = threading.Lock()

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self._captured))

    def capture_all(self) -> tuple[int, ...]:
        """Capture every bucket now rather than at its first forward (a benchmark's warm-up,
        a server's start); returns the captured buckets (none off CUDA)."""
        with self._lock, torch.inference_mode():
            for size in self._buckets:
                self._bucket(size)
        return self.captured_buckets

    def forward(self, cache: Any, tokens: list[int], offset: int) -> torch.Tensor:
        """Run ``tokens`` at positions ``offset..`` against ``cache`` (updated in place, like
        the model's forward); returns the last token's logits, [vocab] float32."""
        n = len(tokens)
        with self._lock, without_cudnn(self._embed.weight):
            bucket = next((b for b in self._buckets if b >= n), None)
            rows = self._bucket(bucket) if bucket is not None else self._fresh(n)
            rows.ids[0, :n].copy_(torch.tensor(tokens, dtype=torch.int64), non_blocking=True)
            torch.arange(offset, offset + rows.size, out=rows.positions[0])
            for i in range(len(self._layers) + 1):
                if rows.graphs:
                    rows.graphs[i].replay()
                else:
                    self._piece(rows, i)
                if i < len(self._layers):
                    self._attend(rows, i, n, cache)
            last = self._norm(rows.hidden[:, n - 1 : n])  # [1, 1, d]
            return self.model.lm_head(last)[0, -1].float()  # [vocab] float32

    # ---- pieces ----------------------------------------------------------------------------

    def _piece(self, rows: _Rows, i: int) -> None:
        """Piece ``i`` over every row of ``rows`` (the module docstring lists them)."""
        if i == 0:
            rows.hidden.copy_(self._embed(rows.ids))
            cos, sin = self._rotary(rows.hidden, rows.positions)
            rows.cos.copy_(cos)
            rows.sin.copy_(sin)
        else:
            layer = self._layers[i - 1]
            rows.hidden.add_(layer.self_attn.o_proj(rows.attn))
            rows.hidden.add_(layer.mlp(layer.post_attention_layernorm(rows.hidden)))
        if i < len(self._layers):
            layer = self._layers[i]
            attn = layer.self_attn
            x = layer.input_layernorm(rows.hidden)  # [1, B, d]
            B, D = rows.size, self._head_dim
            q = attn.q_proj(x).view(1, B, self._heads, D).transpose(1, 2)
            k = attn.k_proj(x).view(1, B, self._kv_heads, D).transpose(1, 2)
            cos, sin = rows.cos.unsqueeze(1), rows.sin.unsqueeze(1)  # [1, 1, B, D]
            rows.q.copy_(q * cos + _rotate_half(q) * sin)
            rows.k.copy_(k * cos + _rotate_half(k) * sin)
            rows.v.copy_(attn.v_proj(x).view(1, B, self._kv_heads, D).transpose(1, 2))

    def _attend(self, rows: _Rows, i: int, n: int, cache: Any) -> None:
        """Layer ``i``'s cache update and attention over the ``n`` real rows (eager)."""
        attn = self._layers[i].self_attn
        q = rows.q[:, :, :n]  # [1, Hq, n, D]
        keys, values = cache.update(rows.k[:, :, :n], rows.v[:, :, :n], i)  # [1, Hkv, kv, D]
        out = rows.attn[:, :n].view(1, n, self._heads, self._head_dim)
        if n == 1 or n == keys.shape[2]:  # decode, or no cached keys: SDPA's own causal works
            # what transformers' sdpa_attention_forward calls here, without its checks
            got = torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, is_causal=n > 1, scale=attn.scaling, enable_gqa=True
            )  # [1, Hq, n, D]
            out.copy_(got.transpose(1, 2))
            return
        flash = self._flash_bottom_right(q, keys, values, attn.scaling)
        if flash is not None:
            out.copy_(flash.transpose(1, 2))
        else:  # bottom-right causal through SDPA (expands K/V to every query head)
            got, _ = causal_attention_forward(attn, q, keys, values, None, scaling=attn.scaling)
            out.copy_(got)  # [1, n, Hq, D]

    def _flash_bottom_right(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor | None:
        """New tokens after cached ones on CUDA: the flash kernel itself, whose causal mask is
        bottom-right aligned and which reads grouped K/V heads as they are; ``[1, Hq, n, D]``,
        or None where it cannot run (off CUDA, fp32, or a build without it: then never again)."""
        if not self._flash_gqa or q.dtype not in (torch.bfloat16, torch.float16):
            return None
        try:
            out: torch.Tensor = torch.ops.aten._scaled_dot_product_flash_attention(
                q, keys, values, 0.0, True, False, scale=scale
            )[0]
        except RuntimeError:
            self._flash_gqa = False
            return None
        return out

    # ---- buffers and graphs ----------------------------------------------------------------

    def _fresh(self, n: int) -> _Rows:
        """Rows for an eager forward of exactly ``n`` tokens."""
        return self._rows(
            n, lambda _name, shape, dtype: torch.empty(shape, dtype=dtype, device=self.device)
        )

    def _bucket(self, size: int) -> _Rows:
        """The captured rows of ``size`` (captured now if new): views of storage shared by all
        buckets, which is safe because forwards never overlap."""
        rows = self._captured.get(size)
        if rows is not None:
            return rows
        top = self._buckets[-1]

        def view(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            numel = math.prod(shape)
            store = self._storage.get(name)
            if store is None:  # room for the largest bucket; zeros: padding rows hold valid
                # token ids and finite values
                store = torch.zeros(numel // size * top, dtype=dtype, device=self.device)
                self._storage[name] = store
            return store[:numel].view(shape)

        rows = self._rows(size, view)
        rows.graphs = self._capture(rows)
        self._captured[size] = rows
        return rows

    def _rows(
        self, B: int, make: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]
    ) -> _Rows:
        """Rows of ``B`` tokens, each buffer from ``make(name, shape, dtype)``."""
        D, d, Hq, Hkv, dt = self._head_dim, self._hidden, self._heads, self._kv_heads, self._dtype
        return _Rows(
            ids=make("ids", (1, B), torch.int64),
            positions=make("positions", (1, B), torch.int64),
            hidden=make("hidden", (1, B, d), dt),
            cos=make("cos", (1, B, D), dt),
            sin=make("sin", (1, B, D), dt),
            q=make("q", (1, Hq, B, D), dt),
            k=make("k", (1, Hkv, B, D), dt),
            v=make("v", (1, Hkv, B, D), dt),
            attn=make("attn", (1, B, Hq * D), dt),
            graphs=[],
        )

    def _capture(self, rows: _Rows) -> list[torch.cuda.CUDAGraph]:
        """One CUDA graph per piece over ``rows``' buffers, in one memory pool: a piece's
        intermediates are dead when it ends, so the pieces (of any bucket) may share it."""
        pieces = range(len(self._layers) + 1)
        rows.positions.copy_(torch.arange(rows.size, device=self.device).unsqueeze(0))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for i in pieces:  # warm-up: libraries set up their handles outside the capture
                self._piece(rows, i)
        side.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graphs = []
        with torch.cuda.stream(side):
            for i in pieces:
                graph = torch.cuda.CUDAGraph()
                # thread_local: the write-back threads may synchronise while this captures
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    self._piece(rows, i)
                finally:
                    graph.capture_end()
                graphs.append(graph)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return graphs


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
