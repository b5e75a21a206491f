"""The development issuer: key file lifecycle, and minted tokens through the normal path."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.auth.authenticator import Authenticator
from gateway.auth.dev_issuer import DevIssuer, DevIssuerError
from gateway.errors import InsufficientScope, InvalidToken
from tests.support.idp import AUDIENCE, ISSUER, SCOPE, FakeClock, make_config, tenant


def test_key_file_created_with_mode_0600_and_parent_dirs(tmp_path: Path) -> None:
    key_file = tmp_path / "a" / "b" / "dev-issuer.jwk"
    issuer = DevIssuer(key_file)
    jwks = issuer.public_jwks()
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) & 0o077 == 0
    assert [p.name for p in key_file.parent.iterdir()] == ["dev-issuer.jwk"]  # no temp left
    stored = json.loads(key_file.read_text())
    assert stored["kty"] == "EC"
    assert stored["crv"] == "P-256"
    assert "d" in stored
    (public,) = jwks["keys"]
    assert "d" not in public
    assert public["kid"] == issuer.kid
    assert public["alg"] == "ES256"
    assert public["use"] == "sig"


def test_key_file_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        DevIssuer(tmp_path / "k.jwk").public_jwks()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.jwk").stat().st_mode) == 0o600


def test_key_is_reused_across_instances(tmp_path: Path) -> None:
    key_file = tmp_path / "dev.jwk"
    first = DevIssuer(key_file)
    kid = first.kid
    content = key_file.read_bytes()
    mtime = key_file.stat().st_mtime_ns
    second = DevIssuer(key_file)
    assert second.kid == kid
    assert second.public_jwks() == first.public_jwks()
    assert key_file.read_bytes() == content
    assert key_file.stat().st_mtime_ns == mtime


def test_concurrent_first_use_yields_one_key(tmp_path: Path) -> None:
    key_file = tmp_path / "race" / "dev.jwk"
    kids: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            kids.append(DevIssuer(key_file).kid)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors
    assert len(kids) == 8
    assert len(set(kids)) == 1
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["dev.jwk"]


@pytest.mark.parametrize("content", ["", "not json", '{"kty": "oct", "k": "AAAA"}',
                                     '{"kty": "EC", "crv": "P-256", "x": "A", "y": "B"}'])
def test_unusable_key_file_is_an_error(tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "dev.jwk"
    key_file.write_text(content)
    with pytest.raises(DevIssuerError) as info:
        DevIssuer(key_file).public_jwks()
    assert not content or content not in str(info.value)  # no key material in messages


def test_public_key_only_file_is_refused(tmp_path: Path) -> None:
    source = DevIssuer(tmp_path / "full.jwk")
    (public,) = source.public_jwks()["keys"]
    (tmp_path / "public.jwk").write_text(json.dumps(public))
    with pytest.raises(DevIssuerError):
        DevIssuer(tmp_path / "public.jwk").mint(ISSUER, AUDIENCE, "a", SCOPE, 60)


def test_uncreatable_key_file_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DevIssuerError):
        DevIssuer(blocker / "sub" / "dev.jwk").public_jwks()


def test_minted_claims(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000.5)
    issuer = DevIssuer(tmp_path / "dev.jwk", clock=clock)
    token = issuer.mint(ISSUER, [AUDIENCE, "x"], "alice", SCOPE, 120.9,
                        extra_claims={"tenant_hint": "t"})
    header_b64, payload_b64, _ = token.split(".")
    header = json.loads(_b64decode(header_b64))
    claims = json.loads(_b64decode(payload_b64))
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": issuer.kid}
    assert claims["iss"] == ISSUER
    assert claims["sub"] == "alice"
    assert claims["aud"] == [AUDIENCE, "x"]
    assert claims["scope"] == SCOPE
    assert claims["iat"] == claims["nbf"] == 1_800_000_000
    assert claims["exp"] == 1_800_000_120
    assert claims["tenant_hint"] == "t"
    assert claims["jti"]
    no_aud = json.loads(_b64decode(issuer.mint(ISSUER, None, "a", None, 60).split(".")[1]))
    assert "aud" not in no_aud
    assert "scope" not in no_aud


def _b64decode(segment: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@pytest.fixture
async def dev_auth(tmp_path: Path) -> AsyncIterator[tuple[Authenticator, DevIssuer]]:
    config = make_config(tenant("dev", issuer="http://127.0.0.1/dev",
                                dev_issuer={"key_file": str(tmp_path / "keys" / "dev.jwk")}))
    refreshes: list[tuple[str, str]] = []
    auth = Authenticator(config, on_jwks_refresh=lambda t, r: refreshes.append((t, r)))
    assert not auth.ready()
    await auth.start()
    assert refreshes == [("dev", "success")]
    assert auth.ready()
    issuer = auth.dev_issuer("dev")
    assert issuer is not None
    yield auth, issuer
    await auth.aclose()


async def test_minted_token_validates_through_the_normal_path(
    dev_auth: tuple[Authenticator, DevIssuer], tmp_path: Path
) -> None:
    auth, issuer = dev_auth
    assert stat.S_IMODE((tmp_path / "keys" / "dev.jwk").stat().st_mode) == 0o600
    token = issuer.mint("http://127.0.0.1/dev", AUDIENCE, "dev-user", SCOPE, 600)
    principal = await auth.authenticate(token)
    assert principal.tenant.id == "dev"
    assert principal.subject == "dev-user"
    # The same checks as any issuer: audience, scope, key.
    with pytest.raises(InvalidToken):
        await auth.authenticate(issuer.mint("http://127.0.0.1/dev", "other", "u", SCOPE, 600))
    with pytest.raises(InsufficientScope):
        await auth.authenticate(issuer.mint("http://127.0.0.1/dev", AUDIENCE, "u", None, 600))
    with pytest.raises(InvalidToken):
        await auth.authenticate(issuer.mint("http://127.0.0.1/dev", AUDIENCE, "u", SCOPE, 600,
                                            kid="unknown"))


async def test_token_from_another_dev_key_is_refused(
    dev_auth: tuple[Authenticator, DevIssuer], tmp_path: Path
) -> None:
    auth, issuer = dev_auth
    stranger = DevIssuer(tmp_path / "stranger.jwk")
    forged = stranger.mint("http://127.0.0.1/dev", AUDIENCE, "u", SCOPE, 600, kid=issuer.kid)
    with pytest.raises(InvalidToken):
        await auth.authenticate(forged)
