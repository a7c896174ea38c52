"""RadixTree against a brute-force reference: a dict of page prefixes -> copies.

Every step (insert, match, lock, unlock, set_location, evict, remove, clear) is applied to
both; the tree's answers must equal the reference's, and after every step the tree's content,
counters and ``check_integrity()`` must agree with it. Locked pages are never evicted.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvruntime.errors import BadRequest
from kvruntime.radix import (
    TIERS,
    Handle,
    Namespace,
    PageLocation,
    RadixConfig,
    RadixTree,
    page_hashes,
)

PS = 2  # page size: small pages over a 3-token alphabet make prefixes share and diverge
NAMESPACES = (
    Namespace("m", "L1-H1-D1-P2-bfloat16", "a"),
    Namespace("m", "L1-H1-D1-P2-bfloat16", "b"),
)
token_lists = st.lists(st.integers(1, 3), max_size=11)
Key = tuple[int, tuple[int, ...]]  # (namespace number, tokens of whole pages up to this page)


@dataclass
class RefPage:
    loc: list[int | str | None]
    exact: bool
    hash: bytes
    access: int  # clock value of the last match/insert through it
    hits: int
    created: int
    birth: int  # which incarnation of this prefix: a handle is stale once its pages die


@dataclass
class RefHandle:
    handle: Handle
    ns: int
    prefix: tuple[int, ...]
    births: tuple[int, ...]


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> float:
        self.now += 1
        return float(self.now)


def lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class RadixMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["lru", "lfu", "fifo", "mru"]))
    def setup(self, policy: str) -> None:
        self.policy = policy
        self.clock = Clock()
        self.tree = RadixTree(
            RadixConfig(page_size=PS, eviction=policy, namespace=NAMESPACES[0]), clock=self.clock
        )
        self.ref: dict[Key, RefPage] = {}
        self.handles: list[RefHandle] = []
        self.pins: Counter[Key] = Counter()  # locks per (namespace, handle prefix)
        self.values = itertools.count()
        self.births = itertools.count()

    # ---------------------------------------------------------------- reference helpers

    def fresh(self, t: int) -> int | str:
        n = next(self.values)
        return f"r{n}" if t == 2 else n

    def fresh_location(self, mask: int) -> PageLocation:
        return PageLocation(*(self.fresh(t) if mask >> t & 1 else None for t in range(3)))

    def locked(self, key: Key) -> bool:
        ns, prefix = key
        return any(
            n == ns and h[: len(prefix)] == prefix and len(h) >= len(prefix) for (n, h) in self.pins
        )

    def valid(self, rh: RefHandle) -> bool:
        for i, birth in enumerate(rh.births):
            page = self.ref.get((rh.ns, rh.prefix[: (i + 1) * PS]))
            if page is None or page.birth != birth:
                return False
        return True

    def descendants(self, key: Key) -> list[RefPage]:
        ns, prefix = key
        return [
            p
            for (n, k), p in self.ref.items()
            if n == ns and len(k) > len(prefix) and k[: len(prefix)] == prefix
        ]

    def evictable(self, t: int) -> list[Key]:
        out = []
        for key, page in self.ref.items():
            if page.loc[t] is None or self.locked(key):
                continue
            only = all(page.loc[u] is None for u in range(3) if u != t)
            if not only or all(
                d.loc[t] is not None and d.loc.count(None) == 2 for d in self.descendants(key)
            ):
                out.append(key)
        return out

    def priority(self, page: RefPage) -> tuple[float, ...]:
        return {
            "lru": (page.access,),
            "lfu": (page.hits, page.access),
            "fifo": (page.created,),
        }[self.policy]

    def add_handle(self, handle: Handle, ns: int, prefix: tuple[int, ...]) -> None:
        births = tuple(
            self.ref[(ns, prefix[: (i + 1) * PS])].birth for i in range(len(prefix) // PS)
        )
        self.handles.append(RefHandle(handle, ns, prefix, births))

    @staticmethod
    def pin_key(rh: RefHandle) -> Key:
        # handles of zero pages all point at the tree's root, whatever their namespace
        return (rh.ns, rh.prefix) if rh.prefix else (-1, ())

    # ---------------------------------------------------------------- rules

    @rule(ns=st.integers(0, 1), tokens=token_lists, exact=st.booleans(), data=st.data())
    def insert(self, ns: int, tokens: list[int], exact: bool, data: st.DataObject) -> None:
        n = len(tokens) // PS
        locations: list[PageLocation] = []
        existing = 0
        while existing < n and (ns, tuple(tokens[: (existing + 1) * PS])) in self.ref:
            existing += 1
        for i in range(n):
            page = self.ref.get((ns, tuple(tokens[: (i + 1) * PS])))
            if page is not None and data.draw(st.booleans(), label="same location"):
                locations.append(PageLocation(*page.loc))
            else:
                locations.append(self.fresh_location(data.draw(st.integers(1, 7), label="tiers")))
        result = self.tree.insert(tokens, locations, NAMESPACES[ns], exact=exact)
        now = self.clock.now
        assert (result.num_existing, result.num_new) == (existing, n - existing)
        assert result.page_hashes == page_hashes(NAMESPACES[ns], tokens, PS)
        expected_dups = []
        for i in range(n):
            key = (ns, tuple(tokens[: (i + 1) * PS]))
            given = list(locations[i])
            page = self.ref.get(key)
            if page is None:
                parent_exact = i == 0 or self.ref[(ns, key[1][:-PS])].exact
                page = RefPage(
                    given,
                    exact and parent_exact,
                    result.page_hash(i),
                    now,
                    0,
                    now,
                    next(self.births),
                )
                self.ref[key] = page
            else:
                for t in range(3):
                    g, s = given[t], page.loc[t]
                    if g is None or g == s:
                        continue
                    if s is None and page.exact == exact:
                        page.loc[t] = g
                    else:
                        expected_dups.append((i, TIERS[t], g))
            page.access = now
        assert sorted((d.index, d.tier, d.value) for d in result.duplicates) == sorted(
            expected_dups
        )
        assert result.num_exact == sum(
            self.ref[(ns, tuple(tokens[: (i + 1) * PS]))].exact for i in range(n)
        )
        self.add_handle(result.handle, ns, tuple(tokens[: n * PS]))

    @rule(ns=st.integers(0, 1), tokens=token_lists, exact_only=st.booleans())
    def match(self, ns: int, tokens: list[int], exact_only: bool) -> None:
        result = self.tree.match(tokens, NAMESPACES[ns], exact_only=exact_only)
        now = self.clock.now
        cached = 0
        while cached < len(tokens) // PS:
            page = self.ref.get((ns, tuple(tokens[: (cached + 1) * PS])))
            if page is None or (exact_only and not page.exact):
                break
            cached += 1
        pages = [self.ref[(ns, tuple(tokens[: (i + 1) * PS]))] for i in range(cached)]
        longest = max((lcp(k, tuple(tokens)) for (n, k) in self.ref if n == ns), default=0)
        assert result.matched_tokens == longest
        assert result.cached_tokens == cached * PS
        assert [list(loc) for loc in result.locations] == [p.loc for p in pages]
        assert result.page_hashes == [p.hash for p in pages]
        assert result.num_exact == sum(p.exact for p in pages)
        assert result.handle.num_pages == cached
        for page in pages:
            page.access = now
            page.hits += 1
        self.add_handle(result.handle, ns, tuple(tokens[: cached * PS]))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        rh = data.draw(st.sampled_from(self.handles))
        if not self.valid(rh):
            with pytest.raises(BadRequest, match="stale"):
                self.tree.lock(rh.handle)
            return
        self.tree.lock(rh.handle)
        self.pins[self.pin_key(rh)] += 1

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        rh = data.draw(st.sampled_from(self.handles))
        key = self.pin_key(rh)
        if not self.valid(rh) or not self.pins[key]:
            with pytest.raises(BadRequest):
                self.tree.unlock(rh.handle)
            return
        self.tree.unlock(rh.handle)
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), t=st.integers(0, 2), clear_it=st.booleans())
    def set_location(self, data: st.DataObject, t: int, clear_it: bool) -> None:
        rh = data.draw(st.sampled_from(self.handles))
        index = data.draw(st.integers(0, len(rh.births)), label="index")
        value = None if clear_it else self.fresh(t)
        if not self.valid(rh) or index >= len(rh.births):
            with pytest.raises(BadRequest):
                self.tree.set_location(rh.handle, TIERS[t], {index: value})
            return
        page = self.ref[(rh.ns, rh.prefix[: (index + 1) * PS])]
        if value is None and all(page.loc[u] is None for u in range(3) if u != t):
            with pytest.raises(BadRequest, match="without a copy"):
                self.tree.set_location(rh.handle, TIERS[t], {index: value})
            return
        old = self.tree.set_location(rh.handle, TIERS[t], {index: value})
        assert old == {index: page.loc[t]}
        page.loc[t] = value

    @rule(t=st.integers(0, 2), n=st.integers(0, 8))
    def evict(self, t: int, n: int) -> None:
        before = len(self.evictable(t))
        result = self.tree.evict(TIERS[t], n)
        assert len(result) == min(n, before)
        by_hash = {p.hash: key for key, p in self.ref.items()}
        freed = []
        for evicted in result.pages:
            key = by_hash[evicted.page_hash]
            page = self.ref[key]
            assert not self.locked(key), "a locked page was evicted"
            assert page.loc[t] == evicted.value
            alone = all(page.loc[u] is None for u in range(3) if u != t)
            assert evicted.removed == alone
            freed.append(page)
            if alone:
                del self.ref[key]
            else:
                page.loc[t] = None
        for ns, prefix in self.ref:  # pages leave children first: what stays is prefix-closed
            assert len(prefix) == PS or (ns, prefix[:-PS]) in self.ref
        if len(freed) < n:  # evict frees all it can, cascades included
            assert not self.evictable(t)
        elif freed and self.policy != "mru":
            remaining = [self.priority(self.ref[k]) for k in self.evictable(t)]
            assert max(map(self.priority, freed)) <= min(remaining, default=(float("inf"),))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        rh = data.draw(st.sampled_from(self.handles))
        start = data.draw(st.integers(0, len(rh.births)), label="start")
        if not self.valid(rh) or start >= len(rh.births):
            with pytest.raises(BadRequest):
                self.tree.remove(rh.handle, start)
            return
        top = (rh.ns, rh.prefix[: (start + 1) * PS])
        gone = [
            top,
            *(
                (n, k)
                for (n, k) in self.ref
                if n == rh.ns and len(k) > len(top[1]) and k[: len(top[1])] == top[1]
            ),
        ]
        if any(self.locked(key) for key in gone):
            with pytest.raises(BadRequest, match="locked"):
                self.tree.remove(rh.handle, start)
            return
        removed = self.tree.remove(rh.handle, start)
        expected = {(self.ref[k].hash, tuple(self.ref[k].loc), len(k[1]) // PS - 1) for k in gone}
        assert {(info.page_hash, tuple(info.location), info.index) for info in removed} == expected
        for key in gone:
            del self.ref[key]

    @precondition(lambda self: not self.pins)
    @rule()
    def clear(self) -> None:
        removed = self.tree.clear()
        assert {info.page_hash for info in removed} == {p.hash for p in self.ref.values()}
        self.ref.clear()

    # ---------------------------------------------------------------- invariants

    @invariant()
    def agrees_with_reference(self) -> None:
        if not hasattr(self, "tree"):
            return
        self.tree.check_integrity()
        assert self.tree.num_pages == len(self.ref)
        assert dump(self.tree) == {
            key: (tuple(p.loc), p.exact, p.hash) for key, p in self.ref.items()
        }
        for t, tier in enumerate(TIERS):
            assert self.tree.pages_in(tier) == sum(p.loc[t] is not None for p in self.ref.values())
            assert self.tree.evictable_pages(tier) == len(self.evictable(t))
        locked = sum(self.locked(key) for key in self.ref)
        assert self.tree.stats().locked_pages == locked


def dump(tree: RadixTree) -> dict[Key, tuple[tuple[object, ...], bool, bytes]]:
    """The tree's content page by page (white-box: reads nodes, changes nothing)."""
    out = {}
    for ns_number, ns in enumerate(NAMESPACES):
        top = tree._root.children.get(ns.digest)
        stack = [(top, ())] if top is not None else []
        while stack:
            node, prefix = stack.pop()
            tokens = list(prefix)
            for j, info in enumerate(node.page_infos()):
                tokens += node.page_tokens(j)
                out[(ns_number, tuple(tokens))] = (tuple(info.location), info.exact, info.page_hash)
            stack.extend((child, tuple(tokens)) for child in node.children.values())
    return out


RadixMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRadixMachine = RadixMachine.TestCase
