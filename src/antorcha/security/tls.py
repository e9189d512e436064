"""TLS material for the gRPC control plane: load a certificate and key for the coordinator, build a
worker's channel credentials, and make a self-signed pair for tests and small private runs
(`antorcha tls self-signed`). A real deployment uses a certificate from its CA (e.g. Let's Encrypt)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


class TLSConfigError(ValueError):
    """TLS was asked for but its files are missing or unreadable."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read the TLS {what} {path!r}: {e.strerror or e}") from None


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    if not cert_file or not key_file:
        raise TLSConfigError("TLS needs both tls_cert_file and tls_key_file")
    return grpc.ssl_server_credentials([(_read(key_file, "key"), _read(cert_file, "certificate"))])


def channel_credentials(ca_file: str = "") -> grpc.ChannelCredentials:
    """Trust `ca_file` (a CA or the coordinator's self-signed certificate); the system roots when empty."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "CA file") if ca_file else None)


def make_self_signed(out_dir: str | Path, hosts: list[str], days: int = 30) -> tuple[Path, Path]:
    """Write cert.pem and key.pem (P-256) valid for `hosts` (names or IP addresses); returns their paths."""
    if not hosts:
        raise ValueError("name at least one host the certificate is for, e.g. 127.0.0.1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path
