"""What a response will say, decided when ``response.create`` arrives (pure but for ids).

* What is said: after a ``function_call_output`` item, ``"The <name> function returned:
  <output>"``; else, after user text, ``"You said: <text>"``; after user audio, ``"I heard
  <s> seconds of audio."``; else a greeting (quoted text is cut to 200 characters).
* Function calls: when function tools are declared (``session.tools`` or
  ``response.tools``), ``tool_choice`` is not ``"none"``, the input does not end with a
  ``function_call_output``, and the latest user message's text contains a tool's name
  (case-insensitive; the first declared wins) — or ``tool_choice`` forces one — the
  response is a ``function_call`` item.  Arguments fill each *required* parameter by
  JSON-schema type (string → the user text, number/integer → 1, boolean → true,
  array → [], object → {}, enum → its first value).
* ``max_output_tokens`` is validated and echoed, not enforced; instructions and ``prompt``
  do not change what is said.  ``conversation: "none"`` keeps the output out of the
  conversation.

``response.create`` parameters follow openai-python
``types/realtime/realtime_response_create_params.py``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from gateway.emulator.conversation import Conversation, Item, build_item
from gateway.emulator.schema import (
    JSON,
    RESPONSE_KEYS,
    bytes_per_ms,
    check_format,
    check_max_output_tokens,
    check_modalities,
    check_tool_choice,
    check_tools,
    invalid_type,
    invalid_value,
    only_keys,
    require_object,
)
from gateway.emulator.tokens import InputUsage

__all__ = ["Plan", "plan_response"]

_QUOTE_CHARS = 200

PlanKind = Literal["audio", "text", "function_call"]


@dataclass
class Plan:
    """What one response will do, fixed when ``response.create`` arrives.

    Attributes:
        kind: an ``audio`` or ``text`` message, or a ``function_call``.
        text: what is said, or the call's JSON arguments.
        tool_name: the function called (``function_call`` only).
        modalities: the response's ``output_modalities``.
        in_conversation: whether the output joins the conversation.
        metadata, max_output_tokens, voice: echoed in the response object.
        output_format: the audio ``format`` object of the output.
        input_usage: the response's input tokens.
    """

    kind: PlanKind
    text: str
    tool_name: str | None
    modalities: list[str]
    in_conversation: bool
    metadata: Any
    max_output_tokens: Any
    voice: Any
    output_format: JSON
    input_usage: InputUsage


def _override(params: JSON, session: JSON, key: str) -> Any:
    """``response.create`` parameter *key*, else the session's value."""
    return params[key] if key in params else session.get(key)


def _clip(text: str) -> str:
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"


def _schema_value(schema: Any, user_text: str) -> Any:
    if not isinstance(schema, dict):
        return user_text
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    return {"number": 1, "integer": 1, "boolean": True, "array": [], "object": {}}.get(
        str(kind), user_text
    )


def _function_arguments(tool: JSON, user_text: str) -> str:
    parameters = tool.get("parameters")
    arguments: JSON = {}
    if isinstance(parameters, dict):
        properties = parameters.get("properties")
        required = parameters.get("required")
        if isinstance(properties, dict) and isinstance(required, list):
            for name in required:
                if isinstance(name, str):
                    arguments[name] = _schema_value(properties.get(name), _clip(user_text))
    return json.dumps(arguments, ensure_ascii=False)


def _response_input(params: JSON, session: JSON, conversation: Conversation) -> list[Item]:
    if "input" not in params:
        return list(conversation.items)
    if not isinstance(params["input"], list):
        raise invalid_type("response.input", "an array")
    input_bpm = bytes_per_ms(session["audio"]["input"]["format"])
    output_bpm = bytes_per_ms(session["audio"]["output"]["format"])
    items: list[Item] = []
    for index, raw in enumerate(params["input"]):
        param = f"response.input[{index}]"
        if isinstance(raw, dict) and raw.get("type") == "item_reference":
            found = conversation.find(raw.get("id"))
            if found is None:
                raise invalid_value(f"{param}.id", raw.get("id"))
            items.append(conversation.items[found])
        else:
            items.append(build_item(raw, param, input_bpm, output_bpm))
    return items


def _decide(
    items: list[Item], tools: list[JSON], tool_choice: Any, modality: str
) -> tuple[PlanKind, str, str | None]:
    speech: Literal["audio", "text"] = "audio" if modality == "audio" else "text"
    last = items[-1].data if items else None
    if last is not None and last.get("type") == "function_call_output":
        name = next(
            (
                str(item.data.get("name"))
                for item in reversed(items)
                if item.data.get("type") == "function_call"
                and item.data.get("call_id") == last.get("call_id")
            ),
            "requested",
        )
        return speech, f"The {name} function returned: {_clip(str(last['output']))}", None
    user = next(
        (
            item
            for item in reversed(items)
            if item.data.get("type") == "message" and item.data.get("role") == "user"
        ),
        None,
    )
    user_text = ""
    if user is not None:
        user_text = " ".join(
            str(part.get("text"))
            for part in user.data["content"]
            if part.get("type") == "input_text"
        )
    functions = [
        tool for tool in tools
        if tool.get("type", "function") == "function" and isinstance(tool.get("name"), str)
    ]
    if functions and tool_choice != "none":
        chosen: JSON | None = None
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            chosen = next((t for t in functions if t["name"] == tool_choice["name"]), None)
            chosen = chosen or {"name": tool_choice["name"]}
        if chosen is None and user_text:
            lowered = user_text.lower()
            chosen = next((t for t in functions if t["name"].lower() in lowered), None)
        if chosen is None and tool_choice == "required":
            chosen = functions[0]
        if chosen is not None:
            name = str(chosen["name"])
            return "function_call", _function_arguments(chosen, user_text), name
    if user is not None and user.audio_parts:
        seconds = sum(size / bpm for size, bpm in user.audio_parts.values()) / 1000
        return speech, f"I heard {seconds:.2f} seconds of audio.", None
    if user_text:
        return speech, f"You said: {_clip(user_text)}", None
    return speech, "Hello from the realtime emulator.", None


def plan_response(params: JSON, session: JSON, conversation: Conversation) -> Plan:
    """Validate ``response.create`` parameters and decide what the response says.

    *params* is the event's ``response`` object (``{}`` when absent), *session* the
    current session object.  The input items are marked as seen (their tokens are
    cached in later responses).

    Raises:
        RequestError: invalid parameters.
    """
    only_keys(params, RESPONSE_KEYS, "response")
    modalities = _override(params, session, "output_modalities")
    check_modalities(modalities, "response.output_modalities")
    tools = _override(params, session, "tools") or []
    check_tools(tools, "response.tools")
    tool_choice = _override(params, session, "tool_choice")
    check_tool_choice(tool_choice, "response.tool_choice")
    conversation_mode = params.get("conversation", "auto")
    if conversation_mode not in ("auto", "none"):
        raise invalid_value("response.conversation", conversation_mode, ("auto", "none"))
    max_output_tokens = _override(params, session, "max_output_tokens")
    check_max_output_tokens(max_output_tokens, "response.max_output_tokens")
    output = copy.deepcopy(session["audio"]["output"])
    if "audio" in params:
        audio = require_object(params["audio"], "response.audio")
        only_keys(audio, {"output"}, "response.audio")
        override = require_object(audio.get("output", {}), "response.audio.output")
        only_keys(override, {"format", "voice"}, "response.audio.output")
        if "format" in override:
            check_format(override["format"], "response.audio.output.format")
        output.update(copy.deepcopy(override))
    items = _response_input(params, session, conversation)
    usage = InputUsage()
    for item in items:
        usage.add(item.text_tokens, item.audio_tokens, item.image_tokens, cached=item.seen)
    kind, text, tool_name = _decide(items, tools, tool_choice, modalities[0])
    for item in items:
        item.seen = True
    return Plan(
        kind=kind,
        text=text,
        tool_name=tool_name,
        modalities=list(modalities),
        in_conversation=conversation_mode == "auto",
        metadata=params.get("metadata"),
        max_output_tokens=max_output_tokens,
        voice=output.get("voice"),
        output_format=output["format"],
        input_usage=usage,
    )
