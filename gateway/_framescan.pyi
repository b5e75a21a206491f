"""Types of the C frame scan (``gateway/_framescan.c``; the docs are there)."""

def scan_client(data: bytes, pos: int, room: int, pool: bytes, pool_pos: int,
                guarded_a: bytes | None, guarded_b: bytes | None
                ) -> tuple[int, bytes | None, int, int, int]: ...

def scan_upstream(data: bytes, pos: int, room: int, marker_a: bytes, marker_b: bytes
                  ) -> tuple[int, int, int]: ...
