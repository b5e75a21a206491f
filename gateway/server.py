"""Running the gateway under uvicorn, with a drain on SIGTERM (CONTRACT §2 ``drain_seconds``).

uvicorn alone closes every WebSocket at once on SIGTERM and exits 143.  The
gateway instead, on the first SIGTERM or SIGINT:

1. stops admitting at once: ``/readyz`` answers 503, new upgrades get 503 ``unavailable``;
2. lets live sessions run until they end or ``drain_seconds`` pass;
3. ends the rest with an ``error`` event (``shutting_down``) and close 1012;
4. shuts uvicorn down and exits 0.

A second signal skips the wait (step 3 at once).  The metrics server keeps
answering until the main server is done, so the last scrape sees the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from starlette.routing import BaseRoute
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from gateway.app import Gateway, create_app, create_metrics_app
from gateway.config import Config
from gateway.errors import SHUTTING_DOWN
from gateway.logs import get_logger, serving_as
from gateway.session import HAND_OFF

log = get_logger(__name__)

CLOSE_GRACE_SECONDS = 10.0
"""After the 1012 closes are sent, how long to wait for the sessions to finish closing."""


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains :class:`Gateway` instead of closing."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_seconds: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_seconds = drain_seconds
        self._signals = 0
        self._cut_short = False
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler: the first signal requests a drain, the second cuts it short.

        Signals are not re-raised after shutdown, so a drained gateway exits 0.
        """
        self._signals += 1
        if self._signals >= 3 and sig == signal.SIGINT:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._signals and self._drain_task is None:
            self._drain_task = asyncio.create_task(self.drain())
        if self._signals >= 2 and not self._cut_short:
            self._cut_short = True
            self.gateway.end_all(SHUTTING_DOWN)
        return await super().on_tick(counter)

    async def drain(self) -> None:
        """Stop admitting, wait up to ``drain_seconds`` for sessions to end, close the rest
        with 1012, then let uvicorn shut down."""
        gw = self.gateway
        gw.start_drain()
        if not await gw.wait_idle(self.drain_seconds):
            log.info("gateway.drain_timeout", live_sessions=len(gw.sessions))
            gw.end_all(SHUTTING_DOWN)
            await gw.wait_idle(CLOSE_GRACE_SECONDS)
        log.info("gateway.drained", live_sessions=len(gw.sessions))
        self.should_exit = True


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a deadline for the request line and headers.

    uvicorn has no request-header timeout: a client trickling its upgrade request one
    byte a second holds a connection forever (slowloris).  The connection is closed
    when the headers are not complete ``header_timeout`` seconds after the connection
    opened or the request began.  Everything after the headers (auth, admission, the
    upstream dial) has its own budget, ``server.handshake_timeout_seconds``.
    """

    header_timeout: float = 15.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        self.transport.close()


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets Sans-I/O protocol, with the upgrade handed off to the relay.

    An accepted session does not send ``websocket.accept``: it calls the
    :data:`gateway.session.HAND_OFF` scope extension, which writes the 101 and gives
    the connection's transport to the frame relay (:mod:`gateway.relay`); uvicorn then
    holds nothing of the connection but the ASGI task.  Refusals (HTTP responses, or
    accept + ``error`` + close for browsers) still go through ASGI.

    Two uvicorn defects are fixed here: an upgrade request that the websockets parser
    refuses (a header line over 8 KiB, more than 128 headers) is answered 414/431/400
    and closed instead of held open; a completed HTTP refusal is not logged as
    "ASGI callable returned without completing handshake".
    """

    handed_off = False
    """True once :meth:`hand_off` gave the transport away."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if not self.handshake_complete:  # the request is a valid upgrade: the app runs
            self.scope["extensions"][HAND_OFF] = {"call": self.hand_off}

    def hand_off(self, subprotocol: str | None) -> asyncio.Transport | None:
        """Answer the upgrade with 101 (echoing ``subprotocol``) and give the transport away.

        Returns ``None``, writing nothing, when the client already went away.  After this
        call the caller must set the transport's protocol before yielding to the loop.
        """
        if self.disconnected or self.handshake_complete or self.transport.is_closing():
            return None
        headers = self.response.headers
        del headers["Date"]
        headers.update((name.decode("latin-1").lower(), value.decode("latin-1"))
                       for name, value in self.default_headers)
        if subprotocol:
            headers["Sec-WebSocket-Protocol"] = subprotocol
        self.handshake_complete = True
        self.conn.send_response(self.response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.connections.discard(self)
        self.handed_off = True
        return self.transport

    async def run_asgi(self) -> None:
        """uvicorn's ``run_asgi``, except that a handed-off transport is not closed when
        the app returns (the relay owns it; the session runs in its own task)."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.",
                                  result)
        if self.close_timer is None and not self.handed_off:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets prepared a 414/431 (or nothing, for an unparseable request).
            answer = b"".join(self.conn.data_to_send()) or (
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            self.handshake_initiated = self.handshake_complete = self.close_sent = True
            if not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True


def header_deadline_protocol(seconds: float) -> type[HeaderDeadlineProtocol]:
    """A :class:`HeaderDeadlineProtocol` class whose deadline is ``seconds``."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": seconds})


class SidecarServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the main server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass(frozen=True)
class Listeners:
    """Where the servers listen; ports may be 0 (any free port)."""

    host: str
    port: int
    metrics_port: int


def uvicorn_config(app: ASGIApp, config: Config, host: str, port: int) -> uvicorn.Config:
    """uvicorn settings for the main port: websockets Sans-I/O, no per-message deflate,
    the client message cap, keepalive pings, our logging (uvicorn configures none)."""
    server = config.server
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ws=GatewayWebSocketProtocol,
        ws_max_size=server.max_message_bytes,
        ws_ping_interval=server.ping_interval_seconds,
        ws_ping_timeout=server.ping_timeout_seconds,
        ws_per_message_deflate=False,
        http=header_deadline_protocol(server.handshake_timeout_seconds),
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        ssl_certfile=str(server.tls_cert_file) if server.tls_cert_file else None,
        ssl_keyfile=str(server.tls_key_file) if server.tls_key_file else None,
        timeout_graceful_shutdown=int(CLOSE_GRACE_SECONDS),
    )


def bound_port(server: uvicorn.Server) -> int:
    """The TCP port ``server`` listens on (useful when it was started on port 0)."""
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return port


async def serve(config: Config, listeners: Listeners,
                extra_routes: Sequence[BaseRoute] = ()) -> None:
    """Run the gateway and its metrics server until drained (see the module docstring).

    ``extra_routes`` go to the main app (see :func:`gateway.app.create_app`).
    """
    app = create_app(config, extra_routes=extra_routes)
    gateway: Gateway = app.state.gateway
    main = DrainingServer(uvicorn_config(app, config, listeners.host, listeners.port), gateway,
                          config.server.drain_seconds)
    metrics = SidecarServer(uvicorn.Config(
        create_metrics_app(gateway.metrics), host=listeners.host, port=listeners.metrics_port,
        lifespan="off", log_config=None, access_log=False, server_header=False))
    metrics_task = asyncio.create_task(serving_as("metrics", metrics.serve()))
    main_task = asyncio.create_task(serving_as("main", main.serve()))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not (main.started and metrics.started) and loop.time() < deadline:
        if main_task.done() or metrics_task.done():
            break
        await asyncio.sleep(0.05)
    if main.started and metrics.started:
        log.info("gateway.listening", host=listeners.host, port=bound_port(main),
                 metrics_port=bound_port(metrics),
                 tls=config.server.tls_cert_file is not None)
    try:
        await main_task
    finally:
        metrics.should_exit = True
        await metrics_task
    if not main.started:
        raise SystemExit(1)
