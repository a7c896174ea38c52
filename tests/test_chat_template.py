"""Rendering chat messages and tools to token ids with the model's chat template."""

from __future__ import annotations

import json
from typing import Any

import pytest
from model_fixtures import smollm2 as smollm2  # fixture
from model_fixtures import tiny_tokenizer

from kvruntime.engines.chat import (
    TOOLS_FOOTER,
    TOOLS_HEADER,
    render,
    render_text,
    template_features,
)
from kvruntime.engines.models import LoadedModel
from kvruntime.errors import BadRequest, ConfigError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# A template that reads tools and assistant tool_calls itself (like Qwen's or Llama 3's).
TOOL_TEMPLATE = (
    "{% if tools %}[TOOLS]{% for t in tools %}{{ t['function']['name'] }};{% endfor %}[/TOOLS]"
    "{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}[CALL {{ c['function']['name'] }}]{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tokenizer_with(template: str) -> Any:
    tok: Any = tiny_tokenizer()
    tok.chat_template = template
    return tok


def test_smollm2_renders_its_own_template(smollm2: LoadedModel) -> None:
    tok = smollm2.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    assert render_text(tok, messages, add_generation_prompt=False) == expected
    assert render_text(tok, messages) == expected + "<|im_start|>assistant\n"
    ids = render(tok, messages)
    assert ids == tok.encode(expected + "<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # specials are single tokens
    # OpenAI content parts are joined.
    parts = [{"type": "text", "text": "H"}, {"type": "text", "text": "i!"}]
    assert render(tok, [messages[0], {"role": "user", "content": parts}]) == ids


def test_smollm2_turns_extend_the_previous_prompt(smollm2: LoadedModel) -> None:
    """What prefix reuse across turns relies on: turn 2's tokens start with turn 1's prompt."""
    tok = smollm2.tokenizer
    turn1 = [{"role": "user", "content": "Name a colour."}]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    first, second = render(tok, turn1), render(tok, turn2)
    assert second[: len(first)] == first
    assert tok.decode(second[len(first) :]).startswith("Blue.<|im_end|>")


def test_tools_are_folded_into_the_system_message_when_the_template_ignores_them(
    smollm2: LoadedModel,
) -> None:
    tok = smollm2.tokenizer
    assert template_features(tok.chat_template) == (False, False)
    user = {"role": "user", "content": "Weather in Oslo?"}
    schema = json.dumps(WEATHER, sort_keys=True)
    text = render_text(tok, [{"role": "system", "content": "Be brief."}, user], tools=[WEATHER])
    block = TOOLS_HEADER + schema + TOOLS_FOOTER
    assert text.startswith(f"<|im_start|>system\nBe brief.\n\n{block}<|im_end|>\n<|im_start|>user")
    # No system message: the block becomes one (replacing the template's default).
    text = render_text(tok, [user], tools=[WEATHER])
    assert text.startswith(f"<|im_start|>system\n{block}<|im_end|>\n")
    assert "SmolLM" not in text
    # Deterministic whatever the client's key order.
    reordered = {"function": dict(reversed(list(WEATHER["function"].items()))), "type": "function"}
    assert render(tok, [user], tools=[reordered]) == render(tok, [user], tools=[WEATHER])
    assert render(tok, [user], tools=[]) == render(tok, [user])


def test_tool_calls_and_results_render_for_a_template_without_tool_support(
    smollm2: LoadedModel,
) -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain, 4 C"},
    ]
    text = render_text(smollm2.tokenizer, messages)
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
        "\n</tool_call><|im_end|>\n<|im_start|>tool\nrain, 4 C<|im_end|>\n<|im_start|>assistant\n"
    ) in text


def test_a_template_with_tool_support_gets_tools_and_calls_as_given() -> None:
    tok = tokenizer_with(TOOL_TEMPLATE)
    assert template_features(TOOL_TEMPLATE) == (True, True)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "rain"},
    ]
    text = render_text(tok, messages, tools=[WEATHER])
    expected = (
        "[TOOLS]get_weather;[/TOOLS]<user>Oslo?<assistant>[CALL get_weather]<tool>rain<assistant>"
    )
    assert text == expected
    assert render(tok, messages, tools=[WEATHER]) == tok.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\] has no role"),
        ([{"role": "bot", "content": "hi"}], r"unknown role 'bot'.*system, user, assistant, tool"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no content"),
        ([{"role": "user", "content": 3}], "string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "text parts"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "assistant message"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "function.name"),
    ],
)
def test_bad_messages_are_bad_requests(messages: Any, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        render(tiny_tokenizer(), messages)


def test_bad_tools_and_templates() -> None:
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(BadRequest, match=r"tools\[0\]"):
        render(tiny_tokenizer(), user, tools=[{"type": "function", "function": {}}])
    with pytest.raises(BadRequest, match="list of function schemas"):
        render(tiny_tokenizer(), user, tools="get_weather")  # type: ignore[arg-type]
    strict = tokenizer_with(
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tool role here') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    assert render_text(strict, user) == "hi"
    with pytest.raises(BadRequest, match="no tool role here"):
        render(strict, [*user, {"role": "tool", "content": "x"}])
    bare = tiny_tokenizer()
    bare.chat_template = None  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="no chat template"):
        render(bare, user)
