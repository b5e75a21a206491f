"""The emulator's WebRTC calls: real peer connections (aiortc) that speak the Realtime
protocol on the ``oai-events`` data channel, hear the caller's audio track and answer on
their own, with a sideband WebSocket that sees the same events.

HTTP endpoints (OpenAI GA shapes; a Starlette app on the emulator's *calls port*, since the
``websockets`` server takes no request bodies):

* ``POST /v1/realtime/calls`` and ``POST /openai/v1/realtime/calls`` (Azure GA): body the raw
  SDP offer (``Content-Type: application/sdp``) or ``multipart/form-data`` with parts ``sdp``
  and ``session`` (JSON, a ``session.update``'s session; its ``model`` names the model and its
  fault words, :mod:`gateway.emulator.faults`).  Key in ``Authorization: Bearer`` or
  ``api-key``.  Answer: **201**, ``application/sdp``, ``Location: /v1/realtime/calls/rtc_…``.
  Refusals: 401 (key), 400 (no or bad SDP, bad session), ``fault-refuse-<status>``.
* ``POST /v1/realtime/calls/{call_id}/hangup``: 200 ``{}``; 404 ``call_id_not_found``.
* ``GET /_emulator/calls``: the records of every call (as ``/_emulator/sessions``).

CORS allows any origin (``Authorization``, ``Content-Type``, ``X-OpenAI-Agents-SDK``,
``api-key``; ``Location`` exposed), so a page can call the emulator directly.

A call is one :class:`gateway.emulator.session.Session` whose transport is the data channel
plus the sideband sockets attached with ``GET /v1/realtime?call_id=<id>`` on the emulator's
WebSocket port (:class:`Call`).  Input audio (Opus, decoded by aiortc) is resampled to PCM16
mono 24 kHz and fed to the session as appended audio: its SHA-256 is in the record.  Reply
audio is played on the call's own audio track in real time (:class:`ReplyTrack`).

``loopback_ice`` makes the emulator offer only ``127.0.0.1`` host candidates (aioice skips
loopback and lists every other interface); tests turn it on inside a private network
namespace, ``realtime-gateway dev`` leaves it off so that a browser on the same machine can
reach the emulator's ordinary candidates.  Requires the ``webrtc`` extra (``aiortc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fractions
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aioice.ice
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.emulator.faults import FaultError, fault_words, parse_faults
from gateway.emulator.handshake import Handshake
from gateway.emulator.records import SessionRecord
from gateway.emulator.schema import (
    DEFAULT_MODEL,
    JSON,
    RequestError,
    check_session_patch,
    new_id,
)
from gateway.emulator.session import Session
from gateway.emulator.voice import Voice

__all__ = ["CALLS_PATHS", "CALLS_RECORDS_PATH", "Call", "Calls", "ReplyTrack", "calls_app",
           "loopback_ice"]

CALLS_PATHS = ("/v1/realtime/calls", "/openai/v1/realtime/calls")
CALLS_RECORDS_PATH = "/_emulator/calls"
MAX_SDP_BYTES = 256 * 1024
"""Largest offer accepted, bytes."""
SAMPLE_RATE = 24_000
"""Hz of the PCM16 mono audio the session logic works in."""
FRAME_SAMPLES = 480
"""Samples per 20 ms reply frame at :data:`SAMPLE_RATE`."""
CALL_ID = re.compile(r"rtc_[A-Za-z0-9]{1,64}")

_log = logging.getLogger(__name__)
_loopback_ice: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "emulator_loopback_ice", default=False)
_host_addresses = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    """aioice's host addresses, or only ``127.0.0.1`` while a loopback call gathers."""
    if _loopback_ice.get():
        return ["127.0.0.1"] if use_ipv4 else []
    return _host_addresses(use_ipv4, use_ipv6)


@contextlib.contextmanager
def loopback_ice() -> Iterator[None]:
    """Inside the block (this task and what it awaits), aioice gathers only ``127.0.0.1``:
    wrap ``setLocalDescription`` of a peer connection that must stay on loopback."""
    _install_loopback_switch()
    token = _loopback_ice.set(True)
    try:
        yield
    finally:
        _loopback_ice.reset(token)


def _install_loopback_switch() -> None:
    """Route aioice's address lookup through :func:`_get_host_addresses` (idempotent; it
    only changes anything inside a call's gathering with ``loopback_ice`` set)."""
    aioice.ice.get_host_addresses = _get_host_addresses


def _error(status: int, message: str, code: str, error_type: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": error_type, "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class ReplyTrack(MediaStreamTrack):
    """The call's outgoing audio: queued PCM16 mono 24 kHz played in real time in 20 ms
    frames, silence when nothing is queued."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()
        self._start: float | None = None
        self._timestamp = 0
        self.played_bytes = 0
        """Bytes of queued (non-silent) audio played so far."""

    def play(self, pcm: bytes) -> None:
        """Queue *pcm* (PCM16 mono 24 kHz) after what is already queued."""
        self._pending += pcm

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._timestamp += FRAME_SAMPLES
            delay = self._start + self._timestamp / SAMPLE_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # real-time pacing of the media clock
        size = FRAME_SAMPLES * 2
        chunk = bytes(self._pending[:size])
        del self._pending[:size]
        self.played_bytes += len(chunk)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk.ljust(size, b"\0"))
        frame.pts = self._timestamp
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame


class Call:
    """One WebRTC call: its peer connection, its session and its sideband sockets.

    Server events go to the ``oai-events`` data channel (queued until it opens) and to every
    sideband; client events from either, and the caller's audio, are handled one at a time in
    arrival order by the call's task.
    """

    def __init__(self, call_id: str, pc: RTCPeerConnection, handshake: Handshake,
                 record: SessionRecord, voice: Voice, *, sideband_refused: bool) -> None:
        self.id = call_id
        self.pc = pc
        self.record = record
        self.sideband_refused = sideband_refused
        self.reply = ReplyTrack()
        self.sidebands: set[ServerConnection] = set()
        self.ended = asyncio.Event()
        self._channel: Any = None
        self._undelivered: list[str] = []
        self._inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.session = Session(self, handshake, record, voice, audio_out=self.reply.play)
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawn(self._run())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- Transport -------------------------------------------------------------------------

    async def send(self, message: str) -> None:
        """Send one server event to the data channel and every sideband."""
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(message)
        elif channel is None:
            self._undelivered.append(message)
        for socket in list(self.sidebands):
            with contextlib.suppress(ConnectionClosed):
                await socket.send(message)

    # -- peer connection events ------------------------------------------------------------

    def on_datachannel(self, channel: Any) -> None:
        if channel.label != "oai-events" or self._channel is not None:
            return
        self._channel = channel
        for message in self._undelivered:
            channel.send(message)
        self._undelivered.clear()
        channel.on("message", lambda message: self._inbox.put_nowait(("event", message)))

    def on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._hear(track))

    async def _hear(self, track: MediaStreamTrack) -> None:
        """Decode the caller's audio to PCM16 mono 24 kHz, in order, into the inbox."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        while not self.ended.is_set():
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, av.AudioFrame)
            for out in resampler.resample(frame):
                pcm = bytes(out.planes[0])[: out.samples * 2]
                if pcm:
                    self._inbox.put_nowait(("audio", pcm))

    async def _run(self) -> None:
        await self.session.open()
        while True:
            kind, item = await self._inbox.get()
            if kind == "end":
                return
            try:
                if kind == "audio":
                    await self.session.append_audio(item)
                else:
                    await self.session.receive(item)
            except Exception:
                _log.exception("emulator call %s failed on a client event", self.id)

    # -- sideband --------------------------------------------------------------------------

    async def attach(self, socket: ServerConnection) -> None:
        """Serve one sideband socket until it or the call closes: it gets every event from
        now on (``session.created`` first, with the current session) and may send events."""
        self.sidebands.add(socket)
        self.record.sidebands += 1
        try:
            await socket.send(json.dumps(
                {"type": "session.created", "event_id": new_id("event"),
                 "session": self.session.state}, separators=(",", ":")))
            async for message in socket:
                self._inbox.put_nowait(("event", message))
        except ConnectionClosed:
            pass
        finally:
            self.sidebands.discard(socket)

    # -- end -------------------------------------------------------------------------------

    async def end(self, initiator: str) -> None:
        """Hang up (idempotent): close the peer connection and the sidebands (1000)."""
        if self.ended.is_set():
            return
        self.ended.set()
        record = self.record
        record.closed = True
        record.ended_at = time.time()
        record.close_initiator = initiator
        record.close_code, record.close_reason = 1000, "call ended"
        self._inbox.put_nowait(("end", None))
        await self.session.aclose()
        for socket in list(self.sidebands):
            with contextlib.suppress(ConnectionClosed):
                await socket.close(1000, "call ended")
        self.reply.stop()
        await self.pc.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()


class Calls:
    """The emulator's live calls and their HTTP endpoints.

    Args:
        records: where call records go (the emulator's session records).
        voice: what replies sound like.
        api_key: the key callers must present; ``None`` accepts any non-empty key.
        loopback_ice: offer only ``127.0.0.1`` candidates (tests; see the module docstring).
    """

    def __init__(self, records: Callable[[SessionRecord], None], voice: Voice,
                 api_key: str | None, *, loopback_ice: bool = False) -> None:
        self._add_record = records
        self._voice = voice
        self._api_key = api_key
        self._loopback_ice = loopback_ice
        self.live: dict[str, Call] = {}
        self.created = 0
        """POSTs to the calls path that reached the emulator (refused ones included)."""
        _install_loopback_switch()

    def get(self, call_id: str) -> Call | None:
        """The live call ``call_id``, if any."""
        return self.live.get(call_id) if CALL_ID.fullmatch(call_id) else None

    async def aclose(self) -> None:
        """Hang up every live call."""
        for call in list(self.live.values()):
            await call.end("emulator")
        self.live.clear()

    def _key(self, request: Request) -> tuple[str, str] | None:
        authorization = request.headers.get("authorization", "")
        if authorization[:7].lower() == "bearer " and authorization[7:].strip():
            return "bearer", authorization[7:].strip()
        key = request.headers.get("api-key", "").strip()
        return ("api-key", key) if key else None

    def _refuse_key(self, request: Request) -> Response | None:
        credential = self._key(request)
        if credential is None:
            return _error(401, "You didn't provide an API key.", "missing_api_key")
        if self._api_key is not None and not hmac.compare_digest(
                credential[1].encode(), self._api_key.encode()):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return None

    async def create(self, request: Request) -> Response:
        """``POST /v1/realtime/calls`` (see the module docstring)."""
        self.created += 1
        refusal = self._refuse_key(request)
        if refusal is not None:
            return refusal
        content_type = request.headers.get("content-type", "")
        session: JSON = {}
        if content_type.startswith("multipart/form-data"):
            async with request.form(max_files=0, max_fields=4,
                                    max_part_size=MAX_SDP_BYTES) as form:
                sdp_field, session_field = form.get("sdp"), form.get("session")
                sdp = sdp_field if isinstance(sdp_field, str) else None
                if isinstance(session_field, str):
                    try:
                        session = json.loads(session_field)
                    except ValueError:
                        return _error(400, "The session part is not JSON.", "invalid_json")
        else:
            body = await request.body()
            sdp = body.decode("utf-8", "replace") if len(body) <= MAX_SDP_BYTES else None
        if not sdp or not sdp.startswith("v=0"):
            return _error(400, "A valid SDP offer is required.", "invalid_offer")
        if not isinstance(session, dict):
            return _error(400, "The session must be an object.", "invalid_type")
        model = str(session.get("model") or request.query_params.get("model") or DEFAULT_MODEL)
        try:
            faults = parse_faults(model)
            patch = {"type": "realtime", **session, "model": model}
            check_session_patch(patch)
        except FaultError as exc:
            return _error(400, str(exc), "invalid_fault")
        except RequestError as exc:
            return _error(400, exc.message, exc.code or "invalid_value")
        if faults.refuse is not None:
            return _error(faults.refuse, f"emulator fault: call refused with HTTP "
                          f"{faults.refuse}", "fault_refuse", "emulator_fault")
        call_id = new_id("rtc").replace("_", "", 1).replace("rtc", "rtc_", 1)
        credential = self._key(request)
        assert credential is not None
        handshake = Handshake(
            path=request.url.path, query=dict(request.query_params), model=model,
            faults=faults, auth=credential[0],
            header_names=list(dict.fromkeys(k.lower() for k in request.headers)),
            user_agent=request.headers.get("user-agent"), openai_beta=None, subprotocols=[])
        record = SessionRecord(
            id=call_id, path=handshake.path, query=handshake.query, model=model,
            auth=handshake.auth, header_names=handshake.header_names,
            user_agent=handshake.user_agent, openai_beta=None, subprotocols=[],
            subprotocol=None, faults=fault_words(model), transport="webrtc")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: host candidates
        call = Call(call_id, pc, handshake, record, self._voice,
                    sideband_refused=faults.no_sideband)
        call.session.preset(patch)
        pc.on("datachannel", call.on_datachannel)
        pc.on("track", call.on_track)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and call.id in self.live:
                self.live.pop(call.id, None)
                await call.end("client")

        token = _loopback_ice.set(self._loopback_ice)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            pc.addTrack(call.reply)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises ValueError and others on unusable offers
            await call.end("emulator")
            return _error(400, f"The SDP offer could not be used: {type(exc).__name__}",
                          "invalid_offer")
        finally:
            _loopback_ice.reset(token)
        self.live[call_id] = call
        self._add_record(record)
        return Response(pc.localDescription.sdp, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/v1/realtime/calls/{call_id}"})

    async def hangup(self, request: Request) -> Response:
        """``POST /v1/realtime/calls/{call_id}/hangup``."""
        refusal = self._refuse_key(request)
        if refusal is not None:
            return refusal
        call_id = str(request.path_params["call_id"])
        call = self.get(call_id)
        if call is None:
            return _error(404, "Call not found.", "call_id_not_found")
        self.live.pop(call_id, None)
        call.record.hangups += 1
        await call.end("hangup")
        return JSONResponse({})


def calls_app(calls: Calls, records: Callable[[], JSON]) -> Starlette:
    """The calls port's ASGI app; ``records()`` answers ``GET /_emulator/calls``."""

    async def list_records(request: Request) -> Response:
        return JSONResponse(records())

    routes = [Route(path, calls.create, methods=["POST"]) for path in CALLS_PATHS]
    routes += [Route(f"{path}/{{call_id}}/hangup", calls.hangup, methods=["POST"])
               for path in CALLS_PATHS]
    routes.append(Route(CALLS_RECORDS_PATH, list_records))
    # A page that talks to the emulator directly (tests, the emulator command) is
    # cross-origin and sends Authorization: it needs CORS, and Location exposed.
    cors = Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["POST", "GET"],
                      allow_headers=["Authorization", "Content-Type", "X-OpenAI-Agents-SDK",
                                     "api-key"], expose_headers=["Location"])
    return Starlette(routes=routes, middleware=[cors])
