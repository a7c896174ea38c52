"""Prometheus metrics of one app, in a registry of its own (two apps in a process never mix).

Totals of the prefix cache (tokens queried, hit by tier, bytes moved) and the tiers' usage are
read from ``Runtime.stats()`` at scrape time, so they always agree with the runtime's own
analytics; per-turn latencies are observed as each request's turn ends. Names follow
Prometheus conventions: base units (seconds, bytes), ``_total`` on counters, a unit suffix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvruntime.results import ChatResult
from kvruntime.runtime import Runtime

# CPU prefill of a few tokens is milliseconds; a GPU's 32K-token recompute is over a second
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = hist(
            "kvruntime_time_to_first_token_seconds",
            "Time from a turn's submission to its first generated token",
        )
        self.queue = hist("kvruntime_queue_wait_seconds", "Time a turn waited for the engine")
        self.rehydrate = hist(
            "kvruntime_rehydrate_seconds",
            "Time restoring cached KV into the engine (tier reads and decode included)",
        )
        self.prefill = hist(
            "kvruntime_prefill_seconds", "Time computing the uncached part of a prompt"
        )
        self.completion_tokens = Counter(
            "kvruntime_completion_tokens", "Tokens generated", registry=r
        )
        self.tool_calls = Counter(
            "kvruntime_tool_calls", "Tool calls parsed from model output", registry=r
        )
        self.pinned = Counter(
            "kvruntime_session_pins", "Sessions pinned on the device after a tool call", registry=r
        )
        self.requests = Counter(
            "kvruntime_http_requests", "HTTP requests by route and status", ["path", "status"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "kvruntime_http_requests_in_flight", "HTTP requests being served", registry=r
        )
        r.register(RuntimeCollector(runtime))

    def observe_turn(self, result: ChatResult, tool_calls: int = 0) -> None:
        t = result.timings
        self.ttft.observe(t.ttft_s)
        self.queue.observe(t.queue_s)
        self.rehydrate.observe(t.rehydrate_s)
        self.prefill.observe(t.prefill_s)
        self.completion_tokens.inc(result.usage.completion_tokens)
        self.tool_calls.inc(tool_calls)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RuntimeCollector:
    """Reads the runtime's aggregates and tier usage at each scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def describe(self) -> list[Metric]:
        return []  # dynamic: collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        stats = rt.stats()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("kvruntime_turns", "Turns run", stats.turns)
        yield counter(
            "kvruntime_prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache",
            stats.prompt_tokens,
        )
        yield _by_label(
            CounterMetricFamily(
                "kvruntime_prefix_cache_hits_tokens",
                "Prompt tokens reused from the prefix cache, by the tier they came from",
                labels=["tier"],
            ),
            stats.cached_tokens_by_tier,
        )
        yield counter(
            "kvruntime_prefill_computed_tokens",
            "Prompt tokens computed (not reused)",
            stats.computed_tokens,
        )
        yield counter(
            "kvruntime_prompt_divergences",
            "Session turns whose prompt did not extend the previous one",
            stats.divergences,
        )
        yield _by_label(
            CounterMetricFamily(
                "kvruntime_kv_moved_bytes",
                "KV bytes read from each tier into the device for reuse",
                labels=["tier"],
            ),
            stats.bytes_moved,
        )
        yield from _tier_gauges(stats.tiers)
        redis = stats.tiers.get("redis")
        if redis is not None:
            yield from _redis_metrics(redis)
        sessions = GaugeMetricFamily(
            "kvruntime_sessions_active", "Named sessions open in the runtime"
        )
        sessions.add_metric([], float(rt.active_sessions))
        yield sessions
        pinned = rt.pins.pinned()
        pins = GaugeMetricFamily("kvruntime_pinned_sessions", "Sessions pinned on the device")
        pins.add_metric([], len(pinned))
        yield pins
        tokens = GaugeMetricFamily("kvruntime_pinned_tokens", "Tokens pinned on the device")
        tokens.add_metric([], sum(pinned.values()))
        yield tokens


def _by_label(family: Any, values: dict[str, int]) -> Any:
    for key, value in sorted(values.items()):
        family.add_metric([key], float(value))
    return family


def _tier_gauges(tiers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    fields = [
        ("kvruntime_kv_used_bytes", "KV bytes held in each tier", "used_bytes"),
        ("kvruntime_kv_budget_bytes", "KV byte budget of each tier", "budget_bytes"),
        ("kvruntime_kv_used_pages", "KV pages held in each tier", "used_pages"),
        ("kvruntime_kv_capacity_pages", "KV pages each tier can hold", "pages"),
    ]
    for name, doc, key in fields:
        g = GaugeMetricFamily(name, doc, labels=["tier"])
        for tier, usage in tiers.items():
            if key in usage:
                g.add_metric([tier], float(usage[key]))
        yield g


def _redis_metrics(redis: dict[str, Any]) -> Iterator[Metric]:
    errors = CounterMetricFamily(
        "kvruntime_redis_errors",
        "Redis keys affected by faults (each read as a miss or an unstored page), by kind",
        labels=["kind"],
    )
    yield _by_label(errors, dict(redis.get("errors", {})))
    keys = CounterMetricFamily(
        "kvruntime_redis_keys", "Redis page keys by outcome", labels=["outcome"]
    )
    outcomes = {k: redis.get(k, 0) for k in ("hits", "misses", "puts", "failed_puts")}
    outcomes["write_skipped"] = redis.get("writes_skipped", 0)  # the send backlog was full
    yield _by_label(keys, outcomes)
    backlog = GaugeMetricFamily(
        "kvruntime_redis_write_backlog_bytes", "Encoded page bytes waiting to be sent to Redis"
    )
    backlog.add_metric([], float(redis.get("write_backlog_bytes", 0)))
    yield backlog
    moved = CounterMetricFamily(
        "kvruntime_redis_bytes", "Page bytes read from and written to Redis", labels=["direction"]
    )
    yield _by_label(moved, {"read": redis.get("bytes_in", 0), "write": redis.get("bytes_out", 0)})


class RequestMetrics:
    """ASGI middleware: counts requests by route template and status, and those in flight."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"  # templates keep cardinality low
            self.metrics.requests.labels(path, str(status)).inc()
