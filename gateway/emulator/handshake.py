"""The emulator's opening handshake: credentials, ``model`` and faults, refusals (pure).

The key is read from ``Authorization: Bearer <key>``, else ``api-key: <key>``, else the
subprotocol ``openai-insecure-api-key.<key>`` (browser shape).  None → HTTP 401
``missing_api_key``; a key different from the expected one (``None`` accepts any
non-empty key) → HTTP 401 ``invalid_api_key``.  ``call_id=`` or ``intent=`` may stand in
for ``model`` (the session then reports model ``gpt-realtime``); with none of the three
the handshake is refused with HTTP 400, as is an unusable ``fault-*`` word.  Refusals
carry OpenAI's JSON error body ``{"error": {"message", "type", "code", "param"}}``.
The subprotocol ``realtime`` is echoed when offered, nothing else is (RFC 6455 §4.2.2).
A request with ``OpenAI-Beta: realtime=v1`` is accepted and then, as OpenAI does since
2026-05, sent one ``error`` event (code ``beta_api_shape_disabled``) and closed with
4000 ``invalid_request_error.beta_api_shape_disabled`` (see ../shared/notes/protocol.md §5).
"""

from __future__ import annotations

import hmac
import http
import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from gateway.emulator.faults import FaultError, Faults, parse_faults
from gateway.emulator.schema import DEFAULT_MODEL, JSON

__all__ = [
    "BETA_CLOSE_CODE",
    "BETA_CLOSE_REASON",
    "BETA_MESSAGE",
    "Handshake",
    "error_body",
    "http_response",
    "is_beta",
    "parse_handshake",
    "select_subprotocol",
]

BETA_MESSAGE = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)
BETA_CLOSE_CODE = 4000
BETA_CLOSE_REASON = "invalid_request_error.beta_api_shape_disabled"

_REDACTED = "<redacted>"
_CREDENTIAL_QUERY_KEYS = frozenset({"api-key", "api_key", "authorization", "key", "token"})
_INSECURE_KEY_PREFIX = "openai-insecure-api-key."


@dataclass(frozen=True)
class Handshake:
    """The parsed, accepted opening handshake of one connection (no credential in it).

    Attributes:
        path: request path without the query.
        query: query parameters, credential parameters redacted.
        model: the ``model`` query value (``gpt-realtime`` for ``call_id``/``intent``).
        faults: the faults the ``model`` value selects.
        auth: which carrier held the key: ``"bearer"``, ``"api-key"``, ``"subprotocol"``.
        header_names: request header names, lower-case, first occurrence order.
        user_agent, openai_beta: those headers, if any.
        subprotocols: offered subprotocols, credential-bearing ones redacted.
    """

    path: str
    query: dict[str, str]
    model: str
    faults: Faults
    auth: str
    header_names: list[str]
    user_agent: str | None
    openai_beta: str | None
    subprotocols: list[str]


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> JSON:
    """OpenAI's HTTP error body ``{"error": {"message", "type", "code", "param"}}``."""
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def http_response(status: int, body: JSON, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """An HTTP response with a JSON *body* (``Connection: close``) and extra *headers*."""
    data = json.dumps(body, separators=(",", ":")).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Emulated Status"
    all_headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
            *headers,
        ]
    )
    return Response(status, reason, all_headers, data)


def _offered_subprotocols(headers: Headers) -> list[str]:
    offers: list[str] = []
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        offers.extend(part.strip() for part in value.split(",") if part.strip())
    return offers


def _redact_subprotocol(offer: str) -> str:
    if offer.startswith(_INSECURE_KEY_PREFIX):
        return _INSECURE_KEY_PREFIX + _REDACTED
    if offer.lower().startswith("bearer-"):
        return offer[: len("bearer-")] + _REDACTED
    return offer


def _credential(headers: Headers, offers: Sequence[str]) -> tuple[str, str] | None:
    """Return ``(carrier, key)`` from the handshake, or ``None`` when there is none."""
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return "bearer", token.strip()
    api_key = headers.get("api-key")
    if api_key is not None and api_key.strip():
        return "api-key", api_key.strip()
    for offer in offers:
        if offer.startswith(_INSECURE_KEY_PREFIX) and len(offer) > len(_INSECURE_KEY_PREFIX):
            return "subprotocol", offer[len(_INSECURE_KEY_PREFIX) :]
    return None


def parse_handshake(request: Request, expected_key: str | None) -> Handshake | Response:
    """Check the opening handshake of a Realtime path; return it or the refusal to send.

    *expected_key* ``None`` accepts any non-empty key.  The key is compared in constant
    time and appears in neither the result nor a refusal.
    """
    url = urlsplit(request.path)
    raw_query = dict(parse_qsl(url.query, keep_blank_values=True))
    headers = request.headers
    offers = _offered_subprotocols(headers)
    credential = _credential(headers, offers)
    if credential is None:
        return http_response(
            401,
            error_body(
                "You didn't provide an API key. Provide it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY) or in an api-key header.",
                "invalid_request_error",
                "missing_api_key",
            ),
        )
    carrier, key = credential
    if expected_key is not None and not hmac.compare_digest(
        key.encode("utf-8", "surrogateescape"), expected_key.encode("utf-8", "surrogateescape")
    ):
        return http_response(
            401,
            error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
        )
    model = raw_query.get("model", "")
    if not model:
        if "call_id" in raw_query or "intent" in raw_query:
            model = DEFAULT_MODEL
        else:
            return http_response(
                400,
                error_body(
                    "Missing required parameter: 'model'.",
                    "invalid_request_error",
                    "missing_required_parameter",
                    "model",
                ),
            )
    try:
        faults = parse_faults(model)
    except FaultError as exc:
        return http_response(
            400, error_body(str(exc), "invalid_request_error", "invalid_fault", "model")
        )
    names: list[str] = []
    for name, _ in headers.raw_items():
        lowered = name.lower()
        if lowered not in names:
            names.append(lowered)
    query = {
        name: (_REDACTED if name.lower() in _CREDENTIAL_QUERY_KEYS else value)
        for name, value in raw_query.items()
    }
    return Handshake(
        path=url.path,
        query=query,
        model=model,
        faults=faults,
        auth=carrier,
        header_names=names,
        user_agent=headers.get("User-Agent"),
        openai_beta=headers.get("OpenAI-Beta"),
        subprotocols=[_redact_subprotocol(offer) for offer in offers],
    )


def select_subprotocol(
    connection: ServerConnection, subprotocols: Sequence[Subprotocol]
) -> Subprotocol | None:
    """Echo ``realtime`` when offered (as OpenAI does); select nothing otherwise."""
    return Subprotocol("realtime") if "realtime" in subprotocols else None


def is_beta(openai_beta: str | None) -> bool:
    """Whether an ``OpenAI-Beta`` header value asks for the beta protocol (``realtime=v1``)."""
    return openai_beta is not None and "realtime=v1" in openai_beta.replace(" ", "").lower()
