"""The emulator's WebRTC calls (gateway.emulator.webrtc) with a real aiortc caller on loopback:
the SDP answer, the ``oai-events`` data channel, audio both ways, the sideband socket and
hang-up."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.emulator.server import Emulator
from tests.integration.test_cli import command, free_port, read_until
from tests.support.audio import silence_pcm16, tone_pcm16
from tests.support.webrtc import Caller

KEY = "emulator-test-key-0123456789"
SPEECH = tone_pcm16(900) + silence_pcm16(1200)


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator(api_key=KEY, webrtc=True, loopback_ice=True) as emu:
        yield emu


async def _call(emulator: Emulator, caller: Caller, session: dict[str, object]) -> str:
    offer = await caller.offer()
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(
            emulator.calls_url, headers={"Authorization": f"Bearer {KEY}"},
            files={"sdp": (None, offer, "application/sdp"),
                   "session": (None, json.dumps(session), "application/json")})
    assert answer.status_code == 201, answer.text
    assert answer.headers["content-type"].startswith("application/sdp")
    location = answer.headers["location"]
    assert location.startswith("/v1/realtime/calls/rtc_")
    await caller.answer(answer.text)
    return location.rsplit("/", 1)[1]


async def test_call_answers_speech_on_track_and_channel_and_mirrors_to_sideband(
        emulator: Emulator) -> None:
    caller = Caller(SPEECH)
    try:
        call_id = await _call(emulator, caller, {"type": "realtime", "model": "gpt-realtime"})
        url = emulator.url + f"/v1/realtime?call_id={call_id}"
        async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as side:
            first = json.loads(await side.recv())
            assert first["type"] == "session.created"
            await caller.wait_for_event("session.created")
            caller.microphone.speak.set()
            done = await caller.wait_for_event("response.done")
            assert done["response"]["usage"]["total_tokens"] > 0
            seen = []
            async for message in side:
                seen.append(json.loads(message)["type"])
                if seen[-1] == "response.done":
                    break
            assert "input_audio_buffer.speech_started" in seen
            assert "response.output_audio_transcript.delta" in seen
            types = caller.types()
            assert "output_audio_buffer.started" in types
            assert "response.output_audio.delta" not in types  # audio goes on the track
            async with httpx.AsyncClient(timeout=10) as http:
                hangup = await http.post(f"{emulator.calls_url}/{call_id}/hangup",
                                         headers={"Authorization": f"Bearer {KEY}"})
                again = await http.post(f"{emulator.calls_url}/{call_id}/hangup",
                                        headers={"Authorization": f"Bearer {KEY}"})
            assert hangup.status_code == 200
            assert again.status_code == 404
            assert again.json()["error"]["code"] == "call_id_not_found"
            async for _ in side:  # the sideband ends with the call
                pass
            assert side.close_code == 1000
        [record] = emulator.calls()
        assert record.id == call_id
        assert record.audio_bytes > 0  # the caller's audio, decoded and hashed
        assert record.usage["responses"] >= 1
        assert record.sidebands == 1
        assert (record.closed, record.close_initiator, record.hangups) == (True, "hangup", 1)
    finally:
        await caller.close()


async def test_call_refusals_and_unknown_sideband(emulator: Emulator) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        no_key = await http.post(emulator.calls_url, content=b"v=0\r\n",
                                 headers={"Content-Type": "application/sdp"})
        not_sdp = await http.post(emulator.calls_url, content=b"hello",
                                  headers={"Content-Type": "application/sdp",
                                           "Authorization": f"Bearer {KEY}"})
    assert no_key.status_code == 401
    assert not_sdp.status_code == 400
    with pytest.raises(InvalidStatus) as refused:
        async with connect(emulator.url + "/v1/realtime?call_id=rtc_unknown",
                           additional_headers={"Authorization": f"Bearer {KEY}"}):
            pass
    assert refused.value.response.status_code == 404


async def test_call_fault_no_sideband_refuses_the_sideband(emulator: Emulator) -> None:
    caller = Caller(b"")
    try:
        call_id = await _call(emulator, caller, {"type": "realtime",
                                                 "model": "gpt-realtime,fault-no-sideband"})
        with pytest.raises(InvalidStatus) as refused:
            async with connect(emulator.url + f"/v1/realtime?call_id={call_id}",
                               additional_headers={"Authorization": f"Bearer {KEY}"}):
                pass
        assert refused.value.response.status_code == 404
    finally:
        await caller.close()


async def test_calls_port_answers_cors_preflight(emulator: Emulator) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        preflight = await http.options(emulator.calls_url, headers={
            "Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://127.0.0.1:1")


async def test_emulator_command_answers_calls_with_webrtc() -> None:
    port, calls_port = free_port(), free_port()
    caller = Caller(b"")
    # No candidates in the offer: neither peer sends a connectivity check (the emulator
    # command's ICE is not restricted to loopback).
    offer = "".join(line for line in (await caller.offer()).splitlines(keepends=True)
                    if not line.startswith("a=candidate"))
    await caller.close()
    async with command("emulator", "--port", str(port), "--webrtc", "--calls-port",
                       str(calls_port), env={"EMULATOR_API_KEY": KEY}) as process:
        await read_until(process, r"answering WebRTC calls at http://127\.0\.0\.1:\d+/")
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"http://127.0.0.1:{calls_port}/v1/realtime/calls"
            answer = await http.post(url, content=offer.encode(), headers={
                "Authorization": f"Bearer {KEY}", "Content-Type": "application/sdp"})
            assert answer.status_code == 201, answer.text
            call_id = answer.headers["location"].rsplit("/", 1)[1]
            hangup = await http.post(f"{url}/{call_id}/hangup",
                                     headers={"Authorization": f"Bearer {KEY}"})
            assert hangup.status_code == 200
            records = (await http.get(f"http://127.0.0.1:{calls_port}/_emulator/calls")).json()
        assert [r["id"] for r in records["calls"]] == [call_id]
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            await process.wait()
