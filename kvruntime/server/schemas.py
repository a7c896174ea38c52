"""Request bodies (pydantic) and response bodies (plain dicts) of the OpenAI-compatible API.

Unknown request fields are ignored, as OpenAI's newer client fields should not break old
servers; fields that would change the output and are not supported here (``n > 1``,
``logprobs``, penalties, ``logit_bias``) are refused with a 400 rather than silently ignored.

kvruntime extensions on requests: ``session_id`` (also the ``x-session-id`` header, or
``user``), ``pin_ttl_s`` (keep the session's KV on the device that long after a turn that ends
in a tool call), ``return_token_ids`` (token ids on each choice, as vLLM does) and
``parse_tool_calls`` (False returns the raw text as content). On responses:
``usage.kvruntime`` (see ``usage_json``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvruntime.divergence import Divergence
from kvruntime.results import ChatResult
from kvruntime.server.errors import APIError
from kvruntime.server.tool_calls import ToolCall


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # kvruntime extensions
    session_id: str | None = Field(None, min_length=1, max_length=256)
    pin_ttl_s: float | None = Field(None, gt=0)
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not all(s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _unicode(self) -> SamplingFields:
        # JSON may carry lone surrogates ("\ud800"), which no tokenizer can encode
        bad = _first_unencodable(self.model_dump(include=_TEXT_FIELDS))
        if bad is not None:
            raise ValueError(f"{bad} holds text that is not valid Unicode (a lone surrogate)")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, "n must be 1: one choice per request", param="n")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")


_TEXT_FIELDS = {"messages", "tools", "prompt", "stop"}


def _first_unencodable(value: Any, where: str = "") -> str | None:
    """Path of the first string in ``value`` that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "a field"
        return None
    items: Any = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    for key, item in items:
        found = _first_unencodable(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class ChatCompletionRequest(SamplingFields):
    # messages and tools are checked in depth by kvruntime.engines.chat (clear messages there)
    messages: list[Any]
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=0)
    parse_tool_calls: bool = True

    @field_validator("messages")
    @classmethod
    def _developer_is_system(cls, v: list[Any]) -> list[Any]:
        # OpenAI's newer name for the system role; chat templates know only "system"
        return [
            dict(m, role="system") if isinstance(m, dict) and m.get("role") == "developer" else m
            for m in v
        ]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else (
            self.max_tokens
        )  # fmt: skip


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def prompt_one(self) -> str | list[int]:
        """The single prompt (a batch of one is unwrapped); a larger batch is refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise APIError(400, "send one prompt per request", param="prompt")
            p = p[0]
        if isinstance(p, list) and not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        if self.echo or self.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo")
        return p  # type: ignore[return-value]


# ---------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_json(
    result: ChatResult,
    tenant: str,
    divergence: Divergence | None = None,
    pinned_tokens: int | None = None,
) -> dict[str, Any]:
    """OpenAI's usage, plus ``kvruntime``: where the reused tokens came from, how many were
    computed, the turn's timings (seconds) and where the prompt left the session's last one."""
    u = result.usage
    ext: dict[str, Any] = {
        "cached_tokens_by_tier": dict(u.cached_tokens_by_tier),
        "computed_tokens": u.computed_tokens,
        "timings": result.timings.as_dict(),
        "divergence": None if divergence is None else asdict(divergence),
        "session_id": result.session_id or None,
        "turn": result.turn,
        "tenant": tenant,
    }
    if pinned_tokens is not None:
        ext["pinned_tokens"] = pinned_tokens
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "kvruntime": ext,
    }


def chat_message(content: str | None, calls: list[ToolCall]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [c.as_dict() for c in calls]
    return msg


def chat_completion(
    rid: str,
    model: str,
    message: dict[str, Any],
    finish_reason: str,
    usage: dict[str, Any],
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """One streamed chunk; ``delta=None`` gives the usage-only chunk (no choices)."""
    body = None if delta is None else {"delta": delta}
    return _envelope(rid, "chat.completion.chunk", model, body, finish_reason, usage, token_ids)


def text_completion(
    rid: str,
    model: str,
    text: str | None,
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """A text completion, or one chunk of a streamed one (``text=None``: usage only)."""
    body = None if text is None else {"text": text}
    return _envelope(rid, "text_completion", model, body, finish_reason, usage, token_ids)


def _envelope(
    rid: str,
    kind: str,
    model: str,
    body: dict[str, Any] | None,
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    token_ids: list[int] | None,
) -> dict[str, Any]:
    """A response object of ``kind`` with one choice holding ``body`` (None: no choices)."""
    choices: list[dict[str, Any]] = []
    if body is not None:
        choice: dict[str, Any] = {"index": 0, **body, "logprobs": None}
        choice["finish_reason"] = finish_reason
        if token_ids is not None:
            choice["token_ids"] = token_ids
        choices.append(choice)
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }
