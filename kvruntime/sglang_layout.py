"""SGLang host KV pools as kvruntime pages: which page format a pool has, how its pages move
to and from kvruntime's page-first unit, and their wire values.

SGLang's MHA host pool (``MHATokenToKVPoolHost``, SGLang 0.5.23) keeps K and V in one tensor
``kv_buffer`` whose order follows ``--hicache-mem-layout`` (T = token slots, N = page slots)::

    layer_first        [2, L, T, H, D]      indexed by token slot
    page_first         [2, T, L, H, D]      indexed by token slot
    page_first_direct  [2, N, L, P, H, D]   indexed by page slot
    page_head          [2, N, H, P, L, D]   indexed by page slot

Its *flat page* (``get_data_page``, the generic get/set path) is one page's slice of that
tensor, flattened: the order above with T -> P and N dropped. kvruntime stores every page as
``PageLayout.page_shape`` = [L, 2, H, P, D] through a codec, whatever the host layout, so
SGLang instances with different host layouts share pages (``HostPageFormat``).

Pools of any other kind (MLA, fp8 KV, layouts added later) are *raw*: their flat pages are
stored byte for byte in the pool's own order, so their namespace names the pool and layout
(``RawPageFormat``). This module imports nothing of SGLang; pools are read through their
attributes. Decoding verifies the wire header and checksum: a bad value raises CorruptPage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from kvruntime.errors import BadRequest, CorruptPage
from kvruntime.kernels.layout import DTYPES, PageLayout, dtype_name
from kvruntime.store.codec import get_codec
from kvruntime.store.wire import PREAMBLE_BYTES, decode_page, encode_header, read_header

# Axis order of each layout's kv_buffer with its slot dim named "n" (token-indexed layouts:
# "n", "P" split the token dim into pages); "kv" is K|V. A flat page is this order without "n".
HOST_AXES: dict[str, tuple[str, ...]] = {
    "layer_first": ("kv", "L", "n", "P", "H", "D"),
    "page_first": ("kv", "n", "P", "L", "H", "D"),
    "page_first_direct": ("kv", "n", "L", "P", "H", "D"),
    "page_head": ("kv", "n", "H", "P", "L", "D"),
}
PAGE_INDEXED = frozenset({"page_first_direct", "page_head"})
PAGE_AXES = ("L", "kv", "H", "P", "D")  # kvruntime's page [L, 2, H, P, D]
_POOL_DIMS = ("layer_num", "head_num", "head_dim", "page_size")  # SGLang's attribute names
HEADER_SLACK = 512  # bytes a landing buffer keeps above the payload for the wire header

Buffer = bytes | bytearray | memoryview


class DecodedPages(NamedTuple):
    hits: list[int]  # positions of the values that decoded
    pages: torch.Tensor  # [len(hits), L, 2, H, P, D] in the page dtype
    rejected: list[tuple[int, str]]  # (position, reason) of values that failed verification


@dataclass(frozen=True)
class HostPageFormat:
    """An MHA host pool's pages as kvruntime pages [L, 2, H, P, D], stored through ``codec``."""

    host_layout: str
    page: PageLayout
    codec: str = "none"

    def __post_init__(self) -> None:
        if self.host_layout not in HOST_AXES:
            raise BadRequest(f"host layout {self.host_layout!r} is not one of {list(HOST_AXES)}")
        get_codec(self.codec).page_nbytes(self.page)  # BadRequest if the codec cannot

    @classmethod
    def of_pool(cls, pool: Any, codec: str = "none") -> HostPageFormat | None:
        """The format of an MHA host pool, or None when the pool is of another kind (then
        its pages are raw). Checks the buffer's shape, so a look-alike pool is not misread."""
        layout = getattr(pool, "layout", None)
        buffer = getattr(pool, "kv_buffer", None)
        if layout not in HOST_AXES or not isinstance(buffer, torch.Tensor):
            return None
        try:
            L, H, D, P = (int(getattr(pool, a)) for a in _POOL_DIMS)
        except (AttributeError, TypeError, ValueError):
            return None
        if int(getattr(pool, "v_head_dim", D)) != D or getattr(pool, "dcp_size", 1) != 1:
            return None
        if buffer.dtype not in DTYPES.values() or min(L, H, D, P) <= 0:
            return None
        fmt = cls(layout, PageLayout(L, H, D, P, buffer.dtype), codec)
        slot_dim = HOST_AXES[layout].index("n")
        if buffer.dim() <= slot_dim:
            return None
        return fmt if tuple(buffer.shape) == fmt.buffer_shape(buffer.shape[slot_dim]) else None

    def buffer_shape(self, slots: int) -> tuple[int, ...]:
        """Shape of a host ``kv_buffer`` of ``slots`` slots (tokens, or pages where the
        layout is page-indexed): token-indexed layouts merge (n, P) into one slot dim."""
        names = HOST_AXES[self.host_layout]
        if self.host_layout not in PAGE_INDEXED:
            names = tuple(a for a in names if a != "P")
        sizes = self._sizes(slots)
        return tuple(sizes[a] for a in names)

    @property
    def dtype(self) -> torch.dtype:
        return self.page.dtype

    @property
    def flat_numel(self) -> int:
        return self.page.page_numel

    @property
    def value_nbytes(self) -> int:
        """Host bytes of one page (what SGLang moves), not the encoded size."""
        return self.page.page_nbytes

    @property
    def value_bound(self) -> int:
        """Largest wire value of one page: header room + the codec's block."""
        return PREAMBLE_BYTES + HEADER_SLACK + get_codec(self.codec).page_nbytes(self.page)

    def describe(self) -> str:
        """Namespace text: the page geometry (the host layout does not change stored bytes)."""
        return self.page.describe()

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a flat page of this pool (dtype and element count)."""
        return (tensor.dtype, tensor.numel()) == (self.dtype, self.flat_numel)

    # -- host pool <-> pages --------------------------------------------------------------
    def page_view(self, kv_buffer: torch.Tensor, first_slot: int) -> torch.Tensor:
        """The page whose token slots start at ``first_slot``, as a strided view
        [L, 2, H, P, D] into the pool (SGLang keeps a page's slots contiguous)."""
        names = HOST_AXES[self.host_layout]
        dim = names.index("n")
        if self.host_layout in PAGE_INDEXED:
            if first_slot % self.page.page_size:
                raise BadRequest(f"slot {first_slot} does not start a page of {self.host_layout}")
            page = kv_buffer.select(dim, first_slot // self.page.page_size)
        else:
            page = kv_buffer.narrow(dim, first_slot, self.page.page_size)
        return page.permute([names.index(a) - (names.index(a) > dim) for a in PAGE_AXES])

    def gather(self, kv_buffer: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
        """Pages starting at token slots ``starts`` as a new tensor [n, L, 2, H, P, D]."""
        out = torch.empty((len(starts), *self.page.page_shape), dtype=self.dtype)
        for j, start in enumerate(starts):
            out[j].copy_(self.page_view(kv_buffer, start))
        return out

    def scatter(self, kv_buffer: torch.Tensor, starts: Sequence[int], pages: torch.Tensor) -> None:
        """Write pages [n, L, 2, H, P, D] at token slots ``starts``; changes only those."""
        if tuple(pages.shape) != (len(starts), *self.page.page_shape):
            raise BadRequest(f"pages {tuple(pages.shape)} are not {len(starts)} of {self.page}")
        for j, start in enumerate(starts):
            self.page_view(kv_buffer, start).copy_(pages[j])

    def flat_view(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat page (``get_data_page``: the pool's order, contiguous) as a view
        [L, 2, H, P, D]."""
        if not flat.is_contiguous() or flat.numel() != self.flat_numel:
            raise BadRequest(f"a flat page is contiguous with {self.flat_numel} elements")
        names = [a for a in HOST_AXES[self.host_layout] if a != "n"]
        sizes = self._sizes(1)
        return flat.view([sizes[a] for a in names]).permute([names.index(a) for a in PAGE_AXES])

    # -- pages <-> wire values ------------------------------------------------------------
    def encode(self, pages: torch.Tensor) -> list[bytearray]:
        """Wire values (header + codec block) of pages [n, L, 2, H, P, D]."""
        out = []
        for block in get_codec(self.codec).encode(pages):  # [page_nbytes] uint8 each
            payload = block.numpy().data
            value = bytearray(encode_header(payload=payload, tokens=(), **self._header()))
            value += payload
            out.append(value)
        return out

    def decode(self, values: Sequence[Buffer | None]) -> DecodedPages:
        """Verify and decode wire values (None = absent) into pages."""
        codec = get_codec(self.codec)
        blocks = torch.empty((len(values), codec.page_nbytes(self.page)), dtype=torch.uint8)
        hits: list[int] = []
        rejected: list[tuple[int, str]] = []
        for i, value in enumerate(values):
            if value is None:
                continue
            try:
                payload = decode_page(value, tokens=(), **self._header())
            except CorruptPage as exc:
                rejected.append((i, str(exc)))
                continue
            blocks[len(hits)] = torch.frombuffer(payload, dtype=torch.uint8)
            hits.append(i)
        # [m, L, 2, H, P, D] in the KV dtype
        pages = torch.empty((len(hits), *self.page.page_shape), dtype=self.dtype)
        if hits:
            codec.decode(blocks[: len(hits)], self.page, pages)
        return DecodedPages(hits, pages, rejected)

    # -- internals ------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        p = self.page
        return {"codec": self.codec, "dtype": dtype_name(p.dtype), "shape": p.page_shape,
                "layout": p.describe()}  # fmt: skip

    def _sizes(self, n: int) -> dict[str, int]:
        p = self.page
        return dict(kv=2, n=n, L=p.num_layers, H=p.kv_heads, P=p.page_size, D=p.head_dim)


@dataclass(frozen=True)
class RawPageFormat:
    """Pages stored as the pool's flat pages, byte for byte (codec ``none``). Without a pool
    (``dtype`` None) any tensor is a value and keeps its own dtype and shape."""

    host_layout: str  # "<pool class>.<layout>", or "unregistered"
    dtype: torch.dtype | None = None
    flat_numel: int | None = None
    codec = "none"

    @classmethod
    def of_pool(cls, pool: Any) -> RawPageFormat:
        dummy = pool.get_dummy_flat_data_page()
        return cls(f"{type(pool).__name__}.{pool.layout}", dummy.dtype, int(dummy.numel()))

    @property
    def value_nbytes(self) -> int | None:
        if self.dtype is None or self.flat_numel is None:
            return None
        return self.flat_numel * self.dtype.itemsize

    @property
    def value_bound(self) -> int | None:
        size = self.value_nbytes
        return None if size is None else PREAMBLE_BYTES + HEADER_SLACK + size

    def describe(self) -> str:
        if self.dtype is None:
            return "raw-unregistered"
        return f"raw-{self.host_layout}-{dtype_text(self.dtype)}-N{self.flat_numel}"

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a page of this format (any tensor when unregistered)."""
        return self.dtype is None or (tensor.dtype, tensor.numel()) == (self.dtype, self.flat_numel)

    def encode(self, tensor: torch.Tensor) -> bytearray:
        data = tensor.detach().contiguous().cpu()
        payload = data.reshape(-1).view(torch.uint8).numpy().data
        value = bytearray(encode_header(
            codec="none", dtype=dtype_text(data.dtype), shape=tuple(data.shape),
            layout=self.describe(), tokens=(), payload=payload,
        ))  # fmt: skip
        value += payload
        return value

    def decode(self, value: Buffer, target: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor, copied into ``target`` (contiguous, same dtype and numel) when
        given, else a new tensor of the stored shape. CorruptPage when it fails to verify."""
        header, _ = read_header(value)
        want = header.dtype if self.dtype is None else dtype_text(self.dtype)
        payload = decode_page(value, codec="none", dtype=want, shape=header.shape,
                              layout=self.describe(), tokens=())  # fmt: skip
        try:
            dtype = dtype_of(header.dtype)
        except BadRequest as exc:
            raise CorruptPage(str(exc)) from None
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype)
        if data.numel() != _numel(header.shape):
            raise CorruptPage(f"payload holds {data.numel()} values; header says {header.shape}")
        if target is None:
            return data.reshape(header.shape)
        if target.dtype != dtype or target.numel() != data.numel() or not target.is_contiguous():
            # another writer's value under this key (unregistered namespace): not ours to load
            raise CorruptPage(f"stored {header.shape} {header.dtype} does not fit the target")
        target.view(-1).copy_(data)
        return target


def page_starts(host_indices: torch.Tensor, n: int, page_size: int) -> list[int]:
    """First token slot of each of ``n`` pages in ``host_indices`` (n * page_size slots, page
    after page). BadRequest unless every page is a run of consecutive slots, which is how
    SGLang's host pools hand pages out (its own get_data_page relies on it)."""
    if host_indices.dim() != 1 or host_indices.numel() != n * page_size:
        raise BadRequest(
            f"host_indices has {host_indices.numel()} slots; {n} pages need {n * page_size}"
        )
    slots = host_indices.to(torch.int64).view(n, page_size)
    firsts = slots[:, :1]
    if not bool((slots == firsts + torch.arange(page_size)).all()):
        raise BadRequest(f"each page's host slots must be {page_size} consecutive slots")
    return [int(x) for x in firsts.view(-1).tolist()]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def dtype_text(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (any torch dtype, fp8 included)."""
    return str(dtype).removeprefix("torch.")


def dtype_of(text: str) -> torch.dtype:
    """Inverse of ``dtype_text``; BadRequest for a name that is not a torch dtype."""
    value = getattr(torch, text, None)
    if not isinstance(value, torch.dtype):
        raise BadRequest(f"{text!r} is not a torch dtype")
    return value
