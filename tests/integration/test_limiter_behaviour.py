"""One behavioural suite for every admission backend (DESIGN "Limits"; security note §6, 19-23, 26).

Parametrised over the in-process backend (fake clock), a real ``redis-server`` and a
real three-node Redis Cluster.  Tests that need shared storage (two replicas,
FLUSHALL) run on the two Redis backends only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import LimitsConfig
from gateway.limits.base import Balance, Lease, Limiter
from gateway.limits.memory import MemoryLimiter
from gateway.limits.policy import CONCURRENCY_RETRY_AFTER_SECONDS, AdmissionRefused, LimitKind
from gateway.limits.redis import RedisLimiter, tenant_key
from tests.support.redis_server import RedisClusterServer, RedisServer

TENANT = "acme"
# Generous per-operation timeout for these tests (a loaded CI box); the 250 ms
# production timeout is exercised by test_limiter_redis_faults.py.
TEST_TIMEOUT_SECONDS = 2.0

Predicate = Callable[[], Awaitable[bool]]


def make_limits(**values: Any) -> LimitsConfig:
    """``LimitsConfig`` validated from keyword values (as the YAML loader builds it)."""
    return LimitsConfig.model_validate(values)


class Harness(Protocol):
    """What each backend provides to the suite."""

    name: str

    async def limiter(self, lease_seconds: float = 30.0) -> Limiter: ...

    async def wait_until(self, predicate: Predicate, within: float) -> float:
        """Let time pass until ``predicate()`` holds; returns the seconds that passed."""
        ...

    async def live(self, tenant: str, user: str | None = None) -> int:
        """Live (unexpired) slots of a tenant, or of one user in it."""
        ...

    async def remaining(self, lease: Lease) -> float | None:
        """Seconds until the lease's tenant slot expires (``None``: not held)."""
        ...


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class MemoryHarness:
    name = "memory"

    def __init__(self) -> None:
        self.clock = FakeClock()
        self._limiters: list[MemoryLimiter] = []

    async def limiter(self, lease_seconds: float = 30.0) -> Limiter:
        limiter = MemoryLimiter(lease_seconds=lease_seconds, clock=self.clock)
        self._limiters.append(limiter)
        return limiter

    async def wait_until(self, predicate: Predicate, within: float) -> float:
        start = self.clock.now
        for _ in range(int(within / 0.01) + 2):
            if await predicate():
                return self.clock.now - start
            self.clock.now += 0.01
        raise AssertionError(f"condition not met within {within} s (fake clock)")

    async def live(self, tenant: str, user: str | None = None) -> int:
        return sum(limiter.live_sessions(tenant, user) for limiter in self._limiters)

    async def remaining(self, lease: Lease) -> float | None:
        values = [limiter.lease_remaining(lease) for limiter in self._limiters]
        return max((v for v in values if v is not None), default=None)

    async def close(self) -> None:
        for limiter in self._limiters:
            await limiter.aclose()


class RedisHarness:
    def __init__(self, name: str, url: str, admin: Redis | RedisCluster) -> None:
        self.name = name
        self.url = url
        self.admin = admin
        self._limiters: list[RedisLimiter] = []

    async def limiter(self, lease_seconds: float = 30.0) -> Limiter:
        return await self.redis_limiter(lease_seconds)

    async def redis_limiter(self, lease_seconds: float = 30.0) -> RedisLimiter:
        limiter = RedisLimiter(
            self.url, timeout_seconds=TEST_TIMEOUT_SECONDS, lease_seconds=lease_seconds
        )
        self._limiters.append(limiter)
        return limiter

    async def wait_until(self, predicate: Predicate, within: float) -> float:
        start = time.monotonic()
        deadline = start + within
        while not await predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {within} s")
            await asyncio.sleep(0.02)  # polling interval, bounded by the deadline
        return time.monotonic() - start

    async def redis_now(self) -> float:
        seconds, micros = await self.admin.time()
        return float(seconds) + micros / 1_000_000

    async def live(self, tenant: str, user: str | None = None) -> int:
        key = tenant_key(tenant, "sessions") if user is None else tenant_key(
            tenant, "sessions", "u", user
        )
        count: int = await self.admin.zcount(key, f"({await self.redis_now()!r}", "+inf")
        return count

    async def remaining(self, lease: Lease) -> float | None:
        score = await self.admin.zscore(tenant_key(lease.tenant, "sessions"), lease.session_id)
        if score is None:
            return None
        return float(score) - await self.redis_now()

    async def flushall(self) -> None:
        await self.admin.flushall()

    async def close(self) -> None:
        for limiter in self._limiters:
            await limiter.aclose()
        await self.admin.aclose()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServer]:
    with RedisClusterServer() as cluster:
        yield cluster


async def _redis_harness(request: pytest.FixtureRequest, kind: str) -> RedisHarness:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        harness = RedisHarness(kind, server.url, server.client())
    else:
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        harness = RedisHarness(kind, cluster.url, cluster.client())
    await harness.flushall()
    return harness


@pytest.fixture(params=["memory", "redis", "cluster"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    backend: MemoryHarness | RedisHarness
    if request.param == "memory":
        backend = MemoryHarness()
    else:
        backend = await _redis_harness(request, request.param)
    yield backend
    await backend.close()


@pytest.fixture(params=["redis", "cluster"])
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[RedisHarness]:
    backend = await _redis_harness(request, request.param)
    yield backend
    await backend.close()


def lease(session: str, user: str = "alice", tenant: str = TENANT) -> Lease:
    return Lease(tenant=tenant, user=user, session_id=session)


async def refused(limiter: Limiter, the_lease: Lease, limits: LimitsConfig) -> AdmissionRefused:
    with pytest.raises(AdmissionRefused) as info:
        await limiter.admit(the_lease, limits)
    return info.value


async def admits(limiter: Limiter, the_lease: Lease, limits: LimitsConfig) -> bool:
    try:
        await limiter.admit(the_lease, limits)
    except AdmissionRefused:
        return False
    return True


# --- concurrency ------------------------------------------------------------------------------


async def test_user_concurrency_limit(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits(max_sessions=10, max_sessions_per_user=2)
    await limiter.admit(lease("s1"), limits)
    await limiter.admit(lease("s2"), limits)
    refusal = await refused(limiter, lease("s3"), limits)
    assert refusal.limit is LimitKind.USER_SESSIONS
    assert refusal.retry_after == CONCURRENCY_RETRY_AFTER_SECONDS
    assert (refusal.http_status, refusal.close_code) == (429, 4429)
    await limiter.admit(lease("s4", user="bob"), limits)  # another user is not affected
    assert await harness.live(TENANT, "alice") == 2
    assert await harness.live(TENANT) == 3


async def test_tenant_concurrency_limit(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits(max_sessions=2, max_sessions_per_user=5)
    await limiter.admit(lease("s1", user="a"), limits)
    await limiter.admit(lease("s2", user="b"), limits)
    refusal = await refused(limiter, lease("s3", user="c"), limits)
    assert refusal.limit is LimitKind.TENANT_SESSIONS
    await limiter.admit(lease("s4", tenant="other"), limits)  # tenants are independent
    assert await harness.live(TENANT) == 2


async def test_admitting_the_same_session_twice_takes_one_slot(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits(max_sessions_per_user=1)
    await limiter.admit(lease("s1"), limits)
    await limiter.admit(lease("s1"), limits)
    assert await harness.live(TENANT, "alice") == 1


async def test_refused_admission_holds_nothing(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits(
        max_sessions=3, max_sessions_per_user=1, session_starts_per_minute_per_user=2
    )
    await limiter.admit(lease("s1"), limits)
    # the user check fails: no tenant slot and no start is taken
    assert (await refused(limiter, lease("s2"), limits)).limit is LimitKind.USER_SESSIONS
    assert await harness.live(TENANT) == 1
    await limiter.release(lease("s1"))
    await limiter.admit(lease("s3"), limits)  # second start of the burst of 2
    await limiter.release(lease("s3"))
    # the start rate fails: no slot is taken
    assert (await refused(limiter, lease("s4"), limits)).limit is LimitKind.START_RATE
    assert await harness.live(TENANT) == 0
    assert await harness.live(TENANT, "alice") == 0
    # the tenant limit fails for another user: nothing taken for that user
    full = make_limits(max_sessions=1)
    await limiter.admit(lease("b1", user="bob"), full)
    assert (await refused(limiter, lease("c1", user="carol"), full)).limit is (
        LimitKind.TENANT_SESSIONS
    )
    assert await harness.live(TENANT, "carol") == 0


async def test_release_frees_the_slot_at_once(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits(max_sessions=1, max_sessions_per_user=1)
    await limiter.admit(lease("s1"), limits)
    await refused(limiter, lease("s2", user="bob"), limits)
    await limiter.release(lease("s1"))
    await limiter.admit(lease("s2", user="bob"), limits)
    assert await harness.live(TENANT) == 1
    # releasing twice, or a lease never admitted, is a no-op
    await limiter.release(lease("s1"))
    await limiter.release(lease("never", user="nobody"))
    assert await harness.live(TENANT) == 1
    await limiter.release(lease("s2", user="bob"))
    assert await harness.live(TENANT) == 0


async def test_lease_expires_when_not_renewed(harness: Harness) -> None:
    lease_seconds = 1.5
    limiter = await harness.limiter(lease_seconds=lease_seconds)
    limits = make_limits(max_sessions_per_user=1)
    await limiter.admit(lease("crashed"), limits)  # its replica dies: never renewed
    await refused(limiter, lease("next"), limits)
    waited = await harness.wait_until(
        lambda: admits(limiter, lease("next"), limits), within=lease_seconds + 3
    )
    assert lease_seconds - 0.3 <= waited <= lease_seconds + 2.0
    assert await harness.live(TENANT, "alice") == 1


async def test_renew_extends_the_lease(harness: Harness) -> None:
    lease_seconds = 3.0
    limiter = await harness.limiter(lease_seconds=lease_seconds)
    limits = make_limits(max_sessions_per_user=1)
    await limiter.admit(lease("s1"), limits)
    first = await harness.remaining(lease("s1"))
    assert first is not None
    assert lease_seconds - 0.5 <= first <= lease_seconds

    async def aged() -> bool:
        left = await harness.remaining(lease("s1"))
        return left is not None and left < lease_seconds - 0.2

    await harness.wait_until(aged, within=2.0)
    balance = await limiter.renew(lease("s1"), limits)
    assert balance == Balance(None)  # no token budget configured
    renewed = await harness.remaining(lease("s1"))
    assert renewed is not None
    assert lease_seconds - 0.15 <= renewed <= lease_seconds


async def test_renewal_reacquires_an_expired_lease_even_above_the_limit(harness: Harness) -> None:
    limiter = await harness.limiter(lease_seconds=1.0)
    limits = make_limits(max_sessions_per_user=1)
    await limiter.admit(lease("slow"), limits)
    await harness.wait_until(lambda: admits(limiter, lease("new"), limits), within=4.0)
    # the first session was alive after all (its renewal was late): it keeps running
    await limiter.renew(lease("slow"), limits)
    assert await harness.live(TENANT, "alice") == 2
    assert (await refused(limiter, lease("third"), limits)).limit is LimitKind.USER_SESSIONS


async def test_renew_after_flushall_reacquires(shared: RedisHarness) -> None:
    limiter = await shared.limiter()
    limits = make_limits(max_sessions_per_user=1, tokens_per_minute=600)
    await limiter.admit(lease("s1"), limits)
    await limiter.charge(TENANT, limits, 100)
    await shared.flushall()  # Redis lost everything (restart without persistence)
    assert await shared.live(TENANT) == 0
    balance = await limiter.renew(lease("s1"), limits)
    assert balance.tokens == pytest.approx(600.0)  # the bucket was lost too: full
    assert await shared.live(TENANT, "alice") == 1
    assert (await refused(limiter, lease("s2"), limits)).limit is LimitKind.USER_SESSIONS


# --- start rate (GCRA) -------------------------------------------------------------------------


async def test_gcra_burst_then_refusal_with_a_retry_after_that_admits(harness: Harness) -> None:
    limiter = await harness.limiter()
    rate = 60  # T = 1 s; burst = the per-minute count (60 starts take milliseconds)
    limits = make_limits(session_starts_per_minute_per_user=rate)
    for i in range(rate):
        await limiter.admit(lease(f"s{i}"), limits)
    refusal = await refused(limiter, lease("over"), limits)
    assert refusal.limit is LimitKind.START_RATE
    assert 0.0 < refusal.retry_after <= 1.0
    assert refusal.http_headers()["retry-after"] == "1"
    # the refused start took nothing: a second try is refused for about as long
    again = await refused(limiter, lease("over"), limits)
    assert again.retry_after <= refusal.retry_after
    waited = await harness.wait_until(
        lambda: admits(limiter, lease("over"), limits), within=refusal.retry_after + 2.0
    )
    assert waited >= again.retry_after - 0.05
    assert waited <= refusal.retry_after + 0.5
    # exactly one start passed: the next is refused again
    assert (await refused(limiter, lease("after"), limits)).limit is LimitKind.START_RATE


async def test_gcra_is_per_user(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits(session_starts_per_minute_per_user=1)
    await limiter.admit(lease("a1"), limits)
    refusal = await refused(limiter, lease("a2"), limits)
    assert 59.0 < refusal.retry_after <= 60.0  # one per minute
    await limiter.admit(lease("b1", user="bob"), limits)


async def test_throttle_is_a_start_rate_of_its_own_per_action(harness: Harness) -> None:
    """Minting client secrets (``throttle(..., "mint", ...)``) is limited at the start rate
    in a bucket of its own: a burst of mints is refused once over, and neither uses up the
    other's starts."""
    limiter = await harness.limiter()
    limits = make_limits(session_starts_per_minute_per_user=3)
    for _ in range(3):
        await limiter.throttle(TENANT, "alice", "mint", limits)
    with pytest.raises(AdmissionRefused) as refusal:
        await limiter.throttle(TENANT, "alice", "mint", limits)
    assert refusal.value.limit is LimitKind.START_RATE
    assert 19.0 < refusal.value.retry_after <= 20.0  # 3 a minute: one every 20 s
    await limiter.throttle(TENANT, "bob", "mint", limits)  # per user
    for i in range(3):  # session starts have their own bucket
        await limiter.admit(lease(f"s{i}"), limits)
    await limiter.throttle(TENANT, "alice", "mint", make_limits())  # no rate: no limit


# --- token budget --------------------------------------------------------------------------


async def test_token_budget_refuses_new_sessions_and_reports_overdraft(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits(tokens_per_minute=600, token_overdraft=100)  # 10 tokens/s
    await limiter.admit(lease("s1"), limits)
    balance = await limiter.charge(TENANT, limits, 500)
    assert balance.tokens == pytest.approx(100.0, abs=5)
    assert not balance.overdrawn(limits)
    renewed = await limiter.renew(lease("s1"), limits)
    assert renewed.tokens is not None
    assert renewed.tokens == pytest.approx(100.0, abs=5)
    # usage past tokens_per_minute: a live session goes on, a new one is refused
    balance = await limiter.charge(TENANT, limits, 180)
    assert balance.tokens == pytest.approx(-80.0, abs=5)
    assert not balance.overdrawn(limits)
    refusal = await refused(limiter, lease("s2", user="bob"), limits)
    assert refusal.limit is LimitKind.TOKENS
    assert (refusal.http_status, refusal.close_code) == (429, 4429)
    assert refusal.retry_after == pytest.approx(8.0, abs=0.6)
    assert await harness.live(TENANT, "bob") == 0
    # below -overdraft: live sessions must close (4429)
    balance = await limiter.charge(TENANT, limits, 100)
    assert balance.tokens is not None
    assert balance.tokens < -limits.overdraft
    assert balance.overdrawn(limits)
    assert (await limiter.renew(lease("s1"), limits)).overdrawn(limits)


async def test_token_budget_refills_continuously(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits(tokens_per_minute=6000)  # 100 tokens/s
    await limiter.charge(TENANT, limits, 6050)
    refusal = await refused(limiter, lease("s1"), limits)
    assert refusal.retry_after == pytest.approx(0.5, abs=0.1)
    waited = await harness.wait_until(lambda: admits(limiter, lease("s1"), limits), within=3.0)
    assert waited >= refusal.retry_after - 0.1


async def test_no_token_budget_means_unknown_balance(harness: Harness) -> None:
    limiter = await harness.limiter()
    limits = make_limits()
    assert await limiter.charge(TENANT, limits, 10**9) == Balance(None)
    await limiter.admit(lease("s1"), limits)
    assert await limiter.renew(lease("s1"), limits) == Balance(None)
    with pytest.raises(ValueError, match=">= 0"):
        await limiter.charge(TENANT, make_limits(tokens_per_minute=10), -1)


async def test_ping(harness: Harness) -> None:
    limiter = await harness.limiter()
    assert await limiter.ping() is True


# --- two replicas sharing one Redis -----------------------------------------------------------


async def test_two_replicas_enforce_limits_together(shared: RedisHarness) -> None:
    replica_a = await shared.limiter()
    replica_b = await shared.limiter()
    replicas = [replica_a, replica_b]
    limits = make_limits(max_sessions=5, max_sessions_per_user=1)

    # six users connect at once through two replicas: exactly the tenant limit passes
    results = await asyncio.gather(
        *(
            replicas[i % 2].admit(lease(f"s{i}", user=f"user{i}"), limits)
            for i in range(6)
        ),
        return_exceptions=True,
    )
    refusals = [r for r in results if isinstance(r, AdmissionRefused)]
    assert sum(r is None for r in results) == 5
    assert [r.limit for r in refusals] == [LimitKind.TENANT_SESSIONS]
    assert await shared.live(TENANT) == 5

    # one user connects four times at once on another tenant: exactly one passes,
    # and the failed user checks hold no tenant slot
    results = await asyncio.gather(
        *(replicas[i % 2].admit(lease(f"d{i}", tenant="beta"), limits) for i in range(4)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(
        isinstance(r, AdmissionRefused) and r.limit is LimitKind.USER_SESSIONS
        for r in results
        if r is not None
    )
    assert await shared.live("beta") == 1

    # a slot admitted by one replica is freed by a release on the other
    admitted = next(i for i, r in enumerate(results) if r is None)
    await replicas[(admitted + 1) % 2].release(lease(f"d{admitted}", tenant="beta"))
    await replica_b.admit(lease("later", tenant="beta"), limits)


async def test_two_replicas_share_the_start_rate_and_token_budget(shared: RedisHarness) -> None:
    replica_a = await shared.limiter()
    replica_b = await shared.limiter()
    limits = make_limits(session_starts_per_minute_per_user=2, tokens_per_minute=600)
    await replica_a.admit(lease("s1"), limits)
    await replica_b.admit(lease("s2"), limits)
    assert (await refused(replica_a, lease("s3"), limits)).limit is LimitKind.START_RATE
    assert (await refused(replica_b, lease("s3"), limits)).limit is LimitKind.START_RATE

    await replica_a.charge(TENANT, limits, 400)
    balance = await replica_b.charge(TENANT, limits, 300)
    assert balance.tokens == pytest.approx(-100.0, abs=5)
    assert (await refused(replica_a, lease("t1", user="bob"), limits)).limit is LimitKind.TOKENS


async def test_every_redis_key_expires(shared: RedisHarness) -> None:
    limiter = await shared.limiter(lease_seconds=30.0)
    limits = make_limits(
        max_sessions=5, max_sessions_per_user=2, session_starts_per_minute_per_user=10,
        tokens_per_minute=600,
    )
    await limiter.admit(lease("s1"), limits)
    await limiter.renew(lease("s1"), limits)
    await limiter.charge(TENANT, limits, 50)
    keys = [key async for key in shared.admin.scan_iter(match="rgw:*")]
    assert len(keys) == 4
    for key in keys:
        ttl = await shared.admin.pttl(key)
        assert 0 < ttl <= 60_001, key
        assert key.startswith("rgw:{acme}:"), key
    # releasing the last session removes the slot sets: leases back to baseline
    await limiter.release(lease("s1"))
    remaining = {key async for key in shared.admin.scan_iter(match="rgw:*")}
    assert remaining == {tenant_key(TENANT, "tokens"), tenant_key(TENANT, "starts", "u", "alice")}


async def test_memory_state_is_bounded() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(lease_seconds=30.0, clock=clock)
    limits = make_limits(
        max_sessions=10_000, session_starts_per_minute_per_user=5, tokens_per_minute=60_000
    )
    for i in range(500):
        await limiter.admit(lease(f"s{i}", user=f"user{i}", tenant=f"t{i % 7}"), limits)
        await limiter.charge(f"t{i % 7}", limits, 10)
    for i in range(250):
        await limiter.release(lease(f"s{i}", user=f"user{i}", tenant=f"t{i % 7}"))
    assert limiter.state_size() > 0
    clock.now += 120.0  # leases (not renewed) expire, GCRA states age, buckets refill
    await limiter.admit(lease("x", user="x", tenant="t0"), make_limits())  # triggers a sweep
    # only the new session's tenant and user remain
    assert limiter.state_size() == 2
