"""Model pinning: :func:`gateway.guard.model_guard` on client ``session.update`` events."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from gateway.guard import (
    MAX_CHECKED_BYTES,
    MAX_CHECKED_CONTAINERS,
    may_be_session_update,
    model_guard,
)

MODEL = "gpt-realtime"
UPSTREAM_MODEL = "gpt-realtime-2025-08-28"
NESTED = "[" * 5000 + "]" * 5000
"""Valid JSON that CPython's decoder refuses with RecursionError."""


def guard() -> Any:
    return model_guard({MODEL, UPSTREAM_MODEL})


def refused(answer: str | None) -> bool:
    if answer is None:
        return False
    event = json.loads(answer)
    assert event["type"] == "error"
    assert event["error"]["code"] == "forbidden"
    return True


def update(**session: object) -> str:
    return json.dumps({"type": "session.update", "session": session})


@pytest.mark.parametrize("frame", [
    update(),
    update(model=None, instructions="hi"),
    update(model=MODEL),
    update(model=UPSTREAM_MODEL),
    json.dumps({"type": "response.create", "response": {"model": "gpt-5-pro"}}),
    '{"type":"response.create",',  # not JSON, cannot be a session.update: upstream answers
    b'{"type":"input_audio_buffer.append","audio":"\\u0041AAA"}',
    b"\xff\xfe a binary message that is not JSON",
    b'{"type":"session.update","session":{"model":"' + MODEL.encode() + b'"}}',
    "[1, 2]",
])
def test_own_model_or_none_is_forwarded(frame: str | bytes) -> None:
    assert guard()(frame) is None


@pytest.mark.parametrize("model", [
    "gpt-5-pro", "", 42, 4.2, True, ["gpt-realtime"], {"id": "gpt-5-pro"}, [MODEL, MODEL],
])
def test_another_or_non_string_model_is_refused(model: object) -> None:
    assert refused(guard()(update(model=model)))
    assert refused(guard()(update(model=model).encode()))


def test_each_refusal_has_its_own_event_id() -> None:
    check = guard()
    first, second = check(update(model="gpt-5-pro")), check(update(model="gpt-5-pro"))
    assert json.loads(first)["event_id"] != json.loads(second)["event_id"]


def test_escaped_spelling_is_the_same_event() -> None:
    frame = '{"typ\\u0065":"session\\u002eupdate","session":{"mod\\u0065l":"gpt-5-pro"}}'
    assert refused(guard()(frame))


@pytest.mark.parametrize("frame", [
    # first value (what a first-wins parser sees) forbidden, last (Python's) allowed
    '{"type":"session.update","session":{"model":"gpt-5-pro","model":"gpt-realtime"}}',
    # the event type itself duplicated, both orders
    '{"type":"session.update","type":"response.create","session":{"model":"gpt-5-pro"}}',
    '{"type":"response.create","type":"session.update","session":{"model":"gpt-realtime"}}',
    # a duplicate elsewhere in the message, or the whole session twice
    '{"type":"session.update","session":{"model":"gpt-realtime"},"event_id":"a",'
    '"event_id":"b"}',
    '{"type":"session.update","session":{"model":"gpt-5-pro"},'
    '"session":{"model":"gpt-realtime"}}',
    # escapes decoded before keys are compared
    '{"type":"session.update","session":{"model":"gpt-5-pro","mod\\u0065l":"gpt-realtime"}}',
    '{"type":"response.create","typ\\u0065":"session\\u002eupdate",'
    '"session":{"model":"gpt-5-pro"}}',
])
def test_duplicate_keys_in_a_session_update_are_refused(frame: str) -> None:
    assert refused(guard()(frame))
    assert refused(guard()(frame.encode()))


def test_duplicate_keys_elsewhere_pass() -> None:
    frame = '{"type":"conversation.item.create","item":{"a":1,"a":2}}'
    assert guard()(frame) is None


@pytest.mark.parametrize("frame", [
    '{"type":"session.update","session":{"model":"gpt-5-pro","x":' + NESTED + "}}",
    '{"type":"session.update","session":{"x":' + NESTED + "}}",
    '{"type":"session\\u002eupdate","x":' + NESTED + "}",
])
def test_nesting_too_deep_to_check_is_refused_not_raised(frame: str) -> None:
    """Another parser may read what Python's refuses: the message cannot be checked."""
    assert refused(guard()(frame))
    assert refused(guard()(frame.encode()))


def test_a_binary_message_is_judged_by_the_same_rule() -> None:
    assert guard()(b'{"type":"session.update","session":{"model":"\xff"}}') is not None
    assert guard()(update(model=MODEL).encode()) is None


LONG_INT = "1" * 5000
"""Valid JSON that Node parses and CPython refuses (over its 4,300-digit limit)."""


@pytest.mark.parametrize("frame", [
    # CPython's parser refuses these; others accept them and would see the forbidden model
    '{"type":"session.update","session":{"model":"gpt-5-pro","n":' + LONG_INT + "}}",
    '{"type":"session.update","session":{"model":"gpt-5-pro"}}{"type":"x"}',
    '{"type":"session.update","session":{"model":"gpt-5-pro"}} trailing',
    '{"type":"session.update","session":{"model":"gpt-5-pro","t":NaN}}',
    '{"type":"session.update","session":{"model":"gpt-5-pro","t":-Infinity}}',
    '{"type":"session.update","session":{"model":"gpt-5-pro"},}',
    '{"type":"session.update",/* comment */"session":{"model":"gpt-5-pro"}}',
    "{'type':'session.update','session':{'model':'gpt-5-pro'}}",
    '\ufeff{"type":"session.update","session":{"model":"gpt-5-pro"}}',
    '{"type":"session.update",',
    # escaped spellings of the event, hex in either case, even in a non-JSON message
    '{"type":"session\\u002Eupdate","session":{"model":"gpt-5-pro"}}{}',
    '{"type":"sessi\\u006Fn.update"',
])
def test_a_possible_session_update_that_does_not_parse_strictly_is_refused(frame: str) -> None:
    assert refused(guard()(frame))
    assert refused(guard()(frame.encode("utf-8", "surrogatepass")))


@pytest.mark.parametrize("frame", [
    # a legitimate-looking update made too large or too many-objected to parse cheaply
    update(model=MODEL, instructions="x" * (MAX_CHECKED_BYTES + 1)),
    update(model=MODEL, tools=[{}] * (MAX_CHECKED_CONTAINERS + 1)),
    '{"type":"session\\u002eupdate","x":[' + ",".join(["[]"] * MAX_CHECKED_CONTAINERS) + "]}",
])
def test_a_possible_session_update_too_costly_to_check_is_refused(frame: str) -> None:
    assert refused(guard()(frame))


def test_large_messages_that_cannot_be_a_session_update_pass() -> None:
    audio = json.dumps({"type": "input_audio_buffer.append", "audio": "QUJD" * 1_000_000})
    text = json.dumps({"type": "conversation.item.create",
                       "item": {"content": [{"type": "input_text", "text": "é" * 600_000}]}})
    assert "\\u" in text
    assert guard()(audio.encode()) is None
    assert guard()(text.encode()) is None


@pytest.mark.parametrize(("message", "expected"), [
    (b'"session.update"', True),
    (b'"\\u0073\\u0065\\u0073\\u0073\\u0069\\u006f\\u006e\\u002e'
     b'\\u0075\\u0070\\u0064\\u0061\\u0074\\u0065"', True),
    (b'"sessi\\u006Fn.updat\\U0065"', True),
    (b'"session\\u002fupdate"', False),
    (b'"session update \\u0041"', False),
    (b'"SESSION.UPDATE"', False),
])
def test_may_be_session_update_reads_every_spelling(message: bytes, expected: bool) -> None:
    assert may_be_session_update(message) is expected


ADVERSARIAL_BYTES = 15 * 1024 * 1024


@pytest.mark.parametrize("prefix", [
    b'{"type":"x\\u0041","a":[',  # an escape, no session.update: scanned, then forwarded
    b'{"type":"session.update","a":[',  # a candidate: refused unparsed
    b'{"type":"\\u0073\\u0065","a":[',  # partial escaped spellings, then forwarded
])
def test_a_15_mb_message_of_small_objects_does_not_hold_the_loop(prefix: bytes) -> None:
    """One guard call is the event loop's lag for this message: before the bounded guard it
    parsed every object with a Python hook (about 1.6 s); now it is a C-speed scan."""
    body = b",".join([b'{"\\u0073e":1}'] * (ADVERSARIAL_BYTES // 14))
    message = prefix + body + b"]}"
    assert len(message) >= ADVERSARIAL_BYTES
    check = guard()
    started = time.perf_counter()
    answer = check(message)
    lag = time.perf_counter() - started
    assert (answer is not None) is (b"session.update" in prefix)
    assert lag < 0.5, f"one guard call held the loop {lag:.3f} s"
