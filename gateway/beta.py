"""Pure translation between the Realtime **beta** protocol and the GA protocol (CONTRACT §10).

Beta clients (``OpenAI-Beta: realtime=v1``, subprotocol ``openai-beta.realtime-v1``, Azure's
preview path with a preview ``api-version``) get no answer from today's upstreams, which speak
GA only.  A session that :func:`is_beta` recognises is served on a GA upstream through one
:class:`BetaTranslator`, which turns each beta client event into the GA events the upstream
expects and each GA server event into what a beta client can parse.

Sources: the two schemas the ``openai`` Python package ships, ``openai.types.beta.realtime``
(beta) and ``openai.types.realtime`` (GA); ``tests/test_beta.py`` checks every event type of
both against :data:`CLIENT_RULES` / :data:`SERVER_RULES` and validates translated events with
the target schema's models.  ``docs/beta-translation.md`` is the human-readable table.

The module is pure: no I/O, no logging, no global mutable state.  The caller parses each text
frame, hands the JSON object to the translator, serialises what comes back, and bounds sizes.
Nothing here raises on bad input: an event of an unknown type, a field of the wrong type or a
missing field is passed on unchanged (client → upstream, so the upstream answers with its own
``error`` event the client can read) or dropped (upstream → client, see :data:`SERVER_RULES`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

JSON = dict[str, Any]
"""A parsed JSON object (one Realtime event or part of one)."""

AZURE_PREVIEW_PATH: Final = "/openai/realtime"
"""Azure's preview WebSocket path (``deployment=`` names the model), also used by GA clients."""
BETA_SUBPROTOCOL: Final = "openai-beta.realtime-v1"
"""The subprotocol openai-node's browser beta client (and rt-client in OpenAI mode) offers."""
BETA_HEADER_VALUE: Final = "realtime=v1"
"""The ``OpenAI-Beta`` header token of the beta protocol (the header is a comma-separated list)."""
GA_API_VERSION: Final = "2025-08-28"
"""The first Azure ``api-version`` of the GA Realtime API (the day ``gpt-realtime`` went GA);
a plain date before it can only name the preview (beta-shaped) API."""

_API_VERSION = re.compile(r"(\d{4}-\d{2}-\d{2})(-preview)?", re.ASCII | re.IGNORECASE)


# --------------------------------------------------------------------------- detection


def is_preview_api_version(api_version: str) -> bool:
    """Whether an Azure ``api-version`` names the preview (beta-shaped) Realtime API.

    Rule: ``YYYY-MM-DD-preview`` (any date, case-insensitive) or a plain ``YYYY-MM-DD``
    before :data:`GA_API_VERSION` (``2025-08-28``) is preview; e.g. ``2024-10-01-preview``,
    ``2024-12-17``, ``2025-04-01-preview`` are, ``2025-08-28`` is not.  Anything else
    (another shape, empty) is not: a value we cannot read says nothing about the protocol,
    and GA is what today's upstreams speak.
    """
    match = _API_VERSION.fullmatch(api_version.strip())
    if match is None:
        return False
    return match.group(2) is not None or match.group(1) < GA_API_VERSION


def _header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key == name]


def is_beta(path: str, query: Iterable[tuple[str, str]],
            headers: Iterable[tuple[bytes, bytes]], subprotocols: Sequence[str]) -> bool:
    """Whether a WebSocket upgrade request comes from a beta-protocol client (CONTRACT §10).

    Args:
        path: the request path, without the query (e.g. ``/openai/realtime``).
        query: the decoded query pairs, in order (the first ``api-version`` counts).
        headers: raw ``(name, value)`` pairs with lower-case names (ASGI).
        subprotocols: the offered subprotocols, already split on commas.

    A session is beta when any of these holds:

    1. an ``OpenAI-Beta`` header lists ``realtime=v1`` (openai-python
       ``client.beta.realtime``, openai-node ``OpenAIRealtimeWS`` beta);
    2. the subprotocol ``openai-beta.realtime-v1`` is offered (openai-node's browser beta
       client, rt-client in OpenAI mode);
    3. the path is :data:`AZURE_PREVIEW_PATH` with a preview ``api-version``
       (:func:`is_preview_api_version`; rt-client, Python rtclient, LiveKit on Azure) —
       unless the request carries an ``X-Stainless-Lang`` header: the Stainless-generated
       ``openai`` SDKs send it, and their beta clients always announce beta through rule 1,
       so without the marker such a client is the GA ``AzureOpenAI`` client, whatever
       ``api-version`` its user configured.

    Everything else is GA, including GA clients on ``/openai/realtime`` with a GA
    ``api-version`` or none.  Never raises.
    """
    headers = tuple(headers)
    for value in _header_values(headers, b"openai-beta"):
        if BETA_HEADER_VALUE in (token.strip().lower() for token in value.split(",")):
            return True
    if any(offer.strip() == BETA_SUBPROTOCOL for offer in subprotocols):
        return True
    if path != AZURE_PREVIEW_PATH or _header_values(headers, b"x-stainless-lang"):
        return False
    api_version = next((value for key, value in query if key == "api-version"), None)
    return api_version is not None and is_preview_api_version(api_version)


# --------------------------------------------------------------------------- classification


class Handling(enum.Enum):
    """What the translator does with one event type."""

    TRANSLATED = "translated"
    """Rewritten into the other protocol's shape (possibly under another name)."""
    PASSED = "passed"
    """Forwarded unchanged: the shape is the same in both protocols."""
    DROPPED = "dropped"
    """Not forwarded: the other side has no such event and would fail on it."""


@dataclass(frozen=True, slots=True)
class Rule:
    """How one event type crosses: its handling, the types it goes out as, and why.

    ``sent_as`` is empty for a dropped type; a translated type may go out under one of
    several names (e.g. ``session.created`` → ``session.created`` or
    ``transcription_session.created``) or, where documented, not at all.
    """

    handling: Handling
    sent_as: tuple[str, ...]
    reason: str


def _passed(kind: str, reason: str) -> Rule:
    return Rule(Handling.PASSED, (kind,), reason)


def _translated(*sent_as: str, reason: str) -> Rule:
    return Rule(Handling.TRANSLATED, sent_as, reason)


def _dropped(reason: str) -> Rule:
    return Rule(Handling.DROPPED, (), reason)


_SAME = "same shape in both schemas"

CLIENT_RULES: Final[Mapping[str, Rule]] = MappingProxyType({
    "session.update": _translated("session.update", reason=(
        "session fields move to the GA shape (audio.input/output, output_modalities, "
        "max_output_tokens, audio format objects); session.type realtime is added; "
        "temperature and client_secret are dropped; session.model is carried as sent")),
    "transcription_session.update": _translated("session.update", reason=(
        "GA configures transcription sessions with session.update and session.type "
        "transcription; input fields move under audio.input; modalities and client_secret "
        "are dropped")),
    "conversation.item.create": _translated("conversation.item.create", reason=(
        "assistant content text/audio becomes output_text/output_audio; an item with a "
        "role but no type gets type message")),
    "response.create": _translated("response.create", reason=(
        "modalities → output_modalities, voice and output_audio_format → audio.output, "
        "max_response_output_tokens → max_output_tokens, input items as in "
        "conversation.item.create; temperature is dropped")),
    "conversation.item.delete": _passed("conversation.item.delete", _SAME),
    "conversation.item.retrieve": _passed("conversation.item.retrieve", _SAME),
    "conversation.item.truncate": _passed("conversation.item.truncate", _SAME),
    "input_audio_buffer.append": _passed("input_audio_buffer.append",
                                         _SAME + "; the audio format is the session's"),
    "input_audio_buffer.clear": _passed("input_audio_buffer.clear", _SAME),
    "input_audio_buffer.commit": _passed("input_audio_buffer.commit", _SAME),
    "output_audio_buffer.clear": _passed("output_audio_buffer.clear",
                                         _SAME + " (WebRTC/SIP only upstream)"),
    "response.cancel": _passed("response.cancel", _SAME),
})
"""Every beta client event type (``openai.types.beta.realtime.RealtimeClientEvent``)."""

UNKNOWN_CLIENT_RULE: Final = Rule(Handling.PASSED, (), (
    "a type beta does not define is forwarded unchanged: the upstream answers it with an "
    "error event the client can read"))
"""What happens to a client event whose ``type`` is not in :data:`CLIENT_RULES` (also to an
event without a string ``type``)."""

_NO_MCP = "beta has no MCP tools, so a beta client can neither ask for nor parse MCP events"
_RENAMED = "renamed; same fields"
SERVER_RENAMES: Final[Mapping[str, str]] = MappingProxyType({
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
})
"""GA server events whose translation is a new name only."""

SERVER_RULES: Final[Mapping[str, Rule]] = MappingProxyType({
    "session.created": _translated("session.created", "transcription_session.created", reason=(
        "the GA session object becomes the beta one (flat audio fields, modalities, "
        "max_response_output_tokens, pcm16/g711_* formats); a transcription session is "
        "announced as transcription_session.created, as the beta API did")),
    "session.updated": _translated("session.updated", "transcription_session.updated",
                                   reason="as session.created"),
    "conversation.item.added": _translated("conversation.item.created", reason=(
        "beta announces an item once, with conversation.item.created; content types "
        "output_text/output_audio become text/audio, input_image parts are removed; "
        "dropped when the item is of a type beta lacks (MCP)")),
    "conversation.item.created": _translated("conversation.item.created", reason=(
        "content types as conversation.item.added; dropped when conversation.item.added "
        "already announced the item")),
    "conversation.item.done": _translated("conversation.item.created", reason=(
        "beta has no item.done: dropped when the item was announced, else sent as "
        "conversation.item.created so the client learns of the item")),
    "conversation.item.retrieved": _translated("conversation.item.retrieved",
                                               reason="content types as conversation.item.added"),
    "response.output_item.added": _translated("response.output_item.added",
                                              reason="content types as conversation.item.added"),
    "response.output_item.done": _translated("response.output_item.done",
                                             reason="content types as conversation.item.added"),
    "response.content_part.added": _translated("response.content_part.added", reason=(
        "a part of type output_text/output_audio becomes text/audio (the schemas of both "
        "say text/audio)")),
    "response.content_part.done": _translated("response.content_part.done",
                                              reason="as response.content_part.added"),
    "response.created": _translated("response.created", reason=(
        "output_modalities → modalities, audio.output.format/voice → output_audio_format/"
        "voice, output items as conversation.item.added")),
    "response.done": _translated("response.done", reason=(
        "as response.created (MCP items are removed from output); usage is the same "
        "shape in both (GA adds input_token_details.image_tokens and cached_tokens_details) "
        "and passes unchanged")),
    **{ga: _translated(beta, reason=_RENAMED) for ga, beta in SERVER_RENAMES.items()},
    "conversation.created": _passed("conversation.created", _SAME),
    "conversation.item.deleted": _passed("conversation.item.deleted", _SAME),
    "conversation.item.truncated": _passed("conversation.item.truncated", _SAME),
    "conversation.item.input_audio_transcription.completed": _passed(
        "conversation.item.input_audio_transcription.completed",
        _SAME + " (GA adds languages, which beta parsers ignore)"),
    "conversation.item.input_audio_transcription.delta": _passed(
        "conversation.item.input_audio_transcription.delta", _SAME),
    "conversation.item.input_audio_transcription.failed": _passed(
        "conversation.item.input_audio_transcription.failed", _SAME),
    "error": _passed("error", _SAME + " (error.param names GA paths)"),
    "input_audio_buffer.cleared": _passed("input_audio_buffer.cleared", _SAME),
    "input_audio_buffer.committed": _passed("input_audio_buffer.committed", _SAME),
    "input_audio_buffer.speech_started": _passed("input_audio_buffer.speech_started", _SAME),
    "input_audio_buffer.speech_stopped": _passed("input_audio_buffer.speech_stopped", _SAME),
    "rate_limits.updated": _passed("rate_limits.updated", _SAME),
    "response.function_call_arguments.delta": _passed("response.function_call_arguments.delta",
                                                      _SAME),
    "response.function_call_arguments.done": _passed(
        "response.function_call_arguments.done", _SAME + " (GA adds name)"),
    "output_audio_buffer.started": _passed("output_audio_buffer.started",
                                           _SAME + "; WebRTC/SIP only, never on a WebSocket"),
    "output_audio_buffer.stopped": _passed("output_audio_buffer.stopped",
                                           _SAME + "; WebRTC/SIP only, never on a WebSocket"),
    "output_audio_buffer.cleared": _passed("output_audio_buffer.cleared",
                                           _SAME + "; WebRTC/SIP only, never on a WebSocket"),
    "conversation.item.input_audio_transcription.segment": _dropped(
        "GA-only (diarized transcription segments); the transcript still arrives in "
        "input_audio_transcription.completed"),
    "input_audio_buffer.timeout_triggered": _dropped(
        "GA-only (turn_detection.idle_timeout_ms); beta has no such event"),
    "input_audio_buffer.dtmf_event_received": _dropped("GA-only (SIP calls)"),
    "mcp_list_tools.in_progress": _dropped(_NO_MCP),
    "mcp_list_tools.completed": _dropped(_NO_MCP),
    "mcp_list_tools.failed": _dropped(_NO_MCP),
    "response.mcp_call_arguments.delta": _dropped(_NO_MCP),
    "response.mcp_call_arguments.done": _dropped(_NO_MCP),
    "response.mcp_call.in_progress": _dropped(_NO_MCP),
    "response.mcp_call.completed": _dropped(_NO_MCP),
    "response.mcp_call.failed": _dropped(_NO_MCP),
})
"""Every GA server event type (``openai.types.realtime.RealtimeServerEvent``)."""

UNKNOWN_SERVER_RULE: Final = Rule(Handling.DROPPED, (), (
    "a type GA added after beta froze cannot be parsed by a beta client (rt-client throws "
    "'Invalid message type'), so it is dropped; so is an event without a string type"))
"""What happens to an upstream event whose ``type`` is not in :data:`SERVER_RULES`."""

NO_EQUIVALENT: Final[Mapping[str, str]] = MappingProxyType({
    "session.temperature": "GA has no sampling temperature; dropped (GA refuses the field)",
    "response.create response.temperature": "as session.temperature; dropped",
    "session.client_secret": (
        "session.update cannot mint keys in GA (client secrets come from "
        "POST /v1/realtime/client_secrets, CONTRACT §8); dropped"),
    "transcription_session.update session.modalities": (
        "GA transcription sessions have no output modalities; dropped"),
    "session.turn_detection.eagerness with type server_vad": (
        "GA server_vad has no eagerness (only semantic_vad has); dropped"),
    "session.turn_detection threshold/prefix_padding_ms/silence_duration_ms with type "
    "semantic_vad": "GA semantic_vad has none of them; dropped",
    "item content of type item_reference": (
        "GA message content cannot reference items (GA references whole items in "
        "response.create input); passed unchanged, so the upstream refuses it"),
    "GA session fields truncation, prompt, reasoning, parallel_tool_calls, include "
    "(realtime sessions)": "beta sessions have none of them; not shown to beta clients",
    "GA audio format with a rate other than 24000": (
        "beta pcm16 is 24 kHz only; the GA format object is passed unchanged"),
    "GA error.param": "names GA paths (e.g. session.audio.input.format); passed unchanged",
})
"""What has no counterpart on the other side, and what the translator does about it."""


# --------------------------------------------------------------------------- value mappings


_BETA_FORMATS: Final[Mapping[str, JSON]] = MappingProxyType({
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
})
_GA_FORMATS: Final[Mapping[str, str]] = MappingProxyType({
    "audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw",
})


def format_to_ga(value: object) -> object:
    """Beta ``pcm16`` / ``g711_ulaw`` / ``g711_alaw`` → GA ``{"type": "audio/pcm", "rate":
    24000}`` / ``{"type": "audio/pcmu"}`` / ``{"type": "audio/pcma"}``; anything else is
    returned unchanged (the upstream judges it)."""
    if isinstance(value, str) and value in _BETA_FORMATS:
        return dict(_BETA_FORMATS[value])
    return value


def format_to_beta(value: object) -> object:
    """GA format object → beta format name (inverse of :func:`format_to_ga`); ``audio/pcm``
    without a rate counts as 24 kHz.  Anything else is returned unchanged."""
    if isinstance(value, dict):
        kind = value.get("type")
        if isinstance(kind, str) and kind in _GA_FORMATS and value.get("rate", 24000) == 24000:
            return _GA_FORMATS[kind]
    return value


def modalities_to_ga(value: object) -> object:
    """Beta ``modalities`` → GA ``output_modalities``: GA takes exactly one, and its
    ``["audio"]`` includes the transcript, so any list with ``"audio"`` becomes ``["audio"]``
    and ``["text"]`` stays.  Anything else is returned unchanged."""
    if isinstance(value, list) and value and all(isinstance(m, str) for m in value):
        if "audio" in value:
            return ["audio"]
        if set(value) == {"text"}:
            return ["text"]
    return value


def modalities_to_beta(value: object) -> object:
    """GA ``output_modalities`` → beta ``modalities``: ``["audio"]`` (audio with its
    transcript) is beta's ``["text", "audio"]``.  Anything else is returned unchanged."""
    if value == ["audio"]:
        return ["text", "audio"]
    return value


_GA_VAD_KEYS: Final[Mapping[str, frozenset[str]]] = MappingProxyType({
    "server_vad": frozenset({"eagerness"}),
    "semantic_vad": frozenset({"threshold", "prefix_padding_ms", "silence_duration_ms"}),
})
"""Beta turn-detection keys the GA model of each type does not accept."""


def turn_detection_to_ga(value: object) -> object:
    """Beta ``turn_detection`` → GA ``audio.input.turn_detection``: ``type`` defaults to
    ``server_vad`` (beta's default; GA requires it) and the beta keys the GA type does not
    accept are dropped (``eagerness`` of ``server_vad``; ``threshold``,
    ``prefix_padding_ms``, ``silence_duration_ms`` of ``semantic_vad``).  ``None`` (off) and
    anything else are returned unchanged."""
    if not isinstance(value, dict):
        return value
    kind = value.get("type", "server_vad")
    refused = _GA_VAD_KEYS.get(kind) if isinstance(kind, str) else None
    if refused is None:
        return value
    out = {key: item for key, item in value.items() if key not in refused}
    out["type"] = kind
    return out


def _same(value: object) -> object:
    return value


@dataclass(frozen=True, slots=True)
class Field:
    """One beta session field and where GA keeps it.

    ``ga`` is a dotted path in the GA session object (``audio.input.format``);
    ``to_ga`` / ``to_beta`` convert the value (identity when the value is the same).
    """

    beta: str
    ga: str
    to_ga: Callable[[object], object] = _same
    to_beta: Callable[[object], object] = _same


_INPUT_FIELDS = (
    Field("input_audio_format", "audio.input.format", format_to_ga, format_to_beta),
    Field("input_audio_transcription", "audio.input.transcription"),
    Field("input_audio_noise_reduction", "audio.input.noise_reduction"),
    Field("turn_detection", "audio.input.turn_detection", turn_detection_to_ga),
)

REALTIME_SESSION_FIELDS: Final[tuple[Field, ...]] = (
    Field("modalities", "output_modalities", modalities_to_ga, modalities_to_beta),
    *_INPUT_FIELDS,
    Field("output_audio_format", "audio.output.format", format_to_ga, format_to_beta),
    Field("voice", "audio.output.voice"),
    Field("speed", "audio.output.speed"),
    Field("max_response_output_tokens", "max_output_tokens"),
)
"""Beta realtime-session fields stored elsewhere in GA.  The fields not listed (``model``,
``instructions``, ``tools``, ``tool_choice``, ``tracing``, ``id``, ``object``, ``expires_at``)
have the same name and shape in both."""

TRANSCRIPTION_SESSION_FIELDS: Final[tuple[Field, ...]] = _INPUT_FIELDS
"""Beta transcription-session fields stored elsewhere in GA (``include`` is the same)."""

RESPONSE_FIELDS: Final[tuple[Field, ...]] = (
    Field("modalities", "output_modalities", modalities_to_ga, modalities_to_beta),
    Field("output_audio_format", "audio.output.format", format_to_ga, format_to_beta),
    Field("voice", "audio.output.voice"),
    Field("max_response_output_tokens", "max_output_tokens"),
)
"""Beta ``response.create`` ``response`` fields stored elsewhere in GA."""

_RESPONSE_OBJECT_FIELDS = (
    Field("modalities", "output_modalities", modalities_to_ga, modalities_to_beta),
    Field("output_audio_format", "audio.output.format", format_to_ga, format_to_beta),
    Field("voice", "audio.output.voice"),
)
"""The response object of ``response.created`` / ``response.done`` (both call the limit
``max_output_tokens``)."""

_DROPPED_CLIENT_SESSION_KEYS = frozenset({"temperature", "client_secret"})
_DROPPED_TRANSCRIPTION_KEYS = frozenset({"modalities", "client_secret"})
_GA_ONLY_SESSION_KEYS = frozenset({
    "type", "truncation", "prompt", "reasoning", "parallel_tool_calls", "include",
})
_GA_ONLY_TRANSCRIPTION_KEYS = frozenset({"type"})

_CONTENT_TO_GA: Final[Mapping[str, str]] = MappingProxyType({
    "text": "output_text", "audio": "output_audio"})
_CONTENT_TO_BETA: Final[Mapping[str, str]] = MappingProxyType({
    "output_text": "text", "output_audio": "audio"})
BETA_ITEM_TYPES: Final = frozenset({"message", "function_call", "function_call_output"})
"""Item types beta knows; GA's others (``mcp_call``, ``mcp_list_tools``, ...) are not shown."""
BETA_CONTENT_TYPES: Final = frozenset({"input_text", "input_audio", "item_reference", "text",
                                       "audio"})
"""Content part types beta knows (after renaming); GA ``input_image`` parts are not shown."""


# --------------------------------------------------------------------------- object rewriting


def _put(target: JSON, path: str, value: object) -> None:
    """Set ``target[a][b][c] = value`` for path ``a.b.c``, creating (or replacing non-object)
    intermediate objects."""
    *parents, last = path.split(".")
    for key in parents:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[last] = value


_ABSENT = object()


def _take(source: JSON, path: str) -> object:
    """``source[a][b][c]`` for path ``a.b.c``, or :data:`_ABSENT`."""
    value: object = source
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return _ABSENT
        value = value[key]
    return value


def _to_ga(beta: JSON, fields: tuple[Field, ...], dropped: frozenset[str]) -> JSON:
    """A beta object with *fields* moved to their GA places and *dropped* keys removed;
    other keys (same in both, or unknown) are kept as they are."""
    moved = {field.beta: field for field in fields}
    out: JSON = {}
    for key, value in beta.items():
        field = moved.get(key)
        if field is not None:
            _put(out, field.ga, field.to_ga(value))
        elif key not in dropped:
            # a GA-shaped part the client sent itself ("audio") is merged, not replaced
            out[key] = _merged(value, out[key]) if key in out else value
    return out


def _merged(base: object, over: object, depth: int = 2) -> object:
    """*over* merged into *base*: objects key by key down to *depth* levels (``audio`` →
    ``input``/``output`` → fields), anything else replaced by *over*.  Bounded, so a deeply
    nested input cannot exhaust the stack."""
    if depth == 0 or not isinstance(base, dict) or not isinstance(over, dict):
        return over
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value, depth - 1) if key in out else value
    return out


def _to_beta(ga: JSON, fields: tuple[Field, ...], ga_only: frozenset[str]) -> JSON:
    """A GA object with *fields* moved to their beta places; *ga_only* keys and the ``audio``
    object (whose beta-known parts *fields* moved) are removed, other keys kept."""
    out: JSON = {}
    moved = set()
    for field in fields:
        value = _take(ga, field.ga)
        moved.add(field.ga.split(".", 1)[0])
        if value is not _ABSENT:
            out[field.beta] = field.to_beta(value)
    for key, value in ga.items():
        if key not in moved and key not in ga_only:  # "audio" is among the moved
            out[key] = value
    return out


def _part_type(part: object) -> object:
    return part.get("type") if isinstance(part, dict) else None


def _renamed_part(part: object, names: Mapping[str, str]) -> object:
    kind = _part_type(part)
    if isinstance(part, dict) and isinstance(kind, str) and kind in names:
        return {**part, "type": names[kind]}
    return part


def is_shown_to_beta(item: object) -> bool:
    """Whether a GA item can be shown to a beta client: false for item types beta lacks
    (:data:`BETA_ITEM_TYPES`; MCP items, which only a GA session template can cause)."""
    kind = item.get("type") if isinstance(item, dict) else None
    return not isinstance(kind, str) or kind in BETA_ITEM_TYPES


def item_to_ga(item: object) -> object:
    """A beta conversation item → GA, in place: assistant content ``text`` / ``audio`` →
    ``output_text`` / ``output_audio``; an item with a ``role`` but no ``type`` gets
    ``type: "message"`` (beta's default; GA requires it).  Returns *item*."""
    if isinstance(item, dict):
        if "type" not in item and "role" in item:
            item["type"] = "message"
        content = item.get("content")
        if item.get("role") == "assistant" and isinstance(content, list):
            item["content"] = [_renamed_part(part, _CONTENT_TO_GA) for part in content]
    return item


def item_to_beta(item: object) -> object:
    """A GA conversation item → beta, in place: content ``output_text`` / ``output_audio``
    → ``text`` / ``audio``; parts of types beta lacks (``input_image``) are removed.  Returns
    *item*."""
    content = item.get("content") if isinstance(item, dict) else None
    if isinstance(item, dict) and isinstance(content, list):
        renamed = (_renamed_part(part, _CONTENT_TO_BETA) for part in content)
        item["content"] = [part for part in renamed
                           if not isinstance(kind := _part_type(part), str)
                           or kind in BETA_CONTENT_TYPES]
    return item


def session_to_ga(session: JSON, kind: str = "realtime") -> JSON:
    """A beta session object (of ``session.update``, or of ``transcription_session.update``
    with *kind* ``"transcription"``) → a GA ``session.update`` ``session`` object.

    ``type`` is set to *kind* unless the client sent one; ``model`` and every key that is
    the same in both (or unknown) are carried unchanged, so the upstream and the model
    guard judge them; :data:`NO_EQUIVALENT` keys are dropped.  Returns a new object.
    """
    if kind == "transcription":
        out = _to_ga(session, TRANSCRIPTION_SESSION_FIELDS, _DROPPED_TRANSCRIPTION_KEYS)
    else:
        out = _to_ga(session, REALTIME_SESSION_FIELDS, _DROPPED_CLIENT_SESSION_KEYS)
    return {"type": kind, **out}


def session_to_beta(session: JSON) -> JSON:
    """A GA session object (of ``session.created`` / ``session.updated``) → the beta one:
    a realtime session per :data:`REALTIME_SESSION_FIELDS`, a ``type: "transcription"``
    session per :data:`TRANSCRIPTION_SESSION_FIELDS`.  GA-only keys are removed (see
    :data:`NO_EQUIVALENT`); unknown top-level keys are kept.  Returns a new object."""
    if session.get("type") == "transcription":
        return _to_beta(session, TRANSCRIPTION_SESSION_FIELDS, _GA_ONLY_TRANSCRIPTION_KEYS)
    out = _to_beta(session, REALTIME_SESSION_FIELDS, _GA_ONLY_SESSION_KEYS)
    tools = out.get("tools")
    if isinstance(tools, list):
        out["tools"] = [tool for tool in tools if not isinstance(tool, dict)
                        or tool.get("type", "function") == "function"]
    return out


def response_params_to_ga(response: JSON) -> JSON:
    """Beta ``response.create`` ``response`` → GA: :data:`RESPONSE_FIELDS` moved,
    ``temperature`` dropped, ``input`` items per :func:`item_to_ga`.  Returns a new object."""
    out = _to_ga(response, RESPONSE_FIELDS, frozenset({"temperature"}))
    items = out.get("input")
    if isinstance(items, list):
        for item in items:
            item_to_ga(item)
    return out


def response_to_beta(response: JSON) -> JSON:
    """GA response object (``response.created`` / ``response.done``) → beta: modalities and
    audio output moved back, ``output`` items per :func:`item_to_beta`, ``usage`` (same shape
    in both) unchanged.  Returns a new object."""
    out = _to_beta(response, _RESPONSE_OBJECT_FIELDS, frozenset())
    items = out.get("output")
    if isinstance(items, list):
        out["output"] = [item_to_beta(item) for item in items if is_shown_to_beta(item)]
    return out


# --------------------------------------------------------------------------- hot path


def _prefixes(kind: str) -> tuple[bytes, bytes]:
    return f'{{"type":"{kind}"'.encode(), f'{{"type": "{kind}"'.encode()


_VERBATIM_CLIENT_PREFIXES = _prefixes("input_audio_buffer.append")
RENAMED_STEM: Final = "response.output_"
"""Every renamed type starts with it, so one test turns the other frames away."""
_RENAMED_COMMON = tuple(prefix[:-1] for prefix in _prefixes(RENAMED_STEM))
_RENAMED_PREFIXES: Final = tuple(
    (prefix, new_prefix)
    for old, new in SERVER_RENAMES.items()
    for prefix, new_prefix in zip(_prefixes(old), _prefixes(new), strict=True)
)


def client_frame_is_verbatim(payload: bytes) -> bool:
    """Whether a client text frame (its UTF-8 bytes) is an ``input_audio_buffer.append``
    that crosses unchanged, so the caller may forward it without parsing it.

    True only when the frame starts with ``{"type":"input_audio_buffer.append"`` (with or
    without a space after the colon) and holds no other ``"type"`` key and no backslash
    (so no escaped spelling of a second ``type``): then every JSON parser reads it as an
    append.  The caller still applies its own checks (UTF-8, size, model guard) to it.
    False means: parse it and call :meth:`BetaTranslator.client_to_upstream`.
    """
    for prefix in _VERBATIM_CLIENT_PREFIXES:
        if payload.startswith(prefix):
            return payload.find(b'"type"', len(prefix)) < 0 and b"\\" not in payload
    return False


def upstream_frame_renamed(payload: bytes) -> bytes | None:
    """The beta frame for a GA upstream text frame whose translation is a rename only
    (``response.output_audio.delta`` → ``response.audio.delta``, and the other ``output_*``
    deltas and dones of :data:`SERVER_RULES`), without parsing it; ``None`` when the frame
    does not start with one of those types (then parse it and call
    :meth:`BetaTranslator.upstream_to_client`).  The upstream is trusted not to repeat keys.
    """
    if not payload.startswith(_RENAMED_COMMON):
        return None
    for prefix, new_prefix in _RENAMED_PREFIXES:
        if payload.startswith(prefix):
            return new_prefix + payload[len(prefix):]
    return None


# --------------------------------------------------------------------------- the translator


_Handler = Callable[["BetaTranslator", JSON], list[JSON]]


class BetaTranslator:
    """Translates one beta session's events to GA (client → upstream) and back.

    One instance per session; not thread-safe (one event loop drives it).  Both methods take
    a parsed JSON object and return the events to send on, in order: zero (dropped), one, or
    more.  They take ownership of *event*: it may be modified and returned, and the returned
    events may share parts with it.  They never raise on unknown or malformed input (see the
    module docstring); the rules per type are :data:`CLIENT_RULES` and :data:`SERVER_RULES`.

    State: the ids of conversation items already announced to the client (GA sends
    ``conversation.item.added`` then ``.done``; beta expects one
    ``conversation.item.created``), at most :attr:`MAX_TRACKED_ITEMS` of them (an id is
    forgotten on its ``.done`` or ``conversation.item.deleted``, the oldest first beyond the
    bound).
    """

    MAX_TRACKED_ITEMS: Final = 256

    __slots__ = ("_announced",)

    def __init__(self) -> None:
        self._announced: dict[str, None] = {}

    def client_to_upstream(self, event: JSON) -> list[JSON]:
        """GA events for one beta client event (always at least one: the client's input is
        never swallowed; what the upstream cannot take it refuses with an ``error`` event)."""
        handler = _CLIENT_HANDLERS.get(_kind(event))
        return handler(self, event) if handler is not None else [event]

    def upstream_to_client(self, event: JSON) -> list[JSON]:
        """Beta events for one GA server event: none when the type is dropped or unknown
        (:data:`SERVER_RULES`, :data:`UNKNOWN_SERVER_RULE`), else one."""
        kind = _kind(event)
        handler = _SERVER_HANDLERS.get(kind)
        if handler is not None:
            return handler(self, event)
        rule = SERVER_RULES.get(kind) if kind is not None else None
        return [event] if rule is not None and rule.handling is Handling.PASSED else []

    # -- client events

    def _session_update(self, event: JSON) -> list[JSON]:
        return _rewritten(event, "session", session_to_ga)

    def _transcription_session_update(self, event: JSON) -> list[JSON]:
        session = event.get("session")
        event["type"] = "session.update"
        if isinstance(session, dict):
            event["session"] = session_to_ga(session, "transcription")
        return [event]

    def _item_create(self, event: JSON) -> list[JSON]:
        item_to_ga(event.get("item"))
        return [event]

    def _response_create(self, event: JSON) -> list[JSON]:
        return _rewritten(event, "response", response_params_to_ga)

    # -- server events

    def _session(self, event: JSON) -> list[JSON]:
        session = event.get("session")
        if isinstance(session, dict):
            if session.get("type") == "transcription":
                event["type"] = "transcription_" + event["type"]
            event["session"] = session_to_beta(session)
        return [event]

    def _item_announced(self, event: JSON) -> list[JSON]:
        item = event.get("item")
        if not is_shown_to_beta(item):
            return []
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, str):
            if item_id in self._announced:
                return []
            if len(self._announced) >= self.MAX_TRACKED_ITEMS:
                del self._announced[next(iter(self._announced))]
            self._announced[item_id] = None
        event["type"] = "conversation.item.created"
        item_to_beta(item)
        return [event]

    def _item_done(self, event: JSON) -> list[JSON]:
        item = event.get("item")
        if not is_shown_to_beta(item):
            return []
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, str) and item_id in self._announced:
            del self._announced[item_id]
            return []
        event["type"] = "conversation.item.created"
        item_to_beta(item)
        return [event]

    def _item_deleted(self, event: JSON) -> list[JSON]:
        item_id = event.get("item_id")
        if isinstance(item_id, str):
            self._announced.pop(item_id, None)
        return [event]

    def _item_inside(self, event: JSON) -> list[JSON]:
        item = event.get("item")
        if not is_shown_to_beta(item):
            return []
        item_to_beta(item)
        return [event]

    def _part(self, event: JSON) -> list[JSON]:
        part = event.get("part")
        if isinstance(part, dict):
            kind = part.get("type")
            if isinstance(kind, str) and kind in _CONTENT_TO_BETA:
                event["part"] = {**part, "type": _CONTENT_TO_BETA[kind]}
        return [event]

    def _response(self, event: JSON) -> list[JSON]:
        return _rewritten(event, "response", response_to_beta)

    def _renamed(self, event: JSON) -> list[JSON]:
        event["type"] = SERVER_RENAMES[event["type"]]
        return [event]


def _rewritten(event: JSON, key: str, convert: Callable[[JSON], JSON]) -> list[JSON]:
    """*event* with its object at *key* converted (left as it is when not an object)."""
    value = event.get(key)
    if isinstance(value, dict):
        event[key] = convert(value)
    return [event]


def _kind(event: JSON) -> str | None:
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) else None


_CLIENT_HANDLERS: Final[Mapping[str | None, _Handler]] = MappingProxyType({
    "session.update": BetaTranslator._session_update,
    "transcription_session.update": BetaTranslator._transcription_session_update,
    "conversation.item.create": BetaTranslator._item_create,
    "response.create": BetaTranslator._response_create,
})

_SERVER_HANDLERS: Final[Mapping[str | None, _Handler]] = MappingProxyType({
    "session.created": BetaTranslator._session,
    "session.updated": BetaTranslator._session,
    "conversation.item.added": BetaTranslator._item_announced,
    "conversation.item.created": BetaTranslator._item_announced,
    "conversation.item.done": BetaTranslator._item_done,
    "conversation.item.deleted": BetaTranslator._item_deleted,
    "conversation.item.retrieved": BetaTranslator._item_inside,
    "response.output_item.added": BetaTranslator._item_inside,
    "response.output_item.done": BetaTranslator._item_inside,
    "response.content_part.added": BetaTranslator._part,
    "response.content_part.done": BetaTranslator._part,
    "response.created": BetaTranslator._response,
    "response.done": BetaTranslator._response,
    **{kind: BetaTranslator._renamed for kind in SERVER_RENAMES},
})
