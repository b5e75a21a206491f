"""The one interface every admission backend implements (DESIGN "Limits").

A session is admitted once (:meth:`Limiter.admit`), renews its lease while it
lives (:meth:`Limiter.renew`, every ``lease_seconds / 3``), is charged for every
usage event (:meth:`Limiter.charge`) and releases its lease when it ends
(:meth:`Limiter.release`).  Backends differ only in where the state lives.

Errors:
    :class:`gateway.errors.RateLimited` (with ``retry_after`` in seconds) when a
    limit refuses; :class:`LimiterUnavailable` when the backend's storage cannot
    answer — the caller turns that into fail-open or fail-closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.config import LimitsConfig


class LimiterUnavailable(Exception):
    """The limiter's storage did not answer (timeout, refused, script error).

    ``operation`` names the call (``admit``, ``renew``, ``release``, ``charge``,
    ``ping``) for ``limiter_errors_total{operation}``.
    """

    def __init__(self, operation: str, cause: str) -> None:
        super().__init__(f"limiter {operation} failed: {cause}")
        self.operation = operation


@dataclass(frozen=True, slots=True)
class Lease:
    """The concurrency slots one live session holds: one in its tenant, one for its user.

    ``user`` is the token subject (``sub``); ``session_id`` is unique per session.
    """

    tenant: str
    user: str
    session_id: str


@dataclass(frozen=True, slots=True)
class Balance:
    """A tenant's token bucket after an operation.

    ``tokens`` may be negative (down to ``-overdraft`` and below, when usage
    arrives after the bucket is empty).  ``None`` when the tenant has no
    ``tokens_per_minute`` limit.
    """

    tokens: float | None

    def overdrawn(self, limits: LimitsConfig) -> bool:
        """True when live sessions must close 4429: balance below ``-token_overdraft``."""
        return self.tokens is not None and self.tokens < -limits.overdraft


class Limiter(Protocol):
    """Admission state for concurrent sessions, start rate and token budgets."""

    async def admit(self, lease: Lease, limits: LimitsConfig) -> None:
        """Admit a new session atomically, or refuse it and hold nothing.

        Checks, in one step: the token budget (refused while the balance is <= 0),
        tenant and user concurrency (``max_sessions``, ``max_sessions_per_user``)
        and the user's start rate (GCRA over ``session_starts_per_minute_per_user``).
        On success the lease's tenant and user slots are held.

        Raises:
            RateLimited: a limit refused; ``retry_after`` is seconds until a retry can pass.
            LimiterUnavailable: the storage did not answer.
        """
        ...

    async def renew(self, lease: Lease, limits: LimitsConfig) -> Balance:
        """Extend the lease of a live session (re-acquiring slots lost to a storage
        restart, even above the limit) and return the tenant's token balance.

        Raises:
            LimiterUnavailable: the storage did not answer.
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Free the lease's slots; releasing twice or an unknown lease is a no-op.

        Raises:
            LimiterUnavailable: the storage did not answer (the slots then expire
                by themselves after ``lease_seconds``).
        """
        ...

    async def charge(self, tenant: str, limits: LimitsConfig, tokens: int) -> Balance:
        """Debit ``tokens`` (>= 0) from the tenant's bucket and return the balance.

        Never refuses: a debit may take the balance below zero.

        Raises:
            LimiterUnavailable: the storage did not answer.
        """
        ...

    async def throttle(self, tenant: str, user: str, action: str,
                       limits: LimitsConfig) -> None:
        """Count one ``action`` (e.g. ``"mint"``, a client secret) of ``user`` against the
        user's start rate: GCRA over ``session_starts_per_minute_per_user``, in a bucket of
        its own per action (so minting a secret does not use up a session start).  No-op
        when the tenant sets no start rate.

        Raises:
            RateLimited: over the rate; ``retry_after`` is seconds until one passes.
            LimiterUnavailable: the storage did not answer.
        """
        ...

    async def ping(self) -> bool:
        """True when the backend can answer now (used by ``/readyz``)."""
        ...

    @property
    def renewal_interval(self) -> float:
        """Seconds between two :meth:`renew` calls of a live session (``lease_seconds / 3``,
        :func:`gateway.limits.policy.renewal_interval`)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the limiter is unusable afterwards."""
        ...
