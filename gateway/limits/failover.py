"""Fail-open / fail-closed around the shared limiter, and :func:`build_limiter`.

:class:`FailoverLimiter` sends every call to the primary (Redis).  When the
primary raises :class:`~gateway.limits.base.LimiterUnavailable` it reports the
operation through ``on_error`` (the gateway counts ``limiter_errors_total{operation}``)
and then:

* ``admit`` — ``fail_mode: open``: decides with the in-process fallback, each
  concurrency and start-rate limit divided by ``expected_replicas`` (min 1), the
  token budget not checked (:func:`gateway.limits.policy.per_replica_limits`);
  ``fail_mode: closed``: raises :class:`~gateway.errors.Unavailable` (503 / 4503).
* ``renew``, ``charge``, ``release`` — never end a live session: the balance is
  reported unknown (``Balance(None)``) and the failure logged.  Debits that could
  not be written are kept per tenant (one number each) and added to the tenant's
  next successful charge.  A release is tried :data:`RELEASE_ATTEMPTS` times,
  :data:`RELEASE_RETRY_SECONDS` apart, before its slots are left to expire.

This is the one place that decides what a limiter failure means: callers (the session
pipeline, the housekeeping loop) never see :class:`~gateway.limits.base.LimiterUnavailable`.

The fallback mirrors every lease of this replica (admitted by either backend), so
that while Redis is down the local limits count the sessions already running
here, and every lease is released to the fallback too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

from gateway.config import Config, LimitsConfig
from gateway.errors import Unavailable
from gateway.limits import policy
from gateway.limits.base import Balance, Lease, Limiter, LimiterUnavailable
from gateway.limits.memory import MemoryLimiter
from gateway.logs import get_logger

log = get_logger(__name__)

UNAVAILABLE_RETRY_AFTER_SECONDS = 5.0
"""``Retry-After`` of the 503 sent under ``fail_mode: closed`` while the limiter is down."""

MAX_PENDING_TOKENS = 10**12
"""Cap of the unwritten debits kept per tenant while the primary is down."""

RELEASE_ATTEMPTS = 3
"""Tries to free a lease in the primary before leaving its slots to expire."""

RELEASE_RETRY_SECONDS = 0.2
"""Seconds between two release tries (a Redis timeout is usually a burst of load)."""


class FailoverLimiter:
    """A :class:`~gateway.limits.base.Limiter` that survives an unavailable primary.

    Args:
        primary: the shared limiter (normally :class:`~gateway.limits.redis.RedisLimiter`).
        fallback: this replica's in-process limiter (same ``lease_seconds`` as the primary).
        fail_mode: ``"open"`` — admit with per-replica local limits while the primary
            is down; ``"closed"`` — refuse new sessions with 503.
        expected_replicas: replicas sharing the primary; local limits are each
            limit divided by this (min 1).
        on_error: called with the operation name (``admit``, ``renew``, ``release``,
            ``charge``) each time the primary is unavailable; must not raise.
    """

    def __init__(
        self,
        primary: Limiter,
        fallback: MemoryLimiter,
        *,
        fail_mode: Literal["open", "closed"],
        expected_replicas: int,
        on_error: Callable[[str], None],
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError("fail_mode must be 'open' or 'closed'")
        if expected_replicas < 1:
            raise ValueError("expected_replicas must be >= 1")
        self._primary = primary
        self._fallback = fallback
        self._fail_mode = fail_mode
        self._replicas = expected_replicas
        self._on_error = on_error
        self._pending: dict[str, int] = {}

    @property
    def fail_mode(self) -> Literal["open", "closed"]:
        """What ``admit`` does while the primary is unavailable."""
        return self._fail_mode

    @property
    def lease_seconds(self) -> float:
        """Lifetime of a concurrency slot (the fallback's, equal to the primary's), seconds."""
        return self._fallback.lease_seconds

    @property
    def renewal_interval(self) -> float:
        """Seconds between two :meth:`renew` calls of a live session."""
        return self._fallback.renewal_interval

    def local_limits(self, limits: LimitsConfig) -> LimitsConfig:
        """The limits this replica enforces alone while the primary is down."""
        return policy.per_replica_limits(limits, self._replicas)

    async def admit(self, lease: Lease, limits: LimitsConfig) -> None:
        """Admit through the primary; if it is unavailable, per ``fail_mode``.

        Raises:
            RateLimited: a limit refused (the primary's, or the local one when failing open).
            Unavailable: the primary is unavailable and ``fail_mode`` is ``closed``
                (``retry_after`` :data:`UNAVAILABLE_RETRY_AFTER_SECONDS`).
        """
        local = self.local_limits(limits)
        try:
            await self._primary.admit(lease, limits)
        except LimiterUnavailable:
            self._report("admit")
            if self._fail_mode == "closed":
                raise self._unavailable() from None
            await self._fallback.admit(lease, local)
            log.warning("limiter.fallback_admit", tenant=lease.tenant,
                        session_id=lease.session_id)
            return
        # Mirror the lease locally (renew never refuses) for a later outage.
        await self._fallback.renew(lease, local)

    async def throttle(self, tenant: str, user: str, action: str,
                       limits: LimitsConfig) -> None:
        """Throttle through the primary; while it is unavailable, per ``fail_mode`` as for
        :meth:`admit` (the fallback with this replica's share of the rate, or 503).

        Raises:
            RateLimited: over the rate.
            Unavailable: the primary is unavailable and ``fail_mode`` is ``closed``.
        """
        try:
            await self._primary.throttle(tenant, user, action, limits)
        except LimiterUnavailable:
            self._report("throttle")
            if self._fail_mode == "closed":
                raise self._unavailable() from None
            await self._fallback.throttle(tenant, user, action, self.local_limits(limits))

    async def renew(self, lease: Lease, limits: LimitsConfig) -> Balance:
        """Renew in the primary (re-acquiring lost slots) and in the local mirror.

        Returns the primary's balance, or ``Balance(None)`` (unknown) when it is
        unavailable.  Never raises :class:`LimiterUnavailable`.
        """
        await self._fallback.renew(lease, self.local_limits(limits))
        try:
            return await self._primary.renew(lease, limits)
        except LimiterUnavailable:
            self._report("renew")
            return Balance(None)

    async def release(self, lease: Lease) -> None:
        """Release in the local mirror and the primary.

        The primary is tried :data:`RELEASE_ATTEMPTS` times, :data:`RELEASE_RETRY_SECONDS`
        apart; each failure is reported (``on_error("release")``).  A lease that could not
        be freed expires by itself after ``lease_seconds`` — until then the user's slot
        stays taken.  Never raises :class:`LimiterUnavailable`.
        """
        await self._fallback.release(lease)
        for attempt in range(RELEASE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(RELEASE_RETRY_SECONDS)
            try:
                await self._primary.release(lease)
                return
            except LimiterUnavailable:
                self._report("release")

    async def charge(self, tenant: str, limits: LimitsConfig, tokens: int) -> Balance:
        """Charge the primary, adding debits that earlier failures left unwritten.

        Returns ``Balance(None)`` (unknown) when the primary is unavailable; the
        debit is then kept for the tenant's next successful charge.  Never raises
        :class:`LimiterUnavailable`.

        Raises:
            ValueError: ``tokens`` is negative.
        """
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        if limits.tokens_per_minute is None:
            return Balance(None)
        owed = tokens + self._pending.pop(tenant, 0)
        try:
            return await self._primary.charge(tenant, limits, owed)
        except LimiterUnavailable:
            self._report("charge")
            self._pending[tenant] = min(owed, MAX_PENDING_TOKENS)
            return Balance(None)

    async def ping(self) -> bool:
        """The primary's state: True when it answers now.

        Readiness decides with :attr:`fail_mode`: under ``open`` a False here
        means degraded, not unready.
        """
        return await self._primary.ping()

    async def aclose(self) -> None:
        """Close both limiters."""
        try:
            await self._primary.aclose()
        finally:
            await self._fallback.aclose()

    @staticmethod
    def _unavailable() -> Unavailable:
        return Unavailable("admission is temporarily unavailable; retry shortly",
                           retry_after=UNAVAILABLE_RETRY_AFTER_SECONDS, reason="limiter")

    def _report(self, operation: str) -> None:
        log.warning("limiter.unavailable", operation=operation)
        try:
            self._on_error(operation)
        except Exception:  # a metrics callback must never break admission
            log.exception("limiter.callback_failed", operation=operation)


def build_limiter(config: Config, on_error: Callable[[str], None]) -> Limiter:
    """The limiter the configuration asks for.

    ``config.redis`` absent: a :class:`MemoryLimiter` (one replica; ``on_error`` is
    never called).  Present: a :class:`FailoverLimiter` over a
    :class:`~gateway.limits.redis.RedisLimiter` and a :class:`MemoryLimiter`
    with the same lease, ``fail_mode`` and ``expected_replicas`` from ``redis:``.
    No connection is made here.
    """
    if config.redis is None:
        return MemoryLimiter()
    from gateway.limits.redis import RedisLimiter

    redis_config = config.redis
    return FailoverLimiter(
        RedisLimiter.from_config(redis_config),
        MemoryLimiter(lease_seconds=redis_config.lease_seconds),
        fail_mode=redis_config.fail_mode,
        expected_replicas=redis_config.expected_replicas,
        on_error=on_error,
    )
