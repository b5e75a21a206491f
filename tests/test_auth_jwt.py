"""JWT validation (gateway.auth.jwt) and the authenticator's JWT path, without sockets.

Keys come from an in-process key source (the same JwksCache the gateway uses, fed by a
callable), so every case runs the production code path; tests with real HTTP key sets
live in tests/integration/test_jwks.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.auth.authenticator import Authenticator
from gateway.auth.jwks import (
    JwksCache,
    JwksDocument,
    JwksError,
    KeyIndex,
    parse_cache_control,
    parse_jwks,
)
from gateway.auth.jwt import (
    MSG_EXPIRED,
    JwtValidator,
    has_scope,
    looks_like_jwt,
    numeric_date,
    parse_unverified,
)
from gateway.config import AuthConfig
from gateway.errors import InsufficientScope, InvalidToken, Unavailable
from tests.support.idp import (
    AUDIENCE,
    ISSUER,
    SCOPE,
    FakeClock,
    SigningKey,
    b64url,
    claims_for,
    hmac_token,
    json_segment,
    jwks,
    make_config,
    new_ec_key,
    new_rsa_key,
    poll_until,
    sign_token,
    tenant,
    unsigned_token,
)

LEEWAY = 30


class CountingSource:
    """An in-process key source that counts fetches; ``fail`` makes fetches fail."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.calls = 0
        self.fail = False

    async def fetch(self) -> JwksDocument:
        self.calls += 1
        if self.fail:
            raise JwksError("configured to fail")
        return JwksDocument(self.document, None)


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return new_rsa_key("rsa-1")


@pytest.fixture(scope="module")
def rsa_key_2() -> SigningKey:
    return new_rsa_key("rsa-2")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return new_ec_key("ec-1")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def auth_config(**overrides: Any) -> AuthConfig:
    settings_: dict[str, Any] = {
        "issuer": ISSUER,
        "jwks_uri": "https://idp.example.test/jwks",
        "audiences": [AUDIENCE],
        "required_scope": SCOPE,
        "algorithms": ["RS256", "ES256"],
        "leeway_seconds": LEEWAY,
    }
    settings_.update(overrides)
    return AuthConfig.model_validate(settings_)


class Harness:
    """A validator over a real JwksCache fed by a CountingSource."""

    def __init__(self, clock: FakeClock, keys: list[SigningKey], **auth: Any) -> None:
        self.clock = clock
        self.source = CountingSource(jwks(*keys))
        self.auth = auth_config(**auth)
        self.refreshes: list[str] = []
        self.cache = JwksCache("acme", self.source, algorithms=self.auth.algorithms,
                               clock=clock, on_refresh=lambda t, r: self.refreshes.append(r))
        self.validator = JwtValidator(self.auth, self.cache, clock=clock)

    async def validate(self, token: str) -> Any:
        return await self.validator.validate(token)


@pytest.fixture
async def harness(
    clock: FakeClock, rsa_key: SigningKey, ec_key: SigningKey
) -> AsyncIterator[Harness]:
    h = Harness(clock, [rsa_key, ec_key])
    await h.cache.start()
    yield h
    await h.cache.aclose()


def token(key: SigningKey, now: float, **kwargs: Any) -> str:
    return sign_token(claims_for(now, **kwargs), key)


# -- accepted tokens ---------------------------------------------------------------------------

async def test_valid_rs256_and_es256_tokens_are_accepted(
    harness: Harness, rsa_key: SigningKey, ec_key: SigningKey, clock: FakeClock
) -> None:
    for key in (rsa_key, ec_key):
        result = await harness.validate(token(key, clock.now, sub="alice", ttl=120))
        assert result.subject == "alice"
        assert result.expires_at == int(clock.now + 120)
        assert result.claims["iss"] == ISSUER
    assert harness.source.calls == 1
    assert harness.refreshes == ["success"]


async def test_unknown_header_parameters_and_large_x5c_header_are_tolerated(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock
) -> None:
    x5c = [base64.b64encode(b"\x30" * 1500).decode()] * 2  # ~4 KB of (ignored) certificates
    t = sign_token(claims_for(clock.now), rsa_key, header={"nonce": "n-1", "x5c": x5c})
    assert (await harness.validate(t)).subject == "user-1"


async def test_token_without_kid_is_accepted_only_when_one_key_fits(
    clock: FakeClock, rsa_key: SigningKey, rsa_key_2: SigningKey, ec_key: SigningKey
) -> None:
    single = Harness(clock, [rsa_key, ec_key])  # one RSA key: RS256 without kid is unambiguous
    await single.cache.start()
    try:
        t = sign_token(claims_for(clock.now), rsa_key, kid=None)
        assert (await single.validate(t)).subject == "user-1"
    finally:
        await single.cache.aclose()
    double = Harness(clock, [rsa_key, rsa_key_2])
    await double.cache.start()
    try:
        with pytest.raises(InvalidToken):
            await double.validate(sign_token(claims_for(clock.now), rsa_key, kid=None))
        assert double.source.calls == 1  # no refresh for a missing kid
    finally:
        await double.cache.aclose()


# -- malformed tokens and algorithm attacks ----------------------------------------------------

MALFORMED = [
    "",
    "abc",
    "a.b",
    "a.b.c.d",
    "not a token at all",
    "eyJhbGciOiJSUzI1NiJ9.e30",
    "!!!.???.***",
    json_segment({"alg": "RS256"}) + ".bm90LWpzb24.sig",  # payload is not JSON
    json_segment([1, 2]) + "." + json_segment({}) + ".sig",  # header not an object
    json_segment({"alg": "RS256"}) + "." + json_segment("str") + ".sig",  # claims not object
    json_segment({"alg": "RS256"}) + "." + b64url(b"[" * 5000) + ".sig",  # deep nesting
    "x" * 20_000 + ".e30.e30",  # over the size cap
]


@pytest.mark.parametrize("bad", MALFORMED)
async def test_malformed_tokens_are_invalid(harness: Harness, bad: str) -> None:
    with pytest.raises(InvalidToken) as info:
        await harness.validate(bad)
    assert info.value.http_status == 401
    assert info.value.message == "the access token is invalid"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_refused(harness: Harness, rsa_key: SigningKey, clock: FakeClock,
                                   alg: str) -> None:
    with pytest.raises(InvalidToken):
        await harness.validate(unsigned_token(claims_for(clock.now), alg=alg, kid=rsa_key.kid))


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_signed_with_the_rsa_public_key_is_refused(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, alg: str
) -> None:
    forged = hmac_token(claims_for(clock.now), rsa_key.public_pem(), alg=alg, kid=rsa_key.kid)
    with pytest.raises(InvalidToken):
        await harness.validate(forged)


async def test_hmac_refused_even_if_the_tenant_allowed_it(clock: FakeClock,
                                                          rsa_key: SigningKey) -> None:
    # The configuration refuses HMAC algorithms outright (no symmetric keys, RFC 8725 §3.2).
    with pytest.raises(ValueError, match="unsupported algorithms"):
        auth_config(algorithms=["HS256"])


async def test_validly_signed_off_list_algorithm_is_refused(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock
) -> None:
    t = sign_token(claims_for(clock.now), rsa_key, alg="RS512")
    assert "RS512" not in harness.auth.algorithms
    with pytest.raises(InvalidToken):
        await harness.validate(t)
    es512 = new_ec_key("ec-512", "ES512", "P-521")
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(claims_for(clock.now), es512))


async def test_key_type_must_match_algorithm(
    harness: Harness, rsa_key: SigningKey, ec_key: SigningKey, clock: FakeClock
) -> None:
    # ES256 header naming the RSA key's kid: the RSA key cannot verify ES256.
    t = sign_token(claims_for(clock.now), ec_key, kid=rsa_key.kid)
    with pytest.raises(InvalidToken):
        await harness.validate(t)


@pytest.mark.parametrize(("require", "typ", "accepted"), [
    (None, "JWT", True), (None, "x", True), (None, "at+jwt", True),
    ("at+jwt", "at+jwt", True), ("at+jwt", "application/at+jwt", True),
    ("at+jwt", "AT+JWT", True), ("application/at+jwt", "at+jwt", True),
    ("at+jwt", "JWT", False), ("at+jwt", None, False), ("at+jwt", "", False),
    ("at+jwt", ["at+jwt"], False), ("at+jwt", "application/jwt", False),
])
async def test_require_typ_compares_media_types(
    clock: FakeClock, rsa_key: SigningKey, require: str | None, typ: object, accepted: bool
) -> None:
    """``auth.require_typ`` (RFC 9068 §2.1 ``at+jwt``): the header's ``typ`` must be that
    media type, ``application/`` implied (RFC 7515 §4.1.9); off, any ``typ`` passes."""
    h = Harness(clock, [rsa_key], require_typ=require)
    await h.cache.start()
    try:
        t = sign_token(claims_for(clock.now), rsa_key, header={"typ": typ})
        if accepted:
            assert (await h.validate(t)).subject
        else:
            with pytest.raises(InvalidToken):
                await h.validate(t)
    finally:
        await h.cache.aclose()


@pytest.mark.parametrize("value", ["", "at jwt", "x" * 128])
def test_require_typ_must_be_a_media_type(value: str) -> None:
    with pytest.raises(ValidationError):
        auth_config(require_typ=value)


def flip_signature_byte(t: str) -> str:
    head, payload, signature = t.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


@pytest.mark.parametrize("which", ["rsa", "ec"])
async def test_flipped_signature_byte_is_refused(
    harness: Harness, rsa_key: SigningKey, ec_key: SigningKey, clock: FakeClock, which: str
) -> None:
    key = rsa_key if which == "rsa" else ec_key
    good = token(key, clock.now)
    assert (await harness.validate(good)).subject == "user-1"
    with pytest.raises(InvalidToken):
        await harness.validate(flip_signature_byte(good))


async def test_altered_payload_is_refused(harness: Harness, rsa_key: SigningKey,
                                          clock: FakeClock) -> None:
    head, _, signature = token(rsa_key, clock.now).split(".")
    forged = f"{head}.{json_segment(claims_for(clock.now, sub='admin'))}.{signature}"
    with pytest.raises(InvalidToken):
        await harness.validate(forged)


async def test_embedded_jwk_header_is_not_trusted(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock
) -> None:
    attacker = new_ec_key("attacker")
    t = sign_token(claims_for(clock.now), attacker, kid=rsa_key.kid,
                   header={"jwk": attacker.public_jwk()})
    with pytest.raises(InvalidToken):
        await harness.validate(t)
    t = sign_token(claims_for(clock.now), attacker, header={"jwk": attacker.public_jwk()})
    with pytest.raises(InvalidToken):
        await harness.validate(t)


@pytest.mark.parametrize("extra", [{"crit": ["exp"], "exp": 1}, {"b64": False, "crit": ["b64"]},
                                   {"b64": True}])
async def test_crit_and_b64_headers_are_refused(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, extra: dict[str, Any]
) -> None:
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(claims_for(clock.now), rsa_key, header=extra))


@pytest.mark.parametrize("kid", [123, ["rsa-1"], "k" * 300])
async def test_bad_kid_values_are_refused_without_refresh(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, kid: Any
) -> None:
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(claims_for(clock.now), rsa_key, header={"kid": kid}))
    assert harness.source.calls == 1


# -- unknown kid, cooldown ---------------------------------------------------------------------

async def test_unknown_kid_triggers_exactly_one_refetch_per_cooldown(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock
) -> None:
    assert harness.source.calls == 1
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(claims_for(clock.now), rsa_key, kid="unknown-0"))
    assert harness.source.calls == 2
    for i in range(100):
        clock.advance(0.25)  # 25 s in all: still within the 30 s cooldown
        with pytest.raises(InvalidToken):
            await harness.validate(sign_token(claims_for(clock.now), rsa_key, kid=f"unknown-{i}"))
    assert harness.source.calls == 2
    clock.advance(6)  # past the cooldown: one more refresh is allowed
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(claims_for(clock.now), rsa_key, kid="unknown-x"))
    assert harness.source.calls == 3


async def test_concurrent_unknown_kids_share_one_refetch(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock
) -> None:
    tokens = [sign_token(claims_for(clock.now), rsa_key, kid=f"u-{i}") for i in range(100)]
    results = await asyncio.gather(*(harness.validate(t) for t in tokens),
                                   return_exceptions=True)
    assert all(isinstance(r, InvalidToken) for r in results)
    assert harness.source.calls == 2


async def test_rotated_key_is_picked_up_on_unknown_kid(
    harness: Harness, rsa_key: SigningKey, rsa_key_2: SigningKey, clock: FakeClock
) -> None:
    harness.source.document = jwks(rsa_key_2)  # the IdP rotates
    result = await harness.validate(token(rsa_key_2, clock.now, sub="rotated"))
    assert result.subject == "rotated"
    assert harness.source.calls == 2
    # The old key is gone from the new set: its tokens fail (after at most one refresh).
    clock.advance(31)
    with pytest.raises(InvalidToken):
        await harness.validate(token(rsa_key, clock.now))


# -- claims ------------------------------------------------------------------------------------

async def test_wrong_issuer_is_refused(harness: Harness, rsa_key: SigningKey,
                                       clock: FakeClock) -> None:
    for issuer in ("https://evil.example/", ISSUER.rstrip("/"), ISSUER.upper()):
        with pytest.raises(InvalidToken):
            await harness.validate(token(rsa_key, clock.now, issuer=issuer))
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token({**claims_for(clock.now), "iss": 7}, rsa_key))


@pytest.mark.parametrize("aud", ["other", ["other", "another"], [], "", None, 5, [5]])
async def test_wrong_or_missing_audience_is_refused(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, aud: Any
) -> None:
    claims = claims_for(clock.now)
    claims["aud"] = aud
    if aud is None:
        del claims["aud"]
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(claims, rsa_key))


@pytest.mark.parametrize("aud", [AUDIENCE, [AUDIENCE], ["other", AUDIENCE]])
async def test_audience_string_or_list_with_ours_is_accepted(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, aud: Any
) -> None:
    assert (await harness.validate(token(rsa_key, clock.now, audience=aud))).subject == "user-1"


async def test_audience_not_checked_when_not_configured(clock: FakeClock,
                                                        rsa_key: SigningKey) -> None:
    h = Harness(clock, [rsa_key], audiences=[])
    await h.cache.start()
    try:
        assert (await h.validate(token(rsa_key, clock.now, audience="anything"))).subject
        assert (await h.validate(token(rsa_key, clock.now, audience=None))).subject
    finally:
        await h.cache.aclose()


async def test_expiry_with_leeway(harness: Harness, rsa_key: SigningKey,
                                  clock: FakeClock) -> None:
    expired = claims_for(clock.now)
    expired["exp"] = int(clock.now) - (LEEWAY + 1)
    with pytest.raises(InvalidToken) as info:
        await harness.validate(sign_token(expired, rsa_key))
    assert info.value.message == MSG_EXPIRED
    within = claims_for(clock.now)
    within["exp"] = int(clock.now) - (LEEWAY - 5)
    assert (await harness.validate(sign_token(within, rsa_key))).expires_at == within["exp"]


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_not_before_and_issued_at_in_the_future_are_refused(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, claim: str
) -> None:
    future = claims_for(clock.now)
    future[claim] = int(clock.now) + LEEWAY + 5
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(future, rsa_key))
    skewed = claims_for(clock.now)
    skewed[claim] = int(clock.now) + LEEWAY - 5  # clock skew within the leeway
    assert (await harness.validate(sign_token(skewed, rsa_key))).subject == "user-1"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"exp": NaN}',
        b'{"exp": Infinity}',
        b'{"exp": -Infinity}',
        b'{"exp": true}',
        b'{"exp": "9999999999"}',
        b'{"exp": null}',
        b'{"exp": [9999999999]}',
        b'{"exp": 1e400}',
        b'{"nbf": NaN}',
        b'{"iat": "yesterday"}',
    ],
)
async def test_bad_numeric_dates_are_refused(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, payload: bytes
) -> None:
    claims = claims_for(clock.now)
    overrides = json.loads(payload)
    claims.update(overrides)
    body = json.dumps(claims).encode()  # keeps NaN/Infinity literals
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(None, rsa_key, payload=body))


@pytest.mark.parametrize("missing", ["exp", "sub"])
async def test_missing_exp_or_sub_is_refused(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, missing: str
) -> None:
    claims = claims_for(clock.now)
    del claims[missing]
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(claims, rsa_key))


@pytest.mark.parametrize("sub", ["", 42, ["user"], None, {"id": "u"}])
async def test_bad_subject_is_refused(harness: Harness, rsa_key: SigningKey, clock: FakeClock,
                                      sub: Any) -> None:
    claims = claims_for(clock.now)
    claims["sub"] = sub
    with pytest.raises(InvalidToken):
        await harness.validate(sign_token(claims, rsa_key))


# -- scope -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "claims",
    [
        {"scope": SCOPE},
        {"scope": f"openid {SCOPE} profile"},
        {"scope": ["openid", SCOPE]},
        {"scp": [SCOPE, "other"]},
        {"scp": f"other {SCOPE}"},
        {"scope": "openid", "scp": [SCOPE]},  # failing scope, scp still counts
    ],
)
async def test_scope_forms_are_accepted(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, claims: dict[str, Any]
) -> None:
    base = claims_for(clock.now, scope=None)
    base.update(claims)
    assert (await harness.validate(sign_token(base, rsa_key))).subject == "user-1"


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"scope": ""},
        {"scope": f"{SCOPE}-extra"},
        {"scope": SCOPE.rsplit(":", 1)[0]},
        {"scope": SCOPE.upper()},
        {"scope": f"{SCOPE},openid"},
        {"scope": [f"{SCOPE} openid"]},
        {"scope": [1, None, {"s": SCOPE}]},
        {"scp": f"x{SCOPE}"},
        {"scope": {"value": SCOPE}},
        {"scopes": [SCOPE]},
    ],
)
async def test_missing_or_inexact_scope_is_insufficient(
    harness: Harness, rsa_key: SigningKey, clock: FakeClock, claims: dict[str, Any]
) -> None:
    base = claims_for(clock.now, scope=None)
    base.update(claims)
    with pytest.raises(InsufficientScope) as info:
        await harness.validate(sign_token(base, rsa_key))
    assert info.value.http_status == 403
    assert SCOPE not in info.value.message


def test_has_scope_exact_match_only() -> None:
    assert has_scope({"scope": "a b c"}, "b")
    assert has_scope({"scope": "a  b"}, "b")
    assert not has_scope({"scope": "a:use-model-extra"}, "a:use-model")
    assert not has_scope({"scope": "a:use-model"}, "a:use-model-extra")
    assert has_scope({"scp": ["x", "a:use-model"]}, "a:use-model")
    assert not has_scope({}, "a")


def test_numeric_date() -> None:
    assert numeric_date(5) == 5.0
    assert numeric_date(5.5) == 5.5
    for bad in (True, False, float("nan"), float("inf"), "5", None, 10**400, [1]):
        assert numeric_date(bad) is None


def test_looks_like_jwt_and_parse_unverified() -> None:
    assert looks_like_jwt("a.b.c")
    assert looks_like_jwt("a.b.")
    assert not looks_like_jwt("a.b")
    assert not looks_like_jwt("a.b.c=")
    assert not looks_like_jwt(" a.b.c")
    parsed = parse_unverified(f"{json_segment({'alg': 'RS256'})}.{json_segment({'iss': 'x'})}.s")
    assert parsed.issuer == "x"
    assert parsed.header == {"alg": "RS256"}
    assert parse_unverified(f"{json_segment({})}.{json_segment({'iss': 1})}.").issuer is None


# -- key set parsing ---------------------------------------------------------------------------

def test_parse_jwks_filters_unusable_keys(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    p384 = new_ec_key("ec-384", "ES384", "P-384")
    entries = [
        rsa_key.public_jwk(),
        ec_key.public_jwk(),
        {"kty": "oct", "k": b64url(b"secret-secret-secret-secret!!!!!"), "kid": "hmac"},
        rsa_key.public_jwk(kid="enc", use="enc"),
        rsa_key.public_jwk(kid="ops", key_ops=["encrypt"]),
        rsa_key.public_jwk(kid="rs512", alg="RS512"),
        p384.public_jwk(),  # no ES384 in the allow-list
        {**rsa_key.key.as_dict(private=True), "kid": "private"},
        {"kty": "RSA", "kid": "broken", "n": "AAAA", "e": 7},
        {"kty": "UNKNOWN", "kid": "pq"},
        "not-an-object",
        rsa_key.public_jwk(kid="k" * 300),
    ]
    index, skipped = parse_jwks({"keys": entries}, ["RS256", "ES256"])
    assert len(index) == 2
    assert skipped == len(entries) - 2
    assert index.find(rsa_key.kid, "RS256") is not None
    assert index.find(ec_key.kid, "ES256") is not None
    assert index.find(rsa_key.kid, "ES256") is None
    for kid in ("hmac", "enc", "ops", "rs512", "ec-384", "private", "broken", "pq"):
        assert index.find(kid, "RS256") is None
        assert index.find(kid, "HS256") is None


@pytest.mark.parametrize(
    "document",
    [None, [], {}, {"keys": "x"}, {"keys": []}, {"keys": [{"kty": "oct", "k": "AAAA"}]}],
)
def test_parse_jwks_refuses_documents_without_usable_keys(document: Any) -> None:
    with pytest.raises(JwksError):
        parse_jwks(document, ["RS256"])


def test_parse_jwks_refuses_more_than_50_keys(ec_key: SigningKey) -> None:
    entries = [ec_key.public_jwk(kid=f"k{i}") for i in range(51)]
    with pytest.raises(JwksError, match="more than 50"):
        parse_jwks({"keys": entries}, ["ES256"])
    index, _ = parse_jwks({"keys": entries[:50]}, ["ES256"])
    assert len(index) == 50


def test_key_index_without_kid(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    index = KeyIndex([rsa_key.key, ec_key.key])  # keys without kid parameters
    assert index.find(None, "RS256") is rsa_key.key
    assert index.find(None, "ES256") is ec_key.key
    assert index.find(None, "PS256") is rsa_key.key
    assert index.find("x", "RS256") is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("max-age=120", 120.0),
        ("public, max-age=86400, must-revalidate", 86400.0),
        ('max-age="300"', 300.0),
        ("no-store", 0.0),
        ("private, no-cache", 0.0),
        ("max-age=abc", None),
        ("s-maxage=100", None),
    ],
)
def test_parse_cache_control(header: str | None, expected: float | None) -> None:
    assert parse_cache_control(header) == expected


# -- cache behaviour without sockets -----------------------------------------------------------

async def test_cold_cache_is_unavailable_and_retries_with_backoff(
    clock: FakeClock, rsa_key: SigningKey
) -> None:
    h = Harness(clock, [rsa_key])
    h.source.fail = True
    await h.cache.start()
    try:
        assert not h.cache.ready()
        assert h.refreshes == ["failure"]
        with pytest.raises(Unavailable) as info:
            await h.validate(token(rsa_key, clock.now))
        assert info.value.http_status == 503
        assert info.value.retry_after == 5
        assert h.source.calls == 1  # within the backoff: no new fetch per request
        clock.advance(2)  # backoff (~1 s) over
        h.source.fail = False
        assert (await h.validate(token(rsa_key, clock.now))).subject == "user-1"
        assert h.source.calls == 2
        assert h.cache.ready()
    finally:
        await h.cache.aclose()


async def test_stale_keys_are_served_while_refresh_fails_then_expire(
    clock: FakeClock, rsa_key: SigningKey
) -> None:
    h = Harness(clock, [rsa_key])
    await h.cache.start()
    try:
        h.source.fail = True
        clock.advance(601)  # TTL over: the lookup refreshes in the background and still serves
        assert (await h.validate(token(rsa_key, clock.now))).subject == "user-1"
        await poll_until(lambda: h.source.calls == 2)
        assert h.refreshes == ["success", "failure"]
        assert h.cache.ready()
        age = h.cache.age_seconds()
        assert age is not None
        assert age >= 601
        clock.advance(24 * 3600)  # past max_stale: cold
        assert not h.cache.ready()
        clock.advance(120)
        with pytest.raises(Unavailable):
            await h.validate(token(rsa_key, clock.now))
    finally:
        await h.cache.aclose()


# -- the authenticator's JWT path --------------------------------------------------------------

@pytest.fixture
async def authenticator(
    clock: FakeClock, rsa_key: SigningKey, tmp_path: Any
) -> AsyncIterator[Authenticator]:
    config = make_config(
        tenant("acme", dev_issuer={"key_file": str(tmp_path / "dev.jwk")}),
        tenant("other", issuer="https://other.example/",
               dev_issuer={"key_file": str(tmp_path / "other.jwk")}),
    )
    auth = Authenticator(config, clock=clock)
    await auth.start()
    yield auth
    await auth.aclose()


async def test_authenticator_selects_tenant_by_issuer(
    authenticator: Authenticator, clock: FakeClock
) -> None:
    acme = authenticator.dev_issuer("acme")
    other = authenticator.dev_issuer("other")
    assert acme is not None
    assert other is not None
    assert authenticator.ready()
    t = acme.mint(ISSUER, AUDIENCE, "alice", SCOPE, 300)
    principal = await authenticator.authenticate(t)
    assert principal.tenant.id == "acme"
    assert principal.subject == "alice"
    assert principal.expires_at == int(clock.now) + 300
    t = other.mint("https://other.example/", AUDIENCE, "bob", SCOPE, 300)
    assert (await authenticator.authenticate(t)).tenant.id == "other"
    # Signed by one tenant's key but claiming the other's issuer: refused.
    with pytest.raises(InvalidToken):
        await authenticator.authenticate(other.mint(ISSUER, AUDIENCE, "mallory", SCOPE, 300))


async def test_authenticator_refuses_unknown_issuer_and_non_jwt_without_introspection(
    authenticator: Authenticator,
) -> None:
    acme = authenticator.dev_issuer("acme")
    assert acme is not None
    with pytest.raises(InvalidToken):
        await authenticator.authenticate(acme.mint("https://unknown.example/", AUDIENCE, "a",
                                                   SCOPE, 300))
    for opaque in ("opaque-token-value", "x" * 40, "a.b", "tok en", "tök", "a" * 20_000):
        with pytest.raises(InvalidToken):
            await authenticator.authenticate(opaque)


async def test_authenticator_refuses_tokens_about_to_expire(
    authenticator: Authenticator, clock: FakeClock
) -> None:
    acme = authenticator.dev_issuer("acme")
    assert acme is not None
    almost = acme.mint(ISSUER, AUDIENCE, "alice", SCOPE, 1)  # exp = now + 1
    clock.advance(0.5)  # 0.5 s left
    with pytest.raises(InvalidToken) as info:
        await authenticator.authenticate(almost)
    assert info.value.message == MSG_EXPIRED
    enough = acme.mint(ISSUER, AUDIENCE, "alice", SCOPE, 3)
    assert (await authenticator.authenticate(enough)).subject == "alice"


async def test_authenticator_insufficient_scope(authenticator: Authenticator) -> None:
    acme = authenticator.dev_issuer("acme")
    assert acme is not None
    with pytest.raises(InsufficientScope):
        await authenticator.authenticate(acme.mint(ISSUER, AUDIENCE, "a", f"{SCOPE}-extra", 300))


# -- fuzz --------------------------------------------------------------------------------------

class FuzzEnv:
    """One event loop and one Authenticator (a development-issuer tenant) for all examples."""

    def __init__(self, runner: asyncio.Runner, auth: Authenticator, key: SigningKey,
                 clock: FakeClock) -> None:
        self.runner = runner
        self.auth = auth
        self.key = key
        self.clock = clock

    def check(self, candidate: str) -> None:
        """The only outcomes allowed: a Principal, InvalidToken or InsufficientScope."""
        with contextlib.suppress(InvalidToken, InsufficientScope):
            self.runner.run(asyncio.wait_for(self.auth.authenticate(candidate), 5))


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    clock = FakeClock()
    key_file = tmp_path_factory.mktemp("fuzz") / "dev.jwk"
    with asyncio.Runner() as runner:
        auth = Authenticator(make_config(tenant("acme", dev_issuer={"key_file": str(key_file)})),
                             clock=clock)
        runner.run(auth.start())
        dev = auth.dev_issuer("acme")
        assert dev is not None
        assert auth.ready()
        yield FuzzEnv(runner, auth, SigningKey(dev.key(), dev.kid, "ES256"), clock)
        runner.run(auth.aclose())


_TOKENISH = st.text(max_size=300) | st.from_regex(
    r"[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,60}", fullmatch=True)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
_CLAIMS = st.fixed_dictionaries(
    {},
    optional={
        name: _JSON | st.just(value)
        for name, value in {"iss": ISSUER, "aud": AUDIENCE, "sub": "u", "scope": SCOPE,
                            "exp": 9_999_999_999, "nbf": 0, "iat": 0, "scp": [SCOPE]}.items()
    },
)
_HEADERS = st.dictionaries(
    st.sampled_from(["kid", "alg", "typ", "cty", "crit", "jku", "x5u", "x5c", "jwk", "b64",
                     "zip", "nonce"]),
    _JSON, max_size=3)


def run_fuzz(env: FuzzEnv, case: str, examples: int) -> None:
    """Run one fuzz case (``random``, ``mutated`` or ``signed``) for ``examples`` examples."""
    fuzz = settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

    @fuzz
    @given(_TOKENISH)
    def random_strings(candidate: str) -> None:
        env.check(candidate)

    @fuzz
    @given(st.data())
    def mutated_valid_tokens(data: st.DataObject) -> None:
        chars = list(sign_token(claims_for(env.clock.now), env.key))
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(chars) - 1))
            action = data.draw(st.sampled_from(["replace", "delete", "insert"]))
            if action == "delete" and len(chars) > 1:
                del chars[position]
            else:
                char = data.draw(st.characters(codec="ascii") | st.sampled_from("._-=A"))
                if action == "replace":
                    chars[position] = char
                else:
                    chars.insert(position, char)
        env.check("".join(chars))

    @fuzz
    @given(claims=_CLAIMS, header=_HEADERS)
    def signed_arbitrary_claims(claims: dict[str, Any], header: dict[str, Any]) -> None:
        env.check(sign_token(claims, env.key, header=header))

    {"random": random_strings, "mutated": mutated_valid_tokens,
     "signed": signed_arbitrary_claims}[case]()


FUZZ_CASES = ["random", "mutated", "signed"]


def test_fuzz_env_accepts_a_valid_token(fuzz_env: FuzzEnv) -> None:
    valid = sign_token(claims_for(fuzz_env.clock.now), fuzz_env.key)
    principal = fuzz_env.runner.run(fuzz_env.auth.authenticate(valid))
    assert principal.subject == "user-1"


@pytest.mark.parametrize("case", FUZZ_CASES)
def test_fuzz_jwt_path(fuzz_env: FuzzEnv, case: str) -> None:
    run_fuzz(fuzz_env, case, 200)


@pytest.mark.slow
@pytest.mark.parametrize("case", FUZZ_CASES)
def test_fuzz_jwt_path_long(fuzz_env: FuzzEnv, case: str) -> None:
    run_fuzz(fuzz_env, case, 2000)
