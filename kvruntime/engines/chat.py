"""Chat messages (OpenAI shape) -> prompt token ids, through the tokenizer's chat template.

Tools: a template that reads ``tools`` gets them as given. A template that does not (SmolLM2's)
gets them folded into the system message as the block ``TOOLS_HEADER`` + one JSON schema per
line (keys sorted, so clients that reorder keys still share the cached prefix) +
``TOOLS_FOOTER``, appended after a blank line to the first message when it is a system message,
or as a new leading system message otherwise (which replaces a template's default system
prompt). Likewise, assistant ``tool_calls`` become ``<tool_call>{"name": .., "arguments": ..}
</tool_call>`` lines in the content for a template that never reads ``tool_calls``.
Rendering is deterministic: the same messages and tools always give the same token ids.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from kvruntime.errors import BadRequest, ConfigError

ROLES = ("system", "user", "assistant", "tool")
TOOLS_HEADER = (
    "# Tools\n\nYou can call these functions. Their JSON schemas, one per line:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nTo call a function, answer with one line per call:\n"
    '<tool_call>\n{"name": <function name>, "arguments": <JSON object>}\n</tool_call>'
)


class TemplateFeatures(NamedTuple):
    tools: bool  # the template reads the ``tools`` variable
    tool_calls: bool  # the template renders assistant ``tool_calls``


def render(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of ``messages`` (and ``tools``) rendered with the tokenizer's chat template.

    Raises ``BadRequest`` for a malformed message or tool (the message says which one and
    why) or when the template itself rejects the conversation, ``ConfigError`` for a tokenizer
    without a chat template.
    """
    text = render_text(tokenizer, messages, tools, add_generation_prompt)
    # The template already wrote every special token (BOS included, if the model wants one).
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_text(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    msgs = check_messages(messages)
    tool_list = check_tools(tools)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("this tokenizer has no chat template; send token ids instead")
    features = template_features(tokenizer.get_chat_template(None, tool_list or None))
    if tool_list and not features.tools:
        msgs = fold_tools(msgs, tool_list)
        tool_list = []
    if not features.tool_calls:
        msgs = [fold_tool_calls(m) for m in msgs]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            msgs,
            tools=tool_list or None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except TemplateError as exc:
        raise BadRequest(f"the model's chat template rejected these messages: {exc}") from None
    return str(text)


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated plain copies: role, content (text), tool_calls, tool_call_id, name."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    return [_check_message(i, m) for i, m in enumerate(messages)]


def check_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if isinstance(tools, str | bytes) or not isinstance(tools, Sequence):
        raise BadRequest("tools must be a list of function schemas")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                f"'parameters': ...}}}} or a bare function schema with a name"
            )
        out.append(dict(tool))
    return out


def fold_tools(msgs: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    schemas = "\n".join(json.dumps(t, sort_keys=True, ensure_ascii=False) for t in tools)
    block = TOOLS_HEADER + schemas + TOOLS_FOOTER
    if msgs[0]["role"] == "system":
        first = dict(msgs[0], content=f"{msgs[0]['content']}\n\n{block}")
        return [first, *msgs[1:]]
    return [{"role": "system", "content": block}, *msgs]


def fold_tool_calls(msg: dict[str, Any]) -> dict[str, Any]:
    calls = msg.get("tool_calls")
    if not calls:
        return msg
    lines = []
    for call in calls:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            with contextlib.suppress(ValueError):
                args = json.loads(args)
        body = json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)
        lines.append(f"<tool_call>\n{body}\n</tool_call>")
    content = "\n".join([msg["content"], *lines] if msg.get("content") else lines)
    return {k: v for k, v in msg.items() if k != "tool_calls"} | {"content": content}


@functools.lru_cache(maxsize=64)
def template_features(template: str) -> TemplateFeatures:
    """Which tool variables the template reads (parsed with jinja2; a regex if it won't parse).
    Cached per template string: parsing costs more than a short turn, and a process serves
    one or two templates."""
    import jinja2
    from jinja2 import meta

    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        names = meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateError:
        names = set(re.findall(r"\btools\b", template))
    return TemplateFeatures(tools="tools" in names, tool_calls="tool_calls" in template)


def _check_message(i: int, m: Any) -> dict[str, Any]:
    if not isinstance(m, Mapping):
        raise BadRequest(f"messages[{i}] must be an object with role and content")
    role = m.get("role")
    if role not in ROLES:
        raise BadRequest(
            f"messages[{i}] has {'no role' if role is None else f'unknown role {role!r}'};"
            f" expected one of {', '.join(ROLES)}"
        )
    out: dict[str, Any] = {"role": role}
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list | tuple):
            raise BadRequest(f"messages[{i}].tool_calls must be a list on an assistant message")
        out["tool_calls"] = [_check_call(i, j, c) for j, c in enumerate(calls)]
    content = m.get("content")
    if content is None and not calls:
        raise BadRequest(f"messages[{i}] ({role}) has no content")
    if content is not None:
        out["content"] = _text(i, content)
    elif role == "assistant":
        out["content"] = ""  # templates concatenate content; a tool-call turn has none
    for key in ("tool_call_id", "name"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _check_call(i: int, j: int, call: Any) -> dict[str, Any]:
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"messages[{i}].tool_calls[{j}] needs function.name")
    return dict(call)


def _text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    # OpenAI content parts: only text parts carry meaning for a text model.
    if isinstance(content, list | tuple) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
