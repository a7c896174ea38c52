"""The engine interface: compute the uncached suffix of a prompt on top of restored KV, decode.

KV crosses this interface as page-first pages ``[n, L, 2, H, P, D]`` (pages, layers, K|V,
kv_heads, page_size, head_dim) — the unit the host tier, the wire format and the gather/scatter
kernels already use — so the runtime hands pages straight from the pool or the host tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from kvruntime.engines.models import KVShape
from kvruntime.errors import BadRequest

if TYPE_CHECKING:
    from kvruntime.engines.layered import HostKVPrefix


class KVPrefix(NamedTuple):
    """Restored KV of the first ``num_tokens`` tokens of a prompt.

    ``pages``: ``[n, L, 2, H, P, D]`` in the engine's dtype, on any device; token ``t`` lives in
    page ``t // P`` at row ``t % P``. Rows past ``num_tokens`` (a partial last page, or whole
    extra pages) are ignored. The engine never writes into ``pages``.
    """

    pages: torch.Tensor
    num_tokens: int


class GeneratedToken(NamedTuple):
    token_id: int
    finish_reason: str | None  # None while generating; "stop" or "length" on the last token


class KVState(ABC):
    """A turn's live KV on the engine's device: a handle the runtime passes back to the engine.

    ``token_ids`` are the tokens whose KV the state holds, in order; ``logits`` (``[vocab]``
    float32) predict the token after them. Owned by one turn; not thread-safe.
    """

    token_ids: list[int]
    logits: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class PrefillResult:
    state: KVState  # live: decoding grows it and replaces its logits
    logits: torch.Tensor  # [vocab] float32 after the prompt; unchanged by decoding
    cached_tokens: int  # prompt tokens whose KV came from ``past``
    computed_tokens: int  # prompt tokens run through the model (always >= 1)
    restore_s: float  # pages -> per-layer cache tensors on the device
    prefill_s: float  # the forward passes over the computed tokens


class Engine(ABC):
    """A model that extends restored KV and decodes. One turn at a time (the runtime's worker)."""

    layout: KVShape
    fingerprint: str
    dtype: torch.dtype
    device: torch.device
    max_context: int
    stop_token_ids: tuple[int, ...]  # the model's end-of-turn tokens, decode's default stops
    # True when ``prefill`` also takes a ``layered.HostKVPrefix`` (host pages loaded layer by
    # layer beside the forward): the runtime then leaves host-tier pages where they are
    accepts_host_prefix: bool = False

    @abstractmethod
    def prefill(
        self, token_ids: Sequence[int], past: KVPrefix | HostKVPrefix | None = None
    ) -> PrefillResult:
        """Compute the KV of ``token_ids`` (the whole prompt) after ``past``'s first tokens.

        ``past`` must hold the exact (or, for a lossy tier, approximate) KV of
        ``token_ids[:past.num_tokens]``; the engine cannot check the tokens, the caller does.
        At least the last prompt token is always recomputed, because its logits are needed:
        a ``past`` covering the whole prompt (or more) is used for ``len(token_ids) - 1``
        tokens. A ``HostKVPrefix`` is passed only to engines whose ``accepts_host_prefix`` is
        True. Raises ``BadRequest`` for an empty or over-long prompt, or pages whose shape,
        dtype or count do not match the model.
        """

    @abstractmethod
    def decode(
        self,
        state: KVState,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[GeneratedToken]:
        """Yield up to ``max_tokens`` tokens sampled from ``state`` (greedy at temperature 0).

        Lazy: each token is sampled when the consumer asks for it, and the previous one is run
        through the model only then, so closing the generator early costs nothing. The last
        yielded token is not in the KV (``state.token_ids`` ends one before it); the next turn's
        prefill computes it. A stop token (``stop_token_ids``, default the model's
        ``stop_token_ids``) is yielded with ``finish_reason="stop"``; reaching ``max_tokens`` or
        the context limit gives ``"length"``. ``state`` grows as tokens are fed.
        """

    @abstractmethod
    def export_pages(
        self, state: KVState, start_token: int, num_pages: int, page_size: int
    ) -> torch.Tensor:
        """Copy the KV of tokens ``[start_token, start_token + num_pages * page_size)`` out of
        ``state`` as page-first pages ``[num_pages, L, 2, H, P, D]`` on the engine's device.

        ``start_token`` must be page-aligned. Every page but the last must be full in ``state``;
        the rows of the last page past ``state.num_tokens`` are zero (only full pages may go to
        host or Redis: the caller decides). Raises ``BadRequest`` otherwise.
        """


def check_sampling(max_tokens: int, temperature: float, top_p: float) -> None:
    if max_tokens < 0:
        raise BadRequest(f"max_tokens must be >= 0, got {max_tokens}")
    if not temperature >= 0.0:
        raise BadRequest(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}")
