"""Where a client's bearer token comes from, and which subprotocol to echo (CONTRACT §4).

Pure functions over plain values (header pairs, the offered subprotocols and the decoded
query pairs), so the rules are table-tested without a socket.

Carriers, in priority order:

1. ``Authorization: Bearer <t>`` (RFC 6750 §2.1);
2. subprotocol ``Bearer-<t>`` (browser clients, which cannot set headers);
3. subprotocol ``openai-insecure-api-key.<t>`` (openai-node / agents-js in browsers);
4. header ``api-key: <t>`` (Azure OpenAI style);
5. query parameter ``api-key=<t>``, then ``Authorization=Bearer <t>`` (``+`` or ``%20`` for
   the space): Azure's browser clients (rt-client's browser build, openai-node <= 7.4 on a
   native WebSocket), which can set neither headers nor a credential subprotocol.

Subprotocol and query carriers are *in band*: a refusal of such a client is delivered
after accepting the upgrade (``error`` event, close ``4000 + status``), because a browser
cannot read an HTTP status (CONTRACT §5).  A query credential is never forwarded nor
logged (see :mod:`gateway.upstream` and :func:`gateway.logs.strip_query`).

Reply subprotocol (RFC 6455 §4.2.2 — the server echoes one offered value or none):
``realtime`` if offered; else the ``Bearer-<t>`` offer (a browser fails the
handshake unless one offered value is echoed); else the sole offered value;
else none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.errors import InvalidRequest, MissingCredentials

BEARER_SUBPROTOCOL_PREFIX = "Bearer-"
INSECURE_KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
REALTIME_SUBPROTOCOL = "realtime"
MAX_TOKEN_BYTES = 16 * 1024
"""Largest bearer token accepted (JWT, opaque or client secret), in bytes: a longer
credential is refused as malformed before any parsing, here and in :mod:`gateway.auth`."""

API_KEY_PARAM = "api-key"
AUTHORIZATION_PARAM = "authorization"
"""Query parameter names of the query carriers, compared case-insensitively."""
CREDENTIAL_PARAMS = frozenset({API_KEY_PARAM, AUTHORIZATION_PARAM})

Carrier = Literal["authorization", "bearer_subprotocol", "insecure_key_subprotocol", "api_key",
                  "api_key_query", "authorization_query"]
IN_BAND_CARRIERS: frozenset[Carrier] = frozenset({
    "bearer_subprotocol", "insecure_key_subprotocol", "api_key_query", "authorization_query"})
"""Carriers whose refusals are delivered in band (accept, ``error`` event, ``4000 + status``)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A token found in the upgrade request.

    ``token`` is the secret itself: it is passed to the authenticator only and
    never logged.  ``carrier`` says where it came from; :attr:`refused_in_band` is what
    decides how a refusal is delivered (CONTRACT §5).
    """

    token: str
    carrier: Carrier

    @property
    def in_subprotocol(self) -> bool:
        """Whether the token came in a ``Sec-WebSocket-Protocol`` offer."""
        return self.carrier in ("bearer_subprotocol", "insecure_key_subprotocol")

    @property
    def refused_in_band(self) -> bool:
        """Whether a refusal is an ``error`` event + close ``4000 + status`` after accepting
        (subprotocol and query carriers: browsers) rather than an HTTP status."""
        return self.carrier in IN_BAND_CARRIERS

    def __repr__(self) -> str:  # never show the token
        return f"Credentials(carrier={self.carrier!r}, token=<redacted>)"


def _header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1").strip() for key, value in headers if key.lower() == name]


def _checked(token: str) -> str:
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise MissingCredentials("the credential is malformed")
    return token


def _params(query: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [value.strip() for key, value in query if key.lower() == name]


def _bearer(value: str, where: str) -> str:
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        raise MissingCredentials(f"the Authorization {where} must use the Bearer scheme")
    return _checked(token)


def extract_credentials(
    headers: Iterable[tuple[bytes, bytes]], subprotocols: Sequence[str],
    query: Iterable[tuple[str, str]] = (),
) -> Credentials:
    """Find the client's bearer token in the upgrade request.

    Args:
        headers: raw request headers as ``(name, value)`` byte pairs (ASGI scope shape).
        subprotocols: the offered ``Sec-WebSocket-Protocol`` values, already split on commas.
        query: the query's ``(name, value)`` pairs, percent- and ``+``-decoded
            (:func:`urllib.parse.parse_qsl`), so ``Authorization=Bearer+<t>`` arrives as
            ``("Authorization", "Bearer <t>")``.

    Returns:
        The credentials of the highest-priority carrier present.

    Raises:
        MissingCredentials: no carrier at all, or the chosen one is empty or malformed (401).
        InvalidRequest: a carrier appears more than once, e.g. two ``Bearer-`` offers or two
            ``api-key=`` parameters (400).
    """
    headers = list(headers)
    query = list(query)
    authorization = _header_values(headers, b"authorization")
    if len(authorization) > 1:
        raise InvalidRequest("several Authorization headers were sent")
    bearer_offers = [p for p in subprotocols if p.startswith(BEARER_SUBPROTOCOL_PREFIX)]
    key_offers = [p for p in subprotocols if p.startswith(INSECURE_KEY_SUBPROTOCOL_PREFIX)]
    if len(bearer_offers) + len(key_offers) > 1:
        raise InvalidRequest("several credentials were offered as subprotocols")
    api_keys = _header_values(headers, b"api-key")
    if len(api_keys) > 1:
        raise InvalidRequest("several api-key headers were sent")
    key_params = _params(query, API_KEY_PARAM)
    authorization_params = _params(query, AUTHORIZATION_PARAM)
    if len(key_params) > 1 or len(authorization_params) > 1:
        raise InvalidRequest("a credential query parameter was sent more than once")

    if authorization:
        return Credentials(_bearer(authorization[0], "header"), "authorization")
    if bearer_offers:
        return Credentials(
            _checked(bearer_offers[0][len(BEARER_SUBPROTOCOL_PREFIX):]), "bearer_subprotocol"
        )
    if key_offers:
        return Credentials(
            _checked(key_offers[0][len(INSECURE_KEY_SUBPROTOCOL_PREFIX):]),
            "insecure_key_subprotocol",
        )
    if api_keys:
        return Credentials(_checked(api_keys[0]), "api_key")
    if key_params:
        return Credentials(_checked(key_params[0]), "api_key_query")
    if authorization_params:
        return Credentials(_bearer(authorization_params[0], "parameter"), "authorization_query")
    raise MissingCredentials("no credentials: send a bearer token")


def select_subprotocol(subprotocols: Sequence[str]) -> str | None:
    """The one offered value to echo in ``Sec-WebSocket-Protocol``, or ``None`` (CONTRACT §4)."""
    if REALTIME_SUBPROTOCOL in subprotocols:
        return REALTIME_SUBPROTOCOL
    for offer in subprotocols:
        if offer.startswith(BEARER_SUBPROTOCOL_PREFIX):
            return offer
    if len(subprotocols) == 1:
        return subprotocols[0]
    return None
