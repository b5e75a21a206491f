"""``serve``'s start-up: what runs in the process before the event loop starts."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import cli, logs
from tests.support.gateway import UPSTREAM_KEY, UPSTREAM_KEY_ENV, gateway_config
from tests.support.process import write_config


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_serve_moves_the_start_up_heap_out_of_the_collectors_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_file: Path) -> None:
    """A full collection while serving must not traverse the imported modules and the
    config: ``serve`` freezes them before the loop starts (issue 16: 31 ms per gen-2
    collection otherwise)."""
    ran: list[int] = []

    def run(coro: Any) -> None:
        ran.append(gc.get_freeze_count())
        coro.close()

    monkeypatch.setattr(cli, "_run", run)
    monkeypatch.setattr(logs, "configure_logging", lambda *args, **kwargs: None)
    config = write_config(gateway_config("ws://127.0.0.1:9/v1/realtime", key_file),
                          tmp_path / "gateway.yaml")
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    assert cli.main(["serve", "--config", str(config)]) == 0
    assert ran and ran[0] > 10_000  # the imported modules' objects, frozen before the loop
