"""The C frame scan (``gateway/_framescan.c``) against the pure-Python frame loop.

The scan only accelerates: for any bytes, split into reads anywhere, the relay must write
the same frames, tap the same usage, count the same messages and end the same way with it
as without it.  Hypothesis draws frame sequences that mix what the scan takes (final data
frames) with everything it must leave to Python: control frames, fragments, RSV bits,
reserved opcodes, wrong mask bits, 16- and 64-bit lengths, messages over the cap, text that
is not UTF-8, text for the guard, usage events.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.protocol import CLIENT, SERVER, Protocol

from gateway import relay as relay_module
from gateway.usage import RESPONSE_DONE_MARKER
from tests.conftest import require_framescan
from tests.test_relay import FakeTransport


@pytest.fixture(autouse=True)
def framescan_built() -> None:
    require_framescan()


MAX_MESSAGE = 600
USAGE = (b'{"type":"response.done","response":{"usage":{"total_tokens":3,"input_tokens":1,'
         b'"output_tokens":2}}}')
PAYLOADS = st.one_of(
    st.binary(max_size=700),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"", b'{"type":"session.update","session":{"model":"forbidden"}}',
                     b'{"type":"session.update","session":{}}', b'{"t":"\\u0073"}',
                     b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"caf\xc3\xa9",
                     b"\xe2\x82", USAGE, b'"response.done" in a text', b"A" * 300]),
)


@st.composite
def wire_frame(draw: st.DrawFn, *, masked: bool) -> bytes:
    """One frame, usually well formed, sometimes not (bits, opcodes, mask, length form)."""
    opcode = draw(st.sampled_from([1, 1, 2, 2, 0, 8, 9, 10, 3, 11]))
    fin = draw(st.booleans() if opcode in (0, 1, 2) else st.sampled_from([True] * 9 + [False]))
    payload = draw(PAYLOADS)
    if opcode >= 8:
        payload = payload[:draw(st.sampled_from([0, 2, 125, 126]))]
        if opcode == 8 and len(payload) == 1:
            payload = b""
    rsv = draw(st.sampled_from([0] * 15 + [0x40]))
    mask_bit = masked if draw(st.integers(0, 19)) else not masked
    length = len(payload)
    form = draw(st.sampled_from(["min", "min", "min", "16", "64"]))
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if form == "64" or length > 0xFFFF:
        head += bytes([127 | (0x80 if mask_bit else 0)]) + length.to_bytes(8, "big")
    elif form == "16" or length > 125:
        head += bytes([126 | (0x80 if mask_bit else 0)]) + length.to_bytes(2, "big")
    else:
        head += bytes([length | (0x80 if mask_bit else 0)])
    if mask_bit:
        key = draw(st.binary(min_size=4, max_size=4))
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


@st.composite
def reads(draw: st.DrawFn, *, masked: bool) -> list[bytes]:
    wire = b"".join(draw(st.lists(wire_frame(masked=masked), max_size=8)))
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@dataclass
class Outcome:
    to_upstream: list[tuple[int, bool, bytes]]
    to_client: bytes
    usage: list[Any]
    counters: tuple[int, int, int, int]
    result: tuple[str, int] | None


def frames_of(data: bytes, *, sent_by_client: bool) -> list[tuple[int, bool, bytes]]:
    receiver = Protocol(SERVER if sent_by_client else CLIENT, max_size=None)
    receiver.receive_data(data)
    assert receiver.parser_exc is None, receiver.parser_exc
    return [(int(f.opcode), f.fin, bytes(f.data)) for f in receiver.events_received()
            if isinstance(f, Frame)]


async def relayed(chunks: list[bytes], *, from_client: bool, framescan: bool) -> Outcome:
    client, upstream = FakeTransport(), FakeTransport()
    usage: list[Any] = []

    def guard(payload: bytes) -> str | None:
        return '{"type":"error"}' if b"forbidden" in payload else None

    saved = relay_module.FRAMESCAN
    relay_module.FRAMESCAN = saved if framescan else None
    try:
        session = relay_module.Relay(
            client, upstream, usage.append, guard, max_client_message=MAX_MESSAGE,
            max_upstream_message=MAX_MESSAGE, ping_interval=None, ping_timeout=None)
        session.start()
        side = client.protocol if from_client else upstream.protocol
        assert isinstance(side, asyncio.Protocol)
        for chunk in chunks:
            if client.closing or upstream.closing:
                break
            side.data_received(chunk)
    finally:
        relay_module.FRAMESCAN = saved
    decided = session._result.result() if session._result.done() else None
    outcome = Outcome(
        to_upstream=frames_of(upstream.received(), sent_by_client=True),
        to_client=re.sub(rb'"event_gw_[0-9a-f]+"', b'"event_gw"', client.received()),
        usage=usage,
        counters=(session.client_messages, session.client_bytes,
                  session.upstream_messages, session.upstream_bytes),
        result=None if decided is None else (decided.initiator, decided.code))
    session.decide(relay_module.RelayResult("gateway", 1000, ""))
    client.abort()
    upstream.abort()
    await asyncio.sleep(0)
    return outcome


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=reads(masked=True))
async def test_client_frames_take_the_same_path_with_and_without_the_scan(
        chunks: list[bytes]) -> None:
    with_scan = await relayed(chunks, from_client=True, framescan=True)
    without = await relayed(chunks, from_client=True, framescan=False)
    assert with_scan == without


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=reads(masked=False))
async def test_upstream_frames_take_the_same_path_with_and_without_the_scan(
        chunks: list[bytes]) -> None:
    with_scan = await relayed(chunks, from_client=False, framescan=True)
    without = await relayed(chunks, from_client=False, framescan=False)
    assert with_scan == without


def test_the_client_scan_remasks_with_the_pool_and_stops_where_python_must_decide() -> None:
    scan = relay_module.FRAMESCAN
    assert scan is not None
    pool = os.urandom(16)
    ok = Frame(Opcode.TEXT, b'{"type":"input_audio_buffer.append"}').serialize(
        mask=True, extensions=[])
    guarded = Frame(Opcode.TEXT, b'{"type":"session.update"}').serialize(
        mask=True, extensions=[])
    data = ok + ok + guarded + ok
    pos, out, messages, size, pool_pos = scan.scan_client(
        data, 0, MAX_MESSAGE, pool, 0, b"session.update", b"\\u")
    assert (pos, messages, size, pool_pos) == (2 * len(ok), 2, 2 * (len(ok) - 6), 8)
    assert out is not None and len(out) == 2 * len(ok)
    assert [out[2:6], out[len(ok) + 2:len(ok) + 6]] == [pool[0:4], pool[4:8]]
    append = (1, True, b'{"type":"input_audio_buffer.append"}')
    assert frames_of(out, sent_by_client=True) == [append] * 2
    # Without a guard the same message passes; with the pool used up the scan stops.
    pos, _, messages, _, _ = scan.scan_client(data, 0, MAX_MESSAGE, pool, 0, None, None)
    assert (pos, messages) == (len(data), 4)
    pos, out, messages, _, pool_pos = scan.scan_client(data, 0, MAX_MESSAGE, pool, 14, None, None)
    assert (pos, out, messages, pool_pos) == (0, None, 0, 14)


def test_the_upstream_scan_stops_at_usage_and_control_frames() -> None:
    scan = relay_module.FRAMESCAN
    assert scan is not None
    delta = Frame(Opcode.TEXT, b'{"type":"response.output_audio.delta"}').serialize(
        mask=False, extensions=[])
    done = Frame(Opcode.TEXT, USAGE).serialize(mask=False, extensions=[])
    ping = Frame(Opcode.PING, b"").serialize(mask=False, extensions=[])
    marker = RESPONSE_DONE_MARKER
    assert scan.scan_upstream(delta + done, 0, MAX_MESSAGE, marker, b"x.y") == (
        len(delta), 1, len(delta) - 2)
    assert scan.scan_upstream(delta + ping + delta, 0, MAX_MESSAGE, marker, b"x.y")[0] == len(delta)
    assert scan.scan_upstream(delta, 0, 5, marker, b"x.y") == (0, 0, 0)  # over the cap
    assert scan.scan_upstream(delta[:-1], 0, MAX_MESSAGE, marker, b"x.y") == (0, 0, 0)


UTF8_EDGES = [b"", b"ascii", b"caf\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x8e\x99",
              b"\xf4\x8f\xbf\xbf",
              b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xe0\x9f\xbf", b"\xed\xa0\x80",
              b"\xed\xbf\xbf", b"\xed\x9f\xbf", b"\xf0\x80\x80\xaf", b"\xf0\x8f\xbf\xbf",
              b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\x80", b"\xe2\x82",
              b"\xf0\x9f\x8e", b"\xc3", b"a" * 7 + b"\xc3\xa9", b"a" * 8 + b"\xed\xa0\x80"]


def _scan_accepts_text(payload: bytes) -> bool:
    scan = relay_module.FRAMESCAN
    assert scan is not None
    frame = Frame(Opcode.TEXT, payload).serialize(mask=True, extensions=[])
    pos: int = scan.scan_client(frame, 0, 1 << 20, os.urandom(4), 0, None, None)[0]
    return pos == len(frame)


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("payload", UTF8_EDGES)
def test_the_scan_takes_exactly_the_text_python_decodes(payload: bytes) -> None:
    assert _scan_accepts_text(payload) == _is_utf8(payload)


@settings(max_examples=2000, deadline=None)
@given(payload=st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_the_scan_utf8_check_agrees_with_python_on_any_bytes(payload: bytes) -> None:
    assert _scan_accepts_text(payload) == _is_utf8(payload)
