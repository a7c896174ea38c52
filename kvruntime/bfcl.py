"""The BFCL multi-turn tool-use tasks (Berkeley Function Calling Leaderboard, Apache-2.0) as
agent sessions to replay.

Each of the 200 tasks becomes a ``ChatSession``: a system prompt carrying the tool schemas of the
task's tool sets (thousands of tokens, shared by every task with the same sets), then for each
user turn one model call per ground-truth tool call, as an agent loop makes them: the prompt is
sent, the assistant's call (the ground truth) and a synthesised tool result (a JSON echo of the
call) are appended, and the grown conversation is sent again. A turn ends with a short assistant
answer before the next user message. Waits are seeded like the synthetic trace's.

Data location: ``KVR_BFCL_DIR``, else ``../shared/data/bfcl`` beside the repository.
"""

from __future__ import annotations

import ast
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvruntime import env
from kvruntime.errors import ConfigError
from kvruntime.trace import ChatSession, ChatTurn, sample_wait

TASKS_FILE = "multi_turn_base.jsonl"
ANSWERS_FILE = "multi_turn_base_answers.jsonl"
CLASS_FILES = {
    "GorillaFileSystem": "gorilla_file_system",
    "MathAPI": "math_api",
    "MessageAPI": "message_api",
    "TwitterAPI": "posting_api",
    "TicketAPI": "ticket_api",
    "TradingBot": "trading_bot",
    "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}
SYSTEM_PROMPT = (
    "You are an assistant that completes the user's requests by calling functions. At each "
    "step, call the functions needed for the next part of the request, one call per step, and "
    "read each result before the next call. Use only the functions listed below, with "
    "arguments of the stated types. When the request is done, answer briefly in plain text. "
    "If a request cannot be done with these functions, say so instead of guessing."
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class BfclTask:
    task_id: str
    classes: tuple[str, ...]  # tool sets, in the task's order
    tools: tuple[dict[str, Any], ...]  # {"type": "function", "function": BFCL's schema}
    user_turns: tuple[tuple[dict[str, Any], ...], ...]  # the user messages of each turn
    calls: tuple[tuple[ToolCall, ...], ...]  # the ground-truth calls of each turn

    @property
    def num_steps(self) -> int:
        """Model calls when replayed: one per ground-truth call plus one answer per turn."""
        return sum(len(c) for c in self.calls) + len(self.calls)


def data_dir() -> Path:
    """Where the BFCL files are: ``KVR_BFCL_DIR`` (read through ``kvruntime.env.bfcl_dir``
    where it exists), else ``shared/data/bfcl`` beside the repository clone."""
    reader = getattr(env, "bfcl_dir", None)
    configured = reader() if reader is not None else os.environ.get("KVR_BFCL_DIR")
    path = Path(configured) if configured else _default_dir()
    if not (path / TASKS_FILE).is_file():
        raise ConfigError(
            f"no BFCL data at {path} (set KVR_BFCL_DIR to the folder of {TASKS_FILE})"
        )
    return path


def _default_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "bfcl"


def load_tool_docs(root: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """BFCL's function schemas by class name (one JSON object a line in ``func_doc/``)."""
    root = root or data_dir()
    docs: dict[str, list[dict[str, Any]]] = {}
    for cls, stem in CLASS_FILES.items():
        lines = (root / "func_doc" / f"{stem}.json").read_text().splitlines()
        docs[cls] = [json.loads(line) for line in lines if line.strip()]
    return docs


def load_tasks(root: Path | None = None) -> list[BfclTask]:
    """All tasks with their tool schemas (a task's excluded functions left out) and calls.
    Raises ``ConfigError`` when the files are missing or disagree (ids, turn counts)."""
    root = root or data_dir()
    docs = load_tool_docs(root)
    questions = _jsonl(root / TASKS_FILE)
    answers = {a["id"]: a["ground_truth"] for a in _jsonl(root / ANSWERS_FILE)}
    tasks = []
    for q in questions:
        truth = answers.get(q["id"])
        if truth is None or len(truth) != len(q["question"]):
            raise ConfigError(f"BFCL task {q['id']}: answers missing or of another turn count")
        excluded = set(q.get("excluded_function", ()))
        classes = tuple(q["involved_classes"])
        schemas = [d for cls in classes for d in docs[cls] if d["name"] not in excluded]
        params = {d["name"]: list(d["parameters"].get("properties", {})) for d in schemas}
        tasks.append(
            BfclTask(
                task_id=q["id"],
                classes=classes,
                tools=tuple({"type": "function", "function": d} for d in schemas),
                user_turns=tuple(tuple(turn) for turn in q["question"]),
                calls=tuple(tuple(parse_call(c, params) for c in turn) for turn in truth),
            )
        )
    return tasks


def parse_call(text: str, params: dict[str, list[str]]) -> ToolCall:
    """``mv(source='a', destination='b')`` -> ToolCall; positional arguments take the names of
    the function's parameters in schema order. Raises ``ConfigError`` for anything else."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ValueError("not a plain function call")
        name = node.func.id
        names = params.get(name, [])
        if len(node.args) > len(names):
            raise ValueError(f"{len(node.args)} positional arguments, schema has {len(names)}")
        args = {names[i]: ast.literal_eval(a) for i, a in enumerate(node.args)}
        args.update({k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg})
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(f"cannot parse BFCL call {text!r}: {exc}") from None
    return ToolCall(name, args)


def task_session(
    task: BfclTask,
    seed: int = 0,
    max_tokens: int = 32,
    wait_s: tuple[float, float] = (0.002, 30.0),
    arrival_s: float = 5.0,
) -> ChatSession:
    """The task as an agent session (see the module docstring); deterministic for ``seed``."""
    rng = random.Random(f"kvr-bfcl:{seed}:{task.task_id}")
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    turns: list[ChatTurn] = []
    n = 0
    for t, (user, calls) in enumerate(zip(task.user_turns, task.calls, strict=True)):
        messages += [dict(m) for m in user]
        wait = rng.uniform(0, arrival_s) if t == 0 else sample_wait(rng, *wait_s)
        turns.append(ChatTurn(tuple(messages), task.tools, wait, max_tokens, _event(t)))
        for call in calls:
            call_id = f"call_{n}"
            n += 1
            fn = {"name": call.name, "arguments": json.dumps(call.arguments)}
            messages.append(
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": call_id, "type": "function", "function": fn}]}
            )  # fmt: skip
            messages.append({"role": "tool", "tool_call_id": call_id, "content": tool_result(call)})
            wait = sample_wait(rng, *wait_s)
            turns.append(ChatTurn(tuple(messages), task.tools, wait, max_tokens, "tool"))
        done = ", ".join(c.name for c in calls) or "no function call was needed"
        messages.append({"role": "assistant", "content": f"Done ({done})."})
    return ChatSession(task.task_id, tuple(turns))


def tool_result(call: ToolCall) -> str:
    """A synthesised result: the call echoed as JSON with a success status."""
    return json.dumps({"function": call.name, "arguments": call.arguments, "status": "ok"})


def sessions(tasks: list[BfclTask], seed: int = 0, max_tokens: int = 32) -> list[ChatSession]:
    return [task_session(t, seed, max_tokens) for t in tasks]


def _event(turn: int) -> str:
    return "start" if turn == 0 else "user"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"missing BFCL file {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
