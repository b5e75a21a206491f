"""``realtime-gateway dev --tls`` as a real process, reached by the openai Node SDK (which
dials ``wss://`` only) running the very snippet the banner prints, with the
``NODE_EXTRA_CA_CERTS`` the banner names."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.sdk.helpers import NODE_MODULES, free_port, node_or_skip

STARTUP_SECONDS = 30.0
NODE_SECONDS = 30.0


@contextlib.asynccontextmanager
async def dev_tls(state_dir: Path, port: int) -> AsyncIterator[str]:
    """``dev --tls`` on ``port`` with the built-in emulator; yields its output up to
    ``gateway.listening``, and expects a clean exit 0 on SIGTERM at the end."""
    env = {**os.environ, "XDG_STATE_HOME": str(state_dir), "OPENAI_API_KEY": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "dev", "--tls", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    assert process.stdout is not None
    seen = ""
    try:
        async with asyncio.timeout(STARTUP_SECONDS):
            async for raw in process.stdout:
                seen += raw.decode(errors="replace")
                if "gateway.listening" in seen:
                    break
        assert "gateway.listening" in seen, seen
        yield seen
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def node_snippet(banner: str) -> tuple[str, str]:
    """The Node snippet of the banner (dedented) and the CA file its header names."""
    match = re.search(r"^Node \(npm install openai ws; NODE_EXTRA_CA_CERTS=(\S+) "
                      r"node hello\.mjs\):\n((?:    .*\n)+)", banner, re.MULTILINE)
    assert match, banner
    return textwrap.dedent(match.group(2)), match.group(1)


async def run_node_script(script: Path, ca_file: str | None) -> tuple[int, str, str]:
    """Run ``script`` under Node with ``NODE_EXTRA_CA_CERTS=ca_file`` (unset for ``None``);
    returns the exit status, stdout and stderr."""
    node = node_or_skip("openai", "ws")
    env = {k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"}
    if ca_file is not None:
        env["NODE_EXTRA_CA_CERTS"] = ca_file
    process = await asyncio.create_subprocess_exec(
        node, str(script), cwd=script.parent, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    try:
        async with asyncio.timeout(NODE_SECONDS):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def test_openai_node_runs_the_printed_snippet_against_dev_tls(tmp_path: Path) -> None:
    node_or_skip("openai", "ws")
    port = free_port()
    state = tmp_path / "state"
    async with dev_tls(state, port) as banner:
        token = re.search(r"^Token:\s+(\S+)$", banner, re.MULTILINE)
        assert token, banner
        assert f"URL:    wss://127.0.0.1:{port}/v1/realtime?model=gpt-realtime" in banner
        assert re.search(rf"Uvicorn running on https://127\.0\.0\.1:{port} .*server=main", banner)
        snippet, ca_file = node_snippet(banner)
        tls_dir = state / "realtime-gateway" / "tls"
        assert Path(ca_file) == tls_dir / "ca.pem"
        assert ((tls_dir / "server.key").stat().st_mode & 0o777) == 0o600
        client = tmp_path / "client"
        client.mkdir()
        (client / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
        script = client / "hello.mjs"
        script.write_text(snippet.replace("<token>", token.group(1)))

        code, out, err = await run_node_script(script, ca_file)
        assert code == 0, f"{out}\n{err}"
        events = out.split()
        assert events[0] == "session.created", out
        assert "response.output_text.delta" in events and events[-1] == "response.done", out

        # the trust really comes from the printed CA: without it the TLS handshake fails
        code, out, err = await run_node_script(script, None)
        assert code == 1 and "session.created" not in out
        assert "certificate" in err, err

        # the voice demo's token endpoint answers its own https:// origin, and only it
        base = f"https://127.0.0.1:{port}"
        trust = ssl.create_default_context(cafile=ca_file)
        async with httpx.AsyncClient(verify=trust) as http:
            own = await http.get(f"{base}/_dev/token", headers={"Origin": base})
            plain = await http.get(f"{base}/_dev/token",
                                   headers={"Origin": f"http://127.0.0.1:{port}"})
        assert own.status_code == 200 and own.json()["token"].count(".") == 2
        assert plain.status_code == 403
