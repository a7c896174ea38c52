"""Wire format of one stored page: a fixed preamble, a msgpack header, then the payload.

    preamble  b"KVRP" | u16 format version | u32 header length      (10 bytes, little-endian)
    header    msgpack map: codec, dtype, page shape, layout text, token ids (int32 LE bytes),
              payload length, payload checksum (xxh3-64)
    payload   the codec's page block (``Codec.page_nbytes(layout)`` bytes)

Decoding verifies everything it can against what the caller expects (codec, layout, the
page's token ids) and the checksum; any mismatch raises ``CorruptPage`` with the reason, so a
bad value is a miss that gets recomputed, never wrong KV. The payload comes back as a view
into the caller's buffer: no copy.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np
import xxhash

from kvruntime.errors import CorruptPage

MAGIC = b"KVRP"
# 2: int8 scales fp16 (were fp32), int4 values in per-token groups of min(128, D) channels
# (were 32): a version-1 value would decode as garbage, so it is rejected (a miss) instead.
VERSION = 2
_PREAMBLE = struct.Struct("<4sHI")
PREAMBLE_BYTES = _PREAMBLE.size
# Largest header accepted; a page of 1024 tokens carries 4 KiB of token ids plus a few fields.
MAX_HEADER_BYTES = 1 << 16

Buffer = bytes | bytearray | memoryview


class PageHeader(NamedTuple):
    codec: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    tokens: tuple[int, ...]
    payload_len: int
    checksum: int


def checksum(payload: Buffer) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def encode_header(
    *,
    codec: str,
    dtype: str,
    shape: Sequence[int],
    layout: str,
    tokens: Sequence[int],
    payload: Buffer,
) -> bytes:
    """Preamble + msgpack header for ``payload``; send it followed by the payload itself."""
    header = msgpack.packb(
        {
            "codec": codec,
            "dtype": dtype,
            "shape": list(shape),
            "layout": layout,
            "tokens": _tokens_bytes(tokens),
            "payload_len": len(memoryview(payload).cast("B")),
            "checksum": checksum(payload),
        },
        use_bin_type=True,
    )
    return _PREAMBLE.pack(MAGIC, VERSION, len(header)) + header


def encode_page(
    *,
    codec: str,
    dtype: str,
    shape: Sequence[int],
    layout: str,
    tokens: Sequence[int],
    payload: Buffer,
) -> bytes:
    """One contiguous value (header + payload). Prefer sending header and payload as two
    buffers where the transport supports it, to avoid this copy."""
    head = encode_header(
        codec=codec, dtype=dtype, shape=shape, layout=layout, tokens=tokens, payload=payload
    )
    return head + bytes(memoryview(payload).cast("B"))


def read_header(value: Buffer) -> tuple[PageHeader, int]:
    """Parse preamble and header; returns the header and the payload's offset."""
    view = memoryview(value).cast("B")
    if len(view) < PREAMBLE_BYTES:
        raise CorruptPage(
            f"value of {len(view)} bytes is shorter than the {PREAMBLE_BYTES}-byte preamble"
        )
    magic, version, header_len = _PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptPage(f"bad magic {bytes(magic)!r}; expected {MAGIC!r}: not a kvruntime page")
    if version != VERSION:
        raise CorruptPage(f"page format version {version}; this build reads version {VERSION}")
    if header_len > MAX_HEADER_BYTES or PREAMBLE_BYTES + header_len > len(view):
        raise CorruptPage(f"header length {header_len} does not fit a value of {len(view)} bytes")
    try:
        raw: Any = msgpack.unpackb(view[PREAMBLE_BYTES : PREAMBLE_BYTES + header_len], raw=False)
        header = PageHeader(
            codec=str(raw["codec"]),
            dtype=str(raw["dtype"]),
            shape=tuple(int(x) for x in raw["shape"]),
            layout=str(raw["layout"]),
            tokens=tuple(np.frombuffer(raw["tokens"], dtype="<i4").tolist()),
            payload_len=int(raw["payload_len"]),
            checksum=int(raw["checksum"]),
        )
    except (ValueError, KeyError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise CorruptPage(f"unreadable page header: {exc}") from None
    return header, PREAMBLE_BYTES + header_len


def decode_page(
    value: Buffer,
    *,
    codec: str,
    dtype: str,
    shape: Sequence[int],
    layout: str,
    tokens: Sequence[int],
) -> memoryview:
    """Verify ``value`` against what the caller expects; return the payload as a view.

    Raises ``CorruptPage`` naming the first mismatch (truncation, bit flip, other version,
    other codec/model layout, other tokens)."""
    header, offset = read_header(value)
    view = memoryview(value).cast("B")
    expected = {"codec": codec, "dtype": dtype, "shape": tuple(shape), "layout": layout}
    for field, want in expected.items():
        got = getattr(header, field)
        if got != want:
            raise CorruptPage(f"page {field} is {got!r}; expected {want!r}")
    if header.tokens != tuple(tokens):
        raise CorruptPage(
            "page token ids differ from the prompt's: a hash collision or a wrong key"
        )
    payload = view[offset:]
    if len(payload) != header.payload_len:
        raise CorruptPage(
            f"payload is {len(payload)} bytes; header says {header.payload_len}"
            " (truncated or padded)"
        )
    if checksum(payload) != header.checksum:
        raise CorruptPage("payload checksum mismatch (bit flip or torn write)")
    return payload
