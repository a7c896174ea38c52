"""Tenant isolation: a tenant can neither read nor probe another tenant's prefixes.

Each tenant's page hashes start from a namespace digest that includes a per-tenant salt,
``blake2b(tenant, key=RuntimeConfig.tenant_salt)`` (``kvruntime.kvcache.tenant_salt``): other
tenants' keys are other keys, the keys in Redis do not name the tenant, and without the
deployment secret nobody can compute them. A lookup of another tenant's prompt must run
exactly the code path of a prompt nobody sent: same Redis commands, no hit, nothing moved.
Asserted on counters (Redis' own command statistics, the tier's, the turn's record), never
on wall time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from model_fixtures import tiny, tiny_dir, tiny_engine  # noqa: F401
from redis_servers import RedisServer

from kvruntime.analytics import TurnRecord
from kvruntime.config import RuntimeConfig
from kvruntime.engines.chat import render
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.errors import BadRequest
from kvruntime.lookup import tenant_salt
from kvruntime.radix import Namespace, page_hashes, storage_key
from kvruntime.runtime import Runtime

PAGE = 4
FIXED = dict(
    page_size=PAGE, prefill_tokens_per_s=1000.0, host_bytes_per_s=1e9, redis_bytes_per_s=1e9
)
SYSTEM = "You are the billing agent of acme-corp. Tools: invoice(id), refund(id, amount)."
SECRET_PROMPT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Refund order 4471 for Jane Roe, card ending 9921."},
]
# the same length in tokens (the tokenizer is per character), sent by nobody before, and
# sharing not even its first page with SECRET_PROMPT ("user" is two characters shorter)
NOVEL_PROMPT = [
    {"role": "user", "content": "".join(chr(97 + i % 26) for i in range(len(SYSTEM) + 2))},
    {"role": "user", "content": "z" * len(SECRET_PROMPT[1]["content"])},
]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer()
    yield s
    s.close()


@pytest.fixture
def make(tiny_engine: TransformersEngine, tiny: LoadedModel) -> Iterator[Any]:  # noqa: F811
    made: list[Runtime] = []

    def build(**fields: Any) -> Runtime:
        fields = {"redis_codec": "none", **FIXED, **fields}
        rt = Runtime(tiny_engine, tiny.tokenizer, RuntimeConfig(**fields))
        made.append(rt)
        return rt

    yield build
    for rt in made:
        rt.close()


def command_calls(server: RedisServer) -> dict[str, int]:
    """Redis' own count of each command it ran (INFO commandstats), minus INFO itself."""
    stats = server.client().info("commandstats")
    return {k: int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",)}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def miss_shape(record: TurnRecord) -> tuple[Any, ...]:
    """What a turn's record shows of its lookup, and nothing that is its own output."""
    return (
        record.prompt_tokens,
        record.cached_tokens_by_tier,
        record.computed_tokens,
        record.decisions,
        record.bytes_moved,
    )


def test_the_control_prompt_is_as_long_as_the_secret_one(tiny: LoadedModel) -> None:  # noqa: F811
    secret = render(tiny.tokenizer, SECRET_PROMPT, None)
    novel = render(tiny.tokenizer, NOVEL_PROMPT, None)
    assert len(secret) == len(novel) and secret[:PAGE] != novel[:PAGE]


def test_tenant_salts_are_keyed_per_tenant_and_per_secret() -> None:
    salts = {tenant_salt(s, t) for s in (b"", b"k1", b"k2", b"x" * 100) for t in ("a", "b", "")}
    assert len(salts) == 12 and all(len(s) == 16 for s in salts)
    assert tenant_salt(b"k1", "a") == tenant_salt(b"k1", "a")  # every process agrees
    assert tenant_salt(b"x" * 100, "a") != tenant_salt(b"x" * 101, "a")  # long secrets count
    with pytest.raises(BadRequest, match="tenant"):
        tenant_salt(b"k1", 7)  # type: ignore[arg-type]


def test_a_tenant_never_reads_another_tenants_prefix_on_device_or_host(make: Any) -> None:
    page = make(reuse=False).layout.page_nbytes
    rt = make(device_kv_bytes=20 * page, host_kv_bytes=400 * page)  # spills to the host
    owner = rt.session(tenant="acme")
    owner.chat(SECRET_PROMPT, max_tokens=2)
    rt.cache.flush(10)
    assert owner.chat(SECRET_PROMPT, max_tokens=2).usage.cached_tokens > 0  # it is cached
    intruder = rt.session(tenant="globex")
    probe = intruder.chat(SECRET_PROMPT, max_tokens=2)
    probe_record = rt.analytics.records()[-1]
    control = rt.session(tenant="globex").chat(NOVEL_PROMPT, max_tokens=2)
    control_record = rt.analytics.records()[-1]
    assert probe.usage.cached_tokens == control.usage.cached_tokens == 0
    assert miss_shape(probe_record) == miss_shape(control_record)
    # the tree kept them apart: one namespace root per tenant, nothing shared below
    tokens = render(rt.tokenizer, SECRET_PROMPT, None)
    for tenant in ("acme", "globex"):
        found = rt.cache.lookup(tokens, tenant)
        rt.cache.release(found)
        assert found.match.num_pages == (len(tokens)) // PAGE  # each has its own copy now
    assert rt.cache.namespace("acme").digest != rt.cache.namespace("globex").digest
    rt.cache.tree.check_integrity()


def test_probing_another_tenants_prefix_in_redis_is_exactly_a_miss(
    make: Any, server: RedisServer
) -> None:
    """Another process served tenant acme; a fresh runtime gets globex's lookup of acme's
    prompt. Redis must see the same commands as for a prompt nobody sent, nothing is read,
    and the turn's record is that of a miss. acme's own lookup then hits (the control)."""
    with make(redis_url=server.url) as writer:
        writer.session(tenant="acme").chat(SECRET_PROMPT, max_tokens=2)
        assert writer.cache.flush(10)
        assert writer.tier_usage()["redis"]["puts"] > 0
    rt = make(redis_url=server.url)
    before = command_calls(server)
    rt.session(tenant="globex").chat(SECRET_PROMPT, max_tokens=2)
    probe = rt.analytics.records()[-1]
    assert rt.cache.flush(10)  # globex's own pages written back: part of both turns
    mid = command_calls(server)
    rt.session(tenant="globex").chat(NOVEL_PROMPT, max_tokens=2)
    control = rt.analytics.records()[-1]
    assert rt.cache.flush(10)
    after = command_calls(server)
    assert miss_shape(probe) == miss_shape(control)
    assert probe.cached_tokens == 0 and sum(probe.bytes_moved.values()) == 0
    # the same commands, as many of each: no GET anywhere, the write-back of globex's own
    # pages the same for both
    assert delta(mid, before) == delta(after, mid)
    assert "cmdstat_get" not in delta(after, before)
    assert rt.stats().tiers["redis"]["hits"] == 0
    assert rt.stats().tiers["redis"]["bytes_in"] == 0
    hit = rt.session(tenant="acme").chat(SECRET_PROMPT, max_tokens=2)
    assert hit.usage.cached_tokens_by_tier["redis"] > 0  # the keys were there all along
    assert rt.stats().tiers["redis"]["hits"] > 0
    assert "cmdstat_get" in delta(command_calls(server), after)  # a hit does read


def test_redis_keys_name_no_tenant_and_need_the_secret(make: Any, server: RedisServer) -> None:
    tokens = None
    with make(redis_url=server.url, tenant_salt=b"deployment secret") as writer:
        writer.session(tenant="acme-corp").chat(SECRET_PROMPT, max_tokens=2)
        assert writer.cache.flush(10)
        tokens = render(writer.tokenizer, SECRET_PROMPT, None)
        fingerprint, layout = writer.engine.fingerprint, writer.layout.describe()
    stored = {k.decode() for k in server.client().keys("*")}
    assert stored and not any("acme" in k for k in stored)

    def keys(salt: bytes) -> set[str]:
        ns = Namespace(fingerprint, layout, "acme-corp", salt)
        return {f"kvr:{storage_key(h, 'none', True)}" for h in page_hashes(ns, tokens, PAGE)}

    # computable only with the secret: not from the tenant name alone, nor from the secret
    # used as a shared salt; exactly from the keyed per-tenant salt
    assert not keys(b"") & stored and not keys(b"deployment secret") & stored
    assert keys(tenant_salt(b"deployment secret", "acme-corp")) <= stored
    # another deployment (another secret) over the same Redis: the same tenant name and
    # prompt find nothing
    other = make(redis_url=server.url, tenant_salt=b"another secret")
    r = other.session(tenant="acme-corp").chat(SECRET_PROMPT, max_tokens=2)
    assert r.usage.cached_tokens == 0 and other.stats().tiers["redis"]["hits"] == 0
    # the same secret after a restart: the pages are found again
    again = make(redis_url=server.url, tenant_salt=b"deployment secret")
    r = again.session(tenant="acme-corp").chat(SECRET_PROMPT, max_tokens=2)
    assert r.usage.cached_tokens_by_tier["redis"] >= 0.8 * r.usage.prompt_tokens, r.usage


def test_prefetch_and_pin_stay_inside_the_tenant(make: Any, server: RedisServer) -> None:
    """The side doors (prefetch, pin) look up in the caller's namespace as well."""
    with make(redis_url=server.url) as writer:
        writer.session(tenant="acme").chat(SECRET_PROMPT, max_tokens=2)
        assert writer.cache.flush(10)
    rt = make(redis_url=server.url)
    tokens = render(rt.tokenizer, SECRET_PROMPT, None)
    assert rt.prefetch(tokens, tenant="globex")
    rt.queue.call(lambda _wait: None)  # the prefetch ran before this
    assert rt.stats().tiers["redis"]["hits"] == 0 and rt.cache.pool.num_used == 0
    assert rt.cache.pin(tokens, "globex") is None  # nothing of globex's to pin
    assert rt.prefetch(tokens, tenant="acme")
    rt.queue.call(lambda _wait: None)
    assert rt.stats().tiers["redis"]["hits"] > 0 and rt.cache.pool.num_used > 0
