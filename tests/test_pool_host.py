from __future__ import annotations

import pytest
import torch

from kvruntime.errors import CapacityError, ConfigError
from kvruntime.kernels.layout import PageLayout
from kvruntime.store.host import HostTier, HostTierConfig
from kvruntime.store.pool import DevicePagePool, PoolConfig

LAYOUT = PageLayout(num_layers=2, kv_heads=1, head_dim=8, page_size=4)


def test_pool_budget_shape_and_allocator() -> None:
    config = PoolConfig.from_budget(LAYOUT, kv_bytes=LAYOUT.page_nbytes * 5 + 7)
    pool = DevicePagePool(config)
    assert pool.kv.shape == (2, 2, 5, 1, 4, 8)
    assert pool.kv.dtype == torch.bfloat16
    ids = pool.alloc(3)
    assert ids == [0, 1, 2] and pool.num_free == 2
    assert pool.used_bytes == 3 * LAYOUT.page_nbytes
    with pytest.raises(CapacityError, match="2 free pages; 3 requested"):
        pool.alloc(3)
    assert pool.num_free == 2  # a failed alloc takes nothing
    pool.free([1])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([1])
    assert sorted(pool.alloc(3)) == [1, 3, 4]


def test_pool_budget_too_small() -> None:
    with pytest.raises(ConfigError, match="holds no page"):
        PoolConfig.from_budget(LAYOUT, kv_bytes=LAYOUT.page_nbytes - 1)


def _blocks(n: int, fill: int, width: int = 16) -> torch.Tensor:
    return (
        torch.full((n, width), fill, dtype=torch.uint8)
        + torch.arange(n, dtype=torch.uint8)[:, None]
    )


def test_host_tier_budget_lru_and_pins() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=16 * 3 + 5, block_bytes=16))
    assert host.config.num_slots == 3
    assert host.put_many(["a", "b", "c"], _blocks(3, 10)).evicted == []
    assert host.stats().used_bytes == 48
    got = host.get_many(["a"])[0]  # touch a: b is now least recent
    assert got is not None and int(got[0]) == 10
    result = host.put_many(["d"], _blocks(1, 50))
    assert result.evicted == ["b"]
    assert host.get_many(["b", "d"])[0] is None
    host.pin(["c"])
    assert host.put_many(["e"], _blocks(1, 60)).evicted == ["a"]  # c is pinned, a goes
    with pytest.raises(CapacityError):
        host.put_many(["f", "g", "h"], _blocks(3, 70))
    assert "c" in host and "d" in host and "e" in host  # the failed put changed nothing
    host.unpin(["c"])
    with pytest.raises(ValueError, match="without a matching pin"):
        host.unpin(["c"])
    stats = host.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (2, 1, 2)


def test_host_tier_refresh_does_not_duplicate() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=32, block_bytes=16))
    host.put_many(["a", "b"], _blocks(2, 1))
    host.put_many(["a"], _blocks(1, 99))  # already present: refreshed, not rewritten
    got = host.get_many(["a"])[0]
    assert got is not None and int(got[0]) == 1
    assert len(host) == 2 and host.discard(["a", "zz"]) == 1 and len(host) == 1


def test_host_tier_rejects_wrong_block_shape() -> None:
    host = HostTier(HostTierConfig(capacity_bytes=32, block_bytes=16))
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        host.put_many(["a"], torch.zeros((1, 8), dtype=torch.uint8))
