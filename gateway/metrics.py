"""Prometheus metrics of the gateway (process-wide; label children cached so the hot path stays cheap)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "maas_gateway_requests_total",
    "Inference requests answered, by model, resolved version and status code",
    ["model", "version", "code"],
)
LATENCY = Histogram(
    "maas_gateway_request_seconds",
    "Time from receiving an inference request to answering it",
    ["model"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RETRIES = Counter("maas_gateway_retries_total", "Requests retried on another replica", ["model"])
IN_FLIGHT = Gauge("maas_gateway_in_flight", "Inference requests being served")
STREAMS = Gauge("maas_gateway_streams", "Open ModelStreamInfer streams")
STREAM_REQUESTS = Counter(
    "maas_gateway_stream_requests_total",
    "Requests answered on ModelStreamInfer streams (their final response), by model and outcome",
    ["model", "outcome"],
)
STREAM_QUEUED = Gauge(
    "maas_gateway_stream_queued",
    "Responses held for ModelStreamInfer clients that have not read them yet (bounded per stream)",
)
COALESCED_REQUESTS = Histogram(
    "maas_gateway_coalesced_requests",
    "Client requests merged into one upstream call",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
COALESCED_ROWS = Histogram(
    "maas_gateway_coalesced_rows",
    "Batch rows of one merged upstream call",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class _Children:
    """Label children looked up once per label set."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._latency: dict[str, Any] = {}
        self._retries: dict[str, Any] = {}
        self._coalesced: dict[str, tuple[Any, Any]] = {}
        self._streamed: dict[tuple[str, bool], Any] = {}

    def observe(self, model: str, version: str, code: str, seconds: float) -> None:
        key = (model, version, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = REQUESTS.labels(model, version, code)
        child.inc()
        lat = self._latency.get(model)
        if lat is None:
            lat = self._latency[model] = LATENCY.labels(model)
        lat.observe(seconds)

    def retry(self, model: str) -> None:
        child = self._retries.get(model)
        if child is None:
            child = self._retries[model] = RETRIES.labels(model)
        child.inc()

    def streamed(self, model: str, ok: bool) -> None:
        key = (model, ok)
        child = self._streamed.get(key)
        if child is None:
            child = self._streamed[key] = STREAM_REQUESTS.labels(model, "ok" if ok else "error")
        child.inc()

    def coalesced(self, model: str, requests: int, rows: int) -> None:
        pair = self._coalesced.get(model)
        if pair is None:
            pair = self._coalesced[model] = (COALESCED_REQUESTS.labels(model), COALESCED_ROWS.labels(model))
        pair[0].observe(requests)
        pair[1].observe(rows)


METRICS = _Children()
