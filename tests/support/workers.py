"""``serve --workers N`` for tests: which worker process holds a connection, and
connections placed on a chosen worker.

The kernel spreads connections over the workers' ``SO_REUSEPORT`` sockets by a hash of the
address pair, so a test cannot choose where a connection lands; it can see where it landed.
:func:`connection_owner` finds the process whose file table holds the accepted end of a
loopback connection (``/proc/net/tcp*`` for the socket's inode, ``/proc/<pid>/fd`` for its
owner), and :func:`socket_on_worker` opens connections until one is accepted by the wanted
worker (bounded: with N workers each try lands there with probability about 1/N).  Linux only;
the tests that use it run the gateway as real processes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.support.process import GatewayProcess

PROC = Path("/proc")
HOST = "127.0.0.1"


def worker_pids(gw: GatewayProcess) -> dict[int, int]:
    """Worker index → pid of its newest process, from the supervisor's ``worker.started``
    lines."""
    return {record["worker"]: record["pid"] for record in gw.events("worker.started")}


def _inodes(server_port: int, client_port: int) -> set[str]:
    """Inodes of the sockets whose local port is ``server_port`` and remote port
    ``client_port`` (the server's end of one loopback connection); 0 (not accepted yet) left
    out."""
    found = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (PROC / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if (int(local.rsplit(":", 1)[1], 16) == server_port
                        and int(remote.rsplit(":", 1)[1], 16) == client_port and inode != "0"):
                    found.add(inode)
    return found


def connection_owner(server_port: int, client_port: int, pids: Iterable[int]) -> int | None:
    """The pid of ``pids`` that has accepted the connection from local port ``client_port``
    to ``server_port``, or ``None`` (not accepted yet, or by none of them)."""
    inodes = _inodes(server_port, client_port)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(PROC / str(pid) / "fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(PROC / str(pid) / "fd" / fd) in targets:
                        return pid
    return None


async def owner_of(server_port: int, client_port: int, pids: Iterable[int],
                   within: float = 5.0) -> int:
    """:func:`connection_owner`, polled until a worker has accepted the connection.

    Raises:
        AssertionError: none of ``pids`` accepted it within ``within`` seconds.
    """
    candidates = list(pids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        owner = connection_owner(server_port, client_port, candidates)
        if owner is not None:
            return owner
        if loop.time() > deadline:
            raise AssertionError(f"no worker of {candidates} accepted :{client_port}")
        await asyncio.sleep(0.01)


async def socket_on_worker(port: int, pid: int, pids: Iterable[int],
                           attempts: int = 64) -> socket.socket:
    """A connected, non-blocking socket to ``127.0.0.1:port`` that worker ``pid`` accepted.

    Raises:
        AssertionError: ``attempts`` connections all landed elsewhere.
    """
    candidates = list(pids)
    for _ in range(attempts):
        sock = socket.create_connection((HOST, port), timeout=5)
        try:
            owner = await owner_of(port, sock.getsockname()[1], candidates)
        except BaseException:
            sock.close()
            raise
        if owner == pid:
            sock.setblocking(False)
            return sock
        sock.close()
    raise AssertionError(f"{attempts} connections to :{port}, none accepted by pid {pid}")


async def http_request(sock: socket.socket, method: str, path: str,
                       headers: Mapping[str, str] | None = None,
                       body: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 request on ``sock`` (closed after); ``(status, headers, JSON body or
    text)``."""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close",
                f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    header_block, _, content = raw.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    response_headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    text = content.decode(errors="replace")
    try:
        return status, response_headers, json.loads(text)
    except ValueError:
        return status, response_headers, text


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in exposition ``text`` that carry ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if (sample == name or sample.startswith(name + "{")) and all(
                f'{k}="{v}"' in sample for k, v in labels.items()):
            total += float(value)
    return total
