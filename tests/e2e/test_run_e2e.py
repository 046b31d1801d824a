"""`payment-service run` end to end: the real process, PostgreSQL and the broker, over Kafka.

One service per module serves the tests that cannot disturb each other (distinct booking
ids); tests that stop the process or need another processor mode get their own stack.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from .harness import (
    RFC3339,
    EventLog,
    Received,
    Sent,
    ServiceStack,
    StackFactory,
    new_booking,
    new_traceparent,
    open_stack,
    open_stack_on_a_fresh_database,
)

pytestmark = pytest.mark.timeout(180)

CARD_NUMBER = "4242424242424242"
CARD_NUMBER_SPACED = "4242 4242 4242 4242"

INITIATED_FIELDS = {
    "payment_id",
    "booking_id",
    "saga_id",
    "amount",
    "currency",
    "customer_id",
    "initiated_at",
    "version",
}
COMPLETED_FIELDS = {
    "payment_id",
    "booking_id",
    "saga_id",
    "amount",
    "currency",
    "processor",
    "provider_reference",
    "completed_at",
    "version",
}
FAILED_FIELDS = {
    "payment_id",
    "booking_id",
    "saga_id",
    "reason",
    "detail",
    "failed_at",
    "version",
}
DLQ_HEADERS = (
    "dlq_reason",
    "dlq_original_topic",
    "dlq_original_partition",
    "dlq_original_offset",
    "dlq_consumer_group",
)


@pytest_asyncio.fixture(scope="module")
async def stack(
    kafka_bootstrap: str, module_database_url: str, e2e_log_dir: Any
) -> AsyncIterator[ServiceStack]:
    """The module's shared service (fake processor, success mode).

    DEBUG logging: the card-number check then covers everything the service can log.
    """
    async with open_stack(
        bootstrap=kafka_bootstrap,
        database_url=module_database_url,
        log_dir=e2e_log_dir,
        topic_prefix="e2e-run",
        PAYMENT_LOG_LEVEL="DEBUG",
    ) as opened:
        yield opened


@pytest_asyncio.fixture(scope="module")
async def fail_stack(
    kafka_bootstrap: str, postgres_server_url: str, e2e_log_dir: Any
) -> AsyncIterator[ServiceStack]:
    """A second service whose fake gateway declines every charge, taking two seconds
    (so a test can act while a charge is in flight, on a loaded machine too)."""
    async with open_stack_on_a_fresh_database(
        postgres_server_url,
        bootstrap=kafka_bootstrap,
        log_dir=e2e_log_dir,
        topic_prefix="e2e-fail",
        PAYMENT_FAKE_MODE="fail",
        PAYMENT_FAKE_LATENCY_MS="2000",
    ) as opened:
        yield opened


# -- checks ------------------------------------------------------------------------------


def header_once(record: Received, name: str) -> str:
    values = record.header_values(name)
    assert len(values) == 1, f"{name}: expected exactly one header, got {values!r}"
    return values[0]


def assert_envelope(record: Received, *, ce_type: str, source: str) -> None:
    """The CloudEvents binary-mode headers every outbound event carries (contract 2)."""
    assert header_once(record, "ce_specversion") == "1.0"
    uuid.UUID(header_once(record, "ce_id"))  # the event's own UUID
    assert header_once(record, "ce_source") == source
    assert header_once(record, "ce_type") == ce_type
    assert RFC3339.fullmatch(header_once(record, "ce_time")), record.header("ce_time")
    assert header_once(record, "content-type") == "application/json"


def assert_payment_event(record: Received, *, ce_type: str, source: str) -> None:
    """Envelope plus the per-payment attributes: subject, sequence, key (contract 1-2)."""
    assert_envelope(record, ce_type=ce_type, source=source)
    payment_id = record.data["payment_id"]
    uuid.UUID(payment_id)
    assert header_once(record, "ce_subject") == payment_id
    sequence = header_once(record, "ce_sequence")
    assert sequence.isdigit(), sequence
    assert int(sequence) == record.data["version"]
    assert record.key == payment_id.encode()


def assert_utc_timestamp(text: str) -> None:
    assert RFC3339.fullmatch(text), text
    assert text.endswith(("Z", "z", "+00:00")), f"not UTC: {text}"


def trace_id(traceparent: str | None) -> str | None:
    return None if traceparent is None else traceparent.split("-")[1]


# -- the success path --------------------------------------------------------------------


async def test_request_gives_initiated_then_completed_per_contract(stack: ServiceStack) -> None:
    orch = stack.orch
    booking = new_booking("ok")
    trace = new_traceparent()
    await orch.request(
        booking,
        amount=12_345,
        currency="EUR",
        customer_id="cus_e2e_1",
        saga_id="saga-e2e-1",
        traceparent=trace,
    )
    completed = await orch.wait_outcome(booking)
    assert completed.kind == "completed", completed.describe()
    [initiated] = orch.events.initiated(booking)

    assert_payment_event(initiated, ce_type="payment.initiated", source=stack.source)
    assert_payment_event(completed, ce_type="payment.completed", source=stack.source)

    assert set(initiated.data) == INITIATED_FIELDS  # no payment method (contract 3)
    assert initiated.data["booking_id"] == booking
    assert initiated.data["saga_id"] == "saga-e2e-1"
    assert initiated.data["amount"] == 12_345
    assert initiated.data["currency"] == "EUR"
    assert initiated.data["customer_id"] == "cus_e2e_1"
    assert_utc_timestamp(initiated.data["initiated_at"])
    assert b"pm_card_visa" not in (initiated.value or b"")

    assert set(completed.data) == COMPLETED_FIELDS
    assert completed.data["payment_id"] == initiated.data["payment_id"]
    assert completed.data["booking_id"] == booking
    assert completed.data["saga_id"] == "saga-e2e-1"
    assert completed.data["amount"] == 12_345
    assert completed.data["currency"] == "EUR"
    assert completed.data["processor"] == "fake"
    assert isinstance(completed.data["provider_reference"], str)
    assert completed.data["provider_reference"]
    assert_utc_timestamp(completed.data["completed_at"])

    # One payment's events: one stream, in order, on one partition number.
    assert orch.partitions[stack.topics.initiated] == orch.partitions[stack.topics.completed]
    assert initiated.partition == completed.partition
    assert int(initiated.header("ce_sequence") or 0) < int(completed.header("ce_sequence") or 0)
    assert initiated.ce_id != completed.ce_id

    # The request's trace continues on every event it caused (contract 2).
    assert trace_id(initiated.header("traceparent")) == trace_id(trace)
    assert trace_id(completed.header("traceparent")) == trace_id(trace)


async def test_declining_gateway_gives_payment_failed_declined(fail_stack: ServiceStack) -> None:
    orch = fail_stack.orch
    booking = new_booking("declined")
    await orch.request(booking, amount=5_000, currency="USD")
    failed = await orch.wait_outcome(booking)
    assert failed.kind == "failed", failed.describe()
    [initiated] = orch.events.initiated(booking)

    assert_payment_event(failed, ce_type="payment.failed", source=fail_stack.source)
    assert set(failed.data) == FAILED_FIELDS
    assert failed.data["reason"] == "declined"
    assert failed.data["payment_id"] == initiated.data["payment_id"]
    assert failed.data["booking_id"] == booking
    assert failed.data["saga_id"] == f"saga-{booking}"
    assert isinstance(failed.data["detail"], str)
    assert failed.data["detail"]
    assert_utc_timestamp(failed.data["failed_at"])
    assert failed.partition == initiated.partition
    assert failed.data["version"] > initiated.data["version"]
    assert not orch.events.for_booking(booking, "completed")


# -- deduplication and re-requests -------------------------------------------------------


@pytest.mark.parametrize("when", ["after_the_outcome", "at_once"])
async def test_redelivered_request_publishes_nothing(stack: ServiceStack, when: str) -> None:
    orch = stack.orch
    booking = new_booking("redelivered")
    sent = await orch.request(booking)
    if when == "at_once":
        again = await orch.redeliver(sent)
        await orch.wait_outcome(booking)
    else:
        await orch.wait_outcome(booking)
        again = await orch.redeliver(sent)
    await orch.sentinel(after=again)

    assert len(orch.events.initiated(booking)) == 1, orch.events.summary(booking)
    assert len(orch.events.terminal(booking)) == 1, orch.events.summary(booking)
    assert not orch.events.dead_letters(booking)


async def test_same_ce_id_from_another_source_is_another_request(stack: ServiceStack) -> None:
    """Deduplication is on (ce_source, ce_id): another source's event is a re-request."""
    orch = stack.orch
    booking = new_booking("other-source")
    sent = await orch.request(booking)
    first = await orch.wait_outcome(booking)
    assert sent.ce_id is not None
    await orch.request(booking, headers=orch.headers(ce_id=sent.ce_id, source="another-saga"))
    replayed = await orch.wait_outcome(booking, deliveries=2)
    assert replayed.ce_id == first.ce_id
    assert len(EventLog.distinct(orch.events.initiated(booking))) == 1


async def test_rerequest_of_completed_booking_republishes_same_completed(
    stack: ServiceStack,
) -> None:
    orch = stack.orch
    booking = new_booking("rerequest")
    await orch.request(booking, amount=777, currency="JPY")
    first = await orch.wait_outcome(booking)
    assert first.kind == "completed"

    again = await orch.request(booking, amount=777, currency="JPY")  # a new ce_id
    replayed = await orch.wait_outcome(booking, deliveries=2)
    await orch.sentinel(after=again)

    assert replayed.kind == "completed"
    assert replayed.ce_id == first.ce_id
    assert replayed.data == first.data
    for name in ("ce_subject", "ce_sequence", "ce_time", "ce_type", "ce_source"):
        assert replayed.header(name) == first.header(name), name
    assert replayed.key == first.key
    assert replayed.partition == first.partition
    # Never charged again: still one payment, initiated once, one distinct outcome.
    assert len(orch.events.initiated(booking)) == 1
    assert len(EventLog.distinct(orch.events.terminal(booking))) == 1
    assert len(orch.events.terminal(booking)) == 2


async def test_rerequest_while_charging_gives_the_one_outcome(fail_stack: ServiceStack) -> None:
    """Contract 4.3: a re-request for a payment still in flight publishes nothing itself;
    the outcome follows as usual, once."""
    orch = fail_stack.orch
    booking = new_booking("in-flight")
    await orch.request(booking)
    await orch.wait_for(lambda log: log.initiated(booking), what="payment.initiated")
    again = await orch.request(booking)  # the charge takes 2 s: still in flight
    outcome = await orch.wait_outcome(booking)
    await orch.sentinel(after=again)
    assert outcome.kind == "failed"
    assert outcome.data["reason"] == "declined"
    assert len(orch.events.initiated(booking)) == 1
    assert len(orch.events.terminal(booking)) == 1, orch.events.summary(booking)
    assert not orch.events.dead_letters(booking)


async def test_redelivered_invalid_request_is_answered_once(stack: ServiceStack) -> None:
    orch = stack.orch
    booking = new_booking("invalid-redelivered")
    sent = await orch.request(booking, amount=0)
    await orch.wait_outcome(booking)
    again = await orch.redeliver(sent)
    await orch.sentinel(after=again)
    [failed] = orch.events.terminal(booking)
    assert failed.data["reason"] == "invalid_request"


@pytest.mark.parametrize(
    "change", [{"amount": 1_001}, {"currency": "USD"}], ids=["amount", "currency"]
)
async def test_rerequest_with_other_money_is_dead_lettered(
    stack: ServiceStack, change: dict[str, Any]
) -> None:
    orch = stack.orch
    booking = new_booking("conflict")
    await orch.request(booking, amount=1_000, currency="EUR")
    await orch.wait_outcome(booking)

    conflicting = await orch.request(booking, **{"amount": 1_000, "currency": "EUR", **change})
    dead = await orch.wait_dead_letter(conflicting)
    await orch.sentinel(after=conflicting)

    assert dead.value == conflicting.value
    assert dead.key == booking.encode()
    assert dead.header("ce_id") == conflicting.ce_id
    assert dead.header("dlq_reason")
    assert len(orch.events.initiated(booking)) == 1
    assert len(orch.events.terminal(booking)) == 1, "a conflicting re-request got an outcome"


@pytest.mark.parametrize(
    "change",
    [{"amount": 0}, {"payment_method": ""}, {"payment_method": CARD_NUMBER_SPACED}],
    ids=["amount-zero", "payment-method-empty", "card-number"],
)
async def test_invalid_rerequest_for_a_paid_booking_is_dead_lettered_not_failed(
    stack: ServiceStack, change: dict[str, Any]
) -> None:
    # Contract 4.3: a booking that has a payment never gets a payment.failed it did not
    # earn; a re-request that breaks a rule is dead-lettered, and dlq_reason says so.
    orch = stack.orch
    booking = new_booking("invalid-rerequest")
    await orch.request(booking, amount=1_000, currency="EUR")
    first = await orch.wait_outcome(booking)

    broken = await orch.request(booking, **{"amount": 1_000, "currency": "EUR", **change})
    dead = await orch.wait_dead_letter(broken)
    await orch.sentinel(after=broken)

    assert first.kind == "completed"
    reason = dead.header("dlq_reason") or ""
    assert "re-request for a booking that has a payment breaks a rule" in reason, reason
    assert "4242" not in reason
    assert len(orch.events.initiated(booking)) == 1
    [terminal] = orch.events.terminal(booking)
    assert terminal.kind == "completed", orch.events.summary(booking)


# -- invalid requests --------------------------------------------------------------------

# (id, change to a valid request's data, expected: "invalid_request" or "dead_letter").
# Contract 4.4: a request that decodes but breaks a rule of section 3 gets invalid_request;
# 4.5: one that cannot be decoded (wrong types, missing booking_id) is a dead letter.
INVALID_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("amount-zero", {"amount": 0}, "invalid_request"),
    ("amount-negative", {"amount": -5}, "invalid_request"),
    ("amount-over-max", {"amount": 100_000_001}, "invalid_request"),
    ("amount-missing", {"amount": None}, "invalid_request"),
    ("currency-unknown", {"currency": "XXX"}, "invalid_request"),
    ("currency-lowercase", {"currency": "eur"}, "invalid_request"),
    ("payment-method-empty", {"payment_method": ""}, "invalid_request"),
    ("booking-id-bad-chars", {"booking_id": "bad booking!"}, "invalid_request"),
    ("customer-id-too-long", {"customer_id": "c" * 65}, "invalid_request"),
    ("amount-float", {"amount": 10.5}, "dead_letter"),
    ("amount-integral-float", {"amount": 100.0}, "dead_letter"),
    ("amount-string", {"amount": "100"}, "dead_letter"),
    ("booking-id-number", {"booking_id": 42}, "dead_letter"),
    ("booking-id-missing", {"booking_id": None}, "dead_letter"),
]


@pytest.mark.parametrize(
    ("change", "expected"),
    [pytest.param(change, expected, id=name) for name, change, expected in INVALID_CASES],
)
async def test_invalid_request(stack: ServiceStack, change: dict[str, Any], expected: str) -> None:
    orch = stack.orch
    key = new_booking("invalid")
    data: dict[str, Any] = {
        "booking_id": key,
        "amount": 2_500,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "saga_id": f"saga-{key}",
    }
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    booking = data["booking_id"] if isinstance(data.get("booking_id"), str) else key
    sent = await orch.send_raw(
        json.dumps(data).encode(), key=booking.encode(), headers=orch.headers()
    )

    if expected == "invalid_request":
        failed = await orch.wait_outcome(booking)
        await orch.sentinel(after=sent)
        assert failed.kind == "failed", failed.describe()
        assert_envelope(failed, ce_type="payment.failed", source=stack.source)
        assert failed.data["reason"] == "invalid_request"
        assert failed.data["booking_id"] == booking
        assert failed.data["saga_id"] == f"saga-{key}"
        assert isinstance(failed.data["detail"], str)
        assert failed.data["detail"]
        assert_utc_timestamp(failed.data["failed_at"])
        # No payment was created: no payment id, no version (contract 3), keyed by booking.
        assert "payment_id" not in failed.data
        assert "version" not in failed.data
        assert failed.key == booking.encode()
        assert len(orch.events.terminal(booking)) == 1
        assert orch.events.dead_letter_of(sent) is None
    else:
        dead = await orch.wait_dead_letter(sent)
        await orch.sentinel(after=sent)
        assert dead.value == sent.value
        assert dead.header("dlq_reason")
        assert not orch.events.terminal(booking)
    assert not orch.events.initiated(booking)


async def test_card_number_is_rejected_and_never_published_logged_or_stored(
    stack: ServiceStack,
) -> None:
    orch = stack.orch
    sent: list[Sent] = []
    bookings = []
    for method in (CARD_NUMBER, CARD_NUMBER_SPACED, f"tok {CARD_NUMBER} 12/29"):
        booking = new_booking("card")
        bookings.append(booking)
        sent.append(await orch.request(booking, payment_method=method))
    for booking in bookings:
        failed = await orch.wait_outcome(booking)
        assert failed.kind == "failed"
        assert failed.data["reason"] == "invalid_request"
        assert not orch.events.initiated(booking)
    for request in sent:
        await orch.sentinel(after=request)

    log = stack.service.log_text()
    assert stack.topics.request in log, "the service log is not being captured"
    for needle in (CARD_NUMBER, CARD_NUMBER_SPACED):
        published = orch.events.contains_bytes(needle.encode())
        assert not published, [r.describe() for r in published]
        assert needle not in log, "the card number reached the log"
        assert not await _rows_containing(stack.database_url, needle), "card number stored"


async def _rows_containing(database_url: str, needle: str) -> list[str]:
    """Rows of any table of the service's schema whose text contains `needle`."""
    found: list[str] = []
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name)"
            " FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            " AND table_type = 'BASE TABLE'"
        )
        tables = [row[0] for row in await cur.fetchall()]
        assert tables, "the service created no tables?"
        for table in tables:
            cur = await conn.execute(
                f"SELECT t::text FROM {table} t WHERE strpos(t::text, %s) > 0",
                (needle,),
            )
            found += [f"{table}: {row[0][:200]}" for row in await cur.fetchall()]
    return found


# -- poison messages ---------------------------------------------------------------------


async def test_poison_messages_are_dead_lettered_and_the_partition_keeps_moving(
    stack: ServiceStack,
) -> None:
    orch = stack.orch
    booking = new_booking("poison")
    key = booking.encode()
    valid_body = json.dumps(
        {"booking_id": booking, "amount": 4_200, "currency": "EUR", "payment_method": "pm_x"}
    ).encode()
    oversized = json.dumps(
        {
            "booking_id": booking,
            "amount": 4_200,
            "currency": "EUR",
            "payment_method": "pm_x",
            "padding": "x" * (64 * 1024),
        }
    ).encode()
    assert len(oversized) > 64 * 1024
    poison = {
        "not-json": await orch.send_raw(b"{this is not JSON", key=key, headers=orch.headers()),
        "no-ce_id": await orch.send_raw(valid_body, key=key, headers=orch.headers(omit=["ce_id"])),
        "over-64KiB": await orch.send_raw(oversized, key=key, headers=orch.headers()),
    }
    for header in ("ce_source", "ce_type", "ce_specversion"):
        poison[f"no-{header}"] = await orch.send_raw(
            valid_body, key=key, headers=orch.headers(omit=[header])
        )
    valid = await orch.request(booking, amount=4_200)
    assert {s.partition for s in (*poison.values(), valid)} == {valid.partition}
    assert valid.offset > max(s.offset for s in poison.values())

    completed = await orch.wait_outcome(booking)
    assert completed.kind == "completed", completed.describe()
    for name, sent in poison.items():
        dead = await orch.wait_dead_letter(sent)
        assert dead.key == key, name
        assert dead.value == sent.value, f"{name}: the original bytes were not kept"
        for header in sent.headers:  # the original headers, CloudEvents type included
            assert header in dead.headers, f"{name}: lost header {header[0]}"
        for header in DLQ_HEADERS:
            assert len(dead.header_values(header)) == 1, f"{name}: {header}"
        assert dead.header("dlq_reason"), name
        assert dead.header("dlq_original_topic") == stack.topics.request
        assert dead.header("dlq_original_partition") == str(sent.partition)
        assert dead.header("dlq_original_offset") == str(sent.offset)
        assert dead.header("dlq_consumer_group") == stack.group
        if any(h == "ce_type" for h, _ in sent.headers):
            assert dead.header("ce_type") == "saga.request_payment", name
    await orch.sentinel(after=valid)
    # Only the poison was parked (perhaps more than once: dead letters are at least once).
    parked = {int(str(d.header("dlq_original_offset"))) for d in orch.events.dead_letters(booking)}
    assert parked == {sent.offset for sent in poison.values()}
    assert len(orch.events.initiated(booking)) == 1
    assert len(orch.events.terminal(booking)) == 1


# -- HTTP --------------------------------------------------------------------------------

_SAMPLE = re.compile(
    r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+]?([0-9.]+([eE][-+]?[0-9]+)?|NaN|[-+]?Inf)"
)


async def test_health_and_metrics(stack: ServiceStack) -> None:
    service = stack.service
    booking = new_booking("metrics")
    await stack.orch.request(booking)
    await stack.orch.wait_outcome(booking)

    live = await service.get("/health/live")
    assert live.status_code == 200
    ready = await service.get("/health/ready")
    assert ready.status_code == 200, ready.text

    metrics = await service.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    lines = [line for line in metrics.text.splitlines() if line.strip()]
    samples = [line for line in lines if not line.startswith("#")]
    assert samples, metrics.text
    for line in lines:
        if line.startswith("# TYPE "):
            assert line.split()[3] in ("counter", "gauge", "histogram", "summary", "untyped")
        elif not line.startswith("#"):
            assert _SAMPLE.fullmatch(line), f"not Prometheus text: {line!r}"
    received = [s for s in samples if s.startswith("payment_requests_received_total")]
    assert received, "no requests_received counter"
    assert float(received[0].rsplit(" ", 1)[1]) >= 1


# -- shutdown ----------------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["right_after_sending", "while_charging"])
async def test_sigterm_drains_and_a_restart_loses_nothing(
    make_stack: StackFactory, moment: str
) -> None:
    """SIGTERM with requests unread or charges in flight: exit 0; after a restart every
    request has exactly one payment.initiated and one terminal event (contract 4.1, 4.7)."""
    stack = await make_stack(PAYMENT_FAKE_LATENCY_MS="3000")
    orch, service = stack.orch, stack.service
    await orch.settle()  # the service has joined its group and is consuming
    bookings = [new_booking(f"sigterm-{i}") for i in range(40)]
    await asyncio.gather(*(orch.request(b) for b in bookings))
    if moment == "while_charging":
        # Each charge takes three seconds: once every payment.initiated is out, the
        # service fetches them within a few fetch waits and is then charging them.
        await orch.wait_for(
            lambda log: all(log.initiated(b) for b in bookings), what="every payment.initiated"
        )
        await asyncio.sleep(1.0)
    service.send_signal(signal.SIGTERM)
    code = await service.wait_exit(60)
    assert code == 0, service.log_tail()
    if moment == "while_charging":
        # The charges in flight at SIGTERM were finished and their outcomes published
        # before the exit; the orchestrator may still be fetching them.
        await orch.wait_for(
            lambda log: any(log.terminal(b) for b in bookings),
            timeout_s=15,
            what="an outcome drained at SIGTERM (nothing was in flight, or the drain dropped it)",
        )
    drained = sum(1 for b in bookings if orch.events.terminal(b))

    await service.start_ready()
    await orch.wait_all_terminal(bookings, timeout_s=60)
    await orch.settle()
    for booking in bookings:
        initiated = EventLog.distinct(orch.events.initiated(booking))
        terminal = EventLog.distinct(orch.events.terminal(booking))
        assert len(initiated) == 1, orch.events.summary(booking)
        assert len(terminal) == 1, orch.events.summary(booking)
        assert next(iter(terminal.values())).kind == "completed"
    print(f"{drained}/{len(bookings)} outcomes published before the restart")


# -- a native crash ----------------------------------------------------------------------


async def test_a_native_crash_leaves_the_python_stacks_in_the_log(
    make_stack: StackFactory,
) -> None:
    """A fault in a C extension kills the process before any logging runs; the log still
    says where each thread was, so the crash can be placed (runtime/crash_reports.py)."""
    stack = await make_stack()
    service = stack.service
    service.send_signal(signal.SIGSEGV)
    code = await service.wait_exit(30)
    log = service.log_text(current_start_only=True)
    assert code == -signal.SIGSEGV, service.log_tail()
    assert "Fatal Python error: Segmentation fault" in log, service.log_tail()
    # The main thread was in the event loop, and the dump names its frames.
    assert re.search(r'File ".*asyncio/base_events\.py", line \d+ in run_forever', log), (
        service.log_tail()
    )
