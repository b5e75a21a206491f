"""The voice demo of ``realtime-gateway dev`` with its "WebRTC" switch on: headless Chromium
holds a real call (POST /v1/realtime/calls through the gateway to the emulator's peer
connection), shows both transcripts and hangs up on Stop.

All of it runs in a private network namespace (:mod:`tests.support.netns`) with
``dev --loopback-ice``, so ICE only ever touches loopback; :mod:`tests.sdk.demo_webrtc_rig`
is the part inside.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.sdk.helpers import CHROMIUM_FLAGS, REPO, chromium_or_skip, run_client
from tests.sdk.test_demo import fake_microphone_wav
from tests.support.netns import namespace_prefix_or_skip


async def test_voice_demo_webrtc_switch_holds_a_call(tmp_path: Path) -> None:
    pytest.importorskip("aiortc", reason="aiortc is not installed (the webrtc extra)")
    chromium = chromium_or_skip()
    wav = fake_microphone_wav(tmp_path)
    prefix = namespace_prefix_or_skip()
    flags = [*CHROMIUM_FLAGS, "--use-fake-ui-for-media-stream",
             "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
             "--autoplay-policy=no-user-gesture-required",
             "--allow-loopback-in-peer-connection",
             "--disable-features=WebRtcHideLocalIpsWithMdns"]
    run = await run_client(
        [*prefix, sys.executable, "-m", "tests.sdk.demo_webrtc_rig"],
        {"chromium": chromium, "flags": flags, "work_dir": str(tmp_path / "state"),
         "screenshot": str(tmp_path / "demo-webrtc.png")},
        env={"PYTHONPATH": str(REPO)}, within=150)
    report = run.result
    page, output = report["page"], report["output"]
    assert page["live"].startswith("live"), (page, run.stderr[-2000:])
    assert page["user"] and page["user"][0].startswith("[emulated transcript of")
    assert page["assistant"] and page["assistant"][0]
    assert page["errors"] == [] and page["consoleErrors"] == []
    assert "call rtc_" in page["log"] and page["closed"] == "call ended"
    assert "client_hangup" in output  # the Stop button's hang-up reached the gateway
    assert "a=ice-pwd" not in output and "v=0" not in output  # no SDP in any log line
    assert report["exit_code"] == 0
