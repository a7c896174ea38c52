"""``kvruntime demo``: three tool-using agents on SmolLM2 (CPU) share a long system prompt with
tool schemas; a small device budget forces spills to host and Redis. Every turn is also
recomputed from scratch on the same engine, so the printed speed-up is measured, not assumed."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from kvruntime.analytics import Analytics
from kvruntime.config import MiB, RuntimeConfig
from kvruntime.engines.chat import render
from kvruntime.results import ChatResult
from kvruntime.runtime import Runtime, SamplingParams, TurnRequest

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {p: {"type": "string", "description": d} for p, d in params.items()},
                "required": list(params),
            },
        },
    }
    for name, description, params in [
        ("search_files", "Search the repository for files whose text matches a pattern.",
         {"pattern": "Regular expression to look for", "path": "Folder to search in"}),
        ("read_file", "Read a text file of the repository and return its content.",
         {"path": "Path of the file, relative to the repository root"}),
        ("write_file", "Replace the content of a file; creates folders as needed.",
         {"path": "Path of the file", "content": "The complete new content"}),
        ("run_tests", "Run the project's test suite, or one test file, and report failures.",
         {"target": "A test file or folder; empty for the whole suite"}),
        ("list_tickets", "List open tickets of the issue tracker with their titles and labels.",
         {"label": "Only tickets with this label; empty for all"}),
        ("comment_ticket", "Add a comment to a ticket of the issue tracker.",
         {"ticket": "Ticket number", "text": "The comment, in Markdown"}),
        ("http_get", "Fetch a URL of the company intranet and return the response body.",
         {"url": "The address to fetch"}),
        ("send_message", "Send a chat message to a colleague or a channel.",
         {"to": "A user name or #channel", "text": "The message"}),
    ]
]  # fmt: skip

SYSTEM = (
    "You are DevAgent, an autonomous software engineering assistant working inside the "
    "repository of a Python web service. You solve the user's task step by step. At each step, "
    "either call exactly one tool with JSON arguments, or answer the user when the task is "
    "done. Rules: read a file before you change it; run the tests after every change; never "
    "invent file contents; keep answers short and precise; when a tool fails, explain why and "
    "try another way. The repository layout: app/ (the service: api.py, models.py, "
    "parser.py, storage.py), tests/ (pytest suites), docs/ (Markdown), CHANGELOG.md, "
    "pyproject.toml. The team works in two-week sprints; tickets carry labels such as bug, "
    "feature, docs and chore. Messages to colleagues go through the send_message tool. "
) * 2

TASKS: list[tuple[str, list[tuple[str, str]]]] = [
    ("fix-parser", [
        ("The test tests/test_parser.py fails since yesterday. Find out why and fix it.",
         '{"failures": 1, "test": "test_parse_dates", "error": "ValueError: unconverted data '
         'remains: Z"}'),
        ("Read app/parser.py and tell me which function parses dates.",
         '{"path": "app/parser.py", "content": "def parse_date(s):\\n    return datetime.strptime'
         '(s, \'%Y-%m-%dT%H:%M:%S\')"}'),
        ("Make parse_date accept a trailing Z and run the tests again.",
         '{"failures": 0, "passed": 48}'),
        ("Summarise the fix in one sentence for the changelog.", '{"ok": true}'),
    ]),
    ("triage", [
        ("List the open tickets labelled bug and tell me which one looks most urgent.",
         '{"tickets": [{"n": 412, "title": "Login times out"}, {"n": 415, "title": "Typo in '
         'footer"}, {"n": 419, "title": "Data loss on concurrent save"}]}'),
        ("Read app/storage.py to check ticket 419.",
         '{"path": "app/storage.py", "content": "def save(obj):\\n    data = load()\\n    '
         'data[obj.id] = obj\\n    write(data)"}'),
        ("Comment on ticket 419 with what you found.", '{"ok": true, "comment_id": 9921}'),
        ("Tell the team in #backend that 419 needs a lock.", '{"ok": true}'),
    ]),
    ("docs", [
        ("Search the docs folder for mentions of the old /v1/login endpoint.",
         '{"matches": ["docs/api.md:12", "docs/auth.md:40"]}'),
        ("Read docs/api.md and propose the corrected paragraph.",
         '{"path": "docs/api.md", "content": "## Login\\nPOST /v1/login with user and '
         'password returns a token."}'),
        ("Write the corrected paragraph using /v2/sessions instead.", '{"ok": true}'),
        ("Send a short note to alice that the docs are updated.", '{"ok": true}'),
    ]),
]  # fmt: skip


@dataclass
class TurnRow:
    agent: str
    turn: int
    result: ChatResult
    recompute_ttft_s: float


def demo_config(redis_url: str | None) -> RuntimeConfig:
    # SmolLM2 KV is 45 KiB per token (fp32): the device holds ~900 tokens and the host ~700, while
    # three agents sharing a ~1.1K-token system prompt need ~2.2K: every tier gets used
    return RuntimeConfig(
        device="cpu",
        page_size=16,
        device_kv_bytes=40 * MiB,
        host_kv_bytes=32 * MiB,
        redis_url=redis_url,
        redis_codec="none",
    )


@contextmanager
def redis_for_demo(redis_url: str) -> Iterator[str | None]:
    if redis_url == "none":
        yield None
    elif redis_url == "local":
        from kvruntime.local_redis import LocalRedis

        with LocalRedis() as server:
            yield server.url
    else:
        yield redis_url


def run_agent(
    rt: Runtime, name: str, script: list[tuple[str, str]], max_tokens: int, rows: list[TurnRow],
    lock: threading.Lock,
) -> None:  # fmt: skip
    session = rt.session(f"agent-{name}")
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for turn, (user, tool_result) in enumerate(script):
        messages.append({"role": "user", "content": user})
        tokens = render(rt.tokenizer, messages, TOOLS)
        # the same prompt, recomputed from scratch on the same engine queue: the baseline
        baseline = rt.run(
            TurnRequest(
                tokens=tokens,
                tenant="baseline",
                session_id=f"baseline-{name}",
                turn=turn,
                params=SamplingParams(max_tokens=1),
                reuse=False,
                record=False,
            )
        )
        result = session.run_tokens(
            tokens, SamplingParams(max_tokens=max_tokens), recompute_ttft_s=_service_ttft(baseline)
        )
        with lock:
            rows.append(TurnRow(name, turn, result, _service_ttft(baseline)))
        messages.append({"role": "assistant", "content": result.text})
        messages.append({"role": "tool", "content": tool_result})


def run_demo(
    model: str = "smollm2",
    redis_url: str = "local",
    max_tokens: int = 24,
    jsonl: str | None = None,
    turns: int = 4,
    out: TextIO = sys.stdout,
) -> int:
    tasks = [(name, script[:turns]) for name, script in TASKS]
    print(
        f"kvruntime demo: {len(tasks)} agents x {turns} turns on {model} (CPU)",
        file=out,
        flush=True,
    )
    with redis_for_demo(redis_url) as url:
        config = demo_config(url)
        rt = Runtime.from_pretrained(model, config)
        if jsonl:
            rt.analytics = Analytics(jsonl_path=jsonl)
        print(
            f"device budget {config.device_kv_bytes // MiB} MiB, host {config.host_kv_bytes // MiB}"
            f" MiB, Redis {'off' if url is None else url}; KV {rt.layout.bytes_per_token} B/token",
            file=out,
            flush=True,
        )
        rows: list[TurnRow] = []
        lock = threading.Lock()
        threads = [
            threading.Thread(target=run_agent, args=(rt, name, script, max_tokens, rows, lock))
            for name, script in tasks
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rt.cache.flush(30)
        print_rows(rows, out)
        stats = rt.stats()
        print(json.dumps({"tiers": stats.tiers}, default=str), file=out)
        rt.close()
    return 0 if len(rows) == sum(len(s) for _, s in tasks) else 1


def _service_ttft(result: ChatResult) -> float:
    """Time to first token once the engine took the turn (queueing behind the other agents
    is left out, so reuse and recompute are compared on the same footing)."""
    return result.timings.ttft_s - result.timings.queue_s


def print_rows(rows: list[TurnRow], out: TextIO) -> None:
    header = (
        f"{'agent':<10} {'turn':>4} {'prompt':>6} {'device':>6} {'host':>5} {'redis':>5}"
        f" {'computed':>8} {'ttft_s':>7} {'recompute_s':>11} {'speedup':>7}"
    )
    print(
        "(reused tokens by tier; TTFT once the engine takes the turn, with reuse and when the"
        " same prompt is recomputed)",
        file=out,
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    saved = reused = prompt = 0.0
    for row in sorted(rows, key=lambda r: (r.agent, r.turn)):
        u, ttft = row.result.usage, _service_ttft(row.result)
        tier = u.cached_tokens_by_tier
        print(
            f"{row.agent:<10} {row.turn:>4} {u.prompt_tokens:>6} {tier['device']:>6}"
            f" {tier['host']:>5} {tier['redis']:>5} {u.computed_tokens:>8} {ttft:>7.3f}"
            f" {row.recompute_ttft_s:>11.3f} {row.recompute_ttft_s / max(ttft, 1e-9):>6.1f}x",
            file=out,
        )
        saved += row.recompute_ttft_s - ttft
        reused += u.cached_tokens
        prompt += u.prompt_tokens
    total_recompute = sum(r.recompute_ttft_s for r in rows)
    total = sum(_service_ttft(r.result) for r in rows)
    print(
        f"\nreused {reused / max(prompt, 1):.0%} of {int(prompt)} prompt tokens; time to first"
        f" token {total:.1f} s with reuse vs {total_recompute:.1f} s recomputing"
        f" ({total_recompute / max(total, 1e-9):.1f}x, {saved:.1f} s saved)",
        file=out,
    )
