"""Usage extraction from upstream events (CONTRACT §6 kinds)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.usage import TRANSCRIPTION_COMPLETED as TRANSCRIPTION
from gateway.usage import TokenCounts, tap, usage_of

RESPONSE_DONE: dict[str, Any] = {
    "type": "response.done",
    "event_id": "event_1",
    "response": {
        "id": "resp_1", "object": "realtime.response", "status": "completed",
        "output": [{"type": "message", "content": [{"transcript": "response.done here"}]}],
        "usage": {
            "total_tokens": 253, "input_tokens": 120, "output_tokens": 133,
            "input_token_details": {"text_tokens": 20, "audio_tokens": 95, "image_tokens": 5,
                                    "cached_tokens": 64},
            "output_token_details": {"text_tokens": 33, "audio_tokens": 100},
        },
    },
}


def test_response_done_counts_every_kind() -> None:
    counts = tap(json.dumps(RESPONSE_DONE))
    assert counts == TokenCounts(input_text=20, input_audio=95, input_image=5, input_cached=64,
                                 output_text=33, output_audio=100, billable=253)
    assert counts.by_kind()["input_cached"] == 64


def test_transcription_tokens_and_duration() -> None:
    event = {"type": "conversation.item.input_audio_transcription.completed",
             "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 6,
                       "total_tokens": 20,
                       "input_token_details": {"text_tokens": 0, "audio_tokens": 14}}}
    assert tap(json.dumps(event)) == TokenCounts(input_audio=14, output_text=6, billable=20)
    event["usage"] = {"type": "duration", "seconds": 2.5}
    assert tap(json.dumps(event)) is None


@pytest.mark.parametrize("frame", [
    '{"type":"response.output_audio.delta","delta":"AAAA"}',
    '{"type":"session.updated"}',
    "not json at all response.done",
    '{"type": "response.done"',  # cut
    '{"type":"response.output_text.delta","delta":"\\"response.done\\""}',
])
def test_frames_without_usage(frame: str) -> None:
    assert tap(frame) is None


@pytest.mark.parametrize(("usage", "billable"), [
    ({}, 0),
    ({"input_tokens": 3, "output_tokens": 4}, 7),
    ({"total_tokens": -5, "input_tokens": "x", "output_tokens": True}, 0),
    ({"input_token_details": {"audio_tokens": 9}}, 9),
])
def test_missing_or_malformed_fields_count_zero(usage: dict[str, Any], billable: int) -> None:
    counts = usage_of({"type": "response.done", "response": {"usage": usage}})
    assert counts is not None and counts.billable == billable


def test_response_done_without_usage() -> None:
    assert usage_of({"type": "response.done", "response": {"status": "failed"}}) is None


@settings(max_examples=1000, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "response", "usage", "input_token_details",
                                       "output_token_details", "audio_tokens", "total_tokens",
                                       "text_tokens"]), children, max_size=5),
    max_leaves=20,
))
def test_fuzz_usage_never_raises(event: Any) -> None:
    if isinstance(event, dict):
        event["type"] = "response.done"
    counts = usage_of(event)
    assert counts is None or min(counts.by_kind().values()) >= 0


def test_bytes_payloads_count_like_text() -> None:
    """The relay passes the UTF-8 payload of a text frame; invalid UTF-8 is not usage."""
    frame = json.dumps(RESPONSE_DONE)
    assert tap(frame.encode()) == tap(frame)
    assert tap(b'{"type":"session.updated"}') is None
    assert tap(b'{"type":"response.done","x":"\xff"}') is None


@pytest.mark.parametrize("frame", [
    '{"type":"response.done","response":{"usage":' + "[" * 5000 + "]" * 5000 + "}}",
    '{"type":"' + TRANSCRIPTION + '","usage":' + "{\"a\":" * 5000 + "0" + "}" * 5000 + "}",
])
def test_nesting_too_deep_to_parse_is_not_usage(frame: str) -> None:
    """CPython's decoder raises RecursionError (not ValueError) on such JSON."""
    assert tap(frame) is None
    assert tap(frame.encode()) is None
