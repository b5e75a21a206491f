"""Every reach into uvicorn's and websockets' internals, in one place.

The frame relay (:mod:`gateway.relay`) owns both connections of a session after the
101, below ASGI.  Getting them there takes three things neither library offers as API:

* :class:`GatewayWebSocketProtocol` — uvicorn's websockets Sans-I/O protocol with a
  :data:`HAND_OFF` scope extension that writes the 101 and hands the client's transport
  over (and :meth:`~GatewayWebSocketProtocol.run_asgi` copied from uvicorn, minus the
  transport close);
* :class:`HeaderDeadlineProtocol` — uvicorn's httptools protocol with a request-header
  deadline (slowloris) and size cap;
* :class:`HandOffConnection` — a websockets client connection that stops feeding its
  parser at the end of the upstream's 101 and keeps what follows raw;

plus the C masking routine of websockets (:func:`apply_mask`), and the upgrade parser's
limits made to follow the gateway's own caps (:data:`MAX_REQUEST_HEAD_BYTES`).  The
versions these were written against are the upper bounds in ``pyproject.toml``;
:func:`internals_problems` (run by ``tests/test_handoff.py``) lists what no longer
matches, so an upgrade of either library fails one test loudly instead of sessions quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets import http11
from websockets.asyncio.client import ClientConnection
from websockets.http11 import Request
from websockets.protocol import State
from websockets.speedups import apply_mask

from gateway.credentials import MAX_TOKEN_BYTES

__all__ = ["HAND_OFF", "MAX_REQUEST_HEAD_BYTES", "GatewayWebSocketProtocol", "HandOff",
           "HandOffConnection", "HeaderDeadlineProtocol", "apply_mask",
           "header_deadline_protocol", "internals_problems"]

HAND_OFF = "gateway.hand_off"
"""ASGI scope extension set by :class:`GatewayWebSocketProtocol`: ``{"call": HandOff}``."""

HandOff = Callable[[str | None], asyncio.Transport | None]
"""Writes the 101 (with the given subprotocol) and returns the client's transport, or
``None`` when the client already went away."""

MAX_REQUEST_HEAD_BYTES = 4 * MAX_TOKEN_BYTES
"""Bytes; the largest request line plus headers a client may send (64 KiB).

An oversize credential must get the gateway's own answer (CONTRACT §5: 401 JSON, or an
``error`` event and 4401 for a subprotocol carrier), not a parser's plain-text 431: a
browser cannot read a status.  So websockets' per-line limit (``MAX_LINE_LENGTH``, 8 KiB
by default, process-wide) is raised to this, well above :data:`MAX_TOKEN_BYTES` (16 KiB);
and since uvicorn's httptools parser has no limit of its own, a request head over it is
answered 431 and closed by :class:`HeaderDeadlineProtocol`.  Only requests whose whole
head is over 64 KiB get a plain 431."""

http11.MAX_LINE_LENGTH = max(http11.MAX_LINE_LENGTH, MAX_REQUEST_HEAD_BYTES)

_HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                   b"Content-Length: 0\r\n\r\n")

UVICORN_RUN_ASGI_SHA256 = (
    "662375aa38d9044cde4f7f2c54a8d33b9c1bee28679e5e5f3598e3fe333d5720")
"""SHA-256 of the source of uvicorn's ``WebSocketsSansIOProtocol.run_asgi`` that
:meth:`GatewayWebSocketProtocol.run_asgi` copies (uvicorn 0.54)."""


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a deadline and a size cap for the request line
    and headers.

    uvicorn has no request-header timeout: a client trickling its upgrade request one
    byte a second holds a connection forever (slowloris).  The connection is closed
    when the headers are not complete ``header_timeout`` seconds after the connection
    opened or the request began.  Everything after the headers (auth, admission, the
    upstream dial) has its own budget, ``server.handshake_timeout_seconds``.  Nor does
    httptools bound the headers' size: over :data:`MAX_REQUEST_HEAD_BYTES` received before
    the headers are complete, the request is answered 431 and the connection closed.
    """

    header_timeout: float = 15.0
    _deadline: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _in_head = True
    _tail = b""
    """The last bytes of the head read so far (a terminator may straddle two reads)."""

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")  # the head may end inside this read
            head = len(data) if end < 0 else end + 4 - len(self._tail)
            self._tail = seen[-3:]
            self._head_bytes += head
            if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                self._disarm()
                self._in_head = False
                if not self.transport.is_closing():
                    self.transport.write(_HEAD_TOO_LARGE)
                    self.transport.close()
                return
        super().data_received(data)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        self.transport.close()


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets Sans-I/O protocol, with the upgrade handed off to the relay.

    An accepted session does not send ``websocket.accept``: it calls the
    :data:`HAND_OFF` scope extension, which writes the 101 and gives
    the connection's transport to the frame relay (:mod:`gateway.relay`); uvicorn then
    holds nothing of the connection but the ASGI task.  Refusals (HTTP responses, or
    accept + ``error`` + close for browsers) still go through ASGI.

    Two uvicorn defects are fixed here: an upgrade request that the websockets parser
    refuses (more than 128 headers; a line over its limit) is answered 414/431/400
    and closed instead of held open; a completed HTTP refusal is not logged as
    "ASGI callable returned without completing handshake".
    """

    handed_off = False
    """True once :meth:`hand_off` gave the transport away."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if not self.handshake_complete:  # the request is a valid upgrade: the app runs
            self.scope["extensions"][HAND_OFF] = {"call": self.hand_off}

    def hand_off(self, subprotocol: str | None) -> asyncio.Transport | None:
        """Answer the upgrade with 101 (echoing ``subprotocol``) and give the transport away.

        Returns ``None``, writing nothing, when the client already went away.  After this
        call the caller must set the transport's protocol before yielding to the loop.
        """
        if self.disconnected or self.handshake_complete or self.transport.is_closing():
            return None
        headers = self.response.headers
        del headers["Date"]
        headers.update((name.decode("latin-1").lower(), value.decode("latin-1"))
                       for name, value in self.default_headers)
        if subprotocol:
            headers["Sec-WebSocket-Protocol"] = subprotocol
        self.handshake_complete = True
        self.conn.send_response(self.response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.connections.discard(self)
        self.handed_off = True
        return self.transport

    async def run_asgi(self) -> None:
        """uvicorn's ``run_asgi``, except that a handed-off transport is not closed when
        the app returns (the relay owns it; the session runs in its own task)."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.",
                                  result)
        if self.close_timer is None and not self.handed_off:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets prepared a 414/431 (or nothing, for an unparseable request).
            answer = b"".join(self.conn.data_to_send()) or (
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            self.handshake_initiated = self.handshake_complete = self.close_sent = True
            if not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True


def header_deadline_protocol(seconds: float) -> type[HeaderDeadlineProtocol]:
    """A :class:`HeaderDeadlineProtocol` class whose deadline is ``seconds``."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": seconds})


class HandOffConnection(ClientConnection):
    """A ``websockets`` client connection that stops parsing after the 101.

    Bytes up to the end of the 101 response go to the library (which validates the
    handshake); every byte after it is appended to :attr:`raw` unparsed, for the frame
    relay to take over the transport with nothing lost.  :attr:`lost` is true once the
    transport closed.  A refusal (any other status) is parsed by the library as usual.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: list[bytes] | None = None
        self.lost = False
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw.append(data)
            return
        seen = len(self._head)
        self._head += data
        end = self._head.find(b"\r\n\r\n", max(0, seen - 3))
        if end < 0:
            super().data_received(data)
            return
        cut = end + 4 - seen
        super().data_received(data[:cut])
        self._head = b""
        if self.protocol.state is State.OPEN:
            self.raw = [data[cut:]] if cut < len(data) else []
        elif cut < len(data):
            super().data_received(data[cut:])

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        super().connection_lost(exc)

    def take_raw(self) -> bytes:
        """The bytes received after the 101 so far (emptied)."""
        raw, self.raw = self.raw or [], []
        return b"".join(raw)

    def write_text(self, text: str) -> None:
        """Write one text message of the gateway's own (masked by the library) at once,
        before the relay takes the transport over: it reaches the upstream first."""
        self.protocol.send_text(text.encode())
        self.transport.write(b"".join(self.protocol.data_to_send()))

    def hang_up(self, code: int, reason: str) -> None:
        """Close an upstream that never reached the relay: a close frame, then TCP close.

        Does not wait for the upstream's reply (the relay never ran).
        """
        if self.lost or self.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            self.protocol.send_close(code, reason)
            self.transport.write(b"".join(self.protocol.data_to_send()))
        self.transport.close()


def internals_problems() -> list[str]:
    """What of the libraries' internals this module relies on is missing or changed;
    empty when all is as written against.  Never raises."""
    problems: list[str] = []
    needs: list[tuple[type, tuple[str, ...]]] = [
        (WebSocketsSansIOProtocol, ("handle_connect", "run_asgi", "data_received", "send",
                                    "send_500_response")),
        (HttpToolsProtocol, ("connection_made", "on_message_begin", "on_headers_complete",
                             "connection_lost")),
        (ClientConnection, ("data_received", "connection_lost")),
    ]
    for cls, names in needs:
        problems += [f"{cls.__qualname__}.{name} is gone" for name in names
                     if not callable(getattr(cls, name, None))]
    init = inspect.getsource(WebSocketsSansIOProtocol.__init__)
    problems += [f"WebSocketsSansIOProtocol no longer sets self.{attr}" for attr in (
        "handshake_complete", "handshake_initiated", "close_sent", "close_timer", "conn",
        "connections", "default_headers", "disconnected", "transport")
        if f"self.{attr}" not in init]
    source = inspect.getsource(WebSocketsSansIOProtocol)
    problems += [f"WebSocketsSansIOProtocol no longer uses self.{attr}" for attr in (
        "response", "initial_response", "scope") if f"self.{attr}" not in source]
    digest = hashlib.sha256(
        inspect.getsource(WebSocketsSansIOProtocol.run_asgi).encode()).hexdigest()
    if digest != UVICORN_RUN_ASGI_SHA256:
        problems.append("uvicorn's WebSocketsSansIOProtocol.run_asgi changed: compare it with "
                        "GatewayWebSocketProtocol.run_asgi, then update UVICORN_RUN_ASGI_SHA256")
    if http11.MAX_LINE_LENGTH < MAX_REQUEST_HEAD_BYTES:
        problems.append("websockets.http11.MAX_LINE_LENGTH no longer follows the gateway")
    if "MAX_LINE_LENGTH" not in inspect.getsource(http11.parse_line):
        problems.append("websockets.http11.parse_line no longer reads MAX_LINE_LENGTH")
    if not hasattr(State, "OPEN"):
        problems.append("websockets.protocol.State.OPEN is gone")
    if apply_mask(b"\x00\x00\x00\x00", b"\x01\x02\x03\x04") != b"\x01\x02\x03\x04":
        problems.append("websockets.speedups.apply_mask changed")
    return problems
