"""Real X.509 certificates for the TLS tests, made in test setup: a CA, a server certificate
for 127.0.0.1 / localhost, a client certificate the CA signed, and one from a CA nobody trusts."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pair:
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, cert: x509.Certificate, key) -> Pair:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Pair(cert_path, key_path)


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(folder: Path, name: str) -> tuple[Pair, x509.Certificate, object]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, key, _name(name), key, ca=True)
    return _write(folder / name, cert, key), cert, key


def make_certificates(folder: Path) -> dict[str, Pair]:
    ca, ca_cert, ca_key = _ca(folder, "ca")
    out = {"ca": ca}
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        out[name] = _write(
            folder / name, _certificate(name, key, ca_cert.subject, ca_key, ca=False, server=server), key
        )
    _, rogue_cert, rogue_key = _ca(folder, "rogue_ca")
    key = ec.generate_private_key(ec.SECP256R1())
    out["rogue_client"] = _write(
        folder / "rogue_client", _certificate("rogue", key, rogue_cert.subject, rogue_key, ca=False), key
    )
    return out
