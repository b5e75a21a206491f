"""The GA Realtime wire shapes the emulator checks: the session object and ``session.update``.

Follows openai-python ``src/openai/types/realtime/*.py`` (GA).  ``session.update`` is
validated like the GA API: ``session.type`` is required and must be ``"realtime"``;
unknown or beta-shaped keys such as ``modalities`` are refused with ``unknown_parameter``.
A valid update is merged (``audio.input``/``audio.output`` keys one by one, everything
else replaced); an invalid one raises :class:`RequestError` and changes nothing.

Also here, because every other module of the emulator uses them: the ``JSON`` alias,
:func:`new_id`, the audio formats and :class:`RequestError` (one ``error`` event).
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from collections.abc import Sequence
from typing import Any, TypeAlias

__all__ = [
    "AUDIO_FORMATS",
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_MODEL",
    "DEFAULT_VOICE",
    "G711_BYTES_PER_MS",
    "JSON",
    "PCM_BYTES_PER_MS",
    "RESPONSE_KEYS",
    "SESSION_SECONDS",
    "RequestError",
    "bytes_per_ms",
    "check_format",
    "check_max_output_tokens",
    "check_modalities",
    "check_number",
    "check_session_patch",
    "check_tool_choice",
    "check_tools",
    "default_session",
    "invalid_type",
    "invalid_value",
    "merge_session",
    "missing",
    "new_id",
    "only_keys",
    "require_object",
]

JSON: TypeAlias = dict[str, Any]

PCM_BYTES_PER_MS = 48
"""Bytes per millisecond of ``audio/pcm`` (PCM16, 24 kHz, mono)."""

G711_BYTES_PER_MS = 8
"""Bytes per millisecond of ``audio/pcmu`` and ``audio/pcma`` (8 kHz, 8 bit)."""

AUDIO_FORMATS: dict[str, int] = {
    "audio/pcm": PCM_BYTES_PER_MS,
    "audio/pcmu": G711_BYTES_PER_MS,
    "audio/pcma": G711_BYTES_PER_MS,
}
"""The audio format types the API accepts → bytes per millisecond."""

DEFAULT_MODEL = "gpt-realtime"
DEFAULT_INSTRUCTIONS = "You are the realtime-gateway protocol emulator. Answer briefly."
DEFAULT_VOICE = "marin"
SESSION_SECONDS = 3600
"""Lifetime announced in ``session.expires_at``, seconds (not enforced)."""

_SESSION_KEYS = frozenset(
    {
        "type", "audio", "include", "instructions", "max_output_tokens", "model",
        "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice",
        "tools", "tracing", "truncation",
    }
)
_SESSION_READ_ONLY_KEYS = frozenset({"id", "object", "expires_at"})
RESPONSE_KEYS = frozenset(
    {
        "audio", "conversation", "input", "instructions", "max_output_tokens", "metadata",
        "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice",
        "tools",
    }
)
"""The keys a ``response.create`` ``response`` object may have."""

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


def new_id(prefix: str) -> str:
    """A fresh wire id ``<prefix>_<20 hex digits>`` (``sess``, ``item``, ``resp`` …)."""
    return f"{prefix}_{secrets.token_hex(10)}"


# --------------------------------------------------------------------------- errors


class RequestError(Exception):
    """A client event the API would refuse; becomes one ``error`` event.

    Attributes:
        code: the ``error.code`` (``invalid_value``, ``unknown_parameter`` …).
        message: the ``error.message``.
        param: the offending parameter's dotted path, or ``None``.
        error_type: the ``error.type`` (``invalid_request_error`` unless told).
    """

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


def missing(param: str) -> RequestError:
    """``missing_required_parameter`` for *param*."""
    return RequestError(
        "missing_required_parameter", f"Missing required parameter: '{param}'.", param
    )


def _unknown(param: str) -> RequestError:
    return RequestError("unknown_parameter", f"Unknown parameter: '{param}'.", param)


def invalid_type(param: str, expected: str) -> RequestError:
    """``invalid_type``: *param* is not *expected* (``"an object"``, ``"a string"`` …)."""
    return RequestError(
        "invalid_type", f"Invalid type for '{param}': expected {expected}.", param
    )


def invalid_value(param: str, value: Any, allowed: Sequence[str] = ()) -> RequestError:
    """``invalid_value`` for *value* of *param*, naming the *allowed* values if any."""
    message = f"Invalid value: {json.dumps(value)[:100]}."
    if allowed:
        message += " Supported values are: " + ", ".join(f"'{a}'" for a in allowed) + "."
    return RequestError("invalid_value", message, param)


# --------------------------------------------------------------------------- checks


def require_object(value: Any, param: str) -> JSON:
    """Return *value* if it is a JSON object.

    Raises:
        RequestError: it is not.
    """
    if not isinstance(value, dict):
        raise invalid_type(param, "an object")
    return value


def only_keys(value: JSON, allowed: frozenset[str] | set[str], param: str) -> None:
    """Raise :class:`RequestError` (``unknown_parameter``) for a key not in *allowed*."""
    for key in value:
        if key not in allowed:
            raise _unknown(f"{param}.{key}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_number(value: Any, param: str, low: float, high: float, integer: bool) -> None:
    """Raise :class:`RequestError` unless *value* is a number (an int if *integer*) in
    ``low..high``."""
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise invalid_type(param, "an integer")
    if not _is_number(value):
        raise invalid_type(param, "a number")
    if not low <= value <= high:
        raise RequestError(
            "decimal_above_max_value" if value > high else "decimal_below_min_value",
            f"Invalid '{param}': {value} is outside {low}..{high}.",
            param,
        )


def _check_bool(value: Any, param: str) -> None:
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean")


def check_format(value: Any, param: str) -> None:
    """Check an audio ``format`` object (``{"type": "audio/pcm", "rate": 24000}`` …).

    Raises:
        RequestError: unknown type, or a rate other than 24000 (PCM only).
    """
    fmt = require_object(value, param)
    only_keys(fmt, {"type", "rate"}, param)
    kind = fmt.get("type")
    if kind not in AUDIO_FORMATS:
        raise invalid_value(f"{param}.type", kind, tuple(AUDIO_FORMATS))
    if "rate" in fmt and (kind != "audio/pcm" or fmt["rate"] != 24000):
        raise invalid_value(f"{param}.rate", fmt["rate"], ("24000",))


def _check_turn_detection(value: Any, param: str) -> None:
    if value is None:
        return
    detection = require_object(value, param)
    kind = detection.get("type")
    if kind == "server_vad":
        only_keys(detection, set(_SERVER_VAD_DEFAULTS), param)
        if "threshold" in detection:
            check_number(detection["threshold"], f"{param}.threshold", 0.0, 1.0, False)
        for key in ("prefix_padding_ms", "silence_duration_ms"):
            if key in detection:
                check_number(detection[key], f"{param}.{key}", 0, 10_000, True)
        if detection.get("idle_timeout_ms") is not None:
            check_number(detection["idle_timeout_ms"], f"{param}.idle_timeout_ms", 0, 1e7, True)
    elif kind == "semantic_vad":
        only_keys(detection, set(_SEMANTIC_VAD_DEFAULTS), param)
        if "eagerness" in detection and detection["eagerness"] not in (
            "low", "medium", "high", "auto",
        ):
            raise invalid_value(
                f"{param}.eagerness", detection["eagerness"], ("low", "medium", "high", "auto")
            )
    else:
        raise invalid_value(f"{param}.type", kind, ("server_vad", "semantic_vad"))
    for key in ("create_response", "interrupt_response"):
        if key in detection:
            _check_bool(detection[key], f"{param}.{key}")


def _check_audio(value: Any) -> None:
    audio = require_object(value, "session.audio")
    only_keys(audio, {"input", "output"}, "session.audio")
    if "input" in audio:
        param = "session.audio.input"
        audio_in = require_object(audio["input"], param)
        only_keys(
            audio_in, {"format", "noise_reduction", "transcription", "turn_detection"}, param
        )
        if "format" in audio_in:
            check_format(audio_in["format"], f"{param}.format")
        if "turn_detection" in audio_in:
            _check_turn_detection(audio_in["turn_detection"], f"{param}.turn_detection")
        if audio_in.get("transcription") is not None:
            transcription = require_object(audio_in["transcription"], f"{param}.transcription")
            only_keys(transcription, {"model", "language", "prompt"}, f"{param}.transcription")
            for key in ("model", "language", "prompt"):
                if transcription.get(key) is not None and not isinstance(transcription[key], str):
                    raise invalid_type(f"{param}.transcription.{key}", "a string")
        if audio_in.get("noise_reduction") is not None:
            noise = require_object(audio_in["noise_reduction"], f"{param}.noise_reduction")
            only_keys(noise, {"type", "strength"}, f"{param}.noise_reduction")
            if noise.get("type") not in (None, "near_field", "far_field"):
                raise invalid_value(
                    f"{param}.noise_reduction.type", noise["type"], ("near_field", "far_field")
                )
    if "output" in audio:
        param = "session.audio.output"
        audio_out = require_object(audio["output"], param)
        only_keys(audio_out, {"format", "speed", "voice"}, param)
        if "format" in audio_out:
            check_format(audio_out["format"], f"{param}.format")
        if "speed" in audio_out:
            check_number(audio_out["speed"], f"{param}.speed", 0.25, 1.5, False)
        voice = audio_out.get("voice")
        if "voice" in audio_out and not (
            isinstance(voice, str) or (isinstance(voice, dict) and isinstance(voice.get("id"), str))
        ):
            raise invalid_type(f"{param}.voice", "a string or an object with an id")


def check_modalities(value: Any, param: str) -> None:
    """Check ``output_modalities``: exactly ``["audio"]`` or ``["text"]``.

    Raises:
        RequestError: anything else.
    """
    if not isinstance(value, list):
        raise invalid_type(param, "an array")
    if len(value) != 1 or value[0] not in ("audio", "text"):
        raise invalid_value(param, value, ("['audio']", "['text']"))


def check_tools(value: Any, param: str) -> None:
    """Check a ``tools`` array (``function`` tools need a ``name``; ``mcp`` passes).

    Raises:
        RequestError: the first malformed tool.
    """
    if not isinstance(value, list):
        raise invalid_type(param, "an array")
    for index, tool in enumerate(value):
        tool_param = f"{param}[{index}]"
        tool = require_object(tool, tool_param)
        kind = tool.get("type", "function")
        if kind == "function":
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise missing(f"{tool_param}.name")
            if tool.get("parameters") is not None:
                require_object(tool["parameters"], f"{tool_param}.parameters")
        elif kind != "mcp":
            raise invalid_value(f"{tool_param}.type", kind, ("function", "mcp"))


def check_tool_choice(value: Any, param: str) -> None:
    """Check ``tool_choice``: ``auto|none|required`` or a function/mcp object.

    Raises:
        RequestError: anything else.
    """
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise invalid_value(param, value, ("auto", "none", "required"))
        return
    choice = require_object(value, param)
    if choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise missing(f"{param}.name")
    elif choice.get("type") != "mcp":
        raise invalid_value(f"{param}.type", choice.get("type"), ("function", "mcp"))


def check_max_output_tokens(value: Any, param: str) -> None:
    """Check ``max_output_tokens``: ``"inf"``, ``None`` or an integer 1..4096.

    Raises:
        RequestError: anything else.
    """
    if value == "inf" or value is None:
        return
    check_number(value, param, 1, 4096, True)


def check_session_patch(patch: JSON) -> None:
    """Validate a ``session.update`` ``session`` object like the GA API.

    Raises:
        RequestError: the first problem found.
    """
    if "type" not in patch:
        raise missing("session.type")
    if patch["type"] != "realtime":
        raise invalid_value("session.type", patch["type"], ("realtime",))
    only_keys(patch, _SESSION_KEYS | _SESSION_READ_ONLY_KEYS, "session")
    if "audio" in patch:
        _check_audio(patch["audio"])
    if "output_modalities" in patch:
        check_modalities(patch["output_modalities"], "session.output_modalities")
    for key in ("instructions", "model"):
        if key in patch and not isinstance(patch[key], str):
            raise invalid_type(f"session.{key}", "a string")
    if "tools" in patch:
        check_tools(patch["tools"], "session.tools")
    if "tool_choice" in patch:
        check_tool_choice(patch["tool_choice"], "session.tool_choice")
    if "max_output_tokens" in patch:
        check_max_output_tokens(patch["max_output_tokens"], "session.max_output_tokens")
    if "parallel_tool_calls" in patch:
        _check_bool(patch["parallel_tool_calls"], "session.parallel_tool_calls")


# --------------------------------------------------------------------------- the session object


def _normalize_turn_detection(value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    defaults = _SERVER_VAD_DEFAULTS if value.get("type") == "server_vad" else _SEMANTIC_VAD_DEFAULTS
    return {**defaults, **copy.deepcopy(value)}


def merge_session(current: JSON, patch: JSON) -> JSON:
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


def default_session(session_id: str, model: str) -> JSON:
    """The session of ``session.created``: ``type: "realtime"``, *model*, ``audio/pcm``
    24 kHz in and out, ``server_vad`` turn detection, voice ``marin``."""
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


def bytes_per_ms(fmt: JSON) -> int:
    """Bytes per millisecond of audio in format *fmt* (a ``format`` object): 48 for
    ``audio/pcm`` PCM16 24 kHz (also when the type is missing), 8 for G.711."""
    return AUDIO_FORMATS.get(str(fmt.get("type", "audio/pcm")), PCM_BYTES_PER_MS)
