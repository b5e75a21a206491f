"""gateway.handoff: the one module that reaches into uvicorn's and websockets' internals.

If an upgrade of either library changes what the hand-off relies on, this test fails and
names what changed, instead of sessions failing at run time.
"""

from __future__ import annotations

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets import http11

from gateway import handoff
from gateway.credentials import MAX_TOKEN_BYTES


def test_the_internals_the_hand_off_relies_on_are_as_written_against() -> None:
    assert handoff.internals_problems() == []


def test_a_changed_internal_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handoff, "UVICORN_RUN_ASGI_SHA256", "0" * 64)
    monkeypatch.delattr(HttpToolsProtocol, "on_message_begin")
    problems = handoff.internals_problems()
    assert any("run_asgi changed" in problem for problem in problems)
    assert "HttpToolsProtocol.on_message_begin is gone" in problems


def test_the_header_deadline_class_carries_its_deadline() -> None:
    protocol = handoff.header_deadline_protocol(2.5)
    assert issubclass(protocol, handoff.HeaderDeadlineProtocol)
    assert protocol.header_timeout == 2.5
    assert handoff.HeaderDeadlineProtocol.header_timeout == 15.0  # the class is untouched


def test_the_upgrade_parser_takes_lines_longer_than_any_credential() -> None:
    assert http11.MAX_LINE_LENGTH >= handoff.MAX_REQUEST_HEAD_BYTES > MAX_TOKEN_BYTES + 4096
