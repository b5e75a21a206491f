"""The gateway's configuration: pydantic models of CONTRACT §2 and :func:`load_config`.

The YAML file is validated strictly (unknown keys are errors) and cross-checked
(every model names a configured upstream, issuers are unique, keys are present in
the environment).  Every problem is reported as ``key.path: message``; all of them
at once, so an operator fixes a file in one pass.

Secrets never come from the file: upstream API keys, introspection client
secrets and client-secret signing keys are read from the environment variables the
file names (``api_key_env``, ``client_secret_env``, ``signing_key_env``) and kept in
private attributes that are excluded from ``model_dump`` and ``repr``.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_SCOPE = "language-model-service:use-model"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

MAX_UNAUTHENTICATED_HANDSHAKES = 1000
"""Default of ``server.max_unauthenticated_handshakes``."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Model):
    """``server:`` — listeners, drain and per-replica caps.

    Times are seconds; sizes are bytes.
    """

    host: str = "0.0.0.0"  # noqa: S104 - a server in a container listens on all interfaces
    port: int = Field(default=8080, ge=0, le=65535)
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    drain_seconds: float = Field(default=300, ge=0)
    max_message_bytes: PositiveInt = 16 * 1024 * 1024
    allowed_origins: tuple[str, ...] = ()
    max_sessions: PositiveInt = 2000
    """Live sessions plus upgrades with a validated token still being opened."""
    max_unauthenticated_handshakes: PositiveInt = MAX_UNAUTHENTICATED_HANDSHAKES
    """Upgrades whose token is still being checked (they take no ``max_sessions`` slot)."""
    forwarded_allow_ips: tuple[str, ...] = ()
    """Proxies (IP addresses or CIDR networks, or ``"*"``) whose ``X-Forwarded-For`` /
    ``X-Forwarded-Proto`` are believed for the client's address (logs); empty: none, the
    client is the TCP peer (uvicorn's own default would trust 127.0.0.1)."""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    handshake_timeout_seconds: PositiveFloat = 15.0
    """Budget for everything before the 101: auth, admission, upstream dial."""
    send_timeout_seconds: PositiveFloat = 30.0
    """A peer that accepts no data for this long is a slow consumer: the session closes."""
    ping_interval_seconds: PositiveFloat = 20.0
    ping_timeout_seconds: PositiveFloat = 20.0
    beta_clients: Literal["translate", "refuse"] = "translate"
    """Realtime beta-protocol clients (CONTRACT §10, :func:`gateway.beta.is_beta`):
    ``translate`` serves them on the GA upstream through :mod:`gateway.beta_relay`;
    ``refuse`` answers with an ``error`` event naming the GA path and closes 4400."""

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _networks(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        for entry in entries:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address, a CIDR network or '*'") \
                    from None
        return entries

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self


MIN_SIGNING_KEY_BYTES = 32
"""Shortest client-secret signing key, in bytes (HS256 wants >= 256 bits, RFC 7518 §3.2)."""
DEFAULT_SIGNING_KID = "default"
"""The ``kid`` of a signing key given bare (without ``kid:``)."""
_KID = re.compile(r"[A-Za-z0-9._-]{1,32}")


def parse_signing_keys(value: str) -> tuple[tuple[str, bytes], ...]:
    """Parse the value of ``client_secrets.signing_key_env`` into ``(kid, key)`` pairs.

    Format: ``KEY`` (its kid is :data:`DEFAULT_SIGNING_KID`) or ``kid:KEY,kid:KEY,...``;
    the first pair signs new secrets, all of them verify.  Whitespace around entries is
    ignored (a trailing newline from a Kubernetes secret file is harmless).  A kid is
    ``[A-Za-z0-9._-]{1,32}``, unique; a key is the UTF-8 encoding of its text, at least
    :data:`MIN_SIGNING_KEY_BYTES` bytes, and contains no ``,`` (nor ``:`` when bare).
    ``secrets.token_urlsafe(32)`` makes a good key (43 bytes).

    Raises :class:`ValueError` with a message naming the entry (by position and kid), never
    the key material.
    """
    entries = [entry.strip() for entry in value.split(",")]
    if entries == [""]:
        raise ValueError("is empty")
    if len(entries) == 1 and ":" not in entries[0]:
        entries = [f"{DEFAULT_SIGNING_KID}:{entries[0]}"]
    pairs: list[tuple[str, bytes]] = []
    for position, entry in enumerate(entries, start=1):
        kid, colon, key = entry.partition(":")
        kid = kid.strip()
        if not colon or _KID.fullmatch(kid) is None:
            raise ValueError(f"entry {position} is not kid:key (kid: [A-Za-z0-9._-]{{1,32}})")
        if any(kid == seen for seen, _ in pairs):
            raise ValueError(f"entry {position}: duplicate kid {kid!r}")
        raw = key.strip().encode("utf-8")
        if len(raw) < MIN_SIGNING_KEY_BYTES:
            raise ValueError(f"key {kid!r} is shorter than {MIN_SIGNING_KEY_BYTES} bytes")
        pairs.append((kid, raw))
    return tuple(pairs)


class ClientSecretsConfig(_Model):
    """``client_secrets:`` — client secrets the gateway mints itself (CONTRACT §8).

    Absent: ``POST /v1/realtime/client_secrets`` answers 404 and ``ek_`` tokens are refused.
    The signing keys are read from the environment variable ``signing_key_env`` (format in
    :func:`parse_signing_keys`); every replica must see the same value.  ``max_seconds`` caps
    a secret's lifetime (``expires_after.seconds``, 10..7200 s as at OpenAI).
    """

    signing_key_env: str = "REALTIME_GATEWAY_SECRET_KEY"
    max_seconds: int = Field(default=7200, ge=10, le=7200)
    _signing_keys: tuple[tuple[str, bytes], ...] = PrivateAttr(default=())

    @property
    def signing_keys(self) -> tuple[tuple[str, bytes], ...]:
        """The ``(kid, key)`` pairs read from ``signing_key_env`` at load time, signer first."""
        return self._signing_keys


class RedisConfig(_Model):
    """``redis:`` — shared admission state.  Absent: in-process limits (one replica only)."""

    url: str
    fail_mode: Literal["open", "closed"] = "open"
    timeout_seconds: float = Field(default=0.25, gt=0, le=0.25)
    """Socket connect and command timeout (s); <= 250 ms so a dead Redis cannot stall handshakes."""
    lease_seconds: float = Field(default=30.0, ge=3)
    """Lifetime of a concurrency slot; a live session renews it every third of this."""
    expected_replicas: PositiveInt = 1
    """With ``fail_mode: open`` each replica admits ``limit / expected_replicas`` (min 1) alone."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if urlsplit(url).scheme not in {"redis", "rediss", "redis+cluster", "rediss+cluster"}:
            raise ValueError("must be a redis://, rediss:// or redis+cluster:// URL")
        return url


class UpstreamConfig(_Model):
    """One entry of ``upstreams:`` — an OpenAI or Azure OpenAI Realtime endpoint (GA protocol)."""

    provider: Literal["openai", "azure"]
    url: str
    api_key_env: str
    connect_timeout_seconds: PositiveFloat = 10.0
    calls_url: str | None = None
    """WebRTC calls endpoint (CONTRACT §9); default: ``url`` with ``ws``→``http`` + ``/calls``."""
    ca_file: Path | None = None
    """A PEM bundle of the CA certificates trusted for this upstream's TLS certificate,
    *instead of* the system store (a private CA, a TLS-inspecting egress proxy's CA);
    ``None``: the system store.  ``wss://`` URLs only; a relative path is resolved against
    the config file's directory.  Checked at load: the file must exist and hold at least
    one PEM certificate that OpenSSL accepts."""
    _api_key: str = PrivateAttr(default="")

    @field_validator("ca_file")
    @classmethod
    def _ca_bundle(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        base_dir = (info.context or {}).get("base_dir")
        if not path.is_absolute() and isinstance(base_dir, Path):
            path = base_dir / path
        if not path.is_file():
            raise ValueError(f"{path} does not exist or is not a file")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a PEM bundle of CA certificates: {exc}") from None
        return path

    @model_validator(mode="after")
    def _ca_file_for_tls(self) -> UpstreamConfig:
        if self.ca_file is not None and urlsplit(self.url).scheme != "wss":
            raise ValueError("ca_file applies to wss:// upstreams only")
        return self

    @field_validator("calls_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return url

    @field_validator("url")
    @classmethod
    def _ws_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in {"ws", "wss"} or not parts.hostname:
            raise ValueError("must be a ws:// or wss:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment; the model is added per session")
        return url

    @property
    def api_key(self) -> str:
        """The key read from ``api_key_env`` at load time."""
        return self._api_key


class IntrospectionConfig(_Model):
    """RFC 7662 token introspection for opaque tokens."""

    url: str
    client_id: str
    client_secret_env: str
    cache_seconds: PositiveFloat = 60.0
    timeout_seconds: PositiveFloat = 2.0
    """Seconds for one lookup, the wait for a free request slot included."""
    max_concurrent: PositiveInt = 16
    """Introspection requests in flight at once for this tenant, per replica."""
    _client_secret: str = PrivateAttr(default="")

    @property
    def client_secret(self) -> str:
        return self._client_secret


class DevIssuerConfig(_Model):
    """A development issuer: a key pair kept in ``key_file`` (created on first use)."""

    key_file: Path


class AuthConfig(_Model):
    """``tenants[].auth`` — how a tenant's bearer tokens are validated.

    Exactly one key source: ``jwks_uri``, ``discovery_url`` (OIDC discovery,
    ``jwks_uri`` read from it), ``introspection`` (RFC 7662) or ``dev_issuer``.
    """

    issuer: str
    jwks_uri: str | None = None
    discovery_url: str | None = None
    introspection: IntrospectionConfig | None = None
    dev_issuer: DevIssuerConfig | None = None
    audiences: tuple[str, ...] = ()
    required_scope: str = DEFAULT_SCOPE
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_seconds: float = Field(default=30, ge=0, le=300)
    require_typ: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$&^_.+/-]{1,127}$")] | None = None
    """The JOSE ``typ`` a JWT must carry, e.g. ``at+jwt`` (RFC 9068 §2.1; compared as a media
    type, RFC 7515 §4.1.9: case-insensitive, ``application/`` implied).  Off by default:
    many issuers (Keycloak, Entra) mint access tokens with ``typ: JWT``."""

    @model_validator(mode="after")
    def _typ_for_jwts(self) -> AuthConfig:
        if self.require_typ is not None and self.introspection is not None:
            raise ValueError("require_typ applies to JWT tenants; introspection answers "
                             "carry no JOSE header")
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> AuthConfig:
        sources = [
            name
            for name in ("jwks_uri", "discovery_url", "introspection", "dev_issuer")
            if getattr(self, name) is not None
        ]
        if len(sources) != 1:
            raise ValueError(
                "exactly one of jwks_uri, discovery_url, introspection, dev_issuer is required"
                + (f" (got {', '.join(sources)})" if sources else "")
            )
        return self

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: tuple[str, ...]) -> tuple[str, ...]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                   "ES512", "EdDSA"}
        bad = [a for a in algorithms if a not in allowed]
        if bad:
            raise ValueError(f"unsupported algorithms {bad}; allowed: {sorted(allowed)}")
        if not algorithms:
            raise ValueError("at least one algorithm is required")
        return algorithms


class ModelRoute(_Model):
    """``tenants[].models.<name>`` — the upstream serving a model the tenant may open."""

    upstream: str
    upstream_model: str | None = None
    """The model (OpenAI) or deployment (Azure) name sent upstream; defaults to the key."""


class LimitsConfig(_Model):
    """``tenants[].limits`` — admission limits; ``None`` means unlimited.

    ``tokens_per_minute`` refills a bucket continuously; usage events debit it.
    New sessions are refused while the balance is <= 0, live sessions close
    (4429) when it falls below ``-token_overdraft`` (default: ``tokens_per_minute``).
    """

    max_sessions: PositiveInt | None = None
    max_sessions_per_user: PositiveInt | None = None
    session_starts_per_minute_per_user: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    token_overdraft: int | None = Field(default=None, ge=0)
    max_session_seconds: PositiveFloat = 3600

    @property
    def overdraft(self) -> int:
        """The effective overdraft in tokens (0 when there is no token budget)."""
        if self.tokens_per_minute is None:
            return 0
        return self.tokens_per_minute if self.token_overdraft is None else self.token_overdraft


class TenantConfig(_Model):
    """One entry of ``tenants:``."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    auth: AuthConfig
    models: dict[str, ModelRoute] = Field(min_length=1)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    allow_mcp_tools: bool = False
    """Whether this tenant's WebRTC calls may declare MCP tools (``tools[].server_url``), which
    make the upstream call out on the tenant's behalf (CONTRACT §9)."""


class LoggingConfig(_Model):
    """``logging:`` — structlog output."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Config(_Model):
    """The whole configuration file (CONTRACT §2)."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    client_secrets: ClientSecretsConfig | None = None
    redis: RedisConfig | None = None
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    tenants: tuple[TenantConfig, ...]
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def tenant_by_issuer(self, issuer: str) -> TenantConfig | None:
        """The tenant whose ``auth.issuer`` equals ``issuer`` exactly, or ``None``."""
        for tenant in self.tenants:
            if tenant.auth.issuer == issuer:
                return tenant
        return None


class ConfigError(Exception):
    """The configuration is invalid.

    ``errors`` lists ``(key_path, message)`` pairs; ``key_path`` is dotted
    (``tenants.0.models.gpt-realtime.upstream``).  ``str()`` gives one line each.
    """

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("\n".join(f"{path}: {message}" for path, message in errors))


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _cross_check(config: Config, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if not config.tenants:
        errors.append(("tenants", "at least one tenant is required"))
    for name, upstream in config.upstreams.items():
        key = environ.get(upstream.api_key_env, "")
        if not key:
            errors.append((f"upstreams.{name}.api_key_env",
                           f"environment variable {upstream.api_key_env} is not set"))
        object.__setattr__(upstream, "_api_key", key)  # private attr on a frozen model
    if config.client_secrets is not None:
        errors.extend(_check_signing_keys(config.client_secrets, environ))
    introspecting = [i for i, t in enumerate(config.tenants) if t.auth.introspection is not None]
    for index in introspecting[1:]:
        errors.append((f"tenants.{index}.auth.introspection",
                       f"only one tenant may use introspection (also tenants.{introspecting[0]}): "
                       "an opaque token names no issuer, so it would be sent to every "
                       "tenant's introspection endpoint"))
    seen_issuers: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for index, tenant in enumerate(config.tenants):
        if tenant.id in seen_ids:
            errors.append((f"tenants.{index}.id",
                           f"duplicate tenant id {tenant.id!r} "
                           f"(also tenants.{seen_ids[tenant.id]})"))
        seen_ids.setdefault(tenant.id, index)
        issuer = tenant.auth.issuer
        if issuer in seen_issuers:
            errors.append((f"tenants.{index}.auth.issuer",
                           f"duplicate issuer (also tenants.{seen_issuers[issuer]}.auth.issuer)"))
        seen_issuers.setdefault(issuer, index)
        for model, route in tenant.models.items():
            if route.upstream not in config.upstreams:
                errors.append((f"tenants.{index}.models.{model}.upstream",
                               f"unknown upstream {route.upstream!r}; configured: "
                               f"{sorted(config.upstreams)}"))
        introspection = tenant.auth.introspection
        if introspection is not None:
            secret = environ.get(introspection.client_secret_env, "")
            if not secret:
                errors.append((f"tenants.{index}.auth.introspection.client_secret_env",
                               f"environment variable {introspection.client_secret_env} "
                               "is not set"))
            object.__setattr__(introspection, "_client_secret", secret)
        if tenant.auth.dev_issuer is not None and not is_loopback_host(config.server.host):
            errors.append((f"tenants.{index}.auth.dev_issuer",
                           "a development issuer is allowed only when server.host is a "
                           "loopback address"))
    return errors


def _check_signing_keys(section: ClientSecretsConfig,
                        environ: Mapping[str, str]) -> list[tuple[str, str]]:
    path, name = "client_secrets.signing_key_env", section.signing_key_env
    value = environ.get(name, "")
    if not value:
        return [(path, f"environment variable {name} is not set")]
    try:
        keys = parse_signing_keys(value)
    except ValueError as exc:
        return [(path, f"environment variable {name}: {exc}")]
    object.__setattr__(section, "_signing_keys", keys)  # private attr on a frozen model
    return []


def is_loopback_host(host: str) -> bool:
    """``True`` for ``localhost`` and loopback IP literals (127.0.0.0/8, ``::1``, with or
    without brackets): the one loopback rule of the gateway (dev issuers, plain-HTTP key
    endpoints, the demo's token endpoint)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_config(data: Any, environ: Mapping[str, str], base_dir: Path | None = None) -> Config:
    """Validate already-parsed YAML ``data`` into a :class:`Config`.

    Relative file paths (``dev_issuer.key_file``, TLS files, ``upstreams.*.ca_file``) are
    resolved against ``base_dir``.  Raises :class:`ConfigError` listing every problem.
    """
    if not isinstance(data, dict):
        raise ConfigError([("<root>", "the configuration must be a mapping")])
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError([(_dotted(e["loc"]), e["msg"]) for e in exc.errors()]) from None
    errors = _cross_check(config, environ)
    if errors:
        raise ConfigError(errors)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    def resolve(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base_dir / path

    server = config.server.model_copy(update={
        "tls_cert_file": resolve(config.server.tls_cert_file),
        "tls_key_file": resolve(config.server.tls_key_file),
    })
    tenants = []
    for tenant in config.tenants:
        dev = tenant.auth.dev_issuer
        if dev is not None:
            auth = tenant.auth.model_copy(
                update={"dev_issuer": DevIssuerConfig(key_file=base_dir / dev.key_file)
                        if not dev.key_file.is_absolute() else dev})
            tenant = tenant.model_copy(update={"auth": auth})
        tenants.append(tenant)
    return config.model_copy(update={"server": server, "tenants": tuple(tenants)})


def load_config(path: str | Path, environ: Mapping[str, str], *,
                base_dir: Path | None = None) -> Config:
    """Read and validate the YAML file at ``path`` (CONTRACT §2).

    ``environ`` supplies the variables named by ``api_key_env``,
    ``client_secret_env`` and ``signing_key_env`` (pass ``os.environ``).  Relative file
    paths are resolved against ``base_dir``, by default the file's own directory (a worker
    of ``serve --workers`` reads its supervisor's copy of the file, resolved as the
    original).  Raises :class:`ConfigError` (also for an unreadable file or invalid YAML).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("<file>", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([("<file>", f"invalid YAML: {exc}")]) from None
    return parse_config(data, environ,
                        base_dir=path.resolve().parent if base_dir is None else base_dir)
