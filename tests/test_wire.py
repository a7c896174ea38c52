from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvruntime.errors import CorruptPage
from kvruntime.store import wire

SHAPE = (2, 2, 1, 4, 8)
TOKENS = [101, 7, 99999, 3]


def _page(payload: bytes = b"", tokens: list[int] | None = None) -> bytes:
    payload = payload or np.arange(64, dtype=np.uint8).tobytes()
    return wire.encode_page(
        codec="int8",
        dtype="bfloat16",
        shape=SHAPE,
        layout="L2-H1-D8-P4-bfloat16",
        tokens=tokens or TOKENS,
        payload=payload,
    )


def _decode(value: bytes | bytearray | memoryview, tokens: list[int] | None = None) -> memoryview:
    return wire.decode_page(
        value,
        codec="int8",
        dtype="bfloat16",
        shape=SHAPE,
        layout="L2-H1-D8-P4-bfloat16",
        tokens=tokens or TOKENS,
    )


def test_round_trip_returns_payload_view_without_copy() -> None:
    payload = np.random.default_rng(0).integers(0, 255, 1000, dtype=np.uint8).tobytes()
    value = bytearray(_page(payload))
    out = _decode(value)
    assert bytes(out) == payload
    value[-1] ^= 0xFF  # the view aliases the caller's buffer
    assert out[-1] == value[-1]


def test_header_and_payload_sent_separately_equal_one_value() -> None:
    payload = b"\x01" * 32
    head = wire.encode_header(
        codec="int8",
        dtype="bfloat16",
        shape=SHAPE,
        layout="L2-H1-D8-P4-bfloat16",
        tokens=TOKENS,
        payload=payload,
    )
    assert head + payload == _page(payload)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("codec", "int4", "codec"),
        ("dtype", "float16", "dtype"),
        ("shape", (2, 2, 1, 4, 16), "shape"),
        ("layout", "L30-H3-D64-P16-bfloat16", "layout"),
    ],
)
def test_mismatched_expectations_are_refused(field: str, value: object, message: str) -> None:
    expect = dict(codec="int8", dtype="bfloat16", shape=SHAPE, layout="L2-H1-D8-P4-bfloat16")
    expect[field] = value
    with pytest.raises(CorruptPage, match=message):
        wire.decode_page(_page(), tokens=TOKENS, **expect)  # type: ignore[arg-type]


def test_wrong_tokens_truncation_version_magic() -> None:
    value = _page()
    with pytest.raises(CorruptPage, match="token ids"):
        _decode(value, tokens=[101, 7, 99999, 4])
    with pytest.raises(CorruptPage, match="truncated"):
        _decode(value[:-1])
    with pytest.raises(CorruptPage, match="preamble"):
        _decode(value[:5])
    bumped = bytearray(value)
    bumped[4] = wire.VERSION + 1
    with pytest.raises(CorruptPage, match="version"):
        _decode(bumped)
    with pytest.raises(CorruptPage, match="magic"):
        _decode(b"GARBAGE-GARBAGE-GARBAGE")


def test_format_1_pages_are_rejected() -> None:
    """Format 2 changed the int8/int4 block layouts (fp16 int8 scales, per-token int4 value
    groups): a value an older build stored must be a miss, never decoded with the new layout."""
    assert wire.VERSION == 2
    old = bytearray(_page())
    old[4:6] = (1).to_bytes(2, "little")
    with pytest.raises(CorruptPage, match="page format version 1; this build reads version 2"):
        _decode(old)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_bit_flip_is_rejected(data: st.DataObject) -> None:
    value = bytearray(_page())
    bit = data.draw(st.integers(0, len(value) * 8 - 1))
    value[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptPage):
        _decode(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_decode(blob: bytes) -> None:
    with pytest.raises(CorruptPage):
        _decode(blob)
