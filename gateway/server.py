"""Running the gateway under uvicorn, with a drain on SIGTERM (CONTRACT §2 ``drain_seconds``).

uvicorn alone closes every WebSocket at once on SIGTERM and exits 143.  The
gateway instead, on the first SIGTERM or SIGINT:

1. stops admitting at once: ``/readyz`` answers 503, new upgrades get 503 ``unavailable``;
2. lets live sessions run until they end or ``drain_seconds`` pass;
3. ends the rest with an ``error`` event (``shutting_down``) and close 1012;
4. shuts uvicorn down and exits 0.

A second signal skips the wait (step 3 at once).  The metrics server keeps
answering until the main server is done, so the last scrape sees the drain.

:func:`serve` is ``serve`` with one process; :func:`serve_worker` is one worker of
``serve --workers N`` (:mod:`gateway.workers`): the same server and drain on a socket the
worker bound with ``SO_REUSEPORT``, without a metrics server of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from gateway.app import Gateway, build_gateway, create_app, create_metrics_app
from gateway.config import Config
from gateway.errors import SHUTTING_DOWN
from gateway.handoff import GatewayWebSocketProtocol, header_deadline_protocol
from gateway.logs import get_logger, serving_as
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.sidecar import SidecarServer, bound_port, wait_started

log = get_logger(__name__)

CLOSE_GRACE_SECONDS = 10.0
"""After the 1012 closes are sent, how long to wait for the sessions to finish closing."""


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the gateway's sessions instead of
    closing them (``registry``: the gateway's :class:`~gateway.registry.Registry`)."""

    def __init__(self, config: uvicorn.Config, registry: Registry,
                 drain_seconds: float) -> None:
        super().__init__(config)
        self.registry = registry
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
            self.registry.end_all(SHUTTING_DOWN)
        return await super().on_tick(counter)

    async def drain(self) -> None:
        """Stop admitting, wait up to ``drain_seconds`` for sessions to end, close the rest
        with 1012, then let uvicorn shut down."""
        gw = self.registry
        gw.start_drain()
        if not await gw.wait_idle(self.drain_seconds):
            log.info("gateway.drain_timeout", live_sessions=len(gw.sessions))
            gw.end_all(SHUTTING_DOWN)
            await gw.wait_idle(CLOSE_GRACE_SECONDS)
        log.info("gateway.drained", live_sessions=len(gw.sessions))
        self.should_exit = True


@dataclass(frozen=True)
class Listeners:
    """Where the servers listen; ports may be 0 (any free port)."""

    host: str
    port: int
    metrics_port: int


def uvicorn_config(app: ASGIApp, config: Config, host: str, port: int) -> uvicorn.Config:
    """uvicorn settings for the main port: websockets Sans-I/O, no per-message deflate,
    the client message cap, keepalive pings, our logging (uvicorn configures none), and
    ``X-Forwarded-*`` believed only from ``server.forwarded_allow_ips`` (none by default;
    uvicorn's own default trusts 127.0.0.1, so a same-host proxy that does not set the
    header would let clients forge the logged ``client``)."""
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
        proxy_headers=bool(server.forwarded_allow_ips),
        forwarded_allow_ips=list(server.forwarded_allow_ips) or None,
        http=header_deadline_protocol(server.handshake_timeout_seconds),
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        ssl_certfile=str(server.tls_cert_file) if server.tls_cert_file else None,
        ssl_keyfile=str(server.tls_key_file) if server.tls_key_file else None,
        timeout_graceful_shutdown=int(CLOSE_GRACE_SECONDS),
    )


async def serve(config: Config, listeners: Listeners,
                extra_routes: Sequence[BaseRoute] = (), gateway: Gateway | None = None) -> None:
    """Run the gateway and its metrics server until drained (see the module docstring).

    ``extra_routes`` go to the main app and ``gateway`` (built by
    :func:`gateway.app.build_gateway` when ``None``) is served by it (see
    :func:`gateway.app.create_app`).
    """
    app = create_app(config, gateway, extra_routes=extra_routes)
    gw: Gateway = app.state.gateway
    main = DrainingServer(uvicorn_config(app, config, listeners.host, listeners.port),
                          gw.registry, config.server.drain_seconds)
    metrics = SidecarServer(uvicorn.Config(
        create_metrics_app(gw.services.metrics), host=listeners.host,
        port=listeners.metrics_port,
        lifespan="off", log_config=None, access_log=False, server_header=False))
    metrics_task = asyncio.create_task(serving_as("metrics", metrics.serve()))
    main_task = asyncio.create_task(serving_as("main", main.serve()))
    await wait_started({main: main_task, metrics: metrics_task})
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


async def serve_worker(config: Config, sock: socket.socket,
                       on_listening: Callable[[int], None]) -> None:
    """Run one worker process of ``serve --workers N`` (:mod:`gateway.workers`) until drained.

    The main app is served on ``sock`` — bound (not listening) by the caller with
    ``SO_REUSEPORT`` on the replica's port, so the kernel spreads new connections over the
    workers — and drains exactly as :func:`serve` does on SIGTERM/SIGINT (which the
    supervisor forwards).  No metrics server: the metrics (``Metrics(process_metrics=False)``,
    in prometheus-client's multiprocess mode) are served summed by the supervisor.
    ``on_listening(port)`` is called once the socket accepts connections.

    Raises:
        SystemExit: 1 when the server could not start (the reason is logged).
    """
    gw = build_gateway(config, Metrics(process_metrics=False))
    app = create_app(config, gw)
    host, port = sock.getsockname()[:2]
    main = DrainingServer(uvicorn_config(app, config, host, port), gw.registry,
                          config.server.drain_seconds)
    main_task = asyncio.create_task(serving_as("main", main.serve(sockets=[sock])))
    if await wait_started({main: main_task}):
        log.info("worker.listening", host=host, port=port, pid=os.getpid(),
                 max_sessions=config.server.max_sessions,
                 tls=config.server.tls_cert_file is not None)
        on_listening(port)
    await main_task
    if not main.started:
        raise SystemExit(1)
