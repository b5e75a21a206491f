"""Faults: how one emulator connection is told to misbehave, for the fault tests.

Faults are selected per connection by the ``model`` query value; several may be combined
with commas (``model=fault-slow,fault-usage-10``).

* ``fault-refuse-<status>``: answer the handshake with HTTP ``<status>`` (200…599, not
  101) and a JSON error body (``Retry-After: 1`` on 429 and 503).
* ``fault-stall-handshake``: read the request and never answer (until the emulator shuts
  down, or its ``open_timeout`` drops the TCP connection).
* ``fault-close-<code>``: after the first client frame, close with ``<code>`` and reason
  ``emulator close <code>`` (the frame itself is not answered).
* ``fault-drop``: after the first client frame, abort the TCP connection (no close
  frame).
* ``fault-stall``: after ``session.created`` never send anything again (pings are still
  answered, frames are still recorded).
* ``fault-echo``: after ``session.created``, send every client frame back verbatim (text
  as text, binary as binary) and nothing else.
* ``fault-usage-<n>``: every ``response.done`` reports ``n`` extra input text tokens.
* ``fault-no-sideband`` (calls): refuse the call's sideband (``?call_id=``) with HTTP 404
  ``call_id_not_found``, as OpenAI was seen to do.
* ``fault-slow``: pace responses in real time (a 100 ms audio chunk every 100 ms, one
  text/argument delta every 50 ms), so cancels and barge-ins can be tested.

An unknown ``fault-*`` word or an unusable value refuses the handshake with HTTP 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FaultError", "Faults", "fault_words", "parse_faults"]

_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


class FaultError(ValueError):
    """A ``model`` value names an unknown fault or an unusable fault parameter."""


@dataclass(frozen=True)
class Faults:
    """The misbehaviours selected for one connection (see the module docstring).

    Attributes:
        refuse: HTTP status to refuse the handshake with, or ``None``.
        stall_handshake: never answer the handshake.
        close: close code to send after the first client frame, or ``None``.
        drop: abort the TCP connection after the first client frame.
        stall: send nothing after ``session.created``.
        echo: echo client frames verbatim.
        extra_input_text_tokens: added to every ``response.done``'s input text tokens.
        slow: pace responses in real time.
        no_sideband: refuse a call's sideband socket with 404.
    """

    refuse: int | None = None
    stall_handshake: bool = False
    close: int | None = None
    drop: bool = False
    stall: bool = False
    echo: bool = False
    extra_input_text_tokens: int = 0
    slow: bool = False
    no_sideband: bool = False

    @property
    def active(self) -> bool:
        """True when any fault is selected."""
        return self != Faults()


def fault_words(model: str) -> list[str]:
    """The ``fault-*`` words of a ``model`` query value, in order, stripped."""
    return [word for word in map(str.strip, model.split(",")) if word.startswith("fault-")]


def parse_faults(model: str) -> Faults:
    """Parse the fault words of a ``model`` query value (comma-separated).

    Words not starting with ``fault-`` are ignored (``gpt-realtime`` has no faults).

    Raises:
        FaultError: an unknown ``fault-*`` word, or a status/code/count out of range.
    """
    values: dict[str, Any] = {}
    for word in fault_words(model):
        name = word[len("fault-") :]
        if name in ("stall-handshake", "drop", "stall", "echo", "slow", "no-sideband"):
            values[name.replace("-", "_")] = True
            continue
        kind, _, number = name.rpartition("-")
        if kind not in ("refuse", "close", "usage") or not number.isdigit():
            raise FaultError(f"unknown emulator fault {word!r}")
        value = int(number)
        if kind == "refuse":
            if not 200 <= value <= 599 or value == 101:
                raise FaultError(f"fault-refuse needs an HTTP status 200..599, got {value}")
            values["refuse"] = value
        elif kind == "close":
            if value not in _SENDABLE_CLOSE_CODES and not 3000 <= value <= 4999:
                raise FaultError(f"fault-close needs a sendable close code, got {value}")
            values["close"] = value
        else:
            values["extra_input_text_tokens"] = value
    return Faults(**values)
