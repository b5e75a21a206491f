"""The commands of CONTRACT §1 as real processes: dev, token, emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from gateway.emulator.server import Emulator
from tests.support.gateway import gateway_config
from tests.support.process import gateway_process, write_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def command(*args: str, env: dict[str, str] | None = None,
                  ) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def read_until(process: asyncio.subprocess.Process, pattern: str,
                     within: float = 30) -> tuple[re.Match[str], str]:
    assert process.stdout is not None
    seen = ""
    async with asyncio.timeout(within):
        async for raw in process.stdout:
            seen += raw.decode(errors="replace")
            match = re.search(pattern, seen, re.MULTILINE)
            if match:
                return match, seen
    raise AssertionError(f"{pattern!r} not printed:\n{seen}")


async def test_dev_prints_a_working_token_url_and_snippet(tmp_path: Path) -> None:
    port = free_port()
    env = {"XDG_STATE_HOME": str(tmp_path), "OPENAI_API_KEY": ""}
    async with command("dev", "--port", str(port), env=env) as process:
        token_line, banner = await read_until(process, r"^Token:\s+(\S+)$")
        _, rest = await read_until(process, r"gateway.listening")
        banner += rest
        token = token_line.group(1)
        assert f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime" in banner
        assert "AsyncOpenAI" in banner and '["Bearer-" + token]' in banner
        url = f"ws://127.0.0.1:{port}/language-model-service/ws/v1/open-ai/realtime" \
              "?model=gpt-realtime"
        async with connect(url, subprotocols=[f"Bearer-{token}"]) as ws:  # type: ignore[list-item]
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with httpx.AsyncClient() as client:
            jwks = (await client.get(f"http://127.0.0.1:{port}/_dev/dev/jwks.json")).json()
        assert jwks["keys"][0]["kty"] == "EC" and "d" not in jwks["keys"][0]
        # the printed mint snippet, run as printed, gives a client secret the socket takes
        assert f"curl -s http://127.0.0.1:{port}/v1/realtime/client_secrets" in banner
        mint_snippet = re.search(r"^Python \(python mint\.py\):\n((?:    .*\n)+)", banner,
                                 re.MULTILINE)
        assert mint_snippet, banner
        code = textwrap.dedent(mint_snippet.group(1)).replace("<token>", token)
        minted = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30):
            out, _ = await minted.communicate()
        secret = out.decode().strip()
        assert minted.returncode == 0 and secret.startswith("ek_")
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime",
                           subprotocols=[Subprotocol("realtime"),
                                         Subprotocol(f"openai-insecure-api-key.{secret}")]) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    key = tmp_path / "realtime-gateway" / "dev-issuer.jwk.json"
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600


async def test_token_command_mints_what_the_gateway_accepts(emulator: Emulator, key_file: Path,
                                                            tmp_path: Path) -> None:
    config = write_config(gateway_config(f"{emulator.url}/v1/realtime", key_file),
                          tmp_path / "gw.yaml")
    env = {"TEST_UPSTREAM_KEY": "x" * 12}
    async with command("token", "--config", str(config), "--tenant", "acme", "--sub", "alice",
                       "--ttl", "120", env=env) as process:
        stdout, _ = await process.communicate()
    assert process.returncode == 0, stdout
    token = stdout.decode().strip()
    async with gateway_process(config) as gw, connect(
            gw.url(), additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
    assert gw.events("session.start")[0]["subject"] == "alice"


@pytest.mark.parametrize("tenant", ["nobody"])
async def test_token_command_refuses_unknown_tenant(emulator: Emulator, key_file: Path,
                                                    tmp_path: Path, tenant: str) -> None:
    config = write_config(gateway_config(f"{emulator.url}/v1/realtime", key_file),
                          tmp_path / "gw.yaml")
    async with command("token", "--config", str(config), "--tenant", tenant, "--sub", "a",
                       env={"TEST_UPSTREAM_KEY": "x" * 12}) as process:
        stdout, _ = await process.communicate()
    assert process.returncode == 1 and b"no tenant" in stdout


async def test_emulator_command_serves_sessions_json() -> None:
    port = free_port()
    async with command("emulator", "--port", str(port)) as process:
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(f"http://127.0.0.1:{port}/_emulator/sessions")
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("emulator did not start")
        assert response.json()["sessions"] == []
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            await process.wait()
