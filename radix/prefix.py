"""How far a prompt runs down the tree: common prefixes of encoded tokens, compared by memcmp.

Keys and prompts are token ids as little-endian uint32 bytes (``encode_tokens``), so a run
of pages compares as one slice; nothing here goes token by token. Reads nodes, never changes
them: ``RadixTree.match`` splits and touches what ``descend`` found.
"""

from __future__ import annotations

import bisect
from typing import TypeVar

from kvruntime.radix.node import Node

_Seq = TypeVar("_Seq", bytes, list[int])


def common_prefix(a: _Seq, b: _Seq) -> int:
    """Length of the common prefix of ``a`` and ``b`` (bytes: page keys; lists: token ids),
    by bisection over C-level slice compares (memcmp for bytes), never item by item."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo]; the first difference lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def descend(
    ns_root: Node | None, enc: bytes, page_bytes: int, exact_only: bool
) -> tuple[list[tuple[Node, int]], int]:
    """The cached whole pages of prompt ``enc`` under a namespace root (None: no namespace).

    Returns ``(path, matched)``: each node reached with how many of its leading pages match
    (the last may match only part of its pages), and the bytes of ``enc`` that match anything
    cached (may end mid-page). ``exact_only`` ends the path before the first approximate page.
    """
    pb = page_bytes
    path: list[tuple[Node, int]] = []  # (node, pages of it matched)
    pos = matched = 0
    node = ns_root
    while node is not None:
        probe = enc[pos : pos + pb]
        child = node.children.get(probe) if len(probe) == pb else None
        if child is None:  # diverges at a node boundary: closest sibling key by bisection
            keys = node.sorted_keys
            i = bisect.bisect_left(keys, probe)
            best = max(
                (common_prefix(keys[k], probe) for k in (i - 1, i) if 0 <= k < len(keys)),
                default=0,
            )
            matched = pos + best
            break
        klen = len(child.key)
        if enc[pos : pos + klen] == child.key:
            path.append((child, klen // pb))
            pos += klen
            node = child
            continue
        common = common_prefix(child.key, enc[pos : pos + klen])
        path.append((child, common // pb))
        pos += common // pb * pb
        matched = pos + common % pb
        break
    if exact_only:
        for i, (node, pages) in enumerate(path):
            if node.exact < pages:
                path[i:] = [(node, node.exact)] if node.exact else []
                break
    return path, matched
