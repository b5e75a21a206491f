"""The capacity sweep (issue 16): sessions per core at added round-trip p99 ≤ 10 ms.

Pure planning and judging; :func:`bench.run.run_benchmark` runs the points.  The sweep
runs increasing session counts (:func:`schedule`); at each count the direct path first
(the floor, and the reference for *added* p99), then every relay still in the race.  A
relay leaves the race at its first failing count; the sweep ends when none is left, when
the direct path itself fails (the load side cannot offer that load), or at the cap.  Then
one bisection step between a relay's last pass and its first failure, when the failure
was the relay's own.

A point *passes* when every session opened, the offered append rate was reached (≥ 97 %)
and its added p99 (its RTT p99 minus the direct run's at the same count) is ≤
:data:`P99_LIMIT_MS`; the direct path's own RTT p99 must be ≤ :data:`P99_LIMIT_MS` — when
it is not, or the rate was missed, the load side (load generator + echo upstream on the
load core) cannot offer that load and the sweep stops.  A relay's failure is blamed on the
*load side* rather than the relay when the load core was over
:data:`LOAD_CORE_LIMIT_PERCENT` busy in that run (the runner warns then too).  A relay's
capacity is the largest count that passed; with its relay pinned to one core that is
sessions per core.  When what stopped it was the load side or the cap, the number is a
lower bound.

Units: milliseconds (``_ms``), per-second rates, percent of one core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from bench.report import Verdict

P99_LIMIT_MS = 10.0
"""Added round-trip p99 (ms) a sweep point may have to pass."""
RATE_REACHED = 0.97
"""Share of the offered appends per second a point must achieve."""
LOAD_CORE_LIMIT_PERCENT = 90.0
"""Load core busy share (percent) above which a failure is the load side's."""
RATIO_BAR = 0.7
"""Gateway sessions per core ÷ nginx's must be at least this (issue 16)."""

Bound = Literal["relay", "load side", "cap"]


def schedule(start: int, step: int, maximum: int) -> list[int]:
    """Session counts ``start, start + step, ...`` up to and including ``maximum``."""
    if start < 1 or step < 1 or maximum < start:
        raise ValueError("need 1 <= start <= maximum and step >= 1")
    return list(range(start, maximum + 1, step))


def bisection(last_pass: int, first_fail: int) -> int | None:
    """The count halfway between a pass and the failure after it (``None`` if adjacent)."""
    middle = (last_pass + first_fail) // 2
    return middle if last_pass < middle < first_fail else None


@dataclass(frozen=True)
class SweepPoint:
    """One relay at one session count (``relay_cpu_percent``: of one core; ``workers``:
    gateway processes, 1 for the others)."""

    relay: str
    sessions: int
    offered_appends_per_s: float
    appends_per_s: float
    messages_per_s: float
    sessions_opened: int
    rtt_p99_ms: float | None
    added_p99_ms: float | None
    relay_cpu_percent: float | None
    load_core_busy_percent: float | None
    direct_failed: bool = False
    workers: int = 1

    @property
    def reached_rate(self) -> bool:
        """Every session opened and ≥ :data:`RATE_REACHED` of the offered appends went out."""
        return (self.sessions_opened >= self.sessions
                and self.appends_per_s >= RATE_REACHED * self.offered_appends_per_s)

    @property
    def passed(self) -> bool:
        """Rate reached and added p99 ≤ :data:`P99_LIMIT_MS` (the direct path: its RTT p99)."""
        if self.relay == "direct":
            return (self.reached_rate and self.rtt_p99_ms is not None
                    and self.rtt_p99_ms <= P99_LIMIT_MS)
        return (self.reached_rate and self.added_p99_ms is not None
                and self.added_p99_ms <= P99_LIMIT_MS)

    @property
    def load_core_saturated(self) -> bool:
        busy = self.load_core_busy_percent
        return busy is not None and busy > LOAD_CORE_LIMIT_PERCENT

    @property
    def bound(self) -> Bound | None:
        """Who a failure is blamed on; ``None`` when the point passed."""
        if self.passed:
            return None
        if self.relay == "direct" or self.direct_failed or self.load_core_saturated:
            return "load side"
        return "relay"

    @property
    def result(self) -> str:
        """``pass`` or why not: ``p99``, ``rate`` (offered rate not reached), with the
        load side named when it is to blame."""
        if self.passed:
            return "pass"
        why = "rate" if not self.reached_rate else "p99"
        return f"FAIL {why}" + (" (load side)" if self.bound == "load side" else "")


@dataclass(frozen=True)
class Capacity:
    """A relay's result: the largest passing count (``None``: none passed), its msgs/s,
    what stopped the sweep for it (``bound``) and at which count (``stopped_at``;
    ``None`` when the cap was reached)."""

    relay: str
    sessions: int | None
    messages_per_s: float | None
    bound: Bound
    stopped_at: int | None
    workers: int = 1

    @property
    def exact(self) -> bool:
        """True when the relay itself failed right above ``sessions`` (not a lower bound)."""
        return self.bound == "relay"

    @property
    def sessions_per_core(self) -> float | None:
        return None if self.sessions is None else self.sessions / self.workers


def capacity(relay: str, points: Sequence[SweepPoint], load_limit: int | None) -> Capacity:
    """``relay``'s :class:`Capacity` from all sweep points (any relay, any order).

    ``load_limit``: the count at which the direct path failed (the sweep stopped there),
    ``None`` if it never did.
    """
    mine = sorted((p for p in points if p.relay == relay), key=lambda p: p.sessions)
    workers = mine[0].workers if mine else 1
    passed = [p for p in mine if p.passed]
    failed = [p for p in mine if not p.passed]
    best = passed[-1] if passed else None
    first_fail = min(failed, key=lambda p: p.sessions) if failed else None
    if first_fail is not None:
        return Capacity(relay, best.sessions if best else None,
                        best.messages_per_s if best else None,
                        first_fail.bound or "relay", first_fail.sessions, workers)
    if load_limit is not None:
        return Capacity(relay, best.sessions if best else None,
                        best.messages_per_s if best else None, "load side", load_limit, workers)
    return Capacity(relay, best.sessions if best else None,
                    best.messages_per_s if best else None, "cap", None, workers)


def ratio_verdict(numerator: Capacity, denominator: Capacity, bar: float = RATIO_BAR,
                  what: str = "sessions per core") -> Verdict:
    """``numerator / denominator`` of sessions per core against ``bar``.

    An inexact side (load side or cap) is a lower bound: a lower-bounded numerator can
    still prove a pass, a lower-bounded denominator a fail (the true ratio is at most the
    measured one); otherwise the verdict is ``n/a``.
    """
    name = f"{numerator.relay} / {denominator.relay} {what} ≥ {bar:g}"
    a, b = numerator.sessions_per_core, denominator.sessions_per_core
    if a is None or b is None or b == 0:
        return Verdict(name, f"{_fmt(a)} / {_fmt(b)}", f"≥ {bar:g}", None)
    ratio = a / b
    measured = (f"{ratio:.2f} ({_fmt(a)}{'' if numerator.exact else '+'} / "
                f"{_fmt(b)}{'' if denominator.exact else '+'})")
    if numerator.exact and denominator.exact:
        return Verdict(name, measured, f"≥ {bar:g}", ratio >= bar)
    if not numerator.exact and denominator.exact and ratio >= bar:
        return Verdict(name, measured + "; numerator a lower bound", f"≥ {bar:g}", True)
    if numerator.exact and not denominator.exact and ratio < bar:
        return Verdict(name, measured + "; denominator a lower bound", f"≥ {bar:g}", False)
    return Verdict(name, measured + "; a '+' is a lower bound (load side or cap), so the "
                   "ratio is not decided", f"≥ {bar:g}", None)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _cell(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def sweep_markdown(title: str, points: Sequence[SweepPoint],
                   capacities: Mapping[str, Capacity], verdicts: Sequence[Verdict],
                   conditions: Sequence[str], throughput: bool = False) -> str:
    """The sweep's points (in the order they ran), each relay's capacity, and the verdicts."""
    lines = [f"### {title}", "",
             "| relay | sessions | offered appends/s | appends/s | msgs/s | RTT p99 ms "
             "| added p99 ms | relay CPU % | load core % | result |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in points:
        lines.append(
            f"| {p.relay} | {p.sessions} | {p.offered_appends_per_s:,.0f} "
            f"| {p.appends_per_s:,.0f} | {p.messages_per_s:,.0f} | {_cell(p.rtt_p99_ms, 2)} "
            f"| {_cell(p.added_p99_ms, 2)} | {_cell(p.relay_cpu_percent, 0)} "
            f"| {_cell(p.load_core_busy_percent, 0)} | {p.result} |")
    head = ("| relay | workers | sessions at added p99 ≤ 10 ms | sessions per core "
            "| msgs/s there | stopped by |")
    lines += ["", head, "|---|---:|---:|---:|---:|---|"]
    for c in capacities.values():
        if c.bound == "cap":
            stop = "the cap (never failed)"
        elif c.bound == "load side":
            stop = f"the load side at {c.stopped_at} sessions (a lower bound)"
        else:
            stop = f"the relay at {c.stopped_at} sessions"
        per_core = "—" if c.relay == "direct" or throughput else _cell(c.sessions_per_core, 0)
        lines.append(f"| {c.relay} | {c.workers} | {_fmt(c.sessions)} | {per_core} "
                     f"| {_cell(c.messages_per_s, 0)} | {stop} |")
    if verdicts:
        lines += ["", "| criterion | measured | limit | verdict |", "|---|---|---|---|"]
        lines += [f"| {v.criterion} | {v.measured} | {v.limit} | **{v.label}** |"
                  for v in verdicts]
    if conditions:
        lines += ["", *[f"- {c}" for c in conditions]]
    return "\n".join(lines) + "\n"
