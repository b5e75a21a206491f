"""Stall probe: runs ``python -m gateway serve ...`` with instruments attached (issue 16).

``python -m bench.probe --out FILE -- serve --config ...`` runs the gateway's CLI in this
process after installing, all on the gateway's own clocks (``time.time()`` epoch seconds,
so they line up with the load generator's ``slow_rtts``):

* **loop lag**: a callback re-armed every :data:`LAG_TICK` seconds notes how late it runs;
  every lateness over :data:`LAG_EVENT_MS` is an event;
* **watchdog**: a thread that wakes every :data:`WATCH_TICK` seconds and, when the loop's
  heartbeat is older than :data:`STALL_MS`, records the main thread's Python stack once per
  stall (what the loop was doing) — and every 100 ms the process's run-queue wait
  (``/proc/self/schedstat``: time runnable but not running, i.e. another process or the
  hypervisor had the core), its context switches and the relay core's steal time;
* **GC**: ``gc.callbacks`` — every collection's generation and duration;
* **housekeeping**: each :meth:`gateway.housekeeping.Housekeeper.tick`'s duration;
* **Redis**: each command's latency (``redis.asyncio.Redis.execute_command``) and count.

At exit (the gateway drains and returns on SIGTERM) the events go to ``FILE`` as JSON lines:
``{"kind": "lag"|"stall"|"gc"|"tick"|"redis"|"sched", "t": epoch s, ...}``.  Bench code only:
nothing here is imported by the gateway.  ``python -m bench.probe analyse FILE LOADGEN_JSON``
lines the load generator's slow round trips up with the events (see :func:`analyse`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

LAG_TICK = 0.002
"""Seconds between two loop-lag callbacks."""
LAG_EVENT_MS = 2.0
"""A callback later than this (milliseconds) is recorded."""
WATCH_TICK = 0.002
"""Seconds between two watchdog checks."""
STALL_MS = 8.0
"""A heartbeat older than this (milliseconds) makes the watchdog take the loop's stack."""
SCHED_EVERY = 0.1
"""Seconds between two ``/proc`` scheduler readings."""
MAX_EVENTS = 200_000


class Probe:
    """The instruments; :meth:`dump` writes what they saw."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.events: list[dict[str, Any]] = []
        self.heartbeat = time.monotonic()
        self.main_thread = threading.get_ident()
        self._gc_started = 0.0
        self._stop = threading.Event()
        self._relay_cpu = self._cpu()

    def add(self, kind: str, **fields: Any) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append({"kind": kind, "t": round(time.time(), 4), **fields})

    # -- GC ----------------------------------------------------------------------------------

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_started) * 1000
        self.add("gc", gen=info["generation"], ms=round(ms, 3), collected=info["collected"])

    # -- loop lag ----------------------------------------------------------------------------

    def start_lag(self, loop: asyncio.AbstractEventLoop) -> None:
        expected = loop.time() + LAG_TICK

        def tick() -> None:
            nonlocal expected
            now = loop.time()
            late_ms = (now - expected) * 1000
            self.heartbeat = time.monotonic()
            if late_ms > LAG_EVENT_MS:
                self.add("lag", ms=round(late_ms, 3))
            expected = now + LAG_TICK
            loop.call_at(expected, tick)

        loop.call_at(expected, tick)

    # -- watchdog ----------------------------------------------------------------------------

    @staticmethod
    def _cpu() -> int:
        with open("/proc/stat") as stat:
            cpus = [line.split() for line in stat if line.startswith("cpu") and line[3] != " "]
        me = sorted(os.sched_getaffinity(0))[0]
        fields = next(f for f in cpus if f[0] == f"cpu{me}")
        return int(fields[8])  # steal, in USER_HZ ticks

    def watch(self) -> None:
        stalled = False
        next_sched = time.monotonic()
        last = self._sched()
        while not self._stop.wait(WATCH_TICK):
            now = time.monotonic()
            age_ms = (now - self.heartbeat) * 1000
            if age_ms > STALL_MS and not stalled:
                stalled = True
                frame = sys._current_frames().get(self.main_thread)
                stack = traceback.format_stack(frame, limit=12) if frame else []
                self.add("stall", age_ms=round(age_ms, 2),
                         stack=[line.strip().replace("\n", " | ") for line in stack])
            elif age_ms <= STALL_MS:
                stalled = False
            if now >= next_sched:
                next_sched = now + SCHED_EVERY
                current = self._sched()
                delta = {k: current[k] - last[k] for k in current}
                last = current
                if delta["runqueue_ms"] > 2 or delta["steal_ticks"] or delta["nonvol"] > 5:
                    self.add("sched", **delta)

    def _sched(self) -> dict[str, float]:
        with open("/proc/self/schedstat") as f:
            run_ns, wait_ns, _ = (int(x) for x in f.read().split())
        vol = nonvol = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    nonvol = int(line.split()[1])
        return {"cpu_ms": run_ns / 1e6, "runqueue_ms": wait_ns / 1e6, "vol": vol,
                "nonvol": nonvol, "steal_ticks": self._cpu()}

    # -- wrappers ----------------------------------------------------------------------------

    def timed(self, kind: str, func: Callable[..., Coroutine[Any, Any, Any]],
              threshold_ms: float, name: Callable[[tuple[Any, ...]], str] | None = None
              ) -> Callable[..., Coroutine[Any, Any, Any]]:
        probe = self

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            t = time.time()
            try:
                return await func(*args, **kwargs)
            finally:
                ms = (time.perf_counter() - started) * 1000
                if ms > threshold_ms:
                    fields: dict[str, Any] = {"ms": round(ms, 3), "start": round(t, 4)}
                    if name is not None:
                        fields["what"] = name(args)
                    probe.add(kind, **fields)

        return wrapper

    def install(self) -> None:
        gc.callbacks.append(self.on_gc)
        from gateway import server
        from gateway.housekeeping import Housekeeper

        tick = Housekeeper.tick

        async def timed_tick(housekeeper: Housekeeper) -> None:
            started = time.perf_counter()
            t = time.time()
            await tick(housekeeper)
            self.add("tick", ms=round((time.perf_counter() - started) * 1000, 3),
                     start=round(t, 4), sessions=len(housekeeper._registry.sessions))

        Housekeeper.tick = timed_tick  # type: ignore[method-assign,assignment]
        try:
            from redis.asyncio.client import Redis
        except ImportError:
            pass
        else:
            Redis.execute_command = self.timed(  # type: ignore[method-assign]
                "redis", Redis.execute_command, 0.0,
                lambda args: str(args[1])[:16] if len(args) > 1 else "")
        serve = server.serve

        async def probed_serve(*args: Any, **kwargs: Any) -> None:
            self.start_lag(asyncio.get_running_loop())
            threading.Thread(target=self.watch, name="probe-watchdog", daemon=True).start()
            await serve(*args, **kwargs)

        server.serve = probed_serve
        atexit.register(self.dump)

    def dump(self) -> None:
        self._stop.set()
        with self.out.open("w") as f:
            for event in self.events:
                f.write(json.dumps(event) + "\n")


def analyse(probe_file: Path, loadgen_file: Path, slow_ms: float = 10.0) -> dict[str, Any]:
    """Line up the load generator's slow round trips with the probe's events.

    ``loadgen_file``: the load generator's report, or a bench result file (its first
    gateway run), with ``slow_rtts``: ``[epoch ms of the send, round trip ms, epoch ms of
    the append's arrival at the upstream or None]``.  Each slow round trip (over
    ``slow_ms``) is split into its way up (send → arrival) and down (arrival → reply), and
    the probe's events inside ``[send, send + rtt]`` are counted by kind; ``explained``
    counts the slow round trips during which the gateway's loop was late by at least half
    the excess (``lag``/``stall``) or the process waited for its core (``sched``).
    """
    events = [json.loads(line) for line in probe_file.read_text().splitlines() if line]
    report = json.loads(loadgen_file.read_text())
    if "runs" in report:  # a bench result file: the (first) gateway run's load generator
        runs = report["runs"]["gateway"]
        report = (runs[0] if isinstance(runs, list) else runs)["loadgen"]
    slow = [(row[0] / 1000, row[1], row[2] / 1000 if len(row) > 2 and row[2] else None)
            for row in report.get("slow_rtts", []) if row[1] > slow_ms]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_kind.setdefault(event["kind"], []).append(event)
    overlap: dict[str, int] = {}
    explained = up_longer = 0
    for sent, ms, arrived in slow:
        end = sent + ms / 1000
        if arrived is not None and arrived - sent > end - arrived:
            up_longer += 1
        worst_lag = 0.0
        for kind, items in by_kind.items():
            inside = [e for e in items if sent - 0.002 <= e.get("start", e["t"]) <= end]
            if inside:
                overlap[kind] = overlap.get(kind, 0) + 1
            if kind in ("lag", "stall"):
                worst_lag = max([worst_lag, *(e.get("ms", e.get("age_ms", 0)) for e in inside)])
            if kind == "sched" and any(e["runqueue_ms"] > 5 for e in inside):
                worst_lag = max(worst_lag, ms)
        explained += worst_lag >= (ms - slow_ms) / 2
    gcs = by_kind.get("gc", [])
    return {
        "slow_rtts": len(slow),
        "way_up_longer": up_longer,
        "explained_by_gateway_loop_or_core": explained,
        "overlapping": overlap,
        "gc": {g: {"count": sum(1 for e in gcs if e["gen"] == g),
                   "max_ms": max((e["ms"] for e in gcs if e["gen"] == g), default=0)}
               for g in (0, 1, 2)},
        "lag_events": len(by_kind.get("lag", [])),
        "lag_max_ms": max((e["ms"] for e in by_kind.get("lag", [])), default=0),
        "stalls": [{"t": e["t"], "age_ms": e["age_ms"], "stack": e["stack"][-3:]}
                   for e in by_kind.get("stall", []) if e["age_ms"] > 20][:10],
        "ticks_max_ms": max((e["ms"] for e in by_kind.get("tick", [])), default=0),
        "redis_calls": len(by_kind.get("redis", [])),
        "redis_max_ms": max((e["ms"] for e in by_kind.get("redis", [])), default=0),
        "runqueue_ms_total": round(sum(e["runqueue_ms"] for e in by_kind.get("sched", [])), 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "analyse":
        parser = argparse.ArgumentParser(prog="python -m bench.probe analyse")
        parser.add_argument("probe", type=Path)
        parser.add_argument("loadgen", type=Path)
        parser.add_argument("--slow-ms", type=float, default=10.0)
        ns = parser.parse_args(args[1:])
        print(json.dumps(analyse(ns.probe, ns.loadgen, ns.slow_ms), indent=1))
        return 0
    if "--" not in args:
        print("usage: python -m bench.probe --out FILE -- serve ...", file=sys.stderr)
        return 2
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="python -m bench.probe")
    parser.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args(args[:split])
    Probe(ns.out).install()
    from gateway.cli import main as gateway_main

    return gateway_main(args[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
