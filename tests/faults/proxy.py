"""Wire-level tools for fault tests: a TCP fault proxy and a hand-written WebSocket client.

:class:`FaultProxy` is an asyncio TCP proxy on 127.0.0.1 (port 0) that sits between a
client (the gateway, or a test client) and a target (the upstream emulator, Redis, the
identity provider, or the gateway itself) and produces network faults for real, at
any moment, on new and on live connections:

=====================  =====================================================================
``refuse()``           stop listening: new connections are refused (RST to the SYN)
``black_hole()``       accept and read, never forward, never answer (a dead or firewalled peer)
``stall()``            stop moving bytes (held in kernel buffers, so backpressure reaches the
                       sender); :meth:`FaultProxy.heal` delivers them
``throttle(rate)``     forward at most ``rate`` bytes per second in each direction
``cut_after(n, dir)``  forward ``n`` more bytes in direction ``dir`` (``"down"``: target →
                       client, ``"up"``: client → target), then reset both sides: a cut in the
                       middle of a frame when ``n`` falls inside one
``reset_all()``        reset every live connection now (TCP RST, no FIN, no close frame)
``heal()``             back to a plain proxy (listening again after ``refuse``)
=====================  =====================================================================

:class:`RawWebSocket` speaks RFC 6455 by hand over a plain socket so tests can send what
no well-behaved library sends: unmasked client frames, reserved bits, unknown opcodes,
invalid UTF-8 in text frames, and an upgrade request trickled one byte at a time.

Every wait is bounded by the caller; nothing here sleeps except to produce the fault
itself (the byte rate of :meth:`FaultProxy.throttle`, the trickle of
:meth:`RawWebSocket.trickle`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Self

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

Direction = Literal["up", "down"]
"""``"up"``: client → target; ``"down"``: target → client."""
Mode = Literal["pass", "black_hole"]

HOST = "127.0.0.1"
CHUNK_BYTES = 65536
THROTTLE_TICK_SECONDS = 0.05


def reset(transport: asyncio.BaseTransport) -> None:
    """Close ``transport``'s socket with a TCP RST (``SO_LINGER`` 0), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if isinstance(transport, asyncio.WriteTransport | asyncio.Transport):
        transport.abort()
    else:
        transport.close()


@dataclass(eq=False)
class Link:
    """One proxied connection.

    ``bytes_up``/``bytes_down`` count bytes forwarded (client → target, target → client);
    ``closed`` is set once both sides are gone.  ``target_writer`` is ``None`` for a
    connection accepted while black-holed (never connected to the target).
    """

    client_writer: asyncio.StreamWriter
    target_writer: asyncio.StreamWriter | None
    bytes_up: int = 0
    bytes_down: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        """RST both sides now."""
        reset(self.client_writer.transport)
        if self.target_writer is not None:
            reset(self.target_writer.transport)


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target`` that injects faults on demand.

    Use as ``async with FaultProxy(("127.0.0.1", port)) as proxy:``; :attr:`port` is the
    port to dial instead of the target's.  :attr:`accepted` counts accepted connections,
    :attr:`links` holds the live ones.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.accepted = 0
        self.links: list[Link] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._mode: Mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._rate: float | None = None
        self._cut: dict[Direction, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> Self:
        """Listen on a free loopback port (kept for :meth:`heal` after :meth:`refuse`)."""
        await self._listen()
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening and reset every live connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._flowing.set()
        for link in list(self.links):
            link.reset()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- faults --------------------------------------------------------------------------

    async def refuse(self) -> None:
        """Stop listening: connecting now fails with "connection refused".  Live links stay."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def black_hole(self) -> None:
        """From now on nothing is forwarded in either direction; bytes are read and dropped.

        New connections are accepted (the TCP handshake completes) but never reach the
        target, so the client waits for an answer that never comes.
        """
        self._mode = "black_hole"

    def stall(self) -> None:
        """Stop reading and forwarding on every link (bytes wait in kernel buffers)."""
        self._flowing.clear()

    def throttle(self, bytes_per_second: float) -> None:
        """Forward at most ``bytes_per_second`` in each direction of each link."""
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self._rate = bytes_per_second

    def cut_after(self, n_bytes: int, direction: Direction = "down") -> None:
        """Forward ``n_bytes`` more in ``direction`` (on whichever link carries them), then
        reset both sides of that link."""
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        self._cut[direction] = n_bytes

    def reset_all(self) -> None:
        """RST every live link at once."""
        for link in list(self.links):
            link.reset()

    async def heal(self) -> None:
        """Undo every fault: forward everything at full speed, listen again if refused."""
        self._mode = "pass"
        self._rate = None
        self._cut.clear()
        self._flowing.set()
        if self._server is None:
            await self._listen()

    # -- plumbing ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link: Link | None = None
        try:
            if self._mode == "black_hole":
                link = Link(writer, None)
                self.links.append(link)
                await self._swallow(reader)
                return
            try:
                target_reader, target_writer = await asyncio.open_connection(*self.target)
            except OSError:
                reset(writer.transport)
                return
            link = Link(writer, target_writer)
            self.links.append(link)
            await asyncio.gather(
                self._pump(link, "up", reader, target_writer),
                self._pump(link, "down", target_reader, writer),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if link is not None:
                with contextlib.suppress(ValueError):
                    self.links.remove(link)
                link.closed.set()
                if link.target_writer is not None:
                    link.target_writer.transport.abort()
            writer.transport.abort()
            self._tasks.discard(task)

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        while await reader.read(CHUNK_BYTES):
            pass

    async def _pump(self, link: Link, direction: Direction, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                if self._mode == "black_hole":
                    await self._swallow(reader)
                    return
                await self._forward(link, direction, data, writer)
        except (OSError, asyncio.IncompleteReadError):
            link.reset()

    async def _forward(self, link: Link, direction: Direction, data: bytes,
                       writer: asyncio.StreamWriter) -> None:
        view = memoryview(data)
        while view:
            await self._flowing.wait()
            if self._mode == "black_hole":
                return
            piece = view
            if self._rate is not None:
                piece = view[:max(1, int(self._rate * THROTTLE_TICK_SECONDS))]
            budget = self._cut.get(direction)
            if budget is not None and len(piece) >= budget:
                writer.write(bytes(piece[:budget]))
                with contextlib.suppress(OSError):
                    await writer.drain()
                del self._cut[direction]
                link.reset()
                raise ConnectionResetError("cut by the fault proxy")
            if budget is not None:
                self._cut[direction] = budget - len(piece)
            writer.write(bytes(piece))
            await writer.drain()
            if direction == "up":
                link.bytes_up += len(piece)
            else:
                link.bytes_down += len(piece)
            view = view[len(piece):]
            if self._rate is not None:
                await asyncio.sleep(len(piece) / self._rate)  # the byte rate is the fault


# -- a WebSocket client that can misbehave ---------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
                 mask: bool = True) -> bytes:
    """One RFC 6455 §5.2 frame.  ``rsv`` is the 3 reserved bits (0..7); ``mask=False``
    makes the unmasked client frame a server must refuse (§5.1)."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head.append(mask_bit | length)
    elif length < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", length)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if length < 4096 else \
        _mask_fast(payload, key)
    return bytes(head) + key + masked


def _mask_fast(payload: bytes, key: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big")


@dataclass
class HttpResponse:
    """The server's answer to the upgrade request: status, lower-case headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes


class RawWebSocket:
    """A client connection whose every byte the test chooses.

    :meth:`open` sends the upgrade request and reads the response head;
    :meth:`send_frame` writes any frame; :meth:`read_frame` returns server frames
    (``(opcode, payload)``); :meth:`close_frame` reads until the close frame.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.response: HttpResponse | None = None

    @classmethod
    async def connect(cls, port: int) -> RawWebSocket:
        """A TCP connection to the gateway on ``127.0.0.1:<port>``; nothing sent yet."""
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    @staticmethod
    def upgrade_request(path: str, headers: dict[str, str]) -> bytes:
        """The bytes of a WebSocket upgrade request (RFC 6455 §4.1) for ``path``."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def open(self, path: str, headers: dict[str, str]) -> HttpResponse:
        """Send the upgrade request at once and read the response head (and a refusal's body)."""
        self.writer.write(self.upgrade_request(path, headers))
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        parsed: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                parsed[name.strip().lower()] = value.strip()
        body = b""
        if status != 101 and parsed.get("content-length", "0").isdigit():
            body = await self.reader.readexactly(int(parsed.get("content-length", "0")))
        self.response = HttpResponse(status, parsed, body)
        return self.response

    async def trickle(self, data: bytes, seconds_per_byte: float) -> int:
        """Write ``data`` one byte at a time, ``seconds_per_byte`` apart (the slowloris
        fault), until it is all sent or the server closes; returns the bytes written."""
        for index in range(len(data)):
            if self.reader.at_eof() or self.writer.is_closing():
                return index
            try:
                self.writer.write(data[index:index + 1])
                await self.writer.drain()
            except OSError:
                return index
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds_per_byte):
                    await self.reader.read(1)  # EOF (the server hung up) ends the wait early
        return len(data)

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
                   mask: bool = True) -> None:
        """Write one frame (see :func:`encode_frame`)."""
        self.writer.write(encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask))

    async def read_frame(self) -> tuple[int, bytes]:
        """The next server frame as ``(opcode, payload)``; ``IncompleteReadError`` at EOF."""
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        key = await self.reader.readexactly(4) if second & 0x80 else b""
        payload = await self.reader.readexactly(length)
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return first & 0x0F, payload

    async def close_frame(self) -> tuple[int, str] | None:
        """Read frames until the server's close frame: ``(code, reason)``, or ``None`` when
        the connection ends without one."""
        while True:
            try:
                opcode, payload = await self.read_frame()
            except (asyncio.IncompleteReadError, OSError):
                return None
            if opcode == OP_CLOSE:
                if len(payload) < 2:
                    return (1005, "")
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")

    def abort(self) -> None:
        """Drop the connection (no close frame)."""
        self.writer.transport.abort()


# -- stand-in upstreams ----------------------------------------------------------------------

class ScriptedUpstream:
    """A WebSocket server on 127.0.0.1 (port 0) whose per-connection behaviour is
    ``script(connection)``: an upstream that floods, sends an oversize event, or anything
    the emulator does not do.  :attr:`connections` holds every accepted connection and
    :attr:`finished` counts handlers that returned (the connection is then closed)."""

    def __init__(self, script: Callable[[ServerConnection], Awaitable[None]]) -> None:
        self._script = script
        self._server: Server | None = None
        self.connections: list[ServerConnection] = []
        self.finished = 0

    async def _handle(self, connection: ServerConnection) -> None:
        self.connections.append(connection)
        try:
            await self._script(connection)
        except ConnectionClosed:
            pass
        finally:
            self.finished += 1

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:<port>/v1/realtime``."""
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://{HOST}:{port}/v1/realtime"

    async def __aenter__(self) -> Self:
        self._server = await serve(self._handle, HOST, 0, max_size=None, compression=None,
                                   ping_interval=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        async with asyncio.timeout(10):
            await self._server.wait_closed()


class CannedServer:
    """A TCP server on 127.0.0.1 that reads one request head and answers with fixed bytes
    (e.g. a ``101`` without a valid ``Sec-WebSocket-Accept``), then holds the connection
    until the peer closes it.  :attr:`requests` counts request heads read."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(self.response)
            await writer.drain()
            while await reader.read(CHUNK_BYTES):
                pass
        writer.transport.abort()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
