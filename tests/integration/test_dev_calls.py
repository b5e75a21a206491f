"""``realtime-gateway dev`` proxies WebRTC calls to its emulator's real peer connections.

The offer is an aiortc one with its candidates removed, so neither peer ever sends a
connectivity check: the test proves the POST → forward → 201 + SDP answer → hang-up path of
a real ``dev`` process without any media (the browser test holds a whole call, in a network
namespace of its own).
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.integration.test_cli import command, free_port, read_until

pytest.importorskip("aiortc", reason="aiortc is not installed (the webrtc extra)")

from tests.support.webrtc import Caller


async def test_dev_answers_calls_through_its_emulator(tmp_path: Path) -> None:
    port = free_port()
    env = {"XDG_STATE_HOME": str(tmp_path), "OPENAI_API_KEY": ""}
    caller = Caller(b"")
    offer = "".join(line for line in (await caller.offer()).splitlines(keepends=True)
                    if not line.startswith("a=candidate"))
    await caller.close()
    async with command("dev", "--port", str(port), env=env) as process:
        token_line, _ = await read_until(process, r"^Token:\s+(\S+)$")
        await read_until(process, r"gateway.listening")
        auth = {"Authorization": f"Bearer {token_line.group(1)}"}
        async with httpx.AsyncClient(timeout=20) as http:
            answer = await http.post(f"http://127.0.0.1:{port}/v1/realtime/calls",
                                     content=offer.encode(),
                                     headers={**auth, "Content-Type": "application/sdp"})
            assert answer.status_code == 201, answer.text
            assert answer.text.startswith("v=0")
            location = answer.headers["location"]
            hangup = await http.post(f"http://127.0.0.1:{port}{location}/hangup", headers=auth)
            assert hangup.status_code == 200
        process.send_signal(signal.SIGTERM)
        _, output = await read_until(process, r"gateway.drained")
        assert "cause=client_hangup" in output or "client_hangup" in output
        assert "a=ice-pwd" not in output  # the SDP is never logged
