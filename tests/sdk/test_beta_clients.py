"""Beta-protocol SDKs, unchanged, through a real gateway to the GA emulator (CONTRACT §10):

* Azure's ``rt-client`` 0.5.1 (the library of Azure's realtime audio sample) in Azure mode,
  ``new LowLevelRTClient(new URL(gateway), {key: token}, {deployment})``: in Node (the key in
  an ``api-key`` header) and its browser build in headless Chromium (the key in the query,
  ``/openai/realtime?api-version=2024-10-01-preview&…&api-key=<token>``);
* openai-node's beta ``OpenAIRealtimeWS`` (``OpenAI-Beta: realtime=v1``) over ``wss://``.

Each speaks beta and must see beta events only (rt-client throws on a type it does not know);
the emulator must see GA (it refuses ``OpenAI-Beta`` and a ``session.update`` without
``session.type``), the gateway's key, no credential, ``api-version`` or request id in the
query, and the appended speech byte-exact.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.emulator.server import Emulator
from tests.sdk.helpers import (
    CHROMIUM_FLAGS,
    SDK_DIR,
    chromium_or_skip,
    make_test_ca,
    run_node,
    serve_directory,
)
from tests.support.audio import speech_pcm16
from tests.support.emulator import emulator_sessions
from tests.support.gateway import MODEL, RunningGateway, gateway_config, mint, run_gateway

GA_ONLY_NAMES = ("response.output_audio", "response.output_text", "conversation.item.added",
                 "conversation.item.done")
NEVER_FORWARDED = {"api-key", "authorization", "api-version", "x-ms-client-request-id",
                   "deployment"}


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path) -> AsyncIterator[RunningGateway]:
    async with run_gateway(gateway_config(f"{emulator.url}/v1/realtime", key_file)) as running:
        yield running


@pytest.fixture
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return speech_pcm16(tmp_path_factory, "What is the weather like today")


def assert_beta_conversation(report: dict[str, Any]) -> None:
    assert report["error"] is None, report
    events: list[str] = report["events"]
    assert not [e for e in events if e.startswith(GA_ONLY_NAMES)], events
    assert {"session.created", "session.updated", "input_audio_buffer.committed",
            "response.audio.delta", "response.audio_transcript.delta"} <= set(events), events
    assert events[-1] == "response.done"
    assert report["audioBytes"] > 24_000
    assert report["transcript"].startswith("I heard")
    assert report["usage"]["total_tokens"] > 0
    assert report["usage"]["output_token_details"]["audio_tokens"] > 0


def assert_ga_upstream(emulator: Emulator, speech: bytes) -> None:
    (record,) = emulator_sessions(emulator)
    assert record["path"] == "/v1/realtime" and record["model"] == MODEL
    assert record["auth"] == "bearer"  # the gateway's key
    assert record["openai_beta"] is None
    assert not NEVER_FORWARDED & {k.lower() for k in record["query"]}, record["query"]
    assert record["client_events"]["session.update"] == 1  # accepted: GA session.type realtime
    assert record["audio_sha256"] == hashlib.sha256(speech).hexdigest()
    assert record["invalid_frames"] == 0


async def test_rt_client_in_node(gw: RunningGateway, emulator: Emulator, key_file: Path,
                                 speech: bytes) -> None:
    run = await run_node("rt_client.mjs", {
        "endpoint": f"http://127.0.0.1:{gw.port}", "token": mint(key_file),
        "deployment": MODEL, "audio": base64.b64encode(speech).decode()},
        packages=["rt-client"])
    assert_beta_conversation(run.result)
    assert_ga_upstream(emulator, speech)


async def test_rt_client_browser_build_in_chromium(gw: RunningGateway, emulator: Emulator,
                                                   key_file: Path, speech: bytes) -> None:
    chromium = chromium_or_skip()
    node_packages = ["rt-client", "playwright-core"]
    with serve_directory(SDK_DIR) as base:
        run = await run_node("rt_client.mjs", {
            "endpoint": f"http://127.0.0.1:{gw.port}", "token": mint(key_file),
            "deployment": MODEL, "audio": base64.b64encode(speech).decode(),
            "chromium": chromium, "flags": list(CHROMIUM_FLAGS),
            "page": f"{base}/pages/rt-client.html"}, packages=node_packages)
    assert_beta_conversation(run.result)
    assert_ga_upstream(emulator, speech)
    assert run.result["userAgent"].startswith("Mozilla/")  # it ran in the browser


async def test_rt_client_browser_build_reads_a_refusal(gw: RunningGateway, emulator: Emulator,
                                                       key_file: Path) -> None:
    """A bad token in the query: accepted, one ``error`` event rt-client hands to the app
    (a browser cannot read an HTTP status), then the close; the upstream is never dialled."""
    chromium = chromium_or_skip()
    token = mint(key_file)
    with serve_directory(SDK_DIR) as base:
        run = await run_node("rt_client.mjs", {
            "endpoint": f"http://127.0.0.1:{gw.port}", "token": token[:-4] + "AAAA",
            "deployment": MODEL, "audio": "", "chromium": chromium,
            "flags": list(CHROMIUM_FLAGS), "page": f"{base}/pages/rt-client.html"},
            packages=["rt-client", "playwright-core"])
    report = run.result
    assert report["events"] == ["error"], report
    assert report["error"]["code"] == "invalid_token"
    assert emulator_sessions(emulator) == []


async def test_openai_node_beta_realtime_ws_over_tls(emulator: Emulator, key_file: Path,
                                                     tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "tls")
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, server={
        "tls_cert_file": str(ca.cert_file), "tls_key_file": str(ca.key_file)})
    async with run_gateway(config) as gw:
        run = await run_node("openai_beta_ws.mjs", {
            "baseURL": f"https://127.0.0.1:{gw.port}/v1", "token": mint(key_file)},
            packages=["openai", "ws"], env={"NODE_EXTRA_CA_CERTS": str(ca.ca_file)})
    report = run.result
    events: list[str] = report["events"]
    assert events[:2] == ["session.created", "session.updated"]
    assert events[-1] == "response.done" and "error" not in events
    assert not [e for e in events if e.startswith(GA_ONLY_NAMES)], events
    assert report["transcript"] == "You said: Hello beta over TLS"
    assert report["audioBytes"] > 24_000
    assert report["usage"]["total_tokens"] > 0
    assert report["closeCode"] == 1000
    (record,) = emulator_sessions(emulator)
    assert record["openai_beta"] is None and record["auth"] == "bearer"
