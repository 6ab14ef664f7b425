"""Plain statistics objects: what the batcher, the data plane and the generation engine report.

Nothing here knows Prometheus. `service.metrics.ModelObserver` is the one class that turns
these into Prometheus series and keeps Triton's ModelStatistics counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """Triton's ModelStatistics counters for one model version (inference requests)."""

    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches executed
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchStats] = field(default_factory=dict)


@dataclass
class BatchRun:
    """One executed batch of the dynamic batcher."""

    requests: int
    rows: int
    compute_s: float
    padding_efficiency: float | None  # real / padded tokens; None when nothing was padded
    tokens: int | None = None  # rows x padded length, for sequence models


@dataclass
class StepStats:
    """What one generation engine step did, and the engine's state after it."""

    decode_rows: int = 0  # rows in the batched decode run (holes included)
    prefill_tokens: int = 0  # prompt tokens run this step
    prefix_cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of run
    prefix_queried_tokens: int = 0  # prompt tokens looked up there (hit rate: cached / queried)
    tokens: int = 0  # tokens generated this step
    draft_tokens: int = 0  # speculative tokens proposed (prompt lookup) and checked this step
    accepted_tokens: int = 0  # of those, the ones greedy decoding kept
    time_to_first_token_s: list[float] = field(default_factory=list)  # per sequence that got its first token
    inter_token_s: list[float] = field(default_factory=list)  # per token after a sequence's first
    finished: list[str] = field(default_factory=list)  # finish reasons of sequences that ended
    active: int = 0  # sequences in prefill or decoding
    queued: int = 0  # requests waiting for a slot
    kv_cache_bytes: int = 0
    prefix_evictions: int = 0  # prompt blocks the prefix cache evicted (since the last step that said)
    prefix_cache_bytes: int = 0  # bytes the prefix cache holds
