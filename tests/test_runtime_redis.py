"""The runtime with a real Redis tier: warm restarts reuse what another runtime stored, lossy
pages never answer an exact session, and a dead Redis only costs reuse, never a turn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from model_fixtures import tiny, tiny_dir, tiny_engine  # noqa: F401
from redis_servers import RedisServer

from kvruntime.config import RuntimeConfig
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.runtime import Runtime

SYSTEM = "You are a careful agent. Tools: search(query), read(path), write(path, text). " * 2
MSGS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "list the files"}]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer()
    yield s
    s.close()


def runtime(engine: TransformersEngine, model: LoadedModel, **fields: Any) -> Runtime:
    fields.setdefault("page_size", 4)
    fields.setdefault("prefill_tokens_per_s", 1000.0)
    fields.setdefault("host_bytes_per_s", 1e9)
    fields.setdefault("redis_bytes_per_s", 1e9)
    return Runtime(engine, model.tokenizer, RuntimeConfig(**fields))


def test_a_new_runtime_reuses_what_another_stored_in_redis(
    server: RedisServer,
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
) -> None:
    with runtime(tiny_engine, tiny, reuse=False) as base:
        want = base.session().chat(MSGS, max_tokens=6).token_ids
    with runtime(tiny_engine, tiny, redis_url=server.url, redis_codec="none") as first:
        first.session().chat(MSGS, max_tokens=6)
        assert first.cache.flush(10)
        assert first.tier_usage()["redis"]["puts"] > 0
    with runtime(tiny_engine, tiny, redis_url=server.url, redis_codec="none") as second:
        r = second.session().chat(MSGS, max_tokens=6)
        assert r.token_ids == want
        assert r.usage.cached_tokens_by_tier["redis"] >= 150
        assert r.usage.cached_tokens == r.usage.cached_tokens_by_tier["redis"]
        # the restored pages are now on the device for the next turn
        again = second.session().chat(MSGS, max_tokens=6)
        assert again.usage.cached_tokens_by_tier["device"] == r.usage.cached_tokens


def test_lossy_redis_pages_never_serve_an_exact_session(
    server: RedisServer,
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
) -> None:
    with runtime(tiny_engine, tiny, reuse=False) as base:
        want = base.session().chat(MSGS, max_tokens=6).token_ids
    fields = dict(redis_url=server.url, redis_codec="int8", host_kv_bytes=0)
    with runtime(tiny_engine, tiny, **fields) as first:
        first.session().chat(MSGS, max_tokens=6)
        assert first.cache.flush(10)
    with runtime(tiny_engine, tiny, **fields) as second:
        approx = second.session().chat(MSGS, max_tokens=6)
        assert approx.usage.cached_tokens_by_tier["redis"] >= 150
        second.cache.flush(10)
        exact = second.session(exact=True).chat(MSGS, max_tokens=6)
        assert exact.usage.cached_tokens == 0  # nothing exact is cached anywhere
        assert exact.token_ids == want
        assert second.session(exact=True).chat(MSGS, max_tokens=6).usage.cached_tokens > 0
    keys = server.client().keys("*")
    assert any(b":int8:approx:" in k for k in keys) and any(b":int8:exact:" in k for k in keys)


def test_dead_redis_costs_reuse_not_turns(
    server: RedisServer,
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
) -> None:
    with runtime(tiny_engine, tiny, reuse=False) as base:
        want = base.session().chat(MSGS, max_tokens=6).token_ids
    with runtime(tiny_engine, tiny, redis_url=server.url, host_kv_bytes=0) as rt:
        server.kill()
        s = rt.session()
        assert s.chat(MSGS, max_tokens=6).token_ids == want
        rt.cache.flush(10)
        assert rt.tier_usage()["redis"]["errors"]
        assert s.chat(MSGS, max_tokens=6).token_ids == want


def test_a_tier_slower_than_recompute_is_not_used(
    server: RedisServer,
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
) -> None:
    fields = dict(redis_url=server.url, redis_codec="none", host_kv_bytes=0)
    with runtime(tiny_engine, tiny, **fields) as first:
        first.session().chat(MSGS, max_tokens=2)
        assert first.cache.flush(10)
    # 1 KB/s: restoring ~200 pages from Redis would take minutes, recomputing milliseconds
    with runtime(tiny_engine, tiny, redis_bytes_per_s=1e3, **fields) as slow:
        r = slow.session().chat(MSGS, max_tokens=2)
        assert r.usage.cached_tokens == 0
        decisions = slow.analytics.records()[-1].decisions
        assert [d["tier"] for d in decisions] == ["redis"]
        assert decisions[0]["action"] == "recompute"
        assert decisions[0]["restore_s"] > decisions[0]["recompute_s"]


def test_calibration_measures_prefill_and_host_rates(
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
) -> None:
    with Runtime(tiny_engine, tiny.tokenizer, RuntimeConfig(page_size=4)) as rt:
        assert rt.cost.prefill_tokens_per_s > 10
        assert rt.cost.tiers["host"].bytes_per_s > 1e6
        r = rt.session().chat(MSGS, max_tokens=1)
        assert r.usage.prompt_tokens > 0
