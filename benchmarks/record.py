"""Writes a benchmark's figures into docs/BENCHMARKS.md under its own section.

Each benchmark owns one section (``## <name>``); re-running it replaces that section and leaves
the others alone. Every section carries the date, the machine and the exact command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Figures written by the scripts in `benchmarks/`; each section names the date, machine and\n"
    "command that produced it. Re-run a script to refresh its section.\n"
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, no GPU"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:,.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    def cell(v: object) -> str:
        return f"{v:,.3f}" if isinstance(v, float) else str(v)

    text = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    for n, row in enumerate(text):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def record(name: str, body: str, command: str | None = None, doc: Path | None = None) -> Path:
    """Replace section ``## name`` of docs/BENCHMARKS.md with ``body`` plus provenance."""
    doc = doc or DOC
    command = command or "python " + " ".join(sys.argv)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"## {name}\n\n- date: {stamp}\n- machine: {machine()}\n- command: `{command}`\n\n"
        f"{body.strip()}\n"
    )
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")
    return doc


def run_or_merge(
    parser: argparse.ArgumentParser,
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    body: Callable[[dict[str, Any]], str],
    section: str,
    command: str,
    headers: Sequence[str],
) -> None:
    """The flow of a benchmark measured on the device machine and recorded here: ``--out DIR``
    saves ``measure(args)`` as DIR/results.json; ``--merge FILE`` writes such a file's section
    (``body``) into docs/BENCHMARKS.md. Both print the table of its ``rows``."""
    parser.add_argument("--out", type=Path, help="write results.json here")
    parser.add_argument("--merge", type=Path, help="record a results.json into BENCHMARKS.md")
    args = parser.parse_args()
    if args.merge:
        result = json.loads(args.merge.read_text())
        record(section, body(result), command)
    else:
        result = measure(args)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print_table(headers, result["rows"])
