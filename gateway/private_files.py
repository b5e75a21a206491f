"""Private files written atomically: the dev issuer's key and the dev TLS files.

A file is written to a temporary name beside its target with mode 0600 (whatever the
umask), flushed and fsynced, then put in place in one step, so a reader never sees a
partial file and no other user can read the key at any moment.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

PRIVATE_MODE = stat.S_IRUSR | stat.S_IWUSR
"""0600: read and write for the owner only."""


def write_private(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` with mode 0600.

    ``replace``: put it in place over any existing file (``os.replace``); otherwise create
    it only if it does not exist yet (``os.link``: another process that won the race keeps
    its file).  Returns ``True`` when this call's data is now at ``path``.

    Raises:
        OSError: the directory is missing or not writable, the disk is full ...
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, PRIVATE_MODE)  # despite any umask
        if replace:
            os.replace(temp, path)
            return True
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
