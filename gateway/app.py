"""The composition root: builds a gateway's services, registry and housekeeper once, and
its two ASGI apps — the main port (WebSocket paths, ``/healthz``, ``/readyz``) and the
metrics port (``/metrics``, CONTRACT §3).

Nothing lives in module globals: :func:`build_gateway` makes one :class:`Gateway` per
app, the lifespan starts and stops it, and each session gets what it needs as arguments
(:mod:`gateway.session`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router, WebSocketRoute
from starlette.types import Receive, Scope, Send

from gateway.auth.authenticator import Authenticator
from gateway.auth.dev_issuer import DevIssuer
from gateway.call_store import build_call_store
from gateway.calls import CORS_HEADERS, Calls
from gateway.config import Config
from gateway.handshake import REALTIME_PATHS
from gateway.housekeeping import Housekeeper
from gateway.limits.failover import build_limiter
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.secrets_endpoint import ClientSecretsEndpoint
from gateway.services import Services
from gateway.session import handle
from gateway.sidecar import metrics_app
from gateway.upstream import tls_contexts

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Gateway:
    """One gateway process: its services, its live sessions and its housekeeping loop."""

    services: Services
    registry: Registry
    housekeeper: Housekeeper

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, checks)``: keys loaded, limiter reachable (or fail-open), not draining."""
        services = self.services
        keys = services.authenticator.ready()
        limiter_ok = await services.limiter.ping()
        redis = services.config.redis
        fail_open = redis is None or redis.fail_mode == "open"
        draining = self.registry.draining
        checks = {
            "keys": keys,
            "limiter": "ok" if limiter_ok else ("degraded" if fail_open else "down"),
            "draining": draining,
        }
        return keys and (limiter_ok or fail_open) and not draining, checks


class RealtimeEndpoint:
    """Raw ASGI endpoint for the realtime WebSocket paths (no per-message wrapper objects)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        await handle(gw.services, gw.registry, gw.housekeeper,
                     scope, receive, send)  # type: ignore[arg-type]


def build_gateway(config: Config, metrics: Metrics | None = None) -> Gateway:
    """Build (not start) the services, registry and housekeeper for ``config``."""
    metrics = metrics or Metrics()
    authenticator = Authenticator(
        config,
        on_jwks_refresh=lambda tenant, result: metrics.jwks_refreshes_total.labels(
            tenant, result).inc(),
    )
    limiter = build_limiter(
        config, on_error=lambda operation: metrics.limiter_errors_total.labels(operation).inc())
    for tenant in config.tenants:
        if tenant.limits.max_sessions is not None:
            metrics.tenant_max_sessions.labels(tenant.id).set(tenant.limits.max_sessions)
        if tenant.limits.tokens_per_minute is not None:
            metrics.tenant_tokens_per_minute.labels(tenant.id).set(
                tenant.limits.tokens_per_minute)
    return assemble(Services(config, metrics, authenticator, limiter,
                             upstream_tls=tls_contexts(config.upstreams)))


def assemble(services: Services) -> Gateway:
    """A :class:`Gateway` around ready-made ``services`` (tests pass fakes or clocks here)."""
    registry = Registry(services.config.server.max_sessions, services.metrics,
                        max_unauthenticated=services.config.server.max_unauthenticated_handshakes)
    return Gateway(services, registry, Housekeeper(services, registry))


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
    calls = Calls(gw.services, gw.registry, gw.housekeeper,
                  build_call_store(config.redis))
    routes += rest_routes(gw, calls)
    routes += list(extra_routes)
    authenticator = gw.services.authenticator
    for tenant in config.tenants:
        issuer = authenticator.dev_issuer(tenant.id)
        if issuer is not None:
            routes.append(Route(f"/_dev/{tenant.id}/jwks.json", _jwks_endpoint(issuer)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await authenticator.start()
        gw.housekeeper.start()
        log.info("gateway.started", tenants=[t.id for t in config.tenants],
                 keys_loaded=authenticator.ready())
        try:
            yield
        finally:
            await calls.aclose()
            await gw.housekeeper.stop()
            await authenticator.aclose()
            await gw.services.limiter.aclose()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gw
    app.state.calls = calls
    return app


REST_PREFIXES = ("/v1/realtime", "/openai/v1/realtime")
"""Where the REST endpoints next to the socket live (CONTRACT §3): ``<prefix>/client_secrets``,
``<prefix>/calls``, ``<prefix>/calls/{call_id}/hangup``."""


def rest_routes(gw: Gateway, calls: Calls) -> list[BaseRoute]:
    """The HTTP endpoints under :data:`REST_PREFIXES` (CONTRACT §8, §9), behind CORS that
    follows ``server.allowed_origins`` (empty: any origin), allows the headers the SDKs send
    from a browser and exposes ``Location`` (agents-js reads the call id from it).

    ``POST …/client_secrets`` exists only when ``client_secrets:`` is configured (else 404).
    """
    config = gw.services.config
    routes: list[BaseRoute] = [
        Route("/calls", calls.create, methods=["POST"]),
        Route("/calls/{call_id}/hangup", calls.hangup, methods=["POST"]),
    ]
    keys = gw.services.authenticator.client_secret_keys
    if config.client_secrets is not None and keys is not None:
        endpoint = ClientSecretsEndpoint(gw.services, keys, config.client_secrets.max_seconds)
        routes.append(Route("/client_secrets", endpoint.handle, methods=["POST"]))
    origins = list(config.server.allowed_origins) or ["*"]
    api = CORSMiddleware(Router(routes), allow_origins=origins, allow_methods=["POST"],
                         allow_headers=list(CORS_HEADERS), expose_headers=["Location"],
                         max_age=600)
    return [Mount(prefix, app=api) for prefix in REST_PREFIXES]


def _jwks_endpoint(issuer: DevIssuer) -> Any:
    async def jwks(request: Request) -> Response:
        return JSONResponse(issuer.public_jwks())

    return jwks


def create_metrics_app(metrics: Metrics) -> Starlette:
    """The metrics port's app: exactly ``GET /metrics`` (:func:`gateway.sidecar.metrics_app`)."""
    return metrics_app(metrics)
