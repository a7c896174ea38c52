"""A LangChain agent (``langchain.agents.create_agent``, a LangGraph graph) over
``langchain-openai``'s ``ChatOpenAI`` pointed at ``kvruntime serve`` by its base URL.

The agent is invoked once per user turn with the accumulated message history, so every
model request re-sends the whole conversation and kvruntime serves the repeated prefix from
cache. ``ChatOpenAI`` keeps the server's raw usage in each reply's
``response_metadata["token_usage"]``, kvruntime's fields included.

Run: ``kvruntime serve --model smollm2`` then ``python examples/langchain_agent.py``
"""

from __future__ import annotations

from typing import Any

from _reuse_table import TurnReuse, from_usage, print_reuse
from _weather import QUESTIONS, SOLVED, SYSTEM, parse_args, weather_json
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


@tool
def get_weather(city: str) -> str:
    """Current temperature in Celsius for a city."""
    return weather_json(city)


def worked_examples() -> list[AnyMessage]:
    """Two solved exchanges, so that a small model sees how a call looks."""
    messages: list[AnyMessage] = []
    for i, (city, temp) in enumerate(SOLVED):
        call = {"name": "get_weather", "args": {"city": city}, "id": f"call_{i}"}
        messages += [
            HumanMessage(f"Weather in {city}?"),
            AIMessage("", tool_calls=[call]),
            ToolMessage(weather_json(city), tool_call_id=f"call_{i}"),
            AIMessage(f"It is {temp}°C in {city}."),
        ]
    return messages


def main() -> None:
    args = parse_args(__doc__)
    llm = ChatOpenAI(
        model=args.model, base_url=args.base_url, api_key="unused",  # type: ignore[arg-type]
        temperature=0, max_tokens=args.max_tokens,  # type: ignore[call-arg]
    )  # fmt: skip
    agent = create_agent(llm, [get_weather], system_prompt=SYSTEM)
    history = worked_examples()
    turns: list[TurnReuse] = []
    for question in QUESTIONS:
        print(f"user: {question}")
        sent: list[Any] = [*history, HumanMessage(question)]
        history = agent.invoke({"messages": sent}, {"recursion_limit": 8})["messages"]
        for msg in history[len(sent) :]:  # this turn's model replies and tool results
            if isinstance(msg, AIMessage):
                turns.append(from_usage(msg.response_metadata["token_usage"]))
            elif isinstance(msg, ToolMessage):
                print(f"  tool output: {msg.content}")
        print(f"assistant: {history[-1].content}")
    print_reuse("langchain agent", turns)


if __name__ == "__main__":
    main()
