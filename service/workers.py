"""`--workers N`: N serving processes on the same ports under one supervisor.

One tserve process runs one event loop, and its front end (gRPC and HTTP framing, protobuf,
JSON, the batcher's bookkeeping) costs a core's worth of requests at most, while ONNX Runtime
could use every core. With workers, each process is a whole tserve (its own ONNX Runtime
sessions, batchers and generation engines) and the kernel spreads connections over them:
every worker binds the gRPC and HTTP ports with SO_REUSEPORT. Chosen over front-end processes
feeding one model process through shared memory (vLLM's API servers over one engine core):
on CPU a worker's sessions cost memory, not a device, and whole workers need no hop between
processes per request, nor a second road through the data plane; bench/workers_bench.py
measures what it buys.

    supervisor   the process `tserve serve` started: reserves the ports, serves /metrics for
                 all workers (prometheus-client's multiprocess mode: each worker's samples in
                 files under one folder, summed or kept per worker by each metric's rule),
                 starts the workers and restarts one that dies (tserve_worker_restarts_total),
                 tells every worker whether all are ready, forwards SIGTERM and SIGINT, and
                 fans repository loads and unloads out to every worker
    worker       a TServe with a Link to the supervisor: its health says SERVING only when
                 every worker is ready; a load or unload through its repository API is done
                 by every worker before the call returns

Readiness: at start, no worker is ready until all are. A restarted worker binds its ports only
once its models are loaded (and the repository loads and unloads made since replayed), so no
request reaches it while it loads and the others keep serving meanwhile. A worker that drains
makes the others NOT_SERVING too: the pod leaves the load balancer whole.

Each worker has its own in-flight bound and queues (the defaults per worker), and answers
ModelStatistics for itself; the Prometheus series are the pod's. With `--intra-op-threads`
unset, the cores are shared out: each worker's sessions get cores / workers threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Connection, wait

from service.settings import Settings, available_cores

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)  # a worker that keeps dying is restarted ever more slowly


def worker_count(settings: Settings) -> int:
    """`workers`: a count, or auto = the cores this process may use / intra-op threads."""
    if settings.workers == "auto":
        return max(1, available_cores() // (settings.intra_op_threads or 1))
    return int(settings.workers)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT to (host, port), never listening: it holds the port
    number (0: the kernel picks one) that the workers then bind beside it."""
    family = socket.AF_INET6 if ":" in (host or "") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host or "", port))
    except OSError:
        sock.close()
        raise
    return sock


# -- the worker's side ----------------------------------------------------------------------


class Link:
    """A worker's end of its pipe to the supervisor. A thread reads the supervisor's messages
    and hands them to the event loop; the loop sends with `send` (a pipe write, no await)."""

    def __init__(self, conn: Connection, index: int, peers_ready: bool = False) -> None:
        self.conn, self.index = conn, index
        self.peers_ready = peers_ready  # a restarted worker starts with the others' state
        self.server = None  # the TServe this worker runs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._lock = threading.Lock()

    def start(self, server, loop: asyncio.AbstractEventLoop) -> None:
        self.server, self._loop = server, loop
        threading.Thread(target=self._read, name="supervisor-link", daemon=True).start()

    def send(self, *message) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):  # the supervisor is gone: SIGTERM follows
                pass

    def ready(self, ready: bool) -> None:
        self.send("ready", ready)

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the supervisor died: drain as if told to
                self._loop.call_soon_threadsafe(self.server.request_stop)
                return
            self._loop.call_soon_threadsafe(self._dispatch, message)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "peers_ready":
            self.peers_ready = message[1]
            asyncio.ensure_future(self.server.refresh_health())
        elif kind == "repository":  # do a load or unload here, as every worker does
            asyncio.ensure_future(self._repository_here(*message[1:]))
        elif kind == "repository_done":  # every worker did the call this worker took
            rid, error = message[1:]
            future = self._pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_result(error)

    async def _repository_here(self, rid: int, op: str, name: str) -> None:
        try:
            await (self.server.manager.load(name) if op == "load" else self.server.manager.unload(name))
            error = None
        except Exception as e:
            error = e
        self.send("repository_did", rid, error)

    async def repository(self, op: str, name: str) -> None:
        """A load or unload this worker's API took: done by every worker, then returned; the
        first worker's error, if any, is raised."""
        self._next += 1
        rid = self._next
        future = self._loop.create_future()
        self._pending[rid] = future
        self.send("repository", rid, op, name)
        error = await future
        if error is not None:
            raise error


def _worker_main(
    settings: Settings, index: int, conn: Connection, late_bind: bool, replay: list, peers_ready: bool
) -> None:
    from service.logs import configure
    from service.server import TServe

    configure(settings.log_level, settings.log_format)
    link = Link(conn, index, peers_ready)
    try:
        asyncio.run(TServe(settings, link=link, late_bind=late_bind, replay=replay).run())
    except OSError as e:
        log.error("worker %d: %s", index, e)
        raise SystemExit(1) from e


# -- the supervisor's side ------------------------------------------------------------------


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.Process | None = None
        self.conn: Connection | None = None
        self.ready = False
        self.listening = False  # bound its ports: a restarted worker only once it has loaded
        self.restarts = 0
        self.started = 0.0
        self.told: bool | None = None  # the readiness it was last told


class Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self.replay: list[tuple[str, str]] = []  # repository loads and unloads, in order, for restarts
        self._calls: dict[tuple[int, int], set[int]] = {}  # (worker, rid) -> workers yet to finish
        self._errors: dict[tuple[int, int], Exception | None] = {}
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)

    def run(self) -> int:
        s = self.settings
        metrics_dir = tempfile.mkdtemp(prefix="tserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = (
            metrics_dir  # the workers inherit it, before they import prometheus_client
        )
        held = [reserve_port(s.host, s.grpc_port)]
        grpc_port = held[0].getsockname()[1]
        http_port = 0
        if s.http:
            held.append(reserve_port(s.host, s.http_port))
            http_port = held[-1].getsockname()[1]
        threads = s.intra_op_threads or max(1, available_cores() // self.count)
        self.worker_settings = s.model_copy(
            update={"grpc_port": grpc_port, "http_port": http_port, "port_file": None, "intra_op_threads": threads}
        )
        from prometheus_client import CollectorRegistry, multiprocess

        from service.metrics import serve_metrics

        registry = CollectorRegistry()  # every worker's samples, and the supervisor's own
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        self.own_metrics = SupervisorMetrics(self.count)
        registry.register(self.own_metrics)

        metrics_server, metrics_port = serve_metrics(registry, s.host, s.metrics_port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info(
            "%d workers on gRPC %s:%d, HTTP %s, metrics %s:%d; %d intra-op thread(s) each",
            self.count, s.host, grpc_port, f"{s.host}:{http_port}" if s.http else "off", s.host, metrics_port, threads,
        )  # fmt: skip
        for w in self.workers:
            self._start(w, late_bind=False)
        if s.port_file:
            s.port_file.write_text(json.dumps({"grpc": grpc_port, "http": http_port, "metrics": metrics_port}))
        try:
            self._supervise()
        finally:
            code = self._stop_all()
            metrics_server.shutdown()
            for sock in held:
                sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("stopped")
        return code

    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                os.kill(w.process.pid, signal.SIGTERM)
        self._wake_w.send(None)

    def _start(self, w: Worker, late_bind: bool) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and sockets
        here, there = ctx.Pipe()
        w.process = ctx.Process(
            target=_worker_main,
            args=(self.worker_settings, w.index, there, late_bind, list(self.replay), late_bind and self.all_ready()),
            name=f"tserve-worker-{w.index}",
        )
        w.process.start()
        there.close()
        w.conn, w.ready, w.listening, w.started = here, False, not late_bind, time.monotonic()
        w.told = late_bind and self.all_ready()

    def _supervise(self) -> None:
        """Read the workers' messages; a worker whose pipe closed or whose process ended is
        restarted. (Processes are polled rather than waited on by their sentinels: a worker's
        sentinel was seen readable while the worker still ran.)"""
        while not self.stopping:
            conns = [w.conn for w in self.workers if w.conn is not None]
            for item in wait([*conns, self._wake_r], timeout=0.25):
                if item is self._wake_r:
                    self._wake_r.recv()
                    continue
                w = next(w for w in self.workers if w.conn is item)
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):  # its end closed: it is exiting
                    w.process.join(5)
                    if w.process.is_alive():  # a worker that closed its pipe but runs on: end it
                        w.process.kill()
                        w.process.join()
                    self._died(w)
                    continue
                self._handle(w, message)
            for w in self.workers:
                if w.conn is not None and not w.process.is_alive():
                    self._died(w)
            self._broadcast_readiness()

    def _handle(self, w: Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            w.ready = message[1]
            if w.ready:
                w.listening = True
        elif kind == "repository":  # a call one worker took: every live worker does it
            rid, op, name = message[1:]
            self.replay.append((op, name))
            key = (w.index, rid)
            self._calls[key] = {x.index for x in self.workers if x.conn is not None}
            self._errors[key] = None
            for x in self.workers:
                if x.conn is not None:
                    self._send(x, "repository", (w.index, rid), op, name)
        elif kind == "repository_did":
            (origin, rid), error = message[1], message[2]
            self._did((origin, rid), w.index, error)

    def _did(self, key: tuple[int, int], index: int, error: Exception | None) -> None:
        waiting = self._calls.get(key)
        if waiting is None:
            return
        waiting.discard(index)
        if error is not None and self._errors[key] is None:
            self._errors[key] = error
        if not waiting:
            del self._calls[key]
            origin = self.workers[key[0]]
            self._send(origin, "repository_done", key[1], self._errors.pop(key))

    def _send(self, w: Worker, *message) -> None:
        try:
            w.conn.send(message)
        except (BrokenPipeError, OSError):
            pass  # it died: its sentinel says so

    def all_ready(self) -> bool:
        """Whether every worker is ready: all of them at start; a restarted one is not waited
        for until it listens (it loads first), a draining one makes none ready."""
        counted = [w for w in self.workers if w.listening]
        return bool(counted) and all(w.ready and w.conn is not None for w in counted)

    def _broadcast_readiness(self) -> None:
        """Tell each worker whether all are ready, when that changed for it (a restarted worker
        learns it when it starts)."""
        ready = self.all_ready()
        for w in self.workers:
            if w.conn is not None and w.told is not ready:
                self._send(w, "peers_ready", ready)
                w.told = ready

    def _died(self, w: Worker) -> None:
        code = w.process.exitcode
        from prometheus_client import multiprocess

        from service.errors import Unavailable

        multiprocess.mark_process_dead(w.process.pid)
        w.conn.close()
        w.conn, w.ready, w.listening = None, False, False
        for key in [k for k, waiting in self._calls.items() if w.index in waiting]:  # its share of a fan-out
            self._did(key, w.index, Unavailable(f"worker {w.index} exited during the call"))
        if self.stopping:
            return
        # a worker that died young is restarted more slowly (RESTART_BACKOFF_S): a model that
        # crashes at load must not spin the machine
        delay = (
            RESTART_BACKOFF_S[min(w.restarts, len(RESTART_BACKOFF_S) - 1)] if time.monotonic() - w.started < 30 else 0
        )
        log.error("worker %d (pid %d) exited with %s; restarting it in %.1fs", w.index, w.process.pid, code, delay)
        w.restarts += 1
        self.own_metrics.restarts += 1
        if delay:
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not self.stopping:
                wait([self._wake_r], timeout=deadline - time.monotonic())
            if self.stopping:
                return
        self._start(w, late_bind=True)

    def _stop_all(self) -> int:
        """Wait for every worker to drain (each got SIGTERM), within the drain grace and a margin."""
        deadline = time.monotonic() + self.settings.drain_grace_seconds + 10
        codes = []
        for w in self.workers:
            if w.process is None:
                continue
            if w.process.is_alive():
                os.kill(w.process.pid, signal.SIGTERM)
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.error("worker %d did not drain in time; killing it", w.index)
                w.process.kill()
                w.process.join()
            codes.append(w.process.exitcode)
        return 0 if all(c == 0 for c in codes) else 1


class SupervisorMetrics:
    """The supervisor's own series, kept in its process: a collector, since in multiprocess
    mode a plain Counter would write into the workers' folder."""

    def __init__(self, workers: int) -> None:
        self.workers, self.restarts = workers, 0

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily(
            "tserve_worker_restarts", "Serving workers restarted after they exited.", value=self.restarts
        )
        yield GaugeMetricFamily("tserve_workers", "Serving worker processes.", value=self.workers)
