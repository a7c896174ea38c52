"""Where a prompt stopped matching the session's previous one.

Agents re-send their context; anything that changes early in it (a timestamp in the system
prompt, re-ordered tool schemas) breaks every cached page after it. This finds the first token
that differs and the text on both sides, so a user sees what broke the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvruntime.radix.prefix import common_prefix

Detokenize = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class Divergence:
    token_index: int  # first index where the prompts differ
    previous_tokens: int  # length of what was compared against
    before: str  # text shared just before the break
    previous_text: str  # what the previous prompt had from the break on (a window)
    current_text: str  # what this prompt has from the break on (a window)

    def describe(self) -> str:
        return (
            f"prompt diverged at token {self.token_index} of {self.previous_tokens}: "
            f"...{self.before!r} | was {self.previous_text!r}, now {self.current_text!r}"
        )


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences (the radix index's
    bisection over slice compares, ``radix.prefix.common_prefix``)."""
    return common_prefix(list(a), list(b))


def find_divergence(
    previous: Sequence[int], current: Sequence[int], detokenize: Detokenize, window: int = 12
) -> Divergence | None:
    """None when ``current`` extends ``previous`` (the cache-friendly case)."""
    at = common_prefix_len(previous, current)
    if at == len(previous):
        return None
    return Divergence(
        token_index=at,
        previous_tokens=len(previous),
        before=detokenize(previous[max(0, at - window) : at]),
        previous_text=detokenize(previous[at : at + window]),
        current_text=detokenize(current[at : at + window]),
    )
