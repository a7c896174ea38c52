"""BFCL multi-turn tasks (real data in ../shared/data/bfcl): all 200 load with their tool
schemas and ground-truth calls, and replay as agent sessions whose prompts grow turn by turn."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from model_fixtures import tiny_tokenizer

from kvruntime import bfcl
from kvruntime.engines.chat import check_messages, check_tools, render
from kvruntime.errors import ConfigError
from kvruntime.trace import TokenRenderer, common_prefix


@pytest.fixture(scope="module")
def tasks() -> list[bfcl.BfclTask]:
    return bfcl.load_tasks()


def test_all_200_tasks_load_with_their_tool_schemas(tasks: list[bfcl.BfclTask]) -> None:
    root = bfcl.data_dir()
    assert len(tasks) == 200 and len({t.task_id for t in tasks}) == 200
    docs = bfcl.load_tool_docs(root)
    for cls, stem in bfcl.CLASS_FILES.items():
        lines = (root / "func_doc" / f"{stem}.json").read_text().split("\n")
        assert len(docs[cls]) == sum(bool(line.strip()) for line in lines)
    raw = [json.loads(line) for line in (root / bfcl.TASKS_FILE).read_text().splitlines()]
    for task, q in zip(tasks, raw, strict=True):
        assert task.task_id == q["id"] and list(task.classes) == q["involved_classes"]
        names = [tool["function"]["name"] for tool in task.tools]
        excluded = set(q.get("excluded_function", ()))
        want = [d["name"] for c in task.classes for d in docs[c] if d["name"] not in excluded]
        assert names == want and not excluded & set(names)
        for tool in task.tools:
            assert tool["type"] == "function" and "properties" in tool["function"]["parameters"]
        assert len(task.user_turns) == len(task.calls) == len(q["question"])
        called = {c.name for turn in task.calls for c in turn}
        assert called <= set(names), task.task_id
    assert sum(len(turn) for t in tasks for turn in t.calls) == 1142
    assert Counter(c for t in tasks for c in t.classes)["GorillaFileSystem"] == 50


def test_ground_truth_calls_parse_with_positional_arguments() -> None:
    params = {"sort": ["file_name"], "mv": ["source", "destination"]}
    assert bfcl.parse_call("sort('final_report.pdf')", params) == bfcl.ToolCall(
        "sort", {"file_name": "final_report.pdf"}
    )
    call = bfcl.parse_call("mv(source='a.txt',destination=\"b\")", params)
    assert call.arguments == {"source": "a.txt", "destination": "b"}
    assert bfcl.parse_call("ls(a=True, n=[1, 2.5])", {}).arguments == {"a": True, "n": [1, 2.5]}
    for bad in ("mv(", "x.y(1)", "sort(open('f'))", "sort('a', 'b')", "1 + 2"):
        with pytest.raises(ConfigError):
            bfcl.parse_call(bad, params)


def test_a_task_replays_as_a_growing_agent_session(tasks: list[bfcl.BfclTask]) -> None:
    task = tasks[0]
    session = bfcl.task_session(task, seed=1, max_tokens=8)
    assert session == bfcl.task_session(task, seed=1, max_tokens=8)  # deterministic
    assert session != bfcl.task_session(task, seed=2, max_tokens=8)  # waits differ
    assert len(session.turns) == task.num_steps == 4 + sum(len(c) for c in task.calls)
    assert [t.event for t in session.turns].count("user") == len(task.user_turns) - 1
    first = session.turns[0]
    assert first.messages[0] == {"role": "system", "content": bfcl.SYSTEM_PROMPT}
    assert first.messages[1] == task.user_turns[0][0] and first.tools == task.tools
    previous: tuple = ()
    for turn in session.turns:
        assert turn.messages[: len(previous)] == previous  # history is only appended to
        check_messages(turn.messages)
        check_tools(turn.tools)
        assert turn.max_tokens == 8 and turn.wait_s >= 0
        previous = turn.messages
    tool_messages = [m for m in previous if m["role"] == "tool"]
    assert len(tool_messages) == sum(len(c) for c in task.calls)
    result = json.loads(tool_messages[0]["content"])
    assert result == {"function": "cd", "arguments": {"folder": "document"}, "status": "ok"}


def test_rendered_sessions_share_schemas_and_extend_prompts(tasks: list[bfcl.BfclTask]) -> None:
    r = TokenRenderer(128256)
    sessions = bfcl.sessions(tasks)
    same_tools = [s for s, t in zip(sessions, tasks, strict=True) if t.classes == ("TradingBot",)]
    firsts = [r.chat(s.turns[0].messages, s.turns[0].tools) for s in same_tools]
    assert len(firsts) >= 10
    shared = min(common_prefix(firsts[0], f) for f in firsts[1:])
    assert shared > 1000  # the schemas: thousands of tokens common to these tasks
    overlaps = []
    for s in sessions[::10]:
        prompts = [r.chat(t.messages, t.tools) for t in s.turns]
        for a, b in itertools.pairwise(prompts):
            assert common_prefix(a, b) == len(a)
            overlaps.append(len(a) / len(b))
    assert 0.85 < sum(overlaps) / len(overlaps) < 1.0  # agent traces: 85-95% per turn


def test_chat_template_renders_bfcl_sessions(tasks: list[bfcl.BfclTask]) -> None:
    tok = tiny_tokenizer()
    s = bfcl.task_session(tasks[5])
    ids = [render(tok, t.messages, t.tools) for t in s.turns[:3]]
    assert common_prefix(ids[0], ids[1]) == len(ids[0]) and len(ids[2]) > len(ids[1])
    text = tok.decode(ids[1])  # type: ignore[attr-defined]
    assert tasks[5].tools[0]["function"]["name"] in text and "<tool_call>" in text


def test_data_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "bfcl"
    shutil.copytree(bfcl.data_dir(), copy, copy_function=shutil.copyfile)
    for d in (copy, copy / "func_doc"):
        d.chmod(0o755)  # the shared data is read-only; the copy is ours
    monkeypatch.setenv("KVR_BFCL_DIR", str(copy))
    assert bfcl.data_dir() == copy
    assert len(bfcl.load_tasks()) == 200
    (copy / bfcl.ANSWERS_FILE).write_text("")
    with pytest.raises(ConfigError, match="answers"):
        bfcl.load_tasks(copy)
    monkeypatch.setenv("KVR_BFCL_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="KVR_BFCL_DIR"):
        bfcl.data_dir()
