"""WebRTC calls (CONTRACT §9): SDP forwarding, the sideband supervisor, hang-up.

``POST /v1/realtime/calls`` (also ``/openai/v1/realtime/calls``) takes the raw SDP offer
(``application/sdp``, as agents-js ``OpenAIRealtimeWebRTC`` sends it) or ``multipart/form-data``
with parts ``sdp`` and ``session`` (as openai-python/-node ``client.realtime.calls.create``),
and goes the socket session's way (:mod:`gateway.session`): credentials → authenticate →
route → admit (a lease, every limit) → the upstream.  The offer is forwarded as multipart
(OpenAI and Azure GA shapes, the gateway's key, the route's upstream model; a client secret's
session template under the client's ``session``); the answer is **201**, ``application/sdp``,
``Location: /v1/realtime/calls/<call_id>`` where ``call_id`` is the gateway's own opaque
``rtc_<32 hex>``, mapped to the upstream's id in the :mod:`gateway.call_store`.

Media flows browser ↔ upstream.  The gateway keeps a :class:`LiveCall` (a
:class:`gateway.registry.LiveSession`: the housekeeping loop renews its lease and charges its
usage like a socket's) whose supervisor attaches to the upstream's sideband
(``<url>?call_id=<upstream id>``, same key) within :data:`SIDEBAND_ATTACH_SECONDS`, meters
``response.done`` usage from it (:func:`gateway.usage.tap`), hangs up on a ``session.updated``
naming a model the route does not pin, and hangs the call up
(``POST <calls_url>/<upstream id>/hangup``) on token expiry, budget overdraft,
``max_session_seconds``, drain, or a sideband it cannot open or loses.  Every hang-up is
logged (``call.hangup`` with its cause) and counted (``call_hangups_total{cause}``); the lease
is released right after.

``POST …/calls/{call_id}/hangup`` ends a call for its owner (same tenant and subject; anyone
else and unknown ids: 404).  Ids are matched against :data:`CALL_ID` before any lookup and
the upstream id is percent-encoded into URLs.  SDP is capped at :data:`MAX_SDP_BYTES`, must be
UTF-8 and start with ``v=0``, and is never logged; ``session.tools[]`` with a ``server_url``
(MCP) is refused unless the tenant sets ``allow_mcp_tools``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gateway.accounting import Account, Ending
from gateway.auth.authenticator import Principal
from gateway.call_store import CallRecord, CallStore
from gateway.config import ModelRoute, UpstreamConfig
from gateway.credentials import extract_credentials
from gateway.errors import (
    BUDGET_EXHAUSTED,
    SESSION_EXPIRED,
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    TOKEN_EXPIRED,
    Forbidden,
    GatewayError,
    InvalidRequest,
    SessionEnd,
    UpstreamFailed,
    UpstreamTimeout,
)
from gateway.housekeeping import Housekeeper
from gateway.limits.base import Lease
from gateway.logs import get_logger
from gateway.metrics import UNKNOWN_TENANT
from gateway.registry import Registry
from gateway.services import Services
from gateway.session import route_model
from gateway.upstream import DEFAULT_USER_AGENT, UpstreamTarget, failure_reason
from gateway.usage import tap

log = get_logger(__name__)

CALLS_PATHS = ("/v1/realtime/calls", "/openai/v1/realtime/calls")
"""The calls endpoints of CONTRACT §3; ``{path}/{call_id}/hangup`` under each."""
CALL_ID = re.compile(r"rtc_[0-9a-f]{32}")
"""The gateway's call ids (the only ids looked up)."""
UPSTREAM_CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""What an upstream's call id (last segment of its ``Location``) may look like."""
MAX_SDP_BYTES = 64 * 1024
MAX_SESSION_BYTES = 64 * 1024
MAX_BODY_BYTES = MAX_SDP_BYTES + MAX_SESSION_BYTES + 4096
"""Bytes of a calls request body (multipart framing included)."""
SIDEBAND_ATTACH_SECONDS = 10.0
"""Seconds after the answer within which the sideband must be open, or the call is hung up."""
SIDEBAND_RETRY_SECONDS = 0.5
SIDEBAND_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Bytes; a larger sideband message fails the sideband (1009) and the call is hung up."""
HANGUP_TIMEOUT_SECONDS = 5.0
CORS_HEADERS = ("Authorization", "Content-Type", "X-OpenAI-Agents-SDK", "Accept",
                "OpenAI-Beta")

SIDEBAND_UNAVAILABLE = SessionEnd(1011, "upstream_error", "the call's sideband could not be opened")
SIDEBAND_LOST = SessionEnd(1011, "upstream_error", "the call's sideband was lost")
MODEL_FORBIDDEN = SessionEnd(4403, "forbidden", "the call switched to a model it may not use")
MCP_FORBIDDEN = SessionEnd(4403, "forbidden", "the call declared MCP tools it may not use")
CLIENT_HANGUP = SessionEnd(1000, "ok", "the caller hung up")
UPSTREAM_ENDED = SessionEnd(1000, "ok", "the upstream ended the call")
HANGUP_CAUSES = {
    TOKEN_EXPIRED: "token_expired", BUDGET_EXHAUSTED: "budget_exhausted",
    SESSION_EXPIRED: "session_expired", SHUTTING_DOWN: "shutting_down",
    SLOW_CONSUMER: "slow_consumer", SIDEBAND_UNAVAILABLE: "sideband_unavailable",
    SIDEBAND_LOST: "sideband_lost", MODEL_FORBIDDEN: "model_forbidden",
    MCP_FORBIDDEN: "mcp_forbidden",
    CLIENT_HANGUP: "client_hangup", UPSTREAM_ENDED: "upstream_ended",
}
"""``call_hangups_total{cause}`` and the ``cause`` of ``call.hangup`` lines."""


def _sideband_logger() -> logging.Logger:
    """The sideband client's logger, held at INFO: websockets' DEBUG dumps the request
    headers, and with them the gateway's key."""
    logger = logging.getLogger(f"{__name__}.sideband")
    if logger.level < logging.INFO:
        logger.setLevel(logging.INFO)
    return logger


class PayloadTooLarge(InvalidRequest):
    """A calls body over its cap (413)."""

    http_status = 413


def calls_url(config: UpstreamConfig) -> str:
    """The upstream's calls URL: ``calls_url``, else its ``url`` with ``ws``→``http``,
    ``wss``→``https`` and ``/calls`` appended (CONTRACT §9)."""
    if config.calls_url is not None:
        return config.calls_url.rstrip("/")
    parts = urlsplit(config.url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit(parts._replace(scheme=scheme, path=parts.path.rstrip("/") + "/calls"))


def sideband_url(config: UpstreamConfig, upstream_call_id: str) -> str:
    """``<url>?call_id=<upstream id>`` (OpenAI's sideband; Azure's shape is unverified)."""
    return f"{config.url}?call_id={quote(upstream_call_id, safe='')}"


# -- the request ---------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    """The body, at most :data:`MAX_BODY_BYTES`.  Raises :class:`PayloadTooLarge`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge("the request body is too large", reason="body_size")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge("the request body is too large", reason="body_size")
    return bytes(body)


async def _replay(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def parse_offer(request: Request) -> tuple[str, dict[str, Any]]:
    """``(sdp, session)`` of a calls request: raw ``application/sdp`` or multipart parts
    ``sdp`` and ``session`` (JSON object), parsed by Starlette's python-multipart parser.

    Raises:
        InvalidRequest: other content types, a missing or malformed part, an SDP that is
            not UTF-8 or does not start with ``v=0`` (400).
        PayloadTooLarge: the body, the SDP or the session over its cap (413).
    """
    content_type = request.headers.get("content-type", "")
    body = await _read_body(request)
    session: Any = {}
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        parser = MultiPartParser(request.headers, _replay(body), max_files=0, max_fields=4,
                                 max_part_size=max(MAX_SDP_BYTES, MAX_SESSION_BYTES))
        try:
            form = await parser.parse()
        except MultiPartException:
            raise InvalidRequest("the multipart body is malformed or has too many parts",
                                 reason="multipart") from None
        sdp_part, session_part = form.get("sdp"), form.get("session")
        if not isinstance(sdp_part, str):
            raise InvalidRequest("the sdp part is required", reason="sdp_missing")
        raw_sdp = sdp_part.encode()
        if isinstance(session_part, str):
            try:
                session = json.loads(session_part)
            except ValueError:
                raise InvalidRequest("the session part is not JSON",
                                     reason="session_json") from None
    elif content_type.split(";")[0].strip().lower() == "application/sdp":
        raw_sdp = body
    else:
        raise InvalidRequest("send the SDP offer as application/sdp or multipart/form-data",
                             reason="content_type")
    if len(raw_sdp) > MAX_SDP_BYTES:
        raise PayloadTooLarge("the SDP offer is too large", reason="sdp_size")
    try:
        sdp = raw_sdp.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the SDP offer is not UTF-8", reason="sdp_encoding") from None
    if not sdp.startswith("v=0"):
        raise InvalidRequest("the SDP offer must start with v=0", reason="sdp_format")
    if not isinstance(session, dict):
        raise InvalidRequest("the session must be a JSON object", reason="session_type")
    return sdp, session


def check_tools(session: dict[str, Any], allow_mcp: bool) -> None:
    """Refuse MCP tools (``tools[].server_url``, or ``type: "mcp"``) unless allowed.

    Raises:
        Forbidden: an MCP tool and ``allow_mcp`` is false (403, ``reason="mcp_tools"``).
    """
    tools = session.get("tools")
    if allow_mcp or not isinstance(tools, list):
        return
    for tool in tools:
        if isinstance(tool, dict) and ("server_url" in tool or tool.get("type") == "mcp"):
            raise Forbidden("MCP tools are not enabled for your tenant", reason="mcp_tools")


def choose_model(principal: Principal, session: dict[str, Any], query_model: str | None) -> str:
    """The call's model: ``session.model``, else ``?model=``, else the client secret's,
    else the tenant's first (CONTRACT §9).

    Raises:
        Forbidden: a client secret's call asks for another model than the secret's.
        InvalidRequest: the model is not a string.
    """
    model = session.get("model") or query_model
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("session.model must be a string", reason="model")
    secret = principal.secret
    if secret is not None:
        if model is not None and model != secret.model:
            raise Forbidden("this model is not available to your session", reason="model")
        return secret.model
    return model or next(iter(principal.tenant.models))


def _error_response(exc: GatewayError) -> Response:
    return Response(exc.http_body(), status_code=exc.http_status, headers=exc.http_headers())


# -- the live call --------------------------------------------------------------------------


class LiveCall:
    """One answered call (a :class:`gateway.registry.LiveSession`) and its supervisor."""

    def __init__(self, calls: Calls, account: Account, route: ModelRoute,
                 upstream: UpstreamConfig, record: CallRecord) -> None:
        self.account = account
        self.record = record
        self._calls = calls
        self._upstream = upstream
        self._models = frozenset((account.model, route.upstream_model or account.model))
        self._cause: SessionEnd | None = None
        self._ending = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def call_id(self) -> str:
        """The gateway's id of the call (``rtc_<32 hex>``)."""
        return self.record.call_id

    def end(self, cause: SessionEnd) -> None:
        """Ask the supervisor to hang the call up with ``cause`` (idempotent: the first
        cause wins; returns at once)."""
        if self._cause is None:
            self._cause = cause
            self._ending.set()

    def publish_counters(self) -> None:
        """No frames pass the gateway on a call (media is peer to peer)."""
        return None

    def blocked_for(self, interval: float) -> float:
        """Always 0 s: the gateway sends nothing on a call that could block."""
        return 0.0

    async def supervise(self) -> None:
        """Run the call until a cause ends it; then hang up, release, account."""
        principal = self.account.principal
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(principal.tenant.limits.max_session_seconds, self.end,
                                  SESSION_EXPIRED)]
        if principal.expires_at is not None:
            timers.append(loop.call_later(max(0.0, principal.expires_at - time.time()),
                                          self.end, TOKEN_EXPIRED))
        sideband = asyncio.create_task(self._sideband())
        ending = asyncio.create_task(self._ending.wait())
        try:
            await asyncio.wait({sideband, ending}, return_when=asyncio.FIRST_COMPLETED)
            if sideband.done() and not sideband.cancelled() and sideband.exception() is None:
                self.end(sideband.result())
            elif sideband.done():
                self.end(SIDEBAND_LOST)
        finally:
            for timer in timers:
                timer.cancel()
            ending.cancel()
            sideband.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sideband
            cause = self._cause or SIDEBAND_LOST
            await self._calls.finish(self, cause)

    async def _sideband(self) -> SessionEnd:
        """Attach to the upstream's sideband and read it until it closes; the cause to end
        the call with (or one of :meth:`end`'s, which cancels this)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SIDEBAND_ATTACH_SECONDS
        target = UpstreamTarget(self.record.upstream, self._upstream, self.account.model)
        url = sideband_url(self._upstream, self.record.upstream_call_id)
        context = self._calls.services.upstream_tls.get(self.record.upstream)
        sideband_tls: dict[str, Any] = (
            {"ssl": context} if context is not None and url.startswith("wss:") else {})
        socket: ClientConnection | None = None
        while socket is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return SIDEBAND_UNAVAILABLE
            try:
                socket = await connect(url, additional_headers=target.headers(),
                                       **sideband_tls,
                                       user_agent_header=DEFAULT_USER_AGENT,
                                       open_timeout=remaining, compression=None,
                                       max_size=SIDEBAND_MAX_MESSAGE_BYTES,
                                       close_timeout=2,
                                       logger=_sideband_logger())
            except InvalidStatus:
                return SIDEBAND_UNAVAILABLE  # e.g. 404 call_id_not_found: no retry helps
            except (OSError, TimeoutError, InvalidHandshake, EOFError):
                await asyncio.sleep(min(SIDEBAND_RETRY_SECONDS, max(0.0, remaining)))
        log.info("call.sideband_attached", call_id=self.call_id,
                 session_id=self.account.lease.session_id)
        try:
            async for message in socket:
                if not isinstance(message, str):
                    continue
                counts = tap(message)
                if counts is not None:
                    self.account.on_usage(counts)
                elif '"session.updated"' in message:
                    refusal = self._check_session(message)
                    if refusal is not None:
                        return refusal
            return UPSTREAM_ENDED if socket.close_code in (1000, 1001) else SIDEBAND_LOST
        except ConnectionClosed:
            return SIDEBAND_LOST
        finally:
            await socket.close()

    def _check_session(self, message: str) -> SessionEnd | None:
        """The hang-up cause a ``session.updated`` calls for: a model the route does not
        pin (model pinning), or MCP tools the tenant does not allow; else ``None``.  The data
        channel goes straight to the upstream, so the session it set up is checked here."""
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            return None
        if not isinstance(event, dict) or event.get("type") != "session.updated":
            return None
        session = event.get("session")
        if not isinstance(session, dict):
            return None
        model = session.get("model")
        if model is not None and model not in self._models:
            return MODEL_FORBIDDEN
        try:
            check_tools(session, self.account.tenant.allow_mcp_tools)
        except Forbidden:
            return MCP_FORBIDDEN
        return None


# -- the service ----------------------------------------------------------------------------


class Calls:
    """The calls endpoints of one gateway (routes in :func:`gateway.app.create_app`)."""

    def __init__(self, services: Services, registry: Registry, housekeeper: Housekeeper,
                 store: CallStore) -> None:
        self.services = services
        self.registry = registry
        self.housekeeper = housekeeper
        self.store = store
        self.live: dict[str, LiveCall] = {}
        self._http: dict[Path | None, httpx.AsyncClient] = {}

    def _client(self, upstream: UpstreamConfig) -> httpx.AsyncClient:
        """The HTTP client for ``upstream``'s calls endpoint: one per trusted CA bundle
        (``ca_file``; ``None`` is the system store), made on first use.  Its TLS context is
        its own: httpx sets ALPN on the context it is given, which the WebSocket dials'
        shared context must not carry."""
        client = self._http.get(upstream.ca_file)
        if client is None:
            verify: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=str(upstream.ca_file))
                if upstream.ca_file is not None else True)
            client = httpx.AsyncClient(follow_redirects=False, verify=verify)
            self._http[upstream.ca_file] = client
        return client

    async def aclose(self) -> None:
        """End every live call (hung up upstream) and close the HTTP client and store."""
        for call in list(self.live.values()):
            call.end(SHUTTING_DOWN)
        tasks = [c.task for c in self.live.values() if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=HANGUP_TIMEOUT_SECONDS + 1)
        for client in self._http.values():
            await client.aclose()
        self._http.clear()
        await self.store.aclose()

    # -- POST /v1/realtime/calls -------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        """Answer one calls request (see the module docstring); refusals as CONTRACT §5."""
        tenant = UNKNOWN_TENANT
        try:
            with self.registry.handshake() as pending:
                origin = request.headers.get("origin")
                allowed = self.services.config.server.allowed_origins
                if allowed and origin is not None and origin not in allowed:
                    raise Forbidden("this Origin is not allowed", reason="origin")
                credentials = extract_credentials(tuple(request.scope["headers"]), ())
                try:
                    async with asyncio.timeout(
                            self.services.config.server.handshake_timeout_seconds):
                        principal = await self.services.authenticator.authenticate(
                            credentials.token)
                        tenant = principal.tenant.id
                        pending.authenticated()  # from here it counts toward max_sessions
                        sdp, session = await parse_offer(request)
                        return await self._admit_and_forward(request, principal, sdp, session)
                except TimeoutError:
                    raise UpstreamTimeout("the call could not be set up in time",
                                          reason="handshake_timeout") from None
        except GatewayError as exc:
            tenant = exc.tenant or tenant
            self.services.metrics.session_rejections_total.labels(tenant, exc.code).inc()
            log.info("session.rejected", transport="webrtc", code=exc.code,
                     status=exc.http_status, reason=exc.reason, message=exc.message,
                     tenant=tenant, path=request.url.path, client=_peer(request))
            return _error_response(exc)

    async def _admit_and_forward(self, request: Request, principal: Principal, sdp: str,
                                 session: dict[str, Any]) -> Response:
        services = self.services
        tenant = principal.tenant
        model = choose_model(principal, session, request.query_params.get("model"))
        route = route_model(tenant, model)
        upstream_model = route.upstream_model or model
        template = dict(principal.secret.session) if principal.secret is not None else {}
        body = {**template, **session, "type": "realtime", "model": upstream_model}
        check_tools(body, tenant.allow_mcp_tools)
        upstream = services.config.upstreams[route.upstream]
        lease = Lease(tenant.id, principal.subject, secrets.token_hex(8))
        await services.limiter.admit(lease, tenant.limits)
        try:
            answer, upstream_call_id = await self._forward(
                upstream, route.upstream, sdp, body, request.headers.get("user-agent"))
            call_id = f"rtc_{secrets.token_hex(16)}"
            expires = time.time() + tenant.limits.max_session_seconds
            record = CallRecord(call_id, tenant.id, principal.subject, route.upstream,
                                upstream_call_id, expires)
            try:
                await self.store.put(record)
            except GatewayError:
                await self._hang_up_upstream(upstream, upstream_call_id)
                raise
        except BaseException:
            await services.limiter.release(lease)
            raise
        account = Account(principal, model, route.upstream, lease, _peer(request),
                          services.metrics, transport="webrtc")
        call = LiveCall(self, account, route, upstream, record)
        self.live[call_id] = call
        self.registry.register(call)
        account.open(call_id=call_id, credential=principal.credential)
        call.task = asyncio.create_task(call.supervise())
        return Response(answer, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/v1/realtime/calls/{call_id}"})

    async def _forward(self, upstream: UpstreamConfig, name: str, sdp: str,
                       session: dict[str, Any], user_agent: str | None) -> tuple[str, str]:
        """POST the offer and ``session`` (JSON) upstream as multipart; ``(answer sdp,
        upstream call id)``.

        Raises:
            UpstreamFailed: refused (its status), unreachable, or no usable answer (502).
            UpstreamTimeout: no answer within the upstream's ``connect_timeout_seconds``.
        """
        target = UpstreamTarget(name, upstream, str(session["model"]))
        headers = dict(target.headers())
        headers["User-Agent"] = user_agent or DEFAULT_USER_AGENT
        headers["Accept"] = "application/sdp"
        metrics = self.services.metrics
        try:
            response = await self._client(upstream).post(
                calls_url(upstream), headers=headers,
                files={"sdp": (None, sdp.encode(), "application/sdp"),
                       "session": (None, json.dumps(session).encode(), "application/json")},
                timeout=upstream.connect_timeout_seconds)
        except httpx.TimeoutException:
            metrics.upstream_connect_errors_total.labels(name, "timeout").inc()
            raise UpstreamTimeout("the upstream did not answer in time",
                                  reason="timeout") from None
        except httpx.HTTPError:
            metrics.upstream_connect_errors_total.labels(name, "connect").inc()
            raise UpstreamFailed("the upstream could not be reached", reason="connect") from None
        if response.status_code not in (200, 201):
            reason = failure_reason(response.status_code)
            metrics.upstream_connect_errors_total.labels(name, reason).inc()
            raise UpstreamFailed(f"the upstream refused the call (HTTP {response.status_code})",
                                 reason=reason)
        upstream_call_id = response.headers.get("location", "").rstrip("/").rsplit("/", 1)[-1]
        if (UPSTREAM_CALL_ID.fullmatch(upstream_call_id) is None
                or len(response.content) > MAX_SDP_BYTES or not response.text.startswith("v=0")):
            metrics.upstream_connect_errors_total.labels(name, "protocol").inc()
            if UPSTREAM_CALL_ID.fullmatch(upstream_call_id):
                await self._hang_up_upstream(upstream, upstream_call_id)
            raise UpstreamFailed("the upstream's answer was not usable", reason="protocol")
        return response.text, upstream_call_id

    # -- hang-ups ---------------------------------------------------------------------------

    async def _hang_up_upstream(self, upstream: UpstreamConfig, upstream_call_id: str) -> bool:
        """``POST <calls_url>/<id>/hangup``; True when the upstream took it (2xx or 404:
        already gone).  Never raises."""
        target = UpstreamTarget("", upstream, "")
        url = f"{calls_url(upstream)}/{quote(upstream_call_id, safe='')}/hangup"
        try:
            response = await self._client(upstream).post(
                url, headers=dict(target.headers()), timeout=HANGUP_TIMEOUT_SECONDS)
        except httpx.HTTPError as exc:
            log.warning("call.hangup_failed", error=type(exc).__name__)
            return False
        return response.is_success or response.status_code == 404

    async def finish(self, call: LiveCall, cause: SessionEnd) -> None:
        """A call's end: forget its record, hang up upstream, release the lease, close the
        account.

        A call whose record is already gone from the store when its sideband ends was hung
        up by its owner through another replica or worker (:meth:`hangup` deletes the record,
        then hangs up upstream): it ends as ``client_hangup``, not as the upstream's end, and
        is not hung up upstream a second time.
        """
        services = self.services
        account = call.account
        removed = True
        with contextlib.suppress(GatewayError):
            removed = await self.store.delete(call.call_id)
        elsewhere = not removed and cause in (UPSTREAM_ENDED, SIDEBAND_LOST)
        if elsewhere:
            cause = CLIENT_HANGUP
        hung_up = True
        if cause is not UPSTREAM_ENDED and not elsewhere:
            hung_up = await self._hang_up_upstream(
                services.config.upstreams[call.record.upstream], call.record.upstream_call_id)
        self.registry.unregister(call)
        self.live.pop(call.call_id, None)
        await self.housekeeper.settle(call)
        await account.settle(services.limiter)
        await services.limiter.release(account.lease)
        label = HANGUP_CAUSES.get(cause, cause.code)
        services.metrics.call_hangups_total.labels(account.tenant.id, label).inc()
        log.info("call.hangup", call_id=call.call_id, session_id=account.lease.session_id,
                 tenant=account.tenant.id, cause=label, upstream_hung_up=hung_up)
        account.close(Ending(cause.code), (0, 0, 0, 0))

    async def hangup(self, request: Request) -> Response:
        """``POST …/calls/{call_id}/hangup`` by the call's owner: 200 ``{}``; others and
        unknown or malformed ids: 404.  Works on any replica (the call store)."""
        call_id = str(request.path_params.get("call_id", ""))
        try:
            credentials = extract_credentials(tuple(request.scope["headers"]), ())
            principal = await self.services.authenticator.authenticate(credentials.token)
            if CALL_ID.fullmatch(call_id) is None:
                return _not_found()
            record = await self.store.get(call_id)
            if record is None or (record.tenant, record.subject) != (
                    principal.tenant.id, principal.subject):
                return _not_found()
            live = self.live.get(call_id)
            if live is not None:
                live.end(CLIENT_HANGUP)
                if live.task is not None:
                    await asyncio.shield(live.task)
            elif await self.store.delete(call_id):  # another replica's or worker's call
                # Deleted first: the process holding the call sees its sideband end with
                # the record gone and ends it as client_hangup (see finish).
                upstream = self.services.config.upstreams.get(record.upstream)
                if upstream is not None:
                    await self._hang_up_upstream(upstream, record.upstream_call_id)
                log.info("call.hangup", call_id=call_id, tenant=record.tenant,
                         cause="client_hangup", replica="other")
        except GatewayError as exc:
            return _error_response(exc)
        return JSONResponse({})


def _not_found() -> Response:
    body = {"error": {"type": "gateway_error", "code": "not_found",
                      "message": "no such call"}}
    return JSONResponse(body, status_code=404)


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else ""
