"""The gateway-wide housekeeping tick (gateway.housekeeping): one limiter charge per tenant,
bounded lease renewals, the send deadline, a stop that is bounded even when a cancellation
is lost inside a limiter call (defect D5); and the lease release at a session's end."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway import housekeeping as housekeeping_module
from gateway.accounting import Account
from gateway.auth.authenticator import Principal
from gateway.config import LimitsConfig
from gateway.errors import BUDGET_EXHAUSTED, SLOW_CONSUMER, SessionEnd
from gateway.housekeeping import TICK_SLICE, Housekeeper
from gateway.limits.base import Balance, Lease
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.usage import TokenCounts
from tests.support.gateway import wait_for


class RecordingLimiter:
    """Records charges and renewals; answers with ``balance``. With ``swallow`` its calls
    lose every cancellation that reaches them, as redis-py's ``asyncio.wait_for`` write
    could on Python 3.11.  ``renewal_interval`` (seconds) is what the housekeeper reads."""

    def __init__(self, balance: float | None = None, *, swallow: bool = False,
                 renewal_interval: float = 3600.0) -> None:
        self.balance = balance
        self.swallow = swallow
        self.renewal_interval = renewal_interval
        self.charges: list[tuple[str, int]] = []
        self.renewals: list[str] = []
        self.swallowed = 0

    async def _answer(self) -> Balance:
        if self.swallow:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.swallowed += 1
        return Balance(self.balance)

    async def charge(self, tenant: str, limits: LimitsConfig, tokens: int) -> Balance:
        self.charges.append((tenant, tokens))
        return await self._answer()

    async def renew(self, lease: Lease, limits: LimitsConfig) -> Balance:
        self.renewals.append(lease.session_id)
        return await self._answer()


class FakeLive:
    """A live session as the registry sees it, with relay-like counters."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.client_messages = self.client_bytes = 0
        self.upstream_messages = self.upstream_bytes = 0
        self.sending = False
        self.ended: list[SessionEnd] = []
        self._blocked = 0.0
        self._last = (-1, -1)

    def end(self, cause: SessionEnd) -> None:
        self.ended.append(cause)

    def publish_counters(self) -> None:
        self.account.publish((self.client_messages, self.client_bytes,
                              self.upstream_messages, self.upstream_bytes))

    def blocked_for(self, interval: float) -> float:
        progress = (self.client_messages, self.upstream_messages)
        self._blocked = self._blocked + interval if (
            self.sending and progress == self._last) else 0.0
        self._last = progress
        return self._blocked


class Rig:
    """A housekeeper over a registry, with fake services around ``limiter``."""

    def __init__(self, limiter: RecordingLimiter, *, send_timeout: float = 30.0,
                 interval: float = 1.0) -> None:
        self.limiter = limiter
        self.metrics = Metrics()
        self.registry = Registry(1000, self.metrics)
        services = SimpleNamespace(
            config=SimpleNamespace(server=SimpleNamespace(send_timeout_seconds=send_timeout)),
            limiter=limiter, metrics=self.metrics)
        self.keeper = Housekeeper(cast(Any, services), self.registry, interval=interval)

    def add(self, tenant: str, session_id: str, *,
            tokens_per_minute: int | None = 1000) -> FakeLive:
        limits = LimitsConfig(tokens_per_minute=tokens_per_minute)
        principal = Principal(cast(Any, SimpleNamespace(id=tenant, limits=limits)), "user",
                              None)
        live = FakeLive(Account(principal, "gpt-realtime", "openai",
                                Lease(tenant, "user", session_id), "127.0.0.1:1",
                                self.metrics))
        self.registry.register(live)
        return live


def tokens_total(rig: Rig, tenant: str) -> float:
    value = rig.metrics.registry.get_sample_value(
        "realtime_gateway_tokens_total",
        {"tenant": tenant, "model": "gpt-realtime", "kind": "output_audio"})
    return value or 0.0


async def test_usage_is_charged_once_per_tenant_per_tick() -> None:
    limiter = RecordingLimiter(balance=500)
    rig = Rig(limiter)
    sessions = {name: rig.add(tenant, name, **kwargs) for name, tenant, kwargs in [
        ("a1", "a", {}), ("a2", "a", {}), ("a3", "a", {}), ("b1", "b", {}),
        ("c1", "c", {"tokens_per_minute": None})]}
    for name, tokens in [("a1", 10), ("a2", 20), ("b1", 5), ("c1", 7)]:
        sessions[name].account.on_usage(TokenCounts(output_audio=tokens, billable=tokens))
    sessions["a1"].account.on_usage(TokenCounts(output_audio=1, billable=1))
    await rig.keeper.tick()
    assert sorted(limiter.charges) == [("a", 31), ("b", 5)]  # c has no budget to charge
    assert [tokens_total(rig, t) for t in "abc"] == [31, 5, 7]  # but its usage is counted
    await rig.keeper.tick()
    assert len(limiter.charges) == 2  # nothing new, no call


async def test_an_overdrawn_charge_ends_the_sessions_it_charged() -> None:
    rig = Rig(RecordingLimiter(balance=-10**9))
    spender, idle = rig.add("a", "s1"), rig.add("a", "s2")
    spender.account.on_usage(TokenCounts(billable=100))
    await rig.keeper.tick()
    assert spender.ended == [BUDGET_EXHAUSTED]
    assert idle.ended == []  # its renewal will end it, once due


async def test_due_leases_are_renewed_and_an_overdrawn_renewal_ends_the_session() -> None:
    limiter = RecordingLimiter(balance=-10**9, renewal_interval=0.0)
    rig = Rig(limiter)
    live = rig.add("a", "s1")
    await rig.keeper.tick()  # first seen: due one renewal interval (here 0 s) later
    assert limiter.renewals == ["s1"] and live.ended == [BUDGET_EXHAUSTED]
    limiter.renewal_interval = 3600.0
    await rig.keeper.tick()  # renewed now: not due again before the next renewal time
    await rig.keeper.tick()
    assert limiter.renewals == ["s1", "s1"]


async def test_a_session_is_first_renewed_one_interval_after_it_is_seen() -> None:
    limiter = RecordingLimiter(balance=500, renewal_interval=3600.0)
    rig = Rig(limiter)
    rig.add("a", "s1")
    for _ in range(3):
        await rig.keeper.tick()
    assert limiter.renewals == []


async def test_a_blocked_session_ends_after_the_send_deadline() -> None:
    rig = Rig(RecordingLimiter(), send_timeout=3.0)
    live = rig.add("a", "s1")
    live.sending = True
    for _ in range(4):  # the first tick sees the progress; three more without any
        assert live.ended == []
        await rig.keeper.tick()
    assert live.ended == [SLOW_CONSUMER]
    live.upstream_messages += 1  # progress resets the count
    live.ended.clear()
    await rig.keeper.tick()
    assert live.ended == []


async def test_counters_are_published_as_deltas() -> None:
    rig = Rig(RecordingLimiter())
    live = rig.add("a", "s1")
    live.client_messages, live.upstream_bytes = 3, 100
    await rig.keeper.tick()
    live.client_messages = 5
    await rig.keeper.tick()
    sample = rig.metrics.registry.get_sample_value
    assert sample("realtime_gateway_messages_total", {"direction": "client_to_upstream"}) == 5
    assert sample("realtime_gateway_message_bytes_total",
                  {"direction": "upstream_to_client"}) == 100


async def test_a_lost_cancellation_does_not_keep_the_loop_alive() -> None:
    limiter = RecordingLimiter(balance=500, swallow=True, renewal_interval=0.0)
    rig = Rig(limiter, interval=0.001)
    rig.add("a", "s1")
    keeper = rig.keeper
    keeper.start()
    await wait_for(lambda: limiter.renewals, within=5)  # stopped inside a limiter call
    started = time.monotonic()
    await keeper.stop()
    assert time.monotonic() - started < 0.5  # one limiter call at most, not the bound
    assert limiter.swallowed >= 1


async def test_a_loop_that_never_ends_is_given_up_within_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(housekeeping_module, "STOP_SECONDS", 0.3)
    keeper = Rig(RecordingLimiter()).keeper
    holding = True

    async def immortal() -> None:  # loses every cancellation while ``holding``
        while holding:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = keeper._task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    started = time.monotonic()
    await keeper.stop()
    assert 0.3 <= time.monotonic() - started < 0.6
    assert not task.done()
    holding = False
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()


class SlowRenewals(RecordingLimiter):
    """Renewals that take a while, recording how many were in flight at once."""

    def __init__(self) -> None:
        super().__init__(balance=500, renewal_interval=0.0)
        self.in_flight = self.most_in_flight = 0

    async def renew(self, lease: Lease, limits: LimitsConfig) -> Balance:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            return await super().renew(lease, limits)
        finally:
            self.in_flight -= 1


async def test_renewals_leave_the_connection_pool_to_admissions() -> None:
    limiter = SlowRenewals()
    rig = Rig(limiter)
    sessions = [rig.add("a", f"s{i}") for i in range(40)]
    rig.registry.unregister(sessions[-1])  # ended before the tick: not renewed
    await rig.keeper.tick()
    assert len(limiter.renewals) == 39
    assert limiter.most_in_flight == housekeeping_module.RENEWAL_CONCURRENCY


class HeldRenewal(RecordingLimiter):
    """A renewal that returns only when the test lets it."""

    def __init__(self) -> None:
        super().__init__(balance=500, renewal_interval=0.0)
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    async def renew(self, lease: Lease, limits: LimitsConfig) -> Balance:
        self.started.set()
        await self.go.wait()
        return await super().renew(lease, limits)


async def test_a_session_end_waits_for_its_renewal_in_flight() -> None:
    """A renewal re-acquires a lease that is gone; landing after the session's release it
    would hold the slot until expiry, so the end waits for it (run_session)."""
    limiter = HeldRenewal()
    rig = Rig(limiter)
    live = rig.add("a", "s1")
    tick = asyncio.create_task(rig.keeper.tick())
    await asyncio.wait_for(limiter.started.wait(), 5)
    rig.registry.unregister(live)  # the session ends now, its renewal in flight
    ending = asyncio.create_task(rig.keeper.settle(live))
    for _ in range(10):  # give the settle every chance to (wrongly) finish
        await asyncio.sleep(0)
    assert not ending.done()  # still waiting for the renewal
    limiter.go.set()
    await asyncio.wait_for(ending, 5)
    assert limiter.renewals == ["s1"]
    await tick


async def test_settle_without_a_renewal_in_flight_returns_at_once() -> None:
    rig = Rig(RecordingLimiter())
    live = rig.add("a", "s1")
    rig.registry.unregister(live)
    await asyncio.wait_for(rig.keeper.settle(live), 0.5)


async def test_a_tick_over_many_sessions_lets_the_loop_run_between_slices() -> None:
    """The relay's frames are callbacks of the same loop: a tick must not hold it for all
    sessions at once (at 200 sessions that was 3-10 ms every second, bench/probe.py)."""
    rig = Rig(RecordingLimiter())
    lives = [rig.add("a", f"s{i}") for i in range(5 * TICK_SLICE)]
    published: list[int] = []
    seen: list[int] = []
    for i, live in enumerate(lives):
        live.publish_counters = functools.partial(  # type: ignore[method-assign]
            published.append, i)

    def frame() -> None:  # what a relay callback would do meanwhile
        seen.append(len(published))
        if len(seen) < 10:
            asyncio.get_running_loop().call_soon(frame)

    asyncio.get_running_loop().call_soon(frame)
    await rig.keeper.tick()
    assert len(published) == len(lives)
    inside = [n for n in seen if 0 < n < len(lives)]
    assert inside and max(b - a for a, b in zip([0, *inside], inside, strict=False)) <= TICK_SLICE


async def test_a_session_that_ends_while_a_tick_yields_is_left_alone() -> None:
    rig = Rig(RecordingLimiter())
    lives = [rig.add("a", f"s{i}") for i in range(2 * TICK_SLICE)]
    order = list(rig.registry.sessions)
    late = order[TICK_SLICE + 1]
    published: list[object] = []
    for live in lives:
        live.publish_counters = functools.partial(  # type: ignore[method-assign]
            published.append, live)
    asyncio.get_running_loop().call_soon(rig.registry.unregister, late)
    await rig.keeper.tick()
    assert late not in published and len(published) == len(lives) - 1
