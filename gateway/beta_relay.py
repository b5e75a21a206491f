"""The translating relay: one beta-protocol client on a GA upstream (CONTRACT §5 and §10).

:class:`BetaRelay` has the public surface of :class:`gateway.relay.Relay` (counters,
``sending_to_*``, :meth:`~BetaRelay.end`, :meth:`~BetaRelay.run`), so
:class:`gateway.session.RelayedSession` runs either.  Where the verbatim relay moves frames
untouched, this one works on messages: both handed-off transports are driven by
``websockets``' Sans-I/O :class:`~websockets.protocol.Protocol` (RFC 6455 framing, masking,
UTF-8 of close reasons, message size limit, ping answers, the closing handshake), each
complete text message is translated by one :class:`gateway.beta.BetaTranslator`, and what
comes out is sent as new messages (so the client's fragmentation is not kept).

Per message, in order:

* **client → upstream**: UTF-8 check (1007); ``input_audio_buffer.append`` crosses without
  parsing (:func:`gateway.beta.client_frame_is_verbatim`); any other text is parsed
  (bounded by ``max_client_message`` bytes), translated to GA and serialised; every text
  that goes upstream and may be a ``session.update`` is shown to the guard (model pinning on
  the *translated* event), whose refusal goes back to the client as its ``error`` event
  (the ``error`` event has the same shape in both protocols).  Text that is not a JSON
  object crosses unchanged, for the upstream to answer with its own ``error`` event;
* **upstream → client**: usage is read from the GA message (:func:`gateway.usage.tap`)
  before translation; the ``output_*`` deltas are renamed without parsing
  (:func:`gateway.beta.upstream_frame_renamed`); anything else is parsed, translated
  (possibly to nothing) and serialised.  Non-JSON upstream text is dropped.
* binary messages cross untranslated (neither protocol defines any); a client's goes
  through the model guard first, like text (a parser that takes bytes reads it as JSON).
* a client text message with more JSON objects and arrays than
  :data:`gateway.guard.MAX_CHECKED_CONTAINERS` is not parsed (its cost on the event loop
  grows with them): it gets an ``invalid_request`` ``error`` event and is dropped.

Closes follow CONTRACT §5 as in :mod:`gateway.relay`: an upstream close goes to the client
with its code and reason; a client close (or a vanished client) closes the upstream 1001;
:meth:`BetaRelay.end` sends the client an ``error`` event and the cause's code; an upstream
that vanished, broke the protocol or stopped answering pings becomes ``error`` + 1011.
Backpressure pauses the other side's reads while a transport is over its high-water mark;
keepalive pings go to both sides every ``ping_interval`` seconds.

Counters count messages and payload bytes *sent* to the other side (after translation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State

from gateway.beta import BetaTranslator, client_frame_is_verbatim, upstream_frame_renamed
from gateway.errors import UPSTREAM_LOST, SessionEnd, error_event
from gateway.guard import MAX_CHECKED_CONTAINERS
from gateway.logs import get_logger
from gateway.relay import (
    CLIENT_GONE_CODE,
    CLOSE_TIMEOUT,
    LINGER_SECONDS,
    Guard,
    RelayResult,
    clip_reason,
    run_until_settled,
    take_over,
)
from gateway.usage import TokenCounts, tap

__all__ = ["BetaRelay"]

log = get_logger(__name__)
_SILENT = logging.Logger(f"{__name__}.websockets", logging.CRITICAL + 1)
"""Given to the Sans-I/O protocols: an unregistered logger that logs nothing (``websockets``
would log every frame at DEBUG and each closed connection at INFO)."""

_GUARDED = (b"session.update", b"\\u")
"""Translated client text containing either is shown to the guard (as in :mod:`gateway.relay`)."""
_USAGE = (b'"response.done"', b"transcription.completed")
_NO_CODE = (1005, 1006, 1015)
"""Close codes that may not be sent in a close frame (RFC 6455 §7.4.1)."""


TOO_MANY_CONTAINERS = (f"the message holds more than {MAX_CHECKED_CONTAINERS} JSON objects and "
                       "arrays; it was not translated")
"""The ``error`` event's message for a client message too costly to parse (not forwarded)."""


def _dumps(event: Any) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(payload: bytes) -> Any:
    """The JSON value of a text message, or ``None`` when it is not JSON (or too deep)."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


class _Peer(asyncio.Protocol):
    """One side's connection: a Sans-I/O protocol on a transport, flow control, keepalive
    and the closing handshake.  Subclasses handle the complete messages."""

    def __init__(self, relay: BetaRelay, transport: asyncio.Transport, side: Side,
                 max_message: int) -> None:
        self.relay = relay
        self.transport = transport
        self.ws = Protocol(side, state=State.OPEN, max_size=max_message, logger=_SILENT)
        self.peer: _Peer
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        """Resolved when the connection is gone."""
        self.settled: asyncio.Future[None] = loop.create_future()
        """Resolved when the connection is gone or lingers (the session need not wait)."""
        self.write_paused = False
        self._message: list[bytes] = []
        self._message_opcode: Opcode | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
            self._events()
        except Exception:  # a bug must end this session, not the process's other ones
            log.exception("beta_relay.internal_error", side=type(self).__name__)
            self.relay.decide(RelayResult("upstream", UPSTREAM_LOST.close_code, "",
                                          UPSTREAM_LOST))
            self.relay.abort_upstream()
        self.relay.flush()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._events()
        self.relay.flush()
        return None  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        self.write_paused = True
        peer = self.peer.transport
        if not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.peer.transport
        if not peer.is_closing():
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timers()
        self.cancel_close_timer()
        self._message = []
        for future in (self.closed, self.settled):
            if not future.done():
                future.set_result(None)
        if self.write_paused:
            self.resume_writing()
        self.lost()

    # -- frames in ---------------------------------------------------------------------------

    def _events(self) -> None:
        ws = self.ws
        for frame in ws.events_received():
            assert isinstance(frame, Frame)  # an OPEN protocol yields frames only
            opcode = frame.opcode
            data = frame.data  # bytes (unmasked by the C speed-up) or a bytearray slice
            if type(data) is not bytes:
                data = bytes(data)
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if frame.fin:
                    self._deliver(opcode, data)
                else:
                    self._message_opcode = opcode
                    self._message = [data]
            elif opcode is Opcode.CONT:
                self._message.append(data)
                if frame.fin and self._message_opcode is not None:
                    data, self._message = b"".join(self._message), []
                    self._deliver(self._message_opcode, data)
                    self._message_opcode = None
            elif opcode is Opcode.PONG:
                self._on_pong(data)
            elif opcode is Opcode.CLOSE:
                self.stop_timers()
                self.close_received()
        if ws.parser_exc is not None and not self.relay.decided:
            self.broken(ws.close_sent.code if ws.close_sent else 1006,
                        ws.close_sent.reason if ws.close_sent else "")

    def _deliver(self, opcode: Opcode, payload: bytes) -> None:
        if not self.relay.forwarding:
            return
        if opcode is Opcode.TEXT:
            self.text(payload)
        else:
            self.binary(payload)

    def binary(self, payload: bytes) -> None:
        """One complete binary message from this side (while forwarding): crosses as is."""
        self.peer.send(Opcode.BINARY, payload)

    def text(self, payload: bytes) -> None:
        """One complete text message from this side (while forwarding)."""
        raise NotImplementedError

    def close_received(self) -> None:
        """This side sent a close frame (``ws.close_rcvd``), already answered by ``ws``."""
        raise NotImplementedError

    def broken(self, code: int, reason: str) -> None:
        """This side broke RFC 6455 (or sent too big a message); ``ws`` failed it ``code``."""
        raise NotImplementedError

    def lost(self) -> None:
        """The connection is gone (after :meth:`connection_lost` bookkeeping)."""
        raise NotImplementedError

    def ping_expired(self) -> None:
        """No pong within ``ping_timeout``: the peer is gone."""
        raise NotImplementedError

    # -- frames out --------------------------------------------------------------------------

    def send(self, opcode: Opcode, payload: bytes) -> None:
        """Queue one message to this side (written by :meth:`flush`); counted as relayed."""
        ws = self.ws
        if ws.state is not State.OPEN:
            return
        if opcode is Opcode.TEXT:
            ws.send_text(payload)
        else:
            ws.send_binary(payload)
        self.relay.count(self, len(payload))

    def send_own(self, payload: bytes) -> None:
        """Queue a text message of the gateway's own (an ``error`` event); not counted."""
        if self.ws.state is State.OPEN:
            self.ws.send_text(payload)

    def send_close(self, code: int, reason: str) -> None:
        """Start the closing handshake (nothing if it already started); the connection is
        aborted if not closed within :data:`CLOSE_TIMEOUT` seconds."""
        if self.ws.state is not State.OPEN:
            return
        self.stop_timers()
        try:
            self.ws.send_close(code, clip_reason(reason))
        except Exception:  # an invalid code: close without one rather than not at all
            self.ws.send_close()
        if not self.transport.is_closing():
            self.transport.resume_reading()  # the reply must get through even if paused
        self._arm_close_timer()

    def flush(self) -> None:
        """Write what ``ws`` queued (one ``write``); close the TCP connection at its end."""
        writes = self.ws.data_to_send()
        if not writes:
            return
        transport = self.transport
        eof = writes[-1] == b""  # websockets' SEND_EOF: half-close, i.e. close the TCP
        if eof:
            writes.pop()
        if transport.is_closing():
            return
        if writes:
            transport.write(writes[0] if len(writes) == 1 else b"".join(writes))
        if eof or self.ws.state is State.CLOSED:
            transport.close()
            self._arm_close_timer()
        elif self.ws.close_expected():
            self._arm_close_timer()

    # -- timers ------------------------------------------------------------------------------

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self.closed.done():
            self._close_timer = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT, self._close_expired)

    def cancel_close_timer(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None

    def _close_expired(self) -> None:
        """The closing handshake did not complete in time: linger once if the peer has not
        read what was written to it yet, else abort."""
        self._close_timer = None
        if self.closed.done():
            return
        if not self.settled.done() and self.transport.get_write_buffer_size():
            self.settled.set_result(None)
            self.transport.close()  # flushes, then closes
            self._close_timer = asyncio.get_running_loop().call_later(
                LINGER_SECONDS, self.transport.abort)
            return
        self.transport.abort()

    def schedule_ping(self) -> None:
        interval = self.relay.ping_interval
        if interval is not None and self.ws.state is State.OPEN:
            self._ping_timer = asyncio.get_running_loop().call_later(interval, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self.ws.state is not State.OPEN or self.transport.is_closing():
            return
        self._ping_payload = os.urandom(4)
        try:
            self.ws.send_ping(self._ping_payload)
        except InvalidState:
            return
        self.flush()
        timeout = self.relay.ping_timeout
        if timeout is None:
            self.schedule_ping()
        else:
            self._pong_timer = asyncio.get_running_loop().call_later(timeout, self._pong_missing)

    def _on_pong(self, payload: bytes) -> None:
        if self._ping_payload is not None and payload == self._ping_payload:
            self._ping_payload = None
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
            self.schedule_ping()

    def _pong_missing(self) -> None:
        self._pong_timer = None
        self.ping_expired()

    def stop_timers(self) -> None:
        for timer in (self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = None
        self._ping_payload = None


class _Client(_Peer):
    """The beta client's connection (the server side of its WebSocket)."""

    def __init__(self, relay: BetaRelay, transport: asyncio.Transport, max_message: int,
                 guard: Guard | None) -> None:
        super().__init__(relay, transport, Side.SERVER, max_message)
        self.guard = guard

    def text(self, payload: bytes) -> None:
        if not payload.isascii():
            try:
                payload.decode()
            except UnicodeDecodeError:
                self.ws.fail(1007, "invalid UTF-8 in text message")
                self.relay.decide(RelayResult("client", 1007, "invalid UTF-8 in text message"))
                return
        upstream = self.peer
        if client_frame_is_verbatim(payload):
            upstream.send(Opcode.TEXT, payload)
            return
        if payload.count(b"{") + payload.count(b"[") > MAX_CHECKED_CONTAINERS:
            # Parsing many small objects costs the event loop ~0.1 s per MB: refuse what a
            # Realtime event never needs, as the model guard does (C-speed count first).
            self.send_own(error_event("invalid_request", TOO_MANY_CONTAINERS).encode())
            return
        event = _loads(payload)
        if not isinstance(event, dict):  # the upstream answers it with its own error
            self._guarded(payload)
            return
        for translated in self.relay.translator.client_to_upstream(event):
            self._guarded(_dumps(translated))

    def binary(self, payload: bytes) -> None:
        """A binary message is a JSON event to parsers that take bytes: model pinning
        applies to it as to text (as in :mod:`gateway.relay`); it crosses untranslated."""
        self._guarded(payload, Opcode.BINARY)

    def _guarded(self, text: bytes, opcode: Opcode = Opcode.TEXT) -> None:
        guard = self.guard
        if guard is not None and (_GUARDED[0] in text or _GUARDED[1] in text):
            refusal = guard(text)
            if refusal is not None:
                self.send_own(refusal.encode())
                return
        self.peer.send(opcode, text)

    def close_received(self) -> None:
        close = self.ws.close_rcvd
        code, reason = (close.code, close.reason) if close is not None else (1005, "")
        self.relay.decide(RelayResult("client", code, reason))

    def broken(self, code: int, reason: str) -> None:
        self.relay.decide(RelayResult("client", code, reason))

    def lost(self) -> None:
        self.relay.decide(RelayResult("client", 1006, ""))

    def ping_expired(self) -> None:
        self.ws.fail(1011, "keepalive ping timeout")
        self.flush()
        self.relay.decide(RelayResult("client", 1006, "keepalive ping timeout"))


class _Upstream(_Peer):
    """The GA upstream's connection (the client side of its WebSocket)."""

    def __init__(self, relay: BetaRelay, transport: asyncio.Transport, max_message: int) -> None:
        super().__init__(relay, transport, Side.CLIENT, max_message)

    def text(self, payload: bytes) -> None:
        relay = self.relay
        if _USAGE[0] in payload or _USAGE[1] in payload:
            usage = tap(payload)
            if usage is not None:
                relay.on_usage(usage)
        client = self.peer
        renamed = upstream_frame_renamed(payload)
        if renamed is not None:
            client.send(Opcode.TEXT, renamed)
            return
        event = _loads(payload)
        if not isinstance(event, dict):
            return
        for translated in relay.translator.upstream_to_client(event):
            client.send(Opcode.TEXT, _dumps(translated))

    def close_received(self) -> None:
        close = self.ws.close_rcvd
        code, reason = (close.code, close.reason) if close is not None else (1005, "")
        if code in _NO_CODE:
            code = 1000
        self.relay.decide(RelayResult("upstream", code, clip_reason(reason)))

    def broken(self, code: int, reason: str) -> None:
        self.relay.decide(RelayResult("upstream", UPSTREAM_LOST.close_code, "", UPSTREAM_LOST))

    def lost(self) -> None:
        self.relay.decide(RelayResult("upstream", UPSTREAM_LOST.close_code, "", UPSTREAM_LOST))

    def ping_expired(self) -> None:
        self.transport.abort()


class BetaRelay:
    """Relays one beta-protocol session on a GA upstream until either side closes or
    :meth:`end` is called; the constructor's arguments and the public attributes are those
    of :class:`gateway.relay.Relay`.

    Args:
        client, upstream: the two connected transports right after the upgrade; the relay
            becomes their protocol in :meth:`start`.
        on_usage: called with the token counts of each GA ``response.done`` /
            transcription-completed event (before translation).
        guard: model pinning (:func:`gateway.guard.model_guard`), shown each translated
            client text that may be a ``session.update``.
        upstream_buffered: bytes the upstream sent after its 101 before the hand-off.
        upstream_lost: the upstream connection was already lost then.
        max_client_message: bytes; a larger client message closes the client 1009.
        max_upstream_message: bytes; a larger upstream message fails the upstream and the
            client gets ``upstream_error`` + 1011.
        ping_interval, ping_timeout: keepalive towards both sides, seconds; ``None``
            disables pings (or the deadline for their pongs).
    """

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        on_usage: Callable[[TokenCounts], None],
        guard: Guard | None = None,
        *,
        upstream_buffered: bytes = b"",
        upstream_lost: bool = False,
        max_client_message: int,
        max_upstream_message: int,
        ping_interval: float | None,
        ping_timeout: float | None,
    ) -> None:
        self.on_usage = on_usage
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.translator = BetaTranslator()
        self.client_messages = 0
        self.client_bytes = 0
        self.upstream_messages = 0
        self.upstream_bytes = 0
        self.forwarding = True
        self._result: asyncio.Future[RelayResult] = (
            asyncio.get_running_loop().create_future())
        self._client = _Client(self, client, max_client_message, guard)
        self._upstream = _Upstream(self, upstream, max_upstream_message)
        self._client.peer = self._upstream
        self._upstream.peer = self._client
        self._upstream_buffered = upstream_buffered
        self._upstream_lost = upstream_lost
        self._started = False

    def start(self) -> None:
        """Take both connections over, as :meth:`gateway.relay.Relay.start` does: become
        their protocol, resume their reading, translate ``upstream_buffered`` and report a
        connection already gone.  Call it once, right after the constructor and before
        yielding to the event loop.

        Raises:
            RuntimeError: when called a second time.
        """
        if self._started:
            raise RuntimeError("BetaRelay.start() called twice")
        self._started = True
        buffered, self._upstream_buffered = self._upstream_buffered, b""
        take_over(self._client, self._upstream, buffered, self._upstream_lost)

    @property
    def sending_to_client(self) -> bool:
        return self._client.write_paused

    @property
    def sending_to_upstream(self) -> bool:
        return self._upstream.write_paused

    @property
    def decided(self) -> bool:
        return self._result.done()

    def count(self, to: _Peer, size: int) -> None:
        """One message of ``size`` payload bytes queued to ``to``."""
        if to is self._upstream:
            self.client_messages += 1
            self.client_bytes += size
        else:
            self.upstream_messages += 1
            self.upstream_bytes += size

    def flush(self) -> None:
        """Write what either side's protocol queued."""
        self._client.flush()
        self._upstream.flush()

    def end(self, cause: SessionEnd) -> None:
        """End the session with ``cause`` (idempotent; the first decision wins): the
        client gets its ``error`` event and close code, the upstream close 1001."""
        self.decide(RelayResult("gateway", cause.close_code, cause.code, cause))

    def abort_upstream(self) -> None:
        """Drop the upstream connection at once (after an internal error)."""
        self._upstream.transport.abort()

    def decide(self, result: RelayResult) -> None:
        """Record how the session ends (first call wins) and close what is still open."""
        if self._result.done():
            return
        self._result.set_result(result)
        self.forwarding = False
        client, upstream = self._client, self._upstream
        if result.initiator == "client":
            upstream.send_close(CLIENT_GONE_CODE, "client went away")
        elif result.end is None:
            client.send_close(result.code, result.reason)
        else:
            client.send_own(result.end.error_event().encode())
            client.send_close(result.end.close_code, result.end.code)
        if result.initiator == "gateway":
            upstream.send_close(CLIENT_GONE_CODE, "session ended by the gateway")
        self.flush()

    async def run(self) -> RelayResult:
        """Relay until the session ends and both connections are closed; return how it
        ended.  Never raises for peer behaviour; a cancelled :meth:`run` aborts both
        connections before re-raising."""
        return await run_until_settled(self._result, self._client, self._upstream,
                                       decided=self.flush)
