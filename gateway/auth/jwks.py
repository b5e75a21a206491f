"""Per-tenant JSON Web Key Set cache (RFC 7517) with refresh-ahead, cooldown and stale-if-error.

One :class:`JwksCache` per tenant holds the issuer's public signing keys:

* fetched by :meth:`JwksCache.start` before the gateway reports ready, then refreshed
  ahead at the TTL (``Cache-Control: max-age`` clamped to [60 s, 1 h], default 10 min)
  by a background task and, lazily, by the first lookup after the TTL;
* a ``kid`` that is not in the set triggers one refresh at most every 30 s (cooldown),
  so tokens carrying random ``kid`` values cannot amplify traffic to the identity provider;
* single-flight: concurrent callers share one fetch; never more than one in flight;
* stale-if-error: the last good keys stay in use while the endpoint fails (up to
  ``max_stale_seconds``), retried with exponential backoff and jitter;
* fetches are bounded (timeout ~3 s, body <= 64 KiB, <= 50 keys, no redirects) and keys
  are filtered: only public asymmetric keys (never ``oct``) with ``use`` absent or ``sig``
  and a type usable by one of the tenant's allowed algorithms (RFC 8725 §3.1-3.2).

A key source is a URL (``jwks_uri``), OIDC discovery (``discovery_url``: the metadata's
``issuer`` must equal the configured issuer exactly, RFC 8414 §3.3 / OIDC Discovery §4.3,
then its ``jwks_uri``), or a callable returning a JWKS dict (the development issuer).
Only ``https://`` URLs are accepted, or ``http://`` to a loopback host (tests, local IdPs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import structlog
from joserfc.jwk import ECKey, OKPKey, RSAKey

from gateway.config import is_loopback_host
from gateway.errors import Unavailable

if TYPE_CHECKING:
    import httpx

PublicKey = RSAKey | ECKey | OKPKey
"""A public signing key usable for JWS verification (never a symmetric ``oct`` key)."""

DEFAULT_TTL_SECONDS = 600.0
MIN_TTL_SECONDS = 60.0
MAX_TTL_SECONDS = 3600.0
COOLDOWN_SECONDS = 30.0
FETCH_TIMEOUT_SECONDS = 3.0
MAX_BODY_BYTES = 64 * 1024
MAX_KEYS = 50
MAX_KID_LENGTH = 256
MAX_STALE_SECONDS = 24 * 3600.0
RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
UNAVAILABLE_RETRY_AFTER_SECONDS = 5.0

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES = {"EdDSA": frozenset({"Ed25519", "Ed448"}), "Ed25519": frozenset({"Ed25519"}),
               "Ed448": frozenset({"Ed448"})}
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,10})\"?", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|[,\s])(?:no-store|no-cache)(?:$|[,\s=])", re.IGNORECASE)


class JwksError(Exception):
    """A key-set fetch failed.  ``str()`` is a short reason safe to log (no key material)."""


def require_secure_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is ``https://host...`` or ``http://`` to a loopback host.

    Loopback hosts are ``localhost``, 127.0.0.0/8 and ``::1``; anything else over plain
    HTTP would let a network attacker substitute the issuer's keys (RFC 8725 §3.10).
    """
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("must be an absolute https:// URL")
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return
    raise ValueError("must be an https:// URL (http:// is allowed only for loopback hosts)")


def kid_hash(kid: str | None) -> str:
    """A short, non-reversible label for a ``kid`` in logs (first 12 hex digits of SHA-256)."""
    if kid is None:
        return "none"
    return hashlib.sha256(kid.encode("utf-8", "replace")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class JwksDocument:
    """A fetched key set: the parsed JSON body and its ``Cache-Control: max-age`` in seconds.

    ``max_age`` is ``None`` when the response carried no usable freshness information
    (the cache then uses its default TTL); ``0`` for ``no-store``/``no-cache``.
    """

    jwks: Any
    max_age: float | None


class JwksSource(Protocol):
    """Where a tenant's key set comes from."""

    async def fetch(self) -> JwksDocument:
        """Fetch the current key set; raise :class:`JwksError` with a loggable reason."""
        ...


def parse_cache_control(value: str | None) -> float | None:
    """Freshness lifetime in seconds from a ``Cache-Control`` header (RFC 9111 §5.2.2).

    ``max-age=N`` → ``N``; ``no-store``/``no-cache`` → ``0``; absent or unparsable → ``None``.
    """
    if not value:
        return None
    if _NO_CACHE.search(value):
        return 0.0
    match = _MAX_AGE.search(value)
    return float(match.group(1)) if match else None


async def fetch_json(
    client: httpx.AsyncClient,
    url: str,
    *,
    timeout_seconds: float = FETCH_TIMEOUT_SECONDS,
    max_bytes: int = MAX_BODY_BYTES,
) -> JwksDocument:
    """GET ``url`` and parse its JSON body, within ``timeout_seconds`` for the whole exchange.

    Redirects are not followed; the body is read incrementally and refused past
    ``max_bytes``.  Returns the JSON value and the response's ``max-age``.
    Raises :class:`JwksError` (HTTP status other than 200, timeout, transport error,
    oversized or invalid body).
    """
    import httpx

    try:
        async with asyncio.timeout(timeout_seconds):
            async with client.stream(
                "GET", url, headers={"accept": "application/json", "accept-encoding": "identity"}
            ) as response:
                if response.status_code != 200:
                    raise JwksError(f"HTTP status {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise JwksError(f"body larger than {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise JwksError(f"body larger than {max_bytes} bytes")
                max_age = parse_cache_control(response.headers.get("cache-control"))
    except TimeoutError:
        raise JwksError(f"timed out after {timeout_seconds:g} s") from None
    except httpx.HTTPError as exc:
        raise JwksError(f"transport error: {type(exc).__name__}") from None
    try:
        document = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise JwksError("body is not JSON") from None
    return JwksDocument(document, max_age)


class UrlJwksSource:
    """Key set served at a fixed ``jwks_uri`` (RFC 8414 ``jwks_uri``)."""

    def __init__(
        self, url: str, client: httpx.AsyncClient, *, timeout_seconds: float = FETCH_TIMEOUT_SECONDS
    ) -> None:
        """``url`` must pass :func:`require_secure_url` (raises ``ValueError`` otherwise)."""
        require_secure_url(url)
        self._url = url
        self._client = client
        self._timeout = timeout_seconds

    async def fetch(self) -> JwksDocument:
        """GET the key set (see :func:`fetch_json`)."""
        return await fetch_json(self._client, self._url, timeout_seconds=self._timeout)


class DiscoveryJwksSource:
    """Key set found through OpenID Connect Discovery 1.0 / RFC 8414 metadata.

    Each refresh reads the metadata at ``discovery_url``, requires its ``issuer`` to equal
    ``issuer`` exactly (a mismatch is a failed fetch, so the tenant never becomes ready),
    then fetches the metadata's ``jwks_uri`` (which must also be https, or loopback http).
    """

    def __init__(
        self,
        discovery_url: str,
        issuer: str,
        client: httpx.AsyncClient,
        *,
        timeout_seconds: float = FETCH_TIMEOUT_SECONDS,
    ) -> None:
        """``discovery_url`` must pass :func:`require_secure_url` (``ValueError`` otherwise)."""
        require_secure_url(discovery_url)
        self._url = discovery_url
        self._issuer = issuer
        self._client = client
        self._timeout = timeout_seconds

    async def fetch(self) -> JwksDocument:
        """Fetch the metadata, check ``issuer``, then fetch ``jwks_uri``; :class:`JwksError`."""
        metadata = (await fetch_json(self._client, self._url, timeout_seconds=self._timeout)).jwks
        if not isinstance(metadata, dict):
            raise JwksError("discovery metadata is not a JSON object")
        if metadata.get("issuer") != self._issuer:
            raise JwksError("discovery metadata issuer does not match the configured issuer")
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise JwksError("discovery metadata has no jwks_uri")
        try:
            require_secure_url(jwks_uri)
        except ValueError:
            raise JwksError("discovery jwks_uri is not https") from None
        return await fetch_json(self._client, jwks_uri, timeout_seconds=self._timeout)


class CallableJwksSource:
    """Key set returned by a local callable (the development issuer's ``public_jwks``)."""

    def __init__(self, get_jwks: Callable[[], Mapping[str, Any]]) -> None:
        self._get_jwks = get_jwks

    async def fetch(self) -> JwksDocument:
        """Call the callable (in a worker thread: it may touch the filesystem)."""
        try:
            jwks = await asyncio.to_thread(self._get_jwks)
        except Exception as exc:
            raise JwksError(f"key source failed: {type(exc).__name__}") from None
        return JwksDocument(dict(jwks), None)


def _key_matches_alg(key: PublicKey, alg: str) -> bool:
    if key.alg is not None and key.alg != alg:
        return False
    if isinstance(key, RSAKey):
        return alg in _RSA_ALGORITHMS
    if isinstance(key, ECKey):
        return _EC_CURVES.get(alg) == key.curve_name
    return key.curve_name in _OKP_CURVES.get(alg, frozenset())


_KEY_CLASSES: dict[str, type[RSAKey] | type[ECKey] | type[OKPKey]] = {
    "RSA": RSAKey, "EC": ECKey, "OKP": OKPKey,
}


def _import_public_key(entry: Any, algorithms: Collection[str]) -> PublicKey | None:
    """One JWK → a public signing key usable with ``algorithms``, or ``None`` to skip it."""
    if not isinstance(entry, dict):
        return None
    key_class = _KEY_CLASSES.get(entry.get("kty", ""))  # "oct" and unknown types: skipped
    if key_class is None:
        return None
    if entry.get("use", "sig") != "sig":
        return None
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    kid = entry.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
        return None
    if "d" in entry or "p" in entry:  # a private key published by mistake: never use it
        return None
    try:
        key = key_class.import_key(entry)
    except Exception:  # malformed members, points off the curve, ...
        return None
    if key.is_private or not any(_key_matches_alg(key, alg) for alg in algorithms):
        return None
    return key


class KeyIndex:
    """An immutable set of public signing keys, looked up by ``kid`` and algorithm."""

    def __init__(self, keys: Sequence[PublicKey]) -> None:
        self._keys = tuple(keys)
        self._by_kid: dict[str, list[PublicKey]] = {}
        for key in self._keys:
            if key.kid is not None:
                self._by_kid.setdefault(key.kid, []).append(key)

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, kid: str | None, alg: str) -> PublicKey | None:
        """The key for ``kid`` usable with ``alg``.

        Without a ``kid`` a key is returned only when exactly one key fits ``alg``
        (RFC 7515 §4.1.4 leaves the choice to the application; guessing is refused).
        """
        if kid is None:
            candidates = [key for key in self._keys if _key_matches_alg(key, alg)]
            return candidates[0] if len(candidates) == 1 else None
        for key in self._by_kid.get(kid, ()):
            if _key_matches_alg(key, alg):
                return key
        return None


def parse_jwks(
    document: Any, algorithms: Collection[str], *, max_keys: int = MAX_KEYS
) -> tuple[KeyIndex, int]:
    """Filter a JWKS document (``{"keys": [...]}``) into a :class:`KeyIndex`.

    Returns the index and the number of entries skipped (wrong ``use``, ``oct``, type or
    curve not usable with ``algorithms``, private or malformed).  Raises :class:`JwksError`
    when the document is not a key set, holds more than ``max_keys`` entries, or yields
    no usable key.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWK Set (no \"keys\" array)")
    entries = document["keys"]
    if len(entries) > max_keys:
        raise JwksError(f"more than {max_keys} keys")
    keys = [key for key in (_import_public_key(e, algorithms) for e in entries) if key is not None]
    if not keys:
        raise JwksError("no usable signing key")
    return KeyIndex(keys), len(entries) - len(keys)


def _noop_refresh(tenant_id: str, result: str) -> None:
    return None


class JwksCache:
    """The signing keys of one tenant's issuer, kept fresh (see the module docstring).

    Times come from ``clock`` (epoch seconds); background sleeps use the event loop.
    ``on_refresh(tenant_id, result)`` is called after every fetch with ``"success"`` or
    ``"failure"`` (the gateway counts ``jwks_refreshes_total{tenant,result}``).
    """

    def __init__(
        self,
        tenant_id: str,
        source: JwksSource,
        *,
        algorithms: Collection[str],
        on_refresh: Callable[[str, str], None] = _noop_refresh,
        clock: Callable[[], float],
        cooldown_seconds: float = COOLDOWN_SECONDS,
        default_ttl_seconds: float = DEFAULT_TTL_SECONDS,
        min_ttl_seconds: float = MIN_TTL_SECONDS,
        max_ttl_seconds: float = MAX_TTL_SECONDS,
        max_stale_seconds: float | None = MAX_STALE_SECONDS,
        max_keys: int = MAX_KEYS,
        retry_initial_seconds: float = RETRY_INITIAL_SECONDS,
        retry_max_seconds: float = RETRY_MAX_SECONDS,
    ) -> None:
        """Durations are seconds.  ``max_stale_seconds``: how long the last good keys are
        used while every refresh fails (``None``: forever); past it the cache is cold."""
        self.tenant_id = tenant_id
        self._source = source
        self._algorithms = tuple(algorithms)
        self._on_refresh = on_refresh
        self._clock = clock
        self._cooldown = cooldown_seconds
        self._default_ttl = default_ttl_seconds
        self._min_ttl = min_ttl_seconds
        self._max_ttl = max_ttl_seconds
        self._max_stale = max_stale_seconds
        self._max_keys = max_keys
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._random = random.SystemRandom()  # jitter only
        self._index: KeyIndex | None = None
        self._fetched_at: float | None = None
        self._due = -math.inf  # next refresh, on ``clock`` (checked by lookups)
        self._due_monotonic = -math.inf  # the same instant on the event loop's clock
        self._last_on_demand = -math.inf
        self._failures = 0
        self._flight: asyncio.Task[bool] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._log = structlog.get_logger()

    # -- state -------------------------------------------------------------------------------

    def _usable(self) -> KeyIndex | None:
        if self._index is None or self._fetched_at is None:
            return None
        if self._max_stale is not None and self._clock() - self._fetched_at > self._max_stale:
            return None
        return self._index

    def ready(self) -> bool:
        """``True`` when usable keys are held (fresh, or stale within ``max_stale_seconds``)."""
        return self._usable() is not None

    def age_seconds(self) -> float | None:
        """Seconds since the last successful fetch, ``None`` if there never was one."""
        return None if self._fetched_at is None else max(0.0, self._clock() - self._fetched_at)

    @property
    def fetch_in_flight(self) -> bool:
        """``True`` while a fetch is running."""
        return self._flight is not None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """First fetch (awaited), then the background refresh-ahead task.  Never raises."""
        await self.refresh()
        if self._loop_task is None and not self._closed:
            self._loop_task = asyncio.create_task(self._refresh_loop(),
                                                  name=f"jwks-refresh-{self.tenant_id}")

    async def aclose(self) -> None:
        """Stop the background task and any fetch in flight."""
        self._closed = True
        tasks = [t for t in (self._loop_task, self._flight, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loop_task = None
        self._flight = None

    async def _refresh_loop(self) -> None:
        # Sleeps on the event loop's monotonic clock (wall-clock jumps do not matter here);
        # lookups also refresh when ``clock`` says the TTL is over.
        loop = asyncio.get_running_loop()
        while not self._closed:
            delay = self._due_monotonic - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            await self.refresh()
            if self._due_monotonic <= loop.time():  # cannot happen; never spin regardless
                await asyncio.sleep(self._retry_initial)

    # -- fetching ----------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Fetch the key set now, or join the fetch already in flight (single-flight).

        Returns ``True`` if that fetch succeeded.  Cancelling the caller does not cancel
        the shared fetch.  Never raises (except ``CancelledError`` for the caller).
        """
        if self._closed:
            return False
        if self._flight is None:
            self._flight = asyncio.create_task(self._fetch_once(),
                                               name=f"jwks-fetch-{self.tenant_id}")
        return await asyncio.shield(self._flight)

    async def _fetch_once(self) -> bool:
        try:
            try:
                document = await self._source.fetch()
                index, skipped = parse_jwks(document.jwks, self._algorithms,
                                            max_keys=self._max_keys)
            except JwksError as exc:
                self._record_failure(str(exc))
                return False
            except Exception as exc:  # a bug in a source must not take the cache down
                self._record_failure(f"unexpected error: {type(exc).__name__}")
                return False
            now = self._clock()
            self._index = index
            self._fetched_at = now
            self._failures = 0
            ttl = self._ttl(document.max_age)
            self._due = now + ttl
            self._due_monotonic = asyncio.get_running_loop().time() + ttl
            self._log.info("jwks.refreshed", tenant=self.tenant_id, keys=len(index),
                           skipped=skipped)
            self._report("success")
            return True
        finally:
            self._flight = None

    def _ttl(self, max_age: float | None) -> float:
        ttl = self._default_ttl if max_age is None else max_age
        return min(max(ttl, self._min_ttl), self._max_ttl)

    def _record_failure(self, reason: str) -> None:
        self._failures += 1
        backoff = min(self._retry_max, self._retry_initial * 2 ** min(self._failures - 1, 30))
        now = self._clock()
        delay = backoff * self._random.uniform(0.8, 1.2)
        self._due = now + delay
        self._due_monotonic = asyncio.get_running_loop().time() + delay
        self._log.warning(
            "jwks.refresh_failed",
            tenant=self.tenant_id,
            reason=reason,
            consecutive_failures=self._failures,
            serving_stale=self._usable() is not None,
        )
        self._report("failure")

    def _report(self, result: str) -> None:
        try:
            self._on_refresh(self.tenant_id, result)
        except Exception:
            self._log.exception("jwks.callback_failed", tenant=self.tenant_id)

    def _refresh_in_background(self) -> None:
        if self._flight is not None or self._closed:
            return
        task = asyncio.create_task(self.refresh(), name=f"jwks-ahead-{self.tenant_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- lookup ------------------------------------------------------------------------------

    async def key_for(self, kid: str | None, alg: str) -> PublicKey | None:
        """The public key for a token's ``kid`` and ``alg``, or ``None`` if there is none.

        An unknown ``kid`` triggers one refresh if none happened on demand within the
        cooldown (or joins the fetch in flight).  Raises :class:`gateway.errors.Unavailable`
        (503, ``retry_after`` ~5 s) when no usable keys are held (cold cache).
        """
        now = self._clock()
        index = self._usable()
        if index is None:
            if self._flight is not None or now >= self._due:
                await self.refresh()
                index = self._usable()
            if index is None:
                raise Unavailable(
                    "the token issuer's signing keys are not available; retry later",
                    retry_after=UNAVAILABLE_RETRY_AFTER_SECONDS,
                )
        elif now >= self._due:
            self._refresh_in_background()  # refresh-ahead; the current keys are still valid
        key = index.find(kid, alg)
        if key is not None or kid is None:
            return key
        if self._flight is None:
            if now - self._last_on_demand < self._cooldown:
                self._log.info("jwks.kid_unknown_cooldown", tenant=self.tenant_id,
                          kid_hash=kid_hash(kid))
                return None
            self._last_on_demand = now
            self._log.info("jwks.kid_unknown_refresh", tenant=self.tenant_id,
                           kid_hash=kid_hash(kid))
        await self.refresh()
        index = self._usable()
        return None if index is None else index.find(kid, alg)


def build_source(
    *,
    jwks_uri: str | None,
    discovery_url: str | None,
    issuer: str,
    get_jwks: Callable[[], Mapping[str, Any]] | None,
    client: Callable[[], httpx.AsyncClient],
) -> JwksSource:
    """The :class:`JwksSource` for exactly one of ``jwks_uri``, ``discovery_url``, ``get_jwks``.

    ``client()`` gives the shared HTTP client; it is called only for the URL sources
    (so that httpx is not even imported for a gateway without one: memory at rest).

    Raises ``ValueError`` for a non-https URL (see :func:`require_secure_url`) or when
    none is given.
    """
    if jwks_uri is not None:
        return UrlJwksSource(jwks_uri, client())
    if discovery_url is not None:
        return DiscoveryJwksSource(discovery_url, issuer, client())
    if get_jwks is not None:
        return CallableJwksSource(get_jwks)
    raise ValueError("no key source")


__all__ = [
    "CallableJwksSource",
    "DiscoveryJwksSource",
    "JwksCache",
    "JwksDocument",
    "JwksError",
    "JwksSource",
    "KeyIndex",
    "PublicKey",
    "UrlJwksSource",
    "build_source",
    "fetch_json",
    "kid_hash",
    "parse_cache_control",
    "parse_jwks",
    "require_secure_url",
]
