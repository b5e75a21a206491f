"""A real browser (headless Chromium) through the gateway, as Foundry-style and hand-written
browser clients use it: the token rides in a WebSocket subprotocol (shared/notes/protocol.md
rows L and M), the gateway echoes one offer, and a refusal arrives as an ``error`` event
followed by close 4401 that the page can read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.emulator.server import Emulator
from tests.sdk.helpers import CHROMIUM_FLAGS, SDK_DIR, chromium_or_skip, run_node, serve_directory
from tests.support.emulator import emulator_sessions
from tests.support.gateway import RunningGateway, gateway_config, mint, run_gateway

FOUNDRY_PATH = "/language-model-service/ws/v1/open-ai/realtime"


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path) -> AsyncIterator[RunningGateway]:
    async with run_gateway(gateway_config(f"{emulator.url}/v1/realtime", key_file)) as running:
        yield running


async def open_in_browser(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Run each case's ``openRealtime(url, protocols)`` in one Chromium page."""
    chromium = chromium_or_skip()
    with serve_directory(SDK_DIR / "pages") as base:
        run = await run_node("browser_ws.mjs", {
            "chromium": chromium, "flags": list(CHROMIUM_FLAGS),
            "page": f"{base}/foundry.html", "cases": cases}, packages=["playwright-core"])
    results: dict[str, Any] = run.result["results"]
    return results


def assert_relayed(seen: dict[str, Any], protocol: str) -> None:
    assert seen["opened"] and not seen["timeout"], seen
    assert seen["protocol"] == protocol
    assert seen["events"][:2] == ["session.created", "session.updated"], seen
    assert seen["close"]["code"] == 1000, seen


def assert_refused(seen: dict[str, Any]) -> None:
    assert seen["opened"], seen  # accepted, so the browser can read the reason
    assert seen["events"] == ["error"], seen
    assert seen["error"]["type"] == "gateway_error"
    assert seen["error"]["code"] == "invalid_token"
    assert seen["close"] == {"code": 4401, "reason": "invalid_token"}


async def test_foundry_bearer_subprotocol(gw: RunningGateway, emulator: Emulator,
                                          key_file: Path) -> None:
    token = mint(key_file)
    url = gw.url(FOUNDRY_PATH, model="gpt-realtime")
    results = await open_in_browser([
        {"name": "good", "url": url, "protocols": [f"Bearer-{token}"]},
        {"name": "bad", "url": url, "protocols": [f"Bearer-{token[:-4]}AAAA"]},
    ])
    # Chromium fails the handshake unless exactly the offered value is echoed.
    assert_relayed(results["good"], f"Bearer-{token}")
    assert_refused(results["bad"])
    sessions = emulator_sessions(emulator)
    assert len(sessions) == 1  # the refused socket never reached the upstream
    assert sessions[0]["auth"] == "bearer" and sessions[0]["subprotocols"] == []
    assert sessions[0]["client_events"] == {"session.update": 1}


async def test_insecure_api_key_subprotocol(gw: RunningGateway, emulator: Emulator,
                                            key_file: Path) -> None:
    url = gw.url("/v1/realtime", model="gpt-realtime")
    results = await open_in_browser([
        {"name": "good", "url": url,
         "protocols": ["realtime", f"openai-insecure-api-key.{mint(key_file)}"]},
        {"name": "bad", "url": url,
         "protocols": ["realtime", "openai-insecure-api-key.not-a-token"]},
    ])
    assert_relayed(results["good"], "realtime")
    assert_refused(results["bad"])
    assert len(emulator_sessions(emulator)) == 1
