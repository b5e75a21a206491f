"""PromQL test helpers: macro substitution, selector analysis, a static exporter, real Prometheus.

Reusable pieces for the dashboard and alert tests, and for end-to-end tests that let a real
Prometheus scrape the gateway:

- :func:`grafana_to_promql` turns a Grafana query into plain PromQL (``$__rate_interval`` → ``1m``,
  ``$tenant`` → ``.*``, ...); :func:`vector_selectors` / :func:`metric_names` walk the AST of
  promql-parser; :func:`instant_selector` strips range, offset and ``@`` from a selector.
- :func:`dashboard_queries` and :func:`alerting_rules` list the expressions of a Grafana dashboard
  JSON model and of a Prometheus rule file (``groups:`` format).
- :class:`StaticExporter` serves fixed (or per-scrape generated) exposition text on loopback.
- :func:`run_prometheus` starts a real ``prometheus`` (Debian package, 2.42) on a free loopback
  port with a temporary TSDB; :class:`PrometheusServer` queries it through the HTTP API
  (https://prometheus.io/docs/prometheus/latest/querying/api/).
- :func:`run_promtool` runs ``promtool`` (``check rules``, ``test rules``, ``check metrics``).

Everything async uses the running event loop only, so an in-process gateway keeps answering
scrapes while a test waits on Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import httpx
import promql_parser
import yaml

PREFIX: Final = "realtime_gateway_"

# CONTRACT §6 metric families (name without prefix → type).
GATEWAY_METRICS: Final[Mapping[str, str]] = {
    "sessions_active": "gauge",
    "sessions_total": "counter",
    "session_rejections_total": "counter",
    "session_duration_seconds": "histogram",
    "handshake_duration_seconds": "histogram",
    "messages_total": "counter",
    "message_bytes_total": "counter",
    "closes_total": "counter",
    "tokens_total": "counter",
    "upstream_connect_errors_total": "counter",
    "limiter_errors_total": "counter",
    "jwks_refreshes_total": "counter",
    "draining": "gauge",
    "build_info": "gauge",
}
# Families the dashboard and alerts rely on beyond CONTRACT §6 (per-tenant limits as gauges,
# sessions by client protocol: ga or beta; the supervisor of serve --workers: worker restarts).
PROPOSED_METRICS: Final[Mapping[str, str]] = {
    "tenant_max_sessions": "gauge",
    "tenant_tokens_per_minute": "gauge",
    "protocol_sessions_active": "gauge",
    "protocol_sessions_total": "counter",
    "call_hangups_total": "counter",
    "worker_restarts_total": "counter",
}
# Standard series: Prometheus' own `up`, prometheus-client's process collector, and the
# kube-state-metrics families the alerts use.
STANDARD_METRICS: Final[frozenset[str]] = frozenset(
    {
        "up",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "kube_deployment_status_replicas_available",
        "kube_deployment_spec_replicas",
    }
)

# Grafana global macros → values usable by Prometheus.
_GRAFANA_MACROS: Final[Mapping[str, str]] = {
    "__rate_interval": "1m",
    "__interval_ms": "60000",
    "__interval": "1m",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__range": "1h",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered an API call with an error."""


class PromQueryError(PrometheusError):
    """A PromQL query was rejected; ``expr`` is the query, ``error`` Prometheus' message."""

    def __init__(self, expr: str, error: str) -> None:
        super().__init__(f"{error}: {expr}")
        self.expr = expr
        self.error = error


def contract_metric_names() -> frozenset[str]:
    """Every series name the gateway exports: CONTRACT §6 plus the proposed gauges, with
    histograms expanded to ``_bucket``, ``_count`` and ``_sum``."""
    names: set[str] = set()
    for family, kind in {**GATEWAY_METRICS, **PROPOSED_METRICS}.items():
        if kind == "histogram":
            names.update(f"{PREFIX}{family}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(PREFIX + family)
    return frozenset(names)


def grafana_to_promql(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana macros and template variables in ``expr`` with literal values.

    ``$__rate_interval`` and ``$__interval`` become ``1m``, ``$__range`` ``1h``; a dashboard
    variable (``$name`` or ``${name}``) takes ``variables[name]``, else ``.*`` (the value of a
    multi-value "All" with ``allValue: .*``). Raises nothing; unknown text is left as is.
    """
    values = {**_GRAFANA_MACROS, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, ".*")

    return _VARIABLE.sub(replace, expr)


def parse(expr: str) -> promql_parser.Expr:
    """Parse PromQL with promql-parser; raises ``ValueError`` with the parser's message."""
    result: promql_parser.Expr = promql_parser.parse(expr)
    return result


def vector_selectors(expr: str | promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    """Every vector selector of ``expr`` (including those inside range selectors), in order."""
    tree = parse(expr) if isinstance(expr, str) else expr
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(tree, visit)
    return found


def selector_name(selector: promql_parser.VectorSelector) -> str | None:
    """The metric name a selector asks for: its name or an ``__name__="..."`` matcher."""
    if selector.name:
        return selector.name
    for matcher in selector.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            return matcher.value
    return None


def selector_labels(selector: promql_parser.VectorSelector) -> dict[str, tuple[str, str]]:
    """The selector's label matchers as ``{label: (operator, value)}``, e.g. ``("=~", ".*")``."""
    ops = (  # MatchOp is not hashable: compare with ==
        (promql_parser.MatchOp.Equal, "="),
        (promql_parser.MatchOp.NotEqual, "!="),
        (promql_parser.MatchOp.Re, "=~"),
        (promql_parser.MatchOp.NotRe, "!~"),
    )

    def symbol(op: promql_parser.MatchOp) -> str:
        return next((text for known, text in ops if op == known), str(op))

    return {m.name: (symbol(m.op), m.value) for m in selector.matchers.matchers}


def metric_names(expr: str | promql_parser.Expr) -> set[str]:
    """The metric names ``expr`` selects (selectors without a fixed name are ignored)."""
    return {name for s in vector_selectors(expr) if (name := selector_name(s)) is not None}


def instant_selector(selector: promql_parser.VectorSelector) -> str:
    """The selector as an instant query without range, ``offset`` or ``@``: ``name{matchers}``."""
    return f"{selector.name or ''}{selector.matchers}"


@dataclass(frozen=True)
class DashboardQuery:
    """One Prometheus target of a dashboard panel."""

    panel_id: int
    panel_title: str
    ref_id: str
    expr: str


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a Grafana dashboard JSON model, rows and the panels inside rows included."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []) if panel.get("type") == "row" else [])
    return panels


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[DashboardQuery]:
    """Every target with an ``expr`` in a Grafana dashboard JSON model (rows included)."""
    return [
        DashboardQuery(
            panel_id=int(panel.get("id", 0)),
            panel_title=str(panel.get("title", "")),
            ref_id=str(target.get("refId", "")),
            expr=str(target["expr"]),
        )
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


@dataclass(frozen=True)
class AlertingRule:
    """One alerting rule of a Prometheus rule file (``for`` as written, e.g. ``"5m"``)."""

    group: str
    alert: str
    expr: str
    duration: str | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


def alerting_rules(path: Path) -> list[AlertingRule]:
    """The alerting rules (not recording rules) of a plain ``groups:`` rule file."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        AlertingRule(
            group=str(group["name"]),
            alert=str(rule["alert"]),
            expr=str(rule["expr"]),
            duration=rule.get("for"),
            labels=dict(rule.get("labels") or {}),
            annotations=dict(rule.get("annotations") or {}),
        )
        for group in data["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def promtool_path() -> str | None:
    """Path of ``promtool`` (Debian package ``prometheus``), or None when not installed."""
    return shutil.which("promtool")


def prometheus_path() -> str | None:
    """Path of the ``prometheus`` server binary, or None when not installed."""
    return shutil.which("prometheus")


def run_promtool(*args: str, cwd: Path | None = None, stdin: str | None = None,
                 timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``promtool *args`` and return the finished process (stdout, stderr as text).

    Raises ``FileNotFoundError`` when promtool is not installed and
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
    """
    binary = promtool_path()
    if binary is None:
        raise FileNotFoundError("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(
        [binary, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


Exposition = str | Callable[[int], str]


class StaticExporter:
    """A loopback HTTP server answering scrapes with exposition text, in a background thread.

    ``pages`` maps a path (``/metrics``) to text, or to a callable taking the 1-based number of
    the request to that path and returning text (e.g. counters that grow per scrape). Content
    type is the Prometheus text format 0.0.4. Use as a context manager; ``address`` is
    ``127.0.0.1:<port>`` (a free port).
    """

    CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, pages: Mapping[str, Exposition]) -> None:
        self._pages = dict(pages)
        self._counts: dict[str, int] = dict.fromkeys(self._pages, 0)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port`` to put in a scrape config."""
        if self._server is None:
            raise RuntimeError("exporter not started")
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def scrapes(self, path: str) -> int:
        """How many times ``path`` has been requested."""
        with self._lock:
            return self._counts.get(path, 0)

    def _render(self, path: str) -> bytes | None:
        page = self._pages.get(path)
        if page is None:
            return None
        with self._lock:
            self._counts[path] += 1
            count = self._counts[path]
        return (page(count) if callable(page) else page).encode()

    def __enter__(self) -> StaticExporter:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter._render(self.path.split("?", 1)[0])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", StaticExporter.CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


@dataclass
class PrometheusServer:
    """A running Prometheus; ``base_url`` is ``http://127.0.0.1:<port>``.

    Created by :func:`run_prometheus`. Query methods raise :class:`PromQueryError` when
    Prometheus answers ``status: error`` and ``httpx.HTTPError`` on transport errors.
    """

    base_url: str
    workdir: Path
    client: httpx.AsyncClient
    process: asyncio.subprocess.Process

    def log(self) -> str:
        """The server's log so far (stdout and stderr)."""
        return _read(self.workdir / "prometheus.log")

    async def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raises PrometheusError on error."""
        response = await self.client.get(f"/api/v1/{path}", params=dict(params or {}))
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Evaluate ``expr`` as an instant query (now, or ``at`` in Unix seconds).

        Returns the result list: for a vector, ``[{"metric": {...}, "value": [ts, "v"]}, ...]``;
        a scalar or string result becomes ``[{"metric": {}, "value": [ts, "v"]}]``.
        Raises :class:`PromQueryError` when Prometheus rejects the query.
        """
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        response = await self.client.get("/api/v1/query", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PromQueryError(expr, f"{body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def wait_for(self, expr: str, within: float = 30.0,
                       interval: float = 0.2) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty result; raises TimeoutError after
        ``within`` seconds (with the server log tail)."""
        deadline = time.monotonic() + within
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = await self.query(expr)
            if result:
                return result
            await asyncio.sleep(interval)
        raise TimeoutError(f"{expr} stayed empty for {within} s\n{self.log()[-2000:]}")

    async def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (``/api/v1/targets``)."""
        data = await self.api("targets", {"state": "active"})
        targets: list[dict[str, Any]] = data["activeTargets"]
        return targets

    async def wait_targets_up(self, jobs: Sequence[str], within: float = 30.0) -> None:
        """Wait until every target of each job in ``jobs`` reports health ``up``; raises
        TimeoutError after ``within`` seconds."""
        deadline = time.monotonic() + within
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = await self.targets()
            up = {t["labels"].get("job") for t in last if t.get("health") == "up"}
            down = [t for t in last if t["labels"].get("job") in jobs and t.get("health") != "up"]
            if set(jobs) <= up and not down:
                return
            await asyncio.sleep(0.2)
        states = [(t["labels"].get("job"), t.get("health"), t.get("lastError")) for t in last]
        raise TimeoutError(f"targets not up after {within} s: {states}")

    async def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups with each rule's ``health``, ``lastError`` and ``state``."""
        data = await self.api("rules")
        groups: list[dict[str, Any]] = data["groups"]
        return groups

    async def wait_rules_evaluated(self, within: float = 30.0) -> list[dict[str, Any]]:
        """Wait until rules are loaded and each was evaluated at least once; returns the
        rules (flattened over groups). Raises TimeoutError after ``within`` seconds."""
        never = "0001-01-01T00:00:00Z"
        deadline = time.monotonic() + within
        loaded: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            loaded = [rule for group in await self.rule_groups() for rule in group["rules"]]
            if loaded and all(r.get("lastEvaluation", never) != never for r in loaded):
                return loaded
            await asyncio.sleep(0.2)
        raise TimeoutError(f"rules not evaluated after {within} s: {loaded}")


@contextlib.asynccontextmanager
async def run_prometheus(
    workdir: Path,
    scrape_configs: Sequence[Mapping[str, Any]],
    rule_files: Sequence[Path] = (),
    *,
    interval: str = "1s",
    within: float = 30.0,
) -> AsyncIterator[PrometheusServer]:
    """Start ``prometheus`` on a free 127.0.0.1 port with its TSDB in ``workdir``.

    ``scrape_configs`` are Prometheus ``scrape_configs`` entries; ``rule_files`` are loaded
    (absolute paths); ``interval`` is both the scrape and the rule evaluation interval. Yields
    once ``/-/ready`` answers 200; raises :class:`PrometheusError` (with the log) when the server
    exits or is not ready within ``within`` seconds, and ``FileNotFoundError`` when prometheus
    is not installed. On exit the server gets SIGTERM, then SIGKILL after 10 s.
    """
    binary = prometheus_path()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (apt-get install prometheus)")
    config_file = write_prometheus_config(workdir, scrape_configs, rule_files, interval)
    log_path = workdir / "prometheus.log"
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = free_port()
        log_start = len(_read(log_path))
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=info",
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        base_url = f"http://127.0.0.1:{port}"
        client = httpx.AsyncClient(base_url=base_url, timeout=5.0)
        server = PrometheusServer(base_url, workdir, client, process)
        try:
            if await _wait_ready(server, within):
                yield server
                return
        finally:
            await client.aclose()
            await _stop(process)
        if "address already in use" not in server.log()[log_start:]:
            raise PrometheusError(f"prometheus exited with {process.returncode}:\n{server.log()}")
    raise PrometheusError(f"prometheus could not bind a free port:\n{_read(log_path)}")


def write_prometheus_config(workdir: Path, scrape_configs: Sequence[Mapping[str, Any]],
                            rule_files: Sequence[Path], interval: str) -> Path:
    """Write ``workdir/prometheus.yml`` (global intervals, absolute rule files, scrape
    configs) and return its path; creates ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [dict(c) for c in scrape_configs],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return config_file


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _wait_ready(server: PrometheusServer, within: float) -> bool:
    """True once ``/-/ready`` answers 200; False if the process exited first."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.process.returncode is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if (await server.client.get("/-/ready")).status_code == 200:
                return True
        await asyncio.sleep(0.1)
    raise PrometheusError(f"prometheus not ready after {within} s:\n{server.log()[-4000:]}")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
