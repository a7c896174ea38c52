"""RadixTree by example: matching, splitting, locks, per-tier eviction, lineage, integrity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvruntime.errors import BadRequest, ConfigError, UnknownName
from kvruntime.radix import (
    POLICIES,
    Namespace,
    PageLocation,
    RadixConfig,
    RadixTree,
    page_hashes,
)

NS = Namespace("model", "L2-H1-D8-P4-bfloat16", "tenant-a")
OTHER = Namespace("model", "L2-H1-D8-P4-bfloat16", "tenant-b")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make_tree(policy: str = "lru") -> RadixTree:
    return RadixTree(RadixConfig(page_size=4, eviction=policy, namespace=NS), clock=Clock())


def dev(*pages: int) -> list[PageLocation]:
    return [PageLocation(device=p) for p in pages]


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="page_size"):
        RadixConfig(page_size=0)
    with pytest.raises(UnknownName, match="known: fifo, lfu, lru, mru"):
        RadixConfig(eviction="random")
    assert set(POLICIES.names()) >= {"lru", "lfu", "fifo"}
    tree = RadixTree(RadixConfig(page_size=4))
    with pytest.raises(BadRequest, match="no namespace"):
        tree.match([1, 2, 3, 4])


def test_insert_then_match_whole_pages() -> None:
    tree = make_tree()
    tokens = list(range(100, 110))  # 2 whole pages + 2 tokens
    result = tree.insert(tokens, dev(7, 8))
    assert (result.num_existing, result.num_new, result.handle.num_tokens) == (0, 2, 8)
    assert result.page_hashes == page_hashes(NS, tokens, 4)
    hit = tree.match([*tokens, 1, 2, 3])
    assert (hit.cached_tokens, hit.matched_tokens) == (8, 8)
    assert hit.device == (7, 8) and hit.host == (None, None)
    assert [p.index for p in hit.pages] == [0, 1]
    assert hit.page_hashes == result.page_hashes
    assert hit.pages_by_tier() == {"device": 2, "host": 0, "redis": 0}
    assert (tree.num_pages, tree.num_nodes, tree.pages_in("device")) == (2, 1, 2)
    tree.check_integrity()


def test_matched_tokens_may_end_mid_page() -> None:
    tree = make_tree()
    tree.insert(list(range(12)), dev(0, 1, 2))
    diverge_in_node = tree.match([0, 1, 2, 3, 4, 5, 99, 7])
    assert (diverge_in_node.matched_tokens, diverge_in_node.cached_tokens) == (6, 4)
    # siblings under one node: the closest one by content decides, not the first inserted
    tree.insert([0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52, 53], dev(0, 1, 3))
    tree.insert([0, 1, 2, 3, 4, 5, 6, 7, 60, 61, 62, 63], dev(0, 1, 4))
    probe = tree.match([0, 1, 2, 3, 4, 5, 6, 7, 60, 61, 0, 0])
    assert (probe.matched_tokens, probe.cached_tokens) == (10, 8)
    tail = tree.match([0, 1, 2, 3, 4, 5, 6, 7, 50, 51])  # a partial tail page counts too
    assert (tail.matched_tokens, tail.cached_tokens) == (10, 8)
    assert tree.match([9, 9]).matched_tokens == 0
    tree.check_integrity()


def test_path_compression_and_split() -> None:
    tree = make_tree()
    tree.insert(list(range(32)), dev(*range(8)))
    assert tree.num_nodes == 1
    tree.insert(list(range(16)) + [99] * 16, dev(0, 1, 2, 3, 10, 11, 12, 13))
    assert (tree.num_nodes, tree.num_pages) == (3, 12)  # shared 4 pages + two 4-page branches
    hit = tree.match(list(range(8)))  # ends inside the shared node: it splits at page 2
    assert (hit.handle.num_pages, tree.num_nodes) == (2, 4)
    tree.check_integrity()


def test_insert_reports_duplicates_and_fills_missing_tiers() -> None:
    tree = make_tree()
    tokens = list(range(12))
    tree.insert(tokens[:8], [PageLocation(device=0), PageLocation(host=5)])
    again = tree.insert(
        tokens, [PageLocation(device=0), PageLocation(device=9), PageLocation(device=2)]
    )
    assert (again.num_existing, again.num_new) == (2, 1)
    assert again.duplicates == ()  # page 0 same copy; page 1 had no device copy: taken
    assert tree.match(tokens).device == (0, 9, 2)
    third = tree.insert(
        tokens, [PageLocation(device=20), PageLocation(device=9, host=6), PageLocation(device=2)]
    )
    assert [(d.index, d.tier, d.value) for d in third.duplicates] == [
        (0, "device", 20),
        (1, "host", 6),
    ]
    assert tree.match(tokens).host == (None, 5, None)
    tree.check_integrity()


def test_bad_inserts_change_nothing() -> None:
    tree = make_tree()
    with pytest.raises(BadRequest, match="2 whole pages"):
        tree.insert(list(range(8)), dev(0))
    with pytest.raises(BadRequest, match="names no tier"):
        tree.insert(list(range(8)), [PageLocation(device=0), PageLocation()])
    with pytest.raises(BadRequest, match="device location must be int"):
        tree.insert(list(range(4)), [PageLocation(device="x")])
    with pytest.raises(BadRequest, match=">= 0"):
        tree.insert(list(range(4)), [PageLocation(host=-1)])
    assert tree.num_pages == 0
    tree.check_integrity()


def test_tenants_never_share() -> None:
    tree = make_tree()
    tokens = list(range(8))
    tree.insert(tokens, dev(0, 1))
    assert tree.match(tokens, OTHER).cached_tokens == 0
    theirs = tree.insert(tokens, dev(2, 3), OTHER)
    assert theirs.num_existing == 0
    assert tree.match(tokens, OTHER).device == (2, 3)
    assert tree.match(tokens).device == (0, 1)
    assert theirs.page_hashes != tree.match(tokens).page_hashes
    tree.check_integrity()


def test_token_containers() -> None:
    tree = make_tree()
    tree.insert(np.arange(8, dtype=np.int64), dev(0, 1))
    assert tree.match(torch.arange(8)).cached_tokens == 8
    assert tree.match(tuple(range(8))).cached_tokens == 8
    with pytest.raises(BadRequest):
        tree.match([-1, 2, 3, 4])


def test_locked_pages_survive_eviction_and_unlock_checks() -> None:
    tree = make_tree()
    a = tree.insert([1] * 8, dev(0, 1)).handle
    tree.insert([2] * 8, dev(2, 3))
    tree.lock(a)
    assert tree.evictable_pages("device") == 2
    freed = tree.evict("device", 10)
    assert sorted(freed.values) == [2, 3] and freed.num_removed == 2
    assert tree.match([1] * 8).device == (0, 1)
    tree.unlock(a)
    with pytest.raises(BadRequest, match="without a matching lock"):
        tree.unlock(a)
    assert sorted(tree.evict("device", 10).values) == [0, 1]
    with pytest.raises(BadRequest, match="stale"):
        tree.lock(a)
    with pytest.raises(BadRequest, match="not a handle of this tree"):
        make_tree().lock(a)
    tree.check_integrity()


def test_lock_covers_the_prefix_not_the_branches() -> None:
    tree = make_tree()
    tree.insert(list(range(8)) + [5] * 4, dev(0, 1, 2))
    tree.insert(list(range(8)) + [6] * 4, dev(0, 1, 3))
    shared = tree.match(list(range(8))).handle
    tree.lock(shared)
    freed = tree.evict("device", 10)
    assert sorted(freed.values) == [2, 3]  # both branches went, the locked prefix stayed
    assert tree.stats().locked_pages == 2
    tree.unlock(shared)
    tree.check_integrity()


def test_eviction_drops_a_tier_before_removing_pages() -> None:
    tree = make_tree()
    tokens = list(range(12))
    # page 0 on device only, page 1 device + host, page 2 device only
    tree.insert(tokens, [PageLocation(0), PageLocation(1, host=11), PageLocation(2)])
    first = tree.evict("device", 2)
    assert [(p.value, p.removed) for p in first.pages] == [(2, True), (1, False)]
    # page 0 lives only on device but page 1 (host) still depends on it: not evictable
    assert tree.evictable_pages("device") == 0
    assert len(tree.evict("device", 5)) == 0
    assert tree.match(tokens).host == (None, 11)
    freed = tree.evict("host", 5)
    assert [(p.value, p.removed) for p in freed.pages] == [(11, True)]
    assert [(p.value, p.removed) for p in tree.evict("device", 5).pages] == [(0, True)]
    assert tree.num_pages == 0 and tree.stats().namespaces == 0
    tree.check_integrity()


def test_sole_eviction_removes_only_pages_whose_last_copy_is_the_tier() -> None:
    tree = make_tree()
    tokens = list(range(20))
    # pages 0-1 device + redis, 2 redis only, 3 host + redis, 4 redis only
    locs = [PageLocation(0, redis="k0"), PageLocation(1, redis="k1"), PageLocation(redis="k2"),
            PageLocation(host=3, redis="k3"), PageLocation(redis="k4")]  # fmt: skip
    tree.insert(tokens, locs)
    freed = tree.evict("redis", 5, sole=True)
    # the tail goes; page 3 is held on the host, so it keeps its Redis copy and stops there
    assert [(p.value, p.removed) for p in freed.pages] == [("k4", True)]
    assert tree.match(tokens).redis == ("k0", "k1", "k2", "k3")
    tree.evict("host", 1)  # page 3 now lives in Redis only: pages 3 and 2 may leave
    freed = tree.evict("redis", 5, sole=True)
    assert [(p.value, p.removed) for p in freed.pages] == [("k3", True), ("k2", True)]
    assert tree.match(tokens).redis == ("k0", "k1") and tree.pages_in("redis") == 2
    # without sole, the same call drops the Redis copies of device pages too
    assert sorted(tree.evict("redis", 5).values) == ["k0", "k1"]
    assert tree.num_pages == 2 and tree.pages_in("redis") == 0
    tree.check_integrity()


def test_children_leave_before_their_parents() -> None:
    tree = make_tree()
    tree.insert([1] * 4, dev(0))
    clock_tick = tree.match([1] * 4)  # make the parent most recently used ...
    tree.insert([1] * 8, dev(0, 1))  # ... then touch the whole path: child as recent as parent
    assert clock_tick.cached_tokens == 4
    freed = tree.evict("device", 1)
    assert freed.values == [1]
    tree.check_integrity()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("lru", [30, 10, 20]), ("lfu", [30, 20, 10]), ("fifo", [10, 20, 30]), ("mru", [20, 10, 30])],
)
def test_policy_order(policy: str, expected: list[int]) -> None:
    tree = make_tree(policy)
    for first, page in ((1, 10), (2, 20), (3, 30)):  # inserted in this order
        tree.insert([first] * 4, dev(page))
    assert len(tree.evict("device", 0)) == 0  # eviction state persists: later use must count
    for first in (2, 1, 1, 1, 2):  # hits: 1 three times, 2 twice and last, 3 never
        tree.match([first] * 4)
    order = [tree.evict("device", 1).values[0] for _ in range(3)]
    assert order == expected


def test_set_location_records_write_backs() -> None:
    tree = make_tree()
    handle = tree.insert(list(range(12)), dev(0, 1, 2)).handle
    tree.match(list(range(4)))  # split: the handle's pages now span two nodes
    old = tree.set_location(handle, "redis", {0: "k0", 2: "k2"})
    assert old == {0: None, 2: None}
    assert tree.set_location(handle, "device", {2: None}) == {2: 2}
    hit = tree.match(list(range(12)))
    assert (hit.device, hit.redis) == ((0, 1, None), ("k0", None, "k2"))
    assert hit.pages_by_tier() == {"device": 2, "host": 0, "redis": 1}
    with pytest.raises(BadRequest, match="without a copy"):
        tree.set_location(handle, "device", {1: None})
    with pytest.raises(BadRequest, match="outside"):
        tree.set_location(handle, "host", {3: 1})
    with pytest.raises(BadRequest, match="unknown tier"):
        tree.set_location(handle, "disk", {0: 1})
    assert tree.pages_in("redis") == 2 and tree.pages_in("device") == 2
    tree.check_integrity()


def test_remove_forgets_a_page_and_everything_after() -> None:
    tree = make_tree()
    handle = tree.insert(list(range(12)), dev(0, 1, 2)).handle
    tree.insert(list(range(8)) + [7] * 4, dev(0, 1, 3))
    locked = tree.match(list(range(12))).handle
    tree.lock(locked)
    with pytest.raises(BadRequest, match="locked"):
        tree.remove(handle, 1)
    tree.unlock(locked)
    gone = tree.remove(handle, 1)
    assert sorted((p.index, p.location.device) for p in gone) == [(1, 1), (2, 2), (2, 3)]
    assert tree.match(list(range(12))).device == (0,)
    with pytest.raises(BadRequest, match="stale"):
        tree.remove(handle, 0)
    tree.check_integrity()
    assert [p.location.device for p in tree.clear()] == [0]
    assert tree.num_pages == tree.num_nodes == 0
    tree.check_integrity()


def test_lineage_approximate_pages_stay_apart() -> None:
    tree = make_tree()
    tokens = list(range(16))
    tree.insert(tokens[:8], dev(0, 1))
    lossy = tree.insert(tokens, dev(0, 1, 2, 3), exact=False)
    assert lossy.num_exact == 2  # the cached pages keep their lineage; new ones are approximate
    assert tree.match(tokens).cached_tokens == 16
    strict = tree.match(tokens, exact_only=True)
    assert (strict.cached_tokens, strict.num_exact, strict.matched_tokens) == (8, 2, 16)
    # exact KV computed later under an approximate page is still stored as approximate
    deeper = tree.insert(tokens + [1] * 4, dev(0, 1, 2, 3, 4), exact=True)
    assert deeper.num_exact == 2
    assert [p.exact for p in tree.match(tokens).pages] == [True, True, False, False]
    tree.check_integrity()


def test_deep_trees_need_no_recursion() -> None:
    tree = make_tree()
    tokens: list[int] = []
    locations: list[PageLocation] = []
    for i in range(1100):  # one node per turn: a path deeper than Python's recursion limit
        tokens += [i % 7 + 1] * 4
        locations.append(PageLocation(device=i))
        tree.insert(tokens, locations)
    assert tree.num_nodes == 1100
    tree.check_integrity()
    assert tree.match(tokens).device == tuple(range(1100))
    assert tree.evictable_pages("device") == 1100
    assert len(tree.evict("device", 2000)) == 1100
    assert tree.num_nodes == 0


def test_check_integrity_catches_corruption() -> None:
    tree = make_tree()
    tree.insert(list(range(8)), dev(0, 1))
    tree.insert(list(range(4)) + [9] * 4, dev(0, 2))
    node = next(iter(tree._root.children[NS.digest].children.values()))
    node.hashes = bytes(len(node.hashes))
    with pytest.raises(AssertionError, match="do not chain"):
        tree.check_integrity()
    tree = make_tree()
    tree.insert(list(range(8)), dev(0, 1))
    node = next(iter(tree._root.children[NS.digest].children.values()))
    node.lock_ref = 1
    with pytest.raises(AssertionError, match="lock count"):
        tree.check_integrity()
    node.lock_ref = 0
    node.locs[0][1] = 0  # the same device page twice: a double free waiting to happen
    with pytest.raises(AssertionError, match="used twice"):
        tree.check_integrity()


def test_pages_of_a_handle_and_location_helpers() -> None:
    tree = make_tree()
    handle = tree.insert(
        list(range(12)), [PageLocation(0), PageLocation(1, 4), PageLocation(host=5)]
    ).handle
    tree.match(list(range(4)))  # split: the pages span two nodes now
    infos = tree.pages(handle)
    assert [p.index for p in infos] == [0, 1, 2]
    assert [p.page_hash for p in infos] == page_hashes(NS, range(12), 4)
    assert [p.location.fastest for p in infos] == ["device", "device", "host"]
    assert infos[1].location.tiers == ("device", "host")
    assert infos[2].location.replace_tier("redis", "k") == PageLocation(host=5, redis="k")
    with pytest.raises(BadRequest, match="unknown tier"):
        infos[0].location.get("disk")
