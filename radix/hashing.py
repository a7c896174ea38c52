"""Page keys that every process computes identically: chained blake2b over token bytes.

``h_i = blake2b(h_{i-1} || tokens of page i)`` with 16-byte digests, where token ids are
encoded as little-endian uint32 (never Python's ``hash()``, which is salted per process).
The chain starts from a namespace digest of (model fingerprint, KV layout, tenant, salt), so
a tenant, a model or a layout never shares a key with another. A *storage key* for one tier
adds that tier's codec and the page's lineage (exact, or computed on top of a lossily
restored prefix), so lossy or approximate KV is never read where exact KV was asked for.
"""

from __future__ import annotations

import hashlib
import re
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvruntime.errors import BadRequest

HASH_BYTES = 16
TOKEN_BYTES = 4
# distinct blake2b personalisations keep namespace and page digests in separate domains
_NS_PERSON = b"kvr-ns-v1"
_PAGE_PERSON = b"kvr-page-v1"
_TYPECODE = next(code for code in "IL" if array(code).itemsize == TOKEN_BYTES)
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def encode_tokens(tokens: Iterable[int]) -> bytes:
    """Token ids as little-endian uint32 bytes: the one encoding the tree compares and hashes.

    Accepts a list, tuple or any iterable of ints, or a 1-D integer array/tensor (anything
    with ``ndim`` and ``tolist()``). Raises BadRequest for ids outside [0, 2**32) or non-ints.
    """
    if isinstance(tokens, str | bytes | bytearray | memoryview):
        raise BadRequest(f"tokens must be a sequence of int ids, got {type(tokens).__name__}")
    ndim = getattr(tokens, "ndim", None)
    if ndim is not None:
        if ndim != 1:
            raise BadRequest(f"token tensors must be 1-D, got ndim={ndim}")
        tokens = tokens.tolist()  # type: ignore[attr-defined]
    try:
        encoded = array(_TYPECODE, tokens)
    except (OverflowError, TypeError) as exc:
        raise BadRequest(f"token ids must be ints in [0, 2**32): {exc}") from None
    if sys.byteorder == "big":
        encoded.byteswap()
    return encoded.tobytes()


def decode_tokens(encoded: bytes) -> list[int]:
    """Inverse of ``encode_tokens``."""
    values = array(_TYPECODE, encoded)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BadRequest(f"{what} must be a non-empty name of [A-Za-z0-9_.-], got {value!r}")


@dataclass(frozen=True)
class Namespace:
    """Who may share KV: same model weights, same KV layout, same tenant (and salt).

    ``layout`` is ``PageLayout.describe()``; ``salt`` lets a tenant isolate itself further
    (e.g. per-user caches). ``digest`` seeds every page hash chain of this namespace.
    """

    model: str
    layout: str
    tenant: str
    salt: bytes = b""
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("model", "layout", "tenant"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise BadRequest(f"Namespace.{name} must be str, got {value!r}")
        if not self.model or not self.layout:
            raise BadRequest("Namespace.model and Namespace.layout must be non-empty")
        if not isinstance(self.salt, bytes):
            raise BadRequest(f"Namespace.salt must be bytes, got {type(self.salt).__name__}")
        h = hashlib.blake2b(digest_size=HASH_BYTES, person=_NS_PERSON)
        for part in (self.model.encode(), self.layout.encode(), self.tenant.encode(), self.salt):
            # length prefixes: ("ab", "c") and ("a", "bc") must not collide
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        object.__setattr__(self, "digest", h.digest())


def chain_blob(parent: bytes, encoded: bytes | memoryview, page_size: int) -> bytes:
    """Hashes of the full pages in ``encoded`` (token bytes), chained from ``parent``.

    Returns the 16-byte digests concatenated (the tree stores them this way); a trailing
    partial page is ignored.
    """
    step = page_size * TOKEN_BYTES
    view = memoryview(encoded)
    num_pages = len(view) // step
    out = bytearray(num_pages * HASH_BYTES)
    prev = parent
    for i in range(num_pages):
        h = hashlib.blake2b(prev, digest_size=HASH_BYTES, person=_PAGE_PERSON)
        h.update(view[i * step : (i + 1) * step])
        prev = h.digest()
        out[i * HASH_BYTES : (i + 1) * HASH_BYTES] = prev
    return bytes(out)


def split_blob(blob: bytes) -> list[bytes]:
    """Concatenated digests -> one bytes object per page."""
    return [blob[i : i + HASH_BYTES] for i in range(0, len(blob), HASH_BYTES)]


def page_hashes(
    namespace: Namespace, tokens: Iterable[int], page_size: int, parent: bytes | None = None
) -> list[bytes]:
    """Chained hashes of the full pages of ``tokens``.

    ``parent`` continues a chain (the hash of the page before ``tokens[0]``); without it the
    chain starts at ``namespace.digest``.
    """
    if not isinstance(page_size, int) or page_size <= 0:
        raise BadRequest(f"page_size must be a positive int, got {page_size!r}")
    if parent is not None and (not isinstance(parent, bytes) or len(parent) != HASH_BYTES):
        raise BadRequest(f"parent must be a {HASH_BYTES}-byte page hash")
    seed = namespace.digest if parent is None else parent
    return split_blob(chain_blob(seed, encode_tokens(tokens), page_size))


def storage_key(page_hash: bytes, codec: str, exact: bool = True, prefix: str = "kvr") -> str:
    """Stable text key of one page in one tier: ``prefix:codec:exact|approx:hex``.

    The codec is part of the key because a page stored under another codec is other bytes;
    the lineage is part of it so approximate KV never answers an exact lookup.
    """
    if not isinstance(page_hash, bytes) or len(page_hash) != HASH_BYTES:
        raise BadRequest(f"page_hash must be {HASH_BYTES} bytes, got {page_hash!r}")
    _check_name("codec", codec)
    _check_name("prefix", prefix)
    return f"{prefix}:{codec}:{'exact' if exact else 'approx'}:{page_hash.hex()}"
