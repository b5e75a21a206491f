"""Upstream faults, produced for real, through a real gateway.

Security note §6 cases 27-29 and the upstream half of 33 and 35.  The gateway dials the
upstream emulator through :class:`~tests.faults.proxy.FaultProxy`, which refuses,
black-holes, throttles, stalls, cuts or resets the TCP connection; status refusals
come from the emulator (``fault-refuse-<status>``), broken handshakes and oversize
events from stand-in upstreams.  Every case also checks that the session's lease is
released (one session per user: the same user is admitted again at once) and that no
asyncio task is left behind.

Already proven elsewhere: a 500 refusal and a stalled handshake as rows of CONTRACT §5
(``tests/integration/test_session.py::test_every_refusal``), and an upstream close
frame reaching the client verbatim (``…::test_upstream_close_code_and_reason_reach_the_client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection

from gateway.emulator.server import Emulator
from tests.faults.conftest import (
    LeakSweep,
    Tokens,
    closed_session,
    metric,
    open_session,
    refused,
    round_trip,
    serve,
    session_tasks,
    task_count,
)
from tests.faults.proxy import CannedServer, FaultProxy, ScriptedUpstream
from tests.support.emulator import emulator_sessions
from tests.support.gateway import MODEL, RunningGateway, gateway_config, wait_for

CONNECT_TIMEOUT = 0.5
REFUSALS = (401, 429, 500)
MODELS = {MODEL: {"upstream": "emulator"}, "fault-slow": {"upstream": "emulator"},
          **{f"fault-refuse-{s}": {"upstream": "emulator"} for s in REFUSALS},
          **{f"fault-close-{c}": {"upstream": "emulator"} for c in (1000, 1008, 4001)}}
ONE_PER_USER = {"max_sessions_per_user": 1}


@pytest.fixture
async def proxy(emulator: Emulator) -> AsyncIterator[FaultProxy]:
    """The fault proxy in front of the emulator."""
    host, port = emulator.url.removeprefix("ws://").split(":")
    async with FaultProxy((host, int(port))) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def gw(proxy: FaultProxy, key_file: Path,
             sweep: LeakSweep) -> AsyncIterator[RunningGateway]:
    """A gateway dialling the emulator through the proxy (0.5 s connect budget)."""
    config = gateway_config(f"ws://127.0.0.1:{proxy.port}/v1/realtime", key_file,
                            models=MODELS, connect_timeout=CONNECT_TIMEOUT, limits=ONE_PER_USER,
                            server={"drain_seconds": 0})
    async with serve(sweep, config) as running:
        yield running


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def assert_released(sweep: LeakSweep, gw: RunningGateway, token: str) -> None:
    """The user's only slot is free: the same token opens a session at once."""
    await wait_for(lambda: not gw.gateway.registry.sessions)
    ws = await open_session(sweep, gw.url(), token)
    await ws.close()


# -- before the 101 ---------------------------------------------------------------------------

async def test_refused_tcp_is_502_at_once(gw: RunningGateway, proxy: FaultProxy,
                                          tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 27: the upstream refuses the TCP connection → 502 ``upstream_error`` (reason
    ``connect``), well inside the connect budget; no lease kept."""
    token = tokens.mint()
    await proxy.refuse()
    started = time.monotonic()
    refusal = await refused(sweep, gw.url(), bearer(token))
    assert time.monotonic() - started < CONNECT_TIMEOUT
    assert (refusal.status, refusal.body["error"]["code"]) == (502, "upstream_error")
    assert metric(gw, "realtime_gateway_upstream_connect_errors_total", reason="connect") == 1
    await proxy.heal()
    await assert_released(sweep, gw, token)


@pytest.mark.parametrize("fault", ["black_hole", "throttle"])
async def test_slow_handshake_is_504_inside_the_connect_budget(
        gw: RunningGateway, proxy: FaultProxy, emulator: Emulator, tokens: Tokens,
        sweep: LeakSweep, fault: str) -> None:
    """Case 27: TCP accepted but no answer (black hole), or an answer at 100 B/s → 504
    ``upstream_timeout`` once ``connect_timeout_seconds`` (0.5 s) is spent, not later."""
    token = tokens.mint()
    if fault == "black_hole":
        proxy.black_hole()
    else:
        proxy.throttle(100)
    started = time.monotonic()
    refusal = await refused(sweep, gw.url(), bearer(token))
    elapsed = time.monotonic() - started
    assert (refusal.status, refusal.body["error"]["code"]) == (504, "upstream_timeout")
    assert CONNECT_TIMEOUT <= elapsed < CONNECT_TIMEOUT + 1.0, elapsed
    assert metric(gw, "realtime_gateway_upstream_connect_errors_total", reason="timeout") == 1
    assert not any(s["closed"] is False for s in emulator_sessions(emulator))
    await proxy.heal()
    await assert_released(sweep, gw, token)


async def test_stall_past_the_handshake_budget_is_504_within_budget(
        proxy: FaultProxy, key_file: Path, tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 35: a connect budget longer than ``server.handshake_timeout_seconds`` (1 s)
    does not matter: the whole pre-accept phase is cut at 1 s → 504 within 1 + 1 s."""
    config = gateway_config(f"ws://127.0.0.1:{proxy.port}/v1/realtime", key_file,
                            connect_timeout=10, limits=ONE_PER_USER,
                            server={"handshake_timeout_seconds": 1, "drain_seconds": 0})
    async with serve(sweep, config) as gw:
        token = tokens.mint()
        proxy.black_hole()
        started = time.monotonic()
        refusal = await refused(sweep, gw.url(), bearer(token))
        elapsed = time.monotonic() - started
        assert (refusal.status, refusal.body["error"]["code"]) == (504, "upstream_timeout")
        assert 1.0 <= elapsed < 2.0, elapsed
        await proxy.heal()
        await assert_released(sweep, gw, token)


@pytest.mark.parametrize("status", REFUSALS)
async def test_status_instead_of_101_is_502_and_the_body_stays_upstream(
        gw: RunningGateway, tokens: Tokens, sweep: LeakSweep, status: int) -> None:
    """Case 28: the upstream answers 401/429/500 instead of 101 → 502; the upstream's body
    and headers are not passed on; the reason label names the status."""
    token = tokens.mint()
    refusal = await refused(sweep, gw.url(model=f"fault-refuse-{status}"), bearer(token))
    assert (refusal.status, refusal.body["error"]["code"]) == (502, "upstream_error")
    assert set(refusal.body["error"]) == {"type", "code", "message"}
    assert "emulator" not in json.dumps(refusal.body).lower()
    assert "server" not in refusal.headers
    reason = f"status_{status}" if status < 500 else "status_5xx"
    assert metric(gw, "realtime_gateway_upstream_connect_errors_total", reason=reason) == 1
    await assert_released(sweep, gw, token)


BROKEN_HANDSHAKES = {
    "bad_accept": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n"
                   b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBvbmU=\r\n\r\n"),
    "no_accept": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\n\r\n",
    "not_http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
}


@pytest.mark.parametrize("case", list(BROKEN_HANDSHAKES))
async def test_broken_upstream_handshake_is_502(key_file: Path, tokens: Tokens,
                                                sweep: LeakSweep, case: str) -> None:
    """Case 28: a 101 without a valid ``Sec-WebSocket-Accept``, or no HTTP at all → 502."""
    async with CannedServer(BROKEN_HANDSHAKES[case]) as canned:
        config = gateway_config(f"ws://127.0.0.1:{canned.port}/v1/realtime", key_file,
                                connect_timeout=2, server={"drain_seconds": 0})
        async with serve(sweep, config) as gw:
            started = time.monotonic()
            refusal = await refused(sweep, gw.url(), bearer(tokens.mint()))
            assert time.monotonic() - started < 2
            assert (refusal.status, refusal.body["error"]["code"]) == (502, "upstream_error")
            assert canned.requests == 1
            assert metric(gw, "realtime_gateway_upstream_connect_errors_total") == 1


# -- during the session -----------------------------------------------------------------------

async def first_delta(ws: ClientConnection) -> None:
    """Ask for a (slowly streamed) response and wait for its first audio chunk."""
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text",
                                                        "text": "tell me a long story"}]}}))
    await ws.send(json.dumps({"type": "response.create"}))
    async with asyncio.timeout(5):
        while json.loads(await ws.recv())["type"] != "response.output_audio.delta":
            pass


@pytest.mark.parametrize("fault", ["reset", "cut_mid_frame"])
async def test_upstream_lost_mid_stream_is_1011_and_the_slot_is_released(
        gw: RunningGateway, proxy: FaultProxy, tokens: Tokens, sweep: LeakSweep,
        fault: str) -> None:
    """Case 29: the upstream connection is reset (RST) or cut in the middle of a frame
    while a response streams → the client gets an ``upstream_error`` event and 1011;
    the lease is released; ``sessions_total{outcome="upstream_error"}``."""
    token = tokens.mint()
    tasks_before = task_count()
    ws = await open_session(sweep, gw.url(model="fault-slow"), token)
    await first_delta(ws)
    if fault == "reset":
        proxy.reset_all()
    else:
        proxy.cut_after(7, "down")  # 7 bytes into the next frame (its header is 4 bytes)
    closed = await closed_session(sweep, ws, within=5)
    assert (closed.code, closed.errors[-1]["error"]["code"]) == (1011, "upstream_error")
    await assert_released(sweep, gw, token)
    assert metric(gw, "realtime_gateway_sessions_total", outcome="upstream_error") == 1
    assert metric(gw, "realtime_gateway_closes_total", initiator="upstream", code="1011") == 1
    await wait_for(lambda: task_count() <= tasks_before, within=5)


async def test_stalled_upstream_still_answers_client_pings_and_leaves_no_task(
        gw: RunningGateway, proxy: FaultProxy, tokens: Tokens, sweep: LeakSweep) -> None:
    """The upstream stops mid-response (TCP open, nothing moves): the client's pings are
    still answered by the gateway; when the client leaves, the stalled upstream is dropped
    after the close timeout and no task is left behind."""
    token = tokens.mint()
    tasks_before = task_count()
    ws = await open_session(sweep, gw.url(model="fault-slow"), token)
    await first_delta(ws)
    proxy.stall()
    for _ in range(3):
        async with asyncio.timeout(1):
            await (await ws.ping())
    async with asyncio.timeout(5):
        await ws.close()
    # the upstream's close reply never comes: dropped after the relay's 2 s close timeout
    await wait_for(lambda: not gw.gateway.registry.sessions, within=5)
    await wait_for(lambda: not session_tasks(), within=2)  # while the stall still holds
    await proxy.heal()  # the proxy and the emulator now see the gateway's side gone
    await wait_for(lambda: task_count() <= tasks_before, within=5)
    await assert_released(sweep, gw, token)


async def test_stalled_upstream_is_found_by_keepalive_and_closed_1011(
        proxy: FaultProxy, key_file: Path, tokens: Tokens, sweep: LeakSweep) -> None:
    """With 0.2 s keepalive pings the gateway notices a stalled upstream by itself: the
    client gets ``upstream_error`` and 1011 once the ping times out (0.4 s) and the failed
    connection's close timeout (5 s, :func:`gateway.upstream.dial`) has passed."""
    config = gateway_config(f"ws://127.0.0.1:{proxy.port}/v1/realtime", key_file,
                            models=MODELS, limits=ONE_PER_USER,
                            server={"ping_interval_seconds": 0.2, "ping_timeout_seconds": 0.2,
                                    "drain_seconds": 0})
    async with serve(sweep, config) as gw:
        token = tokens.mint()
        ws = await open_session(sweep, gw.url(model="fault-slow"), token, ping_interval=None)
        await first_delta(ws)
        proxy.stall()
        started = time.monotonic()
        closed = await closed_session(sweep, ws, within=10)
        assert time.monotonic() - started < 0.4 + 5 + 1.5
        assert (closed.code, closed.errors[-1]["error"]["code"]) == (1011, "upstream_error")
        await proxy.heal()
        await assert_released(sweep, gw, token)


@pytest.mark.parametrize("code", [1000, 1008, 4001])
async def test_upstream_close_frames_pass_verbatim(gw: RunningGateway, tokens: Tokens,
                                                   sweep: LeakSweep, code: int) -> None:
    """Case 29: an upstream close frame reaches the client with its code and reason."""
    token = tokens.mint()
    ws = await open_session(sweep, gw.url(model=f"fault-close-{code}"), token)
    await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
    closed = await closed_session(sweep, ws)
    assert (closed.code, closed.reason) == (code, f"emulator close {code}")
    await assert_released(sweep, gw, token)


async def test_oversize_upstream_event_closes_both_sides(key_file: Path, tokens: Tokens,
                                                         sweep: LeakSweep) -> None:
    """Case 33: an upstream event over the gateway's 16 MiB upstream cap → the upstream is
    closed 1009 and the client gets a close (1009 relayed, or 1011), no hang."""
    closes: list[int | None] = []

    async def oversize(connection: ServerConnection) -> None:
        await connection.send(json.dumps({"type": "session.created", "session": {}}))
        with contextlib.suppress(Exception):
            await connection.send("x" * (16 * 1024 * 1024 + 1))
        await connection.wait_closed()
        closes.append(connection.close_code)

    async with ScriptedUpstream(oversize) as upstream:
        config = gateway_config(upstream.url, key_file, server={"drain_seconds": 0})
        async with serve(sweep, config) as gw:
            ws = await open_session(sweep, gw.url(), tokens.mint())
            closed = await closed_session(sweep, ws, within=10)
            assert closed.code in (1009, 1011)
            await wait_for(lambda: bool(closes), within=5)
            assert closes == [1009]
            await wait_for(lambda: not gw.gateway.registry.sessions)


async def test_relay_survives_a_slow_upstream(gw: RunningGateway, proxy: FaultProxy,
                                              tokens: Tokens, sweep: LeakSweep) -> None:
    """An upstream throttled to 20 kB/s mid-session is slow, not broken: the session goes
    on, frames arrive whole and in order."""
    ws = await open_session(sweep, gw.url(), tokens.mint())
    proxy.throttle(20_000)
    for _ in range(3):
        await round_trip(ws)
    await ws.close()
    await wait_for(lambda: not gw.gateway.registry.sessions)
    assert metric(gw, "realtime_gateway_sessions_total", outcome="ok") == 1
