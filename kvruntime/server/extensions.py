"""kvruntime's own endpoints beside OpenAI's: analytics (``/v1/kvruntime/stats``,
``/v1/kvruntime/turns``, which ``kvruntime report --url`` reads) and session controls (pin,
unpin, prefetch, close). All are scoped to the caller's tenant (``x-tenant``) where a tenant
applies; a session of another tenant is refused (400)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from kvruntime.runtime import Runtime
from kvruntime.server.errors import APIError
from kvruntime.server.turns import TurnRunner

TENANT_HEADER = "x-tenant"


class PinRequest(BaseModel):
    ttl_s: float = Field(gt=0)


def tenant_of(request: Request) -> str:
    """The ``x-tenant`` header (default ``default``); 400 unless 1-128 printable characters."""
    tenant = request.headers.get(TENANT_HEADER, "default")
    if not tenant or len(tenant) > 128 or not tenant.isprintable():
        raise APIError(400, "x-tenant must be 1-128 printable characters", param=TENANT_HEADER)
    return tenant


def extension_routes(
    runtime: Runtime, runner: TurnRunner, max_pin_ttl_s: float, max_records: int
) -> APIRouter:
    router = APIRouter(prefix="/v1/kvruntime")

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        s = await runner.call(runtime.stats)
        return {**asdict(s), "reuse_ratio": s.reuse_ratio}

    @router.get("/turns")
    async def turns(
        request: Request, limit: int = Query(200, ge=1), session_id: str | None = None
    ) -> dict[str, Any]:
        """The tenant's most recent turn records, oldest first, and the calibrated prefill
        rate (what the report's recompute estimate falls back on)."""
        tenant = tenant_of(request)
        rows = [
            r
            for r in runtime.analytics.records()
            if r.tenant == tenant and (session_id is None or r.session_id == session_id)
        ]
        rows = rows[-min(limit, max_records) :]
        return {
            "object": "list",
            "prefill_tokens_per_s": runtime.cost.prefill_tokens_per_s,
            "data": [r.to_json() for r in rows],
        }

    @router.post("/sessions/{session_id}/pin")
    async def pin(session_id: str, body: PinRequest, request: Request) -> dict[str, Any]:
        ttl = min(body.ttl_s, max_pin_ttl_s)
        tokens = await runner.call(runner.pin, tenant_of(request), session_id, ttl)
        return {"pinned_tokens": tokens}

    @router.delete("/sessions/{session_id}/pin")
    async def unpin(session_id: str, request: Request) -> dict[str, Any]:
        await runner.call(runtime.session(session_id, tenant_of(request)).unpin)
        return {"pinned_tokens": 0}

    @router.post("/sessions/{session_id}/prefetch")
    async def prefetch(session_id: str, request: Request) -> dict[str, Any]:
        session = runtime.session(session_id, tenant_of(request))
        queued = bool(session.last_tokens) and runtime.prefetch(session.last_tokens, session.tenant)
        return {"queued": queued}

    @router.delete("/sessions/{session_id}")
    async def close(session_id: str, request: Request) -> dict[str, Any]:
        await runner.call(runtime.session(session_id, tenant_of(request)).close)
        return {"closed": True}

    return router
