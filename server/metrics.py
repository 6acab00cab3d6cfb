"""Prometheus metrics of one app, in the app's own registry (several apps may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "recast_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "recast_request_seconds",
            "HTTP request latency by endpoint",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.texts = Counter(
            "recast_texts",
            "texts answered by batched forwards, by what was asked (classify, embed)",
            ["kind"],
            registry=r,
        )
        self.batch_texts = Histogram(
            "recast_batch_texts", "texts per encoder forward", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "recast_batch_tasks", "distinct tasks per encoder forward", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "recast_forward_seconds", "seconds per batched forward", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("recast_queue_texts", "texts waiting for a forward", registry=r)
        self.rejected = Counter(
            "recast_overload_rejections", "requests refused because the queue was full", registry=r
        )
        self.forward_failures = Counter(
            "recast_forward_failures",
            "requests whose forward failed on their own (after the batch was retried in parts)",
            registry=r,
        )
        self.tasks_resident = Gauge("recast_tasks_resident", "tasks the server can answer now", registry=r)
        self.upload_seconds = Histogram(
            "recast_upload_seconds",
            "server-side seconds from a received upload to the new version being servable (stored durably)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.uploads = Counter("recast_uploads", "task uploads stored and servable", registry=r)
        self.upload_rejections = Counter(
            "recast_upload_rejections", "task uploads refused, by reason", ["reason"], registry=r
        )
        self.jobs = Counter(
            "recast_training_jobs",
            "training jobs by state reached (queued, succeeded, ...)",
            ["state"],
            registry=r,
        )
        self.jobs_queued = Gauge("recast_training_jobs_queued", "training jobs waiting to start", registry=r)
        self.store_up = Gauge(
            "recast_store_up", "1 while the task store is reachable and caught up, else 0", registry=r
        )
        self.kernel = Info("recast_kernel", "kernel path serving the encoder", registry=r)
