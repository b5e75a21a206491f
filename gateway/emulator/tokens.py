"""Token accounting of the emulator: exact, so tests can predict every ``usage`` object.

With ``T(s) = ceil(len(s) / 4)`` (``len`` in code points), ``Ain(b) = ceil(ms / 100)`` and
``Aout(b) = ceil(ms / 50)`` where ``ms = b / bytes_per_ms`` (48 for ``audio/pcm`` PCM16
24 kHz, so ``Ain = ceil(b / 4800)`` and ``Aout = ceil(b / 2400)``; 8 for G.711):

* Input = every item of the response's input (the whole conversation, or
  ``response.input``), no instructions, no tools.  Per item: user/system text part →
  ``T(text)`` text tokens; user audio part → ``Ain(bytes)`` audio tokens (the committed
  buffer, or the decoded ``audio`` of a created item); image part → 85 image tokens;
  assistant audio part → ``Ain(bytes still in the item)`` audio tokens (after any
  truncate; a part without audio counts ``T(transcript)`` text tokens); assistant text
  part → ``T(text)``; ``function_call`` → ``T(name + arguments)``;
  ``function_call_output`` → ``T(output)``.
* ``cached_tokens`` = the tokens of the items that were already part of an earlier
  response's input in this session (``cached_tokens_details`` splits them by kind).  They
  are included in ``text_tokens``/``audio_tokens``/``image_tokens`` and ``input_tokens``
  (cached ⊂ input, as in the OpenAI API).
* Output: an audio reply → ``Aout(bytes sent)`` audio + ``T(transcript sent)`` text; a
  text reply → ``T(text sent)``; a function call → ``T(name + arguments sent)``.  A
  cancelled response counts only what it sent.
* ``input_tokens = text + audio + image``; ``output_tokens = text + audio``;
  ``total_tokens = input_tokens + output_tokens``.
* Transcription usage (``{"type": "tokens", ...}``): ``input_token_details.audio_tokens``
  = ``Ain(item bytes)``, ``text_tokens`` = ``T(transcription prompt)``, ``output_tokens``
  = ``T(transcript)``.

The usage objects have the shapes of openai-python ``types/realtime/``
``realtime_response_usage.py`` and ``UsageTranscriptTextUsageTokens`` of
``conversation_item_input_audio_transcription_completed_event.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.emulator.schema import JSON, PCM_BYTES_PER_MS

__all__ = [
    "IMAGE_TOKENS",
    "InputUsage",
    "input_audio_tokens",
    "output_audio_tokens",
    "response_usage",
    "text_tokens",
    "transcription_usage",
]

TEXT_CHARS_PER_TOKEN = 4
INPUT_AUDIO_MS_PER_TOKEN = 100
OUTPUT_AUDIO_MS_PER_TOKEN = 50
IMAGE_TOKENS = 85
"""Input tokens charged per image content part."""


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def text_tokens(text: str) -> int:
    """Tokens the emulator charges for *text*: ``ceil(len(text) / 4)`` (code points)."""
    return _ceil_div(len(text), TEXT_CHARS_PER_TOKEN)


def input_audio_tokens(n_bytes: int, bytes_per_ms: int = PCM_BYTES_PER_MS) -> int:
    """Input audio tokens for *n_bytes* of audio: ``ceil(ms / 100)``.

    *bytes_per_ms* is 48 for PCM16 24 kHz (so ``ceil(n_bytes / 4800)``), 8 for G.711.
    """
    return _ceil_div(n_bytes, bytes_per_ms * INPUT_AUDIO_MS_PER_TOKEN)


def output_audio_tokens(n_bytes: int, bytes_per_ms: int = PCM_BYTES_PER_MS) -> int:
    """Output audio tokens for *n_bytes* of audio: ``ceil(ms / 50)`` (``ceil(n / 2400)``)."""
    return _ceil_div(n_bytes, bytes_per_ms * OUTPUT_AUDIO_MS_PER_TOKEN)


@dataclass
class InputUsage:
    """The input tokens of one response, by kind; ``cached_*`` are included in the others."""

    text: int = 0
    audio: int = 0
    image: int = 0
    cached_text: int = 0
    cached_audio: int = 0
    cached_image: int = 0

    def add(self, text: int, audio: int, image: int, *, cached: bool) -> None:
        """Count one input item's tokens; *cached*: it was in an earlier response's input."""
        self.text += text
        self.audio += audio
        self.image += image
        if cached:
            self.cached_text += text
            self.cached_audio += audio
            self.cached_image += image


def response_usage(
    usage_in: InputUsage, out_text: int, out_audio: int, extra_input_text: int = 0
) -> JSON:
    """The ``usage`` object of a ``response.done``.

    Args:
        usage_in: the response's input tokens.
        out_text, out_audio: output text and audio tokens of what was sent.
        extra_input_text: added to the input text tokens (the ``fault-usage-<n>`` fault).
    """
    in_text = usage_in.text + extra_input_text
    input_tokens = in_text + usage_in.audio + usage_in.image
    cached = usage_in.cached_text + usage_in.cached_audio + usage_in.cached_image
    output_tokens = out_text + out_audio
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {
            "text_tokens": in_text,
            "audio_tokens": usage_in.audio,
            "image_tokens": usage_in.image,
            "cached_tokens": cached,
            "cached_tokens_details": {
                "text_tokens": usage_in.cached_text,
                "audio_tokens": usage_in.cached_audio,
                "image_tokens": usage_in.cached_image,
            },
        },
        "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
    }


def transcription_usage(audio_bytes: int, bytes_per_ms: int, prompt: str, transcript: str) -> JSON:
    """The ``usage`` (``{"type": "tokens", ...}``) of a transcription ``completed`` event
    for *audio_bytes* of input audio transcribed with *prompt* into *transcript*."""
    audio_tokens = input_audio_tokens(audio_bytes, bytes_per_ms)
    prompt_tokens = text_tokens(prompt)
    out_tokens = text_tokens(transcript)
    in_tokens = audio_tokens + prompt_tokens
    return {
        "type": "tokens",
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "total_tokens": in_tokens + out_tokens,
        "input_token_details": {"text_tokens": prompt_tokens, "audio_tokens": audio_tokens},
    }
