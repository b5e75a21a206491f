"""Stream a recording of speech through realtime-gateway and save the spoken reply.

Usage::

    python examples/wav_client.py --url ws://127.0.0.1:8080/v1 --token "$TOKEN" \
        question.wav reply.wav

The input may be any WAV (PCM 8/16/24/32-bit, float, A-law, mu-law; any sample rate,
mono or more channels: ``espeak-ng -w question.wav "..."`` writes 22,050 Hz) or another
format libsndfile reads (FLAC, Ogg Vorbis/Opus, MP3, AIFF, ...).  It is read with
`soundfile <https://python-soundfile.readthedocs.io>`_, mixed down to mono and resampled
with `soxr <https://python-soxr.readthedocs.io>`_ to the Realtime API's ``audio/pcm``
format: PCM16 little-endian, 24 kHz, mono.  Both come with the ``dev`` extra
(``pip install -e '.[dev]'``).  The audio is appended in 20 ms chunks like a live
microphone, committed, and a response requested; the reply's audio is written to
``reply.wav`` (PCM16 mono 24 kHz WAV) and its transcript printed.  Uses the official
``openai`` SDK exactly as against OpenAI: only the base URL and the token differ.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import shlex
import sys
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
import soundfile
import soxr
from openai import AsyncOpenAI

SAMPLE_RATE: Final = 24_000
"""Samples per second of the Realtime API's ``audio/pcm`` format."""

CHUNK_BYTES = SAMPLE_RATE * 2 // 50  # 20 ms of PCM16 mono

SOX_HINT: Final = "sox {path} -r 24000 -c 1 -b 16 -e signed-integer question.wav"
"""How to convert a file libsndfile cannot read (sox has more decoders)."""


@dataclass
class Reply:
    """The reply: PCM16 24 kHz mono audio, its transcript, the usage of ``response.done``."""

    audio: bytearray = field(default_factory=bytearray)
    transcript: str = ""
    usage: dict[str, object] = field(default_factory=dict)


def read_pcm16(path: str) -> bytes:
    """The audio of ``path`` as PCM16 little-endian mono 24 kHz bytes (2 bytes a sample).

    Any format libsndfile reads is accepted; channels are averaged and other sample
    rates resampled (libsoxr, high quality).  A PCM16 mono 24 kHz file comes back
    sample for sample.

    Raises:
        OSError: the file cannot be opened.
        ValueError: libsndfile does not know the format (or the file is damaged); the
            message names the sox command that converts it.
    """
    samples: npt.NDArray[np.float32]  # (frames, channels)
    rate: int
    with open(path, "rb") as file:
        try:
            samples, rate = soundfile.read(file, dtype="float32", always_2d=True)
        except soundfile.SoundFileError as exc:
            reason = getattr(exc, "error_string", str(exc))  # libsndfile's own words
            raise ValueError(f"{path}: cannot read this audio ({reason}); convert it with "
                             + SOX_HINT.format(path=shlex.quote(path))) from None
    mono: npt.NDArray[np.float32] = (samples.mean(axis=1, dtype=np.float32)
                                     if samples.shape[1] > 1 else samples[:, 0])
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    # libsndfile scales PCM16 by 1/32768 when reading floats: the inverse is exact.
    pcm: npt.NDArray[np.int16] = np.clip(np.rint(mono * 32768.0), -32768, 32767).astype("<i2")
    return pcm.tobytes()


def write_pcm16(path: str, audio: bytes) -> None:
    """Write PCM16 mono 24 kHz ``audio`` as a WAV file."""
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(audio)


async def converse(url: str, token: str, model: str, audio: bytes) -> Reply:
    """Send ``audio`` (PCM16 24 kHz mono) as one user turn and collect the reply."""
    client = AsyncOpenAI(api_key=token, websocket_base_url=url)
    reply = Reply()
    async with client.realtime.connect(model=model) as connection:
        await connection.session.update(session={
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                                "turn_detection": None}},
        })
        for start in range(0, len(audio), CHUNK_BYTES):
            chunk = audio[start:start + CHUNK_BYTES]
            await connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
        await connection.input_audio_buffer.commit()
        await connection.response.create()
        async for event in connection:
            if event.type == "response.output_audio.delta":
                reply.audio += base64.b64decode(event.delta)
            elif event.type == "response.output_audio_transcript.delta":
                reply.transcript += event.delta
            elif event.type == "error":
                raise RuntimeError(f"{event.error.code}: {event.error.message}")
            elif event.type == "response.done":
                usage = event.response.usage
                reply.usage = usage.model_dump() if usage is not None else {}
                break
    return reply


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="gateway base URL, e.g. ws://host:8080/v1")
    parser.add_argument("--token", required=True, help="your access token")
    parser.add_argument("--model", default="gpt-realtime")
    parser.add_argument("input", help="speech: a WAV (any rate, channels) or FLAC/Ogg/MP3...")
    parser.add_argument("output", help="where to write the spoken reply (WAV)")
    args = parser.parse_args(argv)
    try:
        question = read_pcm16(args.input)
    except (OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    reply = asyncio.run(converse(args.url, args.token, args.model, question))
    write_pcm16(args.output, bytes(reply.audio))
    print(f"assistant: {reply.transcript}")
    print(f"reply: {len(reply.audio) / (2 * SAMPLE_RATE):.2f} s of audio in {args.output}; "
          f"usage: {reply.usage}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
