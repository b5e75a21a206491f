"""Shared fixtures for tests with sockets: the upstream emulator and a test issuer key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

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


@pytest.fixture(params=["framescan", "pure-python"])
def frame_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a relay test twice: with the C frame scan (``gateway/_framescan.c``) and with
    the pure-Python frame loop it accelerates (``gateway.relay.FRAMESCAN = None``).

    The C module must be there where it can be built: a C compiler and the Python headers
    are on every machine that runs the README's install command (``.ci/run`` included),
    so a missing module fails the test rather than skipping it.
    """
    from gateway import relay

    if request.param == "pure-python":
        monkeypatch.setattr(relay, "FRAMESCAN", None)
    else:
        require_framescan()
    return str(request.param)


def require_framescan() -> ModuleType:
    """The C frame scan; fails the calling test when it was not built (see
    :func:`frame_loop` for why that is a failure, not a skip)."""
    from gateway import relay

    if relay.FRAMESCAN is None:
        pytest.fail("gateway._framescan is not built: run `pip install -e .` "
                    "(setup.py compiles it; see README)")
    return relay.FRAMESCAN
