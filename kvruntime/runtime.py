"""Runtime: the turn lifecycle over an engine and the KV cache (DESIGN.md, "Data flow of one
turn"). Sessions and the token-level ``generate`` both end up in ``_turn``, which runs on the
engine's one worker thread."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvruntime.analytics import Analytics, Stats, TurnRecord
from kvruntime.calibrate import calibrate
from kvruntime.config import RuntimeConfig
from kvruntime.divergence import find_divergence
from kvruntime.engines.base import Engine, check_sampling
from kvruntime.errors import BadRequest, Overloaded
from kvruntime.kvcache import KVCache
from kvruntime.lookup import Lookup
from kvruntime.pins import PinTable
from kvruntime.results import TIERS, ChatResult, Timings, Usage
from kvruntime.scheduler import TurnQueue
from kvruntime.session import Session

log = logging.getLogger(__name__)

OnToken = Callable[[int, str], None]  # (token id, text delta)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.max_tokens, self.temperature, self.top_p)


@dataclass(frozen=True)
class TurnRequest:
    tokens: list[int]
    tenant: str
    session_id: str
    turn: int
    params: SamplingParams
    exact_only: bool = False
    previous_prompt: Sequence[int] | None = None
    on_token: OnToken | None = None
    reuse: bool = True  # False: recompute this turn and cache nothing (a baseline)
    record: bool = True  # False: leave this turn out of analytics (a baseline)
    recompute_ttft_s: float | None = None  # a measured baseline, kept in the turn's record


class Runtime:
    """Owns the engine, the KV cache, the turn queue and analytics. Thread-safe: any thread
    may drive sessions; turns run one at a time on the engine thread."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        config: RuntimeConfig | None = None,
        clock: Callable[[], float] = time.perf_counter,
        analytics: Analytics | None = None,
    ) -> None:
        self.config = config or RuntimeConfig()
        self.engine = engine
        self.tokenizer = tokenizer
        self._clock = clock
        self.layout = engine.layout.page_layout(self.config.page_size, engine.dtype)
        self.analytics = analytics or Analytics()
        self.cost = calibrate(engine, self.layout, self.config)
        self.cache = KVCache(self.layout, engine.fingerprint, self.config, self.cost)
        self.queue = TurnQueue(self.config.max_queue, clock=clock)
        self.pins = PinTable(self.cache, clock)
        # named sessions, least recently used first; bounded so a long-lived server that sees
        # endless session ids does not grow (an evicted session object only loses its
        # divergence baseline and pin; its cached pages stay in the index)
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_pretrained(cls, model: str, config: RuntimeConfig | None = None) -> Runtime:
        """Load ``model`` (an alias such as ``"smollm2"``, a local path, or a cached hub id)."""
        from kvruntime.engines.transformers import TransformersEngine

        config = config or RuntimeConfig()
        engine = TransformersEngine.from_pretrained(model, device=config.device, dtype=config.dtype)
        return cls(engine, engine.loaded.tokenizer, config)

    # ------------------------------------------------------------------ public API

    def session(
        self, session_id: str | None = None, tenant: str = "default", exact: bool = False
    ) -> Session:
        """A conversation. ``exact=True`` never reuses KV restored through a lossy codec."""
        sid = session_id or uuid.uuid4().hex[:16]
        with self._sessions_lock:
            existing = self._sessions.get(sid)
            if existing is not None and not existing.closed:
                if existing.tenant != tenant:
                    raise BadRequest(f"session {sid!r} belongs to another tenant")
                self._sessions.move_to_end(sid)
                return existing
            s = Session(self, sid, tenant, exact=exact)
            self._sessions[sid] = s
            while len(self._sessions) > self.config.max_sessions:
                _, old = self._sessions.popitem(last=False)
                self.pins.unpin(old.session_id)
        return s

    def forget_session(self, session_id: str) -> None:
        """Drop a closed session's bookkeeping (``Session.close`` calls this)."""
        with self._sessions_lock:
            self._sessions.pop(session_id, None)

    @property
    def active_sessions(self) -> int:
        with self._sessions_lock:
            return sum(not s.closed for s in self._sessions.values())

    def generate(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int = 64,
        session: Session | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        tenant: str = "default",
    ) -> ChatResult:
        """Token-level turn: reuse whatever prefix of ``prompt_token_ids`` is cached."""
        params = SamplingParams(max_tokens, temperature, top_p, (), seed)
        if session is not None:
            return session.run_tokens(list(prompt_token_ids), params)
        request = TurnRequest(list(map(int, prompt_token_ids)), tenant, "", 0, params)
        return self.run(request)

    def prefetch(self, tokens: Sequence[int], tenant: str = "default") -> bool:
        """Bring the cached pages of ``tokens`` back to the device in the background. A hint:
        returns False (and does nothing) when the queue is full."""
        try:
            self.queue.submit(lambda _wait: self._prefetch(list(tokens), tenant))
        except Overloaded:
            return False
        return True

    def _prefetch(self, tokens: list[int], tenant: str) -> int:
        found = self.cache.lookup(tokens, tenant)
        try:
            restored = self.cache.restore(found, self.cache.pool.kv.device, self.layout.dtype)
            pages = restored.pages
            if pages is None:
                return 0
            P = self.layout.page_size
            self.cache.commit(
                found,
                tokens[: restored.num_tokens],
                lambda first, count: pages[first : first + count],
            )
            return restored.num_tokens - sum(1 for t, _ in found.sources if t == "device") * P
        finally:
            self.cache.release(found)

    def stats(self) -> Stats:
        self.pins.expire()
        return self.analytics.stats(self.tier_usage())

    def tier_usage(self) -> dict[str, dict[str, Any]]:
        c = self.cache
        out: dict[str, dict[str, Any]] = {
            "device": {
                "pages": c.pool.num_pages,
                "used_pages": c.pool.num_used,
                "used_bytes": c.pool.used_bytes,
                "budget_bytes": self.config.device_kv_bytes,
            }
        }
        if c.host is not None:
            h = c.host.stats()
            out["host"] = {
                "pages": h.slots,
                "used_pages": h.used_slots,
                "used_bytes": h.used_bytes,
                "budget_bytes": self.config.host_kv_bytes,
                "codec": c.host_codec.name,
            }
        if c.redis is not None:
            out["redis"] = {
                "codec": c.redis_codec.name,
                **c.redis.stats()._asdict(),
                "write_backlog_bytes": c.tiers.writer.redis_backlog_bytes,
                "writes_skipped": c.tiers.writer.redis_writes_skipped,
            }
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.close()
        self.queue.close()
        self.cache.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ turns

    def run(self, request: TurnRequest) -> ChatResult:
        """Queue a turn and wait for it (``Overloaded`` at once when the queue is full)."""
        submitted = self._clock()
        return self.queue.call(lambda wait: self._turn(request, wait, submitted))

    def _turn(self, req: TurnRequest, queue_s: float, submitted: float) -> ChatResult:
        if not req.tokens:
            raise BadRequest("the prompt is empty")
        if len(req.tokens) >= self.engine.max_context:
            raise BadRequest(
                f"prompt of {len(req.tokens)} tokens exceeds the model's context of "
                f"{self.engine.max_context} tokens"
            )
        clock = self._clock
        self.pins.expire()
        t0 = clock()
        found: Lookup | None = None
        if self.config.reuse and req.reuse:
            found = self.cache.lookup(req.tokens, req.tenant, exact_only=req.exact_only)
        t_match = clock()
        try:
            restored = None
            past = None
            if found is not None and found.num_pages:
                # layered: on CUDA the engine loads host pages layer by layer beside compute
                restored = self.cache.restore(
                    found,
                    self.engine.device,
                    self.engine.dtype,
                    layered=self.engine.accepts_host_prefix,
                )
                past = restored.prefix
            t_restore = clock()
            pre = self.engine.prefill(req.tokens, past)
            tokens, text, finish, t_first = self._decode(pre.state, req)
            t_done = clock()
            written: dict[str, int] = {}
            if found is not None:
                P = self.layout.page_size
                state = pre.state
                written = self.cache.commit(
                    found,
                    state.token_ids,
                    lambda first, count: self.engine.export_pages(state, first * P, count, P),
                )
            t_committed = clock()
        finally:
            if found is not None:
                self.cache.release(found)
        by_tier = dict.fromkeys(TIERS, 0)
        moved = dict.fromkeys(TIERS, 0)
        if restored is not None:
            by_tier = restored.tokens_by_tier
            moved = restored.bytes_by_tier
        cached = pre.cached_tokens
        # the engine may use fewer restored tokens than restored (it recomputes the last one)
        excess = sum(by_tier.values()) - cached
        for tier in reversed(TIERS):
            take = min(excess, by_tier[tier])
            by_tier[tier] -= take
            excess -= take
        timings = Timings(
            queue_s=queue_s,
            match_s=t_match - t0,
            rehydrate_s=(t_restore - t_match) + pre.restore_s,
            prefill_s=pre.prefill_s,
            ttft_s=t_first - submitted,
            decode_s=t_done - t_first,
            commit_s=t_committed - t_done,
            total_s=t_committed - submitted,
        )
        usage = Usage(len(req.tokens), len(tokens), cached, by_tier)
        result = ChatResult(text, tokens, usage, timings, finish, req.turn, req.session_id)
        if not req.record:
            return result
        divergence = None
        if req.previous_prompt is not None:
            divergence = find_divergence(req.previous_prompt, req.tokens, self._detok)
        self.analytics.add(
            TurnRecord(
                session_id=req.session_id,
                tenant=req.tenant,
                turn=req.turn,
                started_at=submitted,
                prompt_tokens=len(req.tokens),
                completion_tokens=len(tokens),
                cached_tokens_by_tier=dict(by_tier),
                computed_tokens=pre.computed_tokens,
                decisions=[d.as_dict() for d in (found.decisions if found else [])],
                timings=timings,
                bytes_moved=moved,
                bytes_written=written,
                divergence=divergence,
                recompute_ttft_s=req.recompute_ttft_s,
            )
        )
        return result

    def _decode(self, state: Any, req: TurnRequest) -> tuple[list[int], str, str, float]:
        p = req.params
        tokens: list[int] = []
        text = ""
        finish = "length"
        t_first = self._clock()
        for n, step in enumerate(
            self.engine.decode(state, p.max_tokens, p.temperature, p.top_p, seed=p.seed)
        ):
            if n == 0:
                t_first = self._clock()
            if step.finish_reason == "stop":
                finish = "stop"
                break
            tokens.append(step.token_id)
            new_text = self._detok(tokens)
            delta = new_text[len(text) :]
            hit = _first_stop(new_text, p.stop, len(text))
            if hit is not None:
                delta = new_text[len(text) : hit]
                text = new_text[:hit]
                if req.on_token is not None and delta:
                    req.on_token(step.token_id, delta)
                finish = "stop"
                break
            text = new_text
            if req.on_token is not None:
                req.on_token(step.token_id, delta)
            if step.finish_reason is not None:
                finish = step.finish_reason
        if p.max_tokens == 0:
            finish = "length"
        return tokens, text, finish, t_first

    def _detok(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))


def _first_stop(text: str, stops: Sequence[str], searched: int) -> int | None:
    """Index in ``text`` where the earliest stop string starts, looking at new text only."""
    best: int | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, searched - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best
