"""uvicorn's own log lines from ``serve``: one per server, each naming its server (the main
and the metrics server share uvicorn's logger; gateway.logs.serving_as tells them apart)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from gateway.emulator.server import Emulator
from tests.support.gateway import gateway_config
from tests.support.process import gateway_process, write_config


def records(lines: list[str]) -> list[dict[str, Any]]:
    found = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append(record)
    return found


async def test_each_uvicorn_line_is_printed_once_per_server_naming_it(
        emulator: Emulator, key_file: Path, tmp_path: Path) -> None:
    config = write_config(gateway_config(f"{emulator.url}/v1/realtime", key_file,
                                         server={"drain_seconds": 0}), tmp_path / "gw.yaml")
    async with gateway_process(config) as gw:
        gw.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await gw.process.wait() == 0
    logged = records(gw.lines)
    uvicorn = [r for r in logged if str(r.get("logger", "")).startswith("uvicorn")]
    assert uvicorn, gw.lines
    assert {r.get("server") for r in uvicorn} == {"main", "metrics"}, uvicorn
    pid = gw.process.pid
    lines = Counter((r["server"], r["event"]) for r in uvicorn)
    for server in ("main", "metrics"):
        assert lines[(server, f"Started server process [{pid}]")] == 1
        assert lines[(server, f"Finished server process [{pid}]")] == 1
        assert lines[(server, "Shutting down")] == 1
    assert lines[("main", f"Uvicorn running on http://127.0.0.1:{gw.port} "
                          "(Press CTRL+C to quit)")] == 1
    assert lines[("metrics", f"Uvicorn running on http://127.0.0.1:{gw.metrics_port} "
                             "(Press CTRL+C to quit)")] == 1
    assert max(lines.values()) == 1, lines  # no line printed twice for one server
    # the gateway's own events are not tagged
    assert all("server" not in r for r in logged if str(r.get("logger")).startswith("gateway"))
