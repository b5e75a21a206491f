"""Streaming one planned response: its events, cancellation and its ``response.done``.

A response streams ``response.created``, ``response.output_item.added``,
``conversation.item.added``, ``response.content_part.added``, interleaved
``response.output_audio_transcript.delta`` (one per word) and ``response.output_audio.delta``
(100 ms of audio each, the last one shorter; what the audio is — a tone or speech — is
:mod:`gateway.emulator.voice`), ``response.output_audio.done``,
``response.output_audio_transcript.done``, ``response.content_part.done``,
``response.output_item.done``, ``conversation.item.done``, ``response.done``.  With
``output_modalities: ["text"]`` the text events (``response.output_text.delta|done``)
replace the audio ones; a function call streams
``response.function_call_arguments.delta`` … ``.done`` instead.  ``conversation: "none"``
keeps the output out of the conversation (no ``conversation.item.*`` events).

A cancel (``response.cancel``, or a barge-in) ends the response after the chunk being
sent: the open parts are closed with what was sent so far, items are ``incomplete`` and
``response.done`` has status ``cancelled`` (with the reason).  Usage follows
:mod:`gateway.emulator.tokens` and counts only what was sent.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from websockets.exceptions import ConnectionClosed

from gateway.emulator.conversation import Conversation, Item
from gateway.emulator.faults import Faults
from gateway.emulator.plan import Plan
from gateway.emulator.records import SessionRecord
from gateway.emulator.schema import JSON, bytes_per_ms, new_id
from gateway.emulator.tokens import output_audio_tokens, response_usage, text_tokens
from gateway.emulator.voice import Voice

__all__ = ["AUDIO_CHUNK_MS", "Response", "Responses", "Send"]

AUDIO_CHUNK_MS = 100
"""Audio per ``response.output_audio.delta``, milliseconds."""

_TEXT_DELTA_PACE_SECONDS = 0.05
_ARGUMENT_DELTA_CHARS = 16

Send: TypeAlias = Callable[[JSON], Awaitable[None]]
"""Sends one server event (``type`` first; the event id is added)."""


@dataclass
class Response:
    """One response: its plan, and the cancel reason once it is being cancelled."""

    id: str
    plan: Plan
    cancel_reason: str | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class Responses:
    """The responses of one session; at most one is active (not being cancelled).

    A response started while the previous one is being cancelled waits for it to end.

    Attributes:
        send: sends one server event.
        conversation: the session's conversation (output items join it).
        record: the session's record (usage totals).
        faults: the connection's faults (``slow``, ``extra_input_text_tokens``).
        voice: what spoken replies sound like.
        active: the response streaming now, or ``None``.
        last_id: the id of the latest response started, or ``None``.
    """

    send: Send
    conversation: Conversation
    record: SessionRecord
    faults: Faults
    voice: Voice
    active: Response | None = None
    last_id: str | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def start(self, plan: Plan) -> None:
        """Start streaming a response for *plan* (after a cancelling one has finished)."""
        previous = self.active
        response = Response(id=new_id("resp"), plan=plan)
        self.active = response
        self.last_id = response.id
        waiting_for = previous.task if previous is not None else None
        task = asyncio.create_task(self._stream(response, waiting_for))
        response.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Cancel every response task and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds if self.faults.slow else 0)

    def _response_object(
        self, response: Response, status: str, output: list[JSON], usage: JSON | None
    ) -> JSON:
        plan = response.plan
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": response.cancel_reason}
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self.conversation.id if plan.in_conversation else None,
            "output_modalities": plan.modalities,
            "max_output_tokens": plan.max_output_tokens,
            "audio": {"output": {"format": plan.output_format, "voice": plan.voice}},
            "usage": usage,
            "metadata": plan.metadata,
        }

    async def _stream(self, response: Response, waiting_for: asyncio.Task[None] | None) -> None:
        """Send one response's events; always ends with ``response.done``."""
        if waiting_for is not None and not waiting_for.done():
            await asyncio.wait([waiting_for])
        try:
            await self.send(
                {
                    "type": "response.created",
                    "response": self._response_object(response, "in_progress", [], None),
                }
            )
            item_id = new_id("item")
            if response.plan.kind == "function_call":
                item, out_text, out_audio = await self._stream_call(response, item_id)
            else:
                item, out_text, out_audio = await self._stream_message(response, item_id)
            await self._finish(response, item, out_text, out_audio)
        except ConnectionClosed:
            return
        finally:
            if self.active is response:
                self.active = None

    async def _open_item(self, response: Response, data: JSON) -> str | None:
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": 0,
                "item": data,
            }
        )
        if not response.plan.in_conversation:
            return self.conversation.last_id()
        previous = self.conversation.append(Item(data=data))
        await self.send(
            {"type": "conversation.item.added", "previous_item_id": previous, "item": data}
        )
        return previous

    async def _close_item(
        self, response: Response, data: JSON, previous: str | None, item: Item
    ) -> None:
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": 0,
                "item": data,
            }
        )
        if response.plan.in_conversation:
            self.conversation.replace(data, item)
            await self.send(
                {"type": "conversation.item.done", "previous_item_id": previous, "item": data}
            )

    async def _stream_message(self, response: Response, item_id: str) -> tuple[JSON, int, int]:
        plan = response.plan
        data: JSON = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        previous = await self._open_item(response, copy.deepcopy(data))
        where = {"response_id": response.id, "item_id": item_id, "output_index": 0,
                 "content_index": 0}
        words = re.findall(r"\S+\s*", plan.text)
        if plan.kind == "text":
            await self.send(
                {"type": "response.content_part.added", **where,
                 "part": {"type": "text", "text": ""}}
            )
            sent = ""
            for word in words:
                if response.cancel_reason is not None:
                    break
                await self.send({"type": "response.output_text.delta", **where, "delta": word})
                sent += word
                await self._pause(_TEXT_DELTA_PACE_SECONDS)
            await self.send({"type": "response.output_text.done", **where, "text": sent})
            await self.send(
                {"type": "response.content_part.done", **where,
                 "part": {"type": "text", "text": sent}}
            )
            data["content"] = [{"type": "output_text", "text": sent}]
            priced = Item(data=data, text_tokens=text_tokens(sent))
            data["status"] = "incomplete" if response.cancel_reason else "completed"
            await self._close_item(response, data, previous, priced)
            return data, text_tokens(sent), 0
        bpm = bytes_per_ms(plan.output_format)
        audio = await self.voice.reply_audio(
            plan.text, str(plan.output_format.get("type", "audio/pcm"))
        )
        total, view = len(audio), memoryview(audio)
        chunk = AUDIO_CHUNK_MS * bpm
        await self.send(
            {"type": "response.content_part.added", **where,
             "part": {"type": "audio", "transcript": ""}}
        )
        transcript = ""
        sent_bytes = 0
        steps = max(len(words), math.ceil(total / chunk))
        for step in range(steps):
            if response.cancel_reason is not None:
                break
            if step < len(words):
                await self.send(
                    {"type": "response.output_audio_transcript.delta", **where,
                     "delta": words[step]}
                )
                transcript += words[step]
            if sent_bytes < total:
                size = min(chunk, total - sent_bytes)
                delta = base64.b64encode(view[sent_bytes : sent_bytes + size]).decode("ascii")
                await self.send({"type": "response.output_audio.delta", **where, "delta": delta})
                sent_bytes += size
            await self._pause(AUDIO_CHUNK_MS / 1000)
        await self.send({"type": "response.output_audio.done", **where})
        await self.send(
            {"type": "response.output_audio_transcript.done", **where, "transcript": transcript}
        )
        await self.send(
            {"type": "response.content_part.done", **where,
             "part": {"type": "audio", "transcript": transcript}}
        )
        data["content"] = [{"type": "output_audio", "transcript": transcript}]
        data["status"] = "incomplete" if response.cancel_reason else "completed"
        priced = Item(data=data, audio_parts={0: (sent_bytes, bpm)})
        await self._close_item(response, data, previous, priced)
        return data, text_tokens(transcript), output_audio_tokens(sent_bytes, bpm)

    async def _stream_call(self, response: Response, item_id: str) -> tuple[JSON, int, int]:
        plan = response.plan
        name = plan.tool_name or ""
        call_id = new_id("call")
        data: JSON = {
            "id": item_id,
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": name,
            "call_id": call_id,
            "arguments": "",
        }
        previous = await self._open_item(response, copy.deepcopy(data))
        where = {"response_id": response.id, "item_id": item_id, "output_index": 0,
                 "call_id": call_id}
        sent = ""
        for start in range(0, len(plan.text), _ARGUMENT_DELTA_CHARS):
            if response.cancel_reason is not None:
                break
            piece = plan.text[start : start + _ARGUMENT_DELTA_CHARS]
            await self.send(
                {"type": "response.function_call_arguments.delta", **where, "delta": piece}
            )
            sent += piece
            await self._pause(_TEXT_DELTA_PACE_SECONDS)
        await self.send(
            {"type": "response.function_call_arguments.done", **where, "name": name,
             "arguments": sent}
        )
        data["arguments"] = sent
        data["status"] = "incomplete" if response.cancel_reason else "completed"
        priced = Item(data=data, text_tokens=text_tokens(name + sent))
        await self._close_item(response, data, previous, priced)
        return data, text_tokens(name + sent), 0

    async def _finish(self, response: Response, item: JSON, out_text: int, out_audio: int) -> None:
        usage = response_usage(
            response.plan.input_usage, out_text, out_audio, self.faults.extra_input_text_tokens
        )
        self.record.add_usage(usage)
        status = "cancelled" if response.cancel_reason else "completed"
        if self.active is response:
            self.active = None
        await self.send(
            {
                "type": "response.done",
                "response": self._response_object(response, status, [item], usage),
            }
        )
