"""Certificates for the TLS tests, made with trustme (no files checked in).

``write_pair`` writes a trustme leaf's chain and key as PEM files;
``issue_uri_cert`` issues a leaf with a URI SAN (a SPIFFE ID), which trustme's
DWIM identities do not make, signed by a trustme CA's key with
``cryptography``.
"""

from __future__ import annotations

import datetime
import os

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def write_pair(leaf: trustme.LeafCert, directory: str, stem: str) -> tuple[str, str]:
    """``leaf``'s chain (leaf first) and key as ``STEM.crt``/``STEM.key`` in ``directory``."""
    cert_path = os.path.join(directory, f"{stem}.crt")
    key_path = os.path.join(directory, f"{stem}.key")
    with open(cert_path, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(key_path)
    return cert_path, key_path


def write_ca(ca: trustme.CA, directory: str, stem: str = "ca") -> str:
    """``ca``'s certificate as ``STEM.pem`` in ``directory``."""
    path = os.path.join(directory, f"{stem}.pem")
    ca.cert_pem.write_to_path(path)
    return path


def issue_uri_cert(ca: trustme.CA, uri: str, *dns_names: str,
                   not_after: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """A leaf signed by ``ca`` with SAN URI ``uri`` (first) and ``dns_names``,
    usable as a client and a server certificate: (cert PEM, key PEM)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    names += [x509.DNSName(n) for n in dns_names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH,
                                              x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
