"""A throwaway certificate authority for the TLS tests: a CA, a server and a client certificate."""

import datetime
import ipaddress
from pathlib import Path
from typing import Dict, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool, usage=None, san=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: Optional[object] = None) -> Dict[str, Path]:
    paths = {"cert": directory / f"{name}.crt"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        paths["key"] = directory / f"{name}.key"
        paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


def make_certificates(directory: Path) -> Dict[str, Dict[str, Path]]:
    """{"ca": {"cert"}, "server": {"cert", "key"}, "client": {"cert", "key"}} as PEM files in `directory`."""
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("rpc_train test CA", ca_key, "rpc_train test CA", ca_key, ca=True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _certificate("localhost", server_key, "rpc_train test CA", ca_key, ca=False,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    client = _certificate("a test client", client_key, "rpc_train test CA", ca_key, ca=False,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return {"ca": _write(directory, "ca", ca), "server": _write(directory, "server", server, server_key),
            "client": _write(directory, "client", client, client_key)}
