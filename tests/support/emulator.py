"""Reading the emulator's per-session records in tests."""

from __future__ import annotations

from typing import Any

from gateway.emulator.server import Emulator


def emulator_sessions(emulator: Emulator) -> list[dict[str, Any]]:
    """Every session the emulator accepted, oldest first, as ``/_emulator/sessions`` dicts
    (``headers`` is an alias of ``header_names``)."""
    records = []
    for record in emulator.sessions():
        data = record.to_dict()
        data["headers"] = data["header_names"]
        records.append(data)
    return records
