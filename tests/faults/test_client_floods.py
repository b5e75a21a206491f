"""Hostile clients after the 101, through a real gateway: floods that grew memory.

The gateway runs in this process, so ``tracemalloc`` sees what it holds; the clients are
raw sockets that write what no library sends and read nothing until told to.  Bounds
are far below what the gateway held before the fixes (numbers in each test).  The same
cases at relay level, with the buffers measured exactly, are in
``tests/test_relay_floods.py``; the frame-sequence fuzz in ``test_frame_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway import relay as relay_module
from gateway.emulator.server import Emulator
from tests.faults.conftest import LeakSweep, Tokens, serve
from tests.faults.proxy import OP_CLOSE, OP_PONG, OP_TEXT, RawWebSocket, encode_frame
from tests.support.emulator import emulator_sessions
from tests.support.gateway import MODEL, RunningGateway, gateway_config, wait_for
from tests.support.relay import traced

MiB = 1024 * 1024
EMPTY_CONTINUATION = bytes((0x00, 0x80, 0, 0, 0, 0))
"""A masked continuation frame with ``fin=0`` and no payload (6 bytes, key 0)."""


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path,
             sweep: LeakSweep) -> AsyncIterator[RunningGateway]:
    """A gateway whose send deadline is 1 s."""
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            server={"send_timeout_seconds": 1, "drain_seconds": 0})
    async with serve(sweep, config) as running:
        yield running


async def raw_session(gw: RunningGateway, tokens: Tokens) -> RawWebSocket:
    raw = await RawWebSocket.connect(gw.port)
    response = await raw.open(f"/v1/realtime?model={MODEL}",
                              {"Authorization": f"Bearer {tokens.mint()}"})
    assert response.status == 101
    return raw


async def write_all(raw: RawWebSocket, data: bytes, chunk: int = 1 << 16) -> None:
    """Write ``data`` a chunk at a time, each drained (so the client holds one chunk);
    stops when the gateway closes the connection."""
    with contextlib.suppress(ConnectionError):
        for pos in range(0, len(data), chunk):
            raw.writer.write(data[pos:pos + chunk])
            await raw.writer.drain()


async def test_a_fragment_flood_is_closed_1009(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    """A text message opened with ``fin=0`` and followed by 500,000 empty continuations
    (3 MB, the issue's case): closed 1009 after 1,024 frames, the upstream 1001.  Before,
    the process grew by about 58 MiB and the session went on."""
    raw = await raw_session(gw, tokens)
    flood = encode_frame(OP_TEXT, b"[", fin=False) + EMPTY_CONTINUATION * 500_000
    try:
        with traced() as peak:
            writer = asyncio.create_task(write_all(raw, flood))
            async with asyncio.timeout(20):
                close = await raw.close_frame()
            held = peak()
        await writer
    finally:
        raw.abort()
    assert close is not None and close[0] == 1009, close
    assert held < 8 * MiB, f"{held / MiB:.1f} MiB traced"
    await wait_for(lambda: emulator_sessions(emulator)[-1]["closed"], within=5)
    await wait_for(lambda: not gw.gateway.registry.sessions, within=5)


async def test_a_ping_flood_from_a_client_that_never_reads_holds_little(
        gw: RunningGateway, tokens: Tokens, sweep: LeakSweep) -> None:
    """200,000 pings of 125 bytes (26 MB, the issue's case) from a client that reads
    nothing: the gateway answers the latest ping of each read and holds little (before:
    a pong per ping, +27 MiB).  Then the client reads: its last ping has its pong."""
    raw = await raw_session(gw, tokens)
    last = b"last" + b"p" * 121
    pings = encode_frame(0x9, b"p" * 125) * 199_999 + encode_frame(0x9, last)
    try:
        with traced() as peak:
            await write_all(raw, pings)
            held = peak()
        assert held < 8 * MiB, f"{held / MiB:.1f} MiB traced"
        async with asyncio.timeout(20):
            while (frame := await raw.read_frame()) != (OP_PONG, last):
                assert frame[0] in (OP_TEXT, OP_PONG), frame  # session.created, pongs
        assert len(gw.gateway.registry.sessions) == 1  # the session goes on
    finally:
        raw.abort()


async def test_a_client_that_never_reads_its_refusals_is_a_slow_consumer(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sends ``session.update`` naming a model it may not use, as fast as it can,
    and reads nothing: once its write buffer is over the mark it is not read any more,
    so the gateway holds that buffer and one read's answers (before: every answer); it
    is blocked without progress, so after the 1 s send deadline the session ends, the
    upstream is closed 1001, and the client, once it reads, finds ``slow_consumer`` and
    close 1008."""
    # The gateway reads (and drops) what a client sends after its close frame for
    # CLOSE_TIMEOUT, then closes; bytes still arriving would reset the connection before
    # this client has read its close.  Give it the time to stop writing.
    monkeypatch.setattr(relay_module, "CLOSE_TIMEOUT", 10.0)
    raw = await raw_session(gw, tokens)
    writer: asyncio.Task[None] | None = None
    updates = encode_frame(OP_TEXT, json.dumps(
        {"type": "session.update", "session": {"model": "gpt-5-pro"}}).encode()) * 400_000
    try:
        with traced() as peak:
            writer = asyncio.create_task(write_all(raw, updates))  # 28 MB
            await wait_for(lambda: emulator_sessions(emulator)[-1]["closed"], within=10)
            held = peak()
        writer.cancel()  # as a client that got its close frame would
        await wait_for(lambda: raw.writer.transport.get_write_buffer_size() == 0)
        assert held < 16 * MiB, f"{held / MiB:.1f} MiB traced"
        errors: list[str] = []
        async with asyncio.timeout(20):
            while (frame := await raw.read_frame())[0] != OP_CLOSE:
                if b'"error"' in frame[1]:
                    errors.append(json.loads(frame[1])["error"]["code"])
        assert int.from_bytes(frame[1][:2], "big") == 1008
        assert set(errors) == {"forbidden", "slow_consumer"} and errors[-1] == "slow_consumer"
        raw.send_frame(OP_CLOSE, frame[1])  # the closing handshake completes
        await wait_for(lambda: not gw.gateway.registry.sessions, within=5)
    finally:
        raw.abort()
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
