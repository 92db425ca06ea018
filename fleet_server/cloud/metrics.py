"""Prometheus metrics of the cloud endpoint (text at ``/metrics``), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Rows per interpreter call: powers of two up to the largest batch one would configure.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class CloudMetrics:
    """The endpoint's metrics (tests run several endpoints in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgefleet_cloud_requests_total",
            "Inference requests by model and outcome (ok, bad_request, unknown_model, "
            "unauthorized, rate_limited, model_error, unavailable)",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "edgefleet_cloud_rate_limited_total",
            "Requests answered 429, by reason (quota, capacity)",
            ["reason"],
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "edgefleet_cloud_batch_size",
            "Rows run in one interpreter call, by model",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "edgefleet_cloud_queue_depth",
            "Requests waiting for a batch, by model",
            ["model"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgefleet_cloud_request_seconds",
            "Time from a request's admission to its answer, by model",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.models_served = Gauge(
            "edgefleet_cloud_model_info",
            "1 for the version of each model being served",
            ["model", "version"],
            registry=self.registry,
        )
        self.model_loads = Counter(
            "edgefleet_cloud_model_loads_total",
            "Released cloud models verified and loaded, by model",
            ["model"],
            registry=self.registry,
        )
        self.model_refusals = Counter(
            "edgefleet_cloud_model_refusals_total",
            "Releases refused (the model before them kept serving), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.capacity = Gauge(
            "edgefleet_cloud_capacity",
            "Requests a second the endpoint admits in total",
            registry=self.registry,
        )
