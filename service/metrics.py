"""Prometheus metrics of one app instance, on their own registry (two apps in one process never collide).

Names follow Prometheus conventions (`_seconds`, `_total`); every component receives this object rather than
reaching for module globals, so tests can read exactly what one app counted.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "clipserve_requests_total", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "clipserve_request_seconds", "End-to-end request latency.", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "clipserve_queue_wait_seconds",
            "Time an item waited in a batcher queue.",
            ["engine"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_fallbacks = Counter(
            "clipserve_preprocess_cpu_fallbacks_total",
            "Images the GPU preprocessing path sent to the exact CPU path, by reason.",
            ["reason"],
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "clipserve_preprocess_seconds", "Decode and preprocess per image.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.engine_seconds = Histogram(
            "clipserve_engine_seconds", "One engine call.", ["engine"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "clipserve_batch_size", "Rows per engine call.", ["engine"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("clipserve_queue_depth", "Items waiting in a batcher queue.", ["engine"], registry=r)
        self.rejected = Counter(
            "clipserve_rejected_total", "Items refused or dropped by a batcher.", ["engine", "reason"], registry=r
        )
        self.cache_lookups = Counter(
            "clipserve_label_cache_total", "Label-vector lookups by tier and result.", ["tier", "result"], registry=r
        )
        self.redis_errors = Counter(
            "clipserve_redis_errors_total", "Failed or timed-out Redis calls.", ["operation"], registry=r
        )
        self.classifier_prompts = Gauge(
            "clipserve_classifier_prompts",
            "Saved classifiers' prompts: prepared so far, and in total.",
            ["classifier", "kind"],
            registry=r,
        )
        self.engine_info = Info("clipserve_engine", "The served model and runtime.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and the benchmark."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0
