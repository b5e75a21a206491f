"""A :class:`gateway.relay.Relay` between two real loopback TCP connections.

For relay tests that need a kernel socket (backpressure, floods, memory): the relay's
two ends are accepted transports, paused as the hand-off leaves them
(:meth:`gateway.server.GatewayWebSocketProtocol.hand_off`); the two peers are plain
non-blocking sockets driven with the loop's ``sock_*`` calls, so the peers keep no
buffer of their own in the test process (what it holds is the relay's), and their
socket buffers can be made small so that backpressure starts at once.

Frames the peers receive are parsed by ``websockets``' Sans-I/O protocol, an RFC 6455
parser independent of the relay's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from websockets.frames import Close, Frame, Opcode
from websockets.protocol import CLIENT, SERVER, Protocol

from gateway.relay import Guard, Relay, RelayResult
from gateway.usage import TokenCounts

HOST = "127.0.0.1"
READ_BYTES = 1 << 16


@contextlib.contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """Trace allocations in the block (``tracemalloc``); the function returns the peak of
    traced bytes so far.  What was allocated before the block is not counted."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class _Accepted(asyncio.Protocol):
    """Holds an accepted connection with reading paused, for the relay to take over."""

    def __init__(self, accepted: asyncio.Queue[asyncio.Transport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.accepted.put_nowait(transport)


class Peer:
    """One end of a relayed connection as its peer sees it: a non-blocking socket whose
    received frames are parsed by ``websockets``, which also answers them while
    :meth:`read` runs (pongs, the closing handshake), as a ``websockets`` peer would."""

    def __init__(self, sock: socket.socket, *, is_client: bool) -> None:
        self.sock = sock
        self.parser = Protocol(CLIENT if is_client else SERVER, max_size=None)
        self.frames: list[Frame] = []
        self.eof = False

    async def send(self, data: bytes | memoryview, within: float = 30.0) -> None:
        """Write all of ``data`` (waits while the relay does not read);
        :class:`TimeoutError` after ``within`` seconds."""
        async with asyncio.timeout(within):
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read(self, until: Callable[[list[Frame]], bool], within: float = 10.0) -> None:
        """Read and parse until ``until(self.frames)`` holds or the connection ends;
        :class:`TimeoutError` after ``within`` seconds."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            while not until(self.frames) and not self.eof:
                try:
                    data = await loop.sock_recv(self.sock, READ_BYTES)
                except ConnectionError:
                    data = b""
                if not data:
                    self.eof = True
                    self.parser.receive_eof()
                else:
                    self.parser.receive_data(data)
                assert self.parser.parser_exc is None, self.parser.parser_exc
                self.frames.extend(event for event in self.parser.events_received()
                                   if isinstance(event, Frame))
                for answer in self.parser.data_to_send():
                    if answer:  # b"": websockets' signal to half-close; not needed here
                        with contextlib.suppress(ConnectionError):
                            await loop.sock_sendall(self.sock, answer)

    async def close_code(self, within: float = 10.0) -> int | None:
        """Read until the close frame; its code (``None`` if the connection ends without)."""
        await self.read(lambda frames: any(f.opcode == Opcode.CLOSE for f in frames), within)
        for frame in self.frames:
            if frame.opcode == Opcode.CLOSE:
                return Close.parse(bytes(frame.data)).code
        return None

    def data_frames(self) -> list[tuple[Opcode, bool, bytes]]:
        """``(opcode, fin, payload)`` of the data frames received so far."""
        return [(f.opcode, f.fin, bytes(f.data)) for f in self.frames
                if f.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)]


@dataclass
class LoopbackRelay:
    """A started relay: its two peers, its two transports and its :meth:`Relay.run` task."""

    relay: Relay
    client: Peer
    upstream: Peer
    client_transport: asyncio.Transport
    """The relay's end of the client connection."""
    upstream_transport: asyncio.Transport
    task: asyncio.Task[RelayResult]
    usage: list[TokenCounts] = field(default_factory=list)

    async def result(self, within: float = 10.0) -> RelayResult:
        async with asyncio.timeout(within):
            return await asyncio.shield(self.task)


SMALL_BUFFER = 4096
"""Bytes of each kernel socket buffer with ``small_buffers`` (Linux doubles it)."""


def _socket(small_buffers: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if small_buffers:  # before connect/listen, so that the TCP window starts small
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SMALL_BUFFER)
    return sock


@contextlib.asynccontextmanager
async def loopback_relay(*, guard: Guard | None = None, max_message: int = 1 << 20,
                         ping_interval: float | None = None,
                         small_buffers: bool = False) -> AsyncIterator[LoopbackRelay]:
    """A relay over two fresh loopback connections until the block exits.

    ``small_buffers`` shrinks every kernel socket buffer of both connections to a few
    KiB, so that a peer that does not read makes the relay's transport pass its
    high-water mark at once, and a relay that does not read blocks its peer's sends.
    """
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    listener = _socket(small_buffers)  # accepted sockets inherit its buffer sizes
    listener.bind((HOST, 0))
    server = await loop.create_server(lambda: _Accepted(accepted), sock=listener)
    port = listener.getsockname()[1]
    socks: list[socket.socket] = []
    transports: list[asyncio.Transport] = []
    try:
        for _ in range(2):  # the client's connection first, then the upstream's
            sock = _socket(small_buffers)
            socks.append(sock)
            await loop.sock_connect(sock, (HOST, port))
            async with asyncio.timeout(5):
                transports.append(await accepted.get())
        usage: list[TokenCounts] = []
        relay = Relay(transports[0], transports[1], usage.append, guard,
                      max_client_message=max_message, max_upstream_message=max_message,
                      ping_interval=ping_interval, ping_timeout=ping_interval)
        relay.start()
        task = asyncio.create_task(relay.run())
        try:
            yield LoopbackRelay(relay, Peer(socks[0], is_client=True),
                                Peer(socks[1], is_client=False), transports[0],
                                transports[1], task, usage)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        for transport in transports:
            transport.abort()
        for sock in socks:
            sock.close()
        server.close()
        await server.wait_closed()
