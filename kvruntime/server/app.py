"""The FastAPI app over a ``Runtime``: OpenAI's chat and text completions (streaming or not),
models, health, Prometheus metrics, and kvruntime's own session and analytics endpoints.

``create_app(runtime, ServerConfig(model_name=...))`` builds it; ``kvruntime serve`` runs it under
uvicorn. The event loop never runs a turn: turns go to ``TurnRunner``'s threads (the runtime
serialises them on its engine thread) and streamed tokens come back through an asyncio queue.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvruntime.engines.chat import render
from kvruntime.errors import BadRequest, ConfigError
from kvruntime.runtime import OnToken, Runtime
from kvruntime.server import schemas
from kvruntime.server.errors import APIError, BodyLimit, install_error_handlers
from kvruntime.server.extensions import extension_routes, tenant_of
from kvruntime.server.metrics import RequestMetrics, ServerMetrics
from kvruntime.server.streaming import (
    DeltaFilter,
    Finish,
    Finished,
    TurnResponse,
    TurnStream,
    chat_events,
    completion_events,
)
from kvruntime.server.tool_calls import OPEN_TAG, parse_tool_calls, tag_format, tool_names
from kvruntime.server.turns import TurnContext, TurnOutcome, TurnRunner

SESSION_HEADER = "x-session-id"
PIN_HEADER = "x-kvruntime-pin-ttl"


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the id clients send as ``model`` and /v1/models lists
    aliases: tuple[str, ...] = ()  # other accepted ``model`` values (e.g. the load path)
    default_max_tokens: int | None = 1024  # when a request sets none; None: up to the context
    max_pin_ttl_s: float = 3600.0  # longer pins asked for are cut to this
    workers: int | None = None  # threads waiting on turns; None: the runtime's max_queue + 4
    max_turn_records: int = 1000  # most records /v1/kvruntime/turns returns
    # larger request bodies are refused (413) unread; None: 1 MiB + 64 bytes per context token
    max_body_bytes: int | None = None
    max_prompt_tokens: int | None = None  # longer prompts are refused (400); None: the context

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("ServerConfig.model_name must be non-empty")
        if self.default_max_tokens is not None and self.default_max_tokens <= 0:
            raise ConfigError("ServerConfig.default_max_tokens must be positive or None")
        if self.max_pin_ttl_s <= 0 or self.max_turn_records <= 0:
            raise ConfigError("ServerConfig.max_pin_ttl_s and max_turn_records must be positive")
        if self.workers is not None and self.workers <= 0:
            raise ConfigError("ServerConfig.workers must be positive or None")
        for name in ("max_body_bytes", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value <= 0):
                raise ConfigError(f"ServerConfig.{name} must be a positive int or None")

    def body_limit(self, max_context: int) -> int:
        """The request-body limit in bytes for a model of ``max_context`` tokens."""
        return self.max_body_bytes or (1 << 20) + 64 * max_context

    @property
    def model_ids(self) -> frozenset[str]:
        return frozenset((self.model_name, *self.aliases))


def create_app(runtime: Runtime, config: ServerConfig) -> FastAPI:
    """An app serving ``runtime``. The caller owns the runtime (and closes it after the app)."""
    workers = config.workers or runtime.config.max_queue + 4
    max_records = config.max_turn_records
    runner = TurnRunner(runtime, workers, config.default_max_tokens)
    metrics = ServerMetrics(runtime)
    created = int(time.time())
    tags = tag_format(getattr(runtime.tokenizer, "chat_template", None))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.close()

    app = FastAPI(title="kvruntime", lifespan=lifespan)
    app.state.runtime = runtime
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.body_limit(runtime.engine.max_context))
    app.add_middleware(RequestMetrics, metrics=metrics)

    def check_model(model: str) -> None:
        if model not in config.model_ids:
            raise APIError(
                404,
                f"the model {model!r} does not exist here; this server serves"
                f" {config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def limit_prompt(ids: list[int], param: str) -> list[int]:
        """The configured prompt limit (the context's is checked with max_tokens)."""
        most = config.max_prompt_tokens
        if most is not None and len(ids) > most:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, more than this server's limit of {most}",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def context(
        request: Request, body: schemas.SamplingFields, limit: int | None, param: str
    ) -> tuple[TurnContext, float | None]:
        body.refuse_unsupported()
        check_model(body.model)
        tenant = tenant_of(request)
        sid = body.session_id or request.headers.get(SESSION_HEADER) or body.user or None
        if sid is not None and len(sid) > 256:
            raise APIError(400, "a session id has at most 256 characters", param="session_id")
        ttl = body.pin_ttl_s if body.pin_ttl_s is not None else _float_header(request, PIN_HEADER)
        if ttl is not None and sid is None:
            raise APIError(400, "pin_ttl_s needs a session id (session_id, x-session-id or user)")
        ctx = TurnContext(
            tenant, sid, limit, body.temperature, body.top_p, body.stops, body.seed, param
        )
        return ctx, (None if ttl is None else min(ttl, config.max_pin_ttl_s))

    async def respond(
        ctx: TurnContext,
        prompt: Callable[[], list[int]],
        body: schemas.SamplingFields,
        finish: Finish,
        hold: tuple[str, ...],
        build: Callable[[str, Finished, TurnOutcome], dict[str, Any]],
        events: Callable[..., AsyncIterator[str]],
    ) -> Response:
        rid = schemas.new_id(
            "chatcmpl" if isinstance(body, schemas.ChatCompletionRequest) else "cmpl"
        )
        if not body.stream:
            outcome = await runner.run(ctx, prompt)
            return JSONResponse(build(rid, await finish(outcome), outcome))

        def start(on_token: OnToken) -> Any:
            return runner.run(ctx, prompt, on_token)

        stream = TurnStream(start, DeltaFilter(ctx.stop, hold))
        try:
            await stream.begin()
        except BaseException:
            stream.abandon()
            raise
        body_iter = events(
            stream, rid, config.model_name, finish, body.include_usage, body.return_token_ids
        )
        return TurnResponse(body_iter, stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        ctx, pin_ttl = context(request, body, body.token_limit, "messages")
        allowed: frozenset[str] = frozenset()
        if tags and body.tool_choice != "none":
            allowed = tool_names(t for t in body.tools or () if isinstance(t, dict))

        def prompt() -> list[int]:
            try:
                return limit_prompt(
                    render(runtime.tokenizer, body.messages, body.tools), "messages"
                )
            except BadRequest as exc:
                param = "tools" if str(exc).startswith("tools") else "messages"
                raise APIError(400, str(exc), param=param) from None

        async def finish(outcome: TurnOutcome) -> Finished:
            result = outcome.result
            parsed = parse_tool_calls(result.text, allowed)
            pinned = None
            if parsed.tool_calls and pin_ttl is not None and ctx.session_id is not None:
                pinned = await runner.call(runner.pin, ctx.tenant, ctx.session_id, pin_ttl)
                metrics.pinned.inc()
            metrics.observe_turn(result, len(parsed.tool_calls))
            usage = schemas.usage_json(result, ctx.tenant, outcome.divergence, pinned)
            if not body.parse_tool_calls:
                return Finished(result.text, [], result.finish_reason, usage)
            reason = "tool_calls" if parsed.tool_calls else result.finish_reason
            return Finished(parsed.content, parsed.tool_calls, reason, usage)

        def build(rid: str, done: Finished, outcome: TurnOutcome) -> dict[str, Any]:
            message = schemas.chat_message(done.content, done.tool_calls)
            ids = outcome.result.token_ids if body.return_token_ids else None
            return schemas.chat_completion(
                rid, config.model_name, message, done.finish_reason, done.usage, ids
            )

        hold = (OPEN_TAG,) if allowed and body.parse_tool_calls else ()
        return await respond(ctx, prompt, body, finish, hold, build, chat_events)

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        ctx, pin_ttl = context(request, body, body.max_tokens, "prompt")
        if pin_ttl is not None:
            raise APIError(400, "pin_ttl_s applies to chat completions only", param="pin_ttl_s")
        given = body.prompt_one()

        def prompt() -> list[int]:
            if isinstance(given, str):
                ids = list(runtime.tokenizer.encode(given, add_special_tokens=True))
                return limit_prompt(ids, "prompt")
            return limit_prompt(runner.check_token_ids(given), "prompt")

        async def finish(outcome: TurnOutcome) -> Finished:
            result = outcome.result
            metrics.observe_turn(result)
            usage = schemas.usage_json(result, ctx.tenant, outcome.divergence)
            return Finished(result.text, [], result.finish_reason, usage)

        def build(rid: str, done: Finished, outcome: TurnOutcome) -> dict[str, Any]:
            ids = outcome.result.token_ids if body.return_token_ids else None
            return schemas.text_completion(
                rid, config.model_name, done.content, done.finish_reason, done.usage, ids
            )

        return await respond(ctx, prompt, body, finish, (), build, completion_events)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    def model_card() -> dict[str, Any]:
        return {
            "id": config.model_name,
            "object": "model",
            "created": created,
            "owned_by": "kvruntime",
            "max_model_len": runtime.engine.max_context,
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": config.model_name,
            "max_queue": runtime.queue.max_queue,
            "turns_in_progress": runner.turns_in_progress,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await runner.call(metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(extension_routes(runtime, runner, config.max_pin_ttl_s, max_records))
    return app


def _float_header(request: Request, name: str) -> float | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise APIError(400, f"{name} must be a positive number of seconds", param=name)
    return value
