"""The voice demo of ``realtime-gateway dev``: a browser page and a loopback token endpoint.

Development mode only (``gateway.cli`` mounts these routes in ``dev`` and nowhere else):

* ``GET /`` — ``static/demo.html``: Start/Stop, microphone capture in an AudioWorklet as
  PCM16 24 kHz mono (``audio/pcm``), gapless playback of the reply, live user and assistant
  transcripts, errors and close codes/reasons shown on the page.  It opens
  ``/language-model-service/ws/v1/open-ai/realtime?model=…`` with the single subprotocol
  ``Bearer-<token>`` (the Foundry-style browser client of ``shared/notes/protocol.md`` row L).
* ``GET /static/<file>`` — the page's script and AudioWorklet module.
* ``GET /_dev/token`` — a short-lived access token from the development issuer
  (:meth:`gateway.auth.dev_issuer.DevIssuer.mint`), as JSON
  ``{"token": str, "expires_in": int (seconds), "model": str, "path": str}``.  Answered
  only to loopback clients that name a loopback host (``Host`` of 127.0.0.1, ::1 or
  localhost, so a DNS-rebound name cannot fetch it) and, when an ``Origin`` is sent, only
  to that same origin; everything else gets 403.  ``Cache-Control: no-store``.

The token is never logged; the page keeps it in memory only.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.auth.dev_issuer import DevIssuer
from gateway.config import TenantConfig, is_loopback_host
from gateway.errors import Forbidden

DEMO_PATH = "/language-model-service/ws/v1/open-ai/realtime"
"""The WebSocket path the demo page opens (Foundry shape, ``Bearer-`` subprotocol)."""

DEMO_SUBJECT = "demo-user"
"""The ``sub`` claim of tokens minted for the demo page."""

DEFAULT_TOKEN_TTL_SECONDS = 600
"""Lifetime of a demo token in seconds; a session ends (4401) when its token expires."""

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})

_NO_STORE = {"Cache-Control": "no-store"}


def static_dir() -> Path:
    """The directory of the packaged page files (``gateway/static``)."""
    return Path(str(resources.files("gateway") / "static"))


def _host_name(host_header: str) -> str:
    """The host part of a ``Host`` header value (``[::1]:8080`` → ``[::1]``)."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def is_local_request(request: Request) -> bool:
    """True when ``request`` comes from a loopback address, names a loopback host, and
    carries no ``Origin`` other than its own (``http://<Host>``, or ``https://`` under
    ``dev --tls``)."""
    if request.client is None or not is_loopback_host(request.client.host):
        return False
    host = request.headers.get("host", "")
    if _host_name(host).lower() not in LOOPBACK_NAMES:
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{host}"


def demo_routes(issuer: DevIssuer, tenant: TenantConfig, *, model: str,
                token_ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS) -> list[BaseRoute]:
    """The demo page's routes, to pass as ``extra_routes`` to :func:`gateway.server.serve`.

    Args:
        issuer: the development issuer of ``tenant`` (``tenant.auth.dev_issuer``).
        tenant: the tenant the tokens are for (its ``issuer``, first audience and
            ``required_scope`` go into the token).
        model: the model the page asks for (must be one of ``tenant.models``).
        token_ttl_seconds: lifetime of each token handed to the page, seconds.

    Raises:
        ValueError: ``model`` is not routed for ``tenant``.
    """
    if model not in tenant.models:
        raise ValueError(f"model {model!r} is not configured for tenant {tenant.id!r}")
    audience = tenant.auth.audiences[0] if tenant.auth.audiences else None
    pages = static_dir()

    async def page(request: Request) -> Response:
        return FileResponse(pages / "demo.html", media_type="text/html; charset=utf-8",
                            headers=_NO_STORE)

    async def token(request: Request) -> Response:
        if not is_local_request(request):
            refusal = Forbidden("development tokens are handed out to loopback only")
            return Response(refusal.http_body(), status_code=refusal.http_status,
                            headers={**refusal.http_headers(), **_NO_STORE})
        value = issuer.mint(issuer=tenant.auth.issuer, audience=audience, sub=DEMO_SUBJECT,
                            scope=tenant.auth.required_scope, ttl_seconds=token_ttl_seconds)
        return JSONResponse({"token": value, "expires_in": token_ttl_seconds, "model": model,
                             "path": DEMO_PATH}, headers=_NO_STORE)

    return [
        Route("/", page, methods=["GET"]),
        Route("/_dev/token", token, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=pages), name="static"),
    ]


__all__ = ["DEMO_PATH", "DEMO_SUBJECT", "demo_routes", "is_local_request", "static_dir"]
