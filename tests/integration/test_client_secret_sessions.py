"""Client secrets end to end (CONTRACT §8): minted by ``POST /v1/realtime/client_secrets``
through the real ``openai`` SDK, refused as §5 says, and used on the socket — in every
carrier, pinned to their model, with their session template applied first, counted
against the minting user's limits, closed 4401 when the minting token expires — across
rotation and two replicas sharing the key.  The emulator must see no connection for any
refusal."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from gateway.auth.client_secrets import SecretClaims, SigningKeys, mint, verify
from gateway.emulator.server import Emulator
from tests.support.emulator import emulator_sessions
from tests.support.gateway import (
    MODEL,
    SECRET_KEY,
    RunningGateway,
    gateway_config,
    run_gateway,
    wait_for,
)
from tests.support.gateway import (
    mint as mint_token,
)

OTHER_MODEL = "gpt-realtime-mini"
MODELS = {MODEL: {"upstream": "emulator"}, OTHER_MODEL: {"upstream": "emulator"}}
TEMPLATE = {"type": "realtime", "model": MODEL, "instructions": "Answer like a pirate."}


@pytest.fixture
async def gw(emulator: Emulator, key_file: Path) -> AsyncIterator[RunningGateway]:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, models=MODELS,
                            limits={"max_sessions_per_user": 1,
                                    "session_starts_per_minute_per_user": 30},
                            secret_keys=SECRET_KEY)
    async with run_gateway(config) as running:
        yield running


async def create(gw: RunningGateway, token: str, **params: Any) -> Any:
    """``client.realtime.client_secrets.create`` of the real SDK, as a backend calls it."""
    async with AsyncOpenAI(api_key=token, base_url=f"{gw.http}/v1", max_retries=0) as client:
        return await client.realtime.client_secrets.create(**params)


async def post(gw: RunningGateway, body: Any, headers: dict[str, str] | None = None,
               path: str = "/v1/realtime/client_secrets") -> httpx.Response:
    async with httpx.AsyncClient() as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await client.post(f"{gw.http}{path}", content=content,
                                 headers={"content-type": "application/json", **(headers or {})})


def browser(gw: RunningGateway, secret: str, model: str | None = MODEL) -> Any:
    """The seed's browser socket: ``["realtime", "openai-insecure-api-key." + ek]``."""
    url = gw.url(model=model or "")
    return connect(url, subprotocols=[Subprotocol("realtime"),
                                      Subprotocol(f"openai-insecure-api-key.{secret}")])


async def first_events(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while len(events) < n:
            events.append(json.loads(await ws.recv()))
    return events


async def refused_in_band(ws: ClientConnection) -> tuple[str, int]:
    """(error code, close code) of a subprotocol client refused after the accept."""
    async with asyncio.timeout(10):
        event = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert event["type"] == "error"
    assert ws.close_code is not None
    return event["error"]["code"], ws.close_code


# -- minting ------------------------------------------------------------------------------

async def test_the_python_sdk_mints_a_secret_in_openais_shapes(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    token = mint_token(key_file, ttl=600)
    before = time.time()
    secret = await create(gw, token, expires_after={"anchor": "created_at", "seconds": 300},
                          session=TEMPLATE)
    assert secret.value.startswith("ek_") and len(secret.value) < 1024
    assert before + 299 <= secret.expires_at <= time.time() + 300
    assert secret.session.model == MODEL
    assert secret.session.instructions == "Answer like a pirate."
    assert emulator.connections == 0  # the gateway minted it itself
    minted = await wait_metric(gw, "realtime_gateway_client_secrets_minted_total", tenant="acme")
    assert minted == 1


async def test_a_secret_expires_with_the_token_that_minted_it(
        gw: RunningGateway, key_file: Path) -> None:
    token = mint_token(key_file, ttl=60)
    secret = await create(gw, token, expires_after={"anchor": "created_at", "seconds": 3600})
    assert secret.expires_at <= time.time() + 60  # min(created + seconds, token exp)
    assert secret.session.model == MODEL  # the tenant's first, by default


@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    ({}, {}, 401, "invalid_request"),
    ({"Authorization": "Bearer not-a-token"}, {}, 401, "invalid_token"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, {}, 401, "invalid_request"),
    ("no-scope", {}, 403, "insufficient_scope"),
    ("token", {"session": {"type": "realtime", "model": "gpt-5-pro"}}, 403, "forbidden"),
    ("token", {"expires_after": {"anchor": "created_at", "seconds": 9}}, 400,
     "invalid_request"),
    ("token", {"expires_after": {"anchor": "created_at", "seconds": 7201}}, 400,
     "invalid_request"),
    ("token", {"expires_after": {"anchor": "now", "seconds": 60}}, 400, "invalid_request"),
    ("token", {"session": {"type": "transcription"}}, 400, "invalid_request"),
    ("token", b"{not json", 400, "invalid_request"),
    ("token", b"[" * 70000, 400, "invalid_request"),
    ("secret", {}, 401, "invalid_token"),
])
async def test_minting_refusals_follow_contract_5(
        gw: RunningGateway, emulator: Emulator, key_file: Path, headers: Any, body: Any,
        status: int, code: str) -> None:
    if headers == "token":
        headers = {"Authorization": f"Bearer {mint_token(key_file)}"}
    elif headers == "no-scope":
        headers = {"Authorization": f"Bearer {mint_token(key_file, scope='other:scope')}"}
    elif headers == "secret":  # a client secret cannot mint client secrets
        secret = await create(gw, mint_token(key_file))
        headers = {"Authorization": f"Bearer {secret.value}"}
    answer = await post(gw, body, headers)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("gateway_error", code)
    assert answer.headers["cache-control"] == "no-store"
    if status == 401 and code == "invalid_token":
        assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert emulator.connections == 0


async def test_minting_is_held_to_the_start_rate(gw: RunningGateway, key_file: Path) -> None:
    token = mint_token(key_file, sub="rapid")
    codes = [(await post(gw, {}, {"Authorization": f"Bearer {token}"})).status_code
             for _ in range(31)]
    assert codes[:30] == [200] * 30  # 30 a minute, the tenant's session start rate
    refusal = await post(gw, {}, {"Authorization": f"Bearer {token}"})
    assert refusal.status_code == 429
    assert int(refusal.headers["retry-after"]) >= 1
    assert refusal.json()["error"]["code"] == "rate_limited"
    other = await post(gw, {}, {"Authorization": f"Bearer {mint_token(key_file, sub='calm')}"})
    assert other.status_code == 200  # per user


async def test_the_endpoint_is_absent_without_client_secrets(
        emulator: Emulator, key_file: Path) -> None:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file)
    async with run_gateway(config) as gw:
        answer = await post(gw, {}, {"Authorization": f"Bearer {mint_token(key_file)}"})
        assert answer.status_code == 404
        with pytest.raises(InvalidStatus) as refused:  # and ek_ tokens are refused
            async with connect(gw.url(), additional_headers={
                    "Authorization": "Bearer ek_abcdefgh.ijklmnop.qrstuvwx"}):
                pass
        assert refused.value.response.status_code == 401


async def test_the_openai_path_prefix_mints_too(gw: RunningGateway, key_file: Path) -> None:
    answer = await post(gw, {}, {"Authorization": f"Bearer {mint_token(key_file)}"},
                        path="/openai/v1/realtime/client_secrets")
    assert answer.status_code == 200 and answer.json()["value"].startswith("ek_")


# -- sessions opened with a secret ----------------------------------------------------------

async def test_a_browser_session_starts_with_the_secrets_template(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    secret = await create(gw, mint_token(key_file), session=TEMPLATE)
    async with browser(gw, secret.value) as ws:
        assert ws.subprotocol == "realtime"
        created, updated = await first_events(ws, 2)
        assert created["type"] == "session.created"
        assert updated["type"] == "session.updated"  # before the client sent anything
        assert updated["session"]["instructions"] == "Answer like a pirate."
    record = emulator_sessions(emulator)[-1]
    assert record["client_events"] == {"session.update": 1}
    assert record["model"] == MODEL
    assert not any("ek_" in value for value in record["query"].values())
    assert all("ek_" not in offer for offer in record["subprotocols"])


@pytest.mark.parametrize("carrier", ["authorization", "bearer", "insecure", "api-key",
                                     "query"])
async def test_a_secret_is_accepted_in_every_carrier(
        gw: RunningGateway, emulator: Emulator, key_file: Path, carrier: str) -> None:
    secret = (await create(gw, mint_token(key_file))).value
    headers: dict[str, str] = {}
    offers: list[Subprotocol] = []
    url = gw.url(**{"api-key": secret}) if carrier == "query" else gw.url()
    if carrier == "authorization":
        headers["Authorization"] = f"Bearer {secret}"
    elif carrier == "api-key":
        headers["api-key"] = secret
    elif carrier == "bearer":
        offers.append(Subprotocol(f"Bearer-{secret}"))
    elif carrier == "insecure":
        offers += [Subprotocol("realtime"), Subprotocol(f"openai-insecure-api-key.{secret}")]
    async with connect(url, additional_headers=headers, subprotocols=offers or None) as ws:
        (created,) = await first_events(ws, 1)
        assert created["type"] == "session.created"
    record = emulator_sessions(emulator)[-1]
    assert record["auth"] == "bearer"  # the gateway's own key
    assert "api-key" not in record["query"]  # never forwarded


async def test_a_secret_session_may_leave_the_model_out(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    secret = await create(gw, mint_token(key_file),
                          session={"type": "realtime", "model": OTHER_MODEL})
    async with browser(gw, secret.value, model=None) as ws:
        await first_events(ws, 1)
    assert emulator_sessions(emulator)[-1]["model"] == OTHER_MODEL


async def test_a_secret_opens_only_its_own_model(
        gw: RunningGateway, emulator: Emulator, key_file: Path) -> None:
    secret = (await create(gw, mint_token(key_file))).value  # MODEL
    async with browser(gw, secret, model=OTHER_MODEL) as ws:
        assert await refused_in_band(ws) == ("forbidden", 4403)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(gw.url(model=OTHER_MODEL),
                           additional_headers={"Authorization": f"Bearer {secret}"}):
            pass
    assert refused.value.response.status_code == 403
    assert emulator.connections == 0


def forged(claims: SecretClaims, keys: str, **changes: Any) -> str:
    return mint(SigningKeys.parse(keys), dataclasses.replace(claims, **changes))


@pytest.mark.parametrize("kind", ["tampered", "forged", "expired", "other_kid",
                                  "other_tenant", "truncated"])
async def test_bad_secrets_are_refused_like_invalid_tokens(
        gw: RunningGateway, emulator: Emulator, key_file: Path, kind: str) -> None:
    good = (await create(gw, mint_token(key_file))).value
    claims = verify(SigningKeys.parse(SECRET_KEY), good, time.time())
    secret = {
        "tampered": good[:-6] + ("A" if good[-6] != "A" else "B") + good[-5:],
        "forged": forged(claims, "another-signing-key-of-at-least-32-bytes"),
        "expired": forged(claims, SECRET_KEY, exp=int(time.time()) - 1),
        "other_kid": forged(claims, f"k9:{SECRET_KEY}"),
        "other_tenant": forged(claims, SECRET_KEY, tenant="globex"),
        "truncated": good[:40],
    }[kind]
    async with browser(gw, secret) as ws:
        assert await refused_in_band(ws) == ("invalid_token", 4401)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(gw.url(), additional_headers={"Authorization": f"Bearer {secret}"}):
            pass
    assert refused.value.response.status_code == 401
    assert emulator.connections == 0


async def test_a_secret_session_counts_against_the_users_limits(
        gw: RunningGateway, key_file: Path) -> None:
    token = mint_token(key_file, sub="alice")
    secret = (await create(gw, token)).value
    async with connect(gw.url(), additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await first_events(ws, 1)
        async with browser(gw, secret) as second:  # max_sessions_per_user: 1
            assert await refused_in_band(second) == ("rate_limited", 4429)


async def test_a_secret_session_closes_4401_when_the_minting_token_expires(
        gw: RunningGateway, key_file: Path) -> None:
    token = mint_token(key_file, ttl=3)
    secret = (await create(gw, token)).value
    exp = verify(SigningKeys.parse(SECRET_KEY), secret, time.time()).token_exp
    assert exp is not None
    async with browser(gw, secret) as ws:
        await first_events(ws, 1)
        async with asyncio.timeout(10):
            events: list[dict[str, Any]] = []
            with pytest.raises(ConnectionClosed):
                while True:
                    events.append(json.loads(await ws.recv()))
        closed_at = time.time()
    assert ws.close_code == 4401
    assert events[-1]["error"]["code"] == "token_expired"
    assert 0 <= closed_at - exp < 1.0  # within 1 s of the minting token's exp


async def test_session_start_names_the_credential_kind_never_the_value(
        gw: RunningGateway, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from structlog.testing import capture_logs

    secret = (await create(gw, mint_token(key_file))).value
    with capture_logs() as logs:
        async with browser(gw, secret) as ws:
            await first_events(ws, 1)
        await wait_for(lambda: not gw.gateway.registry.sessions)
    starts = [entry for entry in logs if entry["event"] == "session.start"]
    assert [entry["credential"] for entry in starts] == ["client_secret"]
    assert secret not in json.dumps(logs, default=str)


# -- rotation and replicas ------------------------------------------------------------------

async def test_rotation_signs_with_the_first_key_and_accepts_all(
        emulator: Emulator, key_file: Path) -> None:
    old = f"old:{SECRET_KEY}"
    new = "new:a-brand-new-signing-key-0123456789abcdef"
    upstream = f"{emulator.url}/v1/realtime"
    async with run_gateway(gateway_config(upstream, key_file, secret_keys=old)) as before:
        legacy = (await create(before, mint_token(key_file))).value
    rotated = gateway_config(upstream, key_file, secret_keys=f"{new},{old}")
    async with run_gateway(rotated) as during:
        fresh = (await create(during, mint_token(key_file))).value
        assert verify(SigningKeys.parse(new), fresh, time.time()).tenant == "acme"
        for secret in (legacy, fresh):
            async with browser(during, secret) as ws:
                await first_events(ws, 1)
    retired = gateway_config(upstream, key_file, secret_keys=new)
    async with run_gateway(retired) as after, browser(after, legacy) as ws:
        assert await refused_in_band(ws) == ("invalid_token", 4401)


async def test_two_replicas_sharing_the_key_accept_each_others_secrets(
        emulator: Emulator, key_file: Path) -> None:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file, secret_keys=SECRET_KEY)
    async with run_gateway(config) as a, run_gateway(config) as b:
        from_a = (await create(a, mint_token(key_file))).value
        from_b = (await create(b, mint_token(key_file))).value
        for replica, secret in ((b, from_a), (a, from_b)):
            async with browser(replica, secret) as ws:
                (created,) = await first_events(ws, 1)
                assert created["type"] == "session.created"


async def wait_metric(gw: RunningGateway, name: str, **labels: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(gw.metrics_url)).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
