"""A Python WebRTC caller for tests (aiortc): an ``oai-events`` data channel, a microphone
track that plays given PCM, and the events the far end sends.

Both peers of a test stay on loopback: the caller gathers only 127.0.0.1 candidates
(:func:`gateway.emulator.webrtc.loopback_ice`) and uses no STUN server, and so does the
emulator started with ``loopback_ice=True``.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from typing import Any

import pytest

aiortc = pytest.importorskip("aiortc", reason="aiortc is not installed (the webrtc extra: "
                             "pip install 'realtime-gateway[webrtc]')")
av = pytest.importorskip("av", reason="PyAV comes with aiortc (the webrtc extra)")

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack  # noqa: E402

from gateway.emulator.webrtc import loopback_ice  # noqa: E402

RATE = 24_000
FRAME = 480  # 20 ms


class Microphone(MediaStreamTrack):
    """Plays ``pcm`` (PCM16 mono 24 kHz) once :attr:`speak` is set, then silence."""

    kind = "audio"

    def __init__(self, pcm: bytes) -> None:
        super().__init__()
        self._pcm = pcm
        self._offset = 0
        self.speak = asyncio.Event()
        self._start: float | None = None
        self._timestamp = 0

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._timestamp += FRAME
            delay = self._start + self._timestamp / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the media clock, not synchronisation
        chunk = b""
        if self.speak.is_set():
            chunk = self._pcm[self._offset:self._offset + FRAME * 2]
            self._offset += len(chunk)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(chunk.ljust(FRAME * 2, b"\0"))
        frame.pts = self._timestamp
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


class Caller:
    """One test call's client side.  ``events`` collects parsed data-channel events."""

    def __init__(self, pcm: bytes) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("oai-events")
        self.microphone = Microphone(pcm)
        self.pc.addTrack(self.microphone)
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self.channel.on("message", self._on_message)

    async def _on_message(self, message: str) -> None:
        self.events.append(json.loads(message))
        async with self._changed:
            self._changed.notify_all()

    async def offer(self) -> str:
        """The SDP offer (ICE gathered on loopback only)."""
        with loopback_ice():
            await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def types(self) -> list[str]:
        return [str(e.get("type")) for e in self.events]

    async def wait_for_event(self, kind: str, within: float = 20.0) -> dict[str, Any]:
        """The first data-channel event of type ``kind``, waiting at most ``within`` s."""
        async with asyncio.timeout(within), self._changed:
            while True:
                for event in self.events:
                    if event.get("type") == kind:
                        return event
                await self._changed.wait()

    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(json.dumps(event))

    async def close(self) -> None:
        self.microphone.stop()
        await self.pc.close()
