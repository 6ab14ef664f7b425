"""Prometheus metrics on an injected registry, served on their own port.

Names follow Prometheus conventions: base units (seconds, bytes), `_total` on counters
(prometheus-client appends it), histograms for durations and sizes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
MODEL = ("model", "version")
STATES = ("LOADING", "READY", "UNAVAILABLE", "UNLOADED")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tserve_requests", "Inference requests by outcome; reason is the status for failures.",
            [*MODEL, "outcome", "reason"], registry=registry,
        )
        self.request_duration = Histogram(
            "tserve_request_duration_seconds", "Time from a request's arrival to its answer.",
            MODEL, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.queue_duration = Histogram(
            "tserve_queue_duration_seconds", "Time a request waited in the batcher's queue.",
            MODEL, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.compute_duration = Histogram(
            "tserve_compute_duration_seconds", "ONNX Runtime run time of one executed batch.",
            MODEL, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "tserve_batch_size", "Rows in each executed batch.", MODEL, buckets=BATCH_BUCKETS, registry=registry,
        )
        self.batch_requests = Histogram(
            "tserve_batch_requests", "Requests merged into each executed batch.", MODEL,
            buckets=BATCH_BUCKETS, registry=registry,
        )
        self.padding_efficiency = Histogram(
            "tserve_batch_padding_efficiency", "Real tokens / padded tokens in each padded batch.",
            MODEL, buckets=RATIO_BUCKETS, registry=registry,
        )
        self.queue_depth = Gauge("tserve_queue_depth", "Requests waiting in the batcher's queue.", MODEL, registry=registry)
        self.queue_capacity = Gauge(
            "tserve_queue_capacity", "Most requests the batcher's queue holds (RESOURCE_EXHAUSTED beyond).",
            MODEL, registry=registry,
        )
        self.inflight = Gauge(
            "tserve_inflight_requests", "Requests received and not yet answered.", MODEL, registry=registry
        )
        self.model_load_duration = Gauge(
            "tserve_model_load_duration_seconds", "Time the last load of a model version took (with warm-up).",
            MODEL, registry=registry,
        )
        self.model_state = Gauge(
            "tserve_model_state", "1 for the state a model version is in (LOADING, READY, UNAVAILABLE, UNLOADED).",
            [*MODEL, "state"], registry=registry,
        )
        self.execution_provider = Gauge(
            "tserve_execution_provider", "1 for the ONNX Runtime execution provider a model version runs on.",
            [*MODEL, "provider"], registry=registry,
        )
        self.server_ready = Gauge("tserve_server_ready", "1 when the server reports SERVING.", registry=registry)
        # generation
        self.gen_ttft = Histogram(
            "tserve_generation_time_to_first_token_seconds", "Time from a generation request's arrival to its first token.",
            MODEL, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.gen_itl = Histogram(
            "tserve_generation_inter_token_latency_seconds", "Time between consecutive tokens of one sequence.",
            MODEL, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.gen_tokens = Counter("tserve_generation_tokens", "Tokens generated.", MODEL, registry=registry)
        self.gen_prompt_tokens = Counter(
            "tserve_generation_prompt_tokens", "Prompt tokens processed (prefill).", MODEL, registry=registry
        )
        self.gen_finished = Counter(
            "tserve_generation_finished", "Finished sequences by finish reason (length, stop, eos, cancelled).",
            [*MODEL, "reason"], registry=registry,
        )
        self.gen_active = Gauge(
            "tserve_generation_active_sequences", "Sequences in prefill or decoding.", MODEL, registry=registry
        )
        self.gen_queued = Gauge(
            "tserve_generation_queued_requests", "Generation requests waiting for a slot.", MODEL, registry=registry
        )
        self.gen_kv_bytes = Gauge(
            "tserve_generation_kv_cache_bytes", "Bytes held by KV caches of active sequences.", MODEL, registry=registry
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[object, int]:
    """Start the /metrics HTTP server in a thread; returns (server, bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
