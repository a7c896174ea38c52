"""The runtime's restore of a cached prefix (``KVCache.restore``): host pages decoded straight
from the host tier's rows, or (``layered=True`` where ``layered_restore_applies``: CUDA, pinned
rows) left in place as a ``HostKVPrefix`` that the engine loads layer by layer. On the CPU the
layered path is forced through the same predicate, so its page bookkeeping (device pages kept
as resident pages, host rows by slot) is checked against the plain path here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from model_fixtures import tiny as tiny  # fixtures
from model_fixtures import tiny_dir as tiny_dir
from model_fixtures import tiny_engine as tiny_engine

from kvruntime import restore
from kvruntime.config import RuntimeConfig
from kvruntime.cost import CostModel, TierCost
from kvruntime.engines.base import KVPrefix
from kvruntime.engines.layered import HostKVPrefix
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.errors import BadRequest
from kvruntime.kvcache import KVCache
from kvruntime.lookup import Lookup
from kvruntime.restore import layered_restore_applies

P = 4
DEVICE_PAGES = 3


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 128, (n,), generator=g).tolist()


@pytest.fixture(params=["none", "int8"])
def cache(request: pytest.FixtureRequest, tiny_engine: TransformersEngine) -> Iterator[KVCache]:
    """A KV cache whose device pool holds 3 pages: a longer prefix spills to the host tier."""
    layout = tiny_engine.layout.page_layout(P, tiny_engine.dtype)
    config = RuntimeConfig(
        page_size=P,
        device_kv_bytes=DEVICE_PAGES * layout.page_nbytes,
        host_kv_bytes=64 * layout.page_nbytes,
        host_codec=str(request.param),
        write_back=False,
    )
    cost = CostModel(prefill_tokens_per_s=1.0, tiers={"host": TierCost(1e12)})
    c = KVCache(layout, tiny_engine.fingerprint, config, cost)
    yield c
    c.close()


def cached_turn(cache: KVCache, engine: TransformersEngine) -> tuple[list[int], Lookup]:
    """Commit a 30-token prompt (7 full pages: 3 on the device, 4 spilled to the host), then
    look up a longer prompt that starts with it."""
    first = prompt(30, seed=1)
    found = cache.lookup(first, "t")
    state = engine.prefill(first).state
    cache.commit(found, first, lambda a, n: engine.export_pages(state, a * P, n, P))
    cache.release(found)
    tokens = first + prompt(9, seed=2)
    found = cache.lookup(tokens, "t")
    assert [t for t, _ in found.sources] == ["device"] * 3 + ["host"] * 4
    return tokens, found


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layered_restore_matches_the_plain_path(
    cache: KVCache, tiny_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setenv("KVR_KERNELS", backend)  # host pages by slot, resident pages by -1
    tokens, found = cached_turn(cache, tiny_engine)
    dev, dtype = tiny_engine.device, tiny_engine.dtype
    plain = cache.restore(found, dev, dtype)
    assert plain.host_prefix is None and plain.pages is not None
    assert isinstance(plain.prefix, KVPrefix) and plain.prefix.num_tokens == 28
    # on the CPU layered=True falls back to decoding up front
    fallback = cache.restore(found, dev, dtype, layered=True)
    assert fallback.host_prefix is None and fallback.pages is not None
    assert torch.equal(fallback.pages, plain.pages)

    monkeypatch.setattr(restore, "layered_restore_applies", lambda *args: True)
    layered = cache.restore(found, dev, dtype, layered=True)
    past = layered.prefix
    assert layered.pages is None and isinstance(past, HostKVPrefix)
    assert past.blocks is cache.host.blocks and past.codec == cache.host_codec.name  # type: ignore[union-attr]
    host_slots = [int(v) for t, v in found.sources if t == "host"]
    assert list(past.slots) == [-1, -1, -1, *host_slots] and past.num_tokens == 28
    assert past.resident is not None and torch.equal(past.resident, plain.pages[:3])
    assert layered.tokens_by_tier == plain.tokens_by_tier == {"device": 12, "host": 16, "redis": 0}
    assert layered.bytes_by_tier == plain.bytes_by_tier

    want = tiny_engine.prefill(tokens, plain.prefix)
    got = tiny_engine.prefill(tokens, past)
    assert got.cached_tokens == want.cached_tokens == 28
    assert torch.equal(got.logits, want.logits), f"{cache.host_codec.name} {backend}"
    if cache.host_codec.lossless:  # exact pages: the same as computing the whole prompt
        full = tiny_engine.prefill(tokens)
        assert torch.allclose(got.logits, full.logits, atol=1e-5, rtol=1e-5)
    cache.release(found)


def test_host_only_prefix_has_no_resident_pages(
    cache: KVCache, tiny_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, found = cached_turn(cache, tiny_engine)
    found.sources = found.sources[3:]  # the host pages alone (their tokens do not matter here)
    monkeypatch.setattr(restore, "layered_restore_applies", lambda *args: True)
    past = cache.restore(found, tiny_engine.device, tiny_engine.dtype, layered=True).prefix
    assert isinstance(past, HostKVPrefix) and past.resident is None and min(past.slots) >= 0
    cache.release(found)


def test_layered_restore_applies_only_on_cuda_with_pinned_rows() -> None:
    rows = torch.zeros((2, 16), dtype=torch.uint8)
    bf16 = torch.bfloat16
    assert not layered_restore_applies(torch.device("cpu"), rows, bf16, bf16)
    assert not layered_restore_applies(torch.device("cuda"), rows, bf16, bf16)  # not pinned
    if torch.cuda.is_available():  # pinned rows need CUDA
        pinned = rows.pin_memory()
        assert layered_restore_applies(torch.device("cuda"), pinned, bf16, bf16)
        assert not layered_restore_applies(torch.device("cuda"), pinned, torch.float16, bf16)


def test_resident_pages_must_cover_the_marked_ones(
    cache: KVCache, tiny_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens, found = cached_turn(cache, tiny_engine)
    monkeypatch.setattr(restore, "layered_restore_applies", lambda *args: True)
    past = cache.restore(found, tiny_engine.device, tiny_engine.dtype, layered=True).prefix
    assert isinstance(past, HostKVPrefix) and past.resident is not None
    with pytest.raises(BadRequest, match="3 pages marked resident"):
        tiny_engine.prefill(tokens, past._replace(resident=past.resident[:2]))
    with pytest.raises(BadRequest, match="resident pages"):
        tiny_engine.prefill(tokens, past._replace(resident=past.resident.double()))
    cache.release(found)
