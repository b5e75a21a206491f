"""The metrics port's server, apart from the gateway it reports on (CONTRACT §3 ``/metrics``).

:func:`gateway.server.serve` runs it next to the gateway's main server; the supervisor of
``serve --workers N`` (:mod:`gateway.workers`) runs it alone, without loading the session
pipeline, to serve its workers' summed metrics.  Also the two uvicorn helpers both need:
waiting for servers to start, and the port one listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator, Mapping
from typing import Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

STARTUP_SECONDS = 30.0
"""How long :func:`wait_started` waits by default, in seconds."""


class Renders(Protocol):
    """What the metrics app serves: :class:`gateway.metrics.Metrics`, or the supervisor's
    sum over its workers (:class:`gateway.workers.ReplicaMetrics`)."""

    def render(self) -> bytes:
        """The text exposition format (``text/plain; version=0.0.4``)."""
        ...


def metrics_app(metrics: Renders) -> Starlette:
    """The metrics port's app: exactly ``GET /metrics`` (no redirect to ``/metrics/``)."""

    async def render(request: Request) -> Response:
        return Response(metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(routes=[Route("/metrics", render)])


class SidecarServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the main server (or the supervisor)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bound_port(server: uvicorn.Server) -> int:
    """The TCP port ``server`` listens on (useful when it was started on port 0)."""
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return port


async def wait_started(servers: Mapping[uvicorn.Server, asyncio.Task[None]],
                       seconds: float = STARTUP_SECONDS) -> bool:
    """Wait until every server of ``servers`` (each with the task serving it) has started,
    one of the tasks ended (a failed start), or ``seconds`` passed; True if all started."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not all(server.started for server in servers) and loop.time() < deadline:
        if any(task.done() for task in servers.values()):
            break
        await asyncio.sleep(0.05)
    return all(server.started for server in servers)
