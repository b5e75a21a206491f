"""One timer for every live session: counters, send deadlines, usage charges, lease renewals.

Every :data:`HOUSEKEEPING_SECONDS` the :class:`Housekeeper` of a gateway, for its live
sessions (:attr:`gateway.app.Gateway.sessions`):

1. publishes each relay's counters to the Prometheus counters (CONTRACT §6);
2. ends a session whose sends have been blocked with no progress for
   ``server.send_timeout_seconds`` (``slow_consumer``, 1008);
3. charges the usage the relays tapped since the last tick — summed per tenant, one
   limiter call per tenant, not one per session; when the tenant's balance is overdrawn
   the sessions whose usage was in that charge end (``budget_exhausted``, 4429);
4. renews the leases that are due (every lease/3 seconds, ``redis.lease_seconds``), at
   most :data:`RENEWAL_CONCURRENCY` at a time, so that a tick never takes the whole Redis
   connection pool from admissions and releases; a session whose renewal finds the
   balance overdrawn ends the same way.

A limiter error is counted (``limiter_errors_total{operation}``) and the tick goes on.
Per-session tasks would cost each session a task, a timer and one Redis call per usage
event (14 % of the CPU of the relay at 200 sessions, ``bench/README.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from gateway.config import TenantConfig
from gateway.errors import BUDGET_EXHAUSTED, SLOW_CONSUMER
from gateway.limits.base import LimiterUnavailable
from gateway.logs import get_logger

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.session import LiveSession

log = get_logger(__name__)

HOUSEKEEPING_SECONDS = 1.0
"""Seconds between two ticks."""
STOP_SECONDS = 2.0
"""Seconds :meth:`Housekeeper.stop` waits at most for the loop to end."""
RENEWAL_CONCURRENCY = 8
"""Lease renewals in flight at once during a tick."""
RECANCEL_SECONDS = 0.1
"""Seconds between two cancellations of a loop that is still running (a cancellation can
be lost inside a library call on Python 3.11: defect D5 in docs/security-cases.md)."""


class Housekeeper:
    """The gateway's housekeeping loop (see the module docstring)."""

    def __init__(self, gw: Gateway, interval: float = HOUSEKEEPING_SECONDS) -> None:
        self.gw = gw
        self.interval = interval
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop in a task of its own (idempotent)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self.run())

    async def run(self) -> None:
        """Tick every :attr:`interval` seconds until :meth:`stop`; a failing tick is
        logged (``housekeeping.failed``) and the next one runs."""
        while not self._stopping:
            await asyncio.sleep(self.interval)
            if self._stopping:
                return
            try:
                await self.tick()
            except Exception:  # one bad tick must not stop housekeeping for every session
                log.exception("housekeeping.failed")

    async def tick(self) -> None:
        """One round over the live sessions (steps 1 to 4 of the module docstring)."""
        gw = self.gw
        loop = asyncio.get_running_loop()
        now = loop.time()
        send_timeout = gw.config.server.send_timeout_seconds
        charges: dict[str, tuple[TenantConfig, list[LiveSession], int]] = {}
        due: list[LiveSession] = []
        for live in list(gw.sessions):
            live.publish_counters()
            if live.blocked_for(self.interval) >= send_timeout:
                live.end(SLOW_CONSUMER)
            tokens = live.take_pending()
            tenant = live.admitted.principal.tenant
            if tokens and tenant.limits.tokens_per_minute is not None:
                _, sessions, total = charges.get(tenant.id, (tenant, [], 0))
                sessions.append(live)
                charges[tenant.id] = (tenant, sessions, total + tokens)
            if now >= live.next_renewal:
                live.next_renewal = now + gw.lease_renewal_seconds
                due.append(live)
        renewals = asyncio.Semaphore(RENEWAL_CONCURRENCY)
        await asyncio.gather(
            *(self._charge(tenant, sessions, total)
              for tenant, sessions, total in charges.values()),
            *(self._renew(live, renewals) for live in due))

    async def _charge(self, tenant: TenantConfig, sessions: list[LiveSession],
                      tokens: int) -> None:
        try:
            balance = await self.gw.limiter.charge(tenant.id, tenant.limits, tokens)
        except LimiterUnavailable as exc:
            self.gw.metrics.limiter_errors_total.labels(exc.operation).inc()
            return
        if balance.overdrawn(tenant.limits):
            for live in sessions:
                live.end(BUDGET_EXHAUSTED)

    async def _renew(self, live: LiveSession, renewals: asyncio.Semaphore) -> None:
        limits = live.admitted.principal.tenant.limits
        try:
            async with renewals:
                if live not in self.gw.sessions:  # ended while waiting: being released
                    return
                with live.renewing():
                    balance = await self.gw.limiter.renew(live.admitted.lease, limits)
        except LimiterUnavailable as exc:
            self.gw.metrics.limiter_errors_total.labels(exc.operation).inc()
            return
        if balance.overdrawn(limits):
            live.end(BUDGET_EXHAUSTED)

    async def stop(self) -> None:
        """End the loop, waiting at most :data:`STOP_SECONDS`.

        Sets the stop flag (checked after every await), then cancels the task, again every
        :data:`RECANCEL_SECONDS` while it runs.  A loop still running at the bound is left
        to end by itself and logged (``housekeeping.stuck``).  Never raises.
        """
        task, self._task = self._task, None
        self._stopping = True
        if task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_SECONDS
        while not task.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("housekeeping.stuck", waited_s=STOP_SECONDS)
                return
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=min(RECANCEL_SECONDS, remaining))
