"""One record per turn, aggregated by ``Runtime.stats()`` and exported as JSONL."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvruntime.divergence import Divergence
from kvruntime.results import TIERS, Timings


@dataclass(frozen=True)
class TurnRecord:
    session_id: str
    tenant: str
    turn: int
    started_at: float  # the runtime clock's time at submission
    prompt_tokens: int
    completion_tokens: int
    cached_tokens_by_tier: dict[str, int]
    computed_tokens: int
    decisions: list[dict[str, object]]  # rehydrate-or-recompute, per tier consulted
    timings: Timings
    bytes_moved: dict[str, int]  # bytes read from each tier into the device pool
    bytes_written: dict[str, int] = field(default_factory=dict)  # queued for write-back
    divergence: Divergence | None = None
    recompute_ttft_s: float | None = None  # filled where a baseline was measured

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached_tokens_by_tier.values())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["cached_tokens"] = self.cached_tokens
        out["timings"] = self.timings.as_dict()
        return out


@dataclass(frozen=True)
class Stats:
    turns: int
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    cached_tokens_by_tier: dict[str, int]
    bytes_moved: dict[str, int]
    divergences: int
    mean_ttft_s: float
    tiers: dict[str, dict[str, Any]]  # live tier usage, filled by the runtime

    @property
    def reuse_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Analytics:
    """Thread-safe. Keeps the last ``max_records`` records in memory (the aggregates cover
    every turn) and appends each to ``jsonl_path`` when one is given."""

    def __init__(self, max_records: int = 10_000, jsonl_path: str | Path | None = None) -> None:
        self._records: deque[TurnRecord] = deque(maxlen=max_records)
        self._lock = threading.Lock()
        self._path = Path(jsonl_path) if jsonl_path else None
        self._turns = self._prompt = self._cached = self._divergences = 0
        self._by_tier = dict.fromkeys(TIERS, 0)
        self._moved: dict[str, int] = {}
        self._ttft_sum = 0.0

    def add(self, record: TurnRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._turns += 1
            self._prompt += record.prompt_tokens
            self._cached += record.cached_tokens
            self._divergences += record.divergence is not None
            self._ttft_sum += record.timings.ttft_s
            for tier, n in record.cached_tokens_by_tier.items():
                self._by_tier[tier] = self._by_tier.get(tier, 0) + n
            for tier, n in record.bytes_moved.items():
                self._moved[tier] = self._moved.get(tier, 0) + n
            if self._path is not None:
                with self._path.open("a") as f:
                    f.write(json.dumps(record.to_json()) + "\n")

    def records(self) -> list[TurnRecord]:
        with self._lock:
            return list(self._records)

    def stats(self, tiers: dict[str, dict[str, Any]] | None = None) -> Stats:
        with self._lock:
            return Stats(
                turns=self._turns,
                prompt_tokens=self._prompt,
                cached_tokens=self._cached,
                computed_tokens=self._prompt - self._cached,
                cached_tokens_by_tier=dict(self._by_tier),
                bytes_moved=dict(self._moved),
                divergences=self._divergences,
                mean_ttft_s=self._ttft_sum / self._turns if self._turns else 0.0,
                tiers=tiers or {},
            )

    def export_jsonl(self, path: str | Path, records: Iterable[TurnRecord] | None = None) -> int:
        rows = list(records) if records is not None else self.records()
        with Path(path).open("w") as f:
            for r in rows:
                f.write(json.dumps(r.to_json()) + "\n")
        return len(rows)
