"""One accepted emulator WebSocket (``GET /v1/realtime``).

A :class:`~gateway.emulator.session.Session` on a ``websockets`` server connection, with
the connection-level faults (drop, close, stall, echo) and the record of how the
connection closed.  A WebRTC call serves the same session over its data channel instead
(:mod:`gateway.emulator.webrtc`).
"""

from __future__ import annotations

import logging
import time

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.emulator.handshake import (
    BETA_CLOSE_CODE,
    BETA_CLOSE_REASON,
    BETA_MESSAGE,
    Handshake,
    is_beta,
)
from gateway.emulator.records import SessionRecord
from gateway.emulator.session import Session
from gateway.emulator.voice import Voice

__all__ = ["SocketSession"]

_log = logging.getLogger("gateway.emulator.session")


class SocketSession(Session):
    """One accepted WebSocket connection (``GET /v1/realtime``) served by a :class:`Session`."""

    def __init__(
        self,
        connection: ServerConnection,
        handshake: Handshake,
        record: SessionRecord,
        voice: Voice,
    ) -> None:
        super().__init__(connection, handshake, record, voice)
        self._conn = connection

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until it closes; record how it ended."""
        try:
            if is_beta(self._handshake.openai_beta):
                await self._send_error("beta_api_shape_disabled", BETA_MESSAGE)
                await self._conn.close(BETA_CLOSE_CODE, BETA_CLOSE_REASON)
                return
            await self.open()
            await self._serve()
        except ConnectionClosed:
            pass
        except Exception:
            _log.exception("emulator session %s failed", self.record.id)
        finally:
            await self.aclose()
            if self._conn.state is State.OPEN:
                await self._conn.close(1011, "emulator error")
            await self._conn.wait_closed()
            self._record_close()

    async def _serve(self) -> None:
        first = True
        async for message in self._conn:
            incoming = self._ingest(message)
            if first and (self._faults.close is not None or self._faults.drop):
                if self._faults.drop:
                    self._aborted = True
                    self._conn.transport.abort()
                    await self._conn.wait_closed()
                else:
                    code = self._faults.close
                    assert code is not None
                    await self._conn.close(code, f"emulator close {code}")
                return
            first = False
            if self._faults.stall:
                continue
            if self._faults.echo:
                await self._conn.send(message)
                continue
            await self._dispatch(incoming)

    def _record_close(self) -> None:
        record = self.record
        protocol = self._conn.protocol
        received, sent = protocol.close_rcvd, protocol.close_sent
        if received is not None and (sent is None or protocol.close_rcvd_then_sent):
            record.close_initiator = "client"
            record.close_code, record.close_reason = received.code, received.reason
        elif sent is not None:
            record.close_initiator = "emulator"
            record.close_code, record.close_reason = sent.code, sent.reason
        else:
            record.close_initiator = "emulator" if self._aborted else "client"
            record.close_code, record.close_reason = 1006, ""
        record.closed = True
        record.ended_at = time.time()

