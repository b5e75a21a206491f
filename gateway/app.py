"""The ASGI applications: the gateway (WebSocket paths, ``/healthz``, ``/readyz``) and
the metrics app (``/metrics``, served on its own port, CONTRACT §3).

:class:`Gateway` owns every shared object of a running gateway (authenticator,
limiter, metrics, live sessions, the draining flag).  It is built once per app
and started by the lifespan; nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from gateway.auth.authenticator import Authenticator
from gateway.auth.dev_issuer import DevIssuer
from gateway.config import Config, TenantConfig
from gateway.errors import SessionEnd, Unavailable
from gateway.housekeeping import Housekeeper
from gateway.limits.base import Lease, Limiter, LimiterUnavailable
from gateway.limits.failover import build_limiter
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.session import REALTIME_PATHS, handle

if TYPE_CHECKING:
    from gateway.session import LiveSession

log = get_logger(__name__)

DEFAULT_LEASE_SECONDS = 30.0
RETRY_AFTER_UNAVAILABLE = 5.0
"""Seconds suggested to clients refused with 503 (draining, replica full, limiter down)."""
RELEASE_ATTEMPTS = 3
"""Tries to free a lease at a session's end before leaving it to expire."""
RELEASE_RETRY_SECONDS = 0.2
"""Seconds between two tries (a Redis timeout is usually a burst of load)."""


class Gateway:
    """The shared state of one gateway process.

    ``sessions`` holds the live sessions (for the drain and ``server.max_sessions``);
    ``pending_handshakes`` counts upgrades between arrival and 101.
    """

    def __init__(self, config: Config, metrics: Metrics, authenticator: Authenticator,
                 limiter: Limiter) -> None:
        self.config = config
        self.metrics = metrics
        self.authenticator = authenticator
        self.limiter = limiter
        self.sessions: set[LiveSession] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.pending_handshakes = 0
        self.draining = False
        lease = config.redis.lease_seconds if config.redis else DEFAULT_LEASE_SECONDS
        self.lease_renewal_seconds = lease / 3
        self.housekeeper = Housekeeper(self)
        for tenant in config.tenants:
            if tenant.limits.max_sessions is not None:
                metrics.tenant_max_sessions.labels(tenant.id).set(tenant.limits.max_sessions)
            if tenant.limits.tokens_per_minute is not None:
                metrics.tenant_tokens_per_minute.labels(tenant.id).set(
                    tenant.limits.tokens_per_minute)

    def check_capacity(self) -> None:
        """Refuse new sessions while draining or when ``server.max_sessions`` sessions
        (live or in their handshake) are on this replica.  Raises :class:`Unavailable` (503)."""
        if self.draining:
            raise Unavailable("the gateway is restarting; retry shortly",
                              retry_after=RETRY_AFTER_UNAVAILABLE, reason="draining")
        if len(self.sessions) + self.pending_handshakes >= self.config.server.max_sessions:
            raise Unavailable("this gateway replica is full; retry shortly",
                              retry_after=RETRY_AFTER_UNAVAILABLE, reason="replica_full")

    async def admit(self, lease: Lease, tenant: TenantConfig) -> None:
        """Admit ``lease`` against the tenant's limits.

        Raises:
            RateLimited: a limit refused (429).
            Unavailable: the limiter cannot decide (503).
        """
        try:
            await self.limiter.admit(lease, tenant.limits)
        except LimiterUnavailable as exc:
            self.metrics.limiter_errors_total.labels(exc.operation).inc()
            raise Unavailable("admission is unavailable; retry shortly",
                              retry_after=RETRY_AFTER_UNAVAILABLE, reason="limiter") from None

    async def release(self, lease: Lease) -> None:
        """Free a lease, trying :data:`RELEASE_ATTEMPTS` times :data:`RELEASE_RETRY_SECONDS`
        apart; each limiter error is counted, and a lease that could not be freed expires
        by itself (``redis.lease_seconds``) — until then the user's slot stays taken."""
        for attempt in range(RELEASE_ATTEMPTS):
            try:
                await self.limiter.release(lease)
                return
            except LimiterUnavailable as exc:
                self.metrics.limiter_errors_total.labels(exc.operation).inc()
            if attempt + 1 < RELEASE_ATTEMPTS:
                await asyncio.sleep(RELEASE_RETRY_SECONDS)

    def register(self, session: LiveSession) -> None:
        """Count ``session`` as live (for the drain and ``server.max_sessions``)."""
        self.sessions.add(session)
        self.idle.clear()

    def unregister(self, session: LiveSession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every live session to end; True if none is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.idle.wait()
        return not self.sessions

    def start_drain(self) -> None:
        """Stop admitting: ``/readyz`` turns 503 and new upgrades get 503 ``unavailable``."""
        if not self.draining:
            self.draining = True
            self.metrics.draining.set(1)
            log.info("gateway.draining", live_sessions=len(self.sessions))

    def end_all(self, cause: SessionEnd) -> None:
        """Ask every live session to end with ``cause`` (e.g. 1012 at the end of a drain)."""
        for session in list(self.sessions):
            session.end(cause)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, checks)``: keys loaded, limiter reachable (or fail-open), not draining."""
        keys = self.authenticator.ready()
        limiter_ok = await self.limiter.ping()
        fail_open = self.config.redis is None or self.config.redis.fail_mode == "open"
        checks = {
            "keys": keys,
            "limiter": "ok" if limiter_ok else ("degraded" if fail_open else "down"),
            "draining": self.draining,
        }
        return keys and (limiter_ok or fail_open) and not self.draining, checks


class RealtimeEndpoint:
    """Raw ASGI endpoint for the realtime WebSocket paths (no per-message wrapper objects)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await handle(self.gateway, scope, receive, send)  # type: ignore[arg-type]


def build_gateway(config: Config, metrics: Metrics | None = None) -> Gateway:
    """Build (not start) the shared objects for ``config``."""
    metrics = metrics or Metrics()
    authenticator = Authenticator(
        config,
        on_jwks_refresh=lambda tenant, result: metrics.jwks_refreshes_total.labels(
            tenant, result).inc(),
    )
    limiter = build_limiter(
        config, on_error=lambda operation: metrics.limiter_errors_total.labels(operation).inc())
    return Gateway(config, metrics, authenticator, limiter)


def create_app(config: Config, gateway: Gateway | None = None,
               extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The gateway's ASGI app on the main port; ``app.state.gateway`` is its :class:`Gateway`.

    ``extra_routes`` are added after the gateway's own (``dev`` mounts its demo page there).

    The lifespan fetches every tenant's keys before the app serves (``/readyz`` stays
    503 until they are loaded) and closes the authenticator and limiter at shutdown.
    """
    gw = gateway or build_gateway(config)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, checks = await gw.readiness()
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    routes: list[Any] = [Route("/healthz", healthz), Route("/readyz", readyz)]
    endpoint = RealtimeEndpoint(gw)
    routes += [WebSocketRoute(path, endpoint) for path in REALTIME_PATHS]
    routes += list(extra_routes)
    for tenant in config.tenants:
        if tenant.auth.dev_issuer is not None:
            routes.append(Route(f"/_dev/{tenant.id}/jwks.json",
                                _jwks_endpoint(DevIssuer(tenant.auth.dev_issuer.key_file))))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.authenticator.start()
        gw.housekeeper.start()
        log.info("gateway.started", tenants=[t.id for t in config.tenants],
                 keys_loaded=gw.authenticator.ready())
        try:
            yield
        finally:
            await gw.housekeeper.stop()
            await gw.authenticator.aclose()
            await gw.limiter.aclose()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gw
    return app


def _jwks_endpoint(issuer: DevIssuer) -> Any:
    async def jwks(request: Request) -> Response:
        return JSONResponse(issuer.public_jwks())

    return jwks


def create_metrics_app(metrics: Metrics) -> Starlette:
    """The metrics port's app: exactly ``GET /metrics`` (no redirect to ``/metrics/``)."""

    async def render(request: Request) -> Response:
        return Response(metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(routes=[Route("/metrics", render)])
