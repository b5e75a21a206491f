"""``POST /v1/realtime/client_secrets``: a backend mints a short-lived ``ek_`` for a browser.

CONTRACT §8 (OpenAI's ``ClientSecretCreateParams`` / ``ClientSecretCreateResponse``, so
``client.realtime.client_secrets.create(...)`` of the ``openai`` SDKs works against the
gateway).  The request is authenticated with the user's access token in a header carrier
of CONTRACT §4 (``Authorization: Bearer`` or ``api-key``), exactly as a socket session is
(issuer, JWKS or introspection, audience, scope); minting counts against the user's start
rate in a bucket of its own (``Limiter.throttle``).  The gateway signs the secret itself
(:mod:`gateway.auth.client_secrets`); no upstream is called.  Refusals are the §5 statuses
with JSON bodies; the secret is never logged.
"""

from __future__ import annotations

import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.auth.client_secrets import (
    MAX_BODY_BYTES,
    SecretClaims,
    SigningKeys,
    is_client_secret,
    mint,
    parse_create_request,
    render_response,
)
from gateway.credentials import extract_credentials
from gateway.errors import GatewayError, InvalidRequest, InvalidToken
from gateway.logs import get_logger
from gateway.metrics import UNKNOWN_TENANT
from gateway.services import Services

log = get_logger(__name__)

MINT_ACTION = "mint"
"""The :meth:`gateway.limits.base.Limiter.throttle` action of minting a secret."""
NO_STORE = {"cache-control": "no-store"}


class ClientSecretsEndpoint:
    """The Starlette endpoint; ``keys`` sign new secrets (``client_secrets.signing_key_env``)."""

    def __init__(self, services: Services, keys: SigningKeys, max_seconds: int) -> None:
        self._services = services
        self._keys = keys
        self._max_seconds = max_seconds

    async def handle(self, request: Request) -> Response:
        """Answer one request: 200 with the secret, or the §5 refusal as JSON."""
        try:
            claims, value = await self._mint(request)
        except GatewayError as exc:
            tenant = exc.tenant or UNKNOWN_TENANT
            self._services.metrics.client_secret_rejections_total.labels(tenant, exc.code).inc()
            log.info("client_secret.rejected", code=exc.code, status=exc.http_status,
                     reason=exc.reason, message=exc.message, tenant=tenant,
                     client=_client(request))
            return Response(exc.http_body(), status_code=exc.http_status,
                            headers={**exc.http_headers(), **NO_STORE})
        self._services.metrics.client_secrets_minted_total.labels(claims.tenant).inc()
        log.info("client_secret.minted", tenant=claims.tenant, subject=claims.subject,
                 model=claims.model, expires_at=claims.exp, client=_client(request))
        return Response(render_response(value, claims), media_type="application/json",
                        headers=NO_STORE)

    async def _mint(self, request: Request) -> tuple[SecretClaims, str]:
        """Authenticate, parse, throttle and sign.  Raises :class:`GatewayError`."""
        credentials = extract_credentials(request.scope.get("headers", ()), ())
        if is_client_secret(credentials.token):
            raise InvalidToken("a client secret cannot mint client secrets",
                               reason="client_secret")
        principal = await self._services.authenticator.authenticate(credentials.token)
        tenant = principal.tenant
        try:
            body = await _read_body(request, MAX_BODY_BYTES)
            parsed = parse_create_request(body, models=list(tenant.models),
                                          max_seconds=self._max_seconds)
            await self._services.limiter.throttle(tenant.id, principal.subject, MINT_ACTION,
                                                  tenant.limits)
            claims = SecretClaims.issue(
                tenant=tenant.id, subject=principal.subject, scope=tenant.auth.required_scope,
                request=parsed, now=time.time(), token_exp=principal.expires_at)
            return claims, mint(self._keys, claims)
        except GatewayError as exc:
            exc.tenant = tenant.id
            raise


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (read in chunks, refused as soon as it is
    over; a ``Content-Length`` over it is refused unread).  Raises :class:`InvalidRequest`."""
    declared = request.headers.get("content-length")
    too_large = InvalidRequest(f"the request body is larger than {limit} bytes",
                               reason="body_size")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequest("the request body was cut short", reason="body") from None
    return b"".join(chunks)


def _client(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else ""
