"""A plain tool-use loop with the official ``openai`` package against ``kvruntime serve``.

Each user turn goes to the model with the tool schemas; tool calls are run here and their
results fed back as ``tool`` messages until the model answers in text. The whole conversation
is re-sent every request, as agents do, and kvruntime serves the repeated prefix from cache:
the table at the end shows how many prompt tokens each request reused, by tier.

Run: ``kvruntime serve --model smollm2`` then ``python examples/openai_tool_loop.py``
"""

from __future__ import annotations

import json
from typing import Any

import openai
from _reuse_table import TurnReuse, from_usage, print_reuse
from _weather import QUESTIONS, SOLVED, SYSTEM, parse_args, weather_json

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current temperature in Celsius for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def worked_examples() -> list[dict[str, Any]]:
    """Two solved exchanges, so that a small model sees how a call looks."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for i, (city, temp) in enumerate(SOLVED):
        args = json.dumps({"city": city})
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": args}}  # fmt: skip
        messages += [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": weather_json(city)},
            {"role": "assistant", "content": f"It is {temp}°C in {city}."},
        ]
    return messages


def main() -> None:
    args = parse_args(__doc__)
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    messages: list[Any] = worked_examples()
    turns: list[TurnReuse] = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        print(f"user: {question}")
        for _ in range(3):  # a few tool rounds per question at most
            r = client.chat.completions.create(
                model=args.model, messages=messages, tools=TOOLS,
                temperature=0, max_tokens=args.max_tokens,
            )  # fmt: skip
            assert r.usage is not None
            turns.append(from_usage(r.usage.model_dump()))
            msg = r.choices[0].message
            calls = [c for c in msg.tool_calls or [] if c.type == "function"]
            messages.append(
                msg.model_dump(include={"role", "content", "tool_calls"}, exclude_none=True)
            )
            print(f"assistant: {msg.content or ''}")
            if not calls:
                break
            for call in calls:
                arguments = json.loads(call.function.arguments)
                result = weather_json(str(arguments.get("city", "")))
                print(f"  tool {call.function.name}({call.function.arguments}) -> {result}")
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    print_reuse("openai tool loop", turns)


if __name__ == "__main__":
    main()
