"""The gateway as a real process: no credential in its DEBUG output, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from gateway.emulator.server import Emulator
from tests.support.gateway import UPSTREAM_KEY, gateway_config, mint, wait_for
from tests.support.process import gateway_process, write_config


async def test_debug_logs_hold_no_credential(emulator: Emulator, key_file: Path,
                                             tmp_path: Path) -> None:
    config = write_config(gateway_config(f"{emulator.url}/v1/realtime", key_file,
                                         server={"drain_seconds": 0}), tmp_path / "gw.yaml")
    tokens = [mint(key_file, sub=f"user-{i}") for i in range(5)]
    async with gateway_process(config, "--log-level", "debug") as gw:
        async with connect(gw.url(), subprotocols=[f"Bearer-{tokens[0]}"]) as ws:  # type: ignore[list-item]
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
            await ws.recv()
        async with connect(gw.url(), additional_headers={
                "Authorization": f"Bearer {tokens[1]}"}) as ws:
            await ws.recv()
        offers = [Subprotocol("realtime"), Subprotocol(f"openai-insecure-api-key.{tokens[2]}")]
        async with connect(gw.url(), subprotocols=offers) as ws:
            await ws.recv()
        try:
            async with connect(gw.url(model="unknown"),
                               additional_headers={"api-key": tokens[3]}) as ws:
                await ws.recv()
        except InvalidStatus:
            pass
        preview = (f"ws://127.0.0.1:{gw.port}/openai/realtime?api-version=2024-10-01-preview"
                   f"&deployment=gpt-realtime&api-key={tokens[4]}")  # rt-client in a browser
        async with connect(preview) as ws:
            await ws.recv()
        gw.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await gw.process.wait() == 0
    output = "\n".join(gw.lines)
    assert "< GET /openai/realtime HTTP/1.1" in output  # the path, without its query
    assert "api-version" not in output and "/openai/realtime?" not in output
    assert gw.events("session.start") and gw.events("session.end")
    debug = [r for r in map(_json, gw.lines) if r and r.get("level") == "debug"]
    # the header dumps of uvicorn/websockets really were logged, redacted
    assert any("Sec-WebSocket-Protocol" in str(r.get("event")) for r in debug)
    assert any("Authorization" in str(r.get("event")) for r in debug)
    for secret in [*tokens, UPSTREAM_KEY]:
        assert secret not in output
        assert secret[:40] not in output
    assert not re.search(r"Bearer-(?!\[REDACTED\])\S", output)
    assert "eyJ" not in output


def _json(line: str) -> dict[str, object] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def test_sigterm_drains_live_sessions_then_1012_and_exit_0(
        emulator: Emulator, key_file: Path, tmp_path: Path) -> None:
    drain = 3.0
    config = write_config(gateway_config(f"{emulator.url}/v1/realtime", key_file,
                                         server={"drain_seconds": drain}), tmp_path / "gw.yaml")
    async with gateway_process(config) as gw:
        sessions = [await connect(gw.url(), additional_headers={
            "Authorization": f"Bearer {mint(key_file, sub=f'u{i}')}"}) for i in range(2)]
        for ws in sessions:
            await ws.recv()  # session.created
        loop = asyncio.get_running_loop()
        gw.process.send_signal(signal.SIGTERM)
        signalled = loop.time()
        async with httpx.AsyncClient() as client:
            async def not_ready() -> bool:
                response = await client.get(f"http://127.0.0.1:{gw.port}/readyz")
                return response.status_code == 503
            await wait_for(not_ready, within=1.0)
        with pytest.raises(InvalidStatus) as refused:
            await connect(gw.url(), additional_headers={
                "Authorization": f"Bearer {mint(key_file, sub='late')}"})
        assert refused.value.response.status_code == 503
        # live sessions keep relaying during the drain
        for ws in sessions:
            await ws.send(json.dumps({"type": "session.update",
                                      "session": {"type": "realtime"}}))
            assert json.loads(await ws.recv())["type"] == "session.updated"
        codes = []
        for ws in sessions:
            last = None
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(drain + 10):
                    while True:
                        last = json.loads(await ws.recv())
            assert closed.value.rcvd is not None
            codes.append(closed.value.rcvd.code)
            assert last is not None and last["error"]["code"] == "shutting_down"
        closed_after = loop.time() - signalled
        assert codes == [1012, 1012]
        assert drain - 0.5 <= closed_after <= drain + 3
        async with asyncio.timeout(15):
            assert await gw.process.wait() == 0
