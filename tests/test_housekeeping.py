"""The gateway-wide housekeeping tick (gateway.housekeeping): one limiter charge per tenant,
bounded lease renewals, the send deadline, a stop that is bounded even when a cancellation
is lost inside a limiter call (defect D5); and the lease release at a session's end."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway import app as app_module
from gateway import housekeeping as housekeeping_module
from gateway.app import Gateway
from gateway.config import LimitsConfig
from gateway.errors import BUDGET_EXHAUSTED, SLOW_CONSUMER, SessionEnd
from gateway.housekeeping import Housekeeper
from gateway.limits.base import Balance, Lease, LimiterUnavailable
from gateway.metrics import Metrics
from gateway.session import LiveSession
from gateway.usage import TokenCounts
from tests.support.gateway import wait_for


class RecordingLimiter:
    """Records charges and renewals; answers with ``balance``. With ``swallow`` its calls
    lose every cancellation that reaches them, as redis-py's ``asyncio.wait_for`` write
    could on Python 3.11."""

    def __init__(self, balance: float | None = None, *, swallow: bool = False) -> None:
        self.balance = balance
        self.swallow = swallow
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


class FakeRelay:
    def __init__(self) -> None:
        self.client_messages = self.client_bytes = 0
        self.upstream_messages = self.upstream_bytes = 0
        self.sending_to_client = self.sending_to_upstream = False
        self.ended: list[SessionEnd] = []

    def end(self, cause: SessionEnd) -> None:
        self.ended.append(cause)


def fake_gateway(limiter: RecordingLimiter, *, renew_every: float = 3600.0,
                 send_timeout: float = 30.0) -> Any:
    return SimpleNamespace(
        config=SimpleNamespace(server=SimpleNamespace(send_timeout_seconds=send_timeout)),
        lease_renewal_seconds=renew_every, limiter=limiter, metrics=Metrics(),
        sessions=set())


def add_session(gw: Any, tenant: str, session_id: str, *,
                tokens_per_minute: int | None = 1000) -> tuple[LiveSession, FakeRelay]:
    limits = LimitsConfig(tokens_per_minute=tokens_per_minute)
    admitted = SimpleNamespace(
        principal=SimpleNamespace(tenant=SimpleNamespace(id=tenant, limits=limits)),
        model="gpt-realtime", route=SimpleNamespace(upstream="openai"),
        lease=Lease(tenant, "user", session_id))
    live = LiveSession(gw=gw, admitted=cast(Any, admitted), session_id=session_id,
                       peer="127.0.0.1:1")
    relay = FakeRelay()
    live.relay = cast(Any, relay)
    gw.sessions.add(live)
    return live, relay


def tokens_total(gw: Any, tenant: str) -> float:
    value = gw.metrics.registry.get_sample_value(
        "realtime_gateway_tokens_total",
        {"tenant": tenant, "model": "gpt-realtime", "kind": "output_audio"})
    return value or 0.0


async def test_usage_is_charged_once_per_tenant_per_tick() -> None:
    limiter = RecordingLimiter(balance=500)
    gw = fake_gateway(limiter)
    sessions = {name: add_session(gw, tenant, name, **kwargs) for name, tenant, kwargs in [
        ("a1", "a", {}), ("a2", "a", {}), ("a3", "a", {}), ("b1", "b", {}),
        ("c1", "c", {"tokens_per_minute": None})]}
    for name, tokens in [("a1", 10), ("a2", 20), ("b1", 5), ("c1", 7)]:
        sessions[name][0].on_usage(TokenCounts(output_audio=tokens, billable=tokens))
    sessions["a1"][0].on_usage(TokenCounts(output_audio=1, billable=1))
    await Housekeeper(gw).tick()
    assert sorted(limiter.charges) == [("a", 31), ("b", 5)]  # c has no budget to charge
    assert [tokens_total(gw, t) for t in "abc"] == [31, 5, 7]  # but its usage is counted
    await Housekeeper(gw).tick()
    assert len(limiter.charges) == 2  # nothing new, no call


async def test_an_overdrawn_charge_ends_the_sessions_it_charged() -> None:
    limiter = RecordingLimiter(balance=-10**9)
    gw = fake_gateway(limiter)
    (spender, spender_relay), (_, idle_relay) = (add_session(gw, "a", "s1"),
                                                 add_session(gw, "a", "s2"))
    spender.on_usage(TokenCounts(billable=100))
    await Housekeeper(gw).tick()
    assert spender_relay.ended == [BUDGET_EXHAUSTED]
    assert idle_relay.ended == []  # its renewal will end it, once due


async def test_due_leases_are_renewed_and_an_overdrawn_renewal_ends_the_session() -> None:
    limiter = RecordingLimiter(balance=-10**9)
    gw = fake_gateway(limiter, renew_every=0.0)
    _, relay = add_session(gw, "a", "s1")
    await Housekeeper(gw).tick()
    assert limiter.renewals == ["s1"] and relay.ended == [BUDGET_EXHAUSTED]
    gw.lease_renewal_seconds = 3600.0
    await Housekeeper(gw).tick()  # renewed now: not due again before the next renewal time
    await Housekeeper(gw).tick()
    assert limiter.renewals == ["s1", "s1"]


async def test_a_blocked_session_ends_after_the_send_deadline() -> None:
    gw = fake_gateway(RecordingLimiter(), send_timeout=3.0)
    _, relay = add_session(gw, "a", "s1")
    keeper = Housekeeper(gw, interval=1.0)
    relay.sending_to_client = True
    for _ in range(4):  # the first tick sees the progress; three more without any
        assert relay.ended == []
        await keeper.tick()
    assert relay.ended == [SLOW_CONSUMER]
    relay.upstream_messages += 1  # progress resets the count
    relay.ended.clear()
    await keeper.tick()
    assert relay.ended == []


async def test_counters_are_published_as_deltas() -> None:
    gw = fake_gateway(RecordingLimiter())
    _, relay = add_session(gw, "a", "s1")
    relay.client_messages, relay.upstream_bytes = 3, 100
    await Housekeeper(gw).tick()
    relay.client_messages = 5
    await Housekeeper(gw).tick()
    sample = gw.metrics.registry.get_sample_value
    assert sample("realtime_gateway_messages_total", {"direction": "client_to_upstream"}) == 5
    assert sample("realtime_gateway_message_bytes_total",
                  {"direction": "upstream_to_client"}) == 100


async def test_a_lost_cancellation_does_not_keep_the_loop_alive() -> None:
    limiter = RecordingLimiter(balance=500, swallow=True)
    gw = fake_gateway(limiter, renew_every=0.0)
    add_session(gw, "a", "s1")
    keeper = Housekeeper(gw, interval=0.001)
    keeper.start()
    await wait_for(lambda: limiter.renewals, within=5)  # stopped inside a limiter call
    started = time.monotonic()
    await keeper.stop()
    assert time.monotonic() - started < 0.5  # one limiter call at most, not the bound
    assert limiter.swallowed >= 1


async def test_a_loop_that_never_ends_is_given_up_within_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(housekeeping_module, "STOP_SECONDS", 0.3)
    keeper = Housekeeper(fake_gateway(RecordingLimiter()))
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
        super().__init__(balance=500)
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
    gw = fake_gateway(limiter, renew_every=0.0)
    sessions = [add_session(gw, "a", f"s{i}")[0] for i in range(40)]
    gw.sessions.discard(sessions[-1])  # ended during the tick: not renewed
    await Housekeeper(gw).tick()
    assert len(limiter.renewals) == 39
    assert limiter.most_in_flight == housekeeping_module.RENEWAL_CONCURRENCY


class FlakyRelease:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def release(self, lease: Lease) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise LimiterUnavailable("release", "timeout")


@pytest.mark.parametrize(("failures", "calls"), [(0, 1), (2, 3), (5, 3)])
async def test_a_release_is_tried_three_times(monkeypatch: pytest.MonkeyPatch,
                                              failures: int, calls: int) -> None:
    monkeypatch.setattr(app_module, "RELEASE_RETRY_SECONDS", 0.001)
    limiter = FlakyRelease(failures)
    gw = SimpleNamespace(limiter=limiter, metrics=Metrics())
    await Gateway.release(cast(Any, gw), Lease("a", "user", "s1"))
    assert limiter.calls == calls
    errors = gw.metrics.registry.get_sample_value(
        "realtime_gateway_limiter_errors_total", {"operation": "release"})
    assert (errors or 0) == min(failures, 3)


class HeldRenewal(RecordingLimiter):
    """A renewal that returns only when the test lets it."""

    def __init__(self) -> None:
        super().__init__(balance=500)
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
    gw = fake_gateway(limiter, renew_every=0.0)
    live, _ = add_session(gw, "a", "s1")
    tick = asyncio.create_task(Housekeeper(gw).tick())
    await asyncio.wait_for(limiter.started.wait(), 5)
    gw.sessions.discard(live)  # the session ends now, its renewal in flight
    ending = asyncio.create_task(live.renewal_settled())
    await asyncio.sleep(0.05)
    assert not ending.done()  # still waiting for the renewal
    limiter.go.set()
    await asyncio.wait_for(ending, 5)
    assert limiter.renewals == ["s1"]
    await tick
