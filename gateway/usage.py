"""Token usage read from upstream server events (CONTRACT §6 ``tokens_total`` kinds).

Pure functions.  An upstream text message carries usage only if it contains
:data:`RESPONSE_DONE_MARKER` or :data:`TRANSCRIPTION_DONE_MARKER`: the relay
searches its frames for them in place and calls :func:`tap` on the few that
match; :func:`tap` searches again (two substring searches) and only then
parses the JSON.

Sources (openai-python ``types/realtime``):

* ``response.done`` → ``response.usage``: ``input_token_details{text_tokens,
  audio_tokens, image_tokens, cached_tokens}``, ``output_token_details{text_tokens,
  audio_tokens}``, ``total_tokens``;
* ``conversation.item.input_audio_transcription.completed`` → ``usage`` of
  ``type: "tokens"`` (``input_token_details{text_tokens, audio_tokens}``,
  ``output_tokens`` counted as ``output_text``); ``type: "duration"`` carries
  seconds, not tokens, and yields no counts.

``input_cached`` is a subset of the input kinds (``cached_tokens`` ⊂ ``input_tokens``):
it is reported for cost dashboards but never added to :attr:`TokenCounts.billable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

RESPONSE_DONE_MARKER = b'"response.done"'
"""Bytes in every ``response.done`` event (its ``type`` value, quoted)."""
TRANSCRIPTION_DONE_MARKER = b"transcription.completed"
"""Bytes in every ``conversation.item.input_audio_transcription.completed`` event."""
_RESPONSE_DONE = RESPONSE_DONE_MARKER.decode()
_TRANSCRIPTION_DONE = TRANSCRIPTION_DONE_MARKER.decode()
TRANSCRIPTION_COMPLETED = "conversation.item.input_audio_transcription.completed"

KINDS = ("input_text", "input_audio", "input_image", "input_cached", "output_text", "output_audio")


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Token counts of one usage event, by kind (all >= 0).

    ``billable`` is what the tenant's token budget is debited: ``total_tokens``
    when the event states it, else input + output.
    """

    input_text: int = 0
    input_audio: int = 0
    input_image: int = 0
    input_cached: int = 0
    output_text: int = 0
    output_audio: int = 0
    billable: int = 0

    def by_kind(self) -> dict[str, int]:
        """``{kind: count}`` for the kinds of CONTRACT §6, zeros included."""
        return {kind: getattr(self, kind) for kind in KINDS}


def _count(mapping: Any, key: str) -> int:
    if not isinstance(mapping, dict):
        return 0
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def usage_of(event: Any) -> TokenCounts | None:
    """Token counts of a parsed server event, or ``None`` if it carries no token usage.

    Never raises: malformed or missing fields count as 0.
    """
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    if kind == "response.done":
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
    elif kind == TRANSCRIPTION_COMPLETED:
        usage = event.get("usage")
        if isinstance(usage, dict) and usage.get("type", "tokens") != "tokens":
            return None
    else:
        return None
    if not isinstance(usage, dict):
        return None
    inputs = usage.get("input_token_details")
    outputs = usage.get("output_token_details")
    input_text = _count(inputs, "text_tokens")
    input_audio = _count(inputs, "audio_tokens")
    input_image = _count(inputs, "image_tokens")
    if kind == TRANSCRIPTION_COMPLETED:
        output_text = _count(usage, "output_tokens")
        output_audio = 0
    else:
        output_text = _count(outputs, "text_tokens")
        output_audio = _count(outputs, "audio_tokens")
    stated_total = _count(usage, "total_tokens")
    summed = _count(usage, "input_tokens") + _count(usage, "output_tokens")
    detailed = input_text + input_audio + input_image + output_text + output_audio
    return TokenCounts(
        input_text=input_text,
        input_audio=input_audio,
        input_image=input_image,
        input_cached=_count(inputs, "cached_tokens"),
        output_text=output_text,
        output_audio=output_audio,
        billable=stated_total or summed or detailed,
    )


def tap(frame: str | bytes) -> TokenCounts | None:
    """Usage carried by an upstream text message (``str``, or its UTF-8 ``bytes``), or ``None``.

    The cheap substring test runs first; JSON is parsed only for messages that may
    be a ``response.done`` or a transcription-completed event.  Never raises
    (malformed or absurdly nested JSON carries no usage).
    """
    if isinstance(frame, bytes):
        if RESPONSE_DONE_MARKER not in frame and TRANSCRIPTION_DONE_MARKER not in frame:
            return None
    elif _RESPONSE_DONE not in frame and _TRANSCRIPTION_DONE not in frame:
        return None
    try:
        event = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    return usage_of(event)
