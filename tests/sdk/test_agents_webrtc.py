"""@openai/agents ``RealtimeSession`` over ``OpenAIRealtimeWebRTC`` (the SDK's default browser
transport) in headless Chromium, through the gateway's ``/v1/realtime/calls`` to the
emulator's real WebRTC call, with a gateway ``ek_`` as the key.

Everything runs in a private network namespace (``unshare -n``, only ``lo`` up) made for the
test, so ICE can only ever touch loopback (Chromium with ``--allow-loopback-in-peer-connection``,
the emulator with loopback-only candidates); :mod:`tests.sdk.webrtc_call_rig` is the part
inside it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.sdk.helpers import CHROMIUM_FLAGS, REPO, chromium_or_skip, run_client
from tests.support.audio import missing_audio_tools
from tests.support.netns import namespace_prefix_or_skip

QUESTION = "Hello gateway. What is the weather like today?"


@pytest.fixture
def question_wav(tmp_path: Path) -> Path:
    """The spoken question (espeak-ng) and 2 s of silence: Chromium loops the file, and the
    silence ends the user's turn for the emulator's VAD."""
    if missing_audio_tools():
        pytest.skip("needs espeak-ng and sox for the spoken question "
                    "(apt-get install espeak-ng sox)")
    spoken, wav = tmp_path / "spoken.wav", tmp_path / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), QUESTION], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["sox", str(spoken), str(wav), "pad", "0", "2"], check=True,
                   capture_output=True, timeout=30)
    return wav


async def test_agents_webrtc_call_through_gateway_in_chromium(tmp_path: Path,
                                                              question_wav: Path) -> None:
    pytest.importorskip("aiortc", reason="aiortc is not installed (the webrtc extra)")
    chromium = chromium_or_skip()
    prefix = namespace_prefix_or_skip()
    wav = question_wav
    flags = [*CHROMIUM_FLAGS, "--use-fake-ui-for-media-stream",
             "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
             "--allow-loopback-in-peer-connection",
             "--disable-features=WebRtcHideLocalIpsWithMdns"]
    run = await run_client(
        [*prefix, sys.executable, "-m", "tests.sdk.webrtc_call_rig"],
        {"chromium": chromium, "flags": flags, "work_dir": str(tmp_path / "rig")},
        env={"PYTHONPATH": str(REPO)}, within=150)
    report = run.result
    call = report["call"]
    assert "failed" not in call, (call, report["consoleErrors"], run.stderr[-3000:])
    assert call["callId"].startswith("rtc_")  # Location was exposed to the page (CORS)
    assert call["heard"]  # the spoken question reached the emulator over the audio track
    assert {"session.created", "session.updated", "response.done"} <= set(call["types"])
    assert call["transcript"]
    assert call["usage"]["total_tokens"] > 0
    [record] = report["records"]
    assert record["transport"] == "webrtc" and record["auth"] == "bearer"
    assert record["audio_bytes"] > 0 and record["sidebands"] == 1
    # The page's session.close() ends the call (the upstream closes the sideband) unless the
    # owner's hang-up through the gateway gets there first.
    assert report["hangup_status"] in (200, 404) and report["live_after"] == 0
    assert report["gateway_tokens"] == report["emulator_tokens"] > 0
