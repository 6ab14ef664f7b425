"""Model lifecycle: load every model version in the repository, verify, warm up, unload.

A model that fails (missing or corrupt file, bad config, checksum or golden-output mismatch)
is recorded UNAVAILABLE with the reason; the server and the other models keep serving.
Loading runs in a worker thread so health checks are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from service.batcher import DynamicBatcher
from service.checks import (
    check_golden,
    check_manifest_files,
    check_seq2seq_golden,
    fused_mismatch,
    generate_greedy,
    probe_position_limit,
    time_batches,
    warm_up,
)
from service.conventions.decoder import DecoderGraph
from service.conventions.seq2seq import ENCODER, MergedBranch, decoder_files, is_seq2seq
from service.errors import InvalidInput, ModelLoadError, ModelNotFound, Unavailable
from service.generated import model_config_pb2 as mc
from service.generation.derived_graph import NotDerivable, cached_derivation
from service.generation.engine import CacheFactory, EngineLimits, GenerationEngine
from service.generation.kv_rows import KVRows
from service.generation.kv_slots import KVSlots
from service.generation.requests import GenerationConfig
from service.generation.seq2seq_cache import Seq2SeqCache
from service.metrics import Metrics, ModelObserver
from service.tasks.roles import TaskModel, task_of
from service.repository import (
    build_spec,
    completed_config,
    graph_file,
    model_names,
    read_config,
    read_manifest,
    runtime_options,
    select_versions,
    seq2seq_spec,
)
from service.runtime import OrtRuntime, choose_providers
from service.settings import Settings
from service.types import ModelSpec, ModelState

log = logging.getLogger(__name__)


def decoder_cache(graph: DecoderGraph, runtime: OrtRuntime, limits: EngineLimits) -> KVRows | KVSlots:
    """A decoder's engine cache: a shared buffer for a graph that reads row lengths from its mask."""
    fill_holes = limits.scheduling != "static"
    kept = limits.prefix_cache_bytes  # automatic prefix caching (generation/prefix_cache.py); 0: off
    if graph.shared_kv:
        return KVSlots(graph, runtime, limits.max_sequences, fill_holes=fill_holes, prefix_cache_bytes=kept)
    return KVRows(graph, runtime, fill_holes=fill_holes, prefix_cache_bytes=kept)


def seq2seq_cache(spec: ModelSpec, encoder, decoder, with_past, limits: EngineLimits) -> Seq2SeqCache:
    """An encoder-decoder's engine cache over its three graphs (or the merged decoder's branches)."""
    return Seq2SeqCache(
        spec.seq2seq,
        encoder,
        decoder,
        with_past,
        spec.decoder_start_token_id,
        spec.padding.pad_values.get("input_ids", 0),
        limits.max_sequences,
        max_source=spec.max_sequence_length or 0,
        fill_holes=limits.scheduling != "static",
    )


@dataclass
class ModelVersion:
    name: str
    version: int
    state: ModelState = ModelState.LOADING
    reason: str = ""
    spec: ModelSpec | None = None
    config: mc.ModelConfig | None = None  # as served by the ModelConfig RPC
    observer: ModelObserver | None = None
    runtime: OrtRuntime | None = None  # ModelInfer's graph (an encoder-decoder's: its encoder)
    graphs: dict[str, OrtRuntime] = field(default_factory=dict)  # every session it holds, by file
    batcher: DynamicBatcher | None = None
    cost_seeds: list = field(default_factory=list)  # timed runs at load, for the batch policy
    # a model that generates: how its requests are checked, and its engine's cache
    generation: GenerationConfig | None = None
    make_cache: CacheFactory | None = None
    engine: GenerationEngine | None = None
    task: TaskModel | None = None  # an encoder's or vision model's role (service/tasks/roles.py)

    @property
    def ready(self) -> bool:
        return self.state == ModelState.READY

    def graph_for(self, inputs: set[str]) -> OrtRuntime:
        """An encoder-decoder's graph whose inputs are exactly these (ModelInfer drives the
        three graphs one by one, for clients that run the decoding loop themselves)."""
        for runtime in self.graphs.values():
            if {a.name for a in runtime.graph_inputs} == inputs:
                return runtime
        listed = "; ".join(f"{f}: {sorted(a.name for a in r.graph_inputs)[:4]}..." for f, r in self.graphs.items())
        raise InvalidInput(
            f"model {self.name!r} is an encoder-decoder: a ModelInfer's inputs must be exactly "
            f"those of one of its graphs ({listed})"
        )


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repo = settings.model_repository
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.on_change: list = []  # async callbacks(ModelVersion), awaited after a version's state changed

    async def load_all(self) -> None:
        await asyncio.gather(*(self.load(name) for name in model_names(self.repo)))

    def _runtime(
        self, path: Path, providers: list[str], entry, instances: int | None = None, spin: bool | None = None
    ) -> OrtRuntime:
        opts = runtime_options(entry.config)  # the model's own config first, then the server's settings
        return OrtRuntime(
            path,
            providers,
            instances=instances or self.settings.instance_count or opts.instances,
            intra_op_threads=opts.intra_op_threads or self.settings.session_threads,
            inter_op_threads=opts.inter_op_threads or self.settings.inter_op_threads,
            spin=self.settings.ort_spinning if spin is None else spin,
        )

    def _load_seq2seq_sync(self, mv: ModelVersion, entry, providers: list[str]) -> None:
        """An encoder-decoder export folder (Optimum's seq2seq layout): the encoder and two
        decoders, or the encoder and the merged decoder; generation only. Its sessions never
        spin: the engine runs the three graphs in turn, and a pool spinning after its run takes
        the cores the next graph's run needs."""
        manifest = read_manifest(entry.path)
        files = (ENCODER, *decoder_files(entry.path))
        check_manifest_files(entry.path, manifest)
        runtimes = []
        try:
            for f in files:
                runtimes.append(self._runtime(entry.path / f, providers, entry, spin=False))
            if len(runtimes) == 2:
                decoders = (MergedBranch(runtimes[1], use_cache=False), MergedBranch(runtimes[1], use_cache=True))
            else:
                decoders = (runtimes[1], runtimes[2])
            mv.spec = seq2seq_spec(entry, decoders[0].graph_outputs, decoders[1].graph_inputs, manifest)
            mv.make_cache = partial(seq2seq_cache, mv.spec, runtimes[0], *decoders)
            mv.generation = GenerationConfig.from_spec(mv.spec)
            warm = mv.make_cache(EngineLimits(max_sequences=1, prefix_cache_bytes=0))
            generate_greedy(lambda limits: warm, [([0, 0], 2)])  # warm-up: every graph once, through the engine
            self._check_reservation(  # the cross-attention buffers grow to slots x the longest source
                self.settings.generation_max_sequences * mv.generation.max_context * warm.cross_column_bytes,
                "its cross-attention buffers need",
                f"{mv.generation.max_context} source tokens",
            )
            if self.settings.verify_golden:
                check_seq2seq_golden(mv.spec, mv.make_cache)
        except ValueError as e:
            for r in runtimes:
                r.close()
            raise ModelLoadError(str(e)) from e
        except Exception:
            for r in runtimes:
                r.close()
            raise
        mv.runtime, mv.graphs = runtimes[0], dict(zip(files, runtimes))
        mv.config = completed_config(mv.spec, entry.config)

    def _load_version_sync(self, mv: ModelVersion, entry) -> None:
        spec = None
        providers = choose_providers(self.settings.execution_provider, self.settings.provider_fallback)
        if is_seq2seq(entry.path):
            return self._load_seq2seq_sync(mv, entry, providers)
        model_file = graph_file(entry)
        manifest = read_manifest(entry.path)
        if model_file.exists():  # a missing graph is reported as such by the runtime
            check_manifest_files(entry.path, manifest)
        runtime = self._runtime(model_file, providers, entry)
        mv.graphs = {model_file.name: runtime}
        try:
            spec = build_spec(
                entry, runtime.graph_inputs, runtime.graph_outputs, manifest, self.settings.default_max_queue_size
            )
            if self.settings.verify_golden:
                check_golden(spec, runtime)
            if spec.max_sequence_length is None and (limit := probe_position_limit(spec, runtime)):
                spec = dataclasses.replace(spec, max_sequence_length=limit, position_table=limit)
            try:
                warm_up(spec, runtime)
                mv.cost_seeds = time_batches(spec, runtime)
            except Exception as e:  # the first requests pay for the setup instead: never a reason to refuse
                log.warning(
                    "model %s version %d: warm-up skipped (%s); serving without it",
                    entry.name,
                    entry.version,
                    str(e)[:200],
                )
                mv.observer.warmup_skipped()
            if spec.decoder is not None:
                mv.generation = GenerationConfig.from_spec(spec)  # reads the tokenizer, if any
                self._generation_graph(mv, entry, spec, runtime, providers)
            mv.task = task_of(spec, entry.path)
        except Exception:
            for r in mv.graphs.values():
                r.close()
            raise
        mv.spec, mv.runtime, mv.config = spec, runtime, completed_config(spec, entry.config)

    def _generation_graph(
        self, mv: ModelVersion, entry, spec: ModelSpec, runtime: OrtRuntime, providers: list[str]
    ) -> None:
        """The graph and cache a decoder generates with. An onnxruntime-genai folder's one graph
        is itself fused (a shared KV buffer). Otherwise a fused graph (GroupQueryAttention over a
        shared KV buffer) stands in for model.onnx in generation: the one a manifest names
        (generation.graph, written by export/gqa_graph.py), or, for an Optimum export of a
        family tserve knows, one derived from its weights (generation/derived_graph.py, cached
        under cache_dir by the export's checksum). The engine runs it only if, driven by the
        engine, it gives model.onnx's logits on the golden prompt and the decode steps after it;
        otherwise, or if it cannot be had, the engine runs model.onnx and the log says why. A
        model never changes its outputs for speed."""
        mv.make_cache = partial(decoder_cache, spec.decoder, runtime)
        self._check_kv_reservation(spec.decoder)  # a genai folder's own graph shares its buffer
        where = f"model {entry.name} version {entry.version}"
        name = (spec.manifest or {}).get("generation", {}).get("graph")
        if spec.decoder.shared_kv or name in mv.graphs:  # already fused, or the model's own graph
            mv.observer.generation_graph("fused" if spec.decoder.shared_kv else "plain")
            return
        kind, path, temporary = "fused", entry.path / name if name else None, None
        if path is None:
            path, temporary = self._derived_graph(entry, where)
            if path is None:
                mv.observer.generation_graph("plain")
                return
            kind = "derived"
        try:
            fused = self._runtime(path, providers, entry, instances=1)  # the engine runs one session
        except Exception as e:
            log.warning(
                "%s: the fused generation graph %s does not load (%s); generating with model.onnx",
                where,
                path,
                str(e)[:200],
            )
            fused, kind = None, "plain"
        finally:
            if temporary is not None:  # ONNX Runtime holds the weights once the session exists
                shutil.rmtree(temporary, ignore_errors=True)
        if fused is not None:
            graph = dataclasses.replace(spec.decoder, shared_kv=True, max_length=spec.max_sequence_length or 0)
            try:
                problem = fused_mismatch(spec, runtime, fused, graph)
                if problem is None:
                    self._check_kv_reservation(graph)
            except ModelLoadError as e:
                problem = str(e)
            except Exception as e:
                problem = f"could not be checked ({type(e).__name__}: {str(e)[:200]})"
            if problem is None:
                mv.graphs[str(path)], mv.make_cache = fused, partial(decoder_cache, graph, fused)
                log.info("%s generates with %s (%s graph, shared KV buffer)", where, path, kind)
            else:
                fused.close()
                kind = "plain"
                log.warning("%s: the fused generation graph %s %s; generating with model.onnx", where, path, problem)
        mv.observer.generation_graph(kind)

    def _derived_graph(self, entry, where: str) -> tuple[Path | None, Path | None]:
        """The fused graph derived from an Optimum decoder export, and a temporary folder to
        remove once it is loaded (where the cache directory cannot be written); (None, None)
        where none is derived, with the reason in the log."""
        if self.settings.generation_fused_graph == "off":
            return None, None
        model_file = graph_file(entry)
        try:
            try:
                return cached_derivation(model_file, self.settings.cache_dir), None
            except OSError as e:  # a read-only cache: derive for this load alone
                log.warning(
                    "%s: cache_dir %s cannot be written (%s); deriving the fused graph into a temporary folder",
                    where,
                    self.settings.cache_dir,
                    e,
                )
                temporary = Path(tempfile.mkdtemp(prefix="tserve-derived-"))
                try:
                    return cached_derivation(model_file, temporary), temporary
                except BaseException:
                    shutil.rmtree(temporary, ignore_errors=True)
                    raise
        except NotDerivable as e:
            log.info("%s generates with model.onnx: %s", where, e)
        except Exception as e:  # a graph tserve cannot read: its own graph still serves
            log.warning(
                "%s: no fused graph derived (%s: %s); generating with model.onnx", where, type(e).__name__, str(e)[:200]
            )
        return None, None

    def _check_kv_reservation(self, graph: DecoderGraph) -> None:
        """A shared KV buffer may grow to slots x context: refuse one that would exceed the setting."""
        if graph.shared_kv:
            needed = KVSlots.reserved_bytes(graph, self.settings.generation_max_sequences)
            self._check_reservation(needed, "its shared KV buffer needs", f"{graph.max_length} tokens")

    def _check_reservation(self, needed: int, what: str, per_slot: str) -> None:
        """Refuse a model whose engine buffers may grow past generation_kv_buffer_max_bytes."""
        limit, slots = self.settings.generation_kv_buffer_max_bytes, self.settings.generation_max_sequences
        if needed > limit:
            raise ModelLoadError(
                f"{what} {needed / 2**20:,.0f} MiB ({slots} sequences x {per_slot}), above "
                f"generation_kv_buffer_max_bytes ({limit / 2**20:,.0f} MiB): lower --generation-max-sequences or the "
                "context (tserve.max_sequence_length)"
            )

    async def load(self, name: str) -> None:
        """(Re)load a model's versions. Raises ModelNotFound if the repository has no such model."""
        if name not in model_names(self.repo):
            raise ModelNotFound(f"model {name!r} is not in the repository")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            await self._unload_locked(name)
            try:
                entries = select_versions(self.repo / name, read_config(self.repo / name))
            except ModelLoadError as e:
                mv = ModelVersion(name, 0, ModelState.UNAVAILABLE, str(e))
                self._models[name] = {0: mv}
                log.error("model %s failed to load: %s", name, e)
                await self._changed(mv)
                return
            self._models[name] = {e.version: ModelVersion(name, e.version) for e in entries}
            for entry in entries:
                mv = self._models[name][entry.version]
                mv.observer = ModelObserver(self.metrics, name, entry.version)
                await self._changed(mv)
                started = time.perf_counter()
                try:
                    await asyncio.to_thread(self._load_version_sync, mv, entry)
                except ModelLoadError as e:
                    mv.state, mv.reason = ModelState.UNAVAILABLE, str(e)
                except Exception as e:  # anything ORT or numpy raised on a broken model
                    mv.state, mv.reason = ModelState.UNAVAILABLE, f"{type(e).__name__}: {str(e)[:300]}"
                else:
                    try:
                        self._start_schedulers(mv)
                    except Exception as e:  # e.g. no memory for a KV buffer
                        mv.state, mv.reason = ModelState.UNAVAILABLE, f"{type(e).__name__}: {str(e)[:300]}"
                        await self._stop(mv)
                    else:
                        mv.state = ModelState.READY
                        seconds = time.perf_counter() - started
                        mv.observer.loaded(seconds, mv.runtime.provider)
                        log.info(
                            "model %s version %d ready on %s in %.2fs (%s)",
                            name,
                            entry.version,
                            mv.runtime.provider,
                            seconds,
                            mv.runtime.describe(),
                        )
                if mv.state == ModelState.UNAVAILABLE:
                    log.error("model %s version %d failed to load: %s", name, entry.version, mv.reason)
                await self._changed(mv)

    def _start_schedulers(self, mv: ModelVersion) -> None:
        """The batcher for inference (encoder-decoders generate only); the generation engine for
        a model that generates."""
        s = self.settings
        if mv.spec.seq2seq is None:
            mv.batcher = DynamicBatcher(mv.spec, mv.runtime, mv.observer, mv.cost_seeds)
            mv.batcher.start()
        if mv.make_cache is not None:
            limits = EngineLimits(
                max_sequences=s.generation_max_sequences,
                max_queue=s.generation_max_queue,
                token_budget=s.generation_token_budget,
                encoder_token_budget=s.generation_encoder_token_budget,
                scheduling=s.generation_scheduling,
                speculative_tokens=s.generation_speculative_tokens,
                prompt_lookup_max=s.generation_prompt_lookup_max,
                stream_interval=s.generation_stream_interval,
                prefix_cache_bytes=s.generation_prefix_cache_bytes,
                prefill_stall=s.generation_prefill_stall,
            )
            mv.engine = GenerationEngine(mv.name, mv.make_cache, limits, mv.observer.generation_step)
            mv.engine.start()

    async def _changed(self, mv: ModelVersion) -> None:
        if mv.observer:
            mv.observer.state(mv.state)
        for callback in self.on_change:
            await callback(mv)

    async def unload(self, name: str) -> None:
        if name not in self._models:
            raise ModelNotFound(f"model {name!r} is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            await self._unload_locked(name)

    async def _unload_locked(self, name: str) -> None:
        for mv in self._models.get(name, {}).values():
            if mv.state != ModelState.READY:
                continue
            mv.state, mv.reason = ModelState.UNLOADED, "unloaded"
            await self._stop(mv)
            await self._changed(mv)

    @staticmethod
    async def _stop(mv: ModelVersion) -> None:
        """Stop a version's schedulers and close its sessions."""
        if mv.engine:
            await mv.engine.close()
        if mv.batcher:
            await mv.batcher.close()
        for runtime in mv.graphs.values():
            await asyncio.to_thread(runtime.close)

    async def close(self) -> None:
        for name in list(self._models):
            await self._unload_locked(name)

    # -- lookups ----------------------------------------------------------------------------

    def versions(self, name: str) -> dict[int, ModelVersion]:
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"unknown model {name[:64]!r}")
        return versions

    def get(self, name: str, version: str = "", ready: bool = True) -> ModelVersion:
        """The named version, or the latest; raises NotFound / Unavailable (when ready=True)."""
        versions = self.versions(name)
        if version:
            if not version.isdigit() or int(version) not in versions:
                raise ModelNotFound(f"model {name!r} has no version {version[:16]!r} (loaded: {sorted(versions)})")
            mv = versions[int(version)]
        else:
            ready_versions = [v for v in versions.values() if v.state == ModelState.READY]
            mv = (
                max(ready_versions, key=lambda v: v.version)
                if ready_versions
                else max(versions.values(), key=lambda v: v.version)
            )
        if ready and mv.state != ModelState.READY:
            raise Unavailable(
                f"model {name!r} version {mv.version} is not ready: {mv.state}{': ' + mv.reason if mv.reason else ''}"
            )
        return mv

    def all(self) -> list[ModelVersion]:
        return [mv for versions in self._models.values() for mv in versions.values()]

    def index(self) -> list[ModelVersion]:
        """Every model in the repository: loaded versions, and those never loaded."""
        listed = {mv.name for mv in self.all()}
        unloaded = [ModelVersion(n, 0, ModelState.UNLOADED) for n in model_names(self.repo) if n not in listed]
        return sorted(self.all() + unloaded, key=lambda mv: (mv.name, mv.version))

    @property
    def all_ready(self) -> bool:
        return all(mv.state == ModelState.READY for mv in self.all())
