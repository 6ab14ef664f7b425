"""One typed settings object: CLI flags > TSERVE_* environment > settings file > defaults.

A wrong value fails at start-up with a message naming the setting (pydantic's validation).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TSERVE_", extra="forbid", validate_default=True)

    settings_file: Path | None = Field(default=None, description="Optional TOML file with any of these settings.")
    model_repository: Path = Field(default=Path("model_repository"), description="Triton-layout model repository.")
    host: str = Field(default="127.0.0.1", description="Address the gRPC, HTTP and metrics servers bind to.")
    grpc_port: int = Field(default=8001, ge=0, le=65535, description="gRPC port (0: pick a free one).")
    http_port: int = Field(
        default=8000,
        ge=0,
        le=65535,
        description="HTTP port: KServe v2 (/v2/...) and the OpenAI-compatible API (/v1/...) (0: pick a free one).",
    )
    http: bool = Field(default=True, description="Serve HTTP beside gRPC (--no-http: gRPC only).")
    metrics_port: int = Field(
        default=8002, ge=0, le=65535, description="Prometheus /metrics port (0: pick a free one)."
    )
    workers: str = Field(
        default="1",
        pattern=r"^([1-9][0-9]*|auto)$",
        description="Serving processes sharing the gRPC and HTTP ports (SO_REUSEPORT) under one supervisor that "
        "serves /metrics for all, restarts one that dies and drains all on SIGTERM; each has its own sessions. "
        "auto: the cores this process may use / intra_op_threads.",
    )
    execution_provider: Literal["cpu", "cuda"] = Field(default="cpu", description="ONNX Runtime execution provider.")
    provider_fallback: Literal["cpu", "fail"] = Field(
        default="cpu", description="When the requested provider is unavailable: run on CPU (logged), or fail the load."
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads per session, unless a model's config sets intra_op_thread_count; "
        "0: the cores this process may use.",
    )
    ort_spinning: bool = Field(
        default=True, description="Let idle ONNX Runtime threads spin: lower latency alone, less CPU left to others."
    )
    inter_op_threads: int = Field(default=1, ge=1, description="ONNX Runtime inter-op threads per session.")
    instance_count: int = Field(
        default=0, ge=0, description="Sessions per model version; 0: the config's instance_group count (default 1)."
    )
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Largest gRPC message accepted or sent (RESOURCE_EXHAUSTED beyond).",
    )
    max_concurrent_rpcs: int | None = Field(
        default=None,
        ge=0,
        description="Inference and generation requests the server holds at once, streams included (health and "
        "metadata calls are never refused); beyond, RESOURCE_EXHAUSTED / HTTP 429 with Retry-After at once. "
        "Unset: generation_max_sequences + "
        "generation_max_queue (288 by default), every stream one generating model holds, running or waiting; "
        "the models' queues and predicted waits refuse the rest. 0: no bound.",
    )
    access_log: bool = Field(
        default=False,
        description="Log one line per answered request (logger tserve.access, level info): API, model, protocol, "
        "outcome, duration, queue and compute time; JSON lines (log_format json) carry its request id and trace id.",
    )
    drain_grace_seconds: float = Field(
        default=20.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    drain_intake_seconds: float = Field(
        default=1.0,
        ge=0,
        description="On SIGTERM, requests that reach the server within this window are still served (health is "
        "NOT_SERVING at once): they were sent before the signal and waited on the wire or in gRPC's intake. "
        "Later ones get UNAVAILABLE. Counted within drain_grace_seconds.",
    )
    strict_readiness: bool = Field(
        default=False, description="Server ready only when every model is ready (else: when loading finished)."
    )
    verify_golden: bool = Field(default=True, description="Check the manifest's golden outputs at load.")
    default_max_queue_size: int = Field(
        default=1024, ge=1, description="Queue bound for models whose config sets none (RESOURCE_EXHAUSTED beyond)."
    )
    generation_max_sequences: int = Field(
        default=32, ge=1, description="Sequences a decoder generates for at once (continuous batching)."
    )
    generation_max_queue: int = Field(
        default=256, ge=1, description="Generation requests waiting for a slot (RESOURCE_EXHAUSTED beyond)."
    )
    generation_token_budget: int = Field(
        default=512,
        ge=8,
        description="Tokens per engine step: decode tokens first, then prompt chunks of joiners (while sequences "
        "decode, also held to generation_prefill_stall). 512: a burst of 16 prompts of 32 tokens joins in one step.",
    )
    generation_encoder_token_budget: int = Field(
        default=2048,
        ge=1,
        description="Source tokens an encoder-decoder's engine step encodes (whole sources, at "
        "least one a step), apart from the decoder's token budget (vLLM's max_num_encoder_input_tokens).",
    )
    generation_scheduling: Literal["continuous", "static"] = Field(
        default="continuous", description="continuous batching, or static (a benchmark baseline: no joins mid-batch)."
    )
    generation_speculative_tokens: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Prompt-lookup speculative decoding: up to this many draft tokens, copied from where the "
        "sequence's last tokens occurred before, checked in one run (greedy output unchanged). Applies to a "
        "fused (GroupQueryAttention) decoder generating one greedy sequence alone; 0: off.",
    )
    generation_prompt_lookup_max: int = Field(
        default=3, ge=1, le=8, description="Longest n-gram prompt lookup matches to find a draft."
    )
    generation_stream_interval: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Stream a sequence's tokens this many per message (its first token and its end at once): "
        "fewer messages cost the server and the client less CPU, at coarser inter-token timing.",
    )
    generation_kv_buffer_max_bytes: int = Field(
        default=4 << 30,
        ge=1 << 20,
        description="Largest KV buffers a model's engine may grow to: a fused (GroupQueryAttention) decoder's shared "
        "buffer (slots x context x layers) or an encoder-decoder's cross-attention buffers (slots x longest source "
        "x layers); a model above it is UNAVAILABLE, with the figure (lower generation_max_sequences or the context).",
    )
    generation_fused_graph: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: a decoder exported by Optimum (Llama, Mistral, Qwen2, Phi-3, SmolLM or GPT-2) generates on "
        "a fused graph tserve derives from its weights (GroupQueryAttention over a shared KV buffer), used only if it "
        "gives the export's logits at load, and cached under cache_dir; off: on the export's own graph.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tserve",
        description="Where tserve keeps what it derives from models (fused generation graphs), keyed by the model's "
        "checksum, outside the model repository. Unwritable: derived at every load into a temporary folder.",
    )
    generation_prefix_cache_bytes: int = Field(
        default=512 << 20,
        ge=0,
        description="Automatic prefix caching, per generating decoder version: the keys and values of prompts' full "
        "16-token blocks are kept after their sequences end, up to this many bytes (least recently used blocks "
        "evicted first), and a later prompt starting with the same tokens skips their prefill, with the same "
        "output; at least its last token is always run. Not for encoder-decoders (every cached value depends on "
        "the whole source) nor for requests asking prompt logprobs. Default 512 MiB; 0: off.",
    )
    generation_prefill_stall: float = Field(
        default=1.0,
        ge=0,
        description="While sequences are decoding, a step's prompt chunks are held to what the engine's measured "
        "costs predict to take at most this many decode steps' time (at least 16 tokens a step), so a long "
        "prompt joining does not stall the running streams; with none decoding, the whole token budget. "
        "0: always the whole token budget.",
    )
    generation_default_max_new_tokens: int = Field(
        default=64, ge=1, description="max_new_tokens when a request leaves it out (capped by the context left)."
    )
    tls_cert_file: Path | None = Field(
        default=None, description="Server certificate (PEM): serve gRPC over TLS. Needs tls_key_file."
    )
    tls_key_file: Path | None = Field(default=None, description="The server certificate's private key (PEM).")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="CA certificates (PEM): mutual TLS, refusing clients without a certificate this CA signed.",
    )
    auth_tokens_file: Path | None = Field(
        default=None, description="Bearer tokens, one per line: calls without one get UNAUTHENTICATED."
    )
    auth_token: SecretStr | None = Field(
        default=None, description="A bearer token (e.g. from TSERVE_AUTH_TOKEN), beside auth_tokens_file's."
    )
    auth_open_health: bool = Field(
        default=True, description="Health and reflection answer without a token (for probes)."
    )
    port_file: Path | None = Field(
        default=None, description="Write the bound ports here as JSON once listening (for port 0)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")

    @field_validator("model_repository")
    @classmethod
    def _repository_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"model_repository {str(v)!r} is not a directory")
        return v

    @model_validator(mode="after")
    def _tls_files(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a file")
        return self

    @property
    def admission_bound(self) -> int:
        """Requests taken at once per protocol (0: no bound); see max_concurrent_rpcs."""
        if self.max_concurrent_rpcs is None:
            return self.generation_max_sequences + self.generation_max_queue
        return self.max_concurrent_rpcs

    @property
    def session_threads(self) -> int:
        return self.intra_op_threads or available_cores()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        file = _settings_file(init_settings(), env_settings())
        if file is not None:
            if not Path(file).is_file():
                raise ValueError(f"settings_file {str(file)!r} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=file))
        return tuple(sources)


def _settings_file(*layers: dict[str, Any]) -> Any:
    for layer in layers:
        if layer.get("settings_file"):
            return layer["settings_file"]
    return None
