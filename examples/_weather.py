"""The scenario the framework examples share: a weather tool, the user's questions, two solved
exchanges shown to the model first (a small model then calls the tool the same way), and the
command-line arguments. Each example renders the solved exchanges in its framework's types."""

from __future__ import annotations

import argparse
import json

WEATHER = {"Paris": 18, "Oslo": 4, "Madrid": 27, "Rome": 25, "Berlin": 14}
QUESTIONS = ["Weather in Paris?", "Weather in Oslo?", "Which is warmer?", "Weather in Madrid?"]
SYSTEM = "You are a weather assistant. Use the tools."
SOLVED = [("Rome", 25), ("Berlin", 14)]  # (city, its temperature), shown as worked examples


def weather_json(city: str) -> str:
    """The tool's result: current temperature in Celsius for ``city`` (20 when unknown)."""
    return json.dumps({"temp_c": WEATHER.get(city.strip().title(), 20)})


def parse_args(doc: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=40)
    return parser.parse_args()
