"""Causal attention that stays on the fast SDPA kernels when cached tokens sit in front.

Why: with a cached prefix the queries are the last ``q`` of ``kv`` positions (``q < kv``).
transformers' ``sdpa`` path then materialises an explicit ``[B, 1, q, kv]`` mask, and PyTorch
cannot run its flash kernel with a mask: on the H200 (Llama-8B shape, bf16) 8,192 new tokens
after an 8,192-token prefix took 468 ms against 254 ms for 8,192 tokens from scratch, so reusing
half a prompt saved only ~20%.

The fix is two registered functions under one name, ``ATTENTION`` ("kvr_sdpa"):

- the mask function returns ``None`` (no mask) exactly when the mask would be plain causal with
  the queries aligned to the end of the keys (no padding, no extra mask function, no sliding
  window); everything else is built by transformers' own ``sdpa_mask``;
- the attention function sees ``attention_mask is None`` with ``1 < q < kv`` only in that case
  and calls SDPA with ``causal_lower_right(q, kv)``, which PyTorch runs on the flash kernel
  (flash's causal is bottom-right aligned). Every other call (a mask, decode with ``q == 1``,
  ``q == kv``) goes to transformers' ``sdpa_attention_forward`` unchanged.

Every SDPA call made here (both paths) runs with the cuDNN backend excluded on CUDA. PyTorch
2.11 prefers cuDNN attention on Hopper, and cuDNN builds (and caches) an execution graph per
distinct shape; an agent turn has a new key length at every forward, so each call paid the
build: on the H200 (Llama-8B shape, 12K cached) one decode step took 113 ms of wall time for
7.5 ms of GPU work, 71 ms of it in ``_cudnn_attention_forward`` on the CPU (2.3 ms per layer).
Flash and memory-efficient kernels have no per-shape set-up.

The one case where stock ``sdpa_mask`` itself skips the mask with ``q < kv`` (prefill into an
empty static cache, ``q_offset == 0``: keys beyond ``q`` are unused slots) gets a materialised
mask here instead, so ``None`` with ``q < kv`` always means "bottom-right causal".
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

ATTENTION = "kvr_sdpa"  # the name registered with transformers' attention and mask interfaces
_registered = False


def register() -> str:
    """Register ``ATTENTION`` with transformers (idempotent); returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION, causal_attention_forward)
        AttentionMaskInterface.register(ATTENTION, causal_sdpa_mask)
        _registered = True
    return ATTENTION


def use_fast_causal(model: Any, enabled: bool = True) -> str:
    """Switch ``model`` between stock ``sdpa`` and ``ATTENTION``; returns the implementation now
    in use. Only those two are switched: a model on ``eager`` or flash-attention is left alone.
    Changes the model in place (its config), so every engine sharing it sees the change."""
    register()
    current = model.config._attn_implementation
    wanted = ATTENTION if enabled else "sdpa"
    if current in ("sdpa", ATTENTION) and current != wanted:
        model.set_attn_implementation(wanted)
    return str(model.config._attn_implementation)


def causal_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """``AttentionMaskInterface`` entry: ``None`` for a plain end-aligned causal window, else
    whatever transformers' ``sdpa_mask`` builds (never ``None`` with ``1 < q < kv``)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    q_length, q_offset = _query_window(kwargs)
    kv_length = int(kwargs["kv_length"])
    plain = (
        not args
        and kwargs.get("allow_is_causal_skip", True)
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
        and int(kwargs.get("kv_offset", 0)) == 0
        and q_offset + q_length == kv_length
        and _no_padding(kwargs.get("attention_mask"))
        and not torch.compiler.is_compiling()
    )
    if plain:
        return None
    mask = sdpa_mask(*args, **kwargs)
    if mask is None and 1 < q_length < kv_length:
        # stock skipped a mask our attention would read as bottom-right causal: build it
        mask = sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    return mask


def causal_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: query ``[B, Hq, q, D]``, key/value ``[B, Hkv, kv, D]``;
    returns ``([B, q, Hq, D], None)`` like transformers' ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    q_length, kv_length = query.shape[2], key.shape[2]
    fast = (
        attention_mask is None
        and 1 < q_length < kv_length
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and dropout == 0.0
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and not torch.compiler.is_compiling()
    )
    if not fast:
        with without_cudnn(query):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
            )
    from torch.nn.attention.bias import causal_lower_right

    groups = query.shape[1] // key.shape[1]
    # The bottom-right flash/efficient dispatch of CausalBias ignores enable_gqa: expand K/V to
    # [B, Hq, kv, D] (a copy of K and V, small beside the attention itself).
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    with without_cudnn(query):
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=causal_lower_right(q_length, kv_length),
            scale=scaling,
        )  # [B, Hq, q, D]
    return out.transpose(1, 2).contiguous(), None


def without_cudnn(query: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """SDPA backends without cuDNN for a CUDA call (see the module docstring); a no-op on the
    CPU."""
    if not query.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def _query_window(kwargs: dict[str, Any]) -> tuple[int, int]:
    """(q_length, q_offset) from the mask interface's keywords: transformers 5.24 passes them
    directly; older 5.x versions pass ``cache_position`` ([q] int64) instead."""
    if "q_length" in kwargs:
        return int(kwargs["q_length"]), int(kwargs.get("q_offset", 0))
    positions = kwargs["cache_position"]
    return int(positions.shape[0]), int(positions[0])


def _no_padding(mask: torch.Tensor | None) -> bool:
    return mask is None or (mask.dim() == 2 and bool(mask.all()))
