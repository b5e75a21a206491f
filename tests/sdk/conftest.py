"""Fixtures of the SDK and browser tests: the upstream emulator and a test issuer key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.emulator.server import Emulator
from tests.support.gateway import UPSTREAM_KEY


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """The Realtime protocol emulator on a free loopback port, expecting the gateway's key."""
    async with Emulator(host="127.0.0.1", port=0, api_key=UPSTREAM_KEY) as emu:
        yield emu


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """Where the test issuer's key is created on first use."""
    return tmp_path / "issuer" / "key.json"
