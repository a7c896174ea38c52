from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from kvruntime.divergence import common_prefix_len, find_divergence


def _text(tokens: Sequence[int]) -> str:
    return " ".join(str(t) for t in tokens)


@given(st.lists(st.integers(0, 3), max_size=60), st.lists(st.integers(0, 3), max_size=60))
def test_common_prefix_matches_brute_force(a: list[int], b: list[int]) -> None:
    brute = 0
    while brute < min(len(a), len(b)) and a[brute] == b[brute]:
        brute += 1
    assert common_prefix_len(a, b) == brute


def test_extension_is_not_a_divergence() -> None:
    assert find_divergence([1, 2, 3], [1, 2, 3, 4, 5], _text) is None


def test_divergence_reports_index_and_text_on_both_sides() -> None:
    previous = list(range(100))
    current = [*range(40), 999, *range(41, 120)]
    d = find_divergence(previous, current, _text, window=3)
    assert d is not None
    assert d.token_index == 40 and d.previous_tokens == 100
    assert d.before == "37 38 39"
    assert d.previous_text == "40 41 42" and d.current_text == "999 41 42"
    assert "token 40 of 100" in d.describe()
