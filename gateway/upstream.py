"""Dialling the upstream Realtime endpoint with the gateway's own key (CONTRACT §4).

See also ``notes/protocol.md`` §5.

* OpenAI: ``<url>?model=<model>``, ``Authorization: Bearer <key>``.
* Azure OpenAI GA: ``<url>?model=<deployment>`` on ``/openai/v1/realtime``,
  ``api-key: <key>``; no ``api-version`` (the GA path takes none).

No subprotocol is offered upstream and no client header is forwarded except
``User-Agent`` and ``OpenAI-Beta`` — the latter not for a beta-protocol session, which is
translated to GA (:mod:`gateway.beta_relay`) and would be refused with it; the caller
then passes ``openai_beta=None``.  Query parameters ``call_id`` and ``intent`` pass
through; nothing else does: not the query credentials (``api-key``, ``Authorization``),
``api-version``, ``deployment`` or ``x-ms-client-request-id``.

The dial happens before the client's upgrade is answered, so a refusal still
becomes an HTTP status (502/504) or, for browser clients, close 4502/4504.

TLS (``wss://``): one :class:`ssl.SSLContext` per upstream, made once per process by
:func:`tls_contexts` (``gateway.app`` keeps them in ``Services.upstream_tls``) and
passed to every dial.  Left to itself, websockets makes a default context on every
connect, which loads the whole system CA store each time (~30 ms of CPU on the bench
machine, bench/README.md).  The context verifies the certificate chain and the host
name (``check_hostname``) against the system store, or against ``ca_file`` only.

The ``websockets`` library does the dial (TCP, TLS, proxy, the opening handshake and
its checks); after the 101 the connection is handed to the frame relay
(:mod:`gateway.relay`): :class:`gateway.handoff.HandOffConnection` stops feeding the
library's parser at the end of the 101 response and keeps the bytes after it raw.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from gateway import __version__
from gateway.config import UpstreamConfig
from gateway.errors import UpstreamFailed, UpstreamTimeout
from gateway.handoff import HandOffConnection

PASSTHROUGH_PARAMS = ("call_id", "intent")
DEFAULT_USER_AGENT = f"realtime-gateway/{__version__}"


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Everything needed to dial one session's upstream.

    ``model`` is the upstream model (OpenAI) or deployment (Azure) name;
    ``params`` the pass-through query parameters; ``user_agent`` and
    ``openai_beta`` the client's header values (``None`` when absent).
    """

    name: str
    config: UpstreamConfig
    model: str
    params: tuple[tuple[str, str], ...] = ()
    user_agent: str | None = None
    openai_beta: str | None = None

    def url(self) -> str:
        """The upstream URL with its query: ``model`` first, then pass-through parameters."""
        query = [("model", self.model)]
        query.extend((k, v) for k, v in self.params if k in PASSTHROUGH_PARAMS)
        return f"{self.config.url}?{urlencode(query)}"

    def headers(self) -> list[tuple[str, str]]:
        """Request headers other than ``User-Agent``: the gateway's credential and
        ``OpenAI-Beta`` if the client sent one."""
        if self.config.provider == "azure":
            headers = [("api-key", self.config.api_key)]
        else:
            headers = [("Authorization", f"Bearer {self.config.api_key}")]
        if self.openai_beta is not None:
            headers.append(("OpenAI-Beta", self.openai_beta))
        return headers


def tls_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """A new TLS client context for ``config``'s URL; ``None`` for a ``ws://`` URL.

    :func:`ssl.create_default_context` (TLS 1.2 or later, certificate and host-name
    verification on) trusting ``config.ca_file`` only when it is set, the system store
    otherwise.  Making one loads the CA store: call it once per upstream and process
    (:func:`tls_contexts`), not per dial.
    """
    if urlsplit(config.url).scheme != "wss":
        return None
    if config.ca_file is not None:
        return ssl.create_default_context(cafile=str(config.ca_file))
    return ssl.create_default_context()


def tls_contexts(upstreams: Mapping[str, UpstreamConfig]) -> dict[str, ssl.SSLContext]:
    """One :func:`tls_context` per ``wss://`` upstream, by upstream name (``ws://`` ones
    are left out)."""
    contexts = {}
    for name, config in upstreams.items():
        context = tls_context(config)
        if context is not None:
            contexts[name] = context
    return contexts


def failure_reason(status: int) -> str:
    """The ``upstream_connect_errors_total{reason}`` label for an HTTP status instead of 101."""
    if status in (401, 403, 429):
        return f"status_{status}"
    if 500 <= status <= 599:
        return "status_5xx"
    return "status_4xx"


async def dial(
    target: UpstreamTarget,
    *,
    connect_timeout: float,
    subprotocols: Sequence[str] = (),
    tls: ssl.SSLContext | None = None,
) -> HandOffConnection:
    """Open the upstream WebSocket (RFC 6455) for one session.

    Args:
        connect_timeout: seconds for TCP + TLS + the opening handshake together.
        subprotocols: offered upstream; empty means no ``Sec-WebSocket-Protocol`` header.
        tls: for a ``wss://`` upstream, its shared context (:func:`tls_contexts`);
            ``None`` makes a :func:`tls_context` for this dial alone (correct, but it
            reloads the CA store: callers outside tests pass the shared one).  Ignored
            for ``ws://``.

    Raises:
        UpstreamTimeout: the dial took longer than ``connect_timeout`` (504; reason ``timeout``).
        UpstreamFailed: refused TCP (reason ``connect``), a status other than 101
            (``status_401`` … ``status_5xx``) or an invalid handshake (``protocol``) (502).
    """
    options: dict[str, Any] = {}
    if urlsplit(target.config.url).scheme == "wss":
        options["ssl"] = tls if tls is not None else tls_context(target.config)
    try:
        connection = await connect(
            target.url(),
            additional_headers=target.headers(),
            user_agent_header=target.user_agent or DEFAULT_USER_AGENT,
            subprotocols=[Subprotocol(p) for p in subprotocols] or None,
            compression=None,
            open_timeout=connect_timeout,
            ping_interval=None,  # keepalive is the relay's (it owns the transport)
            close_timeout=5,
            create_connection=HandOffConnection,
            **options,
        )
    except TimeoutError:
        raise UpstreamTimeout("the upstream did not answer in time", reason="timeout") from None
    except InvalidStatus as exc:
        status = exc.response.status_code
        raise UpstreamFailed(f"the upstream refused the session (HTTP {status})",
                             reason=failure_reason(status)) from None
    except InvalidHandshake:
        raise UpstreamFailed("the upstream failed the WebSocket handshake",
                             reason="protocol") from None
    except (OSError, asyncio.IncompleteReadError, EOFError):
        raise UpstreamFailed("the upstream could not be reached", reason="connect") from None
    assert isinstance(connection, HandOffConnection)
    return connection
