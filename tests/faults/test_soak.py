"""Soak: 100 concurrent sessions against the emulator, with usage events and random client
disconnects, and no growth of memory, file descriptors, tasks or Redis keys.

Every worker opens a session, asks for responses (each ends with a ``response.done``
carrying usage, charged to the tenant's token bucket in Redis) and then leaves in one of
four ways: a clean close, a TCP reset after the response, a reset in the middle of a
streamed response, or a clean close in the middle of one.  Then it reconnects.

A warm-up brings every worker through sessions (so buffers, pools, caches and the
allocator reach their working size); at quiescence after it the baseline is taken.  At
quiescence after the soak: RSS within 5 % of the baseline, the same number of file
descriptors (not counting the limiter's pooled Redis connections, which open and close
with load: their number is checked against the pool's cap instead) and asyncio tasks,
no Redis key that was not there at the baseline, no session slot left in Redis, and
``sessions_active`` back to 0.

The default run soaks for about 10 s; ``-m slow`` runs the full 5 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.emulator.server import Emulator
from gateway.limits.redis import DEFAULT_MAX_CONNECTIONS
from tests.faults.conftest import (
    LeakSweep,
    Tokens,
    fd_count,
    metric,
    rss_bytes,
    serve,
    task_count,
)
from tests.faults.proxy import reset
from tests.support.gateway import UPSTREAM_KEY, RunningGateway, gateway_config, wait_for
from tests.support.redis_server import RedisServer

WORKERS = 100
RSS_GROWTH = 0.05
LEASE = 3.0
SHORT = 5.0
"""Seconds of soak in the default run (after the warm-up)."""


def warm_up_seconds(seconds: float) -> float:
    """Warm-up before the baseline: long enough for the allocator and the buffers to reach
    their working size (RSS is flat after about 30 s of this load: 4 s for the short soak,
    a tenth of the run for long ones)."""
    return max(4.0, seconds / 10)


@dataclass
class Stats:
    """What the workers did."""

    sessions: int = 0
    responses: int = 0
    resets: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)


async def respond(ws: ClientConnection, abort_mid_stream: bool) -> bool:
    """One user turn; True when its ``response.done`` arrived (False: left mid-stream)."""
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "how is the weather"}]}}))
    await ws.send(json.dumps({"type": "response.create"}))
    async with asyncio.timeout(30):
        while True:
            event = json.loads(await ws.recv())
            if abort_mid_stream and event["type"] == "response.output_audio.delta":
                return False
            if event["type"] == "response.done":
                assert event["response"]["usage"]["total_tokens"] > 0
                return True


async def worker(gw: RunningGateway, token: str, until: float, rng: random.Random,
                 stats: Stats) -> None:
    """Sessions back to back until ``until`` (loop time); bounded by the deadline."""
    loop = asyncio.get_running_loop()
    for _ in range(10_000):
        if loop.time() >= until:
            return
        try:
            async with asyncio.timeout(30):
                ws = await connect(gw.url(), additional_headers={
                    "Authorization": f"Bearer {token}"}, ping_interval=None)
                await ws.recv()  # session.created
        except InvalidStatus as exc:
            stats.refused += 1
            stats.errors.append(f"refused {exc.response.status_code}")
            return
        stats.sessions += 1
        leave = rng.choice(["close", "reset", "reset_mid_stream", "close_mid_stream"])
        try:
            for turn in range(rng.randint(1, 3)):
                mid_stream = leave.endswith("mid_stream") and turn == 0
                if await respond(ws, mid_stream):
                    stats.responses += 1
                else:
                    break
            if leave.startswith("reset"):
                stats.resets += 1
                reset(ws.transport)
            else:
                async with asyncio.timeout(10):
                    await ws.close()
        except (ConnectionClosed, TimeoutError, AssertionError) as exc:
            stats.errors.append(f"{leave}: {type(exc).__name__}: {exc}")
            ws.transport.abort()
            return


async def run_workers(gw: RunningGateway, tokens: list[str], seconds: float,
                      seed: int) -> Stats:
    stats = Stats()
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(worker(gw, token, until, random.Random(seed + i), stats)
                           for i, token in enumerate(tokens)))
    return stats


@contextlib.contextmanager
def without_pytest_log_capture() -> Iterator[None]:
    """Detach pytest's own log-capture handlers from the root logger for the block: they
    keep every DEBUG record in memory for the report, which would show as RSS growth.
    (The sweep's handler stays: it writes to a file.)"""
    root = logging.getLogger()
    detached = [h for h in root.handlers if type(h).__module__.startswith("_pytest")]
    for handler in detached:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in detached:
            root.addHandler(handler)


@pytest.fixture
async def soak_emulator() -> AsyncIterator[Emulator]:
    """The emulator keeping one record per worker (its record deque is then full, at its
    steady size, after the warm-up)."""
    async with Emulator(host="127.0.0.1", port=0, api_key=UPSTREAM_KEY,
                        max_records=WORKERS) as emu:
        yield emu


def sockets_to(port: int) -> int:
    """This process's open TCP sockets whose remote end is loopback port ``port`` (Linux
    ``/proc/net/tcp``)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") in inodes
    return count


@dataclass(frozen=True)
class Snapshot:
    rss: int
    fds: int
    """Open file descriptors other than the limiter's Redis connections."""
    tasks: int
    keys: frozenset[str]


async def quiescent(gw: RunningGateway, redis_server: RedisServer | None) -> Snapshot:
    """Wait until no session is live and no slot is held in Redis; then measure."""
    await wait_for(lambda: not gw.gateway.registry.sessions, within=5)
    keys: frozenset[str] = frozenset()
    if redis_server is not None:
        admin = redis_server.client()
        try:
            async def no_slots() -> bool:
                return not await admin.keys("rgw:*sessions*")
            await wait_for(no_slots, within=LEASE + 5)
            keys = frozenset(str(k) for k in await admin.keys("*"))
        finally:
            await admin.aclose()
    await wait_for(lambda: metric(gw, "realtime_gateway_sessions_active") == 0)
    gc.collect()
    pooled = 0 if redis_server is None else sockets_to(redis_server.port)
    assert pooled <= DEFAULT_MAX_CONNECTIONS
    return Snapshot(rss_bytes(), fd_count() - pooled, task_count(), keys)


async def soak(emulator: Emulator, key_file: Path, tokens: Tokens, sweep: LeakSweep,
               seconds: float, redis_server: RedisServer | None) -> None:
    """Soak a gateway with in-process limits, or with Redis when ``redis_server`` is given."""
    limits = {"tokens_per_minute": 10**9, "max_sessions": 1000, "max_sessions_per_user": 4}
    redis = None if redis_server is None else {"url": redis_server.url, "lease_seconds": LEASE}
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, limits=limits,
                            redis=redis, server={"drain_seconds": 0})
    users = [tokens.mint(ttl=3600 + seconds) for _ in range(WORKERS)]
    with without_pytest_log_capture():
        async with serve(sweep, config) as gw:
            warm = await run_workers(gw, users, warm_up_seconds(seconds), seed=1)
            assert warm.sessions >= WORKERS, warm
            baseline = await quiescent(gw, redis_server)
            started = time.monotonic()
            stats = await run_workers(gw, users, seconds, seed=2)
            elapsed = time.monotonic() - started
            end = await quiescent(gw, redis_server)
    print(f"soak: {elapsed:.1f} s, {stats.sessions} sessions, {stats.responses} responses, "
          f"{stats.resets} resets; rss {baseline.rss >> 20} -> {end.rss >> 20} MiB, "
          f"fds {baseline.fds} -> {end.fds}, tasks {baseline.tasks} -> {end.tasks}")
    assert not stats.errors, stats.errors[:5]
    assert stats.sessions >= WORKERS and stats.responses >= WORKERS and stats.resets > 0
    assert metric(gw, "realtime_gateway_tokens_total") > 0
    assert end.rss <= baseline.rss * (1 + RSS_GROWTH), (baseline.rss, end.rss)
    assert end.fds <= baseline.fds
    assert end.tasks <= baseline.tasks
    assert end.keys <= baseline.keys, sorted(end.keys - baseline.keys)


async def test_soak_short(soak_emulator: Emulator, key_file: Path, tokens: Tokens,
                          sweep: LeakSweep) -> None:
    """About 10 s of soak with in-process limits (the default run)."""
    await soak(soak_emulator, key_file, tokens, sweep, seconds=SHORT, redis_server=None)


async def test_soak_short_with_redis(soak_emulator: Emulator, key_file: Path, tokens: Tokens,
                                     sweep: LeakSweep) -> None:
    """About 10 s of soak with the limits in Redis (the default run)."""
    with RedisServer() as redis_server:
        await soak(soak_emulator, key_file, tokens, sweep, seconds=SHORT, redis_server=redis_server)


@pytest.mark.slow
async def test_soak_five_minutes(soak_emulator: Emulator, key_file: Path, tokens: Tokens,
                                 sweep: LeakSweep) -> None:
    """The full soak: 100 sessions for 5 minutes, limits in Redis."""
    with RedisServer() as redis_server:
        await soak(soak_emulator, key_file, tokens, sweep, seconds=300, redis_server=redis_server)
