"""Policy enforced by a real gateway: the per-replica session cap, the ``Origin`` allow-list
and model pinning (security note §6 cases 18 and 36).

Already proven elsewhere: one refusal per CONTRACT §5 row, including ``Origin:
https://evil.example`` and a faked full replica, for header and subprotocol clients
(``tests/integration/test_session.py::test_every_refusal``); a ``session.update`` naming
another model is refused and not forwarded
(``…::test_session_update_naming_another_model_is_not_forwarded``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

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
)
from tests.support.emulator import emulator_sessions
from tests.support.gateway import MODEL, RunningGateway, gateway_config, wait_for

CAP = 3
ALLOWED_ORIGIN = "https://app.example"
MODELS = {MODEL: {"upstream": "emulator"},
          "alias": {"upstream": "emulator", "upstream_model": MODEL}}


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path,
             sweep: LeakSweep) -> AsyncIterator[RunningGateway]:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, models=MODELS,
                            server={"max_sessions": CAP, "allowed_origins": [ALLOWED_ORIGIN],
                                    "drain_seconds": 0})
    async with serve(sweep, config) as running:
        yield running


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- server.max_sessions ----------------------------------------------------------------------

async def test_replica_cap_answers_503_before_the_upgrade(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 36: with ``server.max_sessions`` live sessions the next upgrade gets HTTP 503
    ``unavailable`` + ``Retry-After`` (4503 for a browser), no 101 and no upstream; the
    gauge stands at the cap; one session ending lets the next one in."""
    live = [await open_session(sweep, gw.url(), tokens.mint()) for _ in range(CAP)]
    assert metric(gw, "realtime_gateway_sessions_active") == CAP
    dialled = emulator.connections
    refusal = await refused(sweep, gw.url(), bearer(tokens.mint()))
    assert (refusal.status, refusal.body["error"]["code"]) == (503, "unavailable")
    assert int(refusal.headers["retry-after"]) >= 1
    async with connect(gw.url(), subprotocols=[
            Subprotocol("realtime"), Subprotocol(f"Bearer-{tokens.mint()}")]) as browser:
        closed = await closed_session(sweep, browser)
    assert (closed.code, closed.errors[0]["error"]["code"]) == (4503, "unavailable")
    assert emulator.connections == dialled
    assert metric(gw, "realtime_gateway_sessions_active") == CAP
    await live[0].close()
    await wait_for(lambda: len(gw.gateway.registry.sessions) == CAP - 1)
    live[0] = await open_session(sweep, gw.url(), tokens.mint())
    for ws in live:
        await ws.close()


async def test_replica_cap_holds_under_a_burst(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 36: 12 upgrades at once against a cap of 3 → exactly 3 sessions, nine 503s
    (handshakes in flight count against the cap), 3 upstream connections."""
    async def attempt(token: str) -> ClientConnection | int:
        try:
            return await open_session(sweep, gw.url(), token)
        except InvalidStatus as exc:
            return exc.response.status_code

    outcomes = await asyncio.gather(*(attempt(tokens.mint()) for _ in range(12)))
    sessions = [o for o in outcomes if isinstance(o, ClientConnection)]
    assert len(sessions) == CAP
    assert sorted(o for o in outcomes if isinstance(o, int)) == [503] * (12 - CAP)
    assert emulator.connections == CAP
    for ws in sessions:
        await ws.close()
    await wait_for(lambda: not gw.gateway.registry.sessions)
    assert metric(gw, "realtime_gateway_sessions_active") == 0


# -- Origin -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("origin", "allowed"), [
    (ALLOWED_ORIGIN, True),
    (None, True),  # native clients send no Origin
    ("https://evil.example", False),
    ("null", False),  # sandboxed iframes, file:// pages
    ("HTTPS://APP.EXAMPLE", False),  # exact match only
    ("https://app.example.evil.example", False),
    ("https://app.example:8443", False),
])
async def test_origin_allow_list(gw: RunningGateway, emulator: Emulator, tokens: Tokens,
                                 sweep: LeakSweep, origin: str | None, allowed: bool) -> None:
    """Case 18: only listed ``Origin`` values (exact) and no ``Origin`` at all pass; any
    other gets 403 ``forbidden`` before an upstream is dialled."""
    headers = bearer(tokens.mint()) | ({"Origin": origin} if origin else {})
    if allowed:
        ws = await open_session(sweep, gw.url(), "", additional_headers=headers)
        await ws.close()
        assert emulator.connections == 1
    else:
        refusal = await refused(sweep, gw.url(), headers)
        assert (refusal.status, refusal.body["error"]["code"]) == (403, "forbidden")
        assert emulator.connections == 0


# -- model pinning ----------------------------------------------------------------------------

async def pinned_session(gw: RunningGateway, tokens: Tokens, sweep: LeakSweep,
                         model: str = MODEL) -> ClientConnection:
    return await open_session(sweep, gw.url(model=model), tokens.mint())


async def next_event(ws: ClientConnection) -> dict[str, object]:
    async with asyncio.timeout(5):
        event: dict[str, object] = json.loads(await ws.recv())
    return event


def forwarded_updates(emulator: Emulator) -> int:
    count: int = emulator_sessions(emulator)[-1]["client_events"].get("session.update", 0)
    return count


@pytest.mark.parametrize("frame", [
    {"type": "session.update", "session": {"type": "realtime", "model": "gpt-5-pro"}},
    {"type": "session.update", "session": {"model": "gpt-realtime-2"}, "event_id": "e1"},
    {"event_id": "e2", "session": {"model": 42}, "type": "session.update"},
    pytest.param({"type": "session.update", "session": {"model": ["gpt-realtime"]}},
                 id="list-model"),
    pytest.param({"type": "session.update", "session": {"model": {"id": "gpt-5-pro"}}},
                 id="object-model"),
    {"type": "session.update", "session": {"model": None, "type": "realtime"}},
])
async def test_session_update_to_another_model_is_refused_and_the_session_goes_on(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep,
        frame: dict[str, object]) -> None:
    """A client ``session.update`` naming a model the tenant may not use (any key order,
    any JSON value) gets an ``error`` event ``forbidden`` and is not forwarded; the session
    keeps relaying.  ``"model": null`` names no model and is forwarded."""
    ws = await pinned_session(gw, tokens, sweep)
    await ws.send(json.dumps(frame, separators=(", ", " : ")))
    event = await next_event(ws)
    if frame["session"] == {"model": None, "type": "realtime"}:
        # names no model: forwarded, and answered (here refused) by the upstream itself
        assert forwarded_updates(emulator) == 1
        assert event["type"] == "session.updated" or \
            event["error"]["type"] != "gateway_error"  # type: ignore[index]
    else:
        sweep.observe("error event", json.dumps(event))
        assert event["type"] == "error"
        assert event["error"]["code"] == "forbidden"  # type: ignore[index]
        assert forwarded_updates(emulator) == 0
    await round_trip(ws)
    await ws.close()


async def test_escaped_session_update_cannot_switch_the_model(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep) -> None:
    """A ``session.update`` whose ``type`` is spelled with a JSON escape is the same event
    for the upstream's JSON parser: it must be pinned too."""
    ws = await pinned_session(gw, tokens, sweep)
    await ws.send('{"type":"session\\u002eupdate","session":{"type":"realtime",'
                  '"model":"gpt-5-pro"}}')
    event = await next_event(ws)
    await ws.close()
    assert event["type"] == "error"
    assert forwarded_updates(emulator) == 0


@pytest.mark.parametrize("frame", [
    # the words appear, but the event is not a session.update
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
     "content": [{"type": "input_text", "text": '"session.update" model gpt-5-pro'}]}},
    # the session's own model: its client-facing name and its upstream name
    {"type": "session.update", "session": {"type": "realtime", "model": "alias"}},
    {"type": "session.update", "session": {"type": "realtime", "model": MODEL}},
])
async def test_pinning_lets_legitimate_events_through(
        gw: RunningGateway, emulator: Emulator, tokens: Tokens, sweep: LeakSweep,
        frame: dict[str, object]) -> None:
    """Pinning refuses nothing else: other events that mention the words, and updates
    naming the session's own model (either name), reach the upstream."""
    ws = await pinned_session(gw, tokens, sweep, model="alias")
    await ws.send(json.dumps(frame))
    event = await next_event(ws)
    assert event["type"] != "error", event
    kind = str(frame["type"])
    await wait_for(lambda: emulator_sessions(emulator)[-1]["client_events"].get(kind) == 1)
    await ws.close()
