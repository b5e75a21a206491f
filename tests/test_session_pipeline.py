"""gateway.session's pipeline with fakes: the order of the stages, what each refusal
leaves held (nothing), what is counted, and how a refusal is answered — without a socket.

The authenticator and the dial are fakes; the limiter is the real in-process one, so the
lease bookkeeping is the production code's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.auth.authenticator import Principal
from gateway.auth.client_secrets import SecretClaims
from gateway.config import Config
from gateway.credentials import Credentials
from gateway.errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    InvalidToken,
    RateLimited,
    UpstreamFailed,
    UpstreamTimeout,
)
from gateway.handoff import HAND_OFF
from gateway.handshake import HandshakeRequest
from gateway.housekeeping import Housekeeper
from gateway.limits.memory import MemoryLimiter
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.services import Services
from gateway.session import handle, open_session
from gateway.upstream import UpstreamTarget
from tests.support.gateway import MODEL, gateway_config

OTHER = "gpt-realtime-mini"


@dataclass
class FakeAuthenticator:
    """Answers every token with ``principal`` (or raises ``error``); records the calls."""

    principal: Principal | None = None
    error: GatewayError | None = None
    calls: list[str] = field(default_factory=list)

    async def authenticate(self, token: str) -> Principal:
        self.calls.append(token)
        if self.error is not None:
            raise self.error
        assert self.principal is not None
        return self.principal


class FakeUpstream:
    """What the pipeline uses of a dialled upstream connection."""

    def __init__(self) -> None:
        self.hung_up: tuple[int, str] | None = None

    def hang_up(self, code: int, reason: str) -> None:
        self.hung_up = (code, reason)


@dataclass
class Rig:
    config: Config
    authenticator: FakeAuthenticator
    limiter: MemoryLimiter
    metrics: Metrics
    dials: list[UpstreamTarget]

    @property
    def services(self) -> Services:
        return Services(self.config, self.metrics, cast(Any, self.authenticator), self.limiter)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def leases(self) -> int:
        return self.limiter.live_sessions("acme")


Dial = Callable[[UpstreamTarget], Awaitable[Any]]


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    config = gateway_config("ws://127.0.0.1:9/v1/realtime", tmp_path / "issuer.jwk",
                            models={MODEL: {"upstream": "emulator"},
                                    OTHER: {"upstream": "emulator", "upstream_model": "up-m"}},
                            server={"allowed_origins": ["https://app.example"],
                                    "handshake_timeout_seconds": 0.5},
                            limits={"max_sessions_per_user": 1})
    principal = Principal(config.tenants[0], "alice", time.time() + 600)
    made = Rig(config, FakeAuthenticator(principal), MemoryLimiter(), Metrics(), [])
    use_dial(monkeypatch, made, _connected)
    return made


async def _connected(target: UpstreamTarget) -> Any:
    return FakeUpstream()


def use_dial(monkeypatch: pytest.MonkeyPatch, rig: Rig, dial: Dial) -> None:
    async def recording(target: UpstreamTarget, *, connect_timeout: float,
                        tls: ssl.SSLContext | None = None) -> Any:
        rig.dials.append(target)
        return await dial(target)
    monkeypatch.setattr("gateway.session.dial", recording)


def request(query: str = f"model={MODEL}", headers: dict[str, str] | None = None,
            subprotocols: tuple[str, ...] = ()) -> HandshakeRequest:
    return HandshakeRequest.from_scope({
        "path": "/v1/realtime", "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "subprotocols": list(subprotocols), "client": ("127.0.0.1", 5000)})


BEARER = Credentials("token-value", "authorization")


async def test_a_session_is_authenticated_admitted_and_dialled_in_that_order(rig: Rig) -> None:
    admitted = await open_session(rig.services, request(), BEARER)
    assert rig.authenticator.calls == ["token-value"]
    assert (admitted.model, admitted.lease.user, rig.leases()) == (MODEL, "alice", 1)
    assert [(t.model, t.name) for t in rig.dials] == [(MODEL, "emulator")]
    for phase in ("auth", "admission", "upstream_connect", "total"):
        assert rig.sample("realtime_gateway_handshake_duration_seconds_count",
                          phase=phase) == 1


async def test_the_upstream_is_dialled_with_the_routes_upstream_model(rig: Rig) -> None:
    admitted = await open_session(rig.services, request(f"model={OTHER}"), BEARER)
    assert rig.dials[0].model == "up-m"
    assert admitted.models == {OTHER, "up-m"}  # both names are the session's own (pinning)


@pytest.mark.parametrize(("query", "headers"), [
    (f"model={MODEL}", {"Origin": "https://evil.example"}),
    ("", {}),
    ("model=", {}),
    ("model=" + "m" * 200, {}),
])
async def test_request_checks_come_before_the_token_is_checked(
        rig: Rig, query: str, headers: dict[str, str]) -> None:
    with pytest.raises((Forbidden, InvalidRequest)):
        await open_session(rig.services, request(query, headers), BEARER)
    assert rig.authenticator.calls == [] and rig.dials == [] and rig.leases() == 0


async def test_an_invalid_token_holds_nothing(rig: Rig) -> None:
    rig.authenticator.error = InvalidToken("the access token is invalid")
    with pytest.raises(InvalidToken) as refused:
        await open_session(rig.services, request(), BEARER)
    assert refused.value.tenant is None  # no tenant is known yet
    assert rig.dials == [] and rig.leases() == 0


async def test_an_unrouted_model_is_refused_for_the_tenant_before_admission(rig: Rig) -> None:
    with pytest.raises(Forbidden) as refused:
        await open_session(rig.services, request("model=gpt-5-pro"), BEARER)
    assert (refused.value.tenant, refused.value.reason) == ("acme", "model")
    assert rig.dials == [] and rig.leases() == 0


async def test_a_limit_refusal_dials_nothing(rig: Rig) -> None:
    await open_session(rig.services, request(), BEARER)  # max_sessions_per_user: 1
    with pytest.raises(RateLimited) as refused:
        await open_session(rig.services, request(), BEARER)
    assert refused.value.tenant == "acme"
    assert len(rig.dials) == 1 and rig.leases() == 1


async def test_a_failed_dial_releases_the_lease_and_is_counted(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(target: UpstreamTarget) -> Any:
        raise UpstreamFailed("the upstream refused the session (HTTP 500)", reason="status_5xx")
    use_dial(monkeypatch, rig, refused)
    with pytest.raises(UpstreamFailed) as failure:
        await open_session(rig.services, request(), BEARER)
    assert failure.value.tenant == "acme" and rig.leases() == 0
    assert rig.sample("realtime_gateway_upstream_connect_errors_total",
                      upstream="emulator", reason="status_5xx") == 1


async def test_a_handshake_over_its_deadline_is_504_and_holds_nothing(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    async def stalled(target: UpstreamTarget) -> Any:
        await asyncio.Event().wait()  # never connects; the 0.5 s deadline cancels it
    use_dial(monkeypatch, rig, stalled)
    with pytest.raises(UpstreamTimeout) as timeout:
        await open_session(rig.services, request(), BEARER)
    assert timeout.value.reason == "handshake_timeout"
    assert rig.leases() == 0


def secret_principal(rig: Rig, model: str) -> Principal:
    claims = SecretClaims(tenant="acme", subject="alice", scope="s", model=model,
                          session={"type": "realtime", "model": model}, iat=0, exp=2**40,
                          token_exp=int(time.time()) + 600, jti="j")
    return Principal(rig.config.tenants[0], "alice", claims.token_exp, secret=claims)


async def test_a_client_secret_brings_its_model_and_cannot_change_it(rig: Rig) -> None:
    rig.authenticator.principal = secret_principal(rig, OTHER)
    secret = Credentials("ek_abc.def.ghi", "insecure_key_subprotocol")
    admitted = await open_session(rig.services, request(""), secret)  # no model= at all
    assert admitted.model == OTHER
    with pytest.raises(Forbidden) as refused:
        await open_session(rig.services, request(f"model={MODEL}"), secret)
    assert refused.value.reason == "client_secret_model"


# -- handle(): the ASGI shell ---------------------------------------------------------------

class Asgi:
    """A recorded ASGI conversation for one upgrade."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.handed_off = False

    async def receive(self) -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def scope(self, query: str, headers: dict[str, str],
              subprotocols: tuple[str, ...] = ()) -> dict[str, Any]:
        def hand_off(subprotocol: str | None) -> None:
            self.handed_off = True
            return None  # the client went away at the 101
        return {"type": "websocket", "path": "/v1/realtime", "query_string": query.encode(),
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                "subprotocols": list(subprotocols), "client": ("127.0.0.1", 5000),
                "extensions": {HAND_OFF: {"call": hand_off}}}


async def run_handle(rig: Rig, asgi: Asgi, scope: dict[str, Any],
                     registry: Registry | None = None) -> Registry:
    services = rig.services
    if registry is None:
        registry = Registry(rig.config.server.max_sessions, rig.metrics)
    await handle(services, registry, Housekeeper(services, registry), scope, asgi.receive,
                 asgi.send)
    return registry


async def test_a_header_client_is_refused_with_a_status_and_counted(rig: Rig) -> None:
    asgi = Asgi()
    await run_handle(rig, asgi, asgi.scope("model=gpt-5-pro", {"Authorization": "Bearer t"}))
    start, body = asgi.sent
    assert (start["type"], start["status"]) == ("websocket.http.response.start", 403)
    assert b'"code":"forbidden"' in body["body"]
    assert rig.sample("realtime_gateway_session_rejections_total",
                      tenant="acme", code="forbidden") == 1
    assert not asgi.handed_off


async def test_a_subprotocol_client_is_accepted_told_and_closed(rig: Rig) -> None:
    rig.authenticator.error = InvalidToken("the access token is invalid")
    asgi = Asgi()
    await run_handle(rig, asgi, asgi.scope(f"model={MODEL}", {}, ("realtime", "Bearer-x")))
    accept, event, close = asgi.sent
    assert (accept["type"], accept["subprotocol"]) == ("websocket.accept", "realtime")
    assert '"code":"invalid_token"' in event["text"]
    assert (close["code"], close["reason"]) == (4401, "invalid_token")
    assert rig.sample("realtime_gateway_session_rejections_total",
                      tenant="unknown", code="invalid_token") == 1


async def test_a_full_replica_refuses_before_reading_the_token(rig: Rig) -> None:
    registry = Registry(1, rig.metrics)
    registry.authenticated_handshakes = 1  # one authenticated handshake already in flight
    asgi = Asgi()
    await run_handle(rig, asgi, asgi.scope(f"model={MODEL}", {"Authorization": "Bearer t"}),
                     registry)
    assert asgi.sent[0]["status"] == 503
    assert rig.authenticator.calls == []


async def test_a_client_gone_at_the_101_frees_the_upstream_and_the_lease(rig: Rig) -> None:
    asgi = Asgi()
    registry = await run_handle(rig, asgi, asgi.scope(f"model={MODEL}",
                                                      {"Authorization": "Bearer t"}))
    assert asgi.handed_off and asgi.sent == []
    assert rig.leases() == 0 and len(registry) == 0 and registry.pending_handshakes == 0
