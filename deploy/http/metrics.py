"""Prometheus metrics of ``worker serve`` (``eventcast_http_*``, ``eventcast_serve_*``).

Each app has its own registry, so several apps can live in one process (the tests run many).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServeMetrics:
    """The collectors of one app; :attr:`registry` is what ``GET /metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "eventcast_http_requests_total",
            "HTTP requests served, by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "eventcast_http_request_duration_seconds",
            "HTTP request latency, by route.",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.predictions = Counter(
            "eventcast_http_predictions_total", "Forecasts returned by POST /predict.", registry=r
        )
        self.rejected = Counter(
            "eventcast_http_rejected_total",
            "Requests refused, by reason (413, 422, ...).",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "eventcast_serve_model_info",
            "1 for the model version this server serves.",
            ["version"],
            registry=r,
        )
        self.reloads = Counter(
            "eventcast_serve_reloads_total", "POST /reload outcomes.", ["outcome"], registry=r
        )

    def set_version(self, version: str | None) -> None:
        self.model_info.clear()
        if version is not None:
            self.model_info.labels(version=version).set(1)
