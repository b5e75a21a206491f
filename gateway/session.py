"""One WebSocket session's path (DESIGN "The path of one session"):

    upgrade → credentials → authenticate → admit → dial upstream → 101 → relay → account

Every stage before the 101 may refuse by raising a :class:`~gateway.errors.GatewayError`;
:func:`handle` logs and counts it and :func:`gateway.handshake.refuse` answers it, in one
place (CONTRACT §5).  The stages take plain values (:class:`~gateway.handshake.HandshakeRequest`)
and the gateway's :class:`~gateway.services.Services`; after the 101 the connection belongs to
:mod:`gateway.relay`, the session's books to :mod:`gateway.accounting`, and its periodic work
(renewals, charges, counters) to :mod:`gateway.housekeeping`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.accounting import Account, Counters, Ending
from gateway.auth.authenticator import Principal
from gateway.auth.client_secrets import is_client_secret, session_model, session_update
from gateway.beta import is_beta
from gateway.beta_relay import BetaRelay
from gateway.config import ModelRoute, TenantConfig
from gateway.credentials import Credentials, extract_credentials, select_subprotocol
from gateway.errors import (
    SESSION_EXPIRED,
    TOKEN_EXPIRED,
    BetaRefused,
    Forbidden,
    GatewayError,
    InvalidRequest,
    SessionEnd,
    UpstreamTimeout,
)
from gateway.guard import model_guard
from gateway.handoff import HAND_OFF, HandOff, HandOffConnection
from gateway.handshake import HandshakeRequest, Send, refuse
from gateway.housekeeping import Housekeeper
from gateway.limits.base import Lease
from gateway.logs import get_logger
from gateway.metrics import UNKNOWN_TENANT, Metrics
from gateway.registry import Registry
from gateway.relay import Relay, RelayResult
from gateway.services import Services
from gateway.upstream import UpstreamTarget, dial

log = get_logger(__name__)

MIN_UPSTREAM_MESSAGE_CAP = 16 * 1024 * 1024
"""Bytes; upstream messages up to this size (or ``server.max_message_bytes`` if larger)
are relayed, a larger one fails the upstream 1009."""

Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Admitted:
    """A session that passed every check and holds an upstream connection and a lease."""

    principal: Principal
    model: str
    route: ModelRoute
    lease: Lease
    upstream: HandOffConnection
    beta: bool = False
    """A Realtime beta-protocol client, served through :class:`BetaRelay` (CONTRACT §10)."""

    @property
    def models(self) -> frozenset[str]:
        """The session's own model names: the client's and the upstream's (model pinning)."""
        return frozenset((self.model, self.route.upstream_model or self.model))


class Phases:
    """Observes ``handshake_duration_seconds{phase}``: each :meth:`done` the time since the
    previous one (seconds, ``time.perf_counter``)."""

    def __init__(self, metrics: Metrics) -> None:
        self._histogram = metrics.handshake_duration_seconds
        self.started = self._last = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self._histogram.labels(phase).observe(now - self._last)
        self._last = now

    def total(self) -> None:
        self._histogram.labels("total").observe(time.perf_counter() - self.started)


async def handle(services: Services, registry: Registry, housekeeper: Housekeeper,
                 scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Serve one WebSocket upgrade on a realtime path, from ``websocket.connect`` to the 101
    (the session then runs in a task of its own) or the refusal."""
    if (await receive())["type"] != "websocket.connect":
        return
    if HAND_OFF not in scope.get("extensions", {}):
        raise RuntimeError("realtime sessions need gateway.handoff's uvicorn protocol "
                           "(the relay takes the connection over after the upgrade)")
    request = HandshakeRequest.from_scope(scope)
    credentials: Credentials | None = None
    try:
        with registry.handshake() as pending:
            credentials = extract_credentials(request.headers, request.subprotocols,
                                              request.query)
            beta = is_beta(request.path, request.query, request.headers, request.subprotocols)
            if beta and services.config.server.beta_clients == "refuse":
                raise BetaRefused()
            admitted = await open_session(services, request, credentials, beta=beta,
                                          on_authenticated=pending.authenticated)
    except GatewayError as exc:
        tenant = exc.tenant or UNKNOWN_TENANT
        services.metrics.session_rejections_total.labels(tenant, exc.code).inc()
        log.info("session.rejected", code=exc.code, status=exc.http_status, reason=exc.reason,
                 message=exc.message, tenant=tenant, path=request.path,
                 carrier=credentials.carrier if credentials else None, client=request.client)
        await refuse(send, exc, request, credentials)
        return
    hand_off: HandOff = scope["extensions"][HAND_OFF]["call"]
    client = hand_off(select_subprotocol(request.subprotocols))
    if client is None:  # the client went away during the handshake
        admitted.upstream.hang_up(1001, "client went away")
        await services.limiter.release(admitted.lease)
        return
    start_session(services, registry, housekeeper, admitted, client, request.client)


async def open_session(services: Services, request: HandshakeRequest,
                       credentials: Credentials, *, beta: bool = False,
                       on_authenticated: Callable[[], None] = lambda: None) -> Admitted:
    """Authenticate, admit and dial within ``server.handshake_timeout_seconds``; on success
    the caller owns the lease and the upstream connection, on a refusal nothing is held.
    ``beta``: the client speaks the beta protocol (the upstream is dialled GA, without the
    client's ``OpenAI-Beta`` header).  ``on_authenticated`` is called once the token is
    valid (it may refuse: the replica's capacity is taken there,
    :meth:`gateway.registry.Handshake.authenticated`).

    Raises:
        GatewayError: any refusal of CONTRACT §5; :class:`UpstreamTimeout`
            (``reason="handshake_timeout"``) when the whole handshake took too long.
    """
    phases = Phases(services.metrics)
    try:
        async with asyncio.timeout(services.config.server.handshake_timeout_seconds):
            request.check_origin(services.config.server.allowed_origins)
            requested = request.model()
            if requested is None and not is_client_secret(credentials.token):
                raise InvalidRequest("the model query parameter is required")
            principal = await services.authenticator.authenticate(credentials.token)
            try:
                on_authenticated()
                model = session_model(principal.secret, requested)
                admitted = await _admit_and_dial(services, request, principal, model, phases,
                                                 beta)
            except GatewayError as exc:
                exc.tenant = principal.tenant.id
                raise
    except TimeoutError:
        raise UpstreamTimeout("the session could not be opened in time",
                              reason="handshake_timeout") from None
    phases.total()
    return admitted


def route_model(tenant: TenantConfig, model: str) -> ModelRoute:
    """The tenant's route for ``model``.  Raises :class:`Forbidden` when not configured."""
    route = tenant.models.get(model)
    if route is None:
        raise Forbidden("this model is not available to your tenant", reason="model")
    return route


async def _admit_and_dial(services: Services, request: HandshakeRequest, principal: Principal,
                          model: str, phases: Phases, beta: bool) -> Admitted:
    route = route_model(principal.tenant, model)
    phases.done("auth")
    lease = Lease(principal.tenant.id, principal.subject, secrets.token_hex(8))
    await services.limiter.admit(lease, principal.tenant.limits)
    phases.done("admission")
    upstream_config = services.config.upstreams[route.upstream]
    target = UpstreamTarget(
        name=route.upstream, config=upstream_config, model=route.upstream_model or model,
        params=request.query, user_agent=request.header(b"user-agent"),
        openai_beta=None if beta else request.header(b"openai-beta"))
    try:
        upstream = await dial(target, connect_timeout=upstream_config.connect_timeout_seconds,
                              tls=services.upstream_tls.get(route.upstream))
    except BaseException as exc:  # cancellation (handshake timeout) included: free the lease
        if isinstance(exc, GatewayError):
            phases.done("upstream_connect")
            services.metrics.upstream_connect_errors_total.labels(route.upstream,
                                                                  exc.reason).inc()
        await services.limiter.release(lease)
        raise
    phases.done("upstream_connect")
    return Admitted(principal, model, route, lease, upstream, beta)


class RelayedSession:
    """A live WebSocket session (a :class:`gateway.registry.LiveSession`): its relay, its
    account and the task that runs it."""

    def __init__(self, account: Account, relay: Relay | BetaRelay) -> None:
        self.account = account
        self.relay = relay
        self.task: asyncio.Task[None] | None = None
        self._blocked = 0.0
        self._last_progress = (-1, -1)

    def end(self, cause: SessionEnd) -> None:
        self.relay.end(cause)

    def counters(self) -> Counters:
        r = self.relay
        return r.client_messages, r.client_bytes, r.upstream_messages, r.upstream_bytes

    def publish_counters(self) -> None:
        self.account.publish(self.counters())

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


def start_session(services: Services, registry: Registry, housekeeper: Housekeeper,
                  admitted: Admitted, client: asyncio.Transport, peer: str) -> RelayedSession:
    """Hand both connections to a :class:`Relay` (a :class:`BetaRelay` for a beta client)
    and run the session in a task of its own.

    The upgrade's ASGI task then ends, and with it everything of the handshake (uvicorn's
    protocol object, the request and its headers, the upstream's ``websockets``
    connection object): a live session holds only what it needs (memory per session:
    ``bench/README.md``).
    """
    server = services.config.server
    upstream = admitted.upstream
    if admitted.principal.secret is not None:  # before the relay takes the transport over
        upstream.write_text(session_update(admitted.principal.secret))
    account = Account(admitted.principal, admitted.model, admitted.route.upstream,
                      admitted.lease, peer, services.metrics,
                      protocol="beta" if admitted.beta else "ga")
    relay = (BetaRelay if admitted.beta else Relay)(
        client, upstream.transport, account.on_usage, guard=model_guard(admitted.models),
        upstream_buffered=upstream.take_raw(), upstream_lost=upstream.lost,
        max_client_message=server.max_message_bytes,
        max_upstream_message=max(server.max_message_bytes, MIN_UPSTREAM_MESSAGE_CAP),
        ping_interval=server.ping_interval_seconds, ping_timeout=server.ping_timeout_seconds)
    relay.start()  # before yielding to the loop: the transports are the relay's from here
    live = RelayedSession(account, relay)
    registry.register(live)
    account.open(credential=admitted.principal.credential)
    live.task = asyncio.create_task(run_session(services, registry, housekeeper, live))
    return live


async def run_session(services: Services, registry: Registry, housekeeper: Housekeeper,
                      live: RelayedSession) -> None:
    """Relay until close (or a deadline: ``max_session_seconds``, the token's ``exp``), then
    release the lease and close the account."""
    account = live.account
    principal = account.principal
    loop = asyncio.get_running_loop()
    timers = [loop.call_later(principal.tenant.limits.max_session_seconds, live.end,
                              SESSION_EXPIRED)]
    if principal.expires_at is not None:
        timers.append(loop.call_later(max(0.0, principal.expires_at - time.time()),
                                      live.end, TOKEN_EXPIRED))
    result: RelayResult | None = None
    try:
        result = await live.relay.run()
    finally:
        for timer in timers:
            timer.cancel()
        registry.unregister(live)  # the housekeeping loop starts no renewal of it from here on
        await housekeeper.settle(live)
        await account.settle(services.limiter)
        await services.limiter.release(account.lease)
        account.close(_ending(result), live.counters())


def _ending(result: RelayResult | None) -> Ending:
    if result is None:  # the relay itself failed
        return Ending("upstream_error")
    return Ending(result.end.code if result.end else "ok", result.code, result.initiator)
