"""CONTRACT §5: status, close code, body and event shape of every refusal."""

from __future__ import annotations

import json

import pytest

from gateway import errors
from gateway.relay import clip_reason

ROWS = [
    (errors.InvalidRequest, "invalid_request", 400, 4400, None),
    (errors.MissingCredentials, "invalid_request", 401, 4401, "Bearer"),
    (errors.InvalidToken, "invalid_token", 401, 4401, 'Bearer error="invalid_token"'),
    (errors.InsufficientScope, "insufficient_scope", 403, 4403,
     'Bearer error="insufficient_scope"'),
    (errors.Forbidden, "forbidden", 403, 4403, None),
    (errors.RateLimited, "rate_limited", 429, 4429, None),
    (errors.UpstreamFailed, "upstream_error", 502, 4502, None),
    (errors.UpstreamTimeout, "upstream_timeout", 504, 4504, None),
    (errors.Unavailable, "unavailable", 503, 4503, None),
]


@pytest.mark.parametrize(("cls", "code", "status", "close", "www"), ROWS)
def test_rows(cls: type[errors.GatewayError], code: str, status: int, close: int,
              www: str | None) -> None:
    exc = cls("some message", retry_after=2.2)
    assert (exc.code, exc.http_status, exc.close_code) == (code, status, close)
    assert json.loads(exc.http_body()) == {
        "error": {"type": "gateway_error", "code": code, "message": "some message"}}
    headers = exc.http_headers()
    assert headers.get("www-authenticate") == www
    assert headers["retry-after"] == "3"
    event = json.loads(exc.error_event())
    assert event["type"] == "error" and event["event_id"].startswith("event_gw_")
    assert event["error"] == {"type": "gateway_error", "code": code, "message": "some message",
                              "param": None, "event_id": None}


def test_retry_after_whole_seconds_at_least_one() -> None:
    assert errors.RateLimited("x", retry_after=0.01).http_headers()["retry-after"] == "1"
    assert errors.RateLimited("x", retry_after=7.0).http_headers()["retry-after"] == "7"
    assert "retry-after" not in errors.Forbidden("x").http_headers()


@pytest.mark.parametrize(("end", "close", "code"), [
    (errors.TOKEN_EXPIRED, 4401, "token_expired"),
    (errors.BUDGET_EXHAUSTED, 4429, "rate_limited"),
    (errors.SESSION_EXPIRED, 4408, "session_expired"),
    (errors.SHUTTING_DOWN, 1012, "shutting_down"),
    (errors.UPSTREAM_LOST, 1011, "upstream_error"),
])
def test_session_ends(end: errors.SessionEnd, close: int, code: str) -> None:
    assert (end.close_code, end.code) == (close, code)
    assert json.loads(end.error_event())["error"]["code"] == code


def test_close_reason_clipped_on_character_boundary() -> None:
    assert clip_reason("short") == "short"
    clipped = clip_reason("é" * 100)  # 200 bytes
    assert len(clipped.encode()) <= 123 and clipped == "é" * 61
