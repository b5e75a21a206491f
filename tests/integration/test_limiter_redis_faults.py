"""Redis faults: stopped, restarted, black-holed (security note §6, cases 24-26).

A real ``redis-server`` per test (stopped and restarted on the same port), and a
loopback TCP listener that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal

import pytest

from gateway.config import Config, LimitsConfig, RedisConfig
from gateway.errors import Unavailable
from gateway.limits.base import Balance, Lease, LimiterUnavailable
from gateway.limits.failover import FailoverLimiter, build_limiter
from gateway.limits.memory import MemoryLimiter
from gateway.limits.policy import AdmissionRefused, LimitKind
from gateway.limits.redis import RedisLimiter, tenant_key
from tests.support.redis_server import RedisServer

TIMEOUT = 0.25  # the production maximum (RedisConfig.timeout_seconds)
MARGIN = 0.15  # scheduling slack on a loaded 2-core box; far below "seconds"


def make_limits(**values: Any) -> LimitsConfig:
    """``LimitsConfig`` validated from keyword values (as the YAML loader builds it)."""
    return LimitsConfig.model_validate(values)


LIMITS = make_limits(max_sessions=10, max_sessions_per_user=4)


def lease(session: str, user: str = "alice", tenant: str = "acme") -> Lease:
    return Lease(tenant=tenant, user=user, session_id=session)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class Errors:
    """The ``on_error`` callback: records operation names."""

    def __init__(self) -> None:
        self.operations: list[str] = []

    def __call__(self, operation: str) -> None:
        self.operations.append(operation)


class Replica:
    """One gateway replica's limiter stack: Failover(Redis, Memory)."""

    def __init__(
        self, url: str, fail_mode: Literal["open", "closed"] = "open", replicas: int = 2
    ) -> None:
        self.errors = Errors()
        self.redis = RedisLimiter(url, timeout_seconds=TIMEOUT, reset_seconds=0.3)
        self.limiter = FailoverLimiter(
            self.redis,
            MemoryLimiter(lease_seconds=self.redis.lease_seconds),
            fail_mode=fail_mode,
            expected_replicas=replicas,
            on_error=self.errors,
        )

    async def aclose(self) -> None:
        await self.limiter.aclose()


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for replica in made:
        await replica.aclose()


async def test_redis_stopped_fail_open_admits_with_local_limits(
    redis_server: RedisServer, replicas: list[Replica]
) -> None:
    replica = Replica(redis_server.url, "open", replicas=2)
    replicas.append(replica)
    await replica.limiter.admit(lease("s1"), LIMITS)  # through Redis
    assert replica.errors.operations == []

    await redis_server.astop()

    # user limit 4 over 2 replicas: 2 here; s1 (admitted through Redis) counts
    start = time.monotonic()
    await replica.limiter.admit(lease("s2"), LIMITS)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    assert replica.errors.operations == ["admit"]
    start = time.monotonic()
    with pytest.raises(AdmissionRefused) as info:
        await replica.limiter.admit(lease("s3"), LIMITS)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    assert info.value.limit is LimitKind.USER_SESSIONS

    # live sessions are never ended by limiter failures
    assert await replica.limiter.renew(lease("s1"), LIMITS) == Balance(None)
    budget = make_limits(tokens_per_minute=1000)
    assert await replica.limiter.charge("acme", budget, 10) == Balance(None)
    await replica.limiter.release(lease("s2"))
    assert {"admit", "renew", "charge", "release"} <= set(replica.errors.operations)
    await replica.limiter.admit(lease("s4"), LIMITS)  # s2's local slot was freed
    assert await replica.limiter.ping() is False


async def test_redis_stopped_fail_closed_refuses_with_503(
    redis_server: RedisServer, replicas: list[Replica]
) -> None:
    replica = Replica(redis_server.url, "closed")
    replicas.append(replica)
    await replica.limiter.admit(lease("s1"), LIMITS)
    await redis_server.astop()

    start = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await replica.limiter.admit(lease("s2"), LIMITS)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    assert (info.value.http_status, info.value.close_code) == (503, 4503)
    assert info.value.retry_after is not None
    assert 0 < info.value.retry_after <= 10
    assert replica.errors.operations == ["admit"]
    # the live session goes on
    assert await replica.limiter.renew(lease("s1"), LIMITS) == Balance(None)
    await replica.limiter.release(lease("s1"))


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
async def test_throttle_with_redis_stopped_follows_the_fail_mode(
    redis_server: RedisServer, replicas: list[Replica], fail_mode: Literal["open", "closed"]
) -> None:
    """Minting client secrets (``throttle``) fails like admission: open → this replica's
    share of the rate; closed → 503 with the ``limiter`` reason."""
    replica = Replica(redis_server.url, fail_mode, replicas=2)
    replicas.append(replica)
    limits = make_limits(session_starts_per_minute_per_user=4)
    await replica.limiter.throttle("acme", "alice", "mint", limits)  # through Redis
    await redis_server.astop()
    if fail_mode == "closed":
        with pytest.raises(Unavailable) as info:
            await replica.limiter.throttle("acme", "alice", "mint", limits)
        assert (info.value.http_status, info.value.reason) == (503, "limiter")
    else:
        for _ in range(2):  # 4 a minute over 2 replicas: 2 here
            await replica.limiter.throttle("acme", "alice", "mint", limits)
        with pytest.raises(AdmissionRefused) as refused:
            await replica.limiter.throttle("acme", "alice", "mint", limits)
        assert refused.value.limit is LimitKind.START_RATE
    assert replica.errors.operations[0] == "throttle"


async def test_redis_restarted_restores_shared_limits_without_a_new_limiter(
    redis_server: RedisServer, replicas: list[Replica]
) -> None:
    replica_a = Replica(redis_server.url, "open", replicas=2)
    replica_b = Replica(redis_server.url, "open", replicas=2)
    replicas += [replica_a, replica_b]
    limits = make_limits(max_sessions_per_user=1)

    await replica_a.limiter.admit(lease("a1"), limits)
    await redis_server.astop()
    # degraded: each replica admits up to its local share (1) alone
    await replica_b.limiter.admit(lease("b1"), limits)
    assert replica_b.errors.operations == ["admit"]

    await redis_server.astart()  # same port, empty (no persistence)
    for replica in (replica_a, replica_b):
        deadline = time.monotonic() + 5.0
        while not await replica.limiter.ping():  # ping closes the breaker once Redis answers
            assert time.monotonic() < deadline, "Redis not reachable again"
            await asyncio.sleep(0.05)  # polling interval, bounded by the deadline

    # renewals re-acquire the live sessions' slots in the new Redis
    await replica_a.limiter.renew(lease("a1"), limits)
    await replica_b.limiter.renew(lease("b1"), limits)
    admin = redis_server.client()
    try:
        assert await admin.zcard(tenant_key("acme", "sessions", "u", "alice")) == 2
    finally:
        await admin.aclose()

    # shared limits again: a user admitted on A is refused on B (locally B would admit)
    errors_before = len(replica_b.errors.operations)
    await replica_a.limiter.admit(lease("v1", user="victor"), limits)
    with pytest.raises(AdmissionRefused) as info:
        await replica_b.limiter.admit(lease("v2", user="victor"), limits)
    assert info.value.limit is LimitKind.USER_SESSIONS
    assert len(replica_b.errors.operations) == errors_before


class BlackHole:
    """A loopback TCP listener that accepts connections, reads, and never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.bytes_received = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        while data := await reader.read(65536):
            self.bytes_received += len(data)

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def black_hole() -> AsyncIterator[BlackHole]:
    hole = BlackHole()
    yield hole
    await hole.close()


async def test_black_holed_redis_is_decided_within_the_timeout_then_the_breaker_opens(
    black_hole: BlackHole,
) -> None:
    port = await black_hole.start()
    limiter = RedisLimiter(
        f"redis://127.0.0.1:{port}/0",
        timeout_seconds=TIMEOUT,
        failure_threshold=3,
        reset_seconds=60.0,
    )
    try:
        for i in range(3):
            start = time.monotonic()
            with pytest.raises(LimiterUnavailable) as info:
                await limiter.admit(lease(f"s{i}"), LIMITS)
            assert time.monotonic() - start < TIMEOUT + MARGIN
            assert info.value.operation == "admit"
        assert limiter.breaker.state == "open"
        assert black_hole.connections >= 1
        connections, received = black_hole.connections, black_hole.bytes_received

        # open breaker: fail fast without touching Redis
        budget = make_limits(tokens_per_minute=10)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "admit": lambda: limiter.admit(lease("x"), LIMITS),
            "renew": lambda: limiter.renew(lease("x"), LIMITS),
            "release": lambda: limiter.release(lease("x")),
            "charge": lambda: limiter.charge("acme", budget, 1),
        }
        for operation, call in calls.items():
            start = time.monotonic()
            with pytest.raises(LimiterUnavailable) as info:
                await call()
            assert time.monotonic() - start < 0.05
            assert info.value.operation == operation
            assert "circuit breaker open" in str(info.value)
        assert (black_hole.connections, black_hole.bytes_received) == (connections, received)
    finally:
        await limiter.aclose()


async def test_breaker_tries_again_after_its_reset_period(black_hole: BlackHole) -> None:
    port = await black_hole.start()
    clock_now = [0.0]
    limiter = RedisLimiter(
        f"redis://127.0.0.1:{port}/0",
        timeout_seconds=0.1,
        failure_threshold=1,
        reset_seconds=5.0,
        clock=lambda: clock_now[0],
    )
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.admit(lease("s1"), LIMITS)
        first = black_hole.connections
        with pytest.raises(LimiterUnavailable, match="circuit breaker open"):
            await limiter.admit(lease("s1"), LIMITS)
        assert black_hole.connections == first
        clock_now[0] = 5.0  # the breaker half-opens: one trial goes to "Redis"
        start = time.monotonic()
        with pytest.raises(LimiterUnavailable, match="no answer"):
            await limiter.admit(lease("s1"), LIMITS)
        assert time.monotonic() - start < 0.1 + MARGIN
        assert black_hole.connections == first + 1
        assert limiter.breaker.state == "open"
    finally:
        await limiter.aclose()


async def test_black_holed_redis_fail_open_admits_within_the_timeout(
    black_hole: BlackHole,
) -> None:
    port = await black_hole.start()
    errors = Errors()
    limiter = FailoverLimiter(
        RedisLimiter(f"redis://127.0.0.1:{port}/0", timeout_seconds=TIMEOUT),
        MemoryLimiter(),
        fail_mode="open",
        expected_replicas=1,
        on_error=errors,
    )
    try:
        start = time.monotonic()
        await limiter.admit(lease("s1"), LIMITS)
        assert time.monotonic() - start < TIMEOUT + MARGIN
        assert errors.operations == ["admit"]
        start = time.monotonic()
        assert await limiter.ping() is False
        assert time.monotonic() - start < TIMEOUT + MARGIN
    finally:
        await limiter.aclose()


async def test_failover_replays_unwritten_debits(
    redis_server: RedisServer, replicas: list[Replica]
) -> None:
    replica = Replica(redis_server.url, "open")
    replicas.append(replica)
    budget = make_limits(tokens_per_minute=600)
    await redis_server.astop()
    assert await replica.limiter.charge("acme", budget, 300) == Balance(None)
    await redis_server.astart()
    deadline = time.monotonic() + 5.0
    while not await replica.limiter.ping():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # polling interval, bounded by the deadline
    balance = await replica.limiter.charge("acme", budget, 100)
    assert balance.tokens == pytest.approx(200.0, abs=5)  # 600 - (300 + 100)


def test_build_limiter_picks_the_backend() -> None:
    base = {
        "upstreams": {"openai": {"provider": "openai", "url": "wss://api.openai.com/v1/realtime",
                                 "api_key_env": "K"}},
        "tenants": [],
    }
    errors = Errors()
    memory = build_limiter(Config.model_validate(base), errors)
    assert isinstance(memory, MemoryLimiter)
    shared = build_limiter(
        Config.model_validate({**base, "redis": {"url": "redis+cluster://127.0.0.1:1",
                                                 "fail_mode": "closed", "lease_seconds": 9}}),
        errors,
    )
    assert isinstance(shared, FailoverLimiter)
    assert shared.fail_mode == "closed"
    assert shared.lease_seconds == 9
    assert shared.renewal_interval == 3
    assert RedisConfig.model_validate({"url": "redis://x"}).timeout_seconds <= 0.25
