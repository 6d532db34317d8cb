"""Prometheus metrics of one actor, served on its own ``/metrics`` endpoint.

Every actor (each chunk and the cerebellum) owns an :class:`ActorMetrics` with a
registry of its own, labelled with the run, the actor's role and its chunk.
Hot-path measurements (phase times, gRPC latencies) are histograms observed as
they happen; counts the actor keeps anyway (queue depths, rejections, bytes,
steps) are read when Prometheus scrapes, through :meth:`ActorMetrics.add_source`,
so they cost nothing between scrapes. :class:`NullMetrics` has the same methods
and does nothing (``--no-metrics``), which is how the overhead is measured.

Every name starts with ``ccdni_``; ``deploy/prometheus`` and ``deploy/grafana``
refer to these names, and a test checks that they exist.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

LABELS = ("run", "role", "chunk")
PHASES = (
    "forward",
    "backward",
    "update",
    "predict",
    "send",
    "wait_input",
    "wait_feedback",
)
SECONDS_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

# What a scrape-time source returns: (name, kind, help, {extra labels}, value).
Sample = tuple[str, str, str, dict[str, str], float]


class ActorMetrics:
    """The metrics of one actor.

    Args:
        run: the run's id.
        role: ``chunk`` or ``cerebellum``.
        chunk: the chunk index (``""`` for the cerebellum).
    """

    enabled = True

    def __init__(self, run: str, role: str, chunk: int | str = "") -> None:
        self.labels = {"run": run, "role": role, "chunk": str(chunk)}
        self.registry = CollectorRegistry()
        self._sources: list[Callable[[], Iterable[Sample]]] = []
        self.port: int | None = None
        self._server = None

        def histogram(name: str, doc: str, extra: tuple[str, ...], buckets):
            return Histogram(
                name, doc, (*LABELS, *extra), buckets=buckets, registry=self.registry
            )

        self._phase = histogram(
            "ccdni_phase_seconds",
            "time per phase of a chunk's step",
            ("phase",),
            SECONDS_BUCKETS,
        )
        self._client = histogram(
            "ccdni_grpc_client_seconds",
            "gRPC call latency seen by the caller (per request and reply on a "
            "bidirectional stream)",
            ("method",),
            SECONDS_BUCKETS,
        )
        self._server_latency = histogram(
            "ccdni_grpc_server_seconds",
            "gRPC call latency inside the server (per request and reply on a "
            "bidirectional stream)",
            ("method",),
            SECONDS_BUCKETS,
        )
        self._staleness = histogram(
            "ccdni_feedback_staleness_windows",
            "windows between a prediction and the observed feedback answering it",
            ("zone",),
            STALENESS_BUCKETS,
        )
        self._checkpoint = histogram(
            "ccdni_checkpoint_seconds",
            "time to write a checkpoint",
            (),
            SECONDS_BUCKETS,
        )
        self._children: dict[tuple, Any] = {}
        self.registry.register(_SourceCollector(self))

    # Hot path ----------------------------------------------------------------------

    def _child(self, metric, *values: str):
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*self.labels.values(), *values)
            self._children[key] = child
        return child

    def phase(self, phase: str, seconds: float) -> None:
        self._child(self._phase, phase).observe(seconds)

    def client_call(self, method: str, seconds: float) -> None:
        self._child(self._client, method).observe(seconds)

    def server_call(self, method: str, seconds: float) -> None:
        self._child(self._server_latency, method).observe(seconds)

    def staleness(self, zone: str, windows: float) -> None:
        self._child(self._staleness, zone).observe(windows)

    def checkpoint(self, seconds: float) -> None:
        self._child(self._checkpoint).observe(seconds)

    # Scrape-time sources -----------------------------------------------------------

    def add_source(self, source: Callable[[], Iterable[Sample]]) -> None:
        """Call ``source`` at every scrape for counters and gauges kept elsewhere."""
        self._sources.append(source)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start ``/metrics`` on ``host:port`` (0: a free port); returns the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def client_interceptor(self) -> grpc.UnaryUnaryClientInterceptor:
        return _ClientInterceptor(self)

    def server_interceptor(self) -> grpc.ServerInterceptor:
        return _ServerInterceptor(self)


class NullMetrics:
    """The same interface, measuring nothing (metrics turned off)."""

    enabled = False
    port = None

    def phase(self, phase: str, seconds: float) -> None: ...
    def client_call(self, method: str, seconds: float) -> None: ...
    def server_call(self, method: str, seconds: float) -> None: ...
    def staleness(self, zone: str, windows: float) -> None: ...
    def checkpoint(self, seconds: float) -> None: ...
    def add_source(self, source) -> None: ...
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> None:
        return None

    def stop(self) -> None: ...


class _SourceCollector:
    def __init__(self, metrics: ActorMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # the names come and go with the sources; nothing to pre-declare

    def collect(self):
        families: dict[str, Any] = {}
        base = self.metrics.labels
        for source in self.metrics._sources:
            for name, kind, doc, extra, value in source():
                labels = {**base, **extra}
                family = families.get(name)
                if family is None:
                    cls = (
                        CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    )
                    family = cls(name, doc, labels=list(labels))
                    families[name] = family
                family.add_metric(list(labels.values()), value)
        yield from families.values()


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


class _ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Times every unary and client-streaming call as the caller sees it."""

    def __init__(self, metrics: ActorMetrics) -> None:
        self.metrics = metrics

    def record(self, method: str, seconds: float) -> None:
        """Record a call timed elsewhere (a message on a long-lived stream)."""
        self.metrics.client_call(method, seconds)

    def _timed(self, continuation, details, request):
        started = time.perf_counter()
        outcome = continuation(details, request)
        method = _method_name(details.method)

        def done(_future) -> None:
            self.metrics.client_call(method, time.perf_counter() - started)

        outcome.add_done_callback(done)
        return outcome

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._timed(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation, client_call_details, request_iterator
    ):
        return self._timed(continuation, client_call_details, request_iterator)


def stream_timer(interceptors) -> Callable[[str, float], None] | None:
    """How to time one message of a long-lived stream as the client interceptor
    among ``interceptors`` times a call (``ccdni_grpc_client_seconds``), or None
    when metrics are off."""
    return next((i.record for i in interceptors if hasattr(i, "record")), None)


class _ServerInterceptor(grpc.ServerInterceptor):
    """Times every call inside the server, per method."""

    def __init__(self, metrics: ActorMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = _method_name(handler_call_details.method)
        record = self.metrics.server_call

        def wrap(behaviour):
            def timed(request, context):
                started = time.perf_counter()
                try:
                    return behaviour(request, context)
                finally:
                    record(method, time.perf_counter() - started)

            return timed

        def wrap_stream(behaviour):
            # The handlers of long-lived streams read a request, or the frames of
            # one message, and reply before they read on (PredictStream: one
            # reply per request; StreamActivity: one ack per message): each
            # reply is timed from the arrival of the first frame it answers,
            # not from the stream's start.
            def timed(request_iterator, context):
                arrivals: deque[float] = deque()

                def requests():
                    for request in request_iterator:
                        arrivals.append(time.perf_counter())
                        yield request

                for reply in behaviour(requests(), context):
                    if arrivals:
                        record(method, time.perf_counter() - arrivals[0])
                        arrivals.clear()
                    yield reply

            return timed

        if handler.unary_unary is not None:
            return handler._replace(unary_unary=wrap(handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=wrap(handler.stream_unary))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=wrap_stream(handler.stream_stream))
        return handler


def metrics_for(enabled: bool, run: str, role: str, chunk: int | str = ""):
    """An :class:`ActorMetrics`, or a :class:`NullMetrics` when turned off."""
    return ActorMetrics(run, role, chunk) if enabled else NullMetrics()
