"""What the benchmark reads from Linux ``/proc`` (proc(5)): CPU time, RSS, open fds, core load.

All functions take a process id and read the live process; they raise ``OSError``
(usually ``FileNotFoundError``/``ProcessLookupError``) when the process is gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second, the unit of ``utime``/``stime`` in ``/proc/<pid>/stat``."""
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str]:
    """Fields of ``/proc/<pid>/stat`` after the command name (field 3 onwards)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), in seconds.

    From ``utime`` + ``stime`` (fields 14 and 15 of ``/proc/<pid>/stat``, clock ticks;
    resolution 1/``CLOCK_TICKS`` s, usually 10 ms).
    """
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def parent_pid(pid: int) -> int:
    """The parent process id (field 4 of ``/proc/<pid>/stat``)."""
    return int(_stat_fields(pid)[1])


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie has no VmRSS


def fd_count(pid: int) -> int:
    """Number of open file descriptors of ``pid`` (entries of ``/proc/<pid>/fd``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (scans ``/proc``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if parent_pid(int(entry)) == pid:
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (children, their children...), parents first: the
    processes of a relay whose CPU, RSS and fds are summed (nginx master + worker, a gateway
    supervisor + workers).  A snapshot: processes started later are not in it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parents.setdefault(parent_pid(int(entry)), []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        found.append(current)
        queue.extend(sorted(parents.get(current, [])))
    return found


def total_cpu_seconds(pids: Iterable[int]) -> float:
    """Sum of :func:`cpu_seconds` over ``pids``; processes already gone count 0."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def total_rss_bytes(pids: Iterable[int]) -> int:
    """Sum of :func:`rss_bytes` over ``pids`` (bytes); processes already gone count 0."""
    total = 0
    for pid in pids:
        try:
            total += rss_bytes(pid)
        except OSError:
            continue
    return total


def total_fds(pids: Iterable[int]) -> int:
    """Sum of :func:`fd_count` over ``pids``; processes already gone count 0."""
    total = 0
    for pid in pids:
        try:
            total += fd_count(pid)
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class CoreTimes:
    """Cumulative busy, steal and total time of one CPU core from ``/proc/stat``, in clock
    ticks.  Busy is everything but ``idle``, ``iowait`` and ``steal``; ``steal`` is time the
    hypervisor ran something else while this (virtual) core wanted to run."""

    busy: int
    total: int
    steal: int = 0


def core_times() -> dict[int, CoreTimes]:
    """``{core: CoreTimes}`` for every ``cpuN`` line of ``/proc/stat``."""
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        numbers = [int(v) for v in values[:8]]
        idle = numbers[3] + numbers[4]
        steal = numbers[7] if len(numbers) > 7 else 0
        cores[int(name[3:])] = CoreTimes(busy=sum(numbers) - idle - steal, total=sum(numbers),
                                         steal=steal)
    return cores


def core_busy_percent(before: dict[int, CoreTimes],
                      after: dict[int, CoreTimes]) -> dict[int, float]:
    """Per-core busy share between two :func:`core_times` samples, in percent (0-100)."""
    result = {}
    for core, end in after.items():
        start = before.get(core)
        if start is None or end.total <= start.total:
            continue
        result[core] = round(100.0 * (end.busy - start.busy) / (end.total - start.total), 1)
    return result


def core_steal_percent(before: dict[int, CoreTimes],
                       after: dict[int, CoreTimes]) -> dict[int, float]:
    """Per-core steal share between two :func:`core_times` samples, in percent (0-100)."""
    result = {}
    for core, end in after.items():
        start = before.get(core)
        if start is None or end.total <= start.total:
            continue
        result[core] = round(100.0 * (end.steal - start.steal) / (end.total - start.total), 1)
    return result


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``)."""
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
              "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def _tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """``{inode: (local port, remote port, state)}`` from ``/proc/net/tcp`` and ``tcp6``."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            found[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                            TCP_STATES.get(state, state))
    return found


def tcp_connections_to(pid: int, port: int) -> int:
    """How many of ``pid``'s open fds are TCP connections to 127.0.0.1:``port`` (any state)."""
    sockets = _tcp_sockets()
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        entry = sockets.get(target[8:-1]) if target.startswith("socket:[") else None
        if entry is not None and entry[1] == port and entry[2] != "LISTEN":
            count += 1
    return count


def fd_kinds(pid: int, port_names: dict[int, str]) -> dict[str, int]:
    """What the open fds of ``pid`` are, counted: ``"tcp ESTABLISHED to redis"``,
    ``"tcp LISTEN"``, ``"anon_inode:[eventpoll]"``, ``"file"``...

    A TCP socket is named by its state and the peer's port looked up in ``port_names``
    (``"client"`` when the local port is in it instead, i.e. an accepted connection).
    """
    sockets = _tcp_sockets()
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            entry = sockets.get(target[8:-1])
            if entry is None:
                kind = "socket (not TCP)"
            else:
                local, remote, state = entry
                if state == "LISTEN":
                    kind = "tcp LISTEN"
                elif remote in port_names:
                    kind = f"tcp {state} to {port_names[remote]}"
                elif local in port_names:
                    kind = f"tcp {state} from a {port_names[local]} client"
                else:
                    kind = f"tcp {state}"
        elif target.startswith(("anon_inode:", "pipe:")):
            kind = target
        else:
            kind = "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))
