"""Fixtures and helpers for the fault tests, and the log and label sweep.

Every test in ``tests/faults`` runs with the gateway's logging configured at DEBUG
(:func:`gateway.logs.configure_logging`, the production processors and redaction) into
a temporary file.  At teardown :class:`LeakSweep` asserts that no credential leaked into

* the log output (including uvicorn's and websockets' DEBUG header dumps),
* close reasons, ``error`` events and HTTP response headers/bodies seen by clients
  (recorded by the client helpers here), or
* metric labels of every gateway the test started (rendered exposition text).

Credentials are the tokens minted in the test, each of their segments, the upstream
API key, and canary claim values (a random ``email`` and ``jti`` containing ``canary-``):
none may appear anywhere.  The token subject (``sub``) is an identifier, not a secret: it may appear
in logs only as the ``subject`` field of ``session.start``/``session.end`` (the audit
record), never elsewhere, and never in a close reason, header or metric label.
Generic patterns catch credentials the test did not register: any compact JWT
(``eyJ….…``), a ``Bearer-`` or ``openai-insecure-api-key.`` value, ``access_token=``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.app import Gateway, build_gateway, create_app
from gateway.logs import NOISY_LOGGERS, configure_logging
from tests.support.gateway import UPSTREAM_KEY, RunningGateway, mint, run_gateway

_JOSE_SEGMENT = re.compile(r"(?<![A-Za-z0-9+/_-])eyJ[A-Za-z0-9_-]{16,}")
"""A base64url JSON object (a JOSE header or a claims set) standing on its own."""
_CARRIER_LEAKS = tuple(re.compile(pattern) for pattern in (  # matched on lower-cased text
    r"bearer-(?!\[redacted\])[^\s\"',;]",
    r"bearer (?!\[redacted\])(?!error=)[a-z0-9._~+/-]{8,}",
    r"openai-insecure-api-key\.(?!\[redacted\])[^\s\"',;]",
    r"access_token=(?!\[redacted\])",
    r"api-key=(?!\[redacted\])",
    r"authorization=(?!\[redacted\])",
))
_CANARY = "canary-"
_CANARY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@+-")
_AUDIT_FIELD = '"subject": "'
_CHUNK_CHARS = 4 * 1024 * 1024


class LeakSweep:
    """Collects what a test's clients and operators can see, and finds credentials in it.

    :meth:`secret` registers a value that must appear nowhere; :meth:`subject` a token
    ``sub``; :meth:`observe` records client-visible text (close reasons, events, headers);
    :meth:`watch` a gateway whose metrics are rendered at the end.  The log goes to a
    temporary file (not memory: the soak measures this process's RSS) and is scanned
    in linear time: generic patterns (JOSE segments, credential carriers), then
    ``canary-`` values, then an exact search for the registered secrets no pattern covers
    (a token's signature segment, keys).
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.exact: set[str] = {UPSTREAM_KEY}
        self.canaries: set[str] = set()
        self.subjects: set[str] = set()
        self.observed: list[tuple[str, str]] = []
        self.gateways: list[Gateway] = []

    def secret(self, value: str) -> str:
        """Register ``value`` (a token, key or claim value); returns it."""
        if "canary-" in value:
            self.canaries.add(value)
        for part in value.split("."):
            if len(part) >= 16 and not part.startswith("eyJ"):  # eyJ…: a generic pattern
                self.exact.add(part)
        return value

    def subject(self, value: str) -> str:
        """Register a token subject (it must contain ``canary-``); returns it."""
        assert "canary-" in value
        self.subjects.add(value)
        return value

    def observe(self, where: str, text: str) -> None:
        """Record client-visible ``text`` (``where`` names it in findings)."""
        self.observed.append((where, text))

    def watch(self, gateway: Gateway) -> None:
        """Sweep ``gateway``'s rendered metrics at the end of the test."""
        self.gateways.append(gateway)

    @property
    def log_text(self) -> str:
        """Everything logged so far (for small logs; the sweep itself reads in chunks)."""
        self.stream.flush()
        self.stream.seek(0)
        text = self.stream.read()
        self.stream.seek(0, os.SEEK_END)
        return text

    def log_records(self) -> list[dict[str, Any]]:
        """The captured JSON log records (non-JSON lines are skipped)."""
        records = []
        for line in self.log_text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def _log_chunks(self) -> Iterator[str]:
        self.stream.flush()
        self.stream.seek(0)
        while lines := self.stream.readlines(_CHUNK_CHARS):
            yield "".join(lines)
        self.stream.seek(0, os.SEEK_END)

    def _scan(self, where: str, text: str, found: list[str]) -> None:
        for match in _JOSE_SEGMENT.finditer(text):
            if _is_json_object_segment(match.group()):
                found.append(f"{where}: a JOSE header or claims segment at {match.start()}")
                break
        lowered = text.lower()
        for pattern in _CARRIER_LEAKS:
            carrier = pattern.search(lowered)
            if carrier:
                found.append(f"{where}: matches {pattern.pattern!r} at {carrier.start()}")
        for start, value in _canaries(text):
            audit = where == "logs" and text.endswith(_AUDIT_FIELD, 0, start)
            if value in self.subjects and not audit:
                found.append(f"{where}: a token subject outside the audit field")
            elif value not in self.subjects and any(c in value for c in self.canaries):
                found.append(f"{where}: a canary claim value")
        for index, needle in enumerate(sorted(self.exact)):
            if needle in text:
                found.append(f"{where}: registered secret #{index} ({len(needle)} chars)")

    def findings(self) -> list[str]:
        """Every leak found, as ``"<where>: <what>"`` (never the secret itself)."""
        found: list[str] = []
        for chunk in self._log_chunks():
            self._scan("logs", chunk, found)
        for where, text in self.observed:
            self._scan(where, text, found)
        for i, gw in enumerate(self.gateways):
            self._scan(f"metrics of gateway {i}", gw.services.metrics.render().decode(), found)
        return found


def _is_json_object_segment(segment: str) -> bool:
    """True when ``segment`` decodes to printable ASCII (as a JSON object does), which a
    random base64 run that happens to contain ``eyJ`` (a ``Sec-WebSocket-Key``) does not."""
    try:
        decoded = base64.urlsafe_b64decode(segment[:24])
    except ValueError:
        return False
    return all(32 <= byte < 127 for byte in decoded)


def _canaries(text: str) -> Iterator[tuple[int, str]]:
    """``(start, value)`` of every ``…canary-…`` value in ``text`` (a literal search)."""
    position = text.find(_CANARY)
    while position >= 0:
        start, end = position, position + len(_CANARY)
        while start > 0 and text[start - 1] in _CANARY_CHARS:
            start -= 1
        while end < len(text) and text[end] in _CANARY_CHARS:
            end += 1
        yield start, text[start:end]
        position = text.find(_CANARY, end)


@dataclass
class _LoggingState:
    root_level: int
    noisy: dict[str, tuple[int, bool, list[logging.Handler]]]
    structlog_config: dict[str, Any] | None


def _save_logging() -> _LoggingState:
    noisy = {}
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        noisy[name] = (logger.level, logger.propagate, list(logger.handlers))
    config = structlog.get_config() if structlog.is_configured() else None
    return _LoggingState(logging.getLogger().level, noisy, config)


def _restore_logging(state: _LoggingState, stream: IO[str]) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
            root.removeHandler(handler)
    root.setLevel(state.root_level)
    for name, (level, propagate, handlers) in state.noisy.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers
    if state.structlog_config is None:
        structlog.reset_defaults()
    else:
        structlog.configure(**state.structlog_config)


@pytest.fixture(autouse=True)
def sweep() -> Iterator[LeakSweep]:
    """DEBUG logging into a buffer for the whole test; at teardown, no credential anywhere."""
    state = _save_logging()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stream:
        leak_sweep = LeakSweep(stream)
        configure_logging("debug", "json", secrets=[UPSTREAM_KEY], stream=stream)
        # Same processors, but no logger caching: later tests (structlog.testing's
        # capture_logs) must not inherit loggers bound to this file.
        structlog.configure(cache_logger_on_first_use=False)
        try:
            yield leak_sweep
        finally:
            _restore_logging(state, stream)
        findings = leak_sweep.findings()
    assert not findings, "credential leak:\n" + "\n".join(findings)


# -- tokens and gateways (the emulator and key_file fixtures come from tests/conftest.py) -----

@dataclass
class Tokens:
    """Mints test-issuer tokens whose subject and canary claims are registered with the sweep."""

    key_file: Path
    sweep: LeakSweep

    def mint(self, sub: str | None = None, *, ttl: float = 600, **kwargs: Any) -> str:
        """A valid token for ``sub`` (default: a fresh canary subject)."""
        subject = self.sweep.subject(sub or f"sub-canary-{secrets.token_hex(6)}")
        extra = {"email": self.sweep.secret(f"claim-canary-{secrets.token_hex(8)}@x.test"),
                 "jti": self.sweep.secret(f"jti-canary-{secrets.token_hex(8)}"),
                 **kwargs.pop("extra_claims", {})}
        token = mint(self.key_file, sub=subject, ttl=ttl, extra_claims=extra, **kwargs)
        return self.sweep.secret(token)


@pytest.fixture
def tokens(key_file: Path, sweep: LeakSweep) -> Tokens:
    return Tokens(key_file, sweep)


@contextlib.asynccontextmanager
async def serve(sweep: LeakSweep, config: Any,
                gateway: Gateway | None = None) -> AsyncIterator[RunningGateway]:
    """Serve ``config`` (with ``gateway`` if given, e.g. one built with a fake clock) on
    free loopback ports with :func:`tests.support.gateway.run_gateway`; its metrics are
    swept at the end of the test (even when it fails to start)."""
    gw = gateway or build_gateway(config)
    sweep.watch(gw)
    async with run_gateway(config, gateway=gw) as running:
        yield running


def metric(gw: RunningGateway | Gateway, name: str, **labels: str) -> float:
    """The sum of samples ``name`` (full exposition name, e.g. ``…_total``) whose labels
    include ``labels``."""
    gateway = gw.gateway if isinstance(gw, RunningGateway) else gw
    total = 0.0
    for family in gateway.services.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


# -- clients ----------------------------------------------------------------------------------

@dataclass
class Refusal:
    """An upgrade refused with an HTTP status."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Closed:
    """How a session ended for the client: close code and reason (``code`` 1006 and
    ``frame`` False when no close frame came), and the ``error`` events received."""

    code: int
    reason: str
    frame: bool
    errors: list[dict[str, Any]] = field(default_factory=list)


def _observe_response(sweep: LeakSweep, headers: Any, body: bytes | bytearray | None,
                      offers: Any = ()) -> None:
    """Sweep response headers and body.  The one exemption: ``Sec-WebSocket-Protocol``
    echoing the client's own sole ``Bearer-<token>`` offer, which CONTRACT §4 requires
    (browsers fail the handshake otherwise) and which goes only to that client."""
    lines = [f"{k}: {v}" for k, v in headers.raw_items()
             if not (k.lower() == "sec-websocket-protocol" and v in offers)]
    sweep.observe("response headers", "\n".join(lines))
    if body:
        sweep.observe("response body", body.decode("utf-8", "replace"))


async def open_session(sweep: LeakSweep, url: str, token: str, *,
                       carrier: str = "header", **kwargs: Any) -> ClientConnection:
    """Connect with ``token`` in the ``Authorization`` header (``carrier="header"``) or as a
    ``Bearer-`` subprotocol beside ``realtime`` (``"subprotocol"``) — unless ``kwargs``
    give ``additional_headers`` or ``subprotocols`` themselves — and read
    ``session.created``.  The response headers go to the sweep."""
    if "additional_headers" not in kwargs and "subprotocols" not in kwargs:
        if carrier == "header":
            kwargs["additional_headers"] = {"Authorization": f"Bearer {token}"}
        else:
            kwargs["subprotocols"] = ["realtime", f"Bearer-{token}"]
    async with asyncio.timeout(10):
        ws = await connect(url, **kwargs)
        assert ws.response is not None
        _observe_response(sweep, ws.response.headers, None, kwargs.get("subprotocols", ()))
        created = json.loads(await ws.recv())
    assert created["type"] == "session.created", created
    return ws


async def refused(sweep: LeakSweep, url: str, headers: dict[str, str],
                  **kwargs: Any) -> Refusal:
    """An upgrade that must be refused before the 101; status, JSON body and headers."""
    with pytest.raises(InvalidStatus) as caught:
        async with asyncio.timeout(20):
            ws = await connect(url, additional_headers=headers, **kwargs)
            await ws.close()
    response = caught.value.response
    _observe_response(sweep, response.headers, response.body)
    body = json.loads(bytes(response.body)) if response.body else {}
    return Refusal(response.status_code, body, {k.lower(): v for k, v in
                                                 response.headers.raw_items()})


async def closed_session(sweep: LeakSweep, ws: ClientConnection,
                         within: float = 10.0) -> Closed:
    """Read until the gateway ends the session; the close (reason and events swept)."""
    errors: list[dict[str, Any]] = []
    with pytest.raises(ConnectionClosed) as caught:
        async with asyncio.timeout(within):
            while True:
                message = await ws.recv()
                if isinstance(message, str) and '"type":"error"' in message.replace(" ", ""):
                    sweep.observe("error event", message)
                    errors.append(json.loads(message))
    rcvd = caught.value.rcvd
    if rcvd is None:
        return Closed(1006, "", False, errors)
    sweep.observe("close reason", rcvd.reason)
    return Closed(rcvd.code, rcvd.reason, True, errors)


async def round_trip(ws: ClientConnection) -> None:
    """Prove a session relays: ``session.update`` → ``session.updated`` (bounded)."""
    await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
    async with asyncio.timeout(5):
        while json.loads(await ws.recv())["type"] != "session.updated":
            pass


# -- process resources ------------------------------------------------------------------------

def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fd_count() -> int:
    """Open file descriptors of this process (Linux ``/proc/self/fd``)."""
    return len(os.listdir("/proc/self/fd"))


def task_count() -> int:
    """Live asyncio tasks of the running loop (the current task included)."""
    return len(asyncio.all_tasks())


_SESSION_MODULES = tuple(str(Path(create_app.__code__.co_filename).with_name(name))
                         for name in ("relay.py", "session.py"))


def session_tasks() -> list[str]:
    """Names of the live tasks that belong to gateway sessions: uvicorn's per-connection
    ASGI task and the session task (relay.run and the accounting after it)."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and (code.co_filename in _SESSION_MODULES
                                 or code.co_name == "run_asgi"):
            found.append(code.co_qualname)
    return found
