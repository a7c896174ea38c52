"""Radix index costs: match and insert by prompt length, then a tree of 10K resident sessions.

Run: ``cd /work/main && .venv/bin/python -m benchmarks.bench_radix`` (or
``python benchmarks/bench_radix.py``). Writes the "radix index" section of docs/BENCHMARKS.md.
Times are medians of repeated calls in one process; page locations are built before timing
(they are the caller's). Page size 16, token ids drawn from a 50K vocabulary.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from functools import partial

try:  # run as a script: its own folder is on sys.path
    from record import markdown_table, print_table, record
except ImportError:  # run as ``python -m benchmarks.bench_radix`` from the repository root
    from benchmarks.record import markdown_table, print_table, record

from kvruntime.radix import Namespace, PageLocation, RadixConfig, RadixTree

PAGE = 16
VOCAB = 50_000
SIZES = (1024, 4096, 16384, 32768, 65536, 131072)
NS = Namespace("bench-model", "L32-H8-D128-P16-bfloat16", "bench")
SESSIONS = 10_000
SYSTEM_TOKENS = 2048  # shared by every session
SESSION_TOKENS = 512  # each session's own first turn
TURN_TOKENS = 256  # appended per later turn (response + tool result + user message)
TURNS = 2000
COMMAND = "cd /work/main && .venv/bin/python -m benchmarks.bench_radix"


def draw(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def new_tree() -> RadixTree:
    return RadixTree(RadixConfig(page_size=PAGE, namespace=NS))


def each(
    trees: list[RadixTree], tokens: list[int], locs: list[PageLocation]
) -> Callable[[], object]:
    """One insert per call, each into the next tree of ``trees``."""
    it = iter(trees)
    return lambda: next(it).insert(tokens, locs)


def by_length() -> list[list[object]]:
    """Per prompt length: match hit/miss, insert new/cached/one diverging page (ms)."""
    rng = random.Random(0)
    rows: list[list[object]] = []
    for n in SIZES:
        repeats = max(5, min(30, 200_000 // n))
        prompt = draw(rng, n)
        locs = [PageLocation(device=i) for i in range(n // PAGE)]
        insert_new = median_ms(each([new_tree() for _ in range(repeats)], prompt, locs), repeats)

        tree = new_tree()
        tree.insert(prompt, locs)
        insert_cached = median_ms(partial(tree.insert, prompt, locs), repeats)
        turn = prompt + draw(rng, 100)  # the cached prompt plus a new message
        assert tree.match(turn).cached_tokens == n
        match_hit = median_ms(partial(tree.match, turn), repeats)
        miss = draw(rng, n)
        assert tree.match(miss).cached_tokens == 0
        match_miss = median_ms(partial(tree.match, miss), repeats)

        # the same prompt with its last page edited: split the cached run, add a branch
        branch = prompt[:-PAGE] + draw(rng, PAGE)
        filled = [new_tree() for _ in range(repeats)]
        for full in filled:
            full.insert(prompt, locs)
        insert_branch = median_ms(each(filled, branch, locs), repeats)
        rows.append([n, match_hit, match_miss, insert_new, insert_cached, insert_branch])
        del filled, tree
        gc.collect()
    return rows


def session_tokens(s: int) -> list[int]:
    return draw(random.Random(1000 + s), SESSION_TOKENS)


def resident_sessions() -> list[list[object]]:
    """10K sessions under one system prompt: memory, then per-turn costs among them."""
    system = draw(random.Random(1), SYSTEM_TOKENS)
    device = iter(range(1 << 40))  # stand-in device page ids, unique per page
    own_tokens = [session_tokens(s) for s in range(SESSIONS)]

    def build() -> RadixTree:
        tree = new_tree()
        shared = [PageLocation(device=next(device)) for _ in range(SYSTEM_TOKENS // PAGE)]
        for s in range(SESSIONS):
            own = [PageLocation(device=next(device)) for _ in range(SESSION_TOKENS // PAGE)]
            tree.insert(system + own_tokens[s], shared + own)  # as a runtime would: reuse
        return tree

    gc.collect()
    tracemalloc.start()  # slows allocation: the timed build below runs without it
    tree = build()
    gc.collect()
    tree_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del tree
    gc.collect()
    start = time.perf_counter()
    tree = build()
    build_ms = (time.perf_counter() - start) * 1e3 / SESSIONS

    rng = random.Random(2)
    history: dict[int, list[int]] = {}
    match_ms, insert_ms = [], []
    for _ in range(TURNS):
        s = rng.randrange(SESSIONS)
        prompt = history.get(s) or system + session_tokens(s)
        prompt = prompt + draw(rng, TURN_TOKENS)
        start = time.perf_counter()
        hit = tree.match(prompt)
        tree.lock(hit.handle)
        mid = time.perf_counter()
        assert hit.cached_tokens == len(prompt) - TURN_TOKENS
        new = [
            PageLocation(device=next(device)) for _ in range(len(prompt) // PAGE - hit.num_pages)
        ]
        locations = [
            PageLocation(*loc) for loc in zip(hit.device, hit.host, hit.redis, strict=True)
        ]
        mid2 = time.perf_counter()
        tree.insert(prompt, locations + new)
        tree.unlock(hit.handle)
        end = time.perf_counter()
        match_ms.append((mid - start) * 1e3)
        insert_ms.append((end - mid2) * 1e3)
        history[s] = prompt
    evict_ms = median_ms(lambda: tree.evict("device", SESSION_TOKENS // PAGE), 20)
    stats = tree.stats()
    return [
        [
            SESSIONS,
            stats.pages,
            stats.nodes,
            build_ms,
            tree_bytes / 2**20,
            tree_bytes / stats.pages,
            statistics.median(match_ms),
            statistics.median(insert_ms),
            evict_ms,
        ]
    ]


def main() -> None:
    headers = [
        "prompt tokens",
        "match hit ms",
        "match miss ms",
        "insert new ms",
        "insert cached ms",
        "insert 1 new branch page ms",
    ]
    rows = by_length()
    print_table(headers, rows)
    print()
    sess_headers = [
        "sessions",
        "pages",
        "nodes",
        "insert ms/session",
        "tree MiB",
        "bytes/page",
        "turn match ms",
        "turn insert ms",
        f"evict {SESSION_TOKENS // PAGE} pages ms",
    ]
    sess_rows = resident_sessions()
    print_table(sess_headers, sess_rows)
    body = (
        f"Page size {PAGE}; medians. *match hit*: the cached prompt plus 100 new tokens; *miss*: "
        "nothing shared; *insert new*: every page new (hashing included); *insert cached*: every "
        "page present; *1 new branch page*: the cached prompt with its last page edited "
        "(split).\n\n"
        + markdown_table(headers, rows)
        + f"\n\n{SESSIONS} resident sessions share a {SYSTEM_TOKENS}-token system prompt and own "
        f"{SESSION_TOKENS} tokens each; then {TURNS} turns each append {TURN_TOKENS} tokens to a "
        "random session (match + lock, then insert + unlock; building the location list is not "
        "timed). *insert ms/session*: building the tree, per session. *tree MiB*: Python heap "
        "held by the tree (tracemalloc). *evict*: one call freeing a session's worth of device "
        "pages from the tree of 10K sessions.\n\n" + markdown_table(sess_headers, sess_rows)
    )
    path = record("radix index", body, COMMAND)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
