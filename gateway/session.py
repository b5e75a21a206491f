"""One session's path: authenticate → admit → dial → relay → account (DESIGN, "The path").

Every stage before the 101 may refuse by raising a :class:`gateway.errors.GatewayError`;
:func:`refuse` turns it into the client's answer in one place (CONTRACT §5):
header-credential clients get an HTTP status before the upgrade, subprotocol
clients (browsers) are accepted, sent an ``error`` event and closed ``4000 + status``.

The stages take plain values (:class:`HandshakeRequest`), not ASGI objects; only
:func:`handle` and :mod:`gateway.relay` speak ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from websockets.asyncio.client import ClientConnection

from gateway.auth.authenticator import Principal
from gateway.config import ModelRoute, TenantConfig
from gateway.credentials import Credentials, extract_credentials, select_subprotocol
from gateway.errors import (
    BUDGET_EXHAUSTED,
    SESSION_EXPIRED,
    SLOW_CONSUMER,
    TOKEN_EXPIRED,
    Forbidden,
    GatewayError,
    InvalidRequest,
    InvalidToken,
    SessionEnd,
    UpstreamTimeout,
)
from gateway.limits.base import Balance, Lease, LimiterUnavailable
from gateway.logs import get_logger
from gateway.metrics import UNKNOWN_TENANT
from gateway.relay import Receive, Relay, RelayResult, Send
from gateway.upstream import UpstreamTarget, dial
from gateway.usage import KINDS, TokenCounts

if TYPE_CHECKING:
    from gateway.app import Gateway

log = get_logger(__name__)

AZURE_PREVIEW_PATH = "/openai/realtime"
REALTIME_PATHS = ("/v1/realtime", "/openai/v1/realtime", AZURE_PREVIEW_PATH,
                  "/language-model-service/ws/v1/open-ai/realtime")
MIN_TOKEN_LIFETIME = 1.0
"""Seconds; a token with less left is refused (the session would close at once)."""
HOUSEKEEPING_SECONDS = 1.0
"""How often a live session publishes counters, checks send deadlines and charges usage."""
MAX_MODEL_NAME = 128


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """The parts of a WebSocket upgrade request the pipeline reads.

    ``headers`` are raw ``(name, value)`` byte pairs with lower-case names (ASGI);
    ``subprotocols`` the offered values, split on commas.
    """

    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[bytes, bytes], ...]
    subprotocols: tuple[str, ...]
    client: str

    @classmethod
    def from_scope(cls, scope: dict[str, Any]) -> HandshakeRequest:
        client = scope.get("client")
        return cls(
            path=scope["path"],
            query=tuple(parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                  keep_blank_values=True)),
            headers=tuple(scope.get("headers", ())),
            subprotocols=tuple(scope.get("subprotocols", ())),
            client=f"{client[0]}:{client[1]}" if client else "",
        )

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower-case), decoded as Latin-1."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def param(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None

    def model(self) -> str:
        """The requested model: ``model=``, or ``deployment=`` on the Azure preview path.

        Raises:
            InvalidRequest: neither is present, or the value is implausible (400).
        """
        model = self.param("model")
        if model is None and self.path == AZURE_PREVIEW_PATH:
            model = self.param("deployment")
        if not model:
            raise InvalidRequest("the model query parameter is required")
        if len(model) > MAX_MODEL_NAME or not model.isprintable():
            raise InvalidRequest("the model query parameter is malformed")
        return model


@dataclass(slots=True)
class Admitted:
    """A session that passed every check and holds an upstream connection and a lease."""

    principal: Principal
    model: str
    route: ModelRoute
    lease: Lease
    upstream: ClientConnection


def check_origin(gw: Gateway, request: HandshakeRequest) -> None:
    """Refuse a browser ``Origin`` not on ``server.allowed_origins`` (empty list: any).

    Requests without ``Origin`` (native clients) pass.  Raises :class:`Forbidden`.
    """
    allowed = gw.config.server.allowed_origins
    origin = request.header(b"origin")
    if allowed and origin is not None and origin not in allowed:
        raise Forbidden("this Origin is not allowed", reason="origin")


def route_model(tenant: TenantConfig, model: str) -> ModelRoute:
    """The tenant's route for ``model``.  Raises :class:`Forbidden` when not configured."""
    route = tenant.models.get(model)
    if route is None:
        raise Forbidden("this model is not available to your tenant", reason="model")
    return route


async def open_session(gw: Gateway, request: HandshakeRequest, credentials: Credentials,
                       phase: Callable[[str, float], None]) -> Admitted:
    """Authenticate, admit and dial; on success the caller owns the lease and the upstream.

    ``phase(name, seconds)`` is told the duration of each completed phase.
    Raises a :class:`GatewayError`; nothing is held when it does.
    """
    check_origin(gw, request)
    model = request.model()

    started = time.perf_counter()
    principal = await gw.authenticator.authenticate(credentials.token)
    try:
        return await _admit_and_dial(gw, request, principal, model, phase, started)
    except GatewayError as exc:
        exc.tenant = principal.tenant.id
        raise


async def _admit_and_dial(gw: Gateway, request: HandshakeRequest, principal: Principal,
                          model: str, phase: Callable[[str, float], None],
                          started: float) -> Admitted:
    if principal.expires_at is not None and (
            principal.expires_at - time.time() < MIN_TOKEN_LIFETIME):
        raise InvalidToken("the access token expired", reason="expired")
    route = route_model(principal.tenant, model)
    now = time.perf_counter()
    phase("auth", now - started)

    lease = Lease(principal.tenant.id, principal.subject, secrets.token_hex(8))
    started = now
    await gw.admit(lease, principal.tenant)
    now = time.perf_counter()
    phase("admission", now - started)

    upstream_config = gw.config.upstreams[route.upstream]
    target = UpstreamTarget(
        name=route.upstream,
        config=upstream_config,
        model=route.upstream_model or model,
        params=request.query,
        user_agent=request.header(b"user-agent"),
        openai_beta=request.header(b"openai-beta"),
    )
    started = now
    try:
        upstream = await dial(
            target,
            connect_timeout=upstream_config.connect_timeout_seconds,
            max_message_bytes=max(gw.config.server.max_message_bytes, 16 * 1024 * 1024),
            ping_interval=gw.config.server.ping_interval_seconds,
            ping_timeout=gw.config.server.ping_timeout_seconds,
        )
    except GatewayError as exc:
        phase("upstream_connect", time.perf_counter() - started)
        gw.metrics.upstream_connect_errors_total.labels(route.upstream, exc.reason).inc()
        await gw.release(lease)
        raise
    except BaseException:
        await gw.release(lease)
        raise
    phase("upstream_connect", time.perf_counter() - started)
    return Admitted(principal, model, route, lease, upstream)


def model_guard(admitted: Admitted) -> Callable[[str], str | None]:
    """Model pinning for client ``session.update`` events (issue: a client must not switch
    its session to a model the tenant may not use).

    The returned guard lets a ``session.update`` through when it names no model or the
    session's own (its client-facing name or the upstream's name for it); any other
    ``session.model`` is refused with a ``forbidden`` ``error`` event and not forwarded,
    and the session goes on with its model.  Unparseable frames pass: the upstream
    answers them with its own error.
    """
    own = {admitted.model, admitted.route.upstream_model or admitted.model}
    refusal = Forbidden("this model is not available to your session", reason="model_pinning")

    def guard(frame: str) -> str | None:
        try:
            event = json.loads(frame)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("type") != "session.update":
            return None
        session = event.get("session")
        model = session.get("model") if isinstance(session, dict) else None
        if model is None or model in own:
            return None
        return refusal.error_event()

    return guard


async def refuse(send: Send, exc: GatewayError, request: HandshakeRequest,
                 credentials: Credentials | None) -> None:
    """Answer a refused upgrade (CONTRACT §5): an HTTP status for header clients;
    accept + ``error`` event + close ``4000 + status`` for subprotocol clients."""
    browser = credentials.in_subprotocol if credentials else bool(request.subprotocols)
    with contextlib.suppress(OSError, RuntimeError):
        if browser:
            await send({"type": "websocket.accept",
                        "subprotocol": select_subprotocol(request.subprotocols)})
            await send({"type": "websocket.send", "text": exc.error_event()})
            await send({"type": "websocket.close", "code": exc.close_code,
                        "reason": exc.code})
            return
        headers = [(k.encode(), v.encode()) for k, v in exc.http_headers().items()]
        await send({"type": "websocket.http.response.start", "status": exc.http_status,
                    "headers": headers})
        await send({"type": "websocket.http.response.body", "body": exc.http_body()})


@dataclass(eq=False)
class LiveSession:
    """A session between its 101 and its close: timers, usage accounting, counters."""

    gw: Gateway
    admitted: Admitted
    session_id: str
    relay: Relay = field(init=False)
    started: float = field(default_factory=time.monotonic)
    pending_usage: list[TokenCounts] = field(default_factory=list)
    usage_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    billable_tokens: int = 0
    _published: tuple[int, int, int, int] = (0, 0, 0, 0)

    def on_usage(self, counts: TokenCounts) -> None:
        """Called by the relay for each usage event; never blocks the pump."""
        self.pending_usage.append(counts)
        self.usage_arrived.set()

    def end(self, cause: SessionEnd) -> None:
        self.relay.end(cause)

    async def charge_pending(self) -> Balance | None:
        """Count pending usage in ``tokens_total`` and debit the tenant's budget."""
        if not self.pending_usage:
            return None
        batch, self.pending_usage = self.pending_usage, []
        tenant = self.admitted.principal.tenant
        total = 0
        for counts in batch:
            total += counts.billable
            for kind, value in counts.by_kind().items():
                if value:
                    self.tokens[kind] += value
                    self.gw.metrics.tokens_total.labels(tenant.id, self.admitted.model,
                                                        kind).inc(value)
        self.billable_tokens += total
        if tenant.limits.tokens_per_minute is None:
            return None
        try:
            return await self.gw.limiter.charge(tenant.id, tenant.limits, total)
        except LimiterUnavailable as exc:
            self.gw.metrics.limiter_errors_total.labels(exc.operation).inc()
            return None

    def publish_counters(self) -> None:
        """Add the relay's counters since the last call to the Prometheus counters."""
        r = self.relay
        now = (r.client_messages, r.client_bytes, r.upstream_messages, r.upstream_bytes)
        last = self._published
        if now == last:
            return
        m = self.gw.metrics
        m.messages_client_to_upstream.inc(now[0] - last[0])
        m.bytes_client_to_upstream.inc(now[1] - last[1])
        m.messages_upstream_to_client.inc(now[2] - last[2])
        m.bytes_upstream_to_client.inc(now[3] - last[3])
        self._published = now

    async def housekeeping(self) -> None:
        """Once a second (and at once when usage arrives): charge usage, publish counters,
        enforce send deadlines; every lease/3 seconds: renew the lease."""
        tenant = self.admitted.principal.tenant
        send_timeout = self.gw.config.server.send_timeout_seconds
        renew_every = self.gw.lease_renewal_seconds
        loop = asyncio.get_running_loop()
        next_renewal = loop.time() + renew_every
        stalled = 0.0
        last_progress = (-1, -1)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOUSEKEEPING_SECONDS):
                    await self.usage_arrived.wait()
            self.usage_arrived.clear()
            balance = await self.charge_pending()
            if balance is not None and balance.overdrawn(tenant.limits):
                self.end(BUDGET_EXHAUSTED)
            self.publish_counters()
            r = self.relay
            progress = (r.client_messages, r.upstream_messages)
            blocked = r.sending_to_client or r.sending_to_upstream
            stalled = stalled + HOUSEKEEPING_SECONDS if blocked and progress == last_progress else 0
            last_progress = progress
            if stalled >= send_timeout:
                self.end(SLOW_CONSUMER)
            if loop.time() >= next_renewal:
                next_renewal = loop.time() + renew_every
                try:
                    balance = await self.gw.limiter.renew(self.admitted.lease, tenant.limits)
                except LimiterUnavailable as exc:
                    self.gw.metrics.limiter_errors_total.labels(exc.operation).inc()
                else:
                    if balance.overdrawn(tenant.limits):
                        self.end(BUDGET_EXHAUSTED)


async def handle(gw: Gateway, scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Serve one WebSocket upgrade on a realtime path, from ``websocket.connect`` to close."""
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    request = HandshakeRequest.from_scope(scope)
    started = time.perf_counter()
    credentials: Credentials | None = None
    tenant_id = UNKNOWN_TENANT
    handshake = gw.metrics.handshake_duration_seconds

    def phase(name: str, seconds: float) -> None:
        handshake.labels(name).observe(seconds)

    try:
        gw.check_capacity()
        gw.pending_handshakes += 1
        try:
            credentials = extract_credentials(request.headers, request.subprotocols)
            try:
                async with asyncio.timeout(gw.config.server.handshake_timeout_seconds):
                    admitted = await open_session(gw, request, credentials, phase)
            except TimeoutError:
                raise UpstreamTimeout("the session could not be opened in time",
                                      reason="handshake_timeout") from None
        finally:
            gw.pending_handshakes -= 1
    except GatewayError as exc:
        tenant_id = exc.tenant or tenant_id
        gw.metrics.session_rejections_total.labels(tenant_id, exc.code).inc()
        log.info("session.rejected", code=exc.code, status=exc.http_status, reason=exc.reason,
                 message=exc.message, tenant=tenant_id, path=request.path,
                 carrier=credentials.carrier if credentials else None, client=request.client)
        await refuse(send, exc, request, credentials)
        return
    phase("total", time.perf_counter() - started)
    await run_session(gw, admitted, request, send, receive)


async def run_session(gw: Gateway, admitted: Admitted, request: HandshakeRequest, send: Send,
                      receive: Receive) -> None:
    """Accept the client, relay until close, then release and account."""
    principal = admitted.principal
    tenant = principal.tenant
    labels = (tenant.id, admitted.model, admitted.route.upstream)
    try:
        await send({"type": "websocket.accept",
                    "subprotocol": select_subprotocol(request.subprotocols)})
    except (OSError, RuntimeError):
        await admitted.upstream.close(1001, "client went away")
        await gw.release(admitted.lease)
        return
    live = LiveSession(gw, admitted, admitted.lease.session_id)
    relay = live.relay = Relay(receive, send, admitted.upstream, live.on_usage,
                               guard=model_guard(admitted))
    gw.register(live)
    gw.metrics.sessions_active.labels(*labels).inc()
    log.info("session.start", session_id=live.session_id, tenant=tenant.id,
             subject=principal.subject, model=admitted.model, upstream=admitted.route.upstream,
             client=request.client)
    loop = asyncio.get_running_loop()
    timers = [loop.call_later(tenant.limits.max_session_seconds, live.end, SESSION_EXPIRED)]
    if principal.expires_at is not None:
        timers.append(loop.call_later(max(0.0, principal.expires_at - time.time()),
                                      live.end, TOKEN_EXPIRED))
    keeper = asyncio.create_task(live.housekeeping())
    result: RelayResult | None = None
    try:
        result = await relay.run()
    finally:
        for timer in timers:
            timer.cancel()
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        gw.unregister(live)
        await live.charge_pending()
        live.publish_counters()
        await gw.release(admitted.lease)
        duration = time.monotonic() - live.started
        m = gw.metrics
        m.sessions_active.labels(*labels).dec()
        outcome = "upstream_error" if result is None else (  # None: the relay itself failed
            result.end.code if result.end else "ok")
        m.sessions_total.labels(*labels, outcome).inc()
        m.session_duration_seconds.labels(tenant.id, admitted.model).observe(duration)
        if result is not None:
            m.closes_total.labels(result.initiator, str(result.code)).inc()
        log.info(
            "session.end", session_id=live.session_id, tenant=tenant.id,
            subject=principal.subject, model=admitted.model, upstream=admitted.route.upstream,
            duration_s=round(duration, 3), outcome=outcome,
            close_code=result.code if result else None,
            close_initiator=result.initiator if result else None,
            client_to_upstream_messages=relay.client_messages,
            client_to_upstream_bytes=relay.client_bytes,
            upstream_to_client_messages=relay.upstream_messages,
            upstream_to_client_bytes=relay.upstream_bytes,
            tokens=live.billable_tokens, tokens_by_kind=live.tokens,
        )

