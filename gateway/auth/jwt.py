"""Validation of JWT bearer tokens (RFC 7519) in JWS compact form (RFC 7515), with joserfc.

The checks follow RFC 8725 (JWT Best Current Practices) and RFC 9068 §4:

* size caps before any decoding (:data:`MAX_TOKEN_BYTES`, header/payload/signature caps);
* the algorithm must be on the tenant's allow-list (``auth.algorithms``, asymmetric only):
  ``alg: none``, HMAC (including HS256 keyed with an RSA public key) and unknown
  algorithms are refused; the key type must match the algorithm;
* the key comes only from the tenant's JWKS, looked up by ``kid``: the ``jku``, ``x5u``,
  ``jwk`` and ``x5c`` header parameters are never dereferenced or trusted;
  a token carrying ``crit`` (no extension is supported) or ``b64`` is refused;
* ``typ``: when the tenant sets ``auth.require_typ`` (e.g. ``at+jwt``, RFC 9068 §2.1 and
  §4), the header's ``typ`` must be that media type (RFC 7515 §4.1.9: case-insensitive,
  ``application/`` implied when there is no ``/``); by default any ``typ`` or none passes;
* claims: ``iss`` equal to the tenant issuer, ``aud`` (string or list) intersecting
  ``auth.audiences`` when configured, ``exp`` required, ``nbf``/``iat`` not in the future,
  all with ``auth.leeway_seconds``; ``sub`` required;
* scope: ``auth.required_scope`` must appear, exactly, in ``scope`` (space-delimited
  string, RFC 8693 §4.2 / RFC 9068 §2.2.3, or a JSON list) or else in ``scp`` (list, as
  Okta issues, or string, as Microsoft Entra issues).

Errors are :class:`gateway.errors.InvalidToken` (401) or
:class:`gateway.errors.InsufficientScope` (403) with generic messages: never a claim
value or token text.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from joserfc import jwt as jose_jwt
from joserfc.errors import ExpiredTokenError, JoseError, UnsupportedAlgorithmError
from joserfc.jwa import JWSAlgModel
from joserfc.jws import JWSRegistry

from gateway.auth.jwks import MAX_KID_LENGTH, PublicKey
from gateway.config import AuthConfig
from gateway.credentials import MAX_TOKEN_BYTES
from gateway.errors import InsufficientScope, InvalidToken

MAX_HEADER_BYTES = 8 * 1024
"""Largest base64url JOSE header segment (room for an ``x5c`` chain, which is ignored)."""
MAX_PAYLOAD_BYTES = MAX_TOKEN_BYTES
MAX_SIGNATURE_BYTES = 1024
"""Base64url signature segment cap (RSA-4096 needs 683 characters)."""

_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_NEVER_ACCEPTED_HEADERS = ("crit", "b64")

MSG_INVALID = "the access token is invalid"
MSG_EXPIRED = "the access token is expired"
MSG_SCOPE = "the access token lacks the required scope"


class KeyProvider(Protocol):
    """Resolves a token's ``kid`` and ``alg`` to a trusted public key (a :class:`JwksCache`)."""

    async def key_for(self, kid: str | None, alg: str) -> PublicKey | None:
        """The key, or ``None`` if unknown; may raise :class:`gateway.errors.Unavailable`."""
        ...


class AllowListRegistry(JWSRegistry):
    """A :class:`joserfc.jws.JWSRegistry` that accepts only the given algorithms.

    Unlike the base class it never falls back to joserfc's "recommended" set when the
    allow-list is empty, and it does not warn for algorithms the operator chose explicitly
    (``EdDSA``).  Unknown header parameters are tolerated (``strict_check_header=False``):
    IdPs add their own.  Header segments up to :data:`MAX_HEADER_BYTES` are accepted.
    """

    max_header_length = MAX_HEADER_BYTES
    max_payload_length = MAX_PAYLOAD_BYTES
    max_signature_length = MAX_SIGNATURE_BYTES

    def __init__(self, algorithms: Collection[str]) -> None:
        super().__init__(algorithms=list(algorithms), strict_check_header=False)
        self._allowed = frozenset(algorithms)

    def get_alg(self, name: str) -> JWSAlgModel:
        """The algorithm ``name`` if allowed; :class:`UnsupportedAlgorithmError` otherwise."""
        if name not in self._allowed or name not in self.algorithms:
            raise UnsupportedAlgorithmError("algorithm not allowed")
        return self.algorithms[name]


@dataclass(frozen=True, slots=True)
class UnverifiedJwt:
    """A JWT's header and claims decoded without any check: only for routing by ``iss``."""

    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def issuer(self) -> str | None:
        """The unverified ``iss`` claim if it is a string."""
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else None


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The result of a successful validation.

    ``expires_at`` is ``exp`` in epoch seconds; ``claims`` the whole verified payload.
    """

    subject: str
    expires_at: float
    claims: dict[str, Any]


def looks_like_jwt(token: str) -> bool:
    """``True`` when ``token`` has the JWS compact shape: three base64url segments."""
    return _JWT_SHAPE.fullmatch(token) is not None


def _b64url_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    raw = base64.urlsafe_b64decode(padded.encode("ascii"))
    return json.loads(raw)


def parse_unverified(token: str) -> UnverifiedJwt:
    """Decode a compact JWS's header and payload without verifying anything.

    Raises :class:`InvalidToken` when the token exceeds the size caps, is not three
    base64url segments, or its header or payload is not a JSON object.
    """
    if len(token) > MAX_TOKEN_BYTES or not looks_like_jwt(token):
        raise InvalidToken(MSG_INVALID)
    header_segment, payload_segment, signature_segment = token.split(".")
    if (len(header_segment) > MAX_HEADER_BYTES or len(payload_segment) > MAX_PAYLOAD_BYTES
            or len(signature_segment) > MAX_SIGNATURE_BYTES):
        raise InvalidToken(MSG_INVALID)
    try:
        header = _b64url_json(header_segment)
        claims = _b64url_json(payload_segment)
    except (ValueError, binascii.Error, RecursionError):
        raise InvalidToken(MSG_INVALID) from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidToken(MSG_INVALID)
    return UnverifiedJwt(header, claims)


def media_type(typ: object) -> str | None:
    """A JOSE ``typ``/``cty`` value as a full lower-case media type (RFC 7515 §4.1.9:
    ``application/`` is implied when the value has no ``/``); ``None`` when not a string."""
    if not isinstance(typ, str):
        return None
    typ = typ.lower()
    return typ if "/" in typ else f"application/{typ}"


def scope_values(claims: Mapping[str, Any], name: str) -> frozenset[str]:
    """The scope tokens of claim ``name``: a space-delimited string or a list of strings.

    Other shapes, and non-string list elements, contribute nothing.
    """
    value = claims.get(name)
    if isinstance(value, str):
        return frozenset(value.split(" ")) - {""}
    if isinstance(value, list):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()


def has_scope(claims: Mapping[str, Any], required: str) -> bool:
    """``True`` when ``required`` is one of the ``scope`` tokens or, failing that, ``scp``.

    Exact, case-sensitive match only (RFC 6749 §3.3): ``a:use-model-extra`` does not
    satisfy ``a:use-model``.
    """
    return required in scope_values(claims, "scope") or required in scope_values(claims, "scp")


def numeric_date(value: Any) -> float | None:
    """A finite JSON number (not a boolean) as float seconds, else ``None`` (RFC 7519 §2)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


class JwtValidator:
    """Validates one tenant's JWT access tokens against its key provider.

    ``clock`` returns the current time in epoch seconds.
    """

    def __init__(self, auth: AuthConfig, keys: KeyProvider, *, clock: Callable[[], float]) -> None:
        self._auth = auth
        self._keys = keys
        self._clock = clock
        self._registry = AllowListRegistry(auth.algorithms)
        self._typ = media_type(auth.require_typ) if auth.require_typ is not None else None
        # joserfc's NumericDate comparisons are whole seconds; flooring the leeway errs
        # on the strict side.
        self._leeway = math.floor(auth.leeway_seconds)

    def _claims_registry(self) -> jose_jwt.JWTClaimsRegistry:
        audiences = list(self._auth.audiences)
        options: dict[str, jose_jwt.ClaimsOption] = {
            "iss": {"essential": True, "value": self._auth.issuer},
            "exp": {"essential": True},
            "sub": {"essential": True},
        }
        if audiences:
            options["aud"] = {"essential": True, "values": audiences}
        return jose_jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock()), leeway=self._leeway, **options
        )

    async def validate(self, token: str, unverified: UnverifiedJwt | None = None) -> VerifiedToken:
        """Verify signature and claims of ``token``; check the required scope.

        ``unverified`` may pass the result of :func:`parse_unverified` already computed
        for routing.  Raises :class:`InvalidToken`, :class:`InsufficientScope`, or
        :class:`gateway.errors.Unavailable` (no keys held for the issuer).
        """
        if unverified is None:
            unverified = parse_unverified(token)
        header = unverified.header
        alg = header.get("alg")
        kid = header.get("kid")
        if (not isinstance(alg, str) or alg not in self._auth.algorithms
                or any(name in header for name in _NEVER_ACCEPTED_HEADERS)):
            raise InvalidToken(MSG_INVALID)
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
            raise InvalidToken(MSG_INVALID)
        if self._typ is not None and media_type(header.get("typ")) != self._typ:
            raise InvalidToken(MSG_INVALID)
        key = await self._keys.key_for(kid, alg)
        if key is None:
            raise InvalidToken(MSG_INVALID)
        claims = self._verify(token, key)
        expires_at = numeric_date(claims.get("exp"))
        subject = claims.get("sub")
        if expires_at is None or not isinstance(subject, str) or not subject:
            raise InvalidToken(MSG_INVALID)
        if not has_scope(claims, self._auth.required_scope):
            raise InsufficientScope(MSG_SCOPE)
        return VerifiedToken(subject=subject, expires_at=expires_at, claims=claims)

    def _verify(self, token: str, key: PublicKey) -> dict[str, Any]:
        try:
            decoded = jose_jwt.decode(token, key, registry=self._registry)
            self._claims_registry().validate(decoded.claims)
        except ExpiredTokenError:
            raise InvalidToken(MSG_EXPIRED) from None
        except (JoseError, ValueError, TypeError, KeyError, OverflowError, RecursionError):
            raise InvalidToken(MSG_INVALID) from None
        return decoded.claims


__all__ = [
    "MSG_EXPIRED",
    "MSG_INVALID",
    "MSG_SCOPE",
    "AllowListRegistry",
    "JwtValidator",
    "KeyProvider",
    "UnverifiedJwt",
    "VerifiedToken",
    "has_scope",
    "looks_like_jwt",
    "media_type",
    "numeric_date",
    "parse_unverified",
    "scope_values",
]
