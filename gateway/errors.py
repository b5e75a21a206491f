"""The gateway's one exception tree and the in-session close causes (CONTRACT §5).

Every stage before the WebSocket upgrade refuses a session by raising a
:class:`GatewayError` subclass.  The exception carries everything both kinds of
client need, so it is turned into a response in exactly one place
(:mod:`gateway.session`):

* header-credential clients get ``http_status`` and the JSON body of
  :meth:`GatewayError.http_body` before the upgrade;
* subprotocol clients (browsers, which cannot read HTTP statuses) are accepted,
  sent :meth:`GatewayError.error_event`, then closed with ``close_code``
  (``4000 + http_status``).

Messages are shown to clients and logged: they never contain a token, a key or a
claim value.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import ClassVar

ERROR_TYPE = "gateway_error"


def error_event(code: str, message: str) -> str:
    """Build a Realtime API ``error`` server event as JSON text.

    Shape (openai-python ``types/realtime/realtime_error_event.py``)::

        {"type": "error", "event_id": "event_gw_<hex>",
         "error": {"type": "gateway_error", "code": code, "message": message,
                   "param": null, "event_id": null}}
    """
    return json.dumps(
        {
            "type": "error",
            "event_id": f"event_gw_{secrets.token_hex(8)}",
            "error": {
                "type": ERROR_TYPE,
                "code": code,
                "message": message,
                "param": None,
                "event_id": None,
            },
        },
        separators=(",", ":"),
    )


class GatewayError(Exception):
    """Root of every refusal the gateway answers with a status or close code.

    Attributes:
        http_status: HTTP status for a pre-upgrade refusal (RFC 9110).
        close_code: WebSocket close code for a post-accept refusal, ``4000 + http_status``.
        code: the machine-readable ``error.code`` of CONTRACT §5.
        message: human text, safe to show and log (no credentials).
        retry_after: seconds the client should wait (``Retry-After``, RFC 9110 §10.2.3),
            or ``None`` when the refusal is not about load.
        reason: a short machine-readable detail from a bounded set, for logs and metric
            labels (``expired``, ``bad_signature``, ``status_429``, ``timeout`` ...), or ``None``.
        tenant: the tenant id once the token selected one (set by the pipeline), for the
            ``tenant`` label of ``session_rejections_total``; ``None`` before.
    """

    http_status: ClassVar[int] = 400
    code: ClassVar[str] = "invalid_request"
    www_authenticate: ClassVar[str | None] = None
    in_band: ClassVar[bool] = False
    """Whether the refusal is always delivered after accepting (``error`` event + close),
    whatever carried the credential."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.reason = reason
        self.tenant: str | None = None

    @property
    def close_code(self) -> int:
        return 4000 + self.http_status

    def http_headers(self) -> dict[str, str]:
        """Response headers for the pre-upgrade refusal (``WWW-Authenticate`` per RFC 6750 §3,
        ``Retry-After`` in whole seconds, rounded up)."""
        headers = {"content-type": "application/json"}
        if self.www_authenticate is not None:
            headers["www-authenticate"] = self.www_authenticate
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        return headers

    def http_body(self) -> bytes:
        """``{"error": {"type": "gateway_error", "code": ..., "message": ...}}`` as UTF-8."""
        body = {"error": {"type": ERROR_TYPE, "code": self.code, "message": self.message}}
        return json.dumps(body, separators=(",", ":")).encode()

    def error_event(self) -> str:
        """The Realtime ``error`` event sent to subprotocol clients before the close."""
        return error_event(self.code, self.message)


class InvalidRequest(GatewayError):
    """Malformed upgrade: no ``model``, several tokens, bad query (400 / 4400)."""

    http_status = 400
    code = "invalid_request"


class BetaRefused(InvalidRequest):
    """A Realtime beta-protocol client while ``server.beta_clients`` is ``refuse`` (400 /
    4400, ``reason="beta_protocol"``).  Always answered in band, as OpenAI answers beta
    clients (accept, ``error`` event, close), so every beta SDK shows the message."""

    in_band = True

    def __init__(self) -> None:
        super().__init__(
            "the Realtime beta protocol is not served here: use the GA protocol on "
            "/v1/realtime (or /openai/v1/realtime) without the OpenAI-Beta: realtime=v1 "
            "header or a preview api-version", reason="beta_protocol")


class MissingCredentials(GatewayError):
    """No credential in any carrier of CONTRACT §4 (401 / 4401)."""

    http_status = 401
    code = "invalid_request"
    www_authenticate = "Bearer"


class InvalidToken(GatewayError):
    """Bad signature, wrong ``iss``/``aud``, expired, unknown issuer (401 / 4401, RFC 6750)."""

    http_status = 401
    code = "invalid_token"
    www_authenticate = 'Bearer error="invalid_token"'


class InsufficientScope(GatewayError):
    """The token lacks the tenant's required scope (403 / 4403, RFC 6750 §3.1)."""

    http_status = 403
    code = "insufficient_scope"
    www_authenticate = 'Bearer error="insufficient_scope"'


class Forbidden(GatewayError):
    """Model not allowed for the tenant, or ``Origin`` not on the allow-list (403 / 4403)."""

    http_status = 403
    code = "forbidden"


class RateLimited(GatewayError):
    """Concurrency, start rate or token budget exceeded (429 / 4429, ``Retry-After``)."""

    http_status = 429
    code = "rate_limited"


class UpstreamFailed(GatewayError):
    """The upstream refused or failed the WebSocket handshake (502 / 4502)."""

    http_status = 502
    code = "upstream_error"


class UpstreamTimeout(GatewayError):
    """The upstream connect did not finish within its timeout (504 / 4504)."""

    http_status = 504
    code = "upstream_timeout"


class Unavailable(GatewayError):
    """Draining, replica full, or limiter/key source down under fail-closed (503 / 4503)."""

    http_status = 503
    code = "unavailable"


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """Why the gateway ends a live session (CONTRACT §5, second table).

    ``close_code`` is sent to the client after an ``error`` event with ``code``.
    """

    close_code: int
    code: str
    message: str

    def error_event(self) -> str:
        return error_event(self.code, self.message)


TOKEN_EXPIRED = SessionEnd(4401, "token_expired", "the access token expired")
BUDGET_EXHAUSTED = SessionEnd(4429, "rate_limited", "the tenant's token budget is exhausted")
SESSION_EXPIRED = SessionEnd(4408, "session_expired", "the maximum session duration was reached")
SHUTTING_DOWN = SessionEnd(1012, "shutting_down", "the gateway is restarting; reconnect")
UPSTREAM_LOST = SessionEnd(1011, "upstream_error", "the upstream connection was lost")
SLOW_CONSUMER = SessionEnd(1008, "slow_consumer", "a peer stopped reading; the session was closed")
