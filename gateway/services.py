"""The services every stage of a session is given (DESIGN "The path of one session").

Built once per gateway by :func:`gateway.app.build_gateway` and passed down as an
argument — never reached through a hub object or a module global.
"""

from __future__ import annotations

from dataclasses import dataclass

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
