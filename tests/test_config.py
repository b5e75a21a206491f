"""CONTRACT §2: the config file is validated strictly, with key paths in every message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load_config, parse_config

ENV = {"OPENAI_API_KEY": "sk-test-openai-000000", "AZURE_OPENAI_API_KEY": "azure-key-0000000"}


def valid() -> dict[str, Any]:
    return {
        "server": {"host": "0.0.0.0", "port": 8080, "metrics_port": 9090},
        "redis": {"url": "redis://redis:6379/0", "fail_mode": "open"},
        "upstreams": {
            "openai": {"provider": "openai", "url": "wss://api.openai.com/v1/realtime",
                       "api_key_env": "OPENAI_API_KEY"},
            "azure-eastus": {"provider": "azure",
                             "url": "wss://myres.openai.azure.com/openai/v1/realtime",
                             "api_key_env": "AZURE_OPENAI_API_KEY"},
        },
        "tenants": [{
            "id": "acme",
            "auth": {"issuer": "https://login.acme.example/",
                     "jwks_uri": "https://login.acme.example/jwks",
                     "audiences": ["realtime-gateway"],
                     "required_scope": "language-model-service:use-model",
                     "algorithms": ["RS256", "ES256"], "leeway_seconds": 30},
            "models": {"gpt-realtime-2": {"upstream": "openai"},
                       "gpt-realtime-azure": {"upstream": "azure-eastus",
                                              "upstream_model": "my-deployment"}},
            "limits": {"max_sessions": 200, "max_sessions_per_user": 3,
                       "session_starts_per_minute_per_user": 20, "tokens_per_minute": 400000,
                       "token_overdraft": 400000, "max_session_seconds": 3600},
        }],
        "logging": {"level": "info", "format": "json"},
    }


def test_contract_example_is_valid() -> None:
    config = parse_config(valid(), ENV)
    assert config.upstreams["openai"].api_key == ENV["OPENAI_API_KEY"]
    assert ENV["OPENAI_API_KEY"] not in repr(config)
    assert ENV["OPENAI_API_KEY"] not in str(config.model_dump())
    tenant = config.tenant_by_issuer("https://login.acme.example/")
    assert tenant is not None and tenant.limits.overdraft == 400000
    assert config.tenant_by_issuer("https://login.acme.example") is None  # exact match only


def test_overdraft_defaults_to_tokens_per_minute() -> None:
    data = valid()
    del data["tenants"][0]["limits"]["token_overdraft"]
    assert parse_config(data, ENV).tenants[0].limits.overdraft == 400000


def mutate(path: str, value: Any) -> dict[str, Any]:
    data = valid()
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize(("data", "environ", "expected"), [
    (mutate("server.colour", "blue"), ENV, "server.colour: Extra inputs are not permitted"),
    (mutate("upstreams", {}), ENV, "upstreams:"),
    (mutate("upstreams", DELETE), ENV, "upstreams: Field required"),
    (mutate("tenants.0.models.gpt-realtime-2.upstream", "nowhere"), ENV,
     "tenants.0.models.gpt-realtime-2.upstream: unknown upstream 'nowhere'"),
    ({**valid(), "tenants": valid()["tenants"] * 2}, ENV,
     "tenants.1.auth.issuer: duplicate issuer"),
    (valid(), {"OPENAI_API_KEY": "x" * 10},
     "upstreams.azure-eastus.api_key_env: environment variable AZURE_OPENAI_API_KEY is not set"),
    (mutate("tenants.0.auth.jwks_uri", DELETE), ENV, "tenants.0.auth: Value error, exactly one"),
    (mutate("tenants.0.auth.algorithms", ["HS256"]), ENV, "tenants.0.auth.algorithms"),
    (mutate("redis.fail_mode", "maybe"), ENV, "redis.fail_mode"),
    (mutate("redis.timeout_seconds", 1.0), ENV, "redis.timeout_seconds"),
    (mutate("upstreams.openai.url", "https://api.openai.com/v1/realtime"), ENV,
     "upstreams.openai.url"),
    (mutate("upstreams.openai.api_key", "sk-in-the-file"), ENV,
     "upstreams.openai.api_key: Extra inputs are not permitted"),
    (mutate("tenants", []), ENV, "tenants: at least one tenant is required"),
    (mutate("tenants.0.auth.dev_issuer", {"key_file": "k.json"}), ENV, "tenants.0.auth"),
])
def test_refused_with_key_path(data: dict[str, Any], environ: dict[str, str],
                               expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ)
    assert any(f"{path}: {message}".startswith(expected) for path, message in
               caught.value.errors), caught.value.errors


def test_dev_issuer_only_on_loopback() -> None:
    data = mutate("tenants.0.auth.jwks_uri", DELETE)
    data["tenants"][0]["auth"]["dev_issuer"] = {"key_file": "dev.json"}
    with pytest.raises(ConfigError, match=r"tenants\.0\.auth\.dev_issuer: .*loopback"):
        parse_config(data, ENV)
    data["server"]["host"] = "127.0.0.1"
    config = parse_config(data, ENV, base_dir=Path("/etc/gw"))
    dev = config.tenants[0].auth.dev_issuer
    assert dev is not None and dev.key_file == Path("/etc/gw/dev.json")


def test_check_config_prints_the_same_errors(tmp_path: Path) -> None:
    bad = mutate("tenants.0.models.gpt-realtime-2.upstream", "nowhere")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(bad))
    env = {**ENV, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 1
    assert "tenants.0.models.gpt-realtime-2.upstream: unknown upstream 'nowhere'" in result.stderr
    with pytest.raises(ConfigError) as caught:
        load_config(path, ENV)
    assert str(caught.value) in result.stderr
    path.write_text(yaml.safe_dump(valid()))
    ok = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)],
                        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", ENV)
    broken = tmp_path / "broken.yaml"
    broken.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(broken, ENV)
