"""In-process admission state: :class:`MemoryLimiter` (one replica, or the fail-open fallback).

Same semantics as :class:`gateway.limits.redis.RedisLimiter` (the arithmetic of
:mod:`gateway.limits.policy`), with the state in dictionaries.  Every operation
runs without an ``await`` in between, so it is atomic on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from gateway.config import LimitsConfig
from gateway.limits import policy
from gateway.limits.base import Balance, Lease
from gateway.limits.policy import AdmissionRefused, LimitKind

DEFAULT_LEASE_SECONDS = 30.0


K = TypeVar("K")


@dataclass(slots=True)
class _Bucket:
    balance: float
    ts: float
    tokens_per_minute: int


class MemoryLimiter:
    """A :class:`~gateway.limits.base.Limiter` holding its state in this process.

    Correct for exactly one replica (``redis:`` absent) and used by
    :class:`gateway.limits.failover.FailoverLimiter` as the local fallback.

    Args:
        lease_seconds: lifetime of a concurrency slot; a live session renews it
            every :attr:`renewal_interval` seconds.
        clock: returns the current time in seconds (default ``time.monotonic``);
            tests inject a fake clock.

    State for a tenant, user or bucket is dropped once it carries no information
    (no live slot, GCRA ``tat`` in the past, bucket full): lazily when touched,
    and by a sweep over everything at most once per lease period, so memory is
    bounded by the live sessions plus one lease period of expired ones.
    """

    def __init__(
        self,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._tenant_slots: dict[str, dict[str, float]] = {}
        self._user_slots: dict[tuple[str, str], dict[str, float]] = {}
        self._starts: dict[tuple[str, ...], float] = {}
        """GCRA states: session starts by ``(tenant, user)``, other actions by
        ``(tenant, user, action)``."""
        self._buckets: dict[str, _Bucket] = {}
        self._last_sweep = clock()
        self._closed = False

    @property
    def lease_seconds(self) -> float:
        """Lifetime of a concurrency slot, seconds."""
        return self._lease_seconds

    @property
    def renewal_interval(self) -> float:
        """Seconds between two :meth:`renew` calls of a live session (``lease_seconds / 3``)."""
        return policy.renewal_interval(self._lease_seconds)

    # --- Limiter -------------------------------------------------------------------------

    async def admit(self, lease: Lease, limits: LimitsConfig) -> None:
        """Admit a session or raise :class:`~gateway.limits.policy.AdmissionRefused`.

        Checks, in order: token budget, tenant concurrency, user concurrency,
        user start rate (GCRA).  A refused session holds nothing and does not
        count as a start.  See :meth:`gateway.limits.base.Limiter.admit`.
        """
        now = self._now()
        user_key = (lease.tenant, lease.user)
        if limits.tokens_per_minute is not None:
            balance = self._balance(lease.tenant, limits.tokens_per_minute, now)
            retry = policy.bucket_retry_after(balance, limits.tokens_per_minute)
            if retry is not None:
                raise AdmissionRefused(LimitKind.TOKENS, retry)
        tenant_slots = self._live(self._tenant_slots, lease.tenant, now)
        user_slots = self._live(self._user_slots, user_key, now)
        if _full(tenant_slots, lease.session_id, limits.max_sessions):
            raise AdmissionRefused(
                LimitKind.TENANT_SESSIONS, policy.CONCURRENCY_RETRY_AFTER_SECONDS
            )
        if _full(user_slots, lease.session_id, limits.max_sessions_per_user):
            raise AdmissionRefused(LimitKind.USER_SESSIONS, policy.CONCURRENCY_RETRY_AFTER_SECONDS)
        rate = limits.session_starts_per_minute_per_user
        if rate is not None:
            decision = policy.gcra(now, self._starts.get(user_key), rate)
            if not decision.allowed:
                raise AdmissionRefused(LimitKind.START_RATE, decision.retry_after)
            assert decision.tat is not None
            self._starts[user_key] = decision.tat
        expiry = policy.lease_expiry(now, self._lease_seconds)
        self._tenant_slots.setdefault(lease.tenant, {})[lease.session_id] = expiry
        self._user_slots.setdefault(user_key, {})[lease.session_id] = expiry

    async def throttle(self, tenant: str, user: str, action: str,
                       limits: LimitsConfig) -> None:
        """GCRA over ``session_starts_per_minute_per_user`` for ``action`` of ``user``, a
        bucket per action; see :meth:`gateway.limits.base.Limiter.throttle`.

        Raises:
            AdmissionRefused: over the rate (``LimitKind.START_RATE``).
        """
        rate = limits.session_starts_per_minute_per_user
        if rate is None:
            return
        key = (tenant, user, action)
        decision = policy.gcra(self._now(), self._starts.get(key), rate)
        if not decision.allowed:
            raise AdmissionRefused(LimitKind.START_RATE, decision.retry_after)
        assert decision.tat is not None
        self._starts[key] = decision.tat

    async def renew(self, lease: Lease, limits: LimitsConfig) -> Balance:
        """Extend the lease to ``now + lease_seconds`` (re-adding it if it expired,
        even above the limits) and return the tenant's balance after refill."""
        now = self._now()
        expiry = policy.lease_expiry(now, self._lease_seconds)
        self._tenant_slots.setdefault(lease.tenant, {})[lease.session_id] = expiry
        self._user_slots.setdefault((lease.tenant, lease.user), {})[lease.session_id] = expiry
        if limits.tokens_per_minute is None:
            return Balance(None)
        return Balance(self._balance(lease.tenant, limits.tokens_per_minute, now))

    async def release(self, lease: Lease) -> None:
        """Free the lease's slots at once; unknown or already released leases are ignored."""
        _discard(self._tenant_slots, lease.tenant, lease.session_id)
        _discard(self._user_slots, (lease.tenant, lease.user), lease.session_id)

    async def charge(self, tenant: str, limits: LimitsConfig, tokens: int) -> Balance:
        """Refill, then debit ``tokens`` (>= 0); the balance may go below zero.

        Returns ``Balance(None)`` when the tenant has no ``tokens_per_minute``.

        Raises:
            ValueError: ``tokens`` is negative.
        """
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        tpm = limits.tokens_per_minute
        if tpm is None:
            return Balance(None)
        now = self._now()
        balance = policy.debit(self._balance(tenant, tpm, now), tokens)
        if policy.bucket_state_ttl(balance, tpm) > 0:
            self._buckets[tenant] = _Bucket(balance, now, tpm)
        else:
            self._buckets.pop(tenant, None)
        return Balance(balance)

    async def ping(self) -> bool:
        """Always True until :meth:`aclose`: in-process state cannot be unreachable."""
        return not self._closed

    async def aclose(self) -> None:
        """Drop all state."""
        self._closed = True
        self._tenant_slots.clear()
        self._user_slots.clear()
        self._starts.clear()
        self._buckets.clear()

    # --- introspection for tests and metrics -----------------------------------------------

    def live_sessions(self, tenant: str, user: str | None = None) -> int:
        """Live (unexpired) slots of ``tenant``, or of ``user`` in ``tenant``."""
        now = self._clock()
        slots = (
            self._tenant_slots.get(tenant, {})
            if user is None
            else self._user_slots.get((tenant, user), {})
        )
        return sum(1 for expiry in slots.values() if policy.lease_alive(expiry, now))

    def lease_remaining(self, lease: Lease) -> float | None:
        """Seconds until the lease's tenant slot expires, or ``None`` when it is not held."""
        expiry = self._tenant_slots.get(lease.tenant, {}).get(lease.session_id)
        if expiry is None:
            return None
        remaining = expiry - self._clock()
        return remaining if remaining > 0 else None

    def state_size(self) -> int:
        """Number of entries held (tenants, users, GCRA states, buckets): for memory checks."""
        return (
            len(self._tenant_slots) + len(self._user_slots) + len(self._starts) + len(self._buckets)
        )

    # --- internals ---------------------------------------------------------------------------

    def _now(self) -> float:
        now = self._clock()
        if now - self._last_sweep >= self._lease_seconds:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for tenant in list(self._tenant_slots):
            self._live(self._tenant_slots, tenant, now)
        for user in list(self._user_slots):
            self._live(self._user_slots, user, now)
        for key, tat in list(self._starts.items()):
            if policy.gcra_state_ttl(now, tat) <= 0:
                del self._starts[key]
        for tenant, bucket in list(self._buckets.items()):
            self._balance(tenant, bucket.tokens_per_minute, now)

    def _balance(self, tenant: str, tokens_per_minute: int, now: float) -> float:
        bucket = self._buckets.get(tenant)
        if bucket is None:
            return float(tokens_per_minute)
        balance = policy.refill(bucket.balance, bucket.ts, now, tokens_per_minute)
        if policy.bucket_state_ttl(balance, tokens_per_minute) <= 0:
            del self._buckets[tenant]
        return balance

    @staticmethod
    def _live(table: dict[K, dict[str, float]], key: K, now: float) -> dict[str, float]:
        slots = table.get(key)
        if slots is None:
            return {}
        for session_id, expiry in list(slots.items()):
            if not policy.lease_alive(expiry, now):
                del slots[session_id]
        if not slots:
            del table[key]
        return slots


def _full(slots: dict[str, float], session_id: str, limit: int | None) -> bool:
    if limit is None:
        return False
    others = len(slots) - (1 if session_id in slots else 0)
    return others >= limit


def _discard(table: dict[K, dict[str, float]], key: K, session_id: str) -> None:
    slots = table.get(key)
    if slots is None:
        return
    slots.pop(session_id, None)
    if not slots:
        del table[key]
