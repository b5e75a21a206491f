"""The gateway's own /metrics, scraped for real: promtool-clean, queried through a real
Prometheus after a session, and able to answer every dashboard and alert expression."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from gateway.emulator.server import Emulator
from tests.ops.promql import (
    alerting_rules,
    dashboard_queries,
    grafana_to_promql,
    run_prometheus,
    run_promtool,
)
from tests.support.emulator import emulator_sessions
from tests.support.gateway import (
    MODEL,
    RunningGateway,
    gateway_config,
    mint,
    run_gateway,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "realtime-gateway" / "dashboards" / "realtime-gateway.json"
RULES = ROOT / "charts" / "realtime-gateway" / "files" / "realtime-gateway-rules.yaml"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None
                                or shutil.which("prometheus") is None,
                                reason="needs promtool and prometheus (apt-get install prometheus)")


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path) -> AsyncIterator[RunningGateway]:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            limits={"max_sessions": 50, "tokens_per_minute": 100000})
    async with run_gateway(config) as running:
        yield running


async def spoken_turn(gw: RunningGateway, key_file: Path) -> dict[str, Any]:
    """One text turn answered with audio; returns the response.done usage."""
    async with connect(gw.url(), additional_headers={
            "Authorization": f"Bearer {mint(key_file)}"}) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello there, how are you?"}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        async with asyncio.timeout(10):
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "response.done":
                    usage: dict[str, Any] = event["response"]["usage"]
                    return usage


async def scrape(gw: RunningGateway) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(gw.metrics_url)).text


async def test_metrics_after_a_session_pass_promtool(gw: RunningGateway, key_file: Path) -> None:
    await spoken_turn(gw, key_file)
    await wait_for(lambda: not gw.gateway.registry.sessions)
    text = await scrape(gw)
    for family in ("sessions_active", "sessions_total", "session_duration_seconds",
                   "handshake_duration_seconds", "messages_total", "message_bytes_total",
                   "closes_total", "tokens_total", "build_info", "draining"):
        assert f"realtime_gateway_{family}" in text
    result = run_promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


async def test_tokens_total_equals_upstream_usage_per_kind(gw: RunningGateway, key_file: Path,
                                                           emulator: Emulator) -> None:
    for _ in range(2):
        await spoken_turn(gw, key_file)
    await wait_for(lambda: not gw.gateway.registry.sessions)
    reported: dict[str, float] = {}
    for line in (await scrape(gw)).splitlines():
        if line.startswith("realtime_gateway_tokens_total{"):
            kind = line.split('kind="')[1].split('"')[0]
            reported[kind] = reported.get(kind, 0) + float(line.rsplit(" ", 1)[1])
    expected: dict[str, int] = {}
    for session in emulator_sessions(emulator):
        for kind in ("input_text", "input_audio", "input_image", "input_cached",
                     "output_text", "output_audio"):
            expected[kind] = expected.get(kind, 0) + session["usage"].get(kind, 0)
    assert expected["output_audio"] > 0 and expected["input_text"] > 0
    assert {k: v for k, v in reported.items() if v} == {k: v for k, v in expected.items() if v}


async def test_real_prometheus_scrapes_a_gateway_through_a_session(
        gw: RunningGateway, key_file: Path, tmp_path: Path) -> None:
    scrape_configs = [{"job_name": "realtime-gateway",
                       "static_configs": [{"targets": [f"127.0.0.1:{gw.metrics_port}"]}]}]
    async with run_prometheus(tmp_path / "prom", scrape_configs, [RULES]) as prom:
        await prom.wait_targets_up(["realtime-gateway"])
        async with connect(gw.url(), additional_headers={
                "Authorization": f"Bearer {mint(key_file)}"}) as ws:
            await ws.recv()
            active = await prom.wait_for(
                f'realtime_gateway_sessions_active{{tenant="acme",model="{MODEL}"}} == 1')
            assert active[0]["metric"]["upstream"] == "emulator"
        usage = await spoken_turn(gw, key_file)
        await wait_for(lambda: not gw.gateway.registry.sessions)
        await prom.wait_for("sum(realtime_gateway_sessions_active) == 0")
        tokens = await prom.wait_for(
            f'sum(realtime_gateway_tokens_total{{kind="output_audio"}}) == '
            f'{usage["output_token_details"]["audio_tokens"]}')
        assert tokens
        for phase in ("auth", "admission", "upstream_connect", "total"):
            count = await prom.wait_for(
                f'realtime_gateway_handshake_duration_seconds_count{{phase="{phase}"}} >= 2')
            assert float(count[0]["value"][1]) == 2
        # every dashboard and alert expression evaluates against the live gateway's series
        dashboard = json.loads(DASHBOARD.read_text())
        failures = []
        for query in dashboard_queries(dashboard):
            try:
                await prom.query(grafana_to_promql(query.expr))
            except Exception as exc:
                failures.append(f"{query.panel_title}: {exc}")
        for rule in alerting_rules(RULES):
            try:
                await prom.query(rule.expr)
            except Exception as exc:
                failures.append(f"{rule.alert}: {exc}")
        assert failures == []
