"""Shared admission through Redis, seen by clients of real gateways.

Every test starts its own ``redis-server`` (or a three-node Redis Cluster) on a free
loopback port, never the machine's Redis on 6379.  Where the process boundary is the
point (state shared by replicas, a replica killed with SIGKILL) the replicas are real
``python -m gateway serve`` processes; elsewhere they are in-process gateways sharing
the same Redis.  Clients send credentials in the ``Authorization`` header, so refusals
arrive as HTTP statuses before the upgrade (CONTRACT §5).

Waits are bounded polls of a condition; ``asyncio.sleep`` is used only where the
test is about time passing (honouring ``Retry-After``) and as a poll interval.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.config import Config
from gateway.emulator.server import Emulator
from tests.support.gateway import RunningGateway, gateway_config, mint, run_gateway, wait_for
from tests.support.process import gateway_process, write_config
from tests.support.redis_server import RedisClusterServer, RedisServer

USER_LIMIT = 2
TENANT_LIMIT = 3
CONCURRENCY = {"max_sessions_per_user": USER_LIMIT, "max_sessions": TENANT_LIMIT}
SHORT_LEASE = 3.0
"""Seconds; the smallest ``redis.lease_seconds`` the config accepts (renewal every 1 s)."""
RELEASE_WITHIN = 2.0
"""Seconds for a closed session's slot to be usable on another replica.  Far below the
default 30 s lease: the slot is released, not left to expire."""
EXPIRY_BOUND = SHORT_LEASE + 5
"""Seconds after a SIGKILL within which the dead replica's slots must be free again."""
POLL_SECONDS = 0.05
OPEN_TIMEOUT = 10.0
"""Bound on one client handshake plus ``session.created``, seconds."""
NO_DRAIN = {"drain_seconds": 0}
USER, TENANT, START_RATE, BUDGET = "user's", "tenant's", "new sessions", "token budget"
"""Words of the refusal message naming the limit that refused (gateway.limits.policy)."""

RATE = 30
"""Starts per minute per user for the GCRA test: emission interval ``T = 60 / 30 = 2 s``
and a burst of 30 (the gateway's GCRA burst is the per-minute count), so after the
burst a refused start waits at most ``T`` = 2 s."""
INTERVAL = 60 / RATE

TOKENS_PER_MINUTE = 100
OVERDRAFT = 50
USAGE_MODEL = "fault-usage-105"
"""Each ``response.done`` adds 105 input text tokens.  With the emulator's own count
for ``"hi"`` (1 input text token, reply ``"You said: hi"``: 3 text + 12 audio tokens) the
first response costs 121 tokens: the balance of a full 100-token bucket drops to about
-21, which refuses new sessions (balance <= 0) but keeps live ones (not below -50); the
second response (its input also holds the first exchange) takes it below -50."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused upgrade: HTTP status, the body's ``error.code`` and ``error.message``,
    ``Retry-After`` (whole seconds)."""

    status: int
    code: str
    message: str
    retry_after: int | None


def assert_rate_limited(result: Refusal, limit: str = "") -> None:
    """A CONTRACT §5 ``rate_limited`` refusal: 429 with a ``Retry-After`` of >= 1 s, whose
    message names the refusing limit (contains ``limit``: "user's", "tenant's"...)."""
    assert (result.status, result.code) == (429, "rate_limited"), result
    assert result.retry_after is not None and result.retry_after >= 1, result
    assert limit in result.message, result


class Clients:
    """Realtime clients of the gateways under test; every connection left open is closed
    on exit (before the gateways stop, so no drain waits on them)."""

    def __init__(self) -> None:
        self.live: list[ClientConnection] = []

    async def attempt(self, url: str, token: str) -> ClientConnection | Refusal:
        """Open a session (bearer token in the header) and read ``session.created``,
        or return the refusal."""
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"})
        except InvalidStatus as exc:
            response = exc.response
            body = json.loads(response.body or b"{}")
            retry = response.headers.get("retry-after")
            return Refusal(response.status_code, body["error"]["code"],
                           body["error"]["message"], int(retry) if retry is not None else None)
        self.live.append(ws)
        async with asyncio.timeout(OPEN_TIMEOUT):
            created = json.loads(await ws.recv())
        assert created["type"] == "session.created"
        return ws

    async def admitted(self, url: str, token: str) -> ClientConnection:
        """A session that must be admitted at once."""
        result = await self.attempt(url, token)
        assert isinstance(result, ClientConnection), f"refused: {result}"
        return result

    async def refused(self, url: str, token: str) -> Refusal:
        """A session that must be refused at once."""
        result = await self.attempt(url, token)
        if isinstance(result, ClientConnection):
            await self.close(result)
            raise AssertionError(f"admitted by {url}, expected a refusal")
        return result

    async def admitted_within(self, url: str, token: str, seconds: float) -> ClientConnection:
        """Retry until admitted, for at most ``seconds``; each refusal must be a 429."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            result = await self.attempt(url, token)
            if isinstance(result, ClientConnection):
                return result
            assert_rate_limited(result)
            if loop.time() > deadline:
                raise AssertionError(f"still refused after {seconds} s: {result}")
            await asyncio.sleep(POLL_SECONDS)

    async def refused_within(self, urls: tuple[str, ...], token: str,
                             seconds: float) -> Refusal:
        """Retry (alternating over ``urls``, closing admitted sessions) until refused,
        for at most ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for tries in range(10_000):
            result = await self.attempt(urls[tries % len(urls)], token)
            if isinstance(result, Refusal):
                return result
            await self.close(result)
            if loop.time() > deadline:
                break
            await asyncio.sleep(POLL_SECONDS)
        raise AssertionError(f"still admitted after {seconds} s")

    async def close(self, ws: ClientConnection) -> None:
        """Close a session from the client side (bounded)."""
        if ws in self.live:
            self.live.remove(ws)
        async with asyncio.timeout(5):
            await ws.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for ws in list(self.live):
            try:
                await self.close(ws)
            except (TimeoutError, OSError):
                ws.transport.abort()


async def read_until_closed(ws: ClientConnection, seconds: float) -> tuple[int, list[Any]]:
    """Every event until the gateway closes the session: ``(close code, events)``."""
    events: list[Any] = []
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(seconds):
            while True:
                events.append(json.loads(await ws.recv()))
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, events


async def respond(ws: ClientConnection) -> int:
    """Ask for one response to user text ``"hi"``; the ``total_tokens`` of its usage."""
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "hi"}]}}))
    await ws.send(json.dumps({"type": "response.create"}))
    async with asyncio.timeout(10):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "response.done":
                total: int = event["response"]["usage"]["total_tokens"]
                return total


async def round_trip(ws: ClientConnection) -> None:
    """Prove a session is alive and relaying: ``session.update`` → ``session.updated``."""
    await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
    async with asyncio.timeout(5):
        while json.loads(await ws.recv())["type"] != "session.updated":
            pass


async def metric(http: httpx.AsyncClient, metrics_url: str, name: str,
                 **labels: str) -> float:
    """Sum of the samples of ``name`` with ``labels`` on a ``/metrics`` page."""
    text = (await http.get(metrics_url)).text
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def readiness(http: httpx.AsyncClient, gw: RunningGateway) -> tuple[int, str]:
    """``/readyz``: ``(HTTP status, checks.limiter)``."""
    response = await http.get(f"{gw.http}/readyz")
    return response.status_code, response.json()["checks"]["limiter"]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free loopback port (skips when not installed)."""
    with RedisServer() as server:
        yield server


def redis_config(emulator: Emulator, key_file: Path, redis: dict[str, Any],
                 limits: dict[str, Any], **kwargs: Any) -> Config:
    """The test tenant ``acme`` routed to the emulator, with ``redis:`` and ``limits``."""
    return gateway_config(f"{emulator.url}/v1/realtime", key_file, limits=limits,
                          redis=redis, server=NO_DRAIN, **kwargs)


async def check_shared_concurrency(clients: Clients, a: str, b: str, key_file: Path) -> None:
    """``max_sessions_per_user: 2`` and ``max_sessions: 3`` hold across replicas ``a``
    and ``b`` (their realtime URLs), and a closed session's slot is free at once."""
    alice, bob, carol = (mint(key_file, sub=sub) for sub in ("alice", "bob", "carol"))
    alice_on_a = await clients.admitted(a, alice)
    await clients.admitted(b, alice)
    for url in (a, b):  # alice's third session, wherever it lands
        assert_rate_limited(await clients.refused(url, alice), USER)
    await clients.admitted(a, bob)  # the tenant's third
    for url in (a, b):  # the tenant's fourth, wherever it lands
        assert_rate_limited(await clients.refused(url, carol), TENANT)
    await clients.close(alice_on_a)
    await clients.admitted_within(b, carol, RELEASE_WITHIN)  # the slot freed on a, used on b
    for url in (a, b):  # full again
        assert_rate_limited(await clients.refused(url, carol), TENANT)


# -- 1. two processes, one Redis ------------------------------------------------------------

async def test_two_processes_enforce_concurrency_limits_together(
        emulator: Emulator, key_file: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    config = write_config(redis_config(emulator, key_file, {"url": redis_server.url},
                                       CONCURRENCY), tmp_path / "gw.yaml")
    async with gateway_process(config) as a, gateway_process(config) as b, Clients() as clients:
        await check_shared_concurrency(clients, a.url(), b.url(), key_file)
    assert len(a.events("session.rejected")) + len(b.events("session.rejected")) >= 6


# -- 2. a replica killed with SIGKILL --------------------------------------------------------

async def test_sigkilled_replica_slots_free_within_the_lease(
        emulator: Emulator, key_file: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    config = write_config(redis_config(emulator, key_file,
                                       {"url": redis_server.url, "lease_seconds": SHORT_LEASE},
                                       {"max_sessions_per_user": USER_LIMIT}),
                          tmp_path / "gw.yaml")
    token = mint(key_file, sub="alice")
    loop = asyncio.get_running_loop()
    async with gateway_process(config) as a, gateway_process(config) as b, Clients() as clients:
        for _ in range(USER_LIMIT):
            await clients.admitted(a.url(), token)
        assert_rate_limited(await clients.refused(b.url(), token), USER)
        a.process.send_signal(signal.SIGKILL)
        killed = loop.time()
        async with asyncio.timeout(5):
            assert await a.process.wait() == -signal.SIGKILL
        for _ in range(USER_LIMIT):  # no release ever comes: each slot must expire
            await clients.admitted_within(b.url(), token, EXPIRY_BOUND - (loop.time() - killed))
        freed_after = loop.time() - killed
        assert_rate_limited(await clients.refused(b.url(), token), USER)  # both slots are b's now
    # renewed at most ~1 s before the kill, the slots outlived the replica, then expired
    assert 1.0 <= freed_after <= EXPIRY_BOUND


# -- 3. start rate (GCRA) ------------------------------------------------------------------

async def test_start_rate_is_shared_and_retry_after_is_honoured(
        emulator: Emulator, key_file: Path, redis_server: RedisServer) -> None:
    config = redis_config(emulator, key_file, {"url": redis_server.url},
                          {"session_starts_per_minute_per_user": RATE})
    token = mint(key_file, sub="alice")
    loop = asyncio.get_running_loop()
    async with run_gateway(config) as a, run_gateway(config) as b, Clients() as clients:
        urls = (a.url(), b.url())
        started = loop.time()
        admitted, refusal = 0, None
        for attempt in range(2 * RATE):  # a burst beyond the rate, alternating replicas
            result = await clients.attempt(urls[attempt % 2], token)
            if isinstance(result, Refusal):
                refusal = result
                break
            admitted += 1
            await clients.close(result)
        elapsed = loop.time() - started
        assert refusal is not None, f"{admitted} starts in {elapsed:.1f} s, none refused"
        assert_rate_limited(refusal, START_RATE)
        # the burst of RATE, plus one start per emission interval that passed meanwhile
        assert RATE <= admitted <= RATE + elapsed / INTERVAL + 1
        assert refusal.retry_after is not None and refusal.retry_after <= math.ceil(INTERVAL)
        await asyncio.sleep(refusal.retry_after)  # the test is about honouring Retry-After
        await clients.close(await clients.admitted(urls[1], token))
        # one start per interval: the next one, at once, is refused again
        assert_rate_limited(await clients.refused(urls[0], token), START_RATE)


# -- 4. token budget -------------------------------------------------------------------------

async def test_token_budget_refuses_then_closes_sessions_on_both_replicas(
        emulator: Emulator, key_file: Path, redis_server: RedisServer) -> None:
    config = redis_config(
        emulator, key_file, {"url": redis_server.url, "lease_seconds": SHORT_LEASE},
        {"tokens_per_minute": TOKENS_PER_MINUTE, "token_overdraft": OVERDRAFT},
        models={USAGE_MODEL: {"upstream": "emulator"}})
    loop = asyncio.get_running_loop()
    async with run_gateway(config) as a, run_gateway(config) as b, Clients() as clients:
        urls = (a.url(model=USAGE_MODEL), b.url(model=USAGE_MODEL))
        spender = await clients.admitted(urls[0], mint(key_file, sub="alice"))
        bystander = await clients.admitted(urls[1], mint(key_file, sub="bob"))

        first = await respond(spender)
        assert TOKENS_PER_MINUTE < first < TOKENS_PER_MINUTE + OVERDRAFT  # see USAGE_MODEL
        # over tokens_per_minute: new sessions are refused on both replicas...
        newcomer = mint(key_file, sub="carol")
        refusal = await clients.refused_within(urls, newcomer, 3.0)
        assert_rate_limited(refusal, BUDGET)
        for url in urls:
            assert_rate_limited(await clients.refused(url, newcomer), BUDGET)
        # ...with Retry-After = time for the refill (100/60 tokens/s) to bring it above 0
        refill_seconds = (first - TOKENS_PER_MINUTE) * 60 / TOKENS_PER_MINUTE
        assert refusal.retry_after is not None
        assert refusal.retry_after <= math.ceil(refill_seconds) + 1
        # ...while live sessions go on (the balance is not below -overdraft)
        await round_trip(spender)
        await round_trip(bystander)

        # past the overdraft: the spender's replica closes it on the charge
        await spender.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "hi"}]}}))
        await spender.send(json.dumps({"type": "response.create"}))
        code, events = await read_until_closed(spender, 10)
        spender_closed = loop.time()
        assert code == 4429
        assert events[-1]["type"] == "error"
        assert events[-1]["error"]["code"] == "rate_limited"
        # the other replica learns the balance at its next lease renewal (every lease/3)
        code, events = await read_until_closed(bystander, SHORT_LEASE / 3 + 3)
        assert code == 4429
        assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["rate_limited"]
        assert loop.time() - spender_closed <= SHORT_LEASE / 3 + 2
        await wait_for(lambda: not a.gateway.registry.sessions
                       and not b.gateway.registry.sessions, within=5)


# -- 5. Redis stopped mid-run ----------------------------------------------------------------

async def test_redis_outage_fail_open_and_closed_then_recovery(
        emulator: Emulator, key_file: Path, redis_server: RedisServer) -> None:
    def config(mode: Literal["open", "closed"]) -> Config:
        return redis_config(emulator, key_file, {"url": redis_server.url, "fail_mode": mode},
                            {"max_sessions_per_user": 1})

    errors = "realtime_gateway_limiter_errors_total"
    async with (run_gateway(config("open")) as fail_open,
                run_gateway(config("closed")) as fail_closed,
                Clients() as clients, httpx.AsyncClient(timeout=5) as http):
        # Redis up: one shared user limit, both ready
        alice = mint(key_file, sub="alice")
        held = await clients.admitted(fail_open.url(), alice)
        assert_rate_limited(await clients.refused(fail_closed.url(), alice), USER)
        await clients.close(held)
        assert await readiness(http, fail_open) == (200, "ok")
        assert await readiness(http, fail_closed) == (200, "ok")
        before = await metric(http, fail_open.metrics_url, errors, operation="admit")

        await redis_server.astop()
        # fail open: new sessions are still served, and every admission error is counted
        for sub in ("bob", "carol"):
            await clients.close(await clients.admitted(fail_open.url(), mint(key_file, sub=sub)))
        after = await metric(http, fail_open.metrics_url, errors, operation="admit")
        assert after == before + 2  # one per admission, counted once
        # fail closed: 503 unavailable
        refusal = await clients.refused(fail_closed.url(), mint(key_file, sub="dave"))
        assert (refusal.status, refusal.code) == (503, "unavailable")
        assert refusal.retry_after is not None and refusal.retry_after >= 1
        assert await readiness(http, fail_open) == (200, "degraded")
        assert await readiness(http, fail_closed) == (503, "down")

        await redis_server.astart()  # same port, empty; neither gateway restarts

        async def both_ready() -> bool:
            return (await readiness(http, fail_open) == (200, "ok")
                    and await readiness(http, fail_closed) == (200, "ok"))

        await wait_for(both_ready, within=5, interval=0.1)
        # the shared user limit holds again across the two replicas
        erin = mint(key_file, sub="erin")
        await clients.admitted(fail_closed.url(), erin)
        assert_rate_limited(await clients.refused(fail_open.url(), erin), USER)
        assert_rate_limited(await clients.refused(fail_closed.url(), erin), USER)


# -- 6. Redis Cluster ------------------------------------------------------------------------

async def test_concurrency_limits_on_a_redis_cluster(emulator: Emulator,
                                                     key_file: Path) -> None:
    async with RedisClusterServer() as cluster:
        config = redis_config(emulator, key_file, {"url": cluster.url}, CONCURRENCY)
        async with run_gateway(config) as a, run_gateway(config) as b, Clients() as clients:
            await check_shared_concurrency(clients, a.url(), b.url(), key_file)
            # the slots really live in the cluster (rgw:{acme} hashes to slot 11304, on the
            # third node, not the startup node): the tenant's set holds the 3 sessions
            redis = cluster.client()
            try:
                assert await redis.zcard("rgw:{acme}:sessions") == TENANT_LIMIT
            finally:
                await redis.aclose()
