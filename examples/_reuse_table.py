"""Per-turn reuse, as every example prints it at the end: a table and one ``REUSE_JSON`` line
(what tests/test_examples.py reads).

A turn is one model request. Its reuse comes from the response's ``usage``: OpenAI's
``prompt_tokens_details.cached_tokens`` plus kvruntime's ``usage.kvruntime`` (cached tokens by
tier and the tokens computed afresh).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class TurnReuse(NamedTuple):
    prompt_tokens: int
    cached_tokens: int
    device: int
    host: int
    redis: int
    recomputed: int  # prompt tokens computed afresh (not found in any tier)


def from_usage(usage: Mapping[str, Any] | None) -> TurnReuse:
    """One turn's reuse from a response's ``usage`` dict. Raises ``ValueError`` when the
    kvruntime fields are missing (a server other than kvruntime, or a framework that dropped
    them)."""
    if not usage or not isinstance(usage.get("kvruntime"), Mapping):
        raise ValueError(f"no usage.kvruntime in {usage!r}: is this a kvruntime server?")
    ext = usage["kvruntime"]
    tiers = ext["cached_tokens_by_tier"]
    details = usage.get("prompt_tokens_details") or {}
    return TurnReuse(
        prompt_tokens=int(usage["prompt_tokens"]),
        cached_tokens=int(details.get("cached_tokens", sum(tiers.values()))),
        device=int(tiers.get("device", 0)),
        host=int(tiers.get("host", 0)),
        redis=int(tiers.get("redis", 0)),
        recomputed=int(ext["computed_tokens"]),
    )


def from_result_usage(usage: Any) -> TurnReuse:
    """One turn's reuse from an in-process ``kvruntime.Usage`` (``ChatResult.usage``)."""
    tiers = usage.cached_tokens_by_tier
    return TurnReuse(
        usage.prompt_tokens,
        usage.cached_tokens,
        tiers["device"],
        tiers["host"],
        tiers["redis"],
        usage.computed_tokens,
    )


def print_reuse(title: str, turns: Sequence[TurnReuse]) -> None:
    """The table, then ``REUSE_JSON {"example": title, "turns": [{...}, ...]}``."""
    print(f"\nper-turn reuse ({title})")
    head = ("turn", *TurnReuse._fields)
    print("  ".join(f"{h:>12}" for h in head))
    for i, t in enumerate(turns, 1):
        print("  ".join(f"{v:>12}" for v in (i, *t)))
    prompt = sum(t.prompt_tokens for t in turns)
    cached = sum(t.cached_tokens for t in turns)
    print(f"total: {cached} of {prompt} prompt tokens reused ({cached / max(prompt, 1):.0%})")
    rows = [t._asdict() for t in turns]
    print("REUSE_JSON " + json.dumps({"example": title, "turns": rows}))
