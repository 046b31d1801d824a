"""Test certificates made with `openssl`: a CA, a server certificate it signs, an untrusted CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate and key signed by it, and a second CA nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    # key + certificate chain in one PEM file: Kafka's `ssl.keystore.type=PEM`.
    server_keystore: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=directory,
    )
    return key, cert


def make_certificates(directory: Path, dns_names: tuple[str, ...] = ("localhost",)) -> Certificates:
    """A test CA and a server certificate for `dns_names` (subjectAltName), valid two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _make_ca(directory, "test-ca")
    _, other_ca = _make_ca(directory, "untrusted-ca")
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr)),
        *("-subj", f"/CN={dns_names[0]}"),
        cwd=directory,
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=" + ",".join(f"DNS:{name}" for name in dns_names) + "\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extensions)),
        cwd=directory,
    )
    # PKCS#8, unencrypted: what Kafka's PEM keystore reads without a key password.
    pkcs8 = directory / "server.pkcs8.key"
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", str(key), "-out", str(pkcs8), cwd=directory)
    keystore = directory / "server.keystore.pem"
    keystore.write_text(pkcs8.read_text() + cert.read_text() + ca.read_text())
    for private in (key, pkcs8, keystore, ca_key):
        private.chmod(0o600)
    return Certificates(
        ca=ca, server_cert=cert, server_key=pkcs8, server_keystore=keystore, other_ca=other_ca
    )
