"""The Node SDKs, unchanged, through a real gateway to the emulator:

* ``@openai/agents`` — a ``RealtimeSession`` over ``OpenAIRealtimeWebSocket`` whose
  ``createWebSocket`` offers the ``Bearer-<token>`` subprotocol (Node ``ws``), with a
  function tool that round-trips;
* ``openai`` — ``OpenAIRealtimeWS`` with ``baseURL`` at the gateway, which only dials
  ``wss://``, so the gateway serves TLS with a certificate from a test CA.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.emulator.server import Emulator
from tests.sdk.helpers import make_test_ca, run_node
from tests.support.emulator import emulator_sessions
from tests.support.gateway import gateway_config, mint, run_gateway

FOUNDRY_PATH = "/language-model-service/ws/v1/open-ai/realtime"


async def test_agents_realtime_session_with_bearer_subprotocol(emulator: Emulator,
                                                               key_file: Path) -> None:
    async with run_gateway(gateway_config(f"{emulator.url}/v1/realtime", key_file)) as gw:
        token = mint(key_file, sub="agent-user")
        run = await run_node("agents_session.mjs", {
            "url": gw.url(FOUNDRY_PATH, model="gpt-realtime"), "token": token,
        }, packages=["@openai/agents", "ws", "zod"])
    report = run.result
    assert report["protocol"] == f"Bearer-{token}"
    assert report["firstEvents"] == ["session.created", "session.updated"]
    assert report["sessionModel"] == "gpt-realtime"
    assert "get_weather" in report["updatedTools"]
    # sendMessage → spoken reply: audio events and its transcript
    assert report["turn1"]["transcript"] == "You said: Hello from the agents SDK"
    assert report["turn1"]["audioBytes"] > 24_000  # more than 0.5 s of PCM16 24 kHz
    # the emulator calls the named tool; the agent runs it and the result is spoken
    tool = report["tool"]
    assert tool["name"] == "get_weather"
    assert tool["arguments"] == {"city": "Please call get_weather for Paris"}
    assert tool["calls"] == ["Please call get_weather for Paris"]
    assert tool["ends"] == [{"name": "get_weather", "result": "sunny, 21 degrees"}]
    assert tool["transcript"] == "The get_weather function returned: sunny, 21 degrees"
    record = emulator_sessions(emulator)[-1]
    assert record["auth"] == "bearer" and record["subprotocols"] == []
    assert record["client_events"]["conversation.item.create"] >= 3  # 2 messages + tool output
    assert record["server_events"]["response.function_call_arguments.done"] == 1
    assert record["usage"]["responses"] == 3


async def test_openai_node_realtime_ws_over_tls(emulator: Emulator, key_file: Path,
                                                tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "tls")
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, server={
        "tls_cert_file": str(ca.cert_file), "tls_key_file": str(ca.key_file)})
    async with run_gateway(config) as gw:
        run = await run_node("openai_ws.mjs", {
            "baseURL": f"https://127.0.0.1:{gw.port}/v1", "token": mint(key_file),
            "badToken": "not-a-token",
        }, packages=["openai", "ws"], env={"NODE_EXTRA_CA_CERTS": str(ca.ca_file)})
    report = run.result
    assert report["url"] == f"wss://127.0.0.1:{gw.port}/v1/realtime?model=gpt-realtime"
    assert report["events"][:2] == ["session.created", "session.updated"]
    assert report["events"][-1] == "response.done"
    assert report["transcript"] == "You said: Hello over TLS"
    assert report["audioBytes"] > 24_000
    assert report["usage"]["total_tokens"] > 0
    assert report["closeCode"] == 1000
    bad = report["badToken"]
    assert not bad["opened"]
    assert any("401" in message for message in bad["errors"]), bad
    sessions = emulator_sessions(emulator)
    assert len(sessions) == 1 and sessions[0]["auth"] == "bearer"


async def test_missing_npm_package_skips_with_a_reason() -> None:
    with pytest.raises(pytest.skip.Exception, match=r"not-installed-package .*bootstrap-sdk"):
        await run_node("agents_session.mjs", {}, packages=["not-installed-package"])
