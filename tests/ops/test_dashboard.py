"""The Grafana dashboard: no drift from its builder, schema-valid, sound layout and queries.

The JSON schema is ``jsonschema/dashboard.jsonschema.json`` of grafana/grafana-foundation-sdk
(commit 5e6b0fa2c4d22d59fac8ce22753e509c62d206a0, vendored verbatim as
``dashboard.jsonschema.json``). That revision predates three VariableModel properties the SDK
0.0.21 emits (``includeAll``, ``allValue``: in other revisions of the same file;
``allowCustomValue``: in the SDK's own model); :func:`schema_with_sdk_0021_fields` adds exactly
those, everything else is checked as vendored.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.ops import promql

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "realtime-gateway" / "dashboards" / "realtime-gateway.json"
BUILDER = ROOT / "scripts" / "build_dashboard.py"
SCHEMA = Path(__file__).with_name("dashboard.jsonschema.json")

TENANT_METRICS = {
    f"{promql.PREFIX}{name}"
    for name in (
        "sessions_active",
        "sessions_total",
        "session_rejections_total",
        "tokens_total",
        "jwks_refreshes_total",
        "tenant_max_sessions",
        "tenant_tokens_per_minute",
    )
}
# Grafana units the panels may use (ids from grafana-data valueFormats/categories.ts).
KNOWN_UNITS = {"short", "ops", "cpm", "s", "percentunit", "Bps", "bytes"}

requires_sdk = pytest.mark.skipif(
    importlib.util.find_spec("grafana_foundation_sdk") is None,
    reason="grafana-foundation-sdk not installed (pip install -e '.[ops]')",
)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def visible_panels() -> list[dict[str, Any]]:
    return [p for p in promql.dashboard_panels(load_dashboard()) if p.get("type") != "row"]


def schema_with_sdk_0021_fields() -> dict[str, Any]:
    schema: dict[str, Any] = copy.deepcopy(json.loads(SCHEMA.read_text(encoding="utf-8")))
    properties = schema["definitions"]["VariableModel"]["properties"]
    for name, kind in (("includeAll", "boolean"), ("allValue", "string"),
                       ("allowCustomValue", "boolean")):
        assert name not in properties, f"vendored schema now has {name}: drop it from the overlay"
        properties[name] = {"type": kind}
    return schema


@requires_sdk
def test_committed_json_is_a_fresh_build() -> None:
    built = subprocess.run(
        [sys.executable, "-W", "error", str(BUILDER), "--stdout"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout == DASHBOARD.read_text(encoding="utf-8"), (
        "dashboard JSON is stale: run python scripts/build_dashboard.py"
    )


def test_vendored_schema_is_the_upstream_file() -> None:
    text = SCHEMA.read_text(encoding="utf-8")
    schema = json.loads(text)
    assert len(text) == 55659  # upstream file size in characters at the pinned commit
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["definitions"]["Dashboard"]["additionalProperties"] is False


def test_dashboard_passes_the_grafana_json_schema(tmp_path: Path) -> None:
    schema_file = tmp_path / "dashboard.schema.json"
    schema_file.write_text(json.dumps(schema_with_sdk_0021_fields()), encoding="utf-8")
    checker = Path(sys.executable).with_name("check-jsonschema")
    if not checker.exists():
        pytest.skip("check-jsonschema not installed (pip install -e '.[ops]')")
    result = subprocess.run(
        [str(checker), "--schemafile", str(schema_file), str(DASHBOARD)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_an_unknown_field(tmp_path: Path) -> None:
    schema_file = tmp_path / "dashboard.schema.json"
    schema_file.write_text(json.dumps(schema_with_sdk_0021_fields()), encoding="utf-8")
    broken = load_dashboard()
    broken["panels"][1]["gridPos"]["depth"] = 3
    broken_file = tmp_path / "broken.json"
    broken_file.write_text(json.dumps(broken), encoding="utf-8")
    checker = Path(sys.executable).with_name("check-jsonschema")
    if not checker.exists():
        pytest.skip("check-jsonschema not installed (pip install -e '.[ops]')")
    result = subprocess.run(
        [str(checker), "--schemafile", str(schema_file), str(broken_file)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1
    assert "depth" in result.stdout


def test_identity_and_settings() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "realtime-gateway"
    assert dashboard["title"] == "Realtime Gateway"
    assert dashboard["schemaVersion"] == 42
    assert "realtime-gateway" in dashboard["tags"]
    assert dashboard["time"] == {"from": "now-6h", "to": "now"}
    assert len(DASHBOARD.read_bytes()) < 512 * 1024  # far below the 1 MiB ConfigMap limit


def test_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "tenant", "model"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "tenant", "model"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
        assert match is not None, variable["query"]
        assert match.group(2) == name
        promql.parse(promql.grafana_to_promql(match.group(1)))
    for name in ("tenant", "model"):
        assert variables[name]["multi"] is True
        assert variables[name]["includeAll"] is True
        assert variables[name]["allValue"] == ".*"
    assert variables["namespace"].get("multi") is False


def test_panel_ids_are_unique() -> None:
    ids = [p.get("id") for p in promql.dashboard_panels(load_dashboard())]
    assert all(isinstance(i, int) and i > 0 for i in ids), ids
    assert len(ids) == len(set(ids))


def test_grid_positions_do_not_overlap() -> None:
    cells: dict[tuple[int, int], int] = {}
    for panel in promql.dashboard_panels(load_dashboard()):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"panels {other} and {panel['id']} overlap at {x},{y}"


def test_panels_have_units_and_the_datasource_variable() -> None:
    panels = visible_panels()
    assert len(panels) >= 25
    for panel in panels:
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit in KNOWN_UNITS, (panel["title"], unit)
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_targets_have_expr_and_unique_ref_ids() -> None:
    for panel in visible_panels():
        assert panel["targets"], panel["title"]
        ref_ids = [t.get("refId") for t in panel["targets"]]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t.get("expr") for t in panel["targets"]), panel["title"]


def test_brief_panels_present() -> None:
    titles = {p["title"] for p in visible_panels()}
    rows = [p["title"] for p in load_dashboard()["panels"] if p["type"] == "row"]
    assert rows[0] == "Overview"
    for title in (
        "Active sessions by tenant",
        "Session starts and rejections by code",
        "Handshake latency p50 / p95 / p99 by phase",
        "Upstream connect errors by upstream and reason",
        "Tokens per minute by tenant and kind",
        "Messages per second by direction",
        "Bytes per second by direction",
        "Closes by initiator and code",
        "Limiter errors by operation",
        "Draining replicas",
        "Build versions",
    ):
        assert title in titles


def test_every_expression_parses() -> None:
    queries = promql.dashboard_queries(load_dashboard())
    assert len(queries) >= 30
    for query in queries:
        expr = promql.grafana_to_promql(query.expr)
        assert "$" not in expr, query
        try:
            promql.parse(expr)
        except ValueError as error:
            pytest.fail(f"panel {query.panel_id} {query.panel_title!r} {query.ref_id}: {error}")


def test_grafana_substitution_and_parse_errors_are_caught() -> None:
    expr = 'rate(x{tenant=~"$tenant", ns=~"${namespace}"}[$__rate_interval])'
    assert promql.grafana_to_promql(expr, {"namespace": "prod"}) == (
        'rate(x{tenant=~".*", ns=~"prod"}[1m])'
    )
    with pytest.raises(ValueError, match="unexpected"):
        promql.parse("rate(x[$__rate_interval])")


def test_metrics_are_the_contract_ones() -> None:
    allowed = promql.contract_metric_names() | promql.STANDARD_METRICS
    used: set[str] = set()
    for query in promql.dashboard_queries(load_dashboard()):
        names = promql.metric_names(promql.grafana_to_promql(query.expr))
        assert names, query
        used |= names
    assert used <= allowed, used - allowed
    # Every CONTRACT §6 family is on the dashboard somewhere.
    families = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                for n in used}
    for family in promql.GATEWAY_METRICS:
        assert promql.PREFIX + family in families, family


def test_selectors_use_the_variables() -> None:
    for query in promql.dashboard_queries(load_dashboard()):
        for selector in promql.vector_selectors(query.expr.replace("$__rate_interval", "1m")):
            labels = promql.selector_labels(selector)
            where = f"panel {query.panel_id} {query.panel_title!r}"
            assert labels.get("namespace") == ("=~", "$namespace"), where
            assert labels.get("job") == ("=~", ".*realtime-gateway.*"), where
            if promql.selector_name(selector) in TENANT_METRICS:
                assert labels.get("tenant") == ("=~", "$tenant"), where
