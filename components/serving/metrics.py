"""The service's Prometheus metrics, one registry per server (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


class ServeMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per server, no globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tlops_serve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("tlops_serve_request_latency_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("tlops_serve_batch_size", "Images per ONNX Runtime call",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.predictions = Counter("tlops_serve_predictions", "Predicted images by class",
                                   ["label"], registry=self.registry)
        self.errors = Counter("tlops_serve_errors", "Failed requests by kind of error", ["kind"], registry=self.registry)
        self.queue_depth = Gauge("tlops_serve_queue_depth", "Images waiting for a batch", registry=self.registry)
        self.model = Info("tlops_serve_model", "The model being served", registry=self.registry)


