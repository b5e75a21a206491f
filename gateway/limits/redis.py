"""Shared admission state in Redis: :class:`RedisLimiter` (redis-py asyncio, Lua scripts).

Every atomic step is one Lua script from ``gateway/limits/lua/`` (package data;
``common.lua`` is prepended to each), registered once with redis-py's
``register_script`` (EVALSHA, reloaded by redis-py on ``NOSCRIPT`` after a restart
or failover).  All time comes from Redis ``TIME``, so every replica shares one
clock; every key gets a ``PEXPIRE``, so a crashed replica leaves nothing behind
for longer than a lease.

Keys, hash-tagged so one tenant's keys share a Redis Cluster slot (a script may
only touch keys of one slot)::

    rgw:{<tenant>}:sessions            ZSET  member session_id, score lease expiry (s)
    rgw:{<tenant>}:sessions:u:<user>   ZSET  the same, per user (token ``sub``)
    rgw:{<tenant>}:starts:u:<user>     STRING GCRA theoretical arrival time (s)
    rgw:{<tenant>}:tokens              HASH  b = balance, ts = time of b (s)

Failure handling: a socket connect timeout of ``timeout_seconds`` (≤ 250 ms), one
overall deadline of ``timeout_seconds`` per operation (an ``asyncio.timeout`` around the
whole call: waiting for a pooled connection, connecting, writing, reading), at most one
retry and only for a broken pooled connection (never for a timeout), and a
:class:`CircuitBreaker` that fails fast while Redis is known to be down.  Every
Redis error or timeout becomes :class:`~gateway.limits.base.LimiterUnavailable`.

redis-py's own command timeout (``socket_timeout``) is disabled: redis-py writes each
command under ``asyncio.wait_for`` when it is set, and on Python 3.11 ``wait_for``
can lose a cancellation that arrives as the write completes, so a cancelled caller
(the housekeeping loop) would carry on (defect D5).  The connection pool is
bounded (``max_connections``); a caller waits for a free connection at most
``timeout_seconds``.  A cancelled or timed-out call closes its connection (redis-py
never returns a connection with a half-written command or an unread reply to the pool).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import LimitsConfig, RedisConfig
from gateway.limits import policy
from gateway.limits.base import Balance, Lease, LimiterUnavailable
from gateway.limits.policy import AdmissionRefused, LimitKind
from gateway.logs import get_logger

log = get_logger(__name__)

KEY_PREFIX = "rgw"
DEFAULT_FAILURE_THRESHOLD = 3
DEFAULT_RESET_SECONDS = 5.0
DEFAULT_MAX_CONNECTIONS = 64
"""Redis connections per limiter (per node for Redis Cluster).  One call holds one for
about a round trip, so this serves thousands of sessions; calls beyond it wait for a
free connection within their deadline (Redis Cluster: fail at once)."""
_SCRIPTS = ("admit", "renew", "release", "charge", "throttle")


class CircuitBreaker:
    """Fail fast while Redis is down (closed → open → half-open → closed).

    After ``failure_threshold`` consecutive failures the breaker opens: :meth:`allow`
    returns False for ``reset_seconds``.  Then it lets exactly one trial call
    through (half-open); its success closes the breaker, its failure opens it
    again for another ``reset_seconds``.  ``clock`` returns seconds (default
    ``time.monotonic``).  Not thread-safe; one event loop.
    """

    def __init__(
        self,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        reset_seconds: float = DEFAULT_RESET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_seconds < 0:
            raise ValueError("reset_seconds must be >= 0")
        self._threshold = failure_threshold
        self._reset_seconds = reset_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (a trial call may pass or is in flight)."""
        if self._failures < self._threshold:
            return "closed"
        if self._clock() - self._opened_at < self._reset_seconds:
            return "open"
        return "half_open"

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._failures

    def allow(self) -> bool:
        """True when a call may go to Redis now (and, half-open, marks it as the trial)."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        """A call answered: close the breaker."""
        self._failures = 0
        self._probing = False

    def record_failure(self) -> None:
        """A call failed: count it; at the threshold (or on a failed trial) open the breaker."""
        self._failures += 1
        self._probing = False
        if self._failures >= self._threshold:
            self._opened_at = self._clock()

    def abandon(self) -> None:
        """A call was cancelled by its caller: neither success nor failure."""
        self._probing = False


def _load_script(name: str) -> str:
    lua = resources.files("gateway.limits").joinpath("lua")
    common = lua.joinpath("common.lua").read_text(encoding="utf-8")
    return common + "\n" + lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
        return f"no answer within {timeout:g} s"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def tenant_key(tenant: str, *parts: str) -> str:
    """``rgw:{<tenant>}:<part>:...``; the hash tag keeps a tenant's keys in one slot."""
    return ":".join((KEY_PREFIX, "{" + tenant + "}", *parts))


class RedisLimiter:
    """A :class:`~gateway.limits.base.Limiter` whose state lives in Redis (shared by replicas).

    Args:
        url: ``redis://``, ``rediss://`` (TLS), or ``redis+cluster://host:port`` /
            ``rediss+cluster://`` for Redis Cluster (the address is a startup node).
            Credentials may be in the URL; they are never logged.
        timeout_seconds: socket connect timeout, command timeout and the deadline
            of one whole operation (seconds).
        lease_seconds: lifetime of a concurrency slot; sessions renew every
            :attr:`renewal_interval`.
        failure_threshold, reset_seconds: the :class:`CircuitBreaker`.
        clock: the breaker's clock (seconds).  Limits use Redis ``TIME`` only.
        max_connections: size of the connection pool (per node for Redis Cluster).

    Raises:
        ValueError: a non-positive ``timeout_seconds``, ``lease_seconds`` or
            ``max_connections``, or a URL of another scheme.

    No connection is made until the first call; a Redis that was down and comes
    back is used again without a new object.  Requires Redis >= 5 (effects
    replication of scripts that call ``TIME``).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = 0.25,
        lease_seconds: float = 30.0,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        reset_seconds: float = DEFAULT_RESET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._timeout = timeout_seconds
        self._lease_seconds = lease_seconds
        self._breaker = CircuitBreaker(failure_threshold, reset_seconds, clock)
        self._client: Redis | RedisCluster = _connect(url, timeout_seconds, max_connections)
        self._scripts: dict[str, AsyncScript] = {
            name: self._client.register_script(_load_script(name)) for name in _SCRIPTS
        }

    @classmethod
    def from_config(cls, config: RedisConfig, **kwargs: Any) -> RedisLimiter:
        """Build from ``redis:`` (url, timeout_seconds, lease_seconds); ``kwargs`` as for
        the constructor (breaker settings, clock, max_connections)."""
        return cls(
            config.url,
            timeout_seconds=config.timeout_seconds,
            lease_seconds=config.lease_seconds,
            **kwargs,
        )

    @property
    def lease_seconds(self) -> float:
        """Lifetime of a concurrency slot, seconds."""
        return self._lease_seconds

    @property
    def renewal_interval(self) -> float:
        """Seconds between two :meth:`renew` calls of a live session (``lease_seconds / 3``)."""
        return policy.renewal_interval(self._lease_seconds)

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker (read its ``state`` for readiness or metrics)."""
        return self._breaker

    # --- Limiter ---------------------------------------------------------------------------

    async def admit(self, lease: Lease, limits: LimitsConfig) -> None:
        """Run ``admit.lua``: token budget, tenant and user concurrency, user start rate.

        Raises:
            AdmissionRefused: a :class:`~gateway.errors.RateLimited` naming the limit,
                with ``retry_after`` in seconds.
            LimiterUnavailable: Redis did not answer in time, failed, or the breaker is open.
        """
        reply = await self._run(
            "admit",
            [
                tenant_key(lease.tenant, "sessions"),
                tenant_key(lease.tenant, "sessions", "u", lease.user),
                tenant_key(lease.tenant, "starts", "u", lease.user),
                tenant_key(lease.tenant, "tokens"),
            ],
            [
                lease.session_id,
                repr(self._lease_seconds),
                limits.max_sessions or 0,
                limits.max_sessions_per_user or 0,
                limits.session_starts_per_minute_per_user or 0,
                limits.tokens_per_minute or 0,
                repr(policy.CONCURRENCY_RETRY_AFTER_SECONDS),
                repr(policy.GCRA_TOLERANCE_SECONDS),
            ],
        )
        _raise_refusal("admit", reply)

    async def throttle(self, tenant: str, user: str, action: str,
                       limits: LimitsConfig) -> None:
        """Run ``throttle.lua``: the user's rate for ``action`` (GCRA on Redis time, a key
        per action); see :meth:`gateway.limits.base.Limiter.throttle`.

        Raises:
            AdmissionRefused: over the rate (``LimitKind.START_RATE``).
            LimiterUnavailable: Redis did not answer in time, failed, or the breaker is open.
        """
        rate = limits.session_starts_per_minute_per_user
        if rate is None:
            return
        reply = await self._run(
            "throttle", [tenant_key(tenant, action, "u", user)],
            [rate, repr(policy.GCRA_TOLERANCE_SECONDS)])
        _raise_refusal("throttle", reply)

    async def renew(self, lease: Lease, limits: LimitsConfig) -> Balance:
        """Run ``renew.lua``: extend the lease (re-adding lost slots, even above the
        limits) and return the tenant's balance after refill.

        Raises:
            LimiterUnavailable: Redis did not answer in time, failed, or the breaker is open.
        """
        reply = await self._run(
            "renew",
            [
                tenant_key(lease.tenant, "sessions"),
                tenant_key(lease.tenant, "sessions", "u", lease.user),
                tenant_key(lease.tenant, "tokens"),
            ],
            [lease.session_id, repr(self._lease_seconds), limits.tokens_per_minute or 0],
        )
        try:
            re_added, balance = int(reply[0]), str(reply[1])
        except (TypeError, ValueError, IndexError):
            raise LimiterUnavailable("renew", "unexpected script reply") from None
        if re_added:
            log.warning("limiter.lease_reacquired", tenant=lease.tenant, slots=re_added,
                        session_id=lease.session_id)
        return Balance(float(balance) if balance else None)

    async def release(self, lease: Lease) -> None:
        """Run ``release.lua``: remove the session from both slot sets.

        Raises:
            LimiterUnavailable: Redis did not answer (the slots then expire by themselves).
        """
        await self._run(
            "release",
            [
                tenant_key(lease.tenant, "sessions"),
                tenant_key(lease.tenant, "sessions", "u", lease.user),
            ],
            [lease.session_id],
        )

    async def charge(self, tenant: str, limits: LimitsConfig, tokens: int) -> Balance:
        """Run ``charge.lua``: refill, then debit ``tokens`` (>= 0); returns the balance,
        ``Balance(None)`` without a call when the tenant has no ``tokens_per_minute``.

        Raises:
            ValueError: ``tokens`` is negative.
            LimiterUnavailable: Redis did not answer in time, failed, or the breaker is open.
        """
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        if limits.tokens_per_minute is None:
            return Balance(None)
        reply = await self._run(
            "charge", [tenant_key(tenant, "tokens")], [limits.tokens_per_minute, tokens]
        )
        try:
            return Balance(float(reply))
        except (TypeError, ValueError):
            raise LimiterUnavailable("charge", "unexpected script reply") from None

    async def ping(self) -> bool:
        """True when Redis answers ``PING`` within the timeout.

        Goes to Redis even while the breaker is open (one call per readiness probe);
        a success closes the breaker, so a Redis that came back is used at once.
        Never raises.
        """
        try:
            async with asyncio.timeout(self._timeout):
                ok = bool(await self._client.ping())
        except asyncio.CancelledError:
            raise
        except (RedisError, RedisClusterException, OSError) as exc:
            log.debug("limiter.ping_failed", reason=_describe(exc, self._timeout))
            self._breaker.record_failure()
            return False
        if ok:
            self._breaker.record_success()
        return ok

    async def aclose(self) -> None:
        """Close the connection pool(s)."""
        await self._client.aclose()

    # --- internals ---------------------------------------------------------------------------

    async def _run(self, operation: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        if not self._breaker.allow():
            raise LimiterUnavailable(operation, "circuit breaker open after repeated failures")
        try:
            async with asyncio.timeout(self._timeout):
                result = await self._scripts[operation](keys=list(keys), args=list(args))
        except asyncio.CancelledError:
            self._breaker.abandon()
            raise
        except (RedisError, RedisClusterException, OSError) as exc:
            self._breaker.record_failure()
            raise LimiterUnavailable(operation, _describe(exc, self._timeout)) from exc
        self._breaker.record_success()
        return result


def _raise_refusal(operation: str, reply: Any) -> None:
    """Read an ``admit``/``throttle`` script reply: return on ``{'ok'}``; raise
    :class:`AdmissionRefused` for ``{limit, retry_after_seconds}``; raise
    :class:`LimiterUnavailable` for anything else."""
    if not isinstance(reply, list) or not reply:
        raise LimiterUnavailable(operation, "unexpected script reply")
    if reply[0] == "ok":
        return
    try:
        kind = LimitKind(reply[0])
        retry_after = float(reply[1])
    except (ValueError, IndexError):
        raise LimiterUnavailable(operation, "unexpected script reply") from None
    raise AdmissionRefused(kind, retry_after)


def _connect(url: str, timeout: float, max_connections: int) -> Redis | RedisCluster:
    """A client for ``url``: no redis-py command timeout (the caller bounds each call
    with ``asyncio.timeout``), a connect timeout of ``timeout`` seconds, at most
    ``max_connections`` connections, one retry on a broken connection.

    A ``socket_timeout`` in the URL's query is dropped (it would bring back
    redis-py's ``asyncio.wait_for`` and defect D5).
    """
    parts = urlsplit(url)
    if parts.query:
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                 if k != "socket_timeout"]
        parts = parts._replace(query=urlencode(query))
        url = urlunsplit(parts)
    common: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": timeout,
        "decode_responses": True,
        "client_name": "realtime-gateway",
        "max_connections": max_connections,
    }
    if parts.scheme in {"redis+cluster", "rediss+cluster"}:
        plain = urlunsplit(parts._replace(scheme=parts.scheme.removesuffix("+cluster")))
        # The cluster client retries a failed command against a refreshed topology;
        # one retry at most.  Its per-node pools raise MaxConnectionsError when full.
        return RedisCluster.from_url(plain, retry=Retry(NoBackoff(), 1), **common)
    if parts.scheme in {"redis", "rediss"}:
        # Retry once, at once, only when a pooled connection turns out to be broken
        # (Redis restarted); a timeout is never retried.  A full pool makes the caller
        # wait for a free connection, at most ``timeout`` seconds.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        pool = BlockingConnectionPool.from_url(url, timeout=timeout, retry=retry, **common)
        return Redis.from_pool(pool)
    raise ValueError("the Redis URL must use redis://, rediss:// or redis+cluster://")
