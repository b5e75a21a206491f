"""A test identity provider: key pairs, token minting, and a real loopback HTTP server.

* :class:`SigningKey` and :func:`sign_token` mint compact JWS tokens with *any* header and
  claims (including ``alg: none`` and HMAC forgeries made with :func:`hmac_token`), signed
  with joserfc's algorithm implementations so nothing checks what we ask for.
* :class:`IdpServer` is an HTTP/1.1 server on 127.0.0.1 (port 0) serving a JWKS
  (``/jwks``), OIDC discovery metadata (``/.well-known/openid-configuration``) and RFC 7662
  introspection (``/introspect``, ``client_secret_basic``).  It counts requests per path,
  tracks how many are in flight, and can be told per path to fail: ``"500"``, ``"slow"``
  (hold the response until :meth:`IdpServer.release` or close), ``"garbage"`` (not JSON),
  ``"huge"`` (10 MB body with Content-Length) or ``"huge-chunked"`` (10 MB, no length).
* :class:`ConnectionCounter` is a TCP listener that only counts connections (for
  ``jku``/``x5u`` headers that must never be dereferenced).
* :func:`make_config` builds a :class:`gateway.config.Config` with the given tenants.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import JWSRegistry

from gateway.config import Config, parse_config

HUGE_BODY_BYTES = 10 * 1024 * 1024
ISSUER = "https://idp.example.test/"
AUDIENCE = "realtime-gateway"
SCOPE = "language-model-service:use-model"
UPSTREAM_ENV = {"TEST_UPSTREAM_KEY": "sk-test-upstream"}


# -- keys and tokens ---------------------------------------------------------------------------

@dataclass
class SigningKey:
    """A private key with the ``kid`` and ``alg`` it signs with."""

    key: RSAKey | ECKey
    kid: str
    alg: str

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        """The public JWK with ``kid``, ``alg`` and ``use: sig`` (overridable by ``extra``)."""
        jwk: dict[str, Any] = dict(self.key.as_dict(private=False))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        jwk.update(extra)
        return {k: v for k, v in jwk.items() if v is not None}

    def public_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo)."""
        return self.key.as_pem(private=False)


def new_rsa_key(kid: str = "rsa-1", alg: str = "RS256", bits: int = 2048) -> SigningKey:
    """A fresh RSA key pair."""
    return SigningKey(RSAKey.generate_key(bits, private=True), kid, alg)


def new_ec_key(kid: str = "ec-1", alg: str = "ES256", curve: str = "P-256") -> SigningKey:
    """A fresh EC key pair."""
    return SigningKey(ECKey.generate_key(curve, private=True), kid, alg)


def jwks(*keys: SigningKey) -> dict[str, Any]:
    """``{"keys": [...]}`` with the public halves of ``keys``."""
    return {"keys": [key.public_jwk() for key in keys]}


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def json_segment(value: Any) -> str:
    """A base64url-encoded compact JSON segment."""
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def sign_token(
    claims: Any,
    key: SigningKey,
    *,
    alg: str | None = None,
    kid: str | None = "<key>",
    header: Mapping[str, Any] | None = None,
    payload: bytes | None = None,
) -> str:
    """Sign ``claims`` (or raw ``payload`` bytes) with ``key`` under any header.

    ``alg`` defaults to the key's; ``kid`` defaults to the key's (``None`` omits it);
    ``header`` adds or overrides parameters (e.g. ``jku``, ``x5u``, ``crit``).
    """
    algorithm = alg or key.alg
    protected: dict[str, Any] = {"alg": algorithm, "typ": "at+jwt"}
    if kid is not None:
        protected["kid"] = key.kid if kid == "<key>" else kid
    protected.update(header or {})
    body = payload if payload is not None else json.dumps(claims, separators=(",", ":")).encode()
    signing_input = f"{json_segment(protected)}.{b64url(body)}".encode("ascii")
    signature = JWSRegistry.algorithms[algorithm].sign(signing_input, key.key)
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def hmac_token(claims: Any, secret: bytes, *, alg: str = "HS256", kid: str | None = None) -> str:
    """An HMAC-signed token: the algorithm-confusion forgery when ``secret`` is a public key."""
    protected: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        protected["kid"] = kid
    signing_input = f"{json_segment(protected)}.{json_segment(claims)}".encode("ascii")
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(secret, signing_input, digest).digest()
    return f"{signing_input.decode('ascii')}.{b64url(mac)}"


def unsigned_token(claims: Any, *, alg: str = "none", kid: str | None = None) -> str:
    """An unsecured JWT (RFC 7519 §6): empty signature."""
    protected: dict[str, Any] = {"alg": alg}
    if kid is not None:
        protected["kid"] = kid
    return f"{json_segment(protected)}.{json_segment(claims)}."


def claims_for(
    now: float,
    *,
    issuer: str = ISSUER,
    audience: str | list[str] | None = AUDIENCE,
    sub: str | None = "user-1",
    scope: Any = SCOPE,
    ttl: float = 300,
    **overrides: Any,
) -> dict[str, Any]:
    """Typical access-token claims at time ``now``; ``None`` values are left out."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "scope": scope,
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": "jti-1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


class FakeClock:
    """A settable clock in epoch seconds, starting at the real time."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def poll_until(
    condition: Callable[[], bool], *, within: float = 5.0, interval: float = 0.005
) -> None:
    """Wait until ``condition()`` is true, polling; ``AssertionError`` after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


# -- configuration -----------------------------------------------------------------------------

def tenant(tenant_id: str = "acme", **auth: Any) -> dict[str, Any]:
    """A tenant entry for :func:`make_config`; ``auth`` keys override the defaults
    (issuer :data:`ISSUER`, audience :data:`AUDIENCE`, RS256+ES256, leeway 30 s)."""
    settings: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "required_scope": SCOPE,
        "algorithms": ["RS256", "ES256"],
        "leeway_seconds": 30,
    }
    settings.update(auth)
    return {"id": tenant_id, "auth": settings, "models": {"gpt-realtime": {"upstream": "openai"}}}


def make_config(*tenants: dict[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """A validated :class:`Config` with one OpenAI upstream and ``tenants``."""
    data = {
        "server": {"host": "127.0.0.1"},
        "upstreams": {"openai": {"provider": "openai", "url": "wss://api.openai.com/v1/realtime",
                                 "api_key_env": "TEST_UPSTREAM_KEY"}},
        "tenants": list(tenants),
    }
    return parse_config(data, {**UPSTREAM_ENV, **(environ or {})})


# -- HTTP server -------------------------------------------------------------------------------

@dataclass
class Request:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class IdpServer:
    """A loopback identity provider.  Use ``async with IdpServer() as idp:``.

    Attributes set by tests: ``jwks`` (served at ``/jwks``), ``max_age`` (``Cache-Control``
    seconds or ``None``), ``issuer``, ``discovery_issuer`` and ``discovery_jwks_uri``
    (override the metadata's ``issuer`` and ``jwks_uri``),
    ``answers`` (token → introspection response; unknown tokens are inactive),
    ``client_id``/``client_secret`` (required Basic credentials), ``modes`` (path → mode).
    """

    issuer: str = ISSUER
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    max_age: int | None = None
    discovery_issuer: str | None = None
    discovery_jwks_uri: str | None = None
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    client_id: str = "gateway"
    client_secret: str = "s3cret"
    modes: dict[str, str] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    peak_in_flight: Counter[str] = field(default_factory=Counter)
    requests: list[Request] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    async def __aenter__(self) -> IdpServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/jwks"

    @property
    def discovery_url(self) -> str:
        return f"{self.base_url}/.well-known/openid-configuration"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    def release(self) -> None:
        """Let held (``"slow"``) responses proceed (they then answer 500)."""
        self._release.set()

    async def aclose(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            for task in list(self._handlers):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            request = await self._read_request(reader)
            if request is not None:
                await self._respond(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> Request | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        return Request(method, urlsplit(target).path, headers, body)

    async def _respond(self, request: Request, writer: asyncio.StreamWriter) -> None:
        path = request.path
        self.counts[path] += 1
        self.requests.append(request)
        self.in_flight[path] += 1
        self.peak_in_flight[path] = max(self.peak_in_flight[path], self.in_flight[path])
        try:
            mode = self.modes.get(path, "ok")
            if mode == "slow":
                await self._release.wait()
                mode = "500"
            await self._send_for_mode(mode, request, writer)
        finally:
            self.in_flight[path] -= 1

    async def _send_for_mode(
        self, mode: str, request: Request, writer: asyncio.StreamWriter
    ) -> None:
        if mode == "500":
            await send_response(writer, 500, b'{"error":"server_error"}')
        elif mode == "garbage":
            await send_response(writer, 200, b"<html>this is not JSON {")
        elif mode == "huge":
            await _send_huge(writer, chunked=False)
        elif mode == "huge-chunked":
            await _send_huge(writer, chunked=True)
        elif mode == "ok":
            await self._send_ok(request, writer)
        else:
            raise AssertionError(f"unknown mode {mode}")

    async def _send_ok(self, request: Request, writer: asyncio.StreamWriter) -> None:
        if request.path == "/jwks":
            headers = {} if self.max_age is None else {"cache-control": f"max-age={self.max_age}"}
            await send_response(writer, 200, json.dumps(self.jwks).encode(), headers)
        elif request.path == "/.well-known/openid-configuration":
            metadata = {
                "issuer": self.discovery_issuer if self.discovery_issuer is not None
                else self.issuer,
                "jwks_uri": self.discovery_jwks_uri or self.jwks_url,
                "introspection_endpoint": self.introspection_url,
            }
            await send_response(writer, 200, json.dumps(metadata).encode())
        elif request.path == "/introspect" and request.method == "POST":
            await self._introspect(request, writer)
        else:
            await send_response(writer, 404, b'{"error":"not_found"}')

    async def _introspect(self, request: Request, writer: asyncio.StreamWriter) -> None:
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            await send_response(writer, 401, b'{"error":"invalid_client"}')
            return
        form = parse_qs(request.body.decode())
        token = form.get("token", [""])[0]
        answer = self.answers.get(token, {"active": False})
        await send_response(writer, 200, json.dumps(answer).encode())


async def send_response(
    writer: asyncio.StreamWriter, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    """Write a complete HTTP/1.1 response (``connection: close``) with a JSON content type."""
    lines = [f"HTTP/1.1 {status} X", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


async def _send_huge(writer: asyncio.StreamWriter, *, chunked: bool) -> None:
    head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
    if not chunked:
        head += f"content-length: {HUGE_BODY_BYTES}\r\n"
    writer.write((head + "\r\n").encode())
    writer.write(b'{"keys":[')
    chunk = b" " * 65536
    for _ in range(HUGE_BODY_BYTES // len(chunk)):  # bounded; the client hangs up early
        writer.write(chunk)
        await writer.drain()


class ConnectionCounter:
    """A TCP listener on 127.0.0.1 that counts connections and closes them at once."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnectionCounter:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/keys"

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def gather_settled(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather(..., return_exceptions=True)`` with a precise type."""
    return list(await asyncio.gather(*aws, return_exceptions=True))
