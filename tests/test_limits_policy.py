"""Table-driven tests of the pure admission arithmetic (gateway.limits.policy)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import LimitsConfig
from gateway.errors import RateLimited
from gateway.limits import policy
from gateway.limits.policy import AdmissionRefused, GcraDecision, LimitKind
from gateway.limits.redis import CircuitBreaker

# --- GCRA ---------------------------------------------------------------------------------

# (now, stored tat, rate/min, burst) -> expected decision.  rate 60/min: T = 1 s.
GCRA_CASES = [
    # no state: the first request passes, tat = now + T
    (100.0, None, 60, 1, GcraDecision(True, 101.0, 0.0)),
    # burst 1, second request at once: refused, retry after exactly T
    (100.0, 101.0, 60, 1, GcraDecision(False, 101.0, 1.0)),
    # burst 1, request exactly when allowed
    (101.0, 101.0, 60, 1, GcraDecision(True, 102.0, 0.0)),
    # burst 3 (dvt = 3 s): tat 2 s ahead still passes, 3 s ahead refused for 1 s
    (100.0, 102.0, 60, 3, GcraDecision(True, 103.0, 0.0)),
    (100.0, 103.0, 60, 3, GcraDecision(False, 103.0, 1.0)),
    (100.0, 103.5, 60, 3, GcraDecision(False, 103.5, 1.5)),
    # a stale tat (idle period) is the same as no state
    (500.0, 103.0, 60, 3, GcraDecision(True, 501.0, 0.0)),
    # rate 120/min: T = 0.5 s, default burst = 120
    (0.0, 59.5, 120, None, GcraDecision(True, 60.0, 0.0)),
    (0.0, 60.0, 120, None, GcraDecision(False, 60.0, 0.5)),
    # rate 7/min: T = 60/7 s; retry rounded up to a whole microsecond
    (0.0, 60.0 / 7, 7, 1, GcraDecision(False, 60.0 / 7, 8.571429)),
]


@pytest.mark.parametrize(("now", "tat", "rate", "burst", "expected"), GCRA_CASES)
def test_gcra_table(
    now: float, tat: float | None, rate: int, burst: int | None, expected: GcraDecision
) -> None:
    decision = policy.gcra(now, tat, rate, burst)
    assert decision.allowed is expected.allowed
    assert decision.tat == pytest.approx(expected.tat)
    assert decision.retry_after == pytest.approx(expected.retry_after, abs=1e-9)


def test_gcra_default_burst_is_the_per_minute_count() -> None:
    tat: float | None = None
    for _ in range(20):
        decision = policy.gcra(0.0, tat, 20)
        assert decision.allowed
        tat = decision.tat
    refused = policy.gcra(0.0, tat, 20)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(3.0)


@given(
    rate=st.integers(1, 10_000),
    burst=st.integers(1, 100),
    start=st.floats(0, 2e9, allow_nan=False),
    extra=st.integers(1, 5),
)
def test_gcra_retry_after_when_honoured_admits(
    rate: int, burst: int, start: float, extra: int
) -> None:
    tat: float | None = None
    now = start
    for _ in range(burst):
        decision = policy.gcra(now, tat, rate, burst)
        assert decision.allowed
        tat = decision.tat
    for _ in range(extra):
        refused = policy.gcra(now, tat, rate, burst)
        assert not refused.allowed
        assert refused.tat == tat  # a refusal changes nothing
        assert refused.retry_after > 0
        now += refused.retry_after
        passed = policy.gcra(now, tat, rate, burst)
        assert passed.allowed
        tat = passed.tat


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-1, None), (10, 0)])
def test_gcra_rejects_non_positive_parameters(rate: int, burst: int | None) -> None:
    with pytest.raises(ValueError, match="positive"):
        policy.gcra(0.0, None, rate, burst)


def test_gcra_state_ttl() -> None:
    assert policy.gcra_state_ttl(10.0, 12.5) == 2.5
    assert policy.gcra_state_ttl(10.0, 9.0) == 0.0


# --- token bucket -----------------------------------------------------------------------------

# (balance, ts, now, tokens_per_minute) -> balance after refill
REFILL_CASES = [
    (None, None, 5.0, 600, 600.0),  # no state: full
    (0.0, 0.0, 1.0, 600, 10.0),  # 600/min = 10/s
    (-100.0, 0.0, 5.0, 600, -50.0),
    (590.0, 0.0, 5.0, 600, 600.0),  # capped at capacity
    (100.0, 10.0, 5.0, 600, 100.0),  # clock went backwards: no refill
]


@pytest.mark.parametrize(("balance", "ts", "now", "tpm", "expected"), REFILL_CASES)
def test_refill_table(
    balance: float | None, ts: float | None, now: float, tpm: int, expected: float
) -> None:
    assert policy.refill(balance, ts, now, tpm) == pytest.approx(expected)


# balance after refill -> retry_after (None = admitted); tpm 600 = 10 tokens/s
@pytest.mark.parametrize(
    ("balance", "expected"),
    [(1.0, None), (0.001, None), (0.0, 0.001), (-10.0, 1.001), (-600.0, 60.001)],
)
def test_bucket_admission_table(balance: float, expected: float | None) -> None:
    retry = policy.bucket_retry_after(balance, 600)
    if expected is None:
        assert retry is None
    else:
        assert retry is not None
        assert retry == pytest.approx(expected)
        # honouring it finds a positive balance
        assert policy.refill(balance, 0.0, retry, 600) > 0


def test_debit_never_refuses_and_may_go_below_zero() -> None:
    assert policy.debit(10.0, 0) == 10.0
    assert policy.debit(10.0, 1_000_000) == -999_990.0
    with pytest.raises(ValueError, match=">= 0"):
        policy.debit(10.0, -1)


def test_bucket_state_ttl_is_time_until_full() -> None:
    assert policy.bucket_state_ttl(600.0, 600) == 0.0
    assert policy.bucket_state_ttl(0.0, 600) == pytest.approx(60.0)
    assert policy.bucket_state_ttl(-600.0, 600) == pytest.approx(120.0)


# --- leases --------------------------------------------------------------------------------


def test_lease_arithmetic() -> None:
    assert policy.lease_expiry(100.0, 30.0) == 130.0
    assert policy.lease_alive(130.0, 129.999)
    assert not policy.lease_alive(130.0, 130.0)  # expiring exactly now is free
    assert policy.renewal_interval(30.0) == 10.0
    assert policy.renewal_interval(3.0) == 1.0


# --- per-replica shares --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "replicas", "expected"),
    [(None, 3, None), (10, 1, 10), (10, 3, 3), (2, 3, 1), (1, 10, 1), (9, 3, 3)],
)
def test_per_replica_limit_table(limit: int | None, replicas: int, expected: int | None) -> None:
    assert policy.per_replica_limit(limit, replicas) == expected


def test_per_replica_limit_rejects_zero_replicas() -> None:
    with pytest.raises(ValueError, match="positive"):
        policy.per_replica_limit(5, 0)


def test_per_replica_limits_divide_and_drop_the_token_budget() -> None:
    limits = LimitsConfig(
        max_sessions=10,
        max_sessions_per_user=3,
        session_starts_per_minute_per_user=20,
        tokens_per_minute=1000,
        token_overdraft=50,
        max_session_seconds=60,
    )
    local = policy.per_replica_limits(limits, 4)
    assert (local.max_sessions, local.max_sessions_per_user) == (2, 1)
    assert local.session_starts_per_minute_per_user == 5
    assert local.tokens_per_minute is None
    assert local.max_session_seconds == 60


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LimitKind))
def test_admission_refused_is_a_429_naming_the_limit(kind: LimitKind) -> None:
    exc = AdmissionRefused(kind, 2.5)
    assert isinstance(exc, RateLimited)
    assert (exc.http_status, exc.close_code, exc.code) == (429, 4429, "rate_limited")
    assert exc.limit is kind
    assert exc.http_headers()["retry-after"] == "3"


@pytest.mark.parametrize(
    ("seconds", "expected"), [(0.5, 0.5), (1.0000001, 1.000001), (2.0, 2.0), (0.0, 0.0)]
)
def test_ceil_microseconds(seconds: float, expected: float) -> None:
    assert policy.ceil_microseconds(seconds) == pytest.approx(expected, abs=1e-12)
    assert policy.ceil_microseconds(seconds) >= seconds


# --- circuit breaker (a pure state machine with an injected clock) ----------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_opens_after_threshold_then_allows_one_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_seconds=5.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now = 4.9
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.state == "half_open"
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # others fail fast while it is in flight
    breaker.record_failure()  # trial failed: open again
    assert breaker.state == "open"
    clock.now = 10.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0
    assert breaker.allow()


def test_circuit_breaker_abandoned_trial_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=1.0, clock=clock)
    breaker.record_failure()
    clock.now = 1.0
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow()
