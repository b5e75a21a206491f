"""What the emulator's spoken replies sound like: a quiet 400 Hz tone (PCM16 24 kHz), or
silence bytes for G.711 output."""

from __future__ import annotations

import array
import math
import sys

__all__ = ["G711_SILENCE", "tone_chunk"]

_TONE_HZ = 400
_TONE_AMPLITUDE = 1000

G711_SILENCE = {"audio/pcmu": 0xFF, "audio/pcma": 0xD5}
"""The byte that encodes silence in each G.711 format."""


def tone_chunk(ms: int) -> bytes:
    """A quiet 400 Hz PCM16 24 kHz tone of *ms* ms (whole periods when ms % 5 == 0)."""
    count = ms * 24
    step = 2 * math.pi * _TONE_HZ / 24000
    samples = array.array("h", (round(_TONE_AMPLITUDE * math.sin(step * n)) for n in range(count)))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()
