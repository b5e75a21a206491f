"""Where live WebRTC calls are found by id, from any replica (CONTRACT §9 hang-up).

A call's :class:`CallRecord` (owner tenant and subject, upstream name and upstream call id,
expiry) is written when the call is answered and deleted when it ends.  With ``redis:``
configured it is a small hash ``rtgw:call:<call_id>`` with a TTL, so a hang-up reaching
another replica finds it; without, a dict in this process.  Redis calls are bounded by
``redis.timeout_seconds`` (as in :mod:`gateway.limits.redis`); a Redis failure raises
:class:`gateway.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Protocol

from gateway.config import RedisConfig
from gateway.errors import Unavailable

KEY_PREFIX = "rtgw:call:"
RETRY_AFTER_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One live call.  ``expires_at`` is epoch seconds (the call's latest possible end)."""

    call_id: str
    tenant: str
    subject: str
    upstream: str
    upstream_call_id: str
    expires_at: float


class CallStore(Protocol):
    """Live calls by gateway call id."""

    async def put(self, record: CallRecord) -> None:
        """Store ``record`` until it is deleted or ``expires_at`` passes."""
        ...

    async def get(self, call_id: str) -> CallRecord | None:
        """The live record of ``call_id`` (a checked id), or ``None``."""
        ...

    async def delete(self, call_id: str) -> bool:
        """Forget ``call_id``; True if it was there (only one deleter wins)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class MemoryCallStore:
    """The in-process store (one replica)."""

    def __init__(self) -> None:
        self._records: dict[str, CallRecord] = {}

    async def put(self, record: CallRecord) -> None:
        self._records[record.call_id] = record

    async def get(self, call_id: str) -> CallRecord | None:
        record = self._records.get(call_id)
        if record is not None and record.expires_at <= time.time():
            self._records.pop(call_id, None)
            return None
        return record

    async def delete(self, call_id: str) -> bool:
        return self._records.pop(call_id, None) is not None

    async def aclose(self) -> None:
        return None


class RedisCallStore:
    """The shared store: one hash per call with a TTL (``redis:`` url and timeout)."""

    def __init__(self, config: RedisConfig) -> None:
        from gateway.limits.redis import _connect

        self._timeout = config.timeout_seconds
        self._client = _connect(config.url, config.timeout_seconds, 16)

    async def put(self, record: CallRecord) -> None:
        ttl = max(1, int(record.expires_at - time.time()) + 1)
        fields: dict[bytes | bytearray | memoryview[int] | str | int | float,
                     bytes | bytearray | memoryview[int] | str | int | float] = {
            k: str(v) for k, v in asdict(record).items()}
        key = KEY_PREFIX + record.call_id
        try:
            async with asyncio.timeout(self._timeout):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.hset(key, mapping=fields)
                    pipe.expire(key, ttl)
                    await pipe.execute()
        except Exception as exc:
            raise Unavailable("the call store is unavailable; retry shortly",
                              retry_after=RETRY_AFTER_SECONDS, reason="call_store") from exc

    async def get(self, call_id: str) -> CallRecord | None:
        try:
            async with asyncio.timeout(self._timeout):
                fields = await self._client.hgetall(KEY_PREFIX + call_id)
        except Exception as exc:
            raise Unavailable("the call store is unavailable; retry shortly",
                              retry_after=RETRY_AFTER_SECONDS, reason="call_store") from exc
        if not fields:
            return None
        text = {str(k): v if isinstance(v, str) else v.decode() for k, v in fields.items()}
        return CallRecord(call_id=text["call_id"], tenant=text["tenant"],
                          subject=text["subject"], upstream=text["upstream"],
                          upstream_call_id=text["upstream_call_id"],
                          expires_at=float(text["expires_at"]))

    async def delete(self, call_id: str) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._client.delete(KEY_PREFIX + call_id))
        except Exception as exc:
            raise Unavailable("the call store is unavailable; retry shortly",
                              retry_after=RETRY_AFTER_SECONDS, reason="call_store") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def build_call_store(redis: RedisConfig | None) -> CallStore:
    """Redis when ``redis:`` is configured, else in process."""
    return MemoryCallStore() if redis is None else RedisCallStore(redis)
