"""Model pinning: :func:`gateway.guard.model_guard` on client ``session.update`` events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.guard import model_guard

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
    '{"type":"session.update",',  # not JSON: the upstream answers it
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


def test_invalid_utf8_bytes_pass_to_the_relay_check() -> None:
    assert guard()(b'{"type":"session.update","session":{"model":"\xff"}}') is None
