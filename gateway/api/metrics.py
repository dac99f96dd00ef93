"""The gateway's Prometheus metrics, in one app-scoped registry.

Three sources, one scrape:
- requests, counted and timed by `RequestMetrics` (ASGI middleware) as they leave;
- the supervisor's live state (models loaded, state, queue depth, in-flight, load time),
  read at scrape time by `SupervisorCollector`;
- what each ready worker measures (batch sizes, time to first token, tokens), fetched over
  its socket at scrape time by `worker_metrics`.

Label values are bounded: `model` is a registry name or "" (an unknown model in a request
never becomes a label), `route` is the matched route template, never the raw path.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.metric_sources import READY, ModelsView
from gateway.api.worker_metrics import WorkerScraper

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MODEL_KEY = "llmgw_model"  # request.state key the inference service sets once a name resolves
CLIENT_CLOSED = "499"


class GatewayMetrics:
    def __init__(self, supervisor: ModelsView, *, worker_timeout_s: float = 0.5) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmgw_requests",
            "HTTP requests answered, by model, route template and status",
            ["model", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llmgw_request_duration_seconds",
            "Time from request to the last byte of the reply (whole stream for streams)",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(SupervisorCollector(supervisor))
        self.workers = WorkerScraper(supervisor, worker_timeout_s)

    def observe(self, model: str, route: str, status: str, seconds: float) -> None:
        self.requests.labels(model, route, status).inc()
        self.latency.labels(model, route).observe(seconds)

    async def render(self) -> bytes:
        """The text exposition: the registry's own metrics, then the workers'."""
        worker_registry = CollectorRegistry()
        worker_registry.register(_Fixed(await self.workers.scrape()))
        own: bytes = generate_latest(self.registry)
        theirs: bytes = generate_latest(worker_registry)
        return own + theirs


class SupervisorCollector:
    """Reads the supervisor's state at scrape time, so it can never drift from it."""

    def __init__(self, supervisor: ModelsView) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        runtimes = list(self.supervisor.models.values())
        loaded = GaugeMetricFamily("llmgw_models_loaded", "Models whose worker is ready")
        loaded.add_metric([], sum(r.state.value == READY for r in runtimes))
        yield loaded
        state = GaugeMetricFamily(
            "llmgw_model_state",
            "1 for each model's current lifecycle state",
            labels=["model", "state"],
        )
        queued = GaugeMetricFamily(
            "llmgw_queue_depth", "Requests waiting for an admission slot", labels=["model"]
        )
        running = GaugeMetricFamily(
            "llmgw_in_flight_requests", "Requests admitted and not yet finished", labels=["model"]
        )
        load = GaugeMetricFamily(
            "llmgw_model_load_seconds", "Duration of the model's latest load", labels=["model"]
        )
        replicas = GaugeMetricFamily(
            "llmgw_model_replicas",
            "Replicas of the model on the Ray cluster, by actor state (cluster mode only)",
            labels=["model", "state"],
        )
        for runtime in runtimes:
            cluster = runtime.backend.runtime.get("cluster") if runtime.backend else None
            if cluster is not None:
                counts = Tally(str(r["state"]) for r in cluster["replicas"])
                for name in sorted({"ALIVE", *counts}):
                    replicas.add_metric([runtime.name, name], counts.get(name, 0))
            for value in type(runtime.state):  # every state, so a dashboard sees the 0s too
                state.add_metric([runtime.name, value.value], float(runtime.state == value))
            queued.add_metric([runtime.name], runtime.admission.waiting)
            running.add_metric([runtime.name], runtime.in_flight)
            if runtime.load_seconds is not None:
                load.add_metric([runtime.name], runtime.load_seconds)
        yield from (state, queued, running, load, replicas)


class _Fixed:
    """A collector over metric families built before the scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class RequestMetrics:
    """Count and time every HTTP request; outermost, so it sees every status it sends."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = "500"  # what the client gets if the app raises before answering
        complete = False
        gone = False

        async def watching_receive() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or (message["type"] == "http.disconnect" and not complete)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        try:
            await self.app(scope, watching_receive, watching_send)
        finally:
            # A client that left before the last byte gets nginx's 499, whatever was started.
            final = CLIENT_CLOSED if gone and not complete else status
            self.metrics.observe(_model(scope), _route(scope), final, time.perf_counter() - started)


def label_model(request: Request, name: str) -> None:
    """Name the registry model a request is for, once the name has resolved."""
    request.scope.setdefault("state", {})[MODEL_KEY] = name


def _route(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "(unmatched)"


def _model(scope: Scope) -> str:
    state = scope.get("state")
    model = state.get(MODEL_KEY) if isinstance(state, dict) else None
    return model if isinstance(model, str) else ""
