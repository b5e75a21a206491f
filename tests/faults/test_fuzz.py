"""Fuzzing the parsers that read untrusted bytes (security note §6 case 41).

Three entry points, 1,000 examples each, every example timed (< 50 ms): the upgrade
request as the ASGI server hands it over (path, query string, headers, subprotocols →
:class:`gateway.session.HandshakeRequest`, credentials, subprotocol echo, model); the
JWT path of :class:`gateway.auth.authenticator.Authenticator` for a JWKS tenant served
over loopback HTTP (forged, malformed and hostile headers and claims, ``jku``/``x5u``
aimed at a listener that must see no connection); and :func:`gateway.usage.tap` on raw
upstream text frames.  Only typed errors may come out; a forged token is never accepted.

Deeply nested JSON is then sent through a real gateway from both sides.

Already fuzzed elsewhere (not repeated): ``extract_credentials`` over raw header bytes
(``tests/test_credentials.py``, 1,000 examples), ``usage_of`` over parsed event trees
(``tests/test_usage.py``, 1,000), the JWT path of a development-issuer tenant
(``tests/test_auth_jwt.py``, 200 by default and 2,000 under ``-m slow``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection

from gateway.auth.authenticator import Authenticator, Principal
from gateway.beta import is_beta
from gateway.credentials import extract_credentials, select_subprotocol
from gateway.emulator.server import Emulator
from gateway.errors import GatewayError, InsufficientScope, InvalidToken
from gateway.handshake import HandshakeRequest
from gateway.usage import TokenCounts, tap
from tests.faults.conftest import (
    LeakSweep,
    Tokens,
    closed_session,
    open_session,
    round_trip,
    serve,
)
from tests.faults.proxy import ScriptedUpstream
from tests.support.gateway import gateway_config, wait_for
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
    hmac_token,
    json_segment,
    jwks,
    make_config,
    new_rsa_key,
    sign_token,
    tenant,
    unsigned_token,
)

EXAMPLES = 1000
BUDGET_SECONDS = 0.05
"""Per example (security note §6 case 41)."""

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


T = TypeVar("T")


@dataclass
class Timer:
    """Times examples; :attr:`slowest` is the slowest one, seconds.

    An example over the budget is run once more and the faster time kept: a slow input
    is slow twice, a garbage-collection pause or a busy CPU is not.
    """

    slowest: float = 0.0

    def run(self, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - started
        if elapsed >= BUDGET_SECONDS:
            started = time.perf_counter()
            call()
            elapsed = min(elapsed, time.perf_counter() - started)
        self.slowest = max(self.slowest, elapsed)
        return result


# -- the upgrade request ----------------------------------------------------------------------

_TOKENISH = st.text(st.characters(codec="latin-1"), max_size=40) | st.from_regex(
    r"[A-Za-z0-9_\-]{1,30}\.[A-Za-z0-9_\-]{1,30}\.[A-Za-z0-9_\-]{0,30}", fullmatch=True)
_HEADER_NAMES = st.sampled_from([b"authorization", b"api-key", b"origin", b"user-agent",
                                 b"openai-beta", b"sec-websocket-protocol", b"x-other"])
_HEADER_VALUES = st.binary(max_size=64) | st.builds(
    lambda scheme, token: f"{scheme} {token}".encode("latin-1", "replace"),
    st.sampled_from(["Bearer", "bearer", "Basic", "", "Bearer "]), _TOKENISH)
_OFFERS = st.lists(st.one_of(
    st.text(max_size=20),
    st.sampled_from(["realtime", "Bearer-", "openai-insecure-api-key.", "Bearer-a b"]),
    st.builds(lambda t: f"Bearer-{t}", _TOKENISH),
    st.builds(lambda t: f"openai-insecure-api-key.{t}", _TOKENISH),
), max_size=4)
_QUERY = st.binary(max_size=80) | st.builds(
    lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "replace"),
    st.lists(st.tuples(st.sampled_from(["model", "deployment", "call_id", "access_token",
                                        "api-version", "model%00", "", "api-key",
                                        "Authorization", "authorization"]),
                       st.text(max_size=140)), max_size=4))


@FUZZ
@given(path=st.sampled_from(["/v1/realtime", "/openai/realtime", "/openai/v1/realtime"]),
       query=_QUERY, headers=st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=6),
       offers=_OFFERS, client=st.none() | st.tuples(st.just("127.0.0.1"), st.integers(0, 65535)))
def test_fuzz_upgrade_request_parsing(sweep: LeakSweep, path: str, query: bytes,
                                      headers: list[tuple[bytes, bytes]], offers: list[str],
                                      client: tuple[str, int] | None) -> None:
    """Whatever the client sends in its upgrade request, the pipeline's first stages end
    in a value or a :class:`GatewayError` with a 4xx status, never anything else."""
    scope = {"type": "websocket", "path": path, "query_string": query, "headers": headers,
             "subprotocols": offers, "client": client}
    timer = Timer()
    timer.run(lambda: parse_upgrade(scope, offers))
    assert timer.slowest < BUDGET_SECONDS


def parse_upgrade(scope: dict[str, Any], offers: list[str]) -> None:
    """The pipeline's first stages on one upgrade request, with their invariants."""
    request = HandshakeRequest.from_scope(scope)
    with contextlib.suppress(GatewayError):
        model = request.model()  # None: absent (a client secret may leave it out)
        assert model is None or (model and len(model) <= 128 and model.isprintable())
    status = 0
    try:
        credentials = extract_credentials(request.headers, request.subprotocols, request.query)
        is_beta(request.path, request.query, request.headers, request.subprotocols)
    except GatewayError as exc:
        status = exc.http_status
    else:
        assert "<redacted>" in repr(credentials)
        assert len(credentials.token) < 12 or credentials.token not in repr(credentials)
    assert status in (0, 400, 401)
    echo = select_subprotocol(request.subprotocols)
    assert echo is None or echo in offers


# -- the JWT path of a JWKS tenant ------------------------------------------------------------

class JwtEnv:
    """One loop, one IdP serving the tenant's JWKS, one listener that must never be dialled."""

    def __init__(self, runner: asyncio.Runner, idp: IdpServer, listener: ConnectionCounter,
                 key: SigningKey, clock: FakeClock) -> None:
        self.runner = runner
        self.idp = idp
        self.listener = listener
        self.key = key
        self.attacker = new_rsa_key(key.kid)  # same kid, other key
        self.clock = clock
        self.auth = Authenticator(make_config(tenant("acme", jwks_uri=idp.jwks_url)),
                                  clock=clock)
        runner.run(self.auth.start())
        assert self.auth.ready()

    def authenticate(self, token: str) -> Principal | GatewayError:
        try:
            return self.runner.run(asyncio.wait_for(self.auth.authenticate(token), 5))
        except (InvalidToken, InsufficientScope) as exc:
            return exc


@pytest.fixture(scope="module")
def jwt_env() -> Iterator[JwtEnv]:
    with asyncio.Runner() as runner:
        key = new_rsa_key("rsa-1")
        idp = runner.run(IdpServer(jwks=jwks(key)).__aenter__())
        listener = runner.run(ConnectionCounter().__aenter__())
        env = JwtEnv(runner, idp, listener, key, FakeClock())
        try:
            yield env
        finally:
            runner.run(env.auth.aclose())
            runner.run(listener.__aexit__(None, None, None))
            runner.run(idp.aclose())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8)
_NUMERIC = st.integers(-(2**70), 2**70) | st.floats() | st.booleans() | st.text(max_size=8)


@st.composite
def hostile_tokens(draw: st.DrawFn, env: JwtEnv) -> tuple[str, bool]:
    """``(token, forged)``: a token built from a hostile grammar; ``forged`` is True when it
    is not signed by the tenant's key with an allowed algorithm."""
    now = env.clock.now
    claims: dict[str, Any] = claims_for(now, jti=f"j{draw(st.integers(0, 10**6))}")
    for name, values in {
        "iss": st.sampled_from([ISSUER, ISSUER.rstrip("/"), "https://evil.example/"]) | _JSON,
        "aud": st.sampled_from([AUDIENCE, [AUDIENCE], ["x", AUDIENCE], "other", []]) | _JSON,
        "exp": st.sampled_from([int(now) + 300, int(now) - 60, 2**63]) | _NUMERIC,
        "nbf": _NUMERIC, "iat": _NUMERIC,
        "sub": st.sampled_from(["user-1", ""]) | _JSON,
        "scope": st.sampled_from([SCOPE, [SCOPE], f"{SCOPE}-extra", ""]) | _JSON,
        "scp": st.sampled_from([[SCOPE], SCOPE]) | _JSON,
    }.items():
        action = draw(st.sampled_from(["keep", "keep", "drop", "replace"]))
        if action == "drop":
            claims.pop(name, None)
        elif action == "replace":
            claims[name] = draw(values)
    header: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(
            ["jku", "x5u", "x5c", "jwk", "crit", "b64", "typ", "cty", "zip", "nonce"]),
            max_size=3, unique=True)):
        header[name] = (env.listener.url if name in ("jku", "x5u") else draw(_JSON))
    kid = draw(st.sampled_from(["<key>", None, "unknown", "k" * 300]) | _JSON)
    signer = draw(st.sampled_from(["good", "good", "wrong_key", "hmac_pem", "none",
                                   "off_list", "garbage_signature", "raw_segments"]))
    key_kid = kid if kid in ("<key>", None) or isinstance(kid, str) else "<key>"
    if signer == "good":
        if not isinstance(kid, str | None):
            header["kid"] = kid  # a non-string kid in the header: invalid, not a crash
        return sign_token(claims, env.key, kid=key_kid, header=header), False
    if signer == "wrong_key":
        return sign_token(claims, env.attacker, kid=key_kid, header=header), True
    if signer == "hmac_pem":
        return hmac_token(claims, env.key.public_pem(), kid=env.key.kid), True
    if signer == "none":
        return unsigned_token(claims, alg=draw(st.sampled_from(["none", "None", "nOnE"])),
                              kid=env.key.kid), True
    if signer == "off_list":
        return sign_token(claims, env.key, alg="RS512", header=header), True
    if signer == "garbage_signature":
        header_segment = json_segment({"alg": "RS256", "kid": env.key.kid, **header})
        return (f"{header_segment}.{json_segment(claims)}."
                f"{b64url(draw(st.binary(max_size=600)))}"), True
    segments = draw(st.lists(st.text(st.characters(codec="ascii"), max_size=40),
                             min_size=1, max_size=5))
    return ".".join(segments), True


def test_fuzz_jwt_validation_path(jwt_env: JwtEnv, sweep: LeakSweep) -> None:
    """1,000 hostile tokens through the Authenticator of a JWKS tenant: each ends in a
    :class:`Principal`, :class:`InvalidToken` or :class:`InsufficientScope` within 50 ms;
    a token not signed by the tenant's key with an allowed algorithm is never accepted;
    ``jku``/``x5u`` are never dereferenced; random ``kid`` values cause at most one
    refetch (the clock does not move, so the 30 s cooldown never ends)."""
    env = jwt_env
    timer = Timer()
    fetches = env.idp.counts["/jwks"]
    outcomes: dict[str, int] = {}

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        candidate, forged = data.draw(hostile_tokens(env))
        if len(candidate) >= 16:
            sweep.secret(candidate)
        outcome = timer.run(lambda: env.authenticate(candidate))
        outcomes[type(outcome).__name__] = outcomes.get(type(outcome).__name__, 0) + 1
        if isinstance(outcome, Principal):
            assert not forged, candidate
            assert outcome.subject == "user-1"

    run()
    assert set(outcomes) <= {"Principal", "InvalidToken", "InsufficientScope"}
    assert outcomes.get("Principal", 0) > 0 and outcomes.get("InvalidToken", 0) > 0
    assert timer.slowest < BUDGET_SECONDS, f"slowest example {timer.slowest * 1000:.1f} ms"
    assert env.listener.connections == 0
    assert env.idp.counts["/jwks"] - fetches <= 1


# -- the usage tap on upstream frames ---------------------------------------------------------

_USAGE = st.fixed_dictionaries({}, optional={
    k: _NUMERIC | _JSON for k in ("total_tokens", "input_tokens", "output_tokens", "type")
} | {k: st.dictionaries(st.sampled_from(["text_tokens", "audio_tokens", "image_tokens",
                                          "cached_tokens"]), _NUMERIC | _JSON, max_size=4)
     | _JSON for k in ("input_token_details", "output_token_details")})
_EVENTS = st.builds(
    lambda kind, usage, where: (
        {"type": kind, "response": {"usage": usage}} if where == "response"
        else {"type": kind, "usage": usage}),
    st.sampled_from(["response.done",
                     "conversation.item.input_audio_transcription.completed",
                     "response.done ", "RESPONSE.DONE"]),
    _USAGE, st.sampled_from(["response", "top"]))
_FRAMES = (
    st.builds(json.dumps, _EVENTS)
    | st.builds(lambda text, trigger, at: text[:at] + trigger + text[at:],
                st.text(max_size=200),
                st.sampled_from(['"response.done"', "transcription.completed",
                                 '{"type":"response.done","response":{"usage":']),
                st.integers(0, 200))
    | st.builds(lambda frame, cut: frame[:cut], st.builds(json.dumps, _EVENTS),
                st.integers(0, 400))
)


def test_fuzz_usage_tap_on_raw_frames(sweep: LeakSweep) -> None:
    """1,000 upstream text frames (usage events with hostile values, text around the
    trigger words, frames cut short): :func:`tap` returns ``None`` or non-negative
    counts within 50 ms, and never raises."""
    timer = Timer()
    counted = 0

    @FUZZ
    @given(_FRAMES)
    def run(frame: str) -> None:
        nonlocal counted
        counts = timer.run(lambda: tap(frame))
        if counts is not None:
            counted += 1
            assert isinstance(counts, TokenCounts)
            assert min(counts.by_kind().values()) >= 0 and counts.billable >= 0

    run()
    assert counted > 0
    assert timer.slowest < BUDGET_SECONDS


# -- deeply nested JSON through a real gateway ------------------------------------------------

NESTED = "[" * 5000 + "]" * 5000
"""Valid JSON that CPython's decoder refuses with RecursionError (not ValueError)."""


def test_tap_survives_deeply_nested_usage() -> None:
    """A frame that names ``response.done`` and nests 5,000 deep is just not usage."""
    assert tap('{"type":"response.done","response":{"usage":' + NESTED + "}}") is None


async def test_nested_session_update_does_not_end_the_session(
        emulator: Emulator, key_file: Path, tokens: Tokens, sweep: LeakSweep) -> None:
    """A client's 10 KB ``session.update`` nested 5,000 deep is forwarded (the upstream
    answers it) or refused; either way the session goes on."""
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            server={"drain_seconds": 0})
    async with serve(sweep, config) as gw:
        ws = await open_session(sweep, gw.url(), tokens.mint())
        await ws.send('{"type":"session.update","session":{"x":' + NESTED + "}}")
        async with asyncio.timeout(5):
            await ws.recv()  # the upstream's (or the gateway's) answer
        await round_trip(ws)
        await ws.close()


async def test_nested_usage_event_from_upstream_does_not_end_the_session(
        key_file: Path, tokens: Tokens, sweep: LeakSweep) -> None:
    """An upstream ``response.done`` nested 5,000 deep is relayed; the session goes on."""
    async def nested_upstream(connection: ServerConnection) -> None:
        await connection.send(json.dumps({"type": "session.created", "session": {}}))
        await connection.send('{"type":"response.done","response":{"usage":' + NESTED + "}}")
        async for message in connection:  # then echo, so the client can prove liveness
            await connection.send(message)

    async with ScriptedUpstream(nested_upstream) as upstream:
        config = gateway_config(upstream.url, key_file, server={"drain_seconds": 0})
        async with serve(sweep, config) as gw:
            ws = await open_session(sweep, gw.url(), tokens.mint())
            async with asyncio.timeout(5):
                assert "response.done" in str(await ws.recv())
            await ws.send("ping")
            try:
                async with asyncio.timeout(5):
                    assert await ws.recv() == "ping"
            finally:
                with contextlib.suppress(Exception):
                    closed = await closed_session(sweep, ws, within=0.5)
                    assert closed.code != 1011
                await ws.close()
            await wait_for(lambda: len(gw.gateway.registry.sessions) == 0)
