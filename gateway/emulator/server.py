"""The emulator's server: :class:`Emulator` (one port, many sessions) and ``serve_forever``.

Endpoints (one port, on the ``websockets`` asyncio server)
---------------------------------------------------------
* ``GET /v1/realtime?model=M`` (OpenAI shape) and ``GET /openai/v1/realtime?model=D``
  (Azure GA shape, ``D`` = deployment): the WebSocket (handshake rules in
  :mod:`gateway.emulator.handshake`, the session in :mod:`gateway.emulator.session`).
  Other paths get HTTP 404.
* ``GET /v1/realtime?call_id=<rtc_id>`` with ``webrtc=True``: a WebRTC call's sideband (404
  ``call_id_not_found`` for an unknown or ended call), see :mod:`gateway.emulator.webrtc`;
  without it, ``call_id`` opens an ordinary session.
* With ``webrtc=True``, a second port (:attr:`Emulator.calls_url`) answers
  ``POST /v1/realtime/calls`` with a real peer connection (needs ``aiortc``).
* ``GET /_emulator/sessions``: JSON ``{"connections": N, "sessions": [record, ...]}``
  where ``connections`` counts every WebSocket handshake attempted on the two paths above
  (refused ones included) and each record is
  :meth:`SessionRecord.to_dict <gateway.emulator.records.SessionRecord.to_dict>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from gateway.emulator.faults import fault_words
from gateway.emulator.handshake import (
    error_body,
    http_response,
    parse_handshake,
    select_subprotocol,
)
from gateway.emulator.records import SessionRecord
from gateway.emulator.schema import JSON, new_id
from gateway.emulator.socket import SocketSession
from gateway.emulator.voice import Voice

__all__ = ["MAX_MESSAGE_BYTES", "REALTIME_PATHS", "SESSIONS_PATH", "Emulator", "serve_forever"]

REALTIME_PATHS = ("/v1/realtime", "/openai/v1/realtime")
"""WebSocket paths: OpenAI shape and Azure GA shape."""

SESSIONS_PATH = "/_emulator/sessions"
"""HTTP path serving the session records as JSON."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest client message accepted, bytes (Realtime appends reach 15 MiB)."""

_log = logging.getLogger(__name__)


def _websockets_logger() -> logging.Logger:
    """The logger handed to ``websockets``: held at INFO so no frame or header is logged."""
    logger = logging.getLogger(f"{__name__}.websockets")
    if logger.level < logging.INFO:
        logger.setLevel(logging.INFO)
    return logger


class _CallsServer(uvicorn.Server):
    """The calls port's server: signals stay with whoever runs the emulator."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Emulator:
    """The Realtime protocol emulator server (CONTRACT §7; see :mod:`gateway.emulator`).

    Usage::

        async with Emulator(host="127.0.0.1", port=0, api_key=None) as emu:
            url = emu.url + "/v1/realtime?model=gpt-realtime"   # ws://127.0.0.1:<port>
            ...
            emu.sessions()      # list[SessionRecord]

    Args:
        host: address to bind.
        port: TCP port; 0 picks a free one (read it from :attr:`port`).
        api_key: the key clients must present; ``None`` accepts any non-empty key.
        open_timeout: seconds a client may take to complete the opening handshake,
            which also bounds ``fault-stall-handshake``; ``None`` disables it.
        max_message_bytes: largest client message accepted, bytes (16 MiB by default).
        max_records: session records kept (oldest dropped first; ``connections`` still
            counts every handshake).
        speech: speak PCM16 replies with espeak-ng (resampled to 24 kHz by sox) when
            both are on ``PATH``, instead of the tone whose bytes and usage tests
            predict (see :mod:`gateway.emulator.voice`); ``realtime-gateway dev`` wants it.
        webrtc: also answer WebRTC calls on ``calls_port`` (0: a free one), see
            :mod:`gateway.emulator.webrtc`; needs the ``webrtc`` extra (aiortc).
        loopback_ice: calls offer only 127.0.0.1 ICE candidates (tests in a private
            network namespace; see :mod:`gateway.emulator.webrtc`).

    Raises:
        ValueError: *api_key* is an empty string.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        *,
        open_timeout: float | None = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_records: int = 10_000,
        speech: bool = False,
        webrtc: bool = False,
        calls_port: int = 0,
        loopback_ice: bool = False,
    ) -> None:
        if api_key == "":
            raise ValueError("api_key must be None (accept any key) or a non-empty string")
        self._host = host
        self._requested_port = port
        self._api_key = api_key
        self._open_timeout = open_timeout
        self._max_message_bytes = max_message_bytes
        self._server: Server | None = None
        self._records: deque[SessionRecord] = deque(maxlen=max_records)
        self._connections = 0
        self._closing = asyncio.Event()
        self._voice = Voice(speech=speech)
        self._webrtc = webrtc
        self._calls_port = calls_port
        self._loopback_ice = loopback_ice
        self._calls: Any = None
        """The :class:`gateway.emulator.webrtc.Calls` when ``webrtc`` (aiortc imported lazily)."""
        self._calls_server: uvicorn.Server | None = None
        self._calls_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._closing.clear()
        self._server = await serve(
            self._handle,
            self._host,
            self._requested_port,
            process_request=self._process_request,
            select_subprotocol=select_subprotocol,
            server_header="realtime-gateway-emulator",
            compression=None,
            max_size=self._max_message_bytes,
            open_timeout=self._open_timeout,
            logger=_websockets_logger(),
        )
        if self._webrtc:
            await self._start_calls()

    async def _start_calls(self) -> None:
        try:
            from gateway.emulator import webrtc
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("WebRTC calls need the webrtc extra: "
                               "pip install 'realtime-gateway[webrtc]'") from exc
        self._calls = webrtc.Calls(self._records.append, self._voice, self._api_key,
                                   loopback_ice=self._loopback_ice)
        app = webrtc.calls_app(self._calls, self.calls_json)
        server = _CallsServer(uvicorn.Config(app, host=self._host, port=self._calls_port,
                                             lifespan="off", log_config=None,
                                             access_log=False))
        self._calls_server = server
        self._calls_task = asyncio.create_task(server.serve())
        while not server.started:
            if self._calls_task.done():
                self._calls_task.result()
                raise RuntimeError("the emulator's calls server did not start")
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        """Stop serving: refuse new connections, close open sessions with 1001, wait."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing.set()
        if self._calls is not None:
            await self._calls.aclose()
        if self._calls_server is not None and self._calls_task is not None:
            self._calls_server.should_exit = True
            await self._calls_task
            self._calls_server = self._calls_task = None
        server.close()
        await server.wait_closed()
        await self._voice.aclose()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ introspection

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: not started.
        """
        if self._server is None:
            raise RuntimeError("emulator not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Base WebSocket URL, ``ws://<host>:<port>`` (append ``/v1/realtime?model=…``)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"ws://{host}:{self.port}"

    @property
    def calls_url(self) -> str:
        """``http://<host>:<calls port>/v1/realtime/calls`` (``webrtc=True`` only).

        Raises:
            RuntimeError: not started, or started without ``webrtc``.
        """
        if self._calls_server is None:
            raise RuntimeError("emulator not started with webrtc=True")
        port = self._calls_server.servers[0].sockets[0].getsockname()[1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{port}/v1/realtime/calls"

    def calls(self) -> list[SessionRecord]:
        """Snapshots of every WebRTC call's record, oldest first."""
        return [r for r in self.sessions() if r.transport == "webrtc"]

    def calls_json(self) -> JSON:
        """``{"calls": [dict, ...]}``, as served on ``/_emulator/calls``."""
        return {"calls": [record.to_dict() for record in self.calls()]}

    @property
    def connections(self) -> int:
        """WebSocket handshakes attempted on the Realtime paths, refused ones included."""
        return self._connections

    def sessions(self) -> list[SessionRecord]:
        """Snapshots of every accepted session, oldest first (live ones included)."""
        return [record.snapshot() for record in self._records]

    def sessions_json(self) -> JSON:
        """``{"connections": int, "sessions": [dict, ...]}``, as served on ``SESSIONS_PATH``."""
        return {
            "connections": self._connections,
            "sessions": [record.to_dict() for record in self.sessions()],
        }

    # ------------------------------------------------------------------ websockets hooks

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        if path == SESSIONS_PATH:
            return http_response(200, self.sessions_json())
        if path not in REALTIME_PATHS:
            return http_response(
                404,
                error_body(f"Invalid URL (GET {path})", "invalid_request_error", "not_found"),
            )
        self._connections += 1
        handshake = parse_handshake(request, self._api_key)
        if isinstance(handshake, Response):
            return handshake
        call_id = handshake.query.get("call_id")
        if call_id is not None and self._calls is not None:
            call = self._calls.get(call_id)
            if call is None or call.sideband_refused:
                return http_response(404, error_body(
                    f"Call {call_id!r} not found.", "invalid_request_error",
                    "call_id_not_found", "call_id"))
        faults = handshake.faults
        if faults.stall_handshake:
            await self._closing.wait()
            return http_response(
                503, error_body("emulator shutting down", "server_error", "unavailable")
            )
        if faults.refuse is not None:
            status = faults.refuse
            extra = [("Retry-After", "1")] if status in (429, 503) else []
            return http_response(
                status,
                error_body(
                    f"emulator fault: handshake refused with HTTP {status}",
                    "emulator_fault",
                    "fault_refuse",
                ),
                extra,
            )
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None
        handshake = parse_handshake(request, self._api_key)
        if isinstance(handshake, Response):  # pragma: no cover - refused in process_request
            return
        call_id = handshake.query.get("call_id")
        if call_id is not None and self._calls is not None:
            call = self._calls.get(call_id)
            if call is not None:
                await call.attach(connection)
            return
        record = SessionRecord(
            id=new_id("sess"),
            path=handshake.path,
            query=handshake.query,
            model=handshake.model,
            auth=handshake.auth,
            header_names=handshake.header_names,
            user_agent=handshake.user_agent,
            openai_beta=handshake.openai_beta,
            subprotocols=handshake.subprotocols,
            subprotocol=connection.subprotocol,
            faults=fault_words(handshake.model),
        )
        self._records.append(record)
        await SocketSession(connection, handshake, record, self._voice).run()


async def serve_forever(
    host: str, port: int, api_key: str | None, *, speech: bool = False, webrtc: bool = False,
    calls_port: int = 0,
) -> None:
    """Run an :class:`Emulator` until cancelled (the ``realtime-gateway emulator`` command).

    Logs one line with the URL (and the calls URL with *webrtc*) when ready.  *api_key*
    ``None`` accepts any key; *speech*, *webrtc* and *calls_port* as for :class:`Emulator`.

    Raises:
        OSError: the address cannot be bound.
    """
    async with Emulator(host=host, port=port, api_key=api_key, speech=speech, webrtc=webrtc,
                        calls_port=calls_port) as emulator:
        _log.info(
            "realtime emulator listening on %s (paths %s, records at %s)",
            emulator.url,
            ", ".join(REALTIME_PATHS),
            SESSIONS_PATH,
        )
        if webrtc:
            _log.info("realtime emulator answering WebRTC calls at %s", emulator.calls_url)
        await asyncio.get_running_loop().create_future()
