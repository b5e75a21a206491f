"""The seeds' client-secret flow with real clients (CONTRACT §8): a backend mints the
secret with the openai SDK (Python or Node), a browser holds only the ``ek_`` — the seeds'
raw socket with real speech, and ``@openai/agents`` over its WebSocket transport without
``useInsecureApiKey`` — and the emulator sees the gateway's key and the audio byte-exact."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from gateway.emulator.server import Emulator
from tests.sdk.helpers import CHROMIUM_FLAGS, SDK_DIR, chromium_or_skip, run_node, serve_directory
from tests.support.audio import speech_pcm16
from tests.support.emulator import emulator_sessions
from tests.support.gateway import (
    MODEL,
    SECRET_KEY,
    RunningGateway,
    gateway_config,
    mint,
    run_gateway,
)

AGENTS_BUNDLE = "/node_modules/@openai/agents-realtime/dist/bundle/openai-realtime-agents.mjs"


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path) -> AsyncIterator[RunningGateway]:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, secret_keys=SECRET_KEY)
    async with run_gateway(config) as running:
        yield running


async def in_browser(fn: str, arg: dict[str, Any]) -> Any:
    chromium = chromium_or_skip()
    if not (SDK_DIR / AGENTS_BUNDLE.lstrip("/")).exists():
        pytest.skip("@openai/agents is not installed in tests/sdk (run scripts/bootstrap-sdk)")
    with serve_directory(SDK_DIR) as base:
        run = await run_node("browser_call.mjs", {
            "chromium": chromium, "flags": list(CHROMIUM_FLAGS),
            "page": f"{base}/pages/secret_client.html", "fn": fn,
            "arg": {**arg, "bundle": f"{base}{AGENTS_BUNDLE}"}}, packages=["playwright-core"],
            within=60)
    assert run.result["consoleErrors"] == [], run.result
    return run.result["result"]


async def test_node_sdk_mints_and_the_seed_browser_socket_streams_speech(
        gw: RunningGateway, emulator: Emulator, key_file: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    minted = await run_node("openai_secrets.mjs", {
        "baseURL": f"{gw.http}/v1", "token": mint(key_file)}, packages=["openai"])
    secret = minted.result
    assert secret["value"].startswith("ek_")
    assert time.time() + 290 < secret["expires_at"] <= time.time() + 300
    audio = speech_pcm16(tmp_path_factory)
    chunks = [base64.b64encode(audio[i:i + 4800]).decode() for i in range(0, len(audio), 4800)]
    seen = await in_browser("seedSession", {
        "url": gw.url("/v1/realtime", model=MODEL), "secret": secret["value"],
        "chunks": chunks})
    assert seen["protocol"] == "realtime" and not seen["timeout"], seen
    assert seen["error"] is None, seen
    assert seen["events"][0] == "session.created"
    assert "response.output_audio.delta" in seen["events"]
    assert seen["audioBytes"] > 24_000 and seen["transcript"], seen  # a spoken reply
    assert seen["usage"]["total_tokens"] > 0
    assert seen["close"]["code"] == 1000
    record = emulator_sessions(emulator)[-1]
    assert record["auth"] == "bearer"  # the emulator accepts only the gateway's key
    assert record["audio_sha256"] == hashlib.sha256(audio).hexdigest()
    assert record["audio_bytes"] == len(audio)


async def test_python_sdk_mints_for_the_agents_sdk_in_a_browser(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    async with AsyncOpenAI(api_key=mint(key_file), base_url=f"{gw.http}/v1") as backend:
        secret = await backend.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 300},
            session={"type": "realtime", "model": MODEL, "instructions": "Be brief."})
    result = await in_browser("agentsSession", {
        "url": gw.url("/v1/realtime", model=MODEL), "secret": secret.value})
    assert result["ok"], result
    assert result["model"] == MODEL
    assert result["transcript"] and result["audioBytes"] > 0
    assert result["usage"]["total_tokens"] > 0
    record = emulator_sessions(emulator)[-1]
    assert record["auth"] == "bearer"
    assert record["client_events"].get("session.update", 0) >= 2  # template, then the SDK's
