"""``kvruntime report``: one self-contained HTML page about prefix reuse, from turn records.

Input: a JSONL file of ``TurnRecord.to_json()`` rows (``kvruntime serve --jsonl`` or
``kvruntime demo --jsonl``) or a running server's ``/v1/kvruntime/turns``. The page shows the
hit rate per turn, reused tokens by tier, TTFT with reuse against recompute, and every point
where a session's prompt stopped extending its previous one, with the text around the break.
Plots are matplotlib PNGs (Agg, no display) embedded as base64, so the file stands alone.

TTFT is compared once the engine takes the turn (queueing left out, as the demo does). The
recompute side is the measured baseline (``recompute_ttft_s``) where a record has one;
otherwise it is estimated as prompt tokens / the prefill rate measured on these very turns
(computed tokens / prefill seconds), and the page says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from kvruntime.errors import BadRequest
from kvruntime.results import TIERS

TIER_COLORS = {"device": "#2e7d32", "host": "#1565c0", "redis": "#c62828", "computed": "#9e9e9e"}


class Turn(NamedTuple):
    session_id: str
    turn: int
    tenant: str
    prompt: int
    by_tier: dict[str, int]
    computed: int
    ttft_s: float  # from the engine taking the turn to its first token
    recompute_s: float | None
    measured: bool  # recompute_s is a measured baseline, not an estimate
    divergence: dict[str, Any] | None

    @property
    def cached(self) -> int:
        return sum(self.by_tier.values())

    @property
    def hit_rate(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0

    @property
    def label(self) -> str:
        return f"{self.session_id[:16] or '-'}·{self.turn}"


class Report(NamedTuple):
    turns: list[Turn]
    prefill_tokens_per_s: float | None
    rate_source: str  # where the estimate's prefill rate came from


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise BadRequest(f"{path}:{n} is not JSON: {exc}") from None
    return rows


def fetch_turns(url: str, tenant: str = "default") -> tuple[list[dict[str, Any]], float | None]:
    """Records (and the server's calibrated prefill rate) from ``/v1/kvruntime/turns``."""
    import httpx

    resp = httpx.get(
        url.rstrip("/") + "/v1/kvruntime/turns",
        params={"limit": 100_000},
        headers={"x-tenant": tenant},
        timeout=60,
    )
    resp.raise_for_status()
    data = resp.json()
    return list(data["data"]), data.get("prefill_tokens_per_s")


def analyse(records: Sequence[dict[str, Any]], server_rate: float | None = None) -> Report:
    timed = [r for r in records if r["timings"]["prefill_s"] > 0]
    computed = sum(r["computed_tokens"] for r in timed)
    seconds = sum(r["timings"]["prefill_s"] for r in timed)
    if computed and seconds > 0:
        rate: float | None = computed / seconds
        source = f"measured on these turns: {computed} computed tokens in {seconds:.3f} s"
    elif server_rate:
        rate, source = server_rate, "the server's start-up calibration"
    else:
        rate, source = None, "unknown"
    turns = []
    for r in records:
        t = r["timings"]
        measured = r.get("recompute_ttft_s") is not None
        recompute = r["recompute_ttft_s"] if measured else None
        if recompute is None and rate:
            recompute = r["prompt_tokens"] / rate
        turns.append(
            Turn(
                session_id=r.get("session_id") or "",
                turn=int(r.get("turn", 0)),
                tenant=r.get("tenant", "default"),
                prompt=r["prompt_tokens"],
                by_tier={k: int(r["cached_tokens_by_tier"].get(k, 0)) for k in TIERS},
                computed=r["computed_tokens"],
                ttft_s=max(t["ttft_s"] - t.get("queue_s", 0.0), 0.0),
                recompute_s=recompute,
                measured=measured,
                divergence=r.get("divergence"),
            )
        )
    return Report(turns, rate, source)


# ---------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(turns: Sequence[Turn], ylabel: str) -> tuple[Any, Any, list[int]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, min(16.0, 0.35 * len(turns) + 3)), 3.4))
    ax = fig.add_subplot()
    xs = list(range(len(turns)))
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(turns) <= 40:
        ax.set_xticks(xs, [t.label for t in turns], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel("turn (in order)")
    return fig, ax, xs


def plot_hit_rate(turns: Sequence[Turn]) -> str:
    fig, ax, xs = _figure(turns, "prompt tokens reused")
    ax.bar(xs, [100 * t.hit_rate for t in turns], color=TIER_COLORS["device"])
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter("{x:.0f}%")
    ax.set_title("Hit rate per turn")
    return _png(fig)


def plot_tiers(turns: Sequence[Turn]) -> str:
    fig, ax, xs = _figure(turns, "tokens")
    bottom = [0] * len(turns)
    for tier in (*TIERS, "computed"):
        ys = [t.computed if tier == "computed" else t.by_tier[tier] for t in turns]
        ax.bar(xs, ys, bottom=bottom, color=TIER_COLORS[tier], label=tier)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Prompt tokens per turn: reused by tier, and computed")
    return _png(fig)


def plot_ttft(turns: Sequence[Turn]) -> str:
    fig, ax, xs = _figure(turns, "milliseconds")
    w = 0.4
    ax.bar([x - w / 2 for x in xs], [1e3 * t.ttft_s for t in turns], w, label="with reuse")
    est = [1e3 * (t.recompute_s or 0.0) for t in turns]
    hatch = [None if t.measured else "//" for t in turns]
    bars = ax.bar([x + w / 2 for x in xs], est, w, color="#9e9e9e", label="recompute")
    for bar, h in zip(bars, hatch, strict=True):
        bar.set_hatch(h)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Time to first token: with reuse vs recompute (hatched: estimated)")
    return _png(fig)


# ---------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td.t{text-align:left}
code{white-space:pre-wrap;background:#f6f6f6;padding:0 2px}
.cut{color:#c62828;font-weight:bold} img{max-width:100%;display:block;margin:1em 0}
.note{color:#555;font-size:13px}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _td(value: object, text: bool = False) -> str:
    return f'<td class="t">{value}</td>' if text else f"<td>{_e(value)}</td>"


def divergence_table(turns: Sequence[Turn]) -> str:
    rows = []
    for t in turns:
        d = t.divergence
        if not d:
            continue
        around = (
            f"<code>…{_e(d['before'])}</code><span class=cut>|</span>"
            f" was <code>{_e(d['previous_text'])}</code>"
            f" now <code>{_e(d['current_text'])}</code>"
        )
        at = f"{d['token_index']} of {d['previous_tokens']}"
        rows.append([_td(t.session_id, True), _td(t.turn), _td(at), _td(around, True)])
    if not rows:
        return "<p>No divergence: every session turn extended its previous prompt.</p>"
    return _table(["session", "turn", "broke at token", "text around the break"], rows)


def build_html(report: Report, source: str) -> str:
    turns = report.turns
    if not turns:
        raise BadRequest(f"no turn records in {source}")
    prompt = sum(t.prompt for t in turns)
    cached = sum(t.cached for t in turns)
    by_tier = {k: sum(t.by_tier[k] for t in turns) for k in TIERS}
    reuse_s = sum(t.ttft_s for t in turns)
    recompute_s = sum(t.recompute_s or 0.0 for t in turns)
    measured = sum(t.measured for t in turns)
    if measured == len(turns):
        basis = "measured baselines (each turn's prompt recomputed on the same engine)"
    else:
        rate = report.prefill_tokens_per_s
        basis = (
            f"estimated for {len(turns) - measured} of {len(turns)} turns as prompt tokens /"
            f" prefill rate ({rate:,.0f} tokens/s, {report.rate_source})"
            if rate
            else "not available (no prefill timings in these records)"
        )
    summary = _table(
        ["turns", "sessions", "prompt tokens", "reused", *TIERS, "computed", "divergences"],
        [[
            _td(len(turns)), _td(len({t.session_id for t in turns})), _td(f"{prompt:,}"),
            _td(f"{cached / max(prompt, 1):.1%}"), *(_td(f"{by_tier[k]:,}") for k in TIERS),
            _td(f"{prompt - cached:,}"), _td(sum(1 for t in turns if t.divergence)),
        ]],
    )  # fmt: skip
    per_turn = _table(
        ["session", "turn", "prompt", "hit", *TIERS, "computed", "TTFT ms", "recompute ms"],
        (
            [
                _td(t.session_id or "-", True), _td(t.turn), _td(t.prompt),
                _td(f"{t.hit_rate:.0%}"), *(_td(t.by_tier[k]) for k in TIERS), _td(t.computed),
                _td(f"{1e3 * t.ttft_s:.1f}"),
                _td("-" if t.recompute_s is None
                    else f"{1e3 * t.recompute_s:.1f}{'' if t.measured else ' (est.)'}"),
            ]
            for t in turns[:500]
        ),
    )  # fmt: skip
    speedup = recompute_s / reuse_s if reuse_s > 0 and recompute_s > 0 else None
    plots = [
        ("hit rate per turn", plot_hit_rate(turns)),
        ("tokens by tier per turn", plot_tiers(turns)),
        ("TTFT with reuse against recompute", plot_ttft(turns)),
    ]
    images = "".join(f'<img alt="{_e(a)}" src="data:image/png;base64,{b}">' for a, b in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kvruntime cache-hit report</title>
<style>{_CSS}</style></head><body>
<h1>kvruntime cache-hit report</h1>
<p class="note">Source: {_e(source)}. {len(turns)} turns.</p>
<h2>Summary</h2>{summary}
<p>Time to first token once the engine takes the turn: <b>{reuse_s:.3f} s</b> with reuse
against <b>{recompute_s:.3f} s</b> recomputing{f" ({speedup:.1f}x)" if speedup else ""}.
Recompute: {_e(basis)}.</p>
<h2>Plots</h2>{images}
<h2>Divergence events</h2>
<p class="note">Where a session's prompt stopped extending its previous one: every cached page
after the break is lost for that turn.</p>
{divergence_table(turns)}
<h2>Turns</h2>{per_turn}
</body></html>
"""


def write_report(report: Report, source: str, out: str | Path) -> Path:
    path = Path(out)
    path.write_text(build_html(report, source), encoding="utf-8")
    return path


def main_report(
    jsonl: str | None = None,
    url: str | None = None,
    tenant: str = "default",
    out: str = "report.html",
) -> int:
    if jsonl:
        report, source = analyse(load_jsonl(jsonl)), jsonl
    elif url:
        records, rate = fetch_turns(url, tenant)
        report, source = analyse(records, rate), f"{url} (tenant {tenant})"
    else:
        raise BadRequest("give --jsonl FILE or --url URL")
    path = write_report(report, source, out)
    print(f"wrote {path} ({len(report.turns)} turns)", file=sys.stdout)
    return 0
