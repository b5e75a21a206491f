"""examples/wav_client.py: any common recording in (resampled to PCM16 mono 24 kHz), the
spoken reply out as a 24 kHz WAV, through a real gateway to the emulator."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from examples.wav_client import SAMPLE_RATE, main, read_pcm16, write_pcm16
from gateway.emulator.server import Emulator
from tests.support.audio import tone_pcm16
from tests.support.emulator import emulator_sessions
from tests.support.gateway import RunningGateway, gateway_config, mint, run_gateway


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path) -> AsyncIterator[RunningGateway]:
    async with run_gateway(gateway_config(f"{emulator.url}/v1/realtime", key_file)) as running:
        yield running


def espeak_wav(path: Path, text: str = "What is the weather like in Paris today?") -> Path:
    """``text`` spoken by espeak-ng into the WAV it writes (22,050 Hz); skips without it."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng to write speech (apt-get install -y espeak-ng)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True,
                   timeout=30)
    return path


def dominant_hz(pcm16: bytes) -> float:
    """The strongest frequency of PCM16 mono 24 kHz audio, in Hz."""
    samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)[int(np.argmax(spectrum))])


async def test_an_espeak_wav_at_22050_hz_is_resampled_and_answered_at_24_khz(
        gw: RunningGateway, emulator: Emulator, key_file: Path, tmp_path: Path) -> None:
    question = espeak_wav(tmp_path / "question.wav")
    info = soundfile.info(str(question))
    assert (info.samplerate, info.channels) == (22_050, 1)
    reply = tmp_path / "reply.wav"
    args = ["--url", f"ws://127.0.0.1:{gw.port}/v1", "--token", mint(key_file),
            str(question), str(reply)]
    assert await asyncio.to_thread(main, args) == 0
    # the emulator got the resampled audio: 24 kHz worth of samples, exactly these bytes
    sent = emulator_sessions(emulator)[-1]
    expected_samples = info.frames * SAMPLE_RATE / info.samplerate
    assert abs(sent["audio_bytes"] / 2 - expected_samples) <= 2
    assert sent["audio_sha256"] == hashlib.sha256(read_pcm16(str(question))).hexdigest()
    written = soundfile.info(str(reply))
    assert (written.samplerate, written.channels, written.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    assert written.frames > SAMPLE_RATE // 2  # more than half a second of speech back


def test_pcm16_mono_24_khz_passes_through_sample_for_sample(tmp_path: Path) -> None:
    audio = tone_pcm16(500)
    write_pcm16(str(tmp_path / "tone.wav"), audio)
    assert read_pcm16(str(tmp_path / "tone.wav")) == audio


@pytest.mark.parametrize(("name", "rate", "channels", "subtype"), [
    ("stereo.flac", 44_100, 2, "PCM_24"),
    ("phone.wav", 8_000, 1, "ULAW"),
    ("float.wav", 48_000, 1, "FLOAT"),
    ("voice.ogg", 16_000, 1, "VORBIS"),
])
def test_other_rates_channels_and_formats_become_pcm16_mono_24_khz(
        tmp_path: Path, name: str, rate: int, channels: int, subtype: str) -> None:
    seconds, hz = 0.5, 440.0
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.25 * np.sin(2 * np.pi * hz * t)
    path = tmp_path / name
    soundfile.write(str(path), np.repeat(tone[:, None], channels, axis=1), rate, subtype=subtype)
    pcm = read_pcm16(str(path))
    assert abs(len(pcm) / 2 - seconds * SAMPLE_RATE) <= 2 + (SAMPLE_RATE // 50 if
                                                             subtype == "VORBIS" else 0)
    assert abs(dominant_hz(pcm) - hz) < 5  # the same pitch, so the rate was converted
    peak = np.abs(np.frombuffer(pcm, dtype="<i2")).max()
    assert 0.2 * 32768 < peak < 0.3 * 32768  # channels averaged, not summed


def test_an_unreadable_file_gets_the_sox_hint_and_a_missing_one_does_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.wav"
    bogus.write_text("not audio")
    args = ["--url", "ws://127.0.0.1:9/v1", "--token", "t"]
    assert main([*args, str(bogus), str(tmp_path / "out.wav")]) == 1
    error = capsys.readouterr().err
    assert f"{bogus}: cannot read this audio" in error
    assert f"sox {bogus} -r 24000 -c 1 -b 16 -e signed-integer" in error
    assert main([*args, str(tmp_path / "absent.wav"), str(tmp_path / "out.wav")]) == 1
    error = capsys.readouterr().err
    assert "No such file" in error and "sox" not in error
    assert not (tmp_path / "out.wav").exists()
