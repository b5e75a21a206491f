"""Prometheus alert rules: promtool checks and unit tests, runbooks, and a real Prometheus.

The live tests start ``prometheus`` on loopback with the rule file loaded and two scrape jobs on a
:class:`~tests.ops.promql.StaticExporter`: ``realtime-gateway`` (every CONTRACT §6 family, the
proposed per-tenant limit gauges, the process collector) and ``kube-state-metrics``. Every
dashboard query must return data, every alert expression must evaluate (and stay quiet on this
healthy sample), and every selector of every alert must match a series.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from tests.ops import promql

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "charts" / "realtime-gateway" / "files"
RULES = FILES / "realtime-gateway-rules.yaml"
RULE_TESTS = FILES / "realtime-gateway-rules.test.yaml"
RUNBOOKS = ROOT / "docs" / "alerts.md"
DASHBOARD = ROOT / "charts" / "realtime-gateway" / "dashboards" / "realtime-gateway.json"
RUNBOOK_BASE = "https://github.com/realtime-gateway/realtime-gateway/blob/main/docs/alerts.md"
JOB_SELECTOR = ("=~", ".*realtime-gateway.*")
NAMESPACE = "ops-test"

requires_promtool = pytest.mark.skipif(
    promql.promtool_path() is None,
    reason="promtool not installed (apt-get install prometheus)",
)
requires_prometheus = pytest.mark.skipif(
    promql.prometheus_path() is None,
    reason="prometheus server not installed (apt-get install prometheus)",
)


def rules() -> list[promql.AlertingRule]:
    return promql.alerting_rules(RULES)


# ----------------------------------------------------------------------------- static checks


def test_expected_alerts_are_defined() -> None:
    names = [r.alert for r in rules()]
    assert len(names) == len(set(names))
    assert set(names) == {
        "RealtimeGatewayNoReadyReplica",
        "RealtimeGatewayUpstreamErrorRatio",
        "RealtimeGatewayUpstreamAuthFailures",
        "RealtimeGatewayAuthFailureSpike",
        "RealtimeGatewayLimiterErrors",
        "RealtimeGatewayTenantNearSessionCap",
        "RealtimeGatewayTenantTokenBudgetExhausted",
        "RealtimeGatewayJWKSRefreshFailing",
        "RealtimeGatewayStuckDraining",
        "RealtimeGatewayWorkerRestarts",
    }


def test_every_alert_has_for_severity_and_annotations() -> None:
    for rule in rules():
        assert rule.duration and re.fullmatch(r"\d+[smh]", rule.duration), rule.alert
        assert rule.labels.get("severity") in {"critical", "warning", "info"}, rule.alert
        for key in ("summary", "description", "runbook_url"):
            assert rule.annotations.get(key, "").strip(), (rule.alert, key)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_runbook_urls_point_at_existing_sections() -> None:
    text = RUNBOOKS.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    anchors = {github_anchor(h): h for h in headings}
    for rule in rules():
        url = rule.annotations["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_BASE, rule.alert
        assert anchors.get(anchor) == rule.alert, (rule.alert, anchor)
        section = text.split(f"## {rule.alert}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("Meaning", "Likely causes", "How to check", "What to do"):
            assert f"**{part}" in section, (rule.alert, part)


def test_alert_expressions_parse_and_select_known_metrics() -> None:
    allowed = promql.contract_metric_names() | promql.STANDARD_METRICS
    for rule in rules():
        selectors = promql.vector_selectors(rule.expr)
        assert selectors, rule.alert
        for selector in selectors:
            name = promql.selector_name(selector)
            assert name in allowed, (rule.alert, name)
            labels = promql.selector_labels(selector)
            if name is not None and name.startswith("kube_"):
                assert labels.get("deployment") == JOB_SELECTOR, rule.alert
            else:
                assert labels.get("job") == JOB_SELECTOR, (rule.alert, name)


@requires_promtool
def test_promtool_check_rules() -> None:
    result = promql.run_promtool("check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@requires_promtool
def test_promtool_unit_tests_pass() -> None:
    result = promql.run_promtool("test", "rules", RULE_TESTS.name, cwd=FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@requires_promtool
def test_promtool_unit_tests_detect_a_broken_rule(tmp_path: Path) -> None:
    # The same unit tests against rules whose thresholds no longer hold must fail.
    broken = RULES.read_text(encoding="utf-8").replace("> 0.05", "> 0.5")
    (tmp_path / RULES.name).write_text(broken, encoding="utf-8")
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text(encoding="utf-8"))
    result = promql.run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode == 1
    assert "RealtimeGatewayUpstreamErrorRatio" in result.stdout + result.stderr


def test_unit_tests_fire_and_quiet_every_alert() -> None:
    suite = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert suite["rule_files"] == [RULES.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in suite["tests"]:
        expectations: dict[str, list[bool]] = {}
        for case in group.get("alert_rule_test", []):
            expectations.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
        for alert, fired in expectations.items():
            if any(fired):
                fires.add(alert)
            else:
                quiet.add(alert)  # a group where the alert never fires: a healthy series
    names = {r.alert for r in rules()}
    assert names - fires == set(), "alerts without a firing unit test"
    assert names - quiet == set(), "alerts without a quiet unit test"


# ----------------------------------------------------------------------------- live Prometheus


def histogram(name: str, labels: str, bounds: Iterable[str], count: int, total: float) -> list[str]:
    """Exposition lines of one histogram series with ``count`` observations spread evenly."""
    bounds = list(bounds)
    lines = []
    for index, bound in enumerate(bounds, start=1):
        cumulative = count if bound == "+Inf" else count * index // len(bounds)
        lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
    lines.append(f"{name}_sum{{{labels}}} {total}")
    lines.append(f"{name}_count{{{labels}}} {count}")
    return [line.replace("{,", "{") for line in lines]


def gateway_exposition(scrape: int) -> str:
    """A healthy gateway at its ``scrape``-th scrape: traffic counters grow with each scrape,
    error counters stay flat, so every rate exists and no alert condition holds."""
    p = promql.PREFIX
    n = scrape
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
        out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

    family(f"{p}sessions_active", "gauge", "Live sessions.", [
        f'{p}sessions_active{{tenant="acme",model="gpt-realtime-2",upstream="openai",'
        f'transport="websocket"}} 12',
        f'{p}sessions_active{{tenant="acme",model="gpt-realtime-2",upstream="openai",'
        f'transport="webrtc"}} 2',
        f'{p}sessions_active{{tenant="globex",model="gpt-realtime-azure",'
        f'upstream="azure-eastus",transport="websocket"}} 3',
    ])
    family(f"{p}call_hangups_total", "counter", "Ended WebRTC calls by cause.", [
        f'{p}call_hangups_total{{tenant="acme",cause="client_hangup"}} {n}',
        f'{p}call_hangups_total{{tenant="acme",cause="token_expired"}} 1',
    ])
    family(f"{p}protocol_sessions_active", "gauge", "Live sessions by client protocol.", [
        f'{p}protocol_sessions_active{{protocol="ga"}} 14',
        f'{p}protocol_sessions_active{{protocol="beta"}} 1',
    ])
    family(f"{p}protocol_sessions_total", "counter", "Sessions by client protocol.", [
        f'{p}protocol_sessions_total{{protocol="ga"}} {2 * n}',
        f'{p}protocol_sessions_total{{protocol="beta"}} {n}',
    ])
    outcomes = ["ok", "token_expired", "rate_limited", "session_expired", "shutting_down",
                "upstream_error"]
    family(f"{p}sessions_total", "counter", "Ended sessions by outcome.", [
        f'{p}sessions_total{{tenant="acme",model="gpt-realtime-2",upstream="openai",'
        f'outcome="{o}"}} {2 * n if o == "ok" else 1}'
        for o in outcomes
    ])
    codes = ["invalid_request", "invalid_token", "insufficient_scope", "forbidden",
             "rate_limited", "upstream_error", "upstream_timeout", "unavailable"]
    family(f"{p}session_rejections_total", "counter", "Refused handshakes by code.", [
        *(f'{p}session_rejections_total{{tenant="acme",code="{c}"}} 1' for c in codes),
        f'{p}session_rejections_total{{tenant="unknown",code="invalid_token"}} 4',
    ])
    family(f"{p}session_duration_seconds", "histogram", "Ended session length.", histogram(
        f"{p}session_duration_seconds", 'tenant="acme",model="gpt-realtime-2"',
        ["1", "10", "60", "300", "900", "1800", "3600", "+Inf"], 2 * n, 120.0 * n,
    ))
    phases = ["auth", "admission", "upstream_connect", "total"]
    family(f"{p}handshake_duration_seconds", "histogram", "Handshake phase latency.", [
        line
        for phase in phases
        for line in histogram(
            f"{p}handshake_duration_seconds", f'phase="{phase}"',
            ["0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"], 3 * n, 0.4 * n,
        )
    ])
    directions = ["client_to_upstream", "upstream_to_client"]
    family(f"{p}messages_total", "counter", "Relayed messages.", [
        f'{p}messages_total{{direction="{d}"}} {50 * n}' for d in directions
    ])
    family(f"{p}message_bytes_total", "counter", "Relayed payload bytes.", [
        f'{p}message_bytes_total{{direction="{d}"}} {40000 * n}' for d in directions
    ])
    closes = [("client", "1000", 2 * n), ("upstream", "1000", n), ("gateway", "1012", 1),
              ("gateway", "4401", 1), ("gateway", "1011", 1)]
    family(f"{p}closes_total", "counter", "WebSocket closes.", [
        f'{p}closes_total{{initiator="{i}",code="{c}"}} {v}' for i, c, v in closes
    ])
    kinds = ["input_text", "input_audio", "input_image", "input_cached", "output_text",
             "output_audio"]
    family(f"{p}tokens_total", "counter", "Tokens from usage events.", [
        f'{p}tokens_total{{tenant="acme",model="gpt-realtime-2",kind="{k}"}} {100 * n}'
        for k in kinds
    ])
    reasons = ["timeout", "connect", "status_401", "status_403", "status_429", "status_4xx",
               "status_5xx", "protocol"]
    family(f"{p}upstream_connect_errors_total", "counter", "Failed upstream dials.", [
        f'{p}upstream_connect_errors_total{{upstream="openai",reason="{r}"}} 2' for r in reasons
    ])
    operations = ["admit", "renew", "release", "charge", "ping"]
    family(f"{p}limiter_errors_total", "counter", "Failed limiter calls.", [
        f'{p}limiter_errors_total{{operation="{o}"}} 0' for o in operations
    ])
    family(f"{p}jwks_refreshes_total", "counter", "JWKS fetches.", [
        f'{p}jwks_refreshes_total{{tenant="acme",result="success"}} 3',
        f'{p}jwks_refreshes_total{{tenant="acme",result="failure"}} 1',
    ])
    family(f"{p}draining", "gauge", "1 while draining.", [f"{p}draining 0"])
    family(f"{p}build_info", "gauge", "Build.", [f'{p}build_info{{version="0.1.0"}} 1'])
    family(f"{p}tenant_max_sessions", "gauge", "limits.max_sessions.", [
        f'{p}tenant_max_sessions{{tenant="acme"}} 200',
        f'{p}tenant_max_sessions{{tenant="globex"}} 50',
    ])
    family(f"{p}tenant_tokens_per_minute", "gauge", "limits.tokens_per_minute.", [
        f'{p}tenant_tokens_per_minute{{tenant="acme"}} 400000',
        f'{p}tenant_tokens_per_minute{{tenant="globex"}} 100000',
    ])
    family(f"{p}worker_restarts_total", "counter", "Worker restarts (serve --workers).",
           [f"{p}worker_restarts_total 1"])
    family("process_cpu_seconds_total", "counter", "CPU seconds.",
           [f"process_cpu_seconds_total {0.5 * n}"])
    family("process_resident_memory_bytes", "gauge", "RSS.",
           ["process_resident_memory_bytes 1.5e+08"])
    family("process_open_fds", "gauge", "Open fds.", ["process_open_fds 42"])
    family("process_max_fds", "gauge", "Max fds.", ["process_max_fds 1.048576e+06"])
    return "\n".join(out) + "\n"


KSM_EXPOSITION = "\n".join([
    "# HELP kube_deployment_status_replicas_available Available replicas.",
    "# TYPE kube_deployment_status_replicas_available gauge",
    f'kube_deployment_status_replicas_available{{namespace="{NAMESPACE}",'
    'deployment="ops-realtime-gateway"} 2',
    "# HELP kube_deployment_spec_replicas Desired replicas.",
    "# TYPE kube_deployment_spec_replicas gauge",
    f'kube_deployment_spec_replicas{{namespace="{NAMESPACE}",'
    'deployment="ops-realtime-gateway"} 2',
]) + "\n"


@requires_promtool
def test_sample_exposition_is_valid() -> None:
    for text in (gateway_exposition(3), KSM_EXPOSITION):
        result = promql.run_promtool("check", "metrics", stdin=text)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def prometheus(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[promql.PrometheusServer]:
    if promql.prometheus_path() is None:
        pytest.skip("prometheus server not installed (apt-get install prometheus)")
    pages: dict[str, promql.Exposition] = {"/metrics": gateway_exposition, "/ksm": KSM_EXPOSITION}
    with promql.StaticExporter(pages) as exporter:
        scrape_configs: list[dict[str, Any]] = [
            {
                "job_name": "realtime-gateway",
                "static_configs": [{
                    "targets": [exporter.address],
                    "labels": {"namespace": NAMESPACE, "pod": "ops-realtime-gateway-0"},
                }],
            },
            {
                "job_name": "kube-state-metrics",
                "metrics_path": "/ksm",
                "honor_labels": True,
                "static_configs": [{"targets": [exporter.address]}],
            },
        ]
        workdir = tmp_path_factory.mktemp("prometheus")
        async with promql.run_prometheus(workdir, scrape_configs, [RULES]) as server:
            await server.wait_targets_up(["realtime-gateway", "kube-state-metrics"])
            # rate() needs two samples in its window; wait for three scrapes.
            await server.wait_for('count_over_time(up{job="realtime-gateway"}[1m]) >= 3')
            yield server


@requires_prometheus
@pytest.mark.asyncio(loop_scope="module")
async def test_live_rules_load_and_evaluate_healthily(
    prometheus: promql.PrometheusServer,
) -> None:
    loaded = await prometheus.wait_rules_evaluated()
    assert {r["name"] for r in loaded} == {r.alert for r in rules()}
    for rule in loaded:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert rule["state"] == "inactive", (rule["name"], rule.get("alerts"))


@requires_prometheus
@pytest.mark.asyncio(loop_scope="module")
async def test_live_every_dashboard_query_returns_data(
    prometheus: promql.PrometheusServer,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    failures = []
    for query in promql.dashboard_queries(dashboard):
        expr = promql.grafana_to_promql(query.expr, {"namespace": NAMESPACE})
        try:
            result = await prometheus.query(expr)
        except promql.PromQueryError as error:
            failures.append(f"{query.panel_title} {query.ref_id}: {error.error}")
            continue
        if not result:
            failures.append(f"{query.panel_title} {query.ref_id}: no data for {expr}")
    assert failures == []


@requires_prometheus
@pytest.mark.asyncio(loop_scope="module")
async def test_live_every_alert_expression_evaluates_and_stays_quiet(
    prometheus: promql.PrometheusServer,
) -> None:
    for rule in rules():
        result = await prometheus.query(rule.expr)  # raises PromQueryError on a bad expression
        assert result == [], (rule.alert, result)


@requires_prometheus
@pytest.mark.asyncio(loop_scope="module")
async def test_live_every_alert_selector_matches_a_series(
    prometheus: promql.PrometheusServer,
) -> None:
    missing = []
    for rule in rules():
        for selector in promql.vector_selectors(rule.expr):
            instant = promql.instant_selector(selector)
            if not await prometheus.query(instant):
                missing.append(f"{rule.alert}: {instant}")
    assert missing == []


@requires_prometheus
@pytest.mark.asyncio(loop_scope="module")
async def test_live_query_errors_are_reported(prometheus: promql.PrometheusServer) -> None:
    with pytest.raises(promql.PromQueryError, match="bad_data"):
        await prometheus.query("sum(rate(up[1m])")
