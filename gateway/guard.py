"""Model pinning: which client events may pass to the upstream (pure; no I/O).

A client must not switch its session to a model its tenant may not use: the model is
fixed at the upgrade (``model=``), and a ``session.update`` naming another one is refused
with a ``forbidden`` ``error`` event (CONTRACT §5) instead of being forwarded.  The relay
shows the guard only the client text messages that may be a ``session.update``
(:mod:`gateway.relay`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any

from gateway.errors import Forbidden


def model_guard(models: Collection[str]) -> Callable[[str | bytes], str | None]:
    """The guard of one session whose own model names are ``models`` (its client-facing
    name and the upstream's name for it).

    The returned guard takes one client text message (``str``, or its UTF-8 ``bytes``)
    and returns ``None`` to forward it, or the ``error`` event (JSON text) to send back
    instead.  It lets a ``session.update`` through when it names no model
    (``session.model`` absent or ``null``) or one of ``models``.  Refused with a
    ``forbidden`` ``error`` event, not forwarded, the session going on with its model:

    * any other ``session.model``, and any that is not a string (number, list, object);
    * a message with a duplicate key in any object when any of its objects has
      ``"type": "session.update"`` (escapes decoded): Python keeps the last value of
      a key, other parsers the first, so the upstream could see another event or model;
    * valid JSON nested too deep for Python's parser (``RecursionError``): another
      parser may accept it, so it cannot be checked and is treated as a model switch.

    Syntactically invalid JSON passes: the upstream answers it with its own error.
    Never raises.
    """
    own = frozenset(models)
    refusal = Forbidden("this model is not available to your session", reason="model_pinning")

    def guard(frame: str | bytes) -> str | None:
        duplicate = names_update = False

        def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            nonlocal duplicate, names_update
            obj = dict(pairs)
            if len(obj) != len(pairs):
                duplicate = True
                names_update = names_update or any(
                    key == "type" and value == "session.update" for key, value in pairs)
            elif obj.get("type") == "session.update":
                names_update = True
            return obj

        try:
            event = json.loads(frame, object_pairs_hook=pairs_hook)
        except RecursionError:
            return refusal.error_event()
        except ValueError:  # UnicodeDecodeError included
            return None
        if duplicate and names_update:
            return refusal.error_event()
        if not isinstance(event, dict) or event.get("type") != "session.update":
            return None
        session = event.get("session")
        model = session.get("model") if isinstance(session, dict) else None
        if model is None or (isinstance(model, str) and model in own):
            return None
        return refusal.error_event()

    return guard
