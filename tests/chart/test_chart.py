"""The Helm chart ``charts/realtime-gateway``, rendered and linted offline.

Rendering and linting use helm-python-sdk (the Helm v4 Go SDK, no binary, no cluster); every
rendered manifest is validated strictly (unknown fields are errors) against the Kubernetes
1.30 and 1.34 OpenAPI schemas with kubernetes-validate; the prometheus-operator CRs with the
cloudcoil pydantic models; the Gateway API HTTPRoute by hand.  The rendered gateway config
must load with :func:`gateway.config.parse_config` using exactly the environment the
Deployment provides.  Each case runs for the default values and for every ``ci/*.yaml``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway import config as gateway_config
from gateway.cli import build_parser
from gateway.config import ConfigError, parse_config
from gateway.workers import parse_workers

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed (pip install -e '.[ops]')")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[ops]')")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "realtime-gateway"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RULES_FILE = CHART / "files" / "realtime-gateway-rules.yaml"
KUBE_VERSIONS = ("1.30.0", "1.34.0")
CRD_GROUPS = ("monitoring.coreos.com", "gateway.networking.k8s.io")
RELEASE = "rel"
NAMESPACE = "realtime"

Doc = dict[str, Any]
Values = dict[str, Any]
Renderer = Callable[..., list[Doc]]

VALUES_CASES = [pytest.param(None, id="default")] + [
    pytest.param(path, id=path.stem) for path in CI_VALUES
]


def load_values(path: Path | None) -> Values:
    """The values of one case: ``{}`` for the chart defaults, else the ci file's content."""
    if path is None:
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def render_chart(chart_dir: Path, values: Values) -> dict[str, str]:
    """Render ``chart_dir`` as an install of release ``rel`` in namespace ``realtime``.

    Returns ``{template path: text}``.  Raises ``helm_python.HelmError`` on a schema
    violation or a template ``fail``.
    """
    with helm.Chart.load(chart_dir) as chart:
        rendered: dict[str, str] = chart.render(
            values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return rendered


def manifests(rendered: dict[str, str]) -> list[Doc]:
    """Every non-empty YAML document of every template except NOTES.txt."""
    docs: list[Doc] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                assert isinstance(doc, dict), f"{path}: not a mapping"
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def render() -> Renderer:
    """``render(values_file_or_None, **overrides) -> [manifest]`` (cached per argument)."""
    cache: dict[str, list[Doc]] = {}

    def _render(path: Path | None, overrides: Values | None = None) -> list[Doc]:
        values = merge(load_values(path), overrides or {})
        key = json.dumps(values, sort_keys=True)
        if key not in cache:
            cache[key] = manifests(render_chart(CHART, values))
        return copy.deepcopy(cache[key])

    return _render


def merge(base: Values, override: Values) -> Values:
    """Deep merge as Helm does for ``-f`` files: maps merge, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    """The one manifest of ``kind`` (and ``metadata.name``); fails when there is not exactly one."""
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def gateway_deployment(docs: list[Doc]) -> Doc:
    """The gateway Deployment (not the trial Redis)."""
    found = [d for d in docs if d["kind"] == "Deployment"
             and d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    assert len(found) == 1
    return found[0]


def gateway_container(docs: list[Doc]) -> Doc:
    containers = gateway_deployment(docs)["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "gateway"]
    assert len(found) == 1
    container: Doc = found[0]
    return container


def gateway_service(docs: list[Doc]) -> Doc:
    found = [d for d in docs if d["kind"] == "Service"
             and d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
             and any(p["name"] == "http" for p in d["spec"]["ports"])]
    assert len(found) == 1
    return found[0]


def rendered_config(docs: list[Doc]) -> Doc:
    """The gateway config file carried by the ConfigMap the Deployment mounts."""
    volumes = gateway_deployment(docs)["spec"]["template"]["spec"]["volumes"]
    config_map = next(v["configMap"]["name"] for v in volumes if v["name"] == "config")
    data = find(docs, "ConfigMap", config_map)["data"]["config.yaml"]
    parsed = yaml.safe_load(data)
    assert isinstance(parsed, dict)
    return parsed


def secret_environ(docs: list[Doc]) -> dict[str, str]:
    """Fake values for the env vars the Deployment fills from a Secret (``secretKeyRef``)."""
    env = gateway_container(docs).get("env", [])
    return {e["name"]: f"test-{e['name'].lower()}" for e in env
            if "secretKeyRef" in e.get("valueFrom", {})}


def config_secret_names(config: Doc) -> set[str]:
    """Env var names the config reads secrets from (api_key_env, client_secret_env)."""
    names = {u["api_key_env"] for u in config["upstreams"].values()}
    for tenant in config["tenants"]:
        introspection = tenant["auth"].get("introspection")
        if introspection:
            names.add(introspection["client_secret_env"])
    return names


def port_number(container: Doc, name: str) -> int:
    ports = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    assert len(ports) == 1, name
    return int(ports[0])


# --- lint and schema validation ---------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_CASES)
def test_lint_strict(values_file: Path | None) -> None:
    values = load_values(values_file) or None
    for kube_version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE,
                           kube_version=f"v{kube_version}")
        problems = [m for m in report.get("messages") or [] if int(m["severity"]) >= 2]
        assert not problems, problems
        assert not report.get("errors"), report["errors"]


@pytest.mark.parametrize("values_file", VALUES_CASES)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_valid_for_kubernetes(
    render: Renderer, values_file: Path | None, kube_version: str
) -> None:
    docs = render(values_file)
    assert docs
    for doc in docs:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if group in CRD_GROUPS:
            continue  # test_custom_resources_valid
        problem = None  # reported outside the handler: the error's own text holds the schema
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problem = f"{doc['apiVersion']} does not exist in Kubernetes {kube_version}"
        except kubernetes_validate.ValidationError as exc:
            problem = (f"invalid for Kubernetes {kube_version}: {exc.message} at "
                       f"{'.'.join(str(p) for p in exc.absolute_path)}")
        if problem:
            pytest.fail(f"{where}: {problem}", pytrace=False)


@pytest.mark.parametrize("values_file", VALUES_CASES)
def test_custom_resources_valid(render: Renderer, values_file: Path | None) -> None:
    docs = render(values_file)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            check_prometheus_operator_resource(doc)
        elif doc["apiVersion"].startswith("gateway.networking.k8s.io/"):
            check_httproute(doc)


def check_prometheus_operator_resource(doc: Doc) -> None:
    """Validate with the cloudcoil models; a field they drop on round trip is an unknown field."""
    models = pytest.importorskip(
        "cloudcoil.models.prometheus_operator.v1",
        reason="cloudcoil-models-prometheus-operator is not installed")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    model = getattr(models, doc["kind"]).model_validate(doc)
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc, (
        f"{doc['kind']} has fields the prometheus-operator schema does not know")


DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def check_httproute(doc: Doc) -> None:
    """Structure of a Gateway API v1 HTTPRoute (standard channel fields only)."""
    assert doc["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert doc["kind"] == "HTTPRoute"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert DNS_SUBDOMAIN.match(doc["metadata"]["name"])
    spec = doc["spec"]
    assert set(spec) <= {"parentRefs", "hostnames", "rules"}
    assert 1 <= len(spec["parentRefs"]) <= 32
    for ref in spec["parentRefs"]:
        assert set(ref) <= {"group", "kind", "namespace", "name", "sectionName", "port"}
        assert ref["name"]
    for hostname in spec.get("hostnames", []):
        assert HOSTNAME.match(hostname), hostname
    assert 1 <= len(spec["rules"]) <= 16
    for rule in spec["rules"]:
        assert set(rule) <= {"name", "matches", "filters", "backendRefs", "timeouts",
                             "sessionPersistence", "retry"}
        for match in rule.get("matches", []):
            assert set(match) <= {"path", "headers", "queryParams", "method"}
            if "path" in match:
                assert match["path"]["type"] in {"Exact", "PathPrefix", "RegularExpression"}
                assert match["path"]["value"].startswith("/")
        assert rule["backendRefs"]
        for backend in rule["backendRefs"]:
            assert set(backend) <= {"group", "kind", "name", "namespace", "port", "weight",
                                    "filters"}
            assert isinstance(backend["port"], int)
            assert 1 <= backend["port"] <= 65535
        timeouts = rule.get("timeouts", {})
        assert set(timeouts) <= {"request", "backendRequest"}
        for value in timeouts.values():
            assert GATEWAY_DURATION.match(value), value


# --- the gateway config -----------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_CASES)
def test_config_loads_with_the_deployment_environment(
    render: Renderer, values_file: Path | None
) -> None:
    docs = render(values_file)
    config = rendered_config(docs)
    environ = secret_environ(docs)
    values = load_values(values_file)
    if values.get("existingSecret"):
        # The Deployment provides exactly the variables the config names, from the Secret.
        assert set(environ) == config_secret_names(config)
    else:
        assert environ == {}
        environ = {name: "test-key" for name in config_secret_names(config)}
    parsed = parse_config(config, environ)
    assert parsed.server.port == port_number(gateway_container(docs), "http")
    with pytest.raises(ConfigError):
        parse_config(config, {})  # the keys really come from the environment


@pytest.mark.parametrize("values_file", VALUES_CASES)
def test_check_config_cli_accepts_rendered_config(
    render: Renderer, values_file: Path | None, tmp_path: Path
) -> None:
    if importlib.util.find_spec("gateway.cli") is None:
        pytest.skip("gateway.cli does not exist yet")
    docs = render(values_file)
    config = rendered_config(docs)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    environ = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    environ.update({name: "test-key" for name in config_secret_names(config)})
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        env=environ, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**config, "unknown_key": 1}), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(broken)],
        env=environ, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1


@pytest.mark.parametrize("values_file", VALUES_CASES)
def test_ports_agree(render: Renderer, values_file: Path | None) -> None:
    docs = render(values_file)
    config = rendered_config(docs)
    container = gateway_container(docs)
    http, metrics = port_number(container, "http"), port_number(container, "metrics")
    assert config["server"]["port"] == http
    assert config["server"]["metrics_port"] == metrics
    assert http != metrics

    service = gateway_service(docs)
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["http"]["port"] == http
    assert service_ports["http"]["targetPort"] == "http"
    metrics_services = [d for d in docs if d["kind"] == "Service"
                        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
                        and any(p["name"] == "metrics" for p in d["spec"]["ports"])]
    assert len(metrics_services) == 1
    metrics_service = metrics_services[0]
    assert metrics_service["spec"].get("type", "ClusterIP") == "ClusterIP"
    metrics_port = next(p for p in metrics_service["spec"]["ports"] if p["name"] == "metrics")
    assert metrics_port["port"] == metrics
    assert metrics_port["targetPort"] == "metrics"

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "http"), probe
        tls = config["server"].get("tls_cert_file")
        assert get["scheme"] == ("HTTPS" if tls else "HTTP")

    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # Public routes reach the main port only.
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path_rule in rule["http"]["paths"]:
                backend = path_rule["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"] == {"name": "http"}
    for route in (d for d in docs if d["kind"] == "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            for backend in rule["backendRefs"]:
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"] == service_ports["http"]["port"] != metrics


@pytest.mark.parametrize("values_file", VALUES_CASES)
def test_grace_period_covers_prestop_and_drain(render: Renderer, values_file: Path | None) -> None:
    docs = render(values_file)
    pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    pre_stop = gateway_container(docs)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = rendered_config(docs)["server"]["drain_seconds"]
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


@pytest.mark.parametrize(("drain", "pre_stop", "margin"), [(0, 1, 0), (45, 7, 3), (3600, 15, 30)])
def test_grace_period_is_computed_from_drain_values(
    render: Renderer, drain: int, pre_stop: int, margin: int
) -> None:
    docs = render(None, {"drain": {"seconds": drain, "preStopSleepSeconds": pre_stop,
                                   "marginSeconds": margin}})
    pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == drain + pre_stop + margin
    assert rendered_config(docs)["server"]["drain_seconds"] == drain
    assert gateway_container(docs)["lifecycle"]["preStop"] == {"sleep": {"seconds": pre_stop}}


def test_checksum_annotation_follows_the_config(render: Renderer) -> None:
    def checksum(overrides: Values) -> str:
        deployment = gateway_deployment(render(None, overrides))
        value: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({"config": {"logging": {"level": "debug"}}}) != base
    assert checksum({"config": {"server": {"max_sessions": 10}}}) != base
    assert checksum({"drain": {"seconds": 60}}) != base  # drain_seconds is in the config
    assert checksum({"redis": {"url": "redis://redis:6379/0"}}) != base
    assert checksum({"replicaCount": 5, "image": {"tag": "9.9.9"}}) == base


def test_config_keys_owned_by_the_chart(render: Renderer) -> None:
    docs = render(None, {"service": {"port": 8081}, "metrics": {"port": 9191},
                         "drain": {"seconds": 42}, "redis": {"url": "rediss://r.test:6380/1"},
                         "replicaCount": 3})
    config = rendered_config(docs)
    assert config["server"]["port"] == 8081
    assert config["server"]["metrics_port"] == 9191
    assert config["server"]["drain_seconds"] == 42
    assert config["redis"]["url"] == "rediss://r.test:6380/1"
    assert config["redis"]["expected_replicas"] == 3
    assert "redis" not in rendered_config(render(None))  # no URL: in-process limits


# --- values.schema.json -----------------------------------------------------------------------


def load_schema() -> Doc:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def test_schema_is_valid_draft_07() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    schema = load_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)


def closed_objects(node: Any, path: str = "") -> Iterator[tuple[str, Doc]]:
    """Every schema object that declares ``properties``, with its JSON path."""
    if isinstance(node, dict):
        if "properties" in node:
            yield path, node
        for key, value in node.items():
            yield from closed_objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from closed_objects(value, f"{path}/{index}")


def test_schema_objects_are_closed() -> None:
    for path, node in closed_objects(load_schema()):
        assert node.get("additionalProperties") is False, f"{path or '/'} is open"


@pytest.mark.parametrize("values", [
    pytest.param({"replicaCout": 2}, id="top-level-typo"),
    pytest.param({"ingress": {"enabeld": True}}, id="nested-typo"),
    pytest.param({"config": {"server": {"port": 9000}}}, id="chart-owned-port"),
    pytest.param({"config": {"server": {"drain_seconds": 5}}}, id="chart-owned-drain"),
    pytest.param({"config": {"redis": {"url": "redis://x"}}}, id="chart-owned-redis-url"),
    pytest.param({"config": {"logging": {"level": "verbose"}}}, id="bad-enum"),
    pytest.param({"service": {"port": 0}}, id="bad-port"),
    pytest.param({"drain": {"preStopSleepSeconds": 0}}, id="zero-prestop"),
    pytest.param({"autoscaling": {"metric": "memory"}}, id="bad-hpa-metric"),
    pytest.param({"config": {"tenants": []}}, id="no-tenants"),
    pytest.param({"workers": 0}, id="zero-workers"),
    pytest.param({"workers": "all"}, id="bad-workers"),
])
def test_schema_rejects_bad_values(values: Values) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_schema_accepts_every_values_file() -> None:
    with helm.Chart.load(CHART) as chart:
        for path in [None, *CI_VALUES]:
            chart.validate_schema(load_values(path))


def model_fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def literal_values(model: type[BaseModel], field: str) -> set[str]:
    return set(typing.get_args(model.model_fields[field].annotation))


def test_schema_follows_the_config_models() -> None:
    """The chart's config schema names the fields of gateway/config.py, minus chart-owned ones."""
    schema = load_schema()
    definitions = schema["definitions"]
    config = schema["properties"]["config"]["properties"]

    def props(node: Doc) -> set[str]:
        return set(node["properties"])

    cfg = gateway_config
    assert props(schema["properties"]["config"]) == model_fields(cfg.Config)
    assert props(config["server"]) | {"port", "metrics_port", "drain_seconds"} == model_fields(
        cfg.ServerConfig)
    assert props(config["redis"]) | {"url", "expected_replicas"} == model_fields(cfg.RedisConfig)
    assert props(config["logging"]) == model_fields(cfg.LoggingConfig)
    assert props(definitions["upstream"]) == model_fields(cfg.UpstreamConfig)
    assert props(definitions["tenant"]) == model_fields(cfg.TenantConfig)
    # dev_issuer needs a loopback listener: `realtime-gateway dev`, not a cluster.
    assert props(definitions["auth"]) | {"dev_issuer"} == model_fields(cfg.AuthConfig)
    assert props(definitions["auth"]["properties"]["introspection"]) == model_fields(
        cfg.IntrospectionConfig)
    assert props(definitions["modelRoute"]) == model_fields(cfg.ModelRoute)
    assert props(definitions["limits"]) == model_fields(cfg.LimitsConfig)

    assert set(config["redis"]["properties"]["fail_mode"]["enum"]) == literal_values(
        cfg.RedisConfig, "fail_mode")
    assert set(definitions["upstream"]["properties"]["provider"]["enum"]) == literal_values(
        cfg.UpstreamConfig, "provider")
    for field in ("level", "format"):
        assert set(config["logging"]["properties"][field]["enum"]) == literal_values(
            cfg.LoggingConfig, field)


# --- objects and features ---------------------------------------------------------------------


def test_defaults_render_only_the_core_objects(render: Renderer) -> None:
    kinds = sorted(d["kind"] for d in render(None))
    assert kinds == ["ConfigMap", "Deployment", "Pod", "PodDisruptionBudget", "Service",
                     "ServiceAccount"]


def test_full_values_render_every_optional_object(render: Renderer) -> None:
    docs = render(CHART / "ci" / "full-values.yaml")
    kinds = {d["kind"] for d in docs}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Ingress",
            "HTTPRoute", "ServiceMonitor"} <= kinds
    assert RULES_FILE.exists() == ("PrometheusRule" in kinds)
    dashboards = [d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(dashboards) == len(list((CHART / "dashboards").glob("*.json")))
    components = {(d["kind"], d["metadata"]["labels"]["app.kubernetes.io/component"])
                  for d in docs}
    assert {("Deployment", "redis"), ("Service", "redis"), ("NetworkPolicy", "redis")} <= components
    assert "replicas" not in gateway_deployment(docs)["spec"]  # the HPA owns the count
    config = rendered_config(docs)
    assert config["redis"]["url"] == "redis://rtgw-redis:6379/0"
    assert config["redis"]["expected_replicas"] == 3  # autoscaling.minReplicas


def test_pod_security_is_restricted(render: Renderer) -> None:
    for path in [None, *CI_VALUES]:
        for doc in render(path):
            if doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]["spec"]
            elif doc["kind"] == "Pod":
                pod = doc["spec"]
            else:
                continue
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False
                assert context["readOnlyRootFilesystem"] is True
                assert context["capabilities"]["drop"] == ["ALL"]
                assert context.get("privileged", False) is False
                assert "memory" in container["resources"]["limits"]


@pytest.mark.parametrize(("workers", "args"), [
    (1, []), (4, ["--workers", "4"]), ("auto", ["--workers", "auto"])])
def test_workers_are_passed_to_serve(workers: int | str, args: list[str]) -> None:
    values = {"workers": workers, "redis": {"url": "redis://redis:6379/0"}}
    container = gateway_container(manifests(render_chart(CHART, values)))
    assert container["args"] == ["serve", "--config", "/etc/realtime-gateway/config.yaml",
                                 *args]
    parsed = build_parser().parse_args(container["args"])
    assert parsed.workers == (parse_workers(str(workers)))


def test_gateway_pod_layout(render: Renderer) -> None:
    docs = render(None)
    pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    container = gateway_container(docs)
    assert container["args"] == ["serve", "--config", "/etc/realtime-gateway/config.yaml"]
    assert "command" not in container  # the image's ENTRYPOINT (realtime-gateway) runs
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/etc/realtime-gateway"]["readOnly"] is True
    assert volumes[mounts["/etc/realtime-gateway"]["name"]]["configMap"]["items"] == [
        {"key": "config.yaml", "path": "config.yaml"}]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone",
                                                   "kubernetes.io/hostname"}
    selector = gateway_deployment(docs)["spec"]["selector"]["matchLabels"]
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"] == selector
    assert "helm.sh/chart" not in selector
    assert find(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert gateway_service(docs)["spec"]["selector"] == selector


def test_secret_env_from_existing_secret(render: Renderer) -> None:
    docs = render(CHART / "ci" / "existing-secret-values.yaml")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gateway_container(docs)["env"]}
    assert env == {
        "ACME_INTROSPECTION_SECRET": {"name": "prod-realtime-keys", "key": "acme-client-secret"},
        "OPENAI_API_KEY": {"name": "prod-realtime-keys", "key": "openai-api-key"},
    }
    assert rendered_config(docs)["redis"]["expected_replicas"] == 4
    # Without a key mapping the Secret key is the variable's name.
    docs = render(CHART / "ci" / "minimal-values.yaml")
    assert gateway_container(docs)["env"] == [{"name": "OPENAI_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "realtime-gateway-keys", "key": "OPENAI_API_KEY"}}}]


def test_hpa_on_active_sessions(render: Renderer) -> None:
    docs = render(CHART / "ci" / "hpa-sessions-values.yaml")
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway_deployment(docs)["metadata"]["name"]
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "realtime_gateway_sessions_active"},
        "target": {"type": "AverageValue", "averageValue": "800"}}}]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert "replicas" not in gateway_deployment(docs)["spec"]


def test_hpa_on_cpu(render: Renderer) -> None:
    hpa = find(render(None, {"autoscaling": {"enabled": True}}), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]


def test_ingress_keeps_websockets_open(render: Renderer) -> None:
    docs = render(CHART / "ci" / "full-values.yaml")
    annotations = find(docs, "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    route = find(docs, "HTTPRoute")
    assert [r["timeouts"] for r in route["spec"]["rules"]] == [{"request": "0s"}]


def test_network_policy(render: Renderer) -> None:
    values = load_values(CHART / "ci" / "full-values.yaml")
    docs = render(CHART / "ci" / "full-values.yaml")
    policy = find(docs, "NetworkPolicy", "rtgw")
    ingress = policy["spec"]["ingress"]
    by_port = {rule["ports"][0]["port"]: rule for rule in ingress}
    assert by_port["metrics"]["from"] == values["networkPolicy"]["metricsFrom"]
    assert {"podSelector": {"matchLabels": {"rtgw-client": "true"}}} in by_port["http"]["from"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 443, 6379, 8443} <= egress_ports
    # Without allowExternal=false the main port is open and the metrics port closed.
    docs = render(None, {"networkPolicy": {"enabled": True}})
    rules = find(docs, "NetworkPolicy")["spec"]["ingress"]
    assert rules == [{"ports": [{"port": "http", "protocol": "TCP"}]}]


def test_exposed_service_keeps_metrics_private(render: Renderer) -> None:
    docs = render(CHART / "ci" / "tls-loadbalancer-values.yaml")
    main = gateway_service(docs)
    assert main["spec"]["type"] == "LoadBalancer"
    assert [p["name"] for p in main["spec"]["ports"]] == ["http"]
    metrics = find(docs, "Service", f"{main['metadata']['name']}-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert gateway_container(docs)["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def copy_chart(tmp_path: Path) -> Path:
    target = tmp_path / "realtime-gateway"
    shutil.copytree(CHART, target)
    return target


def test_prometheus_rule_wraps_the_rules_file(tmp_path: Path) -> None:
    chart = CHART
    if not RULES_FILE.exists():  # the rules are written separately: use a stand-in
        chart = copy_chart(tmp_path)
        (chart / "files").mkdir(exist_ok=True)
        (chart / "files" / "realtime-gateway-rules.yaml").write_text(
            "groups:\n  - name: stand-in\n    rules:\n      - alert: A\n        expr: up == 0\n"
            "        annotations:\n          summary: '{{ $labels.instance }} down'\n",
            encoding="utf-8")
    rules = yaml.safe_load((chart / "files" / "realtime-gateway-rules.yaml").read_text("utf-8"))
    values = {"metrics": {"prometheusRule": {"enabled": True,
                                             "labels": {"release": "kube-prometheus-stack"}}}}
    rule = find(manifests(render_chart(chart, values)), "PrometheusRule")
    assert rule["spec"] == rules  # verbatim: `{{ $labels }}` reaches Prometheus untouched
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    check_prometheus_operator_resource(rule)


def test_dashboards_become_sidecar_config_maps(tmp_path: Path) -> None:
    chart = copy_chart(tmp_path)
    dashboards = chart / "dashboards"
    dashboards.mkdir(exist_ok=True)
    stand_in = {"title": "Stand-in <&>", "uid": "stand-in", "panels": [], "schemaVersion": 42}
    (dashboards / "zz-stand-in.json").write_text(json.dumps(stand_in), encoding="utf-8")
    files = sorted(dashboards.glob("*.json"))
    docs = manifests(render_chart(chart, {"dashboards": {
        "enabled": True, "annotations": {"grafana_folder": "Gateways"}}}))
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in
            d["metadata"]["labels"]]
    assert len(maps) == len(files)
    for config_map, path in zip(maps, files, strict=True):
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"]["grafana_folder"] == "Gateways"
        assert list(config_map["data"]) == [path.name]
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text("utf-8"))
        assert len(json.dumps(config_map)) < 1024 * 1024  # ConfigMap size limit
    off = manifests(render_chart(chart, {}))  # dashboards are off by default
    assert not [d for d in off if "grafana_dashboard" in d["metadata"]["labels"]]


@pytest.mark.parametrize(("values", "reason"), [
    ({"metrics": {"port": 8080}}, "must differ"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
    ({"redis": {"url": "redis://r:6379/0", "trial": {"enabled": True}}}, "exclusive"),
    ({"workers": 2}, "needs Redis"),
    ({"workers": "auto"}, "needs Redis"),
    ({"config": {"tenants": [{"id": "a", "auth": {"issuer": "https://a.test/",
                                                  "jwks_uri": "https://a.test/jwks"},
                              "models": {"m": {"upstream": "nope"}}}]}}, "unknown upstream"),
])
def test_render_refuses_inconsistent_values(values: Values, reason: str) -> None:
    with pytest.raises(helm.HelmError, match=reason):
        render_chart(CHART, values)


def test_notes_warn_about_missing_pieces() -> None:
    default_notes = render_chart(CHART, {})["realtime-gateway/templates/NOTES.txt"]
    assert "existingSecret is not set" in default_notes
    assert "example issuer" in default_notes
    assert "admission limits are kept per replica" in default_notes
    minimal = render_chart(CHART, load_values(CHART / "ci" / "minimal-values.yaml"))
    notes = minimal["realtime-gateway/templates/NOTES.txt"]
    assert "existingSecret is not set" not in notes
    assert "replicaCount is 1" in notes
    assert "/v1/realtime" in notes


def test_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    values_text = (CHART / "values.yaml").read_text(encoding="utf-8")
    params = re.findall(r"^\s*## @param (\S+)", values_text, flags=re.MULTILINE)
    assert len(params) > 50
    for param in params:
        assert f"`{param}`" in readme, f"{param} is not in README.md"
    # Every top-level value is documented.
    top_level = set(yaml.safe_load(values_text))
    documented = {param.split(".")[0] for param in params}
    assert top_level == documented


# --- scripts/helm.py --------------------------------------------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "helm.py"), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_helm_script_template_and_lint() -> None:
    full = str(CHART / "ci" / "full-values.yaml")
    result = run_script("template", str(CHART), "-f", full, "--set", "replicaCount=3",
                        "--name", "demo", "-n", "voice")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {d["metadata"]["namespace"] for d in docs} == {"voice"}
    assert "# Source: realtime-gateway/templates/deployment.yaml" in result.stdout
    assert "NOTES" not in result.stdout

    assert run_script("lint", str(CHART), "-f", full, "--strict").returncode == 0
    bad = run_script("template", str(CHART), "--set", "replicaCout=3")
    assert bad.returncode == 1
    assert "replicaCout" in bad.stderr
    lint_bad = run_script("lint", str(CHART), "--set", "service.port=0", "--strict")
    assert lint_bad.returncode == 1

