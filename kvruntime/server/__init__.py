"""OpenAI-compatible HTTP server over a Runtime."""
