"""Stream a WAV file of speech through realtime-gateway and save the spoken reply.

Usage::

    python examples/wav_client.py --url ws://127.0.0.1:8080/v1 --token "$TOKEN" \
        question.wav reply.wav

The input must be PCM16 mono at 24 kHz (convert with
``sox in.wav -r 24000 -c 1 -b 16 -e signed-integer question.wav``).  The audio
is appended in 20 ms chunks like a live microphone, committed, and a response
requested; the reply's audio is written to ``reply.wav`` (same format) and its
transcript printed.  Uses the official ``openai`` SDK exactly as against OpenAI:
only the base URL and the token differ.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from openai import AsyncOpenAI

SAMPLE_RATE: Final = 24_000
CHUNK_BYTES = SAMPLE_RATE * 2 // 50  # 20 ms of PCM16 mono


@dataclass
class Reply:
    """The reply: PCM16 24 kHz mono audio, its transcript, the usage of ``response.done``."""

    audio: bytearray = field(default_factory=bytearray)
    transcript: str = ""
    usage: dict[str, object] = field(default_factory=dict)


def read_pcm16(path: str) -> bytes:
    """The frames of a PCM16 mono 24 kHz WAV file.  Raises ``ValueError`` for other formats."""
    with wave.open(path, "rb") as wav:
        if (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) != (1, 2, SAMPLE_RATE):
            raise ValueError(f"{path}: expected PCM16 mono 24 kHz; convert it with sox")
        return wav.readframes(wav.getnframes())


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
    parser.add_argument("input", help="PCM16 mono 24 kHz WAV of speech")
    parser.add_argument("output", help="where to write the spoken reply (WAV)")
    args = parser.parse_args(argv)
    reply = asyncio.run(converse(args.url, args.token, args.model, read_pcm16(args.input)))
    write_pcm16(args.output, bytes(reply.audio))
    print(f"assistant: {reply.transcript}")
    print(f"reply: {len(reply.audio) / (2 * SAMPLE_RATE):.2f} s of audio in {args.output}; "
          f"usage: {reply.usage}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
