"""Contract tests: kvruntime as SGLang's HiCache storage backend, against a real Redis.

The backend is loaded through SGLang's own ``dynamic`` loader and subclasses SGLang's real
``HiCacheStorage`` (SGLang 0.5.23 installed with --no-deps). It is driven as SGLang's cache
controller drives it: batches of at most 128 page keys (SGLang's chained sha256 page hashes),
``batch_exists`` before prefetch, the generic path (flat pages from ``get_data_page``, dummy
pages for reads) and the zero-copy v1 path (host-pool indices).

The host pools here lay out their tensors exactly as SGLang's MHATokenToKVPoolHost and
MLATokenToKVPoolHost do (init_kv_buffer, get_data_page, set_from_flat_data_page): the real
classes need SGLang's CUDA-side modules to import, which a CPU machine cannot load. Pages are
checked through ``token_kv``, which reads one token's K/V by SGLang's layout definition, so the
check does not share the backend's permutation code.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from redis_servers import RedisServer
from sglang.srt.mem_cache.hicache_storage import (
    STORAGE_BATCH_SIZE,
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)
from sglang.srt.mem_cache.storage import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_storage_hash_str

from kvruntime.errors import ConfigError, UnknownName
from kvruntime.kernels.layout import PageLayout
from kvruntime.sglang_backend import KVRuntimeHiCacheStorage, SGLangStorageConfig, shard_text
from kvruntime.sglang_layout import HostPageFormat
from kvruntime.store.codec import get_codec

LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
L, H, D, P = 2, 2, 16, 4  # layers, kv heads (this rank), head_dim, tokens per page


class MHAHostPool:
    """SGLang's MHA host pool storage (MHATokenToKVPoolHost, 0.5.23) on CPU, unpinned."""

    def __init__(self, layout: str, pages: int, seed: int | None = None) -> None:
        self.layout, self.page_size, self.page_num, self.size = layout, P, pages, pages * P
        self.layer_num, self.head_num, self.head_dim, self.v_head_dim = L, H, D, D
        self.dtype = torch.bfloat16
        dims = {
            "layer_first": (2, L, self.size, H, D),
            "page_first": (2, self.size, L, H, D),
            "page_first_direct": (2, pages, L, P, H, D),
            "page_head": (2, pages, H, P, L, D),
        }[layout]
        self.kv_buffer = torch.zeros(dims, dtype=self.dtype)
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            self.kv_buffer.copy_(torch.randn(dims, generator=gen) * 2)
        self._next = 0

    def alloc(self, tokens: int) -> torch.Tensor:
        out = torch.arange(self._next, self._next + tokens, dtype=torch.int64)
        self._next += tokens
        return out

    def _page(self, index: int) -> tuple[slice, ...]:
        if self.layout == "layer_first":
            return (slice(None), slice(None), slice(index, index + P))
        if self.layout == "page_first":
            return (slice(None), slice(index, index + P))
        return (slice(None), slice(index // P, index // P + 1))

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[self._page(int(index))]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((2, L, P, H, D), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        page = self._page(int(index))
        self.kv_buffer[page] = data_page.reshape(self.kv_buffer[page].shape)


class MLAHostPool:
    """SGLang's MLA host pool storage (MLATokenToKVPoolHost): one latent row per token."""

    def __init__(self, layout: str, pages: int, seed: int | None = None, dim: int = 24) -> None:
        self.layout, self.page_size, self.size, self.layer_num = layout, P, pages * P, L
        self.kv_cache_dim, self.dtype = dim, torch.bfloat16
        dims = (L, self.size, 1, dim) if layout == "layer_first" else (self.size, L, 1, dim)
        self.kv_buffer = torch.zeros(dims, dtype=self.dtype)
        if seed is not None:
            self.kv_buffer.copy_(torch.randn(dims, generator=torch.Generator().manual_seed(seed)))

    def _page(self, index: int) -> tuple[slice, ...]:
        if self.layout == "layer_first":
            return (slice(None), slice(index, index + P))
        return (slice(index, index + P),)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[self._page(int(index))]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((L, P, 1, self.kv_cache_dim), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        page = self._page(int(index))
        self.kv_buffer[page] = data_page.reshape(self.kv_buffer[page].shape)


Pool = MHAHostPool | MLAHostPool


def token_kv(pool: MHAHostPool, t: int) -> torch.Tensor:
    """K and V of token slot ``t``, [2, L, H, D], read by SGLang's layout definition."""
    b = pool.kv_buffer
    rows = []
    for kv in range(2):
        for layer in range(L):
            if pool.layout == "layer_first":
                rows.append(b[kv, layer, t])
            elif pool.layout == "page_first":
                rows.append(b[kv, t, layer])
            elif pool.layout == "page_first_direct":
                rows.append(b[kv, t // P, layer, t % P])
            else:
                rows.append(b[kv, t // P, :, t % P, layer])
    return torch.stack(rows).view(2, L, H, D)


def tokens_kv(pool: MHAHostPool, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([token_kv(pool, int(t)) for t in slots])  # [T, 2, L, H, D]


# ---- the cache controller's calls (sglang/srt/managers/cache_controller.py) ----------------


def page_hashes(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n * P,), generator=gen).tolist()
    return get_storage_hash_str(tokens, None, page_size=P)


def backup(
    backend: HiCacheStorage, pool: Pool, hashes: list[str], host_indices: torch.Tensor,
    zero_copy: bool,
) -> int:  # fmt: skip
    """_page_backup with _page_set_zero_copy or _generic_page_set: pages written."""
    for i in range(0, len(hashes), STORAGE_BATCH_SIZE):
        batch = hashes[i : i + STORAGE_BATCH_SIZE]
        idx = host_indices[i * P : (i + len(batch)) * P]
        if zero_copy:
            ok = all(backend.batch_set_v1(batch, idx, HiCacheStorageExtraInfo()))
        else:
            data = [pool.get_data_page(idx[j * P]) for j in range(len(batch))]
            ok = backend.batch_set(batch, data)
        if not ok:
            return i
    return len(hashes)


def hit_query(backend: HiCacheStorage, hashes: list[str]) -> int:
    """_storage_hit_query: pages found, batch by batch, stopping at the first short batch."""
    found = 0
    for start in range(0, len(hashes), STORAGE_BATCH_SIZE):
        batch = hashes[start : start + STORAGE_BATCH_SIZE]
        hit = backend.batch_exists(batch, HiCacheStorageExtraInfo(prefix_keys=hashes[:start]))
        found += hit
        if hit < len(batch):
            break
    return found


def prefetch(
    backend: HiCacheStorage, pool: Pool, hashes: list[str], host_indices: torch.Tensor,
    zero_copy: bool,
) -> int:  # fmt: skip
    """_page_transfer with _page_get_zero_copy or _generic_page_get: leading pages loaded."""
    done = 0
    for i in range(0, len(hashes), STORAGE_BATCH_SIZE):
        batch = hashes[i : i + STORAGE_BATCH_SIZE]
        idx = host_indices[i * P : (i + len(batch)) * P]
        count = 0
        if zero_copy:
            for ok in backend.batch_get_v1(batch, idx, HiCacheStorageExtraInfo()):
                if not ok:
                    break
                count += 1
        else:
            data = backend.batch_get(batch, [pool.get_dummy_flat_data_page() for _ in batch])
            for j in range(len(batch)):
                if data[j] is None:
                    break
                pool.set_from_flat_data_page(idx[j * P], data[j])
                count += 1
        done += count
        if count < len(batch):
            break
    return done


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def url(server: RedisServer) -> str:
    with server.client() as c:
        c.flushall()
    return server.url


def storage_config(
    url: str, model: str | None = "org/model-8b", tp: tuple[int, int] = (0, 1),
    mla: bool = False, **extra: object,
) -> HiCacheStorageConfig:  # fmt: skip
    return HiCacheStorageConfig(
        tp_rank=tp[0], tp_size=tp[1], pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=True, is_page_first_layout=False,
        model_name=model,
        extra_config={"backend_name": "kvruntime", "module_path": "kvruntime.sglang_backend",
                      "class_name": "KVRuntimeHiCacheStorage", "interface_v1": 1,
                      "redis_url": url, **extra},
    )  # fmt: skip


def attach(pool: Pool, url: str, **kw: Any) -> KVRuntimeHiCacheStorage:
    """What SGLang's attach_storage_backend does for a dynamic backend."""
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(url, **kw), pool)
    backend.register_mem_pool_host(pool)
    assert isinstance(backend, KVRuntimeHiCacheStorage)
    return backend


# ---- tests ---------------------------------------------------------------------------------


def test_dynamic_loader_builds_a_real_hicache_storage(url: str) -> None:
    assert issubclass(KVRuntimeHiCacheStorage, HiCacheStorage)
    backend = StorageBackendFactory.create_backend(
        "dynamic", storage_config(url, codec="int8", ttl_s=60.0), None
    )
    assert isinstance(backend, KVRuntimeHiCacheStorage)
    assert (backend.config.redis_url, backend.config.codec, backend.config.ttl_s) == (
        url, "int8", 60.0,
    )  # fmt: skip
    assert backend.namespace.model == "org/model-8b"
    backend.close()


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_pages_move_between_every_layout_on_both_paths(url: str, codec: str) -> None:
    n = 5
    hashes = {w: page_hashes(n, seed=i) for i, w in enumerate(LAYOUTS)}
    sources = {}
    for i, writer in enumerate(LAYOUTS):
        pool = MHAHostPool(writer, pages=n + 2, seed=i)
        pool.alloc(P)  # page 0 stays unused, so stored pages do not start at slot 0
        slots = pool.alloc(n * P)
        backend = attach(pool, url, codec=codec)
        assert backup(backend, pool, hashes[writer], slots, zero_copy=i % 2 == 0) == n
        sources[writer] = tokens_kv(pool, slots)
        backend.close()
    bound = get_codec(codec).error_bound
    for reader in LAYOUTS:
        for zero_copy in (True, False):
            pool = MHAHostPool(reader, pages=n + 1)
            backend = attach(pool, url, codec=codec)
            for writer in LAYOUTS:
                # pages land in reverse order, tokens in order within each page
                slots = torch.arange(P, (n + 1) * P).flip(0).view(n, P).flip(1).reshape(-1)
                pool.kv_buffer.zero_()
                assert hit_query(backend, hashes[writer]) == n
                assert prefetch(backend, pool, hashes[writer], slots, zero_copy) == n
                got, want = tokens_kv(pool, slots), sources[writer]
                what = f"{writer} -> {reader} zero_copy={zero_copy} codec={codec}"
                if codec == "none":
                    assert torch.equal(got, want), what
                else:
                    pages = want.view(n, P, 2, L, H, D).permute(0, 3, 2, 4, 1, 5)
                    err = (got.float() - want.float()).abs()  # [T, 2, L, H, D]
                    limit = bound(pages.contiguous()).permute(0, 4, 2, 1, 3, 5).reshape(err.shape)
                    assert bool((err <= limit).all()), what
                    assert not torch.equal(got, want), f"{what}: int8 should not be exact"
            backend.close()


def test_batches_of_128_and_a_miss_in_the_middle(url: str, server: RedisServer) -> None:
    n = 300  # three controller batches: 128, 128, 44
    pool = MHAHostPool("page_first", pages=n, seed=7)
    backend = attach(pool, url)
    hashes = page_hashes(n, seed=3)
    slots = pool.alloc(n * P)
    assert backup(backend, pool, hashes, slots, zero_copy=True) == n
    assert hit_query(backend, hashes) == n
    assert backend.batch_exists(hashes[:STORAGE_BATCH_SIZE]) == STORAGE_BATCH_SIZE
    with server.client() as c:
        assert c.delete(f"kvr:{backend.storage_key(hashes[200])}") == 1
    assert hit_query(backend, hashes) == 200
    assert backend.batch_exists(hashes[128:256]) == 72
    assert not backend.exists(hashes[200]) and backend.exists(hashes[201])
    reader = MHAHostPool("layer_first", pages=n)
    into = attach(reader, url)
    results = into.batch_get_v1(hashes[128:256], slots[128 * P : 256 * P])
    assert results == [True] * 72 + [False] + [True] * 55
    assert prefetch(into, reader, hashes, slots, zero_copy=True) == 200
    assert torch.equal(tokens_kv(reader, slots[: 200 * P]), tokens_kv(pool, slots[: 200 * P]))
    stats = into.stats()
    assert (stats.hits, stats.misses, stats.corrupt) == (127 + 128 + 127, 1 + 1, 0)


def test_ranks_models_and_codecs_never_collide(url: str) -> None:
    hashes = page_hashes(3, seed=11)
    shards = [
        {"model": "org/a", "tp": (0, 2)},
        {"model": "org/a", "tp": (1, 2)},
        {"model": "org/b", "tp": (0, 2)},
        {"model": "org/a", "tp": (0, 1)},
        {"model": "org/a", "tp": (0, 2), "codec": "int8"},
        {"model": "org/a", "tp": (0, 2), "tenant": "other"},
    ]
    pools, backends = [], []
    for i, shard in enumerate(shards):
        pool = MHAHostPool("page_first", pages=3, seed=100 + i)
        backends.append(attach(pool, url, **shard))
        pools.append(pool)
        assert backup(backends[-1], pool, hashes, pool.alloc(3 * P), zero_copy=True) == 3
    assert len({b.storage_key(hashes[0]) for b in backends}) == len(shards)
    for pool, shard in zip(pools, shards, strict=True):
        copy = MHAHostPool("page_first", pages=3)
        reader = attach(copy, url, **shard)  # the same shard on another instance
        assert prefetch(reader, copy, hashes, torch.arange(3 * P), zero_copy=True) == 3
        assert torch.equal(copy.kv_buffer, pool.kv_buffer) or reader.codec.name == "int8"
        assert (copy.kv_buffer - pool.kv_buffer).abs().max() < 0.15  # not another's page
    assert hit_query(attach(MHAHostPool("page_first", 3), url, model="org/c"), hashes) == 0
    # a 128-head-dim pool of the same model is another page geometry: no hits either
    other = MHAHostPool("page_first", pages=3)
    other.kv_buffer = torch.zeros((2, 3 * P, L, H, 2 * D), dtype=torch.bfloat16)
    other.head_dim = other.v_head_dim = 2 * D
    lookalike = MHAHostPool("page_first", pages=3)
    lookalike.head_num = 1  # attributes that do not match its buffer: not read as MHA pages
    assert HostPageFormat.of_pool(lookalike) is None
    assert hit_query(attach(other, url, model="org/a", tp=(0, 2)), hashes) == 0


def test_mla_pages_are_raw_and_shared_by_tp_ranks(url: str) -> None:
    hashes = page_hashes(4, seed=5)
    src = MLAHostPool("page_first", pages=4, seed=1)
    assert HostPageFormat.of_pool(src) is None  # not an MHA pool: raw pages
    rank0 = attach(src, url, mla=True, tp=(0, 2), codec="int8")
    assert rank0.namespace.layout.startswith("raw-MLAHostPool.page_first-bfloat16")
    assert backup(rank0, src, hashes, torch.arange(4 * P), zero_copy=True) == 4
    for layout, zero_copy in (("page_first", False), ("page_first", True)):
        dst = MLAHostPool(layout, pages=4)
        rank1 = attach(dst, url, mla=True, tp=(1, 2), codec="int8")
        assert rank1.storage_key(hashes[0]) == rank0.storage_key(hashes[0])
        assert prefetch(rank1, dst, hashes, torch.arange(4 * P), zero_copy) == 4
        assert torch.equal(dst.kv_buffer, src.kv_buffer)
    # another host layout stores other bytes: its own namespace
    other = attach(MLAHostPool("layer_first", pages=4), url, mla=True, codec="int8")
    assert hit_query(other, hashes) == 0


def test_corrupt_values_are_misses(url: str, server: RedisServer) -> None:
    pool = MHAHostPool("page_head", pages=4, seed=2)
    backend = attach(pool, url, codec="int8")
    hashes = page_hashes(4, seed=9)
    assert backup(backend, pool, hashes, torch.arange(4 * P), zero_copy=True) == 4
    keys = [f"kvr:{backend.storage_key(h)}" for h in hashes]
    with server.client() as c:
        value = bytearray(c.get(keys[1]))
        value[-7] ^= 0x10  # a bit flip in the payload
        c.set(keys[1], bytes(value))
        c.set(keys[2], c.get(keys[2])[:-100])  # truncated
        c.set(keys[3], b"not a kvruntime page")
    dst = MHAHostPool("page_head", pages=4)
    dst.kv_buffer.fill_(3.0)
    reader = attach(dst, url, codec="int8")
    assert reader.batch_exists(hashes) == 4  # present: only reading verifies
    assert reader.batch_get_v1(hashes, torch.arange(4 * P)) == [True, False, False, False]
    assert bool((dst.kv_buffer[:, 1:] == 3.0).all()), "a rejected page must not be written"
    assert (dst.kv_buffer[:, 0] - pool.kv_buffer[:, 0]).abs().max() < 0.15
    assert reader.batch_get(hashes, None)[1:] == [None, None, None]
    assert reader.stats().corrupt == 6 and reader.stats().hits == 2


def test_redis_down_is_misses_and_failed_writes() -> None:
    server = RedisServer()
    try:
        pool = MHAHostPool("page_first", pages=2, seed=4)
        backend = attach(pool, server.url, connect_timeout_s=0.2, op_timeout_s=0.5)
        hashes = page_hashes(2, seed=1)
        assert backup(backend, pool, hashes, torch.arange(2 * P), zero_copy=True) == 2
        server.kill()
        assert backend.batch_exists(hashes) == 0
        assert not backend.exists(hashes[0])
        assert backend.batch_get_v1(hashes, torch.arange(2 * P)) == [False, False]
        assert backend.batch_get(hashes, None) == [None, None]
        assert backend.get(hashes[0]) is None
        assert backend.batch_set_v1(page_hashes(2, 2), torch.arange(2 * P)) == [False] * 2
        assert not backend.batch_set(hashes, [pool.get_data_page(0), pool.get_data_page(P)])
        stats = backend.stats()
        assert stats.failed_puts == 4 and stats.misses == 5 and stats.redis.errors
        backend.close()
    finally:
        server.close()


def test_plain_paths_before_a_pool_is_registered(url: str) -> None:
    backend = KVRuntimeHiCacheStorage(storage_config(url), {"tenant": "plain"})
    value = torch.randn(3, 5).to(torch.float16)
    assert backend.set("k1", value) and backend.exists("k1") and not backend.exists("k2")
    got = backend.get("k1")
    assert got is not None and got.dtype == torch.float16 and torch.equal(got, value)
    target = torch.zeros(15, dtype=torch.float16)
    assert backend.get("k1", target) is target and torch.equal(target.view(3, 5), value)
    assert backend.get("k1", torch.zeros(16, dtype=torch.float16)) is None  # does not fit
    assert backend.get("k2") is None and not backend.set("k3", None)
    assert backend.batch_set(["a", "b"], [value, value * 2])
    assert backend.batch_exists(["a", "b", "c", "a"]) == 2
    assert backend.batch_get_v1(["a"], torch.arange(P)) == [False]  # no pool yet
    backend.close()


def test_writes_skip_pages_redis_holds_and_keep_a_ttl(url: str, server: RedisServer) -> None:
    pool = MHAHostPool("layer_first", pages=4, seed=8)
    backend = attach(pool, url, ttl_s=120.0)
    hashes = page_hashes(4, seed=21)
    assert backend.batch_set_v1(hashes[:2], torch.arange(2 * P)) == [True, True]
    assert backend.batch_set_v1(hashes, torch.arange(4 * P)) == [True] * 4
    assert not backend.batch_set(hashes[:1], [torch.zeros(7, dtype=torch.bfloat16)])
    stats = backend.stats()
    assert (stats.puts, stats.skipped, stats.failed_puts) == (4, 2, 0)
    with server.client() as c:
        assert 0 < c.pttl(f"kvr:{backend.storage_key(hashes[3])}") <= 120_000
    assert stats.bytes_out > 4 * PageLayout(L, H, D, P).page_nbytes


def window(backend: KVRuntimeHiCacheStorage) -> tuple[list, ...]:
    w = backend.get_stats()  # SGLang's StorageMetrics in a server, a TransferWindow here
    return (w.prefetch_pgs, w.backup_pgs, w.prefetch_bandwidth, w.backup_bandwidth)


def test_int8_stores_fewer_bytes_and_get_stats_reports_each_call(url: str) -> None:
    pool = MHAHostPool("page_first_direct", pages=8, seed=6)
    exact = attach(pool, url)
    small = attach(pool, url, codec="int8")
    hashes = page_hashes(8, seed=4)
    for backend in (exact, small):
        assert window(backend) == ([], [], [], [])
        assert backup(backend, pool, hashes, torch.arange(8 * P), zero_copy=True) == 8
        assert prefetch(backend, pool, hashes, torch.arange(8 * P), zero_copy=True) == 8
        pgs_in, pgs_out, bw_in, bw_out = window(backend)
        assert (pgs_in, pgs_out) == ([8], [8]) and min(bw_in + bw_out) > 0
        assert window(backend) == ([], [], [], [])
    layout = PageLayout(L, H, D, P)
    saved = get_codec("none").page_nbytes(layout) - get_codec("int8").page_nbytes(layout)
    assert exact.stats().bytes_out - small.stats().bytes_out > 8 * (saved - 16)
    assert small.stats().bytes_in == small.stats().bytes_out


def test_config_from_extra_config(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = SGLangStorageConfig.from_extra_config(
            {"backend_name": "x", "interface_v1": 1, "redis_url": url, "codek": "int8"}
        )
    assert cfg.redis_url == url and cfg.codec == "none"
    assert "codek" in caplog.text
    with pytest.raises(UnknownName, match="int8"):
        SGLangStorageConfig(codec="int9")
    with pytest.raises(ConfigError):
        SGLangStorageConfig(redis_url="http://nowhere")
    with pytest.raises(ConfigError):
        SGLangStorageConfig.from_extra_config({"skip_existing": "false"})
    with pytest.raises(ConfigError):
        SGLangStorageConfig.from_extra_config({"ttl_s": "1h"})
    assert shard_text(storage_config(url, tp=(3, 4))) == "tp3of4"
    config = storage_config(url, mla=True, tp=(1, 4))
    assert shard_text(config) == "tp-all"
    config.pp_size, config.pp_rank = 2, 1
    assert shard_text(config) == "tp-all-pp1of2"


def test_import_kvruntime_needs_no_sglang() -> None:
    code = (
        "import sys; sys.modules['sglang'] = None\n"
        "import kvruntime, kvruntime.sglang_layout, kvruntime.store.redis_tier\n"
        "try:\n    import kvruntime.sglang_backend\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "kvruntime[sglang]" in out.stdout
