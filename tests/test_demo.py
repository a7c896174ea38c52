"""The README's main job, end to end through the real CLI: on the tiny random-weight model here
(the SmolLM2 run is the README's first command), with a real local redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from model_fixtures import tiny_model, tiny_tokenizer


def test_demo_runs_agents_and_reports_reuse(tmp_path: Path) -> None:
    model = tiny_model()
    model.config.max_position_embeddings = 8192  # the demo's prompts are ~5K characters
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")  # type: ignore[attr-defined]
    jsonl = tmp_path / "turns.jsonl"
    cmd = [sys.executable, "-m", "kvruntime.cli", "demo", "--model", str(tmp_path / "model")]
    cmd += ["--turns", "2", "--max-tokens", "4", "--jsonl", str(jsonl)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "3 agents x 2 turns" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["docs"], ["triage"])]
    assert len(rows) == 4  # two agents shown here, two turns each
    assert "reused" in out and "saved" in out
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 6  # baselines are left out of analytics
    assert all(r["recompute_ttft_s"] > 0 for r in records)  # ... but kept beside each turn
    assert sum(r["cached_tokens"] for r in records) > 0.5 * sum(r["prompt_tokens"] for r in records)
    tiers = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert tiers["tiers"]["redis"]["puts"] > 0
