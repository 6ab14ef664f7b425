"""Prometheus metrics on an injected registry, served on their own port, and the one class
(`ModelObserver`) that turns the plain stats of service.stats into series.

Names follow Prometheus conventions: base units (seconds, bytes), `_total` on counters
(prometheus-client appends it), histograms for durations and sizes. Request series carry an
`api` label (infer, generate, and the encoder tasks: embed, classify, rerank, token_classify,
image_classify) and a `protocol` label (grpc, http, openai): every front end's
requests are counted by the data plane in the same place.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from service.stats import BatchRun, BatchStats, ModelStats, StepStats
from service.types import ModelState

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
MODEL = ("model", "version")
API = "api"  # infer, generate, embed, classify, rerank, token_classify, image_classify
PROTOCOL = "protocol"  # grpc, http (KServe v2), openai


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tserve_requests",
            "Requests by API and outcome; reason is the status for failures.",
            [*MODEL, API, PROTOCOL, "outcome", "reason"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "tserve_request_duration_seconds",
            "Time from a request's arrival to its answer (a stream's last message).",
            [*MODEL, API, PROTOCOL],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "tserve_queue_duration_seconds",
            "Time a request waited in the batcher's queue.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "tserve_compute_duration_seconds",
            "ONNX Runtime run time of one executed batch.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "tserve_batch_size",
            "Rows in each executed batch.",
            MODEL,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "tserve_batch_requests",
            "Requests merged into each executed batch.",
            MODEL,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.padding_efficiency = Histogram(
            "tserve_batch_padding_efficiency",
            "Real tokens / padded tokens in each padded batch.",
            MODEL,
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "tserve_batch_tokens",
            "Tokens each executed batch computed: rows x the padded length (sequence models only).",
            MODEL,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.refusals = Counter(
            "tserve_admission_refusals",
            "Requests refused at admission, by cause: queue_full (the model's queue bound), deadline (the "
            "predicted queue wait passes the request's deadline), concurrency (requests beyond "
            "max_concurrent_rpcs in flight).",
            [*MODEL, "cause"],
            registry=registry,
        )
        self.warmup_skipped = Counter(
            "tserve_warmup_skipped",
            "Model versions served without warm-up: no input could be derived, or the warm-up run failed.",
            MODEL,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "tserve_queue_depth",
            "Requests waiting in the batcher's queue.",
            MODEL,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.queue_capacity = Gauge(
            "tserve_queue_capacity",
            "Most requests the batcher's queue holds (RESOURCE_EXHAUSTED beyond).",
            MODEL,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.inflight = Gauge(
            "tserve_inflight_requests",
            "Requests received and not yet answered (streams until their last message).",
            [*MODEL, API, PROTOCOL],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.model_load_duration = Gauge(
            "tserve_model_load_duration_seconds",
            "Time the last load of a model version took (with warm-up).",
            MODEL,
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.model_state = Gauge(
            "tserve_model_state",
            "1 for the state a model version is in (LOADING, READY, UNAVAILABLE, UNLOADED).",
            [*MODEL, "state"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.execution_provider = Gauge(
            "tserve_execution_provider",
            "1 for the ONNX Runtime execution provider a model version runs on.",
            [*MODEL, "provider"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.generation_graph = Gauge(
            "tserve_generation_graph",
            "1 for the graph a decoder generates with: fused (a genai folder's graph or its manifest's fused "
            "graph), derived (a fused graph tserve derived from an Optimum export's weights) or plain (model.onnx); "
            "a fused or derived graph is used only after it gave model.onnx's logits at load.",
            [*MODEL, "graph"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.server_ready = Gauge(
            "tserve_server_ready", "1 when the server reports SERVING.", multiprocess_mode="livemin", registry=registry
        )
        # generation
        self.gen_ttft = Histogram(
            "tserve_generation_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.gen_itl = Histogram(
            "tserve_generation_inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.gen_tokens = Counter("tserve_generation_tokens", "Tokens generated.", MODEL, registry=registry)
        self.gen_prompt_tokens = Counter(
            "tserve_generation_prompt_tokens", "Prompt tokens processed (prefill).", MODEL, registry=registry
        )
        self.gen_draft_tokens = Counter(
            "tserve_generation_draft_tokens",
            "Speculative (prompt-lookup) tokens proposed and checked by the model.",
            MODEL,
            registry=registry,
        )
        self.gen_accepted_tokens = Counter(
            "tserve_generation_accepted_draft_tokens",
            "Speculative tokens kept: greedy decoding chose the same.",
            MODEL,
            registry=registry,
        )
        self.gen_finished = Counter(
            "tserve_generation_finished",
            "Finished sequences by finish reason (length, stop, eos, cancelled).",
            [*MODEL, "reason"],
            registry=registry,
        )
        self.gen_active = Gauge(
            "tserve_generation_active_sequences",
            "Sequences in prefill or decoding.",
            MODEL,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.gen_queued = Gauge(
            "tserve_generation_queued_requests",
            "Generation requests waiting for a slot.",
            MODEL,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.gen_kv_bytes = Gauge(
            "tserve_generation_kv_cache_bytes",
            "Bytes held by KV caches of active sequences.",
            MODEL,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.gen_prefix_hit_tokens = Counter(
            "tserve_generation_prefix_cache_hit_tokens",
            "Prompt tokens restored from the prefix cache instead of computed.",
            MODEL,
            registry=registry,
        )
        self.gen_prefix_queried_tokens = Counter(
            "tserve_generation_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache (hit rate: hit_tokens / queried_tokens).",
            MODEL,
            registry=registry,
        )
        self.gen_prefix_evictions = Counter(
            "tserve_generation_prefix_cache_evictions",
            "Prompt blocks evicted from the prefix cache (least recently used first).",
            MODEL,
            registry=registry,
        )
        self.gen_prefix_bytes = Gauge(
            "tserve_generation_prefix_cache_bytes",
            "Bytes held by the prefix cache.",
            MODEL,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.gen_steps = Counter("tserve_generation_steps", "Generation engine steps run.", MODEL, registry=registry)
        self.gen_decode_rows = Histogram(
            "tserve_generation_decode_batch_size",
            "Rows in each batched decode run (holes included).",
            MODEL,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[object, int]:
    """Start the /metrics HTTP server in a thread; returns (server, bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


class ModelObserver:
    """One model version's statistics: Triton's counters (ModelStats) and its Prometheus series.

    The batcher, the data plane and the generation engine report plain events and stats here;
    label lookups are resolved once, since some of these run per token.
    """

    def __init__(self, metrics: Metrics, model: str, version: int) -> None:
        self.metrics = metrics
        self.labels = labels = (model, str(version))
        self.stats = ModelStats()
        m = metrics
        self._queue_depth = m.queue_depth.labels(*labels)
        self._compute = m.compute_duration.labels(*labels)
        self._batch_size = m.batch_size.labels(*labels)
        self._batch_requests = m.batch_requests.labels(*labels)
        self._padding = m.padding_efficiency.labels(*labels)
        self._batch_tokens = m.batch_tokens.labels(*labels)
        self._queue_duration = m.queue_duration.labels(*labels)
        self._ttft = m.gen_ttft.labels(*labels)
        self._itl = m.gen_itl.labels(*labels)
        self._tokens = m.gen_tokens.labels(*labels)
        self._prompt_tokens = m.gen_prompt_tokens.labels(*labels)
        self._draft_tokens = m.gen_draft_tokens.labels(*labels)
        self._accepted_tokens = m.gen_accepted_tokens.labels(*labels)
        self._steps = m.gen_steps.labels(*labels)
        self._decode_rows = m.gen_decode_rows.labels(*labels)
        self._active = m.gen_active.labels(*labels)
        self._queued = m.gen_queued.labels(*labels)
        self._kv_bytes = m.gen_kv_bytes.labels(*labels)
        self._prefix_hit_tokens = m.gen_prefix_hit_tokens.labels(*labels)
        self._prefix_queried_tokens = m.gen_prefix_queried_tokens.labels(*labels)
        self._prefix_evictions = m.gen_prefix_evictions.labels(*labels)
        self._prefix_bytes = m.gen_prefix_bytes.labels(*labels)
        self._per_api: dict[tuple, object] = {}  # per-request series, resolved on first use

    def _series(self, metric, *labels):
        key = (id(metric), *labels)
        child = self._per_api.get(key)
        if child is None:
            child = self._per_api[key] = metric.labels(*self.labels, *labels)
        return child

    # batcher
    def queue_capacity(self, n: int) -> None:
        self.metrics.queue_capacity.labels(*self.labels).set(n)

    def queue_depth(self, n: int) -> None:
        self._queue_depth.set(n)

    def batch(self, run: BatchRun) -> None:
        s = self.stats
        s.execution_count += 1
        s.inference_count += run.rows
        s.last_inference_ms = int(time.time() * 1000)
        s.by_batch_size.setdefault(run.rows, BatchStats()).compute_infer.add(run.compute_s)
        self._compute.observe(run.compute_s)
        self._batch_size.observe(run.rows)
        self._batch_requests.observe(run.requests)
        if run.padding_efficiency is not None:
            self._padding.observe(run.padding_efficiency)
        if run.tokens is not None:
            self._batch_tokens.observe(run.tokens)

    def refused(self, cause: str) -> None:
        self.metrics.refusals.labels(*self.labels, cause).inc()

    def warmup_skipped(self) -> None:
        self.metrics.warmup_skipped.labels(*self.labels).inc()

    # data plane: every request of either API
    def inflight(self, api: str, protocol: str, delta: int) -> None:
        self._series(self.metrics.inflight, api, protocol).inc(delta)

    def request_done(
        self,
        api: str,
        protocol: str,
        ok: bool,
        reason: str,
        duration_s: float,
        queue_s: float = 0.0,
        compute_s: float = 0.0,
    ) -> None:
        m = self.metrics
        if api != "generate":  # Triton's ModelStatistics count inference requests (the tasks are too)
            s = self.stats
            (s.success if ok else s.fail).add(duration_s)
            if ok:
                s.queue.add(queue_s)
                s.compute_infer.add(compute_s)
                self._queue_duration.observe(queue_s)
        self._series(m.requests, api, protocol, "success" if ok else "failure", "none" if ok else reason).inc()
        self._series(m.request_duration, api, protocol).observe(duration_s)

    # generation engine
    def generation_step(self, step: StepStats) -> None:
        self._steps.inc()
        if step.decode_rows:
            self._decode_rows.observe(step.decode_rows)
        for seconds in step.time_to_first_token_s:
            self._ttft.observe(seconds)
        for seconds in step.inter_token_s:
            self._itl.observe(seconds)
        if step.tokens:
            self._tokens.inc(step.tokens)
        if step.prefill_tokens:
            self._prompt_tokens.inc(step.prefill_tokens)
        if step.draft_tokens:
            self._draft_tokens.inc(step.draft_tokens)
            self._accepted_tokens.inc(step.accepted_tokens)
        if step.prefix_queried_tokens:
            self._prefix_queried_tokens.inc(step.prefix_queried_tokens)
            self._prefix_hit_tokens.inc(step.prefix_cached_tokens)
        if step.prefix_evictions:
            self._prefix_evictions.inc(step.prefix_evictions)
        for reason in step.finished:
            self.metrics.gen_finished.labels(*self.labels, reason).inc()
        self._active.set(step.active)
        self._queued.set(step.queued)
        self._kv_bytes.set(step.kv_cache_bytes)
        self._prefix_bytes.set(step.prefix_cache_bytes)

    # model lifecycle
    def state(self, state: ModelState) -> None:
        for st in ModelState:
            self.metrics.model_state.labels(*self.labels, st.value).set(1 if st == state else 0)

    def generation_graph(self, kind: str) -> None:
        for k in ("fused", "derived", "plain"):
            self.metrics.generation_graph.labels(*self.labels, k).set(1 if k == kind else 0)

    def loaded(self, seconds: float, provider: str) -> None:
        self.metrics.model_load_duration.labels(*self.labels).set(seconds)
        self.metrics.execution_provider.labels(*self.labels, provider).set(1)
