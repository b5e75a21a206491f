"""The development token issuer: an ES256 (ECDSA P-256, RFC 7518 §3.4) key pair on disk.

The private key is kept as a JWK (RFC 7517, JSON) in ``dev_issuer.key_file``; it is created
on first use with file mode 0600 (parent directories 0700).  Creation is atomic and safe
against a concurrent creator (the gateway and ``realtime-gateway token`` may race): the key
is written to a private temporary file which is then hard-linked into place only if no key
file exists yet.

The gateway publishes :meth:`DevIssuer.public_jwks` as the dev tenant's JWKS and validates
dev tokens exactly like any other issuer's; :meth:`DevIssuer.mint` signs access tokens
(RFC 9068 shape: ``typ: at+jwt``) for ``realtime-gateway token`` and ``realtime-gateway dev``.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey

from gateway.private_files import PRIVATE_MODE, write_private

ALGORITHM = "ES256"
CURVE = "P-256"
KEY_FILE_MODE = PRIVATE_MODE


class DevIssuerError(Exception):
    """The key file cannot be read, created, or does not hold an EC P-256 private JWK."""


class DevIssuer:
    """A development issuer whose key lives in ``key_file`` (created on first use).

    ``clock`` returns epoch seconds (used for ``iat``/``nbf``/``exp`` of minted tokens).
    Thread-safe: the key is loaded once under a lock.
    """

    def __init__(self, key_file: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.key_file = Path(key_file)
        self._clock = clock
        self._key: ECKey | None = None
        self._lock = threading.Lock()

    def key(self) -> ECKey:
        """The private key: loaded from ``key_file``, or created there (mode 0600) if absent.

        Raises :class:`DevIssuerError` when the file is unreadable or not a private P-256 JWK,
        or cannot be created.
        """
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create()
            return self._key

    @property
    def kid(self) -> str:
        """The key's ``kid`` (its RFC 7638 thumbprint)."""
        kid = self.key().kid
        assert kid is not None
        return kid

    def public_jwks(self) -> dict[str, Any]:
        """The JWK Set with the public half: ``{"keys": [{"kty": "EC", "crv": "P-256",
        "x", "y", "kid", "alg": "ES256", "use": "sig"}]}``."""
        public = self.key().as_dict(private=False)
        return {"keys": [public]}

    def mint(
        self,
        issuer: str,
        audience: str | Sequence[str] | None,
        sub: str,
        scope: str | None,
        ttl_seconds: float,
        *,
        kid: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign an access token (compact JWS, ES256) with this issuer's key.

        Claims: ``iss``, ``sub``, ``aud`` (omitted when ``None``), ``scope`` (space-delimited,
        omitted when ``None``), ``iat`` and ``nbf`` = now, ``exp`` = now + ``ttl_seconds``
        (whole seconds, rounded down, at least 1 s), a random ``jti``, then ``extra_claims``.
        ``kid`` overrides the header's ``kid`` (tests use it to present an unknown key id).
        Raises :class:`DevIssuerError` if the key cannot be loaded or created.
        """
        key = self.key()
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + max(1, int(ttl_seconds)),
            "jti": secrets.token_urlsafe(16),
        }
        if audience is not None:
            claims["aud"] = audience if isinstance(audience, str) else list(audience)
        if scope is not None:
            claims["scope"] = scope
        if extra_claims:
            claims.update(extra_claims)
        header = {"alg": ALGORITHM, "typ": "at+jwt", "kid": kid if kid is not None else key.kid}
        return jose_jwt.encode(header, claims, key, algorithms=[ALGORITHM])

    # -- key file ------------------------------------------------------------------------------

    def _load_or_create(self) -> ECKey:
        try:
            return self._load()
        except FileNotFoundError:
            pass
        self._create()
        try:
            return self._load()
        except FileNotFoundError:
            raise DevIssuerError(f"development issuer key file {self.key_file} vanished") from None

    def _load(self) -> ECKey:
        try:
            text = self.key_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise DevIssuerError(
                f"cannot read development issuer key file {self.key_file}: {exc.strerror}"
            ) from None
        try:
            data = json.loads(text)
            key = ECKey.import_key(data)
        except Exception:
            raise DevIssuerError(
                f"{self.key_file} does not hold an EC P-256 private JWK"
            ) from None
        if not key.is_private or key.curve_name != CURVE:
            raise DevIssuerError(f"{self.key_file} does not hold an EC P-256 private JWK")
        key.ensure_kid()
        return key

    def _create(self) -> None:
        key = ECKey.generate_key(CURVE, parameters={"alg": ALGORITHM, "use": "sig"}, private=True)
        key.ensure_kid()
        body = json.dumps(key.as_dict(private=True), separators=(",", ":")).encode()
        try:
            self.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(self.key_file, body, replace=False)  # another process may win
        except OSError as exc:
            raise DevIssuerError(
                f"cannot create development issuer key file {self.key_file}: {exc.strerror}"
            ) from None


__all__ = ["ALGORITHM", "DevIssuer", "DevIssuerError"]
