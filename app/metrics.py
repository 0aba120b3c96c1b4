"""Prometheus metrics of one API process: request latency per route, ingestion counters, and the
lag of the slot pipeline behind the watermark.

Each app owns a `Metrics` with its own registry (so several apps in one process, as in the tests,
do not collide); `install_metrics` hangs it on `app.state.metrics` and adds the timing middleware.
With several uvicorn worker processes each process reports its own counters.
"""

import math
import time

import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.ingestion.clock import pending_slots, read_clock
from app.ingestion.slots import watermark_s
from app.keys import RedisKeys
from app.settings import Settings

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.request_duration = Histogram(
            "metarec_http_request_duration_seconds",
            "Time from request start to the end of the response, per route template.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.events_accepted = Counter(
            "metarec_events_accepted", "Events stored in a slot buffer.", registry=self.registry
        )
        self.events_duplicate = Counter(
            "metarec_events_duplicate",
            "Events refused because their event_id was seen before.",
            registry=self.registry,
        )
        self.events_late = Counter(
            "metarec_events_late",
            "Accepted events whose own slot had closed; stored in the oldest open slot.",
            registry=self.registry,
        )
        self._add_slot_gauges()

    def _add_slot_gauges(self) -> None:
        self.watermark = Gauge(
            "metarec_watermark_seconds",
            "The event-time watermark (unix s).",
            registry=self.registry,
        )
        self.slot_lag = Gauge(
            "metarec_slot_lag_seconds",
            "Watermark minus the end of the oldest closed slot whose buffer is not archived yet; "
            "0 when the worker is up to date.",
            registry=self.registry,
        )
        self.closed_slots_pending = Gauge(
            "metarec_closed_slots_pending",
            "Closed slots whose buffers still wait for the worker.",
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "metarec_redis_up", "1 when the last scrape could read Redis.", registry=self.registry
        )

    def count_ingested(self, accepted: int, duplicates: int, late: int) -> None:
        self.events_accepted.inc(accepted)
        self.events_duplicate.inc(duplicates)
        self.events_late.inc(late)

    async def refresh_slot_gauges(
        self, redis: aioredis.Redis, keys: RedisKeys, settings: Settings
    ) -> None:
        """Read the clock and the slot index; in clock="wall" the watermark is the one the server
        clock implies now, even when no event or worker has written it yet."""
        max_event_ts, stored_wm = await read_clock(redis, keys)
        live_wm = watermark_s(
            max_event_ts, time.time(), settings.clock, settings.allowed_lateness_s
        )
        candidates = [wm for wm in (stored_wm, live_wm) if wm is not None]
        watermark = max(candidates) if candidates else None

        pending, lag_s = await pending_slots(redis, keys, settings.slot_seconds, watermark)
        self.watermark.set(watermark if watermark is not None else math.nan)
        self.closed_slots_pending.set(pending)
        self.slot_lag.set(lag_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimingMiddleware:
    """Observes every HTTP request's duration, labelled by route template (not the raw path, so
    ids in paths do not multiply the series); requests that match no route share one label."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            label = route_label(scope)
            self.metrics.request_duration.labels(scope["method"], label, str(status)).observe(
                time.perf_counter() - started
            )


def route_label(scope: Scope) -> str:
    """The matched route's full template, such as `/v1/users/{user_id}/recommendations`.

    The route in the scope may carry its template without the prefix of the router it was
    included with; the prefix (static in this app) is then taken from the request path.
    """
    template = getattr(scope.get("route"), "path", None)
    if not template:
        return "unmatched"
    path: str = scope["path"]
    prefix_segments = path.count("/") - template.count("/")
    if prefix_segments <= 0:
        return str(template)
    return "/".join(path.split("/")[: prefix_segments + 1]) + template


def install_metrics(app: FastAPI) -> Metrics:
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(RequestTimingMiddleware, metrics=metrics)
    return metrics
