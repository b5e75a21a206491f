"""A live session's books: usage, message counters, and its start and end (CONTRACT §6).

:class:`Account` is created when a session is admitted and closed once when it ends.
Usage events tapped by the relay are queued (:meth:`Account.on_usage`, never blocking the
data plane) and counted in batches — by the housekeeping loop once a second, and at the
end (:meth:`Account.settle`).  Its metrics and the ``session.start`` / ``session.end``
log lines (``docs/logs.md``) are written here and nowhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.authenticator import Principal
from gateway.config import TenantConfig
from gateway.limits.base import Balance, Lease, Limiter
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.usage import KINDS, TokenCounts

log = get_logger(__name__)

KNOWN_CLOSE_CODES = frozenset(
    [*range(1000, 1016),  # RFC 6455 §7.4.1 and the IANA WebSocket Close Code registry
     *(4000 + status for status in (400, 401, 403, 408, 429, 500, 502, 503, 504))])
"""Close codes a client's close is counted under in ``closes_total{code}``: the protocol's
and the gateway's (``4000 + status``, CONTRACT §5).  A client may send any of about 4,000
others, which would each make a series: they are counted as ``other``."""


def close_code_label(code: int, initiator: str) -> str:
    """The ``closes_total{code}`` label of a close: the code's number, except for a
    client's close with a code not in :data:`KNOWN_CLOSE_CODES` (``"other"``).  The
    upstream's and the gateway's codes are kept as they are: a few, chosen by the
    upstream's operator or by the gateway, and what an operator needs to read."""
    if initiator == "client" and code not in KNOWN_CLOSE_CODES:
        return "other"
    return str(code)


Counters = tuple[int, int, int, int]
"""``(client→upstream messages, their payload bytes, upstream→client messages, bytes)``."""


@dataclass(frozen=True, slots=True)
class Ending:
    """How a session ended, for its metrics and end line.

    ``outcome`` is ``ok`` or a §5 in-session code (``token_expired``, ``rate_limited`` …,
    ``upstream_error``); ``close_code``/``initiator`` are ``None`` when no close was seen.
    """

    outcome: str
    close_code: int | None = None
    initiator: str | None = None


@dataclass(eq=False)
class Account:
    """One session's usage and counters.

    ``model`` is the client-facing model name, ``upstream`` the upstream's config name,
    ``peer`` the client's ``host:port``; ``protocol`` the client's Realtime protocol
    (``ga``, or ``beta`` for a translated session); ``transport`` is ``websocket`` or
    ``webrtc`` (the session metrics' label); ``started`` is monotonic seconds.
    """

    principal: Principal
    model: str
    upstream: str
    lease: Lease
    peer: str
    metrics: Metrics
    protocol: str = "ga"
    transport: str = "websocket"
    started: float = field(default_factory=time.monotonic)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    """Tokens counted so far, by CONTRACT §6 kind."""
    billable_tokens: int = 0
    _pending: list[TokenCounts] = field(default_factory=list)
    _published: Counters = (0, 0, 0, 0)

    @property
    def tenant(self) -> TenantConfig:
        return self.principal.tenant

    @property
    def labels(self) -> tuple[str, str, str, str]:
        """``(tenant, model, upstream, transport)``, the session metrics' labels."""
        return self.principal.tenant.id, self.model, self.upstream, self.transport

    def on_usage(self, counts: TokenCounts) -> None:
        """Queue one usage event's counts (called by the data plane; O(1), never blocks)."""
        self._pending.append(counts)

    def take_pending(self) -> int:
        """Count the queued usage in ``tokens_total`` and the session's totals; return its
        billable tokens (0 when none), which the caller charges to the tenant."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        tenant_id = self.principal.tenant.id
        total = 0
        for counts in batch:
            total += counts.billable
            for kind, value in counts.by_kind().items():
                if value:
                    self.tokens[kind] += value
                    self.metrics.tokens_total.labels(tenant_id, self.model, kind).inc(value)
        self.billable_tokens += total
        return total

    async def settle(self, limiter: Limiter) -> Balance | None:
        """:meth:`take_pending` and charge the tenant now (at the session's end).

        Returns the balance, or ``None`` when there was nothing to charge or the tenant
        has no ``tokens_per_minute``.  Limiter failures are the limiter's to handle
        (:mod:`gateway.limits.failover`).
        """
        total = self.take_pending()
        limits = self.principal.tenant.limits
        if not total or limits.tokens_per_minute is None:
            return None
        return await limiter.charge(self.principal.tenant.id, limits, total)

    def publish(self, now: Counters) -> None:
        """Add the counters' growth since the last call to ``messages_total`` and
        ``message_bytes_total``."""
        last = self._published
        if now == last:
            return
        m = self.metrics
        m.messages_client_to_upstream.inc(now[0] - last[0])
        m.bytes_client_to_upstream.inc(now[1] - last[1])
        m.messages_upstream_to_client.inc(now[2] - last[2])
        m.bytes_upstream_to_client.inc(now[3] - last[3])
        self._published = now

    def open(self, **fields: Any) -> None:
        """The session is live: ``sessions_active`` +1 and the ``session.start`` line
        (``fields`` are added to it)."""
        m = self.metrics
        m.sessions_active.labels(*self.labels).inc()
        m.protocol_sessions_active.labels(self.protocol).inc()
        m.protocol_sessions_total.labels(self.protocol).inc()
        p = self.principal
        log.info("session.start", session_id=self.lease.session_id, tenant=p.tenant.id,
                 subject=p.subject, model=self.model, upstream=self.upstream,
                 transport=self.transport, client=self.peer, protocol=self.protocol,
                 **fields)

    def close(self, ending: Ending, counters: Counters) -> None:
        """The session ended: publish the last counters, ``sessions_active`` minus one,
        ``sessions_total``, ``session_duration_seconds``, ``closes_total`` and the
        ``session.end`` line.  Call once, after :meth:`settle`."""
        self.publish(counters)
        duration = time.monotonic() - self.started
        m = self.metrics
        labels = self.labels
        m.sessions_active.labels(*labels).dec()
        m.protocol_sessions_active.labels(self.protocol).dec()
        m.sessions_total.labels(*labels, ending.outcome).inc()
        m.session_duration_seconds.labels(labels[0], self.model, self.transport).observe(
            duration)
        if ending.close_code is not None and ending.initiator is not None:
            m.closes_total.labels(ending.initiator, close_code_label(
                ending.close_code, ending.initiator)).inc()
        p = self.principal
        log.info(
            "session.end", session_id=self.lease.session_id, tenant=p.tenant.id,
            subject=p.subject, model=self.model, upstream=self.upstream,
            transport=self.transport, duration_s=round(duration, 3), outcome=ending.outcome,
            close_code=ending.close_code, close_initiator=ending.initiator,
            client_to_upstream_messages=counters[0], client_to_upstream_bytes=counters[1],
            upstream_to_client_messages=counters[2], upstream_to_client_bytes=counters[3],
            tokens=self.billable_tokens, tokens_by_kind=self.tokens,
        )
