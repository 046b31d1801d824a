"""`payment-service run` over SASL_SSL (SCRAM-SHA-512) to a real Apache Kafka (issue 18).

The broker is this module's own: a listener with a certificate from a test CA for
`localhost`, and one SCRAM credential created when its storage was formatted. The
service reads the password from a file; a wrong password, an unknown CA or a name the
certificate does not hold stops it within seconds, naming the setting, and no output
of any run holds the password.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from support.secure_kafka import SecureKafka, secure_kafka

from .harness import (
    ServiceStack,
    ServiceTopics,
    kafka_security_env,
    open_stack,
    run_cli,
    service_env,
    use_kafka_security,
)
from .refusals import failure_line, secret_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    with secure_kafka(tmp_path_factory.mktemp("secure-kafka")) as started:
        yield started


@pytest.fixture(scope="module")
def password_file(kafka: SecureKafka, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return secret_file(tmp_path_factory, "kafka-password", kafka.password)


@pytest_asyncio.fixture(scope="module")
async def secure_stack(
    kafka: SecureKafka, password_file: Path, module_database_url: str, e2e_log_dir: Any
) -> AsyncIterator[ServiceStack]:
    """One service whose every Kafka client goes through the SASL_SSL listener."""
    previous = kafka_security_env()
    env = kafka.service_env()
    del env["PAYMENT_KAFKA_BOOTSTRAP_SERVERS"]
    use_kafka_security(env)
    try:
        async with open_stack(
            bootstrap=kafka.bootstrap,
            database_url=module_database_url,
            log_dir=e2e_log_dir,
            topic_prefix="e2e-sasl",
            PAYMENT_LOG_LEVEL="DEBUG",
            # Spans printed into the log too: the scan for the password covers them.
            OTEL_TRACES_EXPORTER="console",
            # The service reads its password from a file, as an orchestrator mounts it.
            PAYMENT_KAFKA_SASL_PASSWORD="",
            PAYMENT_KAFKA_SASL_PASSWORD_FILE=str(password_file),
        ) as opened:
            yield opened
    finally:
        use_kafka_security(previous)


def _leaks(text: str, kafka: SecureKafka) -> bool:
    return kafka.password in text


async def test_a_payment_completes_over_sasl_ssl(
    secure_stack: ServiceStack, kafka: SecureKafka
) -> None:
    orch = secure_stack.orch
    await orch.request("sasl-ok-1", amount=2_500, currency="EUR")
    outcome = await orch.wait_outcome("sasl-ok-1")
    assert outcome.kind == "completed", outcome.describe()
    assert orch.events.initiated("sasl-ok-1")

    [service] = secure_stack.services
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as http:
        ready = await http.get("/health/ready")
        metrics = await http.get("/metrics")
    assert ready.status_code == 200, ready.text
    assert "broker: ok" in ready.text
    for text in (service.log_text(), ready.text, metrics.text):
        assert not _leaks(text, kafka)


async def test_dead_letters_list_connects_over_sasl_ssl(
    secure_stack: ServiceStack, kafka: SecureKafka, password_file: Path
) -> None:
    [service] = secure_stack.services
    env = {**service.env}
    done = run_cli("dead-letters", "list", "--timeout", "30", env=env)
    assert done.returncode == 0, done.stderr
    assert f"{secure_stack.topics.dead_letter}: 0 dead letters" in done.stdout
    assert not _leaks(done.stdout + done.stderr, kafka)


async def test_demo_plays_over_sasl_ssl(secure_stack: ServiceStack, kafka: SecureKafka) -> None:
    [service] = secure_stack.services
    done = await asyncio.to_thread(
        run_cli, "demo", "--count", "3", "--timeout", "60", env=service.env, timeout_s=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not _leaks(done.stdout + done.stderr, kafka)


async def test_nothing_the_service_wrote_holds_the_password(
    secure_stack: ServiceStack, kafka: SecureKafka
) -> None:
    """After the runs above, stopped (spans are exported in batches, the last at exit):
    its DEBUG log and every span it printed are free of the password."""
    [service] = secure_stack.services
    assert await service.terminate() == 0
    log = service.log_text()
    assert '"parent_id"' in log  # spans were printed (console exporter JSON)
    assert not _leaks(log, kafka)


@pytest.mark.parametrize(
    ("case", "setting"),
    [
        ("wrong password", "PAYMENT_KAFKA_SASL_PASSWORD"),
        ("unknown CA", "PAYMENT_KAFKA_SSL_CAFILE"),
        ("wrong hostname", "PAYMENT_KAFKA_BOOTSTRAP_SERVERS"),
        ("unknown user", "PAYMENT_KAFKA_SASL_PASSWORD"),
        ("mechanism not offered", "PAYMENT_KAFKA_SASL_MECHANISM"),
    ],
)
def test_bad_kafka_security_stops_start_up_naming_the_setting(
    kafka: SecureKafka, module_database_url: str, case: str, setting: str
) -> None:
    wrong_password = "not-" + kafka.password
    changes = {
        "wrong password": {"PAYMENT_KAFKA_SASL_PASSWORD": wrong_password},
        "unknown CA": {"PAYMENT_KAFKA_SSL_CAFILE": str(kafka.certificates.other_ca)},
        "wrong hostname": {"PAYMENT_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_by_ip},
        "unknown user": {"PAYMENT_KAFKA_SASL_USERNAME": "nobody"},
        "mechanism not offered": {"PAYMENT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"},
    }[case]
    env = service_env(
        database_url=module_database_url,
        bootstrap=kafka.bootstrap,
        topics=ServiceTopics.unique("e2e-badsec"),
        **kafka.service_env(**changes),
    )
    began = time.monotonic()
    done = run_cli("run", env=env, timeout_s=60)
    elapsed = time.monotonic() - began
    line = failure_line(done, 2)
    assert line.startswith(f"payment-service: configuration error: {setting}: "), line
    output = done.stdout + done.stderr
    assert kafka.password not in output and wrong_password not in output
    # Process start-up and imports included; the check itself takes well under a second.
    assert elapsed < 30, f"{case}: took {elapsed:.1f} s"
    print(f"{case}: exit 2 after {elapsed:.2f} s: {line}")


def test_no_broker_answering_is_a_dependency_failure(
    kafka: SecureKafka, module_database_url: str
) -> None:
    from support.net import free_port

    nobody = f"localhost:{free_port()}"
    env = service_env(
        database_url=module_database_url,
        bootstrap=nobody,
        topics=ServiceTopics.unique("e2e-badsec"),
        **kafka.service_env(PAYMENT_KAFKA_BOOTSTRAP_SERVERS=nobody),
    )
    done = run_cli("run", env=env, timeout_s=60)
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert f"dependency unavailable: Kafka {nobody}: cannot connect" in done.stderr
    assert kafka.password not in done.stdout + done.stderr
