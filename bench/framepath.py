"""Micro-benchmark of the relay's per-frame work (issue 16), without sockets.

``python -m bench.framepath [--frames 200000] [--pure]`` feeds the bench's frames — a
1,359-byte masked ``input_audio_buffer.append`` from the client, a 1,400-byte
``response.output_audio.delta`` from the upstream — one read each into
:class:`gateway.relay.Relay`'s two sides, with transports that drop what is written, and
prints nanoseconds per frame (the best of 5 rounds) for each direction.  ``--pure`` turns
the C frame scan off (:data:`gateway.relay.FRAMESCAN` = ``None``) to measure the fallback.

It measures only the interpreter's (and the scan's) share: the kernel's ``read``/``write``
per message is not in it.  Run it under ``valgrind --tool=callgrind`` for instruction
counts that do not depend on what else the machine does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import time
from typing import Any

from websockets.frames import Frame, Opcode

from gateway import relay


class NullTransport(asyncio.Transport):
    """A transport that accepts and drops every write."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def frames(chunk_bytes: int = 960) -> tuple[bytes, bytes]:
    """The bench's client append (masked) and upstream delta (unmasked), as on the wire."""
    audio = base64.b64encode(os.urandom(chunk_bytes)).decode()
    append = json.dumps({"type": "input_audio_buffer.append", "event_id": "event_bench_append",
                         "audio": audio}, separators=(",", ":")).encode()
    delta = json.dumps({"type": "response.output_audio.delta", "event_id": "t0001796218974895.1",
                        "response_id": "resp_bench", "item_id": "item_bench",
                        "output_index": 0, "content_index": 0, "delta": audio},
                       separators=(",", ":")).encode()
    client = Frame(Opcode.TEXT, append).serialize(mask=True, extensions=[])
    upstream = Frame(Opcode.TEXT, delta).serialize(mask=False, extensions=[])
    return client, upstream


async def measure(count: int, rounds: int = 5) -> dict[str, Any]:
    client_frame, upstream_frame = frames()
    client, upstream = NullTransport(), NullTransport()
    session = relay.Relay(client, upstream, lambda usage: None, lambda payload: None,
                          max_client_message=15 * 2**20, max_upstream_message=15 * 2**20,
                          ping_interval=None, ping_timeout=None)
    session.start()
    results: dict[str, Any] = {"framescan": relay.FRAMESCAN is not None}
    for name, side, frame in (("client_to_upstream", session._client, client_frame),
                              ("upstream_to_client", session._upstream, upstream_frame)):
        receive = side.data_received
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter_ns()
            for _ in range(count):
                receive(frame)
            best = min(best, (time.perf_counter_ns() - started) / count)
        results[name + "_ns"] = round(best)
    results["forwarded_bytes"] = upstream.written + client.written
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.framepath")
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--pure", action="store_true", help="without the C frame scan")
    args = parser.parse_args()
    if args.pure:
        relay.FRAMESCAN = None
    print(json.dumps(asyncio.run(measure(args.frames))))


if __name__ == "__main__":
    main()
