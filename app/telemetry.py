"""Request ids, request metrics and the `/metrics` page of an API process.

Every request gets an id: the client's ``X-Request-ID`` when it sends a sane
one, else a new one. It is returned in the same header and put on every log
line the request causes. Requests are counted and timed by route template
(`/v1/jobs/{job_id}`, not each id) and status.
"""

from __future__ import annotations

import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth.logs import request_id

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
STARTED = "hearth.started"  # scope key: perf_counter when the request arrived


class Metrics:
    """The API process's own Prometheus registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hearth_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hearth_http_request_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "hearth_queue_depth",
            "Jobs in a model's stream: waiting or running.",
            ["model"],
            registry=self.registry,
        )
        self.queue_lag = Gauge(
            "hearth_queue_lag",
            "Jobs no worker has taken yet (the consumer group's lag).",
            ["model"],
            registry=self.registry,
        )
        self.queue_pending = Gauge(
            "hearth_queue_pending",
            "Jobs taken by a worker and not yet acknowledged.",
            ["model"],
            registry=self.registry,
        )
        self.live_workers = Gauge(
            "hearth_live_workers",
            "Live workers holding a model.",
            ["model"],
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "hearth_redis_up",
            "Whether this scrape reached Redis (1) or not (0); the queue gauges are left "
            "out when not.",
            registry=self.registry,
        )


class Telemetry:
    """ASGI middleware: the request id, and the request's count and duration."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope[STARTED] = started
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - started)
            request_id.reset(token)
