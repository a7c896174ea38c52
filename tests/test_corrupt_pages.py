"""Corrupt values in Redis are rejected and recomputed, never served: bit flips, truncation,
wrong token ids, values written by another model or codec, garbage under the namespace.

Two layers: the runtime (real Redis, the tiny model; codec ``none`` must give exactly the
tokens of a ``reuse=False`` runtime, and a lossy codec must reject just the same), and the
page decoder alone, fuzzed with hypothesis and replayed over the kept corpus in
``tests/corpus/wire/`` (grow it with atheris: ``python tests/test_corrupt_pages.py
-max_total_time=120 tests/corpus/wire``; see ``fuzz_main``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from model_fixtures import tiny, tiny_dir, tiny_engine  # noqa: F401
from redis_servers import RedisServer

from kvruntime.config import RuntimeConfig
from kvruntime.engines.chat import render
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.errors import CorruptPage
from kvruntime.kernels.layout import PageLayout
from kvruntime.radix import page_hashes, storage_key
from kvruntime.runtime import Runtime
from kvruntime.store import wire

PAGE = 4
FIXED = dict(
    page_size=PAGE, prefill_tokens_per_s=1000.0, host_bytes_per_s=1e9, redis_bytes_per_s=1e9
)
SYSTEM = "You are a careful agent. Tools: search(query), read(path), write(path, text). " * 2
MSGS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "list the files"}]
# a different first message: shares no page with MSGS, so its turn pushes MSGS off the device
FILLER = [{"role": "user", "content": "Unrelated: " + "count the apples and pears " * 7}]
BAD = 7  # the page that gets corrupted; pages before it stay good
CORPUS = Path(__file__).parent / "corpus" / "wire"


# ---------------------------------------------------------------- corruptions of one value


def _rewrite(value: bytes, **fields: Any) -> bytes:
    """The value with header fields replaced (and a payload, if given): a well-formed page
    with a valid checksum that says something else."""
    head, offset = wire.read_header(value)
    payload = fields.pop("payload", value[offset:])
    now = dict(
        codec=head.codec, dtype=head.dtype, shape=head.shape, layout=head.layout, tokens=head.tokens
    )
    return wire.encode_page(**{**now, **fields}, payload=payload)


def _flip(value: bytes, at: int) -> bytes:
    out = bytearray(value)
    out[at] ^= 0x10
    return bytes(out)


class Corruption(NamedTuple):
    name: str
    make: Callable[[bytes, dict[str, bytes]], bytes]  # (value, other values by name) -> bad
    reason: str  # what the rejection says (the runtime logs it)


OTHER_MODEL = PageLayout(num_layers=2, kv_heads=4, head_dim=8, page_size=PAGE)
CORRUPTIONS = [
    Corruption("payload bit flip", lambda v, o: _flip(v, len(v) - 3), "checksum"),
    Corruption("header bit flip", lambda v, o: _flip(v, 4), "version"),
    Corruption("magic", lambda v, o: b"XXXX" + v[4:], "magic"),
    Corruption("truncated payload", lambda v, o: v[:-9], "truncated"),
    Corruption("truncated header", lambda v, o: v[:40], "does not fit"),
    Corruption("empty", lambda v, o: b"", "preamble"),
    Corruption(
        "wrong token ids",
        lambda v, o: _rewrite(v, tokens=[t + 1 for t in wire.read_header(v)[0].tokens]),
        "token ids",
    ),
    Corruption("another page's value", lambda v, o: o["neighbour"], "token ids"),
    Corruption(
        "another model",
        lambda v, o: _rewrite(
            v,
            layout=OTHER_MODEL.describe(),
            shape=OTHER_MODEL.page_shape,
            payload=os.urandom(OTHER_MODEL.page_nbytes),
        ),
        "shape",
    ),
    Corruption("another codec", lambda v, o: o["other codec"], "codec"),
    Corruption("garbage", lambda v, o: os.urandom(len(v)), "magic"),
]
IDS = [c.name for c in CORRUPTIONS]


# ---------------------------------------------------------------- runtime fixtures


class Stored(NamedTuple):
    server: RedisServer
    want: list[int]  # greedy tokens of MSGS, recomputed
    tokens: list[int]  # MSGS rendered
    keys: dict[str, list[str]]  # codec -> Redis key of each page of MSGS


@pytest.fixture(scope="module")
def stored(tiny_engine: TransformersEngine, tiny: LoadedModel) -> Iterator[Stored]:  # noqa: F811
    """One Redis holding MSGS's pages under codecs none and int8 (written by runtimes that
    are gone: everything a test reads comes from Redis)."""
    server = RedisServer()
    try:
        with Runtime(tiny_engine, tiny.tokenizer, RuntimeConfig(reuse=False, **FIXED)) as base:  # type: ignore[arg-type]
            want = base.session().chat(MSGS, max_tokens=6).token_ids
        tokens = render(tiny.tokenizer, MSGS, None)
        keys: dict[str, list[str]] = {}
        for codec in ("none", "int8"):
            config = RuntimeConfig(redis_url=server.url, redis_codec=codec, **FIXED)  # type: ignore[arg-type]
            with Runtime(tiny_engine, tiny.tokenizer, config) as writer:
                writer.session().chat(MSGS, max_tokens=6)
                assert writer.cache.flush(10)
                ns = writer.cache.namespace("default")
            hashes = page_hashes(ns, tokens, PAGE)
            keys[codec] = [f"kvr:{storage_key(h, codec, True)}" for h in hashes]
        assert server.client().exists(*keys["none"], *keys["int8"]) == 2 * len(hashes)
        yield Stored(server, want, tokens, keys)
    finally:
        server.close()


@pytest.fixture
def corrupt(stored: Stored) -> Iterator[Callable[[str, Corruption], bytes]]:
    """Corrupt page BAD of one codec's copy; the original value is put back afterwards."""
    client = stored.server.client()
    saved: dict[str, bytes] = {}

    def apply(codec: str, corruption: Corruption) -> bytes:
        other = "int8" if codec == "none" else "none"
        key = stored.keys[codec][BAD]
        value = client.get(key)
        assert value is not None
        others = {
            "neighbour": client.get(stored.keys[codec][BAD + 1]),
            "other codec": client.get(stored.keys[other][BAD]),
        }
        saved.setdefault(key, value)
        bad = corruption.make(value, others)  # type: ignore[arg-type]
        client.set(key, bad)
        return bad

    yield apply
    for key, value in saved.items():
        client.set(key, value)


@pytest.fixture
def make(
    stored: Stored,
    tiny_engine: TransformersEngine,  # noqa: F811
    tiny: LoadedModel,  # noqa: F811
) -> Iterator[Callable[..., Runtime]]:
    made: list[Runtime] = []
    page = tiny_engine.layout.page_layout(PAGE, tiny_engine.dtype).page_nbytes

    def build(codec: str = "none", device_pages: int = 256) -> Runtime:
        config = RuntimeConfig(
            redis_url=stored.server.url,
            redis_codec=codec,
            host_kv_bytes=0,
            device_kv_bytes=device_pages * page,
            **FIXED,  # type: ignore[arg-type]
        )
        rt = Runtime(tiny_engine, tiny.tokenizer, config)
        made.append(rt)
        return rt

    yield build
    for rt in made:
        rt.close()


def _rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]


# ---------------------------------------------------------------- runtime tests


@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=IDS)
def test_a_corrupt_value_stops_the_restored_prefix_at_its_page(
    make: Callable[..., Runtime],
    stored: Stored,
    corrupt: Callable[[str, Corruption], bytes],
    caplog: pytest.LogCaptureFixture,
    codec: str,
    corruption: Corruption,
) -> None:
    """A fresh runtime probes Redis (another process's pages): every page before the bad one
    is restored, the bad one and everything after it are not (lossless and lossy codecs)."""
    bad = corrupt(codec, corruption)
    rt = make(codec)
    cache = rt.cache
    caplog.set_level(logging.WARNING, logger="kvruntime.restore")
    found = cache.lookup(stored.tokens, "default")
    try:
        # every page is present (only reading tells a bad value from a good one)
        assert found.num_pages == (len(stored.tokens) - 1) // PAGE
        restored = cache.restore(found, rt.engine.device, rt.engine.dtype)
    finally:
        cache.release(found)
    assert restored.num_tokens == BAD * PAGE
    assert restored.tokens_by_tier["redis"] == BAD * PAGE
    assert restored.pages is not None and restored.pages.shape[0] == BAD
    rejected = _rejections(caplog)
    if len(bad) > cache.tiers.redis_value_bytes:  # larger than a page: never read, a miss
        assert not rejected and rt.stats().tiers["redis"]["errors"] == {"too_large": 1}
        return
    (message,) = rejected
    assert corruption.reason in message, message
    assert stored.keys[codec][BAD].endswith(message.split()[2]), message


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=IDS)
def test_a_turn_over_a_corrupt_page_in_its_own_index_matches_recompute(
    make: Callable[..., Runtime],
    stored: Stored,
    corrupt: Callable[[str, Corruption], bytes],
    caplog: pytest.LogCaptureFixture,
    corruption: Corruption,
) -> None:
    """The runtime's own index says the page is in Redis (its device copy was evicted), the
    value there is bad: the turn recomputes from that page and gives the exact tokens."""
    rt = make(device_pages=24)  # MSGS needs ~46 pages, FILLER ~60: the device keeps few
    assert rt.session().chat(MSGS, max_tokens=6).token_ids == stored.want
    rt.cache.flush(10)
    rt.session().chat(FILLER, max_tokens=2)  # evicts every MSGS page from the device
    rt.cache.flush(10)
    corrupt("none", corruption)
    caplog.set_level(logging.WARNING, logger="kvruntime.restore")
    r = rt.session().chat(MSGS, max_tokens=6)
    assert r.token_ids == stored.want
    assert r.usage.cached_tokens == BAD * PAGE, r.usage
    assert any(corruption.reason in m for m in _rejections(caplog))


def test_a_turn_over_a_corrupt_page_another_process_stored_matches_recompute(
    make: Callable[..., Runtime],
    stored: Stored,
    corrupt: Callable[[str, Corruption], bytes],
) -> None:
    corrupt("none", CORRUPTIONS[0])
    r = make().session().chat(MSGS, max_tokens=6)
    assert r.token_ids == stored.want
    assert r.usage.cached_tokens == BAD * PAGE, r.usage


def test_garbage_under_the_namespace_changes_nothing(
    make: Callable[..., Runtime], stored: Stored
) -> None:
    """Random keys and values in the runtime's key space (page-shaped keys included) are
    never read for prompts they do not belong to; the stored pages still serve."""
    client = stored.server.client()
    junk = {f"kvr:kvr:none:exact:{os.urandom(16).hex()}": os.urandom(300) for _ in range(200)}
    junk |= {f"kvr:{os.urandom(8).hex()}": os.urandom(50) for _ in range(50)}
    client.mset(junk)  # type: ignore[arg-type]
    try:
        rt = make()
        r = rt.session().chat(MSGS, max_tokens=6)
        assert r.token_ids == stored.want
        usable = (len(stored.tokens) - 1) // PAGE  # the last token is always computed
        assert r.usage.cached_tokens_by_tier["redis"] == usable * PAGE
        other = [{"role": "assistant", "content": "something nobody said before"}]
        assert rt.session().chat(other, max_tokens=2).usage.cached_tokens == 0
        assert rt.stats().tiers["redis"]["hits"] == usable
    finally:
        client.delete(*junk)


# ---------------------------------------------------------------- the decoder, fuzzed

SPEC = dict(codec="none", dtype="float32", shape=(2, 2, 1, 4, 8), layout="L2-H1-D8-P4-float32")
SPEC_TOKENS = (5, 17, 300, 2)
PAYLOAD = bytes(range(256)) * 2


def valid_value() -> bytes:
    return wire.encode_page(**SPEC, tokens=SPEC_TOKENS, payload=PAYLOAD)  # type: ignore[arg-type]


def decode(value: bytes) -> bytes:
    """The decoder with the expectations of SPEC; returns the payload or raises."""
    return bytes(wire.decode_page(value, tokens=SPEC_TOKENS, **SPEC))  # type: ignore[arg-type]


def check(value: bytes, forged_ok: bool = False) -> None:
    """The safety property: a value decodes to exactly the payload stored, or it is a
    CorruptPage; nothing else may come out (no other exception, no other bytes).

    ``forged_ok``: a coverage-guided fuzzer learns to write a matching checksum for a
    changed payload (the checksum catches accidents, not forgery: docs/security.md). For
    its inputs the property is that whatever is accepted is self-consistent: the payload is
    all the bytes after the header, of the stated length and checksum."""
    try:
        out = decode(value)
    except CorruptPage:
        return
    if out == PAYLOAD:
        return
    assert forged_ok, "a corrupted value was accepted"
    header, offset = wire.read_header(value)
    assert out == value[offset:] and len(out) == header.payload_len
    assert wire.checksum(out) == header.checksum and header.tokens == SPEC_TOKENS


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.just(0)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(mutation, min_size=1, max_size=8), st.binary(max_size=16))
def test_mutated_values_are_rejected_or_exact(
    steps: list[tuple[str, int, int]], tail: bytes
) -> None:
    value = bytearray(valid_value())
    for op, at, arg in steps:
        i = at % (len(value) + 1)
        if op == "flip" and i < len(value):
            value[i] ^= 1 << arg
        elif op == "set" and i < len(value):
            value[i] = arg
        elif op == "cut":
            del value[i:]
        elif op == "insert":
            value.insert(i, arg)
        elif op == "delete" and i < len(value):
            del value[i]
    check(bytes(value) + tail)


def _good_header() -> dict[str, Any]:
    value = valid_value()
    _, offset = wire.read_header(value)
    return dict(msgpack.unpackb(value[wire.PREAMBLE_BYTES : offset], raw=False))


# msgpack values of every kind the header could hold instead of the right one
FLOATS = st.floats()  # NaN and infinities included
ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | FLOATS | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("codec", "dtype", "shape", "layout", "tokens", "payload_len", "checksum")


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A value whose preamble is right and whose header is a msgpack map built from the
    right fields, some replaced by anything, some missing, some extra."""
    good = _good_header()
    fields = {k: v for k, v in good.items() if k in FIELDS}
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=4)):
        if draw(st.booleans()):
            fields[name] = draw(ANY)
        else:
            fields.pop(name)
    fields |= draw(st.dictionaries(st.text(max_size=6), ANY, max_size=2))
    head: Any = fields if draw(st.integers(0, 9)) else draw(ANY)  # now and then not a map
    packed = msgpack.packb(head, use_bin_type=True)
    length = draw(st.sampled_from([len(packed), len(packed) + 1, max(0, len(packed) - 1)]))
    payload = draw(st.sampled_from([PAYLOAD, PAYLOAD[:-1], b""]))
    return struct.pack("<4sHI", wire.MAGIC, wire.VERSION, length) + packed + payload


def _header_with(**fields: Any) -> bytes:
    """The valid value with raw header fields replaced (anything msgpack can carry)."""
    good = _good_header()
    packed = msgpack.packb({**good, **fields}, use_bin_type=True)
    return struct.pack("<4sHI", wire.MAGIC, wire.VERSION, len(packed)) + packed + PAYLOAD


@settings(max_examples=400, deadline=None)
@given(headers())
@example(_header_with(payload_len=math.nan))
@example(_header_with(shape=[2, 2, 1, 4, 8.0]))  # a float that equals the int: still exact
@example(_header_with(tokens="5,17,300,2"))
def test_malformed_headers_are_rejected(value: bytes) -> None:
    check(value)


def test_an_infinite_number_in_a_header_is_a_corrupt_page() -> None:
    with pytest.raises(CorruptPage):
        decode(_header_with(payload_len=math.inf))


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file())


def test_the_kept_corpus_replays() -> None:
    """Every input the fuzzers kept (tests/corpus/wire): rejected, or the exact payload."""
    files = corpus_files()
    assert len(files) >= 20, f"corpus at {CORPUS} is missing"
    exact = 0
    for path in files:
        value = path.read_bytes()
        check(value, forged_ok=True)
        with contextlib.suppress(CorruptPage):
            exact += decode(value) == PAYLOAD
    assert exact >= 1  # the seed itself is in the corpus and decodes


def fuzz_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing of the decoder with atheris (libFuzzer arguments; the corpus
    directory grows in place). Any exception other than CorruptPage is a crash."""
    import atheris  # type: ignore[import-not-found]

    # wire is imported already (module top): instrument its two functions in place
    atheris.instrument_func(wire.read_header)
    atheris.instrument_func(wire.decode_page)
    CORPUS.mkdir(parents=True, exist_ok=True)
    seed = CORPUS / "seed-valid"
    if not seed.exists():
        seed.write_bytes(valid_value())
    atheris.Setup([argv[0], *argv[1:]], lambda data: check(bytes(data), forged_ok=True))
    atheris.Fuzz()


if __name__ == "__main__":
    fuzz_main(sys.argv)
