"""CONTRACT §4: credential carriers, their priority, and the subprotocol echo rule."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.credentials import extract_credentials, select_subprotocol
from gateway.errors import GatewayError, InvalidRequest, MissingCredentials

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln"


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in pairs]


@pytest.mark.parametrize(
    ("headers", "subprotocols", "token", "carrier"),
    [
        (h(("Authorization", f"Bearer {JWT}")), [], JWT, "authorization"),
        (h(("Authorization", f"bearer {JWT}")), [], JWT, "authorization"),
        ([], [f"Bearer-{JWT}"], JWT, "bearer_subprotocol"),
        ([], ["realtime", f"openai-insecure-api-key.{JWT}"], JWT, "insecure_key_subprotocol"),
        (h(("api-key", "opaque-123")), [], "opaque-123", "api_key"),
        # priority: Authorization > Bearer- > openai-insecure-api-key. > api-key
        (h(("Authorization", "Bearer first"), ("api-key", "fourth")), ["Bearer-second"],
         "first", "authorization"),
        (h(("api-key", "fourth")), ["Bearer-second"], "second", "bearer_subprotocol"),
        (h(("api-key", "fourth")), ["openai-insecure-api-key.third"], "third",
         "insecure_key_subprotocol"),
    ],
)
def test_carriers_in_priority_order(headers: list[tuple[bytes, bytes]], subprotocols: list[str],
                                    token: str, carrier: str) -> None:
    credentials = extract_credentials(headers, subprotocols)
    assert (credentials.token, credentials.carrier) == (token, carrier)
    assert token not in repr(credentials)


@pytest.mark.parametrize(
    ("headers", "subprotocols", "error"),
    [
        ([], [], MissingCredentials),
        ([], ["realtime"], MissingCredentials),
        (h(("Authorization", "Basic dXNlcjpwYXNz")), [], MissingCredentials),
        (h(("Authorization", "Bearer ")), [], MissingCredentials),
        ([], ["Bearer-"], MissingCredentials),
        (h(("Authorization", "Bearer a b")), [], MissingCredentials),
        (h(("Authorization", "Bearer " + "x" * 20000)), [], MissingCredentials),
        ([], ["Bearer-a", "Bearer-b"], InvalidRequest),
        ([], ["Bearer-a", "openai-insecure-api-key.b"], InvalidRequest),
        (h(("Authorization", "Bearer a"), ("Authorization", "Bearer b")), [], InvalidRequest),
        (h(("api-key", "a"), ("api-key", "b")), [], InvalidRequest),
    ],
)
def test_missing_malformed_or_duplicated(headers: list[tuple[bytes, bytes]],
                                         subprotocols: list[str],
                                         error: type[GatewayError]) -> None:
    with pytest.raises(error) as caught:
        extract_credentials(headers, subprotocols)
    assert caught.value.http_status in (400, 401)


@pytest.mark.parametrize(
    ("offered", "echo"),
    [
        ([], None),
        (["realtime"], "realtime"),
        (["realtime", f"openai-insecure-api-key.{JWT}"], "realtime"),
        ([f"openai-insecure-api-key.{JWT}", "realtime"], "realtime"),
        ([f"Bearer-{JWT}"], f"Bearer-{JWT}"),
        (["foo", f"Bearer-{JWT}"], f"Bearer-{JWT}"),
        ([f"openai-insecure-api-key.{JWT}"], f"openai-insecure-api-key.{JWT}"),
        (["foo"], "foo"),
        (["foo", "bar"], None),
    ],
)
def test_subprotocol_echo_rule(offered: list[str], echo: str | None) -> None:
    assert select_subprotocol(offered) == echo


@settings(max_examples=1000, deadline=None)
@given(
    headers=st.lists(st.tuples(st.sampled_from([b"authorization", b"api-key", b"origin"]),
                               st.binary(max_size=64))),
    subprotocols=st.lists(st.one_of(
        st.text(max_size=40),
        st.builds(lambda s: "Bearer-" + s, st.text(max_size=40)),
        st.builds(lambda s: "openai-insecure-api-key." + s, st.text(max_size=40)),
    ), max_size=4),
)
def test_fuzz_only_typed_errors(headers: list[tuple[bytes, bytes]],
                                subprotocols: list[str]) -> None:
    try:
        credentials = extract_credentials(headers, subprotocols)
    except (MissingCredentials, InvalidRequest):
        return
    assert credentials.token and not any(c.isspace() for c in credentials.token)
    echo = select_subprotocol(subprotocols)
    assert echo is None or echo in subprotocols


def q(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    """Query pairs as :func:`urllib.parse.parse_qsl` decodes them from a real query string."""
    return parse_qsl(urlencode(pairs), keep_blank_values=True)


@pytest.mark.parametrize(
    ("headers", "subprotocols", "query", "token", "carrier"),
    [
        ([], [], q(("api-key", JWT)), JWT, "api_key_query"),
        ([], [], q(("Authorization", f"Bearer {JWT}")), JWT, "authorization_query"),
        ([], [], parse_qsl(f"Authorization=Bearer+{JWT}"), JWT, "authorization_query"),
        ([], [], parse_qsl(f"Authorization=Bearer%20{JWT}"), JWT, "authorization_query"),
        ([], [], parse_qsl(f"authorization=bearer%20{JWT}"), JWT, "authorization_query"),
        ([], [], q(("api-version", "2024-10-01-preview"), ("deployment", "d"), ("api-key", JWT)),
         JWT, "api_key_query"),
        # the query carriers come last: every header and subprotocol carrier wins
        (h(("Authorization", "Bearer first")), [], q(("api-key", "fifth")), "first",
         "authorization"),
        ([], ["Bearer-second"], q(("api-key", "fifth")), "second", "bearer_subprotocol"),
        ([], ["openai-insecure-api-key.third"], q(("api-key", "fifth")), "third",
         "insecure_key_subprotocol"),
        (h(("api-key", "fourth")), [], q(("api-key", "fifth")), "fourth", "api_key"),
        # api-key= before Authorization=
        ([], [], q(("Authorization", "Bearer sixth"), ("api-key", "fifth")), "fifth",
         "api_key_query"),
    ],
)
def test_query_carriers_come_last(headers: list[tuple[bytes, bytes]], subprotocols: list[str],
                                  query: list[tuple[str, str]], token: str,
                                  carrier: str) -> None:
    credentials = extract_credentials(headers, subprotocols, query)
    assert (credentials.token, credentials.carrier) == (token, carrier)
    assert token not in repr(credentials)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        (q(("api-key", "")), MissingCredentials),
        (q(("api-key", "a b")), MissingCredentials),
        (q(("api-key", "x" * 20000)), MissingCredentials),
        (q(("Authorization", "Basic dXNlcjpwYXNz")), MissingCredentials),
        (q(("Authorization", "Bearer")), MissingCredentials),
        (q(("Authorization", JWT)), MissingCredentials),
        (q(("api-key", "a"), ("api-key", "b")), InvalidRequest),
        (q(("Authorization", "Bearer a"), ("authorization", "Bearer b")), InvalidRequest),
        (q(("api-version", "2024-10-01-preview"), ("deployment", "d")), MissingCredentials),
    ],
)
def test_query_carriers_missing_malformed_or_duplicated(
        query: list[tuple[str, str]], error: type[GatewayError]) -> None:
    with pytest.raises(error) as caught:
        extract_credentials([], [], query)
    assert caught.value.http_status in (400, 401)
    assert "x" * 100 not in caught.value.message


@pytest.mark.parametrize(
    ("headers", "subprotocols", "query", "in_band"),
    [
        (h(("Authorization", f"Bearer {JWT}")), [], [], False),
        (h(("api-key", JWT)), [], [], False),
        ([], [f"Bearer-{JWT}"], [], True),
        ([], [f"openai-insecure-api-key.{JWT}"], [], True),
        ([], [], q(("api-key", JWT)), True),
        ([], [], q(("Authorization", f"Bearer {JWT}")), True),
    ],
)
def test_refusals_in_band_for_subprotocol_and_query_carriers(
        headers: list[tuple[bytes, bytes]], subprotocols: list[str],
        query: list[tuple[str, str]], in_band: bool) -> None:
    assert extract_credentials(headers, subprotocols, query).refused_in_band is in_band
