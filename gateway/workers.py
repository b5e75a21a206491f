"""``serve --workers N``: one supervisor, N full gateway processes on one port.

The supervisor (:class:`Supervisor`) is what runs when ``realtime-gateway serve`` is given
``--workers`` above 1.  It serves no session itself; it:

* reserves the main port: binds one ``SO_REUSEPORT`` socket on ``server.host:port`` (port
  0 becomes a free port here, once) and keeps it bound but never listening, so the port
  stays the replica's while workers come and go, and receives no connection itself;
* starts N workers, each ``python -m gateway serve`` with hidden ``--worker-*`` options
  (:class:`WorkerSpec`).  A worker binds its own ``SO_REUSEPORT`` socket on that port
  (:func:`bind_reuseport`) and is a whole gateway — its own Gateway, limiter, registry,
  housekeeper — so the kernel spreads new connections over the workers' accept queues;
* serves ``/metrics`` on ``server.metrics_port`` for the whole replica (:class:`ReplicaMetrics`);
* forwards SIGTERM/SIGINT to every worker (each drains as :mod:`gateway.server` describes:
  ``/readyz`` 503, refuse new, 1012 after ``drain_seconds``); a second signal is forwarded
  too and cuts every drain short.  It exits 0 once every worker has exited, and kills
  workers still alive :data:`KILL_MARGIN_SECONDS` after ``drain_seconds``;
* restarts a worker that exits when no drain was asked for, after a backoff of
  :data:`RESTART_BASE_SECONDS` doubling up to :data:`RESTART_MAX_SECONDS` (reset once a worker
  ran :data:`STABLE_SECONDS`); a worker index that fails :data:`START_ATTEMPTS` starts in a
  row (it exits before it listens) makes the supervisor drain the others and exit 1.

Why child processes (``sys.executable -m gateway serve``) rather than multiprocessing's
``spawn``: a worker is then exactly the gateway an operator runs — the same entry point,
argument parsing, logging set-up and uvloop — in a clean interpreter that pickles nothing;
its environment (``PROMETHEUS_MULTIPROC_DIR``) is in place before prometheus-client is
imported, which is when that library picks its storage; and asyncio's subprocess support
gives the supervisor each exit as an awaitable, with ``start_new_session`` (a terminal's
Ctrl-C reaches the supervisor alone, not every worker twice) and ``pass_fds`` (the pipe a
worker reports "listening" on).  Workers ask the kernel to SIGTERM them if the supervisor
dies (``PR_SET_PDEATHSIG``, Linux), so none outlives it holding the port.

Limits stay exact across workers because they live in Redis (``redis:``, required: see
:func:`refusal`).  What stays per process is divided (:func:`worker_config`):
``server.max_sessions`` and ``server.max_unauthenticated_handshakes`` (per replica, CONTRACT
§2) give each worker ``ceil(value / N)``, so the replica never holds more than about the
configured number (at most N - 1 more); a worker that is full answers 503 while another
may still have room, as two replicas would.  ``redis.expected_replicas`` is multiplied by N:
with Redis down and ``fail_mode: open``, each worker admits its share of every limit alone.

Every worker's log lines carry ``worker=<index>``; the supervisor's own lines
(``worker.started``, ``worker.exited``, ``worker.restarting``, ``workers.draining``,
``workers.stopped`` …) name the worker they are about the same way.  ``gateway.listening``
(with ``workers=N``) is logged once every worker listens.

Files: a private temporary directory (mode 0700, under ``$TMPDIR``) holds the metric files
and a copy of the configuration file taken at start, which every worker — restarted ones
too — reads (relative paths still resolve against the original file's directory), so all
workers of a supervisor run one configuration.  It is removed when the supervisor exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from gateway.config import Config
from gateway.logs import get_logger, serving_as
from gateway.metrics import PREFIX
from gateway.sidecar import SidecarServer, bound_port, metrics_app, wait_started

log = get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's multiprocess directory, set by the supervisor for its workers only."""
START_ATTEMPTS = 3
"""Failed starts in a row (exit before listening) of one worker index before giving up."""
RESTART_BASE_SECONDS = 0.5
"""Backoff before the first restart of a crashed worker; doubles per crash in a row."""
RESTART_MAX_SECONDS = 30.0
"""Longest backoff between restarts."""
STABLE_SECONDS = 60.0
"""A worker that ran this long before it exited restarts after the first backoff again."""
KILL_MARGIN_SECONDS = 30.0
"""After a stop signal, ``drain_seconds`` plus this is how long workers may take to exit
before the supervisor kills them: a worker's 1012 closes get up to 10 s
(:data:`gateway.server.CLOSE_GRACE_SECONDS`), uvicorn's graceful shutdown 10 s more."""
_PR_SET_PDEATHSIG = 1


# -- pure decisions ------------------------------------------------------------------------


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """What ``--workers auto`` means: the CPUs this process may run on
    (``len(os.sched_getaffinity(0))``), further bounded by the cgroup's CPU quota when one
    is set (a container's ``resources.limits.cpu``, rounded up) — in a container the
    affinity mask is usually every CPU of the node.  At least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup_root)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def cgroup_cpu_limit(root: Path) -> int | None:
    """The CPU quota of the cgroup mounted at ``root`` in whole CPUs (rounded up), or
    ``None`` when it sets none or cannot be read.  cgroup v2: ``cpu.max`` (``"max 100000"``
    or ``"<quota µs> <period µs>"``); v1: ``cpu/cpu.cfs_quota_us`` (-1: none) over
    ``cpu/cpu.cfs_period_us``."""
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
    except OSError:
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max"
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def parse_workers(value: str) -> int:
    """``--workers``: an integer >= 1, or ``auto`` (:func:`available_cpus`).

    Raises:
        ValueError: anything else (the message says what is accepted).
    """
    if value.strip().lower() == "auto":
        return available_cpus()
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of workers (an integer >= 1, "
                         "or auto)") from None
    if count < 1:
        raise ValueError(f"{count} workers: at least 1")
    return count


def refusal(config: Config, workers: int) -> str | None:
    """Why ``config`` cannot run ``workers`` processes (one line, for stderr), or ``None``.

    More than one worker needs ``redis:``: without it every worker would keep its own
    in-process limits, so each tenant limit would hold per process, N times over.  It also
    needs ``SO_REUSEPORT`` (Linux balances connections over such listeners; Windows has none).
    """
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        return (f"--workers {workers}: this platform has no SO_REUSEPORT to share the port; "
                "run one worker (--workers 1)")
    if workers > 1 and config.redis is None:
        return (f"--workers {workers} needs redis: in the config: without it each worker "
                "process keeps its own limits, so every limit would hold per process "
                f"({workers} times the configured value); configure redis: or run one "
                "worker (--workers 1)")
    return None


def worker_config(config: Config, workers: int) -> Config:
    """The configuration one of ``workers`` processes runs (see the module docstring):
    ``server.max_sessions`` and ``server.max_unauthenticated_handshakes`` divided (rounded
    up), ``redis.expected_replicas`` multiplied.  ``workers == 1``: ``config`` itself."""
    if workers == 1:
        return config
    server = config.server.model_copy(update={
        "max_sessions": math.ceil(config.server.max_sessions / workers),
        "max_unauthenticated_handshakes": math.ceil(
            config.server.max_unauthenticated_handshakes / workers),
    })
    update: dict[str, object] = {"server": server}
    if config.redis is not None:
        update["redis"] = config.redis.model_copy(
            update={"expected_replicas": config.redis.expected_replicas * workers})
    return config.model_copy(update=update)


def bind_reuseport(host: str, port: int) -> socket.socket:
    """A TCP socket bound (not listening) to ``host:port`` with ``SO_REUSEADDR`` and
    ``SO_REUSEPORT``; ``port`` 0 picks a free one (read it with ``getsockname()``).  A host
    name is bound at the first address it resolves to (``0.0.0.0``, ``::``, an IP: itself).

    Raises:
        OSError: the address cannot be resolved or bound (e.g. a process that did not set
            ``SO_REUSEPORT`` holds it).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def describe_exit(returncode: int) -> str:
    """``"exit 1"`` or ``"signal SIGKILL"`` for a child's ``returncode``."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def restart_delay(crashes: int) -> float:
    """Seconds to wait before the restart after ``crashes`` (>= 1) crashes in a row."""
    return float(min(RESTART_MAX_SECONDS, RESTART_BASE_SECONDS * 2 ** (max(1, crashes) - 1)))


# -- the worker's side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process is told by its supervisor (hidden ``serve`` options).

    ``index``: 0-based, in every log line as ``worker``; ``count``: N; ``ready_fd``: the
    pipe to write one byte to once listening; ``supervisor_pid``: the parent, whose exit
    SIGTERMs the worker; ``config_snapshot``: the supervisor's copy of the config file.
    """

    index: int
    count: int
    ready_fd: int
    supervisor_pid: int
    config_snapshot: Path

    def arguments(self) -> list[str]:
        """The hidden ``serve`` options that carry this spec."""
        return ["--worker-index", str(self.index), "--worker-count", str(self.count),
                "--worker-ready-fd", str(self.ready_fd),
                "--worker-supervisor-pid", str(self.supervisor_pid),
                "--worker-config-snapshot", str(self.config_snapshot)]

    def check(self) -> str | None:
        """Why this process cannot run as the worker (one line), or ``None``: it was not
        started by the supervisor with the metric directory, or the supervisor is gone."""
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory or not Path(directory).is_dir():
            return (f"a worker needs {MULTIPROC_ENV} (a directory); workers are started by "
                    "serve --workers N, not by hand")
        die_with_parent()
        if os.getppid() != self.supervisor_pid:
            return "the supervisor exited before this worker started"
        return None

    def report_listening(self, port: int) -> None:
        """Tell the supervisor this worker accepts connections (once; never raises)."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"L")
            os.close(self.ready_fd)


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits (Linux
    ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing).  SIGTERM, not SIGKILL: an orphaned
    worker drains its sessions instead of cutting them."""
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


# -- metrics -------------------------------------------------------------------------------


class WorkerProcessCollector(Collector):
    """The standard ``process_*`` metrics of every live worker and of the supervisor, one
    series each, labelled ``worker`` (``0``…``N-1``, ``supervisor``) — what replaces each
    process's own ProcessCollector, which prometheus-client's multiprocess mode cannot
    aggregate.  ``sum by (pod)`` of CPU and memory gives the pod's; ``processes()`` yields
    ``(label, pid)`` pairs."""

    def __init__(self, processes: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._processes = processes

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for label, pid in self._processes():
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": label},
                                      sample.value, sample.timestamp)
        yield from families.values()


class SupervisorCollector(Collector):
    """``realtime_gateway_workers`` (listening now), ``realtime_gateway_workers_desired``
    (N) and ``realtime_gateway_worker_restarts_total``, read from the supervisor's state."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        supervisor = self._supervisor
        yield GaugeMetricFamily(f"{PREFIX}_workers",
                                "Worker processes of this replica accepting connections.",
                                value=sum(1 for slot in supervisor.slots if slot.listening))
        yield GaugeMetricFamily(f"{PREFIX}_workers_desired",
                                "Worker processes this replica runs (serve --workers).",
                                value=len(supervisor.slots))
        yield CounterMetricFamily(f"{PREFIX}_worker_restarts",
                                  "Worker processes restarted after an unexpected exit.",
                                  value=supervisor.restarts)


class ReplicaMetrics:
    """The replica's ``/metrics``: every worker's metrics summed from ``directory``
    (prometheus-client's multiprocess mode; how each gauge sums: :mod:`gateway.metrics`),
    the workers' process metrics (:class:`WorkerProcessCollector`), the platform collector
    (``python_info``: the same interpreter for all), and :class:`SupervisorCollector`."""

    def __init__(self, directory: Path, supervisor: Supervisor) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(self.registry, path=str(directory))  # type: ignore[no-untyped-call]
        self.registry.register(WorkerProcessCollector(supervisor.processes))
        self.registry.register(SupervisorCollector(supervisor))
        PlatformCollector(registry=self.registry)

    def render(self) -> bytes:
        """The text exposition format of the replica's metrics."""
        return generate_latest(self.registry)


# -- the supervisor ------------------------------------------------------------------------


class ReadyPipe:
    """The supervisor's end of a worker's ready pipe (:meth:`WorkerSpec.report_listening`)."""

    def __init__(self, transport: asyncio.ReadTransport, reader: asyncio.StreamReader) -> None:
        self._transport = transport
        self._reader = reader

    @classmethod
    async def open(cls, read_fd: int) -> ReadyPipe:
        """Watch ``read_fd`` (owned from now on) on the running loop."""
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except BaseException:
            pipe.close()
            raise
        return cls(transport, reader)

    async def wait(self) -> bool:
        """True once the worker wrote its byte; False if it exited (EOF) first.  Closes
        the pipe."""
        try:
            return bool(await self._reader.read(1))
        finally:
            self._transport.close()


@dataclass(eq=False)
class Slot:
    """One worker index and the process running it now, if any."""

    index: int
    process: asyncio.subprocess.Process | None = None
    listening: bool = False


class Supervisor:
    """Runs ``workers`` gateway processes on one port (see the module docstring).

    Args:
        config_file: the configuration file (copied once; workers read the copy).
        config: the loaded ``config_file``, already checked with :func:`refusal`.
        workers: N >= 1.
        host, port, metrics_port: where to listen (``--host``/``--port``/``--metrics-port``
            or the config); ports may be 0.
        log_level: ``--log-level`` to pass on, or ``None`` (the config's).
        command: how to start a worker (default ``[sys.executable, "-m", "gateway"]``).
    """

    def __init__(self, config_file: Path, config: Config, workers: int, *, host: str,
                 port: int, metrics_port: int, log_level: str | None = None,
                 command: Sequence[str] | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.config_file = config_file
        self.config = config
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.log_level = log_level
        self.command = list(command or [sys.executable, "-m", "gateway"])
        self.slots = [Slot(index) for index in range(workers)]
        self.restarts = 0
        self.status = 0
        self._signals = 0
        self._stopping = asyncio.Event()
        self._announced = False
        self._directory = Path()
        self._snapshot = Path()
        self._killer: asyncio.Task[None] | None = None

    def processes(self) -> Iterator[tuple[str, int]]:
        """``("supervisor", pid)`` and ``(index, pid)`` of every live worker."""
        yield "supervisor", os.getpid()
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                yield str(slot.index), slot.process.pid

    async def run(self) -> int:
        """Run until every worker has exited after a stop signal (or giving up).

        Returns:
            The exit status: 0 after a drain, 1 when the port cannot be bound, the metrics
            server cannot start, or a worker index kept failing to start.
        """
        try:
            reservation = bind_reuseport(self.host, self.port)
        except OSError as exc:
            log.error("workers.bind_failed", host=self.host, port=self.port, error=str(exc))
            return 1
        self.port = reservation.getsockname()[1]
        self._directory = Path(tempfile.mkdtemp(prefix="realtime-gateway-"))
        loop = asyncio.get_running_loop()
        try:
            metrics_dir = self._directory / "metrics"
            metrics_dir.mkdir()
            self._snapshot = self._directory / "config.yaml"
            shutil.copyfile(self.config_file, self._snapshot)
            metrics = SidecarServer(uvicorn.Config(
                metrics_app(ReplicaMetrics(metrics_dir, self)), host=self.host,
                port=self.metrics_port, lifespan="off", log_config=None, access_log=False,
                server_header=False))
            metrics_task = asyncio.create_task(serving_as("metrics", metrics.serve()))
            if not await wait_started({metrics: metrics_task}):
                metrics.should_exit = True
                with contextlib.suppress(BaseException):
                    await metrics_task
                log.error("workers.metrics_failed", host=self.host, port=self.metrics_port)
                return 1
            self.metrics_port = bound_port(metrics)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.signal, sig)
            log.info("workers.starting", workers=len(self.slots), pid=os.getpid(),
                     port=self.port, metrics_port=self.metrics_port,
                     directory=str(self._directory))
            try:
                await asyncio.gather(*(self._keep(slot, metrics_dir) for slot in self.slots))
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                if self._killer is not None:
                    self._killer.cancel()
                metrics.should_exit = True
                await metrics_task
            log.info("workers.stopped", status=self.status, restarts=self.restarts)
            return self.status
        finally:
            reservation.close()
            shutil.rmtree(self._directory, ignore_errors=True)

    def signal(self, sig: int) -> None:
        """SIGTERM/SIGINT handler: the first stops restarts and starts every worker's
        drain, each one is forwarded to every live worker (a second cuts the drains
        short, a third SIGINT makes workers exit at once)."""
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            log.info("workers.draining", signal=name, workers=len(self._live()))
            self._stopping.set()
            self._killer = asyncio.get_running_loop().create_task(self._kill_after(
                self.config.server.drain_seconds + KILL_MARGIN_SECONDS))
        else:
            log.info("workers.drain_cut_short", signal=name, workers=len(self._live()))
        for process in self._live():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    def _live(self) -> list[asyncio.subprocess.Process]:
        return [slot.process for slot in self.slots
                if slot.process is not None and slot.process.returncode is None]

    async def _kill_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                log.error("worker.killed", worker=slot.index, pid=process.pid,
                          after_s=round(seconds, 1))
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    async def _keep(self, slot: Slot, metrics_dir: Path) -> None:
        """Run worker ``slot.index`` until a stop signal, restarting it when it exits."""
        loop = asyncio.get_running_loop()
        failed_starts = 0
        crashes = 0
        while not self._stopping.is_set():
            started = loop.time()
            try:
                process, ready = await self._spawn(slot)
            except OSError as exc:
                log.error("worker.spawn_failed", worker=slot.index, error=str(exc))
                process, ready = None, None
            listening = False
            if process is not None and ready is not None:
                listening = await ready.wait()
                if listening:
                    failed_starts = 0
                    slot.listening = True
                    self._announce()
                returncode = await process.wait()
                slot.listening = False
                mark_process_dead(process.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                if self._stopping.is_set():
                    log.info("worker.stopped", worker=slot.index, pid=process.pid,
                             status=describe_exit(returncode))
                    return
                log.warning("worker.exited", worker=slot.index, pid=process.pid,
                            status=describe_exit(returncode), listening=listening,
                            uptime_s=round(loop.time() - started, 3))
            if not listening:
                failed_starts += 1
                if failed_starts >= START_ATTEMPTS:
                    log.error("workers.giving_up", worker=slot.index, attempts=failed_starts,
                              reason="the worker exits before it listens; see its lines")
                    self.status = 1
                    if not self._stopping.is_set():
                        self.signal(signal.SIGTERM)
                    return
            crashes = 1 if loop.time() - started >= STABLE_SECONDS else crashes + 1
            delay = restart_delay(crashes)
            self.restarts += 1
            log.warning("worker.restarting", worker=slot.index, in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _spawn(self, slot: Slot) -> tuple[asyncio.subprocess.Process, ReadyPipe]:
        """Start worker ``slot.index``; its process and the read end of its ready pipe."""
        read_fd, write_fd = os.pipe()
        spec = WorkerSpec(slot.index, len(self.slots), write_fd, os.getpid(), self._snapshot)
        args = [*self.command, "serve", "--config", str(self.config_file),
                "--host", self.host, "--port", str(self.port), *spec.arguments()]
        if self.log_level is not None:
            args += ["--log-level", self.log_level]
        env = {**os.environ, MULTIPROC_ENV: str(self._directory / "metrics")}
        try:
            process = await asyncio.create_subprocess_exec(
                *args, env=env, stdin=asyncio.subprocess.DEVNULL, pass_fds=(write_fd,),
                start_new_session=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        ready = await ReadyPipe.open(read_fd)
        slot.process = process
        log.info("worker.started", worker=slot.index, pid=process.pid)
        if self._stopping.is_set():  # a stop signal came while it was being started
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        return process, ready

    def _announce(self) -> None:
        if self._announced or not all(slot.listening for slot in self.slots):
            return
        self._announced = True
        log.info("gateway.listening", host=self.host, port=self.port,
                 metrics_port=self.metrics_port, workers=len(self.slots),
                 tls=self.config.server.tls_cert_file is not None)
