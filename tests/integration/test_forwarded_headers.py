"""``server.forwarded_allow_ips``: whose ``X-Forwarded-For`` names the logged ``client``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.config import ConfigError
from gateway.emulator.server import Emulator
from tests.support.gateway import gateway_config, run_gateway

FORGED = "203.0.113.9"


async def logged_client(emulator: Emulator, key_file: Path, **server: Any) -> str:
    """The ``client`` of the ``session.rejected`` line of a token-less upgrade from
    127.0.0.1 that claims ``X-Forwarded-For: 203.0.113.9``."""
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, server=server)
    async with run_gateway(config) as gw:
        with capture_logs() as logs, pytest.raises(InvalidStatus) as refused:
            await connect(gw.url(model="gpt-realtime"),
                          additional_headers={"X-Forwarded-For": FORGED})
    assert refused.value.response.status_code == 401
    (line,) = [entry for entry in logs if entry["event"] == "session.rejected"]
    return str(line["client"])


async def test_forwarded_for_from_loopback_is_not_believed_by_default(
        emulator: Emulator, key_file: Path) -> None:
    client = await logged_client(emulator, key_file)
    assert client.startswith("127.0.0.1:")


async def test_forwarded_for_from_an_allowed_proxy_names_the_client(
        emulator: Emulator, key_file: Path) -> None:
    client = await logged_client(emulator, key_file, forwarded_allow_ips=["127.0.0.0/8"])
    assert client.startswith(f"{FORGED}:")


@pytest.mark.parametrize("entry", ["proxy.internal", "10.0.0.0/33", ""])
def test_forwarded_allow_ips_takes_addresses_networks_or_star(
        key_file: Path, entry: str) -> None:
    with pytest.raises(ConfigError, match="forwarded_allow_ips"):
        gateway_config("ws://127.0.0.1:1/v1/realtime", key_file,
                       server={"forwarded_allow_ips": [entry]})
    gateway_config("ws://127.0.0.1:1/v1/realtime", key_file,
                   server={"forwarded_allow_ips": ["*", "10.0.0.1", "fd00::/8"]})
