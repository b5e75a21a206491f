"""Types of the C frame scan (``gateway/_framescan.c``; the docs are there)."""

from collections.abc import Callable

def scan_client(data: bytes, pos: int, room: int, pool: bytes, pool_pos: int,
                guarded_a: bytes | None, guarded_b: bytes | None
                ) -> tuple[int, bytes | None, int, int, int]: ...

def scan_upstream(data: bytes, pos: int, room: int, marker_a: bytes, marker_b: bytes
                  ) -> tuple[int, int, int]: ...

class Receiver:
    """A relay side's ``data_received`` in C (see ``gateway/_framescan.c``)."""

    messages: int
    payload_bytes: int
    active: bool

    def __init__(self, fallback: Callable[[bytes], None],
                 write: Callable[[bytes], object], client: bool, room: int,
                 needle_a: bytes | None, needle_b: bytes | None,
                 urandom: Callable[[int], bytes]) -> None: ...

    def __call__(self, data: bytes) -> None: ...
