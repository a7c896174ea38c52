"""OpenAI-compatible HTTP server over a Runtime: ``create_app(runtime, ServerConfig(...))``.

Imports FastAPI; ``import kvruntime`` alone never does."""

from __future__ import annotations

from kvruntime.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
