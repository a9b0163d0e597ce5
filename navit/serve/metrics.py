"""The server's Prometheus metrics, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class ServeMetrics:
    """Requests and errors by cause, images, tokens, batch fill, queue depth and latencies."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("navit_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)  # fmt: skip
        self.errors = Counter("navit_errors", "errors by cause (a limit's flag, bad-request, overloaded, "
                              "undecodable, disconnected, internal)", ["cause"], registry=registry)  # fmt: skip
        self.images = Counter("navit_images", "images (and clips, texts) run through a forward", registry=registry)
        self.tokens = Counter("navit_tokens", "real (non-padding) tokens run through a forward", registry=registry)
        self.dropped = Counter("navit_dropped_images", "queued images dropped because their client went away",
                               registry=registry)  # fmt: skip
        self.batches = Counter("navit_batches", "forwards run", registry=registry)
        self.fill = Histogram("navit_batch_fill", "share of a forward's token slots that hold real tokens",
                              buckets=FILL_BUCKETS, registry=registry)  # fmt: skip
        self.batch_images = Histogram("navit_batch_images", "images per forward",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)  # fmt: skip
        self.queue_depth = Gauge("navit_queue_depth", "images waiting for a forward", registry=registry)
        self.pending = Gauge("navit_pending_images", "images queued or in a forward (bounded by --max-queue)",
                             registry=registry)  # fmt: skip
        self.queue_wait = Histogram("navit_queue_wait_seconds", "time an image waited before its forward",
                                    buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.forward = Histogram("navit_forward_seconds", "time of one forward", buckets=LATENCY_BUCKETS,
                                 registry=registry)  # fmt: skip
        self.latency = Histogram("navit_request_seconds", "time from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
