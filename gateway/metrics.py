"""Prometheus metrics of CONTRACT §6 on the gateway's own ``CollectorRegistry``.

No metric is registered globally: each :class:`Metrics` owns a registry, so
tests can build many gateways in one process.  Label values are bounded: tenant
ids and model names come from the configuration (``unknown`` before a tenant is
known), never from user input or token claims.

Per-frame counts are kept in the session and published here at most once a
second and at close (see :mod:`gateway.relay`), never per frame.

Under ``serve --workers N`` (:mod:`gateway.workers`) each worker process is started with
``PROMETHEUS_MULTIPROC_DIR`` set, so prometheus-client keeps every value in a per-process
file there, and the supervisor serves the sum on the metrics port.  Counters and
histograms are summed over every worker that ever ran (an exited worker's files stay, so
totals never go back).  Each gauge names how it aggregates (``multiprocess_mode``; ignored
in a single process):

* ``livesum`` — ``sessions_active``, ``protocol_sessions_active``: the sessions of the
  workers alive now (a crashed worker's sessions are gone, so they stop counting);
* ``livemax`` — ``draining``: 1 while any live worker drains (all drain together);
* ``max`` — ``build_info``, ``tenant_max_sessions``, ``tenant_tokens_per_minute``: the same
  value in every worker (a configured limit is the tenant's, not N times it).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from gateway import __version__

PREFIX = "realtime_gateway"
UNKNOWN_TENANT = "unknown"

HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"


class Metrics:
    """Every metric of CONTRACT §6, plus ``tenant_max_sessions{tenant}`` and
    ``tenant_tokens_per_minute{tenant}`` (configured limits, for the "near the tenant cap" and
    "token budget" alerts), ``protocol_sessions_active{protocol}`` and
    ``protocol_sessions_total{protocol}`` (``ga`` / ``beta``: how many beta-protocol clients
    remain) and, with ``process_metrics``, the standard process/platform collectors (a
    worker of ``serve --workers`` has none: its supervisor reports every worker's process
    metrics, see :mod:`gateway.workers`).

    ``handshake_duration_seconds{phase="upstream_connect"}`` is observed on every dial,
    failed or not (its count is the error-ratio denominator); ``phase="total"`` once per 101.

    The session metrics (``sessions_active``, ``sessions_total``, ``session_duration_seconds``)
    carry ``transport``: ``websocket`` or ``webrtc`` (CONTRACT §9).

    Attribute names follow the metric names without the ``realtime_gateway_`` prefix.
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        r = self.registry
        p = PREFIX
        self.sessions_active = Gauge(
            f"{p}_sessions_active", "Live sessions (WebSocket relays and WebRTC calls).",
            ["tenant", "model", "upstream", "transport"], registry=r,
            multiprocess_mode="livesum")
        self.sessions_total = Counter(
            f"{p}_sessions", "Established sessions that ended, by outcome "
            "(ok, token_expired, rate_limited, session_expired, shutting_down, upstream_error).",
            ["tenant", "model", "upstream", "transport", "outcome"], registry=r)
        self.session_rejections_total = Counter(
            f"{p}_session_rejections", "Sessions refused before or at the upgrade, by error code.",
            ["tenant", "code"], registry=r)
        self.session_duration_seconds = Histogram(
            f"{p}_session_duration_seconds", "Duration of established sessions in seconds.",
            ["tenant", "model", "transport"], buckets=DURATION_BUCKETS, registry=r)
        self.handshake_duration_seconds = Histogram(
            f"{p}_handshake_duration_seconds",
            "Time spent before the 101, by phase (auth, admission, upstream_connect, total).",
            ["phase"], buckets=HANDSHAKE_BUCKETS, registry=r)
        self.messages_total = Counter(
            f"{p}_messages", "WebSocket messages relayed, by direction.", ["direction"],
            registry=r)
        self.message_bytes_total = Counter(
            f"{p}_message_bytes", "Payload bytes of relayed messages, by direction.",
            ["direction"], registry=r)
        self.closes_total = Counter(
            f"{p}_closes", "Session closes by initiator (client, upstream, gateway) and the "
            "close code the client was sent or sent.", ["initiator", "code"], registry=r)
        self.tokens_total = Counter(
            f"{p}_tokens", "Tokens reported by upstream usage events, by kind.",
            ["tenant", "model", "kind"], registry=r)
        self.upstream_connect_errors_total = Counter(
            f"{p}_upstream_connect_errors", "Failed upstream dials, by reason.",
            ["upstream", "reason"], registry=r)
        self.limiter_errors_total = Counter(
            f"{p}_limiter_errors", "Limiter storage errors, by operation.", ["operation"],
            registry=r)
        self.jwks_refreshes_total = Counter(
            f"{p}_jwks_refreshes", "JWKS fetches, by result (success, failure).",
            ["tenant", "result"], registry=r)
        self.client_secrets_minted_total = Counter(
            f"{p}_client_secrets_minted", "Client secrets (ek_) minted (CONTRACT §8).",
            ["tenant"], registry=r)
        self.client_secret_rejections_total = Counter(
            f"{p}_client_secret_rejections", "Client-secret requests refused, by error code.",
            ["tenant", "code"], registry=r)
        self.draining = Gauge(f"{p}_draining", "1 while this replica drains.", registry=r,
                              multiprocess_mode="livemax")
        self.build_info = Gauge(f"{p}_build_info", "Build information.", ["version"],
                                registry=r, multiprocess_mode="max")
        self.build_info.labels(version=__version__).set(1)
        self.tenant_max_sessions = Gauge(
            f"{p}_tenant_max_sessions", "Configured concurrent-session cap of each tenant.",
            ["tenant"], registry=r, multiprocess_mode="max")
        self.tenant_tokens_per_minute = Gauge(
            f"{p}_tenant_tokens_per_minute", "Configured token budget of each tenant.",
            ["tenant"], registry=r, multiprocess_mode="max")
        self.protocol_sessions_active = Gauge(
            f"{p}_protocol_sessions_active", "Live relayed sessions by client protocol "
            "(ga: verbatim relay; beta: translated to GA, CONTRACT §10).", ["protocol"],
            registry=r, multiprocess_mode="livesum")
        self.protocol_sessions_total = Counter(
            f"{p}_protocol_sessions", "Sessions established, by client protocol (ga, beta).",
            ["protocol"], registry=r)
        self.call_hangups_total = Counter(
            f"{p}_call_hangups", "WebRTC calls ended by the gateway or their caller, by cause "
            "(token_expired, budget_exhausted, session_expired, shutting_down, "
            "sideband_unavailable, sideband_lost, model_forbidden, mcp_forbidden, client_hangup, "
            "upstream_ended).", ["tenant", "cause"], registry=r)
        self.messages_client_to_upstream = self.messages_total.labels(CLIENT_TO_UPSTREAM)
        self.messages_upstream_to_client = self.messages_total.labels(UPSTREAM_TO_CLIENT)
        self.bytes_client_to_upstream = self.message_bytes_total.labels(CLIENT_TO_UPSTREAM)
        self.bytes_upstream_to_client = self.message_bytes_total.labels(UPSTREAM_TO_CLIENT)

    def render(self) -> bytes:
        """The text exposition format (``text/plain; version=0.0.4``) of every metric."""
        return generate_latest(self.registry)
