"""The services every stage of a session is given (DESIGN "The path of one session").

Built once per gateway by :func:`gateway.app.build_gateway` and passed down as an
argument — never reached through a hub object or a module global.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.auth.authenticator import Authenticator
from gateway.config import Config
from gateway.limits.base import Limiter
from gateway.metrics import Metrics


@dataclass(frozen=True, slots=True)
class Services:
    """The configuration and the shared objects built from it (one set per process)."""

    config: Config
    metrics: Metrics
    authenticator: Authenticator
    limiter: Limiter
    upstream_tls: Mapping[str, ssl.SSLContext] = field(default_factory=dict)
    """One TLS client context per ``wss://`` upstream, by name
    (:func:`gateway.upstream.tls_contexts`), shared by every dial of this process;
    a missing entry makes the dial build its own context."""
