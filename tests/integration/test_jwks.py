"""JWKS fetching over real loopback HTTP: discovery, refresh, rotation, failures, concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from gateway.auth.authenticator import Authenticator
from gateway.auth.jwks import (
    JwksCache,
    JwksError,
    UrlJwksSource,
    fetch_json,
    kid_hash,
    require_secure_url,
)
from gateway.config import ConfigError
from gateway.errors import InvalidToken, Unavailable
from tests.support.idp import (
    ConnectionCounter,
    FakeClock,
    IdpServer,
    SigningKey,
    claims_for,
    jwks,
    make_config,
    new_ec_key,
    new_rsa_key,
    poll_until,
    sign_token,
    tenant,
)


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return new_rsa_key("rsa-1")


@pytest.fixture(scope="module")
def rsa_key_2() -> SigningKey:
    return new_rsa_key("rsa-2")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def idp(rsa_key: SigningKey) -> AsyncIterator[IdpServer]:
    async with IdpServer(jwks=jwks(rsa_key)) as server:
        yield server


class Gateway:
    """An Authenticator over the IdP's jwks_uri (or discovery) with recorded refreshes."""

    def __init__(self, idp: IdpServer, clock: FakeClock, *, discovery: bool = False) -> None:
        source = ({"discovery_url": idp.discovery_url} if discovery
                  else {"jwks_uri": idp.jwks_url})
        self.refreshes: list[tuple[str, str]] = []
        self.auth = Authenticator(make_config(tenant("acme", **source)), clock=clock,
                                  on_jwks_refresh=lambda t, r: self.refreshes.append((t, r)))

    async def __aenter__(self) -> Authenticator:
        await self.auth.start()
        return self.auth

    async def __aexit__(self, *exc: object) -> None:
        await self.auth.aclose()


def token(key: SigningKey, clock: FakeClock, **kwargs: Any) -> str:
    return sign_token(claims_for(clock.now), key, **kwargs)


async def test_keys_fetched_at_start_and_cached(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock
) -> None:
    gateway = Gateway(idp, clock)
    assert not gateway.auth.ready()
    async with gateway as auth:
        assert auth.ready()
        assert idp.counts["/jwks"] == 1
        for _ in range(20):
            assert (await auth.authenticate(token(rsa_key, clock))).subject == "user-1"
        assert idp.counts["/jwks"] == 1
        assert gateway.refreshes == [("acme", "success")]
        assert auth.key_set_ages() == {"acme": 0.0}
    request = idp.requests[0]
    assert request.method == "GET"
    assert "authorization" not in request.headers


async def test_refresh_ahead_after_ttl_with_max_age_clamped(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock
) -> None:
    idp.max_age = 5  # below the 60 s floor
    async with Gateway(idp, clock) as auth:
        clock.advance(59)
        await auth.authenticate(token(rsa_key, clock))
        assert idp.counts["/jwks"] == 1  # 5 s was raised to 60 s
        clock.advance(2)
        assert (await auth.authenticate(token(rsa_key, clock))).subject == "user-1"
        await poll_until(lambda: idp.counts["/jwks"] == 2)  # refreshed in the background


async def test_max_age_above_one_hour_is_clamped(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock
) -> None:
    idp.max_age = 86_400
    async with Gateway(idp, clock) as auth:
        clock.advance(3_599)
        await auth.authenticate(token(rsa_key, clock))
        assert idp.counts["/jwks"] == 1
        clock.advance(2)
        await auth.authenticate(token(rsa_key, clock))
        await poll_until(lambda: idp.counts["/jwks"] == 2)


async def test_key_rotation_is_picked_up_without_restart(
    idp: IdpServer, rsa_key: SigningKey, rsa_key_2: SigningKey, clock: FakeClock
) -> None:
    async with Gateway(idp, clock) as auth:
        assert idp.counts["/jwks"] == 1
        idp.jwks = jwks(rsa_key, rsa_key_2)  # the IdP publishes the next key, then signs with it
        principal = await auth.authenticate(sign_token(claims_for(clock.now, sub="new"),
                                                       rsa_key_2))
        assert principal.subject == "new"
        assert idp.counts["/jwks"] == 2
        assert (await auth.authenticate(token(rsa_key, clock))).subject == "user-1"
        assert idp.counts["/jwks"] == 2


async def test_unknown_kid_refetches_once_within_cooldown(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock
) -> None:
    async with Gateway(idp, clock) as auth:
        with capture_logs() as logs, pytest.raises(InvalidToken):
            await auth.authenticate(token(rsa_key, clock, kid="unknown-kid-value"))
        assert idp.counts["/jwks"] == 2
        # The kid is logged only as a short hash.
        assert "unknown-kid-value" not in repr(logs)
        assert any(entry.get("kid_hash") == kid_hash("unknown-kid-value") for entry in logs)
        tokens = [token(rsa_key, clock, kid=f"random-{i}") for i in range(100)]
        clock.advance(20)
        results = await asyncio.gather(*(auth.authenticate(t) for t in tokens),
                                       return_exceptions=True)
        assert all(isinstance(result, InvalidToken) for result in results)
        assert idp.counts["/jwks"] == 2  # still within the 30 s cooldown
        assert idp.peak_in_flight["/jwks"] == 1


async def test_jku_and_x5u_are_never_fetched(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock
) -> None:
    attacker = new_ec_key("attacker-key")
    async with ConnectionCounter() as listener, Gateway(idp, clock) as auth:
        header = {"jku": listener.url, "x5u": listener.url}
        # Signed by our IdP's key: the verdict comes from our JWKS, the URLs are ignored.
        principal = await auth.authenticate(token(rsa_key, clock, header=header))
        assert principal.subject == "user-1"
        # Signed by an attacker whose key sits behind jku/x5u: refused.
        with pytest.raises(InvalidToken):
            await auth.authenticate(token(attacker, clock, header=header))
        with pytest.raises(InvalidToken):
            await auth.authenticate(token(attacker, clock, kid=rsa_key.kid, header=header))
        assert listener.connections == 0
        assert idp.counts["/jwks"] == 2  # start + one refresh for the attacker's unknown kid


@pytest.mark.parametrize("mode", ["500", "garbage", "huge", "huge-chunked"])
async def test_failing_endpoint_with_warm_cache_keeps_validating(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock, mode: str
) -> None:
    gateway = Gateway(idp, clock)
    async with gateway as auth:
        idp.modes["/jwks"] = mode
        clock.advance(601)  # TTL over: the next lookup refreshes in the background
        started = time.monotonic()
        assert (await auth.authenticate(token(rsa_key, clock))).subject == "user-1"
        await poll_until(lambda: gateway.refreshes[-1:] == [("acme", "failure")])
        assert time.monotonic() - started < 3
        assert auth.ready()
        age = auth.key_set_ages()["acme"]
        assert age is not None
        assert age >= 601
        assert (await auth.authenticate(token(rsa_key, clock))).subject == "user-1"
        # Unknown kid during the outage: a refresh attempt, then refused (not 503).
        with pytest.raises(InvalidToken):
            await auth.authenticate(token(rsa_key, clock, kid="other"))
        assert gateway.refreshes[-1] == ("acme", "failure")
    assert idp.counts["/jwks"] >= 3


@pytest.mark.parametrize("mode", ["500", "garbage", "huge", "huge-chunked"])
async def test_failing_endpoint_with_cold_cache_is_unavailable(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock, mode: str
) -> None:
    idp.modes["/jwks"] = mode
    gateway = Gateway(idp, clock)
    with capture_logs() as logs:
        async with gateway as auth:
            assert not auth.ready()
            assert gateway.refreshes == [("acme", "failure")]
            presented = token(rsa_key, clock)
            with pytest.raises(Unavailable) as info:
                await auth.authenticate(presented)
            assert info.value.http_status == 503
            assert info.value.retry_after == 5
            assert presented not in info.value.message
    assert presented not in repr(logs)
    assert presented.split(".")[1] not in repr(logs)
    failures = [entry for entry in logs if entry["event"] == "jwks.refresh_failed"]
    assert failures
    assert failures[0]["tenant"] == "acme"
    assert failures[0]["reason"]


async def test_slow_endpoint_times_out(idp: IdpServer, rsa_key: SigningKey,
                                       clock: FakeClock) -> None:
    idp.modes["/jwks"] = "slow"
    results: list[str] = []
    async with httpx.AsyncClient() as client:
        source = UrlJwksSource(idp.jwks_url, client, timeout_seconds=0.3)
        cache = JwksCache("acme", source, algorithms=["RS256"], clock=clock,
                          on_refresh=lambda t, r: results.append(r))
        started = time.monotonic()
        await cache.start()
        try:
            assert time.monotonic() - started < 2
            assert results == ["failure"]
            assert not cache.ready()
            with pytest.raises(Unavailable):
                await cache.key_for(rsa_key.kid, "RS256")
        finally:
            await cache.aclose()


async def test_slow_endpoint_with_warm_cache(idp: IdpServer, rsa_key: SigningKey,
                                             clock: FakeClock) -> None:
    async with httpx.AsyncClient() as client:
        source = UrlJwksSource(idp.jwks_url, client, timeout_seconds=0.3)
        cache = JwksCache("acme", source, algorithms=["RS256"], clock=clock)
        await cache.start()
        try:
            idp.modes["/jwks"] = "slow"
            clock.advance(31)
            assert await cache.refresh() is False
            assert await cache.key_for(rsa_key.kid, "RS256") is not None
        finally:
            await cache.aclose()


async def test_concurrent_authentications_during_failing_refresh_cold(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock
) -> None:
    idp.modes["/jwks"] = "500"
    async with Gateway(idp, clock) as auth:
        assert idp.counts["/jwks"] == 1
        idp.modes["/jwks"] = "slow"  # the next fetch hangs until released
        clock.advance(5)  # past the retry backoff
        tasks = [asyncio.create_task(auth.authenticate(token(rsa_key, clock)))
                 for _ in range(50)]
        await poll_until(lambda: idp.in_flight["/jwks"] == 1)
        assert idp.counts["/jwks"] == 2
        idp.release()  # the held fetch now fails (500)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert all(isinstance(result, Unavailable) for result in results), results
        assert idp.peak_in_flight["/jwks"] == 1
        assert idp.counts["/jwks"] == 2
        assert not auth.ready()


async def test_concurrent_authentications_during_failing_refresh_warm(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock
) -> None:
    async with Gateway(idp, clock) as auth:
        idp.modes["/jwks"] = "slow"
        clock.advance(601)
        valid = [asyncio.create_task(auth.authenticate(token(rsa_key, clock)))
                 for _ in range(25)]
        unknown = [asyncio.create_task(auth.authenticate(token(rsa_key, clock, kid=f"u{i}")))
                   for i in range(25)]
        # Known keys are served from the cache while the refresh hangs.
        principals = await asyncio.wait_for(asyncio.gather(*valid), 5)
        assert {p.subject for p in principals} == {"user-1"}
        await poll_until(lambda: idp.in_flight["/jwks"] == 1)
        assert not any(task.done() for task in unknown)  # they wait for the shared fetch
        idp.release()
        results = await asyncio.wait_for(asyncio.gather(*unknown, return_exceptions=True), 5)
        assert all(isinstance(result, InvalidToken) for result in results)
        assert idp.counts["/jwks"] == 2
        assert idp.peak_in_flight["/jwks"] == 1
        assert auth.ready()


async def test_discovery(idp: IdpServer, rsa_key: SigningKey, clock: FakeClock) -> None:
    async with Gateway(idp, clock, discovery=True) as auth:
        assert auth.ready()
        assert idp.counts["/.well-known/openid-configuration"] == 1
        assert idp.counts["/jwks"] == 1
        assert (await auth.authenticate(token(rsa_key, clock))).subject == "user-1"


@pytest.mark.parametrize("issuer", ["https://idp.example.test", "https://evil.example/", ""])
async def test_discovery_issuer_mismatch_is_never_ready(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock, issuer: str
) -> None:
    idp.discovery_issuer = issuer
    gateway = Gateway(idp, clock, discovery=True)
    with capture_logs() as logs:
        async with gateway as auth:
            assert not auth.ready()
            assert gateway.refreshes == [("acme", "failure")]
            assert idp.counts["/jwks"] == 0
            with pytest.raises(Unavailable):
                await auth.authenticate(token(rsa_key, clock))
    assert any("issuer does not match" in str(entry.get("reason")) for entry in logs)


async def test_discovery_with_insecure_jwks_uri_is_refused(
    idp: IdpServer, clock: FakeClock
) -> None:
    idp.discovery_jwks_uri = "http://keys.example.com/jwks"
    gateway = Gateway(idp, clock, discovery=True)
    with capture_logs() as logs:
        async with gateway as auth:
            assert not auth.ready()
            assert idp.counts["/.well-known/openid-configuration"] == 1
    assert any(entry.get("reason") == "discovery jwks_uri is not https" for entry in logs)


def test_non_loopback_http_urls_are_refused_at_construction() -> None:
    for key in ("jwks_uri", "discovery_url"):
        config = make_config(tenant("acme", **{key: "http://idp.example.com/keys"}))
        with pytest.raises(ConfigError) as info:
            Authenticator(config)
        assert info.value.errors[0][0] == f"tenants.0.auth.{key}"
    for url in ("http://127.0.0.1:1/x", "http://localhost/x", "http://[::1]:8/x",
                "https://idp.example.com/jwks"):
        require_secure_url(url)
    for url in ("http://10.0.0.1/x", "ftp://127.0.0.1/x", "/jwks", "http://127.0.0.1.nip.io/"):
        with pytest.raises(ValueError, match="https"):
            require_secure_url(url)


async def test_fetch_json_refuses_redirects_and_big_bodies(idp: IdpServer) -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(JwksError, match="404"):
            await fetch_json(client, f"{idp.base_url}/missing")
        idp.modes["/jwks"] = "huge-chunked"
        with pytest.raises(JwksError, match="larger than"):
            await fetch_json(client, idp.jwks_url)
        with pytest.raises(JwksError, match="transport error"):
            await fetch_json(client, "http://127.0.0.1:1/jwks")


async def test_more_than_50_keys_keep_the_last_good_set(
    idp: IdpServer, rsa_key: SigningKey, clock: FakeClock
) -> None:
    gateway = Gateway(idp, clock)
    async with gateway as auth:
        ec = new_ec_key("ec-x")
        idp.jwks = {"keys": [ec.public_jwk(kid=f"k{i}") for i in range(51)]}
        with pytest.raises(InvalidToken):
            await auth.authenticate(token(ec, clock, kid="k7"))
        assert gateway.refreshes[-1] == ("acme", "failure")
        assert (await auth.authenticate(token(rsa_key, clock))).subject == "user-1"


async def test_two_tenants_start_concurrently_and_readiness_needs_both(
    rsa_key: SigningKey, clock: FakeClock
) -> None:
    async with IdpServer(jwks=jwks(rsa_key)) as good, IdpServer(jwks=jwks(rsa_key)) as bad:
        bad.modes["/jwks"] = "slow"
        config = make_config(tenant("good", jwks_uri=good.jwks_url),
                             tenant("bad", issuer="https://bad.example/", jwks_uri=bad.jwks_url))
        auth = Authenticator(config, clock=clock)
        start = asyncio.create_task(auth.start())
        try:
            await poll_until(lambda: good.counts["/jwks"] == 1 and bad.in_flight["/jwks"] == 1)
            bad.release()
            await asyncio.wait_for(start, 5)
            assert not auth.ready()  # one tenant without keys
            assert (await auth.authenticate(token(rsa_key, clock))).tenant.id == "good"
        finally:
            await auth.aclose()


async def test_background_refresh_ahead_without_traffic(
    idp: IdpServer, rsa_key: SigningKey, rsa_key_2: SigningKey
) -> None:
    async with httpx.AsyncClient() as client:
        cache = JwksCache("acme", UrlJwksSource(idp.jwks_url, client), algorithms=["RS256"],
                          clock=time.time, min_ttl_seconds=0.05, default_ttl_seconds=0.05)
        await cache.start()
        try:
            idp.jwks = jwks(rsa_key_2)
            await poll_until(lambda: idp.counts["/jwks"] >= 3)
            assert await cache.key_for(rsa_key_2.kid, "RS256") is not None
            assert idp.peak_in_flight["/jwks"] == 1
        finally:
            await cache.aclose()
    count = idp.counts["/jwks"]
    assert not cache.fetch_in_flight
    assert await cache.refresh() is False  # a closed cache fetches nothing
    assert idp.counts["/jwks"] == count


async def test_background_retry_makes_a_cold_cache_ready(
    idp: IdpServer, rsa_key: SigningKey
) -> None:
    idp.modes["/jwks"] = "500"
    results: list[str] = []
    async with httpx.AsyncClient() as client:
        cache = JwksCache("acme", UrlJwksSource(idp.jwks_url, client), algorithms=["RS256"],
                          clock=time.time, retry_initial_seconds=0.02,
                          on_refresh=lambda t, r: results.append(r))
        await cache.start()
        try:
            assert not cache.ready()
            await poll_until(lambda: idp.counts["/jwks"] >= 3)  # retried with backoff
            del idp.modes["/jwks"]
            await poll_until(cache.ready)
            assert results[0] == "failure"
            assert results[-1] == "success"
        finally:
            await cache.aclose()
