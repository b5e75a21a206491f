"""Stopping a session's housekeeping task (defect D5): bounded, even when a cancellation is
lost inside a limiter call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway import session as session_module
from gateway.limits.base import Balance
from gateway.session import LiveSession
from gateway.usage import TokenCounts


class SwallowingLimiter:
    """A limiter whose calls lose every cancellation that reaches them, as redis-py's
    ``asyncio.wait_for`` write could on Python 3.11."""

    def __init__(self) -> None:
        self.calls = 0
        self.swallowed = 0

    async def _call(self) -> Balance:
        self.calls += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.swallowed += 1
        return Balance(None)

    async def charge(self, tenant: str, limits: object, tokens: int) -> Balance:
        return await self._call()

    async def renew(self, lease: object, limits: object) -> Balance:
        return await self._call()


def live_session(limiter: SwallowingLimiter) -> LiveSession:
    limits = SimpleNamespace(tokens_per_minute=10**6)
    gw = SimpleNamespace(
        config=SimpleNamespace(server=SimpleNamespace(send_timeout_seconds=30.0)),
        lease_renewal_seconds=0.0,  # renew on every round
        limiter=limiter,
        metrics=SimpleNamespace(tokens_total=SimpleNamespace(
            labels=lambda *_: SimpleNamespace(inc=lambda _: None))),
    )
    admitted = SimpleNamespace(
        principal=SimpleNamespace(tenant=SimpleNamespace(id="acme", limits=limits)),
        model="gpt-realtime", lease=object())
    live = LiveSession(gw=cast(Any, gw), admitted=cast(Any, admitted), session_id="s1",
                       peer="127.0.0.1:1")
    live.relay = cast(Any, SimpleNamespace(
        client_messages=0, upstream_messages=0, sending_to_client=False,
        sending_to_upstream=False, end=lambda cause: None))
    live.publish_counters = lambda: None  # type: ignore[method-assign]
    return live


async def test_a_lost_cancellation_does_not_keep_housekeeping_alive() -> None:
    limiter = SwallowingLimiter()
    live = live_session(limiter)
    keeper = asyncio.create_task(live.housekeeping())
    for _ in range(20):  # stop it at many moments, mostly inside a limiter call
        live.on_usage(TokenCounts(billable=1))
        await asyncio.sleep(0.013)
        if limiter.calls:
            break
    started = time.monotonic()
    await live.stop_housekeeping(keeper)
    assert keeper.done()
    assert time.monotonic() - started < 0.5  # one limiter call at most, not the bound
    assert limiter.swallowed >= 1


async def test_a_task_that_never_ends_is_given_up_within_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "HOUSEKEEPING_STOP_SECONDS", 0.3)
    live = live_session(SwallowingLimiter())

    holding = True

    async def immortal() -> None:  # loses every cancellation while ``holding``
        while holding:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    keeper = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    started = time.monotonic()
    await live.stop_housekeeping(keeper)
    assert 0.3 <= time.monotonic() - started < 0.6
    assert not keeper.done()
    holding = False
    keeper.cancel()
    await asyncio.wait({keeper}, timeout=1)
    assert keeper.done()


async def test_the_stop_survives_a_cancellation_of_its_caller() -> None:
    """The session's cleanup after the stop must run even if the session task is
    cancelled while it waits."""
    live = live_session(SwallowingLimiter())
    keeper = asyncio.create_task(live.housekeeping())
    await asyncio.sleep(0.01)
    cleaned_up = asyncio.Event()

    async def session_end() -> None:
        await live.stop_housekeeping(keeper)
        cleaned_up.set()

    ender = asyncio.create_task(session_end())
    await asyncio.sleep(0)
    ender.cancel()
    await asyncio.wait({ender}, timeout=1)
    assert cleaned_up.is_set() and keeper.done()
