"""Structured logs (structlog) and the redaction of anything that looks like a credential.

Every record — the gateway's own structlog events and the stdlib records of
uvicorn, websockets, httpx — goes through one :class:`logging.Handler` whose
formatter runs :func:`redact` before rendering.  Redaction masks, in every
string value: ``Bearer <t>`` / ``Bearer-<t>`` values, ``openai-insecure-api-key.<t>``
subprotocols, compact JWTs (``eyJ….….…``), ``sk-…`` keys, ``ek_…`` client secrets,
``api-key`` / ``authorization`` header dumps, and the exact secrets the configuration
loaded (upstream API keys, introspection client secrets, client-secret signing keys).
Keys that name a credential (``authorization``, ``token``, ``subprotocols`` …) are dropped
whole.

uvicorn's and websockets' loggers print every request header at DEBUG (which
includes ``Sec-WebSocket-Protocol: Bearer-<token>``).  At any level other than
``debug`` they are kept at INFO or above; at ``debug`` (an operator asking for
everything) their header dumps pass, and the redaction — tested against those
exact dumps for every carrier — is what keeps credentials out.

Request paths are logged without their query: a query may carry a credential
(``api-key=``, ``Authorization=Bearer …``: Azure's browser clients, CONTRACT §4) and
other client values, and uvicorn's ``"WebSocket /path?query" [accepted]`` lines and the
DEBUG request lines of websockets and uvicorn print it whole.  :func:`strip_query`
removes every query from the messages of stdlib records (uvicorn, websockets, httpx)
before redaction.

The main and the metrics server both log through uvicorn's one logger
(``uvicorn.error``): :func:`serving_as` runs a server so that uvicorn's records
from it carry ``server=<name>`` ("Started server process", "Uvicorn running on
...", "Shutting down", ...), one line per server.

Under ``serve --workers N`` (:mod:`gateway.workers`) every line a worker writes carries
``worker=<index>`` (the ``fields`` of :func:`configure_logging`), the gateway's own events
and the stdlib records alike.

Logging is process-wide by nature (:mod:`logging`); :func:`configure_logging`
is called once, by the CLI.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Awaitable, Iterable, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, TextIO, TypeVar

import structlog

REDACTED = "[REDACTED]"
_PATTERNS = (
    re.compile(r"(?i)(bearer[- ])[^\s,;\"']+"),
    re.compile(r"(?i)(openai-insecure-api-key\.)[^\s,;\"']+"),
    re.compile(r"(?i)((?:api-key|authorization|x-api-key)\s*[:=]\s*)[^\r\n,;\"']+"),
    re.compile(r"()eyJ[\w-]{2,}\.[\w-]{2,}\.[\w-]*"),
    re.compile(r"()sk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"()ek_[A-Za-z0-9_.-]{8,}"),  # client secrets (gateway-minted and OpenAI's)
    re.compile(r"(?i)((?:access_token|api_key|client_secret)=)[^&\s]+"),
)
_SECRET_KEYS = frozenset({
    "authorization", "token", "access_token", "api_key", "api-key", "subprotocols",
    "sec-websocket-protocol", "client_secret", "password", "secret", "headers",
})
_T = TypeVar("_T")
_SERVER: ContextVar[str | None] = ContextVar("gateway_logs_server", default=None)
"""The name of the uvicorn server whose task (and its children) is logging, if any."""
_QUERY = re.compile(
    r"""((?:^|(?<=[\s"'(=]))(?:[a-z][a-z0-9+.-]*://[^\s/?"']*)?/[^\s?"']*)\?[^\s"']*""",
    re.IGNORECASE)
"""A request target or URL (``/path?query``, ``wss://host/path?query``) and its query."""
NOISY_LOGGERS = ("uvicorn.error", "uvicorn.access", "websockets", "websockets.client",
                 "websockets.server", "httpx", "httpcore")


class Redactor:
    """Masks credentials in strings; ``secrets`` are exact values to mask too (>= 8 chars)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        for pattern in _PATTERNS:
            value = pattern.sub(lambda m: m.group(1) + REDACTED, value)
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes):
            return self.text(value.decode("utf-8", "replace"))
        if isinstance(value, Mapping):
            return {k: (REDACTED if str(k).lower() in _SECRET_KEYS else self.value(v))
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        """structlog processor: redact every value of the event dict."""
        for key in list(event):
            if key.lower() in _SECRET_KEYS:
                event[key] = REDACTED
            elif key != "exc_info":
                event[key] = self.value(event[key])
        return event


async def serving_as(name: str, server: Awaitable[_T]) -> _T:
    """Await ``server`` (e.g. ``uvicorn.Server.serve()``) so that the ``uvicorn.*`` records
    logged meanwhile by this task and the tasks it starts carry ``server=<name>``.

    Run each server in its own task (:func:`asyncio.create_task` copies the context), e.g.
    ``create_task(serving_as("metrics", metrics.serve()))``.
    """
    reset = _SERVER.set(name)
    try:
        return await server
    finally:
        _SERVER.reset(reset)


def _name_server(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    """structlog processor: ``server=<name>`` on uvicorn's records (see :func:`serving_as`)."""
    name = _SERVER.get()
    if name is not None and str(event.get("logger", "")).startswith("uvicorn"):
        event["server"] = name
    return event


def strip_query(text: str) -> str:
    """``text`` with the query of every request target or URL in it removed:
    ``"WebSocket /openai/realtime?api-key=T" [accepted]`` → ``"WebSocket /openai/realtime"
    [accepted]``, ``GET /v1/realtime?model=m HTTP/1.1`` → ``GET /v1/realtime HTTP/1.1``."""
    return _QUERY.sub(r"\1", text) if "?" in text else text


def _strip_queries(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    """structlog processor (stdlib records only): no request query in the message."""
    message = event.get("event")
    if isinstance(message, str):
        event["event"] = strip_query(message)
    return event


class _Fields:
    """structlog processor: add fixed ``fields`` (e.g. ``worker=1``) to every event that
    does not set them itself."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = dict(fields)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in self._fields.items():
            event.setdefault(key, value)
        return event


def _render_exc(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    return structlog.processors.format_exc_info(logger, method, event)


def configure_logging(level: str = "info", fmt: str = "json", *, secrets: Iterable[str] = (),
                      stream: TextIO | None = None,
                      fields: Mapping[str, Any] | None = None) -> Redactor:
    """Route structlog and stdlib logging through one redacting handler on ``stream``
    (default stderr).

    Args:
        level: ``debug`` | ``info`` | ``warning`` | ``error`` for the gateway's own events.
        fmt: ``json`` (one object per line) or ``console`` (for humans).
        secrets: exact values to mask wherever they appear (configured keys).
        fields: added to every line, unless the event sets the key itself (a worker's
            ``{"worker": 1}``); never put a credential here.
    Returns:
        The redactor in use.
    """
    redactor = Redactor(secrets)
    numeric = getattr(logging, level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fields:
        shared.append(_Fields(fields))
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _name_server, _strip_queries],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _render_exc,
            redactor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        noisy.handlers.clear()
        noisy.propagate = True
        noisy.setLevel(numeric if numeric == logging.DEBUG else max(numeric, logging.INFO))
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return redactor


def get_logger(name: str) -> Any:
    """A structlog logger named ``name`` (the module), e.g. ``get_logger(__name__)``."""
    return structlog.get_logger(name)
