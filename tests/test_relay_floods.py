"""Hostile clients after the 101, against a relay on real loopback sockets.

Memory is what the test process allocates while the relay works (``tracemalloc``); the
peers are plain sockets (:mod:`tests.support.relay`), so that is the relay's.  Bounds
are far below what the relay held before the fixes (numbers in each test).
"""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import Callable, Iterator

from websockets.frames import Close, Frame, Opcode

from gateway.relay import MAX_FRAGMENTS_PER_MESSAGE
from tests.support.relay import Peer, loopback_relay

EMPTY_CONTINUATION = bytes((0x00, 0x80, 0, 0, 0, 0))
"""A masked continuation frame with ``fin=0`` and no payload (6 bytes, key 0)."""
KiB, MiB = 1024, 1024 * 1024


def masked(*frames: Frame) -> bytes:
    return b"".join(frame.serialize(mask=True, extensions=[]) for frame in frames)


def unmasked(*frames: Frame) -> bytes:
    return b"".join(frame.serialize(mask=False, extensions=[]) for frame in frames)


@contextlib.contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """Trace allocations in the block; the function returns the peak traced bytes so far
    (what was allocated before the block is not counted)."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def send_until_closed(peer: Peer, data: bytes) -> None:
    """Send ``data``; the relay may close the connection before it has read it all."""
    with contextlib.suppress(ConnectionError):
        await peer.send(data)


def controls(peer: Peer, opcode: Opcode) -> list[bytes]:
    return [bytes(f.data) for f in peer.frames if f.opcode == opcode]


async def test_a_fragment_flood_is_closed_1009_holding_little_memory() -> None:
    """A text message opened with ``fin=0`` and followed by 200,000 empty continuations
    (1.2 MB on the wire): closed 1009 once it spans more than
    :data:`MAX_FRAGMENTS_PER_MESSAGE` frames; nothing of it reaches the upstream.  Before
    the cap the relay kept a header and a payload per fragment (about 20 MB for this
    flood, traced) and answered the ping that follows it."""
    flood = (masked(Frame(Opcode.TEXT, b'{"type":', fin=False))
             + EMPTY_CONTINUATION * 200_000 + masked(Frame(Opcode.PING, b"after")))
    async with loopback_relay() as lr:
        with traced() as peak:
            sender = asyncio.create_task(send_until_closed(lr.client, flood))
            await lr.client.read(lambda frames: any(
                f.opcode in (Opcode.CLOSE, Opcode.PONG) for f in frames))
            held = peak()
        await sender
        [answer] = [f for f in lr.client.frames if f.opcode in (Opcode.CLOSE, Opcode.PONG)]
        assert answer.opcode == Opcode.CLOSE, "the flood was taken whole"
        assert Close.parse(bytes(answer.data)).code == 1009
        assert held < 2 * MiB, f"{held / MiB:.1f} MiB traced"
        result = await lr.result()
        assert (result.initiator, result.code) == ("client", 1009)
        assert await lr.upstream.close_code() == 1001
        assert lr.upstream.data_frames() == []


async def test_a_fragmented_message_at_the_cap_passes_one_more_fragment_closes() -> None:
    fragments = [Frame(Opcode.TEXT, b"[", fin=False),
                 *(Frame(Opcode.CONT, b"0,", fin=False)
                   for _ in range(MAX_FRAGMENTS_PER_MESSAGE - 2)),
                 Frame(Opcode.CONT, b"0]")]
    async with loopback_relay() as lr:
        await lr.client.send(masked(*fragments))
        await lr.upstream.read(lambda received: len(received) == len(fragments))
        assert [fin for _, fin, _ in lr.upstream.data_frames()] == [
            False] * (len(fragments) - 1) + [True]
        fragments.insert(1, Frame(Opcode.CONT, b"", fin=False))
        await lr.client.send(masked(*fragments))
        assert await lr.client.close_code() == 1009
        assert len(lr.upstream.data_frames()) == MAX_FRAGMENTS_PER_MESSAGE
