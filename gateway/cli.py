"""The ``realtime-gateway`` command line (CONTRACT §1).

``serve``, ``dev``, ``emulator``, ``token`` and ``check-config``.  Exit status 0 on
success, 1 on a configuration error (``serve --workers N`` also: N > 1 without ``redis:``,
the port taken, or a worker that keeps failing to start), 2 on a usage error (argparse).

``serve --workers N`` runs the supervisor of :mod:`gateway.workers` and N worker processes;
with 1 (the default) ``serve`` runs the gateway in this process, as it always did.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import secrets
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.config import Config, ConfigError, load_config, parse_config

if TYPE_CHECKING:
    from gateway.devtls import DevCertificates

DEFAULT_CONFIG_ENV = "REALTIME_GATEWAY_CONFIG"
DEV_TENANT = "dev"
DEV_AUDIENCE = "realtime-gateway"
DEV_MODELS = ("gpt-realtime", "gpt-realtime-2", "gpt-realtime-mini")
DEV_UPSTREAM_KEY_ENV = "REALTIME_GATEWAY_DEV_UPSTREAM_KEY"
DEV_SECRET_KEY_ENV = "REALTIME_GATEWAY_DEV_SECRET_KEY"  # noqa: S105 - a variable name
"""The environment variable ``dev`` puts a fresh client-secret signing key in (per run)."""


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop when available (it is on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def _secrets_of(config: Config) -> list[str]:
    values = [u.api_key for u in config.upstreams.values()]
    values += [t.auth.introspection.client_secret for t in config.tenants
               if t.auth.introspection is not None]
    if config.client_secrets is not None:
        values += [key.decode() for _, key in config.client_secrets.signing_keys]
    return [v for v in values if v]


def _print_errors(error: ConfigError) -> None:
    for path, message in error.errors:
        print(f"{path}: {message}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path, os.environ)
    except ConfigError as exc:
        _print_errors(exc)
        return 1
    print(f"{args.path}: OK ({len(config.tenants)} tenant(s), "
          f"{len(config.upstreams)} upstream(s))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging

    path = args.config or os.environ.get(DEFAULT_CONFIG_ENV)
    if not path:
        print(f"--config is required (or set {DEFAULT_CONFIG_ENV})", file=sys.stderr)
        return 2
    if args.worker_index is not None:
        return _serve_worker(args, path)
    try:
        config = load_config(path, os.environ)
    except ConfigError as exc:
        _print_errors(exc)
        return 1
    if args.workers > 1:
        from gateway.workers import refusal

        reason = refusal(config, args.workers)
        if reason is not None:
            print(reason, file=sys.stderr)
            return 1
    configure_logging(args.log_level or config.logging.level, config.logging.format,
                      secrets=_secrets_of(config))
    server = config.server
    host = args.host or server.host
    port = server.port if args.port is None else args.port
    metrics_port = server.metrics_port if args.metrics_port is None else args.metrics_port
    if args.workers > 1:
        # The supervisor of gateway.workers, on the standard asyncio loop (it moves no
        # frames) and without the session pipeline loaded (gateway.server is not imported).
        from gateway.workers import Supervisor

        supervisor = Supervisor(Path(path), config, args.workers, host=host, port=port,
                                metrics_port=metrics_port, log_level=args.log_level)
        return asyncio.run(supervisor.run())
    from gateway.server import Listeners, serve

    freeze_startup_objects()
    _run(serve(config, Listeners(host=host, port=port, metrics_port=metrics_port)))
    return 0


def _serve_worker(args: argparse.Namespace, path: str) -> int:
    """One worker of ``serve --workers N``, started by its supervisor (hidden options)."""
    from gateway.logs import configure_logging, get_logger
    from gateway.server import serve_worker
    from gateway.workers import WorkerSpec, bind_reuseport, worker_config

    spec = WorkerSpec(args.worker_index, args.worker_count, args.worker_ready_fd,
                      args.worker_supervisor_pid, Path(args.worker_config_snapshot))
    problem = spec.check()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    try:
        config = load_config(spec.config_snapshot, os.environ,
                             base_dir=Path(path).resolve().parent)
    except ConfigError as exc:
        _print_errors(exc)
        return 1
    configure_logging(args.log_level or config.logging.level, config.logging.format,
                      secrets=_secrets_of(config), fields={"worker": spec.index})
    config = worker_config(config, spec.count)
    try:
        sock = bind_reuseport(args.host, args.port)
    except OSError as exc:
        get_logger(__name__).error("worker.bind_failed", host=args.host, port=args.port,
                                   error=str(exc))
        return 1
    freeze_startup_objects()
    _run(serve_worker(config, sock, spec.report_listening))
    return 0


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive now (modules, config, pydantic models:
    ~10^5 objects) to the collector's permanent generation (:func:`gc.freeze`), so that a
    full collection while serving traverses only what sessions allocated: one gen-2
    collection over the start-up heap took 31 ms in the bench (issue 16), a stall every
    live session would hear."""
    gc.collect()
    gc.freeze()


def cmd_emulator(args: argparse.Namespace) -> int:
    from gateway.emulator.server import serve_forever
    from gateway.logs import configure_logging

    api_key = os.environ.get("EMULATOR_API_KEY") or None
    configure_logging("info", "console", secrets=[api_key] if api_key else [])
    _run(serve_forever(args.host, args.port, api_key, speech=args.speech,
                       webrtc=args.webrtc, calls_port=args.calls_port))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.auth.dev_issuer import DevIssuer

    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        _print_errors(exc)
        return 1
    tenant = next((t for t in config.tenants if t.id == args.tenant), None)
    if tenant is None:
        print(f"no tenant {args.tenant!r} in {args.config}", file=sys.stderr)
        return 1
    if tenant.auth.dev_issuer is None:
        print(f"tenant {args.tenant!r} has no auth.dev_issuer; tokens come from its issuer",
              file=sys.stderr)
        return 1
    issuer = DevIssuer(tenant.auth.dev_issuer.key_file)
    print(issuer.mint(
        issuer=tenant.auth.issuer,
        audience=tenant.auth.audiences[0] if tenant.auth.audiences else None,
        sub=args.sub,
        scope=args.scope or tenant.auth.required_scope,
        ttl_seconds=args.ttl,
    ))
    return 0


def dev_state_dir() -> Path:
    """Where ``dev`` keeps its issuer key (and, for ``--tls``, its certificates under
    ``tls/``): ``$XDG_STATE_HOME/realtime-gateway``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "realtime-gateway"


def dev_config(port: int, upstream_url: str, *, upstream_key_env: str,
               environ: dict[str, str], key_file: Path,
               tls: DevCertificates | None = None, calls_url: str | None = None) -> Config:
    """The in-memory configuration of ``realtime-gateway dev``: loopback only, one
    tenant ``dev`` with a development issuer, in-process limits, one upstream, client
    secrets signed with the key in ``environ[DEV_SECRET_KEY_ENV]``; TLS with ``tls``'s
    certificate when given; ``calls_url`` is the upstream's WebRTC calls URL (the
    emulator's calls port) when it is not the default one."""
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port, "metrics_port": 0,
                              "drain_seconds": 0}
    if tls is not None:
        server.update(tls_cert_file=str(tls.cert_file), tls_key_file=str(tls.key_file))
    scheme = "https" if tls is not None else "http"
    data = {
        "server": server,
        "upstreams": {"upstream": {"provider": "openai", "url": upstream_url,
                                   "api_key_env": upstream_key_env, "calls_url": calls_url}},
        "tenants": [{
            "id": DEV_TENANT,
            "auth": {"issuer": f"{scheme}://127.0.0.1:{port}/_dev/{DEV_TENANT}",
                     "dev_issuer": {"key_file": str(key_file)},
                     "audiences": [DEV_AUDIENCE]},
            "models": {m: {"upstream": "upstream"} for m in DEV_MODELS},
        }],
        "client_secrets": {"signing_key_env": DEV_SECRET_KEY_ENV},
        "logging": {"level": "info", "format": "console"},
    }
    return parse_config(data, environ)


async def _dev(port: int, tls: DevCertificates | None, loopback_ice: bool = False) -> None:
    from gateway.app import build_gateway
    from gateway.demo import demo_routes
    from gateway.devbanner import dev_banner, missing_modules
    from gateway.emulator.server import Emulator
    from gateway.logs import configure_logging
    from gateway.server import Listeners, serve

    environ = dict(os.environ)
    environ[DEV_SECRET_KEY_ENV] = secrets.token_urlsafe(32)  # client secrets of this run
    key_file = dev_state_dir() / "dev-issuer.jwk.json"
    emulator: Emulator | None = None
    calls_url: str | None = None
    if environ.get("OPENAI_API_KEY"):
        upstream_url, key_env, upstream_name = (
            "wss://api.openai.com/v1/realtime", "OPENAI_API_KEY", "OpenAI")
    else:
        key_env = DEV_UPSTREAM_KEY_ENV
        environ[key_env] = secrets.token_urlsafe(24)
        # WebRTC calls (POST /v1/realtime/calls) reach the emulator's real peer connections
        # when the webrtc extra (aiortc) is installed; its ordinary ICE candidates serve a
        # browser on this machine.
        webrtc = importlib.util.find_spec("aiortc") is not None
        emulator = Emulator(host="127.0.0.1", port=0, api_key=environ[key_env], speech=True,
                            webrtc=webrtc, loopback_ice=loopback_ice)
        await emulator.__aenter__()
        calls_url = emulator.calls_url if webrtc else None
        upstream_url = f"{emulator.url}/v1/realtime"
        upstream_name = f"the built-in emulator ({emulator.url})"
    config = dev_config(port, upstream_url, upstream_key_env=key_env, environ=environ,
                        key_file=key_file, tls=tls, calls_url=calls_url)
    configure_logging("info", "console", secrets=_secrets_of(config))
    tenant = config.tenants[0]
    gateway = build_gateway(config)
    issuer = gateway.services.authenticator.dev_issuer(tenant.id)
    assert issuer is not None  # dev_config gives its one tenant a development issuer
    token = issuer.mint(
        issuer=tenant.auth.issuer, audience=DEV_AUDIENCE, sub="dev-user",
        scope=tenant.auth.required_scope, ttl_seconds=3600)
    print(dev_banner(version=__version__, port=port, token=token, upstream=upstream_name,
                     tls=tls, missing=missing_modules()), flush=True)
    scheme = "https" if tls is not None else "http"
    print(f"Voice demo (microphone, in a browser): {scheme}://127.0.0.1:{port}/\n", flush=True)
    demo = demo_routes(issuer, tenant, model=DEV_MODELS[0],
                       secrets_url=f"{scheme}://127.0.0.1:{port}/v1/realtime/client_secrets",
                       verify=str(tls.ca_file) if tls is not None else True)
    try:
        await serve(config, Listeners("127.0.0.1", port, 0), extra_routes=demo, gateway=gateway)
    finally:
        if emulator is not None:
            await emulator.__aexit__(None, None, None)


def cmd_dev(args: argparse.Namespace) -> int:
    tls = None
    if args.tls:
        from gateway.devtls import DevTLSError, ensure_certificates

        try:
            tls = ensure_certificates(dev_state_dir() / "tls")
        except DevTLSError as exc:
            print(exc, file=sys.stderr)
            return 1
    _run(_dev(args.port, tls, args.loopback_ice))
    return 0


def _workers(value: str) -> int:
    """argparse type of ``--workers`` (:func:`gateway.workers.parse_workers`)."""
    from gateway.workers import parse_workers

    try:
        return parse_workers(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realtime-gateway",
                                     description="WebSocket gateway for the OpenAI Realtime API")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=f"config file (default: ${DEFAULT_CONFIG_ENV})")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--metrics-port", type=int)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=_workers, default=1, metavar="N",
                       help="gateway processes on the one port (SO_REUSEPORT), each a full "
                            "gateway; 'auto' = the CPUs this process may use; more than 1 "
                            "needs redis: in the config (default: 1)")
    for hidden, kind in (("--worker-index", int), ("--worker-count", int),
                         ("--worker-ready-fd", int), ("--worker-supervisor-pid", int),
                         ("--worker-config-snapshot", str)):
        serve.add_argument(hidden, type=kind, help=argparse.SUPPRESS)  # from the supervisor
    serve.set_defaults(func=cmd_serve)

    dev = commands.add_parser("dev", help="run locally on 127.0.0.1 with a dev issuer")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--tls", action="store_true",
                     help="serve https/wss with a certificate from a local CA (openai-node "
                          "dials wss:// only); the CA is printed for NODE_EXTRA_CA_CERTS")
    dev.add_argument("--loopback-ice", action="store_true",
                     help="the emulator's WebRTC calls offer only 127.0.0.1 ICE candidates "
                          "(tests in a private network namespace; a normal browser gathers "
                          "no loopback candidates)")
    dev.set_defaults(func=cmd_dev)

    emulator = commands.add_parser("emulator", help="run the Realtime protocol emulator")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8081)
    emulator.add_argument("--speech", action="store_true",
                          help="speak replies with espeak-ng (and sox) instead of a tone")
    emulator.add_argument("--webrtc", action="store_true",
                          help="also answer WebRTC calls (POST /v1/realtime/calls) on "
                               "--calls-port; needs the webrtc extra (aiortc)")
    emulator.add_argument("--calls-port", type=int, default=8082)
    emulator.set_defaults(func=cmd_emulator)

    token = commands.add_parser("token", help="mint a token from a tenant's dev issuer")
    token.add_argument("--config", required=True)
    token.add_argument("--tenant", required=True)
    token.add_argument("--sub", required=True)
    token.add_argument("--scope")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``realtime-gateway`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status
