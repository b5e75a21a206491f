"""The voice demo of ``realtime-gateway dev``: a browser page and a loopback token endpoint.

Development mode only (``gateway.cli`` mounts these routes in ``dev`` and nowhere else):

* ``GET /`` — ``static/demo.html``: Start/Stop, microphone capture in an AudioWorklet as
  PCM16 24 kHz mono (``audio/pcm``), gapless playback of the reply, live user and assistant
  transcripts, errors and close codes/reasons shown on the page.  It follows the seed
  flow of CONTRACT §8: it asks its backend (``GET /_dev/secret``) for a client secret and
  opens ``/v1/realtime?model=…`` with the subprotocols ``realtime`` and
  ``openai-insecure-api-key.<ek>``, so the browser never holds the access token.
* ``GET /static/<file>`` — the page's script and AudioWorklet module.
* ``GET /_dev/token`` — a short-lived access token from the development issuer
  (:meth:`gateway.auth.dev_issuer.DevIssuer.mint`), as JSON
  ``{"token": str, "expires_in": int (seconds), "model": str, "path": str}``.  Answered
  only to loopback clients that name a loopback host (``Host`` of 127.0.0.1, ::1 or
  localhost, so a DNS-rebound name cannot fetch it) and, when an ``Origin`` is sent, only
  to that same origin; everything else gets 403.  ``Cache-Control: no-store``.
* ``GET /_dev/secret`` — what an app's backend does: mint an access token and exchange it
  at the gateway's ``POST /v1/realtime/client_secrets`` for an ``ek_`` secret (300 s), as
  JSON ``{"value": str, "expires_at": int (epoch seconds), "model": str, "path": str}``;
  the same loopback rule.

Tokens and secrets are never logged; the page keeps its secret in memory only.
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
"""The WebSocket path the demo page opens with an access token (Foundry shape, ``Bearer-``
subprotocol)."""
SECRET_PATH = "/v1/realtime"  # noqa: S105 - a path
"""The WebSocket path the demo page opens with a client secret (the seed flow:
``["realtime", "openai-insecure-api-key." + ek]``)."""

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
                token_ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS,
                secrets_url: str | None = None,
                verify: str | bool = True) -> list[BaseRoute]:
    """The demo page's routes, to pass as ``extra_routes`` to :func:`gateway.server.serve`.

    Args:
        issuer: the development issuer of ``tenant`` (``tenant.auth.dev_issuer``).
        tenant: the tenant the tokens are for (its ``issuer``, first audience and
            ``required_scope`` go into the token).
        model: the model the page asks for (must be one of ``tenant.models``).
        token_ttl_seconds: lifetime of each token handed to the page, seconds.
        secrets_url: the gateway's ``POST …/v1/realtime/client_secrets`` URL; when given,
            ``GET /_dev/secret`` plays the app backend of the seed flow: it mints an access
            token and exchanges it there for a short-lived ``ek_`` for the page.
        verify: for that request, ``httpx``'s ``verify`` (a CA file under ``dev --tls``).

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

    def access_token() -> str:
        return issuer.mint(issuer=tenant.auth.issuer, audience=audience, sub=DEMO_SUBJECT,
                           scope=tenant.auth.required_scope, ttl_seconds=token_ttl_seconds)

    async def token(request: Request) -> Response:
        if not is_local_request(request):
            return _refused(Forbidden("development tokens are handed out to loopback only"))
        return JSONResponse({"token": access_token(), "expires_in": token_ttl_seconds,
                             "model": model, "path": DEMO_PATH}, headers=_NO_STORE)

    async def secret(request: Request) -> Response:
        if not is_local_request(request):
            return _refused(Forbidden("development secrets are handed out to loopback only"))
        assert secrets_url is not None
        import httpx

        body = {"expires_after": {"anchor": "created_at", "seconds": 300},
                "session": {"type": "realtime", "model": model}}
        async with httpx.AsyncClient(verify=verify, timeout=10) as client:
            answer = await client.post(secrets_url, json=body,
                                       headers={"Authorization": f"Bearer {access_token()}"})
        if answer.status_code != 200:
            return Response(answer.content, status_code=answer.status_code,
                            media_type="application/json", headers=_NO_STORE)
        minted = answer.json()
        return JSONResponse({"value": minted["value"], "expires_at": minted["expires_at"],
                             "model": model, "path": SECRET_PATH}, headers=_NO_STORE)

    routes: list[BaseRoute] = [
        Route("/", page, methods=["GET"]),
        Route("/_dev/token", token, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=pages), name="static"),
    ]
    if secrets_url is not None:
        routes.append(Route("/_dev/secret", secret, methods=["GET"]))
    return routes


def _refused(refusal: Forbidden) -> Response:
    return Response(refusal.http_body(), status_code=refusal.http_status,
                    headers={**refusal.http_headers(), **_NO_STORE})


__all__ = ["DEMO_PATH", "DEMO_SUBJECT", "SECRET_PATH", "demo_routes", "is_local_request",
           "static_dir"]
