"""The transformers engine: a ``DynamicCache`` rebuilt from pages, extended by the suffix.

Positions are right for the suffix because the model derives them from the cache length; we
pass ``position_ids`` explicitly as well (cached length onward), so the RoPE rotation of the
suffix never depends on that inference. Works on "cpu" and "cuda" alike.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvruntime.engines.attention import use_fast_causal
from kvruntime.engines.base import (
    Engine,
    GeneratedToken,
    KVPrefix,
    KVState,
    PrefillResult,
    check_sampling,
)
from kvruntime.engines.layered import (
    DECODE_HEADROOM,
    HostKVPrefix,
    buffered_cache,
    restore_layered,
)
from kvruntime.engines.models import KVShape, LoadedModel, load_model
from kvruntime.engines.piecewise import PiecewiseForward, unsupported
from kvruntime.errors import BadRequest, ConfigError


@dataclass(frozen=True)
class EngineConfig:
    prefill_chunk_tokens: int = 2048  # bounds the attention scratch of a long prompt
    # bottom-right causal SDPA after cached tokens (engines/attention.py); False: stock sdpa
    fast_causal_attention: bool = True
    # Llama-shaped models run split at attention, from CUDA graphs on CUDA (engines/piecewise.py)
    piecewise_forward: bool = True
    graph_tokens: int = 2048  # the longest forward replayed from CUDA graphs (0: none)

    def __post_init__(self) -> None:
        if self.prefill_chunk_tokens <= 0:
            raise ConfigError(
                "EngineConfig.prefill_chunk_tokens must be positive,"
                f" got {self.prefill_chunk_tokens}"
            )
        if self.graph_tokens < 0:
            raise ConfigError(f"EngineConfig.graph_tokens must be >= 0, got {self.graph_tokens}")


@dataclass(eq=False)
class TransformersState(KVState):
    cache: Any  # transformers DynamicCache; layer i: keys/values [1, H, num_tokens, D]
    token_ids: list[int]
    logits: torch.Tensor  # [vocab] float32


class TransformersEngine(Engine):
    accepts_host_prefix = True

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.model = loaded.model
        self.layout = loaded.layout
        self.fingerprint = loaded.fingerprint
        self.dtype = loaded.dtype
        self.device = loaded.device
        self.max_context = loaded.max_context
        self.stop_token_ids = _stop_tokens(loaded)
        self._clock = clock
        use_fast_causal(self.model, self.config.fast_causal_attention)
        # transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (5.17 has only
        # the old name, 5.40 will drop it): use whichever this version declares.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.piecewise: PiecewiseForward | None = None
        if self.config.piecewise_forward and unsupported(self.model) is None:
            self.piecewise = PiecewiseForward(self.model, self.device, self.config.graph_tokens)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: str = "cpu", dtype: str | torch.dtype | None = None
    ) -> TransformersEngine:
        return cls(load_model(name_or_path, device=device, dtype=dtype))

    @torch.inference_mode()
    def prefill(
        self, token_ids: Sequence[int], past: KVPrefix | HostKVPrefix | None = None
    ) -> PrefillResult:
        """``Engine.prefill``; ``past`` may also be a ``HostKVPrefix`` (encoded pages in host
        memory), restored layer by layer while the forward runs (``engines/layered.py``). Then
        ``restore_s`` is only the time to launch the loads: the loads overlap the forward and
        count in ``prefill_s``."""
        tokens = [int(t) for t in token_ids]
        if not tokens:
            raise BadRequest("prefill needs at least one token")
        if len(tokens) > self.max_context:
            raise BadRequest(
                f"prompt of {len(tokens)} tokens exceeds the context of {self.max_context}"
            )
        start = self._now()
        cached = 0 if past is None else min(past.num_tokens, len(tokens) - 1)
        if isinstance(past, HostKVPrefix):
            cache = restore_layered(
                past, cached, self.model.config, self.layout, self.dtype, self.device,
                capacity=len(tokens) + DECODE_HEADROOM,
            )  # fmt: skip
            restored = self._clock()  # no device sync: that would wait for every layer's load
        else:
            if past is not None:
                self._check_pages(past)
            cache = kv_from_pages(
                past.pages if past is not None else None, cached, self.model.config,
                self.device, len(tokens) + DECODE_HEADROOM, (self.layout, self.dtype),
            )  # fmt: skip
            restored = self._now()
        logits = torch.empty(0)
        chunk = self.config.prefill_chunk_tokens
        for lo in range(cached, len(tokens), chunk):
            logits = self._forward(cache, tokens[lo : lo + chunk], lo)
        state = TransformersState(cache=cache, token_ids=tokens, logits=logits)
        done = self._now()
        return PrefillResult(
            state, logits, cached, len(tokens) - cached, restored - start, done - restored
        )

    def decode(
        self,
        state: KVState,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[GeneratedToken]:
        check_sampling(max_tokens, temperature, top_p)
        st = self._own(state)
        stops = frozenset(self.stop_token_ids if stop_token_ids is None else stop_token_ids)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return self._decode(st, max_tokens, temperature, top_p, stops, generator)

    def _decode(
        self,
        st: TransformersState,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stops: frozenset[int],
        generator: torch.Generator | None,
    ) -> Iterator[GeneratedToken]:
        token = -1
        for i in range(max_tokens):
            if i:  # feed the token yielded last, now that the consumer wants another
                with torch.inference_mode():
                    st.logits = self._forward(st.cache, [token], st.num_tokens)
                st.token_ids.append(token)
            token = sample_token(st.logits, temperature, top_p, generator)
            if token in stops:
                yield GeneratedToken(token, "stop")
                return
            # Feeding this token needs position num_tokens < max_context.
            full = i == max_tokens - 1 or st.num_tokens + 1 >= self.max_context
            yield GeneratedToken(token, "length" if full else None)
            if full:
                return

    def export_pages(
        self, state: KVState, start_token: int, num_pages: int, page_size: int
    ) -> torch.Tensor:
        return pages_from_kv(self._own(state).cache, start_token, num_pages, page_size)

    def _forward(self, cache: Any, tokens: list[int], offset: int) -> torch.Tensor:
        if self.piecewise is not None:
            return self.piecewise.forward(cache, tokens, offset)
        # [1, S] int64 ids and their absolute positions offset.. offset+S-1
        ids = torch.tensor([tokens], dtype=torch.int64, device=self.device)
        positions = torch.arange(offset, offset + len(tokens), device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,  # only the last position's vocab projection
            **{self._cache_kwarg: cache},
        )
        return out.logits[0, -1].float()  # [vocab] float32

    def _check_pages(self, past: KVPrefix) -> None:
        pages, (L, H, D) = past.pages, self.layout
        if pages.dim() != 6 or pages.shape[1:4] != (L, 2, H) or pages.shape[5] != D:
            raise BadRequest(
                f"KV pages must be [n, {L}, 2, {H}, P, {D}] for this model,"
                f" got {tuple(pages.shape)}"
            )
        if pages.dtype != self.dtype:
            raise BadRequest(f"KV pages are {pages.dtype}; this engine computes {self.dtype}")
        if not 0 <= past.num_tokens <= pages.shape[0] * pages.shape[4]:
            raise BadRequest(
                f"{past.num_tokens} past tokens do not fit in {pages.shape[0]} pages of "
                f"{pages.shape[4]}"
            )

    def _own(self, state: KVState) -> TransformersState:
        if not isinstance(state, TransformersState):
            raise BadRequest(f"state {type(state).__name__} was not made by a TransformersEngine")
        return state

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # time the work, not its launch
        return self._clock()


def kv_from_pages(
    pages: torch.Tensor | None,
    num_tokens: int,
    config: Any,
    device: torch.device | str,
    capacity: int | None = None,
    layout: tuple[KVShape, torch.dtype] | None = None,
) -> Any:
    """A ``DynamicCache`` holding the first ``num_tokens`` tokens of page-first ``pages``
    ``[n, L, 2, H, P, D]`` (None or 0 tokens: an empty cache). ``pages`` is only read.

    ``capacity``: make it a ``buffered_cache`` with room for that many tokens, so the forwards
    that follow write into it instead of concatenating (a copy of every layer's KV each time);
    with no pages, ``layout`` (the model's KV shape and dtype) gives the buffer's shape."""
    from transformers import DynamicCache

    src = None  # [L, 2, H, num_tokens, D] on the engine's device
    if pages is not None and num_tokens:
        n, L, _, H, P, D = pages.shape
        src = pages.to(device, non_blocking=True).permute(1, 2, 3, 0, 4, 5)
        src = src.reshape(L, 2, H, n * P, D)[:, :, :, :num_tokens]
    if capacity is None:
        cache = DynamicCache(config=config)
        for layer, (keys, values) in enumerate(src if src is not None else ()):
            # [1, H, T, D] each; the first suffix token's update concatenates them anew
            cache.update(keys.unsqueeze(0), values.unsqueeze(0), layer)
        return cache
    if pages is not None:
        (_, L, _, H, _, D), dtype = pages.shape, pages.dtype
    elif layout is not None:
        (L, H, D), dtype = layout
    else:
        raise BadRequest("a buffered cache without pages needs the model's layout")
    kv = torch.empty((L, 2, H, max(capacity, num_tokens), D), dtype=dtype, device=device)
    if src is not None:
        kv[:, :, :, :num_tokens] = src
    return buffered_cache(kv, num_tokens, config)


def pages_from_kv(cache: Any, start_token: int, num_pages: int, page_size: int) -> torch.Tensor:
    """Copy tokens ``[start_token, start_token + num_pages * page_size)`` of ``cache`` into new
    page-first pages ``[num_pages, L, 2, H, P, D]``; see ``Engine.export_pages`` for the rules."""
    length = cache.get_seq_length()
    end = start_token + num_pages * page_size
    if page_size <= 0 or num_pages < 0 or start_token < 0 or start_token % page_size:
        raise BadRequest(
            f"export needs a page-aligned start and page_size > 0, got start {start_token}, "
            f"{num_pages} pages of {page_size}"
        )
    if num_pages and end - page_size >= length:
        raise BadRequest(
            f"pages up to token {end} requested from a cache of {length} tokens; only the last"
            " page may be partial"
        )
    first = cache.layers[0].keys  # [1, H, T, D]
    _, H, _, D = first.shape
    L = len(cache.layers)
    # [L, 2, H, n*P, D]: zero rows beyond the cache's tokens (a partial last page)
    kv = first.new_zeros((L, 2, H, num_pages * page_size, D))
    stop = min(end, length)
    for i, layer in enumerate(cache.layers):
        kv[i, 0, :, : stop - start_token] = layer.keys[0, :, start_token:stop]
        kv[i, 1, :, : stop - start_token] = layer.values[0, :, start_token:stop]
    # -> [n, L, 2, H, P, D], contiguous
    return kv.view(L, 2, H, num_pages, page_size, D).permute(3, 0, 1, 2, 4, 5).contiguous()


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling over ``softmax(logits / T)``."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [vocab]
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest head whose mass reaches top_p (the top token always stays)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _stop_tokens(loaded: LoadedModel) -> tuple[int, ...]:
    ids: set[int] = set()
    generation = getattr(loaded.model, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(t) for t in source)
    return tuple(sorted(ids))
