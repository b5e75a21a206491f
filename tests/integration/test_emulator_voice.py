"""The emulator's spoken replies (gateway.emulator.voice): espeak-ng speech when asked for,
the tone otherwise.

Transcribing the reply back is out of scope; the speech is checked to be speech-shaped:
its loudness and zero-crossing rate vary from 20 ms frame to frame (a tone's do not), it
has pauses, and it lasts as long as the words take to say.  Tests that synthesise skip
when espeak-ng or sox is missing.
"""

from __future__ import annotations

import array
import asyncio
import base64
import itertools
import json
import logging
import math
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway.emulator.server import Emulator
from gateway.emulator.tokens import output_audio_tokens, text_tokens
from gateway.emulator.voice import SPEECH_TOOLS, Voice

SENTENCE = "The quick brown fox jumps over the lazy dog"
FRAME_BYTES = 20 * 48
"""One 20 ms frame of PCM16 24 kHz, bytes."""
CHUNK_BYTES = 100 * 48
"""One ``response.output_audio.delta`` of PCM16 24 kHz (100 ms), bytes."""

JSON = dict[str, Any]


def speech_tools_or_skip() -> None:
    missing = [tool for tool in SPEECH_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"emulator speech needs {' and '.join(missing)} "
                    "(apt-get install -y espeak-ng sox)")


@dataclass(frozen=True)
class Shape:
    """Frame-to-frame statistics of PCM16 audio, 20 ms frames."""

    seconds: float
    loudness_variation: float
    """Coefficient of variation of the frames' RMS (0 for a steady tone)."""
    quiet_fraction: float
    """Frames quieter than 5 % of the loudest frame's RMS."""
    crossing_variation: float
    """Coefficient of variation of the frames' zero-crossing rates (0 for a tone)."""


def shape_of(pcm: bytes) -> Shape:
    samples = array.array("h", pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    size = FRAME_BYTES // 2
    rms: list[float] = []
    crossings: list[float] = []
    for start in range(0, len(samples) - size + 1, size):
        frame = samples[start : start + size]
        rms.append(math.sqrt(sum(s * s for s in frame) / size))
        crossings.append(sum((a < 0) != (b < 0) for a, b in itertools.pairwise(frame)) / size)
    assert rms, "no whole frame of audio"
    loudest = max(rms)

    def variation(values: list[float]) -> float:
        mean = statistics.fmean(values)
        return statistics.pstdev(values) / mean if mean else 0.0

    return Shape(
        seconds=len(samples) / 24_000,
        loudness_variation=variation(rms),
        quiet_fraction=sum(r < 0.05 * loudest for r in rms) / len(rms),
        crossing_variation=variation(crossings),
    )


async def ask(emu: Emulator, text: str, model: str = "gpt-realtime") -> ClientConnection:
    """Open a session on *emu*, add the user text *text* and ask for a response."""
    ws = await connect(f"{emu.url}/v1/realtime?model={model}",
                       additional_headers={"Authorization": "Bearer k"})
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create"}))
    return ws


async def receive_until(ws: ClientConnection, done: Callable[[list[JSON]], bool],
                        events: list[JSON]) -> list[JSON]:
    """Append server events to *events* until *done(events)*; at most 15 s."""
    async with asyncio.timeout(15):
        while not done(events):
            events.append(json.loads(await ws.recv()))
    return events


def answered(events: list[JSON]) -> bool:
    return bool(events) and events[-1]["type"] == "response.done"


async def spoken_reply(emu: Emulator, text: str) -> tuple[list[JSON], JSON]:
    """Ask *emu* to answer the user text *text*; return the response's events and the
    session record (its usage is counted before ``response.done`` is sent)."""
    async with await ask(emu, text) as ws:
        events = await receive_until(ws, answered, [])
    return events, emu.sessions()[-1].to_dict()


def audio_deltas(events: list[JSON]) -> list[bytes]:
    return [base64.b64decode(e["delta"]) for e in events
            if e["type"] == "response.output_audio.delta"]


async def test_speech_reply_is_speech_shaped_and_its_usage_follows_the_bytes_sent() -> None:
    speech_tools_or_skip()
    async with Emulator(speech=True) as emu, Emulator() as tone_emu:
        events, record = await spoken_reply(emu, SENTENCE)
        tone_events, _ = await spoken_reply(tone_emu, SENTENCE)
    chunks = audio_deltas(events)
    audio = b"".join(chunks)
    tone = b"".join(audio_deltas(tone_events))
    transcript = "".join(e["delta"] for e in events
                         if e["type"] == "response.output_audio_transcript.delta")
    assert transcript == f"You said: {SENTENCE}"
    assert audio != tone[: len(audio)]

    spoken, steady = shape_of(audio), shape_of(tone)
    assert steady.loudness_variation < 0.01 and steady.crossing_variation < 0.01, steady
    assert spoken.loudness_variation > 0.4, spoken
    assert spoken.crossing_variation > 0.3, spoken
    assert spoken.quiet_fraction > 0.05, spoken  # pauses between words and at the ends
    words = len(transcript.split())
    assert words / 5 <= spoken.seconds <= words / 1.5, (words, spoken)  # 90..300 words/min

    assert len(audio) % 2 == 0
    assert all(len(chunk) == CHUNK_BYTES for chunk in chunks[:-1])
    assert 0 < len(chunks[-1]) <= CHUNK_BYTES
    usage = events[-1]["response"]["usage"]
    assert usage["output_token_details"] == {
        "audio_tokens": output_audio_tokens(len(audio)), "text_tokens": text_tokens(transcript)}
    assert record["usage"]["output_audio"] == output_audio_tokens(len(audio))


async def test_cancelled_speech_counts_only_the_audio_sent() -> None:
    speech_tools_or_skip()
    async with Emulator(speech=True) as emu, await ask(
            emu, SENTENCE, "gpt-realtime,fault-slow") as ws:
        events = await receive_until(ws, lambda got: bool(audio_deltas(got)), [])
        await ws.send(json.dumps({"type": "response.cancel"}))
        await receive_until(ws, answered, events)
    sent = b"".join(audio_deltas(events))
    done = events[-1]["response"]
    assert done["status"] == "cancelled"
    voice = Voice(speech=True)
    whole = await voice.reply_audio(f"You said: {SENTENCE}", "audio/pcm")
    await voice.aclose()
    assert 0 < len(sent) < len(whole), "cut short"
    assert whole.startswith(sent)
    assert done["usage"]["output_token_details"]["audio_tokens"] == output_audio_tokens(len(sent))


async def test_speech_is_synthesised_once_per_text() -> None:
    speech_tools_or_skip()
    voice = Voice(speech=True)
    try:
        first, second = await asyncio.gather(voice.reply_audio(SENTENCE, "audio/pcm"),
                                             voice.reply_audio(SENTENCE, "audio/pcm"))
        later = await voice.reply_audio(SENTENCE, "audio/pcm")
        other = await voice.reply_audio("Hello there.", "audio/pcm")
    finally:
        await voice.aclose()
    assert first is second is later, "one synthesis, shared and then cached"
    assert other != first
    assert shape_of(first).seconds > shape_of(other).seconds


async def test_speech_too_slow_falls_back_to_the_tone(caplog: pytest.LogCaptureFixture) -> None:
    speech_tools_or_skip()
    voice, tone_voice = Voice(speech=True, timeout=1e-4), Voice()
    with caplog.at_level(logging.WARNING, logger="gateway.emulator.voice"):
        audio = await voice.reply_audio(SENTENCE, "audio/pcm")
    await voice.aclose()
    assert audio == await tone_voice.reply_audio(SENTENCE, "audio/pcm")
    assert len(audio) == len(SENTENCE) * 50 * 48  # the tone's 50 ms per character
    assert any("took more than" in r.getMessage() for r in caplog.records)
    assert all(SENTENCE not in r.getMessage() for r in caplog.records)


async def test_speech_without_the_tools_is_the_tone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no espeak-ng, no sox
    with caplog.at_level(logging.WARNING, logger="gateway.emulator.voice"):
        voice = Voice(speech=True)
    assert not voice.speaks
    assert "espeak-ng and sox" in caplog.text
    audio = await voice.reply_audio("Hi.", "audio/pcm")
    assert len(audio) == 200 * 48  # the tone's shortest reply
    assert shape_of(audio).loudness_variation < 0.01


async def test_g711_replies_stay_silence_with_speech_on() -> None:
    voice = Voice(speech=True)
    assert await voice.reply_audio("Hi there.", "audio/pcmu") == b"\xff" * (450 * 8)
    assert await voice.reply_audio("Hi there.", "audio/pcma") == b"\xd5" * (450 * 8)
