"""`payment-service` against a PostgreSQL that requires TLS, verified (issue 18).

A private server (never the shared one) accepts `hostssl` connections only, with a
certificate for `localhost` from a test CA. The service reaches it with
`sslmode=verify-full` and its URL (password included) read from a file; a wrong
password, an unknown CA, a name the certificate does not hold or no TLS at all stop
start-up within seconds with one line naming PAYMENT_DATABASE_URL, and no output of any
run holds the password.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from support.tls_postgres import TlsPostgres, tls_postgres

from .harness import ServiceStack, ServiceTopics, open_stack, run_cli, service_env
from .refusals import failure_line, secret_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    with tls_postgres(tmp_path_factory.mktemp("tls-postgres-certs")) as started:
        yield started


@pytest.fixture(scope="module")
def url_file(postgres: TlsPostgres, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return secret_file(tmp_path_factory, "database-url", postgres.url())


@pytest_asyncio.fixture(scope="module")
async def tls_stack(
    kafka_bootstrap: str, postgres: TlsPostgres, url_file: Path, e2e_log_dir: Any
) -> AsyncIterator[ServiceStack]:
    async with open_stack(
        bootstrap=kafka_bootstrap,
        database_url=postgres.url(),
        log_dir=e2e_log_dir,
        topic_prefix="e2e-pgtls",
        PAYMENT_LOG_LEVEL="DEBUG",
        # Spans printed into the log too: the scan for the password covers them.
        OTEL_TRACES_EXPORTER="console",
        PAYMENT_DATABASE_URL="",
        PAYMENT_DATABASE_URL_FILE=str(url_file),
    ) as opened:
        yield opened


def test_the_server_refuses_connections_without_tls(postgres: TlsPostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(postgres.url(sslmode="disable"), connect_timeout=5).close()
    with psycopg.connect(postgres.url(), connect_timeout=5) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)


async def test_a_payment_completes_with_the_database_over_verified_tls(
    tls_stack: ServiceStack, postgres: TlsPostgres
) -> None:
    orch = tls_stack.orch
    await orch.request("pgtls-ok-1", amount=1_999, currency="EUR")
    outcome = await orch.wait_outcome("pgtls-ok-1")
    assert outcome.kind == "completed", outcome.describe()

    [service] = tls_stack.services
    shown = run_cli("show", "--booking", "pgtls-ok-1", env=service.env)
    assert shown.returncode == 0, shown.stderr
    assert "PaymentCompleted" in shown.stdout or "completed" in shown.stdout.lower()
    # Stopped, so that the last batch of spans is exported into the log too.
    assert await service.terminate() == 0
    log = service.log_text()
    assert '"parent_id"' in log  # spans were printed (console exporter JSON)
    assert "without TLS" not in log  # loopback and verify-full: no warning
    for text in (log, shown.stdout, shown.stderr):
        assert postgres.password not in text


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong password", "refused the user's password"),
        ("unknown CA", "not signed by a CA in sslrootcert"),
        ("wrong hostname", "does not name this host"),
        ("no TLS", "refuses this user, database or encryption"),
    ],
)
def test_bad_database_security_stops_start_up_naming_the_setting(
    kafka_bootstrap: str, postgres: TlsPostgres, tmp_path: Path, case: str, expected: str
) -> None:
    wrong_password = "not-" + postgres.password
    url = {
        "wrong password": postgres.url(password=wrong_password),
        "unknown CA": postgres.url(rootcert=postgres.certificates.other_ca),
        "wrong hostname": postgres.url(host="127.0.0.1"),
        "no TLS": postgres.url(sslmode="disable"),
    }[case]
    secret = tmp_path / "database-url"
    secret.write_text(url + "\n")
    env = service_env(
        database_url="",
        bootstrap=kafka_bootstrap,
        topics=ServiceTopics.unique("e2e-pgbad"),
        PAYMENT_DATABASE_URL="",
        PAYMENT_DATABASE_URL_FILE=str(secret),
    )
    began = time.monotonic()
    done = run_cli("run", env=env, timeout_s=60)
    elapsed = time.monotonic() - began
    line = failure_line(done, 2)
    assert line.startswith("payment-service: configuration error: PAYMENT_DATABASE_URL: ")
    assert expected in line
    output = done.stdout + done.stderr
    assert postgres.password not in output and wrong_password not in output
    assert elapsed < 30, f"{case}: took {elapsed:.1f} s"
    print(f"{case}: exit 2 after {elapsed:.2f} s: {line}")


def test_no_database_answering_is_a_dependency_failure(
    kafka_bootstrap: str, postgres: TlsPostgres
) -> None:
    from support.net import free_port

    url = postgres.url().replace(f":{postgres.port}/", f":{free_port()}/")
    env = service_env(
        database_url=url, bootstrap=kafka_bootstrap, topics=ServiceTopics.unique("e2e-pgbad")
    )
    done = run_cli("run", env=env, timeout_s=60)
    line = failure_line(done, 3)
    assert line.startswith("payment-service: dependency unavailable: database "), line
    assert "connection refused" in line and "PAYMENT_DATABASE_URL" in line, line
    assert postgres.password not in done.stdout + done.stderr
