"""Server-sent events from a turn: tokens cross from the engine thread to the event loop
through an asyncio queue, so the loop never waits on the engine.

``TurnStream`` starts the turn and waits for its first token before the HTTP response begins,
so a request that fails early (bad input, a full queue) still gets a proper status code; a
failure after that becomes an ``error`` event. When the client goes away, the next token
callback raises ``ClientGone`` and the engine stops decoding that turn.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kvruntime.server.errors import ClientGone, error_body, to_api_error
from kvruntime.server.schemas import chat_chunk, text_completion
from kvruntime.server.tool_calls import ToolCall
from kvruntime.server.turns import TurnOutcome

OnToken = Callable[[int, str], None]


class Finished(NamedTuple):
    """What a turn's response says once its output is parsed (tool calls split off)."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: dict[str, Any]


Finish = Callable[[TurnOutcome], Awaitable[Finished]]


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


class DeltaFilter:
    """Holds back streamed text that may still become a stop string or a tool-call tag, so
    the stream never shows text that the final answer leaves out. After a tag appears, the
    rest is held until the turn ends and its output is parsed."""

    def __init__(self, stops: Sequence[str] = (), tags: Sequence[str] = ()) -> None:
        self._stops = tuple(s for s in stops if s)
        self._tags = tuple(tags)
        self.text = ""
        self.emitted = 0
        self._blocked = False

    def push(self, delta: str) -> str:
        """Add ``delta``; returns the text now safe to send (possibly empty)."""
        self.text += delta
        if self._blocked:
            return ""
        end = len(self.text)
        for tag in self._tags:
            i = self.text.find(tag, self.emitted)
            if i >= 0:
                self._blocked = True
                end = min(end, i)
        if not self._blocked:
            end -= _partial_suffix(self.text, self._stops + self._tags)
        out = self.text[self.emitted : max(self.emitted, end)]
        self.emitted += len(out)
        return out

    def rest(self, final: str) -> str:
        """What remains to send so that the stream adds up to ``final`` (the turn's answer)."""
        sent = self.text[: self.emitted]
        return final[len(sent) :] if final.startswith(sent) else ""


def _partial_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of one of ``patterns``."""
    best = 0
    for p in patterns:
        for k in range(min(len(p) - 1, len(text)), best, -1):
            if text.endswith(p[:k]):
                best = k
                break
    return best


class TurnStream:
    """Runs ``start(on_token)`` (a turn in the thread pool) and hands its tokens to the loop."""

    def __init__(
        self, start: Callable[[OnToken], Awaitable[TurnOutcome]], text_filter: DeltaFilter
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self._gone = threading.Event()
        self.filter = text_filter
        self._first: list[tuple[int, str] | None] = []
        self._task = asyncio.ensure_future(start(self._on_token))
        # the turn's tokens were queued (call_soon_threadsafe, FIFO) before it completed
        self._task.add_done_callback(self._ended)

    def _on_token(self, token_id: int, delta: str) -> None:  # on the engine thread
        if self._gone.is_set():
            raise ClientGone("the client disconnected")
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (token_id, delta))

    def _ended(self, task: asyncio.Future[TurnOutcome]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here, raised by outcome()
        self._queue.put_nowait(None)

    async def begin(self) -> None:
        """Wait for the first token; raises the turn's error if it failed before one."""
        item = await self._queue.get()
        self._first.append(item)
        if item is None:
            self._task.result()

    async def deltas(self) -> AsyncIterator[tuple[list[int], str]]:
        """(token ids, text safe to send) as tokens arrive; ends when the turn does."""
        pending = self._first
        while True:
            if not pending:
                pending.append(await self._queue.get())
                while not self._queue.empty():  # coalesce what arrived meanwhile
                    pending.append(self._queue.get_nowait())
            items, pending = pending, []
            ended = None in items
            ids = [i for i, _ in filter(None, items)]
            text = "".join(d for _, d in filter(None, items))
            if ids:
                yield ids, self.filter.push(text)
            if ended:
                return

    def outcome(self) -> TurnOutcome:
        return self._task.result()

    def abandon(self) -> None:
        """The response is over (sent, failed or cancelled): stop the turn if it still runs."""
        self._gone.set()


class TurnResponse(StreamingResponse):
    """An SSE response that stops its turn however it ends (a send to a client that left
    raises out of the body iterator without closing it)."""

    def __init__(self, events: AsyncIterator[str], stream: TurnStream) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.abandon()


async def chat_events(
    stream: TurnStream,
    rid: str,
    model: str,
    finish: Finish,
    include_usage: bool,
    token_ids: bool,
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: the role, content deltas, the finish (with any tool
    calls), then usage when asked for, then ``[DONE]``."""
    try:
        yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}))
        async for ids, text in stream.deltas():
            if text or token_ids:
                delta = {"content": text}
                yield sse(chat_chunk(rid, model, delta, token_ids=ids if token_ids else None))
        done = await finish(stream.outcome())
        last: dict[str, Any] = {}
        rest = stream.filter.rest(done.content or "")
        if rest:
            last["content"] = rest
        if done.tool_calls:
            last["tool_calls"] = [
                {"index": i, **call.as_dict()} for i, call in enumerate(done.tool_calls)
            ]
        yield sse(chat_chunk(rid, model, last, done.finish_reason))
        if include_usage:
            yield sse(chat_chunk(rid, model, None, usage=done.usage))
        yield DONE
    except Exception as exc:  # the turn failed after the response began
        yield _error_event(exc)
    finally:
        stream.abandon()


async def completion_events(
    stream: TurnStream,
    rid: str,
    model: str,
    finish: Finish,
    include_usage: bool,
    token_ids: bool,
) -> AsyncIterator[str]:
    """``text_completion`` chunks, then usage when asked for, then ``[DONE]``."""
    try:
        async for ids, text in stream.deltas():
            if text or token_ids:
                yield sse(text_completion(rid, model, text, None, None, ids if token_ids else None))
        done = await finish(stream.outcome())
        rest = stream.filter.rest(done.content or "")
        yield sse(text_completion(rid, model, rest, done.finish_reason, None))
        if include_usage:
            yield sse(text_completion(rid, model, None, None, done.usage))
        yield DONE
    except Exception as exc:
        yield _error_event(exc)
    finally:
        stream.abandon()


def _error_event(exc: BaseException) -> str:
    err = to_api_error(exc)
    return sse(error_body(err.message, err.type, err.param, err.code)) + DONE
