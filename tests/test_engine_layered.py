"""Resumed turns from host blocks (``HostKVPrefix``): the layer-by-layer path gives the same
logits and continuation as the plain ``KVPrefix`` path with the same (decoded) KV, and the
caches it builds behave like transformers' own; write-back stores exactly what ``encode`` of
the exported pages gives."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny as tiny  # fixtures
from model_fixtures import tiny_dir as tiny_dir
from model_fixtures import tiny_engine as tiny_engine

from kvruntime.engines.base import KVPrefix
from kvruntime.engines.layered import (
    HostKVPrefix,
    beside_compute,
    prefetched_layer_class,
    restore_layered,
    shared_buffer,
    write_pages_async,
)
from kvruntime.engines.transformers import TransformersEngine, kv_from_pages
from kvruntime.errors import BadRequest, UnknownName
from kvruntime.store.codec import get_codec
from kvruntime.store.host import HostTier, HostTierConfig

P = 16


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 128, (n,), generator=g).tolist()


def greedy(engine: TransformersEngine, state: object, n: int) -> list[int]:
    return [t.token_id for t in engine.decode(state, n, stop_token_ids=())]  # type: ignore[arg-type]


def host_prefix(
    engine: TransformersEngine, tokens: list[int], upto: int, codec: str
) -> tuple[HostKVPrefix, torch.Tensor]:
    """An earlier turn's pages of ``tokens[:upto]`` stored in a host tier at scattered slots;
    also returns what the codec decodes them to (the KV the engine should see)."""
    state = engine.prefill(tokens[:upto]).state
    pages = engine.export_pages(state, 0, -(-upto // P), P)  # [n, L, 2, H, P, D]
    c = get_codec(codec)
    layout = engine.layout.page_layout(P, engine.dtype)
    tier = HostTier(HostTierConfig(12 * c.page_nbytes(layout), c.page_nbytes(layout), False))
    filler = torch.zeros((7, c.page_nbytes(layout)), dtype=torch.uint8)
    tier.put_many([f"other{i}" for i in range(7)], filler)
    tier.discard(["other1", "other4", "other5"])  # holes: the prefix lands on scattered rows
    keys = [f"page{i}" for i in range(pages.shape[0])]
    tier.put_many(keys, c.encode(pages))
    slots = [s for s in tier.slots_of(keys) if s is not None]
    assert slots != sorted(slots) or slots != list(range(slots[0], slots[0] + len(slots)))
    decoded = torch.empty_like(pages)
    c.decode(c.encode(pages), layout, decoded)
    return HostKVPrefix(tier.blocks, slots, codec, P, upto), decoded


@pytest.mark.parametrize("codec", ["none", "int8", "int4"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_host_prefix_matches_plain_path(
    tiny_engine: TransformersEngine, codec: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVR_KERNELS", backend)
    turn1 = prompt(45, seed=1)
    turn2 = turn1 + prompt(12, seed=2)
    past, decoded = host_prefix(tiny_engine, turn1, 45, codec)
    layered = tiny_engine.prefill(turn2, past)
    plain = tiny_engine.prefill(turn2, KVPrefix(decoded, 45))
    assert layered.cached_tokens == 45 and layered.computed_tokens == 12
    assert torch.equal(layered.logits, plain.logits), f"{codec} {backend}"
    assert greedy(tiny_engine, layered.state, 12) == greedy(tiny_engine, plain.state, 12)
    if codec == "none":  # exact KV: the same as computing the whole prompt
        full = tiny_engine.prefill(turn2)
        assert torch.allclose(layered.logits, full.logits, atol=1e-5, rtol=1e-5)


def test_prompt_shorter_than_prefix_uses_part_of_it(tiny_engine: TransformersEngine) -> None:
    tokens = prompt(40, seed=3)
    past, _ = host_prefix(tiny_engine, tokens, 40, "none")
    result = tiny_engine.prefill(tokens[:20], past)  # 19 cached tokens: a partial page
    assert result.cached_tokens == 19 and result.computed_tokens == 1
    assert torch.allclose(result.logits, tiny_engine.prefill(tokens[:20]).logits, atol=1e-5)


def test_caches_grow_past_their_room_like_dynamic_layers(tiny_engine: TransformersEngine) -> None:
    tokens = prompt(40, seed=4)
    past, _ = host_prefix(tiny_engine, tokens, 32, "none")
    model = tiny_engine.model
    cache = restore_layered(
        past, 32, model.config, tiny_engine.layout, tiny_engine.dtype, tiny_engine.device, 34
    )
    state = tiny_engine.prefill(tokens[:32]).state
    # a plain DynamicCache (concatenating layers) with the same 32 tokens
    reference = kv_from_pages(tiny_engine.export_pages(state, 0, 2, 16), 32, model.config, "cpu")
    assert type(reference.layers[0]).__name__ == "DynamicLayer"
    layer, ref = cache.layers[0], reference.layers[0]
    assert isinstance(layer, prefetched_layer_class()) and layer.get_seq_length() == 32
    g = torch.Generator().manual_seed(0)
    for step in (1, 5, 1, 300):  # the buffer holds 34 tokens at first: it regrows twice
        k = torch.randn((1, 2, step, 16), generator=g)
        v = torch.randn((1, 2, step, 16), generator=g)
        got, want = layer.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"step {step}"
    assert layer.get_seq_length() == ref.get_seq_length() == 339
    layer.crop(-9)
    ref.crop(-9)
    k = torch.randn((1, 2, 3, 16), generator=g)
    assert torch.equal(layer.update(k, k)[0], ref.update(k, k)[0])
    layer.reset()
    assert layer.get_seq_length() == 0
    assert torch.equal(layer.update(k, k)[1], k)


def test_ready_runs_once_before_the_first_write() -> None:
    calls: list[str] = []
    buf = torch.zeros((1, 2, 8, 4))
    layer = prefetched_layer_class()(buf, buf.clone(), 3, lambda: calls.append("ready"))
    assert layer.get_seq_length() == 3 and not calls  # shapes need no wait
    x = torch.ones((1, 2, 1, 4))
    layer.update(x, x)
    layer.update(x, x)
    assert calls == ["ready"] and layer.get_seq_length() == 5


@pytest.mark.parametrize(
    "codec, restored, backend",
    [
        ("none", False, "torch"),
        ("int8", False, "torch"),
        ("none", True, "torch"),
        ("none", True, "triton"),
    ],
)
def test_write_back_stores_encoded_pages(
    tiny_engine: TransformersEngine,
    codec: str,
    restored: bool,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From a plain cache (staged copies) and from a restored one (the store kernel)."""
    monkeypatch.setenv("KVR_KERNELS", backend)
    tokens = prompt(50, seed=5)
    if restored:  # 32 tokens from the host, 18 computed: the pages span both
        past, _ = host_prefix(tiny_engine, tokens, 32, "none")
        state = tiny_engine.prefill(tokens, past).state
        assert shared_buffer(state.cache) is not None
    else:
        state = tiny_engine.prefill(tokens).state  # 3 full pages and a partial one
        assert shared_buffer(state.cache) is None
    c = get_codec(codec)
    nbytes = c.page_nbytes(tiny_engine.layout.page_layout(P, tiny_engine.dtype))
    blocks = torch.zeros((8, nbytes), dtype=torch.uint8)
    pending = write_pages_async(state.cache, blocks, [6, 2, 3], codec, P, chunk_pages=2)
    pending.wait()
    assert pending.done()
    expected = c.encode(tiny_engine.export_pages(state, 0, 3, P))
    assert torch.equal(blocks[[6, 2, 3]], expected), codec
    assert not blocks[[0, 1, 4, 5, 7]].any()
    blocks.zero_()
    write_pages_async(state.cache, blocks, [5], codec, P, start_token=32).wait()
    assert torch.equal(blocks[5], expected[2]) and not blocks[:5].any()
    with pytest.raises(BadRequest, match="full pages"):
        write_pages_async(state.cache, blocks, [0, 1, 4, 5], codec, P)  # the 4th is partial
    with pytest.raises(BadRequest, match="aligned"):
        write_pages_async(state.cache, blocks, [0], codec, P, start_token=8)


def test_bad_host_prefix_is_refused(tiny_engine: TransformersEngine) -> None:
    tokens = prompt(33, seed=6)
    past, _ = host_prefix(tiny_engine, tokens, 32, "int8")
    with pytest.raises(UnknownName, match="codec"):
        tiny_engine.prefill(tokens, past._replace(codec="zstd"))
    with pytest.raises(BadRequest, match="bytes per page"):
        tiny_engine.prefill(tokens, past._replace(codec="int4"))
    with pytest.raises(BadRequest, match="do not fit"):
        tiny_engine.prefill(tokens, past._replace(num_tokens=33))
    with pytest.raises(BadRequest, match="slots span"):
        tiny_engine.prefill(tokens, past._replace(slots=[0, 99]))
    with pytest.raises(BadRequest, match="page_size"):
        tiny_engine.prefill(tokens, past._replace(page_size=0))


def test_loads_beside_compute_take_more_programs_for_lossy_codecs() -> None:
    from kvruntime.kernels import host_copy

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert beside_compute(cpu) is None and beside_compute(cpu, codec="int4") is None
    assert beside_compute(cuda) == host_copy.LOAD_BESIDE_COMPUTE
    assert beside_compute(cuda, store=True) == host_copy.STORE_BESIDE_COMPUTE
    for codec in ("fp8", "int8", "int4"):
        assert beside_compute(cuda, codec=codec) == host_copy.LOAD_LOSSY_BESIDE_COMPUTE
    assert host_copy.LOAD_LOSSY_BESIDE_COMPUTE.programs > host_copy.LOAD_BESIDE_COMPUTE.programs
