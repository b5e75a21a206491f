"""Dialling a ``wss://`` upstream (gateway.upstream): the certificate is verified against the
system store or ``upstreams.<name>.ca_file``, and one TLS context per upstream serves every
dial of the process (websockets would otherwise make one per connect)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from gateway.app import build_gateway
from gateway.config import UpstreamConfig, parse_config
from gateway.devtls import DevCertificates, create_certificates
from gateway.errors import UpstreamFailed
from gateway.upstream import UpstreamTarget, dial, tls_context, tls_contexts

KEY_ENV = "UPSTREAM_TLS_TEST_KEY"


@pytest.fixture
def certs(tmp_path: Path) -> DevCertificates:
    return create_certificates(tmp_path / "tls")


@pytest.fixture
async def tls_port(certs: DevCertificates) -> AsyncIterator[int]:
    """A WebSocket server on 127.0.0.1 serving TLS with a leaf of the private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)

    async def answer(connection: ServerConnection) -> None:
        await connection.send('{"type":"session.created"}')
        await connection.wait_closed()

    async with serve(answer, "127.0.0.1", 0, ssl=context) as server:
        yield server.sockets[0].getsockname()[1]


def upstream(port: int, ca_file: Path | None, host: str = "127.0.0.1") -> UpstreamConfig:
    data: dict[str, Any] = {"provider": "openai", "url": f"wss://{host}:{port}/v1/realtime",
                            "api_key_env": KEY_ENV}
    if ca_file is not None:
        data["ca_file"] = str(ca_file)
    return UpstreamConfig.model_validate(data)


async def test_a_private_ca_in_ca_file_is_trusted(tls_port: int,
                                                  certs: DevCertificates) -> None:
    target = UpstreamTarget("up", upstream(tls_port, certs.ca_file), "m")
    connection = await dial(target, connect_timeout=5)
    try:
        assert connection.transport.get_extra_info("ssl_object") is not None
    finally:
        connection.transport.close()


async def test_without_ca_file_the_private_ca_is_refused_502(tls_port: int) -> None:
    target = UpstreamTarget("up", upstream(tls_port, None), "m")
    with pytest.raises(UpstreamFailed) as caught:
        await dial(target, connect_timeout=5, tls=tls_contexts({"up": target.config})["up"])
    assert caught.value.http_status == 502 and caught.value.reason == "connect"


async def test_the_host_name_is_checked_too(tls_port: int, tmp_path: Path) -> None:
    other = create_certificates(tmp_path / "other")  # a trusted CA, but not the server's
    target = UpstreamTarget("up", upstream(tls_port, other.ca_file), "m")
    with pytest.raises(UpstreamFailed):
        await dial(target, connect_timeout=5)
    context = tls_context(upstream(tls_port, other.ca_file))
    assert context is not None and context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


async def test_one_context_serves_every_dial(tls_port: int, certs: DevCertificates,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[ssl.SSLContext] = []
    original = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        context = original(*args, **kwargs)
        made.append(context)
        return context

    monkeypatch.setattr(ssl, "create_default_context", counting)
    config = upstream(tls_port, certs.ca_file)
    shared = tls_contexts({"up": config, "plain": UpstreamConfig.model_validate(
        {"provider": "openai", "url": "ws://127.0.0.1:1/v1", "api_key_env": KEY_ENV})})
    assert set(shared) == {"up"} and len(made) == 1
    seen = []
    for _ in range(2):
        connection = await dial(UpstreamTarget("up", config, "m"), connect_timeout=5,
                                tls=shared["up"])
        seen.append(connection.transport.get_extra_info("ssl_object").context)
        connection.transport.close()
    assert seen[0] is seen[1] is shared["up"]
    assert len(made) == 1  # no context made per dial


def test_the_gateway_builds_the_contexts_once(certs: DevCertificates, tmp_path: Path) -> None:
    data = {
        "server": {"host": "127.0.0.1"},
        "upstreams": {
            "private": {"provider": "openai", "url": "wss://127.0.0.1:9/v1/realtime",
                        "api_key_env": KEY_ENV, "ca_file": str(certs.ca_file)},
            "public": {"provider": "openai", "url": "wss://api.openai.com/v1/realtime",
                       "api_key_env": KEY_ENV},
            "plain": {"provider": "openai", "url": "ws://127.0.0.1:9/v1/realtime",
                      "api_key_env": KEY_ENV},
        },
        "tenants": [{"id": "t", "auth": {"issuer": "https://i/",
                                         "jwks_uri": "https://i/jwks"},
                     "models": {"m": {"upstream": "private"}}}],
    }
    config = parse_config(data, {KEY_ENV: "k" * 20})
    contexts = build_gateway(config).services.upstream_tls
    assert set(contexts) == {"private", "public"}
    # the private one trusts the bundle only, the public one the system store
    assert len(contexts["private"].get_ca_certs()) == 1
