"""Client secrets the gateway mints itself: ``ek_`` + an HS256 JWS (CONTRACT §8).

A backend holding a user's access token asks ``POST /v1/realtime/client_secrets`` for a
short-lived key it can hand to a browser; the browser opens Realtime sessions with it until
it expires (OpenAI's semantics: the expiry limits when sessions may be *created*, a session
may outlive it).  This module is the pure core of that feature, no I/O:

* :func:`parse_create_request` reads the request body, OpenAI's ``ClientSecretCreateParams``
  (openai-python ``types/realtime/client_secret_create_params.py``);
* :meth:`SecretClaims.issue` binds the secret to tenant, subject, scope, model and session
  template, with ``exp = min(created + seconds, the access token's exp)``;
* :func:`mint` signs the claims into ``"ek_" + <JWS compact serialization>`` (RFC 7515, HS256,
  RFC 7518 §3.2) with the first of the :class:`SigningKeys`; :func:`verify` checks one with
  any of them (constant-time HMAC comparison, by joserfc);
* :func:`render_response` writes OpenAI's ``ClientSecretCreateResponse``.

The value keeps OpenAI's ``ek_`` prefix: openai-node and agents-js let a browser use a key
only when it starts with ``ek_``.  It fits a ``Sec-WebSocket-Protocol`` header: at most
:data:`MAX_SECRET_BYTES`, base64url characters, ``.`` and ``_`` only.

The JWS header is exactly ``{"alg": "HS256", "kid": <kid>, "typ": "rtgw-ek+jwt"}`` (explicit
typing, RFC 8725 §3.11), and the payload has no ``iss`` or ``aud``: an access token can never
pass for a secret (wrong prefix, ``typ`` and algorithm), nor a secret for an access token (the
JWT path accepts only asymmetric algorithms and requires ``iss``).  Payload claims:
``tenant``, ``sub``, ``scope``, ``model``, ``session`` (the template without its ``model``,
compact JSON, zlib, base64url), ``iat``, ``exp``, ``token_exp`` (number or ``null``), ``jti``.

Every refusal of :func:`verify` is a :class:`gateway.errors.InvalidToken` with the JWT path's
messages and a ``reason`` from :data:`REASONS`; request errors are
:class:`gateway.errors.InvalidRequest` (400) or :class:`gateway.errors.Forbidden` (403,
reason ``model``).  No message contains a secret, a key or a value from the request body.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError, UnsupportedAlgorithmError
from joserfc.jwk import OctKey

from gateway.auth.jwt import MSG_EXPIRED, MSG_INVALID
from gateway.config import MIN_SIGNING_KEY_BYTES, ClientSecretsConfig, parse_signing_keys
from gateway.errors import Forbidden, InvalidRequest, InvalidToken

PREFIX = "ek_"
"""Every client secret starts with this (OpenAI's prefix, checked by the browser SDKs)."""
ALGORITHM = "HS256"
TYP = "rtgw-ek+jwt"
"""The JWS ``typ`` header of a client secret (RFC 7515 §4.1.9, RFC 8725 §3.11)."""
MAX_SECRET_BYTES = 4096
"""Longest ``ek_`` value minted or accepted, in bytes: it must fit a subprotocol header."""
MAX_TEMPLATE_BYTES = 64 * 1024
"""Longest session template (compact JSON, bytes) inside a secret, before compression."""
MAX_BODY_BYTES = 64 * 1024
"""Default cap on a ``POST /v1/realtime/client_secrets`` body, in bytes."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a request body (the body is depth 1)."""
DEFAULT_SECONDS = 600
"""``expires_after.seconds`` when the request names none (OpenAI's default)."""
MIN_SECONDS = 10
MAX_SECONDS = 7200

MSG_TOO_LARGE = "session configuration too large for a client secret"
MSG_MODEL = "this model is not available to your tenant"

REASONS = frozenset({"malformed", "oversize", "type", "algorithm", "unknown_kid",
                     "bad_signature", "claims", "expired", "unknown_tenant"})
"""The ``reason`` values :func:`verify` gives (bounded: fit for metric labels)."""

_HEADER_KEYS = frozenset({"alg", "kid", "typ"})
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_REQUEST_KEYS = frozenset({"expires_after", "session"})
_EXPIRES_AFTER_KEYS = frozenset({"anchor", "seconds"})


class _Registry(jws.JWSRegistry):
    """HS256 only, registered header parameters only (RFC 7515 §4.1, so no private ones).

    The whole value is capped at :data:`MAX_SECRET_BYTES` before this registry sees it.
    """

    max_header_length = 256
    max_payload_length = MAX_SECRET_BYTES
    max_signature_length = MAX_SECRET_BYTES

    def __init__(self) -> None:
        super().__init__(algorithms=[ALGORITHM], strict_check_header=True)


_REGISTRY = _Registry()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One HMAC key and its ``kid``; the key never appears in ``repr``."""

    kid: str
    key: OctKey = field(repr=False, compare=False)


class SigningKeys:
    """The keys of ``client_secrets.signing_key_env``: the first signs, all verify.

    Two objects built from the same value (two replicas) accept each other's secrets.
    """

    __slots__ = ("_by_kid", "signing")

    signing: SigningKey
    """The key new secrets are signed with."""

    def __init__(self, pairs: Iterable[tuple[str, bytes]]) -> None:
        """Build from ``(kid, key)`` pairs, signer first.

        Raises :class:`ValueError` when there are none, a kid repeats or a key is shorter
        than :data:`gateway.config.MIN_SIGNING_KEY_BYTES`.
        """
        self._by_kid: dict[str, SigningKey] = {}
        for kid, raw in pairs:
            if kid in self._by_kid:
                raise ValueError(f"duplicate kid {kid!r}")
            if len(raw) < MIN_SIGNING_KEY_BYTES:
                raise ValueError(f"key {kid!r} is shorter than {MIN_SIGNING_KEY_BYTES} bytes")
            self._by_kid[kid] = SigningKey(kid, OctKey.import_key(raw))
        if not self._by_kid:
            raise ValueError("no signing key")
        self.signing = next(iter(self._by_kid.values()))

    @classmethod
    def parse(cls, value: str) -> SigningKeys:
        """From the environment variable's value.

        Format: :func:`gateway.config.parse_signing_keys`.  Raises :class:`ValueError`
        naming the bad entry, never the key.
        """
        return cls(parse_signing_keys(value))

    @classmethod
    def from_config(cls, section: ClientSecretsConfig) -> SigningKeys:
        """From a ``client_secrets`` section loaded by :func:`gateway.config.load_config`.

        Raises :class:`ValueError` when the section was not loaded through it (no keys).
        """
        return cls(section.signing_keys)

    @property
    def kids(self) -> tuple[str, ...]:
        """The configured kids, signer first."""
        return tuple(self._by_kid)

    def get(self, kid: str) -> SigningKey | None:
        """The key with this ``kid``, or ``None``."""
        return self._by_kid.get(kid)

    def __repr__(self) -> str:
        return f"SigningKeys(kids={self.kids!r})"


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A parsed ``ClientSecretCreateParams`` body.

    ``seconds``: lifetime asked for, 10..``max_seconds``.  ``session``: the session template,
    a JSON object with ``type: "realtime"`` and ``model`` (a tenant model) filled in; the other
    fields as the client sent them (the upstream validates them when a session applies the
    template).  Treat it as read-only.
    """

    seconds: int
    session: dict[str, Any]

    @property
    def model(self) -> str:
        """The session's model (the tenant's name for it, not the upstream's)."""
        model: str = self.session["model"]
        return model


@dataclass(frozen=True, slots=True)
class SecretClaims:
    """What a client secret binds.  Times are whole epoch seconds.

    Attributes:
        tenant: the tenant id (``tenants[].id``).
        subject: the access token's ``sub``; sessions count against this user's limits.
        scope: the access token's granted scopes, space-delimited (RFC 6749 §3.3).
        model: the tenant's model name the secret's sessions must use.
        session: the session template (JSON object, ``model`` included), applied upstream
            before a session's first client event.  Treat it as read-only.
        iat: when the secret was minted.
        exp: until when sessions may be *created* with it (``now >= exp`` is expired).
        token_exp: the minting access token's ``exp``, or ``None`` when it had none; a
            session opened with the secret closes 4401 then.
        jti: a random unique id (128 bits, base64url).
    """

    tenant: str
    subject: str
    scope: str
    model: str
    session: dict[str, Any]
    iat: int
    exp: int
    token_exp: int | None
    jti: str

    @classmethod
    def issue(cls, *, tenant: str, subject: str, scope: str, request: CreateRequest,
              now: float, token_exp: float | None) -> SecretClaims:
        """Claims for a new secret: ``iat = floor(now)``, ``exp = min(iat + request.seconds,
        floor(token_exp))``, a fresh ``jti``.

        ``now`` and ``token_exp`` are epoch seconds (``token_exp``: the access token's
        ``exp``, ``None`` if it has none).  Raises :class:`gateway.errors.InvalidToken`
        (reason ``expired``) when the token expires before the secret could be used (``exp
        <= now``).
        """
        iat = math.floor(now)
        token_end = None if token_exp is None else math.floor(token_exp)
        exp = iat + request.seconds if token_end is None else min(iat + request.seconds,
                                                                  token_end)
        if exp <= now:
            raise InvalidToken(MSG_EXPIRED, reason="expired")
        return cls(tenant=tenant, subject=subject, scope=scope, model=request.model,
                   session=request.session, iat=iat, exp=exp, token_exp=token_end,
                   jti=secrets.token_urlsafe(16))


def is_client_secret(token: str) -> bool:
    """``True`` when ``token`` has the client-secret prefix (it may still be invalid)."""
    return token.startswith(PREFIX)


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(keys: SigningKeys, claims: SecretClaims) -> str:
    """Sign ``claims`` with ``keys.signing``: ``"ek_" + <JWS compact serialization>``.

    Raises :class:`gateway.errors.InvalidRequest` (400, :data:`MSG_TOO_LARGE`) when the
    template exceeds :data:`MAX_TEMPLATE_BYTES` or the value :data:`MAX_SECRET_BYTES`, and
    :class:`ValueError` when ``claims.session`` names another model than ``claims.model``
    or is not JSON (a caller's bug: :func:`parse_create_request` never produces one).
    """
    if claims.session.get("model", claims.model) != claims.model:
        raise ValueError("session.model differs from the secret's model")
    template = _compact_json({k: v for k, v in claims.session.items() if k != "model"})
    if len(template) > MAX_TEMPLATE_BYTES:
        raise InvalidRequest(MSG_TOO_LARGE, reason="secret_size")
    payload = {
        "tenant": claims.tenant,
        "sub": claims.subject,
        "scope": claims.scope,
        "model": claims.model,
        "session": _b64encode(zlib.compress(template, 9)),
        "iat": claims.iat,
        "exp": claims.exp,
        "token_exp": claims.token_exp,
        "jti": claims.jti,
    }
    header = {"alg": ALGORITHM, "kid": keys.signing.kid, "typ": TYP}
    value = PREFIX + jws.serialize_compact(header, _compact_json(payload), keys.signing.key,
                                           registry=_REGISTRY)
    if len(value) > MAX_SECRET_BYTES:
        raise InvalidRequest(MSG_TOO_LARGE, reason="secret_size")
    return value


def _invalid(reason: str) -> InvalidToken:
    return InvalidToken(MSG_INVALID, reason=reason)


def verify(keys: SigningKeys, value: str, now: float, *,
           tenants: Collection[str] | None = None) -> SecretClaims:
    """Check a client secret and return its claims.

    ``now`` is epoch seconds; the secret is expired when ``now >= exp`` (no leeway: only
    gateway replicas mint secrets).  ``tenants``, when given, are the tenant ids that may
    hold secrets (the configured ones): any other is refused.

    Raises :class:`gateway.errors.InvalidToken` (401), ``reason``: ``oversize`` (over
    :data:`MAX_SECRET_BYTES`, checked before any decoding), ``malformed`` (no ``ek_``
    prefix, not a compact JWS, header not exactly ``alg``/``kid``/``typ``), ``type``
    (``typ`` is not :data:`TYP`), ``algorithm`` (not HS256, ``none`` included),
    ``unknown_kid`` (no configured key has it), ``bad_signature``, ``claims`` (a claim
    missing or ill-typed, the template unreadable), ``expired``, ``unknown_tenant``.
    """
    if len(value) > MAX_SECRET_BYTES:
        raise _invalid("oversize")
    if not value.startswith(PREFIX) or _COMPACT.fullmatch(value, len(PREFIX)) is None:
        raise _invalid("malformed")
    try:
        obj = jws.extract_compact(value[len(PREFIX):].encode("ascii"), registry=_REGISTRY)
        header = obj.headers()
    except (JoseError, ValueError):
        raise _invalid("malformed") from None
    if set(header) != _HEADER_KEYS:
        raise _invalid("malformed")
    if header["typ"] != TYP:
        raise _invalid("type")
    if header["alg"] != ALGORITHM:
        raise _invalid("algorithm")
    key = keys.get(header["kid"]) if isinstance(header["kid"], str) else None
    if key is None:
        raise _invalid("unknown_kid")
    try:
        valid = jws.validate_compact(obj, key.key, registry=_REGISTRY)
    except UnsupportedAlgorithmError:
        raise _invalid("algorithm") from None
    except (JoseError, ValueError):
        raise _invalid("malformed") from None
    if not valid:
        raise _invalid("bad_signature")
    claims = _read_claims(obj.payload)
    if now >= claims.exp:
        raise InvalidToken(MSG_EXPIRED, reason="expired")
    if tenants is not None and claims.tenant not in tenants:
        raise _invalid("unknown_tenant")
    return claims


def _read_claims(payload: bytes) -> SecretClaims:
    try:
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise ValueError("payload is not an object")
        text = {name: data[name] for name in ("tenant", "sub", "scope", "model", "session",
                                              "jti")}
        times = {name: data[name] for name in ("iat", "exp")}
        token_exp = data["token_exp"]
        if (not all(isinstance(v, str) for v in text.values())
                or not all(text[name] for name in ("tenant", "sub", "model", "jti"))
                or not all(_is_int(v) for v in times.values())
                or not (token_exp is None or _is_int(token_exp))):
            raise ValueError("ill-typed claim")
        session = _read_template(text["session"])
    except (KeyError, ValueError, binascii.Error, zlib.error, RecursionError):
        raise _invalid("claims") from None
    return SecretClaims(tenant=text["tenant"], subject=text["sub"], scope=text["scope"],
                        model=text["model"], session={**session, "model": text["model"]},
                        iat=times["iat"], exp=times["exp"], token_exp=token_exp,
                        jti=text["jti"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_template(text: str) -> dict[str, Any]:
    inflater = zlib.decompressobj()
    raw = inflater.decompress(_b64decode(text), MAX_TEMPLATE_BYTES + 1)
    if len(raw) > MAX_TEMPLATE_BYTES or not inflater.eof or inflater.unused_data:
        raise ValueError("bad session template")
    template = json.loads(raw)
    if not isinstance(template, dict):
        raise ValueError("session template is not an object")
    return template


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects in the parsed JSON ``value`` nest deeper than ``limit`` (a
    top-level container is depth 1).  Breadth-first, one list per level: ``O(nodes)``."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        if not level:
            return False
        children: list[Any] = []
        for node in level:
            children.extend(node.values() if type(node) is dict else node)
        level = [child for child in children if isinstance(child, dict | list)]
    return bool(level)


def parse_create_request(body: bytes, *, models: Sequence[str], max_seconds: int = MAX_SECONDS,
                         max_body_bytes: int = MAX_BODY_BYTES) -> CreateRequest:
    """Parse a ``POST /v1/realtime/client_secrets`` body (OpenAI's ``ClientSecretCreateParams``).

    ``{"expires_after": {"anchor": "created_at", "seconds": 10..max_seconds},
    "session": {"type": "realtime", "model": M, ...}}``, both optional (as is each field of
    ``expires_after``; ``null`` means absent): ``seconds`` defaults to
    :data:`DEFAULT_SECONDS` (capped at ``max_seconds``), ``model`` to ``models[0]`` (the
    tenant's first).  An empty body is ``{}``.  ``models`` are the tenant's model names;
    ``max_seconds`` is ``client_secrets.max_seconds``; ``max_body_bytes`` caps the body.
    The size is checked before parsing, which bounds its cost (about 3 ms for the worst
    64 KiB body); the nesting (:data:`MAX_JSON_DEPTH`) right after, before anything else.

    Raises :class:`gateway.errors.InvalidRequest` (400) for a body too large or too deep,
    not UTF-8 JSON (``NaN`` included) or not an object, an unknown parameter, a wrong type,
    ``seconds`` out of range, an ``anchor`` other than ``created_at``, a ``session.type``
    other than ``realtime`` (``transcription`` sessions are OpenAI's, not served by the
    gateway); :class:`gateway.errors.Forbidden` (403, reason ``model``) for a model not in
    ``models``.
    """
    if not models:
        raise ValueError("a tenant has at least one model")
    if len(body) > max_body_bytes:
        raise InvalidRequest(f"the request body is larger than {max_body_bytes} bytes",
                             reason="body_size")
    data = _parse_body(body)
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if not _REQUEST_KEYS.issuperset(data):
        raise InvalidRequest("unknown parameter in the request body; "
                             "allowed: expires_after, session")
    return CreateRequest(seconds=_seconds(data.get("expires_after"), max_seconds),
                         session=_session(data.get("session"), models))


def _parse_body(body: bytes) -> Any:
    if not body.strip():
        return {}
    too_deep = InvalidRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise too_deep from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        raise InvalidRequest("the request body is not valid JSON") from None
    if _nesting_exceeds(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


def _seconds(expires_after: Any, max_seconds: int) -> int:
    if expires_after is None:
        return min(DEFAULT_SECONDS, max_seconds)
    if not isinstance(expires_after, dict):
        raise InvalidRequest("expires_after must be an object")
    if not _EXPIRES_AFTER_KEYS.issuperset(expires_after):
        raise InvalidRequest("unknown parameter in expires_after; allowed: anchor, seconds")
    if expires_after.get("anchor", "created_at") not in ("created_at", None):
        raise InvalidRequest("expires_after.anchor must be 'created_at'")
    seconds = expires_after.get("seconds")
    if seconds is None:
        return min(DEFAULT_SECONDS, max_seconds)
    if not _is_int(seconds) or not MIN_SECONDS <= seconds <= max_seconds:
        raise InvalidRequest(
            f"expires_after.seconds must be an integer from {MIN_SECONDS} to {max_seconds}")
    result: int = seconds
    return result


def _session(session: Any, models: Sequence[str]) -> dict[str, Any]:
    if session is None:
        return {"type": "realtime", "model": models[0]}
    if not isinstance(session, dict):
        raise InvalidRequest("session must be an object")
    kind = session.get("type")
    if kind == "transcription":
        raise InvalidRequest("session.type 'transcription' is not supported: the gateway "
                             "serves realtime sessions (they can transcribe their input "
                             "with audio.input.transcription)")
    if kind != "realtime":
        raise InvalidRequest("session.type must be 'realtime'")
    model = session.get("model")
    if model is None:
        model = models[0]
    elif not isinstance(model, str):
        raise InvalidRequest("session.model must be a string")
    elif model not in models:
        raise Forbidden(MSG_MODEL, reason="model")
    return {**session, "model": model}


def render_response(value: str, claims: SecretClaims) -> bytes:
    """The 200 body, OpenAI's ``ClientSecretCreateResponse``, as UTF-8 JSON.

    ``{"value": "ek_…", "expires_at": claims.exp, "session": {...}}``; ``session`` is the
    template with the fields openai-python's ``RealtimeSessionCreateResponse`` requires set
    by the gateway: ``id`` (``"sess_" + jti``), ``object: "realtime.session"``,
    ``type: "realtime"``, ``model``.
    """
    session = {**claims.session, "id": f"sess_{claims.jti}", "object": "realtime.session",
               "type": "realtime", "model": claims.model}
    return _compact_json({"value": value, "expires_at": claims.exp, "session": session})


__all__ = [
    "ALGORITHM",
    "DEFAULT_SECONDS",
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_SECONDS",
    "MAX_SECRET_BYTES",
    "MAX_TEMPLATE_BYTES",
    "MIN_SECONDS",
    "MSG_TOO_LARGE",
    "PREFIX",
    "REASONS",
    "TYP",
    "CreateRequest",
    "SecretClaims",
    "SigningKey",
    "SigningKeys",
    "is_client_secret",
    "mint",
    "parse_create_request",
    "render_response",
    "verify",
]


def session_model(claims: SecretClaims | None, requested: str | None) -> str:
    """A session's model: the requested one; with a client secret (``claims``) the secret's,
    which the request may name but not change (CONTRACT §8).

    Raises:
        Forbidden: a client secret's session asks for another model (403 / 4403).
        InvalidRequest: no model at all (400).
    """
    if claims is not None:
        if requested is not None and requested != claims.model:
            raise Forbidden("this model is not available with this client secret",
                            reason="client_secret_model")
        return claims.model
    if requested is None:
        raise InvalidRequest("the model query parameter is required")
    return requested


def session_update(claims: SecretClaims) -> str:
    """The GA ``session.update`` event (JSON text) that applies the secret's session template
    upstream before the client's first event.  The model stays the one the upstream was
    dialled with (the URL's, which may be an Azure deployment name), so the template's is
    left out; ``type`` is ``realtime``."""
    session = {key: value for key, value in claims.session.items() if key != "model"}
    session["type"] = "realtime"
    return _compact_json({"type": "session.update", "session": session}).decode()
