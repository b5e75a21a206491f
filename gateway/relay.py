"""The data plane: a frame-level WebSocket relay between two transports (RFC 6455).

After the upgrade the session's two connections — the client's (taken from uvicorn,
see :mod:`gateway.server`) and the upstream's (taken from ``websockets``, see
:class:`gateway.upstream.HandOffConnection`) — are driven by two asyncio protocols
of this module.  They find frame boundaries and move bytes; no task, queue, future
or message object exists per frame.

Rules (CONTRACT §5):

* every message is forwarded as it came: text stays text, binary stays binary,
  never merged, split or reordered; even the fragmentation of a message is kept;
* **upstream → client**: server frames are unmasked on both legs, so runs of data
  frames are written to the client exactly as read — one ``write`` per read; only
  headers are looked at, plus a substring search in text payloads for usage events
  (:func:`gateway.usage.tap` parses the few that match);
* **client → upstream**: client frames are masked (§5.3); each is unmasked (the
  ``websockets`` C speed-up), checked, and masked again with a fresh key from a
  CSPRNG pool, so the client never chooses the bytes on the upstream wire.  Text
  payloads are checked for UTF-8 (1007); text and binary messages that may be a
  ``session.update`` are shown to the session's guard (model pinning: a binary frame is
  a JSON event to parsers that take bytes, so it gets the same rule, not a free pass);
* RFC 6455 violations by the client (unmasked or reserved bits, reserved opcodes,
  bad control frames or continuation sequences) close it 1002; a message over
  ``server.max_message_bytes`` 1009 — a fragmented message costs its payloads *and*
  its frames' headers, and may span at most :data:`MAX_FRAGMENTS_PER_MESSAGE` frames
  (both sides are checked by one function, :func:`frame_header`);
* backpressure, not buffering: when one side's transport buffer passes its high-water
  mark the other side's reading is paused until it drains; the client is not read
  either while its *own* buffer is over the mark (what it sends can only add answers
  — pongs, guard refusals — to what it does not read); the gateway's housekeeping
  ends a session whose client stays blocked (``slow_consumer``);
* the first side to end decides the close: an upstream close frame goes to the
  client with its code and reason; an upstream that vanished (reset, EOF, no pong)
  becomes ``error`` + 1011; a client that goes away gets its upstream closed 1001;
  a gateway decision (:meth:`Relay.end`) sends ``error`` + its code.  Close frames
  are written at once and never awaited: a peer that does not answer its closing
  handshake within :data:`CLOSE_TIMEOUT` seconds is aborted — unless it has not even
  read what was written to it (a slow consumer), in which case its connection lingers
  for :data:`LINGER_SECONDS` so it can still read its ``error`` event and close frame.
  The session itself (its lease, its upstream) ends without waiting for that;
* keepalive pings to both sides every ``ping_interval`` seconds; a side that does not
  answer within ``ping_timeout`` is lost.  Pings from either side are answered here:
  the latest ping of each read (RFC 6455 §5.5.3), held while that side's buffer is
  over its mark, so at most one pong is ever pending.

Counters are plain integers published by the session once a second.

Speed: with the C frame scan built (``gateway/_framescan.c``, see :data:`FRAMESCAN`),
each side's reads go first to a C :class:`~gateway._framescan.Receiver` installed as its
``data_received``, which relays a read of whole frames that need no decision under the
same rules, with no Python frame per message; every other read comes to the Python code
below unchanged.  Without it (no C compiler at install time) this module does it all.
"""

from __future__ import annotations

import asyncio
import codecs
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType, ModuleType
from typing import TYPE_CHECKING, Literal, Protocol, cast

from websockets.exceptions import ProtocolError
from websockets.frames import Close, CloseCode, Frame, Opcode

from gateway.errors import UPSTREAM_LOST, SessionEnd
from gateway.guard import GUARDED_BYTES
from gateway.handoff import apply_mask
from gateway.logs import get_logger
from gateway.usage import RESPONSE_DONE_MARKER, TRANSCRIPTION_DONE_MARKER, TokenCounts, tap

if TYPE_CHECKING:
    from gateway._framescan import Receiver

log = get_logger(__name__)

Initiator = Literal["client", "upstream", "gateway"]
Guard = Callable[[bytes], str | None]
"""Inspects a client text message (its UTF-8 bytes) that may be a ``session.update``:
``None`` forwards it, a string is an ``error`` event sent back to the client instead
(the message is dropped)."""

MAX_REASON_BYTES = 123
"""RFC 6455 §5.5: a control frame payload is <= 125 bytes, two of them the code."""
CLIENT_GONE_CODE = CloseCode.GOING_AWAY
CLOSE_TIMEOUT = 2.0
"""Seconds to wait for a peer's closing handshake before the connection is aborted."""
LINGER_SECONDS = 10.0
"""Seconds a peer that has not read its last frames (write buffer not empty when the
closing handshake timed out) is given to read them before the connection is aborted."""
MAX_FRAGMENTS_PER_MESSAGE = 1024
"""Frames one message may span (RFC 6455 §5.4 sets no limit); one more closes 1009.
Browsers and the OpenAI SDKs never fragment a message, ``websockets`` only when asked
to (one frame per chunk of an iterable): this is far above what they send, and bounds
what a fragmented message costs the relay (its frames are held until it is complete)
beyond its bytes, which count toward the size cap with every frame's header."""

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_FIN = 0x80
_RSV = 0x70
_MASKED = 0x80
_GUARDED = GUARDED_BYTES
"""A client message (text or binary) containing either is shown to the guard (``\\u``
because a JSON escape can spell ``session.update`` without those bytes)."""
_RESPONSE_DONE = RESPONSE_DONE_MARKER
_TRANSCRIPTION_DONE = TRANSCRIPTION_DONE_MARKER
_BAD_UTF8 = "invalid UTF-8 in text message"

_NOTHING_LEFT = (b"", 0)
"""What :meth:`_Side.consume` returns when every byte of the read was handled."""

# What a client text message gets (:meth:`_ClientSide._text_verdict`); ``FORWARD`` is 0,
# so the hot path tests it as false.
FORWARD, REFUSED, INVALID = 0, 1, 2


def clip_reason(reason: str) -> str:
    """``reason`` cut to at most 123 UTF-8 bytes on a character boundary."""
    encoded = reason.encode()
    if len(encoded) <= MAX_REASON_BYTES:
        return reason
    return encoded[:MAX_REASON_BYTES].decode("utf-8", "ignore")


class _MaskKeys:
    """Masking keys (RFC 6455 §5.3: unpredictable, from a strong source of entropy),
    read from ``os.urandom`` 4 KiB at a time."""

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def next(self) -> bytes:
        pos = self._pos
        if pos >= len(self._pool):
            self._pool = os.urandom(4096)
            pos = 0
        self._pos = pos + 4
        return self._pool[pos:pos + 4]


_KEYS = _MaskKeys()

_framescan_module: ModuleType | None
try:
    import gateway._framescan as _framescan_module
except ImportError:  # not compiled (see setup.py): the pure-Python frame loop does it all
    _framescan_module = None
FRAMESCAN: ModuleType | None = _framescan_module
"""The C frame scan (``gateway/_framescan.c``) when it was built, else ``None``.  It takes
the runs of frames that need no decision (final data frames under the cap, client text
that is UTF-8 and not for the guard, upstream text that carries no usage) and stops at the
first that does, which the Python loop below then handles as it would without it; tests
set this to ``None`` to run the same cases through the pure-Python loop."""


def encode_frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One final frame of the gateway's own (RFC 6455 §5.2), masked with a fresh key when
    ``mask``; encoded by ``websockets``."""
    return Frame(Opcode(opcode), payload).serialize(mask=mask, extensions=[])


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload (RFC 6455 §5.5.1): none for 1005, else the code and the
    reason clipped to 123 UTF-8 bytes."""
    if code == CloseCode.NO_STATUS_RCVD:
        return b""
    return Close(code, clip_reason(reason)).serialize()


class FrameError(Exception):
    """A peer's frame breaks RFC 6455 or a limit: the connection is failed with ``code``
    (a :class:`~websockets.frames.CloseCode`) and ``reason`` (§7.1.7)."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def frame_header(data: bytes, pos: int, n: int, mask: int, room: int) -> tuple[int, int] | None:
    """The header of the frame at ``data[pos:n]``, checked (RFC 6455 §5.2-§5.5).

    Returns ``(header bytes, masking key included; payload bytes)``, or ``None`` while
    the header is incomplete.  ``mask`` is ``0x80`` when the peer must mask its frames
    (a client, §5.3) and ``0`` when it must not (a server, §5.1); ``room`` is how many
    payload bytes a data frame may carry (what its message may still grow by).

    Raises:
        FrameError: ``PROTOCOL_ERROR`` (1002) for the wrong mask bit, RSV bits (no
            extension is ever negotiated), a reserved opcode, or a control frame that is
            fragmented or over 125 bytes; ``MESSAGE_TOO_BIG`` (1009) for a data frame
            over ``room`` (known from its header, before its payload is read).
    """
    if n - pos < 2:
        return None
    b0 = data[pos]
    b1 = data[pos + 1]
    if b1 & _MASKED != mask:
        raise FrameError(CloseCode.PROTOCOL_ERROR,
                         "unmasked client frame" if mask else "masked server frame")
    if b0 & _RSV:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
    opcode = b0 & 0x0F
    length = b1 & 0x7F
    size = 6 if mask else 2
    if opcode >= OP_CLOSE:
        if opcode > OP_PONG:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved opcode")
        if not b0 & _FIN or length > 125:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "invalid control frame")
        return size, length
    if opcode > OP_BINARY:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved opcode")
    if length == 126:
        if n - pos < 4:
            return None
        size += 2
        length = (data[pos + 2] << 8) | data[pos + 3]
    elif length == 127:
        if n - pos < 10:
            return None
        size += 8
        length = int.from_bytes(data[pos + 2:pos + 10], "big")
    if length > room:
        raise FrameError(CloseCode.MESSAGE_TOO_BIG, "message too big")
    return size, length


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a relayed session ended.

    ``code`` is the close code the client sent (``initiator == "client"``; 1006 when
    it vanished, 1002/1007/1009 when it broke the protocol) or was sent (otherwise);
    the relay's own codes are :class:`~websockets.frames.CloseCode` members (ints).
    ``end`` is the gateway's or the upstream's in-session cause (CONTRACT §5), ``None``
    for ordinary closes.
    """

    initiator: Initiator
    code: int
    reason: str
    end: SessionEnd | None = None


class _Side(asyncio.Protocol):
    """One peer's connection: frame reassembly across reads, flow control, keepalive
    and the closing handshake.  Subclasses interpret the frames (:meth:`consume`)."""

    masked_out = False
    """Whether frames written to this peer are masked (true towards the upstream)."""
    paced_by_own_backlog = False
    """Whether this peer is not read while its own write buffer is over the high-water
    mark (true for the client: what it sends may only add to what it does not read)."""

    def __init__(self, relay: Relay, transport: asyncio.Transport, max_message: int) -> None:
        self.relay = relay
        self.transport = transport
        self.max_message = max_message
        self.peer: _Side
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved when the connection is gone."""
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved when the connection is gone or lingers (the session need not wait)."""
        self.write_paused = False
        self.close_sent = False
        self.fragments = 0
        """Frames of the fragmented message being received (0: none)."""
        self.fragment_cost = 0
        """Bytes of that message so far: payloads and frame headers."""
        self._pong: bytes | None = None
        """The payload of the latest ping not answered yet."""
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self.fast: Receiver | None = None
        """The C receiver that takes this side's reads when it can (:mod:`gateway._framescan`),
        installed as :meth:`data_received` by :class:`Relay`; ``None`` without it."""

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """A read, in Python (with the C frame scan built, only the reads its
        :class:`~gateway._framescan.Receiver` leaves here; see :meth:`sync_fast`)."""
        try:
            self._receive(data)
        finally:
            self.sync_fast()

    def _receive(self, data: bytes) -> None:
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data = b"".join(self._chunks)
            self._chunks = []
        try:
            rest, need = self.consume(data)
        except Exception:  # a bug must end this session, not the process's other ones
            log.exception("relay.internal_error", side=type(self).__name__)
            self.relay.decide(RelayResult("upstream", UPSTREAM_LOST.close_code, "",
                                          UPSTREAM_LOST))
            self.relay.abort_upstream()
            return
        if self._pong is not None:
            self._answer_ping()
        if rest:
            self._chunks = [rest]
            self._have = len(rest)
            self._need = need

    def between_messages(self) -> bool:
        """No fragmented message is being received."""
        raise NotImplementedError

    def sync_fast(self) -> None:
        """Let the C receiver (:attr:`fast`) take the next reads exactly while this side is
        between frames and messages, has no pong pending and the relay forwards; called
        after every state change that decides it (a Python read, a pong sent, the end)."""
        fast = self.fast
        if fast is not None:
            fast.active = (not self._chunks and self._pong is None
                           and self.relay.forwarding and self.between_messages())

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        self.write_paused = True
        self.peer.sync_reading()
        if self.paced_by_own_backlog:
            self.sync_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._pong is not None:
            self._answer_ping()
        self.peer.sync_reading()
        if self.paced_by_own_backlog:
            self.sync_reading()

    def sync_reading(self) -> None:
        """Read this peer unless a write buffer it would add to is over its high-water
        mark: the other peer's, or (:attr:`paced_by_own_backlog`) its own.  Once a close
        frame was sent it is read regardless (its reply must get through)."""
        transport = self.transport
        if transport.is_closing():
            return
        if not self.close_sent and (self.peer.write_paused or (
                self.paced_by_own_backlog and self.write_paused)):
            transport.pause_reading()
        else:
            transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timers()
        self._chunks = []
        self._pong = None
        self.cancel_close_timer()
        for future in (self.closed, self.settled):
            if not future.done():
                future.set_result(None)
        if self.write_paused:
            self.resume_writing()
        self.lost()

    # -- for subclasses and the relay --------------------------------------------------------

    def consume(self, data: bytes) -> tuple[bytes, int]:
        """Handle the complete frames in ``data``; return the incomplete rest and how many
        bytes it needs before it is worth looking at again."""
        raise NotImplementedError

    def lost(self) -> None:
        """The connection is gone (after :meth:`connection_lost` bookkeeping)."""
        raise NotImplementedError

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """Write one frame of the gateway's own (nothing once a close frame was sent)."""
        if not self.close_sent and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload, self.masked_out))

    def _write_close(self, code: int, reason: str) -> None:
        if self._pong is not None:  # answered before the close, even if over the mark
            self.send_frame(OP_PONG, self._pong)
            self._pong = None
        self.close_sent = True
        if not self.transport.is_closing():
            self.transport.write(encode_frame(OP_CLOSE, close_payload(code, reason),
                                              self.masked_out))

    def send_close(self, code: int, reason: str) -> None:
        """Start (or answer) the closing handshake; :meth:`close_expired` runs if the
        connection is not closed within :data:`CLOSE_TIMEOUT` seconds."""
        if self.close_sent or self.transport.is_closing():
            return
        self.stop_timers()
        self._write_close(code, reason)
        self.transport.resume_reading()  # the reply must get through even if paused
        self._close_timer = asyncio.get_running_loop().call_later(
            CLOSE_TIMEOUT, self.close_expired)

    def finish(self) -> None:
        """Close the TCP connection after what was written (the handshake is complete);
        see :meth:`close_expired` for when it does not drain."""
        if self.transport.is_closing():
            return
        self.transport.close()
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT, self.close_expired)

    def close_expired(self) -> None:
        """The closing handshake did not complete in time: linger if the peer has not read
        what was written to it yet (once), else abort."""
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

    def fail(self, code: int, reason: str) -> None:
        """RFC 6455 §7.1.7: send a close frame and drop the connection."""
        self.stop_timers()
        if not self.close_sent:
            self._write_close(code, reason)
        self.finish()

    def on_control(self, opcode: int, payload: bytes) -> bool:
        """Handle a control frame; ``True`` when it was the close frame (read no more)."""
        if opcode == OP_CLOSE:
            self.on_close(payload)
            return True
        if opcode == OP_PING:
            self.on_ping(payload)
        else:
            self.on_pong(payload)
        return False

    def on_close(self, payload: bytes) -> None:
        """The peer's close frame (its payload, not yet parsed)."""
        raise NotImplementedError

    def on_ping(self, payload: bytes) -> None:
        """Note a ping; it is answered after the frames of this read, only the latest of
        them (RFC 6455 §5.5.3), and not while this peer's write buffer is over its
        high-water mark: at most one pong is pending."""
        if not self.close_sent:
            self._pong = payload

    def _answer_ping(self) -> None:
        if not self.write_paused:
            payload, self._pong = self._pong, None
            assert payload is not None
            self.send_frame(OP_PONG, payload)
            self.sync_fast()

    def count_fragment(self, size: int, length: int) -> None:
        """Charge one frame (``size`` header and ``length`` payload bytes) to the
        fragmented message being received.

        Raises:
            FrameError: ``MESSAGE_TOO_BIG`` (1009) when the message spans more than
                :data:`MAX_FRAGMENTS_PER_MESSAGE` frames, or its payloads and headers
                together pass the size cap.
        """
        self.fragments += 1
        self.fragment_cost += size + length
        if self.fragments > MAX_FRAGMENTS_PER_MESSAGE:
            raise FrameError(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
        if self.fragment_cost > self.max_message:
            raise FrameError(CloseCode.MESSAGE_TOO_BIG, "message too big")

    def on_pong(self, payload: bytes) -> None:
        if self._ping_payload is not None and payload == self._ping_payload:
            self._ping_payload = None
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
            self.schedule_ping()

    def schedule_ping(self) -> None:
        interval = self.relay.ping_interval
        if interval is not None and not self.close_sent:
            self._ping_timer = asyncio.get_running_loop().call_later(interval, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self.close_sent or self.transport.is_closing():
            return
        self._ping_payload = _KEYS.next()
        self.send_frame(OP_PING, self._ping_payload)
        timeout = self.relay.ping_timeout
        if timeout is None:
            self.schedule_ping()
        else:
            self._pong_timer = asyncio.get_running_loop().call_later(timeout, self.ping_expired)

    def ping_expired(self) -> None:
        """No pong within ``ping_timeout``: the peer is gone."""
        raise NotImplementedError

    def stop_timers(self) -> None:
        for timer in (self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = None
        self._ping_payload = None

    def cancel_close_timer(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None

    def parse_close(self, payload: bytes) -> tuple[int, str] | None:
        """A close frame's code and reason (``websockets``' parser: RFC 6455 §7.4 codes,
        1005 for an empty payload); ``None`` after failing the connection 1002 (too short,
        a code peers may not send) or 1007 (a reason that is not UTF-8)."""
        try:
            close = Close.parse(payload)
        except UnicodeDecodeError:
            self.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in close reason")
            return None
        except ProtocolError:
            self.fail(CloseCode.PROTOCOL_ERROR, "malformed close frame")
            return None
        return close.code, close.reason


class _ClientSide(_Side):
    """The client's connection: masked frames in, unmasked frames out."""

    paced_by_own_backlog = True

    def __init__(self, relay: Relay, transport: asyncio.Transport, max_message: int,
                 guard: Guard | None) -> None:
        super().__init__(relay, transport, max_message)
        self.guard = guard
        self._guarded = (None, None) if guard is None else _GUARDED
        """What the C frame scan stops at for the guard (nothing without one)."""
        self._fragments: list[tuple[bytes, bytes]] | None = None
        self._fragment_opcode = 0
        self._utf8: codecs.IncrementalDecoder | None = None

    def consume(self, data: bytes) -> tuple[bytes, int]:
        relay = self.relay
        n = len(data)
        pos = 0
        out: list[bytes] = []
        scan = FRAMESCAN
        try:
            while pos < n:
                if scan is not None and self._fragments is None:
                    keys = _KEYS
                    if keys._pos + 4 > len(keys._pool):
                        keys._pool, keys._pos = os.urandom(4096), 0
                    pos, chunk, messages, size, keys._pos = scan.scan_client(
                        data, pos, self.max_message, keys._pool, keys._pos, *self._guarded)
                    if chunk is not None:
                        relay._client_messages += messages
                        relay._client_bytes += size
                        if pos == n and not out:  # the whole read (the common case)
                            if relay.forwarding:
                                relay.upstream_write(chunk)
                            return _NOTHING_LEFT
                        out.append(chunk)
                    if pos >= n:
                        break
                header = frame_header(data, pos, n, _MASKED,
                                      self.max_message - self.fragment_cost)
                if header is None:
                    break
                size, length = header
                end = pos + size + length
                if end > n:
                    return self._flush(out, data[pos:], end - pos)
                b0 = data[pos]
                opcode = b0 & 0x0F
                payload = apply_mask(data[pos + size:end], data[pos + size - 4:pos + size])
                if opcode == OP_TEXT or opcode == OP_BINARY:  # noqa: SIM109 - no tuple per frame
                    if self._fragments is not None:
                        raise FrameError(CloseCode.PROTOCOL_ERROR,
                                         "new message inside a fragmented one")
                    if b0 & _FIN:
                        verdict = (self._text_verdict(payload) if opcode == OP_TEXT
                                   else self._guard_verdict(payload))
                        if verdict:
                            if verdict == INVALID:
                                raise FrameError(CloseCode.INVALID_DATA, _BAD_UTF8)
                            pos = end
                            continue
                        key = _KEYS.next()
                        out.append(data[pos:pos + size - 4])
                        out.append(key)
                        out.append(apply_mask(payload, key))
                        relay._client_messages += 1
                        relay._client_bytes += length
                    else:
                        self.count_fragment(size, length)
                        self._fragments = [(data[pos:pos + size - 4], payload)]
                        self._fragment_opcode = opcode
                        if opcode == OP_TEXT:
                            self._utf8 = codecs.getincrementaldecoder("utf-8")()
                            self._decode(payload, final=False)
                elif opcode == OP_CONT:
                    if self._fragments is None:
                        raise FrameError(CloseCode.PROTOCOL_ERROR,
                                         "continuation without a message")
                    self.count_fragment(size, length)
                    self._fragments.append((data[pos:pos + size - 4], payload))
                    if self._utf8 is not None:
                        self._decode(payload, final=bool(b0 & _FIN))
                    if b0 & _FIN:
                        self._fragmented_message_ends(out)
                else:  # a control frame
                    if opcode == OP_CLOSE:
                        self._flush(out, b"", 0)  # what came before goes first
                    if self.on_control(opcode, payload):
                        return b"", 0
                pos = end
        except FrameError as error:
            self._flush(out, b"", 0)  # what came before the bad frame is relayed
            self.fail(error.code, error.reason)
            self.relay.decide(RelayResult("client", error.code, error.reason))
            return b"", 0
        return self._flush(out, data[pos:] if pos < n else b"", 0 if pos >= n else n - pos + 1)

    def _flush(self, out: list[bytes], rest: bytes, need: int) -> tuple[bytes, int]:
        if out:
            if self.relay.forwarding:
                self.relay.upstream_write(b"".join(out))
            out.clear()
        return rest, need

    def _decode(self, payload: bytes, *, final: bool) -> None:
        """Feed one fragment of a text message to its UTF-8 decoder; raises
        :class:`FrameError` (1007) when it is not UTF-8."""
        assert self._utf8 is not None
        try:
            self._utf8.decode(payload, final)
        except UnicodeDecodeError:
            raise FrameError(CloseCode.INVALID_DATA, _BAD_UTF8) from None

    def _text_verdict(self, payload: bytes) -> int:
        """UTF-8 check and model pinning for one complete text message: :data:`FORWARD`
        (0); :data:`REFUSED` by the guard, whose ``error`` event is sent to the client
        here (the message is dropped, the session goes on); :data:`INVALID` UTF-8 (the
        caller closes the client 1007)."""
        if not payload.isascii():
            try:
                payload.decode()
            except UnicodeDecodeError:
                return INVALID
        return self._guard_verdict(payload)

    def _guard_verdict(self, payload: bytes) -> int:
        """Model pinning for one complete client message, text or binary (a binary frame
        holding a ``session.update`` is one to parsers that take bytes): :data:`FORWARD`
        (0) or :data:`REFUSED`, the guard's ``error`` event sent to the client here."""
        guard = self.guard
        if guard is not None and (_GUARDED[0] in payload or _GUARDED[1] in payload):
            refusal = guard(payload)
            if refusal is not None:
                self.send_frame(OP_TEXT, refusal.encode())
                return REFUSED
        return FORWARD

    def between_messages(self) -> bool:
        return self._fragments is None

    def _fragmented_message_ends(self, out: list[bytes]) -> None:
        fragments = self._fragments
        assert fragments is not None
        self._fragments = None
        self.fragments = self.fragment_cost = 0
        self._utf8 = None
        message = b"".join(payload for _, payload in fragments)
        verdict = (self._text_verdict(message) if self._fragment_opcode == OP_TEXT
                   else self._guard_verdict(message))
        if verdict == INVALID:  # the decoder passed each fragment: cannot happen
            raise FrameError(CloseCode.INVALID_DATA, _BAD_UTF8)
        if verdict == REFUSED:
            return
        total = 0
        for head, payload in fragments:
            key = _KEYS.next()
            out.append(head)
            out.append(key)
            out.append(apply_mask(payload, key))
            total += len(payload)
        self.relay._client_messages += 1
        self.relay._client_bytes += total

    def on_close(self, payload: bytes) -> None:
        parsed = self.parse_close(payload)
        if parsed is None:
            self.relay.decide(RelayResult("client", CloseCode.PROTOCOL_ERROR,
                                          "malformed close frame"))
            return
        code, reason = parsed
        if not self.close_sent:  # the client starts the closing handshake: answer it
            self.send_close(code, reason)
        self.finish()
        self.relay.decide(RelayResult("client", code, reason))

    def lost(self) -> None:
        self.relay.decide(RelayResult("client", CloseCode.ABNORMAL_CLOSURE, ""))

    def ping_expired(self) -> None:
        self._pong_timer = None
        self.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        self.relay.decide(RelayResult("client", CloseCode.ABNORMAL_CLOSURE,
                                      "keepalive ping timeout"))


class _UpstreamSide(_Side):
    """The upstream's connection: unmasked frames in, masked frames out."""

    masked_out = True

    def __init__(self, relay: Relay, transport: asyncio.Transport, max_message: int) -> None:
        super().__init__(relay, transport, max_message)
        self._in_message = False
        self._message_bytes = 0
        self._text: list[bytes] | None = None

    def consume(self, data: bytes) -> tuple[bytes, int]:
        relay = self.relay
        n = len(data)
        pos = 0
        run = 0  # start of the data frames not yet written to the client
        scan = FRAMESCAN
        try:
            while pos < n:
                if scan is not None and not self._in_message:
                    pos, messages, size = scan.scan_upstream(
                        data, pos, self.max_message, _RESPONSE_DONE, _TRANSCRIPTION_DONE)
                    relay._upstream_messages += messages
                    relay._upstream_bytes += size
                    if pos == n and run == 0:  # the whole read (the common case)
                        if relay.forwarding:
                            relay.client_write(data)
                        return _NOTHING_LEFT
                    if pos >= n:
                        break
                header = frame_header(data, pos, n, 0, self.max_message - self.fragment_cost)
                if header is None:
                    break
                size, length = header
                end = pos + size + length
                if end > n:
                    self._write(data, run, pos)
                    return data[pos:], end - pos
                b0 = data[pos]
                opcode = b0 & 0x0F
                if opcode == OP_TEXT or opcode == OP_BINARY:  # noqa: SIM109 - no tuple per frame
                    if self._in_message:
                        raise FrameError(CloseCode.PROTOCOL_ERROR,
                                         "new message inside a fragmented one")
                    if b0 & _FIN:
                        relay._upstream_messages += 1
                        relay._upstream_bytes += length
                        if opcode == OP_TEXT and (
                                data.find(_RESPONSE_DONE, pos + size, end) >= 0
                                or data.find(_TRANSCRIPTION_DONE, pos + size, end) >= 0):
                            usage = tap(data[pos + size:end])
                            if usage is not None:
                                relay.on_usage(usage)
                    else:
                        self.count_fragment(size, length)
                        self._in_message = True
                        self._message_bytes = length
                        self._text = [data[pos + size:end]] if opcode == OP_TEXT else None
                elif opcode == OP_CONT:
                    if not self._in_message:
                        raise FrameError(CloseCode.PROTOCOL_ERROR,
                                         "continuation without a message")
                    self.count_fragment(size, length)
                    self._message_bytes += length
                    if self._text is not None:
                        self._text.append(data[pos + size:end])
                    if b0 & _FIN:
                        self._message_ends()
                else:  # a control frame: not forwarded
                    self._write(data, run, pos)
                    run = end
                    if self.on_control(opcode, data[pos + size:end]):
                        return b"", 0
                pos = end
        except FrameError as error:
            self._write(data, run, pos)  # what came before the bad frame is relayed
            self.fail(error.code, error.reason)
            relay.decide(RelayResult("upstream", UPSTREAM_LOST.close_code, "", UPSTREAM_LOST))
            return b"", 0
        self._write(data, run, pos)
        return (data[pos:], n - pos + 1) if pos < n else (b"", 0)

    def _write(self, data: bytes, start: int, end: int) -> None:
        if start < end and self.relay.forwarding:
            self.relay.client_write(data if start == 0 and end == len(data) else data[start:end])

    def between_messages(self) -> bool:
        return not self._in_message

    def _message_ends(self) -> None:
        relay = self.relay
        relay._upstream_messages += 1
        relay._upstream_bytes += self._message_bytes
        if self._text is not None:
            usage = tap(b"".join(self._text))
            if usage is not None:
                relay.on_usage(usage)
        self._in_message = False
        self._message_bytes = 0
        self.fragments = self.fragment_cost = 0
        self._text = None

    def on_close(self, payload: bytes) -> None:
        parsed = self.parse_close(payload)
        if parsed is None:
            self.relay.decide(RelayResult("upstream", UPSTREAM_LOST.close_code, "",
                                          UPSTREAM_LOST))
            return
        code, reason = parsed
        if not self.close_sent:
            self.send_close(code, reason)
        self.finish()
        if code in (CloseCode.NO_STATUS_RCVD, CloseCode.ABNORMAL_CLOSURE,
                    CloseCode.TLS_HANDSHAKE):  # none given, or one no frame may carry
            code = CloseCode.NORMAL_CLOSURE
        self.relay.decide(RelayResult("upstream", code, clip_reason(reason)))

    def lost(self) -> None:
        self.relay.decide(RelayResult("upstream", UPSTREAM_LOST.close_code, "", UPSTREAM_LOST))

    def ping_expired(self) -> None:
        self._pong_timer = None
        self.transport.abort()


class PeerSide(Protocol):
    """What :func:`take_over` and :func:`run_until_settled` need of one side's protocol
    (:class:`_Side` here, the translating relay's sides in :mod:`gateway.beta_relay`)."""

    transport: asyncio.Transport
    settled: asyncio.Future[None]

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def schedule_ping(self) -> None: ...

    def stop_timers(self) -> None: ...

    def cancel_close_timer(self) -> None: ...


def take_over(client: PeerSide, upstream: PeerSide, buffered: bytes, lost: bool) -> None:
    """Make ``client`` and ``upstream`` their transports' protocols and resume reading,
    feed the upstream's ``buffered`` bytes (received after its 101, before the hand-off)
    first, and report a connection already gone (``lost``: the upstream's).  Call it before
    yielding to the event loop, so that nothing is read by the previous protocols."""
    for side in (client, upstream):
        side.transport.set_protocol(cast(asyncio.BaseProtocol, side))
        if not side.transport.is_closing():
            side.transport.resume_reading()
    if buffered:
        upstream.data_received(buffered)
    for side in (client, upstream):
        if side.transport.is_closing() or (side is upstream and lost):
            side.connection_lost(None)


async def run_until_settled(result: asyncio.Future[RelayResult], client: PeerSide,
                            upstream: PeerSide,
                            decided: Callable[[], None] = lambda: None) -> RelayResult:
    """Ping both sides, wait for ``result`` (``decided`` runs then), then at most
    twice :data:`CLOSE_TIMEOUT` seconds for both connections to be gone or lingering; abort
    what is left.  A cancellation aborts both connections and is re-raised."""
    try:
        client.schedule_ping()
        upstream.schedule_ping()
        ending = await result
        decided()
        await asyncio.wait((client.settled, upstream.settled), timeout=CLOSE_TIMEOUT * 2)
    except asyncio.CancelledError:
        client.transport.abort()
        upstream.transport.abort()
        raise
    finally:
        for side in (client, upstream):
            side.stop_timers()
            if not side.settled.done():
                side.cancel_close_timer()
                side.transport.abort()
    return ending


class Relay:
    """Relays one session until either side closes or :meth:`end` is called.

    ``client`` and ``upstream`` are the two connected transports (TCP or TLS) right
    after the upgrade.  The constructor only builds state; :meth:`start` takes the
    transports over (call it at once, before yielding to the event loop), and
    :meth:`run` waits for the end.  ``upstream_buffered`` are bytes the upstream sent
    after its 101 before the hand-off (frames, not yet read); ``upstream_lost`` says
    the upstream connection was already lost then.

    Public counters (read by the gateway's housekeeping, never reset):
    ``client_messages``/``client_bytes`` (client → upstream, forwarded) and
    ``upstream_messages``/``upstream_bytes`` (upstream → client); bytes are payload
    bytes.  :attr:`sending_to_client`/:attr:`sending_to_upstream` are true while that
    side's transport is over its high-water mark (for the send deadline).

    Args:
        max_client_message: bytes; a larger client message closes the client 1009
            (a fragmented one counts its frame headers too; see
            :data:`MAX_FRAGMENTS_PER_MESSAGE` for the cap on its frames).
        max_upstream_message: bytes, the same for upstream messages; the upstream is
            failed 1009 and the client gets ``upstream_error`` + 1011.
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
        self._client_messages = 0
        self._client_bytes = 0
        self._upstream_messages = 0
        self._upstream_bytes = 0
        self.forwarding = True
        self._result: asyncio.Future[RelayResult] = (
            asyncio.get_running_loop().create_future())
        self._client = _ClientSide(self, client, max_client_message, guard)
        self._upstream = _UpstreamSide(self, upstream, max_upstream_message)
        self._client.peer = self._upstream
        self._upstream.peer = self._client
        self.client_write = client.write
        self.upstream_write = upstream.write
        scan = FRAMESCAN
        if scan is not None:  # each side's reads go to C first (gateway/_framescan.c)
            self._client.fast = scan.Receiver(
                MethodType(_Side.data_received, self._client), upstream.write, True,
                max_client_message, *self._client._guarded, os.urandom)
            self._upstream.fast = scan.Receiver(
                MethodType(_Side.data_received, self._upstream), client.write, False,
                max_upstream_message, _RESPONSE_DONE, _TRANSCRIPTION_DONE, os.urandom)
            for side in (self._client, self._upstream):
                setattr(side, "data_received", side.fast)  # noqa: B010 - shadows the method
                side.sync_fast()
        self._upstream_buffered = upstream_buffered
        self._upstream_lost = upstream_lost
        self._started = False

    def start(self) -> None:
        """Take both connections over: become their protocol, resume their reading, relay
        ``upstream_buffered`` and report a connection that is already gone.

        Call it once, right after the constructor and before yielding to the event loop
        (so that nothing is read by the transports' previous protocols and the buffered
        upstream bytes come first), then :meth:`run`.  It may already decide the end
        (a buffered close frame, a lost connection): :meth:`run` then returns it.

        Raises:
            RuntimeError: when called a second time.
        """
        if self._started:
            raise RuntimeError("Relay.start() called twice")
        self._started = True
        buffered, self._upstream_buffered = self._upstream_buffered, b""
        take_over(self._client, self._upstream, buffered, self._upstream_lost)

    @property
    def client_messages(self) -> int:
        fast = self._client.fast
        return self._client_messages + (fast.messages if fast is not None else 0)

    @property
    def client_bytes(self) -> int:
        fast = self._client.fast
        return self._client_bytes + (fast.payload_bytes if fast is not None else 0)

    @property
    def upstream_messages(self) -> int:
        fast = self._upstream.fast
        return self._upstream_messages + (fast.messages if fast is not None else 0)

    @property
    def upstream_bytes(self) -> int:
        fast = self._upstream.fast
        return self._upstream_bytes + (fast.payload_bytes if fast is not None else 0)

    @property
    def sending_to_client(self) -> bool:
        return self._client.write_paused

    @property
    def sending_to_upstream(self) -> bool:
        return self._upstream.write_paused

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
        self._client.sync_fast()
        self._upstream.sync_fast()
        client, upstream = self._client, self._upstream
        if result.initiator == "client":
            upstream.send_close(CLIENT_GONE_CODE, "client went away")
            return
        # The upstream closed or failed (it closes itself), or the gateway decided.
        if result.end is None:
            client.send_close(result.code, result.reason)
        else:
            client.send_frame(OP_TEXT, result.end.error_event().encode())
            client.send_close(result.end.close_code, result.end.code)
        if result.initiator == "gateway":
            upstream.send_close(CLIENT_GONE_CODE, "session ended by the gateway")

    async def run(self) -> RelayResult:
        """Relay until the session ends and both connections are closed; return how it
        ended.  Never raises for peer behaviour; a cancelled :meth:`run` aborts both
        connections before re-raising.

        Raises:
            RuntimeError: :meth:`start` was not called (both connections are aborted).
        """
        client, upstream = self._client, self._upstream
        if not self._started:
            client.transport.abort()
            upstream.transport.abort()
            raise RuntimeError("Relay.run() before Relay.start()")
        return await run_until_settled(self._result, client, upstream)
