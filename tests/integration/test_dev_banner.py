"""What ``realtime-gateway dev`` prints (gateway.devbanner): the snippets, and the exact
install line for a package the running Python lacks — from the function and from a real
``dev`` process whose Python cannot import ``openai``."""

from __future__ import annotations

import ast
import asyncio
import datetime
import os
import re
import shlex
import signal
import socket
import sys
import textwrap
from pathlib import Path

from gateway.devbanner import SNIPPET_MODULES, dev_banner, install_line, missing_modules
from gateway.devtls import DevCertificates

TOKEN = "header.payload.signature"
CERTS = DevCertificates(Path("/state/tls/ca.pem"), Path("/state/tls/server.pem"),
                        Path("/state/tls/server.key"),
                        datetime.datetime(2030, 1, 2, 3, 4, tzinfo=datetime.UTC))


def block(banner: str, header: str) -> str:
    """The indented lines after the line starting with ``header``, dedented."""
    match = re.search(rf"^{re.escape(header)}.*\n((?:    .*\n)+)", banner, re.MULTILINE)
    assert match, banner
    return textwrap.dedent(match.group(1))


def test_nothing_missing_means_no_install_line() -> None:
    banner = dev_banner(version="1.2.3", port=8080, token=TOKEN, upstream="the emulator",
                        tls=None, missing=[])
    assert "URL:    ws://127.0.0.1:8080/v1/realtime?model=gpt-realtime" in banner
    assert f"Token:  {TOKEN}" in banner
    assert "pip install" not in banner
    python = block(banner, "Python (python hello.py):")
    ast.parse(python)  # the snippet is valid Python as printed
    assert 'websocket_base_url="ws://127.0.0.1:8080/v1"' in python
    assert "run `realtime-gateway dev --tls`" in banner  # openai-node cannot dial ws://
    assert "NODE_EXTRA_CA_CERTS" not in banner
    assert "python examples/wav_client.py --url ws://127.0.0.1:8080/v1" in banner


def test_a_missing_openai_gets_the_exact_install_line_before_the_snippet() -> None:
    banner = dev_banner(version="1.2.3", port=8080, token=TOKEN, upstream="the emulator",
                        tls=None, missing=["openai"])
    line = f"    {shlex.quote(sys.executable)} -m pip install openai\n"
    assert f"openai not installed in this Python ({sys.executable}); install with:\n" \
           f"{line}Python (python hello.py):\n" in banner
    # the WAV example needs openai too: its own line names the same package
    assert banner.count(line) == 2


def test_missing_audio_packages_are_named_for_the_wav_example_only() -> None:
    banner = dev_banner(version="1.2.3", port=8080, token=TOKEN, upstream="the emulator",
                        tls=None, missing=["soundfile", "soxr"])
    assert f"{shlex.quote(sys.executable)} -m pip install soundfile soxr\n" \
           "A recording of speech" in banner
    assert banner.count("pip install") == 1


def test_tls_prints_wss_urls_the_ca_and_a_node_snippet() -> None:
    banner = dev_banner(version="1.2.3", port=8443, token=TOKEN, upstream="the emulator",
                        tls=CERTS, missing=[])
    assert "URL:    wss://127.0.0.1:8443/v1/realtime?model=gpt-realtime" in banner
    assert "valid until 2030-01-02 03:04 UTC" in banner and "/state/tls/ca.pem" in banner
    node = block(banner, "Node (npm install openai ws; "
                         "NODE_EXTRA_CA_CERTS=/state/tls/ca.pem node hello.mjs):")
    assert 'baseURL: "https://127.0.0.1:8443/v1"' in node and 'apiKey: "<token>"' in node
    python = block(banner, "Python (SSL_CERT_FILE=/state/tls/ca.pem python hello.py):")
    assert 'websocket_base_url="wss://127.0.0.1:8443/v1"' in python
    assert "SSL_CERT_FILE=/state/tls/ca.pem python examples/wav_client.py --url " \
           "wss://127.0.0.1:8443/v1" in banner


def test_missing_modules_asks_this_python() -> None:
    assert missing_modules(["openai", "no_such_module_for_this_test"]) == [
        "no_such_module_for_this_test"]
    assert set(SNIPPET_MODULES) >= {"openai", "soundfile", "soxr"}
    assert install_line(["openai"]).endswith(" -m pip install openai")


async def test_dev_without_openai_prints_the_install_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # this Python cannot import openai (a None entry in sys.modules blocks the import)
    program = ("import sys; sys.modules['openai'] = None; from gateway.cli import main; "
               f"raise SystemExit(main(['dev', '--port', '{port}']))")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "OPENAI_API_KEY": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", program, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env)
    assert process.stdout is not None
    seen = ""
    try:
        async with asyncio.timeout(30):
            async for raw in process.stdout:
                seen += raw.decode(errors="replace")
                if "gateway.listening" in seen:
                    break
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert f"openai not installed in this Python ({sys.executable}); install with:\n" \
           f"    {shlex.quote(sys.executable)} -m pip install openai\n" \
           "Python (python hello.py):" in seen, seen
