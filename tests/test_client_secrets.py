"""Client secrets (gateway.auth.client_secrets, CONTRACT §8): minting, verification, the
request and response shapes of ``POST /v1/realtime/client_secrets``.

Pure functions, no sockets: the openai SDK's own request encoding and response parsing are
exercised through an ``httpx2.MockTransport`` (the HTTP client openai-python uses).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import zlib
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc.jwk import OctKey
from joserfc.jws import JWSRegistry
from openai.types.realtime import ClientSecretCreateResponse

from gateway.auth.client_secrets import (
    DEFAULT_SECONDS,
    MAX_JSON_DEPTH,
    MAX_SECRET_BYTES,
    MAX_TEMPLATE_BYTES,
    MSG_TOO_LARGE,
    PREFIX,
    REASONS,
    TYP,
    CreateRequest,
    SecretClaims,
    SigningKeys,
    _nesting_exceeds,
    is_client_secret,
    mint,
    parse_create_request,
    render_response,
    verify,
)
from gateway.auth.jwt import MSG_EXPIRED, MSG_INVALID, JwtValidator
from gateway.config import AuthConfig, ClientSecretsConfig, parse_config
from gateway.errors import Forbidden, GatewayError, InvalidRequest, InvalidToken
from tests.support.idp import b64url, claims_for, json_segment, new_rsa_key, sign_token

KEY = "k" * 43
OLD_KEY = "o" * 43
OTHER_KEY = "x" * 43
MODELS = ("gpt-realtime", "gpt-realtime-mini")
NOW = 1_800_000_000.25
SCOPE = "language-model-service:use-model openid"


def make_claims(*, seconds: int = 600, token_exp: float | None = NOW + 3600,
                session: dict[str, Any] | None = None, now: float = NOW,
                tenant: str = "acme") -> SecretClaims:
    template = {"type": "realtime", "model": MODELS[0], **(session or {})}
    return SecretClaims.issue(tenant=tenant, subject="user-1", scope=SCOPE,
                              request=CreateRequest(seconds, template), now=now,
                              token_exp=token_exp)


def keys(value: str = f"k1:{KEY}") -> SigningKeys:
    return SigningKeys.parse(value)


def refused(value: str, signing: SigningKeys | None = None, now: float = NOW) -> InvalidToken:
    with pytest.raises(InvalidToken) as caught:
        verify(signing or keys(), value, now)
    assert caught.value.reason in REASONS
    assert caught.value.http_status == 401 and caught.value.close_code == 4401
    return caught.value


def segments(value: str) -> list[str]:
    assert value.startswith(PREFIX)
    return value[len(PREFIX):].split(".")


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def forge(header: dict[str, Any], payload: bytes, key: bytes = KEY.encode(),
          alg: str = "HS256") -> str:
    """``ek_`` + a compact JWS over any header and payload, HMAC-signed with ``key``."""
    signing_input = f"{json_segment(header)}.{b64url(payload)}".encode("ascii")
    signature = JWSRegistry.algorithms[alg].sign(signing_input, OctKey.import_key(key))
    return f"{PREFIX}{signing_input.decode('ascii')}.{b64url(signature)}"


HEADER = {"alg": "HS256", "kid": "k1", "typ": TYP}


def good_payload(*, drop: str = "", **changes: Any) -> dict[str, Any]:
    """The payload :func:`mint` writes for :func:`make_claims`, with ``changes`` applied and
    the claim ``drop`` removed."""
    payload: dict[str, Any] = json.loads(unb64(segments(mint(keys(), make_claims()))[1]))
    payload.update(changes)
    payload.pop(drop, None)
    return payload


# -- round trip, rotation, replicas ------------------------------------------------------------

def test_round_trip() -> None:
    claims = make_claims(session={"instructions": "Be brief.", "audio": {"output": {
        "voice": "marin"}}})
    value = mint(keys(), claims)
    assert is_client_secret(value) and len(value) < 1024
    assert all(c.isalnum() or c in "-_." for c in value)  # a valid subprotocol token
    assert json.loads(unb64(segments(value)[0])) == HEADER
    assert verify(keys(), value, NOW) == claims
    assert claims.iat == 1_800_000_000 and claims.exp == claims.iat + 600
    assert claims.token_exp == 1_800_003_600
    assert claims.session["model"] == claims.model == "gpt-realtime"
    assert claims.session["instructions"] == "Be brief."
    assert len(claims.jti) >= 22 and claims.jti != make_claims().jti


def test_rotation_signs_with_the_first_kid_and_accepts_the_others() -> None:
    old_only = keys(f"old:{OLD_KEY}")
    rotated = keys(f"new:{KEY},old:{OLD_KEY}")
    old_secret = mint(old_only, make_claims())
    new_secret = mint(rotated, make_claims())
    assert json.loads(unb64(segments(new_secret)[0]))["kid"] == "new"
    assert verify(rotated, old_secret, NOW).subject == "user-1"
    assert verify(rotated, new_secret, NOW).subject == "user-1"
    assert refused(new_secret, old_only).reason == "unknown_kid"
    assert refused(old_secret, keys(f"new:{KEY}")).reason == "unknown_kid"  # old kid dropped


def test_two_replicas_with_the_same_key_accept_each_others_secrets() -> None:
    env = f"2026-11:{KEY},2026-05:{OLD_KEY}"
    replica_a, replica_b = SigningKeys.parse(env), SigningKeys.parse(env)
    assert verify(replica_b, mint(replica_a, make_claims()), NOW).tenant == "acme"
    assert verify(replica_a, mint(replica_b, make_claims()), NOW).tenant == "acme"


def test_a_bare_key_signs_under_the_default_kid() -> None:
    value = mint(SigningKeys.parse(f" {KEY}\n"), make_claims())
    assert json.loads(unb64(segments(value)[0]))["kid"] == "default"
    rotated = SigningKeys.parse(f"next:{OTHER_KEY},default:{KEY}")
    assert verify(rotated, value, NOW).subject == "user-1"


def test_signing_keys_from_config_and_their_repr() -> None:
    env = {"OPENAI_API_KEY": "sk-test", "REALTIME_GATEWAY_SECRET_KEY": f"a:{KEY},b:{OLD_KEY}"}
    config = parse_config({
        "client_secrets": {},
        "upstreams": {"openai": {"provider": "openai", "url": "wss://api.openai.com/v1/realtime",
                                 "api_key_env": "OPENAI_API_KEY"}},
        "tenants": [{"id": "acme", "auth": {"issuer": "https://idp/", "jwks_uri": "https://idp/j"},
                     "models": {"gpt-realtime": {"upstream": "openai"}}}],
    }, env)
    assert config.client_secrets is not None
    loaded = SigningKeys.from_config(config.client_secrets)
    assert loaded.kids == ("a", "b") and loaded.signing.kid == "a"
    assert verify(keys(f"b:{OLD_KEY},a:{KEY}"), mint(loaded, make_claims()), NOW).jti
    assert KEY not in repr(loaded) and KEY not in repr(loaded.signing)
    with pytest.raises(ValueError, match="no signing key"):
        SigningKeys.from_config(ClientSecretsConfig())  # not loaded: no keys read


@pytest.mark.parametrize(("pairs", "message"), [
    ([], "no signing key"),
    ([("a", KEY.encode()), ("a", OLD_KEY.encode())], "duplicate kid 'a'"),
    ([("a", b"short")], "key 'a' is shorter than 32 bytes"),
])
def test_signing_keys_refuse_bad_pairs(pairs: list[tuple[str, bytes]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SigningKeys(pairs)


# -- refusals ------------------------------------------------------------------------------------

def test_expiry_is_exclusive() -> None:
    claims = make_claims(seconds=60)
    value = mint(keys(), claims)
    assert verify(keys(), value, claims.exp - 0.001) == claims
    error = refused(value, now=claims.exp)
    assert error.reason == "expired" and error.message == MSG_EXPIRED


def tampered_payload(value: str) -> str:
    header, payload, signature = segments(value)
    claims = json.loads(unb64(payload))
    claims["tenant"] = "globex"
    return f"{PREFIX}{header}.{json_segment(claims)}.{signature}"


def tampered_kid(value: str) -> str:
    _, payload, signature = segments(value)
    return f"{PREFIX}{json_segment({**HEADER, 'kid': 'k2'})}.{payload}.{signature}"


def flipped(value: str, segment: int) -> str:
    parts = segments(value)
    first = parts[segment][0]
    parts[segment] = ("B" if first == "A" else "A") + parts[segment][1:]
    return PREFIX + ".".join(parts)


def rsa_signed() -> str:
    return PREFIX + sign_token(good_payload(), new_rsa_key(kid="k1"),
                               header={"typ": TYP})


def hs(header: dict[str, Any], *, key: str = KEY, alg: str = "HS256") -> str:
    return forge(header, json.dumps(good_payload()).encode(), key.encode(), alg)


def alg_none(signature: str) -> str:
    return PREFIX + ".".join([json_segment({**HEADER, "alg": "none"}),
                              json_segment(good_payload()), signature])


@pytest.mark.parametrize(("make", "reason"), [
    pytest.param(tampered_payload, "bad_signature", id="tampered-payload"),
    pytest.param(tampered_kid, "bad_signature", id="kid-of-another-configured-key"),
    pytest.param(lambda v: flipped(v, 2), "bad_signature", id="tampered-signature"),
    pytest.param(lambda v: flipped(v, 1), "bad_signature", id="flipped-payload-byte"),
    pytest.param(lambda v: flipped(v, 0), "malformed", id="flipped-header-byte"),
    pytest.param(lambda v: v + "A", "bad_signature", id="longer-signature"),
    pytest.param(lambda v: v + "AA", "bad_signature", id="non-base64url-signature-length"),
    pytest.param(lambda v: v[len(PREFIX):], "malformed", id="no-prefix"),
    pytest.param(lambda v: "sk_" + v[len(PREFIX):], "malformed", id="other-prefix"),
    pytest.param(lambda v: "EK_" + v[len(PREFIX):], "malformed", id="upper-case-prefix"),
    pytest.param(lambda v: "", "malformed", id="empty"),
    pytest.param(lambda v: PREFIX, "malformed", id="prefix-only"),
    pytest.param(lambda v: v + ".x", "malformed", id="four-segments"),
    pytest.param(lambda v: v.replace(".", ".\u00e9", 1), "malformed", id="non-ascii"),
    pytest.param(lambda v: PREFIX + "A" * (MAX_SECRET_BYTES - len(PREFIX) + 1), "oversize",
                 id="one-byte-over-the-cap"),
    pytest.param(lambda v: v + "A" * MAX_SECRET_BYTES, "oversize", id="padded"),
    pytest.param(lambda v: hs(HEADER, key=OTHER_KEY), "bad_signature", id="forged-other-key"),
    pytest.param(lambda v: hs({**HEADER, "kid": "k9"}), "unknown_kid", id="unknown-kid"),
    pytest.param(lambda v: hs({**HEADER, "kid": 7}), "unknown_kid", id="kid-not-a-string"),
    pytest.param(lambda v: hs({**HEADER, "alg": "HS512"}, alg="HS512"), "algorithm",
                 id="alg-HS512"),
    pytest.param(lambda v: hs({**HEADER, "alg": "HS384"}, alg="HS384"), "algorithm",
                 id="alg-HS384"),
    pytest.param(lambda v: alg_none(""), "malformed", id="alg-none-unsigned"),
    pytest.param(lambda v: alg_none("AAAA"), "algorithm", id="alg-none"),
    pytest.param(lambda v: rsa_signed(), "algorithm", id="alg-RS256"),
    pytest.param(lambda v: hs({**HEADER, "typ": "JWT"}), "type", id="typ-JWT"),
    pytest.param(lambda v: hs({"alg": "HS256", "kid": "k1"}), "malformed", id="no-typ"),
    pytest.param(lambda v: hs({**HEADER, "crit": ["exp"]}), "malformed", id="crit"),
    pytest.param(lambda v: hs({**HEADER, "b64": False}), "malformed", id="b64-false"),
    pytest.param(lambda v: hs({**HEADER, "jku": "http://127.0.0.1:1/"}), "malformed",
                 id="jku"),
])
def test_refused(make: Any, reason: str) -> None:
    value = mint(keys(f"k1:{KEY},k2:{OLD_KEY}"), make_claims())
    error = refused(make(value), keys(f"k1:{KEY},k2:{OLD_KEY}"))
    assert error.reason == reason
    assert error.message == MSG_INVALID
    assert error.code == "invalid_token"


def template_segment(raw: bytes) -> str:
    return b64url(zlib.compress(raw))


@pytest.mark.parametrize("payload", [
    json.dumps(good_payload(drop="tenant")).encode(),
    json.dumps(good_payload(drop="sub")).encode(),
    json.dumps(good_payload(drop="jti")).encode(),
    json.dumps(good_payload(tenant="")).encode(),
    json.dumps(good_payload(model=7)).encode(),
    json.dumps(good_payload(scope=["a"])).encode(),
    json.dumps(good_payload(iat="1800000000")).encode(),
    json.dumps(good_payload(exp=True)).encode(),
    json.dumps(good_payload(exp=1.9e9)).encode(),
    json.dumps(good_payload(drop="token_exp")).encode(),
    json.dumps(good_payload(token_exp="soon")).encode(),
    json.dumps(good_payload(session="not base64!")).encode(),
    json.dumps(good_payload(session=b64url(b"not zlib"))).encode(),
    json.dumps(good_payload(session=template_segment(b"[1, 2]"))).encode(),
    json.dumps(good_payload(session=template_segment(b"{broken"))).encode(),
    json.dumps(good_payload(session=template_segment(b"{}") + "AAAA")).encode(),
    json.dumps(good_payload(session=b64url(zlib.compress(b"{}")[:-3]))).encode(),  # truncated
    json.dumps(good_payload(session=template_segment(
        b'{"a":"' + b"x" * MAX_TEMPLATE_BYTES + b'"}'))).encode(),  # inflates too far
    b"[1, 2, 3]",
    b"not json",
])
def test_refused_for_bad_claims(payload: bytes) -> None:
    error = refused(forge(HEADER, payload))
    assert error.reason == "claims" and error.message == MSG_INVALID


def test_claims_forged_with_the_right_key_are_read() -> None:
    value = forge(HEADER, json.dumps(good_payload(token_exp=None)).encode())
    assert verify(keys(), value, NOW).token_exp is None  # the forge helper itself is sound


def test_other_tenant_refused_when_tenants_are_given() -> None:
    value = mint(keys(), make_claims(tenant="acme"))
    assert verify(keys(), value, NOW, tenants={"acme", "globex"}).tenant == "acme"
    with pytest.raises(InvalidToken) as caught:
        verify(keys(), value, NOW, tenants={"globex"})
    assert caught.value.reason == "unknown_tenant" and caught.value.message == MSG_INVALID


class NoKeys:
    async def key_for(self, kid: str | None, alg: str) -> None:
        return None


async def test_a_secret_never_passes_as_an_access_token_and_vice_versa() -> None:
    access_token = sign_token(claims_for(NOW), new_rsa_key())
    assert refused(PREFIX + access_token).reason == "type"
    assert refused(access_token).reason == "malformed"
    # An HS256 JWT signed with the very signing key and kid, as a JWT library would make it.
    jwt_same_key = forge({"alg": "HS256", "kid": "k1", "typ": "JWT"},
                         json.dumps(claims_for(NOW)).encode())
    assert refused(jwt_same_key).reason == "type"
    secret = mint(keys(), make_claims())
    validator = JwtValidator(AuthConfig(issuer="https://idp.example.test/",
                                        jwks_uri="https://idp.example.test/jwks",
                                        algorithms=("RS256", "ES256")),
                             NoKeys(), clock=lambda: NOW)
    for token in (secret, secret[len(PREFIX):]):
        with pytest.raises(InvalidToken):
            await validator.validate(token)


# -- claims and minting ---------------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "token_exp", "expected_exp", "expected_token_exp"), [
    (600, NOW + 3600, 1_800_000_600, 1_800_003_600),
    (600, NOW + 60.9, 1_800_000_061, 1_800_000_061),        # the token ends first
    (7200, None, 1_800_007_200, None),                       # a token without exp
    (10, NOW + 10, 1_800_000_010, 1_800_000_010),
])
def test_expiry_is_the_earlier_of_seconds_and_token_exp(
        seconds: int, token_exp: float | None, expected_exp: int,
        expected_token_exp: int | None) -> None:
    claims = make_claims(seconds=seconds, token_exp=token_exp)
    assert (claims.exp, claims.token_exp) == (expected_exp, expected_token_exp)


@pytest.mark.parametrize("token_exp", [NOW - 5, NOW, NOW + 0.5])
def test_no_secret_for_a_token_that_is_expiring(token_exp: float) -> None:
    with pytest.raises(InvalidToken) as caught:
        make_claims(token_exp=token_exp)
    assert caught.value.reason == "expired"


def test_mint_refuses_a_template_too_large_for_a_secret() -> None:
    incompressible = base64.b64encode(os.urandom(3000)).decode()
    with pytest.raises(InvalidRequest) as caught:
        mint(keys(), make_claims(session={"instructions": incompressible}))
    assert caught.value.message == MSG_TOO_LARGE and caught.value.http_status == 400
    with pytest.raises(InvalidRequest, match=MSG_TOO_LARGE):
        mint(keys(), make_claims(session={"instructions": "a" * (MAX_TEMPLATE_BYTES + 1)}))


def test_mint_compresses_the_template() -> None:
    instructions = "You are a helpful, concise voice assistant for ACME support. " * 100
    value = mint(keys(), make_claims(session={"instructions": instructions}))
    assert len(instructions) > 6000 > MAX_SECRET_BYTES > len(value)
    assert verify(keys(), value, NOW).session["instructions"] == instructions


def test_mint_refuses_a_template_naming_another_model() -> None:
    claims = make_claims()
    inconsistent = dataclasses.replace(claims, session={"type": "realtime", "model": MODELS[1]})
    with pytest.raises(ValueError, match="model"):
        mint(keys(), inconsistent)


# -- the request -------------------------------------------------------------------------------

def parse(body: Any, max_seconds: int = 7200) -> CreateRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_create_request(raw, models=MODELS, max_seconds=max_seconds)


@pytest.mark.parametrize(("body", "seconds", "session"), [
    (b"", DEFAULT_SECONDS, {"type": "realtime", "model": "gpt-realtime"}),
    ({}, DEFAULT_SECONDS, {"type": "realtime", "model": "gpt-realtime"}),
    ({"expires_after": None, "session": None}, DEFAULT_SECONDS,
     {"type": "realtime", "model": "gpt-realtime"}),
    ({"expires_after": {"anchor": "created_at", "seconds": 300}}, 300,
     {"type": "realtime", "model": "gpt-realtime"}),
    ({"expires_after": {"seconds": 10}}, 10, {"type": "realtime", "model": "gpt-realtime"}),
    ({"expires_after": {"anchor": "created_at"}}, DEFAULT_SECONDS,
     {"type": "realtime", "model": "gpt-realtime"}),
    ({"expires_after": {"seconds": 7200}}, 7200, {"type": "realtime", "model": "gpt-realtime"}),
    ({"session": {"type": "realtime", "model": "gpt-realtime-mini", "instructions": "Hi."}},
     DEFAULT_SECONDS, {"type": "realtime", "model": "gpt-realtime-mini", "instructions": "Hi."}),
    ({"session": {"type": "realtime", "model": None}}, DEFAULT_SECONDS,
     {"type": "realtime", "model": "gpt-realtime"}),
    ({"session": {"type": "realtime", "tools": [{"type": "function", "name": "f",
                                                 "parameters": {"type": "object"}}]}},
     DEFAULT_SECONDS, {"type": "realtime", "model": "gpt-realtime",
                       "tools": [{"type": "function", "name": "f",
                                  "parameters": {"type": "object"}}]}),
])
def test_parse_create_request(body: Any, seconds: int, session: dict[str, Any]) -> None:
    request = parse(body)
    assert (request.seconds, request.session) == (seconds, session)
    assert request.model == session["model"]


def test_default_seconds_never_exceed_max_seconds() -> None:
    assert parse({}, max_seconds=300).seconds == 300
    assert parse({"expires_after": {"seconds": 300}}, max_seconds=300).seconds == 300


def nested(depth: int) -> bytes:
    """A body whose ``session.x`` nests so that the whole body is ``depth`` levels deep."""
    return b'{"session":{"type":"realtime","x":' + b"[" * (depth - 2) + b"]" * (depth - 2) + b"}}"


@pytest.mark.parametrize(("body", "message"), [
    (b"{", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"expires_after": NaN}', "not valid JSON"),
    (b'{"session": {"type": "realtime", "temperature": Infinity}}', "not valid JSON"),
    (b'{"n": 1' + b"0" * 5000 + b"}", "not valid JSON"),       # int over CPython's digit cap
    (b"[]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b'{"model": "gpt-realtime"}', "unknown parameter in the request body"),
    (b'{"expires_after": 300}', "expires_after must be an object"),
    (b'{"expires_after": {"seconds": 300, "unit": "s"}}', "unknown parameter in expires_after"),
    (b'{"expires_after": {"anchor": "now", "seconds": 300}}', "anchor must be 'created_at'"),
    (b'{"expires_after": {"anchor": 0}}', "anchor must be 'created_at'"),
    (b'{"expires_after": {"seconds": 9}}', "seconds must be an integer from 10 to 7200"),
    (b'{"expires_after": {"seconds": 7201}}', "seconds must be an integer from 10 to 7200"),
    (b'{"expires_after": {"seconds": -1}}', "seconds must be an integer from 10 to 7200"),
    (b'{"expires_after": {"seconds": 300.0}}', "seconds must be an integer"),
    (b'{"expires_after": {"seconds": "300"}}', "seconds must be an integer"),
    (b'{"expires_after": {"seconds": true}}', "seconds must be an integer"),
    (b'{"session": "realtime"}', "session must be an object"),
    (b'{"session": {"model": "gpt-realtime"}}', "session.type must be 'realtime'"),
    (b'{"session": {"type": "realtim"}}', "session.type must be 'realtime'"),
    (b'{"session": {"type": "transcription"}}', "'transcription' is not supported"),
    (b'{"session": {"type": "realtime", "model": ["gpt-realtime"]}}',
     "session.model must be a string"),
    (nested(MAX_JSON_DEPTH + 1), f"nests deeper than {MAX_JSON_DEPTH} levels"),
    (b"[" * 100_000 + b"]" * 100_000, "larger than"),
    (b"[" * 30_000 + b"]" * 30_000, f"nests deeper than {MAX_JSON_DEPTH}"),  # RecursionError
    (b'{"session": {"x": [[]}}', "not valid JSON"),
    (b'{"session": {"type": "realtime", "instructions": "' + b"a" * 65_536 + b'"}}',
     "larger than 65536 bytes"),
])
def test_parse_create_request_refuses(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    assert message in caught.value.message
    assert caught.value.http_status == 400 and caught.value.code == "invalid_request"
    assert "gpt-realtime" not in caught.value.message  # no request value echoed


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    instructions = 'say "[[[[" \\' + "[" * 40 + '{"'
    body = json.dumps({"session": {"type": "realtime", "instructions": instructions}})
    assert parse(body.encode()).session["instructions"] == instructions


def test_the_deepest_body_allowed_parses() -> None:
    value: Any = parse(nested(MAX_JSON_DEPTH)).session["x"]
    for _ in range(MAX_JSON_DEPTH - 3):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == []


def test_seconds_above_the_configured_max_refused() -> None:
    with pytest.raises(InvalidRequest, match="from 10 to 900"):
        parse({"expires_after": {"seconds": 901}}, max_seconds=900)


def test_a_model_the_tenant_lacks_is_forbidden() -> None:
    with pytest.raises(Forbidden) as caught:
        parse({"session": {"type": "realtime", "model": "gpt-4o-realtime-preview"}})
    assert caught.value.reason == "model" and caught.value.http_status == 403
    assert "gpt-4o" not in caught.value.message


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["expires_after", "session", "seconds",
                                                        "anchor", "type", "model", "x"]),
                                      inner, max_size=4), max_leaves=20))
def test_parse_create_request_raises_only_gateway_errors(body: Any) -> None:
    try:
        raw = json.dumps(body).encode()
    except ValueError:
        return
    try:
        request = parse_create_request(raw, models=MODELS, max_seconds=7200)
    except (InvalidRequest, Forbidden):
        return
    assert 10 <= request.seconds <= 7200 and request.model in MODELS


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.",
               max_size=600))
def test_verify_raises_only_invalid_token(tail: str) -> None:
    with pytest.raises(InvalidToken):
        verify(keys(), PREFIX + tail, NOW)


# -- the response ----------------------------------------------------------------------------

def test_response_is_parsed_by_the_openai_sdk_types() -> None:
    claims = make_claims(session={"instructions": "Be brief.", "output_modalities": ["audio"],
                                  "audio": {"output": {"voice": "marin"}}})
    value = mint(keys(), claims)
    body = json.loads(render_response(value, claims))
    parsed = ClientSecretCreateResponse.model_validate(body)
    assert parsed.value == value and parsed.expires_at == claims.exp
    assert parsed.session.type == "realtime"
    assert parsed.session.id == f"sess_{claims.jti}"
    assert parsed.session.object == "realtime.session"
    assert parsed.session.model == "gpt-realtime"
    assert parsed.session.instructions == "Be brief."


def test_the_openai_sdk_round_trip() -> None:
    """``client.realtime.client_secrets.create`` of the openai SDK: its request parses, our
    answer parses, and the secret verifies."""
    seen: list[CreateRequest] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/realtime/client_secrets"
        parsed = parse_create_request(request.content, models=MODELS, max_seconds=7200)
        seen.append(parsed)
        claims = SecretClaims.issue(tenant="acme", subject="user-1", scope=SCOPE,
                                    request=parsed, now=NOW, token_exp=NOW + 3600)
        return httpx2.Response(200, content=render_response(mint(keys(), claims), claims),
                              headers={"content-type": "application/json"})

    with httpx2.Client(transport=httpx2.MockTransport(answer)) as http:
        client = openai.OpenAI(api_key="access-token", base_url="http://gateway.test/v1",
                               http_client=http, max_retries=0)
        created = client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 300},
            session={"type": "realtime", "model": "gpt-realtime-mini",
                     "instructions": "Speak French."})
        default = client.realtime.client_secrets.create()
    assert [(r.seconds, r.model) for r in seen] == [(300, "gpt-realtime-mini"),
                                                    (DEFAULT_SECONDS, "gpt-realtime")]
    assert created.value.startswith("ek_") and created.expires_at == 1_800_000_300
    assert created.session.type == "realtime" and created.session.model == "gpt-realtime-mini"
    claims = verify(keys(), created.value, NOW)
    assert claims.session["instructions"] == "Speak French."
    assert verify(keys(), default.value, NOW).exp == 1_800_000_600


def test_a_refused_request_renders_as_a_section_5_body() -> None:
    with pytest.raises(GatewayError) as caught:
        parse({"session": {"type": "realtime", "model": "nope"}})
    assert json.loads(caught.value.http_body()) == {"error": {
        "type": "gateway_error", "code": "forbidden",
        "message": "this model is not available to your tenant"}}



def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=30)


@settings(max_examples=500, deadline=None)
@given(JSON_VALUES, st.integers(min_value=0, max_value=6))
def test_the_depth_check_is_exact(value: Any, limit: int) -> None:
    assert _nesting_exceeds(value, limit) is (depth(value) > limit)
