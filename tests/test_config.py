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


@pytest.mark.parametrize(("value", "expected"), [(None, "translate"),
                                                ("translate", "translate"),
                                                ("refuse", "refuse")])
def test_beta_clients_translated_by_default(value: str | None, expected: str) -> None:
    data = valid()
    if value is not None:
        data["server"]["beta_clients"] = value
    assert parse_config(data, ENV).server.beta_clients == expected


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
    (mutate("server.beta_clients", "drop"), ENV, "server.beta_clients"),
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


SIGNING_KEY = "k" * 43  # the length of secrets.token_urlsafe(32)
OLD_KEY = "o" * 32


def with_secrets(**section: Any) -> dict[str, Any]:
    return {**valid(), "client_secrets": section}


@pytest.mark.parametrize(("value", "expected"), [
    (SIGNING_KEY, (("default", SIGNING_KEY.encode()),)),
    (f" {SIGNING_KEY}\n", (("default", SIGNING_KEY.encode()),)),
    (f"new:{SIGNING_KEY}, old:{OLD_KEY}", (("new", SIGNING_KEY.encode()),
                                           ("old", OLD_KEY.encode()))),
    ("k1:" + "é" * 16, (("k1", ("é" * 16).encode()),)),  # 16 characters, 32 UTF-8 bytes
])
def test_client_secrets_signing_keys(value: str, expected: tuple[tuple[str, bytes], ...]) -> None:
    config = parse_config(with_secrets(), {**ENV, "REALTIME_GATEWAY_SECRET_KEY": value})
    section = config.client_secrets
    assert section is not None and section.max_seconds == 7200
    assert section.signing_keys == expected
    for _, key in expected:
        assert key.decode() not in repr(config)
        assert key.decode() not in str(config.model_dump())


def test_client_secrets_absent_by_default() -> None:
    assert parse_config(valid(), ENV).client_secrets is None


@pytest.mark.parametrize(("section", "value", "expected"), [
    ({}, None, "client_secrets.signing_key_env: environment variable "
               "REALTIME_GATEWAY_SECRET_KEY is not set"),
    ({"signing_key_env": "GW_KEY"}, None,
     "client_secrets.signing_key_env: environment variable GW_KEY is not set"),
    ({}, "x" * 31, "client_secrets.signing_key_env: environment variable "
                   "REALTIME_GATEWAY_SECRET_KEY: key 'default' is shorter than 32 bytes"),
    ({}, f"a:{SIGNING_KEY},b:short", "client_secrets.signing_key_env: environment variable "
                                     "REALTIME_GATEWAY_SECRET_KEY: key 'b' is shorter"),
    ({}, f"a:{SIGNING_KEY},{OLD_KEY}", "client_secrets.signing_key_env: environment variable "
                                       "REALTIME_GATEWAY_SECRET_KEY: entry 2 is not kid:key"),
    ({}, f"a:{SIGNING_KEY},", "client_secrets.signing_key_env: environment variable "
                              "REALTIME_GATEWAY_SECRET_KEY: entry 2 is not kid:key"),
    ({}, f"bad kid!:{SIGNING_KEY}", "client_secrets.signing_key_env: environment variable "
                                    "REALTIME_GATEWAY_SECRET_KEY: entry 1 is not kid:key"),
    ({}, f"a:{SIGNING_KEY},a:{OLD_KEY}", "client_secrets.signing_key_env: environment variable "
                                         "REALTIME_GATEWAY_SECRET_KEY: entry 2: duplicate kid"),
    ({}, " \n", "client_secrets.signing_key_env: environment variable "
                "REALTIME_GATEWAY_SECRET_KEY: is empty"),
    ({"max_seconds": 9}, SIGNING_KEY, "client_secrets.max_seconds: Input should be greater"),
    ({"max_seconds": 7201}, SIGNING_KEY, "client_secrets.max_seconds: Input should be less"),
    ({"signing_key": SIGNING_KEY}, SIGNING_KEY,
     "client_secrets.signing_key: Extra inputs are not permitted"),
])
def test_client_secrets_refused_with_key_path(section: dict[str, Any], value: str | None,
                                              expected: str) -> None:
    environ = dict(ENV)
    if value is not None:
        environ[section.get("signing_key_env", "REALTIME_GATEWAY_SECRET_KEY")] = value
    with pytest.raises(ConfigError) as caught:
        parse_config(with_secrets(**section), environ)
    messages = [f"{path}: {message}" for path, message in caught.value.errors]
    assert any(message.startswith(expected) for message in messages), messages
    for secret in (SIGNING_KEY, OLD_KEY, "x" * 31):
        assert all(secret not in message for message in messages)  # no key material shown


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "example.yaml"
    environ = {**ENV, "INITECH_INTROSPECTION_SECRET": "initech-secret-000",
               "REALTIME_GATEWAY_SECRET_KEY": f"2026-11:{SIGNING_KEY},2026-05:{OLD_KEY}"}
    config = load_config(example, environ)
    assert config.client_secrets is not None
    assert [kid for kid, _ in config.client_secrets.signing_keys] == ["2026-11", "2026-05"]


def with_ca_file(value: Any, url: str = "wss://upstream.internal/v1/realtime") -> dict[str, Any]:
    data = mutate("upstreams.openai.ca_file", value)
    data["upstreams"]["openai"]["url"] = url
    return data


def test_upstream_ca_file_is_checked_and_resolved(tmp_path: Path) -> None:
    from gateway.devtls import create_certificates

    certs = create_certificates(tmp_path / "tls")
    assert parse_config(valid(), ENV).upstreams["openai"].ca_file is None
    config = parse_config(with_ca_file("tls/ca.pem"), ENV, base_dir=tmp_path)
    assert config.upstreams["openai"].ca_file == certs.ca_file  # relative to the file's dir
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(with_ca_file("tls/ca.pem")))
    loaded = load_config(tmp_path / "gateway.yaml", ENV)
    assert loaded.upstreams["openai"].ca_file == certs.ca_file

    (tmp_path / "junk.pem").write_text("-----BEGIN NOTHING-----\nxx\n")
    for value, url, expected in [
        ("missing.pem", "wss://h/v1/realtime", "does not exist"),
        ("tls", "wss://h/v1/realtime", "does not exist or is not a file"),
        ("junk.pem", "wss://h/v1/realtime", "is not a PEM bundle of CA certificates"),
        ("tls/ca.pem", "ws://h/v1/realtime", "ca_file applies to wss:// upstreams only"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config(with_ca_file(value, url), ENV, base_dir=tmp_path)
        [(path, message)] = caught.value.errors
        assert path.startswith("upstreams.openai") and expected in message, (path, message)
