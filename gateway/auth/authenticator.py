"""The entry point of bearer-token authentication (RFC 6750) for the session pipeline.

:meth:`Authenticator.authenticate` takes the bearer token found by
:mod:`gateway.credentials` and returns the :class:`Principal` (tenant, subject, expiry):

* a JWT (three base64url segments whose first two decode to JSON objects) selects its
  tenant by its unverified ``iss``, exactly (an unknown issuer is refused), and is then
  fully validated against that tenant's JWKS (:mod:`gateway.auth.jwt`); a JWT whose
  tenant uses introspection is introspected;
* any other token goes to the tenants that configure RFC 7662 introspection, in
  configuration order; the first ``active`` answer whose ``iss`` (if present) matches the
  tenant wins (:mod:`gateway.auth.introspection`);
* a gateway client secret (``ek_…``, CONTRACT §8, :mod:`gateway.auth.client_secrets`) is
  verified with the ``client_secrets`` signing keys; its principal is the user who minted
  it, expiring when the minting access token does, and carries the secret's claims (model,
  session template);
* a token with less than :data:`MIN_REMAINING_SECONDS` left before ``exp`` is refused: the
  session would be closed at once.

Key sets of JWKS, discovery and development-issuer tenants are fetched by :meth:`start`
(before the gateway reports ready) and kept fresh by :class:`gateway.auth.jwks.JwksCache`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.auth.client_secrets import SecretClaims, SigningKeys, is_client_secret
from gateway.auth.client_secrets import verify as verify_client_secret
from gateway.auth.dev_issuer import DevIssuer
from gateway.auth.introspection import Introspector
from gateway.auth.jwks import FETCH_TIMEOUT_SECONDS, JwksCache, build_source, require_secure_url
from gateway.auth.jwt import (
    MSG_EXPIRED,
    MSG_INVALID,
    JwtValidator,
    UnverifiedJwt,
    looks_like_jwt,
    parse_unverified,
)
from gateway.config import Config, ConfigError, TenantConfig
from gateway.credentials import MAX_TOKEN_BYTES
from gateway.errors import InvalidToken, Unavailable

if TYPE_CHECKING:  # imported when a tenant's keys come from a URL (memory at rest)
    import httpx

MIN_REMAINING_SECONDS = 1.0
"""A token must have at least this long (seconds) left before its raw ``exp`` to open a
session (sessions close at ``exp``): a token inside ``leeway_seconds`` after ``exp`` passes
the claim check but is refused here."""

# RFC 6750 §2.1 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class Recheck:
    """Validates a session's token again (an introspection answer without ``exp``).

    Awaiting it raises :class:`gateway.errors.InvalidToken` when the token is no longer
    valid (inactive, expired, another subject) and :class:`gateway.errors.Unavailable`
    when the endpoint cannot tell; it returns when the token is still valid.  The answer
    cache of :class:`~gateway.auth.introspection.Introspector` applies (at most one call
    per ``cache_seconds``).  Holds the token: its ``repr`` never shows it.
    """

    __slots__ = ("_introspector", "_subject", "_token")

    def __init__(self, introspector: Introspector, token: str, subject: str) -> None:
        self._introspector = introspector
        self._token = token
        self._subject = subject

    async def __call__(self) -> None:
        answer = await self._introspector.introspect(self._token)
        subject, _ = self._introspector.principal_claims(answer)
        if subject != self._subject:
            raise InvalidToken(MSG_INVALID)

    def __repr__(self) -> str:
        return "Recheck(<token redacted>)"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a validated bearer token speaks for.

    ``expires_at`` is the token's ``exp`` in epoch seconds (for a client secret: the ``exp``
    of the access token that minted it); ``None`` only when an introspection answer carried
    no ``exp``, and then ``recheck`` validates the token again (the session re-checks it
    periodically, :mod:`gateway.housekeeping`).  ``secret`` holds a client secret's claims
    when the token was one.
    """

    tenant: TenantConfig
    subject: str
    expires_at: float | None
    secret: SecretClaims | None = None
    recheck: Recheck | None = field(default=None, repr=False, compare=False)

    @property
    def credential(self) -> str:
        """``client_secret`` or ``access_token``: the kind of token (for logs, never the
        value)."""
        return "access_token" if self.secret is None else "client_secret"


def _no_refresh_callback(tenant_id: str, result: str) -> None:
    return None


class Authenticator:
    """Validates bearer tokens for every tenant of ``config``.

    ``on_jwks_refresh(tenant_id, result)`` is called after each key-set fetch with
    ``"success"`` or ``"failure"`` (for ``jwks_refreshes_total``).  ``clock`` returns epoch
    seconds.  Raises :class:`gateway.config.ConfigError` when a ``jwks_uri``,
    ``discovery_url`` or introspection ``url`` is neither https nor http to a loopback host.
    """

    def __init__(
        self,
        config: Config,
        *,
        on_jwks_refresh: Callable[[str, str], None] = _no_refresh_callback,
        clock: Callable[[], float] = time.time,
    ) -> None:
        errors: list[tuple[str, str]] = []
        for index, tenant in enumerate(config.tenants):
            auth = tenant.auth
            urls = {
                "jwks_uri": auth.jwks_uri,
                "discovery_url": auth.discovery_url,
                "introspection.url": auth.introspection.url if auth.introspection else None,
            }
            for key, url in urls.items():
                if url is None:
                    continue
                try:
                    require_secure_url(url)
                except ValueError as exc:
                    errors.append((f"tenants.{index}.auth.{key}", str(exc)))
        if errors:
            raise ConfigError(errors)

        self._config = config
        self._clock = clock
        self._secret_keys = (SigningKeys.from_config(config.client_secrets)
                             if config.client_secrets is not None else None)
        self._tenants = {tenant.id: tenant for tenant in config.tenants}
        self._http: httpx.AsyncClient | None = None
        self._caches: dict[str, JwksCache] = {}
        self._validators: dict[str, JwtValidator] = {}
        self._introspectors: dict[str, Introspector] = {}
        self._dev_issuers: dict[str, DevIssuer] = {}
        for tenant in config.tenants:
            auth = tenant.auth
            if auth.introspection is not None:
                self._introspectors[tenant.id] = Introspector(tenant, clock=clock)
                continue
            dev_issuer = None
            if auth.dev_issuer is not None:
                dev_issuer = DevIssuer(auth.dev_issuer.key_file, clock=clock)
                self._dev_issuers[tenant.id] = dev_issuer
            source = build_source(
                jwks_uri=auth.jwks_uri,
                discovery_url=auth.discovery_url,
                issuer=auth.issuer,
                get_jwks=dev_issuer.public_jwks if dev_issuer is not None else None,
                client=self._http_client,
            )
            cache = JwksCache(tenant.id, source, algorithms=auth.algorithms,
                              on_refresh=on_jwks_refresh, clock=clock)
            self._caches[tenant.id] = cache
            self._validators[tenant.id] = JwtValidator(auth, cache, clock=clock)

    def _http_client(self) -> httpx.AsyncClient:
        """The HTTP client shared by the URL key sources, created (and httpx imported) on
        first use."""
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False)
        return self._http

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch every tenant's key set, concurrently; then keep them fresh.  Never raises:
        failures are logged, counted, retried with backoff and visible in :meth:`ready`."""
        await asyncio.gather(*(cache.start() for cache in self._caches.values()))

    def ready(self) -> bool:
        """``True`` when every JWKS, discovery and development-issuer tenant holds usable keys.

        Introspection tenants are always ready (their endpoint is asked per token).
        """
        return all(cache.ready() for cache in self._caches.values())

    def key_set_ages(self) -> dict[str, float | None]:
        """Seconds since each key-set tenant's last successful fetch (``None``: never)."""
        return {tenant_id: cache.age_seconds() for tenant_id, cache in self._caches.items()}

    @property
    def client_secret_keys(self) -> SigningKeys | None:
        """The keys client secrets are signed and verified with (``None``: not configured)."""
        return self._secret_keys

    def dev_issuer(self, tenant_id: str) -> DevIssuer | None:
        """The development issuer of tenant ``tenant_id``, if it configures one."""
        return self._dev_issuers.get(tenant_id)

    async def aclose(self) -> None:
        """Stop background refreshes and close HTTP clients."""
        for cache in self._caches.values():
            await cache.aclose()
        for introspector in self._introspectors.values():
            await introspector.aclose()
        if self._http is not None:
            await self._http.aclose()

    # -- authentication --------------------------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        """Validate a bearer token and return its :class:`Principal`.

        ``token`` is an OAuth access token (JWT or opaque) or a gateway client secret.

        Raises :class:`gateway.errors.InvalidToken` (malformed, bad signature, wrong
        ``iss``/``aud``, expired, unknown issuer, inactive; for a client secret also
        tampered, forged, unknown kid or tenant), :class:`InsufficientScope`,
        or :class:`gateway.errors.Unavailable` (no keys held for the issuer, or the
        introspection endpoint failed).
        """
        if not token or len(token) > MAX_TOKEN_BYTES or _B64TOKEN.fullmatch(token) is None:
            raise InvalidToken(MSG_INVALID)
        if is_client_secret(token):
            principal = self._authenticate_secret(token)
        else:
            principal = await self._authenticate_token(token)
        if (principal.expires_at is not None
                and principal.expires_at - self._clock() < MIN_REMAINING_SECONDS):
            raise InvalidToken(MSG_EXPIRED)
        return principal

    async def _authenticate_token(self, token: str) -> Principal:
        """An access token's principal: a JWT of a key-set tenant, else introspection."""
        unverified = None
        if looks_like_jwt(token):
            try:
                unverified = parse_unverified(token)
            except InvalidToken:
                if not self._introspectors:
                    raise
                # Three dot-separated segments that are not JOSE: an opaque token.
        if unverified is not None:
            return await self._authenticate_jwt(token, unverified)
        return await self._introspect(token, list(self._introspectors.values()))

    def _authenticate_secret(self, token: str) -> Principal:
        """A client secret's principal.  Refused like an invalid token (401) when client
        secrets are not configured, the secret does not verify (tampered, forged, other
        kid, expired, unknown tenant: :func:`gateway.auth.client_secrets.verify`), or its
        tenant's ``required_scope`` is no longer among the scopes it was minted with."""
        if self._secret_keys is None:
            raise InvalidToken(MSG_INVALID, reason="client_secrets_disabled")
        claims = verify_client_secret(self._secret_keys, token, self._clock(),
                                      tenants=self._tenants.keys())
        tenant = self._tenants[claims.tenant]
        if tenant.auth.required_scope not in claims.scope.split():
            raise InvalidToken(MSG_INVALID, reason="scope_changed")
        return Principal(tenant=tenant, subject=claims.subject,
                         expires_at=claims.token_exp, secret=claims)

    async def _authenticate_jwt(self, token: str, unverified: UnverifiedJwt) -> Principal:
        issuer = unverified.issuer
        tenant = self._config.tenant_by_issuer(issuer) if issuer is not None else None
        if tenant is None:
            raise InvalidToken(MSG_INVALID)
        validator = self._validators.get(tenant.id)
        if validator is None:  # a JWT-shaped token of an introspection tenant
            return await self._introspect(token, [self._introspectors[tenant.id]])
        verified = await validator.validate(token, unverified)
        return Principal(tenant=tenant, subject=verified.subject, expires_at=verified.expires_at)

    async def _introspect(self, token: str, introspectors: list[Introspector]) -> Principal:
        failure: Unavailable | None = None
        for introspector in introspectors:
            try:
                answer = await introspector.introspect(token)
            except Unavailable as exc:
                failure = exc
                continue
            if introspector.matches_issuer(answer):
                subject, expires_at = introspector.principal_claims(answer)
                recheck = Recheck(introspector, token, subject) if expires_at is None else None
                return Principal(tenant=introspector.tenant, subject=subject,
                                 expires_at=expires_at, recheck=recheck)
        if failure is not None:
            raise failure
        raise InvalidToken(MSG_INVALID)


__all__ = ["MIN_REMAINING_SECONDS", "Authenticator", "Principal", "Recheck"]
