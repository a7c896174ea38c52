"""Runs one HTTP request's turn on the runtime, off the event loop.

Rendering, tokenizing and the turn itself happen on a worker thread (the runtime queues turns
on its engine thread; a full queue raises ``Overloaded`` at once). Requests without a session id
go straight to ``Runtime.run``: reuse works by content and no session state is kept. With a
session id, the turn runs in ``rt.session(session_id, tenant)``, which keeps the previous prompt
(divergence analytics), pins and prefetch; turns of one session are serialised here, since a
session is a sequential conversation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from kvruntime.divergence import Divergence, find_divergence
from kvruntime.errors import BadRequest
from kvruntime.results import ChatResult
from kvruntime.runtime import OnToken, Runtime, SamplingParams, TurnRequest
from kvruntime.server.errors import APIError

T = TypeVar("T")


@dataclass(frozen=True)
class TurnContext:
    """Who is asking: the tenant (``x-tenant``), an optional session id, and sampling."""

    tenant: str
    session_id: str | None
    token_limit: int | None  # max_tokens as asked; None: up to the context (capped)
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    prompt_param: str = "messages"  # names the request field in over-long prompt errors


class TurnOutcome(NamedTuple):
    result: ChatResult
    divergence: Divergence | None  # where this prompt left the session's previous one
    prompt: list[int]


class TurnRunner:
    """Thread-safe; one per app. ``workers`` threads wait on turns, so it should exceed the
    runtime's ``max_queue``: then a burst meets ``Overloaded`` instead of waiting here."""

    def __init__(self, runtime: Runtime, workers: int, default_max_tokens: int | None) -> None:
        self.runtime = runtime
        self.default_max_tokens = default_max_tokens
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvr-http")
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._busy = 0  # turns being tokenized, queued or run
        self._busy_lock = threading.Lock()

    @property
    def turns_in_progress(self) -> int:
        return self._busy

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def run(
        self,
        ctx: TurnContext,
        prompt: Callable[[], list[int]],
        on_token: OnToken | None = None,
    ) -> TurnOutcome:
        """Tokenize (``prompt()``, on the worker) and run the turn. Raises ``APIError`` or
        kvruntime errors (``BadRequest``, ``Overloaded``) for the caller to answer with."""
        if ctx.session_id is None:
            return await self.call(self._turn, ctx, prompt, on_token)
        key = (ctx.tenant, ctx.session_id)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                return await self.call(self._turn, ctx, prompt, on_token)
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def _turn(
        self, ctx: TurnContext, prompt: Callable[[], list[int]], on_token: OnToken | None
    ) -> TurnOutcome:
        with self._busy_lock:
            self._busy += 1
        try:
            return self._turn_inner(ctx, prompt, on_token)
        finally:
            with self._busy_lock:
                self._busy -= 1

    def _turn_inner(
        self, ctx: TurnContext, prompt: Callable[[], list[int]], on_token: OnToken | None
    ) -> TurnOutcome:
        tokens = prompt()
        params = SamplingParams(
            self._max_tokens(ctx, len(tokens)), ctx.temperature, ctx.top_p, ctx.stop, ctx.seed
        )
        rt = self.runtime
        if ctx.session_id is None:
            request = TurnRequest(tokens, ctx.tenant, "", 0, params, on_token=on_token)
            return TurnOutcome(rt.run(request), None, tokens)
        session = rt.session(ctx.session_id, tenant=ctx.tenant)
        previous = session.last_prompt
        result = session.run_tokens(tokens, params, on_token)
        divergence = None
        if previous is not None:
            divergence = find_divergence(previous, tokens, self.detokenize)
        return TurnOutcome(result, divergence, tokens)

    def _max_tokens(self, ctx: TurnContext, prompt_tokens: int) -> int:
        limit = self.runtime.engine.max_context
        if prompt_tokens >= limit:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens, more than this model's maximum context"
                f" length of {limit} tokens (the completion needs at least one more)",
                param=ctx.prompt_param,
                code="context_length_exceeded",
            )
        room = limit - prompt_tokens
        if ctx.token_limit is None:
            return min(room, self.default_max_tokens or room)
        if ctx.token_limit > room:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt has"
                f" {prompt_tokens} and max_tokens asks for {ctx.token_limit} more",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return ctx.token_limit

    def detokenize(self, tokens: Sequence[int]) -> str:
        return str(self.runtime.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def pin(self, tenant: str, session_id: str, ttl_s: float) -> int:
        """Pin the session's cached pages for ``ttl_s`` (on a worker: it takes the cache lock)."""
        return self.runtime.session(session_id, tenant=tenant).pin(ttl_s)

    def check_token_ids(self, ids: Sequence[int]) -> list[int]:
        vocab = len(self.runtime.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token ids must be in [0, {vocab}); got {bad[:5]}")
        return list(ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
