"""What the emulator's spoken replies sound like: espeak-ng speech, or a tone.

By default a reply is a quiet 400 Hz tone (PCM16 24 kHz; silence bytes for G.711 output)
lasting 50 ms per character of its text, within 200 ms … 10 s, so tests can predict every
byte.  With speech on (``Emulator(speech=True)``, as ``realtime-gateway dev`` wants it) and
both ``espeak-ng`` and ``sox`` on ``PATH``, a PCM16 24 kHz reply is the text spoken by
espeak-ng (voice ``en-us``, text on stdin; its 22.05 kHz WAV resampled to 24 kHz mono
little-endian by sox, without dither, so a text always gives the same bytes), at most
30 s; a text over 500 characters keeps the tone.  Synthesis runs as two subprocesses
under asyncio, never blocking the event loop, within :attr:`Voice.timeout` seconds;
results are cached per text (least recently used dropped beyond ``cache_bytes``), and a
text is synthesised once however many sessions ask for it at the same time.  When a tool
is missing, fails or is too slow, the reply falls back to the tone; the first failure is
logged (the reason, never the text).  G.711 replies stay silence.
"""

from __future__ import annotations

import array
import asyncio
import logging
import math
import shutil
import sys
from collections import OrderedDict
from typing import Final

from gateway.emulator.schema import AUDIO_FORMATS, PCM_BYTES_PER_MS

__all__ = ["SPEECH_TOOLS", "Voice", "tone_chunk"]

SPEECH_TOOLS: Final = ("espeak-ng", "sox")
"""The programs speech needs on ``PATH`` (``apt-get install espeak-ng sox``)."""

_log = logging.getLogger(__name__)

_TONE_HZ = 400
_TONE_AMPLITUDE = 1000
_TONE_CHUNK_MS = 100
_REPLY_MS_PER_CHAR = 50
_REPLY_MIN_MS = 200
_REPLY_MAX_MS = 10_000
_SPEECH_MAX_MS = 30_000
_SPEECH_MAX_CHARS = 500
_G711_SILENCE = {"audio/pcmu": 0xFF, "audio/pcma": 0xD5}
_ESPEAK_ARGS = ("-v", "en-us", "--stdin", "--stdout")
_SOX_ARGS = (  # -D: no dither, so a text always gives the same bytes
    "-V1", "-D", "-t", "wav", "-",
    "-t", "raw", "-r", "24000", "-c", "1", "-b", "16", "-e", "signed-integer", "-L", "-",
)


def tone_chunk(ms: int) -> bytes:
    """A quiet 400 Hz PCM16 24 kHz tone of *ms* ms (whole periods when ms % 5 == 0)."""
    count = ms * 24
    step = 2 * math.pi * _TONE_HZ / 24000
    samples = array.array("h", (round(_TONE_AMPLITUDE * math.sin(step * n)) for n in range(count)))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


class _SynthesisError(Exception):
    """espeak-ng or sox failed; the message says how (never the text)."""


async def _run(program: str, args: tuple[str, ...], data: bytes) -> bytes:
    """Run *program* with *data* on stdin; return its stdout.  The process is killed and
    reaped if this is cancelled (the caller's timeout).

    Raises:
        _SynthesisError: it could not start or exited non-zero.
    """
    try:
        process = await asyncio.create_subprocess_exec(
            program, *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        raise _SynthesisError(f"{program} did not start: {exc.strerror}") from None
    try:
        output, _ = await process.communicate(data)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise _SynthesisError(f"{program} exited with status {process.returncode}")
    return output


class Voice:
    """The audio of the emulator's spoken replies; one per :class:`Emulator`.

    Args:
        speech: speak replies with espeak-ng when it and sox are on ``PATH``; else (or
            ``False``) every reply is the tone.
        timeout: seconds one synthesis (both programs) may take before the tone is used.
        cache_bytes: bytes of synthesised audio kept, across texts.

    Raises:
        ValueError: *timeout* or *cache_bytes* is not positive.
    """

    def __init__(
        self, *, speech: bool = False, timeout: float = 5.0, cache_bytes: int = 16 * 1024 * 1024
    ) -> None:
        if timeout <= 0 or cache_bytes <= 0:
            raise ValueError("timeout and cache_bytes must be positive")
        self.timeout = timeout
        self._cache_bytes = cache_bytes
        missing = [tool for tool in SPEECH_TOOLS if shutil.which(tool) is None]
        self.speaks = speech and not missing
        """Whether PCM16 replies are speech (asked for, and the tools are there)."""
        if speech and missing:
            _log.warning(
                "emulator speech needs %s on PATH; replies are a tone", " and ".join(missing)
            )
        self._tone = tone_chunk(_TONE_CHUNK_MS) * (_REPLY_MAX_MS // _TONE_CHUNK_MS)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._pending: dict[str, asyncio.Task[bytes | None]] = {}
        self._failure_logged = False

    async def reply_audio(self, text: str, format_type: str) -> bytes:
        """The whole audio of a reply saying *text* in audio format *format_type*
        (``audio/pcm``: PCM16 24 kHz mono little-endian; ``audio/pcmu|pcma``: G.711)."""
        if self.speaks and format_type == "audio/pcm" and len(text) <= _SPEECH_MAX_CHARS:
            speech = await self._speech(text)
            if speech is not None:
                return speech
        bpm = AUDIO_FORMATS.get(format_type, PCM_BYTES_PER_MS)
        ms = min(max(len(text) * _REPLY_MS_PER_CHAR, _REPLY_MIN_MS), _REPLY_MAX_MS)
        if format_type == "audio/pcm":
            return self._tone[: ms * bpm]
        return bytes([_G711_SILENCE.get(format_type, 0)]) * (ms * bpm)

    async def aclose(self) -> None:
        """Cancel the syntheses in flight and wait for their processes to end."""
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _speech(self, text: str) -> bytes | None:
        """*text* spoken, from the cache or one shared synthesis; ``None`` on failure."""
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        task = self._pending.get(text)
        if task is None:
            task = asyncio.create_task(self._synthesise(text))
            self._pending[text] = task
            task.add_done_callback(lambda _: self._pending.pop(text, None))
        # Shielded: a session that goes away does not cancel the others' synthesis.
        return await asyncio.shield(task)

    async def _synthesise(self, text: str) -> bytes | None:
        try:
            async with asyncio.timeout(self.timeout):
                wav = await _run("espeak-ng", _ESPEAK_ARGS, text.encode(errors="replace"))
                pcm = await _run("sox", _SOX_ARGS, wav)
        except TimeoutError:
            self._failed(f"synthesis took more than {self.timeout} s")
            return None
        except _SynthesisError as exc:
            self._failed(str(exc))
            return None
        pcm = pcm[: _SPEECH_MAX_MS * PCM_BYTES_PER_MS]
        if len(pcm) % 2 or not pcm:
            self._failed(f"sox wrote {len(pcm)} bytes")
            return None
        self._remember(text, pcm)
        return pcm

    def _remember(self, text: str, pcm: bytes) -> None:
        self._cache[text] = pcm
        self._cached_bytes += len(pcm)
        while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= len(dropped)

    def _failed(self, reason: str) -> None:
        if not self._failure_logged:
            self._failure_logged = True
            _log.warning("emulator speech failed (%s); that reply is a tone", reason)
