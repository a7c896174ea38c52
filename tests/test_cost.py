from __future__ import annotations

import pytest

from kvruntime.cost import CostModel, TierCost
from kvruntime.errors import ConfigError


def test_rehydrate_only_when_faster_than_prefill() -> None:
    model = CostModel(
        prefill_tokens_per_s=1000.0,
        tiers={"host": TierCost(1e9), "redis": TierCost(1e6, latency_s=0.01)},
    )
    host = model.decide("host", tokens=500, nbytes=10_000_000)  # 10 ms vs 500 ms
    assert host.rehydrate and host.restore_s == pytest.approx(0.01)
    redis = model.decide("redis", tokens=500, nbytes=10_000_000)  # 10 s vs 0.5 s
    assert not redis.rehydrate and redis.as_dict()["action"] == "recompute"
    assert not model.decide("redis", tokens=0, nbytes=0).rehydrate
    assert not model.decide("host", tokens=100, nbytes=1, min_tokens=256).rehydrate
    assert not model.decide("disk", tokens=100, nbytes=1).rehydrate  # unknown tier: never


def test_bad_costs_refused() -> None:
    with pytest.raises(ConfigError):
        TierCost(0.0)
    with pytest.raises(ConfigError):
        CostModel(prefill_tokens_per_s=0.0, tiers={})
