"""Hostile clients after the 101, against a relay on real loopback sockets.

Memory is what the test process allocates while the relay works (``tracemalloc``); the
peers are plain sockets (:mod:`tests.support.relay`), so that is the relay's.  Bounds
are far below what the relay held before the fixes (numbers in each test).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from websockets.frames import Close, Frame, Opcode

from gateway.relay import MAX_FRAGMENTS_PER_MESSAGE
from tests.support.gateway import wait_for
from tests.support.relay import Peer, loopback_relay, traced

pytestmark = pytest.mark.usefixtures("frame_loop")

EMPTY_CONTINUATION = bytes((0x00, 0x80, 0, 0, 0, 0))
"""A masked continuation frame with ``fin=0`` and no payload (6 bytes, key 0)."""
KiB, MiB = 1024, 1024 * 1024


def masked(*frames: Frame) -> bytes:
    return b"".join(frame.serialize(mask=True, extensions=[]) for frame in frames)


def unmasked(*frames: Frame) -> bytes:
    return b"".join(frame.serialize(mask=False, extensions=[]) for frame in frames)


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


async def test_a_client_that_floods_pings_and_never_reads_gets_one_pong_per_read() -> None:
    """30,000 pings of 125 bytes (3.9 MB) from a client that reads nothing: the relay
    answers only the latest ping of each read (RFC 6455 §5.5.3), none while the client's
    write buffer is over its high-water mark, and then stops reading the client; so it
    holds at most that buffer and one pending pong (before: a pong per ping, megabytes
    buffered for as long as the client stayed).  When the client reads, the last ping
    has its pong, and the message after the flood is relayed."""
    count = 30_000
    payloads = [b"%08d" % i + b"p" * 117 for i in range(count)]
    pings = masked(*(Frame(Opcode.PING, payload) for payload in payloads),
                   Frame(Opcode.TEXT, b'{"type":"after"}'))
    async with loopback_relay(small_buffers=True) as lr:
        high_water = lr.client_transport.get_write_buffer_limits()[1]
        with traced() as peak:
            sender = asyncio.create_task(lr.client.send(pings))
            # until the relay has read up to the text after the pings, or stopped reading
            await wait_for(lambda: lr.relay.client_messages == 1
                           or not lr.client_transport.is_reading())
            buffered = lr.client_transport.get_write_buffer_size()
            held = peak()
        assert buffered <= high_water + 2 + 125, f"{buffered} bytes buffered"
        assert held < 1 * MiB, f"{held / MiB:.1f} MiB traced"
        await lr.client.read(lambda frames: bool(frames) and frames[-1].opcode == Opcode.PONG
                             and bytes(frames[-1].data) == payloads[-1])
        await sender
        pongs = controls(lr.client, Opcode.PONG)
        assert len(pongs) < count / 10  # one per read, not one per ping
        assert pongs == sorted(set(pongs)) and set(pongs) <= set(payloads)
        await lr.upstream.read(lambda frames: bool(frames))
        assert lr.upstream.data_frames() == [(Opcode.TEXT, True, b'{"type":"after"}')]


REFUSAL = '{"type":"error","error":{"type":"gateway_error","code":"forbidden","message":"%s"}}' % (
    "x" * 160)


async def test_a_client_that_never_reads_its_answers_stops_being_read() -> None:
    """40,000 ``session.update`` messages the guard refuses (2.6 MB on the wire, 10 MB
    of ``error`` events back) from a client that reads nothing: once the client's own
    write buffer passes its high-water mark the relay stops reading it, so it holds that
    buffer and the answers to one read (before: every answer, about 10 MB).  The client
    reads: the relay reads on and every message gets its answer."""
    count = 40_000
    updates = masked(*(Frame(Opcode.TEXT, b'{"type":"session.update","n":%08d}' % i)
                       for i in range(count)))
    async with loopback_relay(small_buffers=True, guard=lambda _: REFUSAL) as lr:
        with traced() as peak:
            sender = asyncio.create_task(lr.client.send(updates))
            await wait_for(lambda: sender.done() or not lr.client_transport.is_reading())
            buffered = lr.client_transport.get_write_buffer_size()
            held = peak()
        assert not sender.done(), "the relay read the whole flood"
        assert lr.relay.sending_to_client  # what the housekeeping's send deadline looks at
        assert buffered < 2 * MiB, f"{buffered / MiB:.1f} MiB buffered"
        assert held < 4 * MiB, f"{held / MiB:.1f} MiB traced"
        await lr.client.read(lambda frames: len(frames) == count, within=30)
        await sender
        assert {bytes(f.data) for f in lr.client.frames} == {REFUSAL.encode()}
        assert lr.client_transport.is_reading() and not lr.relay.sending_to_client
        assert lr.upstream.data_frames() == [] and lr.relay.client_messages == 0


async def test_a_client_that_does_not_read_pauses_both_directions_until_it_drains() -> None:
    """Upstream → client backpressure: while the client's buffer is over its high-water
    mark neither the upstream nor the client is read; both resume when it drains, and
    every frame arrives."""
    frames = [Frame(Opcode.BINARY, bytes([i % 256]) * 4000) for i in range(500)]
    async with loopback_relay(small_buffers=True) as lr:
        sender = asyncio.create_task(lr.upstream.send(unmasked(*frames)))
        await wait_for(lambda: not lr.upstream_transport.is_reading())
        assert lr.relay.sending_to_client and not lr.relay.sending_to_upstream
        assert not lr.client_transport.is_reading()
        await lr.client.read(lambda received: len(received) == len(frames))
        await sender
        assert lr.client.data_frames() == [(f.opcode, True, bytes(f.data)) for f in frames]
        assert lr.upstream_transport.is_reading() and lr.client_transport.is_reading()
        assert lr.relay.upstream_messages == len(frames)


async def test_an_upstream_that_does_not_read_pauses_the_client_until_it_drains() -> None:
    """Client → upstream backpressure: while the upstream's buffer is over its high-water
    mark the client is not read (the upstream is); all of it arrives once it drains."""
    frames = [Frame(Opcode.BINARY, bytes([i % 256]) * 4000) for i in range(500)]
    async with loopback_relay(small_buffers=True) as lr:
        sender = asyncio.create_task(lr.client.send(masked(*frames)))
        await wait_for(lambda: not lr.client_transport.is_reading())
        assert lr.relay.sending_to_upstream and not lr.relay.sending_to_client
        assert lr.upstream_transport.is_reading()
        await lr.upstream.read(lambda received: len(received) == len(frames))
        await sender
        assert lr.upstream.data_frames() == [(f.opcode, True, bytes(f.data)) for f in frames]
        assert lr.client_transport.is_reading()
        assert lr.relay.client_messages == len(frames)


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
