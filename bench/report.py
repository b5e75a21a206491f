"""Benchmark results: derived numbers, medians of repeated runs, the bar of issue 16
(PASS/FAIL, on the medians) and the Markdown tables.

Pure functions over the measurements :mod:`bench.run` takes.  Units: times in
milliseconds (``_ms``) or microseconds (``_us``), sizes in bytes unless a name says
``_mib`` (2**20 bytes) or ``_kib`` (1024 bytes).

Definitions (also in ``bench/README.md``):

* *relayed message* — one WebSocket message forwarded once by the relay, in either
  direction: appends client → upstream plus deltas and usage events upstream → client,
  counted by the load generator inside the measurement window;
* *CPU per relayed message* — the relay's ``utime + stime`` (``/proc/<pid>/stat``, all
  processes of the relay) over the window, divided by the relayed messages;
* *added p50/p99* — the relay's round-trip percentile minus the direct path's
  (a difference of percentiles, not a percentile of differences);
* *RSS per session* — (RSS with every session live - RSS at rest before the run) / sessions,
  taking the larger of the RSS at the end of the window and with the sessions idle;
* *medians* — with ``--repeat N`` each relay ran N times, interleaved with the others
  (direct, nginx, gateway, direct, ...); every number of :func:`derived` is computed per
  run (``added_*`` against the direct run of the same round) and its median over the N
  runs is what the bar judges.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KIB = 1024
MIB = 1024 * 1024

BAR_SESSIONS = 200
BAR_CPU_VS_NGINX = 1.3
BAR_ADDED_P99_MS = 2.0
"""Added round-trip p99 limit floor, ms; the limit is the larger of this and nginx's added
p99 + :data:`BAR_ADDED_P99_OVER_NGINX_MS`."""
BAR_ADDED_P99_OVER_NGINX_MS = 1.0
BAR_RSS_PER_SESSION_KIB = 30.0
BAR_RSS_REST_MIB = 80.0
BAR_HANDSHAKE_P50_MS = 3.0

Figures = dict[str, float | None]
"""The numbers of :func:`derived` for one relay (or their medians), by key."""

SOAK_RSS_GROWTH = 0.05
SOAK_FD_SLACK = 4
"""Open fds (beyond two per live session) a soak may end with over its warm-up value:
handshakes and closes in flight at the moment of the sample."""


@dataclass
class RelayRun:
    """What one relay measured in one run (see the module docstring for definitions).

    ``pids`` empty (the direct path) leaves every relay-side number ``None``.
    ``loadgen`` is the load generator's ``report`` object (``bench/loadgen.mjs``).
    ``cpu_seconds`` and ``wall_seconds`` cover the measurement window.
    """

    name: str
    sessions: int
    loadgen: dict[str, Any]
    wall_seconds: float
    cpu_seconds: float | None = None
    rss_rest: int | None = None
    rss_loaded: int | None = None
    rss_idle: int | None = None
    rss_after: int | None = None
    fds_rest: int | None = None
    fds_loaded: int | None = None
    fds_idle: int | None = None
    fds_after: int | None = None
    core_busy_percent: dict[int, float] = field(default_factory=dict)
    core_steal_percent: dict[int, float] = field(default_factory=dict)
    relay_core_by_second: list[dict[str, float]] = field(default_factory=list)
    """Each second of the window: the relay core's hypervisor steal and busy time, ms."""
    helper_cpu_percent: dict[str, float] = field(default_factory=dict)
    gateway_metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def relayed_messages(self) -> int:
        """Messages relayed in the window, both directions."""
        return int(self.loadgen["appends_in_window"]) + int(self.loadgen["received_in_window"])

    def rtt(self, quantile: str) -> float | None:
        """Round-trip ``quantile`` (``"p50"``, ``"p99"``...) of appends sent in the window, ms."""
        value = self.loadgen.get("rtt_ms", {}).get(quantile)
        return float(value) if value is not None else None

    def handshake(self, quantile: str) -> float | None:
        """Handshake ``quantile`` (open → 101), ms, measured by the load generator."""
        value = self.loadgen.get("handshake_ms", {}).get(quantile)
        return float(value) if value is not None else None

    @property
    def cpu_us_per_message(self) -> float | None:
        """Relay CPU microseconds per relayed message (``None`` for the direct path)."""
        if self.cpu_seconds is None or self.relayed_messages == 0:
            return None
        return self.cpu_seconds * 1e6 / self.relayed_messages

    @property
    def cpu_percent(self) -> float | None:
        """The relay's CPU use over the window in percent of one core."""
        if self.cpu_seconds is None or self.wall_seconds <= 0:
            return None
        return 100.0 * self.cpu_seconds / self.wall_seconds

    @property
    def rss_per_session(self) -> float | None:
        """Bytes of RSS per live session over the RSS at rest."""
        live = max(v for v in (self.rss_loaded, self.rss_idle, 0) if v is not None)
        if self.rss_rest is None or not live or self.sessions <= 0:
            return None
        return (live - self.rss_rest) / self.sessions


def derived(run: RelayRun, direct: RelayRun | None) -> dict[str, float | None]:
    """The table's numbers for ``run``; ``added_*`` need the ``direct`` run of the same run."""
    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    rss_session = run.rss_per_session
    return {
        "messages_per_s": float(run.loadgen.get("messages_per_s", 0)),
        "rtt_p50_ms": run.rtt("p50"),
        "rtt_p99_ms": run.rtt("p99"),
        "added_p50_ms": minus(run.rtt("p50"), direct.rtt("p50")) if direct is not run and direct
        else None,
        "added_p99_ms": minus(run.rtt("p99"), direct.rtt("p99")) if direct is not run and direct
        else None,
        "cpu_us_per_message": run.cpu_us_per_message,
        "cpu_percent": run.cpu_percent,
        "rss_rest_mib": run.rss_rest / MIB if run.rss_rest is not None else None,
        "rss_loaded_mib": run.rss_loaded / MIB if run.rss_loaded is not None else None,
        "rss_per_session_kib": rss_session / KIB if rss_session is not None else None,
        "handshake_p50_ms": run.handshake("p50"),
        "handshake_p99_ms": run.handshake("p99"),
    }


@dataclass(frozen=True)
class Verdict:
    """One criterion of the bar: what was measured, the limit, and whether it passed.

    ``passed`` is ``None`` when a number needed for it is missing (e.g. no nginx run).
    """

    criterion: str
    measured: str
    limit: str
    passed: bool | None

    @property
    def label(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def medians(rounds: Sequence[Mapping[str, RelayRun]]) -> dict[str, Figures]:
    """Per relay, the median of each :func:`derived` number over ``rounds`` (one mapping
    relay → run per round; ``added_*`` against the direct run of the same round).  A number
    missing in some runs is the median of the others; missing in all, ``None``."""
    values: dict[str, dict[str, list[float]]] = {}
    keys: dict[str, list[str]] = {}
    for runs in rounds:
        direct = runs.get("direct")
        for name, run in runs.items():
            figures = derived(run, direct)
            keys.setdefault(name, list(figures))
            per_key = values.setdefault(name, {})
            for key, value in figures.items():
                if value is not None:
                    per_key.setdefault(key, []).append(value)
    return {name: {key: statistics.median(values[name][key]) if values[name].get(key) else None
                   for key in keys[name]}
            for name in values}


def bar(runs: Mapping[str, RelayRun]) -> list[Verdict]:
    """The bar of issue 16 for one round of runs (``relay → run``); see :func:`bar_of`."""
    return bar_of(medians([runs]))


def bar_of(figures: Mapping[str, Figures]) -> list[Verdict]:
    """The gateway against the bar of issue 16 (defined at 200 sessions, all features on),
    judged on ``figures`` (:func:`medians`, or one run's :func:`derived` numbers):

    * CPU per relayed message ≤ :data:`BAR_CPU_VS_NGINX` x nginx's;
    * added round-trip p99 ≤ max(:data:`BAR_ADDED_P99_MS`, nginx's added p99 +
      :data:`BAR_ADDED_P99_OVER_NGINX_MS`) ms;
    * RSS per live session ≤ :data:`BAR_RSS_PER_SESSION_KIB` KiB;
    * RSS at rest ≤ :data:`BAR_RSS_REST_MIB` MiB;
    * handshake p50 ≤ direct's + :data:`BAR_HANDSHAKE_P50_MS` ms.

    Needs ``figures["gateway"]`` (else an empty list); ``direct`` and ``nginx`` for the
    relative criteria (``n/a`` without them).
    """
    gw = figures.get("gateway")
    if gw is None:
        return []
    direct, nginx = figures.get("direct") or {}, figures.get("nginx") or {}
    verdicts = []

    cpu, ref = gw["cpu_us_per_message"], nginx.get("cpu_us_per_message")
    name = f"CPU per relayed message ≤ {BAR_CPU_VS_NGINX} x nginx"
    if cpu is not None and ref:
        verdicts.append(Verdict(name, f"{cpu:.1f} µs = {cpu / ref:.2f} x nginx ({ref:.1f} µs)",
                                f"≤ {BAR_CPU_VS_NGINX * ref:.1f} µs",
                                cpu <= BAR_CPU_VS_NGINX * ref))
    else:
        verdicts.append(Verdict(name, _fmt(cpu, "µs"), "needs an nginx run", None))

    added, nginx_added = gw["added_p99_ms"], nginx.get("added_p99_ms")
    name = (f"added round-trip p99 ≤ max({BAR_ADDED_P99_MS:g} ms, nginx's "
            f"+ {BAR_ADDED_P99_OVER_NGINX_MS:g} ms)")
    if nginx_added is not None:
        limit = max(BAR_ADDED_P99_MS, nginx_added + BAR_ADDED_P99_OVER_NGINX_MS)
        verdicts.append(Verdict(name, f"{_fmt(added, 'ms', 2)} (nginx {nginx_added:.2f} ms)",
                                f"≤ {limit:.2f} ms", None if added is None else added <= limit))
    else:  # without nginx the limit is at least the floor: only a pass can be told
        verdicts.append(Verdict(name, _fmt(added, "ms", 2),
                                f"≥ {BAR_ADDED_P99_MS:g} ms (needs an nginx run)",
                                True if added is not None and added <= BAR_ADDED_P99_MS
                                else None))

    kib = gw["rss_per_session_kib"]
    verdicts.append(Verdict(f"RSS per live session ≤ {BAR_RSS_PER_SESSION_KIB:g} KiB",
                            _fmt(kib, "KiB"), f"≤ {BAR_RSS_PER_SESSION_KIB:g} KiB",
                            None if kib is None else kib <= BAR_RSS_PER_SESSION_KIB))

    rest = gw["rss_rest_mib"]
    verdicts.append(Verdict(f"RSS at rest ≤ {BAR_RSS_REST_MIB:g} MiB", _fmt(rest, "MiB"),
                            f"≤ {BAR_RSS_REST_MIB:g} MiB",
                            None if rest is None else rest <= BAR_RSS_REST_MIB))

    hs, hs_direct = gw["handshake_p50_ms"], direct.get("handshake_p50_ms")
    name = f"handshake p50 ≤ direct + {BAR_HANDSHAKE_P50_MS:g} ms"
    if hs is not None and hs_direct is not None:
        limit = hs_direct + BAR_HANDSHAKE_P50_MS
        verdicts.append(Verdict(name, f"{hs:.2f} ms (direct {hs_direct:.2f} ms)",
                                f"≤ {limit:.2f} ms", hs <= limit))
    else:
        verdicts.append(Verdict(name, _fmt(hs, "ms", 2), "needs a direct run", None))
    return verdicts


def _fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f} {unit}"


def _cell(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


TABLE_HEAD = [
    "| relay | msgs/s | RTT p50 ms | RTT p99 ms | added p50 ms | added p99 ms "
    "| CPU µs/msg | relay CPU % | RSS rest MiB | RSS loaded MiB | RSS/session KiB "
    "| handshake p50 ms | handshake p99 ms |",
    "|---|" + "---:|" * 12,
]


def table_row(label: str, d: Mapping[str, float | None]) -> str:
    """One row of the results table for the :func:`derived` numbers (or medians) ``d``."""
    return (f"| {label} | {_cell(d['messages_per_s'], 0)} | {_cell(d['rtt_p50_ms'])} "
            f"| {_cell(d['rtt_p99_ms'])} | {_cell(d['added_p50_ms'])} "
            f"| {_cell(d['added_p99_ms'])} | {_cell(d['cpu_us_per_message'], 1)} "
            f"| {_cell(d['cpu_percent'], 0)} | {_cell(d['rss_rest_mib'], 1)} "
            f"| {_cell(d['rss_loaded_mib'], 1)} | {_cell(d['rss_per_session_kib'], 1)} "
            f"| {_cell(d['handshake_p50_ms'])} | {_cell(d['handshake_p99_ms'])} |")


def run_label(name: str, index: int, repeat: int) -> str:
    """``gateway`` for a single run, ``gateway #2`` for the second of repeated runs."""
    return name if repeat == 1 else f"{name} #{index + 1}"


def markdown(title: str, rounds: Sequence[Mapping[str, RelayRun]],
             conditions: list[str]) -> str:
    """The results, the bar and the run's conditions as GitHub Markdown.

    One round: one row per relay.  Several (``--repeat``): every run's row in the order
    they ran, then the medians per relay, and the bar judged on the medians.
    """
    lines = [f"### {title}", ""]
    figures = medians(rounds)
    repeat = len(rounds)
    if repeat > 1:
        lines += [f"Every run ({repeat} rounds, interleaved, each relay started fresh):", ""]
    lines += TABLE_HEAD
    for index, runs in enumerate(rounds):
        direct = runs.get("direct")
        lines += [table_row(run_label(name, index, repeat), derived(run, direct))
                  for name, run in runs.items()]
    if repeat > 1:
        lines += ["", f"Medians of the {repeat} runs per relay and metric:", "", *TABLE_HEAD]
        lines += [table_row(f"{name} (median)", d) for name, d in figures.items()]
    verdicts = bar_of(figures)
    if verdicts:
        sessions = next(iter(rounds[0].values())).sessions
        note = ("" if sessions == BAR_SESSIONS else
                f" — the bar is set for {BAR_SESSIONS} sessions; shown here for reference")
        on = f", on the medians of {repeat} runs" if repeat > 1 else ""
        lines += ["", f"Bar (issue 16; gateway, all features on{on}){note}:", "",
                  "| criterion | measured | limit | verdict |", "|---|---|---|---|"]
        lines += [f"| {v.criterion} | {v.measured} | {v.limit} | **{v.label}** |"
                  for v in verdicts]
    if conditions:
        lines += ["", *[f"- {c}" for c in conditions]]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SoakSample:
    """One soak observation of the gateway: ``t`` seconds since the load started,
    RSS bytes, open fds, how many of those are connections to Redis (``redis_fds``,
    the redis-py pool), and the ``realtime_gateway_sessions_active`` gauge."""

    t: float
    rss: int
    fds: int
    sessions_active: float
    redis_fds: int = 0

    @property
    def other_fds(self) -> float:
        """Open fds less the Redis pool and two per live session (client, upstream)."""
        return self.fds - self.redis_fds - 2 * self.sessions_active


def soak_verdicts(rest: SoakSample, warm: SoakSample, end: SoakSample,
                  after: SoakSample) -> list[Verdict]:
    """The soak's criteria (samples at rest before the load, after warm-up, at the end
    of the load and after every session closed):

    * RSS at the end within 5 % of RSS after warm-up;
    * open fds, less the Redis pool and two per live session, not grown beyond
      :data:`SOAK_FD_SLACK` (sockets of sessions opening or closing at that instant);
    * the Redis pool (redis-py; the gateway caps it nowhere) not grown after warm-up
      beyond :data:`SOAK_FD_SLACK` or 10 %;
    * after the load: no live session left, and the other fds back to their value at rest.

    The gateway exports no asyncio task count; leaked tasks would hold sessions
    (the gauge), sockets (fds) or memory (RSS), which is what is checked.
    """
    growth = (end.rss - warm.rss) / warm.rss if warm.rss else 0.0
    pool_limit = max(warm.redis_fds + SOAK_FD_SLACK, int(warm.redis_fds * 1.1))
    return [
        Verdict(f"RSS at the end within {SOAK_RSS_GROWTH:.0%} of RSS after warm-up",
                f"{warm.rss / MIB:.1f} → {end.rss / MIB:.1f} MiB ({growth:+.1%})",
                f"≤ {SOAK_RSS_GROWTH:+.0%}", growth <= SOAK_RSS_GROWTH),
        Verdict("open fds (less Redis pool, less 2 per live session) do not grow",
                f"{warm.other_fds:.0f} → {end.other_fds:.0f}",
                f"≤ {warm.other_fds + SOAK_FD_SLACK:.0f}",
                end.other_fds <= warm.other_fds + SOAK_FD_SLACK),
        Verdict("Redis connections (redis-py pool) do not grow after warm-up",
                f"{rest.redis_fds} at rest, {warm.redis_fds} → {end.redis_fds}",
                f"≤ {pool_limit}", end.redis_fds <= pool_limit),
        Verdict("no live session left after the load (sessions_active)",
                f"{after.sessions_active:.0f}", "0", after.sessions_active == 0),
        Verdict("open fds (less Redis pool) back to their value at rest after the load",
                f"{rest.other_fds:.0f} → {after.other_fds:.0f}",
                f"≤ {rest.other_fds + SOAK_FD_SLACK:.0f}",
                after.other_fds <= rest.other_fds + SOAK_FD_SLACK),
    ]


def soak_markdown(title: str, samples: list[SoakSample], verdicts: list[Verdict],
                  conditions: list[str]) -> str:
    """The soak's verdicts and its time series (one row a minute at most) as Markdown."""
    lines = [f"### {title}", "", "| criterion | measured | limit | verdict |",
             "|---|---|---|---|"]
    lines += [f"| {v.criterion} | {v.measured} | {v.limit} | **{v.label}** |" for v in verdicts]
    lines += ["", "| t s | RSS MiB | open fds | of which Redis | sessions_active |",
              "|---:|---:|---:|---:|---:|"]
    last = -60.0
    for i, s in enumerate(samples):
        if s.t - last >= 59 or i == len(samples) - 1:
            lines.append(f"| {s.t:.0f} | {s.rss / MIB:.1f} | {s.fds} | {s.redis_fds} "
                         f"| {s.sessions_active:.0f} |")
            last = s.t
    if conditions:
        lines += ["", *[f"- {c}" for c in conditions]]
    return "\n".join(lines) + "\n"
