"""gateway.handoff: what it relies on in uvicorn's and websockets' internals still holds."""

from __future__ import annotations

from websockets import http11

from gateway.credentials import MAX_TOKEN_BYTES
from gateway.handoff import MAX_REQUEST_HEAD_BYTES, internals_problems


def test_the_libraries_internals_are_as_written_against() -> None:
    assert internals_problems() == []


def test_the_upgrade_parser_takes_lines_longer_than_any_credential() -> None:
    assert http11.MAX_LINE_LENGTH >= MAX_REQUEST_HEAD_BYTES > MAX_TOKEN_BYTES + 4096
