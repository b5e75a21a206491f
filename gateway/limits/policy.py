"""Pure admission arithmetic: GCRA, the token bucket, lease expiry, per-replica shares.

No I/O and no clock: every function takes ``now``.  All times are **seconds** as
floats on one clock (``time.monotonic()`` in :mod:`gateway.limits.memory`, Redis
``TIME`` in the Lua scripts of :mod:`gateway.limits.redis`, which repeat this
arithmetic).  Rates are per minute, as in :class:`gateway.config.LimitsConfig`.

* **Start rate — GCRA** (Generic Cell Rate Algorithm, ITU-T I.371; the form of
  redis-cell's ``CL.THROTTLE``).  Emission interval ``T = 60 / rate`` seconds;
  a burst of ``burst`` starts (default: ``rate``, the per-minute count) may pass
  at once, then one every ``T``.  State: the theoretical arrival time ``tat``.
* **Token budget — token bucket with continuous refill and post-hoc debit.**
  Capacity ``tokens_per_minute``, refilled at ``tokens_per_minute / 60`` tokens
  per second; a missing bucket is full.  A session is admitted only while the
  balance after refill is ``> 0``; usage debits it afterwards, without bound.
* **Concurrency — leased slots.**  A slot lives until ``now + lease_seconds``
  and is renewed every ``lease_seconds / 3``; a slot whose expiry is ``<= now`` is
  free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from gateway.config import LimitsConfig
from gateway.errors import RateLimited

CONCURRENCY_RETRY_AFTER_SECONDS = 5.0
"""``Retry-After`` for a concurrency refusal: a slot frees when some session ends,
which cannot be predicted, so clients are asked to come back after this long."""

RENEWALS_PER_LEASE = 3
"""A live session renews its lease this many times per lease period."""

GCRA_TOLERANCE_SECONDS = 1e-3
"""A start passes when it is at most this early.  Absolute times are doubles (Redis
epoch seconds have ~0.24 µs resolution) and every start of a burst adds one rounding
to the stored ``tat``; one millisecond absorbs that, so a burst of ``burst`` starts
always passes and waiting exactly ``retry_after`` always passes.  Negligible against
rates counted per minute."""


class LimitKind(StrEnum):
    """Which limit refused an admission (also the ``limit`` of :class:`AdmissionRefused`)."""

    TOKENS = "tokens"
    TENANT_SESSIONS = "tenant_sessions"
    USER_SESSIONS = "user_sessions"
    START_RATE = "start_rate"


_MESSAGES = {
    LimitKind.TOKENS: "the tenant's token budget is exhausted",
    LimitKind.TENANT_SESSIONS: "the tenant's concurrent session limit is reached",
    LimitKind.USER_SESSIONS: "the user's concurrent session limit is reached",
    LimitKind.START_RATE: "too many new sessions for this user",
}


class AdmissionRefused(RateLimited):
    """A :class:`~gateway.errors.RateLimited` (429 / 4429) that names the refusing limit.

    ``limit`` is a :class:`LimitKind`; ``retry_after`` is seconds (never ``None``).
    The message holds no user id or claim value.
    """

    retry_after: float

    def __init__(self, limit: LimitKind, retry_after: float) -> None:
        super().__init__(_MESSAGES[limit], retry_after=retry_after)
        self.limit = limit


def ceil_microseconds(seconds: float) -> float:
    """Round ``seconds`` up to a whole microsecond (Redis ``TIME`` resolution)."""
    return max(seconds, math.ceil(seconds * 1_000_000) / 1_000_000)


# --- GCRA -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcraDecision:
    """Result of :func:`gcra`.

    ``tat`` is the theoretical arrival time to store (seconds, same clock as
    ``now``): the new one when allowed, the unchanged stored one when refused
    (``None`` if there was none).  ``retry_after`` is 0 when allowed, else the
    exact seconds (rounded up to a microsecond) after which the same request passes.
    """

    allowed: bool
    tat: float | None
    retry_after: float


def emission_interval(rate_per_minute: int) -> float:
    """Seconds between two starts at the steady rate: ``60 / rate_per_minute``."""
    if rate_per_minute <= 0:
        raise ValueError("rate_per_minute must be positive")
    return 60.0 / rate_per_minute


def gcra(
    now: float, tat: float | None, rate_per_minute: int, burst: int | None = None
) -> GcraDecision:
    """Decide one request under GCRA.

    Args:
        now: current time, seconds.
        tat: stored theoretical arrival time, or ``None`` when there is no state.
        rate_per_minute: steady rate; emission interval ``T = 60 / rate``.
        burst: requests that may pass at once from an idle state (default
            ``rate_per_minute``); the delay variation tolerance is ``burst * T``.

    A request passes when ``max(tat, now) + T - burst * T <= now`` (within
    :data:`GCRA_TOLERANCE_SECONDS`).  A refused request does not change the state.

    Raises:
        ValueError: ``rate_per_minute`` or ``burst`` is not positive.
    """
    interval = emission_interval(rate_per_minute)
    burst = rate_per_minute if burst is None else burst
    if burst <= 0:
        raise ValueError("burst must be positive")
    new_tat = max(tat if tat is not None else now, now) + interval
    allow_at = new_tat - burst * interval
    if allow_at - now > GCRA_TOLERANCE_SECONDS:
        return GcraDecision(False, tat, ceil_microseconds(allow_at - now))
    return GcraDecision(True, new_tat, 0.0)


def gcra_state_ttl(now: float, tat: float) -> float:
    """Seconds the stored ``tat`` still matters; after that it equals "no state"."""
    return max(0.0, tat - now)


# --- token bucket ------------------------------------------------------------------------


def refill_rate(tokens_per_minute: int) -> float:
    """Tokens added per second: ``tokens_per_minute / 60``."""
    return tokens_per_minute / 60.0


def refill(balance: float | None, ts: float | None, now: float, tokens_per_minute: int) -> float:
    """The balance at ``now`` from the stored ``(balance, ts)``.

    A missing bucket (``balance is None``) is full.  The balance grows by
    ``tokens_per_minute / 60`` per second since ``ts`` up to the capacity
    ``tokens_per_minute``; a clock that went backwards refills nothing.
    """
    capacity = float(tokens_per_minute)
    if balance is None or ts is None:
        return capacity
    elapsed = max(0.0, now - ts)
    return min(capacity, balance + elapsed * refill_rate(tokens_per_minute))


def bucket_retry_after(balance: float, tokens_per_minute: int) -> float | None:
    """``None`` when a session may start (``balance > 0``), else seconds until it may.

    The balance reaches 0 after ``-balance / rate`` seconds; one millisecond is
    added so that a retry honouring the value finds a positive balance.
    """
    if balance > 0:
        return None
    return ceil_microseconds(-balance / refill_rate(tokens_per_minute) + 1e-3)


def debit(balance: float, tokens: int) -> float:
    """The balance after charging ``tokens`` (>= 0); never refuses, may go below zero.

    Raises:
        ValueError: ``tokens`` is negative.
    """
    if tokens < 0:
        raise ValueError("tokens must be >= 0")
    return balance - tokens


def bucket_state_ttl(balance: float, tokens_per_minute: int) -> float:
    """Seconds until the bucket is full again; after that the state equals "no state"."""
    missing = float(tokens_per_minute) - balance
    return max(0.0, missing / refill_rate(tokens_per_minute))


# --- leases --------------------------------------------------------------------------------


def lease_expiry(now: float, lease_seconds: float) -> float:
    """The expiry of a slot acquired or renewed at ``now``: ``now + lease_seconds``."""
    return now + lease_seconds


def lease_alive(expiry: float, now: float) -> bool:
    """True while a slot holds: ``expiry > now`` (a slot expiring exactly now is free)."""
    return expiry > now


def renewal_interval(lease_seconds: float) -> float:
    """Seconds between renewals of a live session's lease: ``lease_seconds / 3``."""
    return lease_seconds / RENEWALS_PER_LEASE


# --- per-replica shares (fail-open fallback) ----------------------------------------------


def per_replica_limit(limit: int | None, replicas: int) -> int | None:
    """One replica's share of a fleet-wide ``limit``: ``limit // replicas``, at least 1.

    ``None`` (unlimited) stays ``None``.

    Raises:
        ValueError: ``replicas`` is not positive.
    """
    if replicas <= 0:
        raise ValueError("replicas must be positive")
    if limit is None:
        return None
    return max(1, limit // replicas)


def per_replica_limits(limits: LimitsConfig, replicas: int) -> LimitsConfig:
    """The limits one replica enforces alone while the shared store is down.

    Concurrency and start-rate limits are divided by ``replicas`` (min 1); the
    token budget is not checked (``tokens_per_minute`` ``None``): one replica
    sees only its own usage, and the budget is enforced again once the store is back.
    """
    return limits.model_copy(
        update={
            "max_sessions": per_replica_limit(limits.max_sessions, replicas),
            "max_sessions_per_user": per_replica_limit(limits.max_sessions_per_user, replicas),
            "session_starts_per_minute_per_user": per_replica_limit(
                limits.session_starts_per_minute_per_user, replicas
            ),
            "tokens_per_minute": None,
            "token_overdraft": None,
        }
    )
