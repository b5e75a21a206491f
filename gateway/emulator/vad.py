"""The emulator's server VAD: energy voice-activity detection over 20 ms PCM16 frames.

``server_vad`` (``semantic_vad`` behaves the same): appended ``audio/pcm`` is cut into
20 ms frames; a frame is speech when its RMS >= ``threshold`` * 1000 (PCM16 units;
default 0.5 → 500).  The first speech frame is a *start*; ``silence_duration_ms``
(default 500) of non-speech frames after it is a *stop*.  What the session does on each
(``speech_started``/``speech_stopped``, the commit, barge-in) is in
:mod:`gateway.emulator.session`.
"""

from __future__ import annotations

import array
import operator
import sys
from dataclasses import dataclass, field

from gateway.emulator.schema import JSON, PCM_BYTES_PER_MS

__all__ = ["Vad"]

_FRAME_MS = 20

_VAD_RMS_SCALE = 1000.0


def _mean_square(frame: bytes) -> float:
    samples = array.array("h", frame)
    if sys.byteorder == "big":
        samples.byteswap()
    total: int = sum(map(operator.mul, samples, samples))
    return total / max(len(samples), 1)


@dataclass
class Vad:
    """Energy voice-activity detection over 20 ms PCM16 frames on the session timeline.

    The timeline counts bytes from the first byte appended in the session.
    """

    pending: bytearray = field(default_factory=bytearray)
    position: int = 0
    """Byte offset (session timeline) of the first byte of ``pending``."""
    speaking: bool = False
    silence_ms: int = 0

    def reset(self, position: int) -> None:
        """Forget pending audio and any speech; continue at byte offset *position*."""
        self.pending.clear()
        self.position = position
        self.speaking = False
        self.silence_ms = 0

    def feed(self, audio: bytes, config: JSON) -> list[tuple[str, int, int]]:
        """Add PCM16 24 kHz *audio* under turn-detection *config*; return the transitions
        ``(kind, frame_start, frame_end)``, kind ``"started"`` or ``"stopped"``, offsets in
        bytes on the session timeline."""
        frame_bytes = _FRAME_MS * PCM_BYTES_PER_MS
        threshold = float(config.get("threshold", 0.5)) * _VAD_RMS_SCALE
        limit = threshold * threshold
        silence_needed = int(config.get("silence_duration_ms", 500))
        self.pending += audio
        transitions: list[tuple[str, int, int]] = []
        offset = 0
        while len(self.pending) - offset >= frame_bytes:
            frame = bytes(self.pending[offset : offset + frame_bytes])
            start = self.position + offset
            offset += frame_bytes
            energy = _mean_square(frame)
            loud = energy >= limit if limit > 0 else energy > 0
            if not self.speaking:
                if loud:
                    self.speaking = True
                    self.silence_ms = 0
                    transitions.append(("started", start, start + frame_bytes))
            elif loud:
                self.silence_ms = 0
            else:
                self.silence_ms += _FRAME_MS
                if self.silence_ms >= silence_needed:
                    self.speaking = False
                    self.silence_ms = 0
                    transitions.append(("stopped", start, start + frame_bytes))
        del self.pending[:offset]
        self.position += offset
        return transitions
