"""Beta-protocol clients on real sockets (CONTRACT §10): the pure translator of
:mod:`gateway.beta` and the translating relay of :mod:`gateway.beta_relay`.

* detection on the real handshakes of the openai-python clients, captured on a loopback server;
* a beta conversation against the GA emulator on loopback, translated in the test: every
  upstream event, translated, validates against the beta models and the upstream accepts every
  translated client event;
* the same, through a real gateway (:class:`gateway.beta_relay.BetaRelay`): a raw beta client,
  openai-python's ``client.beta.realtime``, query credentials and their refusals, model pinning,
  usage, metrics by protocol, closes, and ``server.beta_clients: refuse``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.beta import BetaTranslator, client_frame_is_verbatim, is_beta, upstream_frame_renamed
from gateway.emulator.server import Emulator
from gateway.relay import Relay
from tests.support.audio import chunks, silence_pcm16, speech_pcm16, tone_pcm16
from tests.support.emulator import emulator_sessions
from tests.support.gateway import (
    MODEL,
    UPSTREAM_KEY,
    RunningGateway,
    gateway_config,
    mint,
    run_gateway,
    wait_for,
)
from tests.test_beta import (
    GA_SERVER_EVENT,
    JSON,
    TOKEN,
    TOOL,
    check_beta_server_event,
    check_ga_client_event,
    q,
)

# --------------------------------------------------------------------------- detection

@asynccontextmanager
async def handshake_recorder() -> AsyncIterator[tuple[int, list[JSON]]]:
    """A WebSocket server on a free loopback port that records each upgrade request."""
    seen: list[JSON] = []

    async def handler(conn: ServerConnection) -> None:
        request = conn.request
        assert request is not None
        path, _, query = request.path.partition("?")
        offers = [p.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol")
                  for p in v.split(",")]
        seen.append({"path": path, "query": query,
                     "headers": tuple((k.lower().encode(), v.encode())
                                      for k, v in request.headers.raw_items()),
                     "offers": tuple(offers)})
        await conn.close()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield port, seen


async def open_and_close(connect_cm: Any) -> None:
    async with asyncio.timeout(10):
        async with connect_cm:
            pass


async def test_is_beta_on_handshakes_of_the_openai_python_clients() -> None:
    """The real SDK handshakes: its beta clients are beta, its GA clients (Azure's with a
    preview api-version too, as tests/sdk uses it) are not."""
    async with handshake_recorder() as (port, seen):
        base = f"ws://127.0.0.1:{port}"
        openai = AsyncOpenAI(api_key=TOKEN, websocket_base_url=f"{base}/v1")
        azure = AsyncAzureOpenAI(api_key=TOKEN, azure_endpoint=f"http://127.0.0.1:{port}",
                                 api_version="2025-04-01-preview",
                                 websocket_base_url=f"{base}/openai")
        azure_ga = AsyncAzureOpenAI(api_key=TOKEN, azure_endpoint=f"http://127.0.0.1:{port}",
                                    api_version="2025-08-28", websocket_base_url=f"{base}/openai")
        cases = [
            ("openai beta", openai.beta.realtime.connect(model="gpt-realtime"), True),
            ("openai GA", openai.realtime.connect(model="gpt-realtime"), False),
            ("azure beta", azure.beta.realtime.connect(model="D"), True),
            ("azure GA, preview api-version", azure.realtime.connect(model="D"), False),
            ("azure GA, GA api-version", azure_ga.realtime.connect(model="D"), False),
        ]
        for name, connection, expected in cases:
            await open_and_close(connection)
            request = seen[-1]
            assert request["path"].endswith("/realtime"), (name, request["path"])
            verdict = is_beta(request["path"], q(request["query"]), request["headers"],
                              request["offers"])
            assert verdict is expected, (name, request)
        for client in (openai, azure, azure_ga):
            await client.close()
    assert [r["path"] for r in seen[2:]] == ["/openai/realtime"] * 3


# --------------------------------------------------------------------------- against the emulator


class BetaClientOverGA:
    """A beta client's view of a GA upstream: the test speaks beta, the translator and the
    emulator GA; every frame takes the fast path where it applies, checked against the slow."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.translator = BetaTranslator()
        self.received: list[JSON] = []

    async def send(self, event: JSON) -> None:
        frame = json.dumps(event).encode()
        out = self.translator.client_to_upstream(copy.deepcopy(event))
        if client_frame_is_verbatim(frame):
            assert out == [event]
            await self.ws.send(frame.decode())
            return
        for translated in out:
            check_ga_client_event(translated)
            await self.ws.send(json.dumps(translated))

    async def until(self, last: str, limit: int = 2000) -> list[JSON]:
        """Beta events up to and including the first of type *last*."""
        got: list[JSON] = []
        async with asyncio.timeout(15):
            for _ in range(limit):
                message = await self.ws.recv()
                assert isinstance(message, str)
                GA_SERVER_EVENT.validate_python(json.loads(message))
                slow = self.translator.upstream_to_client(json.loads(message))
                fast = upstream_frame_renamed(message.encode())
                if fast is not None:
                    assert [json.loads(fast)] == slow
                for event in slow:
                    check_beta_server_event(event)
                    assert event["type"] != "error", event
                got += slow
                self.received += slow
                if any(event["type"] == last for event in slow):
                    return got
        raise AssertionError(f"no {last} in {[e['type'] for e in got]}")


def types_of(events: list[JSON]) -> list[str]:
    return [event["type"] for event in events]


@pytest.fixture
async def over_ga(emulator: Emulator) -> AsyncIterator[BetaClientOverGA]:
    async with connect(f"{emulator.url}/v1/realtime?model=gpt-realtime", max_size=None,
                       additional_headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}) as ws:
        client = BetaClientOverGA(ws)
        (created,) = await client.until("session.created")
        assert created["session"]["modalities"] == ["text", "audio"]
        assert created["session"]["input_audio_format"] == "pcm16"
        yield client


def audio_of(pcm: bytes) -> Iterator[JSON]:
    for piece in chunks(pcm, 100):
        yield {"type": "input_audio_buffer.append", "audio": base64.b64encode(piece).decode()}


async def test_beta_conversation_on_the_ga_emulator(over_ga: BetaClientOverGA) -> None:
    client = over_ga
    await client.send({"type": "session.update", "session": {
        "modalities": ["text", "audio"], "voice": "alloy", "instructions": "Be brief.",
        "input_audio_format": "pcm16", "output_audio_format": "pcm16",
        "input_audio_transcription": {"model": "whisper-1"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 100,
                           "silence_duration_ms": 200, "create_response": False},
        "tools": [TOOL], "tool_choice": "auto", "temperature": 0.8,
        "max_response_output_tokens": "inf"}})
    (updated,) = await client.until("session.updated")
    session = updated["session"]
    assert session["voice"] == "alloy"
    assert session["turn_detection"]["silence_duration_ms"] == 200
    assert session["input_audio_transcription"]["model"] == "whisper-1"
    assert "temperature" not in session

    # speech → VAD → committed user item, announced once, with its transcript
    for append in audio_of(silence_pcm16(200) + tone_pcm16(600) + silence_pcm16(400)):
        await client.send(append)
    heard = await client.until("conversation.item.input_audio_transcription.completed")
    assert types_of(heard)[:3] == ["input_audio_buffer.speech_started",
                                   "input_audio_buffer.speech_stopped",
                                   "input_audio_buffer.committed"]
    (user_item,) = [e for e in heard if e["type"] == "conversation.item.created"]
    assert user_item["item"]["content"][0]["type"] == "input_audio"

    await client.send({"type": "response.create",
                       "response": {"modalities": ["text", "audio"], "temperature": 0.9}})
    spoken = await client.until("response.done")
    kinds = types_of(spoken)
    assert kinds[:4] == ["response.created", "response.output_item.added",
                         "conversation.item.created", "response.content_part.added"]
    assert kinds[-4:] == ["response.audio_transcript.done", "response.content_part.done",
                          "response.output_item.done", "response.done"]
    assert {"response.audio.delta", "response.audio_transcript.delta",
            "response.audio.done"} <= set(kinds)
    done = spoken[-1]["response"]
    assert done["modalities"] == ["text", "audio"]
    assert done["output_audio_format"] == "pcm16"
    assert done["output"][0]["content"][0]["type"] == "audio"
    assert done["usage"]["output_token_details"]["audio_tokens"] > 0
    transcript = "".join(e["delta"] for e in spoken
                         if e["type"] == "response.audio_transcript.delta")
    assert transcript.startswith("I heard")

    # text only, with a function call and its output
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "What is the time? Use get_time."}]}})
    await client.until("conversation.item.created")
    await client.send({"type": "response.create", "response": {"modalities": ["text"]}})
    called = await client.until("response.done")
    (arguments,) = [e for e in called if e["type"] == "response.function_call_arguments.done"]
    await client.send({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": arguments["call_id"], "output": "noon"}})
    await client.send({"type": "response.create", "response": {"modalities": ["text"]}})
    answered = await client.until("response.done")
    text = "".join(e["delta"] for e in answered if e["type"] == "response.text.delta")
    assert text == "The get_time function returned: noon"
    assert "response.text.done" in types_of(answered)

    created = [e["item"]["id"] for e in client.received if e["type"] == "conversation.item.created"]
    # user audio, its reply, user text, the function call, its output, the reply to it
    assert len(created) == len(set(created)) == 6
    assert not {"conversation.item.added", "conversation.item.done"} & set(
        types_of(client.received))


async def test_g711_session_on_the_ga_emulator(over_ga: BetaClientOverGA) -> None:
    await over_ga.send({"type": "session.update", "session": {
        "input_audio_format": "g711_ulaw", "output_audio_format": "g711_alaw",
        "turn_detection": None}})
    (updated,) = await over_ga.until("session.updated")
    assert updated["session"]["input_audio_format"] == "g711_ulaw"
    assert updated["session"]["output_audio_format"] == "g711_alaw"
    assert updated["session"]["turn_detection"] is None
    await over_ga.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}})
    await over_ga.send({"type": "response.create",
                            "response": {"output_audio_format": "g711_ulaw"}})
    events = await over_ga.until("response.done")
    assert events[-1]["response"]["output_audio_format"] == "g711_ulaw"
    assert "response.audio.delta" in types_of(events)


# --------------------------------------------------------------------------- through the gateway

BETA_MODELS = {MODEL: {"upstream": "emulator"}, "alias": {"upstream": "emulator",
                                                          "upstream_model": MODEL},
               "fault-close-4000": {"upstream": "emulator"}}
PREVIEW = "2024-10-01-preview"
GA_ONLY_NAMES = ("response.output_audio", "response.output_text", "conversation.item.added",
                 "conversation.item.done")


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path) -> AsyncIterator[RunningGateway]:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, models=BETA_MODELS,
                            server={"ping_interval_seconds": 5})
    async with run_gateway(config) as running:
        yield running


def preview_url(gw: RunningGateway, **params: str) -> str:
    """rt-client's browser URL shape: ``/openai/realtime?api-version=…&x-ms-client-request-id=…
    &deployment=…`` plus ``params`` (the query credential)."""
    query = {"api-version": PREVIEW, "x-ms-client-request-id": str(uuid.uuid4()),
             "deployment": MODEL, **params}
    return f"ws://127.0.0.1:{gw.port}/openai/realtime?{urlencode(query)}"


async def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(gw.metrics_url)).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#")
               and all(f'{k}="{v}"' in line for k, v in labels.items()))


async def beta_events(ws: ClientConnection, last: str, limit: int = 3000) -> list[JSON]:
    """Events up to the first of type ``last``; each must be a beta server event."""
    got: list[JSON] = []
    async with asyncio.timeout(15):
        for _ in range(limit):
            event = json.loads(await ws.recv())
            assert not event["type"].startswith(GA_ONLY_NAMES), event["type"]
            check_beta_server_event(event)
            got.append(event)
            if event["type"] == last:
                return got
    raise AssertionError(f"no {last} in {types_of(got)}")


async def test_beta_client_with_query_credential_through_the_gateway(
        gw: RunningGateway, emulator: Emulator, key_file: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    token = mint(key_file)
    speech = speech_pcm16(tmp_path_factory, "Hello from a beta client")
    async with connect(preview_url(gw, **{"api-key": token}), max_size=None) as ws:
        (created,) = await beta_events(ws, "session.created")
        assert created["session"]["input_audio_format"] == "pcm16"
        await ws.send(json.dumps({"type": "session.update", "session": {
            "modalities": ["text", "audio"], "voice": "alloy", "turn_detection": None,
            "input_audio_format": "pcm16", "output_audio_format": "pcm16",
            "input_audio_transcription": {"model": "whisper-1"}, "temperature": 0.7}}))
        (updated,) = await beta_events(ws, "session.updated")
        assert updated["session"]["turn_detection"] is None
        for append in audio_of(speech):
            await ws.send(json.dumps(append, separators=(",", ":")))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await beta_events(ws, "input_audio_buffer.committed")
        await ws.send(json.dumps({"type": "response.create"}))
        spoken = await beta_events(ws, "response.done")
    kinds = set(types_of(spoken))
    assert {"response.audio.delta", "response.audio_transcript.delta"} <= kinds
    usage = spoken[-1]["response"]["usage"]
    assert usage["output_token_details"]["audio_tokens"] > 0
    record = emulator_sessions(emulator)[-1]
    assert record["path"] == "/v1/realtime" and record["model"] == MODEL
    assert record["auth"] == "bearer"  # the gateway's key, not the client's token
    assert record["openai_beta"] is None
    assert not {"api-key", "authorization", "api-version", "x-ms-client-request-id",
                "deployment"} & {k.lower() for k in record["query"]}
    assert record["client_events"]["session.update"] == 1
    assert record["audio_sha256"] == hashlib.sha256(speech).hexdigest()  # byte-exact
    # usage is metered from the GA frames: every response and transcription of the session
    transcribed = record["transcription_usage"]
    assert transcribed["transcriptions"] == 1
    sent = {kind: record["usage"][kind] + transcribed.get(kind, 0)
            for kind in ("input_text", "input_audio", "output_audio")}
    sent["output_text"] = record["usage"]["output_text"] + transcribed["output_tokens"]
    assert sent["output_audio"] == usage["output_token_details"]["audio_tokens"] > 0
    await wait_for(lambda: metered(gw, sent))
    assert await metric(gw, "realtime_gateway_protocol_sessions_total", protocol="beta") == 1
    assert await metric(gw, "realtime_gateway_protocol_sessions_total", protocol="ga") == 0


async def metered(gw: RunningGateway, sent: dict[str, int]) -> bool:
    return all([await metric(gw, "realtime_gateway_tokens_total", kind=kind) == value
                for kind, value in sent.items()])


async def test_openai_python_beta_client_is_translated(gw: RunningGateway, emulator: Emulator,
                                                       key_file: Path) -> None:
    client = AsyncOpenAI(api_key=mint(key_file), websocket_base_url=f"ws://127.0.0.1:{gw.port}/v1")
    seen: list[str] = []
    text = ""
    async with client.beta.realtime.connect(model=MODEL) as conn:
        await conn.session.update(session={"modalities": ["text"], "temperature": 0.8})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello beta"}]})
        await conn.response.create()
        async with asyncio.timeout(15):
            async for event in conn:
                seen.append(event.type)
                if event.type == "response.text.delta":
                    text += event.delta
                if event.type == "response.done":
                    assert event.response.usage is not None
                    assert event.response.usage.total_tokens
                    break
    await client.close()
    assert seen[:2] == ["session.created", "session.updated"]
    assert "error" not in seen and "conversation.item.created" in seen
    assert text == "You said: Hello beta"
    record = emulator_sessions(emulator)[-1]
    assert record["openai_beta"] is None  # stripped: the GA upstream refuses it


async def test_ga_client_keeps_the_verbatim_relay(gw: RunningGateway, key_file: Path) -> None:
    async with connect(gw.url(), additional_headers={"Authorization": f"Bearer {mint(key_file)}"}
                       ) as ws:
        created = json.loads(await ws.recv())
        assert created["session"]["type"] == "realtime"  # GA shape, untranslated
        relay = next(iter(gw.gateway.registry.sessions)).relay  # type: ignore[attr-defined]
        assert isinstance(relay, Relay)
    assert await metric(gw, "realtime_gateway_protocol_sessions_total", protocol="ga") == 1


@pytest.mark.parametrize(("case", "close_code", "code"), [
    ("bad_token", 4401, "invalid_token"),
    ("no_scope", 4403, "insufficient_scope"),
    ("empty_key", 4401, "invalid_request"),
    ("two_keys", 4400, "invalid_request"),
    ("bearer_param_bad_token", 4401, "invalid_token"),
])
async def test_query_credential_refusals_are_in_band(gw: RunningGateway, key_file: Path,
                                                     case: str, close_code: int,
                                                     code: str) -> None:
    token = {"bad_token": "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln",
             "no_scope": mint(key_file, scope="other"), "empty_key": "",
             "two_keys": "x"}.get(case, "")
    if case == "two_keys":
        url = preview_url(gw, **{"api-key": "a"}) + "&api-key=b"
    elif case == "bearer_param_bad_token":
        url = preview_url(gw) + "&Authorization=Bearer+not-a-token"
    else:
        url = preview_url(gw, **{"api-key": token})
    async with connect(url) as ws:
        event = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert event["type"] == "error" and event["error"]["code"] == code
    assert closed.value.rcvd is not None and closed.value.rcvd.code == close_code
    if token:
        assert token not in json.dumps(event)


async def test_model_pinning_on_the_translated_session_update(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    headers = {"Authorization": f"Bearer {mint(key_file)}", "OpenAI-Beta": "realtime=v1"}
    async with connect(gw.url(model="alias"), additional_headers=headers) as ws:
        await beta_events(ws, "session.created")
        await ws.send(json.dumps({"type": "session.update",
                                  "session": {"model": "gpt-other", "modalities": ["text"]}}))
        refused = json.loads(await ws.recv())
        assert refused["type"] == "error" and refused["error"]["code"] == "forbidden"
        for model in ("alias", MODEL):  # the session's own names pass
            await ws.send(json.dumps({"type": "session.update", "session": {"model": model}}))
            await beta_events(ws, "session.updated")
    assert emulator_sessions(emulator)[-1]["client_events"]["session.update"] == 2


async def test_upstream_close_reaches_the_beta_client_verbatim(gw: RunningGateway,
                                                               key_file: Path) -> None:
    headers = {"Authorization": f"Bearer {mint(key_file)}", "OpenAI-Beta": "realtime=v1"}
    async with connect(gw.url(model="fault-close-4000"), additional_headers=headers) as ws:
        await beta_events(ws, "session.created")
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "emulator close 4000")


async def test_token_expiry_ends_a_beta_session(gw: RunningGateway, emulator: Emulator,
                                                key_file: Path) -> None:
    headers = {"Authorization": f"Bearer {mint(key_file, ttl=2)}", "OpenAI-Beta": "realtime=v1"}
    async with connect(gw.url(), additional_headers=headers) as ws:
        await beta_events(ws, "session.created")
        async with asyncio.timeout(10):
            event = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    assert event["type"] == "error" and event["error"]["code"] == "token_expired"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    await wait_for(lambda: emulator_sessions(emulator)[-1]["close_code"] == 1001)


async def test_client_close_closes_the_upstream_1001(gw: RunningGateway, emulator: Emulator,
                                                     key_file: Path) -> None:
    async with connect(preview_url(gw, **{"api-key": mint(key_file)})) as ws:
        await beta_events(ws, "session.created")
        await ws.close(1000, "bye")
    await wait_for(lambda: emulator_sessions(emulator)[-1]["close_code"] == 1001)
    await wait_for(lambda: not gw.gateway.registry.sessions)


async def test_beta_clients_refused_when_configured(emulator: Emulator, key_file: Path) -> None:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            server={"beta_clients": "refuse"})
    async with run_gateway(config) as gw:
        headers = {"Authorization": f"Bearer {mint(key_file)}", "OpenAI-Beta": "realtime=v1"}
        async with connect(gw.url(), additional_headers=headers) as ws:
            event = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        async with connect(gw.url(), additional_headers={
                "Authorization": f"Bearer {mint(key_file)}"}) as ga:  # GA clients still pass
            assert json.loads(await ga.recv())["type"] == "session.created"
    assert event["type"] == "error" and event["error"]["code"] == "invalid_request"
    assert "/v1/realtime" in event["error"]["message"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4400
    assert len(emulator_sessions(emulator)) == 1  # the beta client was never dialled


@pytest.mark.parametrize("path", ["/v1/realtime", "/openai/v1/realtime", "/openai/realtime",
                                  "/language-model-service/ws/v1/open-ai/realtime"])
async def test_deployment_names_the_model_on_every_path(gw: RunningGateway, emulator: Emulator,
                                                        key_file: Path, path: str) -> None:
    url = f"ws://127.0.0.1:{gw.port}{path}?deployment=alias&api-version=2025-08-28"
    async with connect(url, additional_headers={"api-key": mint(key_file)}) as ws:
        created = json.loads(await ws.recv())
        assert created["type"] == "session.created"
        assert created["session"]["type"] == "realtime"  # GA: a GA api-version is not beta
    record = emulator_sessions(emulator)[-1]
    assert record["model"] == MODEL  # alias → its upstream_model
    assert not {"deployment", "api-version", "api-key"} & set(record["query"])


async def test_azure_openai_python_beta_client_is_translated(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    """``AsyncAzureOpenAI(...).beta.realtime``: the preview path, a preview api-version, the
    ``api-key`` header and ``OpenAI-Beta``; the upstream sees none of them."""
    client = AsyncAzureOpenAI(api_key=mint(key_file), azure_endpoint=f"http://127.0.0.1:{gw.port}",
                              api_version="2025-04-01-preview",
                              websocket_base_url=f"ws://127.0.0.1:{gw.port}/openai")
    text = ""
    async with client.beta.realtime.connect(model=MODEL) as conn:
        await conn.session.update(session={"modalities": ["text"]})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello Azure beta"}]})
        await conn.response.create()
        async with asyncio.timeout(15):
            async for event in conn:
                assert event.type != "error", event
                if event.type == "response.text.delta":
                    text += event.delta
                if event.type == "response.done":
                    break
    await client.close()
    assert text == "You said: Hello Azure beta"
    record = emulator_sessions(emulator)[-1]
    assert record["path"] == "/v1/realtime" and record["openai_beta"] is None
    assert not {"api-version", "deployment", "api-key"} & set(record["query"])
