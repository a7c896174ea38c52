"""``kvruntime report`` from a real server's turns (``--url``) and from its JSONL analytics
(``serve --jsonl``): the page holds the plots, the divergence table with the text around the
break, and says whether the recompute side was measured or estimated."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_fixtures import ServerProcess, start_server

import kvruntime
from kvruntime.report import analyse, build_html, load_jsonl

SYSTEM = "You are a support agent for the billing system. Answer briefly. " * 3


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("serve-report")
    jsonl = tmp / "turns.jsonl"
    server = start_server(tmp, "--jsonl", str(jsonl))
    try:
        with kvruntime.Client(server.url) as c:
            for agent in ("alpha", "beta"):
                s = c.session(f"agent-{agent}")
                msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
                for t in range(3):
                    msgs.append({"role": "user", "content": f"{agent} question {t}"})
                    r = s.chat(msgs, max_tokens=4)
                    msgs.append({"role": "assistant", "content": r.text})
            # a session whose system prompt carries a clock: the cache breaks at the time
            s = c.session("agent-clock")
            for minute in ("10:00", "10:05"):
                s.chat(
                    [
                        {"role": "system", "content": f"Time: {minute}. {SYSTEM}"},
                        {"role": "user", "content": "any news?"},
                    ],
                    max_tokens=4,
                )
        yield server, jsonl
    finally:
        server.stop()


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_from_a_running_server(served: tuple[ServerProcess, Path], tmp_path: Path) -> None:
    server, _ = served
    out = tmp_path / "report.html"
    cmd = [sys.executable, "-m", "kvruntime.cli", "report", "--url", server.url, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "8 turns" in done.stdout
    page = out.read_text()
    pngs = images(page)
    assert len(pngs) == 3 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    for title in ("hit rate per turn", "tokens by tier per turn", "TTFT with reuse"):
        assert f'alt="{title}' in page
    # the divergence table shows where the clock broke the prefix, and what changed
    table = page[page.index("<h2>Divergence events</h2>") : page.index("<h2>Turns</h2>")]
    assert "agent-clock" in table and "agent-alpha" not in table
    assert "Time: 10:0</code>" in table
    assert "was <code>0. You are" in table and "now <code>5. You are" in table
    assert "estimated for 8 of 8 turns" in page and "tokens/s" in page
    assert not re.search(r'<(script|link)|src="http', page)  # self-contained


def test_report_from_jsonl_uses_measured_baselines_where_present(
    served: tuple[ServerProcess, Path],
) -> None:
    _, jsonl = served
    records = load_jsonl(jsonl)
    assert len(records) == 8
    report = analyse(records)
    turns = {(t.session_id, t.turn): t for t in report.turns}
    later = turns[("agent-alpha", 2)]
    assert later.cached > 0.8 * turns[("agent-alpha", 1)].prompt  # reuse shows per turn
    assert later.recompute_s == pytest.approx(later.prompt / report.prefill_tokens_per_s)
    assert not later.measured
    # with a measured baseline on every turn, the page uses it and says so
    for r in records:
        r["recompute_ttft_s"] = 0.25
    page = build_html(analyse(records), "edited.jsonl")
    assert "measured baselines" in page and "estimated" not in page.split("<h2>Plots")[0]
    assert page.count("250.0") == 8  # each turn's recompute column, in ms
    assert len(images(page)) == 3
    assert json.loads(jsonl.read_text().splitlines()[0])["session_id"] == "agent-alpha"
