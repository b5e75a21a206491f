"""One timer for every live session: counters, send deadlines, usage charges, lease renewals.

Every :data:`HOUSEKEEPING_SECONDS` the :class:`Housekeeper` of a gateway, for its live
sessions (:attr:`gateway.registry.Registry.sessions`):

1. publishes each relay's counters to the Prometheus counters (CONTRACT §6);
2. ends a session whose sends have been blocked with no progress for
   ``server.send_timeout_seconds`` (``slow_consumer``, 1008);
3. charges the usage the relays tapped since the last tick — summed per tenant, one
   limiter call per tenant, not one per session; when the tenant's balance is overdrawn
   the sessions whose usage was in that charge end (``budget_exhausted``, 4429);
4. renews the leases that are due (every ``limiter.renewal_interval`` seconds, a third of
   ``redis.lease_seconds``), at most :data:`RENEWAL_CONCURRENCY` at a time, so that a tick
   never takes the whole Redis connection pool from admissions and releases; a session
   whose renewal finds the balance overdrawn ends the same way.
5. re-checks, every :data:`RECHECK_SECONDS`, the token of a session that has no expiry
   (an introspection answer without ``exp``, :attr:`Principal.recheck`): when it is no
   longer valid (inactive, expired, its scope gone) the session ends (``token_expired``,
   4401); when the endpoint cannot tell,
   the session goes on and the next period asks again.  Re-checks run in tasks of their
   own (at most :data:`RECHECK_CONCURRENCY`), so a slow endpoint never delays a tick.

A renewal re-acquires a lease that is gone (by design, after a Redis restart), so one that
lands after the session's release would hold the user's slot until the lease expires: the
housekeeper tracks the renewals in flight, and a session's end waits for its own
(:meth:`Housekeeper.settle`) before releasing.  What a limiter failure means is decided by
the limiter (:mod:`gateway.limits.failover`), not here.
Per-session tasks would cost each session a task, a timer and one Redis call per usage
event (14 % of the CPU of the relay at 200 sessions, ``bench/README.md``).
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.auth.authenticator import Recheck
from gateway.config import TenantConfig
from gateway.errors import BUDGET_EXHAUSTED, SLOW_CONSUMER, TOKEN_EXPIRED, GatewayError, Unavailable
from gateway.logs import get_logger
from gateway.registry import LiveSession, Registry
from gateway.services import Services

log = get_logger(__name__)

HOUSEKEEPING_SECONDS = 1.0
"""Seconds between two ticks."""
STOP_SECONDS = 2.0
"""Seconds :meth:`Housekeeper.stop` waits at most for the loop to end."""
TICK_SLICE = 32
"""Sessions a tick handles before it yields to the event loop: a tick over 200 sessions
in one go held the loop for 3-10 ms once a second (bench/probe.py), a delay every frame
arriving then waited out — the relay's own contribution to its added round-trip p99."""
RENEWAL_CONCURRENCY = 8
"""Lease renewals in flight at once during a tick."""
RENEWAL_WAIT_SECONDS = 1.0
"""Seconds a session's end waits at most for its lease renewal in flight (one limiter call,
itself bounded by ``redis.timeout_seconds``)."""
RECHECK_SECONDS = 60.0
"""Seconds between two re-checks of a token that has no ``exp``."""
RECHECK_CONCURRENCY = 8
"""Token re-checks in flight at once."""
RECANCEL_SECONDS = 0.1
"""Seconds between two cancellations of a loop that is still running (a cancellation can
be lost inside a library call on Python 3.11: defect D5 in docs/security-cases.md)."""


class Housekeeper:
    """The gateway's housekeeping loop (see the module docstring) over ``registry``.

    ``interval`` is the tick period in seconds.
    """

    def __init__(self, services: Services, registry: Registry,
                 interval: float = HOUSEKEEPING_SECONDS) -> None:
        self.interval = interval
        self._limiter = services.limiter
        self._send_timeout = services.config.server.send_timeout_seconds
        self._registry = registry
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._due: dict[LiveSession, float] = {}
        """Loop time (seconds) at which each session's lease is next renewed."""
        self._renewing: dict[LiveSession, asyncio.Future[None]] = {}
        """Renewals in flight, resolved when they finish."""
        self.recheck_interval = RECHECK_SECONDS
        self._recheck_due: dict[LiveSession, float] = {}
        """Loop time (seconds) at which each session without expiry is next re-checked."""
        self._rechecking: dict[LiveSession, asyncio.Task[None]] = {}
        self._recheck_slots = asyncio.Semaphore(RECHECK_CONCURRENCY)

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
        now = asyncio.get_running_loop().time()
        renewal = self._limiter.renewal_interval
        charges: dict[str, tuple[TenantConfig, list[LiveSession], int]] = {}
        due: list[LiveSession] = []
        live_now = self._registry.sessions
        for gone in self._due.keys() - live_now:
            del self._due[gone]
        for gone in self._recheck_due.keys() - live_now:
            del self._recheck_due[gone]
        for index, live in enumerate(live_now):
            if index and not index % TICK_SLICE:
                await asyncio.sleep(0)  # let frames through between slices
            if live not in self._registry:  # ended while the tick let others run
                continue
            live.publish_counters()
            if live.blocked_for(self.interval) >= self._send_timeout:
                live.end(SLOW_CONSUMER)
            account = live.account
            tokens = account.take_pending()
            tenant = account.tenant
            if tokens and tenant.limits.tokens_per_minute is not None:
                _, sessions, total = charges.get(tenant.id, (tenant, [], 0))
                sessions.append(live)
                charges[tenant.id] = (tenant, sessions, total + tokens)
            next_renewal = self._due.setdefault(live, now + renewal)
            if now >= next_renewal:
                self._due[live] = now + renewal
                due.append(live)
            recheck = account.principal.recheck
            if recheck is not None:
                self._maybe_recheck(live, recheck, now)
        renewals = asyncio.Semaphore(RENEWAL_CONCURRENCY)
        await asyncio.gather(
            *(self._charge(tenant, sessions, total)
              for tenant, sessions, total in charges.values()),
            *(self._renew(live, renewals) for live in due))

    def _maybe_recheck(self, live: LiveSession, recheck: Recheck, now: float) -> None:
        next_check = self._recheck_due.setdefault(live, now + self.recheck_interval)
        if now < next_check or live in self._rechecking:
            return
        self._recheck_due[live] = now + self.recheck_interval
        task = asyncio.create_task(self._recheck(live, recheck))
        self._rechecking[live] = task
        task.add_done_callback(lambda _: self._rechecking.pop(live, None))

    async def _recheck(self, live: LiveSession, recheck: Recheck) -> None:
        async with self._recheck_slots:
            if live not in self._registry:
                return
            try:
                await recheck()
            except Unavailable:
                log.warning("session.recheck_failed", session_id=live.account.lease.session_id,
                            tenant=live.account.tenant.id)
            except GatewayError:  # inactive, expired, another subject, scope gone
                live.end(TOKEN_EXPIRED)
            except Exception:  # a defect must not leave the task's error unread
                log.exception("session.recheck_failed", session_id=live.account.lease.session_id,
                              tenant=live.account.tenant.id)

    async def settle(self, live: LiveSession) -> None:
        """Forget ``live`` (it has left the registry) and wait, at most
        :data:`RENEWAL_WAIT_SECONDS`, for its renewal in flight to finish, so that its
        lease can be released after it.  Never raises."""
        self._due.pop(live, None)
        self._recheck_due.pop(live, None)
        recheck = self._rechecking.pop(live, None)
        if recheck is not None:
            recheck.cancel()
        renewal = self._renewing.get(live)
        if renewal is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RENEWAL_WAIT_SECONDS):
                    await asyncio.shield(renewal)

    async def _charge(self, tenant: TenantConfig, sessions: list[LiveSession],
                      tokens: int) -> None:
        balance = await self._limiter.charge(tenant.id, tenant.limits, tokens)
        if balance.overdrawn(tenant.limits):
            for live in sessions:
                live.end(BUDGET_EXHAUSTED)

    async def _renew(self, live: LiveSession, renewals: asyncio.Semaphore) -> None:
        account = live.account
        limits = account.tenant.limits
        async with renewals:
            if live not in self._registry:  # ended while waiting: being released
                return
            done = asyncio.get_running_loop().create_future()
            self._renewing[live] = done
            try:
                balance = await self._limiter.renew(account.lease, limits)
            finally:
                del self._renewing[live]
                done.set_result(None)
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
        for recheck in list(self._rechecking.values()):
            recheck.cancel()
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
