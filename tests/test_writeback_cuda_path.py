"""Write-back fills host rows outside the runtime's lock: the host tier's reserve/publish API
(a reserved slot is neither seen nor evicted until published; a failure releases it) and the
runtime's write-back built on it, on CPU (the CUDA stream path shares this bookkeeping)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from model_fixtures import tiny, tiny_dir, tiny_engine  # noqa: F401

from kvruntime.config import RuntimeConfig
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.errors import CapacityError
from kvruntime.runtime import Runtime
from kvruntime.store.host import HostTier, HostTierConfig, runs_of

W = 16  # block bytes


def _blocks(n: int, fill: int) -> torch.Tensor:
    return torch.full((n, W), fill, dtype=torch.uint8)  # [n, W] uint8


def test_reserved_slot_is_invisible_until_published() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=4 * W, block_bytes=W))
    host.put_many(["a"], _blocks(1, 1))
    (slot,) = host.reserve(1)
    assert host.num_free == 2 and host.num_reserved == 1
    host.blocks[slot] = 7  # filled with no lock held by the tier
    assert "b" not in host and host.slots_of(["b"]) == [None]
    assert host.get_many(["b"]) == [None]
    assert host.stats().used_slots == 1
    assert host.publish(["b"], [slot]) == [slot]
    assert host.num_reserved == 0 and "b" in host
    got = host.get_many(["b"])[0]
    assert got is not None and torch.equal(got, _blocks(1, 7)[0])


def test_eviction_cannot_take_a_reserved_slot() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=3 * W, block_bytes=W))
    host.put_many(["a", "b"], _blocks(2, 1))
    (slot,) = host.reserve(1)
    host.blocks[slot] = 9
    # two new pages: the tier evicts a and b, never the reserved row
    result = host.put_many(["c", "d"], _blocks(2, 2))
    assert sorted(result.evicted) == ["a", "b"]
    assert slot not in host.slots_of(["c", "d"])
    with pytest.raises(CapacityError):
        host.put_many(["e", "f", "g"], _blocks(3, 3))
    assert host.discard_slots([slot]) == 0  # no key owns it: nothing to drop
    with pytest.raises(CapacityError):
        host.reserve(1)  # no free slot and reserve evicts nothing
    host.publish(["r"], [slot])
    got = host.get_many(["r"])[0]
    assert got is not None and int(got[0]) == 9


def test_release_returns_the_slot_and_publish_checks_it() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=2 * W, block_bytes=W))
    slots = host.reserve(2)
    assert host.num_free == 0
    host.release(slots)
    host.release(slots)  # a second release changes nothing
    assert host.num_free == 2 and host.num_reserved == 0
    with pytest.raises(ValueError):
        host.publish(["x"], [slots[0]])  # released: not reserved any more
    assert "x" not in host


def test_publish_of_a_key_already_resident_frees_the_reserved_slot() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=3 * W, block_bytes=W))
    (slot,) = host.reserve(1)
    host.put_many(["k"], _blocks(1, 4))  # resident meanwhile (another writer)
    (first,) = host.slots_of(["k"])
    assert host.publish(["k"], [slot]) == [first]
    assert host.num_free == 2 and len(host) == 1


def test_write_rows_fills_runs_of_slots_and_checks_the_shape() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=6 * W, block_bytes=W))
    slots = [4, 5, 1, 2, 3]  # two runs: 4-5 and 1-3
    blocks = torch.arange(5, dtype=torch.uint8).repeat_interleave(W).view(5, W)
    host.blocks[0] = 9
    host.write_rows(slots, blocks)
    for j, slot in enumerate(slots):
        assert torch.equal(host.blocks[slot], blocks[j])
    assert torch.equal(host.blocks[0], _blocks(1, 9)[0])  # not in slots: untouched
    with pytest.raises(ValueError):
        host.write_rows([0, 1], blocks)
    # (first value, position, count) per run: one copy each
    assert runs_of([4, 5, 1, 2, 3, 7]) == [(4, 0, 2), (1, 2, 3), (7, 5, 1)]
    assert runs_of([]) == []


def test_concurrent_lookups_never_see_unpublished_rows() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=64 * W, block_bytes=W))
    lock = threading.Lock()  # the runtime's lock: the tier itself is not thread-safe
    seen_bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with lock:
                keys = [f"k{i}" for i in range(64)]
                for k, row in zip(keys, host.get_many(keys), strict=True):
                    if row is not None and int(row.min()) != int(k[1:]) + 1:
                        seen_bad.append(k)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(64):
            with lock:
                (slot,) = host.reserve(1)
            host.blocks[slot] = 0  # half-written ...
            host.blocks[slot, : W // 2] = i + 1
            host.blocks[slot, W // 2 :] = i + 1  # ... and complete, outside the lock
            with lock:
                host.publish([f"k{i}"], [slot])
    finally:
        stop.set()
        t.join()
    assert seen_bad == []
    assert len(host) == 64 and host.num_reserved == 0


PAGE = 4


def _runtime(engine: TransformersEngine, model: LoadedModel, **fields: Any) -> Runtime:
    pb = engine.layout.page_layout(PAGE, engine.dtype).page_nbytes
    return Runtime(
        engine,
        model.tokenizer,
        RuntimeConfig(page_size=PAGE, device_kv_bytes=200 * pb, host_kv_bytes=200 * pb, **fields),
    )


def _turn(rt: Runtime, text: str) -> list[int]:
    r = rt.session().chat([{"role": "user", "content": text}], max_tokens=4)
    rt.cache.flush()
    return list(r.token_ids)


def test_write_back_publishes_host_copies_that_restore(
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
) -> None:
    rt = _runtime(tiny_engine, tiny)
    try:
        prompt = "Write-back test: describe the files in the repo, one line each. " * 3
        want = _turn(rt, prompt)
        host = rt.cache.tiers.host
        assert host is not None
        assert host.stats().used_slots > 0 and host.num_reserved == 0
        published = host.stats().used_slots
        rt.cache.tiers.tree.check_integrity()
        # drop the device copies: the next turn restores from the host rows
        with rt.cache.tiers.lock:
            freed = rt.cache.tiers.tree.evict("device", rt.cache.tiers.tree.pages_in("device"))
            rt.cache.tiers.pool.free([int(v) for v in freed.values])
        assert rt.cache.tiers.tree.pages_in("host") == published
        assert _turn(rt, prompt) == want
        assert rt.stats().cached_tokens > 0
    finally:
        rt.close()


def test_failed_fill_releases_the_reservation(
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = _runtime(tiny_engine, tiny)
    try:
        tiers = rt.cache.tiers

        def broken(*args: object) -> None:
            raise RuntimeError("injected copy failure")

        monkeypatch.setattr(tiers.writer, "_fill_host", broken)
        _turn(rt, "A turn whose write-back fails half way through its copies. " * 2)
        host = tiers.host
        assert host is not None
        assert host.num_reserved == 0 and host.stats().used_slots == 0
        assert host.num_free == host.config.num_slots
        assert tiers.tree.pages_in("host") == 0 and tiers.tree.pages_in("device") > 0
        tiers.tree.check_integrity()
    finally:
        rt.close()
