"""OAuth 2.0 Token Introspection (RFC 7662) for tenants whose tokens are opaque.

Each call POSTs ``token=<t>&token_type_hint=access_token`` to the tenant's introspection
endpoint with ``client_secret_basic`` authentication (RFC 6749 §2.3.1), through authlib's
httpx integration (:meth:`authlib.integrations.httpx_client.AsyncOAuth2Client.introspect_token`).

* The answer counts only when ``active`` is the JSON ``true``.
* Positive answers are cached by SHA-256 of the token until ``min(exp, now + cache_seconds)``,
  negative ones for :data:`NEGATIVE_CACHE_SECONDS`; the cache is bounded and concurrent
  lookups of one token share one request.  The token itself is never stored or logged.
* At most ``max_concurrent`` requests are in flight per tenant; a lookup waits for a free
  one, and the wait counts in ``timeout_seconds``: a flood of distinct junk tokens makes
  a bounded number of outbound calls, each lookup ends within ``timeout_seconds``.
* Timeouts (of the request or of the wait for a free one), transport errors, non-200
  statuses and unparsable bodies raise :class:`gateway.errors.Unavailable` (503):
  authentication fails closed.  Failures are not cached.

The claims of an active answer (``exp``, ``aud``, ``iss``, ``sub``, scope) are checked
by :meth:`Introspector.principal_claims` on every use, since ``exp`` moves with time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gateway.auth.jwks import require_secure_url
from gateway.auth.jwt import MSG_EXPIRED, MSG_INVALID, MSG_SCOPE, has_scope, numeric_date
from gateway.config import TenantConfig
from gateway.errors import InsufficientScope, InvalidToken, Unavailable

if TYPE_CHECKING:  # imported when an introspection tenant first needs it (memory at rest)
    from authlib.integrations.httpx_client import AsyncOAuth2Client

NEGATIVE_CACHE_SECONDS = 10.0
MAX_CACHE_ENTRIES = 10_000
MAX_RESPONSE_BYTES = 64 * 1024
UNAVAILABLE_RETRY_AFTER_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class IntrospectionAnswer:
    """An introspection response: ``active`` and, when active, its members (RFC 7662 §2.2)."""

    active: bool
    claims: Mapping[str, Any]


_INACTIVE = IntrospectionAnswer(False, {})


class Introspector:
    """RFC 7662 client and answer cache for one tenant (``tenant.auth.introspection``).

    ``clock`` returns epoch seconds.  ``client`` may be injected (tests); by default an
    :class:`AsyncOAuth2Client` is created with the tenant's ``client_id`` and the secret
    resolved by the configuration from ``client_secret_env``.
    """

    def __init__(
        self,
        tenant: TenantConfig,
        *,
        clock: Callable[[], float],
        negative_cache_seconds: float = NEGATIVE_CACHE_SECONDS,
        max_cache_entries: int = MAX_CACHE_ENTRIES,
    ) -> None:
        """Raises ``ValueError`` when the tenant has no ``introspection`` section or its URL
        is neither https nor loopback http."""
        settings = tenant.auth.introspection
        if settings is None:
            raise ValueError(f"tenant {tenant.id} has no introspection settings")
        require_secure_url(settings.url)
        self.tenant = tenant
        self._settings = settings
        self._clock = clock
        self._negative_ttl = negative_cache_seconds
        self._max_entries = max_cache_entries
        self._cache: OrderedDict[str, tuple[float, IntrospectionAnswer]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[IntrospectionAnswer]] = {}
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._client: AsyncOAuth2Client | None = None
        self._log = structlog.get_logger()

    def _get_client(self) -> AsyncOAuth2Client:
        if self._client is None:
            from authlib.integrations.httpx_client import AsyncOAuth2Client

            self._client = AsyncOAuth2Client(
                client_id=self._settings.client_id,
                client_secret=self._settings.client_secret,
                token_endpoint_auth_method="client_secret_basic",  # noqa: S106 - a method name
                timeout=self._settings.timeout_seconds,
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client and cancel lookups in flight."""
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- cache ---------------------------------------------------------------------------------

    def _cached(self, digest: str) -> IntrospectionAnswer | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        until, answer = entry
        if self._clock() >= until:
            del self._cache[digest]
            return None
        return answer

    def _store(self, digest: str, answer: IntrospectionAnswer) -> None:
        now = self._clock()
        if answer.active:
            until = now + self._settings.cache_seconds
            exp = numeric_date(answer.claims.get("exp"))
            if exp is not None:
                until = min(until, exp)
        else:
            until = now + self._negative_ttl
        if until <= now:
            return
        self._cache[digest] = (until, answer)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    # -- lookup --------------------------------------------------------------------------------

    async def introspect(self, token: str) -> IntrospectionAnswer:
        """The (possibly cached) introspection answer for ``token``.

        Raises :class:`gateway.errors.Unavailable` when the endpoint cannot give an answer
        within ``timeout_seconds``.
        """
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        cached = self._cached(digest)
        if cached is not None:
            return cached
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._lookup(token, digest),
                                       name=f"introspect-{self.tenant.id}")
            self._inflight[digest] = task
            task.add_done_callback(lambda done: self._forget(digest, done))
        return await asyncio.shield(task)

    def _forget(self, digest: str, task: asyncio.Task[IntrospectionAnswer]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter was cancelled

    async def _lookup(self, token: str, digest: str) -> IntrospectionAnswer:
        answer = await self._request(token)
        self._store(digest, answer)
        return answer

    async def _request(self, token: str) -> IntrospectionAnswer:
        reason: str
        waiting = True
        try:
            async with asyncio.timeout(self._settings.timeout_seconds), self._slots:
                waiting = False
                response = await self._get_client().introspect_token(
                    self._settings.url,
                    token=token,
                    token_type_hint="access_token",  # noqa: S106 - RFC 7662 hint value
                )
            if response.status_code != 200:
                reason = f"HTTP status {response.status_code}"
            elif len(response.content) > MAX_RESPONSE_BYTES:
                reason = "response body too large"
            else:
                try:
                    body = json.loads(response.content)
                except (ValueError, RecursionError):
                    body = None
                if isinstance(body, dict):
                    if body.get("active") is True:
                        return IntrospectionAnswer(True, body)
                    return _INACTIVE
                reason = "response is not a JSON object"
        except TimeoutError:
            reason = "no free request slot in time (max_concurrent)" if waiting else "timed out"
        except Exception as exc:  # httpx2 transport errors, authlib errors
            reason = f"request failed: {type(exc).__name__}"
        self._log.warning("introspection.failed", tenant=self.tenant.id, reason=reason)
        raise Unavailable("the token introspection endpoint is unavailable; retry later",
                          retry_after=UNAVAILABLE_RETRY_AFTER_SECONDS)

    # -- verdict -------------------------------------------------------------------------------

    def matches_issuer(self, answer: IntrospectionAnswer) -> bool:
        """``True`` when the answer is active and its ``iss``, if present, is this tenant's."""
        if not answer.active:
            return False
        iss = answer.claims.get("iss")
        return iss is None or iss == self.tenant.auth.issuer

    def principal_claims(self, answer: IntrospectionAnswer) -> tuple[str, float | None]:
        """Check an active answer for this tenant; return ``(sub, exp)``.

        ``exp`` (epoch seconds) must be in the future, within ``leeway_seconds``; when
        absent the result's expiry is ``None``.  ``aud`` (string or list) must intersect
        ``auth.audiences`` when configured; ``nbf``, if present, must not be in the future
        (within the leeway); ``sub`` is required; the required scope must
        be in ``scope`` or ``scp``.  Raises :class:`InvalidToken` or
        :class:`InsufficientScope`.
        """
        auth = self.tenant.auth
        claims = answer.claims
        if not self.matches_issuer(answer):
            raise InvalidToken(MSG_INVALID)
        expires_at: float | None = None
        if "exp" in claims:
            expires_at = numeric_date(claims["exp"])
            if expires_at is None:
                raise InvalidToken(MSG_INVALID)
            if expires_at <= self._clock() - auth.leeway_seconds:
                raise InvalidToken(MSG_EXPIRED)
        not_before = numeric_date(claims.get("nbf"))
        if "nbf" in claims and (
                not_before is None or not_before > self._clock() + auth.leeway_seconds):
            raise InvalidToken(MSG_INVALID)
        if auth.audiences:
            aud = claims.get("aud")
            values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(isinstance(v, str) and v in auth.audiences for v in values):
                raise InvalidToken(MSG_INVALID)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken(MSG_INVALID)
        if not has_scope(claims, auth.required_scope):
            raise InsufficientScope(MSG_SCOPE)
        return subject, expires_at


__all__ = ["IntrospectionAnswer", "Introspector"]
