"""One session's path: authenticate → admit → dial → relay → account (DESIGN, "The path").

Every stage before the 101 may refuse by raising a :class:`gateway.errors.GatewayError`;
:func:`refuse` turns it into the client's answer in one place (CONTRACT §5):
header-credential clients get an HTTP status before the upgrade, subprotocol
clients (browsers) are accepted, sent an ``error`` event and closed ``4000 + status``.

The stages take plain values (:class:`HandshakeRequest`), not ASGI objects; only
:func:`handle` speaks ASGI; after the 101 the connection belongs to :mod:`gateway.relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from gateway.auth.authenticator import Principal
from gateway.config import ModelRoute, TenantConfig
from gateway.credentials import Credentials, extract_credentials, select_subprotocol
from gateway.errors import (
    SESSION_EXPIRED,
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
from gateway.relay import Relay, RelayResult
from gateway.upstream import HandOffConnection, UpstreamTarget, dial
from gateway.usage import KINDS, TokenCounts

if TYPE_CHECKING:
    from gateway.app import Gateway

log = get_logger(__name__)

AZURE_PREVIEW_PATH = "/openai/realtime"
REALTIME_PATHS = ("/v1/realtime", "/openai/v1/realtime", AZURE_PREVIEW_PATH,
                  "/language-model-service/ws/v1/open-ai/realtime")
MIN_TOKEN_LIFETIME = 1.0
"""Seconds; a token with less left is refused (the session would close at once)."""
MAX_MODEL_NAME = 128
RENEWAL_WAIT_SECONDS = 1.0
"""Seconds a session's end waits at most for its lease renewal in flight (one limiter call,
itself bounded by ``redis.timeout_seconds``)."""
MIN_UPSTREAM_MESSAGE_CAP = 16 * 1024 * 1024
"""Bytes; upstream messages up to this size (or ``server.max_message_bytes`` if larger)
are relayed, a larger one fails the upstream 1009."""
HAND_OFF = "gateway.hand_off"
"""ASGI scope extension set by :class:`gateway.server.GatewayWebSocketProtocol`:
``{"call": HandOff}``."""

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
HandOff = Callable[[str | None], asyncio.Transport | None]
"""Writes the 101 (with the given subprotocol) and returns the client's transport, or
``None`` when the client already went away."""


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
    upstream: HandOffConnection | None
    """``None`` once the connection is handed to the relay (:func:`start_session`)."""


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
        upstream = await dial(target, connect_timeout=upstream_config.connect_timeout_seconds)
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


def model_guard(admitted: Admitted) -> Callable[[str | bytes], str | None]:
    """Model pinning for client ``session.update`` events (issue: a client must not switch
    its session to a model the tenant may not use).

    The returned guard takes one client text message (``str``, or its UTF-8 ``bytes``)
    and returns ``None`` to forward it, or the ``error`` event (JSON text) to send back
    instead.  It lets a ``session.update`` through when it names no model
    (``session.model`` absent or ``null``) or the session's own (its client-facing name
    or the upstream's name for it).  Refused with a ``forbidden`` ``error`` event, not
    forwarded, the session going on with its model:

    * any other ``session.model``, and any that is not a string (number, list, object);
    * a message with a duplicate key in any object when any of its objects has
      ``"type": "session.update"`` (escapes decoded): Python keeps the last value of
      a key, other parsers the first, so the upstream could see another event or model;
    * valid JSON nested too deep for Python's parser (``RecursionError``): another
      parser may accept it, so it cannot be checked and is treated as a model switch.

    Syntactically invalid JSON passes: the upstream answers it with its own error.
    Never raises.
    """
    own = {admitted.model, admitted.route.upstream_model or admitted.model}
    refusal = Forbidden("this model is not available to your session", reason="model_pinning")

    def guard(frame: str | bytes) -> str | None:
        duplicate = names_update = False

        def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            nonlocal duplicate, names_update
            obj = dict(pairs)
            if len(obj) != len(pairs):
                duplicate = True
                names_update = names_update or any(
                    key == "type" and value == "session.update" for key, value in pairs)
            elif obj.get("type") == "session.update":
                names_update = True
            return obj

        try:
            event = json.loads(frame, object_pairs_hook=pairs_hook)
        except RecursionError:
            return refusal.error_event()
        except ValueError:  # UnicodeDecodeError included
            return None
        if duplicate and names_update:
            return refusal.error_event()
        if not isinstance(event, dict) or event.get("type") != "session.update":
            return None
        session = event.get("session")
        model = session.get("model") if isinstance(session, dict) else None
        if model is None or (isinstance(model, str) and model in own):
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
    """A session between its 101 and its close: usage accounting, counters, deadlines.

    Its periodic work (counters, send deadline, usage charges, lease renewals) is done by
    the gateway's :class:`gateway.housekeeping.Housekeeper`, not by a task of its own.
    """

    gw: Gateway
    admitted: Admitted
    session_id: str
    peer: str
    """The client's address, ``host:port``."""
    relay: Relay = field(init=False)
    task: asyncio.Task[None] = field(init=False)
    started: float = field(default_factory=time.monotonic)
    next_renewal: float = 0.0
    """Event-loop time (seconds) at which the lease is next renewed."""
    pending_usage: list[TokenCounts] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    billable_tokens: int = 0
    _published: tuple[int, int, int, int] = (0, 0, 0, 0)
    _blocked: float = 0.0
    _last_progress: tuple[int, int] = (-1, -1)
    _renewal: asyncio.Future[None] | None = None

    def __post_init__(self) -> None:
        self.next_renewal = asyncio.get_running_loop().time() + self.gw.lease_renewal_seconds

    def on_usage(self, counts: TokenCounts) -> None:
        """Called by the relay for each usage event; never blocks the pump."""
        self.pending_usage.append(counts)

    @property
    def labels(self) -> tuple[str, str, str]:
        """``(tenant, model, upstream)``, the session metrics' labels."""
        a = self.admitted
        return a.principal.tenant.id, a.model, a.route.upstream

    def end(self, cause: SessionEnd) -> None:
        self.relay.end(cause)

    def take_pending(self) -> int:
        """Count the pending usage in ``tokens_total`` and the session's totals; return its
        billable tokens (0 when there is none), which the caller charges."""
        if not self.pending_usage:
            return 0
        batch, self.pending_usage = self.pending_usage, []
        tenant_id = self.admitted.principal.tenant.id
        total = 0
        for counts in batch:
            total += counts.billable
            for kind, value in counts.by_kind().items():
                if value:
                    self.tokens[kind] += value
                    self.gw.metrics.tokens_total.labels(tenant_id, self.admitted.model,
                                                        kind).inc(value)
        self.billable_tokens += total
        return total

    async def charge_pending(self) -> Balance | None:
        """:meth:`take_pending` and debit the tenant's budget now (at the session's end);
        ``None`` when there was nothing to charge or the limiter failed (counted)."""
        total = self.take_pending()
        tenant = self.admitted.principal.tenant
        if not total or tenant.limits.tokens_per_minute is None:
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

    @contextlib.contextmanager
    def renewing(self) -> Iterator[None]:
        """Marks a lease renewal in flight (see :meth:`renewal_settled`)."""
        self._renewal = asyncio.get_running_loop().create_future()
        try:
            yield
        finally:
            self._renewal.set_result(None)
            self._renewal = None

    async def renewal_settled(self) -> None:
        """Wait (at most :data:`RENEWAL_WAIT_SECONDS`) for a renewal in flight to finish.

        A renewal re-acquires a lease that is gone (by design, after a Redis restart), so
        one that lands after the session's release would hold the user's slot until the
        lease expires: the session's end waits for it before releasing.
        """
        if self._renewal is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RENEWAL_WAIT_SECONDS):
                    await asyncio.shield(self._renewal)

    def blocked_for(self, interval: float) -> float:
        """Seconds (counted in steps of ``interval``, the caller's period) for which a send
        has been blocked on backpressure with no message relayed either way."""
        r = self.relay
        progress = (r.client_messages, r.upstream_messages)
        blocked = r.sending_to_client or r.sending_to_upstream
        self._blocked = self._blocked + interval if (
            blocked and progress == self._last_progress) else 0.0
        self._last_progress = progress
        return self._blocked


async def handle(gw: Gateway, scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Serve one WebSocket upgrade on a realtime path, from ``websocket.connect`` to close."""
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    if HAND_OFF not in scope.get("extensions", {}):
        raise RuntimeError("realtime sessions need gateway.server's uvicorn protocol "
                           "(the relay takes the connection over after the upgrade)")
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
    hand_off: HandOff = scope["extensions"][HAND_OFF]["call"]
    client = hand_off(select_subprotocol(request.subprotocols))
    if client is None:  # the client went away during the handshake
        assert admitted.upstream is not None
        admitted.upstream.hang_up(1001, "client went away")
        await gw.release(admitted.lease)
        return
    start_session(gw, admitted, client, request.client)


def start_session(gw: Gateway, admitted: Admitted, client: asyncio.Transport,
                  peer: str) -> LiveSession:
    """Hand both connections to a :class:`Relay` and run the session in a task of its own.

    The upgrade's ASGI task then ends, and with it everything of the handshake (uvicorn's
    protocol object, the request and its headers, the upstream's ``websockets``
    connection object): a live session holds only what it needs (memory per session:
    ``bench/README.md``).
    """
    upstream = admitted.upstream
    assert upstream is not None
    admitted.upstream = None
    server = gw.config.server
    live = LiveSession(gw, admitted, admitted.lease.session_id, peer)
    live.relay = Relay(
        client, upstream.transport, live.on_usage, guard=model_guard(admitted),
        upstream_buffered=upstream.take_raw(), upstream_lost=upstream.lost,
        max_client_message=server.max_message_bytes,
        max_upstream_message=max(server.max_message_bytes, MIN_UPSTREAM_MESSAGE_CAP),
        ping_interval=server.ping_interval_seconds, ping_timeout=server.ping_timeout_seconds)
    gw.register(live)
    gw.metrics.sessions_active.labels(*live.labels).inc()
    live.task = asyncio.create_task(run_session(gw, live))
    return live


async def run_session(gw: Gateway, live: LiveSession) -> None:
    """Relay until close, then release and account (the task :func:`start_session` starts)."""
    admitted = live.admitted
    principal = admitted.principal
    tenant = principal.tenant
    labels = live.labels
    relay = live.relay
    log.info("session.start", session_id=live.session_id, tenant=tenant.id,
             subject=principal.subject, model=admitted.model, upstream=admitted.route.upstream,
             client=live.peer)
    loop = asyncio.get_running_loop()
    timers = [loop.call_later(tenant.limits.max_session_seconds, live.end, SESSION_EXPIRED)]
    if principal.expires_at is not None:
        timers.append(loop.call_later(max(0.0, principal.expires_at - time.time()),
                                      live.end, TOKEN_EXPIRED))
    result: RelayResult | None = None
    try:
        result = await relay.run()
    finally:
        for timer in timers:
            timer.cancel()
        gw.unregister(live)  # the housekeeping loop starts no renewal of it from here on
        await live.renewal_settled()
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

