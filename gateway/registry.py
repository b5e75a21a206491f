"""The live sessions of this replica: capacity, pending handshakes and the drain.

A session is *pending* from the moment its upgrade is taken (:meth:`Registry.handshake`)
to its 101 or refusal, and *live* from :meth:`Registry.register` to
:meth:`Registry.unregister`.  ``server.max_sessions`` bounds both together (CONTRACT §2);
while draining (SIGTERM, :mod:`gateway.server`) nothing new is taken.  The registry knows
a live session only through :class:`LiveSession` (end it, read its account), so the
housekeeping loop and the drain work the same for every kind of session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Protocol

from gateway.accounting import Account
from gateway.errors import SessionEnd, Unavailable
from gateway.logs import get_logger
from gateway.metrics import Metrics

log = get_logger(__name__)

RETRY_AFTER_UNAVAILABLE = 5.0
"""Seconds suggested (``Retry-After``) to clients refused because this replica is draining
or full."""


class LiveSession(Protocol):
    """What the registry and the housekeeping loop need of a live session."""

    @property
    def account(self) -> Account:
        """The session's usage, lease and labels."""
        ...

    def end(self, cause: SessionEnd) -> None:
        """Ask the session to end with ``cause`` (idempotent; returns at once)."""
        ...

    def publish_counters(self) -> None:
        """Add the session's message counters since the last call to the metrics."""
        ...

    def blocked_for(self, interval: float) -> float:
        """Seconds (in steps of ``interval``) a send has been blocked with no progress."""
        ...


class Registry:
    """The sessions of one gateway process.

    Args:
        max_sessions: ``server.max_sessions``, the bound on live plus pending sessions.
        metrics: for the ``draining`` gauge.
    """

    def __init__(self, max_sessions: int, metrics: Metrics) -> None:
        self.max_sessions = max_sessions
        self._metrics = metrics
        self._sessions: set[LiveSession] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.pending_handshakes = 0
        """Upgrades taken and not yet answered (101 or refusal)."""
        self.draining = False

    @property
    def sessions(self) -> frozenset[LiveSession]:
        """The live sessions now (a snapshot)."""
        return frozenset(self._sessions)

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    @contextlib.contextmanager
    def handshake(self) -> Iterator[None]:
        """Count one pending handshake for the ``with`` block.

        Raises:
            Unavailable: draining (``reason="draining"``) or ``max_sessions`` live and
                pending sessions already (``reason="replica_full"``), 503 / 4503.
        """
        if self.draining:
            raise Unavailable("the gateway is restarting; retry shortly",
                              retry_after=RETRY_AFTER_UNAVAILABLE, reason="draining")
        if len(self._sessions) + self.pending_handshakes >= self.max_sessions:
            raise Unavailable("this gateway replica is full; retry shortly",
                              retry_after=RETRY_AFTER_UNAVAILABLE, reason="replica_full")
        self.pending_handshakes += 1
        try:
            yield
        finally:
            self.pending_handshakes -= 1

    def register(self, session: LiveSession) -> None:
        """Count ``session`` as live (for the drain, capacity and housekeeping)."""
        self._sessions.add(session)
        self._idle.clear()

    def unregister(self, session: LiveSession) -> None:
        """Forget ``session`` (no-op when unknown); the housekeeping loop stops seeing it."""
        self._sessions.discard(session)
        if not self._sessions:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every live session to end; True if none is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        return not self._sessions

    def start_drain(self) -> None:
        """Stop admitting: ``/readyz`` turns 503 and new upgrades get 503 ``unavailable``."""
        if not self.draining:
            self.draining = True
            self._metrics.draining.set(1)
            log.info("gateway.draining", live_sessions=len(self._sessions))

    def end_all(self, cause: SessionEnd) -> None:
        """Ask every live session to end with ``cause`` (e.g. 1012 at the end of a drain)."""
        for session in list(self._sessions):
            session.end(cause)
