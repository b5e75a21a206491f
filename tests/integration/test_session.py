"""End to end through a real gateway to the emulator: SDK sessions, subprotocols,
every refusal of CONTRACT §5 for header and subprotocol clients, closes and expiry."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.emulator.server import Emulator
from tests.support.audio import speech_pcm16
from tests.support.emulator import emulator_sessions
from tests.support.gateway import (
    MODEL,
    RunningGateway,
    gateway_config,
    mint,
    run_gateway,
    wait_for,
)

FAULT_MODELS = {
    MODEL: {"upstream": "emulator"},
    "fault-refuse-500": {"upstream": "emulator"},
    "fault-stall-handshake": {"upstream": "emulator"},
    "fault-close-4000": {"upstream": "emulator"},
    "alias": {"upstream": "emulator", "upstream_model": MODEL},
}


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path) -> AsyncIterator[RunningGateway]:
    config = gateway_config(
        f"{emulator.url}/v1/realtime", key_file, models=FAULT_MODELS, connect_timeout=0.5,
        limits={"max_sessions_per_user": 1},
        server={"allowed_origins": ["https://app.example"]})
    async with run_gateway(config) as running:
        yield running


async def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(gw.metrics_url)).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_openai_sdk_session_relays_speech_byte_exact(
        gw: RunningGateway, emulator: Emulator, key_file: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    audio = speech_pcm16(tmp_path_factory)
    client = AsyncOpenAI(api_key=mint(key_file), websocket_base_url=f"ws://127.0.0.1:{gw.port}/v1")
    seen: list[str] = []
    audio_out = bytearray()
    usage: Any = None
    async with client.realtime.connect(model=MODEL) as conn:
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["audio"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": None}}})
        for start in range(0, len(audio), 960):  # 20 ms chunks
            await conn.input_audio_buffer.append(
                audio=base64.b64encode(audio[start:start + 960]).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        async with asyncio.timeout(20):
            async for event in conn:
                seen.append(event.type)
                if event.type == "response.output_audio.delta":
                    audio_out += base64.b64decode(event.delta)
                if event.type == "response.done":
                    usage = event.response.usage
                    break
    assert seen[0] == "session.created"
    assert "session.updated" in seen
    assert "response.output_audio_transcript.delta" in seen
    assert audio_out and usage is not None and usage.total_tokens > 0
    session = emulator_sessions(emulator)[-1]
    assert session["audio_sha256"] == hashlib.sha256(audio).hexdigest()
    assert session["audio_bytes"] == len(audio)
    # tokens_total counts exactly what the upstream reported, per kind
    await wait_for(lambda: not gw.gateway.registry.sessions)
    details = usage.input_token_details
    assert await metric(gw, "realtime_gateway_tokens_total", kind="input_audio") == \
        details.audio_tokens
    assert await metric(gw, "realtime_gateway_tokens_total", kind="output_audio") == \
        usage.output_token_details.audio_tokens
    assert await metric(gw, "realtime_gateway_sessions_total", outcome="ok") == 1
    assert await metric(gw, "realtime_gateway_sessions_active") == 0


async def relayed_session(ws: ClientConnection) -> None:
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created"
    await ws.send(json.dumps({"type": "session.update",
                              "session": {"type": "realtime", "instructions": "be brief"}}))
    updated = json.loads(await ws.recv())
    assert updated["type"] == "session.updated"


async def test_sole_bearer_subprotocol_is_echoed(gw: RunningGateway, key_file: Path) -> None:
    token = mint(key_file)
    async with connect(gw.url("/language-model-service/ws/v1/open-ai/realtime"),
                       subprotocols=[f"Bearer-{token}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == f"Bearer-{token}"
        await relayed_session(ws)


async def test_realtime_is_echoed_beside_insecure_key(gw: RunningGateway,
                                                      key_file: Path) -> None:
    offers = ["realtime", f"openai-insecure-api-key.{mint(key_file)}"]
    async with connect(gw.url(), subprotocols=offers) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "realtime"
        await relayed_session(ws)


@pytest.mark.parametrize("path", ["/v1/realtime", "/openai/v1/realtime",
                                  "/language-model-service/ws/v1/open-ai/realtime"])
async def test_paths_and_api_key_header(gw: RunningGateway, emulator: Emulator,
                                        key_file: Path, path: str) -> None:
    async with connect(gw.url(path, call_id="rtc_123", api_key="leak"),
                       additional_headers={"api-key": mint(key_file),
                                           "X-Secret": "nope", "User-Agent": "probe/1"}) as ws:
        assert ws.subprotocol is None
        await relayed_session(ws)
    upstream = emulator_sessions(emulator)[-1]
    assert upstream["query"].get("call_id") == "rtc_123"
    assert "api_key" not in upstream["query"]
    assert upstream["auth"] == "bearer"
    assert upstream["user_agent"] == "probe/1"
    assert "x-secret" not in upstream["headers"]
    assert upstream["subprotocols"] == []


async def test_azure_preview_path_uses_deployment_and_model_alias(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    url = f"ws://127.0.0.1:{gw.port}/openai/realtime?api-version=2025-08-28" \
          "&deployment=alias"
    async with connect(url, additional_headers={"api-key": mint(key_file)}) as ws:
        await relayed_session(ws)
    upstream = emulator_sessions(emulator)[-1]
    assert upstream["model"] == MODEL
    assert "api-version" not in upstream["query"]


# -- CONTRACT §5, one case per row, for header clients and subprotocol clients ----------------

async def refused_header_client(url: str, headers: dict[str, str],
                                origin: str | None = None) -> tuple[int, dict[str, Any],
                                                                    dict[str, str]]:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, additional_headers=headers,
                           origin=origin) as ws:  # type: ignore[arg-type]
            await ws.recv()
    response = caught.value.response
    return response.status_code, json.loads(response.body), dict(response.headers)


async def refused_subprotocol_client(url: str, offers: list[str],
                                     origin: str | None = None) -> tuple[int, dict[str, Any]]:
    async with connect(url, subprotocols=offers, origin=origin) as ws:  # type: ignore[arg-type]
        event = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, event


CASES = {
    # name: (code, status, setup) — setup returns (path+query, token or None, origin)
    "no_model": ("invalid_request", 400),
    "no_credentials": ("invalid_request", 401),
    "invalid_token": ("invalid_token", 401),
    "insufficient_scope": ("insufficient_scope", 403),
    "model_not_allowed": ("forbidden", 403),
    "origin_not_allowed": ("forbidden", 403),
    "rate_limited": ("rate_limited", 429),
    "upstream_refused": ("upstream_error", 502),
    "upstream_timeout": ("upstream_timeout", 504),
    "draining": ("unavailable", 503),
    "replica_full": ("unavailable", 503),
}


@pytest.mark.parametrize("carrier", ["header", "subprotocol"])
@pytest.mark.parametrize("case", list(CASES))
async def test_every_refusal(gw: RunningGateway, emulator: Emulator, key_file: Path,
                             case: str, carrier: str) -> None:
    code, status = CASES[case]
    token: str | None = mint(key_file, sub=f"user-{case}")
    url, origin = gw.url(), None
    held: ClientConnection | None = None
    if case == "no_model":
        url = gw.url(model="")
    elif case == "no_credentials":
        token = None
    elif case == "invalid_token":
        token = "not-a-token"
    elif case == "insufficient_scope":
        token = mint(key_file, scope="language-model-service:use-model-extra")
    elif case == "model_not_allowed":
        url = gw.url(model="gpt-not-configured")
    elif case == "origin_not_allowed":
        origin = "https://evil.example"
    elif case == "rate_limited":
        held = await connect(url, additional_headers={"Authorization": f"Bearer {token}"})
    elif case == "upstream_refused":
        url = gw.url(model="fault-refuse-500")
    elif case == "upstream_timeout":
        url = gw.url(model="fault-stall-handshake")
    elif case == "draining":
        gw.gateway.registry.start_drain()
    elif case == "replica_full":
        gw.gateway.registry.authenticated_handshakes = (
            gw.gateway.services.config.server.max_sessions)
    connections_before = emulator.connections
    try:
        if carrier == "header":
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            got_status, body, response_headers = await refused_header_client(url, headers, origin)
            assert got_status == status
            assert body == {"error": {"type": "gateway_error", "code": code,
                                      "message": body["error"]["message"]}}
            if status in (429, 503):
                assert int(response_headers["retry-after"]) >= 1
            if code in ("invalid_token", "insufficient_scope"):
                assert response_headers["www-authenticate"] == f'Bearer error="{code}"'
        else:
            offers = ["realtime"] + ([f"openai-insecure-api-key.{token}"] if token else [])
            close_code, event = await refused_subprotocol_client(url, offers, origin)
            assert close_code == 4000 + status
            assert event["type"] == "error" and event["event_id"].startswith("event_gw_")
            assert event["error"]["type"] == "gateway_error"
            assert event["error"]["code"] == code
        if token:
            assert token not in json.dumps(body if carrier == "header" else event)
    finally:
        if held is not None:
            await held.close()
        gw.gateway.registry.authenticated_handshakes = 0
    if case not in ("upstream_refused", "upstream_timeout", "rate_limited"):
        assert emulator.connections == connections_before  # nothing reached the upstream
    assert await metric(gw, "realtime_gateway_session_rejections_total", code=code) >= 1


# -- closes and session lifetime --------------------------------------------------------------

async def test_upstream_close_code_and_reason_reach_the_client(gw: RunningGateway,
                                                               key_file: Path) -> None:
    async with connect(gw.url(model="fault-close-4000"),
                       additional_headers={"Authorization": f"Bearer {mint(key_file)}"}) as ws:
        await ws.recv()  # session.created
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "emulator close 4000")
    await wait_for(lambda: not gw.gateway.registry.sessions)
    assert await metric(gw, "realtime_gateway_closes_total", initiator="upstream",
                        code="4000") == 1


async def test_token_expiry_closes_4401_within_a_second(gw: RunningGateway,
                                                        key_file: Path) -> None:
    token = mint(key_file, ttl=3)
    exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
    async with connect(gw.url(), subprotocols=[f"Bearer-{token}"]) as ws:  # type: ignore[list-item]
        await relayed_session(ws)
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    events.append(json.loads(await ws.recv()))
        closed_at = time.time()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    assert events[-1]["error"]["code"] == "token_expired"
    assert -0.05 <= closed_at - exp <= 1.0
    await wait_for(lambda: not gw.gateway.registry.sessions)


async def test_vanished_client_leaves_no_upstream_and_no_slot(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    token = mint(key_file, sub="vanishing")  # max_sessions_per_user: 1
    ws = await connect(gw.url(), additional_headers={"Authorization": f"Bearer {token}"})
    await relayed_session(ws)
    ws.transport.abort()  # no close frame, just gone
    await wait_for(lambda: not gw.gateway.registry.sessions)
    await wait_for(lambda: all(s["closed"] for s in emulator_sessions(emulator)))
    assert emulator_sessions(emulator)[-1]["close_code"] == 1001
    async with connect(gw.url(), additional_headers={"Authorization": f"Bearer {token}"}) as again:
        await relayed_session(again)  # the user's only slot was released
    assert await metric(gw, "realtime_gateway_closes_total", initiator="client") >= 1


async def test_max_session_seconds_closes_4408(emulator: Emulator, key_file: Path) -> None:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            limits={"max_session_seconds": 1})
    async with run_gateway(config) as running, connect(
            running.url(), subprotocols=[f"Bearer-{mint(key_file)}"]) as ws:  # type: ignore[list-item]
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    last = json.loads(await ws.recv())
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4408
    assert last["error"]["code"] == "session_expired"


async def test_frames_verbatim_both_ways(emulator: Emulator, key_file: Path) -> None:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            models={"fault-echo": {"upstream": "emulator"}})
    messages: list[str | bytes] = []
    for i in range(40):
        messages.append(("é€" * (i * 700) + f"text {i}") if i % 2 else bytes([i]) * (i * 1229))
    messages.append(b"")
    messages.append("")
    async with run_gateway(config) as running, connect(
            running.url(model="fault-echo"), max_size=None,
            additional_headers={"Authorization": f"Bearer {mint(key_file)}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        for message in messages:
            await ws.send(message)
        received = []
        async with asyncio.timeout(10):
            for _ in messages:
                received.append(await ws.recv())
    assert received == messages
    assert [type(m) for m in received] == [type(m) for m in messages]


async def test_health_and_readiness(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        gw.gateway.registry.start_drain()
        draining = await client.get("/readyz")
        assert draining.status_code == 503 and draining.json()["checks"]["draining"] is True
        assert (await client.get("/metrics")).status_code == 404  # metrics port only
    async with httpx.AsyncClient() as client:
        text = (await client.get(gw.metrics_url)).text
    assert "realtime_gateway_draining 1.0" in text
    assert 'realtime_gateway_build_info{version="' in text


async def test_session_update_naming_another_model_is_not_forwarded(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    async with connect(gw.url(model="alias"),
                       additional_headers={"Authorization": f"Bearer {mint(key_file)}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update",
                                  "session": {"type": "realtime", "model": "gpt-5-pro"}}))
        refused = json.loads(await ws.recv())
        assert refused["type"] == "error" and refused["error"]["code"] == "forbidden"
        for allowed in ("alias", MODEL):  # its client-facing name and its upstream name
            await ws.send(json.dumps({"type": "session.update",
                                      "session": {"type": "realtime", "model": allowed}}))
            updated = json.loads(await ws.recv())
            assert updated["type"] == "session.updated"
    upstream = emulator_sessions(emulator)[-1]
    assert upstream["client_events"]["session.update"] == 2  # the refused one never arrived


async def test_trickled_handshake_is_cut_by_the_pre_accept_deadline(
        emulator: Emulator, key_file: Path) -> None:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            server={"handshake_timeout_seconds": 1})
    request = (b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: gw\r\n"
               b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
    async with run_gateway(config) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        async with asyncio.timeout(5):
            while not reader.at_eof() and sent < len(request):
                writer.write(request[sent:sent + 1])
                sent += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25):  # the trickle: one byte per 0.25 s
                        await reader.read(1)
        cut_after = loop.time() - started
        writer.close()
    assert sent < len(request)
    assert 0.9 <= cut_after <= 1.6
