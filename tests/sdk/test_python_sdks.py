"""The Python SDKs, unchanged, through a real gateway to the emulator:

* openai-agents ``RealtimeRunner`` with ``model_config["url"]`` at the gateway (run in the
  separate ``.venv-agents``, since it pins ``websockets<17``);
* openai ``AsyncAzureOpenAI`` with ``azure_endpoint`` at the gateway: it dials the Azure
  preview shape ``/openai/realtime?api-version=…&deployment=…`` over ``wss://`` with an
  ``api-key`` header, and the gateway reaches an Azure GA upstream on
  ``/openai/v1/realtime?model=<deployment>`` with its own ``api-key``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openai import AsyncAzureOpenAI

from gateway.emulator.server import Emulator
from tests.sdk.helpers import SDK_DIR, agents_python_or_skip, make_test_ca, run_client
from tests.support.emulator import emulator_sessions
from tests.support.gateway import gateway_config, mint, run_gateway

AZURE_DEPLOYMENT = "my-realtime-deployment"
AZURE_API_VERSION = "2025-04-01-preview"


async def test_agents_python_realtime_runner(emulator: Emulator, key_file: Path) -> None:
    python = agents_python_or_skip()
    async with run_gateway(gateway_config(f"{emulator.url}/v1/realtime", key_file)) as gw:
        run = await run_client([str(python), str(SDK_DIR / "agents_python_client.py")],
                               {"url": gw.url(), "token": mint(key_file, sub="py-agent")})
    report = run.result
    assert report["transcripts"] == ["You said: Hello from agents-python",
                                     "The get_time function returned: noon"]
    assert report["tool_calls"] == ["What is the time? Use get_time."]
    assert report["audio_bytes"] > 24_000
    assert {"audio", "agent_end", "tool_start", "tool_end"} <= set(report["events"])
    record = emulator_sessions(emulator)[-1]
    assert record["auth"] == "bearer"
    assert record["user_agent"].startswith("Agents/Python")  # forwarded by the gateway
    assert record["usage"]["responses"] == 3


async def test_azure_openai_python_client_reaches_azure_upstream(
        emulator: Emulator, key_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ca = make_test_ca(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))  # trust the test CA, as a user would
    config = gateway_config(
        f"{emulator.url}/openai/v1/realtime", key_file, provider="azure",
        models={AZURE_DEPLOYMENT: {"upstream": "emulator"}},
        server={"tls_cert_file": str(ca.cert_file), "tls_key_file": str(ca.key_file)})
    async with run_gateway(config) as gw:
        client = AsyncAzureOpenAI(azure_endpoint=f"https://127.0.0.1:{gw.port}",
                                  api_key=mint(key_file), api_version=AZURE_API_VERSION)
        seen: list[str] = []
        transcript = ""
        async with client.realtime.connect(model=AZURE_DEPLOYMENT) as conn:
            await conn.session.update(session={"type": "realtime",
                                               "output_modalities": ["text"]})
            await conn.conversation.item.create(item={
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Hello Azure"}]})
            await conn.response.create()
            async with asyncio.timeout(15):
                async for event in conn:
                    seen.append(event.type)
                    if event.type == "response.output_text.done":
                        transcript = event.text
                    if event.type == "response.done":
                        break
        await client.close()
    assert seen[:2] == ["session.created", "session.updated"]
    assert transcript == "You said: Hello Azure"
    record = emulator_sessions(emulator)[-1]
    assert record["path"] == "/openai/v1/realtime"
    assert record["model"] == AZURE_DEPLOYMENT
    assert record["auth"] == "api-key"
    assert "api-version" not in record["query"] and "deployment" not in record["query"]
    assert record["user_agent"].startswith("AsyncAzureOpenAI/Python")
