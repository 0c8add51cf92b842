"""A TLS server context with a self-signed certificate for 127.0.0.1, made with `cryptography`.

Owns: `self_signed_context(directory)` and the files it loads (`self_signed_files`), for tests
that need a TLS peer nobody vouches for (a client with the default trust store fails its
verification; one given the certificate as `cafile` trusts it). Does not own: starting servers.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["self_signed_context", "self_signed_files"]


def self_signed_files(directory: Path) -> tuple[Path, Path]:
    """cert.pem and key.pem in `directory`: a certificate for 127.0.0.1 and localhost, valid
    now, that signs itself (a CA of its own, so a client can trust it with `cafile=`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def self_signed_context(directory: Path) -> ssl.SSLContext:
    """A server context whose certificate (`self_signed_files`) signs itself; files go in `directory`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed_files(directory))
    return context
