"""A session's conversation: its items, what each costs as input, and the item operations.

Items follow openai-python ``types/realtime/conversation_item.py`` (GA): ``message``
(roles ``user``, ``system``, ``assistant``), ``function_call`` and ``function_call_output``.
``conversation.item.create`` (with ``previous_item_id``, ``"root"`` for the front),
``retrieve``, ``truncate`` (assistant audio only) and ``delete`` are served here; the
session sends the events.  Prices follow :mod:`gateway.emulator.tokens`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.emulator.schema import (
    JSON,
    RequestError,
    check_number,
    invalid_type,
    invalid_value,
    missing,
    new_id,
    require_object,
)
from gateway.emulator.tokens import IMAGE_TOKENS, input_audio_tokens, text_tokens

__all__ = ["Conversation", "Item", "build_item", "decode_audio"]

_CONTENT_TYPES = {
    "user": ("input_text", "input_audio", "input_image"),
    "system": ("input_text",),
    "assistant": ("output_text", "output_audio"),
}
_ACTIONS = {"retrieve": "retrieving", "truncate": "truncating", "delete": "deleting"}


@dataclass
class Item:
    """A conversation item: its wire shape plus what it costs as input."""

    data: JSON
    text_tokens: int = 0
    image_tokens: int = 0
    audio_parts: dict[int, tuple[int, int]] = field(default_factory=dict)
    """content index → (audio bytes, bytes per ms)."""
    seen: bool = False
    """Already part of an earlier response's input (its tokens are then cached)."""

    @property
    def id(self) -> str:
        """The item's ``id``."""
        return str(self.data["id"])

    @property
    def audio_tokens(self) -> int:
        """Input audio tokens of all its audio parts."""
        return sum(input_audio_tokens(size, bpm) for size, bpm in self.audio_parts.values())


def decode_audio(value: Any, param: str) -> bytes:
    """Decode a base64 audio field.

    Raises:
        RequestError: not a string, or not valid base64.
    """
    if not isinstance(value, str):
        raise invalid_type(param, "a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            "invalid_value", f"Invalid '{param}': expected base64-encoded audio bytes.", param
        ) from None


def build_item(raw: Any, param: str, input_bpm: int, output_bpm: int) -> Item:
    """Validate a client-supplied conversation item and price it.

    *input_bpm*/*output_bpm*: bytes per millisecond of user/assistant audio parts.

    Raises:
        RequestError: the item is malformed.
    """
    source = require_object(raw, param)
    kind = source.get("type")
    data: JSON = {"id": None, "object": "realtime.item", "type": kind, "status": "completed"}
    item = Item(data=data)
    if source.get("id") is not None:
        if not isinstance(source["id"], str) or not source["id"]:
            raise invalid_type(f"{param}.id", "a string")
        data["id"] = source["id"]
    if kind == "message":
        role = source.get("role")
        if role not in _CONTENT_TYPES:
            raise invalid_value(f"{param}.role", role, tuple(_CONTENT_TYPES))
        content = source.get("content")
        if not isinstance(content, list):
            raise missing(f"{param}.content")
        data["role"] = role
        data["content"] = []
        for index, part_raw in enumerate(content):
            part_param = f"{param}.content[{index}]"
            part = require_object(part_raw, part_param)
            part_type = part.get("type")
            if part_type not in _CONTENT_TYPES[role]:
                raise invalid_value(f"{part_param}.type", part_type, _CONTENT_TYPES[role])
            stored: JSON = {"type": part_type}
            if part_type in ("input_text", "output_text"):
                if not isinstance(part.get("text"), str):
                    raise missing(f"{part_param}.text")
                stored["text"] = part["text"]
                item.text_tokens += text_tokens(part["text"])
            elif part_type == "input_image":
                if not isinstance(part.get("image_url"), str):
                    raise missing(f"{part_param}.image_url")
                stored["image_url"] = part["image_url"]
                if isinstance(part.get("detail"), str):
                    stored["detail"] = part["detail"]
                item.image_tokens += IMAGE_TOKENS
            else:
                transcript = part.get("transcript")
                if transcript is not None and not isinstance(transcript, str):
                    raise invalid_type(f"{part_param}.transcript", "a string")
                stored["transcript"] = transcript
                bpm = input_bpm if part_type == "input_audio" else output_bpm
                if part.get("audio") is not None:
                    audio = decode_audio(part["audio"], f"{part_param}.audio")
                    item.audio_parts[index] = (len(audio), bpm)
                elif part_type == "input_audio":
                    raise missing(f"{part_param}.audio")
                elif transcript:
                    item.text_tokens += text_tokens(transcript)
            data["content"].append(stored)
    elif kind == "function_call":
        for key in ("name", "arguments"):
            if not isinstance(source.get(key), str):
                raise missing(f"{param}.{key}")
        call_id = source.get("call_id")
        data["name"] = source["name"]
        data["call_id"] = call_id if isinstance(call_id, str) else new_id("call")
        data["arguments"] = source["arguments"]
        item.text_tokens = text_tokens(source["name"] + source["arguments"])
    elif kind == "function_call_output":
        for key in ("call_id", "output"):
            if not isinstance(source.get(key), str):
                raise missing(f"{param}.{key}")
        data["call_id"] = source["call_id"]
        data["output"] = source["output"]
        item.text_tokens = text_tokens(source["output"])
    else:
        raise invalid_value(
            f"{param}.type", kind, ("message", "function_call", "function_call_output")
        )
    if data["id"] is None:
        data["id"] = new_id("item")
    return item


class Conversation:
    """The items of a session's default conversation, oldest first.

    Attributes:
        id: the conversation id (``conv_…``) responses report.
        items: the items; responses read them as their input.
    """

    def __init__(self) -> None:
        self.id = new_id("conv")
        self.items: list[Item] = []

    def find(self, item_id: Any) -> int | None:
        """The index of the item with id *item_id*, or ``None``."""
        for index, item in enumerate(self.items):
            if item.id == item_id:
                return index
        return None

    def last_id(self) -> str | None:
        """The id of the newest item, or ``None`` when empty."""
        return self.items[-1].id if self.items else None

    def append(self, item: Item) -> str | None:
        """Append *item*; return the id of the item before it."""
        previous = self.last_id()
        self.items.append(item)
        return previous

    def insert(self, item: Item, previous_item_id: Any) -> str | None:
        """Insert *item* after *previous_item_id* (``None``: at the end; ``"root"``: first);
        return the id of the item before it.

        Raises:
            RequestError: the id is taken, or *previous_item_id* is not found.
        """
        if self.find(item.id) is not None:
            raise RequestError(
                "invalid_value", f"Item with id '{item.id}' already exists.", "item.id"
            )
        if previous_item_id is None:
            position = len(self.items)
        elif previous_item_id == "root":
            position = 0
        else:
            found = self.find(previous_item_id)
            if found is None:
                raise RequestError(
                    "invalid_value",
                    f"Previous item with item_id '{previous_item_id}' not found.",
                    "previous_item_id",
                )
            position = found + 1
        self.items.insert(position, item)
        return self.items[position - 1].id if position > 0 else None

    def _index(self, item_id: Any, action: Literal["retrieve", "truncate", "delete"]) -> int:
        index = self.find(item_id)
        if index is None:
            raise RequestError(
                f"item_{action}_invalid_item_id",
                f"Error {_ACTIONS[action]} item: the item with id '{item_id}' does not exist.",
                "item_id",
            )
        return index

    def get(self, item_id: Any) -> Item:
        """The item with id *item_id* (``conversation.item.retrieve``).

        Raises:
            RequestError: there is none (``item_retrieve_invalid_item_id``).
        """
        return self.items[self._index(item_id, "retrieve")]

    def delete(self, item_id: Any) -> Item:
        """Remove and return the item with id *item_id*.

        Raises:
            RequestError: there is none (``item_delete_invalid_item_id``).
        """
        return self.items.pop(self._index(item_id, "delete"))

    def truncate(self, item_id: Any, content_index: Any, audio_end_ms: Any) -> Item:
        """Cut an assistant audio part to *audio_end_ms* ms and clear its transcript.

        Raises:
            RequestError: no such item, not assistant audio, or the audio is shorter.
        """
        item = self.items[self._index(item_id, "truncate")]
        check_number(audio_end_ms, "audio_end_ms", 0, 1e9, True)
        assert isinstance(audio_end_ms, int)
        part = item.audio_parts.get(content_index) if isinstance(content_index, int) else None
        if item.data.get("role") != "assistant" or part is None:
            raise RequestError(
                "invalid_value",
                "Only assistant audio content can be truncated.",
                "content_index",
            )
        size, bpm = part
        if audio_end_ms * bpm > size:
            raise RequestError(
                "invalid_value",
                f"Audio content of {size // bpm}ms is already shorter than {audio_end_ms}ms.",
                "audio_end_ms",
            )
        item.audio_parts[content_index] = (audio_end_ms * bpm, bpm)
        item.data["content"][content_index]["transcript"] = ""
        return item

    def replace(self, data: JSON, priced: Item) -> None:
        """Give the item with ``data["id"]`` (if still there) *data* and *priced*'s costs."""
        index = self.find(data["id"])
        if index is not None:
            stored = self.items[index]
            stored.data = data
            stored.text_tokens = priced.text_tokens
            stored.audio_parts = priced.audio_parts
