"""Where one page's KV lives: a device page, a pinned host slot, a Redis key (any subset).

The tree stores these values and hands them back; it never allocates or frees them. Values
are plain ids owned by the tiers: a device pool page index, a host slot index, a Redis key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from kvruntime.errors import BadRequest

TIERS: tuple[str, ...] = ("device", "host", "redis")
"""Tier names, fastest first; a page's ``location`` has one optional value per tier."""

DEVICE, HOST, REDIS = 0, 1, 2
_TIER_INDEX = {name: i for i, name in enumerate(TIERS)}
# device page indices and host slots are ints, Redis keys are text
_VALUE_TYPES: tuple[type, ...] = (int, int, str)
NOWHERE: tuple[None, None, None] = (None, None, None)


class PageLocation(NamedTuple):
    """One page's copies: ``device`` pool page, ``host`` slot, ``redis`` key; None = absent."""

    device: int | None = None
    host: int | None = None
    redis: str | None = None

    def get(self, tier: str) -> int | str | None:
        return self[tier_index(tier)]

    def replace_tier(self, tier: str, value: int | str | None) -> PageLocation:
        t = tier_index(tier)
        check_value(t, value)
        values: list[Any] = list(self)
        values[t] = value
        return PageLocation(*values)

    @property
    def tiers(self) -> tuple[str, ...]:
        """Names of the tiers holding a copy, fastest first."""
        return tuple(name for name, value in zip(TIERS, self, strict=True) if value is not None)

    @property
    def fastest(self) -> str | None:
        """The fastest tier holding a copy (where a reuse would read it), or None."""
        for name, value in zip(TIERS, self, strict=True):
            if value is not None:
                return name
        return None


def tier_index(tier: str) -> int:
    """Position of ``tier`` in ``TIERS``; an unknown tier raises BadRequest naming the known."""
    try:
        return _TIER_INDEX[tier]
    except (KeyError, TypeError):
        raise BadRequest(f"unknown tier {tier!r}; known: {', '.join(TIERS)}") from None


def check_value(tier: int, value: object) -> None:
    """Raise BadRequest unless ``value`` may be stored in tier number ``tier`` (None may)."""
    if value is None:
        return
    if type(value) is not _VALUE_TYPES[tier]:
        raise BadRequest(
            f"{TIERS[tier]} location must be {_VALUE_TYPES[tier].__name__} or None, got {value!r}"
        )
    if tier == REDIS and not value:
        raise BadRequest("redis location must be a non-empty key")
    if tier != REDIS and value < 0:  # type: ignore[operator]
        raise BadRequest(f"{TIERS[tier]} location must be >= 0, got {value!r}")


def check_column(tier: int, values: Sequence[object]) -> None:
    """``check_value`` over a whole column, with C-speed passes for the common all-valid case."""
    kinds = set(map(type, values))
    kinds.discard(type(None))
    if kinds - {_VALUE_TYPES[tier]}:
        for value in values:
            check_value(tier, value)
    present = [v for v in values if v is not None]
    bad = "" in present if tier == REDIS else bool(present) and min(present) < 0  # type: ignore[type-var,operator]
    if bad:
        for value in present:
            check_value(tier, value)


def to_columns(locations: Sequence[PageLocation]) -> list[list]:
    """Checked per-tier columns (device, host, redis) of one location per page.

    Raises BadRequest for a value that is not a PageLocation, a location with no copy (naming
    the first such page) or a bad value.
    """
    if set(map(type, locations)) != {PageLocation}:
        raise BadRequest("insert locations must be PageLocation values")
    if NOWHERE in locations:
        bad = next(i for i, loc in enumerate(locations) if loc == NOWHERE)
        raise BadRequest(f"location of page {bad} names no tier")
    columns = [list(col) for col in zip(*locations, strict=True)]
    for t, col in enumerate(columns):
        check_column(t, col)
    return columns
