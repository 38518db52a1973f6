"""Prometheus metrics of the server (GET /metrics), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vlmo_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("vlmo_request_latency_seconds", "End-to-end request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("vlmo_batch_size", "Requests per forward batch", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.forward_seconds = Histogram("vlmo_forward_seconds", "Time of one batch on the tensor-parallel group",
                                         ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("vlmo_queue_depth", "Requests waiting for a batch", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
