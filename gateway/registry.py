"""The live sessions of this replica: capacity, pending handshakes and the drain.

A handshake is *unauthenticated* from the moment its upgrade is taken
(:meth:`Registry.handshake`) until its token is validated
(:meth:`Handshake.authenticated`), then *pending* until its 101 or refusal; a session is
*live* from :meth:`Registry.register` to :meth:`Registry.unregister`.  Two budgets:

* ``server.max_sessions`` bounds pending plus live sessions (CONTRACT §2): only a
  validated token takes replica capacity, so junk tokens against a slow token endpoint
  cannot make a valid user's upgrade a 503;
* ``server.max_unauthenticated_handshakes`` bounds the unauthenticated ones (each holds
  a connection and possibly an outbound introspection call).

While draining (SIGTERM, :mod:`gateway.server`) nothing new is taken.  The registry knows
a live session only through :class:`LiveSession` (end it, read its account), so the
housekeeping loop and the drain work the same for every kind of session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Protocol

from gateway.accounting import Account
from gateway.config import MAX_UNAUTHENTICATED_HANDSHAKES
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


class Handshake:
    """One upgrade counted by :meth:`Registry.handshake`, unauthenticated until
    :meth:`authenticated`."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.is_authenticated = False

    def authenticated(self) -> None:
        """The token is valid: move this handshake from the unauthenticated budget to
        ``server.max_sessions`` (idempotent).

        Raises:
            Unavailable: ``max_sessions`` live and pending sessions already
                (``reason="replica_full"``, 503 / 4503).
        """
        if self.is_authenticated:
            return
        registry = self._registry
        registry.check_capacity()
        registry.unauthenticated_handshakes -= 1
        registry.authenticated_handshakes += 1
        self.is_authenticated = True


class Registry:
    """The sessions of one gateway process.

    Args:
        max_sessions: ``server.max_sessions``, the bound on live plus pending
            (authenticated) sessions.
        metrics: for the ``draining`` gauge.
        max_unauthenticated: ``server.max_unauthenticated_handshakes``, the bound on
            upgrades whose token is still being checked.
    """

    def __init__(self, max_sessions: int, metrics: Metrics, *,
                 max_unauthenticated: int = MAX_UNAUTHENTICATED_HANDSHAKES) -> None:
        self.max_sessions = max_sessions
        self.max_unauthenticated = max_unauthenticated
        self._metrics = metrics
        self._sessions: set[LiveSession] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.unauthenticated_handshakes = 0
        """Upgrades taken whose token is not validated yet."""
        self.authenticated_handshakes = 0
        """Upgrades with a valid token not yet answered (101 or refusal)."""
        self.draining = False

    @property
    def pending_handshakes(self) -> int:
        """Upgrades taken and not yet answered (101 or refusal), authenticated or not."""
        return self.unauthenticated_handshakes + self.authenticated_handshakes

    @property
    def sessions(self) -> frozenset[LiveSession]:
        """The live sessions now (a snapshot)."""
        return frozenset(self._sessions)

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def check_capacity(self) -> None:
        """Raise :class:`Unavailable` (``reason="replica_full"``, 503 / 4503) when
        ``max_sessions`` live and authenticated pending sessions are counted already."""
        if len(self._sessions) + self.authenticated_handshakes >= self.max_sessions:
            raise Unavailable("this gateway replica is full; retry shortly",
                              retry_after=RETRY_AFTER_UNAVAILABLE, reason="replica_full")

    @contextlib.contextmanager
    def handshake(self) -> Iterator[Handshake]:
        """Count one unauthenticated handshake for the ``with`` block; the block calls
        :meth:`Handshake.authenticated` once the token is valid.

        Raises:
            Unavailable: 503 / 4503 when draining (``reason="draining"``), when the replica
                is full already (``reason="replica_full"``: refused before the token is
                checked, which would be wasted), or ``max_unauthenticated`` handshakes are
                unauthenticated already (``reason="handshakes_full"``).
        """
        if self.draining:
            raise Unavailable("the gateway is restarting; retry shortly",
                              retry_after=RETRY_AFTER_UNAVAILABLE, reason="draining")
        self.check_capacity()
        if self.unauthenticated_handshakes >= self.max_unauthenticated:
            raise Unavailable("this gateway replica is busy; retry shortly",
                              retry_after=RETRY_AFTER_UNAVAILABLE, reason="handshakes_full")
        handshake = Handshake(self)
        self.unauthenticated_handshakes += 1
        try:
            yield handshake
        finally:
            if handshake.is_authenticated:
                self.authenticated_handshakes -= 1
            else:
                self.unauthenticated_handshakes -= 1

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
