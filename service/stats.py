"""Per-model-version statistics: Triton's ModelStatistics counters and the Prometheus series.

Stats are plain dataclasses; ModelObserver is the one place that updates both, so the
batcher and the data plane report an event once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.metrics import STATES, Metrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class BatchStats:
    compute_infer: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches executed
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchStats] = field(default_factory=dict)


class ModelObserver:
    def __init__(self, metrics: Metrics, model: str, version: int) -> None:
        self.metrics = metrics
        self.labels = (model, str(version))
        self.stats = ModelStats()

    # batcher events
    def queue_capacity(self, n: int) -> None:
        self.metrics.queue_capacity.labels(*self.labels).set(n)

    def queue_depth(self, n: int) -> None:
        self.metrics.queue_depth.labels(*self.labels).set(n)

    def batch(self, requests: int, rows: int, compute_s: float, padding_efficiency: float | None) -> None:
        s = self.stats
        s.execution_count += 1
        s.inference_count += rows
        s.last_inference_ms = int(time.time() * 1000)
        s.by_batch_size.setdefault(rows, BatchStats()).compute_infer.add(compute_s)
        m, labels = self.metrics, self.labels
        m.compute_duration.labels(*labels).observe(compute_s)
        m.batch_size.labels(*labels).observe(rows)
        m.batch_requests.labels(*labels).observe(requests)
        if padding_efficiency is not None:
            m.padding_efficiency.labels(*labels).observe(padding_efficiency)

    # data-plane events
    def request_done(self, ok: bool, reason: str, duration_s: float, queue_s: float = 0.0, compute_s: float = 0.0) -> None:
        s, m, labels = self.stats, self.metrics, self.labels
        (s.success if ok else s.fail).add(duration_s)
        if ok:
            s.queue.add(queue_s)
            s.compute_infer.add(compute_s)
            m.queue_duration.labels(*labels).observe(queue_s)
        m.requests.labels(*labels, "success" if ok else "failure", "none" if ok else reason).inc()
        m.request_duration.labels(*labels).observe(duration_s)

    def inflight(self, delta: int) -> None:
        self.metrics.inflight.labels(*self.labels).inc(delta)

    def state(self, state: str) -> None:
        for st in STATES:
            self.metrics.model_state.labels(*self.labels, st).set(1 if st == state else 0)

    def loaded(self, seconds: float, provider: str) -> None:
        self.metrics.model_load_duration.labels(*self.labels).set(seconds)
        self.metrics.execution_provider.labels(*self.labels, provider).set(1)

