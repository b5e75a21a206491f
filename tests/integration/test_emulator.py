"""The Realtime protocol emulator against real clients on loopback (CONTRACT §7).

Clients: the ``websockets`` asyncio client (raw frames) and the official openai-python
SDK (``AsyncOpenAI(...).realtime.connect``).  Every server event received through the
raw client is validated against openai-python's GA event models and against the stricter
rules of @openai/agents' zod schemas (no ``null`` where only "absent" is allowed).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import socket
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.realtime.realtime_audio_config import RealtimeAudioConfig
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from openai.types.realtime.realtime_session_create_request import RealtimeSessionCreateRequest
from pydantic import Field, TypeAdapter
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from gateway.emulator.faults import FaultError, parse_faults
from gateway.emulator.server import Emulator, serve_forever
from gateway.emulator.tokens import input_audio_tokens, output_audio_tokens, text_tokens
from tests.support.audio import chunks, silence_pcm16, speech_pcm16, tone_pcm16

KEY = "emulator-test-key-0123456789"
JSON = dict[str, Any]

_SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(
    Annotated[RealtimeServerEvent, Field(discriminator="type")]
)
_JS_CONTENT_TYPES = {
    "input_text", "input_audio", "item_reference", "output_text", "audio", "output_audio",
}


# --------------------------------------------------------------------------- helpers


def check_event(event: JSON) -> None:
    """Fail unless *event* passes openai-python's models and agents-js' zod rules."""
    _SERVER_EVENT.validate_python(event)
    assert isinstance(event.get("event_id"), str)
    kind = event["type"]
    if kind.startswith("response.content_part."):
        part = event["part"]
        assert part["type"] in ("text", "audio")
        assert all(value is not None for value in part.values()), part
    item = event.get("item")
    if isinstance(item, dict):
        for key in ("id", "arguments", "call_id", "name"):
            if key in item:
                assert isinstance(item[key], str), (key, item)
        for part in item.get("content", []):
            assert part["type"] in _JS_CONTENT_TYPES, part
    if kind == "conversation.item.input_audio_transcription.completed":
        details = event["usage"]["input_token_details"]
        assert isinstance(details["text_tokens"], int)
        assert isinstance(details["audio_tokens"], int)
    if kind in ("response.created", "response.done"):
        voice = event["response"]["audio"]["output"]["voice"]
        assert voice is None or isinstance(voice, str)


async def recv_event(ws: ClientConnection, within: float = 10.0) -> JSON:
    """Receive, parse and check one server event (at most *within* seconds)."""
    async with asyncio.timeout(within):
        message = await ws.recv()
    assert isinstance(message, str), "the emulator sends text frames only"
    event: JSON = json.loads(message)
    check_event(event)
    return event


async def collect_until(
    ws: ClientConnection, last_type: str, *, limit: int = 5000, within: float = 15.0
) -> list[JSON]:
    """Receive events up to and including the first of type *last_type*."""
    events: list[JSON] = []
    async with asyncio.timeout(within):
        for _ in range(limit):
            event = await recv_event(ws, within)
            events.append(event)
            if event["type"] == last_type:
                return events
    raise AssertionError(f"no {last_type} within {limit} events: {[e['type'] for e in events]}")


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll *predicate* until true; fail after *within* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def url(emu: Emulator, model: str = "gpt-realtime", path: str = "/v1/realtime") -> str:
    return f"{emu.url}{path}?model={model}"


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def send(ws: ClientConnection, event: JSON) -> None:
    await ws.send(json.dumps(event))


async def open_session(
    emu: Emulator, model: str = "gpt-realtime", session: JSON | None = None
) -> ClientConnection:
    """Connect, read ``session.created`` and apply an optional ``session.update``."""
    ws = await connect(url(emu, model), additional_headers=bearer(), max_size=None)
    created = await recv_event(ws)
    assert created["type"] == "session.created"
    if session is not None:
        await send(ws, {"type": "session.update", "session": {"type": "realtime", **session}})
        updated = await recv_event(ws)
        assert updated["type"] == "session.updated", updated
    return ws


async def append(ws: ClientConnection, pcm: bytes, ms: int = 20) -> int:
    """Append *pcm* in *ms* chunks; return the number of append events sent."""
    count = 0
    for piece in chunks(pcm, ms):
        await send(
            ws,
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(piece).decode()},
        )
        count += 1
    return count


def decoded_audio(events: list[JSON]) -> bytes:
    return b"".join(
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"
    )


def transcript_of(events: list[JSON]) -> str:
    return "".join(
        e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"
    )


def types_of(events: list[JSON]) -> list[str]:
    return [e["type"] for e in events]


def user_text_item(text: str) -> JSON:
    return {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
    }


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(host="127.0.0.1", port=0, api_key=KEY) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return speech_pcm16(tmp_path_factory)


# --------------------------------------------------------------------------- session


async def test_session_created_and_updated_through_openai_sdk(emu: Emulator) -> None:
    client = AsyncOpenAI(api_key=KEY, websocket_base_url=f"{emu.url}/v1")
    try:
        async with client.realtime.connect(model="gpt-realtime") as conn:
            created = await conn.recv()
            assert created.type == "session.created"
            session = created.session
            assert session.type == "realtime"
            assert session.model == "gpt-realtime"
            assert session.audio is not None
            assert session.audio.input is not None
            assert session.audio.input.format is not None
            assert session.audio.input.format.type == "audio/pcm"
            assert session.audio.input.format.rate == 24000
            detection = session.audio.input.turn_detection
            assert detection is not None
            assert detection.type == "server_vad"
            assert session.output_modalities == ["audio"]

            await conn.session.update(
                session={
                    "type": "realtime",
                    "instructions": "Be brief.",
                    "output_modalities": ["text"],
                    "audio": {"input": {"turn_detection": None}},
                }
            )
            updated = await conn.recv()
            assert updated.type == "session.updated"
            assert isinstance(updated.session, RealtimeSessionCreateRequest)
            assert isinstance(updated.session.audio, RealtimeAudioConfig)
            assert updated.session.instructions == "Be brief."
            assert updated.session.output_modalities == ["text"]
            assert updated.session.audio is not None
            assert updated.session.audio.input is not None
            assert updated.session.audio.input.turn_detection is None
            # untouched keys are kept: the merge is partial
            assert updated.session.audio.input.format is not None
            assert updated.session.audio.input.format.type == "audio/pcm"
            assert updated.session.audio.output is not None
            assert updated.session.audio.output.voice == "marin"
    finally:
        await client.close()
    await eventually(lambda: emu.sessions()[0].closed)
    record = emu.sessions()[0]
    assert record.auth == "bearer"
    assert record.user_agent is not None
    assert record.user_agent.startswith("AsyncOpenAI/Python")
    assert record.client_events == {"session.update": 1}
    assert record.close_initiator == "client"
    assert record.close_code == 1000


async def test_invalid_events_get_errors_and_the_session_goes_on(emu: Emulator) -> None:
    ws = await open_session(emu)
    async with ws:
        cases: list[tuple[str | bytes, str, str | None]] = [
            (json.dumps({"type": "no.such.event", "event_id": "evt_1"}), "invalid_value", "type"),
            (b"\x00\x01binary", "invalid_frame", None),
            ("{not json", "invalid_json", None),
            (json.dumps({"type": "session.update", "session": {"instructions": "x"}}),
             "missing_required_parameter", "session.type"),
            (json.dumps({"type": "session.update",
                         "session": {"type": "realtime", "modalities": ["text"]}}),
             "unknown_parameter", "session.modalities"),
            (json.dumps({"type": "session.update",
                         "session": {"type": "realtime", "output_modalities": ["video"]}}),
             "invalid_value", "session.output_modalities"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}),
             "invalid_value", "audio"),
            (json.dumps({"type": "input_audio_buffer.commit"}),
             "input_audio_buffer_commit_empty", None),
            (json.dumps({"type": "response.cancel"}), "response_cancel_not_active", None),
            (json.dumps({"type": "conversation.item.retrieve", "item_id": "item_nope"}),
             "item_retrieve_invalid_item_id", "item_id"),
        ]
        for frame, code, param in cases:
            await ws.send(frame)
            event = await recv_event(ws)
            assert event["type"] == "error", (frame, event)
            assert event["error"]["type"] == "invalid_request_error"
            assert event["error"]["code"] == code, (frame, event)
            assert event["error"]["param"] == param, (frame, event)
        # the inner event_id names the offending client event
        await send(ws, {"type": "bogus", "event_id": "evt_client_7"})
        assert (await recv_event(ws))["error"]["event_id"] == "evt_client_7"
        # a failed update changed nothing; a good one still works
        await send(ws, {"type": "session.update",
                        "session": {"type": "realtime", "instructions": "still here"}})
        updated = await recv_event(ws)
        assert updated["type"] == "session.updated"
        assert updated["session"]["output_modalities"] == ["audio"]
        assert updated["session"]["instructions"] == "still here"
    record = emu.sessions()[0]
    assert record.binary_frames == 1
    assert record.invalid_frames == 1
    assert record.client_events["no.such.event"] == 1
    assert record.server_events["error"] == len(cases) + 1


# --------------------------------------------------------------------------- audio


async def test_manual_commit_hashes_audio_and_prices_it(emu: Emulator, speech: bytes) -> None:
    ws = await open_session(
        emu,
        session={
            "audio": {
                "input": {
                    "turn_detection": None,
                    "transcription": {"model": "gpt-4o-mini-transcribe"},
                }
            }
        },
    )
    async with ws:
        appends = await append(ws, speech)
        await send(ws, {"type": "input_audio_buffer.commit"})
        events = await collect_until(
            ws, "conversation.item.input_audio_transcription.completed"
        )
        assert types_of(events) == [
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
            "conversation.item.input_audio_transcription.completed",
        ], "no VAD events when turn_detection is null"
        user_item_id = events[0]["item_id"]
        assert events[1]["item"]["id"] == user_item_id
        assert events[1]["item"]["content"][0]["type"] == "input_audio"
        audio_in = input_audio_tokens(len(speech))
        assert audio_in == math.ceil(len(speech) / 4800)
        transcription = events[-1]
        assert transcription["item_id"] == user_item_id
        transcript_tokens = text_tokens(transcription["transcript"])
        assert transcription["usage"] == {
            "type": "tokens",
            "input_tokens": audio_in,
            "output_tokens": transcript_tokens,
            "total_tokens": audio_in + transcript_tokens,
            "input_token_details": {"text_tokens": 0, "audio_tokens": audio_in},
        }

        await send(ws, {"type": "response.create"})
        first = await collect_until(ws, "response.done")
        assert types_of(first)[:4] == [
            "response.created",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
        ]
        assert types_of(first)[-6:] == [
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
        out_audio = decoded_audio(first)
        transcript = transcript_of(first)
        assert types_of(first).count("response.output_audio.delta") > 1
        assert len(out_audio) % 2 == 0
        assert out_audio.strip(b"\x00")
        assert f"{len(speech) / 48000:.2f} seconds of audio" in transcript
        assert len(out_audio) == min(max(len(transcript) * 50, 200), 10_000) * 48
        done = first[-1]["response"]
        assert done["status"] == "completed"
        assert done["output"][0]["content"][0] == {"type": "output_audio",
                                                   "transcript": transcript}
        usage = done["usage"]
        expected_first: JSON = {
            "total_tokens": audio_in + text_tokens(transcript) + output_audio_tokens(
                len(out_audio)),
            "input_tokens": audio_in,
            "output_tokens": text_tokens(transcript) + output_audio_tokens(len(out_audio)),
            "input_token_details": {
                "text_tokens": 0, "audio_tokens": audio_in, "image_tokens": 0,
                "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {
                "text_tokens": text_tokens(transcript),
                "audio_tokens": math.ceil(len(out_audio) / 2400),
            },
        }
        assert usage == expected_first

        # The next response's input is the whole conversation: the user audio (now
        # cached) and the assistant's audio reply, priced as input audio.
        await send(ws, {"type": "response.create"})
        second = await collect_until(ws, "response.done")
        details = second[-1]["response"]["usage"]["input_token_details"]
        assert details["audio_tokens"] == audio_in + input_audio_tokens(len(out_audio))
        assert details["cached_tokens"] == audio_in
        assert details["cached_tokens_details"]["audio_tokens"] == audio_in
    await eventually(lambda: emu.sessions()[0].closed)
    record = emu.sessions()[0]
    assert record.audio_bytes == len(speech)
    assert record.audio_sha256 == hashlib.sha256(speech).hexdigest()
    assert record.client_events["input_audio_buffer.append"] == appends
    assert record.usage["responses"] == 2
    assert record.usage["input_audio"] == 2 * audio_in + input_audio_tokens(len(out_audio))
    assert record.usage["input_cached"] == audio_in
    assert record.usage["output_audio"] == (
        expected_first["output_token_details"]["audio_tokens"]
        + second[-1]["response"]["usage"]["output_token_details"]["audio_tokens"]
    )
    assert record.transcription_usage["input_audio"] == audio_in
    assert record.transcription_usage["transcriptions"] == 1


async def test_server_vad_commits_on_silence_and_answers(emu: Emulator, speech: bytes) -> None:
    lead, tail = silence_pcm16(600), silence_pcm16(800)
    audio = lead + speech + tail
    ws = await open_session(emu)
    async with ws:
        await append(ws, audio)
        events = await collect_until(ws, "response.done")
        kinds = types_of(events)
        assert kinds[:5] == [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
        ]
        assert kinds[5] == "response.created"
        started, stopped, committed = events[0], events[1], events[2]
        assert started["item_id"] == stopped["item_id"] == committed["item_id"]
        # speech starts right after the 600 ms lead; prefix padding is 300 ms
        assert started["audio_start_ms"] == 300
        speech_end_ms = (len(lead) + len(speech)) // 48
        assert speech_end_ms - 500 < stopped["audio_end_ms"] <= speech_end_ms + 520
        done = events[-1]["response"]
        assert done["status"] == "completed"
        # the committed item spans audio_start_ms .. audio_end_ms
        committed_ms = stopped["audio_end_ms"] - started["audio_start_ms"]
        assert done["usage"]["input_token_details"]["audio_tokens"] == input_audio_tokens(
            committed_ms * 48
        )
        assert f"I heard {committed_ms / 1000:.2f} seconds of audio." in transcript_of(events)
    record = emu.sessions()[0]
    assert record.audio_sha256 == hashlib.sha256(audio).hexdigest()
    assert record.audio_bytes == len(audio)


async def test_speech_interrupts_a_response(emu: Emulator) -> None:
    ws = await open_session(emu, model="fault-slow")
    async with ws:
        await send(ws, user_text_item("tell me a long story please"))
        await collect_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        await collect_until(ws, "response.output_audio.delta")
        await append(ws, tone_pcm16(200))
        events = await collect_until(ws, "response.done")
        assert "input_audio_buffer.speech_started" in types_of(events)
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        assert done["output"][0]["status"] == "incomplete"


# --------------------------------------------------------------------------- responses


async def test_function_call_round_trip_through_openai_sdk(emu: Emulator) -> None:
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    }
    question = "What is the weather in Paris? Use get_weather."
    client = AsyncOpenAI(api_key=KEY, websocket_base_url=f"{emu.url}/v1")
    try:
        async with client.realtime.connect(model="gpt-realtime") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={"type": "realtime", "tools": [tool]})  # type: ignore[list-item]
            assert (await conn.recv()).type == "session.updated"
            await conn.conversation.item.create(
                item={"type": "message", "role": "user",
                      "content": [{"type": "input_text", "text": question}]}
            )
            await conn.response.create()
            deltas = ""
            arguments_done = None
            call_item = None
            async with asyncio.timeout(10):
                async for event in conn:
                    if event.type == "response.output_item.added":
                        assert event.item.type == "function_call"
                        assert event.item.status == "in_progress"
                    elif event.type == "response.function_call_arguments.delta":
                        deltas += event.delta
                    elif event.type == "response.function_call_arguments.done":
                        arguments_done = event
                    elif event.type == "response.done":
                        assert event.response.status == "completed"
                        assert event.response.output is not None
                        call_item = event.response.output[0]
                        usage = event.response.usage
                        break
            assert arguments_done is not None
            assert call_item is not None
            assert call_item.type == "function_call"
            assert arguments_done.name == call_item.name == "get_weather"
            assert arguments_done.arguments == deltas == call_item.arguments
            assert arguments_done.call_id == call_item.call_id
            assert json.loads(deltas) == {"city": question, "days": 1}
            assert usage is not None
            assert usage.input_token_details is not None
            assert usage.input_token_details.text_tokens == text_tokens(question)
            assert usage.output_token_details is not None
            assert usage.output_token_details.text_tokens == text_tokens("get_weather" + deltas)
            assert usage.output_token_details.audio_tokens == 0

            assert call_item.call_id is not None
            await conn.conversation.item.create(
                item={"type": "function_call_output", "call_id": call_item.call_id,
                      "output": "sunny, 21 C"}
            )
            await conn.response.create()
            transcript = ""
            audio = b""
            async with asyncio.timeout(10):
                async for event in conn:
                    if event.type == "response.output_audio_transcript.delta":
                        transcript += event.delta
                    elif event.type == "response.output_audio.delta":
                        audio += base64.b64decode(event.delta)
                    elif event.type == "response.done":
                        assert event.response.status == "completed"
                        second_usage = event.response.usage
                        break
            assert transcript == "The get_weather function returned: sunny, 21 C"
            assert audio
            assert second_usage is not None
            assert second_usage.input_token_details is not None
            # prior conversation is input again: question (cached), the call, the output
            assert second_usage.input_token_details.text_tokens == (
                text_tokens(question) + text_tokens("get_weather" + deltas)
                + text_tokens("sunny, 21 C")
            )
            assert second_usage.input_token_details.cached_tokens == text_tokens(question)
    finally:
        await client.close()


async def test_text_modality_answers_with_text_events(emu: Emulator) -> None:
    ws = await open_session(emu, session={"output_modalities": ["text"]})
    async with ws:
        await send(ws, user_text_item("hello there"))
        added = await collect_until(ws, "conversation.item.done")
        assert types_of(added) == ["conversation.item.added", "conversation.item.done"]
        await send(ws, {"type": "response.create"})
        events = await collect_until(ws, "response.done")
        kinds = types_of(events)
        assert not any("audio" in kind for kind in kinds)
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert text == "You said: hello there"
        assert next(e for e in events if e["type"] == "response.output_text.done")["text"] == text
        usage = events[-1]["response"]["usage"]
        assert usage["output_token_details"] == {"text_tokens": text_tokens(text),
                                                 "audio_tokens": 0}
        assert usage["input_token_details"]["text_tokens"] == text_tokens("hello there")

        # out-of-band response: no conversation events, not part of the conversation
        await send(ws, {"type": "response.create",
                        "response": {"conversation": "none", "output_modalities": ["audio"]}})
        oob = await collect_until(ws, "response.done")
        assert not any(kind.startswith("conversation.") for kind in types_of(oob))
        assert oob[-1]["response"]["conversation_id"] is None
        assert decoded_audio(oob)


async def test_cancel_and_single_active_response(emu: Emulator) -> None:
    ws = await open_session(emu, model="fault-slow,fault-usage-3")
    async with ws:
        await send(ws, user_text_item("please talk for a while about anything at all"))
        await collect_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        before = await collect_until(ws, "response.output_audio.delta")
        await send(ws, {"type": "response.create"})
        busy = await collect_until(ws, "error")
        assert busy[-1]["error"]["code"] == "conversation_already_has_active_response"
        await send(ws, {"type": "response.cancel"})
        after = await collect_until(ws, "response.done")
        events = before + busy + after
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        sent_audio = decoded_audio(events)
        sent_transcript = transcript_of(events)
        usage = done["usage"]
        assert usage["output_token_details"] == {
            "text_tokens": text_tokens(sent_transcript),
            "audio_tokens": output_audio_tokens(len(sent_audio)),
        }
        assert usage["input_token_details"]["text_tokens"] == text_tokens(
            "please talk for a while about anything at all"
        ) + 3
        assert len(sent_audio) < min(len("You said: please talk") * 50, 10_000) * 48
        await send(ws, {"type": "response.cancel"})
        assert (await recv_event(ws))["error"]["code"] == "response_cancel_not_active"


async def test_conversation_item_operations(emu: Emulator) -> None:
    ws = await open_session(emu)
    async with ws:
        await send(ws, user_text_item("hi"))
        await collect_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        events = await collect_until(ws, "response.done")
        assistant = events[-1]["response"]["output"][0]
        await send(ws, {"type": "conversation.item.retrieve", "item_id": assistant["id"]})
        retrieved = await recv_event(ws)
        assert retrieved["type"] == "conversation.item.retrieved"
        assert retrieved["item"]["role"] == "assistant"
        await send(ws, {"type": "conversation.item.truncate", "item_id": assistant["id"],
                        "content_index": 0, "audio_end_ms": 100})
        truncated = await recv_event(ws)
        assert truncated == {**truncated, "type": "conversation.item.truncated",
                             "item_id": assistant["id"], "audio_end_ms": 100}
        await send(ws, {"type": "response.create",
                        "response": {"output_modalities": ["text"]}})
        after = await collect_until(ws, "response.done")
        details = after[-1]["response"]["usage"]["input_token_details"]
        assert details["audio_tokens"] == input_audio_tokens(100 * 48)
        await send(ws, {"type": "conversation.item.delete", "item_id": assistant["id"]})
        assert (await recv_event(ws))["type"] == "conversation.item.deleted"
        await send(ws, {"type": "conversation.item.delete", "item_id": assistant["id"]})
        assert (await recv_event(ws))["error"]["code"] == "item_delete_invalid_item_id"


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_fault_refuse(emu: Emulator, status: int) -> None:
    with pytest.raises(InvalidStatus) as caught:
        await connect(url(emu, f"fault-refuse-{status}"), additional_headers=bearer())
    response = caught.value.response
    assert response.status_code == status
    assert json.loads(response.body)["error"]["code"] == "fault_refuse"
    assert (response.headers.get("Retry-After") == "1") is (status in (429, 503))
    assert emu.connections == 1
    assert emu.sessions() == []


async def test_fault_stall_handshake(emu: Emulator) -> None:
    with pytest.raises(TimeoutError):
        await connect(
            url(emu, "fault-stall-handshake"), additional_headers=bearer(), open_timeout=0.3
        )
    assert emu.connections == 1
    assert emu.sessions() == []


async def test_fault_close(emu: Emulator) -> None:
    ws = await open_session(emu, model="fault-close-4321")
    await send(ws, {"type": "session.update", "session": {"type": "realtime"}})
    with pytest.raises(ConnectionClosed) as caught:
        await recv_event(ws)
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 4321
    assert caught.value.rcvd.reason == "emulator close 4321"
    await eventually(lambda: emu.sessions()[0].closed)
    record = emu.sessions()[0]
    assert (record.close_code, record.close_initiator) == (4321, "emulator")
    assert record.faults == ["fault-close-4321"]


async def test_fault_drop(emu: Emulator) -> None:
    ws = await open_session(emu, model="fault-drop")
    await send(ws, {"type": "session.update", "session": {"type": "realtime"}})
    with pytest.raises(ConnectionClosedError) as caught:
        await recv_event(ws)
    assert caught.value.rcvd is None, "no close frame on a dropped connection"
    await eventually(lambda: emu.sessions()[0].closed)
    record = emu.sessions()[0]
    assert (record.close_code, record.close_initiator) == (1006, "emulator")


async def test_fault_stall_answers_pings_but_nothing_else(emu: Emulator) -> None:
    ws = await open_session(emu, model="fault-stall")
    async with ws:
        await send(ws, {"type": "session.update", "session": {"type": "realtime"}})
        await send(ws, {"type": "response.create"})
        await eventually(lambda: emu.sessions()[0].client_events.get("response.create") == 1)
        pong = await ws.ping()
        async with asyncio.timeout(5):
            await pong
        # any reply would have been written before the pong: nothing is queued
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), timeout=0.05)
    assert emu.sessions()[0].server_events == {"session.created": 1}


async def test_fault_echo_is_byte_exact(emu: Emulator) -> None:
    ws = await open_session(emu, model="fault-echo")
    audio = bytes(range(256)) * 10
    frames: list[str | bytes] = [
        json.dumps(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()}
        ),
        '{"type":  "x",\n "odd spacing": "é ✓"}',
        "not json at all",
        bytes(range(256)),
        b"",
    ]
    async with ws:
        for frame in frames:
            await ws.send(frame)
            async with asyncio.timeout(5):
                echoed = await ws.recv()
            assert type(echoed) is type(frame)
            assert echoed == frame
    record = emu.sessions()[0]
    assert record.audio_sha256 == hashlib.sha256(audio).hexdigest()
    assert record.binary_frames == 2
    assert record.server_events == {"session.created": 1}


async def test_faults_are_per_connection(emu: Emulator) -> None:
    echo = await open_session(emu, model="fault-echo")
    normal = await open_session(emu)
    async with echo, normal:
        await send(normal, user_text_item("ping"))
        await send(echo, {"type": "hello"})
        assert (await recv_event(normal))["type"] == "conversation.item.added"
        assert json.loads(await echo.recv()) == {"type": "hello"}


def test_parse_faults() -> None:
    faults = parse_faults("fault-slow,fault-usage-12,fault-close-4001")
    assert (faults.slow, faults.extra_input_text_tokens, faults.close) == (True, 12, 4001)
    assert not parse_faults("gpt-realtime").active
    for bad in ("fault-nope", "fault-refuse-101", "fault-refuse-99", "fault-close-1006",
                "fault-usage-x"):
        with pytest.raises(FaultError):
            parse_faults(bad)


async def test_unknown_fault_refuses_handshake(emu: Emulator) -> None:
    with pytest.raises(InvalidStatus) as caught:
        await connect(url(emu, "fault-nope"), additional_headers=bearer())
    assert caught.value.response.status_code == 400


# --------------------------------------------------------------------------- handshake


async def test_auth_failures_and_paths(emu: Emulator) -> None:
    refusals: list[tuple[str, dict[str, str], int, str]] = [
        (url(emu), {}, 401, "missing_api_key"),
        (url(emu), {"Authorization": "Basic abc"}, 401, "missing_api_key"),
        (url(emu), bearer("sk-wrong"), 401, "invalid_api_key"),
        (url(emu), {"api-key": "sk-wrong"}, 401, "invalid_api_key"),
        (f"{emu.url}/v1/realtime", bearer(), 400, "missing_required_parameter"),
        (f"{emu.url}/v1/other?model=m", bearer(), 404, "not_found"),
    ]
    for target, headers, status, code in refusals:
        with pytest.raises(InvalidStatus) as caught:
            await connect(target, additional_headers=headers)
        assert caught.value.response.status_code == status, target
        body = json.loads(caught.value.response.body)
        assert body["error"]["code"] == code
        assert KEY not in caught.value.response.body.decode()
    assert emu.connections == len(refusals) - 1  # the 404 is not a Realtime handshake
    assert emu.sessions() == []


async def test_azure_shape_with_api_key_header(emu: Emulator) -> None:
    async with connect(
        url(emu, "my-deployment&api-key=query-secret", path="/openai/v1/realtime"),
        additional_headers={"api-key": KEY, "User-Agent": "test-agent/1"},
    ) as ws:
        created = await recv_event(ws)
        assert created["session"]["model"] == "my-deployment"
    record = emu.sessions()[0]
    assert (record.path, record.model, record.auth) == (
        "/openai/v1/realtime", "my-deployment", "api-key",
    )
    assert record.query == {"model": "my-deployment", "api-key": "<redacted>"}
    assert record.user_agent == "test-agent/1"
    assert "api-key" in record.header_names
    assert KEY not in json.dumps(emu.sessions_json())
    assert "query-secret" not in json.dumps(emu.sessions_json())


async def test_subprotocol_key_and_realtime_echo(emu: Emulator) -> None:
    async with connect(
        url(emu), subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]  # type: ignore[list-item]
    ) as ws:
        assert ws.subprotocol == "realtime"
        assert (await recv_event(ws))["type"] == "session.created"
    record = emu.sessions()[0]
    assert record.auth == "subprotocol"
    assert record.subprotocol == "realtime"
    assert record.subprotocols == ["realtime", "openai-insecure-api-key.<redacted>"]
    assert KEY not in json.dumps(emu.sessions_json())


async def test_beta_header_gets_beta_api_shape_disabled(emu: Emulator) -> None:
    async with connect(
        url(emu), additional_headers={**bearer(), "OpenAI-Beta": "realtime=v1"}
    ) as ws:
        error = await recv_event(ws)
        assert error["type"] == "error"
        assert error["error"]["code"] == "beta_api_shape_disabled"
        with pytest.raises(ConnectionClosed) as caught:
            await recv_event(ws)
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 4000
        assert caught.value.rcvd.reason == "invalid_request_error.beta_api_shape_disabled"
    await eventually(lambda: emu.sessions()[0].closed)
    assert emu.sessions()[0].openai_beta == "realtime=v1"


async def test_any_key_accepted_without_expected_key() -> None:
    async with Emulator() as emulator:
        async with connect(url(emulator), additional_headers=bearer("anything")) as ws:
            assert (await recv_event(ws))["type"] == "session.created"
        with pytest.raises(InvalidStatus):
            await connect(url(emulator))


async def test_sessions_endpoint_serves_records(emu: Emulator) -> None:
    with pytest.raises(InvalidStatus):
        await connect(url(emu, "fault-refuse-503"), additional_headers=bearer())
    ws = await open_session(emu, model="gpt-realtime&call_id=abc")
    async with ws:
        await append(ws, silence_pcm16(100))
        await eventually(lambda: emu.sessions()[0].audio_bytes == 4800)
    await eventually(lambda: emu.sessions()[0].closed)
    async with httpx.AsyncClient() as http_client:
        response = await http_client.get(f"http://127.0.0.1:{emu.port}/_emulator/sessions")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == emu.sessions_json()
    assert body["connections"] == 2
    (record,) = body["sessions"]
    assert record["query"] == {"model": "gpt-realtime", "call_id": "abc"}
    assert record["audio_sha256"] == hashlib.sha256(silence_pcm16(100)).hexdigest()
    assert record["client_events"] == {"input_audio_buffer.append": 5}
    assert record["closed"] is True
    assert record["close_initiator"] == "client"


async def test_session_record_snapshots_do_not_change_later(emu: Emulator) -> None:
    first_audio, more_audio = silence_pcm16(100), tone_pcm16(100)
    ws = await open_session(emu, session={"audio": {"input": {"turn_detection": None}}})
    async with ws:
        await append(ws, first_audio, ms=100)
        await eventually(lambda: emu.sessions()[0].audio_bytes == len(first_audio))
        (early,) = emu.sessions()
        early_dict = early.to_dict()
        await append(ws, more_audio, ms=100)
        await send(ws, user_text_item("hello"))
        await send(ws, {"type": "response.create"})
        await collect_until(ws, "response.done")
    await eventually(lambda: emu.sessions()[0].closed)
    (late,) = emu.sessions()
    assert early.to_dict() == early_dict, "a snapshot changed after it was taken"
    assert early.audio_sha256 == hashlib.sha256(first_audio).hexdigest()
    assert early.client_events == {"session.update": 1, "input_audio_buffer.append": 1}
    assert early.usage["responses"] == 0
    assert not early.closed
    assert late.audio_sha256 == hashlib.sha256(first_audio + more_audio).hexdigest()
    assert late.snapshot().audio_sha256 == late.audio_sha256
    assert late.client_events["input_audio_buffer.append"] == 2
    assert late.usage["responses"] == 1
    assert late.server_events["response.done"] == 1


async def test_serve_forever_runs_until_cancelled() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task = asyncio.create_task(serve_forever("127.0.0.1", port, None))
    target = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    ws: ClientConnection | None = None
    while ws is None:
        try:
            ws = await connect(target, additional_headers=bearer("k"))
        except OSError:
            if loop.time() > deadline or task.done():
                raise
            await asyncio.sleep(0.02)
    async with ws:
        assert (await recv_event(ws))["type"] == "session.created"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
