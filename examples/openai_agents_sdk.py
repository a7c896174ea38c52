"""The OpenAI Agents SDK (``openai-agents``) against ``kvruntime serve``, through its
Chat Completions model and an ``AsyncOpenAI`` client pointed at the server.

An agent with a function tool answers several user turns; each ``Runner.run`` continues the
conversation (``result.to_input_list()`` + the next message), so every model request re-sends
the whole history and kvruntime serves the repeated prefix from cache. The SDK keeps each
request's raw usage (``ModelSettings(preserve_raw_usage=True)``), kvruntime's fields included.

Run: ``kvruntime serve --model smollm2`` then ``python examples/openai_agents_sdk.py``
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from _reuse_table import TurnReuse, from_usage, print_reuse
from _weather import QUESTIONS, SOLVED, SYSTEM, parse_args, weather_json
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI


@function_tool
def get_weather(city: str) -> str:
    """Current temperature in Celsius for a city."""
    return weather_json(city)


def worked_examples() -> list[Any]:
    """Two solved exchanges as SDK input items, so that a small model sees how a call looks."""
    items: list[Any] = []
    for i, (city, temp) in enumerate(SOLVED):
        items += [
            {"role": "user", "content": f"Weather in {city}?"},
            {
                "type": "function_call",
                "call_id": f"call_{i}",
                "name": "get_weather",
                "arguments": json.dumps({"city": city}),
            },
            {
                "type": "function_call_output",
                "call_id": f"call_{i}",
                "output": weather_json(city),
            },
            {"role": "assistant", "content": f"It is {temp}°C in {city}."},
        ]
    return items


async def run(base_url: str, model: str, max_tokens: int) -> list[TurnReuse]:
    set_tracing_disabled(True)  # the SDK would otherwise export traces to OpenAI
    client = AsyncOpenAI(base_url=base_url, api_key="unused")
    agent = Agent(
        name="weather",
        instructions=SYSTEM,
        tools=[get_weather],
        model=OpenAIChatCompletionsModel(model=model, openai_client=client),
        model_settings=ModelSettings(temperature=0, max_tokens=max_tokens, preserve_raw_usage=True),
    )
    history = worked_examples()
    turns: list[TurnReuse] = []
    for question in QUESTIONS:
        print(f"user: {question}")
        result = await Runner.run(agent, [*history, {"role": "user", "content": question}])
        for response in result.raw_responses:  # one per model request of this run
            turns.append(from_usage(response.raw_usage))
        for item in result.new_items:
            if item.type == "tool_call_output_item":
                print(f"  tool output: {item.output}")
        print(f"assistant: {result.final_output}")
        history = result.to_input_list()
    return turns


def main() -> None:
    args = parse_args(__doc__)
    turns = asyncio.run(run(args.base_url, args.model, args.max_tokens))
    print_reuse("openai agents sdk", turns)


if __name__ == "__main__":
    main()
