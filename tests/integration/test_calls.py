"""WebRTC calls through a real gateway (gateway.calls) to the emulator's real calls
(aiortc, loopback-only ICE): the openai SDK's calls.create/hangup, the sideband supervisor's
hang-ups (expiry, budget, drain, sideband 404), limits, ownership, CORS, SDP hygiene, logs."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from openai import AsyncOpenAI

from gateway.auth.client_secrets import SecretClaims, SigningKeys
from gateway.auth.client_secrets import mint as mint_secret
from gateway.calls import LiveCall
from gateway.config import DEFAULT_SCOPE, ClientSecretsConfig, Config
from gateway.emulator.server import Emulator
from tests.support.audio import silence_pcm16, tone_pcm16
from tests.support.gateway import (
    MODEL,
    UPSTREAM_KEY,
    RunningGateway,
    gateway_config,
    mint,
    run_gateway,
    wait_for,
)
from tests.support.redis_server import RedisServer
from tests.support.webrtc import Caller

SPEECH = tone_pcm16(900) + silence_pcm16(1200)


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator(api_key=UPSTREAM_KEY, webrtc=True, loopback_ice=True) as emu:
        yield emu


def _config(emulator: Emulator, key_file: Path, **kwargs: Any) -> Config:
    """The test gateway's config with the emulator's calls port as the upstream's calls_url."""
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, **kwargs)
    upstream = config.upstreams["emulator"].model_copy(
        update={"calls_url": emulator.calls_url})
    return config.model_copy(update={"upstreams": {"emulator": upstream}})


def _live_calls(gw: RunningGateway) -> list[LiveCall]:
    return [s for s in gw.gateway.registry.sessions if isinstance(s, LiveCall)]


async def _post_offer(gw: RunningGateway, token: str, caller: Caller,
                      **headers: str) -> httpx.Response:
    offer = await caller.offer()
    async with httpx.AsyncClient(timeout=20) as http:
        return await http.post(f"{gw.http}/v1/realtime/calls", content=offer.encode(),
                               headers={"Authorization": f"Bearer {token}",
                                        "Content-Type": "application/sdp", **headers})


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _metrics(gw: RunningGateway) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(gw.metrics_url)).text


async def test_openai_sdk_calls_create_meters_usage_and_hangs_up(
        emulator: Emulator, key_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = mint(key_file, sub="sdk-user")
    caller = Caller(SPEECH)
    with structlog.testing.capture_logs() as events:
        await _sdk_call(emulator, key_file, token, caller)
    await caller.close()
    assert {"call.sideband_attached", "call.hangup", "session.start", "session.end"} <= {
        e["event"] for e in events}
    assert [e["transport"] for e in events if e["event"] == "session.start"] == ["webrtc"]
    library_lines = [f"{r.getMessage()} {r.__dict__}" for r in caplog.records
                     if r.name.startswith(("uvicorn", "httpx", "httpcore", "websockets"))]
    logged = "\n".join([*map(str, events), *library_lines])
    assert "v=0" not in logged and "a=ice-pwd" not in logged  # no SDP in any log line
    leaks = [line for line in logged.splitlines() if token in line or UPSTREAM_KEY in line]
    assert not leaks, leaks[:3]


async def _sdk_call(emulator: Emulator, key_file: Path, token: str, caller: Caller) -> None:
    async with (run_gateway(_config(emulator, key_file)) as gw,
                AsyncOpenAI(api_key=token, base_url=f"{gw.http}/v1") as client):
        offer = await caller.offer()
        answer = await client.realtime.calls.create(
            sdp=offer, session={"type": "realtime", "model": "gpt-realtime",
                                "instructions": "Be brief."})
        sdp = answer.text
        assert sdp.startswith("v=0")
        await caller.answer(sdp)
        [call_id] = [c.call_id for c in _live_calls(gw)]
        await wait_for(lambda: emulator.calls() and emulator.calls()[0].sidebands == 1, 10)
        caller.microphone.speak.set()
        await caller.wait_for_event("response.done")
        record = emulator.calls()[0]
        assert record.auth == "bearer"  # the gateway's key, not the user's token
        assert record.model == "gpt-realtime"
        await client.realtime.calls.hangup(call_id)
        await wait_for(lambda: not _live_calls(gw), 5)
        record = emulator.calls()[0]
        assert record.hangups == 1 and record.closed
        assert record.audio_bytes > 0
        metrics = await _metrics(gw)
        tokens = _metric(metrics, "realtime_gateway_tokens_total", tenant="acme")
        assert tokens == record.usage["total_tokens"] > 0
        assert _metric(metrics, "realtime_gateway_call_hangups_total",
                       cause="client_hangup") == 1


async def test_expiry_hangs_up_within_a_second(emulator: Emulator, key_file: Path) -> None:
    async with run_gateway(_config(emulator, key_file)) as gw:
        token = mint(key_file, ttl=3)
        exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))["exp"]
        caller = Caller(b"")
        response = await _post_offer(gw, token, caller)
        assert response.status_code == 201, response.text
        await caller.answer(response.text)
        await wait_for(lambda: emulator.calls() and emulator.calls()[0].closed, 8)
        ended = emulator.calls()[0].ended_at
        assert ended is not None and ended - exp <= 1.0
        assert emulator.calls()[0].close_initiator == "hangup"
        await wait_for(lambda: not _live_calls(gw), 3)
        await caller.close()
        assert _metric(await _metrics(gw), "realtime_gateway_call_hangups_total",
                       cause="token_expired") == 1


async def test_budget_overdraft_hangs_up(emulator: Emulator, key_file: Path) -> None:
    limits = {"tokens_per_minute": 10, "token_overdraft": 0}
    async with run_gateway(_config(emulator, key_file, limits=limits)) as gw:
        caller = Caller(SPEECH)
        response = await _post_offer(gw, mint(key_file), caller)
        assert response.status_code == 201, response.text
        await caller.answer(response.text)
        await wait_for(lambda: emulator.calls() and emulator.calls()[0].sidebands == 1, 10)
        caller.microphone.speak.set()
        await wait_for(lambda: emulator.calls()[0].closed, 20)
        assert emulator.calls()[0].close_initiator == "hangup"
        await wait_for(lambda: not _live_calls(gw), 3)
        await caller.close()
        assert _metric(await _metrics(gw), "realtime_gateway_call_hangups_total",
                       cause="budget_exhausted") == 1


async def test_sideband_refused_hangs_up(emulator: Emulator, key_file: Path) -> None:
    models = {"gpt-realtime": {"upstream": "emulator",
                               "upstream_model": "gpt-realtime,fault-no-sideband"}}
    async with run_gateway(_config(emulator, key_file, models=models)) as gw:
        caller = Caller(b"")
        response = await _post_offer(gw, mint(key_file), caller)
        assert response.status_code == 201, response.text
        await wait_for(lambda: not _live_calls(gw), 5)
        assert emulator.calls()[0].hangups == 1
        await caller.close()
        assert _metric(await _metrics(gw), "realtime_gateway_call_hangups_total",
                       cause="sideband_unavailable") == 1


async def test_drain_hangs_up_live_calls(emulator: Emulator, key_file: Path) -> None:
    async with run_gateway(_config(emulator, key_file, server={"drain_seconds": 0})) as gw:
        caller = Caller(b"")
        response = await _post_offer(gw, mint(key_file), caller)
        assert response.status_code == 201
        await wait_for(lambda: emulator.calls() and emulator.calls()[0].sidebands == 1, 10)
        gw.server.handle_exit(15, None)
        await wait_for(lambda: emulator.calls()[0].closed, 10)
        assert emulator.calls()[0].hangups == 1
        await caller.close()


async def test_limits_stranger_hangup_and_slot_release(emulator: Emulator,
                                                       key_file: Path) -> None:
    async with run_gateway(_config(emulator, key_file,
                                   limits={"max_sessions_per_user": 2})) as gw:
        token = mint(key_file, sub="alice")
        callers = [Caller(b"") for _ in range(4)]
        first = await _post_offer(gw, token, callers[0])
        second = await _post_offer(gw, token, callers[1])
        third = await _post_offer(gw, token, callers[2])
        assert (first.status_code, second.status_code) == (201, 201)
        assert third.status_code == 429
        assert third.json()["error"]["code"] == "rate_limited"
        assert "retry-after" in third.headers
        call_id = first.headers["location"].rsplit("/", 1)[1]
        async with httpx.AsyncClient(timeout=10) as http:
            stranger = await http.post(
                f"{gw.http}/v1/realtime/calls/{call_id}/hangup",
                headers={"Authorization": f"Bearer {mint(key_file, sub='mallory')}"})
            unknown = await http.post(
                f"{gw.http}/v1/realtime/calls/rtc_{'0' * 32}/hangup",
                headers={"Authorization": f"Bearer {token}"})
            malformed = await http.post(
                f"{gw.http}/v1/realtime/calls/..%2F..%2Fadmin/hangup",
                headers={"Authorization": f"Bearer {token}"})
            assert (stranger.status_code, unknown.status_code, malformed.status_code) == (
                404, 404, 404)
            owner = await http.post(f"{gw.http}/v1/realtime/calls/{call_id}/hangup",
                                    headers={"Authorization": f"Bearer {token}"})
            assert owner.status_code == 200
        fourth = await _post_offer(gw, token, callers[3])
        assert fourth.status_code == 201  # the hang-up freed the slot
        for caller in callers:
            await caller.close()


async def test_cors_preflight_and_exposed_location(emulator: Emulator, key_file: Path) -> None:
    origin = "https://app.example"
    async with run_gateway(_config(emulator, key_file,
                                   server={"allowed_origins": [origin]})) as gw:
        async with httpx.AsyncClient(timeout=10) as http:
            preflight = await http.options(
                f"{gw.http}/v1/realtime/calls",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers":
                             "authorization, content-type, x-openai-agents-sdk"})
            other = await http.options(
                f"{gw.http}/v1/realtime/calls",
                headers={"Origin": "https://evil.example",
                         "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "x-openai-agents-sdk"} <= {
            h.strip() for h in allowed.split(",")}
        assert "access-control-allow-origin" not in other.headers
        caller = Caller(b"")
        response = await _post_offer(gw, mint(key_file), caller, Origin=origin)
        assert response.status_code == 201
        assert "location" in response.headers["access-control-expose-headers"].lower()
        refused = await _post_offer(gw, mint(key_file), caller, Origin="https://evil.example")
        assert refused.status_code == 403
        await caller.close()


async def test_sdp_refusals_leave_the_emulator_untouched(emulator: Emulator,
                                                         key_file: Path) -> None:
    models = {"gpt-realtime": {"upstream": "emulator"}}
    async with run_gateway(_config(emulator, key_file, models=models)) as gw:
        token = mint(key_file)
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"{gw.http}/v1/realtime/calls"
            big = await http.post(url, content=b"v=0\r\n" + b"a" * 70_000,
                                  headers={**auth, "Content-Type": "application/sdp"})
            not_sdp = await http.post(url, content=b"hello",
                                      headers={**auth, "Content-Type": "application/sdp"})
            not_utf8 = await http.post(url, content=b"v=0\r\n\xff\xfe",
                                       headers={**auth, "Content-Type": "application/sdp"})
            mcp = await http.post(url, headers=auth, files={
                "sdp": (None, b"v=0\r\n", "application/sdp"),
                "session": (None, json.dumps({"type": "realtime", "tools": [
                    {"type": "mcp", "server_url": "https://mcp.example"}]}).encode(),
                    "application/json")})
            no_token = await http.post(url, content=b"v=0\r\n",
                                       headers={"Content-Type": "application/sdp"})
            other_model = await http.post(url, headers=auth, files={
                "sdp": (None, b"v=0\r\n", "application/sdp"),
                "session": (None, b'{"type": "realtime", "model": "gpt-4o"}',
                            "application/json")})
        assert big.status_code == 413
        assert not_sdp.status_code == 400 and not_utf8.status_code == 400
        assert mcp.status_code == 403 and mcp.json()["error"]["code"] == "forbidden"
        assert no_token.status_code == 401
        assert other_model.status_code == 403
        assert emulator.calls() == [] and emulator.connections == 0


@pytest.mark.parametrize(("session", "cause"), [
    pytest.param({"model": "gpt-4o-realtime-preview"}, "model_forbidden", id="model"),
    pytest.param({"tools": [{"type": "mcp", "server_label": "x",
                             "server_url": "https://mcp.example"}]}, "mcp_forbidden", id="mcp"),
])
async def test_session_updated_with_forbidden_settings_hangs_up(
        emulator: Emulator, key_file: Path, session: dict[str, Any], cause: str) -> None:
    async with run_gateway(_config(emulator, key_file)) as gw:
        caller = Caller(b"")
        response = await _post_offer(gw, mint(key_file), caller)
        assert response.status_code == 201
        await caller.answer(response.text)
        await caller.wait_for_event("session.created")
        await wait_for(lambda: emulator.calls()[0].sidebands == 1, 10)
        # The data channel goes straight to the upstream: the gateway sees the change only
        # on the sideband's session.updated, and hangs up.
        caller.send({"type": "session.update", "session": {"type": "realtime", **session}})
        await wait_for(lambda: not _live_calls(gw), 10)
        assert emulator.calls()[0].hangups == 1
        await caller.close()
        assert _metric(await _metrics(gw), "realtime_gateway_call_hangups_total",
                       cause=cause) == 1


async def test_client_secret_call_uses_its_model_and_session_template(
        emulator: Emulator, key_file: Path) -> None:
    config = _config(emulator, key_file)
    secret_config = config.model_copy(update={"client_secrets": ClientSecretsConfig()})
    keys = (("k1", b"calls-test-signing-key-0123456789abcdef"),)
    secret_config.client_secrets._signing_keys = keys  # type: ignore[union-attr]
    now = int(time.time())
    claims = SecretClaims(tenant="acme", subject="ek-user", scope=DEFAULT_SCOPE, model=MODEL,
                          session={"type": "realtime", "model": MODEL,
                                   "instructions": "Template instructions."},
                          iat=now, exp=now + 60, token_exp=now + 600, jti="jti-calls-test")
    secret = mint_secret(SigningKeys(keys), claims)
    async with run_gateway(secret_config) as gw:
        caller = Caller(b"")
        response = await _post_offer(gw, secret, caller)  # agents-js: raw SDP, no model
        assert response.status_code == 201, response.text
        await caller.answer(response.text)
        created = await caller.wait_for_event("session.created")
        assert created["session"]["model"] == MODEL
        assert created["session"]["instructions"] == "Template instructions."
        async with httpx.AsyncClient(timeout=10) as http:
            other = await http.post(f"{gw.http}/v1/realtime/calls", headers={
                "Authorization": f"Bearer {secret}"}, files={
                "sdp": (None, b"v=0\r\n", "application/sdp"),
                "session": (None, b'{"type": "realtime", "model": "gpt-other"}',
                            "application/json")})
        assert other.status_code == 403
        await caller.close()


async def test_azure_upstream_gets_the_ga_calls_shape(key_file: Path) -> None:
    async with Emulator(api_key=UPSTREAM_KEY, webrtc=True, loopback_ice=True) as emulator:
        config = gateway_config(f"{emulator.url}/openai/v1/realtime", key_file,
                                provider="azure",
                                models={"my-deployment": {"upstream": "emulator"}})
        calls = emulator.calls_url.replace("/v1/realtime/calls", "/openai/v1/realtime/calls")
        upstream = config.upstreams["emulator"].model_copy(update={"calls_url": calls})
        config = config.model_copy(update={"upstreams": {"emulator": upstream}})
        async with run_gateway(config) as gw:
            caller = Caller(b"")
            response = await _post_offer(gw, mint(key_file), caller)
            assert response.status_code == 201, response.text
            await wait_for(lambda: emulator.calls() and emulator.calls()[0].sidebands == 1, 10)
            record = emulator.calls()[0]
            assert (record.path, record.auth, record.model) == (
                "/openai/v1/realtime/calls", "api-key", "my-deployment")
            await caller.close()


async def test_hangup_reaching_another_replica_ends_the_call(
        emulator: Emulator, key_file: Path) -> None:
    with RedisServer() as redis:
        config = _config(emulator, key_file, redis={"url": redis.url})
        token = mint(key_file, sub="roamer")
        async with run_gateway(config) as first, run_gateway(config) as second:
            caller = Caller(b"")
            response = await _post_offer(first, token, caller)
            assert response.status_code == 201
            await wait_for(lambda: emulator.calls()[0].sidebands == 1, 10)
            location = response.headers["location"]
            async with httpx.AsyncClient(timeout=10) as http:
                stranger = await http.post(
                    f"{second.http}{location}/hangup",
                    headers={"Authorization": f"Bearer {mint(key_file, sub='other')}"})
                hangup = await http.post(f"{second.http}{location}/hangup",
                                         headers={"Authorization": f"Bearer {token}"})
            assert (stranger.status_code, hangup.status_code) == (404, 200)
            # The replica holding the call sees its sideband end and releases the lease; the
            # record already gone, it counts the caller's hang-up, not the upstream's end.
            async def counted() -> bool:
                return _metric(await _metrics(first), "realtime_gateway_call_hangups_total",
                               cause="client_hangup") == 1
            await wait_for(lambda: not _live_calls(first), 10)
            await wait_for(counted, 5)
            assert emulator.calls()[0].hangups == 1
            assert _metric(await _metrics(first), "realtime_gateway_call_hangups_total",
                           cause="upstream_ended") == 0
            await caller.close()


async def test_upstream_refusal_is_a_502_and_frees_the_slot(emulator: Emulator,
                                                            key_file: Path) -> None:
    models = {"gpt-realtime": {"upstream": "emulator",
                               "upstream_model": "gpt-realtime,fault-refuse-429"},
              "gpt-realtime-ok": {"upstream": "emulator"}}
    config = _config(emulator, key_file, models=models, limits={"max_sessions_per_user": 1})
    async with run_gateway(config) as gw:
        token = mint(key_file)
        caller = Caller(b"")
        refused = await _post_offer(gw, token, caller)  # no model: the tenant's first
        assert refused.status_code == 502
        assert refused.json()["error"]["code"] == "upstream_error"
        async with httpx.AsyncClient(timeout=20) as http:
            admitted = await http.post(f"{gw.http}/v1/realtime/calls?model=gpt-realtime-ok",
                                       content=(await caller.offer()).encode(), headers={
                                           "Authorization": f"Bearer {token}",
                                           "Content-Type": "application/sdp"})
        assert admitted.status_code == 201  # the refused call's lease was released
        assert _metric(await _metrics(gw), "realtime_gateway_upstream_connect_errors_total",
                       reason="status_429") == 1
        await caller.close()
