"""The voice demo's WebRTC switch in a real ``realtime-gateway dev``, inside the caller's
private network namespace (``unshare -n``, only ``lo`` up).

Run by ``tests/sdk/test_demo_webrtc.py`` as ``python -m tests.sdk.demo_webrtc_rig`` with a
JSON spec on stdin: ``{chromium, flags, work_dir, screenshot}``.  Starts ``dev --loopback-ice``
(the emulator's calls offer 127.0.0.1 only: there is no other address here), drives the page
with ``demo_webrtc.mjs``, stops ``dev`` with SIGTERM and prints one JSON line:
``{page, exit_code, output}`` (``output``: everything ``dev`` printed and logged).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from typing import Any

from tests.sdk.helpers import free_port, run_node

STARTUP_SECONDS = 30.0


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": spec["work_dir"], "OPENAI_API_KEY": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "dev", "--port", str(port), "--loopback-ice",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    assert process.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(STARTUP_SECONDS):
            async for raw in process.stdout:
                seen.append(raw.decode(errors="replace"))
                if re.search(r"gateway.listening", "".join(seen)):
                    break
        run = await run_node("demo_webrtc.mjs", {
            "chromium": spec["chromium"], "flags": spec["flags"],
            "url": f"http://127.0.0.1:{port}/", "screenshot": spec["screenshot"],
        }, packages=["playwright-core"], within=90)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            rest, _ = await process.communicate()
        seen.append(rest.decode(errors="replace"))
        return {"page": run.result, "exit_code": process.returncode, "output": "".join(seen)}
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.stdin.read())))))
