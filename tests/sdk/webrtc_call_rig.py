"""One browser WebRTC call through a real gateway to the emulator, inside the caller's
private network namespace (``unshare -n`` with only ``lo`` up: nothing but loopback exists).

Run by ``tests/sdk/test_agents_webrtc.py`` as ``python -m tests.sdk.webrtc_call_rig`` with a
JSON spec on stdin: ``{chromium, flags, wav, work_dir}``.  It starts the emulator (WebRTC,
loopback-only ICE), a gateway with client secrets whose ``allowed_origins`` is the page's
origin, a page server for ``pages/agents_webrtc.html`` with @openai/agents-realtime's browser
bundle, mints a gateway ``ek_`` and runs ``agents_webrtc.mjs``.  When the page is done it hangs
the call up through the gateway (as the owner), waits for the call to end and prints one JSON
line: ``{call, consoleErrors, gateway_tokens, emulator_tokens, record, live_after}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.auth.client_secrets import SecretClaims, SigningKeys, mint
from gateway.calls import LiveCall
from gateway.config import DEFAULT_SCOPE, Config, parse_config
from gateway.emulator.server import Emulator
from tests.sdk.helpers import NODE_MODULES, SDK_DIR, run_node, serve_directory
from tests.support.gateway import (
    AUDIENCE,
    ISSUER,
    MODEL,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    RunningGateway,
    run_gateway,
    wait_for,
)

BUNDLE = NODE_MODULES / "@openai" / "agents-realtime" / "dist" / "bundle"
SECRET_ENV = "TEST_SECRET_KEY"
SECRET_KEY = "webrtc-rig-signing-key-0123456789abcdef"


def rig_config(emulator: Emulator, key_file: Path, origin: str) -> Config:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "drain_seconds": 5,
                   "allowed_origins": [origin]},
        "client_secrets": {"signing_key_env": SECRET_ENV},
        "upstreams": {"emulator": {"provider": "openai", "url": f"{emulator.url}/v1/realtime",
                                   "calls_url": emulator.calls_url,
                                   "api_key_env": UPSTREAM_KEY_ENV}},
        "tenants": [{
            "id": "acme",
            "auth": {"issuer": ISSUER, "dev_issuer": {"key_file": str(key_file)},
                     "audiences": [AUDIENCE], "leeway_seconds": 0},
            "models": {MODEL: {"upstream": "emulator"}},
        }],
    }
    return parse_config(data, {UPSTREAM_KEY_ENV: UPSTREAM_KEY, SECRET_ENV: SECRET_KEY})


def client_secret(config: Config, subject: str) -> str:
    """A gateway ``ek_`` for ``subject`` (what ``POST /v1/realtime/client_secrets`` mints)."""
    assert config.client_secrets is not None
    now = int(time.time())
    claims = SecretClaims(tenant="acme", subject=subject, scope=DEFAULT_SCOPE, model=MODEL,
                          session={"type": "realtime", "model": MODEL}, iat=now,
                          exp=now + 300, token_exp=now + 600, jti=secrets.token_urlsafe(16))
    return mint(SigningKeys.from_config(config.client_secrets), claims)


def tokens_counted(gw: RunningGateway) -> int:
    total = 0.0
    for family in gw.gateway.services.metrics.registry.collect():
        if family.name == "realtime_gateway_tokens":
            total += sum(s.value for s in family.samples if s.name.endswith("_total")
                         and s.labels.get("kind") != "input_cached")
    return int(total)


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    work = Path(spec["work_dir"])
    site = work / "site"
    site.mkdir(parents=True)
    shutil.copy(SDK_DIR / "pages" / "agents_webrtc.html", site / "index.html")
    (site / "agents").symlink_to(BUNDLE, target_is_directory=True)
    async with Emulator(api_key=UPSTREAM_KEY, webrtc=True, loopback_ice=True) as emulator:
        with serve_directory(site) as origin:
            config = rig_config(emulator, work / "issuer" / "key.json", origin)
            async with run_gateway(config) as gw:
                secret = client_secret(config, "browser-user")
                run = await run_node("agents_webrtc.mjs", {
                    "chromium": spec["chromium"], "flags": spec["flags"],
                    "page": f"{origin}/index.html",
                    "callsUrl": f"{gw.http}/v1/realtime/calls", "apiKey": secret,
                }, packages=["playwright-core"], within=90)
                report = dict(run.result)
                call_id = report["call"].get("callId")
                if call_id:
                    async with httpx.AsyncClient(timeout=10) as http:
                        hangup = await http.post(
                            f"{gw.http}/v1/realtime/calls/{call_id}/hangup",
                            headers={"Authorization": f"Bearer {secret}"})
                    report["hangup_status"] = hangup.status_code
                await wait_for(lambda: not any(isinstance(s, LiveCall)
                                               for s in gw.gateway.registry.sessions), 10)
                report["live_after"] = len(gw.gateway.registry.sessions)
                report["gateway_tokens"] = tokens_counted(gw)
        records = [r.to_dict() for r in emulator.calls()]
    report["records"] = records
    report["emulator_tokens"] = sum(r["usage"]["total_tokens"]
                                    + r["transcription_usage"]["total_tokens"] for r in records)
    return report


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.stdin.read())))
    print(json.dumps(result))
