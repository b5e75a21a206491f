"""Model pinning: which client events may pass to the upstream (pure; no I/O).

A client must not switch its session to a model its tenant may not use: the model is
fixed at the upgrade (``model=``), and a ``session.update`` naming another one is refused
with a ``forbidden`` ``error`` event (CONTRACT §5) instead of being forwarded.  The relay
shows the guard the client messages that may be a ``session.update``
(:data:`GUARDED_BYTES`, :mod:`gateway.relay`); the guard itself is bounded and fails
closed whatever it is shown:

1. **Can it be a session.update at all?**  Only if the bytes spell ``session.update``,
   each character literal or as a ``\\uXXXX`` escape (JSON's only way to spell these
   characters otherwise; hex digits and the ``u`` in either case, for lenient parsers).
   That is decided by ``bytes.find`` and, when the message holds an escape, one compiled
   regular expression: O(size) at C speed (about 4 ms/MB, under 10 ms/MB on adversarial
   input).  A message that cannot be one is forwarded without parsing: audio appends
   (base64: no ``.``, no ``\\``) never are.
2. **Is it cheap to check?**  A candidate over :data:`MAX_CHECKED_BYTES` or with more than
   :data:`MAX_CHECKED_CONTAINERS` ``{``/``[`` bytes (``bytes.count``, an upper bound on
   objects and arrays) is refused unparsed: parsing it would hold the event loop (a
   15 MB message of small objects took 1.6 s).  Real ``session.update`` events are far
   smaller: measured from openai-agents (Python) 0.24, one tool and short instructions
   924 bytes; 20 tools and 4,000 characters of instructions 15 KB; 128 tools and 16,000
   characters 84 KB with 1,035 ``{``/``[``.
3. **Strict parse** (RFC 8259): invalid UTF-8, syntax errors, trailing data or a second
   value, ``NaN``/``Infinity``, integers over Python's 4,300-digit limit, nesting deeper
   than Python's parser takes (``RecursionError``), and duplicate keys in a message that
   names ``session.update`` are refused.  Other parsers accept some of these (Node reads
   long integers, streaming decoders stop at the first value, first-wins parsers keep
   another duplicate), so the upstream could see a model the guard did not.
4. **The model**: ``session.model`` absent, ``null`` or one of the session's own names
   passes; anything else (another name, a number, list, object) is refused.

The guard takes text and binary messages alike (``bytes`` need not be UTF-8): CONTRACT §5
relays binary messages verbatim ("binary stays binary"), so they are shown to the guard
under the same rule rather than refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from typing import Any

from gateway.errors import Forbidden

__all__ = ["GUARDED_BYTES", "MAX_CHECKED_BYTES", "MAX_CHECKED_CONTAINERS", "Guard",
           "may_be_session_update", "model_guard"]

GUARDED_BYTES = (b"session.update", b"\\u")
"""A client message (text or binary) containing neither cannot be a ``session.update``:
the relay may forward it without calling the guard."""

MAX_CHECKED_BYTES = 1024 * 1024
"""Bytes; a message that may be a ``session.update`` and is larger is refused unparsed."""

MAX_CHECKED_CONTAINERS = 10_000
"""A message that may be a ``session.update`` with more ``{`` plus ``[`` bytes than this
is refused unparsed (parsing costs about 0.4 µs per object on the event loop)."""

Guard = Callable[[str | bytes], str | None]
"""A session's guard: a client message in, ``None`` (forward it) or an ``error`` event out."""

_EVENT = "session.update"


def _spelling(char: str) -> bytes:
    """A regular expression for ``char`` as JSON may spell it: literal or ``\\uXXXX``."""
    hex_digits = b"".join(
        b"[%s%s]" % (d.encode(), d.upper().encode()) if d.isalpha() else d.encode()
        for d in f"{ord(char):04x}")
    return b"(?:" + re.escape(char.encode()) + rb"|\\[uU]" + hex_digits + b")"


_ESCAPED_EVENT = re.compile(b"".join(_spelling(c) for c in _EVENT))


def may_be_session_update(message: bytes) -> bool:
    """Whether ``message`` spells ``session.update`` anywhere, literally or with JSON
    ``\\u`` escapes (so some parser may read a ``session.update`` in it).

    O(len) at C speed; false positives (the words inside a string, an escaped backslash
    before ``u``) only cost the strict parse.
    """
    if _EVENT.encode() in message:
        return True
    return b"\\u" in message and _ESCAPED_EVENT.search(message) is not None


class _Refuse(ValueError):
    """Raised inside the parse: the message cannot be checked (NaN, Infinity)."""


def _no_constant(name: str) -> Any:
    raise _Refuse(name)


def model_guard(models: Collection[str]) -> Guard:
    """The guard of one session whose own model names are ``models`` (its client-facing
    name and the upstream's name for it).

    The returned guard takes one client message (``str``, or ``bytes`` of a text or
    binary message) and returns ``None`` to forward it, or the ``forbidden`` ``error``
    event (JSON text, CONTRACT §5) to send back instead, the session going on with its
    model; the rules are in the module docstring.  Never raises; costs O(len) at C speed
    for a message that cannot be a ``session.update``, and a bounded parse otherwise.
    """
    own = frozenset(models)
    refusal = Forbidden("this model is not available to your session", reason="model_pinning")

    def guard(frame: str | bytes) -> str | None:
        message = frame if isinstance(frame, bytes) else frame.encode("utf-8", "surrogatepass")
        if not may_be_session_update(message):
            return None
        if (len(message) > MAX_CHECKED_BYTES
                or message.count(b"{") + message.count(b"[") > MAX_CHECKED_CONTAINERS):
            return refusal.error_event()
        duplicate = names_update = False

        def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            nonlocal duplicate, names_update
            obj = dict(pairs)
            if len(obj) != len(pairs):
                duplicate = True
                names_update = names_update or any(
                    key == "type" and value == _EVENT for key, value in pairs)
            elif obj.get("type") == _EVENT:
                names_update = True
            return obj

        try:
            text = message.decode("utf-8")
            event = json.loads(text, object_pairs_hook=pairs_hook, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # UnicodeDecodeError and _Refuse included
            return refusal.error_event()
        if duplicate and names_update:
            return refusal.error_event()
        if not isinstance(event, dict) or event.get("type") != _EVENT:
            return None
        session = event.get("session")
        model = session.get("model") if isinstance(session, dict) else None
        if model is None or (isinstance(model, str) and model in own):
            return None
        return refusal.error_event()

    return guard
