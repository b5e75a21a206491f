"""Request queries never reach a log line (:func:`gateway.logs.strip_query`, CONTRACT §4).

The configured handler's use of it, at DEBUG with real clients, is
``tests/faults/test_log_sweep.py::test_query_credentials_leave_no_token_and_no_query_in_the_log``.
"""

from __future__ import annotations

import pytest

from gateway.logs import strip_query


@pytest.mark.parametrize(("text", "stripped"), [
    ('127.0.0.1:5 - "WebSocket /openai/realtime?api-version=2024-10-01-preview&api-key=T" '
     "[accepted]", '127.0.0.1:5 - "WebSocket /openai/realtime" [accepted]'),
    ("< GET /openai/realtime?deployment=d&Authorization=Bearer+T HTTP/1.1",
     "< GET /openai/realtime HTTP/1.1"),
    ('HTTP Request: GET https://idp.example/jwks?x=1 "HTTP/1.1 200 OK"',
     'HTTP Request: GET https://idp.example/jwks "HTTP/1.1 200 OK"'),
    ("dial wss://api.openai.com/v1/realtime?model=gpt-realtime", "dial wss://api.openai.com/v1/realtime"),
    ("path=/v1/realtime?api-key=T", "path=/v1/realtime"),
    ("no query? none here", "no query? none here"),
    ("/v1/realtime", "/v1/realtime"),
])
def test_strip_query(text: str, stripped: str) -> None:
    assert strip_query(text) == stripped

