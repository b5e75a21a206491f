"""What the emulator records of each accepted session, so tests can check the relay.

Each accepted session has a :class:`SessionRecord` (live while the session runs): the
handshake (path, query with credential parameters redacted, model, which carrier held
the key, header names, ``User-Agent``, ``OpenAI-Beta``, offered subprotocols with
credentials redacted), frame counts, client events by type, server events by type, the
number and **SHA-256 of all audio bytes appended** (decoded, concatenated in order),
usage totals sent and how the connection closed.  The key itself is never recorded or
logged, and nothing is logged per frame.  Readers get snapshots (:meth:`SessionRecord.snapshot`);
``GET /_emulator/sessions`` serves them as :meth:`SessionRecord.to_dict`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field

from gateway.emulator.schema import JSON

__all__ = ["SessionRecord"]

_TOKEN_KEYS = ("input_tokens", "output_tokens", "total_tokens")
_RESPONSE_KINDS = {
    "input_text": ("input_token_details", "text_tokens"),
    "input_audio": ("input_token_details", "audio_tokens"),
    "input_image": ("input_token_details", "image_tokens"),
    "input_cached": ("input_token_details", "cached_tokens"),
    "output_text": ("output_token_details", "text_tokens"),
    "output_audio": ("output_token_details", "audio_tokens"),
}
"""Record total (CONTRACT §6 kind) → where a ``response.done`` usage object has it."""
_TRANSCRIPTION_KINDS = {
    "input_text": ("input_token_details", "text_tokens"),
    "input_audio": ("input_token_details", "audio_tokens"),
}
_USAGE_KEYS = ("responses", *_TOKEN_KEYS, *_RESPONSE_KINDS)
_TRANSCRIPTION_USAGE_KEYS = ("transcriptions", *_TOKEN_KEYS, *_TRANSCRIPTION_KINDS)


def _add_totals(
    totals: dict[str, int], count: str, usage: JSON, kinds: dict[str, tuple[str, str]]
) -> None:
    totals[count] += 1
    for key in _TOKEN_KEYS:
        totals[key] += usage[key]
    for kind, (details, key) in kinds.items():
        totals[kind] += usage[details][key]


@dataclass
class SessionRecord:
    """What the emulator saw of one accepted WebSocket session.

    The emulator updates one live record per session; :meth:`snapshot` copies it, and
    :meth:`Emulator.sessions <gateway.emulator.server.Emulator.sessions>` hands out only
    snapshots, which later frames do not change.

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
        audio_sha256: SHA-256 (hex) of all appended audio bytes concatenated in order;
            current in snapshots and in :meth:`to_dict` (the live record hashes audio as
            it arrives and takes the digest only then, so an append costs no digest).
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
        close_initiator: ``"client"`` or ``"emulator"`` (a call: also ``"hangup"``);
            ``None`` while open.
        transport: ``"websocket"``, or ``"webrtc"`` for a call (its ``id`` is the call id).
        sidebands: sideband sockets attached to the call (``?call_id=``).
        hangups: ``POST …/hangup`` requests that ended the call.
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
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    frames_received: int = 0
    bytes_received: int = 0
    binary_frames: int = 0
    invalid_frames: int = 0
    client_events: dict[str, int] = field(default_factory=dict)
    server_events: dict[str, int] = field(default_factory=dict)
    audio_bytes: int = 0
    audio_sha256: str = hashlib.sha256().hexdigest()
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_USAGE_KEYS, 0))
    transcription_usage: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(_TRANSCRIPTION_USAGE_KEYS, 0)
    )
    closed: bool = False
    close_code: int | None = None
    close_reason: str | None = None
    close_initiator: str | None = None
    transport: str = "websocket"
    sidebands: int = 0
    hangups: int = 0

    def __post_init__(self) -> None:
        # Not a field: neither snapshotted nor serialised, only its digest is.
        self._audio_hash = hashlib.sha256()

    def add_audio(self, audio: bytes) -> None:
        """Count and hash *audio* appended by the client (decoded bytes)."""
        self.audio_bytes += len(audio)
        self._audio_hash.update(audio)

    def add_usage(self, usage: JSON) -> None:
        """Add a ``response.done`` ``usage`` object (the shape of
        :func:`gateway.emulator.tokens.response_usage`) to :attr:`usage`."""
        _add_totals(self.usage, "responses", usage, _RESPONSE_KINDS)

    def add_transcription_usage(self, usage: JSON) -> None:
        """Add a transcription ``usage`` object (``{"type": "tokens", ...}``) to
        :attr:`transcription_usage`."""
        _add_totals(self.transcription_usage, "transcriptions", usage, _TRANSCRIPTION_KINDS)

    def snapshot(self) -> SessionRecord:
        """A copy that later updates of this record do not change (containers copied)."""
        copied = dataclasses.replace(
            self,
            query=dict(self.query),
            header_names=list(self.header_names),
            subprotocols=list(self.subprotocols),
            faults=list(self.faults),
            client_events=dict(self.client_events),
            server_events=dict(self.server_events),
            audio_sha256=self._audio_hash.hexdigest(),
            usage=dict(self.usage),
            transcription_usage=dict(self.transcription_usage),
        )
        copied._audio_hash = self._audio_hash.copy()
        return copied

    def to_dict(self) -> JSON:
        """Return the record as a JSON-ready dict (the ``/_emulator/sessions`` shape)."""
        data = dataclasses.asdict(self)
        data["audio_sha256"] = self._audio_hash.hexdigest()
        return data
