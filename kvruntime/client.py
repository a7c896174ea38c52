"""``kvruntime.Client``: the in-process ``session().chat()`` shape over HTTP (httpx).

```python
client = kvruntime.Client("http://127.0.0.1:8000")
s = client.session(tenant="acme")              # a session id is made up if none is given
r = s.chat(messages, max_tokens=64)            # the same ChatResult as Session.chat
r.usage.cached_tokens_by_tier; r.timings.ttft_s
```
``AsyncClient`` is the same with ``await``. ``chat`` returns the model's raw text (tool-call
blocks included, as in-process) and its token ids. With ``on_token`` the turn is streamed and
``on_token(token_id, text_delta)`` is called as chunks arrive (text the server held back while
it could still become a stop string comes with the last token). Server errors come back as
kvruntime's: 400 -> ``BadRequest``, 404 -> ``UnknownName``, 503 -> ``Overloaded``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any
from urllib.parse import quote

import httpx

from kvruntime.analytics import Stats
from kvruntime.errors import BadRequest, KVRuntimeError, Overloaded, UnknownName
from kvruntime.results import TIERS, ChatResult, Timings, Usage

OnToken = Callable[[int, str], None]  # (token id, text delta), as Session.chat takes it
TENANT_HEADER = "x-tenant"
_TIMING_FIELDS = {f.name for f in fields(Timings)}


def chat_body(
    model: str,
    session_id: str,
    messages: Sequence[Mapping[str, Any]],
    max_tokens: int,
    temperature: float,
    tools: Sequence[Mapping[str, Any]] | None,
    top_p: float,
    stop: str | Sequence[str] | None,
    seed: int | None,
    stream: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "session_id": session_id,
        "return_token_ids": True,
        "parse_tool_calls": False,  # the raw text, as Session.chat returns it
    }
    if tools is not None:
        body["tools"] = [dict(t) for t in tools]
    if stop is not None:
        body["stop"] = stop if isinstance(stop, str) else list(stop)
    if seed is not None:
        body["seed"] = seed
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def result_from(text: str, token_ids: list[int], finish: str, usage: dict[str, Any]) -> ChatResult:
    ext = usage.get("kvruntime") or {}
    by_tier = dict.fromkeys(TIERS, 0) | dict(ext.get("cached_tokens_by_tier") or {})
    details = usage.get("prompt_tokens_details") or {}
    u = Usage(
        usage["prompt_tokens"],
        usage["completion_tokens"],
        int(details.get("cached_tokens", sum(by_tier.values()))),
        by_tier,
    )
    timings = Timings(
        **{k: v for k, v in (ext.get("timings") or {}).items() if k in _TIMING_FIELDS}
    )
    return ChatResult(
        text, token_ids, u, timings, finish, int(ext.get("turn", 0)), ext.get("session_id") or ""
    )


def parse_chat(data: dict[str, Any]) -> ChatResult:
    choice = data["choices"][0]
    text = choice["message"].get("content") or ""
    return result_from(
        text, list(choice.get("token_ids") or []), choice["finish_reason"], data["usage"]
    )


class StreamState:
    """Folds streamed chunks into a ChatResult, calling ``on_token`` on the way."""

    def __init__(self, on_token: OnToken) -> None:
        self.on_token = on_token
        self.text: list[str] = []
        self.ids: list[int] = []
        self.finish = "length"
        self.usage: dict[str, Any] | None = None

    def feed(self, line: str) -> None:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise_for(chunk, 500)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta", {}).get("content") or ""
            ids = list(choice.get("token_ids") or [])
            self.text.append(delta)
            self.ids += ids
            if ids:
                for t in ids[:-1]:
                    self.on_token(t, "")
                self.on_token(ids[-1], delta)
            elif delta and self.ids:
                self.on_token(self.ids[-1], delta)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def result(self) -> ChatResult:
        if self.usage is None:
            raise KVRuntimeError("the stream ended without usage")
        return result_from("".join(self.text), self.ids, self.finish, self.usage)


def raise_for(body: Any, status: int) -> None:
    """Raise the kvruntime error matching an error response."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message = str(err.get("message") or body)
    if status == 503:
        raise Overloaded(message)
    if status == 404:
        raise UnknownName(message)
    if 400 <= status < 500:
        raise BadRequest(message)
    raise KVRuntimeError(f"server error {status}: {message}")


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        raise_for(body, resp.status_code)
    return resp.json()


def session_path(session_id: str, tail: str = "") -> str:
    return f"/v1/kvruntime/sessions/{quote(session_id, safe='')}{tail}"


def _stats(data: dict[str, Any]) -> Stats:
    return Stats(**{f.name: data[f.name] for f in fields(Stats)})


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Thread-safe (httpx.Client is). ``model`` defaults to the server's only model."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, headers=_headers(api_key)
        )
        self._model = model

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = str(_check(self._http.get("/v1/models"))["data"][0]["id"])
        return self._model

    def session(self, session_id: str | None = None, tenant: str = "default") -> RemoteSession:
        return RemoteSession(self, session_id or uuid.uuid4().hex[:16], tenant)

    def stats(self) -> Stats:
        return _stats(_check(self._http.get("/v1/kvruntime/stats")))

    def health(self) -> dict[str, Any]:
        return dict(_check(self._http.get("/health")))

    def turns(self, tenant: str = "default", limit: int = 200) -> list[dict[str, Any]]:
        """The tenant's recent turn records (``TurnRecord.to_json()`` rows), oldest first."""
        resp = self._http.get(
            "/v1/kvruntime/turns", params={"limit": limit}, headers={TENANT_HEADER: tenant}
        )
        return list(_check(resp)["data"])

    def request(self, method: str, path: str, tenant: str, **kw: Any) -> Any:
        return _check(self._http.request(method, path, headers={TENANT_HEADER: tenant}, **kw))

    def stream_lines(self, path: str, tenant: str, body: dict[str, Any]) -> Iterator[str]:
        with self._http.stream("POST", path, json=body, headers={TENANT_HEADER: tenant}) as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            yield from r.iter_lines()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteSession:
    """A server-side session (``rt.session(session_id, tenant)``): divergence analytics,
    pins and prefetch work as in-process. Not for concurrent use (a conversation is sequential)."""

    def __init__(self, client: Client, session_id: str, tenant: str) -> None:
        self.client = client
        self.session_id = session_id
        self.tenant = tenant

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int = 64,
        temperature: float = 0.0,
        tools: Sequence[Mapping[str, Any]] | None = None,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        on_token: OnToken | None = None,
    ) -> ChatResult:
        c = self.client
        body = chat_body(
            c.model, self.session_id, messages, max_tokens, temperature, tools, top_p, stop,
            seed, on_token is not None,
        )  # fmt: skip
        if on_token is None:
            return parse_chat(c.request("POST", "/v1/chat/completions", self.tenant, json=body))
        state = StreamState(on_token)
        for line in c.stream_lines("/v1/chat/completions", self.tenant, body):
            state.feed(line)
        return state.result()

    def pin(self, ttl_s: float) -> int:
        path = session_path(self.session_id, "/pin")
        return int(
            self.client.request("POST", path, self.tenant, json={"ttl_s": ttl_s})["pinned_tokens"]
        )

    def unpin(self) -> None:
        self.client.request("DELETE", session_path(self.session_id, "/pin"), self.tenant)

    def prefetch(self) -> bool:
        path = session_path(self.session_id, "/prefetch")
        return bool(self.client.request("POST", path, self.tenant)["queued"])

    def close(self) -> None:
        self.client.request("DELETE", session_path(self.session_id, ""), self.tenant)


class AsyncClient:
    """``Client`` for asyncio: the same methods, awaited. Sessions may run concurrently."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, headers=_headers(api_key)
        )
        self._model = model

    async def model(self) -> str:
        if self._model is None:
            self._model = str(_check(await self._http.get("/v1/models"))["data"][0]["id"])
        return self._model

    def session(self, session_id: str | None = None, tenant: str = "default") -> AsyncRemoteSession:
        return AsyncRemoteSession(self, session_id or uuid.uuid4().hex[:16], tenant)

    async def stats(self) -> Stats:
        return _stats(_check(await self._http.get("/v1/kvruntime/stats")))

    async def health(self) -> dict[str, Any]:
        return dict(_check(await self._http.get("/health")))

    async def turns(self, tenant: str = "default", limit: int = 200) -> list[dict[str, Any]]:
        resp = await self._http.get(
            "/v1/kvruntime/turns", params={"limit": limit}, headers={TENANT_HEADER: tenant}
        )
        return list(_check(resp)["data"])

    async def request(self, method: str, path: str, tenant: str, **kw: Any) -> Any:
        resp = await self._http.request(method, path, headers={TENANT_HEADER: tenant}, **kw)
        return _check(resp)

    async def stream_lines(
        self, path: str, tenant: str, body: dict[str, Any]
    ) -> AsyncIterator[str]:
        async with self._http.stream("POST", path, json=body, headers={TENANT_HEADER: tenant}) as r:
            if r.status_code >= 400:
                await r.aread()
                _check(r)
            async for line in r.aiter_lines():
                yield line

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncRemoteSession:
    def __init__(self, client: AsyncClient, session_id: str, tenant: str) -> None:
        self.client = client
        self.session_id = session_id
        self.tenant = tenant

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int = 64,
        temperature: float = 0.0,
        tools: Sequence[Mapping[str, Any]] | None = None,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        on_token: OnToken | None = None,
    ) -> ChatResult:
        c = self.client
        body = chat_body(
            await c.model(), self.session_id, messages, max_tokens, temperature, tools, top_p,
            stop, seed, on_token is not None,
        )  # fmt: skip
        if on_token is None:
            data = await c.request("POST", "/v1/chat/completions", self.tenant, json=body)
            return parse_chat(data)
        state = StreamState(on_token)
        async for line in c.stream_lines("/v1/chat/completions", self.tenant, body):
            state.feed(line)
        return state.result()

    async def pin(self, ttl_s: float) -> int:
        path = session_path(self.session_id, "/pin")
        data = await self.client.request("POST", path, self.tenant, json={"ttl_s": ttl_s})
        return int(data["pinned_tokens"])

    async def unpin(self) -> None:
        path = session_path(self.session_id, "/pin")
        await self.client.request("DELETE", path, self.tenant)

    async def prefetch(self) -> bool:
        path = session_path(self.session_id, "/prefetch")
        return bool((await self.client.request("POST", path, self.tenant))["queued"])

    async def close(self) -> None:
        path = session_path(self.session_id, "")
        await self.client.request("DELETE", path, self.tenant)
