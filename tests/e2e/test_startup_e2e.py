"""Start-up as an operator meets it: safe defaults, one-line failures with exit codes,
liveness from the first second, migrations and topics only when asked for."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .harness import (
    ServiceProcess,
    ServiceTopics,
    create_topics,
    led_partitions,
    run_cli,
    service_env,
)

pytestmark = pytest.mark.timeout(180)

UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens there


def env_for(database_url: str, bootstrap: str = UNREACHABLE, **overrides: str) -> dict[str, str]:
    """A `run` environment as an operator writes it: no migration or topic creation."""
    return service_env(
        database_url=database_url,
        bootstrap=bootstrap,
        topics=ServiceTopics.unique("e2e-start"),
        **{"PAYMENT_MIGRATE_ON_START": "", **overrides},
    )


def failure_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last line on stderr (earlier ones are the service's INFO lines); no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def migrated(database_url: str) -> str:
    done = run_cli("migrate", env=env_for(database_url))
    assert done.returncode == 0, done.stderr
    return database_url


# -- configuration (exit 2) ---------------------------------------------------------------


def test_run_without_a_processor_refuses_to_start(module_database_url: str) -> None:
    result = run_cli("run", env=env_for(module_database_url, PAYMENT_PROCESSOR=""))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "payment-service: configuration error: PAYMENT_PROCESSOR: required by run (fake,"
        " sandbox or stripe); it has no default so that nothing is charged with the fake by"
        " accident"
    ]


def test_a_misspelt_variable_names_the_setting_it_resembles(module_database_url: str) -> None:
    result = run_cli("run", env=env_for(module_database_url, PAYMENT_PROCESOR="stripe"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "payment-service: configuration error: PAYMENT_PROCESOR: unknown setting;"
        " did you mean PAYMENT_PROCESSOR?"
    ]


# -- dependencies (exit 3) ------------------------------------------------------------------


def test_a_schema_behind_the_code_stops_run_telling_to_migrate(database_url: str) -> None:
    result = run_cli("run", env=env_for(database_url))
    assert result.returncode == 3, result.stderr
    line = failure_line(result)
    assert line.startswith("payment-service: dependency unavailable: database schema: ")
    assert "run `payment-service migrate`" in line


def test_an_unreachable_database_is_one_line_in_text_and_in_json() -> None:
    url = "postgresql://payments:s3cret@127.0.0.1:9/payments"
    result = run_cli("run", env=env_for(url))
    assert result.returncode == 3
    line = failure_line(result)
    assert line == (
        "payment-service: dependency unavailable: database payments@127.0.0.1:9/payments:"
        " connection refused: check that PostgreSQL runs there and accepts TCP connections"
        " (PAYMENT_DATABASE_URL)"
    )
    assert "s3cret" not in result.stderr

    as_json = run_cli("run", env=env_for(url, PAYMENT_LOG_FORMAT="json"))
    assert as_json.returncode == 3
    records = [json.loads(text) for text in as_json.stderr.strip().splitlines()]
    assert records[-1]["exit_code"] == 3 and records[-1]["failure"] == "unavailable"
    assert "connection refused" in records[-1]["message"]
    assert "exception" not in records[-1]


def test_debug_adds_the_traceback() -> None:
    url = "postgresql://payments@127.0.0.1:9/payments"
    result = run_cli("run", env=env_for(url, PAYMENT_LOG_LEVEL="DEBUG"))
    assert result.returncode == 3
    assert "Traceback" in result.stderr


@pytest.mark.parametrize(
    "command",
    [("migrate",), ("show", str(uuid.UUID(int=1))), ("show", "--booking", "b-1")],
    ids=["migrate", "show", "show-booking"],
)
def test_operator_commands_fail_in_one_line_when_the_database_is_unreachable(
    command: tuple[str, ...],
) -> None:
    result = run_cli(*command, env=env_for("postgresql://payments@127.0.0.1:9/payments"))
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        "payment-service: dependency unavailable: database payments@127.0.0.1:9/payments:"
        " connection refused: check that PostgreSQL runs there and accepts TCP connections"
        " (PAYMENT_DATABASE_URL)"
    ]


def test_dead_letters_fail_in_one_line_when_the_broker_is_unreachable(
    module_database_url: str,
) -> None:
    result = run_cli("dead-letters", "list", env=env_for(module_database_url), timeout_s=120)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"payment-service: dependency unavailable: Kafka {UNREACHABLE}: ")


def test_an_unreachable_broker_stops_run_in_one_line(database_url: str) -> None:
    result = run_cli("run", env=env_for(migrated(database_url)), timeout_s=120)
    assert result.returncode == 3, result.stderr
    assert failure_line(result).startswith(
        f"payment-service: dependency unavailable: Kafka {UNREACHABLE}: cannot connect"
    )
    # The Kafka client's own connection errors do not repeat it (they do at DEBUG).
    assert "aiokafka" not in result.stderr, result.stderr


def test_missing_topics_stop_run_naming_them(database_url: str, kafka_bootstrap: str) -> None:
    env = env_for(migrated(database_url), kafka_bootstrap)
    result = run_cli("run", env=env, timeout_s=120)
    assert result.returncode == 3, result.stderr
    line = failure_line(result)
    assert "topics missing: " in line and env["PAYMENT_TOPIC_REQUEST"] in line
    assert "PAYMENT_KAFKA_CREATE_TOPICS=true" in line


async def test_topics_with_different_partition_counts_stop_run(
    database_url: str, kafka_bootstrap: str
) -> None:
    env = env_for(migrated(database_url), kafka_bootstrap)
    names = [v for k, v in env.items() if k.startswith("PAYMENT_TOPIC_")]
    await create_topics(kafka_bootstrap, names[:1], partitions=2)
    await create_topics(kafka_bootstrap, names[1:], partitions=3)
    result = await asyncio.to_thread(run_cli, "run", env=env, timeout_s=120)
    assert result.returncode == 3, result.stderr
    assert "different partition counts" in failure_line(result)


# -- asked for: migrations and topics at start ---------------------------------------------


async def test_run_migrates_and_creates_topics_when_told(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = env_for(
        database_url,
        kafka_bootstrap,
        PAYMENT_MIGRATE_ON_START="true",
        PAYMENT_KAFKA_CREATE_TOPICS="true",
        PAYMENT_KAFKA_REPLICATION_FACTOR="1",
        PAYMENT_KAFKA_MIN_INSYNC_REPLICAS="1",
        PAYMENT_KAFKA_TOPIC_PARTITIONS="2",
    )
    names = [v for k, v in env.items() if k.startswith("PAYMENT_TOPIC_")]
    service = ServiceProcess(env, tmp_path / "service.log")
    try:
        await service.start_ready()
        metrics = (await service.get("/metrics")).text
        led = await led_partitions(kafka_bootstrap, names, 10.0)
        assert {name: len(parts) for name, parts in led.items()} == dict.fromkeys(names, 2)
        assert 'payment_build_info{processor="fake",version="' in metrics
        assert await service.terminate() == 0
    finally:
        service.close()
    assert "PAYMENT_PROCESSOR=fake: nothing is charged" in service.log_text()


# -- liveness from the first second ---------------------------------------------------------


@pytest.fixture
def silent_database() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: a database that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"postgresql://payments@127.0.0.1:{server.getsockname()[1]}/payments"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


async def test_liveness_answers_while_start_up_waits_and_readiness_says_why(
    silent_database: str, tmp_path: Path
) -> None:
    env = env_for(silent_database, PAYMENT_STARTUP_TIMEOUT_S="8")
    service = ServiceProcess(env, tmp_path / "service.log").start()
    try:
        live = ready = None
        for _ in range(400):
            try:
                live = await service.get("/health/live")
                ready = await service.get("/health/ready")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.02)
        assert live is not None and ready is not None
        assert live.status_code == 200
        assert ready.status_code == 503
        # The first step that needs the database is waiting for its answer.
        assert ready.text in (
            "startup: starting: connecting to the broker and the database\n",
            "startup: starting: checking the schema\n",
        )
        assert await service.wait_exit(60) == 3
    finally:
        service.close()
    assert "no answer in time" in service.log_text().strip().splitlines()[-1]
