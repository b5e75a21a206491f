"""The log and label sweep (security note §6 case 40).

The sweep itself is the autouse fixture of ``tests/faults/conftest.py``: every test in
this directory runs with DEBUG logging and ends with a search for credentials in logs,
close reasons, ``error`` events, response headers and bodies, and metric labels.  The
tests here prove that the sweep can fail (it finds what it must find), that it really
sees the DEBUG header dumps of uvicorn and websockets for every credential carrier, and
that refusals leave no error or traceback in the log.

Already proven elsewhere: the same for a gateway process started with ``--log-level
debug`` (``tests/integration/test_process.py::test_debug_logs_hold_no_credential``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from gateway.emulator.server import Emulator
from gateway.logs import Redactor
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
from tests.support.gateway import UPSTREAM_KEY, RunningGateway, gateway_config


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path,
             sweep: LeakSweep) -> AsyncIterator[RunningGateway]:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            server={"drain_seconds": 0})
    async with serve(sweep, config) as running:
        yield running


def test_the_sweep_finds_what_it_must(tokens: Tokens) -> None:
    """A sweep over planted text: every kind of leak is found, redacted text and the
    audit field are not."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stream:
        probe = LeakSweep(stream)
        token = Tokens(tokens.key_file, probe).mint("sub-canary-probe")
        header, claims, signature = token.split(".")
        redacted = Redactor([UPSTREAM_KEY]).text
        clean = [
            redacted(f"Authorization: Bearer {token}"),
            redacted(f"Sec-WebSocket-Protocol: realtime, Bearer-{token}"),
            redacted(f"> Authorization: Bearer {UPSTREAM_KEY}"),
            json.dumps({"event": "session.start", "subject": "sub-canary-probe"}),
        ]
        leaks = {
            "token": token,
            "header and claims": f"{header}.{claims}",
            "claims segment": f"claims={claims}",
            "signature segment": f"sig {signature} end",
            "upstream key": f"key {UPSTREAM_KEY}",
            "bearer subprotocol": "Sec-WebSocket-Protocol: Bearer-abc",
            "insecure key subprotocol": "openai-insecure-api-key.abc",
            "query credential": "GET /v1/realtime?access_token=abc",
            "query api-key": "GET /openai/realtime?deployment=d&api-key=abc",
            "query authorization": "GET /openai/realtime?Authorization=Bearer+abc",
            "subject outside the audit field": '{"event": "x", "user": "sub-canary-probe"}',
            "canary claim": next(c for c in probe.canaries if c.startswith("claim-canary-")),
        }
        for line in clean:
            stream.write(line + "\n")
        assert probe.findings() == [], "redacted text or the audit field was flagged"
        for name, text in leaks.items():
            probe.observe(name, text)
        found = probe.findings()
        for name in leaks:
            assert any(f.startswith(f"{name}:") for f in found), f"missed: {name}"
        assert token not in "\n".join(found)


async def test_debug_header_dumps_of_every_carrier_are_swept(
        gw: RunningGateway, tokens: Tokens, sweep: LeakSweep) -> None:
    """Sessions and refusals with each CONTRACT §4 carrier: uvicorn's and websockets'
    DEBUG dumps of the upgrade request (both directions, upstream included) are in the
    log, with every credential masked; the sweep at teardown checks the rest."""
    carriers: list[dict[str, Any]] = [
        {"additional_headers": {"Authorization": f"Bearer {tokens.mint()}"}},
        {"additional_headers": {"api-key": tokens.mint()}},
        {"subprotocols": [Subprotocol("realtime"), Subprotocol(f"Bearer-{tokens.mint()}")]},
        {"subprotocols": [Subprotocol(f"Bearer-{tokens.mint()}")]},
        {"subprotocols": [Subprotocol("realtime"),
                          Subprotocol(f"openai-insecure-api-key.{tokens.mint()}")]},
    ]
    for kwargs in carriers:
        ws = await open_session(sweep, gw.url(), "", **kwargs)
        await round_trip(ws)
        await ws.close()
    # refusals: a header client (HTTP 403 for a model it may not use) and a browser (4401)
    await refused(sweep, gw.url(model="not-allowed"),
                  {"Authorization": f"Bearer {tokens.mint()}"})
    async with connect(gw.url(), subprotocols=[
            Subprotocol("realtime"), Subprotocol("Bearer-not.a.token")]) as ws:
        closed = await closed_session(sweep, ws)
    assert closed.code == 4401
    debug = [r for r in sweep.log_records() if r.get("level") == "debug"]
    dumps = "\n".join(str(r.get("event")) for r in debug).lower()
    for seen in ("< authorization: [redacted]", "< api-key: [redacted]",
                 "< sec-websocket-protocol: realtime, bearer-[redacted]",
                 "< sec-websocket-protocol: bearer-[redacted]",
                 "< sec-websocket-protocol: realtime, openai-insecure-api-key.[redacted]",
                 "> sec-websocket-protocol: bearer-[redacted]",  # the 101's echo
                 "> authorization: [redacted]"):  # the gateway's own upstream dial
        assert seen in dumps, seen
    assert metric(gw, "realtime_gateway_session_rejections_total") == 2


async def test_refusals_log_no_error_and_no_traceback(
        gw: RunningGateway, tokens: Tokens, sweep: LeakSweep) -> None:
    """Case 4: refused upgrades (malformed, garbage, unknown-model, no-credential) are
    logged as ``session.rejected`` at INFO, with no ERROR record and no traceback."""
    for model, headers in ((None, {"Authorization": "Bearer not-a-jwt"}),
                           (None, {"Authorization": "Bearer " + "A" * 7000}),
                           ("not-allowed", {"Authorization": f"Bearer {tokens.mint()}"}),
                           (None, {})):
        await refused(sweep, gw.url(model=model) if model else gw.url(), headers)
    records = sweep.log_records()
    assert len([r for r in records if r.get("event") == "session.rejected"]) == 4
    assert not [r for r in records if "exception" in r or "Traceback" in json.dumps(r)]
    errors = [r["event"] for r in records if r.get("level") in ("error", "critical")]
    assert errors == []


async def test_client_secrets_reach_no_log_line_at_debug(
        emulator: Emulator, key_file: Path, tokens: Tokens, sweep: LeakSweep) -> None:
    """CONTRACT §8: a minted ``ek_`` (and the key that signs it) is in no log line, header
    dump, event or metric — minted, used in every carrier, and refused when tampered."""
    import httpx

    from tests.support.gateway import SECRET_KEY

    sweep.secret(SECRET_KEY)
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            server={"drain_seconds": 0}, secret_keys=SECRET_KEY)
    async with serve(sweep, config) as gw:
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{gw.http}/v1/realtime/client_secrets", json={},
                                       headers={"Authorization": f"Bearer {tokens.mint()}"})
        assert answer.status_code == 200
        secret = sweep.secret(answer.json()["value"])
        for kwargs in ({"additional_headers": {"Authorization": f"Bearer {secret}"}},
                       {"additional_headers": {"api-key": secret}},
                       {"subprotocols": [Subprotocol("realtime"),
                                         Subprotocol(f"openai-insecure-api-key.{secret}")]},
                       {"subprotocols": [Subprotocol(f"Bearer-{secret}")]}):
            ws = await open_session(sweep, gw.url(), "", **kwargs)
            await round_trip(ws)
            await ws.close()
        tampered = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
        async with connect(gw.url(), subprotocols=[
                Subprotocol("realtime"), Subprotocol(f"openai-insecure-api-key.{tampered}")]) as ws:
            closed = await closed_session(sweep, ws)
        assert closed.code == 4401
    text = sweep.log_text
    assert "ek_" not in text.replace("ek_[REDACTED]", "")  # the prefix alone never leaks more
    assert "openai-insecure-api-key.[redacted]" in text.lower()  # the dumps were there


async def test_query_credentials_leave_no_token_and_no_query_in_the_log(
        gw: RunningGateway, tokens: Tokens, sweep: LeakSweep) -> None:
    """Azure browser clients (CONTRACT §4): ``api-key=`` and ``Authorization=Bearer`` in the
    query, beta sessions and in-band refusals, all at DEBUG: uvicorn's ``"WebSocket …"``
    lines and the DEBUG request lines are in the log, each with the path and no query
    (no ``api-version``, no client request id); the sweep at teardown checks the tokens."""
    base = f"ws://127.0.0.1:{gw.port}/openai/realtime?api-version=2024-10-01-preview" \
           "&x-ms-client-request-id=canary-request-id&deployment=gpt-realtime"
    for credential in (f"api-key={tokens.mint()}",
                       f"Authorization=Bearer+{tokens.mint()}",
                       f"Authorization=Bearer%20{tokens.mint()}"):
        ws = await open_session(sweep, f"{base}&{credential}", "", additional_headers={})
        await ws.close()
    async with connect(f"{base}&api-key=not.a.token") as ws:  # refused in band
        closed = await closed_session(sweep, ws)
    assert closed.code == 4401
    async with connect(f"{base}&api-key={tokens.mint(scope='other')}") as ws:
        closed = await closed_session(sweep, ws)
    assert closed.code == 4403
    log = sweep.log_text
    lines = [line for line in log.splitlines() if "/openai/realtime" in line]
    assert any('\\"WebSocket /openai/realtime\\"' in line for line in lines), lines[:5]
    assert any("GET /openai/realtime HTTP/1.1" in line for line in lines), lines[:5]
    for leaked in ("api-version", "x-ms-client-request-id", "canary-request-id", "api-key=",
                   "Authorization=", "/openai/realtime?"):
        assert leaked not in log, leaked
    assert metric(gw, "realtime_gateway_protocol_sessions_total", protocol="beta") == 3
