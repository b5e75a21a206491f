"""The data plane: two pumps moving frames verbatim between client and upstream.

Client side: an ASGI WebSocket (``receive``/``send`` callables, asgiref
``websocket.*`` messages).  Upstream side: a ``websockets`` client connection.

Rules (CONTRACT §5):

* every message is forwarded as it came: text stays text, binary stays binary,
  never merged, split or reordered;
* backpressure, not buffering: each pump awaits its ``send`` (uvicorn waits for
  the client transport to drain; websockets waits for the upstream write buffer),
  so a slow reader slows its sender.  The client side is read only as fast as
  upstream accepts (uvicorn pauses reading meanwhile), the upstream side holds
  at most ``max_queue`` messages;
* the first side to end decides the close: an upstream close frame goes to the
  client verbatim (code and reason); an upstream that vanished without one
  becomes ``error`` + 1011; a client that goes away gets its upstream closed
  1001; a gateway decision (:meth:`Relay.end`) sends ``error`` + its code;
* per-frame work is a type check, a counter update and one or two substring
  searches — ``"session.update"`` in client text frames (only those are parsed,
  by the session's ``guard``, for model pinning) and :func:`gateway.usage.tap`
  on upstream text frames — no other JSON parse, no log, no metric call.
  Counters are published by the session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from gateway.errors import UPSTREAM_LOST, SessionEnd
from gateway.usage import TokenCounts, tap

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Initiator = Literal["client", "upstream", "gateway"]
Guard = Callable[[str], str | None]
"""Inspects a client ``session.update`` frame: ``None`` forwards it, a string is an ``error``
event sent back to the client instead (the frame is dropped)."""
_SESSION_UPDATE = '"session.update"'

MAX_REASON_BYTES = 123
"""RFC 6455 §5.5: a control frame payload is <= 125 bytes, two of them the code."""
CLIENT_GONE_CODE = 1001
UPSTREAM_CLOSE_TIMEOUT = 2.0
"""Seconds to wait for the upstream's close reply before dropping the connection."""


def clip_reason(reason: str) -> str:
    """``reason`` cut to at most 123 UTF-8 bytes on a character boundary."""
    encoded = reason.encode()
    if len(encoded) <= MAX_REASON_BYTES:
        return reason
    return encoded[:MAX_REASON_BYTES].decode("utf-8", "ignore")


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a relayed session ended.

    ``code`` is the close code the client sent (``initiator == "client"``; 1006 when
    it vanished) or was sent (otherwise).  ``end`` is the gateway's or the upstream's
    in-session cause (CONTRACT §5), ``None`` for ordinary closes.
    """

    initiator: Initiator
    code: int
    reason: str
    end: SessionEnd | None = None


class _ClientClosed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class Relay:
    """Relays one session until either side closes or :meth:`end` is called.

    Public counters (read by the session's housekeeping, never reset):
    ``client_messages``/``client_bytes`` (client → upstream) and
    ``upstream_messages``/``upstream_bytes`` (upstream → client).  Bytes are the
    payload length; for text frames the character count, which equals the UTF-8
    byte count for ASCII JSON.  ``sending_to_client``/``sending_to_upstream``
    are true while a send is blocked on backpressure (for the send deadline).
    """

    def __init__(
        self,
        receive: Receive,
        send: Send,
        upstream: ClientConnection,
        on_usage: Callable[[TokenCounts], None],
        guard: Guard | None = None,
    ) -> None:
        self._receive = receive
        self._guard = guard
        self._send = send
        self._upstream = upstream
        self._on_usage = on_usage
        self._ended: asyncio.Future[SessionEnd] = asyncio.get_running_loop().create_future()
        self.client_messages = 0
        self.client_bytes = 0
        self.upstream_messages = 0
        self.upstream_bytes = 0
        self.sending_to_client = False
        self.sending_to_upstream = False

    def end(self, cause: SessionEnd) -> None:
        """Ask the relay to end the session with ``cause`` (idempotent; first cause wins)."""
        if not self._ended.done():
            self._ended.set_result(cause)

    async def _client_to_upstream(self) -> None:
        receive = self._receive
        upstream_send = self._upstream.send
        guard = self._guard
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                data: str | bytes = text if text is not None else message["bytes"]
                if text is not None and guard is not None and _SESSION_UPDATE in text:
                    refusal = guard(text)
                    if refusal is not None:
                        await self._send({"type": "websocket.send", "text": refusal})
                        continue
                self.client_messages += 1
                self.client_bytes += len(data)
                self.sending_to_upstream = True
                await upstream_send(data)
                self.sending_to_upstream = False
            elif kind == "websocket.disconnect":
                raise _ClientClosed(message.get("code", 1005), message.get("reason") or "")

    async def _upstream_to_client(self) -> None:
        recv = self._upstream.recv
        send = self._send
        on_usage = self._on_usage
        try:
            while True:
                data = await recv()
                self.upstream_messages += 1
                self.upstream_bytes += len(data)
                self.sending_to_client = True
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                    self.sending_to_client = False
                    usage = tap(data)
                    if usage is not None:
                        on_usage(usage)
                else:
                    await send({"type": "websocket.send", "bytes": data})
                    self.sending_to_client = False
        except OSError:  # uvicorn's ClientDisconnected: the client went away mid-send
            raise _ClientClosed(1006, "") from None

    async def run(self) -> RelayResult:
        """Relay until the session ends; close both sides; return how it ended.

        Never raises for peer behaviour (closes, resets, protocol errors); a
        cancelled :meth:`run` aborts the upstream connection before re-raising.
        """
        pumps = (asyncio.create_task(self._client_to_upstream()),
                 asyncio.create_task(self._upstream_to_client()))
        try:
            await asyncio.wait((*pumps, self._ended), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._upstream.transport.abort()
            raise
        finally:
            for pump in pumps:
                pump.cancel()
            results = await asyncio.gather(*pumps, return_exceptions=True)
        if self._ended.done():
            cause = self._ended.result()
            result = RelayResult("gateway", cause.close_code, cause.code, cause)
            await self._close_client_with(cause)
            await self._close_upstream(1001, "session ended by the gateway")
            return result
        for outcome in results:
            if isinstance(outcome, _ClientClosed):
                await self._close_upstream(CLIENT_GONE_CODE, "client went away")
                return RelayResult("client", outcome.code, outcome.reason)
        for outcome in results:
            if isinstance(outcome, ConnectionClosed):
                return await self._upstream_closed(outcome)
        # A pump failed in an unexpected way: end both sides as an upstream error.
        await self._close_client_with(UPSTREAM_LOST)
        await self._close_upstream(1011, "gateway error")
        raise next(r for r in results if isinstance(r, BaseException)
                   and not isinstance(r, asyncio.CancelledError))

    async def _upstream_closed(self, exc: ConnectionClosed) -> RelayResult:
        received = exc.rcvd
        if received is None:  # no close frame: reset, EOF or keepalive timeout
            await self._close_client_with(UPSTREAM_LOST)
            return RelayResult("upstream", UPSTREAM_LOST.close_code, "", UPSTREAM_LOST)
        code = received.code if received.code not in (1005, 1006, 1015) else 1000
        reason = clip_reason(received.reason)
        await self._close_client(code, reason)
        return RelayResult("upstream", code, reason)

    async def _close_client_with(self, cause: SessionEnd | None) -> None:
        if cause is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            await self._send({"type": "websocket.send", "text": cause.error_event()})
        await self._close_client(cause.close_code, clip_reason(cause.code))

    async def _close_client(self, code: int, reason: str) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def _close_upstream(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(UPSTREAM_CLOSE_TIMEOUT):
                await self._upstream.close(code, reason)
        except (TimeoutError, OSError, ConnectionClosed):
            self._upstream.transport.abort()
