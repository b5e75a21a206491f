"""A local certificate authority and a loopback server certificate for ``dev --tls``.

openai-node's ``OpenAIRealtimeWS`` always dials ``wss://`` (it rewrites the base URL's
scheme), so it cannot reach a plain ``ws://`` development gateway.  ``realtime-gateway
dev --tls`` serves TLS with the files made here, in one directory:

* ``ca.pem`` — the CA certificate (PEM).  Clients trust it for the run:
  ``NODE_EXTRA_CA_CERTS=ca.pem`` (Node), ``SSL_CERT_FILE=ca.pem`` (Python's :mod:`ssl`).
* ``server.pem`` — the server certificate (PEM, X.509 v3, RFC 5280): subject alternative
  names IP ``127.0.0.1`` and DNS ``localhost``, extended key usage serverAuth, signed by
  the CA (ECDSA P-256 with SHA-256).
* ``server.key`` — its private key (PKCS #8 PEM, unencrypted), file mode 0600.

The CA's private key is never written to disk: it signs the server certificate and is
discarded, so the CA can vouch for nothing else, even when someone trusts it system-wide.
Its name constraints (RFC 5280 §4.2.1.10) limit it to ``127.0.0.1`` and ``localhost``
as well.  Certificates are valid :data:`VALIDITY` (90 days); :func:`ensure_certificates`
reuses the files while they are consistent and more than :data:`RENEW_BEFORE` (1 day)
from expiry, and makes a new set otherwise (missing, unreadable, expired, mismatched,
or a key file readable by others).  Creation holds an advisory lock on
``<directory>/.lock`` so that two ``dev`` runs do not interleave their files.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.private_files import PRIVATE_MODE, write_private

VALIDITY = datetime.timedelta(days=90)
"""How long a new CA and server certificate are valid."""

RENEW_BEFORE = datetime.timedelta(days=1)
"""Certificates closer than this to their expiry are replaced rather than reused."""

KEY_FILE_MODE = PRIVATE_MODE
LOOPBACK_IP = ipaddress.ip_address("127.0.0.1")
LOOPBACK_NAME = "localhost"
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate a client clock slightly behind ours


class DevTLSError(Exception):
    """The certificate directory or its files cannot be created or written."""


@dataclass(frozen=True)
class DevCertificates:
    """The PEM files of a development CA and the loopback server certificate it signed.

    ``not_after`` is the earlier of the two certificates' expiry times (UTC).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    not_after: datetime.datetime


def certificate_files(directory: Path) -> tuple[Path, Path, Path]:
    """The paths ``(ca.pem, server.pem, server.key)`` under ``directory``."""
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def ensure_certificates(directory: Path, *,
                        now: datetime.datetime | None = None) -> DevCertificates:
    """The certificates in ``directory``: reused when still good at ``now`` (UTC, default
    the current time), otherwise created anew (see the module docstring).

    Raises:
        DevTLSError: the directory or a file cannot be created or written.
    """
    moment = now or datetime.datetime.now(datetime.UTC)
    with _locked_dir(directory):
        current = _load_valid(directory, moment)
        return current if current is not None else _create(directory, moment, VALIDITY)


def create_certificates(directory: Path, *, validity: datetime.timedelta = VALIDITY,
                        now: datetime.datetime | None = None) -> DevCertificates:
    """A new CA and server certificate in ``directory``, valid ``validity`` from ``now``,
    replacing any files there.

    Raises:
        DevTLSError: the directory or a file cannot be created or written.
    """
    moment = now or datetime.datetime.now(datetime.UTC)
    with _locked_dir(directory):
        return _create(directory, moment, validity)


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """``directory`` made (mode 0700) and locked for the block; an ``OSError`` in it
    becomes :class:`DevTLSError`."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(directory):
            yield
    except OSError as exc:
        raise DevTLSError(f"cannot create TLS files in {directory}: {exc}") from None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "ab") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_valid(directory: Path, now: datetime.datetime) -> DevCertificates | None:
    ca_file, cert_file, key_file = certificate_files(directory)
    try:
        if stat.S_IMODE(key_file.stat().st_mode) & 0o077:
            return None
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return None
    if key.public_key() != cert.public_key():
        return None
    if LOOPBACK_IP not in names.get_values_for_type(x509.IPAddress):
        return None
    not_before = max(ca.not_valid_before_utc, cert.not_valid_before_utc)
    not_after = min(ca.not_valid_after_utc, cert.not_valid_after_utc)
    if not (not_before <= now and now + RENEW_BEFORE < not_after):
        return None
    return DevCertificates(ca_file, cert_file, key_file, not_after)


def _create(directory: Path, now: datetime.datetime,
            validity: datetime.timedelta) -> DevCertificates:
    now = now.replace(microsecond=0)  # X.509 times are whole seconds
    start, end = now - _BACKDATE, now + validity
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "realtime-gateway dev CA"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8)),
    ])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.NameConstraints(
            permitted_subtrees=[x509.DNSName(LOOPBACK_NAME),
                                x509.IPAddress(ipaddress.ip_network("127.0.0.1/32"))],
            excluded_subtrees=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(LOOPBACK_IP), x509.DNSName(LOOPBACK_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = certificate_files(directory)
    write_private(key_file, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    write_private(ca_file, ca.public_bytes(serialization.Encoding.PEM))
    return DevCertificates(ca_file, cert_file, key_file, end)


__all__ = ["RENEW_BEFORE", "VALIDITY", "DevCertificates", "DevTLSError", "certificate_files",
           "create_certificates", "ensure_certificates"]
