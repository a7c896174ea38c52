"""The bottom-right causal attention (engines/attention.py) against transformers' own paths.

Every comparison runs the same weights twice: once on ``kvr_sdpa`` and once on stock ``sdpa``
or ``eager``, prefix through a ``DynamicCache`` and then the suffix, so any misaligned causal
window (the suffix seeing too few or too many keys) shows up in the logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from model_fixtures import smollm2 as smollm2
from model_fixtures import tiny_model
from transformers import DynamicCache, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from kvruntime.engines.attention import ATTENTION, causal_sdpa_mask, use_fast_causal
from kvruntime.engines.base import KVPrefix
from kvruntime.engines.models import LoadedModel, kv_shape
from kvruntime.engines.transformers import EngineConfig, TransformersEngine

# transformers 5.24 calls the forward's cache argument ``cache``; 5.17 only ``past_key_values``
CACHE = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)
TOL = {"atol": 1e-4, "rtol": 1e-4}  # fp32: only summation order differs between kernels


@contextmanager
def attention(model: Any, name: str) -> Iterator[Any]:
    use_fast_causal(model)  # registers the name
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def prefix_then_suffix(model: Any, ids: torch.Tensor, cut: int) -> tuple[torch.Tensor, ...]:
    """Logits [1, S - cut, V] of ids[cut:] after ids[:cut] went into a cache, then the logits
    [1, 1, V] of one decoded token (greedy) on top."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids[:, :cut], use_cache=True, **{CACHE: cache})
        suffix = model(input_ids=ids[:, cut:], use_cache=True, **{CACHE: cache}).logits
        nxt = suffix[:, -1:].argmax(-1)  # [1, 1]
        decode = model(input_ids=nxt, use_cache=True, **{CACHE: cache}).logits
    return suffix.float(), decode.float()


def assert_same(fast: tuple[torch.Tensor, ...], stock: tuple[torch.Tensor, ...], what: str) -> None:
    for a, b, part in zip(fast, stock, ("prefill", "decode"), strict=True):
        diff = (a - b).abs().max().item()
        assert torch.allclose(a, b, **TOL), f"{what} {part}: max abs logit diff {diff}"


@pytest.mark.parametrize("cut", [1, 17, 40])
@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_tiny_prefix_then_suffix_matches_stock(cut: int, reference: str) -> None:
    model = tiny_model(seed=3)
    ids = torch.randint(5, 128, (1, 64), generator=torch.Generator().manual_seed(cut))
    with attention(model, ATTENTION):
        fast = prefix_then_suffix(model, ids, cut)
    with attention(model, reference):
        stock = prefix_then_suffix(model, ids, cut)
    assert_same(fast, stock, f"tiny, {cut} cached, vs {reference}")


def test_smollm2_prefix_then_suffix_matches_stock(smollm2: LoadedModel) -> None:
    model = smollm2.model
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids  # [1, ~60]
    cut = ids.shape[1] // 2
    with attention(model, ATTENTION):
        fast = prefix_then_suffix(model, ids, cut)
    with attention(model, "sdpa"):
        stock = prefix_then_suffix(model, ids, cut)
    assert_same(fast, stock, f"SmolLM2, {cut} of {ids.shape[1]} cached")


def test_engine_prefill_after_cached_pages_matches_stock_engine() -> None:
    """Through the engine: pages exported from one prefill, restored under a longer prompt."""
    model = tiny_model(seed=5)
    loaded = LoadedModel(
        name="tiny", model=model, tokenizer=_EosOnly(), layout=kv_shape(model.config),
        fingerprint="0" * 32, max_context=512, dtype=torch.float32,
        device=torch.device("cpu"), source_dir=Path("."),
    )  # fmt: skip
    tokens = torch.randint(5, 128, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    results = {}
    for fast in (True, False):
        engine = TransformersEngine(
            loaded, EngineConfig(prefill_chunk_tokens=16, fast_causal_attention=fast)
        )
        assert model.config._attn_implementation == (ATTENTION if fast else "sdpa")
        first = engine.prefill(tokens[:48])
        pages = engine.export_pages(first.state, 0, 3, 16)  # [3, L, 2, H, 16, D]
        again = engine.prefill(tokens, past=KVPrefix(pages=pages, num_tokens=48))
        assert again.cached_tokens == 48
        decoded = [t.token_id for t in engine.decode(again.state, 5)]
        results[fast] = (again.logits, again.state.logits, decoded)  # type: ignore[attr-defined]
    assert torch.allclose(results[True][0], results[False][0], **TOL)
    assert torch.allclose(results[True][1], results[False][1], **TOL)
    assert results[True][2] == results[False][2]


class _EosOnly:
    """All the engine reads of a tokenizer: its end-of-sequence id."""

    eos_token_id = 4


def test_mask_is_skipped_only_for_plain_end_aligned_causal() -> None:
    model = tiny_model(seed=0)
    use_fast_causal(model)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.arange(5, 25).unsqueeze(0), use_cache=True, **{CACHE: cache})
    embeds = torch.zeros(1, 6, 64)  # [1, q=6, hidden]: 6 queries after 20 cached tokens
    positions = torch.arange(20, 26).unsqueeze(0)
    kwargs = {"config": model.config, "inputs_embeds": embeds, "position_ids": positions}
    assert create_causal_mask(**kwargs, attention_mask=None, **{CACHE: cache}) is None
    full = torch.ones(1, 26, dtype=torch.bool)
    assert create_causal_mask(**kwargs, attention_mask=full, **{CACHE: cache}) is None
    padded = full.clone()
    padded[0, :3] = False  # left padding: a real mask, stock path
    mask = create_causal_mask(**kwargs, attention_mask=padded, **{CACHE: cache})
    assert isinstance(mask, torch.Tensor) and mask.shape[-2:] == (6, 26)
    assert (
        not mask[0, 0, :, :3].any() and mask[0, 0, 0, 3:21].all() and not mask[0, 0, 0, 21:].any()
    )


def test_mask_is_built_where_stock_skips_it_with_fewer_queries_than_keys() -> None:
    """Prefill into an empty static cache: stock returns None for q=4 < kv=10; ours a mask."""
    base = {"batch_size": 1, "kv_length": 10, "kv_offset": 0, "device": "cpu"}
    mask = causal_sdpa_mask(**base, q_length=4, q_offset=0, attention_mask=None)
    assert isinstance(mask, torch.Tensor) and mask.shape[-2:] == (4, 10)
    assert mask[0, 0, 3, :4].all() and not mask[0, 0, 3, 4:].any()
    assert causal_sdpa_mask(**base, q_length=4, q_offset=6, attention_mask=None) is None
    assert causal_sdpa_mask(**base, q_length=1, q_offset=9, attention_mask=None) is None


def test_padded_batch_takes_the_stock_path_and_matches_it() -> None:
    model = tiny_model(seed=7)
    ids = torch.randint(5, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0  # row 1 left-padded
    outs = {}
    for name in (ATTENTION, "sdpa"):
        with attention(model, name), torch.inference_mode():
            outs[name] = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padded rows' logits are arbitrary: compare real positions only
    assert torch.allclose(outs[ATTENTION][real], outs["sdpa"][real], **TOL)


def test_eager_models_are_left_alone() -> None:
    model = tiny_model(seed=0)
    model.set_attn_implementation("eager")
    assert use_fast_causal(model) == "eager"
    model.set_attn_implementation("sdpa")
    assert use_fast_causal(model) == ATTENTION
    assert use_fast_causal(model, enabled=False) == "sdpa"
