"""The `payment-service` command line end to end: migrate, configuration errors, show."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from .harness import (
    EventLog,
    Received,
    ServiceStack,
    ServiceTopics,
    open_stack,
    run_cli,
    service_env,
)

pytestmark = pytest.mark.timeout(180)

# `show` prints one line per event: "  v<version> <time>  <Type> <fields...>".
EVENT_LINE = re.compile(r"\s+v(?P<version>\d+)\s+(?P<time>\S+)\s+(?P<type>[A-Z][A-Za-z]+)\b.*")
OUTBOX_LINE = re.compile(
    r"\s+#(?P<position>\d+)\s+(?P<type>payment\.[a-z_]+)\s+seq=(?P<seq>\S+)\s+"
    r"ce_id=(?P<ce_id>[0-9a-f-]{36})\s+(?P<state>.+)"
)


def cli_env(database_url: str, **overrides: str) -> dict[str, str]:
    """A complete, valid configuration (the broker is never contacted by these commands)."""
    return service_env(
        database_url=database_url,
        bootstrap="127.0.0.1:9",
        topics=ServiceTopics.unique("e2e-cli"),
        **overrides,
    )


# -- migrate -----------------------------------------------------------------------------


def test_migrate_twice_on_an_empty_database(database_url: str) -> None:
    env = cli_env(database_url)
    first = run_cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    second = run_cli("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert first.stdout != second.stdout, "the second run should find nothing to apply"
    with psycopg.connect(database_url) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    assert {"payment_events", "payment_outbox", "payment_payments"} <= tables, tables


# -- bad configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        pytest.param({"PAYMENT_PROCESSOR": "bogus"}, "PAYMENT_PROCESSOR", id="unknown-processor"),
        pytest.param({"PAYMENT_DATABASE_URL": "mysql://x"}, "PAYMENT_DATABASE_URL", id="mysql-url"),
        pytest.param(
            {"PAYMENT_PROCESSOR": "stripe", "PAYMENT_STRIPE_API_KEY": ""},
            "PAYMENT_STRIPE_API_KEY",
            id="stripe-without-key",
        ),
        pytest.param(
            {"PAYMENT_KAFKA_BOOTSTRAP_SERVERS": "not a host list"},
            "PAYMENT_KAFKA_BOOTSTRAP_SERVERS",
            id="bootstrap-servers",
        ),
        pytest.param({"PAYMENT_HTTP_PORT": "eighty"}, "PAYMENT_HTTP_PORT", id="http-port"),
    ],
)
@pytest.mark.parametrize("command", ["run", "migrate"])
def test_bad_configuration_stops_with_one_line_naming_the_variable(
    module_database_url: str, command: str, overrides: dict[str, str], variable: str
) -> None:
    # A database that would work: only the bad setting may stop the command.
    env = cli_env(module_database_url, **overrides)
    result = run_cli(command, env=env, timeout_s=30)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert variable in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# -- show --------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def stack(
    kafka_bootstrap: str, module_database_url: str, e2e_log_dir: Path
) -> AsyncIterator[ServiceStack]:
    async with open_stack(
        bootstrap=kafka_bootstrap,
        database_url=module_database_url,
        log_dir=e2e_log_dir,
        topic_prefix="e2e-cli",
    ) as opened:
        yield opened


async def _show_when_published(
    stack: ServiceStack, *args: str, timeout_s: float = 15.0
) -> list[str]:
    """`show` output once no outbox row is pending (the relay marks rows just after the
    broker acknowledged them, so the orchestrator may see an event a moment earlier)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await asyncio.to_thread(run_cli, "show", *args, env=stack.env())
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        if "PENDING" not in result.stdout or asyncio.get_running_loop().time() > deadline:
            return lines
        await asyncio.sleep(0.1)


def _check_show_output(lines: list[str], initiated: Received, completed: Received) -> None:
    payment_id = initiated.data["payment_id"]
    text = "\n".join(lines)
    assert payment_id in lines[0], text
    events = [m for line in lines if (m := EVENT_LINE.fullmatch(line))]
    versions = [int(m["version"]) for m in events]
    types = [m["type"] for m in events]
    assert versions == list(range(1, len(events) + 1)), text  # the whole stream, in order
    assert types[0] == "PaymentInitiated", text
    assert types[-1] == "PaymentCompleted", text
    assert versions[-1] == completed.data["version"]

    outbox = {m["type"]: m for line in lines if (m := OUTBOX_LINE.fullmatch(line))}
    assert set(outbox) == {"payment.initiated", "payment.completed"}, text
    for record in (initiated, completed):
        row = outbox[str(record.header("ce_type"))]
        assert row["ce_id"] == record.ce_id, text
        assert row["seq"] == record.header("ce_sequence"), text
        assert row["state"].startswith("published"), text
    # The payment method is a gateway token: never printed.
    assert "pm_card_visa" not in text


async def test_show_prints_stream_and_outbox_by_payment_and_by_booking(
    stack: ServiceStack,
) -> None:
    orch = stack.orch
    booking = f"show-{uuid.uuid4().hex[:10]}"
    await orch.request(booking, amount=990, currency="GBP", payment_method="pm_card_visa")
    completed = await orch.wait_outcome(booking)
    assert completed.kind == "completed"
    [initiated] = EventLog.distinct(orch.events.initiated(booking)).values()
    payment_id = str(initiated.data["payment_id"])

    by_payment = await _show_when_published(stack, payment_id)
    _check_show_output(by_payment, initiated, completed)
    by_booking = await _show_when_published(stack, "--booking", booking)
    _check_show_output(by_booking, initiated, completed)
    assert by_booking == by_payment


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(lambda: [str(uuid.uuid4())], id="unknown-payment-id"),
        pytest.param(lambda: ["--booking", f"nobody-{uuid.uuid4().hex[:8]}"], id="unknown-booking"),
        pytest.param(lambda: ["not-a-uuid"], id="not-a-payment-id"),
    ],
)
async def test_show_of_an_unknown_payment_fails(
    stack: ServiceStack, args: Callable[[], list[str]]
) -> None:
    result = await asyncio.to_thread(run_cli, "show", *args(), env=stack.env())
    assert result.returncode != 0
    assert result.stderr.strip(), "say why on stderr"
    assert not result.stdout.strip()
