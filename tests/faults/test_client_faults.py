"""Client faults and hostile client input through a real gateway.

Security note §6 cases 2, 4 and 30-35.  Where the fault is on the network (a client
that vanishes without FIN, a trickled handshake) it is produced for real: by the fault
proxy between client and gateway, or by a hand-written client on a raw socket that
sends what no library sends (unmasked frames, reserved bits, invalid UTF-8, oversize
headers, a credential in each of two header lines).

Already proven elsewhere: a client that aborts its TCP connection after a session
(``tests/integration/test_session.py::test_vanished_client_leaves_no_upstream_and_no_slot``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection

from gateway.beta_relay import BetaRelay
from gateway.emulator.server import Emulator
from gateway.relay import Relay
from gateway.session import RelayedSession
from tests.faults.conftest import (
    LeakSweep,
    Tokens,
    closed_session,
    metric,
    open_session,
    refused,
    round_trip,
    rss_bytes,
    serve,
)
from tests.faults.proxy import (
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FaultProxy,
    RawWebSocket,
    ScriptedUpstream,
    reset,
)
from tests.support.emulator import emulator_sessions
from tests.support.gateway import MODEL, RunningGateway, gateway_config, wait_for

MAX_MESSAGE = 64 * 1024
MODELS = {MODEL: {"upstream": "emulator"}, "fault-echo": {"upstream": "emulator"}}


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path,
             sweep: LeakSweep) -> AsyncIterator[RunningGateway]:
    """A gateway with small limits: 64 KiB messages, one session per user, 0.2 s pings."""
    config = gateway_config(
        f"{emulator.url}/v1/realtime", key_file, models=MODELS,
        limits={"max_sessions_per_user": 1},
        server={"max_message_bytes": MAX_MESSAGE, "ping_interval_seconds": 0.2,
                "ping_timeout_seconds": 0.2, "handshake_timeout_seconds": 2,
                "drain_seconds": 0})
    async with serve(sweep, config) as running:
        yield running


async def upstream_closed(emulator: Emulator, within: float) -> dict[str, object]:
    """Wait for the emulator's last session to be closed; its record."""
    await wait_for(lambda: emulator_sessions(emulator)[-1]["closed"], within=within)
    return emulator_sessions(emulator)[-1]


# -- a client that goes away ------------------------------------------------------------------

async def test_client_vanishing_without_fin_is_found_by_pings(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 30: the client stops answering (no FIN, no RST, no close frame): the gateway's
    keepalive (0.2 s ping, 0.2 s timeout) ends the session and closes the upstream 1001."""
    token = tokens.mint()
    async with FaultProxy(("127.0.0.1", gw.port)) as proxy:
        ws = await open_session(sweep, f"ws://127.0.0.1:{proxy.port}/v1/realtime?model={MODEL}",
                                token, ping_interval=None)
        await round_trip(ws)
        proxy.black_hole()  # from here the client is silent: TCP stays up, nothing answers
        vanished = time.monotonic()
        record = await upstream_closed(emulator, within=3)
        elapsed = time.monotonic() - vanished
        ws.transport.abort()
    assert record["close_code"] == 1001
    assert elapsed < 1.0, f"upstream closed {elapsed:.2f} s after the client vanished"
    await wait_for(lambda: not gw.gateway.registry.sessions)
    assert metric(gw, "realtime_gateway_sessions_active") == 0
    # the user's only slot is free again
    again = await open_session(sweep, gw.url(), token)
    await again.close()


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_fin_or_rst_without_close_frame(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep,
        how: str) -> None:
    """Case 31: FIN (half-close) or RST with no close frame → upstream closed within 1 s."""
    ws = await open_session(sweep, gw.url(), tokens.mint(), ping_interval=None)
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


@pytest.mark.parametrize(("code", "label"), [(1000, "1000"), (3999, "other"), (4401, "4401"),
                                             (4999, "other")])
async def test_closes_total_labels_only_known_close_codes(
        gw: RunningGateway, tokens: Tokens, sweep: LeakSweep, code: int, label: str) -> None:
    """A client may close with any of ~4,000 codes: only the protocol's and the gateway's
    get a ``closes_total`` series of their own, the rest are ``other``."""
    ws = await open_session(sweep, gw.url(), tokens.mint())
    await round_trip(ws)
    await ws.close(code, "bye")
    await wait_for(lambda: not gw.gateway.registry.sessions)
    await wait_for(lambda: metric(gw, "realtime_gateway_closes_total", initiator="client") == 1)
    assert metric(gw, "realtime_gateway_closes_total", initiator="client", code=label) == 1
    assert metric(gw, "realtime_gateway_closes_total", code=str(code)) == (label != "other")


# -- a client that stops reading --------------------------------------------------------------

FLOOD_FRAME = 64 * 1024
FLOOD_LIMIT = 4000  # 250 MiB if nothing pushed back


class Flood:
    """An upstream that sends ``session.created`` then 64 KiB binary frames as fast as the
    gateway takes them (at most :data:`FLOOD_LIMIT`)."""

    def __init__(self) -> None:
        self.sent = 0
        self.close_code: int | None = None

    async def __call__(self, connection: ServerConnection) -> None:
        try:
            await connection.send(json.dumps({"type": "session.created", "session": {}}))
            frame = bytes(FLOOD_FRAME)
            for _ in range(FLOOD_LIMIT):
                await connection.send(frame)
                self.sent += 1
        finally:
            await connection.wait_closed()
            self.close_code = connection.close_code


async def test_client_that_stops_reading_holds_bounded_memory(
        key_file: Path, tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 32, memory: the upstream floods 64 KiB frames, the client reads nothing.  The
    relay stops taking frames from the upstream once the client's socket is full (it
    buffers nothing of its own): what the upstream got rid of stays at a few MiB while it
    would send 250 MiB, and stays there; RSS does not follow the flood."""
    flood = Flood()
    async with ScriptedUpstream(flood) as upstream:
        config = gateway_config(upstream.url, key_file, server={"drain_seconds": 0})
        async with serve(sweep, config) as gw:
            rss_before = rss_bytes()
            ws = await open_session(sweep, gw.url(), tokens.mint(), ping_interval=None,
                                    max_queue=4)
            try:
                blocked_at = await settled(flood)
                assert blocked_at * FLOOD_FRAME < 64 * 1024 * 1024, f"{blocked_at} frames"
                assert all(relay.sending_to_client for relay in relays(gw))
                assert rss_bytes() - rss_before < 128 * 1024 * 1024
            finally:
                ws.transport.abort()
            await wait_for(lambda: not gw.gateway.registry.sessions, within=5)
            await wait_for(lambda: flood.close_code is not None, within=5)


async def settled(flood: Flood) -> int:
    """Wait (at most 10 s) until the flood has sent nothing more for 1 s; its frame count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    last, since = flood.sent, loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.05)  # poll interval
        if flood.sent != last:
            last, since = flood.sent, loop.time()
        elif loop.time() - since >= 1.0:
            return last
    raise AssertionError(f"the upstream kept sending: {flood.sent} frames")


async def test_client_that_stops_reading_is_closed_as_a_slow_consumer(
        key_file: Path, tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 32, deadline: after ``server.send_timeout_seconds`` (1 s) without progress the
    session ends: the upstream is closed 1001 and released at once, and the client, once
    it reads, finds ``slow_consumer`` and close 1008."""
    flood = Flood()
    async with ScriptedUpstream(flood) as upstream:
        config = gateway_config(upstream.url, key_file, server={"send_timeout_seconds": 1,
                                                                "drain_seconds": 0})
        async with serve(sweep, config) as gw:
            ws = await open_session(sweep, gw.url(), tokens.mint(), ping_interval=None,
                                    max_queue=4)
            try:
                await assert_slow_consumer_closed(gw, ws, flood, sweep)
            finally:
                ws.transport.abort()  # unblocks a gateway stuck sending to this client


def relays(gw: RunningGateway) -> list[Relay | BetaRelay]:
    """The relays of the gateway's live WebSocket sessions."""
    return [s.relay for s in gw.gateway.registry.sessions if isinstance(s, RelayedSession)]


async def assert_slow_consumer_closed(gw: RunningGateway, ws: ClientConnection, flood: Flood,
                                      sweep: LeakSweep) -> None:
    await wait_for(lambda: any(relay.sending_to_client for relay in relays(gw)), within=5)
    # send deadline 1 s, checked once a second: the upstream is released within ~3 s
    await wait_for(lambda: flood.close_code is not None, within=4)
    assert flood.close_code == 1001
    await wait_for(lambda: not gw.gateway.registry.sessions, within=2)
    closed = await closed_session(sweep, ws, within=20)
    assert (closed.code, closed.errors[-1]["error"]["code"]) == (1008, "slow_consumer")
    assert metric(gw, "realtime_gateway_sessions_active") == 0


# -- hostile frames ---------------------------------------------------------------------------

async def raw_session(gw: RunningGateway, token: str, model: str = MODEL) -> RawWebSocket:
    raw = await RawWebSocket.connect(gw.port)
    response = await raw.open(f"/v1/realtime?model={model}", {"Authorization": f"Bearer {token}"})
    assert response.status == 101
    return raw


async def test_message_over_the_cap_is_closed_1009(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 33: ``server.max_message_bytes`` passes; one byte more closes 1009, the upstream
    1001.  (A deflate bomb cannot be sent: permessage-deflate is never negotiated, and a
    compressed frame is refused 1002 by ``test_protocol_errors_close_1002``.)"""
    ws = await open_session(sweep, gw.url(model="fault-echo"), tokens.mint(), max_size=None)
    await ws.send(bytes(MAX_MESSAGE))
    async with asyncio.timeout(5):
        assert await ws.recv() == bytes(MAX_MESSAGE)  # exactly the cap is relayed
    await ws.send(bytes(MAX_MESSAGE + 1))
    closed = await closed_session(sweep, ws)
    assert closed.code == 1009
    record = await upstream_closed(emulator, within=3)
    assert record["close_code"] == 1001
    await wait_for(lambda: not gw.gateway.registry.sessions)


async def test_invalid_utf8_text_is_closed_1007(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens) -> None:
    """Case 34: a text frame that is not UTF-8 → 1007; the upstream is closed."""
    raw = await raw_session(gw, tokens.mint())
    raw.send_frame(OP_TEXT, b'{"type":"session.update","x":"\xff\xfe"}')
    async with asyncio.timeout(5):
        close = await raw.close_frame()
    raw.abort()
    assert close is not None and close[0] == 1007
    assert (await upstream_closed(emulator, within=3))["close_code"] == 1001
    await wait_for(lambda: not gw.gateway.registry.sessions)


PROTOCOL_ERRORS = {
    "unmasked": dict(opcode=OP_TEXT, payload=b"{}", mask=False),
    "rsv1_without_deflate": dict(opcode=OP_TEXT, payload=b"{}", rsv=4),
    "rsv3": dict(opcode=OP_BINARY, payload=b"x", rsv=1),
    "reserved_opcode": dict(opcode=0x3, payload=b"x"),
    "reserved_control_opcode": dict(opcode=0xB, payload=b""),
    "fragmented_ping": dict(opcode=OP_PING, payload=b"p", fin=False),
    "oversized_ping": dict(opcode=OP_PING, payload=b"p" * 126),
    "continuation_first": dict(opcode=OP_CONT, payload=b"x"),
}


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
async def test_protocol_errors_close_1002(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, case: str) -> None:
    """Case 34: frames RFC 6455 forbids → 1002; the upstream is closed, the slot freed."""
    await assert_protocol_error_closes_1002(gw, emulator, await raw_session(gw, tokens.mint()),
                                            case)


async def assert_protocol_error_closes_1002(gw: RunningGateway, emulator: Emulator,
                                            raw: RawWebSocket, case: str) -> None:
    """Send ``raw`` the forbidden frame ``PROTOCOL_ERRORS[case]``: it is closed 1002, the
    upstream 1001, and no session is left (GA and beta sessions alike)."""
    frame = PROTOCOL_ERRORS[case]
    raw.send_frame(frame["opcode"], frame["payload"],  # type: ignore[arg-type]
                   fin=frame.get("fin", True), rsv=frame.get("rsv", 0),  # type: ignore[arg-type]
                   mask=frame.get("mask", True))  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        close = await raw.close_frame()
    raw.abort()
    assert close is not None and close[0] == 1002, close
    assert (await upstream_closed(emulator, within=3))["close_code"] == 1001
    await wait_for(lambda: not gw.gateway.registry.sessions)
    assert metric(gw, "realtime_gateway_sessions_active") == 0


# -- a trickled handshake ---------------------------------------------------------------------

async def test_handshake_trickled_one_byte_a_second_is_cut(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens) -> None:
    """Case 35: an upgrade request sent at 1 B/s is cut by the pre-accept deadline
    (``server.handshake_timeout_seconds``, 2 s here), before it completes; no upstream."""
    raw = await RawWebSocket.connect(gw.port)
    request = raw.upgrade_request(f"/v1/realtime?model={MODEL}",
                                  {"Authorization": f"Bearer {tokens.mint()}"})
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2 + 1.5):  # the deadline plus scheduling slack
            await raw.trickle(request, seconds_per_byte=1.0)
    elapsed = time.monotonic() - started
    cut = raw.reader.at_eof()
    raw.abort()
    assert cut, f"still connected after {elapsed:.1f} s of trickling"
    assert emulator.connections == 0
    # an honest client is not affected
    async with connect(gw.url(), additional_headers={
            "Authorization": f"Bearer {tokens.mint()}"}) as ws:
        await ws.recv()


# -- oversize upgrade requests ----------------------------------------------------------------

async def test_oversize_upgrade_requests_are_answered_or_closed(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens) -> None:
    """Case 4: upgrade requests whose headers are too large (a header line over the 64 KiB
    request-head cap; the head over it in many lines; 129 header fields) get a 4xx answer
    or are closed within the pre-accept deadline (2 s here); they are never held open,
    and no upstream is dialled."""
    cases = {
        "header line over 64 KiB": {"Authorization": "Bearer " + "x" * (70 * 1024)},
        "head over 64 KiB": {"Authorization": f"Bearer {tokens.mint()}",
                             **{f"X-Filler-{i}": "y" * 1000 for i in range(100)}},
        "129 header fields": {"Authorization": f"Bearer {tokens.mint()}",
                              **{f"X-Filler-{i}": "y" for i in range(129)}},
    }
    outcomes = await asyncio.gather(*(answered_or_closed(gw, headers)
                                      for headers in cases.values()))
    held = [name for name, ended in zip(cases, outcomes, strict=True) if not ended]
    assert not held, f"held open without an answer: {held}"
    assert emulator.connections == 0


@pytest.mark.parametrize(("size", "code", "message"), [
    (12 * 1024, "invalid_token", "the access token is invalid"),
    (20 * 1024, "invalid_request", "the credential is malformed")])
async def test_long_credentials_get_the_gateways_own_answer(
        gw: RunningGateway, emulator: Emulator, sweep: LeakSweep, size: int, code: str,
        message: str) -> None:
    """A credential longer than the HTTP parsers' usual 8 KiB line limit is answered as
    CONTRACT §5 says, not with a parser's plain-text 431: 401 JSON in ``Authorization``,
    an ``error`` event and 4401 in a ``Bearer-`` subprotocol (a browser reads no status).
    Over the 16 KiB token cap it is the gateway's malformed-credential answer."""
    junk = sweep.secret("x" * size)
    answer = await refused(sweep, gw.url(), {"Authorization": f"Bearer {junk}"})
    assert answer.status == 401
    assert answer.body["error"]["code"] == code
    assert answer.body["error"]["message"] == message
    async with asyncio.timeout(10), connect(
            gw.url(), subprotocols=["realtime", f"Bearer-{junk}"]) as ws:  # type: ignore[list-item]
        event = json.loads(await ws.recv())
        await ws.wait_closed()
    assert event["type"] == "error"
    assert event["error"]["code"] == code
    assert event["error"]["message"] == message
    assert ws.close_code == 4401
    assert emulator.connections == 0


async def answered_or_closed(gw: RunningGateway, headers: dict[str, str]) -> bool:
    """Send an upgrade request; True if a 4xx answer or a close comes within 2 + 1.5 s."""
    raw = await RawWebSocket.connect(gw.port)
    raw.writer.write(raw.upgrade_request(f"/v1/realtime?model={MODEL}", headers))
    answer = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2 + 1.5):
            answer = await raw.reader.read(65536)
    ended = raw.reader.at_eof() or answer.startswith(b"HTTP/1.1 4")
    raw.abort()
    return ended


# -- two credentials --------------------------------------------------------------------------

@pytest.mark.parametrize("second_header", ["Sec-WebSocket-Protocol", "sec-websocket-protocol"])
async def test_two_bearer_offers_across_two_headers_are_refused(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep,
        second_header: str) -> None:
    """Case 2: one ``Bearer-`` offer in each of two ``Sec-WebSocket-Protocol`` header lines
    (the server joins them) → ``invalid_request``, delivered to a browser as an ``error``
    event and close 4400; no upstream is dialled, neither token is echoed."""
    first, second = tokens.mint(), tokens.mint()
    raw = await RawWebSocket.connect(gw.port)
    request = raw.upgrade_request(f"/v1/realtime?model={MODEL}", {
        "Sec-WebSocket-Protocol": f"realtime, Bearer-{first}"})
    extra = f"{second_header}: Bearer-{second}\r\n\r\n".encode()
    raw.writer.write(request[:-2] + extra)
    head = await raw.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    assert first.encode() not in head and second.encode() not in head
    async with asyncio.timeout(5):
        opcode, payload = await raw.read_frame()
        close = await raw.close_frame()
    raw.abort()
    sweep.observe("error event", payload.decode())
    assert opcode == OP_TEXT
    assert json.loads(payload)["error"]["code"] == "invalid_request"
    assert close is not None and close[0] == 4400
    assert emulator.connections == 0
