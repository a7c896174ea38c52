"""What a turn returns: text, tokens, usage (OpenAI's meaning of cached_tokens) and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TIERS = ("device", "host", "redis")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused instead of computed, all tiers together
    cached_tokens_by_tier: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queue_s: float = 0.0  # waiting for the engine
    match_s: float = 0.0  # radix lookup and Redis probe
    rehydrate_s: float = 0.0  # host/Redis → device, decode included
    prefill_s: float = 0.0  # computing the uncached suffix
    ttft_s: float = 0.0  # from submission to the first generated token
    decode_s: float = 0.0  # the remaining tokens
    commit_s: float = 0.0  # caching the turn's pages (device copy, spills) before returning
    total_s: float = 0.0  # from submission to the result, commit included

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ChatResult:
    text: str
    token_ids: list[int]
    usage: Usage
    timings: Timings
    finish_reason: str  # "stop" | "length"
    turn: int = 0
    session_id: str = ""
