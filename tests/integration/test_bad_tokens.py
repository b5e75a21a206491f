"""Bad tokens through a real gateway with a JWKS issuer: all refused, none reaches the upstream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.config import parse_config
from gateway.emulator.server import Emulator
from tests.support.gateway import (
    MODEL,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    RunningGateway,
    run_gateway,
)
from tests.support.idp import (
    AUDIENCE,
    ISSUER,
    IdpServer,
    SigningKey,
    claims_for,
    hmac_token,
    jwks,
    new_rsa_key,
    sign_token,
    unsigned_token,
)

LEEWAY = 5


@pytest.fixture
async def idp() -> AsyncIterator[tuple[IdpServer, SigningKey]]:
    key = new_rsa_key()
    async with IdpServer() as server:
        server.jwks = jwks(key)
        yield server, key


@pytest.fixture
async def gw(idp: tuple[IdpServer, SigningKey],
             emulator: Emulator) -> AsyncIterator[RunningGateway]:
    server, _ = idp
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0},
        "upstreams": {"emulator": {"provider": "openai", "url": f"{emulator.url}/v1/realtime",
                                   "api_key_env": UPSTREAM_KEY_ENV}},
        "tenants": [{"id": "acme",
                     "auth": {"issuer": ISSUER, "jwks_uri": server.jwks_url,
                              "audiences": [AUDIENCE], "algorithms": ["RS256"],
                              "leeway_seconds": LEEWAY},
                     "models": {MODEL: {"upstream": "emulator"}}}],
    }, {UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    async with run_gateway(config) as running:
        yield running


def bad_tokens(key: SigningKey) -> dict[str, tuple[str, int]]:
    now = time.time()
    good = claims_for(now)
    other = new_rsa_key(kid="rsa-1")  # same kid, different key
    return {
        "malformed": ("not.a.jwt", 401),
        "garbage": ("x" * 300, 401),
        "alg_none": (unsigned_token(good, kid=key.kid), 401),
        "hs256_with_public_key": (hmac_token(good, key.public_pem(), kid=key.kid), 401),
        "wrong_key_same_kid": (sign_token(good, other), 401),
        "unknown_kid": (sign_token(good, key, kid="no-such-kid"), 401),
        "off_list_rs512": (sign_token(good, key, alg="RS512"), 401),
        "wrong_iss": (sign_token(claims_for(now, issuer="https://evil.example/"), key), 401),
        "wrong_aud": (sign_token(claims_for(now, audience="someone-else"), key), 401),
        "expired": (sign_token(claims_for(now - 600, ttl=600 - LEEWAY - 1), key), 401),
        "not_yet_valid": (sign_token(claims_for(now, nbf=int(now) + LEEWAY + 30), key), 401),
        "iat_in_future": (sign_token(claims_for(now, iat=int(now) + LEEWAY + 30), key), 401),
        "no_exp": (sign_token(claims_for(now, exp=None), key), 401),
        "missing_scope": (sign_token(claims_for(now, scope=None), key), 403),
        "scope_prefix_only": (sign_token(claims_for(now, scope="language-model-service:use"),
                                         key), 403),
        "scope_extended": (sign_token(claims_for(
            now, scope="language-model-service:use-model-extra"), key), 403),
    }


@pytest.mark.parametrize("case", list(bad_tokens(new_rsa_key())))
async def test_bad_token_refused_before_upstream(gw: RunningGateway, emulator: Emulator,
                                                 idp: tuple[IdpServer, SigningKey],
                                                 case: str) -> None:
    token, status = bad_tokens(idp[1])[case]
    with pytest.raises(InvalidStatus) as refused:
        await connect(gw.url(), additional_headers={"Authorization": f"Bearer {token}"})
    assert refused.value.response.status_code == status
    body: Any = refused.value.response.body
    assert token.encode() not in body
    assert emulator.connections == 0


async def test_good_token_passes_and_list_audience(gw: RunningGateway, emulator: Emulator,
                                                   idp: tuple[IdpServer, SigningKey]) -> None:
    now = time.time()
    for claims in (claims_for(now), claims_for(now, audience=["x", AUDIENCE]),
                   claims_for(now, scope=None, scp=["language-model-service:use-model"])):
        async with connect(gw.url(), additional_headers={
                "Authorization": f"Bearer {sign_token(claims, idp[1])}"}) as ws:
            await ws.recv()
    assert emulator.connections == 3
