"""Build the realtime-gateway Grafana dashboard (dashboard as code).

Writes ``charts/realtime-gateway/dashboards/realtime-gateway.json``, which the Helm chart ships
as a ConfigMap for the Grafana sidecar. Built with grafana-foundation-sdk **0.0.21** exactly
(Grafana dashboard JSON model, ``schemaVersion`` 42); another SDK version changes the output, so
the drift test in ``tests/ops/test_dashboard.py`` fails until the JSON is rebuilt.

Usage::

    python scripts/build_dashboard.py            # (re)write the committed JSON
    python scripts/build_dashboard.py --check    # exit 1 when the committed JSON is stale
    python scripts/build_dashboard.py --stdout   # print the JSON

Every query selects the gateway's scrape job (``job=~".*realtime-gateway.*"``, as the alert rules
do) and the ``$namespace`` variable; tenant-labelled metrics also take ``$tenant`` and, where
labelled, ``$model``. Metric names are those of CONTRACT §6 (prefix ``realtime_gateway_``), plus
``realtime_gateway_tenant_max_sessions`` and ``realtime_gateway_tenant_tokens_per_minute``
(per-tenant limits as gauges), ``realtime_gateway_protocol_sessions_active{protocol}`` (beta
clients still in use) and the process collector's ``process_*``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grafana_foundation_sdk.builders.dashboard import Dashboard

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT = REPO_ROOT / "charts" / "realtime-gateway" / "dashboards" / "realtime-gateway.json"

UID = "realtime-gateway"
TITLE = "Realtime Gateway"
JOB_MATCHER = 'job=~".*realtime-gateway.*"'
PREFIX = "realtime_gateway_"
RATE = "$__rate_interval"

# Label matchers by scope: every query, tenant-labelled metrics, tenant+model-labelled metrics.
BASE = f'namespace=~"$namespace", {JOB_MATCHER}'
TENANT = f'{BASE}, tenant=~"$tenant"'
TENANT_MODEL = f'{TENANT}, model=~"$model"'


def sel(metric: str, matchers: str, extra: str = "") -> str:
    """Return a PromQL vector selector ``metric{matchers, extra}``.

    ``metric`` without the ``realtime_gateway_`` prefix gets it, except the standard families
    (``up``, ``process_*``). ``matchers`` is one of BASE / TENANT / TENANT_MODEL; ``extra`` adds
    matchers such as ``phase="total"``.
    """
    name = metric if metric == "up" or metric.startswith("process_") else PREFIX + metric
    body = f"{matchers}, {extra}" if extra else matchers
    return f"{name}{{{body}}}"


def rate(metric: str, matchers: str, extra: str = "") -> str:
    """Return ``rate(<selector>[$__rate_interval])`` (per second) for a counter."""
    return f"rate({sel(metric, matchers, extra)}[{RATE}])"


def quantile(q: float, by: str, metric: str, matchers: str, extra: str = "") -> str:
    """Return ``histogram_quantile`` of histogram ``metric`` (no ``_bucket``) grouped by ``by``."""
    group = f"le, {by}" if by else "le"
    buckets = rate(metric + "_bucket", matchers, extra)
    return f"histogram_quantile({q}, sum by ({group}) ({buckets}))"


@dataclass(frozen=True)
class Query:
    """One Prometheus target: PromQL ``expr`` and Grafana ``legend`` format."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    """One panel: ``kind`` is ``timeseries`` or ``stat``; ``width``/``height`` in grid units
    (24 columns across); ``unit`` is a Grafana unit id."""

    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    stacked: bool = False


@dataclass(frozen=True)
class RowSpec:
    """A dashboard row and the panels laid out under it."""

    title: str
    panels: tuple[PanelSpec, ...] = field(default_factory=tuple)


def _q(expr: str, legend: str = "") -> Query:
    return Query(expr=expr, legend=legend)


def panel_specs() -> tuple[RowSpec, ...]:
    """Return the dashboard layout: rows of panels with their queries.

    Rates are per second unless the title says otherwise; latencies in seconds.
    """
    phase_total = 'phase="total"'
    rate_limited_code = 'code="rate_limited"'
    rate_limited_outcome = 'outcome="rate_limited"'
    auth_codes = 'code=~"invalid_request|invalid_token|insufficient_scope|forbidden"'
    established = f"sum({rate('handshake_duration_seconds_count', BASE, phase_total)})"
    dial_attempts = rate("handshake_duration_seconds_count", BASE, 'phase="upstream_connect"')
    overview = RowSpec(
        "Overview",
        (
            PanelSpec(
                "Active sessions",
                "short",
                (_q(f"sum({sel('sessions_active', TENANT_MODEL)})", "active"),),
                "Live sessions of the selected tenants and models, all replicas.",
                kind="stat",
                width=4,
                height=4,
            ),
            PanelSpec(
                "Sessions established",
                "ops",
                (_q(established, "established"),),
                "Handshakes answered with 101 per second (handshake phase total).",
                kind="stat",
                width=4,
                height=4,
            ),
            PanelSpec(
                "Rejections",
                "ops",
                (_q(f"sum({rate('session_rejections_total', TENANT)})", "rejected"),),
                "Handshakes refused per second, any code (CONTRACT §5).",
                kind="stat",
                width=4,
                height=4,
            ),
            PanelSpec(
                "Handshake p95",
                "s",
                (_q(quantile(0.95, "", "handshake_duration_seconds", BASE, phase_total), "p95"),),
                "95th percentile of the whole handshake, upgrade request to 101.",
                kind="stat",
                width=4,
                height=4,
            ),
            PanelSpec(
                "Serving replicas",
                "short",
                (_q(f"count({sel('draining', BASE)} == 0) or vector(0)", "serving"),),
                "Replicas scraped and not draining.",
                kind="stat",
                width=4,
                height=4,
            ),
            PanelSpec(
                "Versions",
                "short",
                (_q(f"count by (version) ({sel('build_info', BASE)})", "{{version}}"),),
                "Replicas per gateway version (realtime_gateway_build_info).",
                kind="stat",
                width=4,
                height=4,
            ),
        ),
    )
    sessions = RowSpec(
        "Sessions",
        (
            PanelSpec(
                "Active sessions by tenant",
                "short",
                (_q(f"sum by (tenant) ({sel('sessions_active', TENANT_MODEL)})", "{{tenant}}"),),
                "Live sessions per tenant, all replicas.",
                stacked=True,
            ),
            PanelSpec(
                "Active sessions by model and upstream",
                "short",
                (
                    _q(
                        f"sum by (model, upstream) ({sel('sessions_active', TENANT_MODEL)})",
                        "{{model}} via {{upstream}}",
                    ),
                ),
                "Live sessions per model and upstream, all replicas.",
                stacked=True,
            ),
            PanelSpec(
                "Active sessions by client protocol",
                "short",
                (
                    _q(
                        f"sum by (protocol) ({sel('protocol_sessions_active', BASE)})",
                        "{{protocol}}",
                    ),
                ),
                "Live sessions per client protocol, all replicas: ga (verbatim relay) or beta "
                "(older clients, translated to GA; CONTRACT §10). Not per tenant.",
                stacked=True,
            ),
            PanelSpec(
                "Session starts and rejections by code",
                "ops",
                (
                    _q(established, "established"),
                    _q(
                        f"sum by (code) ({rate('session_rejections_total', TENANT)})",
                        "rejected: {{code}}",
                    ),
                ),
                "Sessions established per second, and handshakes refused per second by error "
                "code (tenant 'unknown' before a tenant is known).",
            ),
            PanelSpec(
                "Session ends by outcome",
                "ops",
                (
                    _q(
                        f"sum by (outcome) ({rate('sessions_total', TENANT_MODEL)})",
                        "{{outcome}}",
                    ),
                ),
                "Established sessions ending per second: ok, or the in-session cause.",
            ),
            PanelSpec(
                "Session duration p50 / p95 / p99",
                "s",
                tuple(
                    _q(quantile(q, "", "session_duration_seconds", TENANT_MODEL), f"p{p}")
                    for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))
                ),
                "Length of ended sessions.",
            ),
            PanelSpec(
                "Sessions vs tenant cap",
                "percentunit",
                (
                    _q(
                        f"sum by (tenant) ({sel('sessions_active', TENANT)})"
                        f" / on (tenant) max by (tenant) ({sel('tenant_max_sessions', TENANT)})",
                        "{{tenant}}",
                    ),
                ),
                "Live sessions of each tenant as a share of its limits.max_sessions.",
            ),
            PanelSpec(
                "Active sessions by transport",
                "short",
                (
                    _q(
                        f"sum by (transport) ({sel('sessions_active', TENANT_MODEL)})",
                        "{{transport}}",
                    ),
                ),
                "Live WebSocket sessions beside live WebRTC calls (POST /v1/realtime/calls; "
                "their media flows browser to upstream, the gateway holds the sideband).",
                stacked=True,
            ),
            PanelSpec(
                "Call hang-ups by cause",
                "ops",
                (
                    _q(
                        f"sum by (cause) ({rate('call_hangups_total', TENANT)})",
                        "{{cause}}",
                    ),
                ),
                "WebRTC calls ending per second by cause: the caller's hang-up, the upstream, "
                "or the gateway (token expiry, budget, max_session_seconds, drain, sideband "
                "unavailable or lost, forbidden model).",
            ),
        ),
    )
    upstream = RowSpec(
        "Handshake and upstream",
        (
            PanelSpec(
                "Handshake latency p50 / p95 / p99 by phase",
                "s",
                tuple(
                    _q(
                        quantile(q, "phase", "handshake_duration_seconds", BASE),
                        f"p{p} {{{{phase}}}}",
                    )
                    for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))
                ),
                "Phases: auth, admission, upstream_connect, total.",
                width=24,
            ),
            PanelSpec(
                "Upstream connect errors by upstream and reason",
                "ops",
                (
                    _q(
                        f"sum by (upstream, reason) "
                        f"({rate('upstream_connect_errors_total', BASE)})",
                        "{{upstream}} {{reason}}",
                    ),
                ),
                "Failed upstream dials per second.",
                stacked=True,
            ),
            PanelSpec(
                "Upstream dial failure ratio",
                "percentunit",
                (
                    _q(
                        f"sum({rate('upstream_connect_errors_total', BASE)})"
                        f" / sum({dial_attempts})",
                        "failed / dials",
                    ),
                ),
                "Failed upstream dials per upstream dial (alert at 5%).",
            ),
        ),
    )
    traffic = RowSpec(
        "Traffic",
        (
            PanelSpec(
                "Messages per second by direction",
                "ops",
                (
                    _q(
                        f"sum by (direction) ({rate('messages_total', BASE)})",
                        "{{direction}}",
                    ),
                ),
                "WebSocket messages relayed per second.",
                width=8,
            ),
            PanelSpec(
                "Bytes per second by direction",
                "Bps",
                (
                    _q(
                        f"sum by (direction) ({rate('message_bytes_total', BASE)})",
                        "{{direction}}",
                    ),
                ),
                "WebSocket payload bytes relayed per second.",
                width=8,
            ),
            PanelSpec(
                "Closes by initiator and code",
                "ops",
                (
                    _q(
                        f"sum by (initiator, code) ({rate('closes_total', BASE)})",
                        "{{initiator}} {{code}}",
                    ),
                ),
                "WebSocket closes per second by who closed and the close code.",
                width=8,
                stacked=True,
            ),
        ),
    )
    tenancy = RowSpec(
        "Tenancy and cost",
        (
            PanelSpec(
                "Tokens per minute by tenant and kind",
                "cpm",
                (
                    _q(
                        f"sum by (tenant, kind) ({rate('tokens_total', TENANT_MODEL)}) * 60",
                        "{{tenant}} {{kind}}",
                    ),
                ),
                "Tokens per minute from the upstream's usage events.",
                stacked=True,
            ),
            PanelSpec(
                "Tokens per minute vs tenant budget",
                "percentunit",
                (
                    _q(
                        f"sum by (tenant) ({rate('tokens_total', TENANT)}) * 60"
                        f" / on (tenant) max by (tenant) "
                        f"({sel('tenant_tokens_per_minute', TENANT)})",
                        "{{tenant}}",
                    ),
                ),
                "Token use as a share of each tenant's limits.tokens_per_minute.",
            ),
            PanelSpec(
                "Rate limiting by tenant",
                "ops",
                (
                    _q(
                        f"sum by (tenant) "
                        f"({rate('session_rejections_total', TENANT, rate_limited_code)})",
                        "{{tenant}} refused",
                    ),
                    _q(
                        f"sum by (tenant) "
                        f"({rate('sessions_total', TENANT_MODEL, rate_limited_outcome)})",
                        "{{tenant}} closed (budget overdrawn)",
                    ),
                ),
                "Handshakes refused with rate_limited, and live sessions closed 4429.",
            ),
            PanelSpec(
                "Auth failures by tenant and code",
                "ops",
                (
                    _q(
                        f"sum by (tenant, code) "
                        f"({rate('session_rejections_total', TENANT, auth_codes)})",
                        "{{tenant}} {{code}}",
                    ),
                ),
                "Handshakes refused for credentials, scope or policy, per second.",
            ),
        ),
    )
    runtime = RowSpec(
        "Dependencies and runtime",
        (
            PanelSpec(
                "Limiter errors by operation",
                "ops",
                (
                    _q(
                        f"sum by (operation) ({rate('limiter_errors_total', BASE)})",
                        "{{operation}}",
                    ),
                ),
                "Failed limiter (Redis) calls per second.",
                width=8,
            ),
            PanelSpec(
                "JWKS refreshes by tenant and result",
                "ops",
                (
                    _q(
                        f"sum by (tenant, result) ({rate('jwks_refreshes_total', TENANT)})",
                        "{{tenant}} {{result}}",
                    ),
                ),
                "JWKS fetches per second.",
                width=8,
            ),
            PanelSpec(
                "Draining replicas",
                "short",
                (
                    _q(f"sum({sel('draining', BASE)})", "draining"),
                    _q(f"count({sel('draining', BASE)} == 0) or vector(0)", "serving"),
                ),
                "Replicas draining (SIGTERM received) and replicas serving.",
                width=8,
            ),
            PanelSpec(
                "Build versions",
                "short",
                (_q(f"count by (version) ({sel('build_info', BASE)})", "{{version}}"),),
                "Replicas per version; a rollout shows as one line handing over to another.",
                width=8,
                stacked=True,
            ),
            PanelSpec(
                "CPU by pod",
                "short",
                (
                    _q(
                        f"sum by (pod) ({rate('process_cpu_seconds_total', BASE)})",
                        "{{pod}}",
                    ),
                ),
                "CPU seconds per second (cores) of each gateway process.",
                width=8,
            ),
            PanelSpec(
                "Resident memory by pod",
                "bytes",
                (
                    _q(
                        f"sum by (pod) ({sel('process_resident_memory_bytes', BASE)})",
                        "{{pod}}",
                    ),
                ),
                "Resident set size of each gateway process.",
                width=8,
            ),
            PanelSpec(
                "Open file descriptors vs limit",
                "percentunit",
                (
                    _q(
                        f"max by (pod) ({sel('process_open_fds', BASE)}"
                        f" / {sel('process_max_fds', BASE)})",
                        "{{pod}}",
                    ),
                ),
                "Each WebSocket session holds two sockets (client and upstream).",
                width=8,
            ),
        ),
    )
    return (overview, sessions, upstream, traffic, tenancy, runtime)


def build_dashboard() -> Dashboard:
    """Return the dashboard builder (grafana-foundation-sdk 0.0.21, dashboard v1 model).

    Panel ids are assigned in layout order from 1, rows included, so they are unique and stable.
    """
    with warnings.catch_warnings():
        # The SDK's dashboard v1 module warns at import ("Prefer dashboardv2"); the v1 JSON model
        # is what the Grafana sidecar provisions, so the warning is expected.
        warnings.simplefilter("ignore", DeprecationWarning)
        from grafana_foundation_sdk.builders import common as common_builders
        from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
        from grafana_foundation_sdk.models import common as common_models
        from grafana_foundation_sdk.models import dashboard as dashboard_models

    datasource = common_models.DataSourceRef(type_val="prometheus", uid="${datasource}")

    def query_variable(name: str, label: str, query: str, multi: bool) -> dashboard.QueryVariable:
        variable = (
            dashboard.QueryVariable(name)
            .label(label)
            .query(query)
            .datasource(datasource)
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
        )
        if multi:
            variable = variable.multi(True).include_all(True).all_value(".*")
        return variable

    builder = (
        dashboard.Dashboard(TITLE)
        .uid(UID)
        .description(
            "Multi-tenant WebSocket gateway for the OpenAI Realtime API: sessions, handshakes, "
            "upstream, traffic, tenant limits and runtime. Alerts: docs/alerts.md."
        )
        .tags(["realtime-gateway", "websocket", "openai-realtime"])
        .editable()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            query_variable(
                "namespace",
                "Namespace",
                f"label_values({PREFIX}build_info{{{JOB_MATCHER}}}, namespace)",
                multi=False,
            )
        )
        .with_variable(
            query_variable(
                "tenant",
                "Tenant",
                f'label_values({{__name__=~"{PREFIX}sessions_active|'
                f'{PREFIX}session_rejections_total", namespace=~"$namespace"}}, tenant)',
                multi=True,
            )
        )
        .with_variable(
            query_variable(
                "model",
                "Model",
                f'label_values({PREFIX}sessions_active{{namespace=~"$namespace", '
                f'tenant=~"$tenant"}}, model)',
                multi=True,
            )
        )
    )

    next_id = 1
    for row in panel_specs():
        builder = builder.with_row(dashboard.Row(row.title).id(next_id))
        next_id += 1
        for spec in row.panels:
            targets = [
                prometheus.Dataquery()
                .datasource(datasource)
                .expr(q.expr)
                .legend_format(q.legend or "__auto")
                .ref_id(chr(ord("A") + index))
                for index, q in enumerate(spec.queries)
            ]
            panel: stat.Panel | timeseries.Panel
            if spec.kind == "stat":
                panel = (
                    stat.Panel()
                    .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
                    .graph_mode(common_models.BigValueGraphMode.AREA)
                    .text_mode(
                        common_models.BigValueTextMode.VALUE_AND_NAME
                        if spec.title == "Versions"
                        else common_models.BigValueTextMode.AUTO
                    )
                )
            else:
                panel = (
                    timeseries.Panel()
                    .legend(
                        common_builders.VizLegendOptions()
                        .show_legend(True)
                        .display_mode(common_models.LegendDisplayMode.LIST)
                        .placement(common_models.LegendPlacement.BOTTOM)
                        .calcs([])
                    )
                    .tooltip(
                        common_builders.VizTooltipOptions()
                        .mode(common_models.TooltipDisplayMode.MULTI)
                        .sort(common_models.SortOrder.DESCENDING)
                    )
                    .fill_opacity(20 if spec.stacked else 10)
                )
                if spec.stacked:
                    panel = panel.stacking(
                        common_builders.StackingConfig().mode(common_models.StackingMode.NORMAL)
                    )
            panel = (
                panel.id(next_id)
                .title(spec.title)
                .description(spec.description)
                .unit(spec.unit)
                .datasource(datasource)
                .targets(list(targets))
                .span(spec.width)
                .height(spec.height)
            )
            next_id += 1
            builder = builder.with_panel(panel)
    return builder


def render() -> str:
    """Return the dashboard as pretty JSON text (2-space indent, trailing newline)."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    data: Any = json.loads(json.dumps(build_dashboard().build(), cls=JSONEncoder))
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the process exit status (1 = stale with --check)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="fail when the committed JSON differs")
    group.add_argument("--stdout", action="store_true", help="print instead of writing")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="JSON file to write or check")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python scripts/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
