"""Session: one agent conversation. Each ``chat`` re-sends the whole conversation (as agents
do); the runtime reuses whatever prefix is cached, across turns, forks and sessions."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvruntime.engines.chat import render
from kvruntime.errors import BadRequest
from kvruntime.results import ChatResult

if TYPE_CHECKING:
    from kvruntime.runtime import OnToken, Runtime, SamplingParams


class Session:
    """Not for concurrent use by several threads (a conversation is sequential); different
    sessions may be driven from different threads at once."""

    def __init__(self, runtime: Runtime, session_id: str, tenant: str, exact: bool = False) -> None:
        self.runtime = runtime
        self.session_id = session_id
        self.tenant = tenant
        self.exact = exact
        self.turns = 0
        self.closed = False
        self.last_prompt: list[int] | None = None
        self.last_tokens: list[int] = []  # last prompt + its completion

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int = 64,
        temperature: float = 0.0,
        tools: Sequence[Mapping[str, Any]] | None = None,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        on_token: OnToken | None = None,
    ) -> ChatResult:
        """Render ``messages`` (and ``tools``) with the model's chat template and run a turn.
        Raises ``BadRequest`` for malformed messages, ``Overloaded`` when the queue is full."""
        from kvruntime.runtime import SamplingParams

        tokens = render(self.runtime.tokenizer, messages, tools)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(max_tokens, temperature, top_p, stops, seed)
        return self.run_tokens(tokens, params, on_token)

    def run_tokens(
        self,
        tokens: list[int],
        params: SamplingParams,
        on_token: OnToken | None = None,
        recompute_ttft_s: float | None = None,
    ) -> ChatResult:
        """A turn on prompt token ids (already rendered). ``recompute_ttft_s``: a measured
        baseline to keep beside this turn in analytics."""
        from kvruntime.runtime import TurnRequest

        if self.closed:
            raise BadRequest(f"session {self.session_id!r} is closed")
        request = TurnRequest(
            tokens=tokens,
            tenant=self.tenant,
            session_id=self.session_id,
            turn=self.turns,
            params=params,
            exact_only=self.exact,
            previous_prompt=self.last_prompt,
            on_token=on_token,
            recompute_ttft_s=recompute_ttft_s,
        )
        result = self.runtime.run(request)
        self.turns += 1
        self.last_prompt = tokens
        self.last_tokens = tokens + result.token_ids
        return result

    def fork(self) -> Session:
        """A new session that starts from this one's history; they share cached pages."""
        child = self.runtime.session(uuid.uuid4().hex[:16], tenant=self.tenant, exact=self.exact)
        child.last_prompt = self.last_prompt
        child.last_tokens = list(self.last_tokens)
        return child

    def pin(self, ttl_s: float) -> int:
        """Keep this session's cached pages on the device for ``ttl_s`` seconds (e.g. while a
        tool runs); afterwards they are demoted as usual, not dropped. Returns pinned tokens."""
        if ttl_s <= 0:
            raise BadRequest(f"pin ttl_s must be positive, got {ttl_s}")
        return self.runtime.pins.pin(self.session_id, self.tenant, self.last_tokens, ttl_s)

    def unpin(self) -> None:
        self.runtime.pins.unpin(self.session_id)

    def prefetch(self) -> None:
        """Hint that the next turn is coming: bring this session's spilled pages back to the
        device in the background (queued behind running turns; returns at once)."""
        if self.last_tokens:
            self.runtime.prefetch(self.last_tokens, self.tenant)

    def close(self) -> None:
        """Release the session (its pins); cached pages stay for other sessions to reuse."""
        if not self.closed:
            self.closed = True
            self.runtime.pins.unpin(self.session_id)
            self.runtime.forget_session(self.session_id)
