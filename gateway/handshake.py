"""The upgrade request as a plain value, and the answer to a refused one (CONTRACT §3 to §5).

:class:`HandshakeRequest` holds the parts of a WebSocket upgrade the pipeline reads, taken
once from the ASGI scope, so every stage after it works on plain values.  :func:`refuse`
is the one place a :class:`~gateway.errors.GatewayError` becomes the client's answer:
header-credential clients get an HTTP status and JSON body before the upgrade; subprotocol
clients (browsers, which cannot read a status) are accepted, sent an ``error`` event and
closed ``4000 + status``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from gateway.beta import AZURE_PREVIEW_PATH
from gateway.credentials import CREDENTIAL_PARAMS, Credentials, select_subprotocol
from gateway.errors import Forbidden, GatewayError, InvalidRequest

REALTIME_PATHS = ("/v1/realtime", "/openai/v1/realtime", AZURE_PREVIEW_PATH,
                  "/language-model-service/ws/v1/open-ai/realtime")
"""The WebSocket paths of CONTRACT §3."""
MAX_MODEL_NAME = 128
"""Characters; a longer ``model=`` is refused as malformed."""

Send = Callable[[dict[str, Any]], Awaitable[None]]
"""An ASGI ``send`` callable."""


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """The parts of a WebSocket upgrade request the pipeline reads.

    ``headers`` are raw ``(name, value)`` byte pairs with lower-case names (ASGI);
    ``subprotocols`` the offered values, split on commas.
    """

    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[bytes, bytes], ...]
    subprotocols: tuple[str, ...]
    client: str

    @classmethod
    def from_scope(cls, scope: dict[str, Any]) -> HandshakeRequest:
        client = scope.get("client")
        return cls(
            path=scope["path"],
            query=tuple(parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                  keep_blank_values=True)),
            headers=tuple(scope.get("headers", ())),
            subprotocols=tuple(scope.get("subprotocols", ())),
            client=f"{client[0]}:{client[1]}" if client else "",
        )

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower-case), decoded as Latin-1."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    @property
    def has_query_credential(self) -> bool:
        """Whether a credential query parameter (``api-key=``, ``Authorization=``) was sent,
        well-formed or not (its client is refused in band)."""
        return any(key.lower() in CREDENTIAL_PARAMS for key, _ in self.query)

    def param(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None

    def model(self) -> str | None:
        """The requested model: ``model=``, or ``deployment=`` (Azure's name for it, taken
        on every realtime path) when there is no ``model=``; ``None`` when neither is
        present (only a client secret, which names its model, may leave it out).

        Raises:
            InvalidRequest: the value is empty or implausible (400).
        """
        model = self.param("model")
        if model is None:
            model = self.param("deployment")
        if model is None:
            return None
        if not model:
            raise InvalidRequest("the model query parameter is required")
        if len(model) > MAX_MODEL_NAME or not model.isprintable():
            raise InvalidRequest("the model query parameter is malformed")
        return model

    def check_origin(self, allowed: Sequence[str]) -> None:
        """Refuse a browser ``Origin`` not in ``allowed`` (``server.allowed_origins``;
        empty: any).  Requests without ``Origin`` (native clients) pass.

        Raises:
            Forbidden: the Origin is not allowed (403 / 4403, ``reason="origin"``).
        """
        origin = self.header(b"origin")
        if allowed and origin is not None and origin not in allowed:
            raise Forbidden("this Origin is not allowed", reason="origin")


async def refuse(send: Send, exc: GatewayError, request: HandshakeRequest,
                 credentials: Credentials | None) -> None:
    """Answer a refused upgrade (CONTRACT §5): an HTTP status for header clients;
    accept + ``error`` event + close ``4000 + status`` for subprotocol and query-credential
    clients (:attr:`Credentials.refused_in_band`)."""
    browser = exc.in_band or (credentials.refused_in_band if credentials
                              else bool(request.subprotocols) or request.has_query_credential)
    with contextlib.suppress(OSError, RuntimeError):
        if browser:
            await send({"type": "websocket.accept",
                        "subprotocol": select_subprotocol(request.subprotocols)})
            await send({"type": "websocket.send", "text": exc.error_event()})
            await send({"type": "websocket.close", "code": exc.close_code,
                        "reason": exc.code})
            return
        headers = [(k.encode(), v.encode()) for k, v in exc.http_headers().items()]
        await send({"type": "websocket.http.response.start", "status": exc.http_status,
                    "headers": headers})
        await send({"type": "websocket.http.response.body", "body": exc.http_body()})
