"""Beta ↔ GA Realtime translation: :mod:`gateway.beta` (CONTRACT §10).

The evidence, from the installed ``openai`` package's two schemas (``openai.types.beta.realtime``
and ``openai.types.realtime``) and real components:

* detection: one table row per client of ``notes/beta-clients.md`` (the real openai-python
  handshakes, on a loopback server, are in ``tests/integration/test_beta_emulator.py``);
* the walk: every beta client and GA server event type of the package is classified (a new
  type fails until it is); a generated instance of every GA server event type, for every
  member of every union in it, translates into events the **beta** models accept, and
  realistic beta client events of every type translate into events the **GA** models accept;
  no field the target schema lacks slips through, beyond a listed few;
* (a beta conversation against the GA emulator: ``tests/integration/test_beta_emulator.py``);
* model pinning sees ``session.model`` after translation; arbitrary JSON never raises.
"""

from __future__ import annotations

import base64
import copy
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.beta.realtime import realtime_client_event as beta_client_events
from openai.types.beta.realtime import realtime_server_event as beta_server_events
from openai.types.beta.realtime.session import Session as BetaSession
from openai.types.beta.realtime.transcription_session_update import (
    Session as BetaTranscriptionSession,
)
from openai.types.beta.realtime.transcription_session_update import (
    SessionInputAudioTranscription,
)
from openai.types.realtime import realtime_client_event as ga_client_events
from openai.types.realtime import realtime_server_event as ga_server_events
from openai.types.realtime.realtime_audio_config_output import VoiceID
from openai.types.realtime.realtime_response_create_audio_output import OutputVoiceID
from openai.types.realtime.response_item_reference import ResponseItemReference
from openai.types.responses.tool_choice_function import ToolChoiceFunction
from openai.types.responses.tool_choice_mcp import ToolChoiceMcp
from pydantic import BaseModel, Field, TypeAdapter

from gateway import beta
from gateway.beta import (
    CLIENT_RULES,
    NO_EQUIVALENT,
    SERVER_RULES,
    BetaTranslator,
    Handling,
    client_frame_is_verbatim,
    is_beta,
    is_preview_api_version,
    upstream_frame_renamed,
)
from gateway.guard import model_guard

JSON = dict[str, Any]
DOC = Path(__file__).resolve().parents[1] / "docs" / "beta-translation.md"

BETA_CLIENT_EVENT: TypeAdapter[Any] = TypeAdapter(
    Annotated[beta_client_events.RealtimeClientEvent, Field(discriminator="type")])
BETA_SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(
    Annotated[beta_server_events.RealtimeServerEvent, Field(discriminator="type")])
GA_CLIENT_EVENT: TypeAdapter[Any] = TypeAdapter(
    Annotated[ga_client_events.RealtimeClientEvent, Field(discriminator="type")])
GA_SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(
    Annotated[ga_server_events.RealtimeServerEvent, Field(discriminator="type")])


def union_types(union: Any) -> dict[str, type[BaseModel]]:
    """``{type literal: model}`` of a discriminated event union of the openai package."""
    (members, *_) = typing.get_args(union)
    out = {}
    for model in typing.get_args(members):
        (kind,) = typing.get_args(model.model_fields["type"].annotation)
        out[kind] = model
    return out


BETA_CLIENT_TYPES = union_types(beta_client_events.RealtimeClientEvent)
GA_SERVER_TYPES = union_types(ga_server_events.RealtimeServerEvent)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(("api_version", "preview"), [
    ("2024-10-01-preview", True),
    ("2024-12-17", True),
    ("2025-04-01-preview", True),
    ("2025-04-01-PREVIEW", True),
    (" 2024-10-01-preview ", True),
    ("2025-10-01-preview", True),
    ("2025-08-28", False),
    ("2025-12-01", False),
    ("", False),
    ("v1", False),
    ("latest", False),
    ("2024-10-01-previewx", False),
    ("2024-10-01-preview&deployment=x", False),
])
def test_preview_api_versions(api_version: str, preview: bool) -> None:
    assert is_preview_api_version(api_version) is preview


def h(**headers: str) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name.replace("_", "-").lower().encode(), value.encode())
                 for name, value in headers.items())


def q(query: str) -> tuple[tuple[str, str], ...]:
    return tuple(tuple(pair.split("=", 1)) for pair in query.split("&") if pair)  # type: ignore[misc]


TOKEN = "T"
REQUEST_ID = "0f8b3c55-5b7a-4a1e-9d1e-2c7e0f0e0a11"

# One row per client of ../shared/notes/beta-clients.md (the URL each builds for https://gw).
CLIENT_TABLE: list[tuple[str, str, str, tuple[tuple[bytes, bytes], ...], tuple[str, ...], bool]] = [
    ("rt-client 0.5 browser (query api-key)", "/openai/realtime",
     f"api-version=2024-10-01-preview&x-ms-client-request-id={REQUEST_ID}&deployment=D"
     f"&api-key={TOKEN}", (), (), True),
    ("rt-client 0.5 browser (query Authorization)", "/openai/realtime",
     f"api-version=2024-10-01-preview&x-ms-client-request-id={REQUEST_ID}&deployment=D"
     f"&Authorization=Bearer+{TOKEN}", (), (), True),
    ("rt-client in Node (api-key header)", "/openai/realtime",
     f"api-version=2024-10-01-preview&x-ms-client-request-id={REQUEST_ID}&deployment=D",
     h(api_key=TOKEN), (), True),
    ("rt-client OpenAI mode", "/v1/realtime", "model=M", (),
     ("realtime", f"openai-insecure-api-key.{TOKEN}", "openai-beta.realtime-v1"), True),
    ("Python rtclient", "/openai/realtime", "deployment=D&api-version=2024-10-01-preview",
     h(api_key=TOKEN), (), True),
    ("openai-node beta OpenAIRealtimeWebSocket (browser)", "/v1/realtime", "model=M", (),
     ("realtime", f"openai-insecure-api-key.{TOKEN}", "openai-beta.realtime-v1"), True),
    ("openai-node beta OpenAIRealtimeWS (Node)", "/v1/realtime", "model=M",
     h(authorization=f"Bearer {TOKEN}", openai_beta="realtime=v1"), (), True),
    ("openai-python client.beta.realtime", "/v1/realtime", "model=M",
     h(authorization=f"Bearer {TOKEN}", openai_beta="realtime=v1", x_stainless_lang="python"),
     (), True),
    ("LiveKit Agents on Azure (api_version)", "/openai/realtime",
     "api-version=2024-10-01-preview&deployment=D", h(api_key=TOKEN), (), True),
    ("LiveKit Agents on Azure (2025-04-01-preview)", "/openai/realtime",
     "api-version=2025-04-01-preview&deployment=D", h(api_key=TOKEN), (), True),
    ("Azure preview api-version 2024-12-17", "/openai/realtime",
     "api-version=2024-12-17&deployment=D", h(api_key=TOKEN), (), True),
    ("openai-node <= 7.4 AzureOpenAI, native WebSocket (GA events)", "/openai/realtime",
     f"api-version=2025-08-28&deployment=D&api-key={TOKEN}", (), (), False),
    ("openai-python AsyncAzureOpenAI GA, preview api-version", "/openai/realtime",
     "api-version=2025-04-01-preview&deployment=D",
     h(api_key=TOKEN, x_stainless_lang="python"), (), False),
    ("openai-python AsyncAzureOpenAI GA, GA api-version", "/openai/realtime",
     "api-version=2025-08-28&deployment=D", h(api_key=TOKEN), (), False),
    ("GA client on /openai/realtime without api-version", "/openai/realtime", "deployment=D",
     h(api_key=TOKEN), (), False),
    ("GA Azure v1 path with a stray preview api-version", "/openai/v1/realtime",
     "model=M&api-version=2024-10-01-preview", h(api_key=TOKEN), (), False),
    ("GA openai-python client.realtime", "/v1/realtime", "model=M",
     h(authorization=f"Bearer {TOKEN}", x_stainless_lang="python"), (), False),
    ("GA browser, Foundry path", "/language-model-service/ws/v1/open-ai/realtime", "model=M",
     (), (f"Bearer-{TOKEN}",), False),
    ("GA browser, OpenAI style", "/v1/realtime", "model=M", (),
     ("realtime", f"openai-insecure-api-key.{TOKEN}"), False),
    ("OpenAI-Beta of another API only", "/v1/realtime", "model=M",
     h(openai_beta="assistants=v2"), (), False),
    ("OpenAI-Beta listing realtime=v1 among others", "/v1/realtime", "model=M",
     h(openai_beta="assistants=v2, Realtime=V1"), (), True),
]


@pytest.mark.parametrize(("client", "path", "query", "headers", "offers", "expected"),
                         CLIENT_TABLE, ids=[row[0] for row in CLIENT_TABLE])
def test_is_beta_per_client(client: str, path: str, query: str,
                            headers: tuple[tuple[bytes, bytes], ...], offers: tuple[str, ...],
                            expected: bool) -> None:
    assert is_beta(path, q(query), headers, offers) is expected, client


def test_first_api_version_counts() -> None:
    query = q("api-version=2025-08-28&api-version=2024-10-01-preview&deployment=D")
    assert not is_beta("/openai/realtime", query, (), ())


# --------------------------------------------------------------------------- classification


def test_every_beta_client_type_is_classified() -> None:
    assert set(CLIENT_RULES) == set(BETA_CLIENT_TYPES)


def test_every_ga_server_type_is_classified() -> None:
    assert set(SERVER_RULES) == set(GA_SERVER_TYPES)


def test_rules_are_consistent() -> None:
    beta_server_types = set(union_types(beta_server_events.RealtimeServerEvent))
    ga_client_types = set(union_types(ga_client_events.RealtimeClientEvent))
    for kind, rule in SERVER_RULES.items():
        assert rule.reason, kind
        if rule.handling is Handling.DROPPED:
            assert rule.sent_as == ()
        else:
            # every name sent is a beta server type (transcription_session.created is the one
            # the beta API sent that openai-python's beta union lacks)
            assert set(rule.sent_as) <= beta_server_types | {"transcription_session.created"}
        if rule.handling is Handling.PASSED:
            assert rule.sent_as == (kind,)
    for kind, rule in CLIENT_RULES.items():
        assert rule.reason, kind
        assert rule.handling is not Handling.DROPPED, "client input is never swallowed"
        assert set(rule.sent_as) <= ga_client_types, kind


def test_docs_cover_every_type_and_every_missing_equivalent() -> None:
    text = DOC.read_text()
    for kind in [*CLIENT_RULES, *SERVER_RULES]:
        assert f"`{kind}`" in text, kind
    for kind in {name for rule in SERVER_RULES.values() for name in rule.sent_as}:
        assert f"`{kind}`" in text, kind
    assert "temperature" in text
    assert len(NO_EQUIVALENT) >= 5


# --------------------------------------------------------------------------- the walk


EXCLUDED_MODELS: dict[type, str] = {
    ToolChoiceFunction: "beta's tool_choice is typed str; objects pass unchanged",
    ToolChoiceMcp: "beta has no MCP; passes unchanged",
    VoiceID: "beta's voice is typed str; a custom voice object passes unchanged",
    OutputVoiceID: "as VoiceID",
}
"""Union members the generator leaves out: the translator passes them unchanged and the beta
models type the field more narrowly."""

GA_FIELDS_BETA_CLIENTS_SEE = {
    "name": "response.function_call_arguments.done carries the function name in GA",
    "languages": "GA transcription: detected languages (event) and language hints (config)",
    "image_tokens": "GA usage: image input tokens",
    "cached_tokens_details": "GA usage: cached tokens by modality",
    "idle_timeout_ms": "GA server_vad option",
    "strength": "GA noise_reduction option",
    "delay": "GA transcription option",
    "keywords": "GA transcription option",
    "detail": "GA user content field of image parts (the generator fills it on every part)",
    "image_url": "as detail",
    "include": "GA transcription sessions: include (beta transcription sessions had it too)",
    "input_audio_noise_reduction": "beta transcription sessions had it; openai-python's "
                                   "beta TranscriptionSession model lacks it",
    "object": "session objects: the beta API sent realtime.session; the beta model lacks it",
    "expires_at": "session objects: as object",
    "id": "transcription session objects: as object",
}
"""Fields the beta models lack that the translator passes on (beta parsers ignore them)."""


def sample(annotation: Any, variant: int) -> Any:
    """A JSON value of *annotation*, every field filled; *variant* picks union members and
    literal values (``variant % count``), so successive variants cover every member."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return sample(args[0], variant)
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None) and a not in EXCLUDED_MODELS]
        if any(typing.get_origin(a) is Literal for a in members):
            members = [a for a in members if a is not str]  # known values over "x"
        return sample(members[variant % len(members)], variant)
    if origin is Literal:
        return args[variant % len(args)]
    if origin in (list, typing.List):  # noqa: UP006
        return [sample(args[0], variant)]
    if origin in (dict, typing.Dict):  # noqa: UP006
        return {"key": sample(args[1], variant)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {field.alias or name: sample(field.annotation, variant)
                for name, field in annotation.model_fields.items()}
    scalars: dict[Any, Any] = {str: "x", int: 1, float: 0.5, bool: True, object: {}}
    return copy.deepcopy(scalars[annotation])


def extras(value: Any) -> set[str]:
    """Names of the fields a validated model tree holds that its models do not declare."""
    found: set[str] = set()
    if isinstance(value, BaseModel):
        found |= set(value.model_extra or {})
        for name in type(value).model_fields:
            found |= extras(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            found |= extras(item)
    elif isinstance(value, dict):
        for item in value.values():
            found |= extras(item)
    return found


def literal_values(annotation: Any) -> set[Any]:
    """The values of the ``Literal`` inside an ``Optional[Literal[...]]``."""
    return {value for arg in typing.get_args(annotation) for value in typing.get_args(arg)}


BETA_MODELS = literal_values(BetaSession.model_fields["model"].annotation)
BETA_ASR_MODELS = literal_values(SessionInputAudioTranscription.model_fields["model"].annotation)


def with_beta_model_names(event: JSON) -> JSON:
    """*event* with model names newer than the beta schema's lists replaced by known ones:
    the translator passes names unchanged (they are the upstream's), and beta's lists are
    frozen in 2025 while the beta realtime session types the transcription model as str."""
    event = copy.deepcopy(event)
    session = event.get("session")
    if isinstance(session, dict):
        if "model" in session and session["model"] not in BETA_MODELS:
            session["model"] = "gpt-realtime"
        transcription = session.get("input_audio_transcription")
        if isinstance(transcription, dict) and transcription.get("model") not in BETA_ASR_MODELS:
            transcription["model"] = "whisper-1"
    return event


def check_beta_server_event(event: JSON) -> None:
    """Fail unless *event* is a beta server event: the beta models accept it, it holds no
    GA-only field beyond :data:`GA_FIELDS_BETA_CLIENTS_SEE`, and no GA-only content type."""
    if event["type"] in ("transcription_session.created", "transcription_session.updated"):
        # openai-python's beta TranscriptionSession is the REST answer (client_secret
        # required); the WebSocket event carries the session shape of the update
        assert set(event) <= {"type", "event_id", "session"}
        assert isinstance(event["event_id"], str)
        model: Any = BetaTranscriptionSession.model_validate(
            with_beta_model_names(event)["session"])
    else:
        model = BETA_SERVER_EVENT.validate_python(with_beta_model_names(event))
    leaked = extras(model) - set(GA_FIELDS_BETA_CLIENTS_SEE)
    assert not leaked, (event["type"], leaked, event)
    text = json.dumps({**event, "type": ""})
    for ga_name in ('"output_text"', '"output_audio"', '"output_modalities"', '"audio/pcm',
                    '"mcp_', '"input_image"'):
        assert ga_name not in text, (ga_name, event)


def check_ga_client_event(event: JSON) -> None:
    """Fail unless the GA client models accept *event* without a field they lack."""
    response = event.get("response")
    if isinstance(response, dict) and isinstance(response.get("input"), list):
        references = [i for i in response["input"] if i.get("type") == "item_reference"]
        for reference in references:
            ResponseItemReference.model_validate(reference)
        event = {**event, "response": {**response, "input": [
            i for i in response["input"] if i.get("type") != "item_reference"]}}
    model = GA_CLIENT_EVENT.validate_python(event)
    assert not extras(model), (event["type"], extras(model), event)


def walk_server(kind: str, event: JSON) -> list[JSON]:
    rule = SERVER_RULES[kind]
    out = BetaTranslator().upstream_to_client(copy.deepcopy(event))
    if rule.handling is Handling.DROPPED:
        assert out == [], kind
    elif rule.handling is Handling.PASSED:
        assert out == [event], kind
    else:
        assert [e["type"] for e in out] in ([], *[[name] for name in rule.sent_as]), kind
    for translated in out:
        check_beta_server_event(translated)
    return out


VARIANTS = range(9)  # the largest union (conversation items) has 9 members


@pytest.mark.parametrize("kind", sorted(GA_SERVER_TYPES))
def test_walk_every_ga_server_event_type(kind: str) -> None:
    model = GA_SERVER_TYPES[kind]
    sent = 0
    for variant in VARIANTS:
        event = sample(model, variant)
        GA_SERVER_EVENT.validate_python(event)  # the generator makes genuine GA events
        sent += len(walk_server(kind, event))
    rule = SERVER_RULES[kind]
    assert (sent > 0) is (rule.handling is not Handling.DROPPED), kind


def test_walk_shows_no_mcp_items_or_image_parts() -> None:
    """Union members a beta client cannot parse are the ones the walk saw disappear."""
    model = GA_SERVER_TYPES["conversation.item.added"]
    kinds = {sample(model, v)["item"]["type"] for v in VARIANTS}
    assert {"mcp_call", "mcp_list_tools", "mcp_approval_request"} <= kinds
    shown = [BetaTranslator().upstream_to_client(sample(model, v)) for v in VARIANTS]
    assert {e[0]["item"]["type"] for e in shown if e} == {"message", "function_call",
                                                          "function_call_output"}
    image = {"id": "i", "type": "message", "role": "user",
             "content": [{"type": "input_image", "image_url": "data:,"},
                         {"type": "input_text", "text": "hi"}]}
    (created,) = BetaTranslator().upstream_to_client(
        {"type": "conversation.item.added", "event_id": "e", "item": image})
    assert created["item"]["content"] == [{"type": "input_text", "text": "hi"}]


AUDIO = base64.b64encode(bytes(960)).decode()
TOOL = {"type": "function", "name": "get_time", "description": "The time.",
        "parameters": {"type": "object", "properties": {}}}

BETA_CLIENT_SAMPLES: list[tuple[str, JSON]] = [
    ("session.update, everything", {"type": "session.update", "event_id": "c1", "session": {
        "model": "gpt-realtime", "modalities": ["text", "audio"], "instructions": "Be brief.",
        "voice": "alloy", "speed": 1.1, "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "input_audio_transcription": {"model": "whisper-1", "language": "en", "prompt": "x"},
        "input_audio_noise_reduction": {"type": "near_field"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                           "silence_duration_ms": 500, "create_response": True,
                           "interrupt_response": True},
        "tools": [TOOL], "tool_choice": "auto", "temperature": 0.8,
        "max_response_output_tokens": 4096, "tracing": "auto",
        "client_secret": {"expires_after": {"anchor": "created_at", "seconds": 600}}}}),
    ("session.update, text only", {"type": "session.update",
                                   "session": {"modalities": ["text"]}}),
    ("session.update, G.711 and semantic VAD", {"type": "session.update", "session": {
        "input_audio_format": "g711_ulaw", "output_audio_format": "g711_alaw",
        "turn_detection": {"type": "semantic_vad", "eagerness": "low", "threshold": 0.4,
                           "prefix_padding_ms": 100, "silence_duration_ms": 200,
                           "create_response": False},
        "max_response_output_tokens": "inf"}}),
    ("session.update, VAD without type, eagerness", {"type": "session.update", "session": {
        "turn_detection": {"eagerness": "high", "silence_duration_ms": 300}}}),
    ("session.update, VAD and transcription off", {"type": "session.update", "session": {
        "turn_detection": None, "input_audio_transcription": None,
        "input_audio_noise_reduction": None, "tracing": None}}),
    ("transcription_session.update", {"type": "transcription_session.update", "event_id": "c2",
                                      "session": {
        "input_audio_format": "pcm16",
        "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "de",
                                      "prompt": "names"},
        "input_audio_noise_reduction": {"type": "far_field"},
        "turn_detection": {"type": "server_vad", "threshold": 0.6},
        "include": ["item.input_audio_transcription.logprobs"], "modalities": ["text"],
        "client_secret": {"expires_at": {"anchor": "created_at", "seconds": 60}}}}),
    ("conversation.item.create, user text", {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "Hello"}]}}),
    ("conversation.item.create, user audio", {"type": "conversation.item.create",
                                              "previous_item_id": "root", "item": {
        "id": "item_1", "object": "realtime.item", "type": "message", "role": "user",
        "status": "completed", "content": [{"type": "input_audio", "audio": AUDIO,
                                            "transcript": "hi"}]}}),
    ("conversation.item.create, assistant text", {"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hi!"}]}}),
    ("conversation.item.create, assistant audio", {"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant",
        "content": [{"type": "audio", "transcript": "Hi!"}]}}),
    ("conversation.item.create, system, no type", {"type": "conversation.item.create", "item": {
        "role": "system", "content": [{"type": "input_text", "text": "Speak German."}]}}),
    ("conversation.item.create, function call", {"type": "conversation.item.create", "item": {
        "type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": "{}"}}),
    ("conversation.item.create, function output", {"type": "conversation.item.create",
                                                   "item": {
        "type": "function_call_output", "call_id": "call_1", "output": "noon"}}),
    ("conversation.item.delete", {"type": "conversation.item.delete", "item_id": "item_1"}),
    ("conversation.item.retrieve", {"type": "conversation.item.retrieve", "item_id": "item_1"}),
    ("conversation.item.truncate", {"type": "conversation.item.truncate", "item_id": "item_1",
                                    "content_index": 0, "audio_end_ms": 1500}),
    ("input_audio_buffer.append", {"type": "input_audio_buffer.append", "audio": AUDIO}),
    ("input_audio_buffer.clear", {"type": "input_audio_buffer.clear"}),
    ("input_audio_buffer.commit", {"type": "input_audio_buffer.commit", "event_id": "c3"}),
    ("output_audio_buffer.clear", {"type": "output_audio_buffer.clear"}),
    ("response.cancel", {"type": "response.cancel", "response_id": "resp_1"}),
    ("response.create, defaults", {"type": "response.create"}),
    ("response.create, everything", {"type": "response.create", "response": {
        "modalities": ["text"], "instructions": "Shout.", "voice": "verse",
        "output_audio_format": "g711_alaw", "tools": [TOOL], "tool_choice": "required",
        "temperature": 0.7, "max_response_output_tokens": "inf", "conversation": "none",
        "metadata": {"topic": "weather"},
        "input": [{"type": "item_reference", "id": "item_1"},
                  {"type": "message", "role": "assistant",
                   "content": [{"type": "text", "text": "Earlier answer"}]},
                  {"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "And now?"}]}]}}),
]


@pytest.mark.parametrize(("name", "event"), BETA_CLIENT_SAMPLES,
                         ids=[name for name, _ in BETA_CLIENT_SAMPLES])
def test_walk_beta_client_events(name: str, event: JSON) -> None:
    kind = event["type"]
    BETA_CLIENT_EVENT.validate_python(event)  # the sample is a genuine beta event
    rule = CLIENT_RULES[kind]
    out = BetaTranslator().client_to_upstream(copy.deepcopy(event))
    assert [e["type"] for e in out] == list(rule.sent_as), name
    if rule.handling is Handling.PASSED:
        assert out == [event]
    for translated in out:
        check_ga_client_event(translated)


def test_client_samples_cover_every_beta_client_type() -> None:
    assert {event["type"] for _, event in BETA_CLIENT_SAMPLES} == set(BETA_CLIENT_TYPES)


@pytest.mark.parametrize("kind", sorted(BETA_CLIENT_TYPES))
def test_generated_beta_client_events_follow_their_rule(kind: str) -> None:
    """Every field of every beta client model filled (semantically odd combinations too):
    the rule holds and nothing beta-only reaches the upstream."""
    for variant in VARIANTS:
        event = sample(BETA_CLIENT_TYPES[kind], variant)
        out = BetaTranslator().client_to_upstream(copy.deepcopy(event))
        assert [e["type"] for e in out] == list(CLIENT_RULES[kind].sent_as)
        text = json.dumps(out)
        for beta_name in ('"temperature"', '"modalities"', '"input_audio_format"',
                          '"max_response_output_tokens"', '"pcm16"', '"client_secret"'):
            assert beta_name not in text, (beta_name, out)


# --------------------------------------------------------------------------- mappings


def translated_session(session: JSON) -> JSON:
    (event,) = BetaTranslator().client_to_upstream({"type": "session.update",
                                                    "session": session})
    result: JSON = event["session"]
    return result


@pytest.mark.parametrize(("beta_format", "ga_format"), [
    ("pcm16", {"type": "audio/pcm", "rate": 24000}),
    ("g711_ulaw", {"type": "audio/pcmu"}),
    ("g711_alaw", {"type": "audio/pcma"}),
])
def test_audio_formats_both_ways(beta_format: str, ga_format: JSON) -> None:
    session = translated_session({"input_audio_format": beta_format,
                                  "output_audio_format": beta_format})
    assert session == {"type": "realtime", "audio": {"input": {"format": ga_format},
                                                     "output": {"format": ga_format}}}
    (event,) = BetaTranslator().upstream_to_client(
        {"type": "session.updated", "event_id": "e", "session": session})
    assert event["session"] == {"input_audio_format": beta_format,
                                "output_audio_format": beta_format}


def test_unknown_formats_pass_for_the_upstream_to_judge() -> None:
    assert translated_session({"input_audio_format": "opus"})["audio"]["input"] == {
        "format": "opus"}
    odd = {"type": "audio/pcm", "rate": 16000}
    (event,) = BetaTranslator().upstream_to_client({"type": "session.updated", "event_id": "e",
                                                    "session": {"audio": {"input": {
                                                        "format": odd}}}})
    assert event["session"]["input_audio_format"] == odd
    assert beta.format_to_beta({"type": "audio/pcm"}) == "pcm16"


@pytest.mark.parametrize(("beta_modalities", "ga_modalities", "back"), [
    (["text", "audio"], ["audio"], ["text", "audio"]),
    (["audio", "text"], ["audio"], ["text", "audio"]),
    (["audio"], ["audio"], ["text", "audio"]),
    (["text"], ["text"], ["text"]),
    ([], [], []),
    ("audio", "audio", "audio"),
])
def test_modalities_both_ways(beta_modalities: Any, ga_modalities: Any, back: Any) -> None:
    assert translated_session({"modalities": beta_modalities}) == {
        "type": "realtime", "output_modalities": ga_modalities}
    (event,) = BetaTranslator().upstream_to_client(
        {"type": "response.done", "event_id": "e",
         "response": {"id": "r", "output_modalities": ga_modalities}})
    assert event["response"] == {"id": "r", "modalities": back}


def test_session_fields_move_and_no_equivalents_are_dropped() -> None:
    session = translated_session({
        "model": "gpt-realtime", "voice": "ash", "speed": 1.2, "temperature": 0.6,
        "max_response_output_tokens": 100, "instructions": "x", "tools": [TOOL],
        "tool_choice": {"type": "function", "name": "get_time"},
        "client_secret": {"expires_after": {"anchor": "created_at"}},
        "input_audio_transcription": {"model": "whisper-1"},
        "input_audio_noise_reduction": {"type": "far_field"},
        "turn_detection": {"type": "server_vad", "eagerness": "low", "threshold": 0.2},
        "future_field": 1})
    assert session == {
        "type": "realtime", "model": "gpt-realtime", "instructions": "x", "tools": [TOOL],
        "tool_choice": {"type": "function", "name": "get_time"}, "max_output_tokens": 100,
        "future_field": 1,
        "audio": {"input": {"transcription": {"model": "whisper-1"},
                            "noise_reduction": {"type": "far_field"},
                            "turn_detection": {"type": "server_vad", "threshold": 0.2}},
                  "output": {"voice": "ash", "speed": 1.2}}}


def test_a_ga_shaped_part_of_a_beta_session_is_merged() -> None:
    expected = {"type": "realtime",
                "audio": {"output": {"voice": "ash", "speed": 1.5}, "input": {"x": 1}}}
    ga_part = {"output": {"speed": 1.5, "voice": "marin"}, "input": {"x": 1}}
    # the beta field wins, whichever comes first
    assert translated_session({"type": "realtime", "voice": "ash",
                               "audio": copy.deepcopy(ga_part)}) == expected
    assert translated_session({"audio": copy.deepcopy(ga_part), "voice": "ash",
                               "type": "realtime"}) == expected


def test_transcription_session_update_becomes_a_ga_transcription_session() -> None:
    (event,) = BetaTranslator().client_to_upstream({
        "type": "transcription_session.update", "event_id": "c",
        "session": {"input_audio_format": "g711_alaw", "modalities": ["text"],
                    "input_audio_transcription": {"model": "whisper-1"},
                    "include": ["item.input_audio_transcription.logprobs"]}})
    assert event == {"type": "session.update", "event_id": "c", "session": {
        "type": "transcription",
        "audio": {"input": {"format": {"type": "audio/pcma"},
                            "transcription": {"model": "whisper-1"}}},
        "include": ["item.input_audio_transcription.logprobs"]}}


def test_ga_transcription_session_is_announced_the_beta_way() -> None:
    ga = {"type": "transcription", "object": "realtime.transcription_session", "id": "sess_1",
          "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                              "transcription": {"model": "whisper-1"},
                              "noise_reduction": None, "turn_detection": None}},
          "include": None}
    for kind in ("session.created", "session.updated"):
        (event,) = BetaTranslator().upstream_to_client(
            {"type": kind, "event_id": "e", "session": copy.deepcopy(ga)})
        assert event == {"type": "transcription_" + kind, "event_id": "e", "session": {
            "object": "realtime.transcription_session", "id": "sess_1",
            "input_audio_format": "pcm16", "input_audio_transcription": {"model": "whisper-1"},
            "input_audio_noise_reduction": None, "turn_detection": None, "include": None}}
        check_beta_server_event(event)


def test_ga_only_session_fields_and_tools_are_hidden() -> None:
    mcp = {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example"}
    (event,) = BetaTranslator().upstream_to_client({"type": "session.created", "event_id": "e",
                                                    "session": {
        "type": "realtime", "id": "s", "model": "gpt-realtime", "truncation": "auto",
        "prompt": None, "reasoning": None, "parallel_tool_calls": True, "include": None,
        "tools": [TOOL, mcp], "max_output_tokens": "inf", "expires_at": 1}})
    assert event["session"] == {"id": "s", "model": "gpt-realtime", "tools": [TOOL],
                                "max_response_output_tokens": "inf", "expires_at": 1}


def test_response_create_options() -> None:
    (event,) = BetaTranslator().client_to_upstream({"type": "response.create", "response": {
        "modalities": ["text", "audio"], "voice": "sage", "output_audio_format": "g711_ulaw",
        "temperature": 1.0, "max_response_output_tokens": 50, "conversation": "auto",
        "input": [{"role": "assistant", "content": [{"type": "audio", "transcript": "x"}]}]}})
    assert event == {"type": "response.create", "response": {
        "output_modalities": ["audio"], "max_output_tokens": 50, "conversation": "auto",
        "audio": {"output": {"voice": "sage", "format": {"type": "audio/pcmu"}}},
        "input": [{"type": "message", "role": "assistant",
                   "content": [{"type": "output_audio", "transcript": "x"}]}]}}
    check_ga_client_event(event)


def test_response_object_and_usage() -> None:
    usage = {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10,
             "input_token_details": {"text_tokens": 5, "audio_tokens": 15, "image_tokens": 0,
                                     "cached_tokens": 4,
                                     "cached_tokens_details": {"text_tokens": 4}},
             "output_token_details": {"text_tokens": 2, "audio_tokens": 8}}
    (event,) = BetaTranslator().upstream_to_client({"type": "response.done", "event_id": "e",
                                                    "response": {
        "object": "realtime.response", "id": "r", "status": "completed",
        "output_modalities": ["audio"], "max_output_tokens": "inf",
        "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000},
                             "voice": "marin"}},
        "output": [{"id": "i", "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_audio", "transcript": "Hi"}]},
                   {"id": "m", "type": "mcp_call", "server_label": "x", "name": "n",
                    "arguments": "{}"}],
        "usage": copy.deepcopy(usage)}})
    assert event["response"] == {
        "object": "realtime.response", "id": "r", "status": "completed",
        "modalities": ["text", "audio"], "output_audio_format": "pcm16", "voice": "marin",
        "max_output_tokens": "inf",
        "output": [{"id": "i", "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "audio", "transcript": "Hi"}]}],
        "usage": usage}
    parsed = BETA_SERVER_EVENT.validate_python(event)
    # usage: the same shape in both; every beta field reads the GA value
    assert parsed.response.usage.model_dump(exclude_none=True) == {
        key: value for key, value in usage.items()} | {
        "input_token_details": {"text_tokens": 5, "audio_tokens": 15, "cached_tokens": 4,
                                "image_tokens": 0,
                                "cached_tokens_details": {"text_tokens": 4}}}


@pytest.mark.parametrize(("ga", "beta_kind"), [
    ("response.output_audio.delta", "response.audio.delta"),
    ("response.output_audio.done", "response.audio.done"),
    ("response.output_audio_transcript.delta", "response.audio_transcript.delta"),
    ("response.output_audio_transcript.done", "response.audio_transcript.done"),
    ("response.output_text.delta", "response.text.delta"),
    ("response.output_text.done", "response.text.done"),
])
def test_event_renames(ga: str, beta_kind: str) -> None:
    event = {"type": ga, "event_id": "e", "response_id": "r", "item_id": "i",
             "output_index": 0, "content_index": 0, "delta": "AAAA"}
    (out,) = BetaTranslator().upstream_to_client(dict(event))
    assert out == {**event, "type": beta_kind}


def test_content_part_types() -> None:
    for ga, beta_kind in (("output_audio", "audio"), ("output_text", "text"), ("audio", "audio")):
        (event,) = BetaTranslator().upstream_to_client({
            "type": "response.content_part.added", "event_id": "e", "response_id": "r",
            "item_id": "i", "output_index": 0, "content_index": 0,
            "part": {"type": ga, "transcript": ""}})
        assert event["part"] == {"type": beta_kind, "transcript": ""}


def item_event(kind: str, item_id: str = "item_1") -> JSON:
    return {"type": kind, "event_id": f"ev_{kind}", "previous_item_id": None,
            "item": {"id": item_id, "object": "realtime.item", "type": "message",
                     "role": "assistant", "status": "in_progress",
                     "content": [{"type": "output_text", "text": "x"}]}}


def test_item_added_then_done_is_one_created() -> None:
    translator = BetaTranslator()
    (created,) = translator.upstream_to_client(item_event("conversation.item.added"))
    assert created["type"] == "conversation.item.created"
    assert created["item"]["content"] == [{"type": "text", "text": "x"}]
    assert created["event_id"] == "ev_conversation.item.added"
    assert translator.upstream_to_client(item_event("conversation.item.created")) == []
    assert translator.upstream_to_client(item_event("conversation.item.done")) == []
    check_beta_server_event(created)


def test_item_done_without_added_announces_the_item() -> None:
    translator = BetaTranslator()
    (created,) = translator.upstream_to_client(item_event("conversation.item.done"))
    assert created["type"] == "conversation.item.created"
    # items are told apart by id
    assert len(translator.upstream_to_client(item_event("conversation.item.added", "a"))) == 1
    assert len(translator.upstream_to_client(item_event("conversation.item.added", "b"))) == 1


def test_deleted_item_may_be_announced_again() -> None:
    translator = BetaTranslator()
    translator.upstream_to_client(item_event("conversation.item.added"))
    deleted = {"type": "conversation.item.deleted", "event_id": "e", "item_id": "item_1"}
    assert translator.upstream_to_client(dict(deleted)) == [deleted]
    assert len(translator.upstream_to_client(item_event("conversation.item.added"))) == 1


def test_announced_items_are_bounded() -> None:
    translator = BetaTranslator()
    bound = BetaTranslator.MAX_TRACKED_ITEMS
    for n in range(bound + 10):
        assert len(translator.upstream_to_client(item_event("conversation.item.added",
                                                            f"i{n}"))) == 1
    # the oldest were forgotten: their done announces them; a recent one's done is dropped
    assert len(translator.upstream_to_client(item_event("conversation.item.done", "i0"))) == 1
    assert translator.upstream_to_client(item_event("conversation.item.done",
                                                    f"i{bound + 9}")) == []


def test_unknown_types() -> None:
    translator = BetaTranslator()
    client_events: list[JSON] = [{"type": "future.client_event", "x": 1}, {"no": "type"},
                                 {"type": 5}]
    for event in client_events:
        assert translator.client_to_upstream(dict(event)) == [event]
    server_events: list[JSON] = [{"type": "future.server_event"}, {"no": "type"},
                                 {"type": None}]
    for event in server_events:
        assert translator.upstream_to_client(dict(event)) == []


@pytest.mark.parametrize("event", [
    {"type": "session.update"},
    {"type": "session.update", "session": None},
    {"type": "session.update", "session": ["x"]},
    {"type": "conversation.item.create", "item": "x"},
    {"type": "conversation.item.create", "item": {"role": "assistant", "content": "x"}},
    {"type": "response.create", "response": 3},
])
def test_malformed_client_events_reach_the_upstream_unchanged(event: JSON) -> None:
    out = BetaTranslator().client_to_upstream(copy.deepcopy(event))
    assert len(out) == 1
    # the client's mistake stays visible to the upstream, which answers with an error
    assert {k: v for k, v in out[0].items() if k != "item"} == {
        k: v for k, v in event.items() if k != "item"}


def test_malformed_transcription_update_keeps_its_session() -> None:
    (event,) = BetaTranslator().client_to_upstream(
        {"type": "transcription_session.update", "session": "x"})
    assert event == {"type": "session.update", "session": "x"}


# --------------------------------------------------------------------------- model pinning


def pinning_guard(model: str = "gpt-realtime") -> Any:
    return model_guard({model})


@pytest.mark.parametrize(("model", "refused"), [
    ("gpt-realtime", False), (None, False), ("gpt-5-pro", True), (42, True),
    (["gpt-realtime"], True), ({"id": "gpt-5-pro"}, True),
])
def test_model_pinning_sees_the_translated_session_model(model: object, refused: bool) -> None:
    (event,) = BetaTranslator().client_to_upstream(
        {"type": "session.update", "session": {"model": model, "modalities": ["text"]}})
    assert event["session"]["model"] == model
    answer = pinning_guard()(json.dumps(event).encode())
    assert (answer is not None) is refused


def test_a_beta_session_without_model_passes_pinning() -> None:
    (event,) = BetaTranslator().client_to_upstream(
        {"type": "session.update", "session": {"voice": "alloy"}})
    assert "model" not in event["session"]
    assert pinning_guard()(json.dumps(event).encode()) is None


# --------------------------------------------------------------------------- hot path


@pytest.mark.parametrize(("frame", "verbatim"), [
    (b'{"type":"input_audio_buffer.append","audio":"AAAA"}', True),
    (b'{"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "e"}', True),
    (b'{"type":"input_audio_buffer.append","audio":"AA","type":"session.update"}', False),
    (b'{"type":"input_audio_buffer.append","audio":"AA","typ\\u0065":"session.update"}', False),
    (b'{"type":"input_audio_buffer.appendx","audio":"AAAA"}', False),
    (b'{"type":"input_audio_buffer.commit"}', False),
    (b'{"audio":"AAAA","type":"input_audio_buffer.append"}', False),
    (b'{"type":"session.update","session":{}}', False),
    (b"", False),
])
def test_client_frame_is_verbatim(frame: bytes, verbatim: bool) -> None:
    assert client_frame_is_verbatim(frame) is verbatim
    if verbatim:  # and the slow path agrees
        event = json.loads(frame)
        assert BetaTranslator().client_to_upstream(copy.deepcopy(event)) == [event]


@pytest.mark.parametrize("ga", list(beta.SERVER_RENAMES))
def test_upstream_frame_renamed_matches_the_slow_path(ga: str) -> None:
    for separators in ((",", ":"), (", ", ": ")):
        event = {"type": ga, "event_id": "e", "response_id": "r", "item_id": "i",
                 "output_index": 0, "content_index": 0, "delta": "a\u00e9\\\"b"}
        frame = json.dumps(event, separators=separators, ensure_ascii=False).encode()
        fast = upstream_frame_renamed(frame)
        assert fast is not None
        assert [json.loads(fast)] == BetaTranslator().upstream_to_client(event)


def test_every_renamed_type_has_the_stem_the_fast_path_looks_for() -> None:
    assert all(kind.startswith(beta.RENAMED_STEM) for kind in beta.SERVER_RENAMES)


@pytest.mark.parametrize("frame", [
    b'{"type":"response.output_audio.deltas","delta":""}',
    b'{"type":"response.done","response":{}}',
    b'{"event_id":"e","type":"response.output_audio.delta"}',
    b'{"type":"session.created"}',
    b"[]",
])
def test_upstream_frame_renamed_leaves_the_rest_to_the_slow_path(frame: bytes) -> None:
    assert upstream_frame_renamed(frame) is None


# --------------------------------------------------------------------------- robustness


KEYS = ["type", "session", "item", "response", "part", "content", "audio", "input", "output",
        "format", "modalities", "output_modalities", "turn_detection", "tools", "id", "role",
        "voice", "model", "input_audio_format", "output_audio_format", "item_id", "event_id",
        "max_response_output_tokens", "temperature", "rate", "transcription"]
TYPES = [*CLIENT_RULES, *SERVER_RULES, "transcription", "realtime", "audio/pcm", "audio/pcmu",
         "output_text", "output_audio", "text", "server_vad", "semantic_vad", "message",
         "mcp_call", "function", "mcp", "x"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.sampled_from(TYPES) | st.text(max_size=4))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=3), inner, max_size=5), max_leaves=25)
events = st.dictionaries(st.sampled_from(KEYS), values, max_size=6).flatmap(
    lambda rest: st.sampled_from(TYPES).map(lambda kind: {**rest, "type": kind}))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), events), max_size=8))
def test_arbitrary_json_never_raises(stream: list[tuple[bool, JSON]]) -> None:
    translator = BetaTranslator()
    for from_client, event in stream:
        if from_client:
            out = translator.client_to_upstream(event)
            assert len(out) >= 1
        else:
            out = translator.upstream_to_client(event)
        assert all(isinstance(e, dict) for e in out)
        json.dumps(out)


def test_deeply_nested_values_are_not_walked() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = {"audio": deep}
    translator = BetaTranslator()
    assert len(translator.client_to_upstream({"type": "session.update", "session": deep})) == 1
    assert len(translator.upstream_to_client({"type": "session.created", "session": deep})) == 1
    both = {"input_audio_transcription": deep, "audio": {"input": {"transcription": deep}}}
    (event,) = translator.client_to_upstream({"type": "session.update", "session": both})
    assert event["session"]["audio"]["input"]["transcription"] is deep
