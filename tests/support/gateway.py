"""Real gateways for tests: configs, an in-process server on free ports, and token minting.

The gateway runs under real uvicorn on 127.0.0.1 port 0 (its metrics app too),
in the test's event loop, with the same :class:`gateway.server.DrainingServer`
as production minus signal handling.  Tokens come from a development issuer,
which the gateway validates through the same JWKS path as any issuer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import uvicorn

from gateway.app import Gateway, create_app, create_metrics_app
from gateway.auth.dev_issuer import DevIssuer
from gateway.config import DEFAULT_SCOPE, Config, parse_config
from gateway.server import DrainingServer, uvicorn_config
from gateway.sidecar import bound_port

UPSTREAM_KEY = "emulator-upstream-key-0123456789"
UPSTREAM_KEY_ENV = "TEST_UPSTREAM_KEY"
SECRET_KEY_ENV = "TEST_CLIENT_SECRET_KEY"
SECRET_KEY = "client-secret-signing-key-0123456789abcdef"
ISSUER = "https://issuer.test/"
AUDIENCE = "realtime-gateway"
MODEL = "gpt-realtime"


def gateway_config(
    upstream_url: str,
    key_file: Path,
    *,
    limits: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    provider: str = "openai",
    connect_timeout: float = 5.0,
    redis: Mapping[str, Any] | None = None,
    secret_keys: str | None = None,
) -> Config:
    """A one-tenant (``acme``) config whose issuer is a dev issuer keyed by ``key_file``.

    ``upstream_url`` is the emulator's realtime URL (``ws://127.0.0.1:P/v1/realtime``);
    ``secret_keys``, when given, enables ``client_secrets`` with that signing-key value
    (``key`` or ``kid:key,kid:key``) in :data:`SECRET_KEY_ENV`.
    """
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "drain_seconds": 5,
                   **(server or {})},
        "upstreams": {"emulator": {"provider": provider, "url": upstream_url,
                                   "api_key_env": UPSTREAM_KEY_ENV,
                                   "connect_timeout_seconds": connect_timeout}},
        "tenants": [{
            "id": "acme",
            "auth": {"issuer": ISSUER, "dev_issuer": {"key_file": str(key_file)},
                     "audiences": [AUDIENCE], "leeway_seconds": 0},
            "models": models or {MODEL: {"upstream": "emulator"}},
            "limits": dict(limits or {}),
        }],
    }
    if redis is not None:
        data["redis"] = dict(redis)
    environ = {UPSTREAM_KEY_ENV: UPSTREAM_KEY}
    if secret_keys is not None:
        data["client_secrets"] = {"signing_key_env": SECRET_KEY_ENV}
        environ[SECRET_KEY_ENV] = secret_keys
    return parse_config(data, environ)


def mint(key_file: Path, *, sub: str = "user-1", scope: str | None = DEFAULT_SCOPE,
         ttl: float = 600, **kwargs: Any) -> str:
    """A token from the test issuer (see :meth:`DevIssuer.mint`)."""
    return DevIssuer(key_file).mint(ISSUER, AUDIENCE, sub, scope, ttl, **kwargs)


class _TestServer(DrainingServer):
    """The production server class without signal handlers (the test owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class RunningGateway:
    gateway: Gateway
    server: DrainingServer
    port: int
    metrics_port: int

    def url(self, path: str = "/v1/realtime", **params: str) -> str:
        query = {"model": MODEL, **params}
        query = {k: v for k, v in query.items() if v}
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{urlencode(query)}" if query else "")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


async def wait_for(predicate: Any, within: float = 5.0, interval: float = 0.02) -> None:
    """Poll ``predicate()`` (sync or async) until true; ``AssertionError`` after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def run_gateway(config: Config,
                      gateway: Gateway | None = None) -> AsyncIterator[RunningGateway]:
    """Serve ``config`` on free loopback ports until the block exits.

    ``gateway`` is the :class:`Gateway` to serve (e.g. one built with a fake clock, or one
    the caller must hold before the servers start); by default one is built from ``config``.
    """
    app = create_app(config, gateway=gateway)
    gw: Gateway = app.state.gateway
    main = _TestServer(uvicorn_config(app, config, "127.0.0.1", 0), gw.registry,
                       config.server.drain_seconds)
    metrics = _TestServer(uvicorn.Config(create_metrics_app(gw.services.metrics),
                                         host="127.0.0.1", port=0, lifespan="off",
                                         log_config=None), gw.registry, 0)
    tasks = [asyncio.create_task(main.serve()), asyncio.create_task(metrics.serve())]
    try:
        await wait_for(lambda: (main.started and metrics.started)
                       or any(t.done() for t in tasks), within=15)
        if not (main.started and metrics.started):
            for task in tasks:
                if task.done():
                    task.result()
            raise AssertionError("the gateway did not start")
        yield RunningGateway(gw, main, bound_port(main), bound_port(metrics))
    finally:
        for server in (main, metrics):
            server.should_exit = True
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=20)
