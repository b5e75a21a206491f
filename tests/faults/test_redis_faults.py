"""Redis faults under a live gateway, produced for real by the fault proxy.

Security note §6 cases 24-26 at gateway level: the gateway's limiter talks to a real
``redis-server`` through :class:`~tests.faults.proxy.FaultProxy`, which refuses, black-
holes, throttles or resets it while sessions are live.  Admission is decided within the
Redis timeout (fail-open: admitted by the local fallback; fail-closed: 503); live
sessions are never dropped; when Redis is back the leases are in Redis again and go
back to zero when the sessions end.

Already proven elsewhere: the limiter alone against a stopped, restarted and black-holed
Redis (``tests/integration/test_limiter_redis_faults.py``) and two gateway processes
through a Redis outage (``tests/integration/test_redis_admission.py``).

The gateways here are built with a 0.5 s circuit-breaker reset (production: 5 s) so that
recovery is seen within a test's time; everything else is the production limiter stack.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from websockets.asyncio.client import ClientConnection

from gateway.app import Gateway, assemble
from gateway.auth.authenticator import Authenticator
from gateway.config import Config
from gateway.emulator.server import Emulator
from gateway.limits.failover import FailoverLimiter
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis import RedisLimiter, tenant_key
from gateway.metrics import Metrics
from gateway.services import Services
from tests.faults.conftest import (
    LeakSweep,
    Tokens,
    metric,
    open_session,
    refused,
    round_trip,
    serve,
)
from tests.faults.proxy import FaultProxy
from tests.support.gateway import RunningGateway, gateway_config, wait_for
from tests.support.redis_server import RedisServer

TIMEOUT = 0.25
MARGIN = 0.5  # handshake work besides the Redis call, on a loaded 2-core machine
LEASE = 3.0


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy((redis_server.host, redis_server.port)) as fault_proxy:
        yield fault_proxy


def build(config: Config) -> Gateway:
    """The production limiter stack (FailoverLimiter over Redis + memory) with a short
    breaker reset."""
    assert config.redis is not None
    metrics = Metrics()

    def on_error(operation: str) -> None:
        metrics.limiter_errors_total.labels(operation).inc()

    redis = RedisLimiter.from_config(config.redis, reset_seconds=0.5)
    limiter = FailoverLimiter(redis, MemoryLimiter(lease_seconds=LEASE),
                              fail_mode=config.redis.fail_mode, expected_replicas=1,
                              on_error=on_error)
    return assemble(Services(config, metrics, Authenticator(config), limiter))


def redis_config(emulator: Emulator, key_file: Path, proxy: FaultProxy,
                 fail_mode: Literal["open", "closed"] = "open") -> Config:
    return gateway_config(
        f"{emulator.url}/v1/realtime", key_file,
        limits={"max_sessions": 10, "max_sessions_per_user": 5, "tokens_per_minute": 10**9},
        redis={"url": f"redis://127.0.0.1:{proxy.port}/0", "fail_mode": fail_mode,
               "timeout_seconds": TIMEOUT, "lease_seconds": LEASE},
        server={"drain_seconds": 0})


async def sessions_in_redis(redis_server: RedisServer) -> int:
    """Concurrency slots of tenant ``acme`` held in Redis (read directly, not via the proxy)."""
    admin = redis_server.client()
    try:
        count: Any = await admin.zcard(tenant_key("acme", "sessions"))
        return int(count)
    finally:
        await admin.aclose()


def slots(redis_server: RedisServer, expected: int) -> Callable[[], Awaitable[bool]]:
    """An async predicate: tenant ``acme`` holds ``expected`` slots in Redis."""
    async def check() -> bool:
        return await sessions_in_redis(redis_server) == expected
    return check


async def redis_back(gw: RunningGateway) -> None:
    """Wait until the gateway's limiter answers through Redis again (breaker closed)."""
    await wait_for(gw.gateway.services.limiter.ping, within=5, interval=0.1)


async def timed_session(sweep: LeakSweep, gw: RunningGateway,
                        token: str) -> tuple[ClientConnection, float]:
    started = time.monotonic()
    ws = await open_session(sweep, gw.url(), token)
    return ws, time.monotonic() - started


async def inject(proxy: FaultProxy, fault: str) -> None:
    if fault == "refuse":
        await proxy.refuse()
        proxy.reset_all()
    elif fault == "black_hole":
        proxy.black_hole()
    elif fault == "throttle":
        proxy.throttle(20)
    else:
        raise AssertionError(fault)


@pytest.mark.parametrize("fault", ["refuse", "black_hole", "throttle"])
async def test_redis_fault_mid_session_fail_open(
        emulator: Emulator, key_file: Path, proxy: FaultProxy, redis_server: RedisServer,
        tokens: Tokens, sweep: LeakSweep, fault: str) -> None:
    """Cases 24, 25: Redis refused, black-holed (TCP up, no replies) or throttled to 20 B/s
    while a session lives: new sessions are admitted by the local fallback within the
    Redis timeout; the live session keeps relaying across failed renewals; once Redis is
    back every live session's slot is in Redis again, and at the end none is left."""
    config = redis_config(emulator, key_file, proxy)
    async with serve(sweep, config, build(config)) as gw:
        live = await open_session(sweep, gw.url(), tokens.mint())
        assert await sessions_in_redis(redis_server) == 1
        await inject(proxy, fault)
        second, elapsed = await timed_session(sweep, gw, tokens.mint())
        assert elapsed < TIMEOUT + MARGIN, f"admitted after {elapsed:.2f} s"
        assert metric(gw, "realtime_gateway_limiter_errors_total", operation="admit") >= 1
        # renewals (every lease/3 = 1 s) fail; the live sessions are not ended
        await wait_for(lambda: metric(gw, "realtime_gateway_limiter_errors_total",
                                      operation="renew") >= 1, within=4)
        await round_trip(live)
        await round_trip(second)
        await proxy.heal()
        await redis_back(gw)
        # renewal re-acquires both slots, the one admitted while Redis was out included
        await wait_for(slots(redis_server, 2), within=5)
        await live.close()
        await second.close()
        await wait_for(lambda: not gw.gateway.registry.sessions)
        await wait_for(slots(redis_server, 0), within=2)


@pytest.mark.parametrize("fault", ["refuse", "black_hole"])
async def test_redis_fault_fail_closed_refuses_within_the_timeout(
        emulator: Emulator, key_file: Path, proxy: FaultProxy, redis_server: RedisServer,
        tokens: Tokens, sweep: LeakSweep, fault: str) -> None:
    """Case 24: ``fail_mode: closed`` → 503 ``unavailable`` with ``Retry-After`` within the
    Redis timeout, no upstream dialled; the live session goes on."""
    config = redis_config(emulator, key_file, proxy, fail_mode="closed")
    async with serve(sweep, config, build(config)) as gw:
        live = await open_session(sweep, gw.url(), tokens.mint())
        await inject(proxy, fault)
        dialled = emulator.connections
        started = time.monotonic()
        refusal = await refused(sweep, gw.url(), {"Authorization": f"Bearer {tokens.mint()}"})
        assert time.monotonic() - started < TIMEOUT + MARGIN
        assert (refusal.status, refusal.body["error"]["code"]) == (503, "unavailable")
        assert int(refusal.headers["retry-after"]) >= 1
        assert emulator.connections == dialled
        await round_trip(live)
        await live.close()


async def test_a_failed_lease_release_is_retried_and_frees_the_slot_at_once(
        emulator: Emulator, key_file: Path, proxy: FaultProxy, redis_server: RedisServer,
        tokens: Tokens, sweep: LeakSweep) -> None:
    """The limiter (``gateway.limits.failover``) tries a failed release again: with Redis
    black-holed when a session ends, the first release times out; once Redis answers
    again the retry frees the user's slot at once — not ``redis.lease_seconds`` later —
    so the user's next session is admitted."""
    config = gateway_config(
        f"{emulator.url}/v1/realtime", key_file,
        limits={"max_sessions": 10, "max_sessions_per_user": 1, "tokens_per_minute": 10**9},
        redis={"url": f"redis://127.0.0.1:{proxy.port}/0", "fail_mode": "closed",
               "timeout_seconds": TIMEOUT, "lease_seconds": 30},
        server={"drain_seconds": 0})
    async with serve(sweep, config, build(config)) as gw:
        ws = await open_session(sweep, gw.url(), tokens.mint("canary-user-r"))
        assert await sessions_in_redis(redis_server) == 1
        proxy.black_hole()
        await ws.close()
        await wait_for(lambda: metric(gw, "realtime_gateway_limiter_errors_total",
                                      operation="release") >= 1, within=3, interval=0.01)
        await proxy.heal()  # before the retry (RELEASE_RETRY_SECONDS later)
        healed = time.monotonic()
        await wait_for(slots(redis_server, 0), within=2)
        assert time.monotonic() - healed < 2  # by the retry: the lease had 30 s to go
        assert metric(gw, "realtime_gateway_limiter_errors_total", operation="release") == 1
        await wait_for(lambda: not gw.gateway.registry.sessions)
        again = await open_session(sweep, gw.url(), tokens.mint("canary-user-r"))
        await again.close()


async def test_fail_closed_refusal_is_logged_with_the_limiter_reason(
        emulator: Emulator, key_file: Path, proxy: FaultProxy, redis_server: RedisServer,
        tokens: Tokens, sweep: LeakSweep) -> None:
    """``fail_mode: closed`` with Redis down: the 503 is logged as ``session.rejected`` with
    ``reason="limiter"`` and the failed admit is counted once."""
    config = redis_config(emulator, key_file, proxy, fail_mode="closed")
    async with serve(sweep, config, build(config)) as gw:
        proxy.black_hole()
        refusal = await refused(sweep, gw.url(), {"Authorization": f"Bearer {tokens.mint()}"})
        assert (refusal.status, refusal.body["error"]["code"]) == (503, "unavailable")
        rejected = [r for r in sweep.log_records() if r.get("event") == "session.rejected"]
        assert [(r["code"], r["reason"]) for r in rejected] == [("unavailable", "limiter")]
        assert metric(gw, "realtime_gateway_limiter_errors_total", operation="admit") == 1


async def test_redis_connections_reset_mid_session(
        emulator: Emulator, key_file: Path, proxy: FaultProxy, redis_server: RedisServer,
        tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 26: every Redis connection is reset (RST) under live sessions: the next calls
    reconnect (one retry on a broken pooled connection), admission still goes through
    Redis, no session is dropped."""
    config = redis_config(emulator, key_file, proxy)
    async with serve(sweep, config, build(config)) as gw:
        live = await open_session(sweep, gw.url(), tokens.mint())
        for _ in range(3):
            accepted = proxy.accepted
            proxy.reset_all()
            ws = await open_session(sweep, gw.url(), tokens.mint())
            assert proxy.accepted > accepted  # a new Redis connection was made
            await round_trip(live)
            await ws.close()
        await wait_for(slots(redis_server, 1), within=2)
        assert metric(gw, "realtime_gateway_limiter_errors_total", operation="admit") == 0
        await live.close()
        await wait_for(slots(redis_server, 0), within=2)


async def test_redis_flushall_mid_session_is_repaired_by_renewal(
        emulator: Emulator, key_file: Path, proxy: FaultProxy, redis_server: RedisServer,
        tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 26: Redis loses its data (``FLUSHALL``, as after a restart without
    persistence) under live sessions: the next renewal puts their slots back; no session
    is dropped."""
    config = redis_config(emulator, key_file, proxy)
    async with serve(sweep, config, build(config)) as gw:
        sessions = [await open_session(sweep, gw.url(), tokens.mint()) for _ in range(2)]
        assert await sessions_in_redis(redis_server) == 2
        admin = redis_server.client()
        try:
            await admin.flushall()
            await admin.script_flush()  # NOSCRIPT on the next EVALSHA: scripts reload
        finally:
            await admin.aclose()
        await wait_for(slots(redis_server, 2), within=LEASE)
        for ws in sessions:
            await round_trip(ws)
            await ws.close()
        await wait_for(slots(redis_server, 0), within=2)


async def test_cancelling_a_task_inside_a_redis_call_ends_it(
        emulator: Emulator, key_file: Path, proxy: FaultProxy) -> None:
    """A task doing limiter calls (the gateway's housekeeping loop) is cancelled at shutdown,
    often while it is inside a limiter call.  Cancelled at random moments of a Redis call,
    300 times, the task must end every time."""
    config = redis_config(emulator, key_file, proxy)
    gateway = build(config)
    tenant = config.tenants[0]
    rng = random.Random(8)
    survivors = 0
    try:
        for _ in range(300):
            async def keep_charging() -> None:
                while True:  # what the housekeeping loop does, without the pauses
                    await gateway.services.limiter.charge("acme", tenant.limits, 1)
            task = asyncio.create_task(keep_charging())
            await asyncio.sleep(rng.random() * 0.003)  # the moment of the cancel is the test
            task.cancel()
            await asyncio.wait({task}, timeout=1)
            if not task.cancelled():
                survivors += 1
                for _ in range(100):  # each further cancel has the same small chance
                    if task.done():
                        break
                    task.cancel()
                    await asyncio.wait({task}, timeout=0.1)
                break
    finally:
        await gateway.services.limiter.aclose()
        await gateway.services.authenticator.aclose()
    assert survivors == 0
