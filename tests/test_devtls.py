"""gateway.devtls: the local CA and loopback certificate of ``dev --tls`` — what is on disk,
a real TLS handshake against it, reuse, and renewal."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.devtls import (
    RENEW_BEFORE,
    VALIDITY,
    DevTLSError,
    certificate_files,
    create_certificates,
    ensure_certificates,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_are_a_constrained_ca_and_a_loopback_server_certificate(
        tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    certs = ensure_certificates(directory)
    assert (certs.ca_file, certs.cert_file, certs.key_file) == certificate_files(directory)
    assert mode(directory) == 0o700 and mode(certs.key_file) == 0o600
    # the CA's private key is not kept: only the CA certificate, the leaf and its key
    assert sorted(p.name for p in directory.iterdir()) == [
        ".lock", "ca.pem", "server.key", "server.pem"]
    ca = x509.load_pem_x509_certificate(certs.ca_file.read_bytes())
    leaf = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert set(constraints.value.permitted_subtrees or []) == {
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_network("127.0.0.1/32"))}
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert VALIDITY <= lifetime <= VALIDITY + datetime.timedelta(minutes=10)
    assert certs.not_after == min(ca.not_valid_after_utc, leaf.not_valid_after_utc)


@pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost"])
async def test_a_client_trusting_ca_pem_completes_a_tls_handshake(
        tmp_path: Path, server_name: str) -> None:
    certs = ensure_certificates(tmp_path / "tls")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certs.cert_file, certs.key_file)
    client_context = ssl.create_default_context(cafile=str(certs.ca_file))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello over tls")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname=server_name)
            assert await reader.read() == b"hello over tls"
            writer.close()


async def test_a_client_without_the_ca_refuses_the_certificate(tmp_path: Path) -> None:
    certs = ensure_certificates(tmp_path / "tls")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certs.cert_file, certs.key_file)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError):
            async with asyncio.timeout(10):
                await asyncio.open_connection("127.0.0.1", port,
                                              ssl=ssl.create_default_context(),
                                              server_hostname="127.0.0.1")


def test_good_files_are_reused(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path)
    pems = [p.read_bytes() for p in certificate_files(tmp_path)]
    second = ensure_certificates(tmp_path)
    assert second == first
    assert [p.read_bytes() for p in certificate_files(tmp_path)] == pems


def _other_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


@pytest.mark.parametrize("damage", [
    "missing-ca", "missing-key", "garbage-cert", "mismatched-key", "key-readable-by-others",
    "foreign-ca",
])
def test_damaged_files_are_replaced(tmp_path: Path, damage: str) -> None:
    old = ensure_certificates(tmp_path)
    old_cert = old.cert_file.read_bytes()
    if damage == "missing-ca":
        old.ca_file.unlink()
    elif damage == "missing-key":
        old.key_file.unlink()
    elif damage == "garbage-cert":
        old.cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    elif damage == "mismatched-key":
        old.key_file.write_bytes(_other_key_pem())
    elif damage == "key-readable-by-others":
        old.key_file.chmod(0o644)
    else:  # a CA that did not sign this server certificate
        create_certificates(tmp_path / "other")
        old.ca_file.write_bytes((tmp_path / "other" / "ca.pem").read_bytes())
    new = ensure_certificates(tmp_path)
    assert new.cert_file.read_bytes() != old_cert
    ca = x509.load_pem_x509_certificate(new.ca_file.read_bytes())
    x509.load_pem_x509_certificate(new.cert_file.read_bytes()).verify_directly_issued_by(ca)
    assert mode(new.key_file) == 0o600


def test_certificates_near_expiry_are_renewed(tmp_path: Path) -> None:
    old = ensure_certificates(tmp_path)
    almost = old.not_after - RENEW_BEFORE + datetime.timedelta(minutes=1)
    assert ensure_certificates(tmp_path, now=almost - datetime.timedelta(minutes=2)) == old
    renewed = ensure_certificates(tmp_path, now=almost)
    assert renewed.not_after > old.not_after
    expired = ensure_certificates(tmp_path, now=renewed.not_after + datetime.timedelta(days=1))
    assert expired.not_after > renewed.not_after


def test_an_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DevTLSError, match=r"cannot create TLS files in .*file/tls"):
        ensure_certificates(blocker / "tls")
