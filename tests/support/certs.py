"""A throwaway PKI for TLS tests, made with ``cryptography``.

One CA the tests trust, which issues a server certificate for ``localhost``
and ``127.0.0.1``, a server certificate for another host name and a client
certificate; and a second CA that nothing trusts. EC P-256 keys, so making
them takes milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Certificates:
    """Paths of the PEM files :func:`make_certificates` wrote."""

    ca_cert: Path
    server_cert: Path  # for LOCAL_NAMES, issued by ca_cert
    server_key: Path
    wrong_host_cert: Path  # for fleet.invalid, issued by ca_cert
    wrong_host_key: Path
    client_cert: Path  # a device's client certificate, issued by ca_cert
    client_key: Path
    other_ca_cert: Path  # a CA that issued nothing the tests serve


def make_certificates(directory: Path) -> Certificates:
    """Make the CAs, keys and certificates as PEM files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("edgefleet test CA")
    _, other_ca = _ca("edgefleet untrusted CA")
    server_key, server = _leaf(ca_key, ca, "edgefleet broker", LOCAL_NAMES, server=True)
    wrong_key, wrong = _leaf(ca_key, ca, "fleet.invalid", ("fleet.invalid",), server=True)
    client_key, client = _leaf(ca_key, ca, "dev-a", (), server=False)

    def cert(name: str, certificate: x509.Certificate) -> Path:
        path = directory / name
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def key(name: str, private_key: ec.EllipticCurvePrivateKey) -> Path:
        path = directory / name
        path.write_bytes(
            private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        return path

    return Certificates(
        ca_cert=cert("ca.pem", ca),
        server_cert=cert("server.pem", server),
        server_key=key("server.key", server_key),
        wrong_host_cert=cert("wrong-host.pem", wrong),
        wrong_host_key=key("wrong-host.key", wrong_key),
        client_cert=cert("client.pem", client),
        client_key=key("client.key", client_key),
        other_ca_cert=cert("other-ca.pem", other_ca),
    )


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, builder.sign(key, hashes.SHA256())


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    common_name: str,
    names: tuple[str, ...],
    *,
    server: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
