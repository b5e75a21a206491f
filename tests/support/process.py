"""A gateway in its own process (``python -m gateway serve``), for signal and log tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config
from tests.support.gateway import UPSTREAM_KEY, UPSTREAM_KEY_ENV


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    port: int = 0
    metrics_port: int = 0
    lines: list[str] = field(default_factory=list)

    def url(self, path: str = "/v1/realtime", model: str = "gpt-realtime") -> str:
        return f"ws://127.0.0.1:{self.port}{path}?model={model}"

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines whose ``event`` is ``name``."""
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == name:
                    found.append(record)
        return found


def write_config(config: Config, path: Path) -> Path:
    """Write ``config`` as YAML (secrets stay in the environment)."""
    data = config.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.asynccontextmanager
async def gateway_process(config_file: Path, *extra: str,
                          env: dict[str, str] | None = None) -> AsyncIterator[GatewayProcess]:
    """Start the gateway on free ports; yields once it logged ``gateway.listening``.

    All output (stderr, JSON lines) is collected in ``GatewayProcess.lines``.  On exit the
    process is killed if still running.
    """
    environ = {**os.environ, UPSTREAM_KEY_ENV: UPSTREAM_KEY, **(env or {})}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config_file),
        "--port", "0", "--metrics-port", "0", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=environ)
    running = GatewayProcess(process)
    listening = asyncio.get_running_loop().create_future()

    async def collect() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            running.lines.append(line)
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "gateway.listening" and not listening.done():
                    listening.set_result(record)
        if not listening.done():
            listening.set_exception(AssertionError("gateway exited:\n" + "\n".join(running.lines)))

    reader = asyncio.create_task(collect())
    try:
        async with asyncio.timeout(30):
            record = await listening
        running.port, running.metrics_port = record["port"], record["metrics_port"]
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await reader
