"""Test audio in the Realtime API's default format: PCM16, 24 kHz, mono, little-endian.

Spoken sentences come from ``espeak-ng`` (text to WAV) and ``sox`` (resampling to
24 kHz PCM16 raw).  Both are optional tools: :func:`speech_pcm16` skips the calling
test with a clear reason when either is missing (``apt-get install espeak-ng sox``).
Results are cached per test session under pytest's base temporary directory, so a
sentence is synthesised once per run however many tests ask for it.

Units: durations are in milliseconds, sizes in bytes.  One millisecond of audio is
:data:`BYTES_PER_MS` (48) bytes.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import struct
import subprocess
from collections.abc import Iterator

import pytest

SAMPLE_RATE = 24_000
"""Samples per second of Realtime ``audio/pcm`` audio."""

BYTES_PER_MS = SAMPLE_RATE * 2 // 1000
"""Bytes per millisecond of PCM16 mono at 24 kHz (48)."""

DEFAULT_SENTENCE = "The quick brown fox jumps over the lazy dog."
"""A short sentence (about 2.8 s when spoken by espeak-ng's default voice)."""

_SYNTH_TIMEOUT_SECONDS = 30.0


def missing_audio_tools() -> list[str]:
    """Return the names of the audio tools (``espeak-ng``, ``sox``) not found on PATH."""
    return [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]


def speech_pcm16(
    tmp_path_factory: pytest.TempPathFactory, text: str = DEFAULT_SENTENCE
) -> bytes:
    """Return *text* spoken by espeak-ng as PCM16 24 kHz mono little-endian bytes.

    The audio is cached in ``<pytest base temp>/speech-audio/`` keyed by the SHA-256
    of *text*, so every test of one session shares it.  Calls ``pytest.skip`` (the
    test is skipped, not failed) when ``espeak-ng`` or ``sox`` is not installed.

    Raises:
        subprocess.CalledProcessError: a tool failed (bad install, disk full).
    """
    missing = missing_audio_tools()
    if missing:
        pytest.skip(
            f"speech synthesis needs {' and '.join(missing)} "
            "(apt-get install -y espeak-ng sox)"
        )
    cache_dir = tmp_path_factory.getbasetemp() / "speech-audio"
    cache_dir.mkdir(exist_ok=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    raw = cache_dir / f"{key}.raw"
    if raw.exists():
        return raw.read_bytes()
    wav = cache_dir / f"{key}.wav"
    tmp_raw = cache_dir / f"{key}.raw.part"
    subprocess.run(
        ["espeak-ng", "-w", str(wav), text],
        check=True,
        capture_output=True,
        timeout=_SYNTH_TIMEOUT_SECONDS,
    )
    subprocess.run(
        [
            "sox", str(wav),
            "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer", "-L",
            "-t", "raw", str(tmp_raw),
        ],
        check=True,
        capture_output=True,
        timeout=_SYNTH_TIMEOUT_SECONDS,
    )
    tmp_raw.replace(raw)
    return raw.read_bytes()


def silence_pcm16(ms: int) -> bytes:
    """Return *ms* milliseconds of digital silence (all-zero PCM16 24 kHz mono)."""
    return bytes(ms * BYTES_PER_MS)


def tone_pcm16(ms: int, frequency_hz: float = 440.0, amplitude: int = 8000) -> bytes:
    """Return a sine tone of *ms* milliseconds as PCM16 24 kHz mono little-endian.

    *amplitude* is the peak sample value (0..32767); the default is loud enough for
    the emulator's energy VAD (RMS ≈ 5657).
    """
    count = ms * SAMPLE_RATE // 1000
    step = 2 * math.pi * frequency_hz / SAMPLE_RATE
    samples = [round(amplitude * math.sin(step * n)) for n in range(count)]
    return struct.pack(f"<{count}h", *samples)


def chunks(pcm: bytes, ms: int = 20) -> Iterator[bytes]:
    """Split *pcm* into consecutive pieces of *ms* milliseconds (the last may be shorter)."""
    size = ms * BYTES_PER_MS
    for start in range(0, len(pcm), size):
        yield pcm[start : start + size]


def duration_ms(pcm: bytes) -> float:
    """Return the duration of PCM16 24 kHz mono *pcm* in milliseconds."""
    return len(pcm) / BYTES_PER_MS
