"""gateway.upstream's pure parts: the upstream URL and headers of each provider shape
(CONTRACT §4, notes/protocol.md §5) and the label of a refused dial."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from gateway.config import UpstreamConfig
from gateway.upstream import DEFAULT_USER_AGENT, UpstreamTarget, failure_reason

KEY = "upstream-key-0123456789"


def upstream(provider: str, url: str) -> UpstreamConfig:
    config = UpstreamConfig.model_validate(
        {"provider": provider, "url": url, "api_key_env": "KEY_ENV"})
    object.__setattr__(config, "_api_key", KEY)
    return config


@pytest.mark.parametrize(("provider", "url", "auth"), [
    ("openai", "wss://api.openai.com/v1/realtime", ("Authorization", f"Bearer {KEY}")),
    ("azure", "wss://res.openai.azure.com/openai/v1/realtime", ("api-key", KEY)),
])
def test_each_provider_gets_its_credential_header_and_model(
        provider: str, url: str, auth: tuple[str, str]) -> None:
    target = UpstreamTarget("up", upstream(provider, url), "my-model")
    assert target.url() == f"{url}?model=my-model"
    assert target.headers() == [auth]


def test_only_call_id_and_intent_pass_through_and_model_comes_first() -> None:
    params = (("model", "client-name"), ("api-key", "secret"), ("Authorization", "Bearer x"),
              ("api-version", "2024-10-01-preview"), ("x-ms-client-request-id", "r"),
              ("call_id", "rtc_1"), ("intent", "transcription"), ("deployment", "d"))
    target = UpstreamTarget("up", upstream("openai", "wss://h/v1/realtime"), "gpt-x",
                            params=params)
    query = parse_qsl(urlsplit(target.url()).query)
    assert query == [("model", "gpt-x"), ("call_id", "rtc_1"), ("intent", "transcription")]


def test_parameters_are_encoded_not_pasted() -> None:
    target = UpstreamTarget("up", upstream("openai", "wss://h/v1/realtime"), "a&b=c",
                            params=(("call_id", "x y&model=evil"),))
    assert dict(parse_qsl(urlsplit(target.url()).query)) == {
        "model": "a&b=c", "call_id": "x y&model=evil"}


def test_the_openai_beta_header_is_forwarded_only_when_sent() -> None:
    config = upstream("openai", "wss://h/v1/realtime")
    assert UpstreamTarget("up", config, "m").headers() == [("Authorization", f"Bearer {KEY}")]
    beta = UpstreamTarget("up", config, "m", openai_beta="realtime=v1").headers()
    assert ("OpenAI-Beta", "realtime=v1") in beta
    assert DEFAULT_USER_AGENT.startswith("realtime-gateway/")


@pytest.mark.parametrize(("status", "reason"), [
    (401, "status_401"), (403, "status_403"), (429, "status_429"), (400, "status_4xx"),
    (404, "status_4xx"), (500, "status_5xx"), (503, "status_5xx"), (200, "status_4xx"),
])
def test_failure_reason_is_a_bounded_label(status: int, reason: str) -> None:
    assert failure_reason(status) == reason
