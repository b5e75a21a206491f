"""The Realtime protocol emulator: a stand-in upstream for development and tests (CONTRACT §7).

It speaks the **GA** OpenAI Realtime WebSocket protocol (event shapes of openai-python
``src/openai/types/realtime/*.py``) well enough for the official SDKs (openai-python
``client.realtime.connect``, openai-node, @openai/agents, openai-agents-python) to hold a
whole conversation with it: ``session.created``/``session.update``, audio appends with an
energy VAD, commits, text items, streamed audio/text responses, function calls, cancels.
It is built on the ``websockets`` asyncio server; one :class:`Emulator` serves many
concurrent sessions, each of which may be told to misbehave (see *Faults*).

Endpoints (one port)
--------------------
* ``GET /v1/realtime?model=M`` (OpenAI shape) and ``GET /openai/v1/realtime?model=D``
  (Azure GA shape, ``D`` = deployment): the WebSocket.  ``call_id=`` or ``intent=`` may
  stand in for ``model`` (the session then reports model ``gpt-realtime``); with none of
  the three the handshake is refused with HTTP 400.  Other paths get HTTP 404.
* ``GET /_emulator/sessions``: JSON ``{"connections": N, "sessions": [record, ...]}``
  where ``connections`` counts every WebSocket handshake attempted on the two paths above
  (refused ones included) and each record is :meth:`SessionRecord.to_dict`.

Authentication
--------------
The key is read from ``Authorization: Bearer <key>``, else ``api-key: <key>``, else the
subprotocol ``openai-insecure-api-key.<key>`` (browser shape).  None → HTTP 401
``missing_api_key``; a key different from the expected one (``api_key`` given to
:class:`Emulator`; ``None`` accepts any non-empty key) → HTTP 401 ``invalid_api_key``.
Refusals carry OpenAI's JSON error body ``{"error": {"message", "type", "code",
"param"}}``.  The subprotocol ``realtime`` is echoed when offered, nothing else is.
A request with ``OpenAI-Beta: realtime=v1`` is accepted and then, as OpenAI does since
2026-05, sent one ``error`` event (code ``beta_api_shape_disabled``) and closed with
4000 ``invalid_request_error.beta_api_shape_disabled``.

Session behaviour
-----------------
* ``session.created`` first: a GA session object (``type: "realtime"``, the model,
  ``audio/pcm`` 24 kHz in and out, ``server_vad`` turn detection, voice ``marin``).
* ``session.update`` is validated like the GA API (``session.type`` is required and must
  be ``"realtime"``; unknown or beta-shaped keys such as ``modalities`` are refused with
  ``unknown_parameter``), merged (``audio.input``/``audio.output`` keys one by one,
  everything else replaced) and answered with ``session.updated`` carrying the whole
  session; an invalid update gets an ``error`` event and changes nothing.
* ``input_audio_buffer.append|commit|clear``, ``conversation.item.create|retrieve|
  truncate|delete``, ``response.create|cancel`` and ``output_audio_buffer.clear`` are
  served; any other ``type``, a non-JSON text frame or a binary frame gets an ``error``
  event (``invalid_request_error``) and the session goes on.
* Server VAD (``server_vad``; ``semantic_vad`` behaves the same): appended ``audio/pcm``
  is cut into 20 ms frames; a frame is speech when its RMS >= ``threshold`` * 1000
  (PCM16 units; default 0.5 → 500).  The first speech frame sends
  ``input_audio_buffer.speech_started`` (``audio_start_ms`` = frame start -
  ``prefix_padding_ms``, not before the buffer start); ``silence_duration_ms`` (default
  500) of non-speech frames sends ``speech_stopped`` (``audio_end_ms`` = end of the last
  silent frame), commits the buffer **up to that point** and, if ``create_response``,
  starts a response.  The committed item holds the audio from ``audio_start_ms`` to
  ``audio_end_ms`` (between turns the buffer keeps only ``prefix_padding_ms``).  With
  ``interrupt_response`` a speech start cancels the response in flight (status
  ``cancelled``, reason ``turn_detected``).  ``audio_*_ms`` count from the first byte
  appended in the session.  G.711 input is buffered but never triggers VAD;
  ``idle_timeout_ms`` and ``eagerness`` are accepted and ignored.
* A commit (manual or VAD) sends ``input_audio_buffer.committed``, then
  ``conversation.item.added`` and ``conversation.item.done`` for the user audio item, then,
  if ``audio.input.transcription`` is set,
  ``conversation.item.input_audio_transcription.completed`` whose transcript is
  ``"[emulated transcript of <ms> ms of audio]"``.  A manual commit of less than 100 ms
  fails with ``input_audio_buffer_commit_empty``.
* ``response.create`` streams one response (one at a time; a second gets
  ``conversation_already_has_active_response`` unless the first is being cancelled):
  ``response.created``, ``response.output_item.added``, ``conversation.item.added``,
  ``response.content_part.added``, interleaved ``response.output_audio_transcript.delta``
  (one per word) and ``response.output_audio.delta`` (100 ms of PCM16 each, a quiet
  400 Hz tone; silence bytes for G.711 output), ``response.output_audio.done``,
  ``response.output_audio_transcript.done``, ``response.content_part.done``,
  ``response.output_item.done``, ``conversation.item.done``, ``response.done``.  With
  ``output_modalities: ["text"]`` the text events (``response.output_text.delta|done``)
  replace the audio ones.  ``conversation: "none"`` keeps the output out of the
  conversation (no ``conversation.item.*`` events).
* What is said: after a ``function_call_output`` item, ``"The <name> function returned:
  <output>"``; else, after user text, ``"You said: <text>"``; after user audio, ``"I heard
  <s> seconds of audio."``; else a greeting (quoted text is cut to 200 characters).  The
  reply's audio lasts 50 ms per character of its transcript, within 200 ms … 10 s.
* Function calls: when function tools are declared (``session.tools`` or
  ``response.tools``), ``tool_choice`` is not ``"none"``, the input does not end with a
  ``function_call_output``, and the latest user message's text contains a tool's name
  (case-insensitive; the first declared wins) — or ``tool_choice`` forces one — the
  response is a ``function_call`` item: ``response.output_item.added``,
  ``conversation.item.added``, ``response.function_call_arguments.delta`` …,
  ``response.function_call_arguments.done``, ``response.output_item.done``,
  ``conversation.item.done``, ``response.done``.  Arguments fill each *required*
  parameter by JSON-schema type (string → the user text, number/integer → 1, boolean →
  true, array → [], object → {}, enum → its first value).
* ``max_output_tokens`` is validated and echoed, not enforced; instructions and ``prompt``
  do not change what is said.
* ``response.cancel`` ends the response in flight after the chunk being sent: the open
  parts are closed with what was sent so far, items are ``incomplete`` and
  ``response.done`` has status ``cancelled`` (reason ``client_cancelled``).

Token accounting (exact, per ``response.done``)
-----------------------------------------------
With ``T(s) = ceil(len(s) / 4)`` (``len`` in code points), ``Ain(b) = ceil(ms / 100)`` and
``Aout(b) = ceil(ms / 50)`` where ``ms = b / bytes_per_ms`` (48 for ``audio/pcm`` PCM16
24 kHz, so ``Ain = ceil(b / 4800)`` and ``Aout = ceil(b / 2400)``; 8 for G.711):

* Input = every item of the response's input (the whole conversation, or
  ``response.input``), no instructions, no tools.  Per item: user/system text part →
  ``T(text)`` text tokens; user audio part → ``Ain(bytes)`` audio tokens (the committed
  buffer, or the decoded ``audio`` of a created item); image part → 85 image tokens;
  assistant audio part → ``Ain(bytes still in the item)`` audio tokens (after any
  truncate; a part without audio counts ``T(transcript)`` text tokens); assistant text
  part → ``T(text)``; ``function_call`` → ``T(name + arguments)``;
  ``function_call_output`` → ``T(output)``.
* ``cached_tokens`` = the tokens of the items that were already part of an earlier
  response's input in this session (``cached_tokens_details`` splits them by kind).  They
  are included in ``text_tokens``/``audio_tokens``/``image_tokens`` and ``input_tokens``
  (cached ⊂ input, as in the OpenAI API).
* Output: an audio reply → ``Aout(bytes sent)`` audio + ``T(transcript sent)`` text; a
  text reply → ``T(text sent)``; a function call → ``T(name + arguments sent)``.  A
  cancelled response counts only what it sent.
* ``input_tokens = text + audio + image``; ``output_tokens = text + audio``;
  ``total_tokens = input_tokens + output_tokens``.
* Transcription usage (``{"type": "tokens", ...}``): ``input_token_details.audio_tokens``
  = ``Ain(item bytes)``, ``text_tokens`` = ``T(transcription prompt)``, ``output_tokens``
  = ``T(transcript)``.

Faults (per connection, selected by the ``model`` query value)
--------------------------------------------------------------
Several may be combined with commas (``model=fault-slow,fault-usage-10``).

* ``fault-refuse-<status>``: answer the handshake with HTTP ``<status>`` (200…599, not
  101) and a JSON error body (``Retry-After: 1`` on 429 and 503).
* ``fault-stall-handshake``: read the request and never answer (until the emulator shuts
  down, or its ``open_timeout`` drops the TCP connection).
* ``fault-close-<code>``: after the first client frame, close with ``<code>`` and reason
  ``emulator close <code>`` (the frame itself is not answered).
* ``fault-drop``: after the first client frame, abort the TCP connection (no close
  frame).
* ``fault-stall``: after ``session.created`` never send anything again (pings are still
  answered, frames are still recorded).
* ``fault-echo``: after ``session.created``, send every client frame back verbatim (text
  as text, binary as binary) and nothing else.
* ``fault-usage-<n>``: every ``response.done`` reports ``n`` extra input text tokens.
* ``fault-slow``: pace responses in real time (a 100 ms audio chunk every 100 ms, one
  text/argument delta every 50 ms), so cancels and barge-ins can be tested.

An unknown ``fault-*`` word or an unusable value refuses the handshake with HTTP 400.

Records
-------
Each accepted session has a :class:`SessionRecord` (live while the session runs): the
handshake (path, query with credential parameters redacted, model, which carrier held
the key, header names, ``User-Agent``, ``OpenAI-Beta``, offered subprotocols with
credentials redacted), frame counts, client events by type, server events by type, the
number and **SHA-256 of all audio bytes appended** (decoded, concatenated in order),
usage totals sent and how the connection closed.  The key itself is never recorded or
logged, and nothing is logged per frame.
"""

from __future__ import annotations

import array
import asyncio
import base64
import binascii
import copy
import dataclasses
import hashlib
import hmac
import http
import json
import logging
import math
import operator
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Data, Subprotocol

__all__ = [
    "REALTIME_PATHS",
    "SESSIONS_PATH",
    "Emulator",
    "FaultError",
    "Faults",
    "SessionRecord",
    "input_audio_tokens",
    "output_audio_tokens",
    "parse_faults",
    "serve_forever",
    "text_tokens",
]

JSON: TypeAlias = dict[str, Any]

REALTIME_PATHS = ("/v1/realtime", "/openai/v1/realtime")
"""WebSocket paths: OpenAI shape and Azure GA shape."""

SESSIONS_PATH = "/_emulator/sessions"
"""HTTP path serving the session records as JSON."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest client message accepted, bytes (Realtime appends reach 15 MiB)."""

PCM_BYTES_PER_MS = 48
"""Bytes per millisecond of ``audio/pcm`` (PCM16, 24 kHz, mono)."""

G711_BYTES_PER_MS = 8
"""Bytes per millisecond of ``audio/pcmu`` and ``audio/pcma`` (8 kHz, 8 bit)."""

TEXT_CHARS_PER_TOKEN = 4
INPUT_AUDIO_MS_PER_TOKEN = 100
OUTPUT_AUDIO_MS_PER_TOKEN = 50
IMAGE_TOKENS = 85
"""Input tokens charged per image content part."""

DEFAULT_MODEL = "gpt-realtime"
DEFAULT_INSTRUCTIONS = "You are the realtime-gateway protocol emulator. Answer briefly."
DEFAULT_VOICE = "marin"
SESSION_SECONDS = 3600

_log = logging.getLogger(__name__)

_FRAME_MS = 20
_AUDIO_CHUNK_MS = 100
_TEXT_DELTA_PACE_SECONDS = 0.05
_MIN_COMMIT_MS = 100
_VAD_RMS_SCALE = 1000.0
_REPLY_MS_PER_CHAR = 50
_REPLY_MIN_MS = 200
_REPLY_MAX_MS = 10_000
_QUOTE_CHARS = 200
_TONE_HZ = 400
_TONE_AMPLITUDE = 1000
_ARGUMENT_DELTA_CHARS = 16
_REDACTED = "<redacted>"
_CREDENTIAL_QUERY_KEYS = frozenset({"api-key", "api_key", "authorization", "key", "token"})
_INSECURE_KEY_PREFIX = "openai-insecure-api-key."
_BETA_MESSAGE = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)
_BETA_CLOSE_CODE = 4000
_BETA_CLOSE_REASON = "invalid_request_error.beta_api_shape_disabled"

_AUDIO_FORMATS: dict[str, int] = {
    "audio/pcm": PCM_BYTES_PER_MS,
    "audio/pcmu": G711_BYTES_PER_MS,
    "audio/pcma": G711_BYTES_PER_MS,
}
_G711_SILENCE = {"audio/pcmu": 0xFF, "audio/pcma": 0xD5}

_SESSION_KEYS = frozenset(
    {
        "type", "audio", "include", "instructions", "max_output_tokens", "model",
        "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice",
        "tools", "tracing", "truncation",
    }
)
_SESSION_READ_ONLY_KEYS = frozenset({"id", "object", "expires_at"})
_RESPONSE_KEYS = frozenset(
    {
        "audio", "conversation", "input", "instructions", "max_output_tokens", "metadata",
        "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice",
        "tools",
    }
)
_SERVER_VAD_DEFAULTS: JSON = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
_SEMANTIC_VAD_DEFAULTS: JSON = {
    "type": "semantic_vad",
    "eagerness": "auto",
    "create_response": True,
    "interrupt_response": True,
}
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


# --------------------------------------------------------------------------- token math


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def text_tokens(text: str) -> int:
    """Tokens the emulator charges for *text*: ``ceil(len(text) / 4)`` (code points)."""
    return _ceil_div(len(text), TEXT_CHARS_PER_TOKEN)


def input_audio_tokens(n_bytes: int, bytes_per_ms: int = PCM_BYTES_PER_MS) -> int:
    """Input audio tokens for *n_bytes* of audio: ``ceil(ms / 100)``.

    *bytes_per_ms* is 48 for PCM16 24 kHz (so ``ceil(n_bytes / 4800)``), 8 for G.711.
    """
    return _ceil_div(n_bytes, bytes_per_ms * INPUT_AUDIO_MS_PER_TOKEN)


def output_audio_tokens(n_bytes: int, bytes_per_ms: int = PCM_BYTES_PER_MS) -> int:
    """Output audio tokens for *n_bytes* of audio: ``ceil(ms / 50)`` (``ceil(n / 2400)``)."""
    return _ceil_div(n_bytes, bytes_per_ms * OUTPUT_AUDIO_MS_PER_TOKEN)


# --------------------------------------------------------------------------- faults


class FaultError(ValueError):
    """A ``model`` value names an unknown fault or an unusable fault parameter."""


@dataclass(frozen=True)
class Faults:
    """The misbehaviours selected for one connection (see the module docstring).

    Attributes:
        refuse: HTTP status to refuse the handshake with, or ``None``.
        stall_handshake: never answer the handshake.
        close: close code to send after the first client frame, or ``None``.
        drop: abort the TCP connection after the first client frame.
        stall: send nothing after ``session.created``.
        echo: echo client frames verbatim.
        extra_input_text_tokens: added to every ``response.done``'s input text tokens.
        slow: pace responses in real time.
    """

    refuse: int | None = None
    stall_handshake: bool = False
    close: int | None = None
    drop: bool = False
    stall: bool = False
    echo: bool = False
    extra_input_text_tokens: int = 0
    slow: bool = False

    @property
    def active(self) -> bool:
        """True when any fault is selected."""
        return self != Faults()


def parse_faults(model: str) -> Faults:
    """Parse the fault words of a ``model`` query value (comma-separated).

    Words not starting with ``fault-`` are ignored (``gpt-realtime`` has no faults).

    Raises:
        FaultError: an unknown ``fault-*`` word, or a status/code/count out of range.
    """
    values: dict[str, Any] = {}
    for word in (part.strip() for part in model.split(",")):
        if not word.startswith("fault-"):
            continue
        name = word[len("fault-") :]
        if name in ("stall-handshake", "drop", "stall", "echo", "slow"):
            values[name.replace("-", "_")] = True
            continue
        kind, _, number = name.rpartition("-")
        if kind not in ("refuse", "close", "usage") or not number.isdigit():
            raise FaultError(f"unknown emulator fault {word!r}")
        value = int(number)
        if kind == "refuse":
            if not 200 <= value <= 599 or value == 101:
                raise FaultError(f"fault-refuse needs an HTTP status 200..599, got {value}")
            values["refuse"] = value
        elif kind == "close":
            if value not in _SENDABLE_CLOSE_CODES and not 3000 <= value <= 4999:
                raise FaultError(f"fault-close needs a sendable close code, got {value}")
            values["close"] = value
        else:
            values["extra_input_text_tokens"] = value
    return Faults(**values)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SessionRecord:
    """What the emulator saw of one accepted WebSocket session (a snapshot).

    Attributes:
        id: the session id (``sess_…``, as in ``session.created``).
        path: request path without the query.
        query: query parameters (last value wins); credential parameters are redacted.
        model: the ``model`` query value (``gpt-realtime`` for ``call_id``/``intent``).
        auth: which carrier held the key: ``"bearer"``, ``"api-key"`` or
            ``"subprotocol"``.  Never the key itself.
        header_names: request header names, lower-case, first occurrence order.
        user_agent: the ``User-Agent`` header, if any.
        openai_beta: the ``OpenAI-Beta`` header, if any.
        subprotocols: offered subprotocols; credential-bearing ones redacted.
        subprotocol: the subprotocol selected (``"realtime"`` or ``None``).
        faults: the ``fault-*`` words in effect.
        started_at, ended_at: UNIX time in seconds; ``ended_at`` is ``None`` while open.
        frames_received, bytes_received: client frames and their payload bytes.
        binary_frames, invalid_frames: client binary frames; text frames that were not
            a JSON object with a string ``type``.
        client_events: client events by ``type`` (well-formed JSON events only).
        server_events: events sent by ``type`` (echoed frames are not counted).
        audio_bytes: bytes of audio appended (decoded from base64), cleared ones included.
        audio_sha256: SHA-256 (hex) of all appended audio bytes concatenated in order.
        usage: sums over every ``response.done`` sent: ``responses``, ``input_tokens``,
            ``output_tokens``, ``total_tokens`` and the CONTRACT §6 kinds ``input_text``,
            ``input_audio``, ``input_image``, ``input_cached``, ``output_text``,
            ``output_audio``.
        transcription_usage: sums over transcription ``completed`` events:
            ``transcriptions``, ``input_tokens``, ``output_tokens``, ``total_tokens``,
            ``input_text``, ``input_audio``.
        closed: whether the connection is closed.
        close_code, close_reason: the close frame that ended it (1006 and ``""`` when
            the TCP connection ended without one); ``None`` while open.
        close_initiator: ``"client"`` or ``"emulator"``; ``None`` while open.
    """

    id: str
    path: str
    query: dict[str, str]
    model: str
    auth: str
    header_names: list[str]
    user_agent: str | None
    openai_beta: str | None
    subprotocols: list[str]
    subprotocol: str | None
    faults: list[str]
    started_at: float
    ended_at: float | None
    frames_received: int
    bytes_received: int
    binary_frames: int
    invalid_frames: int
    client_events: dict[str, int]
    server_events: dict[str, int]
    audio_bytes: int
    audio_sha256: str
    usage: dict[str, int]
    transcription_usage: dict[str, int]
    closed: bool
    close_code: int | None
    close_reason: str | None
    close_initiator: str | None

    def to_dict(self) -> JSON:
        """Return the record as a JSON-ready dict (the ``/_emulator/sessions`` shape)."""
        return dataclasses.asdict(self)


@dataclass
class _Recorder:
    """The live, mutable side of a :class:`SessionRecord`."""

    id: str
    path: str
    query: dict[str, str]
    model: str
    auth: str
    header_names: list[str]
    user_agent: str | None
    openai_beta: str | None
    subprotocols: list[str]
    subprotocol: str | None
    faults: list[str]
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    frames_received: int = 0
    bytes_received: int = 0
    binary_frames: int = 0
    invalid_frames: int = 0
    client_events: dict[str, int] = field(default_factory=dict)
    server_events: dict[str, int] = field(default_factory=dict)
    audio_bytes: int = 0
    audio_hash: Any = field(default_factory=hashlib.sha256)
    usage: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "responses", "input_tokens", "output_tokens", "total_tokens", "input_text",
                "input_audio", "input_image", "input_cached", "output_text", "output_audio",
            ),
            0,
        )
    )
    transcription_usage: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "transcriptions", "input_tokens", "output_tokens", "total_tokens",
                "input_text", "input_audio",
            ),
            0,
        )
    )
    closed: bool = False
    close_code: int | None = None
    close_reason: str | None = None
    close_initiator: str | None = None

    def snapshot(self) -> SessionRecord:
        return SessionRecord(
            id=self.id,
            path=self.path,
            query=dict(self.query),
            model=self.model,
            auth=self.auth,
            header_names=list(self.header_names),
            user_agent=self.user_agent,
            openai_beta=self.openai_beta,
            subprotocols=list(self.subprotocols),
            subprotocol=self.subprotocol,
            faults=list(self.faults),
            started_at=self.started_at,
            ended_at=self.ended_at,
            frames_received=self.frames_received,
            bytes_received=self.bytes_received,
            binary_frames=self.binary_frames,
            invalid_frames=self.invalid_frames,
            client_events=dict(self.client_events),
            server_events=dict(self.server_events),
            audio_bytes=self.audio_bytes,
            audio_sha256=str(self.audio_hash.hexdigest()),
            usage=dict(self.usage),
            transcription_usage=dict(self.transcription_usage),
            closed=self.closed,
            close_code=self.close_code,
            close_reason=self.close_reason,
            close_initiator=self.close_initiator,
        )


# --------------------------------------------------------------------------- handshake


@dataclass(frozen=True)
class _Handshake:
    """The parsed, accepted opening handshake of one connection."""

    path: str
    query: dict[str, str]
    model: str
    faults: Faults
    auth: str
    header_names: list[str]
    user_agent: str | None
    openai_beta: str | None
    subprotocols: list[str]


def _error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> JSON:
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def _http_response(status: int, body: JSON, headers: Sequence[tuple[str, str]] = ()) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Emulated Status"
    all_headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
            *headers,
        ]
    )
    return Response(status, reason, all_headers, data)


def _offered_subprotocols(headers: Headers) -> list[str]:
    offers: list[str] = []
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        offers.extend(part.strip() for part in value.split(",") if part.strip())
    return offers


def _redact_subprotocol(offer: str) -> str:
    if offer.startswith(_INSECURE_KEY_PREFIX):
        return _INSECURE_KEY_PREFIX + _REDACTED
    if offer.lower().startswith("bearer-"):
        return offer[: len("bearer-")] + _REDACTED
    return offer


def _credential(headers: Headers, offers: Sequence[str]) -> tuple[str, str] | None:
    """Return ``(carrier, key)`` from the handshake, or ``None`` when there is none."""
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return "bearer", token.strip()
    api_key = headers.get("api-key")
    if api_key is not None and api_key.strip():
        return "api-key", api_key.strip()
    for offer in offers:
        if offer.startswith(_INSECURE_KEY_PREFIX) and len(offer) > len(_INSECURE_KEY_PREFIX):
            return "subprotocol", offer[len(_INSECURE_KEY_PREFIX) :]
    return None


def _parse_handshake(request: Request, expected_key: str | None) -> _Handshake | Response:
    """Check the opening handshake of a Realtime path; return it or the refusal to send."""
    url = urlsplit(request.path)
    raw_query = dict(parse_qsl(url.query, keep_blank_values=True))
    headers = request.headers
    offers = _offered_subprotocols(headers)
    credential = _credential(headers, offers)
    if credential is None:
        return _http_response(
            401,
            _error_body(
                "You didn't provide an API key. Provide it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY) or in an api-key header.",
                "invalid_request_error",
                "missing_api_key",
            ),
        )
    carrier, key = credential
    if expected_key is not None and not hmac.compare_digest(
        key.encode("utf-8", "surrogateescape"), expected_key.encode("utf-8", "surrogateescape")
    ):
        return _http_response(
            401,
            _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
        )
    model = raw_query.get("model", "")
    if not model:
        if "call_id" in raw_query or "intent" in raw_query:
            model = DEFAULT_MODEL
        else:
            return _http_response(
                400,
                _error_body(
                    "Missing required parameter: 'model'.",
                    "invalid_request_error",
                    "missing_required_parameter",
                    "model",
                ),
            )
    try:
        faults = parse_faults(model)
    except FaultError as exc:
        return _http_response(
            400, _error_body(str(exc), "invalid_request_error", "invalid_fault", "model")
        )
    names: list[str] = []
    for name, _ in headers.raw_items():
        lowered = name.lower()
        if lowered not in names:
            names.append(lowered)
    query = {
        name: (_REDACTED if name.lower() in _CREDENTIAL_QUERY_KEYS else value)
        for name, value in raw_query.items()
    }
    return _Handshake(
        path=url.path,
        query=query,
        model=model,
        faults=faults,
        auth=carrier,
        header_names=names,
        user_agent=headers.get("User-Agent"),
        openai_beta=headers.get("OpenAI-Beta"),
        subprotocols=[_redact_subprotocol(offer) for offer in offers],
    )


def _select_subprotocol(
    connection: ServerConnection, subprotocols: Sequence[Subprotocol]
) -> Subprotocol | None:
    """Echo ``realtime`` when offered (as OpenAI does); select nothing otherwise."""
    return Subprotocol("realtime") if "realtime" in subprotocols else None


def _is_beta(openai_beta: str | None) -> bool:
    return openai_beta is not None and "realtime=v1" in openai_beta.replace(" ", "").lower()


# --------------------------------------------------------------------------- validation


class _RequestError(Exception):
    """A client event the API would refuse; becomes one ``error`` event."""

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type


def _missing(param: str) -> _RequestError:
    return _RequestError(
        "missing_required_parameter", f"Missing required parameter: '{param}'.", param
    )


def _unknown(param: str) -> _RequestError:
    return _RequestError("unknown_parameter", f"Unknown parameter: '{param}'.", param)


def _invalid_type(param: str, expected: str) -> _RequestError:
    return _RequestError(
        "invalid_type", f"Invalid type for '{param}': expected {expected}.", param
    )


def _invalid_value(param: str, value: Any, allowed: Sequence[str] = ()) -> _RequestError:
    message = f"Invalid value: {json.dumps(value)[:100]}."
    if allowed:
        message += " Supported values are: " + ", ".join(f"'{a}'" for a in allowed) + "."
    return _RequestError("invalid_value", message, param)


def _object(value: Any, param: str) -> JSON:
    if not isinstance(value, dict):
        raise _invalid_type(param, "an object")
    return value


def _only_keys(value: JSON, allowed: frozenset[str] | set[str], param: str) -> None:
    for key in value:
        if key not in allowed:
            raise _unknown(f"{param}.{key}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_number(value: Any, param: str, low: float, high: float, integer: bool) -> None:
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _invalid_type(param, "an integer")
    if not _is_number(value):
        raise _invalid_type(param, "a number")
    if not low <= value <= high:
        raise _RequestError(
            "decimal_above_max_value" if value > high else "decimal_below_min_value",
            f"Invalid '{param}': {value} is outside {low}..{high}.",
            param,
        )


def _check_bool(value: Any, param: str) -> None:
    if not isinstance(value, bool):
        raise _invalid_type(param, "a boolean")


def _check_format(value: Any, param: str) -> None:
    fmt = _object(value, param)
    _only_keys(fmt, {"type", "rate"}, param)
    kind = fmt.get("type")
    if kind not in _AUDIO_FORMATS:
        raise _invalid_value(f"{param}.type", kind, tuple(_AUDIO_FORMATS))
    if "rate" in fmt and (kind != "audio/pcm" or fmt["rate"] != 24000):
        raise _invalid_value(f"{param}.rate", fmt["rate"], ("24000",))


def _check_turn_detection(value: Any, param: str) -> None:
    if value is None:
        return
    detection = _object(value, param)
    kind = detection.get("type")
    if kind == "server_vad":
        _only_keys(detection, set(_SERVER_VAD_DEFAULTS), param)
        if "threshold" in detection:
            _check_number(detection["threshold"], f"{param}.threshold", 0.0, 1.0, False)
        for key in ("prefix_padding_ms", "silence_duration_ms"):
            if key in detection:
                _check_number(detection[key], f"{param}.{key}", 0, 10_000, True)
        if detection.get("idle_timeout_ms") is not None:
            _check_number(detection["idle_timeout_ms"], f"{param}.idle_timeout_ms", 0, 1e7, True)
    elif kind == "semantic_vad":
        _only_keys(detection, set(_SEMANTIC_VAD_DEFAULTS), param)
        if "eagerness" in detection and detection["eagerness"] not in (
            "low", "medium", "high", "auto",
        ):
            raise _invalid_value(
                f"{param}.eagerness", detection["eagerness"], ("low", "medium", "high", "auto")
            )
    else:
        raise _invalid_value(f"{param}.type", kind, ("server_vad", "semantic_vad"))
    for key in ("create_response", "interrupt_response"):
        if key in detection:
            _check_bool(detection[key], f"{param}.{key}")


def _check_audio(value: Any) -> None:
    audio = _object(value, "session.audio")
    _only_keys(audio, {"input", "output"}, "session.audio")
    if "input" in audio:
        param = "session.audio.input"
        audio_in = _object(audio["input"], param)
        _only_keys(
            audio_in, {"format", "noise_reduction", "transcription", "turn_detection"}, param
        )
        if "format" in audio_in:
            _check_format(audio_in["format"], f"{param}.format")
        if "turn_detection" in audio_in:
            _check_turn_detection(audio_in["turn_detection"], f"{param}.turn_detection")
        if audio_in.get("transcription") is not None:
            transcription = _object(audio_in["transcription"], f"{param}.transcription")
            _only_keys(transcription, {"model", "language", "prompt"}, f"{param}.transcription")
            for key in ("model", "language", "prompt"):
                if transcription.get(key) is not None and not isinstance(transcription[key], str):
                    raise _invalid_type(f"{param}.transcription.{key}", "a string")
        if audio_in.get("noise_reduction") is not None:
            noise = _object(audio_in["noise_reduction"], f"{param}.noise_reduction")
            _only_keys(noise, {"type", "strength"}, f"{param}.noise_reduction")
            if noise.get("type") not in (None, "near_field", "far_field"):
                raise _invalid_value(
                    f"{param}.noise_reduction.type", noise["type"], ("near_field", "far_field")
                )
    if "output" in audio:
        param = "session.audio.output"
        audio_out = _object(audio["output"], param)
        _only_keys(audio_out, {"format", "speed", "voice"}, param)
        if "format" in audio_out:
            _check_format(audio_out["format"], f"{param}.format")
        if "speed" in audio_out:
            _check_number(audio_out["speed"], f"{param}.speed", 0.25, 1.5, False)
        voice = audio_out.get("voice")
        if "voice" in audio_out and not (
            isinstance(voice, str) or (isinstance(voice, dict) and isinstance(voice.get("id"), str))
        ):
            raise _invalid_type(f"{param}.voice", "a string or an object with an id")


def _check_modalities(value: Any, param: str) -> None:
    if not isinstance(value, list):
        raise _invalid_type(param, "an array")
    if len(value) != 1 or value[0] not in ("audio", "text"):
        raise _invalid_value(param, value, ("['audio']", "['text']"))


def _check_tools(value: Any, param: str) -> None:
    if not isinstance(value, list):
        raise _invalid_type(param, "an array")
    for index, tool in enumerate(value):
        tool_param = f"{param}[{index}]"
        tool = _object(tool, tool_param)
        kind = tool.get("type", "function")
        if kind == "function":
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise _missing(f"{tool_param}.name")
            if tool.get("parameters") is not None:
                _object(tool["parameters"], f"{tool_param}.parameters")
        elif kind != "mcp":
            raise _invalid_value(f"{tool_param}.type", kind, ("function", "mcp"))


def _check_tool_choice(value: Any, param: str) -> None:
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise _invalid_value(param, value, ("auto", "none", "required"))
        return
    choice = _object(value, param)
    if choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise _missing(f"{param}.name")
    elif choice.get("type") != "mcp":
        raise _invalid_value(f"{param}.type", choice.get("type"), ("function", "mcp"))


def _check_max_output_tokens(value: Any, param: str) -> None:
    if value == "inf" or value is None:
        return
    _check_number(value, param, 1, 4096, True)


def _check_session_patch(patch: JSON) -> None:
    """Validate a ``session.update`` ``session`` object like the GA API.

    Raises:
        _RequestError: the first problem found.
    """
    if "type" not in patch:
        raise _missing("session.type")
    if patch["type"] != "realtime":
        raise _invalid_value("session.type", patch["type"], ("realtime",))
    _only_keys(patch, _SESSION_KEYS | _SESSION_READ_ONLY_KEYS, "session")
    if "audio" in patch:
        _check_audio(patch["audio"])
    if "output_modalities" in patch:
        _check_modalities(patch["output_modalities"], "session.output_modalities")
    for key in ("instructions", "model"):
        if key in patch and not isinstance(patch[key], str):
            raise _invalid_type(f"session.{key}", "a string")
    if "tools" in patch:
        _check_tools(patch["tools"], "session.tools")
    if "tool_choice" in patch:
        _check_tool_choice(patch["tool_choice"], "session.tool_choice")
    if "max_output_tokens" in patch:
        _check_max_output_tokens(patch["max_output_tokens"], "session.max_output_tokens")
    if "parallel_tool_calls" in patch:
        _check_bool(patch["parallel_tool_calls"], "session.parallel_tool_calls")


def _normalize_turn_detection(value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    defaults = _SERVER_VAD_DEFAULTS if value.get("type") == "server_vad" else _SEMANTIC_VAD_DEFAULTS
    return {**defaults, **copy.deepcopy(value)}


def _merge_session(current: JSON, patch: JSON) -> JSON:
    """Return *current* updated by a validated *patch* (``audio.*`` merged key by key)."""
    merged = copy.deepcopy(current)
    for key, value in patch.items():
        if key in _SESSION_READ_ONLY_KEYS:
            continue
        if key != "audio":
            merged[key] = copy.deepcopy(value)
            continue
        for side in ("input", "output"):
            for sub_key, sub_value in value.get(side, {}).items():
                if sub_key == "turn_detection":
                    sub_value = _normalize_turn_detection(sub_value)
                merged["audio"][side][sub_key] = copy.deepcopy(sub_value)
    return merged


def _default_session(session_id: str, model: str) -> JSON:
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "include": None,
        "expires_at": int(time.time()) + SESSION_SECONDS,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": dict(_SERVER_VAD_DEFAULTS),
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": DEFAULT_VOICE,
                "speed": 1.0,
            },
        },
    }


# --------------------------------------------------------------------------- conversation


@dataclass
class _Item:
    """A conversation item: its wire shape plus what it costs as input."""

    data: JSON
    text_tokens: int = 0
    image_tokens: int = 0
    audio_parts: dict[int, tuple[int, int]] = field(default_factory=dict)
    """content index → (audio bytes, bytes per ms)."""
    seen: bool = False
    """Already part of an earlier response's input (its tokens are then cached)."""

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def audio_tokens(self) -> int:
        return sum(input_audio_tokens(size, bpm) for size, bpm in self.audio_parts.values())


@dataclass
class _InputUsage:
    text: int = 0
    audio: int = 0
    image: int = 0
    cached_text: int = 0
    cached_audio: int = 0
    cached_image: int = 0

    def add(self, item: _Item) -> None:
        audio = item.audio_tokens
        self.text += item.text_tokens
        self.audio += audio
        self.image += item.image_tokens
        if item.seen:
            self.cached_text += item.text_tokens
            self.cached_audio += audio
            self.cached_image += item.image_tokens


def _decode_audio(value: Any, param: str) -> bytes:
    if not isinstance(value, str):
        raise _invalid_type(param, "a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _RequestError(
            "invalid_value", f"Invalid '{param}': expected base64-encoded audio bytes.", param
        ) from None


_CONTENT_TYPES = {
    "user": ("input_text", "input_audio", "input_image"),
    "system": ("input_text",),
    "assistant": ("output_text", "output_audio"),
}


def _build_item(raw: Any, param: str, input_bpm: int, output_bpm: int) -> _Item:
    """Validate a client-supplied conversation item and price it.

    Raises:
        _RequestError: the item is malformed.
    """
    source = _object(raw, param)
    kind = source.get("type")
    data: JSON = {"id": None, "object": "realtime.item", "type": kind, "status": "completed"}
    item = _Item(data=data)
    if source.get("id") is not None:
        if not isinstance(source["id"], str) or not source["id"]:
            raise _invalid_type(f"{param}.id", "a string")
        data["id"] = source["id"]
    if kind == "message":
        role = source.get("role")
        if role not in _CONTENT_TYPES:
            raise _invalid_value(f"{param}.role", role, tuple(_CONTENT_TYPES))
        content = source.get("content")
        if not isinstance(content, list):
            raise _missing(f"{param}.content")
        data["role"] = role
        data["content"] = []
        for index, part_raw in enumerate(content):
            part_param = f"{param}.content[{index}]"
            part = _object(part_raw, part_param)
            part_type = part.get("type")
            if part_type not in _CONTENT_TYPES[role]:
                raise _invalid_value(f"{part_param}.type", part_type, _CONTENT_TYPES[role])
            stored: JSON = {"type": part_type}
            if part_type in ("input_text", "output_text"):
                if not isinstance(part.get("text"), str):
                    raise _missing(f"{part_param}.text")
                stored["text"] = part["text"]
                item.text_tokens += text_tokens(part["text"])
            elif part_type == "input_image":
                if not isinstance(part.get("image_url"), str):
                    raise _missing(f"{part_param}.image_url")
                stored["image_url"] = part["image_url"]
                if isinstance(part.get("detail"), str):
                    stored["detail"] = part["detail"]
                item.image_tokens += IMAGE_TOKENS
            else:
                transcript = part.get("transcript")
                if transcript is not None and not isinstance(transcript, str):
                    raise _invalid_type(f"{part_param}.transcript", "a string")
                stored["transcript"] = transcript
                bpm = input_bpm if part_type == "input_audio" else output_bpm
                if part.get("audio") is not None:
                    audio = _decode_audio(part["audio"], f"{part_param}.audio")
                    item.audio_parts[index] = (len(audio), bpm)
                elif part_type == "input_audio":
                    raise _missing(f"{part_param}.audio")
                elif transcript:
                    item.text_tokens += text_tokens(transcript)
            data["content"].append(stored)
    elif kind == "function_call":
        for key in ("name", "arguments"):
            if not isinstance(source.get(key), str):
                raise _missing(f"{param}.{key}")
        call_id = source.get("call_id")
        data["name"] = source["name"]
        data["call_id"] = call_id if isinstance(call_id, str) else _new_id("call")
        data["arguments"] = source["arguments"]
        item.text_tokens = text_tokens(source["name"] + source["arguments"])
    elif kind == "function_call_output":
        for key in ("call_id", "output"):
            if not isinstance(source.get(key), str):
                raise _missing(f"{param}.{key}")
        data["call_id"] = source["call_id"]
        data["output"] = source["output"]
        item.text_tokens = text_tokens(source["output"])
    else:
        raise _invalid_value(
            f"{param}.type", kind, ("message", "function_call", "function_call_output")
        )
    if data["id"] is None:
        data["id"] = _new_id("item")
    return item


def _override(params: JSON, session: JSON, key: str) -> Any:
    """``response.create`` parameter *key*, else the session's value."""
    return params[key] if key in params else session.get(key)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _clip(text: str) -> str:
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"


def _schema_value(schema: Any, user_text: str) -> Any:
    if not isinstance(schema, dict):
        return user_text
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    return {"number": 1, "integer": 1, "boolean": True, "array": [], "object": {}}.get(
        str(kind), user_text
    )


def _function_arguments(tool: JSON, user_text: str) -> str:
    parameters = tool.get("parameters")
    arguments: JSON = {}
    if isinstance(parameters, dict):
        properties = parameters.get("properties")
        required = parameters.get("required")
        if isinstance(properties, dict) and isinstance(required, list):
            for name in required:
                if isinstance(name, str):
                    arguments[name] = _schema_value(properties.get(name), _clip(user_text))
    return json.dumps(arguments, ensure_ascii=False)


# --------------------------------------------------------------------------- audio


def _tone_chunk(ms: int) -> bytes:
    """A quiet 400 Hz PCM16 24 kHz tone of *ms* ms (whole periods when ms % 5 == 0)."""
    count = ms * 24
    step = 2 * math.pi * _TONE_HZ / 24000
    samples = array.array("h", (round(_TONE_AMPLITUDE * math.sin(step * n)) for n in range(count)))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


def _mean_square(frame: bytes) -> float:
    samples = array.array("h", frame)
    if sys.byteorder == "big":
        samples.byteswap()
    total: int = sum(map(operator.mul, samples, samples))
    return total / max(len(samples), 1)


@dataclass
class _Vad:
    """Energy voice-activity detection over 20 ms PCM16 frames on the session timeline."""

    pending: bytearray = field(default_factory=bytearray)
    position: int = 0
    """Byte offset (session timeline) of the first byte of ``pending``."""
    speaking: bool = False
    silence_ms: int = 0

    def reset(self, position: int) -> None:
        self.pending.clear()
        self.position = position
        self.speaking = False
        self.silence_ms = 0

    def feed(self, audio: bytes, config: JSON) -> list[tuple[str, int, int]]:
        """Add audio; return transitions ``(kind, frame_start, frame_end)`` in bytes."""
        frame_bytes = _FRAME_MS * PCM_BYTES_PER_MS
        threshold = float(config.get("threshold", 0.5)) * _VAD_RMS_SCALE
        limit = threshold * threshold
        silence_needed = int(config.get("silence_duration_ms", 500))
        self.pending += audio
        transitions: list[tuple[str, int, int]] = []
        offset = 0
        while len(self.pending) - offset >= frame_bytes:
            frame = bytes(self.pending[offset : offset + frame_bytes])
            start = self.position + offset
            offset += frame_bytes
            energy = _mean_square(frame)
            loud = energy >= limit if limit > 0 else energy > 0
            if not self.speaking:
                if loud:
                    self.speaking = True
                    self.silence_ms = 0
                    transitions.append(("started", start, start + frame_bytes))
            elif loud:
                self.silence_ms = 0
            else:
                self.silence_ms += _FRAME_MS
                if self.silence_ms >= silence_needed:
                    self.speaking = False
                    self.silence_ms = 0
                    transitions.append(("stopped", start, start + frame_bytes))
        del self.pending[:offset]
        self.position += offset
        return transitions


# --------------------------------------------------------------------------- responses


@dataclass
class _Plan:
    """What one response will do, fixed when ``response.create`` arrives."""

    kind: Literal["audio", "text", "function_call"]
    text: str
    tool_name: str | None
    modalities: list[str]
    in_conversation: bool
    metadata: Any
    max_output_tokens: Any
    voice: Any
    output_format: JSON
    input_usage: _InputUsage


@dataclass
class _Response:
    id: str
    plan: _Plan
    cancel_reason: str | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class _Incoming:
    event: JSON | None
    audio: bytes | None = None
    error: _RequestError | None = None


_Handler: TypeAlias = Callable[[JSON, _Incoming], Awaitable[None]]


class _Session:
    """One accepted connection: protocol state and one handler per client event type."""

    def __init__(
        self,
        emulator: Emulator,
        connection: ServerConnection,
        handshake: _Handshake,
        record: _Recorder,
    ) -> None:
        self._emulator = emulator
        self._conn = connection
        self._handshake = handshake
        self._faults = handshake.faults
        self.record = record
        self._session = _default_session(record.id, handshake.model)
        self._conversation_id = _new_id("conv")
        self._items: list[_Item] = []
        self._buffer = bytearray()
        self._buffer_start = 0
        """Session-timeline byte offset of ``_buffer[0]``."""
        self._written = 0
        self._vad = _Vad()
        self._speech_item_id: str | None = None
        self._active: _Response | None = None
        self._last_response_id: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._aborted = False
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

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until it closes; record how it ended."""
        try:
            if _is_beta(self._handshake.openai_beta):
                await self._send_error("beta_api_shape_disabled", _BETA_MESSAGE)
                await self._conn.close(_BETA_CLOSE_CODE, _BETA_CLOSE_REASON)
                return
            await self._send({"type": "session.created", "session": self._session})
            await self._serve()
        except ConnectionClosed:
            pass
        except Exception:
            _log.exception("emulator session %s failed", self.record.id)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            if self._conn.state is State.OPEN:
                await self._conn.close(1011, "emulator error")
            await self._conn.wait_closed()
            self._record_close()

    async def _serve(self) -> None:
        first = True
        async for message in self._conn:
            incoming = self._ingest(message)
            if first and (self._faults.close is not None or self._faults.drop):
                if self._faults.drop:
                    self._aborted = True
                    self._conn.transport.abort()
                    await self._conn.wait_closed()
                else:
                    code = self._faults.close
                    assert code is not None
                    await self._conn.close(code, f"emulator close {code}")
                return
            first = False
            if self._faults.stall:
                continue
            if self._faults.echo:
                await self._conn.send(message)
                continue
            await self._dispatch(incoming)

    def _record_close(self) -> None:
        record = self.record
        protocol = self._conn.protocol
        received, sent = protocol.close_rcvd, protocol.close_sent
        if received is not None and (sent is None or protocol.close_rcvd_then_sent):
            record.close_initiator = "client"
            record.close_code, record.close_reason = received.code, received.reason
        elif sent is not None:
            record.close_initiator = "emulator"
            record.close_code, record.close_reason = sent.code, sent.reason
        else:
            record.close_initiator = "emulator" if self._aborted else "client"
            record.close_code, record.close_reason = 1006, ""
        record.closed = True
        record.ended_at = time.time()

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
                error=_RequestError(
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
                error=_RequestError(
                    "invalid_json",
                    "The event could not be parsed: expected a JSON object with a string 'type'.",
                ),
            )
        kind = event["type"]
        record.client_events[kind] = record.client_events.get(kind, 0) + 1
        incoming = _Incoming(event)
        if kind == "input_audio_buffer.append":
            try:
                audio = _decode_audio(event.get("audio"), "audio")
            except _RequestError as exc:
                incoming.error = exc
            else:
                incoming.audio = audio
                record.audio_bytes += len(audio)
                record.audio_hash.update(audio)
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
                raise _invalid_value("type", event["type"], tuple(self._handlers))
            await handler(event, incoming)
        except _RequestError as exc:
            await self._send_error(
                exc.code, exc.message, param=exc.param, client_event_id=client_event_id,
                error_type=exc.error_type,
            )

    async def _send(self, event: JSON) -> None:
        kind = str(event["type"])
        payload = {"type": kind, "event_id": _new_id("event"), **event}
        counts = self.record.server_events
        counts[kind] = counts.get(kind, 0) + 1
        await self._conn.send(json.dumps(payload, separators=(",", ":"), ensure_ascii=False))

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
        return _AUDIO_FORMATS.get(str(self._input_config["format"].get("type")), PCM_BYTES_PER_MS)

    @property
    def _output_bpm(self) -> int:
        fmt = self._session["audio"]["output"]["format"]
        return _AUDIO_FORMATS.get(str(fmt.get("type")), PCM_BYTES_PER_MS)

    async def _on_session_update(self, event: JSON, incoming: _Incoming) -> None:
        if "session" not in event:
            raise _missing("session")
        patch = _object(event["session"], "session")
        _check_session_patch(patch)
        old_detection = self._input_config.get("turn_detection")
        self._session = _merge_session(self._session, patch)
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
        self._speech_item_id = _new_id("item")
        await self._send(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": start // PCM_BYTES_PER_MS,
                "item_id": self._speech_item_id,
            }
        )
        active = self._active
        if (
            active is not None
            and detection.get("interrupt_response", True)
            and active.plan.in_conversation
            and active.cancel_reason is None
        ):
            active.cancel_reason = "turn_detected"

    async def _speech_stopped(self, detection: JSON, frame_end: int) -> None:
        item_id = self._speech_item_id or _new_id("item")
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
            active = self._active
            if active is None or active.cancel_reason is not None:
                self._start_response({}, None)

    async def _on_audio_commit(self, event: JSON, incoming: _Incoming) -> None:
        size = len(self._buffer)
        if size < _MIN_COMMIT_MS * self._input_bpm:
            raise _RequestError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{_MIN_COMMIT_MS}ms of audio, but buffer only has "
                f"{size / self._input_bpm:.2f}ms of audio.",
            )
        committed = bytes(self._buffer)
        self._buffer.clear()
        self._buffer_start = self._written
        self._vad.reset(self._written)
        item_id = self._speech_item_id or _new_id("item")
        await self._commit(committed, item_id)

    async def _commit(self, audio: bytes, item_id: str) -> None:
        """Turn *audio* into a user item and announce it (committed, added, done)."""
        self._speech_item_id = None
        previous = self._items[-1].id if self._items else None
        data: JSON = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        bpm = self._input_bpm
        item = _Item(data=data, audio_parts={0: (len(audio), bpm)})
        self._items.append(item)
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
        ms = len(audio) // bpm
        transcript = f"[emulated transcript of {ms} ms of audio]"
        data["content"][0]["transcript"] = transcript
        prompt = transcription.get("prompt") or ""
        audio_tokens = input_audio_tokens(len(audio), bpm)
        prompt_tokens = text_tokens(prompt)
        out_tokens = text_tokens(transcript)
        in_tokens = audio_tokens + prompt_tokens
        usage = {
            "type": "tokens",
            "input_tokens": in_tokens,
            "output_tokens": out_tokens,
            "total_tokens": in_tokens + out_tokens,
            "input_token_details": {"text_tokens": prompt_tokens, "audio_tokens": audio_tokens},
        }
        totals = self.record.transcription_usage
        totals["transcriptions"] += 1
        totals["input_tokens"] += in_tokens
        totals["output_tokens"] += out_tokens
        totals["total_tokens"] += in_tokens + out_tokens
        totals["input_text"] += prompt_tokens
        totals["input_audio"] += audio_tokens
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
            {"type": "output_audio_buffer.cleared", "response_id": self._last_response_id or ""}
        )

    # ------------------------------------------------------------------ conversation

    def _find(self, item_id: Any) -> int | None:
        for index, item in enumerate(self._items):
            if item.id == item_id:
                return index
        return None

    async def _on_item_create(self, event: JSON, incoming: _Incoming) -> None:
        if "item" not in event:
            raise _missing("item")
        item = _build_item(event["item"], "item", self._input_bpm, self._output_bpm)
        if self._find(item.id) is not None:
            raise _RequestError(
                "invalid_value", f"Item with id '{item.id}' already exists.", "item.id"
            )
        previous_id = event.get("previous_item_id")
        if previous_id is None:
            position = len(self._items)
        elif previous_id == "root":
            position = 0
        else:
            found = self._find(previous_id)
            if found is None:
                raise _RequestError(
                    "invalid_value",
                    f"Previous item with item_id '{previous_id}' not found.",
                    "previous_item_id",
                )
            position = found + 1
        self._items.insert(position, item)
        previous = self._items[position - 1].id if position > 0 else None
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self._send({"type": kind, "previous_item_id": previous, "item": item.data})

    async def _on_item_retrieve(self, event: JSON, incoming: _Incoming) -> None:
        index = self._find(event.get("item_id"))
        if index is None:
            raise _RequestError(
                "item_retrieve_invalid_item_id",
                f"Error retrieving item: the item with id '{event.get('item_id')}' "
                "does not exist.",
                "item_id",
            )
        await self._send({"type": "conversation.item.retrieved", "item": self._items[index].data})

    async def _on_item_delete(self, event: JSON, incoming: _Incoming) -> None:
        index = self._find(event.get("item_id"))
        if index is None:
            raise _RequestError(
                "item_delete_invalid_item_id",
                f"Error deleting item: the item with id '{event.get('item_id')}' does not exist.",
                "item_id",
            )
        item = self._items.pop(index)
        await self._send({"type": "conversation.item.deleted", "item_id": item.id})

    async def _on_item_truncate(self, event: JSON, incoming: _Incoming) -> None:
        index = self._find(event.get("item_id"))
        if index is None:
            raise _RequestError(
                "item_truncate_invalid_item_id",
                f"Error truncating item: the item with id '{event.get('item_id')}' "
                "does not exist.",
                "item_id",
            )
        item = self._items[index]
        content_index = event.get("content_index", 0)
        audio_end_ms = event.get("audio_end_ms")
        _check_number(audio_end_ms, "audio_end_ms", 0, 1e9, True)
        assert isinstance(audio_end_ms, int)
        part = item.audio_parts.get(content_index) if isinstance(content_index, int) else None
        if item.data.get("role") != "assistant" or part is None:
            raise _RequestError(
                "invalid_value",
                "Only assistant audio content can be truncated.",
                "content_index",
            )
        size, bpm = part
        if audio_end_ms * bpm > size:
            raise _RequestError(
                "invalid_value",
                f"Audio content of {size // bpm}ms is already shorter than {audio_end_ms}ms.",
                "audio_end_ms",
            )
        item.audio_parts[content_index] = (audio_end_ms * bpm, bpm)
        item.data["content"][content_index]["transcript"] = ""
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
        params = _object(params, "response")
        active = self._active
        if active is not None and active.cancel_reason is None:
            raise _RequestError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {active.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        self._start_response(params, event)

    async def _on_response_cancel(self, event: JSON, incoming: _Incoming) -> None:
        active = self._active
        wanted = event.get("response_id")
        if active is None or active.cancel_reason is not None or (
            wanted is not None and wanted != active.id
        ):
            raise _RequestError(
                "response_cancel_not_active", "Cancellation failed: no active response found."
            )
        active.cancel_reason = "client_cancelled"

    def _response_input(self, params: JSON) -> list[_Item]:
        if "input" not in params:
            return list(self._items)
        if not isinstance(params["input"], list):
            raise _invalid_type("response.input", "an array")
        items: list[_Item] = []
        for index, raw in enumerate(params["input"]):
            param = f"response.input[{index}]"
            if isinstance(raw, dict) and raw.get("type") == "item_reference":
                found = self._find(raw.get("id"))
                if found is None:
                    raise _invalid_value(f"{param}.id", raw.get("id"))
                items.append(self._items[found])
            else:
                items.append(_build_item(raw, param, self._input_bpm, self._output_bpm))
        return items

    def _plan(self, params: JSON) -> _Plan:
        """Validate ``response.create`` parameters and decide what the response says."""
        _only_keys(params, _RESPONSE_KEYS, "response")
        modalities = _override(params, self._session, "output_modalities")
        _check_modalities(modalities, "response.output_modalities")
        tools = _override(params, self._session, "tools") or []
        _check_tools(tools, "response.tools")
        tool_choice = _override(params, self._session, "tool_choice")
        _check_tool_choice(tool_choice, "response.tool_choice")
        conversation = params.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise _invalid_value("response.conversation", conversation, ("auto", "none"))
        max_output_tokens = _override(params, self._session, "max_output_tokens")
        _check_max_output_tokens(max_output_tokens, "response.max_output_tokens")
        output = copy.deepcopy(self._session["audio"]["output"])
        if "audio" in params:
            audio = _object(params["audio"], "response.audio")
            _only_keys(audio, {"output"}, "response.audio")
            override = _object(audio.get("output", {}), "response.audio.output")
            _only_keys(override, {"format", "voice"}, "response.audio.output")
            if "format" in override:
                _check_format(override["format"], "response.audio.output.format")
            output.update(copy.deepcopy(override))
        items = self._response_input(params)
        usage = _InputUsage()
        for item in items:
            usage.add(item)
        kind, text, tool_name = self._decide(items, tools, tool_choice, modalities[0])
        for item in items:
            item.seen = True
        return _Plan(
            kind=kind,
            text=text,
            tool_name=tool_name,
            modalities=list(modalities),
            in_conversation=conversation == "auto",
            metadata=params.get("metadata"),
            max_output_tokens=max_output_tokens,
            voice=output.get("voice"),
            output_format=output["format"],
            input_usage=usage,
        )

    def _decide(
        self, items: list[_Item], tools: list[JSON], tool_choice: Any, modality: str
    ) -> tuple[Literal["audio", "text", "function_call"], str, str | None]:
        speech: Literal["audio", "text"] = "audio" if modality == "audio" else "text"
        last = items[-1].data if items else None
        if last is not None and last.get("type") == "function_call_output":
            name = next(
                (
                    str(item.data.get("name"))
                    for item in reversed(items)
                    if item.data.get("type") == "function_call"
                    and item.data.get("call_id") == last.get("call_id")
                ),
                "requested",
            )
            return speech, f"The {name} function returned: {_clip(str(last['output']))}", None
        user = next(
            (
                item
                for item in reversed(items)
                if item.data.get("type") == "message" and item.data.get("role") == "user"
            ),
            None,
        )
        user_text = ""
        if user is not None:
            user_text = " ".join(
                str(part.get("text"))
                for part in user.data["content"]
                if part.get("type") == "input_text"
            )
        functions = [
            tool for tool in tools
            if tool.get("type", "function") == "function" and isinstance(tool.get("name"), str)
        ]
        if functions and tool_choice != "none":
            chosen: JSON | None = None
            if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
                chosen = next((t for t in functions if t["name"] == tool_choice["name"]), None)
                chosen = chosen or {"name": tool_choice["name"]}
            if chosen is None and user_text:
                lowered = user_text.lower()
                chosen = next((t for t in functions if t["name"].lower() in lowered), None)
            if chosen is None and tool_choice == "required":
                chosen = functions[0]
            if chosen is not None:
                name = str(chosen["name"])
                return "function_call", _function_arguments(chosen, user_text), name
        if user is not None and user.audio_parts:
            seconds = sum(size / bpm for size, bpm in user.audio_parts.values()) / 1000
            return speech, f"I heard {seconds:.2f} seconds of audio.", None
        if user_text:
            return speech, f"You said: {_clip(user_text)}", None
        return speech, "Hello from the realtime emulator.", None

    def _start_response(self, params: JSON, event: JSON | None) -> None:
        """Plan a response and start streaming it (after a cancelling one has finished).

        Raises:
            _RequestError: invalid ``response.create`` parameters.
        """
        plan = self._plan(params)
        previous = self._active
        response = _Response(id=_new_id("resp"), plan=plan)
        self._active = response
        self._last_response_id = response.id
        waiting_for = previous.task if previous is not None else None
        task = asyncio.create_task(self._stream(response, waiting_for))
        response.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds if self._faults.slow else 0)

    def _response_object(
        self, response: _Response, status: str, output: list[JSON], usage: JSON | None
    ) -> JSON:
        plan = response.plan
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": response.cancel_reason}
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self._conversation_id if plan.in_conversation else None,
            "output_modalities": plan.modalities,
            "max_output_tokens": plan.max_output_tokens,
            "audio": {"output": {"format": plan.output_format, "voice": plan.voice}},
            "usage": usage,
            "metadata": plan.metadata,
        }

    async def _stream(self, response: _Response, waiting_for: asyncio.Task[None] | None) -> None:
        """Send one response's events; always ends with ``response.done``."""
        if waiting_for is not None and not waiting_for.done():
            await asyncio.wait([waiting_for])
        try:
            await self._send(
                {
                    "type": "response.created",
                    "response": self._response_object(response, "in_progress", [], None),
                }
            )
            item_id = _new_id("item")
            if response.plan.kind == "function_call":
                item, out_text, out_audio = await self._stream_call(response, item_id)
            else:
                item, out_text, out_audio = await self._stream_message(response, item_id)
            await self._finish(response, item, out_text, out_audio)
        except ConnectionClosed:
            return
        finally:
            if self._active is response:
                self._active = None

    def _conversation_add(self, response: _Response, data: JSON) -> str | None:
        """Append an output item to the conversation; return the previous item id."""
        previous = self._items[-1].id if self._items else None
        if response.plan.in_conversation:
            self._items.append(_Item(data=data))
        return previous

    async def _open_item(self, response: _Response, data: JSON) -> str | None:
        await self._send(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": 0,
                "item": data,
            }
        )
        previous = self._conversation_add(response, data)
        if response.plan.in_conversation:
            await self._send(
                {"type": "conversation.item.added", "previous_item_id": previous, "item": data}
            )
        return previous

    async def _close_item(
        self, response: _Response, data: JSON, previous: str | None, item: _Item
    ) -> None:
        await self._send(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": 0,
                "item": data,
            }
        )
        if response.plan.in_conversation:
            index = self._find(data["id"])
            if index is not None:
                stored = self._items[index]
                stored.data = data
                stored.text_tokens = item.text_tokens
                stored.audio_parts = item.audio_parts
            await self._send(
                {"type": "conversation.item.done", "previous_item_id": previous, "item": data}
            )

    async def _stream_message(self, response: _Response, item_id: str) -> tuple[JSON, int, int]:
        plan = response.plan
        data: JSON = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        previous = await self._open_item(response, copy.deepcopy(data))
        where = {"response_id": response.id, "item_id": item_id, "output_index": 0,
                 "content_index": 0}
        words = re.findall(r"\S+\s*", plan.text)
        if plan.kind == "text":
            await self._send(
                {"type": "response.content_part.added", **where,
                 "part": {"type": "text", "text": ""}}
            )
            sent = ""
            for word in words:
                if response.cancel_reason is not None:
                    break
                await self._send({"type": "response.output_text.delta", **where, "delta": word})
                sent += word
                await self._pause(_TEXT_DELTA_PACE_SECONDS)
            await self._send({"type": "response.output_text.done", **where, "text": sent})
            await self._send(
                {"type": "response.content_part.done", **where,
                 "part": {"type": "text", "text": sent}}
            )
            data["content"] = [{"type": "output_text", "text": sent}]
            priced = _Item(data=data, text_tokens=text_tokens(sent))
            data["status"] = "incomplete" if response.cancel_reason else "completed"
            await self._close_item(response, data, previous, priced)
            return data, text_tokens(sent), 0
        fmt_type = str(plan.output_format.get("type", "audio/pcm"))
        bpm = _AUDIO_FORMATS.get(fmt_type, PCM_BYTES_PER_MS)
        reply_ms = min(max(len(plan.text) * _REPLY_MS_PER_CHAR, _REPLY_MIN_MS), _REPLY_MAX_MS)
        total = reply_ms * bpm
        chunk = _AUDIO_CHUNK_MS * bpm
        pattern = (
            self._emulator.tone_chunk
            if fmt_type == "audio/pcm"
            else bytes([_G711_SILENCE.get(fmt_type, 0)]) * chunk
        )
        await self._send(
            {"type": "response.content_part.added", **where,
             "part": {"type": "audio", "transcript": ""}}
        )
        transcript = ""
        sent_bytes = 0
        steps = max(len(words), _ceil_div(total, chunk))
        for step in range(steps):
            if response.cancel_reason is not None:
                break
            if step < len(words):
                await self._send(
                    {"type": "response.output_audio_transcript.delta", **where,
                     "delta": words[step]}
                )
                transcript += words[step]
            if sent_bytes < total:
                size = min(chunk, total - sent_bytes)
                delta = base64.b64encode(pattern[:size]).decode("ascii")
                await self._send({"type": "response.output_audio.delta", **where, "delta": delta})
                sent_bytes += size
            await self._pause(_AUDIO_CHUNK_MS / 1000)
        await self._send({"type": "response.output_audio.done", **where})
        await self._send(
            {"type": "response.output_audio_transcript.done", **where, "transcript": transcript}
        )
        await self._send(
            {"type": "response.content_part.done", **where,
             "part": {"type": "audio", "transcript": transcript}}
        )
        data["content"] = [{"type": "output_audio", "transcript": transcript}]
        data["status"] = "incomplete" if response.cancel_reason else "completed"
        priced = _Item(data=data, audio_parts={0: (sent_bytes, bpm)})
        await self._close_item(response, data, previous, priced)
        return data, text_tokens(transcript), output_audio_tokens(sent_bytes, bpm)

    async def _stream_call(self, response: _Response, item_id: str) -> tuple[JSON, int, int]:
        plan = response.plan
        name = plan.tool_name or ""
        call_id = _new_id("call")
        data: JSON = {
            "id": item_id,
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": name,
            "call_id": call_id,
            "arguments": "",
        }
        previous = await self._open_item(response, copy.deepcopy(data))
        where = {"response_id": response.id, "item_id": item_id, "output_index": 0,
                 "call_id": call_id}
        sent = ""
        for start in range(0, len(plan.text), _ARGUMENT_DELTA_CHARS):
            if response.cancel_reason is not None:
                break
            piece = plan.text[start : start + _ARGUMENT_DELTA_CHARS]
            await self._send(
                {"type": "response.function_call_arguments.delta", **where, "delta": piece}
            )
            sent += piece
            await self._pause(_TEXT_DELTA_PACE_SECONDS)
        await self._send(
            {"type": "response.function_call_arguments.done", **where, "name": name,
             "arguments": sent}
        )
        data["arguments"] = sent
        data["status"] = "incomplete" if response.cancel_reason else "completed"
        priced = _Item(data=data, text_tokens=text_tokens(name + sent))
        await self._close_item(response, data, previous, priced)
        return data, text_tokens(name + sent), 0

    async def _finish(self, response: _Response, item: JSON, out_text: int, out_audio: int) -> None:
        plan = response.plan
        usage_in = plan.input_usage
        extra = self._faults.extra_input_text_tokens
        in_text = usage_in.text + extra
        input_tokens = in_text + usage_in.audio + usage_in.image
        cached = usage_in.cached_text + usage_in.cached_audio + usage_in.cached_image
        output_tokens = out_text + out_audio
        usage: JSON = {
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_token_details": {
                "text_tokens": in_text,
                "audio_tokens": usage_in.audio,
                "image_tokens": usage_in.image,
                "cached_tokens": cached,
                "cached_tokens_details": {
                    "text_tokens": usage_in.cached_text,
                    "audio_tokens": usage_in.cached_audio,
                    "image_tokens": usage_in.cached_image,
                },
            },
            "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
        }
        totals = self.record.usage
        totals["responses"] += 1
        totals["input_tokens"] += input_tokens
        totals["output_tokens"] += output_tokens
        totals["total_tokens"] += input_tokens + output_tokens
        totals["input_text"] += in_text
        totals["input_audio"] += usage_in.audio
        totals["input_image"] += usage_in.image
        totals["input_cached"] += cached
        totals["output_text"] += out_text
        totals["output_audio"] += out_audio
        status = "cancelled" if response.cancel_reason else "completed"
        if self._active is response:
            self._active = None
        await self._send(
            {
                "type": "response.done",
                "response": self._response_object(response, status, [item], usage),
            }
        )


# --------------------------------------------------------------------------- server


def _websockets_logger() -> logging.Logger:
    """The logger handed to ``websockets``: held at INFO so no frame or header is logged."""
    logger = logging.getLogger(f"{__name__}.websockets")
    if logger.level < logging.INFO:
        logger.setLevel(logging.INFO)
    return logger


class Emulator:
    """The Realtime protocol emulator server (see the module docstring for the protocol).

    Usage::

        async with Emulator(host="127.0.0.1", port=0, api_key=None) as emu:
            url = emu.url + "/v1/realtime?model=gpt-realtime"   # ws://127.0.0.1:<port>
            ...
            emu.sessions()      # list[SessionRecord]

    Args:
        host: address to bind.
        port: TCP port; 0 picks a free one (read it from :attr:`port`).
        api_key: the key clients must present; ``None`` accepts any non-empty key.
        open_timeout: seconds a client may take to complete the opening handshake,
            which also bounds ``fault-stall-handshake``; ``None`` disables it.
        max_message_bytes: largest client message accepted, bytes (16 MiB by default).
        max_records: session records kept (oldest dropped first; ``connections`` still
            counts every handshake).

    Raises:
        ValueError: *api_key* is an empty string.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        *,
        open_timeout: float | None = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_records: int = 10_000,
    ) -> None:
        if api_key == "":
            raise ValueError("api_key must be None (accept any key) or a non-empty string")
        self._host = host
        self._requested_port = port
        self._api_key = api_key
        self._open_timeout = open_timeout
        self._max_message_bytes = max_message_bytes
        self._server: Server | None = None
        self._records: deque[_Recorder] = deque(maxlen=max_records)
        self._connections = 0
        self._closing = asyncio.Event()
        self.tone_chunk = _tone_chunk(_AUDIO_CHUNK_MS)
        """100 ms of the reply tone (PCM16 24 kHz), sliced for each audio delta."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._closing.clear()
        self._server = await serve(
            self._handle,
            self._host,
            self._requested_port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            server_header="realtime-gateway-emulator",
            compression=None,
            max_size=self._max_message_bytes,
            open_timeout=self._open_timeout,
            logger=_websockets_logger(),
        )

    async def aclose(self) -> None:
        """Stop serving: refuse new connections, close open sessions with 1001, wait."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing.set()
        server.close()
        await server.wait_closed()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ introspection

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: not started.
        """
        if self._server is None:
            raise RuntimeError("emulator not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Base WebSocket URL, ``ws://<host>:<port>`` (append ``/v1/realtime?model=…``)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"ws://{host}:{self.port}"

    @property
    def connections(self) -> int:
        """WebSocket handshakes attempted on the Realtime paths, refused ones included."""
        return self._connections

    def sessions(self) -> list[SessionRecord]:
        """Snapshots of every accepted session, oldest first (live ones included)."""
        return [record.snapshot() for record in self._records]

    def sessions_json(self) -> JSON:
        """``{"connections": int, "sessions": [dict, ...]}``, as served on ``SESSIONS_PATH``."""
        return {
            "connections": self._connections,
            "sessions": [record.to_dict() for record in self.sessions()],
        }

    # ------------------------------------------------------------------ websockets hooks

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        if path == SESSIONS_PATH:
            return _http_response(200, self.sessions_json())
        if path not in REALTIME_PATHS:
            return _http_response(
                404,
                _error_body(f"Invalid URL (GET {path})", "invalid_request_error", "not_found"),
            )
        self._connections += 1
        handshake = _parse_handshake(request, self._api_key)
        if isinstance(handshake, Response):
            return handshake
        faults = handshake.faults
        if faults.stall_handshake:
            await self._closing.wait()
            return _http_response(
                503, _error_body("emulator shutting down", "server_error", "unavailable")
            )
        if faults.refuse is not None:
            status = faults.refuse
            extra = [("Retry-After", "1")] if status in (429, 503) else []
            return _http_response(
                status,
                _error_body(
                    f"emulator fault: handshake refused with HTTP {status}",
                    "emulator_fault",
                    "fault_refuse",
                ),
                extra,
            )
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None
        handshake = _parse_handshake(request, self._api_key)
        if isinstance(handshake, Response):  # pragma: no cover - refused in process_request
            return
        session_id = _new_id("sess")
        record = _Recorder(
            id=session_id,
            path=handshake.path,
            query=handshake.query,
            model=handshake.model,
            auth=handshake.auth,
            header_names=handshake.header_names,
            user_agent=handshake.user_agent,
            openai_beta=handshake.openai_beta,
            subprotocols=handshake.subprotocols,
            subprotocol=connection.subprotocol,
            faults=[w for w in map(str.strip, handshake.model.split(",")) if w[:6] == "fault-"],
        )
        self._records.append(record)
        await _Session(self, connection, handshake, record).run()


async def serve_forever(host: str, port: int, api_key: str | None) -> None:
    """Run an :class:`Emulator` until cancelled (the ``realtime-gateway emulator`` command).

    Logs one line with the URL when ready.  *api_key* ``None`` accepts any key.

    Raises:
        OSError: the address cannot be bound.
    """
    async with Emulator(host=host, port=port, api_key=api_key) as emulator:
        _log.info(
            "realtime emulator listening on %s (paths %s, records at %s)",
            emulator.url,
            ", ".join(REALTIME_PATHS),
            SESSIONS_PATH,
        )
        await asyncio.get_running_loop().create_future()
