"""Model output -> OpenAI ``tool_calls``, for templates whose tool-call format is known.

The format is the ``<tool_call>{"name": .., "arguments": {..}}</tool_call>`` block that
``kvruntime.engines.chat`` asks for when it folds tools into the system message (a template
that ignores ``tools``, such as SmolLM2's), and that Hermes/Qwen-style templates define
themselves. For any other template the output stays plain content. A block that does not parse,
or names a function that was not offered, leaves the whole output as content: a small model's
malformed call is returned as text, never as an error.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from kvruntime.engines.chat import template_features

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
# one block; the last one may be cut off by the end of the output (the model stopped there)
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


class ToolCall(NamedTuple):
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def as_dict(self) -> dict[str, Any]:
        fn = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": fn}


class ParsedOutput(NamedTuple):
    content: str | None  # the text outside the calls; None when it is only whitespace
    tool_calls: list[ToolCall]


def tag_format(chat_template: str | None) -> bool:
    """True when output from this template can carry ``<tool_call>`` blocks: the template
    ignores ``tools`` (kvruntime folds them in, with that format) or names the tag itself."""
    if not chat_template:
        return False
    return not template_features(chat_template).tools or OPEN_TAG in chat_template


def tool_names(tools: Iterable[Mapping[str, Any]] | None) -> frozenset[str]:
    names = set()
    for tool in tools or ():
        fn = tool.get("function", tool)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return frozenset(names)


def parse_tool_calls(text: str, allowed: frozenset[str]) -> ParsedOutput:
    """Split ``text`` into content and calls to functions in ``allowed``. Never raises."""
    if OPEN_TAG not in text or not allowed:
        return ParsedOutput(text, [])
    calls: list[ToolCall] = []
    for m in _BLOCK.finditer(text):
        call = _call(m.group(1), allowed)
        if call is None:
            return ParsedOutput(text, [])
        calls.append(call)
    rest = _BLOCK.sub("", text)
    return ParsedOutput(rest if rest.strip() else None, calls)


def _call(body: str, allowed: frozenset[str]) -> ToolCall | None:
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in allowed:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments already as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], json.dumps(args))
