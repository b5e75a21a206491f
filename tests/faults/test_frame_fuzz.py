"""Fuzzing the relay with client frame sequences after the 101 (the hostile-client issue).

Each example is a script of client frames sent to a :class:`gateway.relay.Relay` over real
loopback sockets (:mod:`tests.support.relay`), cut into chunks at random points: messages
of both kinds, fragmented anywhere (inside UTF-8 sequences too), pings and pongs between
their fragments, ``session.update`` messages the guard refuses; then either a close or one
hostile ending — a fragment flood past :data:`~gateway.relay.MAX_FRAGMENTS_PER_MESSAGE`,
a fragmented message whose headers take it over the size cap, a continuation out of
place, invalid UTF-8 across fragments, a fragmented or oversize ping, reserved bits or
opcodes, an unmasked frame.

Checked for every example, against what the script says must happen: the upstream
receives exactly the messages that pass, fragmentation kept (parsed by ``websockets``);
the client gets a pong for its last ping, pongs only for its pings and in order, one
``error`` event per refused message, and the close code of its ending; and, measured in
this process while the relay works, traced memory stays under a bound (a fragment flood
held about 100 bytes per fragment before the cap) and no callback holds the event loop
for long (a timer's lateness).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from gateway.relay import MAX_FRAGMENTS_PER_MESSAGE
from tests.support.relay import loopback_relay

EXAMPLES = 150
SLOW_EXAMPLES = 1000
MAX_MESSAGE = 4096
"""The relay's size cap in these examples (bytes), small so that the cap is reached."""
MEMORY_BOUND = 1024 * 1024
"""Traced bytes an example may reach at its peak (peers included; about 0.4 MB seen).
Before the fragment cap a flood of 60,000 fragments held about 6 MB."""
LAG_BOUND = 0.15
"""Seconds a timer may run late while the relay works (15 ms seen for the worst flood;
before the cap a flood was taken 43,000 fragments a read).  An example over it is
played once more and the better lag kept: a slow input is slow twice, a busy CPU on
this shared machine is not."""
REFUSAL = '{"type":"error","error":{"code":"forbidden"}}'


def refusing_guard(text: bytes) -> str | None:
    return REFUSAL if b"refuse-me" in text else None


@dataclass
class Script:
    """What the client sends and what must come of it."""

    frames: list[bytes] = field(default_factory=list)
    """Encoded client frames, in order."""
    relayed: list[tuple[Opcode, bool, bytes]] = field(default_factory=list)
    """``(opcode, fin, payload)`` of every data frame the upstream must receive."""
    pings: list[bytes] = field(default_factory=list)
    refused: int = 0
    code: int = 1000
    """The close code the client must get (1000: its own close, answered)."""
    ending: str = "close"

    @property
    def wire(self) -> bytes:
        return b"".join(self.frames)

    def __repr__(self) -> str:  # a flood's bytes would fill pages of a failure report
        wire = self.wire
        return (f"Script(ending={self.ending!r}, code={self.code}, frames={len(self.frames)}, "
                f"wire={len(wire)} bytes: {wire[:300]!r}{'...' if len(wire) > 300 else ''}, "
                f"relayed={self.relayed!r}, pings={self.pings!r}, refused={self.refused})")


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, first_byte: int | None = None,
                 mask: bool = True) -> bytes:
    """Any masked client frame, even one that ``websockets`` refuses to encode."""
    b0 = first_byte if first_byte is not None else (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        head = bytes((b0, (0x80 if mask else 0) | length))
    elif length < 1 << 16:
        head = bytes((b0, (0x80 if mask else 0) | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((b0, (0x80 if mask else 0) | 127)) + length.to_bytes(8, "big")
    if not mask:
        return head + payload
    return head + Frame(Opcode.BINARY, payload).serialize(mask=True, extensions=[])[
        len(head):]  # websockets masks it (same header length for the same payload length)


_TEXT = st.text(st.characters(codec="utf-8"), max_size=60)  # no surrogates
_CONTROL_PAYLOAD = st.binary(max_size=125)


@st.composite
def _message(draw: st.DrawFn, script: Script) -> None:
    """One message that passes (or is refused by the guard), fragmented anywhere, with
    pings and pongs between its fragments."""
    kind = draw(st.sampled_from(["text", "binary", "refused"]))
    if kind == "binary":
        payload = draw(st.binary(max_size=600))
    elif kind == "text":
        payload = draw(_TEXT).encode()
    else:
        payload = json.dumps({"type": "session.update", "x": f"refuse-me {draw(_TEXT)}"},
                             ensure_ascii=False).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    opcode = Opcode.BINARY if kind == "binary" else Opcode.TEXT
    for index, piece in enumerate(pieces):
        fin = index == len(pieces) - 1
        script.frames.append(client_frame(opcode if index == 0 else Opcode.CONT, piece, fin=fin))
        if kind != "refused":
            script.relayed.append((opcode if index == 0 else Opcode.CONT, fin, piece))
        for control in draw(st.lists(st.sampled_from([Opcode.PING, Opcode.PONG]), max_size=2)):
            control_payload = draw(_CONTROL_PAYLOAD)
            script.frames.append(client_frame(control, control_payload))
            if control == Opcode.PING:
                script.pings.append(control_payload)
    script.refused += kind == "refused"


def _ending(draw: st.DrawFn, script: Script) -> None:
    ending = draw(st.sampled_from([
        "close", "flood", "headers_over_cap", "payload_over_cap", "stray_continuation",
        "message_inside_message", "utf8_across_fragments", "utf8", "fragmented_ping",
        "oversize_ping", "rsv", "reserved_opcode", "unmasked"]))
    script.ending = ending
    frames = script.frames
    if ending == "close":
        frames.append(client_frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
        return
    script.code = 1002
    if ending == "flood":
        script.code = 1009
        count = draw(st.integers(MAX_FRAGMENTS_PER_MESSAGE, 60_000))  # + the first frame
        frames.append(client_frame(Opcode.TEXT, b"[", fin=False))
        frames.append(client_frame(Opcode.CONT, b"", fin=False) * count)
    elif ending == "headers_over_cap":
        # payloads within the cap, payloads + headers (6 bytes each) over it
        script.code = 1009
        count = draw(st.integers(2, 40))
        size = draw(st.integers(MAX_MESSAGE - 6 * count + 1, MAX_MESSAGE))
        each = size // count
        for index in range(count):
            piece = b"x" * (each if index < count - 1 else size - each * (count - 1))
            frames.append(client_frame(Opcode.BINARY if index == 0 else Opcode.CONT, piece,
                                       fin=index == count - 1))
    elif ending == "payload_over_cap":
        script.code = 1009
        frames.append(client_frame(Opcode.BINARY, b"x" * (MAX_MESSAGE + 1)))
    elif ending == "stray_continuation":
        frames.append(client_frame(Opcode.CONT, b"x", fin=draw(st.booleans())))
    elif ending == "message_inside_message":
        frames.append(client_frame(Opcode.TEXT, b"{", fin=False))
        frames.append(client_frame(draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY])), b"x"))
    elif ending == "utf8_across_fragments":
        script.code = 1007
        text = draw(_TEXT).encode() + b"\xc3"  # a 2-byte sequence cut, then a bad byte
        frames.append(client_frame(Opcode.TEXT, text, fin=False))
        frames.append(client_frame(Opcode.CONT, b"\x28"))
    elif ending == "utf8":
        script.code = 1007
        frames.append(client_frame(Opcode.TEXT, draw(_TEXT).encode() + b"\xff"))
    elif ending == "fragmented_ping":
        frames.append(client_frame(Opcode.PING, b"p", fin=False))
    elif ending == "oversize_ping":
        frames.append(client_frame(Opcode.PING, b"p" * 126))
    elif ending == "rsv":
        frames.append(client_frame(0, b"x", first_byte=0x81 | draw(st.sampled_from(
            [0x40, 0x20, 0x10]))))
    elif ending == "reserved_opcode":
        frames.append(client_frame(0, b"x", first_byte=0x80 | draw(st.sampled_from(
            [3, 4, 5, 6, 7, 11, 12, 13, 14, 15]))))
    else:
        frames.append(client_frame(Opcode.BINARY, b"x", mask=False))


@st.composite
def scripts(draw: st.DrawFn) -> tuple[Script, list[int]]:
    """A script and the sizes of the chunks its bytes are sent in (the rest: one more)."""
    script = Script()
    for _ in range(draw(st.integers(0, 6))):
        draw(_message(script))
    _ending(draw, script)
    return script, draw(st.lists(st.integers(1, 3000), max_size=8))


@dataclass
class Lag:
    """The most a repeating timer ran late (seconds): how long a callback held the loop."""

    interval: float = 0.005
    worst: float = 0.0
    _handle: asyncio.TimerHandle | None = None
    _due: float = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self.worst = max(self.worst, loop.time() - self._due)
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


@contextlib.contextmanager
def measured() -> Iterator[tuple[Lag, list[int]]]:
    """Loop lag and the traced-memory peak (bytes, filled in on exit) of the block."""
    lag, peak = Lag(), [0]
    tracemalloc.start()
    lag.start()
    try:
        yield lag, peak
    finally:
        lag.stop()
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


async def run_script(script: Script, chunks: list[int]) -> tuple[float, int]:
    """Play one script against a fresh relay and check what came of it; returns the
    worst loop lag (seconds) and the traced peak (bytes)."""
    wire = script.wire
    async with loopback_relay(max_message=MAX_MESSAGE, guard=refusing_guard) as lr:
        with measured() as (lag, peak):
            client_reads = asyncio.create_task(lr.client.close_code())
            upstream_reads = asyncio.create_task(lr.upstream.close_code())
            view, pos = memoryview(wire), 0
            with contextlib.suppress(ConnectionError):  # the relay may close first
                for size in [*chunks, len(wire)]:
                    if pos >= len(wire):
                        break
                    await lr.client.send(view[pos:pos + size])
                    pos += size
            result = await lr.result()
            client_code, upstream_code = await client_reads, await upstream_reads
        assert (result.initiator, result.code) == ("client", script.code), script.ending
        assert client_code == script.code
        assert upstream_code == 1001
        assert lr.upstream.data_frames() == script.relayed
        pongs = [bytes(f.data) for f in lr.client.frames if f.opcode == Opcode.PONG]
        if script.pings:
            assert pongs and pongs[-1] == script.pings[-1]
        rest = iter(script.pings)
        assert all(pong in rest for pong in pongs), "a pong for no ping, or out of order"
        texts = [bytes(f.data) for f in lr.client.frames if f.opcode == Opcode.TEXT]
        assert texts == [REFUSAL.encode()] * script.refused
    assert peak[0] < MEMORY_BOUND, f"{script.ending}: {peak[0]} bytes traced"
    return lag.worst, peak[0]


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as loop_runner:
        yield loop_runner


def fuzz_client_frame_sequences(runner: asyncio.Runner, examples: int) -> None:
    endings: dict[str, int] = {}
    worst_lag = 0.0

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(scripts())
    def run(drawn: tuple[Script, list[int]]) -> None:
        nonlocal worst_lag
        script, chunks = drawn
        lag, _ = runner.run(asyncio.wait_for(run_script(script, chunks), 60))
        if lag >= LAG_BOUND:
            again, _ = runner.run(asyncio.wait_for(run_script(script, chunks), 60))
            lag = min(lag, again)
        worst_lag = max(worst_lag, lag)
        endings[script.ending] = endings.get(script.ending, 0) + 1

    run()
    assert worst_lag < LAG_BOUND, f"the loop was held {worst_lag * 1000:.0f} ms"
    assert len(endings) >= 10, endings  # the grammar was explored, not one corner of it


def test_fuzz_client_frame_sequences(runner: asyncio.Runner) -> None:
    """150 scripts (1,000 under ``-m slow``): see the module docstring."""
    fuzz_client_frame_sequences(runner, EXAMPLES)


@pytest.mark.slow
def test_fuzz_client_frame_sequences_full_size(runner: asyncio.Runner) -> None:
    fuzz_client_frame_sequences(runner, SLOW_EXAMPLES)
