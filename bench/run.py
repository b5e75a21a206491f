"""The benchmark runner (issues 7 and 16): one command, one machine, loopback only, bounded.

``python -m bench.run [--sessions 200] [--duration 20] ...`` (see ``--help`` and
``bench/README.md``).  It starts, each on a free loopback port and in a temporary
directory:

* ``redis-server`` (admission, usage charges) and the echo upstream (``bench/upstream.mjs``);
* for each relay in turn — ``direct`` (no relay), ``nginx`` (WebSocket reverse proxy, one
  worker) and ``gateway`` (``python -m gateway serve`` with a generated config: a dev-issuer
  tenant, Redis admission, a token budget metered from the upstream's usage events,
  metrics) — the relay, pinned to one core with ``taskset``, then the load generator
  (``bench/loadgen.mjs``) on the other core;

and samples ``/proc`` around the load generator's measurement window.  Results go to
``bench/results/<UTC time>-<N>sessions.{json,md}`` and the table into ``bench/README.md``.

``--repeat N`` runs the relays N times, interleaved, and judges the medians.
``--upstream-tls`` makes the relay-to-upstream leg TLS (the echo upstream serves wss://
with a certificate from a CA made for the run).  ``--sweep`` measures capacity (sessions
per core at added p99 ≤ 10 ms); ``--throughput`` the highest msgs/s of 1 vs 2 gateway
workers.  ``--gateway-workers N`` runs ``serve --workers N``.
``--soak`` runs the gateway alone for 10 minutes with session churn and usage events and
checks RSS, open fds and the ``realtime_gateway_sessions_active`` gauge for growth.
``--profile`` adds a gateway run with py-spy attached during the window.

Exit status: 0 when the runs completed (whatever the verdicts), 1 when a run failed
(a process did not start, the load generator crashed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench import procfs, sweep
from bench.profile import (
    PerfSummary,
    parse_collapsed,
    parse_perf_dso,
    parse_perf_symbols,
    parse_perf_syscalls,
    perf_markdown,
    profile_markdown,
    summarise,
)
from bench.report import (
    RelayRun,
    SoakSample,
    Verdict,
    bar_of,
    derived,
    markdown,
    medians,
    run_label,
    soak_markdown,
    soak_verdicts,
)
from bench.sweep import Capacity, SweepPoint

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
RELAYS = ("direct", "nginx", "gateway")
MODEL = "gpt-realtime"
ISSUER = "https://issuer.bench.invalid/"
AUDIENCE = "realtime-gateway"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
START_TIMEOUT = 30.0
"""Seconds a process gets to start listening."""
STOP_TIMEOUT = 15.0
"""Seconds a process gets to exit after SIGTERM before it is killed."""


class BenchError(Exception):
    """A run could not be carried out (a process did not start, a tool is missing...)."""


@dataclass(frozen=True)
class Options:
    """What to run.  Times in seconds; ``relays`` a subset of :data:`RELAYS` in that order."""

    sessions: int = 200
    rate: float = 50.0
    chunk_bytes: int = 960
    duration: float = 20.0
    warmup: float = 3.0
    ramp: float = 2.0
    usage_every: int = 50
    relays: tuple[str, ...] = RELAYS
    pin: bool = True
    relay_core: int = 1
    load_core: int = 0
    profile: bool = False
    profile_native: bool = False
    soak: bool = False
    session_lifetime: float = 0.0
    sample_every: float = 10.0
    out_dir: Path = RESULTS_DIR
    readme: Path | None = README
    label: str = ""
    keep_tmp: bool = False
    repeat: int = 1
    """Rounds of the relays (interleaved); the bar judges the medians."""
    upstream_tls: bool = False
    """The relay-to-upstream leg (and the direct path) is TLS."""
    gateway_workers: int = 1
    """``serve --workers N``; with N > 1 the gateway runs on cores 0..N-1."""
    sweep: bool = False
    throughput: bool = False
    """A sweep of ``direct``, ``gateway-1w`` and ``gateway-2w`` (msgs/s at 1 vs 2 workers)."""
    sweep_start: int = 200
    sweep_step: int = 200
    sweep_max: int = 1200
    sweep_bisect: bool = True


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call (bind to port 0, then close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], within: float, what: str,
               interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; :class:`BenchError` naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {within:g} s")
        time.sleep(interval)


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Pinning:
    """``taskset -c CORE`` command prefixes, or none when pinning is off or impossible."""

    def __init__(self, options: Options) -> None:
        cores = len(os.sched_getaffinity(0))
        self.enabled = options.pin and shutil.which("taskset") is not None and cores >= 2
        self.relay_core = options.relay_core
        self.load_core = options.load_core
        self.note = (
            f"relay pinned to core {options.relay_core}; load generator, upstream, Redis and "
            f"py-spy to core {options.load_core}" if self.enabled
            else "no CPU pinning (taskset missing, fewer than 2 cores, or --no-pin)")

    def relay(self, workers: int = 1) -> list[str]:
        """The prefix for the relay: its core, or cores ``0..workers-1`` for a gateway
        with several workers (then it shares core 0 with the load side)."""
        if not self.enabled:
            return []
        return ["taskset", "-c", str(self.relay_core) if workers <= 1 else f"0-{workers - 1}"]

    def relay_note(self, workers: int) -> str:
        """Where a gateway of ``workers`` processes runs."""
        if not self.enabled:
            return f"{workers} worker(s), not pinned"
        if workers <= 1:
            return f"1 worker on core {self.relay_core}"
        return (f"{workers} workers on cores 0-{workers - 1} (sharing core "
                f"{self.load_core} with the load side); CPU summed over the supervisor and "
                "its children; its numbers are not per core")

    def load(self) -> list[str]:
        return ["taskset", "-c", str(self.load_core)] if self.enabled else []


@dataclass
class Spawned:
    """A child process this runner started; :meth:`stop` ends it (SIGTERM, then SIGKILL)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def log_tail(self, lines: int = 20) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def spawn(name: str, argv: list[str], *, log: Path | None, env: dict[str, str] | None = None,
          stdin: bool = False, stdout_pipe: bool = False) -> Iterator[Spawned]:
    """Start ``argv``; stdout/stderr to ``log`` (or stdout to a pipe); stopped on exit."""
    out: IO[bytes] | int = subprocess.DEVNULL
    handle = None
    if log is not None:
        handle = log.open("ab")
        out = handle
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout_pipe else out, stderr=out,
        env=env, cwd=REPO_DIR)
    child = Spawned(name, process, log)
    try:
        yield child
    finally:
        child.stop()
        if handle is not None:
            handle.close()


class LineReader:
    """Lines of a child's stdout pipe, read with a timeout (``select``)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._fd = stream.fileno()
        self._buffer = b""
        self.closed = False

    def readline(self, timeout: float) -> str | None:
        """The next line without its newline; ``None`` on timeout or at EOF (``closed``)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return None
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self.closed = True
                if self._buffer:
                    self._buffer += b"\n"
                break
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")


def read_json_line(reader: LineReader, event: str, within: float, what: str) -> dict[str, Any]:
    """The first JSON line whose ``event`` is ``event``; :class:`BenchError` otherwise."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not reader.closed:
        line = reader.readline(deadline - time.monotonic())
        if line is None:
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                return record
    raise BenchError(f"{what}: no {event!r} line within {within:g} s")


# -- the components --------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(tmp: Path, pinning: Pinning) -> Iterator[tuple[Spawned, int]]:
    """A throw-away ``redis-server`` on a free loopback port (no persistence)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found (apt-get install -y redis-server)")
    port = free_port()
    argv = [*pinning.load(), binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no"]
    with spawn("redis", argv, log=tmp / "redis.log") as child:
        wait_until(lambda: not child.alive() or port_open(port), START_TIMEOUT, "redis-server")
        if not child.alive():
            raise BenchError(f"redis-server exited:\n{child.log_tail()}")
        yield child, port


@dataclass(frozen=True)
class UpstreamTLS:
    """The PEM files of the TLS upstream leg: a CA made for the run
    (:func:`gateway.devtls.create_certificates`: its key is discarded, its name constraints
    allow only ``127.0.0.1`` and ``localhost``) and the echo upstream's leaf."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def upstream_tls_files(tmp: Path) -> UpstreamTLS:
    """A fresh CA and server certificate for 127.0.0.1/localhost in ``tmp/tls``."""
    from gateway.devtls import create_certificates

    certs = create_certificates(tmp / "tls")
    return UpstreamTLS(certs.ca_file, certs.cert_file, certs.key_file)


@contextlib.contextmanager
def echo_upstream(tmp: Path, pinning: Pinning, usage_every: int, max_seconds: float,
                  tls: UpstreamTLS | None = None) -> Iterator[tuple[Spawned, int]]:
    """``bench/upstream.mjs`` on a free port (TLS with ``tls``); yields it and its port."""
    argv = [*pinning.load(), node(), str(BENCH_DIR / "upstream.mjs"), "--port", "0",
            "--usage-every", str(usage_every), "--max-seconds", str(int(max_seconds)),
            "--exit-on-stdin-close", "1"]
    if tls is not None:
        argv += ["--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file)]
    with spawn("upstream", argv, log=tmp / "upstream.log", stdin=True,
               stdout_pipe=True) as child:
        assert child.process.stdout is not None
        record = read_json_line(LineReader(child.process.stdout), "listening", START_TIMEOUT,
                                "echo upstream")
        yield child, int(record["port"])


NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 65536;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
daemon off;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass {scheme}://127.0.0.1:{upstream_port};{tls}
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""

NGINX_TLS = """
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca_file};
            proxy_ssl_verify_depth 1;
            proxy_ssl_server_name on;
            proxy_ssl_name localhost;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;"""
"""The upstream leg over TLS: verified against the run's CA.  nginx checks the name of the
certificate against ``proxy_ssl_name`` with X509_check_host, which matches DNS names only,
hence ``localhost`` (the leaf carries DNS localhost and IP 127.0.0.1); SNI is sent.
Sessions are reused (``proxy_ssl_session_reuse``, nginx's default)."""


@dataclass
class Target:
    """A relay under test: the URL the load generator dials and the pids to measure
    (empty for the direct path); ``metrics_url`` only for the gateway."""

    name: str
    url: str
    pids: list[int] = field(default_factory=list)
    metrics_url: str | None = None
    process: Spawned | None = None
    redis_port: int | None = None
    log: Path | None = None
    loadgen_env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the load generator (``NODE_EXTRA_CA_CERTS`` for wss://)."""


@contextlib.contextmanager
def nginx_relay(tmp: Path, pinning: Pinning, upstream_port: int,
                ca_file: Path | None = None) -> Iterator[Target]:
    """nginx as a plain process (not a service), config and files in a fresh
    ``tmp/nginx-*``; with ``ca_file`` it proxies to ``https://`` (:data:`NGINX_TLS`)."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
    if binary is None:
        raise BenchError("nginx not found: apt-get install -y nginx, or pass --relays "
                         "direct,gateway")
    home = tmp / f"nginx-{secrets.token_hex(3)}"
    home.mkdir()
    port = free_port()
    conf = home / "nginx.conf"
    tls = NGINX_TLS.format(ca_file=ca_file) if ca_file is not None else ""
    conf.write_text(NGINX_CONF.format(tmp=home, port=port, upstream_port=upstream_port,
                                      scheme="https" if ca_file else "http", tls=tls))
    argv = [*pinning.relay(), binary, "-p", str(home), "-c", str(conf), "-e",
            str(home / "error.log")]
    with spawn("nginx", argv, log=home / "stderr.log") as child:
        wait_until(lambda: not child.alive() or port_open(port), START_TIMEOUT, "nginx")
        if not child.alive():
            raise BenchError(f"nginx exited:\n{child.log_tail()}")
        wait_until(lambda: bool(procfs.children(child.pid)), START_TIMEOUT, "nginx worker")
        pids = procfs.tree(child.pid)
        yield Target("nginx", f"ws://127.0.0.1:{port}/v1/realtime?model={MODEL}", pids,
                     process=child)


def gateway_config(tmp: Path, upstream_port: int, redis_port: int, sessions: int,
                   ca_file: Path | None = None) -> Path:
    """The gateway's config for the bench, written to ``tmp/gateway.yaml``.

    One tenant with a development issuer (``tmp/issuer.jwk.json``), Redis admission
    (``fail_mode: closed``, so a Redis problem shows as refusals), limits that every
    session checks but none reaches, and a token budget so usage events are charged.
    With ``ca_file`` the upstream is ``wss://127.0.0.1`` trusting that CA only.
    """
    upstream: dict[str, Any] = {
        "provider": "openai", "api_key_env": UPSTREAM_KEY_ENV,
        "url": f"{'wss' if ca_file else 'ws'}://127.0.0.1:{upstream_port}/v1/realtime"}
    if ca_file is not None:
        upstream["ca_file"] = str(ca_file)
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "drain_seconds": 0,
                   "max_sessions": max(1000, 2 * sessions)},
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "fail_mode": "closed"},
        "upstreams": {"echo": upstream},
        "tenants": [{
            "id": "bench",
            "auth": {"issuer": ISSUER, "dev_issuer": {"key_file": str(tmp / "issuer.jwk.json")},
                     "audiences": [AUDIENCE]},
            "models": {MODEL: {"upstream": "echo"}},
            "limits": {"max_sessions": 100 * max(sessions, 10), "max_sessions_per_user": 2,
                       "session_starts_per_minute_per_user": 60,
                       "tokens_per_minute": 1_000_000_000, "max_session_seconds": 3600},
        }],
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mint_tokens(tmp: Path, count: int, ttl_seconds: float) -> Path:
    """``count`` bearer tokens (one a line, subjects ``bench-user-<i>``) from the dev issuer
    of :func:`gateway_config`, written to ``tmp/tokens`` (mode 0600)."""
    from gateway.auth.dev_issuer import DevIssuer
    from gateway.config import DEFAULT_SCOPE

    issuer = DevIssuer(tmp / "issuer.jwk.json")
    path = tmp / "tokens"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        for i in range(count):
            handle.write(issuer.mint(ISSUER, AUDIENCE, f"bench-user-{i}", DEFAULT_SCOPE,
                                     ttl_seconds) + "\n")
    return path


@contextlib.contextmanager
def gateway_relay(tmp: Path, pinning: Pinning, config: Path, workers: int = 1,
                  name: str = "gateway") -> Iterator[Target]:
    """``python -m gateway serve --config <config>`` on free ports, ready (``/readyz``).

    With ``workers`` > 1 it is ``serve --workers N`` (the workers share the main port with
    SO_REUSEPORT, metrics are aggregated on the metrics port), pinned to cores 0..N-1, and
    ready once N worker processes run as well.  Either way the target's pids are the
    process tree (:func:`bench.procfs.tree`: the supervisor and its children, or the one
    process), whose CPU, RSS and fds are summed as nginx's are.
    """
    log = tmp / f"gateway-{secrets.token_hex(3)}.log"
    env = {**os.environ, UPSTREAM_KEY_ENV: secrets.token_urlsafe(24), "PYTHONUNBUFFERED": "1"}
    port, metrics_port = free_port(), free_port()
    # BENCH_PROBE_OUT: run the gateway under bench/probe.py (stall evidence, issue 16).
    probe = os.environ.get("BENCH_PROBE_OUT")
    runner = ["-m", "bench.probe", "--out", probe, "--"] if probe else ["-m", "gateway"]
    argv = [*pinning.relay(workers), sys.executable, *runner, "serve", "--config",
            str(config), "--port", str(port), "--metrics-port", str(metrics_port),
            *(["--workers", str(workers)] if workers > 1 else [])]
    with spawn("gateway", argv, log=log, env=env) as child:

        def ready() -> bool:
            if not child.alive():
                return True
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            return False

        what = "gateway" + (f" ({workers} workers)" if workers > 1 else "")
        wait_until(ready, START_TIMEOUT, f"{what} /readyz", interval=0.1)
        if not child.alive():
            raise BenchError(f"the gateway exited:\n{child.log_tail()}")
        if workers > 1:
            wait_until(lambda: len(procfs.children(child.pid)) >= workers, START_TIMEOUT,
                       f"{workers} gateway workers")
        yield Target(name, f"ws://127.0.0.1:{port}/v1/realtime?model={MODEL}",
                     procfs.tree(child.pid), f"http://127.0.0.1:{metrics_port}/metrics", child,
                     log=log)


def scrape(metrics_url: str) -> dict[str, Any]:
    """The gateway's ``/metrics`` reduced to what the bench reports.

    ``sessions_active`` (sum over labels), ``handshake_mean_ms`` by phase (histogram
    sum / count), ``messages_total`` by direction, ``tokens_total`` (all kinds),
    ``rejections`` by code, ``sessions_total`` by outcome.
    """
    text = httpx.get(metrics_url, timeout=5).text
    out: dict[str, Any] = {"sessions_active": 0.0, "handshake_mean_ms": {},
                           "messages_total": {}, "tokens_total": 0.0, "rejections": {},
                           "sessions_total": {}}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "realtime_gateway_sessions_active":
                out["sessions_active"] += value
            elif name == "realtime_gateway_handshake_duration_seconds_sum":
                sums[labels["phase"]] = value
            elif name == "realtime_gateway_handshake_duration_seconds_count":
                counts[labels["phase"]] = value
            elif name == "realtime_gateway_messages_total":
                out["messages_total"][labels["direction"]] = value
            elif name == "realtime_gateway_tokens_total":
                out["tokens_total"] += value
            elif name == "realtime_gateway_session_rejections_total":
                out["rejections"][labels["code"]] = value
            elif name == "realtime_gateway_sessions_total":
                key = labels["outcome"]
                out["sessions_total"][key] = out["sessions_total"].get(key, 0) + value
    out["handshake_mean_ms"] = {phase: round(1000 * sums[phase] / counts[phase], 3)
                                for phase in sums if counts.get(phase)}
    return out


def log_summary(log: Path, examples: int = 3) -> dict[str, Any]:
    """The gateway's JSON log reduced to counts: records by level, warning-or-worse events
    by name with a few examples, rejection reasons, and session outcomes.  Non-JSON lines
    (a traceback printed outside the logger) are counted as ``unstructured``."""
    levels: dict[str, int] = {}
    problems: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    rejected: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    unstructured = 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            unstructured += 1
            continue
        if not isinstance(record, dict):
            continue
        level = str(record.get("level", "?"))
        levels[level] = levels.get(level, 0) + 1
        event = str(record.get("event", "?"))
        if event == "session.rejected":
            key = f"{record.get('code')}/{record.get('reason')}"
            rejected[key] = rejected.get(key, 0) + 1
        elif event == "session.end":
            key = str(record.get("outcome"))
            outcomes[key] = outcomes.get(key, 0) + 1
        if level in ("warning", "error", "critical", "exception"):
            problems[event] = problems.get(event, 0) + 1
            if len(samples) < examples:
                samples.append({k: v for k, v in record.items() if k != "timestamp"})
    return {"levels": levels, "problems": problems, "examples": samples,
            "rejected": rejected, "session_outcomes": outcomes, "unstructured_lines": unstructured}


def node() -> str:
    """The ``node`` binary; :class:`BenchError` when missing."""
    binary = shutil.which("node")
    if binary is None:
        raise BenchError("node (Node.js >= 18) not found: apt-get install -y nodejs npm")
    return binary


def ensure_node_modules() -> None:
    """Install the load generator's one dependency (``ws``) into ``bench/node_modules``
    with ``npm ci`` when it is missing."""
    if (BENCH_DIR / "node_modules" / "ws" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError("npm not found; install Node.js and npm, then: npm ci --prefix bench")
    print("bench: installing the ws package (npm ci --prefix bench)", file=sys.stderr)
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=BENCH_DIR, check=True,
                   timeout=300)


# -- one measured run ------------------------------------------------------------------------


@dataclass
class Helpers:
    """The processes around the relay, whose CPU use is reported (not charged to it)."""

    pids: dict[str, int]


def _cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            out[name] = procfs.cpu_seconds(pid)
    return out


def measure(target: Target, options: Options, tokens: Path, helpers: Helpers, tmp: Path,
            pinning: Pinning, *, on_window: Callable[[str], None] | None = None,
            soak_samples: list[SoakSample] | None = None) -> RelayRun:
    """Run the load generator against ``target`` and sample it around the window.

    ``on_window("start"|"end")`` is called at the window's edges (the profiler hooks in
    there).  With ``soak_samples``, a :class:`SoakSample` of the gateway is appended every
    ``options.sample_every`` seconds.
    """
    pids = target.pids
    run = RelayRun(target.name, options.sessions, {}, 0.0)
    if pids:
        run.rss_rest = procfs.total_rss_bytes(pids)
        run.fds_rest = procfs.total_fds(pids)
    argv = [*pinning.load(), node(), str(BENCH_DIR / "loadgen.mjs"), "--url", target.url,
            "--sessions", str(options.sessions), "--rate", str(options.rate),
            "--chunk-bytes", str(options.chunk_bytes), "--ramp-seconds", str(options.ramp),
            "--warmup-seconds", str(options.warmup), "--duration-seconds",
            str(options.duration), "--tokens-file", str(tokens), "--wait-close", "1",
            "--session-lifetime", str(options.session_lifetime),
            "--progress-seconds", "60" if options.soak else "0"]
    bound = options.ramp + options.warmup + options.duration + 90
    started = time.monotonic()
    window: dict[str, float] = {}
    cpu_start: dict[str, float] = {}
    cores_start: dict[int, procfs.CoreTimes] = {}
    next_sample = started
    next_core = float("inf")
    core_last: dict[int, procfs.CoreTimes] = {}
    env = {**os.environ, **target.loadgen_env} if target.loadgen_env else None
    with spawn(f"loadgen-{target.name}", argv, log=tmp / f"loadgen-{target.name}.log",
               stdin=True, stdout_pipe=True, env=env) as loadgen:
        assert loadgen.process.stdout is not None and loadgen.process.stdin is not None
        reader = LineReader(loadgen.process.stdout)
        all_helpers = {**helpers.pids, "loadgen": loadgen.pid}
        while not run.loadgen:
            if time.monotonic() - started > bound:
                raise BenchError(f"the load generator against {target.name} overran {bound} s")
            if soak_samples is not None and time.monotonic() >= next_sample and pids:
                soak_samples.append(soak_sample(target, time.monotonic() - started))
                next_sample += options.sample_every
            now = time.monotonic()
            if "start" in window and "end" not in window and now >= next_core:
                # per-second steal and busy time of the relay's core (stall evidence)
                sample = procfs.core_times()
                relay_core = pinning.relay_core if pinning.enabled else 0
                before, after = core_last[relay_core], sample[relay_core]
                hz = os.sysconf("SC_CLK_TCK")
                run.relay_core_by_second.append({
                    "steal_ms": round(1000 * (after.steal - before.steal) / hz, 1),
                    "busy_ms": round(1000 * (after.busy - before.busy) / hz, 1)})
                core_last = sample
                next_core += 1.0
            line = reader.readline(max(0.01, min(1.0, next_core - now))
                                   if "start" in window and "end" not in window else 1.0)
            if line is None:
                if reader.closed:
                    raise BenchError(f"the load generator against {target.name} exited:\n"
                                     f"{loadgen.log_tail()}")
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            event = record.get("event")
            if event == "window_start":
                window["start"] = time.monotonic()
                next_core = window["start"] + 1.0
                core_last = procfs.core_times()
                run.cpu_seconds = procfs.total_cpu_seconds(pids) if pids else None
                run.system_cpu_seconds = procfs.total_system_cpu_seconds(pids) if pids else None
                cpu_start = _cpu_of(all_helpers)
                cores_start = procfs.core_times()
                if on_window:
                    on_window("start")
                if soak_samples is not None and pids:
                    soak_samples.append(soak_sample(target, time.monotonic() - started))
            elif event == "window_end":
                window["end"] = time.monotonic()
                if pids and run.cpu_seconds is not None:
                    run.cpu_seconds = procfs.total_cpu_seconds(pids) - run.cpu_seconds
                    if run.system_cpu_seconds is not None:
                        run.system_cpu_seconds = (procfs.total_system_cpu_seconds(pids)
                                                  - run.system_cpu_seconds)
                    run.rss_loaded = procfs.total_rss_bytes(pids)
                    run.fds_loaded = procfs.total_fds(pids)
                wall = window["end"] - window["start"]
                run.wall_seconds = wall
                cpu_end = _cpu_of(all_helpers)
                run.helper_cpu_percent = {
                    name: round(100 * (cpu_end[name] - cpu_start[name]) / wall, 1)
                    for name in cpu_end if name in cpu_start and wall > 0}
                cores_end = procfs.core_times()
                run.core_busy_percent = procfs.core_busy_percent(cores_start, cores_end)
                run.core_steal_percent = procfs.core_steal_percent(cores_start, cores_end)
                if on_window:
                    on_window("end")
                if soak_samples is not None and pids:
                    soak_samples.append(soak_sample(target, time.monotonic() - started))
            elif event == "idle":
                if pids:
                    run.rss_idle = procfs.total_rss_bytes(pids)
                    run.fds_idle = procfs.total_fds(pids)
                if target.metrics_url:
                    run.gateway_metrics["sessions_active_idle"] = scrape(
                        target.metrics_url)["sessions_active"]
                loadgen.process.stdin.write(b"close\n")
                loadgen.process.stdin.flush()
            elif event == "report":
                run.loadgen = keep_slowest({k: v for k, v in record.items() if k != "event"})
            elif event == "error":
                raise BenchError(f"load generator: {record.get('message')}")
            elif event == "progress":
                print(f"bench: {target.name} {json.dumps(record)}", file=sys.stderr)
    if target.metrics_url:
        metrics_url = target.metrics_url
        with contextlib.suppress(BenchError):
            wait_until(lambda: scrape(metrics_url)["sessions_active"] == 0, 15,
                       "sessions to end", interval=0.2)
        run.gateway_metrics.update(scrape(metrics_url))
    if target.log is not None and target.log.exists():
        run.gateway_metrics["log"] = log_summary(target.log)
        problems = run.gateway_metrics["log"]["problems"]
        if problems or run.gateway_metrics["log"]["unstructured_lines"]:
            run.warnings.append(f"gateway log: warnings/errors {problems}, "
                                f"{run.gateway_metrics['log']['unstructured_lines']} "
                                "unstructured lines")
        if run.gateway_metrics.get("sessions_active"):
            run.warnings.append(f"{run.gateway_metrics['sessions_active']:.0f} sessions still "
                                "counted active 15 s after every client closed")
    if pids:
        run.rss_after = procfs.total_rss_bytes(pids)
        run.fds_after = procfs.total_fds(pids)
    check(run, options)
    return run


def soak_sample(target: Target, t: float) -> SoakSample:
    """The gateway's RSS, fds and ``sessions_active`` now (``t``: seconds into the load)."""
    active = scrape(target.metrics_url)["sessions_active"] if target.metrics_url else 0.0
    redis = (procfs.tcp_connections_to(target.pids[0], target.redis_port)
             if target.redis_port else 0)
    return SoakSample(round(t, 1), procfs.total_rss_bytes(target.pids),
                      procfs.total_fds(target.pids), active, redis)


def check(run: RelayRun, options: Options) -> None:
    """Append to ``run.warnings`` what makes its numbers doubtful."""
    report = run.loadgen
    offered = options.sessions * options.rate
    achieved = float(report.get("appends_per_s", 0))
    if achieved < 0.97 * offered:
        run.warnings.append(f"appends/s {achieved:.0f} < 97 % of the offered {offered:.0f}")
    if report.get("handshake_failures"):
        run.warnings.append(f"handshake failures: {report['handshake_failures']}")
    if report.get("unexpected_closes"):
        run.warnings.append(f"sessions closed by the far side: {report['unexpected_closes']}")
    for key in ("bad_deltas", "unmatched_deltas", "unanswered_appends"):
        if report.get(key):
            run.warnings.append(f"{key}: {report[key]}")
    if not options.soak and report.get("sessions_opened", 0) < options.sessions:
        run.warnings.append(f"only {report.get('sessions_opened')} of {options.sessions} "
                            "sessions opened")
    slow_close = (report.get("close_ms") or {}).get("max")
    if slow_close is not None and slow_close > 2000:
        run.warnings.append(f"a closing handshake took {slow_close / 1000:.1f} s (p99 "
                            f"{report['close_ms'].get('p99', 0) / 1000:.2f} s)")
    load_busy = run.core_busy_percent.get(options.load_core)
    if load_busy is not None and load_busy > 90:
        run.warnings.append(f"the load core was {load_busy:.0f} % busy: the load generator "
                            "side may have been a bottleneck")
    relay_cpu = run.cpu_percent
    if relay_cpu is not None and relay_cpu > 90:
        run.warnings.append(f"the relay used {relay_cpu:.0f} % of its core: saturated")


# -- profiling -------------------------------------------------------------------------------


def py_spy() -> str | None:
    """The ``py-spy`` binary beside this interpreter or on ``PATH``."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """Samples the gateway over the measurement window: ``py-spy record`` (Python
    stacks; with ``--gil``, i.e. only samples holding the GIL, unless ``native``, then with
    ``--native``) and, when ``perf`` is usable, ``perf record -g`` (cycles by binary, system
    call and symbol).  Both run pinned with the load generator."""

    def __init__(self, pid: int, seconds: float, output: Path, perf_data: Path,
                 pinning: Pinning, native: bool) -> None:
        binary = py_spy()
        if binary is None:
            raise BenchError("py-spy not found: .venv/bin/pip install py-spy")
        duration = max(1, int(seconds) - 1)
        self.argv = [*pinning.load(), binary, "record", "--pid", str(pid), "--rate", "100",
                     "--duration", str(duration), "--format", "raw",
                     "--output", str(output), *(["--native"] if native else ["--gil"])]
        perf = shutil.which("perf")
        self.perf_argv = ([*pinning.load(), perf, "record", "-F", "499", "-g", "-p", str(pid),
                           "-o", str(perf_data), "--", "sleep", str(duration)]
                          if perf else None)
        self.perf_data = perf_data
        self.output = output
        self.processes: list[subprocess.Popen[bytes]] = []

    def __call__(self, edge: str) -> None:
        if edge != "start":
            return
        for argv in (self.argv, self.perf_argv):
            if argv is not None:
                self.processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                       stderr=subprocess.PIPE))

    def finish(self) -> str:
        """Wait for the samplers to write their output; returns their stderr (for errors)."""
        errors = []
        for process in self.processes:
            try:
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            errors.append(err.decode(errors="replace"))
        return "\n".join(errors) if self.processes else "the samplers were never started"

    def perf_summary(self) -> PerfSummary | None:
        """``perf report`` of the recording, or ``None`` when perf did not record."""
        perf = shutil.which("perf")
        if perf is None or not self.perf_data.exists() or self.perf_data.stat().st_size == 0:
            return None

        def report(*extra: str) -> str:
            done = subprocess.run([perf, "report", "-i", str(self.perf_data), "--stdio", "-q",
                                   "-g", "none", *extra], capture_output=True, text=True,
                                  timeout=300, check=False)
            return done.stdout

        return PerfSummary(
            binaries=parse_perf_dso(report("--no-children", "--sort", "dso")),
            syscalls=parse_perf_syscalls(report("--children", "--sort", "sym")),
            symbols=parse_perf_symbols(report("--no-children", "--sort", "dso,sym")),
        )


# -- the whole benchmark ---------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of everything in the measured path (a tool that is missing is left out)."""
    import uvicorn
    from websockets.version import version as websockets_version

    import gateway

    out = {"python": platform.python_version(), "gateway": gateway.__version__,
           "uvicorn": uvicorn.__version__, "websockets": websockets_version}
    for module in ("uvloop", "redis", "starlette"):
        with contextlib.suppress(ImportError, AttributeError):
            out[module] = str(__import__(module).__version__)
    commands = {"node": ["node", "--version"], "nginx": ["nginx", "-v"],
                "redis-server": ["redis-server", "--version"]}
    for name, argv in commands.items():
        if shutil.which(argv[0]) is None:
            continue
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        text = (done.stdout + done.stderr).strip()
        match = re.search(r"v?=?(\d+\.\d+\.\d+)", text)
        out[name] = match.group(1) if match else text[:40]
    ws_package = BENCH_DIR / "node_modules" / "ws" / "package.json"
    if ws_package.exists():
        out["ws (node)"] = json.loads(ws_package.read_text())["version"]
    spy = py_spy()
    if spy:
        done = subprocess.run([spy, "--version"], capture_output=True, text=True, timeout=10,
                              check=False)
        out["py-spy"] = done.stdout.strip().removeprefix("py-spy ")
    return out


def machine() -> dict[str, Any]:
    """The machine: CPU model, cores, memory, kernel, load average at the start."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1),
            "kernel": platform.release(), "system": platform.platform(),
            "loadavg_at_start": procfs.loadavg()}


def conditions(options: Options, pinning: Pinning, rounds: list[dict[str, RelayRun]],
               info: dict[str, Any]) -> list[str]:
    """Human-readable lines about how the runs were made and what may skew them
    (``rounds``: one mapping relay → run per round, in the order they ran)."""
    lines = [
        f"{options.sessions} sessions x {options.rate:g} appends/s of {options.chunk_bytes} B "
        f"audio (20 ms PCM16 24 kHz, base64 in JSON); window {options.duration:g} s after "
        f"{options.ramp:g} s ramp + {options.warmup:g} s warm-up; "
        + (f"a usage `response.done` every {options.usage_every} appends"
           if options.usage_every else "pure echo (no usage events)"),
        pinning.note + f"; load average at start {info['machine']['loadavg_at_start']}",
    ]
    if options.gateway_workers > 1 and any("gateway" in runs for runs in rounds):
        lines.append("gateway: " + pinning.relay_note(options.gateway_workers)
                     + "; the bar is set for one "
                     "worker on one core: shown for reference")
    if options.upstream_tls:
        lines.append(
            "upstream leg TLS: the echo upstream serves https + ws (TLS 1.3) with a leaf of a "
            "CA made for this run; direct dials wss:// trusting it (NODE_EXTRA_CA_CERTS), "
            "nginx proxies to https:// with proxy_ssl_verify on (proxy_ssl_name localhost, "
            "SNI, session reuse on: nginx's default), the gateway dials wss:// with "
            "upstreams.echo.ca_file (one TLS context for all dials, no session reuse); the "
            "load generator still talks plain ws:// to the relay")
    if len(rounds) > 1:
        lines.append(f"{len(rounds)} rounds run interleaved "
                     f"({', '.join(rounds[0])}, {', '.join(rounds[0])}, ...), every relay "
                     "started fresh for each run; the bar judges the medians")
    for index, runs in enumerate(rounds):
        for name, run in runs.items():
            label = run_label(name, index, len(rounds))
            cores = ", ".join(f"core {c} {p:.0f} %"
                              for c, p in sorted(run.core_busy_percent.items()))
            steal = ", ".join(f"core {c} {p:.1f} %"
                              for c, p in sorted(run.core_steal_percent.items()))
            helpers = ", ".join(f"{k} {v:.0f} %" for k, v in run.helper_cpu_percent.items())
            worst = max(run.loadgen.get("rtt_max_ms_by_second") or [0])
            kernel = ""
            if run.system_cpu_seconds is not None and run.relayed_messages:
                kernel = (f"; of its CPU per message "
                          f"{run.system_cpu_seconds * 1e6 / run.relayed_messages:.1f} µs "
                          "in the kernel")
            lines.append(f"{label}: busy {cores} (hypervisor steal {steal}){kernel}; helpers' "
                         f"CPU {helpers}; worst round trip {worst:.1f} ms{stall_note(run)}")
            lines += [f"{label}: WARNING {w}" for w in run.warnings]
        gw = runs.get("gateway")
        if gw and gw.gateway_metrics:
            m = gw.gateway_metrics
            phases = ", ".join(f"{k} {v:.2f} ms"
                               for k, v in m.get("handshake_mean_ms", {}).items())
            lines.append(f"{run_label('gateway', index, len(rounds))} handshake phases "
                         f"(server-side means): {phases}; "
                         f"tokens metered {m.get('tokens_total', 0):.0f}; "
                         f"rejections {m.get('rejections') or 'none'}")
    return lines


SLOW_RTTS_KEPT = 200
"""Slow round trips a result file keeps (the slowest); a probe run keeps them all."""


def keep_slowest(report: dict[str, Any]) -> dict[str, Any]:
    """The load generator's report with ``slow_rtts`` cut to the :data:`SLOW_RTTS_KEPT`
    slowest (``slow_rtts_total`` says how many there were), unless the gateway runs under
    the stall probe (``BENCH_PROBE_OUT``), whose analysis lines every one up."""
    slow = report.get("slow_rtts") or []
    report["slow_rtts_total"] = len(slow)
    if not os.environ.get("BENCH_PROBE_OUT") and len(slow) > SLOW_RTTS_KEPT:
        report["slow_rtts"] = sorted(slow, key=lambda row: row[1], reverse=True)[
            :SLOW_RTTS_KEPT]
    return report


def stall_note(run: RelayRun, slow_ms: float = 10.0, stolen_ms: float = 10.0) -> str:
    """How many seconds of the window had a round trip over ``slow_ms`` and how many of
    those had at least ``stolen_ms`` of hypervisor steal on the relay's core (the stall
    evidence of issue 16), or nothing when the run has no per-second readings."""
    worst = run.loadgen.get("rtt_max_ms_by_second") or []
    cores = run.relay_core_by_second
    if not cores or not worst:
        return ""
    slow = [i for i, ms in enumerate(worst) if ms > slow_ms and i < len(cores)]
    stolen = [i for i in slow if cores[i]["steal_ms"] >= stolen_ms]
    total = sum(c["steal_ms"] for c in cores)
    return (f"; {len(slow)} s with a round trip over {slow_ms:g} ms, {len(stolen)} of them "
            f"with ≥ {stolen_ms:g} ms of steal on the relay core ({total:.0f} ms stolen in "
            f"{len(cores)} s)")


def timestamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def write_results(options: Options, stem: str, payload: dict[str, Any], table: str) -> Path:
    """``<out_dir>/<stem>.json`` and ``.md``; returns the Markdown path."""
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str)
                                                  + "\n")
    md = options.out_dir / f"{stem}.md"
    md.write_text(table)
    return md


def update_readme(readme: Path, key: str, body: str) -> None:
    """Replace the block between ``<!-- bench:KEY:start -->`` and ``<!-- bench:KEY:end -->``
    in ``readme`` with ``body`` (appended at the end when the markers are absent)."""
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    text = readme.read_text() if readme.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


@contextlib.contextmanager
def scratch_dir(keep: bool) -> Iterator[Path]:
    """A private temporary directory, removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix="rtgw-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"bench: logs and configs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Bench:
    """What every run of one benchmark shares: the scratch directory, pinning, tokens, the
    gateway's config, the helpers (upstream, Redis) and the TLS files of the upstream leg."""

    options: Options
    tmp: Path
    pinning: Pinning
    tokens: Path
    config: Path
    helpers: Helpers
    upstream_port: int
    tls: UpstreamTLS | None

    def workers(self, name: str) -> int:
        """Gateway processes of relay ``name``: ``gateway-<N>w`` has N, ``gateway`` has
        ``--gateway-workers``, the others 1."""
        match = re.fullmatch(r"gateway-(\d+)w", name)
        if match:
            return int(match.group(1))
        return self.options.gateway_workers if name == "gateway" else 1

    def run(self, name: str, options: Options) -> RelayRun:
        """Start relay ``name`` fresh, measure it under ``options``' load, stop it."""
        scheme = "wss" if self.tls else "ws"
        print(f"bench: {name}, {options.sessions} sessions, {options.duration:g} s"
              + (", TLS upstream leg" if self.tls else ""), file=sys.stderr)
        with contextlib.ExitStack() as stack:
            if name == "direct":
                target = Target("direct", f"{scheme}://127.0.0.1:{self.upstream_port}"
                                f"/v1/realtime?model={MODEL}")
                if self.tls:
                    target.loadgen_env["NODE_EXTRA_CA_CERTS"] = str(self.tls.ca_file)
            elif name == "nginx":
                target = stack.enter_context(nginx_relay(
                    self.tmp, self.pinning, self.upstream_port,
                    self.tls.ca_file if self.tls else None))
            else:
                target = stack.enter_context(gateway_relay(
                    self.tmp, self.pinning, self.config, self.workers(name), name))
            return measure(target, options, self.tokens, self.helpers, self.tmp, self.pinning)


def planned_seconds(options: Options) -> float:
    """An upper estimate of the benchmark's wall time, s (printed before it starts)."""
    def one(sessions: int) -> float:  # ramp + warm-up + window + start, drain, close
        return max(0.5, sessions / 100) + options.warmup + options.duration + 6.0

    if options.sweep or options.throughput:
        counts = sweep.schedule(options.sweep_start, options.sweep_step, options.sweep_max)
        relays = len(sweep_relays(options))
        total = sum(one(n) * relays for n in counts)
        if options.sweep_bisect:  # one bisection step per relay, with its direct run
            total += 2 * (relays - 1) * one(counts[-1])
        return total
    total = one(options.sessions) * len(options.relays) * options.repeat
    if options.profile:
        total += one(options.sessions) + 30
    return total


def sweep_relays(options: Options) -> tuple[str, ...]:
    """The relays a sweep runs: direct first (the floor), then the ones compared."""
    if options.throughput:
        return ("direct", "gateway-1w", "gateway-2w")
    return ("direct", *(r for r in options.relays if r != "direct"))


def run_benchmark(options: Options) -> Path:
    """Run every relay of ``options`` (``repeat`` rounds), or the sweep, or the soak; write
    results; returns the Markdown path.

    Raises :class:`BenchError` when a run cannot be carried out.
    """
    ensure_node_modules()
    node()
    raise_fd_limit()
    pinning = Pinning(options)
    info: dict[str, Any] = {"machine": machine(), "versions": versions(),
                            "started": timestamp()}
    planned = planned_seconds(options)
    print(f"bench: planned at most {planned / 60:.1f} min", file=sys.stderr)
    most = (max(options.sweep_max, options.sessions) if options.sweep or options.throughput
            else options.sessions)
    with scratch_dir(options.keep_tmp) as tmp, contextlib.ExitStack() as stack:
        tls = upstream_tls_files(tmp) if options.upstream_tls else None
        redis, redis_port = stack.enter_context(redis_server(tmp, pinning))
        upstream, upstream_port = stack.enter_context(
            echo_upstream(tmp, pinning, options.usage_every, 2 * planned + 600, tls))
        helpers = Helpers({"upstream": upstream.pid, "redis": redis.pid})
        tokens = mint_tokens(tmp, most,
                             ttl_seconds=max(3600.0, 2 * planned))
        config = gateway_config(tmp, upstream_port, redis_port, most,
                                tls.ca_file if tls else None)
        if options.soak:
            return _soak(options, pinning, info, tmp, tokens, config, helpers,
                         {redis_port: "redis", upstream_port: "upstream"})
        bench = Bench(options, tmp, pinning, tokens, config, helpers, upstream_port, tls)
        if options.sweep or options.throughput:
            return _sweep(bench, info)
        rounds: list[dict[str, RelayRun]] = []
        for _ in range(options.repeat):
            rounds.append({name: bench.run(name, options) for name in options.relays})
        figures = medians(rounds)
        profile_md = ""
        profile_summary: dict[str, Any] = {}
        stem = f"{timestamp()}-{options.sessions}sessions{_suffix(options)}"
        if options.profile:
            profile_md, profile_summary = _profile(
                options, pinning, tmp, tokens, config, helpers,
                figures.get("gateway", {}).get("cpu_us_per_message"), stem)
    table = markdown(_title(options, info), rounds, conditions(options, pinning, rounds, info))
    if profile_md:
        table += ("\n#### Where the gateway's CPU goes (py-spy and perf, separate run)\n\n"
                  + profile_md)
    payload = {
        **info, "options": _options_json(options),
        "repeat": options.repeat, "upstream_tls": options.upstream_tls,
        "gateway_workers": options.gateway_workers,
        "order": [[name, index] for index, runs in enumerate(rounds) for name in runs],
        "runs": {name: [{"round": index, **asdict(runs[name]),
                         "derived": derived(runs[name], runs.get("direct"))}
                        for index, runs in enumerate(rounds)]
                 for name in rounds[0]},
        "medians": figures,
        "bar": [asdict(v) | {"verdict": v.label} for v in bar_of(figures)],
        "profile": profile_summary,
    }
    md = write_results(options, stem, payload, table)
    if options.readme is not None:
        update_readme(options.readme, f"sessions-{options.sessions}{_suffix(options)}",
                      table + f"\n(raw: `bench/results/{stem}.json`)\n")
    return md


def _suffix(options: Options) -> str:
    """The result-file and README-block suffix: ``-tls``, ``-<N>workers``, then ``--label``."""
    return ("-tls" if options.upstream_tls else "") + (
        f"-{options.gateway_workers}workers" if options.gateway_workers > 1 else "") + (
        options.label)


def _title(options: Options, info: dict[str, Any]) -> str:
    leg = ", TLS upstream leg" if options.upstream_tls else ""
    workers = (f", gateway {options.gateway_workers} workers"
               if options.gateway_workers > 1 else "")
    repeat = f", medians of {options.repeat} runs" if options.repeat > 1 else ""
    return (f"{options.sessions} sessions{leg}{workers}{repeat}, {info['started']} "
            f"({info['machine']['cpu']}, {info['machine']['cores']} cores)")


def _options_json(options: Options) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}


def raise_fd_limit() -> None:
    """Raise this process's soft open-file limit to the hard one; the relays, the load
    generator and the upstream inherit it (a 1,000-session sweep needs > 2,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sweep_point(run: RelayRun, direct: RelayRun | None, options: Options, workers: int,
                direct_failed: bool) -> SweepPoint:
    """A :class:`SweepPoint` of ``run`` (``direct``: the direct run at the same count)."""
    d = derived(run, direct)
    report = run.loadgen
    return SweepPoint(
        relay=run.name, sessions=run.sessions,
        offered_appends_per_s=float(report.get("offered_appends_per_s",
                                               options.rate * run.sessions)),
        appends_per_s=float(report.get("appends_per_s", 0)),
        messages_per_s=float(report.get("messages_per_s", 0)),
        sessions_opened=int(report.get("sessions_opened", 0)),
        rtt_p99_ms=d["rtt_p99_ms"], added_p99_ms=d["added_p99_ms"],
        relay_cpu_percent=d["cpu_percent"],
        load_core_busy_percent=run.core_busy_percent.get(options.load_core),
        direct_failed=direct_failed, workers=workers)


def _sweep(bench: Bench, info: dict[str, Any]) -> Path:
    """The capacity sweep (``--sweep``) or the throughput comparison (``--throughput``):
    see :mod:`bench.sweep`."""
    options = bench.options
    relays = sweep_relays(options)
    counts = sweep.schedule(options.sweep_start, options.sweep_step, options.sweep_max)
    print(f"bench: sweep {counts[0]}..{counts[-1]} sessions (step {options.sweep_step}) of "
          f"{', '.join(relays)}; each relay stops at its first failure", file=sys.stderr)
    points: list[SweepPoint] = []
    runs: list[RelayRun] = []
    directs: dict[int, tuple[RelayRun, SweepPoint]] = {}

    def at(count: int) -> Options:
        return dataclasses.replace(options, sessions=count, ramp=max(0.5, count / 100))

    def direct_at(count: int) -> SweepPoint:
        if count not in directs:
            run = bench.run("direct", at(count))
            runs.append(run)
            point = sweep_point(run, None, options, 1, False)
            points.append(point)
            directs[count] = (run, point)
        return directs[count][1]

    def relay_at(name: str, count: int) -> SweepPoint:
        floor = direct_at(count)
        run = bench.run(name, at(count))
        runs.append(run)
        point = sweep_point(run, directs[count][0], options, bench.workers(name),
                            not floor.passed)
        points.append(point)
        return point

    racing = [r for r in relays if r != "direct"]
    first_fail: dict[str, int] = {}
    load_limit: int | None = None
    for count in counts:
        if not racing:
            break
        if not direct_at(count).passed:
            load_limit = count
            break
        for name in list(racing):
            point = relay_at(name, count)
            if not point.passed:
                racing.remove(name)
                first_fail[name] = count
    if options.sweep_bisect:
        for name, failed_at in first_fail.items():
            mine = [p for p in points if p.relay == name]
            passes = [p.sessions for p in mine if p.passed]
            failure = next(p for p in mine if p.sessions == failed_at)
            middle = sweep.bisection(max(passes), failed_at) if passes else None
            if middle is not None and failure.bound == "relay":
                relay_at(name, middle)
    capacities = {name: sweep.capacity(name, points, load_limit) for name in relays}
    verdicts: list[Verdict] = []
    if options.throughput:
        one, two = capacities["gateway-1w"], capacities["gateway-2w"]
        lines = [throughput_line(one, two)]
        title = "Throughput: gateway 1 worker vs 2 workers (highest msgs/s at added p99 ≤ 10 ms)"
    else:
        lines = []
        if "gateway" in capacities and "nginx" in capacities:
            verdicts.append(sweep.ratio_verdict(capacities["gateway"], capacities["nginx"]))
        title = "Capacity sweep: sessions per core at added p99 ≤ 10 ms"
    leg = ", TLS upstream leg" if options.upstream_tls else ""
    title += f"{leg}, {info['started']} ({info['machine']['cpu']}, " \
             f"{info['machine']['cores']} cores)"
    limited = [c.relay for c in capacities.values() if c.relay != "direct"
               and c.bound == "load side"]
    if load_limit is not None:
        lines.append(f"the load side could not offer {load_limit} sessions (the direct path "
                     "failed there: offered rate not reached or its own RTT p99 over 10 ms): the "
                     "sweep was limited by the load side, not by the relays")
    if limited:
        lines.append(f"limited by the load side rather than by the relay: {', '.join(limited)}")
    lines += [f"{options.duration:g} s windows after a ramp of sessions/100 s and "
              f"{options.warmup:g} s warm-up; {options.rate:g} appends/s per session; counts "
              f"{counts[0]}..{counts[-1]} step {options.sweep_step}"
              + (", then one bisection step" if options.sweep_bisect else ""),
              bench.pinning.note + f"; load average at start {info['machine']['loadavg_at_start']}"]
    lines += [f"{r}: {bench.pinning.relay_note(bench.workers(r))}" for r in relays
              if r.startswith("gateway")]
    lines += [f"{run.name} at {run.sessions}: WARNING {w}" for run in runs for w in run.warnings]
    table = sweep.sweep_markdown(title, points, capacities, verdicts, lines,
                                 throughput=options.throughput)
    kind = "throughput" if options.throughput else "sweep"
    stem = f"{timestamp()}-{kind}{_suffix(options)}"
    payload = {
        **info, "options": _options_json(options), "kind": kind,
        "upstream_tls": options.upstream_tls, "load_limit": load_limit,
        "points": [asdict(p) | {"passed": p.passed, "bound": p.bound, "result": p.result}
                   for p in points],
        "capacity": {name: asdict(c) | {"sessions_per_core": c.sessions_per_core}
                     for name, c in capacities.items()},
        "verdicts": [asdict(v) | {"verdict": v.label} for v in verdicts],
        "runs": [{**asdict(run), "derived": derived(run, directs.get(run.sessions, (None,))[0])}
                 for run in runs],
    }
    md = write_results(options, stem, payload, table)
    if options.readme is not None:
        update_readme(options.readme, f"{kind}{_suffix(options)}",
                      table + f"\n(raw: `bench/results/{stem}.json`)\n")
    return md


def throughput_line(one: Capacity, two: Capacity) -> str:
    """The throughput comparison as one sentence."""
    def text(c: Capacity) -> str:
        bound = "" if c.exact else " (a lower bound: " + c.bound + ")"
        msgs = "—" if c.messages_per_s is None else f"{c.messages_per_s:,.0f} msgs/s"
        return f"{msgs} at {c.sessions or 0} sessions{bound}"

    ratio = (f"{two.messages_per_s / one.messages_per_s:.2f} x"
             if one.messages_per_s and two.messages_per_s else "—")
    return (f"highest msgs/s at added p99 ≤ 10 ms: 1 worker {text(one)}; 2 workers "
            f"{text(two)}; 2 workers / 1 worker = {ratio}")


def _profile(options: Options, pinning: Pinning, tmp: Path, tokens: Path, config: Path,
             helpers: Helpers, measured_cpu_us: float | None,
             stem: str) -> tuple[str, dict[str, Any]]:
    """A gateway run with py-spy (and perf) attached over the window; Markdown + JSON."""
    print("bench: gateway under py-spy", file=sys.stderr)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    raw = options.out_dir / f"{stem}-pyspy.txt"
    with gateway_relay(tmp, pinning, config) as target:
        profiler = Profiler(target.pids[0], options.duration, raw, tmp / "perf.data", pinning,
                            native=options.profile_native)
        run = measure(target, options, tokens, helpers, tmp, pinning, on_window=profiler)
        errors = profiler.finish()
    if not raw.exists():
        raise BenchError(f"py-spy wrote nothing: {errors.strip()[:500]}")
    summary = summarise(parse_collapsed(raw.read_text().splitlines()))
    cpu = measured_cpu_us if measured_cpu_us is not None else run.cpu_us_per_message
    source = ("the unprofiled gateway run" if options.repeat == 1
              else f"the median of {options.repeat} unprofiled gateway runs")
    text = (f"µs per relayed message = share x {_fmt_us(cpu)} ({source}); "
            f"the profiled run itself measured {_fmt_us(run.cpu_us_per_message)}.\n\n")
    text += profile_markdown(summary, cpu)
    perf = profiler.perf_summary()
    if perf is not None:
        text += "\n" + perf_markdown(perf, cpu)
    text += f"\nCollapsed py-spy stacks: `bench/results/{raw.name}`.\n"
    payload: dict[str, Any] = asdict(summary)
    payload["profiled_run_cpu_us_per_message"] = run.cpu_us_per_message
    payload["perf"] = asdict(perf) if perf is not None else None
    return text, payload


def _fmt_us(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} µs"


def soak_endpoints(samples: list[SoakSample], warm_t: float,
                   end_t: float) -> tuple[SoakSample, SoakSample]:
    """The samples compared by the soak: the first at or after ``warm_t`` (end of the
    warm-up) and the last at least 1 s before ``end_t`` (the window's end, after which
    sessions close without reopening and the counts are in flux); seconds since the load
    generator started."""
    warm = next((s for s in samples if s.t >= warm_t), samples[0])
    steady = [s for s in samples if s.t <= end_t - 1.0]
    return warm, steady[-1] if steady else samples[-1]


def _soak(options: Options, pinning: Pinning, info: dict[str, Any], tmp: Path, tokens: Path,
          config: Path, helpers: Helpers, port_names: dict[int, str]) -> Path:
    samples: list[SoakSample] = []
    with gateway_relay(tmp, pinning, config) as target:
        pid = target.pids[0]
        names = {**port_names, int(target.url.split(":")[2].split("/")[0]): "gateway",
                 int((target.metrics_url or "::0/").split(":")[2].split("/")[0]): "metrics"}
        target.redis_port = next(port for port, name in port_names.items() if name == "redis")
        rest = soak_sample(target, 0.0)
        fds_at_rest = procfs.fd_kinds(pid, names)
        run = measure(target, options, tokens, helpers, tmp, pinning, soak_samples=samples)
        after = soak_sample(target, samples[-1].t if samples else 0.0)
        fds_after = procfs.fd_kinds(pid, names)
    if len(samples) < 2:
        raise BenchError("the soak took fewer than two samples")
    warm, end = soak_endpoints(samples, options.ramp + options.warmup,
                               options.ramp + options.warmup + options.duration)
    verdicts: list[Verdict] = soak_verdicts(rest, warm, end, after)
    title = (f"Soak: {options.sessions} sessions, {options.duration:g} s after "
             f"{options.warmup:g} s warm-up, sessions live {options.session_lifetime:g} s, "
             f"{info['started']}")
    lines = conditions(options, pinning, [{"gateway": run}], info)
    lines.append(f"sessions opened in all: {run.loadgen.get('sessions_opened')}; the gateway "
                 "exports no asyncio task count: leaks are looked for in RSS, open fds and "
                 "the realtime_gateway_sessions_active gauge")
    lines.append(f"open fds at rest: {fds_at_rest}")
    lines.append(f"open fds after the load: {fds_after}")
    table = soak_markdown(title, samples, verdicts, lines)
    stem = f"{timestamp()}-soak-{options.sessions}sessions{options.label}"
    payload = {**info, "options": {k: str(v) if isinstance(v, Path) else v
                                   for k, v in asdict(options).items()},
               "run": asdict(run), "samples": [asdict(s) for s in samples],
               "rest": asdict(rest), "after": asdict(after), "fds_at_rest": fds_at_rest,
               "fds_after": fds_after,
               "verdicts": [asdict(v) | {"verdict": v.label} for v in verdicts]}
    md = write_results(options, stem, payload, table)
    if options.readme is not None:
        update_readme(options.readme, f"soak{options.label}",
                      table + f"\n(raw: `bench/results/{stem}.json`)\n")
    return md


def parse_args(argv: list[str] | None) -> Options:
    """Command-line options → :class:`Options` (``--help`` lists them)."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=None,
                        help="concurrent sessions (default 200)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measurement window, s (default 20; soak 540)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="after the ramp, before the window, s (default 3; soak 60)")
    parser.add_argument("--ramp", type=float, default=None,
                        help="sessions open evenly over this many s (default sessions/100, "
                             "at least 0.5)")
    parser.add_argument("--rate", type=float, default=50.0, help="appends per second per "
                        "session (default 50: 20 ms chunks)")
    parser.add_argument("--chunk-bytes", type=int, default=960,
                        help="audio bytes per append before base64 (default 960 = 20 ms "
                             "PCM16 24 kHz)")
    parser.add_argument("--usage-every", type=int, default=50,
                        help="the upstream sends a response.done with usage after every N "
                             "appends; 0 = pure echo (default 50 = once a second)")
    parser.add_argument("--relays", default=",".join(RELAYS),
                        help="comma-separated subset of direct,nginx,gateway")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--relay-core", type=int, default=1)
    parser.add_argument("--load-core", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="add a gateway run under py-spy and summarise where CPU goes")
    parser.add_argument("--profile-native", action="store_true",
                        help="py-spy --native: also sample C frames (uvloop, the kernel calls)")
    parser.add_argument("--soak", action="store_true",
                        help="gateway only, 200 sessions, 60 s warm-up + 540 s, sessions "
                             "closing and reopening every 60 s; checks RSS/fd growth")
    parser.add_argument("--session-lifetime", type=float, default=None,
                        help="each session closes after this many s and reopens (soak "
                             "default 60; 0 = live for the whole run)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not update bench/README.md")
    parser.add_argument("--label", default="", help="suffix for result file names")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temporary directory (process logs, configs)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the relays, interleaved (direct, nginx, gateway, "
                             "direct, ...), each relay started fresh; the report adds medians "
                             "and the bar judges them (default 1)")
    parser.add_argument("--upstream-tls", action="store_true",
                        help="the relay-to-upstream leg over TLS: the echo upstream serves "
                             "wss:// with a certificate of a CA made for the run")
    parser.add_argument("--gateway-workers", type=int, default=1,
                        help="run `serve --workers N`; N > 1 pins the gateway to cores 0..N-1 "
                             "(default 1, on core 1)")
    parser.add_argument("--sweep", action="store_true",
                        help="capacity sweep: direct, nginx and gateway at increasing session "
                             "counts until added p99 > 10 ms or the offered rate is missed; "
                             "reports sessions per core (<= 9 min at the defaults)")
    parser.add_argument("--throughput", action="store_true",
                        help="the sweep for the gateway with 1 and with 2 workers: highest "
                             "msgs/s at added p99 <= 10 ms (needs serve --workers)")
    parser.add_argument("--sweep-start", type=int, default=200,
                        help="first session count of a sweep (default 200)")
    parser.add_argument("--sweep-step", type=int, default=200,
                        help="session count step of a sweep (default 200)")
    parser.add_argument("--sweep-max", type=int, default=1200,
                        help="the cap: last session count of a sweep (default 1200)")
    parser.add_argument("--no-sweep-bisect", action="store_true",
                        help="no bisection step after a relay's first failure")
    args = parser.parse_args(argv)
    relays = tuple(r for r in RELAYS if r in args.relays.split(","))
    unknown = set(args.relays.split(",")) - set(RELAYS)
    if unknown or not relays:
        parser.error(f"--relays: unknown {sorted(unknown)}; choose from {','.join(RELAYS)}")
    sessions = args.sessions if args.sessions is not None else 200
    if sessions < 1:
        parser.error("--sessions must be >= 1")
    soak = bool(args.soak)
    sweeping = bool(args.sweep or args.throughput)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.gateway_workers < 1:
        parser.error("--gateway-workers must be >= 1")
    if sweeping and (soak or args.repeat > 1 or args.profile or args.profile_native):
        parser.error("--sweep/--throughput go without --soak, --repeat and --profile")
    if soak and args.repeat > 1:
        parser.error("--soak runs once: no --repeat")
    if args.gateway_workers > 1 and (soak or args.profile or args.profile_native):
        parser.error("--soak and --profile measure one gateway process: --gateway-workers 1")
    if sweeping:
        try:
            sweep.schedule(args.sweep_start, args.sweep_step, args.sweep_max)
        except ValueError as exc:
            parser.error(f"--sweep-start/--sweep-step/--sweep-max: {exc}")
    if sweeping and "direct" not in relays:
        relays = ("direct", *relays)
    default_duration, default_warmup = (540.0, 60.0) if soak else (
        (8.0, 2.0) if sweeping else (20.0, 3.0))
    return Options(
        sessions=sessions, rate=args.rate, chunk_bytes=args.chunk_bytes,
        duration=args.duration if args.duration is not None else default_duration,
        warmup=args.warmup if args.warmup is not None else default_warmup,
        ramp=args.ramp if args.ramp is not None else max(0.5, sessions / 100),
        usage_every=args.usage_every, relays=("gateway",) if soak else relays,
        pin=not args.no_pin, relay_core=args.relay_core, load_core=args.load_core,
        profile=(args.profile or args.profile_native) and not soak,
        profile_native=args.profile_native, soak=soak,
        session_lifetime=(args.session_lifetime if args.session_lifetime is not None
                          else (60.0 if soak else 0.0)),
        sample_every=10.0 if soak else 1.0,
        out_dir=args.out, readme=None if args.no_readme else README,
        label=f"-{args.label}" if args.label else "", keep_tmp=args.keep_tmp,
        repeat=args.repeat, upstream_tls=args.upstream_tls,
        gateway_workers=args.gateway_workers, sweep=args.sweep, throughput=args.throughput,
        sweep_start=args.sweep_start, sweep_step=args.sweep_step, sweep_max=args.sweep_max,
        sweep_bisect=not args.no_sweep_bisect,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the benchmark, print where the results went; see the module doc."""
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on SIGTERM
    try:
        md = run_benchmark(options)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(md.read_text())
    print(f"bench: results in {md.with_suffix('.json')} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
