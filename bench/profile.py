"""Where the gateway's CPU goes: a summary of py-spy's collapsed stacks (``--format raw``).

A collapsed stack is one line ``frame;frame;...;leaf COUNT`` (root first), each frame
``function (path:line)``.  With ``py-spy record --native`` C frames are included
(``loop.c`` is uvloop, ``core.c``/``stream.c``/``linux.c`` libuv, ``libc.so.6`` the
system-call wrappers), which is what separates the event loop and the kernel from Python.

* Idle samples are dropped: a thread blocked in ``epoll_wait`` or a thread-pool worker
  waiting for work (py-spy's own idle detection misses both under ``--native``).
* Each remaining sample goes to one *component*: walking from the leaf towards the root,
  the first uvloop/libuv C frame or the first Python frame of a known package decides
  (so a ``write`` issued by uvloop counts as event loop + socket I/O, and the
  ``getrandom`` under ``websockets/frames.py`` counts as websockets).
* Samples whose leaf is a libc function are also counted by that function: these are
  system calls (time in the kernel, including loopback TCP work done on the caller's CPU).

Shares are converted into microseconds per relayed message with the CPU figure of a
measured (unprofiled) run.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

COMPONENTS: tuple[tuple[str, str], ...] = (
    ("gateway/relay.py", "gateway relay pumps"),
    ("gateway/usage.py", "gateway usage tap"),
    ("gateway/limits/", "gateway limiter (admission, usage charges)"),
    ("gateway/session.py", "gateway session (handshake, housekeeping)"),
    ("gateway/", "gateway other"),
    ("uvicorn/protocols/websockets", "uvicorn WebSocket server (client side)"),
    ("uvicorn/", "uvicorn other"),
    ("starlette/", "starlette"),
    ("websockets/asyncio", "websockets asyncio client (upstream side)"),
    ("websockets/", "websockets Sans-I/O protocol (frames, both sides)"),
    ("redis/", "redis-py (admission, usage charges)"),
    ("prometheus_client/", "prometheus_client"),
    ("structlog/", "structlog"),
    ("logging/", "logging"),
    ("joserfc/", "joserfc (token validation)"),
    ("cryptography/", "cryptography"),
    ("asyncio/", "asyncio (tasks, futures, queues, timeouts)"),
    ("_asynciomodule.c", "asyncio (tasks, futures, queues, timeouts)"),
)
"""Path fragment → component, first match wins (more specific fragments first)."""

EVENT_LOOP = "uvloop / libuv (event loop, socket I/O)"
EVENT_LOOP_FILES = ("loop.c", "core.c", "stream.c", "linux.c", "loop-watcher.c", "queue.h",
                    "uv-common.c", "timer.c", "tcp.c", "handles/", "uvloop")
UNATTRIBUTED = "other (interpreter, unattributed)"
IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "epoll_pwait2")

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    """One stack frame: ``function`` and ``path`` (empty for a frame py-spy printed bare)."""

    function: str
    path: str

    @classmethod
    def parse(cls, text: str) -> Frame:
        match = _FRAME.match(text)
        if match is None:
            return cls(text, "")
        return cls(match["function"], match["path"])

    @property
    def is_python(self) -> bool:
        return self.path.endswith(".py")

    @property
    def is_libc(self) -> bool:
        return self.path.startswith("libc.so")

    @property
    def short(self) -> str:
        """``function (file)`` with the path cut after ``site-packages/`` or ``python3.X/``."""
        path = re.sub(r"^.*?(site-packages|python3\.\d+)/", "", self.path)
        return f"{self.function} ({path})" if path else self.function


Stack = tuple[list[Frame], int]


def parse_collapsed(lines: Iterable[str]) -> list[Stack]:
    """``[(frames root→leaf, samples)]`` from py-spy's raw (collapsed) output."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        frames = [Frame.parse(f) for f in body.split(";") if f]
        stacks.append((frames, int(count)))
    return stacks


def is_idle(frames: list[Frame]) -> bool:
    """True for a sample of a thread waiting: in ``epoll_wait`` or a pool worker's queue get."""
    if frames and frames[-1].function in IDLE_LEAVES:
        return True
    return any(f.function == "_worker" and "concurrent/futures/thread.py" in f.path
               for f in frames)


def component_of(frames: list[Frame]) -> str:
    """The component of a sample (see the module docstring)."""
    for frame in reversed(frames):
        if not frame.is_python and any(name in frame.path for name in EVENT_LOOP_FILES):
            return EVENT_LOOP
        for fragment, name in COMPONENTS:
            if fragment in frame.path:
                return name
    return UNATTRIBUTED


def syscall_of(frames: list[Frame]) -> str | None:
    """The libc function a sample is in (``"write"``, ``"getrandom"``...), or ``None``."""
    if frames and frames[-1].is_libc:
        name = frames[-1].function
        return "libc (unresolved symbol)" if name.startswith("0x") else name
    return None


@dataclass(frozen=True)
class ProfileSummary:
    """Shares (0-1) of the active samples: by component, by system call, by Python leaf
    function (self time) and the inclusive share of selected gateway functions."""

    samples: int
    idle_samples: int
    components: list[tuple[str, float]]
    syscalls: list[tuple[str, float]]
    self_time: list[tuple[str, float]]
    inclusive: list[tuple[str, float]]


INCLUSIVE = (
    ("Relay._client_to_upstream", "gateway/relay.py"),
    ("Relay._upstream_to_client", "gateway/relay.py"),
    ("LiveSession.housekeeping", "gateway/session.py"),
    ("handle", "gateway/session.py"),
    ("tap", "gateway/usage.py"),
    ("data_received", "uvicorn/protocols/websockets"),
)


def summarise(stacks: list[Stack], top: int = 15) -> ProfileSummary:
    """Aggregate parsed stacks into a :class:`ProfileSummary` (``top`` rows per list)."""
    components: Counter[str] = Counter()
    syscalls: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    active = idle = 0
    for frames, count in stacks:
        if is_idle(frames):
            idle += count
            continue
        active += count
        components[component_of(frames)] += count
        syscalls[syscall_of(frames) or "(user space)"] += count
        python = [f for f in frames if f.is_python]
        if python:
            leaves[python[-1].short] += count
        for function, path in INCLUSIVE:
            if any(f.function.endswith(function) and path in f.path for f in frames):
                inclusive[f"{function} ({path})"] += count
    total = active or 1
    return ProfileSummary(
        samples=active,
        idle_samples=idle,
        components=[(k, v / total) for k, v in components.most_common()],
        syscalls=[(k, v / total) for k, v in syscalls.most_common(top)],
        self_time=[(k, v / total) for k, v in leaves.most_common(top)],
        inclusive=[(k, v / total) for k, v in inclusive.most_common()],
    )


def profile_markdown(summary: ProfileSummary, cpu_us_per_message: float | None) -> str:
    """The summary as Markdown; with ``cpu_us_per_message`` each share is also shown in
    microseconds per relayed message (share x the unprofiled run's CPU per message)."""
    def us(share: float) -> str:
        return f"{share * cpu_us_per_message:.1f}" if cpu_us_per_message else "—"

    lines = [f"py-spy: {summary.samples} active samples ({summary.idle_samples} idle dropped)",
             "", "| component | share | µs per relayed message |", "|---|---:|---:|"]
    lines += [f"| {name} | {share:.1%} | {us(share)} |" for name, share in summary.components]
    if any(name != "(user space)" for name, _ in summary.syscalls):  # only with --native
        lines += ["", "| in a system call (libc leaf) | share | µs/msg |", "|---|---:|---:|"]
        lines += [f"| `{name}` | {share:.1%} | {us(share)} |"
                  for name, share in summary.syscalls]
    lines += ["", "| inclusive (function and all it calls) | share | µs/msg |",
              "|---|---:|---:|"]
    lines += [f"| `{name}` | {share:.1%} | {us(share)} |" for name, share in summary.inclusive]
    lines += ["", "| innermost Python function (its own time and the C it calls) | share |",
              "|---|---:|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in summary.self_time]
    return "\n".join(lines) + "\n"


# -- perf (Linux perf_events): where the cycles go by binary, by system call -----------------

_PERF_LINE = re.compile(r"^\s*(?P<pct>\d+(?:\.\d+)?)%\s+(?:(?P<pct2>\d+(?:\.\d+)?)%\s+)?"
                        r"(?P<rest>\S.*?)\s*$")


@dataclass(frozen=True)
class PerfSummary:
    """Shares (0-1) of the gateway's sampled CPU cycles from ``perf record -g``:
    ``binaries`` by shared object (kernel, libpython, uvloop, libc...), ``syscalls`` the
    share spent inside each system call (kernel entry ``__x64_sys_*`` and everything it
    calls), ``symbols`` the hottest functions by self time."""

    binaries: list[tuple[str, float]]
    syscalls: list[tuple[str, float]]
    symbols: list[tuple[str, float]]


def parse_perf_dso(text: str) -> list[tuple[str, float]]:
    """``perf report --no-children --sort dso --stdio -q -g none`` → ``[(dso, share)]``."""
    rows = []
    for line in text.splitlines():
        match = _PERF_LINE.match(line)
        if match:
            rows.append((_short_dso(match["rest"]), float(match["pct"]) / 100))
    return rows


_SYSCALL_ENTRY = re.compile(r"^(?:__x64_sys_|__do_sys_|ksys_|__se_sys_)(?P<name>\w+)$")


def parse_perf_syscalls(text: str) -> list[tuple[str, float]]:
    """``perf report --children --sort sym --stdio -q -g none`` → ``[(syscall, share)]``.

    A system call's share is the inclusive (children) share of its kernel entry point
    (``__x64_sys_NAME``, ``__do_sys_NAME`` or ``ksys_NAME``, the largest when several
    appear); ``"all system calls"`` is ``do_syscall_64``'s.
    """
    shares: dict[str, float] = {}
    for line in text.splitlines():
        match = _PERF_LINE.match(line)
        if not match:
            continue
        symbol = match["rest"].split()[-1]
        share = float(match["pct"]) / 100
        if symbol == "do_syscall_64":
            shares["all system calls"] = max(share, shares.get("all system calls", 0.0))
            continue
        entry = _SYSCALL_ENTRY.match(symbol)
        if entry:
            name = entry["name"]
            shares[name] = max(share, shares.get(name, 0.0))
    return sorted(shares.items(), key=lambda row: -row[1])


def parse_perf_symbols(text: str, top: int = 15) -> list[tuple[str, float]]:
    """``perf report --no-children --sort dso,sym --stdio -q -g none`` → the ``top``
    ``("symbol (dso)", share)`` rows."""
    rows = []
    for line in text.splitlines():
        match = _PERF_LINE.match(line)
        if not match:
            continue
        parts = match["rest"].split()
        if len(parts) < 3:
            continue
        dso, symbol = parts[0], " ".join(parts[2:])
        rows.append((f"{symbol} ({_short_dso(dso)})", float(match["pct"]) / 100))
    return rows[:top]


def _short_dso(dso: str) -> str:
    dso = dso.strip()
    if dso.startswith("[kernel"):
        return "kernel"
    return dso.rsplit("/", 1)[-1]


def perf_markdown(summary: PerfSummary, cpu_us_per_message: float | None) -> str:
    """A :class:`PerfSummary` as Markdown, with µs per relayed message when known."""
    def us(share: float) -> str:
        return f"{share * cpu_us_per_message:.1f}" if cpu_us_per_message else "—"

    lines = ["| binary (perf, self time) | share | µs/msg |", "|---|---:|---:|"]
    lines += [f"| `{name}` | {share:.1%} | {us(share)} |"
              for name, share in summary.binaries if share >= 0.005]
    lines += ["", "| system call (perf, inclusive kernel time) | share | µs/msg |",
              "|---|---:|---:|"]
    lines += [f"| `{name}` | {share:.1%} | {us(share)} |"
              for name, share in summary.syscalls if share >= 0.005]
    lines += ["", "| hottest functions (perf, self time) | share |", "|---|---:|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in summary.symbols]
    return "\n".join(lines) + "\n"
