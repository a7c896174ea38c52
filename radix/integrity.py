"""The tree's invariants, executable: ``RadixTree.check_integrity()`` runs ``check_tree``.

Walks everything (and rehashes every page), so it is for tests and debugging, not hot paths.
Raises AssertionError naming the broken invariant and where; works under ``python -O``.
"""

from __future__ import annotations

from kvruntime.radix.hashing import HASH_BYTES, TOKEN_BYTES, chain_blob
from kvruntime.radix.ledger import Ledger
from kvruntime.radix.location import NOWHERE, TIERS, check_column
from kvruntime.radix.node import Node


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"radix tree integrity: {message}")


def _where(node: Node) -> str:
    return f"node(serial={node.serial}, pages {node.start}..{node.end})"


def check_tree(books: Ledger) -> None:
    """Check every node under ``books.root`` and recount what the ledger counts."""
    root, page_size, queue = books.root, books.page_size, books.queue
    totals, num_nodes, num_pages = books.totals, books.num_nodes, books.num_pages
    pb = page_size * TOKEN_BYTES
    _require(root.parent is None and root.alive and not root.hashes, "root must be bare")
    _require(root.sorted_keys == sorted(root.children), "root key order out of sync")
    seen_nodes = seen_pages = 0
    seen_totals = [0, 0, 0]
    used: tuple[dict[int | str, str], ...] = ({}, {}, {})  # value -> where, device/host/redis
    child_locks = sum(ns.lock_ref for ns in root.children.values())
    _require(root.lock_ref == root.pins + child_locks, "root lock count != pins + namespaces")
    for digest, ns in root.children.items():
        where = f"namespace {digest.hex()}"
        _require(ns.parent is root and ns.alive and ns.seed == digest, f"{where}: bad link or seed")
        _require(not ns.hashes and not ns.key and ns.pins == 0, f"{where}: holds pages or pins")
        _require(bool(ns.children), f"{where}: empty namespace left behind")
        stack = [ns]
        while stack:
            parent = stack.pop()
            _require(parent.sorted_keys == sorted(parent.children), f"{_where(parent)}: key order")
            locks = sum(c.lock_ref for c in parent.children.values())
            _require(parent.lock_ref == parent.pins + locks, f"{_where(parent)}: lock count")
            for edge, node in parent.children.items():
                _check_node(node, parent, edge, page_size, pb, used)
                for t in range(3):
                    _require(
                        not node.counts[t] or queue.tracked(t, node),
                        f"{_where(node)}: holds {TIERS[t]} pages but is not queued for eviction",
                    )
                seen_nodes += 1
                seen_pages += node.num_pages
                for t in range(3):
                    seen_totals[t] += node.counts[t]
                stack.append(node)
    _require(seen_nodes == num_nodes, f"num_nodes {num_nodes} != {seen_nodes} counted")
    _require(seen_pages == num_pages, f"num_pages {num_pages} != {seen_pages} counted")
    _require(seen_totals == totals, f"per-tier totals {totals} != {seen_totals} counted")


def _check_node(
    node: Node, parent: Node, edge: bytes, page_size: int, pb: int, used: tuple[dict, ...]
) -> None:
    where = _where(node)
    n = node.num_pages
    _require(node.alive and node.parent is parent, f"{where}: parent link broken")
    _require(n >= 1 and len(node.hashes) == n * HASH_BYTES, f"{where}: no pages or ragged hashes")
    _require(len(node.key) == n * pb, f"{where}: key is not {n} whole pages")
    _require(node.key[:pb] == edge, f"{where}: stored under a key that is not its first page")
    _require(node.start == parent.end, f"{where}: starts at {node.start}, parent ends {parent.end}")
    _require(all(len(col) == n for col in node.locs), f"{where}: location columns not {n} long")
    recount = [len(col) - col.count(None) for col in node.locs]
    _require(node.counts == recount, f"{where}: counts {node.counts} != {recount}")
    _require(NOWHERE not in zip(*node.locs, strict=True), f"{where}: a page with no copy")
    for t, col in enumerate(node.locs):
        check_column(t, col)
        if t == 2:
            continue  # Redis keys may be shared by design (a key is named by the page hash)
        for j, value in enumerate(col):
            if value is not None:
                other = used[t].setdefault(value, f"{where} page {j}")
                _require(other == f"{where} page {j}", f"{TIERS[t]} {value} used twice: {other}")
    _require(0 <= node.exact <= n, f"{where}: exact count {node.exact} of {n}")
    _require(
        node.exact == 0 or not parent.hashes or parent.fully_exact,
        f"{where}: exact pages below an approximate page",
    )
    _require(node.lock_ref >= 0 and node.pins >= 0, f"{where}: negative lock count")
    expected = chain_blob(parent.last_hash, node.key, page_size)
    _require(node.hashes == expected, f"{where}: page hashes do not chain from the parent")
