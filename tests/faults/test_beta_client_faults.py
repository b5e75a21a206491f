"""Client and upstream faults on a translated (beta-protocol) session: the rules the verbatim
relay's faults prove in ``test_client_faults.py`` hold for :class:`gateway.beta_relay.BetaRelay`
too (CONTRACT §5): keepalive finds a silent client, FIN/RST without a close frame close the
upstream 1001, a client that stops reading is a slow consumer, hostile frames close 1002 / 1007
/ 1009, and an upstream that vanishes becomes ``upstream_error`` + 1011.  Every test runs under
the leak sweep of ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.beta_relay import BetaRelay
from gateway.emulator.server import Emulator
from tests.faults.conftest import (
    LeakSweep,
    Tokens,
    closed_session,
    metric,
    open_session,
    round_trip,
    serve,
)
from tests.faults.proxy import OP_BINARY, OP_TEXT, FaultProxy, RawWebSocket, ScriptedUpstream, reset
from tests.faults.test_client_faults import (
    MAX_MESSAGE,
    MODELS,
    PROTOCOL_ERRORS,
    Flood,
    assert_protocol_error_closes_1002,
    assert_slow_consumer_closed,
    relays,
    upstream_closed,
)
from tests.support.emulator import emulator_sessions
from tests.support.gateway import MODEL, RunningGateway, gateway_config, wait_for

BETA = {"OpenAI-Beta": "realtime=v1"}


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path,
             sweep: LeakSweep) -> AsyncIterator[RunningGateway]:
    """As ``test_client_faults.gw``: 64 KiB messages, one session per user, 0.2 s pings."""
    config = gateway_config(
        f"{emulator.url}/v1/realtime", key_file,
        models={**MODELS, "fault-drop": {"upstream": "emulator"}},
        limits={"max_sessions_per_user": 1},
        server={"max_message_bytes": MAX_MESSAGE, "ping_interval_seconds": 0.2,
                "ping_timeout_seconds": 0.2, "handshake_timeout_seconds": 2,
                "drain_seconds": 0})
    async with serve(sweep, config) as running:
        yield running


def beta_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **BETA}


async def test_silent_beta_client_is_found_by_pings(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    async with FaultProxy(("127.0.0.1", gw.port)) as proxy:
        ws = await open_session(sweep, f"ws://127.0.0.1:{proxy.port}/v1/realtime?model={MODEL}",
                                "", additional_headers=beta_headers(tokens.mint()),
                                ping_interval=None)
        await round_trip(ws)
        assert all(isinstance(relay, BetaRelay) for relay in relays(gw))
        proxy.black_hole()
        vanished = time.monotonic()
        record = await upstream_closed(emulator, within=3)
        elapsed = time.monotonic() - vanished
        ws.transport.abort()
    assert record["close_code"] == 1001
    assert elapsed < 1.0, f"upstream closed {elapsed:.2f} s after the client vanished"
    await wait_for(lambda: not gw.gateway.registry.sessions)
    assert metric(gw, "realtime_gateway_protocol_sessions_active", protocol="beta") == 0


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_beta_client_fin_or_rst_without_close_frame(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep,
        how: str) -> None:
    ws = await open_session(sweep, gw.url(), "", additional_headers=beta_headers(tokens.mint()),
                            ping_interval=None)
    await round_trip(ws)
    started = time.monotonic()
    if how == "fin":
        ws.transport.write_eof()
    else:
        reset(ws.transport)
    record = await upstream_closed(emulator, within=3)
    assert time.monotonic() - started < 1.0
    assert record["close_code"] == 1001
    ws.transport.abort()
    await wait_for(lambda: not gw.gateway.registry.sessions)
    assert metric(gw, "realtime_gateway_closes_total", initiator="client") == 1


async def test_beta_client_that_stops_reading_is_a_slow_consumer(
        key_file: Path, tokens: Tokens, sweep: LeakSweep) -> None:
    flood = Flood()
    async with ScriptedUpstream(flood) as upstream:
        config = gateway_config(upstream.url, key_file, server={"send_timeout_seconds": 1,
                                                                "drain_seconds": 0})
        async with serve(sweep, config) as gw:
            ws = await open_session(sweep, gw.url(), "",
                                    additional_headers=beta_headers(tokens.mint()),
                                    ping_interval=None, max_queue=4)
            try:
                await assert_slow_consumer_closed(gw, ws, flood, sweep)
            finally:
                ws.transport.abort()
    assert flood.sent * 64 * 1024 < 64 * 1024 * 1024  # backpressure, not buffering


async def test_beta_message_over_the_cap_is_closed_1009(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    ws = await open_session(sweep, gw.url(model="fault-echo"), "",
                            additional_headers=beta_headers(tokens.mint()), max_size=None)
    await ws.send(bytes(MAX_MESSAGE))
    async with asyncio.timeout(5):
        assert await ws.recv() == bytes(MAX_MESSAGE)  # binary crosses unchanged, at the cap
    await ws.send(bytes(MAX_MESSAGE + 1))
    closed = await closed_session(sweep, ws)
    assert closed.code == 1009
    assert (await upstream_closed(emulator, within=3))["close_code"] == 1001
    await wait_for(lambda: not gw.gateway.registry.sessions)


async def raw_beta_session(gw: RunningGateway, token: str) -> RawWebSocket:
    raw = await RawWebSocket.connect(gw.port)
    response = await raw.open(f"/v1/realtime?model={MODEL}", beta_headers(token))
    assert response.status == 101
    return raw


async def test_beta_invalid_utf8_text_is_closed_1007(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens) -> None:
    raw = await raw_beta_session(gw, tokens.mint())
    raw.send_frame(OP_TEXT, b'{"type":"session.update","x":"\xff\xfe"}')
    async with asyncio.timeout(5):
        close = await raw.close_frame()
    raw.abort()
    assert close is not None and close[0] == 1007
    assert (await upstream_closed(emulator, within=3))["close_code"] == 1001
    await wait_for(lambda: not gw.gateway.registry.sessions)


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
async def test_beta_protocol_errors_close_1002(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, case: str) -> None:
    await assert_protocol_error_closes_1002(
        gw, emulator, await raw_beta_session(gw, tokens.mint()), case)


async def test_vanished_upstream_is_upstream_error_1011(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    ws = await open_session(sweep, gw.url(model="fault-drop"), "",
                            additional_headers=beta_headers(tokens.mint()))
    await ws.send('{"type":"input_audio_buffer.clear"}')
    closed = await closed_session(sweep, ws)
    assert closed.code == 1011
    assert closed.errors[-1]["error"]["code"] == "upstream_error"
    await wait_for(lambda: not gw.gateway.registry.sessions)
    assert len(emulator_sessions(emulator)) == 1


async def read_error_code(raw: RawWebSocket) -> str:
    """The code of the next ``error`` event the client is sent (other events skipped)."""
    async with asyncio.timeout(5):
        while True:
            opcode, payload = await raw.read_frame()
            if opcode == OP_TEXT and b'"type":"error"' in payload:
                code: str = json.loads(payload)["error"]["code"]
                return code


async def test_beta_messages_too_costly_to_parse_are_refused_not_parsed(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens) -> None:
    """A beta client's message of many small JSON objects (the shape that stalls a parser on
    the event loop) is refused with an ``error`` event before any parse; the session goes
    on and the upstream never sees it."""
    raw = await raw_beta_session(gw, tokens.mint())
    flood = b'{"type":"conversation.item.create","item":' + b"[{}," * 15_000 + b"{}]}"
    assert len(flood) < MAX_MESSAGE
    raw.send_frame(OP_TEXT, flood)
    assert await read_error_code(raw) == "invalid_request"
    raw.send_frame(OP_TEXT, b'{"type":"input_audio_buffer.clear"}')
    await wait_for(lambda: emulator_sessions(emulator)[-1]["client_events"].get(
        "input_audio_buffer.clear") == 1)
    assert "conversation.item.create" not in emulator_sessions(emulator)[-1]["client_events"]
    raw.abort()


async def test_beta_binary_session_update_goes_through_model_pinning(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens) -> None:
    """A binary frame is a JSON event to parsers that take bytes: one switching the model is
    refused like a text one (``forbidden``) and never reaches the upstream."""
    raw = await raw_beta_session(gw, tokens.mint())
    raw.send_frame(OP_BINARY, b'{"type":"session.update","session":{"model":"gpt-5-pro"}}')
    assert await read_error_code(raw) == "forbidden"
    raw.send_frame(OP_TEXT, b'{"type":"input_audio_buffer.clear"}')
    await wait_for(lambda: emulator_sessions(emulator)[-1]["client_events"].get(
        "input_audio_buffer.clear") == 1)
    assert emulator_sessions(emulator)[-1]["binary_frames"] == 0
    raw.abort()
