"""The frame relay on in-memory transports, checked against the ``websockets`` Sans-I/O
protocol as an independent RFC 6455 encoder and parser.

Live-socket behaviour (close codes seen by real clients, keepalive, backpressure with a
real kernel buffer) is covered by ``tests/integration`` and ``tests/faults``; these tests
pin what is hard to provoke there: frames split at every byte, batching, fragmentation,
re-masking and the exact bytes written.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import CLIENT, SERVER, Protocol

from gateway import relay as relay_module
from gateway.errors import SLOW_CONSUMER, UPSTREAM_LOST
from gateway.relay import Relay, RelayResult
from gateway.usage import TokenCounts
from tests.support.gateway import wait_for

pytestmark = pytest.mark.usefixtures("frame_loop")

USAGE_EVENT = {"type": "response.done", "response": {"usage": {
    "total_tokens": 30, "input_tokens": 10, "output_tokens": 20,
    "input_token_details": {"audio_tokens": 10}, "output_token_details": {"audio_tokens": 20}}}}


@pytest.fixture(autouse=True)
def short_close_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake peers never answer a closing handshake; don't wait 2 s for each."""
    monkeypatch.setattr(relay_module, "CLOSE_TIMEOUT", 0.05)


class FakeTransport(asyncio.Transport):
    """Records writes; closing it reports connection_lost to its protocol, as asyncio does."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.reading = True
        self.closing = False
        self.aborted = False
        self.lost = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing or not self.aborted
        self.writes.append(bytes(data))

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return self.closing

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            protocol = self.protocol
            assert isinstance(protocol, asyncio.Protocol)
            asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def close(self) -> None:
        """Like asyncio's: the connection is lost once the write buffer has drained."""
        self.closing = True
        if not self.get_write_buffer_size():
            self._lose()

    def abort(self) -> None:
        self.closing = self.aborted = True
        self._lose()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def is_reading(self) -> bool:
        return self.reading

    def received(self) -> bytes:
        return b"".join(self.writes)


def client_frames(*frames: Frame) -> bytes:
    """Frames as a client sends them (masked), encoded by websockets."""
    return b"".join(frame.serialize(mask=True, extensions=[]) for frame in frames)


def server_frames(*frames: Frame) -> bytes:
    return b"".join(frame.serialize(mask=False, extensions=[]) for frame in frames)


def parsed(data: bytes, *, sent_by_client: bool) -> list[Frame]:
    """Frames in ``data`` as the receiving peer's websockets parser sees them."""
    receiver = Protocol(SERVER if sent_by_client else CLIENT, max_size=None)
    receiver.receive_data(data)
    assert receiver.parser_exc is None, receiver.parser_exc
    return [event for event in receiver.events_received() if isinstance(event, Frame)]


class Harness:
    def __init__(self, *, guard: Any = None, max_message: int = 1 << 20,
                 ping_interval: float | None = None) -> None:
        self.client = FakeTransport()
        self.upstream = FakeTransport()
        self.usage: list[TokenCounts] = []
        self.relay = Relay(self.client, self.upstream, self.usage.append, guard,
                           max_client_message=max_message, max_upstream_message=max_message,
                           ping_interval=ping_interval, ping_timeout=ping_interval)
        assert self.client.protocol is None and self.upstream.protocol is None
        self.relay.start()
        self.task = asyncio.create_task(self.relay.run())

    async def started(self) -> Harness:
        await asyncio.sleep(0)  # let run() start (start() took the transports over)
        assert self.client.protocol is not None and self.upstream.protocol is not None
        return self

    def from_client(self, data: bytes) -> None:
        protocol = self.client.protocol
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)

    def from_upstream(self, data: bytes) -> None:
        protocol = self.upstream.protocol
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)

    async def result(self) -> RelayResult:
        async with asyncio.timeout(5):
            return await self.task


async def harness(**kwargs: Any) -> Harness:
    return await Harness(**kwargs).started()


async def test_client_frames_split_at_every_byte_arrive_whole_and_re_masked() -> None:
    h = await harness()
    texts = [json.dumps({"type": "input_audio_buffer.append", "audio": "A" * size})
             for size in (0, 100, 200, 70_000)]
    wire = client_frames(*(Frame(Opcode.TEXT, t.encode()) for t in texts),
                         Frame(Opcode.BINARY, bytes(range(256))))
    for i in range(len(wire)):
        h.from_client(wire[i:i + 1])
    frames = parsed(h.upstream.received(), sent_by_client=True)
    assert [(f.opcode, bytes(f.data)) for f in frames] == [
        *((Opcode.TEXT, t.encode()) for t in texts), (Opcode.BINARY, bytes(range(256)))]
    # A fresh masking key per frame, never the client's: compare the keys on both wires.
    sent_keys = _mask_keys(wire)
    relayed_keys = _mask_keys(h.upstream.received())
    assert len(relayed_keys) == len(sent_keys) == 5
    assert all(a != b for a, b in zip(sent_keys, relayed_keys, strict=True))
    assert (h.relay.client_messages, h.relay.client_bytes) == (
        5, sum(len(t) for t in texts) + 256)


def _mask_keys(data: bytes) -> list[bytes]:
    keys, pos = [], 0
    while pos < len(data):
        length, size = data[pos + 1] & 0x7F, 2
        if length == 126:
            length, size = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        elif length == 127:
            length, size = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
        assert data[pos + 1] & 0x80
        keys.append(data[pos + size:pos + size + 4])
        pos += size + 4 + length
    return keys


async def test_upstream_bytes_are_written_verbatim_one_write_per_read() -> None:
    h = await harness()
    wire = server_frames(Frame(Opcode.TEXT, b'{"type":"session.created"}'),
                         Frame(Opcode.BINARY, b"\x00" * 300),
                         Frame(Opcode.TEXT, b'{"type":"response.output_audio.delta"}'))
    h.from_upstream(wire)
    assert h.client.writes == [wire]
    # split mid-frame: the complete frames go at once, the rest when it is whole
    h.from_upstream(wire[:40])
    h.from_upstream(wire[40:])
    assert h.client.received() == wire * 2
    assert h.relay.upstream_messages == 6


async def test_batched_client_frames_go_upstream_in_one_write() -> None:
    h = await harness()
    h.from_client(client_frames(*(Frame(Opcode.TEXT, b'{"n":%d}' % i) for i in range(10))))
    assert len(h.upstream.writes) == 1
    assert len(parsed(h.upstream.writes[0], sent_by_client=True)) == 10


async def test_fragmented_messages_keep_their_fragments_and_pings_are_answered() -> None:
    h = await harness()
    h.from_client(client_frames(Frame(Opcode.TEXT, b'{"a":', fin=False),
                                Frame(Opcode.PING, b"p1"),
                                Frame(Opcode.CONT, b'"\xc3', fin=False),
                                Frame(Opcode.CONT, b'\xa9"}')))
    frames = parsed(h.upstream.received(), sent_by_client=True)
    assert [(f.opcode, f.fin) for f in frames] == [
        (Opcode.TEXT, False), (Opcode.CONT, False), (Opcode.CONT, True)]
    assert b"".join(bytes(f.data) for f in frames).decode() == '{"a":"é"}'
    [pong] = parsed(h.client.received(), sent_by_client=False)
    assert (pong.opcode, bytes(pong.data)) == (Opcode.PONG, b"p1")
    assert h.relay.client_messages == 1
    # upstream fragments pass through untouched; the usage of a fragmented event counts
    done = json.dumps(USAGE_EVENT).encode()
    wire = server_frames(Frame(Opcode.TEXT, done[:10], fin=False),
                         Frame(Opcode.PING, b"u"), Frame(Opcode.CONT, done[10:]))
    h.client.writes.clear()
    h.from_upstream(wire)
    assert parsed(h.client.received(), sent_by_client=False) == [
        Frame(Opcode.TEXT, done[:10], fin=False), Frame(Opcode.CONT, done[10:])]
    [upstream_pong] = parsed(h.upstream.writes[-1], sent_by_client=True)
    assert (upstream_pong.opcode, bytes(upstream_pong.data)) == (Opcode.PONG, b"u")
    assert [u.billable for u in h.usage] == [30]


async def test_usage_events_are_tapped_and_other_frames_are_not_parsed() -> None:
    h = await harness()
    h.from_upstream(server_frames(
        Frame(Opcode.TEXT, json.dumps(USAGE_EVENT).encode()),
        Frame(Opcode.TEXT, b'{"type":"response.output_audio.delta","delta":"AAAA"}'),
        Frame(Opcode.BINARY, b'"response.done"')))  # binary frames are never tapped
    assert [(u.input_audio, u.output_audio, u.billable) for u in h.usage] == [(10, 20, 30)]


@pytest.mark.parametrize("frame", [
    b'{"type":"session.update","session":{"model":"other"}}',
    b'{"type":"session\\u002eupdate","session":{"model":"other"}}',
])
async def test_guard_sees_every_possible_session_update(frame: bytes) -> None:
    seen: list[bytes] = []

    def guard(text: bytes) -> str | None:
        seen.append(text)
        return '{"type":"error"}'

    h = await harness(guard=guard)
    h.from_client(client_frames(Frame(Opcode.TEXT, frame),
                                Frame(Opcode.TEXT, b'{"type":"input_audio_buffer.append"}')))
    assert seen == [frame]
    [relayed] = parsed(h.upstream.received(), sent_by_client=True)
    assert bytes(relayed.data) == b'{"type":"input_audio_buffer.append"}'
    [error] = parsed(h.client.received(), sent_by_client=False)
    assert bytes(error.data) == b'{"type":"error"}'


async def test_fragmented_session_update_is_guarded_as_a_whole() -> None:
    h = await harness(guard=lambda text: '{"type":"error"}' if b"other" in text else None)
    h.from_client(client_frames(Frame(Opcode.TEXT, b'{"type":"session.upd', fin=False),
                                Frame(Opcode.CONT, b'ate","session":{"model":"other"}}')))
    assert h.upstream.writes == []
    assert h.relay.client_messages == 0


@pytest.mark.parametrize("fragmented", [False, True])
async def test_binary_messages_get_the_same_pinning_rule_as_text(fragmented: bool) -> None:
    """A binary frame is a JSON event to parsers that take bytes: one naming another model
    is refused like a text one; other binary messages pass, still binary."""
    forbidden = b'{"type":"session.update","session":{"model":"other"}}'
    h = await harness(guard=lambda data: '{"type":"error"}' if b"other" in data else None)
    frames = ([Frame(Opcode.BINARY, forbidden[:20], fin=False),
               Frame(Opcode.CONT, forbidden[20:])] if fragmented
              else [Frame(Opcode.BINARY, forbidden)])
    h.from_client(client_frames(*frames, Frame(Opcode.BINARY, b"\x00\x01 audio")))
    [relayed] = parsed(h.upstream.received(), sent_by_client=True)
    assert (relayed.opcode, bytes(relayed.data)) == (Opcode.BINARY, b"\x00\x01 audio")
    [error] = parsed(h.client.received(), sent_by_client=False)
    assert (error.opcode, bytes(error.data)) == (Opcode.TEXT, b'{"type":"error"}')
    assert h.relay.client_messages == 1


def raw_client_frame(first_byte: int, payload: bytes) -> bytes:
    """A masked frame with any first byte, even one websockets refuses to encode."""
    assert len(payload) < 126
    key = b"\x01\x02\x03\x04"
    return bytes((first_byte, 0x80 | len(payload))) + key + bytes(
        b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(("frame", "code"), [
    (client_frames(Frame(Opcode.BINARY, bytes(1001))), 1009),
    (client_frames(Frame(Opcode.TEXT, b"\xff")), 1007),
    (client_frames(Frame(Opcode.CONT, b"x")), 1002),
    (raw_client_frame(0x09, b"x"), 1002),  # a fragmented ping
    (raw_client_frame(0xC1, b"x"), 1002),  # RSV1 without an extension
    (raw_client_frame(0x83, b"x"), 1002),  # a reserved opcode
    (bytes((0x81, 0x01)) + b"x", 1002),  # unmasked
])
async def test_client_violations_close_it_and_the_upstream(frame: bytes, code: int) -> None:
    h = await harness(max_message=1000)
    h.from_client(client_frames(Frame(Opcode.BINARY, bytes(1000))) + frame)
    result = await h.result()
    assert (result.initiator, result.code) == ("client", code)
    close = parsed(h.client.received(), sent_by_client=False)[-1]
    assert Close.parse(bytes(close.data)).code == code
    upstream = parsed(h.upstream.received(), sent_by_client=True)
    assert len(upstream[0].data) == 1000  # what came before was relayed
    assert Close.parse(bytes(upstream[-1].data)).code == 1001


async def test_upstream_close_reaches_the_client_and_the_handshake_completes() -> None:
    h = await harness()
    h.from_upstream(server_frames(Frame(Opcode.TEXT, b"{}"),
                                  Frame(Opcode.CLOSE, Close(4001, "bye").serialize())))
    frames = parsed(h.client.received(), sent_by_client=False)
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.CLOSE]
    assert Close.parse(bytes(frames[1].data)) == Close(4001, "bye")
    h.from_client(client_frames(Frame(Opcode.CLOSE, Close(4001, "bye").serialize())))
    result = await h.result()
    assert (result.initiator, result.code, result.reason, result.end) == (
        "upstream", 4001, "bye", None)
    assert h.client.closing and not h.client.aborted


async def test_gateway_end_sends_error_and_close_then_drops_a_silent_client() -> None:
    h = await harness()
    h.relay.end(SLOW_CONSUMER)
    frames = parsed(h.client.received(), sent_by_client=False)
    assert json.loads(bytes(frames[0].data))["error"]["code"] == SLOW_CONSUMER.code
    assert Close.parse(bytes(frames[1].data)).code == SLOW_CONSUMER.close_code
    h.from_upstream(server_frames(Frame(Opcode.CLOSE, Close(1001, "").serialize())))
    result = await h.result()  # the client never answers: aborted after CLOSE_TIMEOUT
    assert result.end is SLOW_CONSUMER
    assert h.client.aborted


def protocols(h: Harness) -> tuple[asyncio.Protocol, asyncio.Protocol]:
    client, upstream = h.client.protocol, h.upstream.protocol
    assert isinstance(client, asyncio.Protocol) and isinstance(upstream, asyncio.Protocol)
    return client, upstream


async def test_backpressure_pauses_the_other_side() -> None:
    h = await harness()
    _, upstream = protocols(h)
    upstream.pause_writing()  # client -> upstream is backed up: the client is not read
    assert h.relay.sending_to_upstream and not h.client.reading and h.upstream.reading
    upstream.resume_writing()
    assert not h.relay.sending_to_upstream and h.client.reading


async def test_a_client_over_its_own_high_water_mark_is_not_read() -> None:
    """Neither peer is read while the client's buffer is over its mark; the client is
    read again only once neither buffer it would add to is."""
    h = await harness()
    client, upstream = protocols(h)
    client.pause_writing()
    assert h.relay.sending_to_client and not h.upstream.reading and not h.client.reading
    upstream.pause_writing()
    client.resume_writing()
    assert h.upstream.reading and not h.client.reading  # the upstream is still backed up
    client.pause_writing()
    upstream.resume_writing()
    assert not h.client.reading and not h.upstream.reading
    client.resume_writing()
    assert h.client.reading and h.upstream.reading


async def test_a_paused_client_is_read_again_once_the_gateway_closes_it() -> None:
    h = await harness()
    client, _ = protocols(h)
    client.pause_writing()
    h.relay.end(SLOW_CONSUMER)
    assert h.client.reading  # its close frame must get through
    client.resume_writing()
    client.pause_writing()
    assert h.client.reading


async def test_pings_get_one_pong_per_read_none_while_over_the_mark() -> None:
    h = await harness()
    client, _ = protocols(h)
    h.from_client(client_frames(*(Frame(Opcode.PING, b"%d" % i) for i in range(5))))
    assert [(f.opcode, bytes(f.data)) for f in parsed(h.client.received(), sent_by_client=False)
            ] == [(Opcode.PONG, b"4")]  # RFC 6455 §5.5.3: the latest is enough
    h.client.writes.clear()
    client.pause_writing()
    h.from_client(client_frames(Frame(Opcode.PING, b"a")))
    h.from_client(client_frames(Frame(Opcode.PING, b"b")))
    assert h.client.writes == []
    client.resume_writing()
    [pong] = parsed(h.client.received(), sent_by_client=False)
    assert (pong.opcode, bytes(pong.data)) == (Opcode.PONG, b"b")


async def test_a_pending_pong_goes_before_the_close() -> None:
    h = await harness()
    h.from_client(client_frames(Frame(Opcode.PING, b"p"),
                                Frame(Opcode.CLOSE, Close(1000, "bye").serialize())))
    assert [f.opcode for f in parsed(h.client.received(), sent_by_client=False)] == [
        Opcode.PONG, Opcode.CLOSE]
    assert (await h.result()).code == 1000


async def test_frame_headers_count_toward_a_fragmented_message() -> None:
    """990 payload bytes pass in one frame under a 1,000-byte cap; in two frames their
    headers (6 bytes each, masking key included) make 1,002: closed 1009."""
    h = await harness(max_message=1000)
    h.from_client(client_frames(Frame(Opcode.BINARY, bytes(990))))
    assert h.relay.client_messages == 1
    h.from_client(client_frames(Frame(Opcode.BINARY, bytes(495), fin=False),
                                Frame(Opcode.CONT, bytes(495))))
    result = await h.result()
    assert (result.initiator, result.code, result.reason) == ("client", 1009, "message too big")
    assert h.relay.client_messages == 1


async def test_an_upstream_message_over_the_fragment_cap_fails_the_upstream() -> None:
    h = await harness()
    cap = relay_module.MAX_FRAGMENTS_PER_MESSAGE
    h.from_upstream(server_frames(Frame(Opcode.TEXT, b"[", fin=False),
                                  *(Frame(Opcode.CONT, b"", fin=False) for _ in range(cap))))
    result = await h.result()
    assert (result.initiator, result.code, result.end) == ("upstream", 1011, UPSTREAM_LOST)
    close = parsed(h.upstream.received(), sent_by_client=True)[-1]
    assert Close.parse(bytes(close.data)) == Close(1009, "too many fragments")


async def test_the_constructor_does_no_io_and_start_takes_the_connections_over() -> None:
    client, upstream = FakeTransport(), FakeTransport()
    client.reading = upstream.reading = False  # as the hand-off leaves them
    usage: list[TokenCounts] = []
    relay = Relay(client, upstream, usage.append,
                  upstream_buffered=server_frames(Frame(Opcode.TEXT, json.dumps(
                      USAGE_EVENT).encode())), upstream_lost=True,
                  max_client_message=100, max_upstream_message=1000,
                  ping_interval=None, ping_timeout=None)
    assert (client.protocol, upstream.protocol, client.reading, upstream.reading) == (
        None, None, False, False)
    assert client.writes == upstream.writes == [] and usage == []
    relay.start()
    assert client.protocol is not None and upstream.protocol is not None and client.reading
    assert [u.billable for u in usage] == [30]  # the buffered frame came first
    with pytest.raises(RuntimeError):
        relay.start()
    result = await relay.run()  # the upstream was already lost
    assert (result.initiator, result.end) == ("upstream", UPSTREAM_LOST)


async def test_run_without_start_raises_and_drops_both_connections() -> None:
    client, upstream = FakeTransport(), FakeTransport()
    client.protocol, upstream.protocol = asyncio.Protocol(), asyncio.Protocol()  # the old ones
    relay = Relay(client, upstream, lambda _: None, max_client_message=100,
                  max_upstream_message=100, ping_interval=None, ping_timeout=None)
    with pytest.raises(RuntimeError, match="start"):
        await relay.run()
    assert client.aborted and upstream.aborted


async def test_keepalive_finds_a_silent_upstream() -> None:
    h = await harness(ping_interval=0.2)
    await wait_for(lambda: h.client.writes, within=5)  # the keepalive ping to the client
    [ping] = parsed(h.client.received(), sent_by_client=False)
    assert ping.opcode == Opcode.PING
    h.from_client(client_frames(Frame(Opcode.PONG, ping.data)))  # only the client answers
    result = await h.result()
    assert (result.initiator, result.code) == ("upstream", 1011)
    assert h.upstream.aborted
    frames = parsed(h.client.received(), sent_by_client=False)
    assert json.loads(bytes(frames[-2].data))["error"]["code"] == "upstream_error"
    assert Close.parse(bytes(frames[-1].data)).code == 1011


@pytest.mark.parametrize(("code", "allowed"), [
    (999, False), (1000, True), (1004, False), (1005, False), (1006, False), (1012, True),
    (1015, False), (2999, False), (3000, True), (4999, True), (5000, False)])
async def test_close_codes_peers_may_send(code: int, allowed: bool) -> None:
    """RFC 6455 §7.4: a close frame with a code peers may not send fails the client 1002."""
    h = await harness()
    h.from_client(raw_client_frame(0x88, code.to_bytes(2, "big") + b"bye"))
    result = await h.result()
    assert (result.initiator, result.code) == ("client", code if allowed else 1002)


async def test_a_client_that_has_not_read_its_close_lingers_then_is_aborted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "LINGER_SECONDS", 0.2)
    h = await harness()
    monkeypatch.setattr(h.client, "get_write_buffer_size", lambda: 70_000)  # unread frames
    h.relay.end(SLOW_CONSUMER)
    h.from_upstream(server_frames(Frame(Opcode.CLOSE, Close(1001, "").serialize())))
    result = await h.result()  # the session ends without waiting for the slow client
    assert result.end is SLOW_CONSUMER
    assert h.client.closing and not h.client.aborted  # closed after a flush: it may still read
    await wait_for(lambda: h.client.aborted, within=5)
