"""One accepted emulator connection: its event loop and one handler per client event type.

* ``session.created`` first (:func:`gateway.emulator.schema.default_session`).
  ``session.update`` is validated and merged (:mod:`gateway.emulator.schema`) and answered
  with ``session.updated`` carrying the whole session; an invalid update gets an
  ``error`` event and changes nothing.
* ``input_audio_buffer.append|commit|clear``, ``conversation.item.create|retrieve|
  truncate|delete``, ``response.create|cancel`` and ``output_audio_buffer.clear`` are
  served; any other ``type``, a non-JSON text frame or a binary frame gets an ``error``
  event (``invalid_request_error``) and the session goes on.
* Server VAD (:mod:`gateway.emulator.vad`): the first speech frame sends
  ``input_audio_buffer.speech_started`` (``audio_start_ms`` = frame start -
  ``prefix_padding_ms``, not before the buffer start); a stop sends ``speech_stopped``
  (``audio_end_ms`` = end of the last silent frame), commits the buffer **up to that
  point** and, if ``create_response``, starts a response.  The committed item holds the
  audio from ``audio_start_ms`` to ``audio_end_ms`` (between turns the buffer keeps only
  ``prefix_padding_ms``).  With ``interrupt_response`` a speech start cancels the
  response in flight (status ``cancelled``, reason ``turn_detected``).  ``audio_*_ms``
  count from the first byte appended in the session.  G.711 input is buffered but never
  triggers VAD; ``idle_timeout_ms`` and ``eagerness`` are accepted and ignored.
* A commit (manual or VAD) sends ``input_audio_buffer.committed``, then
  ``conversation.item.added`` and ``conversation.item.done`` for the user audio item, then,
  if ``audio.input.transcription`` is set,
  ``conversation.item.input_audio_transcription.completed`` whose transcript is
  ``"[emulated transcript of <ms> ms of audio]"``.  A manual commit of less than 100 ms
  fails with ``input_audio_buffer_commit_empty``.
* ``response.create`` streams one response (:mod:`gateway.emulator.responses`; one at a
  time: a second gets ``conversation_already_has_active_response`` unless the first is
  being cancelled); ``response.cancel`` cancels it (reason ``client_cancelled``).

Faults (:mod:`gateway.emulator.faults`) that act after the handshake are applied here.
Nothing is logged per frame.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from websockets.typing import Data

from gateway.emulator.conversation import Conversation, Item, build_item, decode_audio
from gateway.emulator.handshake import (
    Handshake,
)
from gateway.emulator.plan import plan_response
from gateway.emulator.records import SessionRecord
from gateway.emulator.responses import Responses
from gateway.emulator.schema import (
    JSON,
    PCM_BYTES_PER_MS,
    RequestError,
    bytes_per_ms,
    check_session_patch,
    default_session,
    invalid_value,
    merge_session,
    missing,
    new_id,
    require_object,
)
from gateway.emulator.tokens import transcription_usage
from gateway.emulator.vad import Vad
from gateway.emulator.voice import Voice

__all__ = ["AudioOut", "Session", "Transport"]

_log = logging.getLogger(__name__)

_MIN_COMMIT_MS = 100
_CALL_AUDIO_EVENTS = frozenset({"response.output_audio.delta", "response.output_audio.done"})
"""Server events that a WebRTC call plays on its audio track instead of sending."""


@dataclass
class _Incoming:
    event: JSON | None
    audio: bytes | None = None
    error: RequestError | None = None


_Handler: TypeAlias = Callable[[JSON, _Incoming], Awaitable[None]]


class Transport(Protocol):
    """Where a session's server events go: a WebSocket, or a WebRTC call's data channel
    (and its sideband sockets, :mod:`gateway.emulator.webrtc`)."""

    async def send(self, message: str) -> None:
        """Send one server event (JSON text)."""
        ...


AudioOut: TypeAlias = Callable[[bytes], None]
"""Plays decoded reply audio (PCM16 mono 24 kHz bytes) on a call's audio track."""


class Session:
    """One session's protocol state and one handler per client event type, on any
    :class:`Transport`.

    Args:
        transport: where server events go.
        handshake: the parsed handshake (model, faults).
        record: its live record (updated as frames come and go).
        voice: what spoken replies sound like (shared by the emulator's sessions).
        audio_out: for WebRTC calls: reply audio is played through it instead of being
            sent as ``response.output_audio.delta`` events (as OpenAI does on a call,
            which announces it with ``output_audio_buffer.started``/``stopped``).
    """

    def __init__(
        self,
        transport: Transport,
        handshake: Handshake,
        record: SessionRecord,
        voice: Voice,
        *,
        audio_out: AudioOut | None = None,
    ) -> None:
        self._transport = transport
        self._audio_out = audio_out
        self._handshake = handshake
        self._faults = handshake.faults
        self.record = record
        self._session = default_session(record.id, handshake.model)
        self._conversation = Conversation()
        self._responses = Responses(self._send, self._conversation, record, self._faults, voice)
        self._buffer = bytearray()
        self._buffer_start = 0
        """Session-timeline byte offset of ``_buffer[0]``."""
        self._written = 0
        self._vad = Vad()
        self._speech_item_id: str | None = None
        self._aborted = False
        self._playing: str | None = None
        """The response whose audio a call is playing, if any."""
        self._handlers: dict[str, _Handler] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_audio_append,
            "input_audio_buffer.commit": self._on_audio_commit,
            "input_audio_buffer.clear": self._on_audio_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.retrieve": self._on_item_retrieve,
            "conversation.item.truncate": self._on_item_truncate,
            "conversation.item.delete": self._on_item_delete,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
            "output_audio_buffer.clear": self._on_output_audio_clear,
        }

    # ------------------------------------------------------------------ frames

    def _ingest(self, message: Data) -> _Incoming:
        """Parse and record one client frame (counts, appended audio hash)."""
        record = self.record
        record.frames_received += 1
        record.bytes_received += len(message)
        if isinstance(message, bytes):
            record.binary_frames += 1
            return _Incoming(
                None,
                error=RequestError(
                    "invalid_frame",
                    "Binary WebSocket frames are not supported; send JSON events as text.",
                ),
            )
        try:
            event = json.loads(message)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            record.invalid_frames += 1
            return _Incoming(
                None,
                error=RequestError(
                    "invalid_json",
                    "The event could not be parsed: expected a JSON object with a string 'type'.",
                ),
            )
        kind = event["type"]
        record.client_events[kind] = record.client_events.get(kind, 0) + 1
        incoming = _Incoming(event)
        if kind == "input_audio_buffer.append":
            try:
                audio = decode_audio(event.get("audio"), "audio")
            except RequestError as exc:
                incoming.error = exc
            else:
                incoming.audio = audio
                record.add_audio(audio)
        return incoming

    async def _dispatch(self, incoming: _Incoming) -> None:
        event = incoming.event
        client_event_id = None
        if event is not None and isinstance(event.get("event_id"), str):
            client_event_id = event["event_id"]
        try:
            if incoming.error is not None:
                raise incoming.error
            assert event is not None
            handler = self._handlers.get(event["type"])
            if handler is None:
                raise invalid_value("type", event["type"], tuple(self._handlers))
            await handler(event, incoming)
        except RequestError as exc:
            await self._send_error(
                exc.code, exc.message, param=exc.param, client_event_id=client_event_id,
                error_type=exc.error_type,
            )

    async def _send(self, event: JSON) -> None:
        kind = str(event["type"])
        if (self._audio_out is not None and kind in _CALL_AUDIO_EVENTS
                and await self._play(event)):
            return
        payload = {"type": kind, "event_id": new_id("event"), **event}
        counts = self.record.server_events
        counts[kind] = counts.get(kind, 0) + 1
        await self._transport.send(
            json.dumps(payload, separators=(",", ":"), ensure_ascii=False))

    async def _play(self, event: JSON) -> bool:
        """A call's reply audio goes to its track; the data channel hears of it as
        ``output_audio_buffer.started`` (first chunk) and ``.stopped`` (audio done).
        True when *event* was consumed (a delta), False when it is still to be sent."""
        assert self._audio_out is not None
        response_id = str(event.get("response_id", ""))
        if event["type"] == "response.output_audio.delta":
            if self._playing != response_id:
                self._playing = response_id
                await self._send({"type": "output_audio_buffer.started",
                                  "response_id": response_id})
            self._audio_out(base64.b64decode(str(event["delta"])))
            return True
        if self._playing == response_id:
            self._playing = None
            await self._send({"type": "output_audio_buffer.stopped",
                              "response_id": response_id})
        return False

    async def _send_error(
        self,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        client_event_id: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        await self._send(
            {
                "type": "error",
                "error": {
                    "type": error_type,
                    "code": code,
                    "message": message,
                    "param": param,
                    "event_id": client_event_id,
                },
            }
        )

    # ------------------------------------------------------------------ session

    @property
    def _input_config(self) -> JSON:
        audio_in: JSON = self._session["audio"]["input"]
        return audio_in

    @property
    def _input_bpm(self) -> int:
        return bytes_per_ms(self._input_config["format"])

    @property
    def _output_bpm(self) -> int:
        return bytes_per_ms(self._session["audio"]["output"]["format"])

    async def _on_session_update(self, event: JSON, incoming: _Incoming) -> None:
        if "session" not in event:
            raise missing("session")
        patch = require_object(event["session"], "session")
        check_session_patch(patch)
        old_detection = self._input_config.get("turn_detection")
        self._session = merge_session(self._session, patch)
        if self._input_config.get("turn_detection") != old_detection:
            self._vad.reset(self._written)
            self._speech_item_id = None
        await self._send({"type": "session.updated", "session": self._session})

    # ------------------------------------------------------------------ input audio

    async def _on_audio_append(self, event: JSON, incoming: _Incoming) -> None:
        audio = incoming.audio
        assert audio is not None
        self._buffer += audio
        self._written += len(audio)
        detection = self._input_config.get("turn_detection")
        if detection is None or self._input_config["format"].get("type") != "audio/pcm":
            self._vad.reset(self._written)
            return
        for kind, frame_start, frame_end in self._vad.feed(audio, detection):
            if kind == "started":
                await self._speech_started(detection, frame_start)
            else:
                await self._speech_stopped(detection, frame_end)
        if not self._vad.speaking:
            # Between turns keep only what a speech start could still claim as padding.
            padding = int(detection.get("prefix_padding_ms", 300)) * PCM_BYTES_PER_MS
            self._drop_buffer_before(self._vad.position - padding)

    def _drop_buffer_before(self, offset: int) -> None:
        """Discard buffered audio before session-timeline byte *offset*."""
        if offset > self._buffer_start:
            del self._buffer[: offset - self._buffer_start]
            self._buffer_start = offset

    async def _speech_started(self, detection: JSON, frame_start: int) -> None:
        padding = int(detection.get("prefix_padding_ms", 300)) * PCM_BYTES_PER_MS
        start = max(self._buffer_start, frame_start - padding)
        self._drop_buffer_before(start)
        self._speech_item_id = new_id("item")
        await self._send(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": start // PCM_BYTES_PER_MS,
                "item_id": self._speech_item_id,
            }
        )
        active = self._responses.active
        if (
            active is not None
            and detection.get("interrupt_response", True)
            and active.plan.in_conversation
            and active.cancel_reason is None
        ):
            active.cancel_reason = "turn_detected"

    async def _speech_stopped(self, detection: JSON, frame_end: int) -> None:
        item_id = self._speech_item_id or new_id("item")
        await self._send(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": frame_end // PCM_BYTES_PER_MS,
                "item_id": item_id,
            }
        )
        committed = bytes(self._buffer[: frame_end - self._buffer_start])
        del self._buffer[: frame_end - self._buffer_start]
        self._buffer_start = frame_end
        await self._commit(committed, item_id)
        if detection.get("create_response", True):
            active = self._responses.active
            if active is None or active.cancel_reason is not None:
                self._start_response({})

    async def _on_audio_commit(self, event: JSON, incoming: _Incoming) -> None:
        size = len(self._buffer)
        if size < _MIN_COMMIT_MS * self._input_bpm:
            raise RequestError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{_MIN_COMMIT_MS}ms of audio, but buffer only has "
                f"{size / self._input_bpm:.2f}ms of audio.",
            )
        committed = bytes(self._buffer)
        self._buffer.clear()
        self._buffer_start = self._written
        self._vad.reset(self._written)
        item_id = self._speech_item_id or new_id("item")
        await self._commit(committed, item_id)

    async def _commit(self, audio: bytes, item_id: str) -> None:
        """Turn *audio* into a user item and announce it (committed, added, done)."""
        self._speech_item_id = None
        data: JSON = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        bpm = self._input_bpm
        previous = self._conversation.append(Item(data=data, audio_parts={0: (len(audio), bpm)}))
        await self._send(
            {
                "type": "input_audio_buffer.committed",
                "previous_item_id": previous,
                "item_id": item_id,
            }
        )
        await self._send(
            {"type": "conversation.item.added", "previous_item_id": previous, "item": data}
        )
        await self._send(
            {"type": "conversation.item.done", "previous_item_id": previous, "item": data}
        )
        transcription = self._input_config.get("transcription")
        if transcription is None:
            return
        transcript = f"[emulated transcript of {len(audio) // bpm} ms of audio]"
        data["content"][0]["transcript"] = transcript
        usage = transcription_usage(len(audio), bpm, transcription.get("prompt") or "", transcript)
        self.record.add_transcription_usage(usage)
        await self._send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "content_index": 0,
                "transcript": transcript,
                "usage": usage,
            }
        )

    async def _on_audio_clear(self, event: JSON, incoming: _Incoming) -> None:
        self._buffer.clear()
        self._buffer_start = self._written
        self._vad.reset(self._written)
        self._speech_item_id = None
        await self._send({"type": "input_audio_buffer.cleared"})

    async def _on_output_audio_clear(self, event: JSON, incoming: _Incoming) -> None:
        await self._send(
            {"type": "output_audio_buffer.cleared", "response_id": self._responses.last_id or ""}
        )

    # ------------------------------------------------------------------ conversation

    async def _on_item_create(self, event: JSON, incoming: _Incoming) -> None:
        if "item" not in event:
            raise missing("item")
        item = build_item(event["item"], "item", self._input_bpm, self._output_bpm)
        previous = self._conversation.insert(item, event.get("previous_item_id"))
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self._send({"type": kind, "previous_item_id": previous, "item": item.data})

    async def _on_item_retrieve(self, event: JSON, incoming: _Incoming) -> None:
        item = self._conversation.get(event.get("item_id"))
        await self._send({"type": "conversation.item.retrieved", "item": item.data})

    async def _on_item_delete(self, event: JSON, incoming: _Incoming) -> None:
        item = self._conversation.delete(event.get("item_id"))
        await self._send({"type": "conversation.item.deleted", "item_id": item.id})

    async def _on_item_truncate(self, event: JSON, incoming: _Incoming) -> None:
        content_index = event.get("content_index", 0)
        audio_end_ms = event.get("audio_end_ms")
        item = self._conversation.truncate(event.get("item_id"), content_index, audio_end_ms)
        await self._send(
            {
                "type": "conversation.item.truncated",
                "item_id": item.id,
                "content_index": content_index,
                "audio_end_ms": audio_end_ms,
            }
        )

    # ------------------------------------------------------------------ responses

    async def _on_response_create(self, event: JSON, incoming: _Incoming) -> None:
        params = event.get("response")
        if params is None:
            params = {}
        params = require_object(params, "response")
        active = self._responses.active
        if active is not None and active.cancel_reason is None:
            raise RequestError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {active.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        self._start_response(params)

    async def _on_response_cancel(self, event: JSON, incoming: _Incoming) -> None:
        active = self._responses.active
        wanted = event.get("response_id")
        if active is None or active.cancel_reason is not None or (
            wanted is not None and wanted != active.id
        ):
            raise RequestError(
                "response_cancel_not_active", "Cancellation failed: no active response found."
            )
        active.cancel_reason = "client_cancelled"

    def _start_response(self, params: JSON) -> None:
        """Plan a response and start streaming it.

        Raises:
            RequestError: invalid ``response.create`` parameters.
        """
        self._responses.start(plan_response(params, self._session, self._conversation))

    # ------------------------------------------------------------------ transport-neutral API

    @property
    def state(self) -> JSON:
        """The session object now (as in ``session.created`` / ``session.updated``)."""
        return self._session

    def preset(self, patch: JSON) -> None:
        """Apply a checked session patch before :meth:`open` (a call's ``session`` part).

        Raises:
            RequestError: the patch is invalid.
        """
        check_session_patch(patch)
        self._session = merge_session(self._session, patch)

    async def open(self) -> None:
        """Send ``session.created`` (the first server event of every session)."""
        await self._send({"type": "session.created", "session": self._session})

    async def receive(self, message: Data) -> None:
        """Record and answer one client message (a text frame or data-channel message)."""
        await self._dispatch(self._ingest(message))

    async def append_audio(self, audio: bytes) -> None:
        """Take decoded input audio (PCM16 mono 24 kHz) from a call's audio track: recorded
        (hash, count) and buffered exactly as an ``input_audio_buffer.append`` of it."""
        self.record.add_audio(audio)
        await self._on_audio_append({}, _Incoming(None, audio=audio))

    async def aclose(self) -> None:
        """Cancel the responses in flight."""
        await self._responses.aclose()
