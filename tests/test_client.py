"""``kvruntime.Client`` / ``AsyncClient`` against a real server: the same ``session().chat()``
shape and the same results (tokens, text, usage) as the in-process runtime on the same model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from server_fixtures import ServerProcess, start_server

import kvruntime
from kvruntime.config import RuntimeConfig
from kvruntime.errors import BadRequest, UnknownName
from kvruntime.results import ChatResult
from kvruntime.runtime import Runtime

PAGE = 16
SYSTEM = "You are a planning agent. Split the task, delegate, check the results. " * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(tmp_path_factory.mktemp("serve-client"), "--page-size", str(PAGE))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(server: ServerProcess) -> Iterator[Runtime]:
    """The same model in this process (fixed cost figures: no calibration needed)."""
    config = RuntimeConfig(page_size=PAGE, prefill_tokens_per_s=1000.0, host_bytes_per_s=1e9)
    rt = Runtime.from_pretrained(server.model, config)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[kvruntime.Client]:
    c = kvruntime.Client(server.url)
    yield c
    c.close()


def conversation(session: Any, tag: str, turns: int = 2) -> list[ChatResult]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    out = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"{tag} step {t}: what next?"})
        r = session.chat(msgs, max_tokens=6)
        out.append(r)
        msgs += [{"role": "assistant", "content": r.text}, {"role": "tool", "content": "ok"}]
    return out


def test_sync_client_gives_the_in_process_results(client: kvruntime.Client, local: Runtime) -> None:
    assert kvruntime.Client is type(client) and client.model == "tiny"
    s = client.session(tenant="acme")
    remote = conversation(s, "sync")
    want = conversation(local.session(tenant="acme"), "sync")
    for got, ref in zip(remote, want, strict=True):
        assert isinstance(got, ChatResult)
        assert (got.text, got.token_ids, got.finish_reason) == (
            ref.text,
            ref.token_ids,
            ref.finish_reason,
        )
        assert got.usage.prompt_tokens == ref.usage.prompt_tokens
        assert got.usage.cached_tokens == ref.usage.cached_tokens  # same pages, same reuse
        assert sum(got.usage.cached_tokens_by_tier.values()) == got.usage.cached_tokens
        assert got.timings.ttft_s > 0 and got.session_id == s.session_id
    assert [r.turn for r in remote] == [0, 1]
    assert remote[1].usage.cached_tokens > remote[0].usage.prompt_tokens - PAGE


def test_streaming_calls_on_token_with_every_token(client: kvruntime.Client) -> None:
    seen: list[tuple[int, str]] = []
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "stream please"}]
    s = client.session()
    r = s.chat(msgs, max_tokens=12, on_token=lambda t, d: seen.append((t, d)))
    plain = client.session().chat(msgs, max_tokens=12)
    assert [t for t, _ in seen] == r.token_ids == plain.token_ids and len(seen) == 12
    assert "".join(d for _, d in seen) == r.text == plain.text
    assert plain.usage.cached_tokens >= r.usage.prompt_tokens - PAGE


def test_stats_health_and_session_controls(client: kvruntime.Client) -> None:
    s = client.session("controls-1")
    conversation(s, "controls", turns=1)
    stats = client.stats()
    assert isinstance(stats, kvruntime.Stats) and stats.turns >= 1 and stats.cached_tokens >= 0
    assert stats.tiers["device"]["used_bytes"] > 0
    assert client.health()["status"] == "ok"
    assert s.pin(30) >= len(SYSTEM) - PAGE
    s.unpin()
    assert s.prefetch() is True
    s.close()
    assert [r["session_id"] for r in client.turns()].count("controls-1") == 1


def test_errors_come_back_as_kvruntime_errors(server: ServerProcess) -> None:
    with kvruntime.Client(server.url) as c:
        with pytest.raises(BadRequest, match="unknown role"):
            c.session().chat([{"role": "wizard", "content": "hi"}])
        c.session("owned", tenant="acme").chat([{"role": "user", "content": "hi"}], max_tokens=1)
        with pytest.raises(BadRequest, match="another tenant"):
            c.session("owned", tenant="globex").chat([{"role": "user", "content": "hi"}])
    with kvruntime.Client(server.url, model="gpt-9") as c, pytest.raises(UnknownName):
        c.session().chat([{"role": "user", "content": "hi"}])


def test_async_client_runs_sessions_concurrently(server: ServerProcess, local: Runtime) -> None:
    async def main() -> tuple[list[list[ChatResult]], list[str], kvruntime.Stats]:
        async with kvruntime.AsyncClient(server.url) as c:

            async def agent(i: int) -> list[ChatResult]:
                s = c.session(tenant="async")
                msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
                out = []
                for t in range(2):
                    msgs.append({"role": "user", "content": f"agent {i} step {t}"})
                    out.append(await s.chat(msgs, max_tokens=5))
                    msgs.append({"role": "assistant", "content": out[-1].text})
                return out

            results = await asyncio.gather(*(agent(i) for i in range(3)))
            deltas: list[str] = []
            streamed = await c.session().chat(
                [{"role": "user", "content": "async stream"}],
                max_tokens=8,
                on_token=lambda _t, d: deltas.append(d),
            )
            assert "".join(deltas) == streamed.text
            return list(results), deltas, await c.stats()

    results, _, stats = asyncio.run(main())
    for i, turns in enumerate(results):
        s = local.session(tenant="async")
        msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
        for t, got in enumerate(turns):
            msgs.append({"role": "user", "content": f"agent {i} step {t}"})
            ref = s.chat(msgs, max_tokens=5)
            assert got.token_ids == ref.token_ids and got.text == ref.text
            msgs.append({"role": "assistant", "content": ref.text})
        assert turns[1].usage.cached_tokens > turns[0].usage.prompt_tokens - PAGE
    assert stats.turns >= 7
