"""Real ``redis-server`` processes for tests: one server, or a three-node Redis Cluster.

Each server listens on ``127.0.0.1`` on a free port (never 6379), keeps nothing on
disk (``--save "" --appendonly no``) and runs in its own temporary directory.
Skips the test (``pytest.skip``) when ``redis-server`` is not installed
(Debian: ``apt-get install -y redis-server``).

Synchronous and asynchronous forms of the same API, so module-scoped fixtures
(sync) and tests (async) can both use them::

    with RedisServer() as server:            # or: async with RedisServer() as server
        limiter = RedisLimiter(server.url)
        server.stop()                        # "Redis went away"
        server.start()                       # "Redis restarted", same port, empty

    async with RedisClusterServer() as cluster:   # three primaries, all slots covered
        limiter = RedisLimiter(cluster.url)       # redis+cluster://127.0.0.1:<port>

``client()`` returns a new redis-py asyncio client (the caller closes it) for
arranging or inspecting state (``FLUSHALL``, ``ZCARD``...).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0
CLUSTER_SLOTS = 16384


def redis_server_path() -> str | None:
    """The ``redis-server`` executable on ``PATH``, or ``None``."""
    return shutil.which("redis-server")


def require_redis_server() -> str:
    """The ``redis-server`` executable; skips the calling test when it is missing."""
    path = redis_server_path()
    if path is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _command(host: str, port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one inline command over a plain socket and return the raw reply (no redis-py:
    usable from sync fixtures and threads)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_encode(args))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
            if _complete(data):
                return data


def _encode(args: tuple[str, ...]) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _complete(data: bytes) -> bool:
    """True when ``data`` holds one whole simple, error, integer or bulk reply."""
    if not data.endswith(b"\r\n"):
        return False
    if data[:1] in (b"+", b"-", b":"):
        return True
    if data[:1] == b"$":
        header, _, rest = data.partition(b"\r\n")
        size = int(header[1:])
        return size < 0 or len(rest) >= size + 2
    return True


class RedisServer:
    """One ``redis-server`` on ``127.0.0.1:<port>``.

    Args:
        directory: working directory (default: a new temporary one, removed on exit).
        port: fixed port (default: a free one, chosen at the first start and kept,
            so :meth:`restart` comes back on the same address).
        cluster: start with ``cluster-enabled yes`` (see :class:`RedisClusterServer`).

    :meth:`stop` and :meth:`start` may be called repeatedly; every start is empty.
    """

    def __init__(
        self, directory: Path | None = None, *, port: int | None = None, cluster: bool = False
    ) -> None:
        self._executable = require_redis_server()
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="redis-")) if directory is None else directory
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port()
        self.cluster = cluster
        self.bus_port = free_port() if cluster else 0
        """The cluster bus port (``cluster-port``; 0 when not a cluster node)."""
        self._started_once = False
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return HOST

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    def client(self) -> Redis:
        """A new asyncio client for this server (``decode_responses=True``); close it."""
        return Redis(host=HOST, port=self.port, decode_responses=True, socket_timeout=2.0)

    def command(self, *args: str) -> bytes:
        """Run one command synchronously and return the raw RESP reply."""
        return _command(HOST, self.port, *args)

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers ``PING``.

        The first start of a server whose port was picked automatically retries
        on new ports if the picked one was taken meanwhile.

        Raises:
            RuntimeError: it exited or did not answer within ``START_TIMEOUT_SECONDS``.
        """
        if self.running:
            return
        attempts = 1 if self._port_fixed or self._started_once else 3
        for attempt in range(attempts):
            try:
                self._start_once()
            except _EarlyExit:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
                if self.cluster:
                    self.bus_port = free_port()
                continue
            self._started_once = True
            return

    def _start_once(self) -> None:
        log_file = self.directory / f"redis-{self.port}.log"
        args = [
            self._executable,
            "--bind", HOST,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--logfile", str(log_file),
        ]
        if self.cluster:
            nodes_file = self.directory / f"nodes-{self.port}.conf"
            nodes_file.unlink(missing_ok=True)
            args += [
                "--cluster-enabled", "yes",
                "--cluster-port", str(self.bus_port),
                "--cluster-config-file", str(nodes_file),
                "--cluster-node-timeout", "5000",
            ]
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                tail = log_file.read_text(errors="replace")[-500:] if log_file.exists() else ""
                raise _EarlyExit(f"redis-server on port {self.port} exited with {code}: {tail}")
            try:
                if self.command("PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.01)  # polling the process start, bounded by the deadline

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_SECONDS``)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_SECONDS)

    def restart(self) -> None:
        """Stop, then start again on the same port, with no data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory (if it made one)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def astart(self) -> None:
        """:meth:`start` in a worker thread."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """:meth:`stop` in a worker thread."""
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> None:
        """:meth:`restart` in a worker thread."""
        await asyncio.to_thread(self.restart)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)


class RedisClusterServer:
    """A Redis Cluster of ``size`` primaries (default 3, no replicas) on 127.0.0.1.

    Slots are split evenly with ``CLUSTER ADDSLOTSRANGE``, the nodes meet with
    ``CLUSTER MEET``, and :meth:`start` waits (bounded) until every node reports
    ``cluster_state:ok`` and knows all the others.
    """

    def __init__(self, size: int = 3) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        require_redis_server()
        self.directory = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.nodes = tuple(RedisServer(self.directory, cluster=True) for _ in range(size))

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<first node port>`` (the gateway's cluster URL form)."""
        return f"redis+cluster://{HOST}:{self.nodes[0].port}"

    def client(self) -> RedisCluster:
        """A new asyncio cluster client (``decode_responses=True``); close it."""
        return RedisCluster(host=HOST, port=self.nodes[0].port, decode_responses=True)

    def start(self, timeout: float = 20.0) -> None:
        """Start the nodes, assign slots, join them, wait for ``cluster_state:ok``.

        Raises:
            RuntimeError: the cluster did not become healthy within ``timeout`` seconds.
        """
        for node in self.nodes:
            node.start()
        size = len(self.nodes)
        for index, node in enumerate(self.nodes):
            first = index * CLUSTER_SLOTS // size
            last = (index + 1) * CLUSTER_SLOTS // size - 1
            _expect_ok(node.command("CLUSTER", "SET-CONFIG-EPOCH", str(index + 1)))
            _expect_ok(node.command("CLUSTER", "ADDSLOTSRANGE", str(first), str(last)))
        for node in self.nodes[1:]:
            _expect_ok(self.nodes[0].command(
                "CLUSTER", "MEET", HOST, str(node.port), str(node.bus_port)
            ))
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)  # polling gossip convergence, bounded by the deadline

    def _healthy(self) -> bool:
        want = f"cluster_known_nodes:{len(self.nodes)}".encode()
        for node in self.nodes:
            info = node.command("CLUSTER", "INFO")
            if b"cluster_state:ok" not in info or want not in info:
                return False
        return True

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and remove the temporary directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)


class _EarlyExit(RuntimeError):
    """redis-server exited during start-up (e.g. its port was taken meanwhile)."""


def _expect_ok(reply: bytes) -> None:
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"unexpected Redis reply: {reply[:200]!r}")
