"""Identity-provider faults seen by clients of a real gateway.

Security note §6 cases 12-15 at gateway level.  The tenant's ``jwks_uri`` points at the
fault proxy in front of a loopback identity provider (:class:`tests.support.idp.IdpServer`),
so the endpoint can be down (refused), silent (black hole), failing (500), garbage
(not JSON) or huge (10 MB).  The gateway's authenticator runs on a settable clock so
that "the key set's TTL is over" happens inside the test.

Warm cache: sessions keep being admitted while the refresh fails.  Cold cache: 503
(``unavailable``, ``Retry-After``) before any upstream is dialled, never a 101, and 50
concurrent handshakes share one fetch.

Already proven at unit level (``tests/integration/test_jwks.py``): refresh-ahead and
``max-age`` clamping, unknown-kid cooldown with 100 tokens, discovery, the 64 KiB and
50-key caps, failure under concurrency against the cache itself.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from joserfc.jws import JWSRegistry
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from gateway.app import Gateway, assemble
from gateway.auth.authenticator import Authenticator
from gateway.config import Config, parse_config
from gateway.emulator.server import Emulator
from gateway.limits.memory import MemoryLimiter
from gateway.metrics import Metrics
from gateway.services import Services
from tests.faults.conftest import LeakSweep, closed_session, metric, open_session, refused, serve
from tests.faults.proxy import FaultProxy
from tests.support.gateway import MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, RunningGateway, wait_for
from tests.support.idp import (
    AUDIENCE,
    ISSUER,
    SCOPE,
    ConnectionCounter,
    FakeClock,
    IdpServer,
    SigningKey,
    b64url,
    claims_for,
    json_segment,
    jwks,
    new_ec_key,
    new_rsa_key,
    sign_token,
)

FAULTS = ["down", "black_hole", "500", "garbage", "huge"]
TTL_OVER = 601  # seconds: past the default 10 min key-set TTL


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return new_rsa_key("rsa-1")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def idp(rsa_key: SigningKey) -> AsyncIterator[IdpServer]:
    async with IdpServer(jwks=jwks(rsa_key)) as server:
        yield server


@pytest.fixture
async def proxy(idp: IdpServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(("127.0.0.1", idp.port)) as fault_proxy:
        yield fault_proxy


def idp_config(emulator: Emulator, jwks_uri: str) -> Config:
    return parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "drain_seconds": 0},
        "upstreams": {"emulator": {"provider": "openai", "url": f"{emulator.url}/v1/realtime",
                                   "api_key_env": UPSTREAM_KEY_ENV}},
        "tenants": [{"id": "acme",
                     "auth": {"issuer": ISSUER, "jwks_uri": jwks_uri, "audiences": [AUDIENCE],
                              "algorithms": ["RS256", "ES256"], "leeway_seconds": 5},
                     "models": {MODEL: {"upstream": "emulator"}}}],
    }, {UPSTREAM_KEY_ENV: UPSTREAM_KEY})


def build(config: Config, clock: FakeClock) -> Gateway:
    """The production gateway objects, with the authenticator on ``clock``."""
    metrics = Metrics()
    authenticator = Authenticator(
        config, clock=clock,
        on_jwks_refresh=lambda t, r: metrics.jwks_refreshes_total.labels(t, r).inc())
    return assemble(Services(config, metrics, authenticator, MemoryLimiter()))


@pytest.fixture
async def gw(emulator: Emulator, proxy: FaultProxy, clock: FakeClock,
             sweep: LeakSweep) -> AsyncIterator[RunningGateway]:
    """A gateway whose tenant's JWKS comes through the fault proxy (started warm)."""
    config = idp_config(emulator, f"http://127.0.0.1:{proxy.port}/jwks")
    async with serve(sweep, config, build(config, clock)) as running:
        yield running


def token(sweep: LeakSweep, key: SigningKey, clock: FakeClock, **kwargs: Any) -> str:
    """A token signed by ``key`` (keyword arguments as for :func:`sign_token`), with a
    canary subject and ``jti`` registered with the sweep."""
    sub = sweep.subject(f"sub-canary-{secrets.token_hex(6)}")
    jti = sweep.secret(f"jti-canary-{secrets.token_hex(8)}")
    return sweep.secret(sign_token(claims_for(clock.now, sub=sub, jti=jti), key, **kwargs))


async def inject(fault: str, idp: IdpServer, proxy: FaultProxy) -> None:
    if fault == "down":
        await proxy.refuse()
    elif fault == "black_hole":
        proxy.black_hole()
    else:
        idp.modes["/jwks"] = fault


async def ready(gw: RunningGateway) -> int:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{gw.http}/readyz")).status_code


@pytest.mark.parametrize("fault", FAULTS)
async def test_warm_cache_keeps_admitting_while_the_jwks_endpoint_fails(
        gw: RunningGateway, idp: IdpServer, proxy: FaultProxy, rsa_key: SigningKey,
        clock: FakeClock, sweep: LeakSweep, fault: str) -> None:
    """Case 15, warm: the TTL is over and the refresh fails (down, silent, 500, garbage,
    10 MB): sessions are admitted at once from the last good keys, readiness holds, and
    the failure is counted."""
    assert gw.gateway.services.authenticator.ready()
    await inject(fault, idp, proxy)
    clock.advance(TTL_OVER)
    for _ in range(3):
        started = time.monotonic()
        ws = await open_session(sweep, gw.url(), token(sweep, rsa_key, clock))
        assert time.monotonic() - started < 1.0  # never waits for the failing refresh
        await ws.close()
    await wait_for(lambda: metric(gw, "realtime_gateway_jwks_refreshes_total",
                                  result="failure") >= 1, within=5)
    assert await ready(gw) == 200
    age = gw.gateway.services.authenticator.key_set_ages()["acme"]
    assert age is not None and age >= TTL_OVER
    assert idp.peak_in_flight["/jwks"] <= 1


@pytest.mark.parametrize("fault", FAULTS)
async def test_cold_cache_answers_503_and_never_dials(
        emulator: Emulator, idp: IdpServer, proxy: FaultProxy, rsa_key: SigningKey,
        clock: FakeClock, sweep: LeakSweep, fault: str) -> None:
    """Case 15, cold: no key set was ever fetched → ``/readyz`` 503, header clients get 503
    ``unavailable`` with ``Retry-After``, browser clients 4503; no upstream is dialled."""
    await inject(fault, idp, proxy)
    config = idp_config(emulator, f"http://127.0.0.1:{proxy.port}/jwks")
    async with serve(sweep, config, build(config, clock)) as gw:
        assert await ready(gw) == 503
        refusal = await refused(sweep, gw.url(),
                                {"Authorization": f"Bearer {token(sweep, rsa_key, clock)}"})
        assert (refusal.status, refusal.body["error"]["code"]) == (503, "unavailable")
        assert int(refusal.headers["retry-after"]) >= 1
        offers = [Subprotocol("realtime"),
                  Subprotocol(f"openai-insecure-api-key.{token(sweep, rsa_key, clock)}")]
        async with connect(gw.url(), subprotocols=offers) as ws:
            closed = await closed_session(sweep, ws)
        assert (closed.code, closed.errors[0]["error"]["code"]) == (4503, "unavailable")
        assert emulator.connections == 0
        assert metric(gw, "realtime_gateway_session_rejections_total", code="unavailable") == 2


async def test_fifty_concurrent_handshakes_share_one_fetch_then_recover(
        emulator: Emulator, idp: IdpServer, proxy: FaultProxy, rsa_key: SigningKey,
        clock: FakeClock, sweep: LeakSweep) -> None:
    """Case 15 under concurrency (cf. Envoy CVE-2025-64527): cold cache, the fetch hangs,
    50 handshakes arrive: exactly one fetch is in flight, all 50 get 503, nothing
    crashes; when the IdP is back, the next handshake is admitted without a restart."""
    idp.modes["/jwks"] = "500"
    config = idp_config(emulator, f"http://127.0.0.1:{proxy.port}/jwks")
    async with serve(sweep, config, build(config, clock)) as gw:
        assert not gw.gateway.services.authenticator.ready()
        idp.modes["/jwks"] = "slow"  # held until released, then 500
        clock.advance(5)  # past the retry backoff
        headers = [{"Authorization": f"Bearer {token(sweep, rsa_key, clock)}"}
                   for _ in range(50)]
        attempts = [asyncio.create_task(refused(sweep, gw.url(), h)) for h in headers]
        await wait_for(lambda: idp.in_flight["/jwks"] == 1, within=5)
        await wait_for(lambda: gw.gateway.registry.pending_handshakes == 50, within=5)
        assert idp.in_flight["/jwks"] == 1
        idp.release()
        results = await asyncio.gather(*attempts)
        assert {r.status for r in results} == {503}
        assert idp.peak_in_flight["/jwks"] == 1
        assert emulator.connections == 0
        del idp.modes["/jwks"]
        clock.advance(120)  # past any backoff
        ws = await open_session(sweep, gw.url(), token(sweep, rsa_key, clock))
        await ws.close()
        assert gw.gateway.services.authenticator.ready()


async def test_key_rotation_is_picked_up_without_restart(
        gw: RunningGateway, idp: IdpServer, rsa_key: SigningKey, clock: FakeClock,
        sweep: LeakSweep) -> None:
    """Case 14: the IdP publishes a new key and signs with it: the first such token makes
    the gateway refetch and is admitted; the old key still works; one fetch."""
    fetches = idp.counts["/jwks"]
    new_key = new_ec_key("ec-rotated")
    idp.jwks = jwks(rsa_key, new_key)
    ws = await open_session(sweep, gw.url(), token(sweep, new_key, clock))
    await ws.close()
    ws = await open_session(sweep, gw.url(), token(sweep, rsa_key, clock))
    await ws.close()
    assert idp.counts["/jwks"] == fetches + 1


async def test_jku_and_x5u_are_never_fetched(
        gw: RunningGateway, emulator: Emulator, idp: IdpServer, rsa_key: SigningKey,
        clock: FakeClock, sweep: LeakSweep) -> None:
    """Case 12: ``jku``/``x5u`` aimed at a local listener get 0 connections; the verdict
    comes from the tenant's JWKS only."""
    attacker = new_rsa_key("attacker")
    async with ConnectionCounter() as listener:
        header = {"jku": listener.url, "x5u": listener.url}
        ws = await open_session(sweep, gw.url(), token(sweep, rsa_key, clock, header=header))
        await ws.close()
        for forged in (token(sweep, attacker, clock, header=header),
                       token(sweep, attacker, clock, kid=rsa_key.kid, header=header)):
            refusal = await refused(sweep, gw.url(), {"Authorization": f"Bearer {forged}"})
            assert (refusal.status, refusal.body["error"]["code"]) == (401, "invalid_token")
        assert listener.connections == 0
    assert emulator.connections == 1


async def test_random_kids_cannot_amplify_jwks_traffic(
        gw: RunningGateway, emulator: Emulator, idp: IdpServer, rsa_key: SigningKey,
        clock: FakeClock, sweep: LeakSweep) -> None:
    """Case 13 at gateway level: 30 handshakes with random ``kid`` values → all 401, at
    most one refetch within the 30 s cooldown."""
    fetches = idp.counts["/jwks"]
    forged = [token(sweep, rsa_key, clock, kid=f"random-{secrets.token_hex(4)}")
              for _ in range(30)]
    results = await asyncio.gather(*(refused(sweep, gw.url(), {"Authorization": f"Bearer {t}"})
                                     for t in forged))
    assert {r.status for r in results} == {401}
    assert idp.counts["/jwks"] - fetches <= 1
    assert emulator.connections == 0


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "JWT", None])
async def test_typ_header_is_not_a_gate(gw: RunningGateway, rsa_key: SigningKey,
                                        clock: FakeClock, sweep: LeakSweep,
                                        typ: str | None) -> None:
    """Case 10 by default (``auth.require_typ`` unset): the gateway does not enforce RFC
    9068's ``typ: at+jwt`` (issuers such as Keycloak and Entra send ``JWT``); audience,
    issuer and scope are what bind a token to this resource server.  Every ``typ``, or
    none, is admitted."""
    if typ is None:
        signed = token_without_typ(sweep, rsa_key, clock)
    else:
        signed = token(sweep, rsa_key, clock, header={"typ": typ})
    ws = await open_session(sweep, gw.url(), signed)
    await ws.close()


async def test_require_typ_refuses_other_types(
        emulator: Emulator, proxy: FaultProxy, rsa_key: SigningKey, clock: FakeClock,
        sweep: LeakSweep) -> None:
    """Case 10 with ``auth.require_typ: at+jwt``: ``typ: JWT`` or none is 401, ``at+jwt``
    (or ``application/at+jwt``) is admitted."""
    data = idp_config(emulator, f"http://127.0.0.1:{proxy.port}/jwks").model_dump(mode="json")
    data["tenants"][0]["auth"]["require_typ"] = "at+jwt"
    config = parse_config(data, {UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    async with serve(sweep, config, build(config, clock)) as gw:
        for bad in (token(sweep, rsa_key, clock, header={"typ": "JWT"}),
                    token_without_typ(sweep, rsa_key, clock)):
            answer = await refused(sweep, gw.url(), {"Authorization": f"Bearer {bad}"})
            assert answer.status == 401
            assert answer.body["error"]["code"] == "invalid_token"
        for typ in ("at+jwt", "application/at+jwt"):
            ws = await open_session(sweep, gw.url(), token(sweep, rsa_key, clock,
                                                            header={"typ": typ}))
            await ws.close()
        assert emulator.connections == 2


def token_without_typ(sweep: LeakSweep, key: SigningKey, clock: FakeClock) -> str:
    """A token whose protected header has no ``typ`` (:func:`sign_token` always adds one)."""
    claims = claims_for(clock.now, sub=sweep.subject(f"sub-canary-{secrets.token_hex(6)}"),
                        jti=sweep.secret(f"jti-canary-{secrets.token_hex(8)}"))
    signing_input = f"{json_segment({'alg': key.alg, 'kid': key.kid})}.{json_segment(claims)}"
    signature = JWSRegistry.algorithms[key.alg].sign(signing_input.encode(), key.key)
    return sweep.secret(f"{signing_input}.{b64url(signature)}")


async def test_junk_tokens_against_a_slow_introspection_endpoint_take_no_session_capacity(
        emulator: Emulator, idp: IdpServer, proxy: FaultProxy, rsa_key: SigningKey,
        clock: FakeClock, sweep: LeakSweep) -> None:
    """``server.max_sessions: 4``; six junk opaque tokens hang on a slow introspection
    endpoint: they count as unauthenticated handshakes only, so a valid user of another
    tenant still opens a session; the endpoint sees at most ``max_concurrent`` calls."""
    data = idp_config(emulator, f"http://127.0.0.1:{proxy.port}/jwks").model_dump(mode="json")
    data["server"]["max_sessions"] = 4
    data["tenants"].append({
        "id": "initech",
        "auth": {"issuer": "https://auth.initech.test/", "introspection": {
            "url": idp.introspection_url, "client_id": idp.client_id,
            "client_secret_env": "INITECH_SECRET", "timeout_seconds": 10, "max_concurrent": 2}},
        "models": {MODEL: {"upstream": "emulator"}}})
    config = parse_config(data, {UPSTREAM_KEY_ENV: UPSTREAM_KEY,
                                 "INITECH_SECRET": idp.client_secret})
    idp.modes["/introspect"] = "slow"
    async with serve(sweep, config, build(config, clock)) as gw:
        registry = gw.gateway.registry
        junk = [asyncio.create_task(refused(
            sweep, gw.url(), {"Authorization": f"Bearer junk-opaque-token-{i:03d}"}))
            for i in range(6)]
        await wait_for(lambda: registry.unauthenticated_handshakes == 6, within=5)
        await wait_for(lambda: idp.in_flight["/introspect"] == 2, within=5)
        ws = await open_session(sweep, gw.url(), token(sweep, rsa_key, clock))
        assert registry.pending_handshakes == 6
        await ws.close()
        idp.release()  # the held calls, and the queued ones after them, answer 500
        results = await asyncio.gather(*junk)
        assert {r.status for r in results} == {503}
        assert idp.peak_in_flight["/introspect"] == 2
        assert registry.pending_handshakes == 0


async def test_unauthenticated_handshakes_have_a_budget_of_their_own(
        emulator: Emulator, idp: IdpServer, proxy: FaultProxy, rsa_key: SigningKey,
        clock: FakeClock, sweep: LeakSweep) -> None:
    """Over ``server.max_unauthenticated_handshakes`` an upgrade is refused 503 before its
    token is checked; one that completes frees its place."""
    idp.modes["/jwks"] = "500"
    data = idp_config(emulator, f"http://127.0.0.1:{proxy.port}/jwks").model_dump(mode="json")
    data["server"]["max_unauthenticated_handshakes"] = 3
    config = parse_config(data, {UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    async with serve(sweep, config, build(config, clock)) as gw:
        idp.modes["/jwks"] = "slow"  # cold cache: every handshake waits on the one fetch
        clock.advance(5)
        held = [asyncio.create_task(refused(
            sweep, gw.url(), {"Authorization": f"Bearer {token(sweep, rsa_key, clock)}"}))
            for _ in range(3)]
        await wait_for(lambda: gw.gateway.registry.unauthenticated_handshakes == 3, within=5)
        extra = await refused(sweep, gw.url(),
                              {"Authorization": f"Bearer {token(sweep, rsa_key, clock)}"})
        assert extra.status == 503
        assert idp.counts["/jwks"] >= 1
        idp.release()
        assert {r.status for r in await asyncio.gather(*held)} == {503}
        assert gw.gateway.registry.unauthenticated_handshakes == 0


@pytest.mark.parametrize("turns", ["inactive", "scope_gone", "expired"])
async def test_a_session_without_exp_is_rechecked_and_closed_when_inactive(
        emulator: Emulator, idp: IdpServer, sweep: LeakSweep, turns: str) -> None:
    """An introspection answer without ``exp`` gives a session with no deadline: its token
    is introspected again every re-check period; an endpoint failure leaves the session
    running, an answer that no longer admits the token (inactive, without the scope, or
    with an ``exp`` now past) closes it ``token_expired`` / 4401."""
    data = idp_config(emulator, idp.jwks_url).model_dump(mode="json")
    data["tenants"] = [{
        "id": "initech",
        "auth": {"issuer": ISSUER, "introspection": {
            "url": idp.introspection_url, "client_id": idp.client_id,
            "client_secret_env": "INITECH_SECRET", "cache_seconds": 0.01}},
        "models": {MODEL: {"upstream": "emulator"}}}]
    config = parse_config(data, {UPSTREAM_KEY_ENV: UPSTREAM_KEY,
                                 "INITECH_SECRET": idp.client_secret})
    opaque = sweep.secret(f"opaque-canary-{secrets.token_hex(12)}")
    idp.answers[opaque] = {"active": True, "iss": ISSUER, "scope": SCOPE,
                           "sub": sweep.subject(f"sub-canary-{secrets.token_hex(6)}")}
    async with serve(sweep, config) as gw:  # real time: the answer cache expires
        gw.gateway.housekeeper.interval = 0.1
        gw.gateway.housekeeper.recheck_interval = 0.05
        ws = await open_session(sweep, gw.url(), opaque)
        first = idp.counts["/introspect"]
        idp.modes["/introspect"] = "500"
        await wait_for(lambda: idp.counts["/introspect"] >= first + 2, within=10)
        assert len(gw.gateway.registry.sessions) == 1  # the endpoint failing ends nothing
        del idp.modes["/introspect"]
        answer = dict(idp.answers[opaque])
        if turns == "inactive":
            answer = {"active": False}
        elif turns == "scope_gone":
            answer["scope"] = "something-else"
        else:
            answer["exp"] = int(time.time()) - 60
        idp.answers[opaque] = answer
        async with asyncio.timeout(10):
            event = json.loads(await ws.recv())
            await ws.wait_closed()
        assert event["type"] == "error" and event["error"]["code"] == "token_expired"
        assert ws.close_code == 4401
