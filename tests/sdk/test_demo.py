"""The voice demo page of ``realtime-gateway dev``, in headless Chromium with a fake
microphone that plays an espeak-ng sentence: the emulator behind the dev gateway hears
speech (energy VAD) and answers, the page shows both transcripts, and a screenshot is kept
(pytest's tmp dir and ``test-artifacts/demo.png``; ``demo-error.png`` shows a refused
token)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sdk.helpers import (
    ARTIFACTS,
    CHROMIUM_FLAGS,
    chromium_or_skip,
    free_port,
    run_node,
)
from tests.support.audio import missing_audio_tools

SENTENCE = "Hello gateway. Please tell me what the weather is like today."
STARTUP_SECONDS = 30.0


@dataclass
class DevServer:
    port: int
    emulator_http: str
    output: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def read_until(process: asyncio.subprocess.Process, pattern: str, seen: list[str],
                     within: float = STARTUP_SECONDS) -> re.Match[str]:
    """Read the process's output into ``seen`` until ``pattern`` matches the whole of it."""
    assert process.stdout is not None
    async with asyncio.timeout(within):
        async for raw in process.stdout:
            seen.append(raw.decode(errors="replace"))
            match = re.search(pattern, "".join(seen), re.MULTILINE)
            if match:
                return match
    raise AssertionError(f"{pattern!r} not printed:\n{''.join(seen)}")


@contextlib.asynccontextmanager
async def dev_server(state_dir: Path) -> AsyncIterator[DevServer]:
    """``realtime-gateway dev`` on a free port with its built-in emulator (no OpenAI key)."""
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(state_dir), "OPENAI_API_KEY": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "dev", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    seen: list[str] = []
    try:
        emulator = await read_until(process, r"built-in emulator \(ws://(127\.0\.0\.1:\d+)\)",
                                    seen)
        await read_until(process, r"^Voice demo.*http://127\.0\.0\.1:\d+/$", seen)
        await read_until(process, r"gateway\.listening", seen)
        yield DevServer(port, f"http://{emulator.group(1)}", "".join(seen))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


def fake_microphone_wav(directory: Path) -> Path:
    """espeak-ng speech with 0.5 s of silence before and 3 s after, as 48 kHz mono PCM16
    WAV for Chromium's fake capture device (which loops it): the emulator's VAD ends the
    turn, and the reply plays out before the loop speaks again."""
    missing = missing_audio_tools()
    if missing:
        pytest.skip(f"the fake microphone needs {' and '.join(missing)} "
                    "(apt-get install -y espeak-ng sox)")
    speech, wav = directory / "speech.wav", directory / "fake-mic.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), SENTENCE], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["sox", str(speech), "-r", "48000", "-c", "1", "-b", "16", str(wav),
                    "pad", "0.5", "3.0"], check=True, capture_output=True, timeout=30)
    return wav


async def test_token_endpoint_is_loopback_only(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "state") as dev, httpx.AsyncClient() as client:
        page = await client.get(f"{dev.base}/")
        assert page.status_code == 200 and "voice demo" in page.text
        assert (await client.get(f"{dev.base}/static/audio-worklets.js")).status_code == 200
        good = await client.get(f"{dev.base}/_dev/token")
        assert good.status_code == 200 and good.headers["cache-control"] == "no-store"
        grant = good.json()
        assert grant["path"] == "/language-model-service/ws/v1/open-ai/realtime"
        assert grant["model"] == "gpt-realtime" and grant["expires_in"] > 0
        assert grant["token"].count(".") == 2
        rebound = await client.get(f"{dev.base}/_dev/token",
                                   headers={"Host": f"attacker.example:{dev.port}"})
        cross_site = await client.get(f"{dev.base}/_dev/token",
                                      headers={"Origin": "http://attacker.example"})
        minted = await client.get(f"{dev.base}/_dev/secret")  # the seed flow's backend
        assert minted.status_code == 200 and minted.headers["cache-control"] == "no-store"
        secret = minted.json()
        assert secret["value"].startswith("ek_") and secret["path"] == "/v1/realtime"
        assert secret["expires_at"] > 0 and secret["model"] == "gpt-realtime"
        foreign = await client.get(f"{dev.base}/_dev/secret",
                                   headers={"Origin": "http://attacker.example"})
    for refused in (rebound, cross_site, foreign):
        assert refused.status_code == 403
        assert "token" not in refused.json() and "value" not in refused.json()


async def test_voice_demo_in_chromium_with_fake_microphone(
        tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    wav = fake_microphone_wav(tmp_path)
    screenshot = tmp_path / "demo.png"
    flags = [*CHROMIUM_FLAGS, "--use-fake-ui-for-media-stream",
             "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
             "--autoplay-policy=no-user-gesture-required"]
    async with dev_server(tmp_path / "state") as dev:
        run = await run_node("demo_page.mjs", {
            "chromium": chromium, "flags": flags, "url": f"{dev.base}/",
            "screenshot": str(screenshot), "errorScreenshot": str(tmp_path / "demo-error.png"),
        }, packages=["playwright-core"], within=90)
        async with httpx.AsyncClient() as client:
            records: list[dict[str, Any]] = (
                await client.get(f"{dev.emulator_http}/_emulator/sessions")).json()["sessions"]
    report = run.result
    assert screenshot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(screenshot, ARTIFACTS / "demo.png")
    shutil.copyfile(tmp_path / "demo-error.png", ARTIFACTS / "demo-error.png")

    assert report["live"] == "live — speak"
    assert report["errors"] == [] and report["consoleErrors"] == [], report
    assert any(re.fullmatch(r"\[emulated transcript of \d+ ms of audio\]", text)
               for text in report["user"]), report["user"]
    assert any(re.fullmatch(r"I heard \d+(\.\d+)? seconds of audio\.", text)
               for text in report["assistant"]), report["assistant"]
    played = [int(ms) for ms in re.findall(r"reply played: (\d+) ms", report["log"])]
    assert played and max(played) >= 1400, report["log"]  # the 1.5 s reply, in one stretch
    assert report["closed"] == "closed: 1000 user stopped" and report["startEnabled"]

    # a refused secret is shown on the page: the gateway's error event and the close code
    assert report["refused"]["status"] == "closed: 4401 invalid_token"
    assert report["refused"]["errors"][0].startswith("invalid_token: ")
    assert report["refused"]["errors"][-1] == "connection closed: 4401 invalid_token"

    assert len(records) == 1  # the refused session never reached the upstream
    record = records[0]
    assert record["path"] == "/v1/realtime" and record["model"] == "gpt-realtime"
    assert record["audio_bytes"] > 48_000  # more than a second of microphone audio
    assert record["client_events"]["input_audio_buffer.append"] > 25
    # the secret's session template went first, then the page's own session.update
    assert record["client_events"]["session.update"] == 2
    events = record["server_events"]
    assert events["input_audio_buffer.speech_started"] >= 1  # energy VAD heard speech
    assert events["conversation.item.input_audio_transcription.completed"] >= 1
    assert events["response.done"] >= 1 and record["usage"]["input_audio"] > 0
