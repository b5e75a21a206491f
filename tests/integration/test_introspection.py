"""RFC 7662 introspection for opaque tokens, against a real loopback endpoint."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import pytest
from structlog.testing import capture_logs

from gateway.auth.authenticator import Authenticator
from gateway.config import ConfigError
from gateway.errors import InsufficientScope, InvalidToken, Unavailable
from tests.support.idp import (
    AUDIENCE,
    ISSUER,
    SCOPE,
    FakeClock,
    IdpServer,
    claims_for,
    json_segment,
    make_config,
    poll_until,
    tenant,
)

OPAQUE = "opaque-access-token-0123456789"
SECRET_ENV = {"INTROSPECTION_SECRET": "s3cret"}


def introspection_tenant(idp: IdpServer, tenant_id: str = "acme", *, issuer: str = ISSUER,
                         timeout: float = 1.0, cache_seconds: float = 60,
                         max_concurrent: int = 16, **auth: Any) -> dict[str, Any]:
    return tenant(tenant_id, issuer=issuer, introspection={
        "url": idp.introspection_url,
        "client_id": "gateway",
        "client_secret_env": "INTROSPECTION_SECRET",
        "cache_seconds": cache_seconds,
        "timeout_seconds": timeout,
        "max_concurrent": max_concurrent,
    }, **auth)


def active(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"active": True, "token_type": "Bearer", "client_id": "app"}
    answer.update(claims_for(clock.now))
    answer.update(overrides)
    return {k: v for k, v in answer.items() if v is not None}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def idp() -> AsyncIterator[IdpServer]:
    async with IdpServer() as server:
        yield server


@pytest.fixture
async def auth(idp: IdpServer, clock: FakeClock) -> AsyncIterator[Authenticator]:
    authenticator = Authenticator(make_config(introspection_tenant(idp), environ=SECRET_ENV),
                                  clock=clock)
    await authenticator.start()
    yield authenticator
    await authenticator.aclose()


async def test_active_token_is_accepted_and_cached(
    idp: IdpServer, auth: Authenticator, clock: FakeClock
) -> None:
    assert auth.ready()  # introspection tenants need no key set
    idp.answers[OPAQUE] = active(clock, sub="alice", ttl=None, exp=int(clock.now) + 300)
    principal = await auth.authenticate(OPAQUE)
    assert principal.tenant.id == "acme"
    assert principal.subject == "alice"
    assert principal.expires_at == int(clock.now) + 300
    assert idp.counts["/introspect"] == 1
    request = idp.requests[0]
    assert request.method == "POST"
    form = parse_qs(request.body.decode())
    assert form == {"token": [OPAQUE], "token_type_hint": ["access_token"]}
    expected = base64.b64encode(b"gateway:s3cret").decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    for _ in range(5):
        clock.advance(10)
        assert (await auth.authenticate(OPAQUE)).subject == "alice"
    assert idp.counts["/introspect"] == 1  # served from the cache (50 s < 60 s)
    clock.advance(11)
    assert (await auth.authenticate(OPAQUE)).subject == "alice"
    assert idp.counts["/introspect"] == 2  # cache_seconds over


async def test_positive_cache_ends_at_exp(
    idp: IdpServer, auth: Authenticator, clock: FakeClock
) -> None:
    idp.answers[OPAQUE] = active(clock, exp=int(clock.now) + 20)
    assert (await auth.authenticate(OPAQUE)).expires_at == int(clock.now) + 20
    clock.advance(21)
    with pytest.raises(InvalidToken):  # cache entry gone at exp; the answer is now expired
        await auth.authenticate(OPAQUE)
    assert idp.counts["/introspect"] == 2


async def test_inactive_token_is_refused_and_negatively_cached(
    idp: IdpServer, auth: Authenticator, clock: FakeClock
) -> None:
    for _ in range(3):
        with pytest.raises(InvalidToken):
            await auth.authenticate(OPAQUE)
    assert idp.counts["/introspect"] == 1
    clock.advance(11)
    idp.answers[OPAQUE] = active(clock)
    assert (await auth.authenticate(OPAQUE)).subject == "user-1"
    assert idp.counts["/introspect"] == 2


@pytest.mark.parametrize("flag", ["true", 1, None, {"value": True}])
async def test_active_must_be_json_true(
    idp: IdpServer, auth: Authenticator, clock: FakeClock, flag: Any
) -> None:
    idp.answers[OPAQUE] = active(clock, active=flag)
    with pytest.raises(InvalidToken):
        await auth.authenticate(OPAQUE)


async def test_timeout_fails_closed(idp: IdpServer, clock: FakeClock) -> None:
    idp.modes["/introspect"] = "slow"
    auth = Authenticator(make_config(introspection_tenant(idp, timeout=0.2),
                                     environ=SECRET_ENV), clock=clock)
    try:
        started = time.monotonic()
        with capture_logs() as logs, pytest.raises(Unavailable) as info:
            await auth.authenticate(OPAQUE)
        assert time.monotonic() - started < 2
        assert info.value.http_status == 503
        assert info.value.retry_after == 5
        assert OPAQUE not in repr(logs)
        assert any(e["event"] == "introspection.failed" and e["reason"] == "timed out"
                   for e in logs)
        # Failures are not cached: the next request asks again.
        idp.modes.pop("/introspect")
        idp.answers[OPAQUE] = active(clock)
        assert (await auth.authenticate(OPAQUE)).subject == "user-1"
    finally:
        await auth.aclose()


@pytest.mark.parametrize("mode", ["500", "garbage", "huge"])
async def test_endpoint_errors_fail_closed(
    idp: IdpServer, auth: Authenticator, clock: FakeClock, mode: str
) -> None:
    idp.modes["/introspect"] = mode
    idp.answers[OPAQUE] = active(clock)
    with pytest.raises(Unavailable):
        await auth.authenticate(OPAQUE)


async def test_wrong_client_secret_fails_closed(idp: IdpServer, clock: FakeClock) -> None:
    config = make_config(introspection_tenant(idp), environ={"INTROSPECTION_SECRET": "wrong"})
    auth = Authenticator(config, clock=clock)
    idp.answers[OPAQUE] = active(clock)
    try:
        with pytest.raises(Unavailable):
            await auth.authenticate(OPAQUE)
        assert idp.counts["/introspect"] == 1
    finally:
        await auth.aclose()


async def test_unreachable_endpoint_fails_closed(clock: FakeClock) -> None:
    async with IdpServer() as idp:
        config = make_config(introspection_tenant(idp), environ=SECRET_ENV)
    auth = Authenticator(config, clock=clock)  # the server is closed now
    try:
        with pytest.raises(Unavailable):
            await auth.authenticate(OPAQUE)
    finally:
        await auth.aclose()


@pytest.mark.parametrize(
    "overrides",
    [
        {"iss": "https://other.example/"},
        {"aud": "other"},
        {"aud": ["other", "x"]},
        {"aud": None},
        {"exp": 1_000},
        {"exp": "tomorrow"},
        {"exp": True},
        {"sub": None},
        {"sub": 5},
        {"nbf": 9_999_999_999},
    ],
)
async def test_active_answer_claims_are_checked(
    idp: IdpServer, auth: Authenticator, clock: FakeClock, overrides: dict[str, Any]
) -> None:
    idp.answers[OPAQUE] = active(clock, **overrides)
    with pytest.raises(InvalidToken):
        await auth.authenticate(OPAQUE)


@pytest.mark.parametrize("scope", [None, "", f"{SCOPE}-extra", "openid profile"])
async def test_active_answer_without_scope_is_insufficient(
    idp: IdpServer, auth: Authenticator, clock: FakeClock, scope: Any
) -> None:
    idp.answers[OPAQUE] = active(clock, scope=scope)
    with pytest.raises(InsufficientScope):
        await auth.authenticate(OPAQUE)


async def test_answer_scope_forms_and_missing_optional_members(
    idp: IdpServer, auth: Authenticator, clock: FakeClock
) -> None:
    idp.answers["t-1"] = {"active": True, "sub": "s", "aud": AUDIENCE, "scp": [SCOPE]}
    principal = await auth.authenticate("t-1")
    assert principal.expires_at is None  # no exp in the answer
    idp.answers["t-2"] = {"active": True, "sub": "s", "aud": [AUDIENCE], "scope": f"a {SCOPE}"}
    assert (await auth.authenticate("t-2")).subject == "s"


async def test_token_about_to_expire_is_refused(
    idp: IdpServer, auth: Authenticator, clock: FakeClock
) -> None:
    idp.answers[OPAQUE] = active(clock, exp=int(clock.now) + 1)
    clock.advance(0.5)
    with pytest.raises(InvalidToken):
        await auth.authenticate(OPAQUE)


async def test_concurrent_lookups_share_one_request(
    idp: IdpServer, auth: Authenticator, clock: FakeClock
) -> None:
    idp.modes["/introspect"] = "slow"
    tasks = [asyncio.create_task(auth.authenticate(OPAQUE)) for _ in range(20)]
    await poll_until(lambda: idp.in_flight["/introspect"] == 1)
    assert idp.counts["/introspect"] == 1
    idp.release()  # the held request answers 500
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(result, Unavailable) for result in results)
    assert idp.counts["/introspect"] == 1


async def test_distinct_junk_tokens_make_a_bounded_number_of_calls_in_flight(
    idp: IdpServer, clock: FakeClock
) -> None:
    """Every distinct token is a lookup of its own; at most ``max_concurrent`` of them are
    requests in flight, the others wait for a free one."""
    idp.modes["/introspect"] = "slow"
    auth = Authenticator(make_config(introspection_tenant(idp, timeout=10, max_concurrent=3),
                                     environ=SECRET_ENV), clock=clock)
    try:
        tasks = [asyncio.create_task(auth.authenticate(f"junk-token-{i:04d}")) for i in range(12)]
        await poll_until(lambda: idp.in_flight["/introspect"] == 3)
        idp.release()  # every held request, then every later one, answers 500
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert all(isinstance(result, Unavailable) for result in results)
        assert idp.counts["/introspect"] == 12
        assert idp.peak_in_flight["/introspect"] == 3
    finally:
        await auth.aclose()


async def test_the_wait_for_a_free_request_counts_in_the_timeout(
    idp: IdpServer, clock: FakeClock
) -> None:
    """Lookups queued behind held requests each end within ``timeout_seconds`` of their
    start (503): six of them behind one slot take about one timeout, not six."""
    idp.modes["/introspect"] = "slow"
    auth = Authenticator(make_config(introspection_tenant(idp, timeout=0.4, max_concurrent=1),
                                     environ=SECRET_ENV), clock=clock)
    try:
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(
            *(auth.authenticate(f"junk-token-{i}") for i in range(6)),
            return_exceptions=True), 10)
        assert time.monotonic() - started < 1.6  # serial timeouts would take 2.4 s
        assert all(isinstance(result, Unavailable) for result in results)
    finally:
        await auth.aclose()


async def test_a_second_introspection_tenant_is_refused() -> None:
    """An opaque token names no issuer: with two introspection tenants it would be sent to
    both identity providers, leaking one tenant's tokens to the other. Config refuses it."""
    async with IdpServer() as first, IdpServer() as second:
        with pytest.raises(ConfigError, match=r"tenants\.1\.auth\.introspection: only one"):
            make_config(
                introspection_tenant(first, "first", issuer="https://first.example/"),
                introspection_tenant(second, "second", issuer="https://second.example/"),
                environ=SECRET_ENV,
            )


async def test_jwt_shaped_token_of_an_introspection_tenant_is_introspected(
    idp: IdpServer, auth: Authenticator, clock: FakeClock
) -> None:
    jwt_like = f"{json_segment({'alg': 'RS256'})}.{json_segment(claims_for(clock.now))}.sig"
    idp.answers[jwt_like] = active(clock, sub="jwt-user")
    assert (await auth.authenticate(jwt_like)).subject == "jwt-user"
    unknown = f"{json_segment({'alg': 'RS256'})}.{json_segment({'iss': 'x'})}.sig"
    with pytest.raises(InvalidToken):
        await auth.authenticate(unknown)  # a JWT of an unknown issuer: not introspected
    assert idp.counts["/introspect"] == 1
    dotted_opaque = "abc.def.ghi"  # JWT-shaped but not JOSE: introspected as opaque
    idp.answers[dotted_opaque] = active(clock, sub="dotted")
    assert (await auth.authenticate(dotted_opaque)).subject == "dotted"
    assert idp.counts["/introspect"] == 2


def test_non_loopback_http_introspection_url_is_refused() -> None:
    config = make_config(tenant("acme", introspection={
        "url": "http://idp.example.com/introspect", "client_id": "gateway",
        "client_secret_env": "INTROSPECTION_SECRET"}), environ=SECRET_ENV)
    with pytest.raises(ConfigError) as info:
        Authenticator(config)
    assert info.value.errors[0][0] == "tenants.0.auth.introspection.url"
