"""Tools for the SDK and browser tests: finding Node, Chromium and the agents venv (with skip
reasons), running a client script with a JSON spec, a test CA for ``wss://``, a loopback
page server and free ports.

The Node clients live next to this file (``*.mjs``) and are installed by
``scripts/bootstrap-sdk`` (``npm ci`` in ``tests/sdk``; Debian's ``chromium``; the
``.venv-agents`` virtualenv with ``openai-agents``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import http.server
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.devtls import DevCertificates, create_certificates

SDK_DIR = Path(__file__).resolve().parent
REPO = SDK_DIR.parents[1]
NODE_MODULES = SDK_DIR / "node_modules"
AGENTS_PYTHON = REPO / ".venv-agents" / "bin" / "python"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
"""Chromium flags for this closed network (see scripts/bootstrap-sdk)."""

BOOTSTRAP_HINT = "run scripts/bootstrap-sdk"
CLIENT_TIMEOUT_SECONDS = 60.0
"""Upper bound for one client script run (each script also bounds its own waits)."""


def node_or_skip(*packages: str) -> str:
    """The ``node`` executable; skips the test when it or an npm package is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"Node.js is not installed ({BOOTSTRAP_HINT})")
    missing = [p for p in packages if not (NODE_MODULES / p / "package.json").is_file()]
    if missing:
        pytest.skip(f"npm packages {', '.join(missing)} are not installed in tests/sdk "
                    f"({BOOTSTRAP_HINT})")
    return node


def chromium_or_skip() -> str:
    """The Chromium executable (``$CHROMIUM`` or ``chromium`` on PATH), with Node and
    playwright-core; skips the test when any is missing."""
    node_or_skip("playwright-core")
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if chromium is None or not Path(chromium).exists():
        pytest.skip(f"Chromium is not installed (apt-get install chromium; {BOOTSTRAP_HINT})")
    return chromium


def agents_python_or_skip() -> Path:
    """The Python of ``.venv-agents`` (openai-agents); skips the test when absent."""
    if not AGENTS_PYTHON.exists():
        pytest.skip(f"the .venv-agents virtualenv with openai-agents is missing ({BOOTSTRAP_HINT})")
    if not list((AGENTS_PYTHON.parents[1] / "lib").glob("python3*/site-packages/agents")):
        pytest.skip(f"openai-agents is not installed in .venv-agents ({BOOTSTRAP_HINT})")
    return AGENTS_PYTHON


@dataclass
class ClientRun:
    """What a client script reported: its last stdout line as JSON, and its stderr."""

    result: dict[str, Any]
    stderr: str


async def run_client(argv: Sequence[str], spec: Mapping[str, Any], *,
                     env: Mapping[str, str] | None = None,
                     within: float = CLIENT_TIMEOUT_SECONDS) -> ClientRun:
    """Run a client script with ``spec`` as JSON on its stdin; return its JSON report.

    The script prints one JSON object as its last stdout line and exits 0, or prints
    a diagnosis to stderr and exits non-zero.  Raises ``AssertionError`` on a non-zero
    exit, a missing report or when ``within`` seconds pass (the process is killed).
    """
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=SDK_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    try:
        async with asyncio.timeout(within):
            out, err = await process.communicate(json.dumps(spec).encode())
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(f"{argv[-1]} did not finish in {within} s:\n"
                             f"{out.decode(errors='replace')}\n{err.decode(errors='replace')}"
                             ) from None
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    assert process.returncode == 0, f"{argv[-1]} exited {process.returncode}:\n{stdout}\n{stderr}"
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, f"{argv[-1]} printed no report:\n{stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return ClientRun(result, stderr)


async def run_node(script: str, spec: Mapping[str, Any], *, packages: Sequence[str],
                   env: Mapping[str, str] | None = None,
                   within: float = CLIENT_TIMEOUT_SECONDS) -> ClientRun:
    """Run ``tests/sdk/<script>`` under Node (skipping when Node or ``packages`` are
    missing); see :func:`run_client`."""
    node = node_or_skip(*packages)
    return await run_client([node, str(SDK_DIR / script)], spec, env=env, within=within)


def make_test_ca(directory: Path) -> DevCertificates:
    """A throwaway CA and a server certificate it signs (SAN: IP 127.0.0.1, DNS
    localhost; EKU serverAuth; valid one day) under ``directory``: the files of
    ``dev --tls`` (:func:`gateway.devtls.create_certificates`)."""
    return create_certificates(directory, validity=datetime.timedelta(days=1))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the
    base URL ``http://127.0.0.1:<port>``."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for commands that need a fixed ``--port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
