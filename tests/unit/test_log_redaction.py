"""Log lines never carry secrets or card numbers, whichever way they reach a record.

Every path into a log line (the message, its arguments, an exception's message and
traceback, `extra` fields, stack info), in both output formats, through the handler that
`configure_logging` installs on the root logger.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from payment.adapters.observability.logs import (
    REDACTED,
    REDACTED_CARD,
    build_handler,
    configure_logging,
    redact,
)

SECRETS = {
    "stripe live key": "sk_live_51HxYzAbCdEf0123456789abc",
    "stripe test key": "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "restricted key": "rk_live_51Habcdef0123456789",
    "webhook secret": "whsec_0123456789abcdefABCDEF",
    "url password": "postgresql://payments:s3cr3t-Pa55@db.internal:5432/payments",
    "bearer token": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    "basic credentials": "authorization=Basic dXNlcjpodW50ZXIy",
    "password pair": "password=hunter2-hunter2",
    "api key pair": "api_key: 'AKIA0123456789SECRET'",
}
# The part of each secret that must never appear.
SECRET_CORES = {
    "stripe live key": "51HxYzAbCdEf0123456789abc",
    "stripe test key": "4eC39HqLyjWDarjtT1zdp7dc",
    "restricted key": "51Habcdef0123456789",
    "webhook secret": "0123456789abcdefABCDEF",
    "url password": "s3cr3t-Pa55",
    "bearer token": "eyJhbGciOiJIUzI1NiJ9",
    "basic credentials": "dXNlcjpodW50ZXIy",
    "password pair": "hunter2",
    "api key pair": "AKIA0123456789SECRET",
}
CARDS = {
    "visa": "4242424242424242",
    "visa spaced": "4242 4242 4242 4242",
    "mastercard dashed": "5555-5555-5555-4444",
    "amex": "378282246310005",
    "visa with cvc": "4000 0566 5566 5556 123",
}
CARD_DIGITS = {
    "visa": "4242424242424242",
    "visa spaced": "4242424242424242",
    "mastercard dashed": "5555555555554444",
    "amex": "378282246310005",
    "visa with cvc": "4000056655665556",
}


def leaked(output: str) -> list[str]:
    """Every secret or card number found in `output` (digits compared without separators)."""
    found = [name for name, core in SECRET_CORES.items() if core in output]
    digits_only = "".join(c for c in output if c.isdigit() or c == "\n")
    found += [name for name, digits in CARD_DIGITS.items() if digits in digits_only]
    return found


ALL = {**SECRETS, **CARDS}


class Capture:
    def __init__(self, fmt: str) -> None:
        self.stream = io.StringIO()
        self.handler = build_handler(fmt, self.stream)
        self.logger = logging.getLogger(f"test.redaction.{uuid.uuid4().hex[:8]}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def close(self) -> None:
        self.logger.removeHandler(self.handler)


@pytest.fixture(params=["text", "json"])
def capture(request: pytest.FixtureRequest) -> Iterator[Capture]:
    cap = Capture(request.param)
    yield cap
    cap.close()


@pytest.mark.parametrize("name", sorted(ALL))
def test_redacted_in_the_message(capture: Capture, name: str) -> None:
    capture.logger.info(f"calling the gateway with {ALL[name]} now")
    assert leaked(capture.text) == [], capture.text
    assert "calling the gateway with" in capture.text


@pytest.mark.parametrize("name", sorted(ALL))
def test_redacted_in_arguments(capture: Capture, name: str) -> None:
    capture.logger.warning("request %s failed (%r)", ALL[name], {"method": ALL[name]})
    assert leaked(capture.text) == [], capture.text


def test_redacted_in_numeric_arguments(capture: Capture) -> None:
    capture.logger.info("card %d, amount %d", 4242424242424242, 4200)
    assert leaked(capture.text) == [], capture.text
    assert "4200" in capture.text and REDACTED_CARD in capture.text


@pytest.mark.parametrize("name", sorted(ALL))
def test_redacted_in_exceptions(capture: Capture, name: str) -> None:
    def gateway_call(secret: str) -> None:
        raise RuntimeError(f"gateway refused {secret}")

    try:
        try:
            gateway_call(ALL[name])
        except RuntimeError as inner:
            raise ValueError(f"while charging with {ALL[name]}") from inner
    except ValueError:
        capture.logger.exception("charge failed")
    assert leaked(capture.text) == [], capture.text
    assert "Traceback" in capture.text and "ValueError" in capture.text


@pytest.mark.parametrize("name", sorted(ALL))
def test_redacted_in_extra_fields(capture: Capture, name: str) -> None:
    capture.logger.info(
        "processor call",
        extra={"payment_method": ALL[name], "detail": {"nested": ALL[name]}, "attempt": 2},
    )
    assert leaked(capture.text) == [], capture.text
    assert "attempt" in capture.text


def test_redacted_in_numeric_extra_fields(capture: Capture) -> None:
    capture.logger.info("processor call", extra={"pan": 4242424242424242, "attempt": 3})
    assert leaked(capture.text) == [], capture.text


def test_redacted_in_stack_info(capture: Capture) -> None:
    secret = SECRETS["stripe live key"]  # a local of this frame, named in the source line
    capture.logger.info("where am I %s", secret, stack_info=True)
    assert leaked(capture.text) == [], capture.text
    assert "Stack (most recent call last)" in capture.text


def test_json_lines_are_json_with_fields_and_trace_ids() -> None:
    cap = Capture("json")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        cap.logger.info(
            "payment %s completed", "p-1", extra={"payment_id": "p-1", "booking_id": "b-1"}
        )
    cap.close()
    [line] = cap.text.splitlines()
    entry = json.loads(line)
    context = span.get_span_context()
    assert entry["message"] == "payment p-1 completed"
    assert entry["level"] == "INFO"
    assert entry["payment_id"] == "p-1" and entry["booking_id"] == "b-1"
    assert entry["trace_id"] == f"{context.trace_id:032x}"
    assert entry["span_id"] == f"{context.span_id:016x}"
    assert entry["time"].endswith("Z")


def test_text_lines_are_readable_with_fields_and_trace_ids() -> None:
    cap = Capture("text")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        cap.logger.info("payment completed", extra={"payment_id": "p-1", "reason": "two words"})
    cap.logger.info("outside any trace")
    cap.close()
    first, second = cap.text.splitlines()
    context = span.get_span_context()
    assert " INFO test.redaction." in first
    assert 'payment completed payment_id=p-1 reason="two words"' in first
    assert f"trace_id={context.trace_id:032x} span_id={context.span_id:016x}" in first
    assert "trace_id" not in second


def test_what_is_not_secret_is_left_alone() -> None:
    payment_id = "12345678-1234-4234-8234-123456789012"
    text = (
        f"payment {payment_id} of booking bk-1 at offset 1234567 for 4200 EUR"
        " (gateway token pm_card_visa, key sk_test_...)"
    )
    assert redact(text) == text


def test_redact_is_idempotent() -> None:
    for value in ALL.values():
        once = redact(f"x {value} y")
        assert redact(once) == once
        assert REDACTED in once or REDACTED_CARD in once


def test_configure_logging_puts_the_filter_on_the_root_handler() -> None:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("INFO", "json", stream=stream)
    try:
        logging.getLogger("payment.somewhere").warning("key %s", SECRETS["stripe live key"])
        again = configure_logging("INFO", "json", stream=stream)
        assert handler not in root.handlers and again in root.handlers  # replaced, not added
        handler = again
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["message"] == f"key {REDACTED}"
