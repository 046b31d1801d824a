"""Hostile input against the real `payment-service run`, then a scan for card data and secrets.

Hypothesis generates the requests (floats, huge and negative amounts, wrong currencies,
card numbers, invalid UTF-8, broken JSON, missing, duplicated and malformed CloudEvents
headers, unknown `ce_type`s…); a few fixed cases add the large payloads. Everything goes
over the real broker to the real process. Each message must end as exactly one
`payment.failed` (`invalid_request`) or exactly one dead letter, as predicted by the
case, never as a payment; after each batch a valid request still completes.

Generation and checking are separate: Hypothesis draws the cases up front (derandomized,
so CI sees the same cases every run), the test sends them in batches and checks each
case's outcome. A failure names the case by index and kind, never by its payload.

Afterwards every table, every topic the service writes and the service's log are scanned
for Luhn-valid 13-19 digit numbers (the service's own rule, `looks_like_card_number`) and
for two secrets (the database password, which trust authentication ignores, and a Stripe
key the fake processor never uses). Dead letters too: they carry the original bytes and
headers (contract section 4.5) except card numbers, which are masked (section 3: never
published) and said so in `dlq_card_numbers_masked`; a dead letter is checked to be
either a verbatim copy of what was sent, or one that says what it changed (masked, or a
part left out for its size).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import pkgutil
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import payment
from payment.application.validation import looks_like_card_number, luhn_valid
from payment.devtools import asyncapi
from payment.domain.money import CURRENCY_EXPONENTS

from .harness import (
    EventLog,
    Received,
    Sent,
    ServiceStack,
    broker_supports_idempotence,
    open_stack,
)

pytestmark = pytest.mark.timeout(600)

EXAMPLES = 240
BATCH = 60
MAX_AMOUNT = 100_000_000
MAX_VALUE_BYTES = 64 * 1024
ONE_MIB = 1024 * 1024
SOURCE = "hostile-orchestrator"
REQUEST_TYPE = "saga.request_payment"
DB_PASSWORD = "hostile-db-Pa55w0rd-7f3c9e"
STRIPE_KEY = "sk_test_hostile7f3c9e51a2b4d6"

FAILED = "failed"
DEAD = "dead_letter"
NOTHING = "nothing"

# -- cases -------------------------------------------------------------------------------

BOOKING = "\x00booking\x00"  # placeholder, replaced by the case's unique booking id


@dataclass(frozen=True)
class Spec:
    """What Hypothesis draws: a body, header mutations, and the outcome it must have."""

    kind: str
    # A dict is dumped as JSON (BOOKING replaced); bytes are sent as they are; None: no value.
    body: dict[str, Any] | bytes | None
    expect: str
    header_ops: tuple[tuple[Any, ...], ...] = ()
    # The booking id is the case's own unique one, so a payment.failed can be told apart.
    traceable: bool = True
    topic: str = "request"
    card: bool = False  # the case carries a card number (for a reader; the scan decides)
    # Pad a dict body (its "padding" field) to exactly this many bytes.
    pad_to: int | None = None
    # The Kafka key, if not the booking id ("" for no key at all).
    key: bytes | None = None


@dataclass
class Case:
    index: int
    spec: Spec
    booking: str
    trace_id: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    sent: Sent | None = None
    outcome: str | None = None
    detail: str = ""

    def label(self) -> str:
        ops = ",".join(str(op[0]) + ":" + str(op[1]) for op in self.spec.header_ops)
        size = -1 if self.value is None else len(self.value)
        return f"#{self.index} {self.spec.kind} [{ops}] {size} B"


def complete_luhn(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


@st.composite
def card_tokens(draw: st.DrawFn) -> str:
    """A Luhn-valid 13-19 digit number, maybe grouped, maybe followed by a CVC or expiry."""
    length = draw(st.integers(13, 19))
    digits = complete_luhn(draw(st.text("0123456789", min_size=length - 1, max_size=length - 1)))
    sep = draw(st.sampled_from(["", " ", "-", "  ", " - "]))
    if sep and length == 15:
        groups = [digits[:4], digits[4:10], digits[10:]]
    elif sep:
        groups = [digits[i : i + 4] for i in range(0, length, 4)]
    else:
        groups = [digits]
    token = sep.join(groups)
    tail = draw(st.sampled_from(["", " 123", " 1234", "/123", " 12/29", " exp 0129 cvc 737"]))
    head = draw(st.sampled_from(["", "card ", "PAN:", "pm_"]))
    return head + token + tail


def is_card(token: str) -> bool:
    return looks_like_card_number(token)


def valid_body() -> dict[str, Any]:
    return {
        "booking_id": BOOKING,
        "amount": 1000,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "saga_id": "saga-hostile",
    }


junk_text = st.text(max_size=40)
not_a_currency = st.one_of(
    st.sampled_from(["eur", "EURO", "XXX", "BTC", "", " EUR", "EUR ", "€", "usd", "XTS"]),
    st.text(max_size=8),
).filter(lambda c: c not in CURRENCY_EXPONENTS)
bad_int_amounts = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=MAX_AMOUNT + 1),
    st.sampled_from([0, -1, MAX_AMOUNT + 1, 2**63, -(2**63), 10**40, -(10**40)]),
)
# Everything msgspec refuses as an int (strict): floats (also integral ones), strings, bools…
non_int_amounts = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 1000.0, 1e3, 0.1, -0.0, 1.5, 99999999.99, 1e308]),
    st.text(max_size=12),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def rule_breaks(draw: st.DrawFn) -> tuple[dict[str, Any], bool, bool]:
    """A body that decodes but breaks at least one rule of contract section 3.

    Returns the body, whether it holds a card number, and whether its booking id is
    still the case's own (so the payment.failed can be matched by it).
    """
    body = valid_body()
    card = False
    own_booking = True
    breaks = draw(
        st.lists(
            st.sampled_from(
                [
                    "amount",
                    "amount_missing",
                    "currency",
                    "currency_missing",
                    "card",
                    "method_missing",
                    "method_long",
                    "method_empty",
                    "booking",
                    "customer",
                    "saga",
                ]
            ),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    for kind in breaks:
        if kind == "amount":
            body["amount"] = draw(bad_int_amounts)
        elif kind == "amount_missing":
            body.pop("amount")
        elif kind == "currency":
            body["currency"] = draw(not_a_currency)
        elif kind == "currency_missing":
            body["currency"] = None
        elif kind == "card":
            body["payment_method"] = draw(card_tokens())
            card = True
        elif kind == "method_missing":
            body.pop("payment_method")
        elif kind == "method_long":
            body["payment_method"] = "pm_" + "x" * draw(st.integers(253, 2000))
        elif kind == "method_empty":
            body["payment_method"] = ""
        elif kind == "booking":
            own_booking = False
            body["booking_id"] = draw(
                st.one_of(
                    st.just(""),
                    st.text(alphabet="abc-", min_size=65, max_size=300),
                    st.text(min_size=1, max_size=20).filter(
                        lambda b: re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", b) is None
                    ),
                    card_tokens().filter(lambda t: " " in t or "/" in t),
                )
            )
            card = card or is_card(body["booking_id"])
        elif kind == "customer":
            body["customer_id"] = "c" * draw(st.integers(65, 500))
        elif kind == "saga":
            body["saga_id"] = "s" * draw(st.integers(65, 500))
    # Riders: a card number where nothing reads it (an unknown field, saga or customer
    # id), and unknown fields of any shape (tolerant reader).
    rider = draw(st.sampled_from([None, "extra", "saga", "customer"]))
    if rider is not None:
        token = draw(card_tokens().filter(lambda t: len(t) <= 64))
        card = True
        if rider == "extra":
            body["note"] = token
        elif rider == "saga" and "saga" not in breaks:
            body["saga_id"] = token
        elif rider == "customer" and "customer" not in breaks:
            body["customer_id"] = token
        else:
            body["note"] = token
    extras = draw(
        st.dictionaries(
            st.text(max_size=10).filter(lambda k: k not in body),
            st.one_of(
                st.none(),
                st.integers(),
                st.floats(allow_nan=False, allow_infinity=False),
                junk_text,
            ),
            max_size=3,
        )
    )
    body.update(extras)
    return body, card, own_booking


@st.composite
def decode_failures(draw: st.DrawFn) -> tuple[dict[str, Any] | bytes | None, bool, str]:
    """A value the codec cannot turn into a request: poison, dead-lettered."""
    kind = draw(
        st.sampled_from(
            [
                "amount_type",
                "currency_type",
                "method_type",
                "booking_type",
                "booking_missing",
                "not_object",
                "not_json",
                "bad_utf8",
                "binary",
                "nan",
                "truncated",
                "nested",
                "no_value",
                "surrogate",
                "card_not_json",
            ]
        )
    )
    body = valid_body()
    card = False
    if kind == "amount_type":
        body["amount"] = draw(non_int_amounts)
        if draw(st.booleans()):
            body["payment_method"] = draw(card_tokens())
            card = True
        return body, card, kind
    if kind == "currency_type":
        body["currency"] = draw(st.one_of(st.integers(), st.lists(st.just("EUR"), max_size=2)))
        return body, card, kind
    if kind == "method_type":
        body["payment_method"] = draw(st.one_of(st.integers(), st.booleans(), st.just({})))
        return body, card, kind
    if kind == "booking_type":
        body["booking_id"] = draw(st.one_of(st.integers(), st.none(), st.just(["b"])))
        return body, card, kind
    if kind == "booking_missing":
        body.pop("booking_id")
        return body, card, kind
    if kind == "not_object":
        raw = json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), junk_text)))
        return raw.encode(), card, kind
    if kind == "not_json":
        return draw(junk_text).encode() + b"{", card, kind
    if kind == "bad_utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80"]))
        return (
            b'{"booking_id": "' + BOOKING.encode() + b'", "currency": "EU' + junk + b'"}',
            card,
            kind,
        )
    if kind == "binary":
        return draw(st.binary(min_size=0, max_size=200)), card, kind
    if kind == "nan":
        return b'{"booking_id": "' + BOOKING.encode() + b'", "amount": NaN}', card, kind
    if kind == "truncated":
        full = json.dumps(body).encode()
        return full[: draw(st.integers(1, len(full) - 1))], card, kind
    if kind == "nested":
        depth = draw(st.integers(2000, 20000))
        raw = b'{"booking_id": "' + BOOKING.encode() + b'", "x": ' + b"[" * depth + b"]" * depth
        return raw + b"}", card, kind
    if kind == "no_value":
        return None, card, kind
    if kind == "surrogate":
        return b'{"booking_id": "' + BOOKING.encode() + b'", "saga_id": "a\\ud800b"}', card, kind
    token = draw(card_tokens())
    return f"payment_method={token}".encode(), True, kind


REQUIRED = ("ce_specversion", "ce_id", "ce_source", "ce_type")


@st.composite
def poison_header_ops(draw: st.DrawFn) -> tuple[tuple[Any, ...], ...]:
    """Header mutations the codec must refuse: the message is dead-lettered."""
    name = draw(st.sampled_from(REQUIRED))
    op = draw(
        st.sampled_from(
            ["omit", "dup_same", "dup_other", "dup_upper", "none", "bad_utf8", "empty", "long"]
        )
    )
    ops: list[tuple[Any, ...]] = [(op, name)]
    special = draw(
        st.sampled_from([None, "specversion", "content_type", "time", "type", "time_dup"])
    )
    if special == "specversion":
        ops = [("set", "ce_specversion", draw(st.sampled_from([b"0.3", b"1", b"2.0", b"1.0 "])))]
    elif special == "content_type":
        value = draw(
            st.sampled_from(
                [b"text/plain", b"application/xml", b"application/json; charset=latin-1"]
            )
        )
        ops = [("set", "content-type", value)]
    elif special == "time":
        value = draw(st.sampled_from([b"yesterday", b"2024-13-45T99:00:00Z", b"1700000000"]))
        ops = [("set", "ce_time", value)]
    elif special == "type":
        value = draw(
            st.one_of(
                st.sampled_from(
                    [
                        b"payment.initiated",
                        b"saga.request_payment.v2",
                        b"SAGA.REQUEST_PAYMENT",
                        b"com.example.other",
                    ]
                ),
                st.text(min_size=1, max_size=30)
                .filter(lambda t: t != REQUEST_TYPE and "\x00" not in t)
                .map(str.encode),
            )
        )
        ops = [("set", "ce_type", value)]
    elif special == "time_dup":
        ops = [("dup_same", "ce_time")]
    return tuple(ops)


@st.composite
def harmless_header_ops(draw: st.DrawFn) -> tuple[tuple[Any, ...], ...]:
    """Header oddities the codec tolerates: the request is judged on its data."""
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["upper", "extra", "trace_junk", "trace_dup", "no_time"]))
        if kind == "upper":
            ops.append(("upper", draw(st.sampled_from(REQUIRED))))
        elif kind == "extra":
            value = draw(st.one_of(st.binary(max_size=40), card_tokens().map(str.encode)))
            ops.append(("add", "x-" + draw(st.text("abcdefgh", min_size=1, max_size=8)), value))
        elif kind == "trace_junk":
            ops.append(("set", "traceparent", draw(st.binary(max_size=60))))
        elif kind == "trace_dup":
            ops.append(("dup_other", "traceparent"))
        else:
            ops.append(("omit", "ce_time"))
    return tuple(dict.fromkeys(ops))


def _touches_trace(ops: Iterable[tuple[Any, ...]]) -> bool:
    return any(op[1] == "traceparent" for op in ops)


@st.composite
def rule_specs(draw: st.DrawFn) -> Spec:
    body, card, own = draw(rule_breaks())
    return Spec(kind="rules", body=body, expect=FAILED, traceable=own, card=card)


@st.composite
def decode_specs(draw: st.DrawFn) -> Spec:
    raw, card, kind = draw(decode_failures())
    return Spec(kind=f"decode/{kind}", body=raw, expect=DEAD, card=card)


@st.composite
def poison_header_specs(draw: st.DrawFn) -> Spec:
    body, card, _ = draw(st.one_of(rule_breaks(), st.just((valid_body(), False, True))))
    ops = draw(poison_header_ops())
    # Even a perfectly valid body must not become a payment with a broken envelope.
    return Spec(kind="poison_headers", body=body, expect=DEAD, header_ops=ops, card=card)


@st.composite
def odd_header_specs(draw: st.DrawFn) -> Spec:
    body, card, own = draw(rule_breaks())
    ops = draw(harmless_header_ops())
    if _touches_trace(ops) and not own:
        # Keep one way to match its payment.failed, and a rule break (the booking id may
        # have been the only one).
        body["booking_id"] = BOOKING
        body["amount"] = 0
        own = True
    return Spec(
        kind="odd_headers", body=body, expect=FAILED, header_ops=ops, traceable=own, card=card
    )


FAMILIES = (rule_specs, decode_specs, poison_header_specs, odd_header_specs)


def _load_every_payment_module() -> None:
    """Hypothesis mixes literal constants of the loaded local modules into what it draws.

    Loading all of `payment` first makes the cases depend on the code only, not on which
    other tests ran (and imported what) before this one.
    """
    for module in pkgutil.walk_packages(payment.__path__, "payment."):
        if module.name.endswith(".__main__"):  # importing one runs its program
            continue
        with contextlib.suppress(ImportError):  # an optional extra that is not installed
            importlib.import_module(module.name)


def draw_specs(count: int) -> list[Spec]:
    """`count` cases, an equal share from each family, the same ones on every run."""
    _load_every_payment_module()
    drawn: list[Spec] = []
    for family in FAMILIES:

        @settings(
            max_examples=count // len(FAMILIES),
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(family())
        def collect(spec: Spec) -> None:
            drawn.append(spec)

        collect()
    return drawn


def fixed_specs() -> list[Spec]:
    """Sizes around the 64 KiB limit and far past it, and the other inbound topic."""

    def padded(*, amount: int = 1000, card: bool = False) -> dict[str, Any]:
        body = valid_body()
        body["amount"] = amount
        if card:
            body["payment_method"] = "4111 1111 1111 1111 123"
        body["padding"] = ""
        return body

    return [
        # Just under the limit, with a rule break: a failure (and not a dead letter).
        Spec(kind="size/64KiB", body=padded(amount=0), pad_to=MAX_VALUE_BYTES, expect=FAILED),
        Spec(kind="size/64KiB+1", body=padded(), pad_to=MAX_VALUE_BYTES + 1, expect=DEAD),
        Spec(kind="size/256KiB", body=padded(), pad_to=256 * 1024, expect=DEAD),
        Spec(kind="size/1MiB", body=padded(), pad_to=ONE_MIB, expect=DEAD, card=True),
        Spec(kind="size/1MiB+card", body=padded(card=True), pad_to=ONE_MIB, expect=DEAD),
        Spec(kind="size/4MiB", body=padded(), pad_to=4 * ONE_MIB, expect=DEAD),
        # NUL characters: valid JSON and valid UTF-8, but PostgreSQL text cannot hold them
        # (found by this test: each was retried five times, then parked as a handler
        # error). In the data a NUL is a rule break, in an attribute a CloudEvents
        # violation (poison). The NUL in payment_method would otherwise be a payment.
        Spec(
            kind="nul/booking",
            body={**valid_body(), "booking_id": "nul\x00booking"},
            expect=FAILED,
            traceable=False,
        ),
        Spec(
            kind="nul/saga",
            body={**valid_body(), "amount": 0, "saga_id": "saga\x00"},
            expect=FAILED,
        ),
        Spec(kind="nul/method", body={**valid_body(), "payment_method": "pm_\x00"}, expect=FAILED),
        Spec(
            kind="nul/ce_id",
            body={**valid_body(), "amount": 0},
            expect=DEAD,
            header_ops=(("set", "ce_id", b"id\x00nul"),),
        ),
        Spec(
            kind="nul/ce_source",
            body={**valid_body(), "amount": 0},
            expect=DEAD,
            header_ops=(("set", "ce_source", b"src\x00nul"),),
        ),
        # Keys: the service never reads them, but a dead letter keeps them.
        Spec(kind="key/2MiB+poison", body=b"not json", key=b"k" * (2 * ONE_MIB), expect=DEAD),
        Spec(
            kind="key/2MiB+rule",
            body={**valid_body(), "amount": 0},
            key=b"k" * (2 * ONE_MIB),
            expect=FAILED,
        ),
        Spec(kind="key/none+rule", body={**valid_body(), "amount": 0}, key=b"", expect=FAILED),
        Spec(kind="key/binary+poison", body=b"[]", key=b"\xff\x00\xfe", expect=DEAD),
        # Hostile records on the other inbound topic.
        Spec(kind="initiated/garbage", body=b"\x00\xff not json", expect=DEAD, topic="initiated"),
        Spec(
            kind="initiated/unknown_payment",
            body={
                "payment_id": "00000000-0000-4000-8000-00000000dead",
                "booking_id": BOOKING,
                "saga_id": None,
                "amount": 1000,
                "currency": "EUR",
                "customer_id": None,
                "initiated_at": "2030-01-01T00:00:00Z",
                "version": 1,
            },
            expect=NOTHING,
            topic="initiated",
        ),
    ]


def materialize(index: int, spec: Spec, run: str) -> Case:
    booking = f"h{index}-{run}"
    trace = uuid.uuid4().hex
    if isinstance(spec.body, dict):
        body = {k: (booking if v == BOOKING else v) for k, v in spec.body.items()}
        value: bytes | None = json.dumps(body).encode()
        if spec.pad_to is not None:
            body["padding"] = "p" * (spec.pad_to - len(value))
            value = json.dumps(body).encode()
            assert len(value) == spec.pad_to
    elif isinstance(spec.body, bytes):
        value = spec.body.replace(BOOKING.encode(), booking.encode())
    else:
        value = None
    ce_type = "payment.initiated" if spec.topic == "initiated" else REQUEST_TYPE
    headers: list[tuple[str, bytes | None]] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", f"hostile-{run}-{index}".encode()),
        ("ce_source", SOURCE.encode()),
        ("ce_type", ce_type.encode()),
        ("ce_time", b"2030-01-01T00:00:00.000Z"),
        ("content-type", b"application/json"),
        ("traceparent", f"00-{trace}-{uuid.uuid4().hex[:16]}-01".encode()),
    ]
    for op in spec.header_ops:
        headers = apply(op, headers)
    return Case(
        index=index,
        spec=spec,
        booking=booking,
        trace_id=trace,
        key=booking.encode() if spec.key is None else (spec.key or None),
        value=value,
        headers=headers,
    )


def apply(
    op: tuple[Any, ...], headers: list[tuple[str, bytes | None]]
) -> list[tuple[str, bytes | None]]:
    kind, name = op[0], op[1]
    current = next((v for k, v in headers if k == name), b"x")
    if kind == "omit":
        return [(k, v) for k, v in headers if k != name]
    if kind == "dup_same":
        return [*headers, (name, current)]
    if kind == "dup_other":
        return [*headers, (name, (current or b"") + b"-2")]
    if kind == "dup_upper":
        return [*headers, (name.upper(), current)]
    if kind == "upper":
        return [(k.upper() if k == name else k, v) for k, v in headers]
    if kind == "none":
        return [(k, None if k == name else v) for k, v in headers]
    if kind == "bad_utf8":
        return [(k, b"\xff\xfe" + (v or b"") if k == name else v) for k, v in headers]
    if kind == "empty":
        return [(k, b"" if k == name else v) for k, v in headers]
    if kind == "long":
        return [(k, b"a" * 1025 if k == name else v) for k, v in headers]
    if kind == "set":
        return [*[(k, v) for k, v in headers if k != name], (name, op[2])]
    if kind == "add":
        return [*headers, (name, op[2])]
    raise AssertionError(kind)


# -- scanning ----------------------------------------------------------------------------


# Random identifiers that can hold a 13-19 digit decimal run by chance (a W3C trace id is
# 32 hex digits: about 1 in 250 holds a Luhn-valid run), set aside by their context.
IDENTIFIERS = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"  # UUID
    r"|\b[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\b"  # traceparent
    r"|\b(?:trace_id|span_id)[\"']?\s*[=:]\s*[\"']?[0-9a-f]{16,32}\b"  # log fields
    r"|\b[0-9a-f]{64}\b"  # sha256 (migration checksums)
    r"|\bfake_[0-9a-f]{24}\b"  # the fake processor's provider reference
)


def card_in(text: str) -> bool:
    """A Luhn-valid 13-19 digit number in `text`, random identifiers set aside."""
    return looks_like_card_number(IDENTIFIERS.sub(" ", text))


def text_of(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


@dataclass
class Scan:
    places: int = 0
    card_hits: list[str] = field(default_factory=list)
    secret_hits: list[str] = field(default_factory=list)
    verbatim_dead_letters: int = 0
    masked_dead_letters: int = 0
    # Dead letters neither the original record nor said to be changed (masked, or a part
    # left out for its size): a dead letter that silently altered what was sent.
    altered_dead_letters: list[str] = field(default_factory=list)

    def look(self, where: str, text: str) -> None:
        self.places += 1
        if card_in(text):
            self.card_hits.append(where + _json_fields_with_card(text))
        for secret in (DB_PASSWORD, STRIPE_KEY):
            if secret in text:
                self.secret_hits.append(f"{where}: {secret[:6]}…")


def _json_fields_with_card(text: str) -> str:
    """For a report: which fields of a JSON object hold the card number (never the value)."""
    try:
        data = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    fields = [k for k, v in data.items() if card_in(text_of(v))]
    return f" (fields {', '.join(fields)})" if fields else ""


def scan_database(url: str, scan: Scan) -> None:
    with psycopg.connect(url) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        ]
        assert "payment_events" in tables and "payment_outbox" in tables
        for table in tables:
            cur = conn.execute(f'SELECT * FROM "{table}"')
            names = [d.name for d in cur.description or ()]
            for n, row in enumerate(cur):
                for name, value in zip(names, row, strict=True):
                    if value is not None:
                        scan.look(f"db {table}[{n}].{name}", text_of(value))


def scan_topics(log: EventLog, by_origin: dict[tuple[str, int, int], Case], scan: Scan) -> None:
    for r in log.records:
        where = f"topic {r.kind}[{r.partition}]@{r.offset}"
        scan.look(f"{where} key", text_of(r.key or b""))
        dlq = [(k, v) for k, v in r.headers if k.lower().startswith("dlq_")]
        original = [(k, v) for k, v in r.headers if not k.lower().startswith("dlq_")]
        for k, v in dlq:
            scan.look(f"{where} header {k}", f"{k}: {text_of(v or b'')}")
        if r.kind != "dead_letter":
            scan.look(f"{where} value", text_of(r.value or b""))
            for k, v in original:
                scan.look(f"{where} header {k}", f"{k}: {text_of(v or b'')}")
            continue
        # A dead letter: the original record, verbatim (contract 4.5) unless it held a card
        # number, masked then (contract 3); scanned for cards like everything else.
        origin = (
            str(r.header("dlq_original_topic")),
            int(str(r.header("dlq_original_partition"))),
            int(str(r.header("dlq_original_offset"))),
        )
        case = by_origin.get(origin)
        verbatim = (
            case is not None
            and r.value == case.value
            and original == list(case.headers)
            and r.key == case.key
        )
        masked = r.header("dlq_card_numbers_masked") is not None
        shortened = any(r.header(h) is not None for h in asyncapi.DLQ_DROPPED_HEADERS)
        scan.verbatim_dead_letters += verbatim
        scan.masked_dead_letters += masked
        if not (verbatim or masked or shortened):
            scan.altered_dead_letters.append(where)
        scan.look(f"{where} value", text_of(r.value or b""))
        for k, v in original:
            scan.look(f"{where} header {k}", f"{k}: {text_of(v or b'')}")


# -- the test ----------------------------------------------------------------------------


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}{port}"))


@pytest_asyncio.fixture
async def hostile_stack(
    kafka_bootstrap: str, make_database: Callable[..., str], e2e_log_dir: Path
) -> AsyncIterator[tuple[ServiceStack, str]]:
    """The service with DEBUG logs, a secret database password and an unused Stripe key.

    Yields the stack and the password to look for: the secret one if the server ignores
    passwords (trust authentication, as in CI), else whatever password the URL had.
    """
    plain = make_database(prefix="payment_hostile")
    url, secret = with_password(plain, DB_PASSWORD), DB_PASSWORD
    try:
        await asyncio.to_thread(lambda: psycopg.connect(url, connect_timeout=5).close())
    except psycopg.OperationalError:
        url, secret = plain, urlsplit(plain).password or DB_PASSWORD
    async with open_stack(
        bootstrap=kafka_bootstrap,
        database_url=url,
        log_dir=e2e_log_dir,
        topic_prefix="e2e-hostile",
        # Kafka refuses records over ~1 MiB unless the topic allows more; these do.
        inbound_max_message_bytes=9 * ONE_MIB,
        PAYMENT_LOG_LEVEL="DEBUG",
        PAYMENT_STRIPE_API_KEY=STRIPE_KEY,
    ) as stack:
        yield stack, secret


@contextlib.asynccontextmanager
async def big_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=broker_supports_idempotence(),
        max_request_size=8 * ONE_MIB,
        linger_ms=0,
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


def resolve(case: Case, log: EventLog) -> None:
    """What became of the case: exactly one failed, a dead letter (its copies counted once),
    nothing, or a mix."""
    assert case.sent is not None
    # Dead letters are at least once: a poison record redelivered after a rebalance (these
    # stacks run a 2 s session timeout) is parked again, under the same origin.
    dead = [r for r in log.dead_letters() if _origin(r) == _sent_at(case)][:1]
    sent_at = (case.sent.topic, case.sent.partition, case.sent.offset)
    # (A case sent to the initiated topic is itself among what the orchestrator reads.)
    traced = [r for r in log.records if trace_of(r) == case.trace_id]
    mine = traced if case.spec.traceable is False else traced + log.for_booking(case.booking)
    mine = list(
        {
            (r.topic, r.partition, r.offset): r
            for r in mine
            if r.kind != "dead_letter" and (r.topic, r.partition, r.offset) != sent_at
        }.values()
    )
    failed = [r for r in mine if r.kind == "failed"]
    others = [r for r in mine if r.kind != "failed"]
    if others:
        case.outcome = "PAYMENT"
        case.detail = ", ".join(sorted({r.kind for r in others}))
    elif len(dead) == 1 and not failed:
        case.outcome = DEAD
        case.detail = str(dead[0].reason)
    elif len(failed) == 1 and not dead:
        case.outcome = FAILED
        reason = failed[0].reason
        case.detail = str(failed[0].data.get("detail") if isinstance(failed[0].data, dict) else "")
        if reason != "invalid_request" or "payment_id" in (failed[0].data or {}):
            case.outcome = f"failed/{reason}"
    elif not dead and not failed:
        case.outcome = NOTHING
    else:
        case.outcome = f"{len(failed)} failed + {len(dead)} dead letters"


def _origin(record: Received) -> tuple[str | None, str | None, str | None]:
    return (
        record.header("dlq_original_topic"),
        record.header("dlq_original_partition"),
        record.header("dlq_original_offset"),
    )


def _sent_at(case: Case) -> tuple[str | None, str | None, str | None]:
    assert case.sent is not None
    return (case.sent.topic, str(case.sent.partition), str(case.sent.offset))


def trace_of(record: Received) -> str | None:
    parent = record.header("traceparent")
    parts = (parent or "").split("-")
    return parts[1] if len(parts) == 4 else None


async def send_case(producer: AIOKafkaProducer, stack: ServiceStack, case: Case) -> None:
    topic = stack.topics.initiated if case.spec.topic == "initiated" else stack.topics.request
    meta = await producer.send_and_wait(
        topic,
        value=case.value,
        key=case.key,
        headers=list(case.headers),  # type: ignore[arg-type]
    )
    case.sent = Sent(
        topic=topic,
        partition=meta.partition,
        offset=meta.offset,
        key=case.key,
        value=case.value,
        headers=(),
        booking_id=case.booking,
    )


def chunks(items: Sequence[Case], size: int) -> Iterable[Sequence[Case]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def test_hostile_input_never_becomes_a_payment_and_leaks_nothing(
    hostile_stack: tuple[ServiceStack, str],
) -> None:
    stack, db_secret = hostile_stack
    orch = stack.orch
    run = uuid.uuid4().hex[:6]
    specs_ = fixed_specs() + draw_specs(EXAMPLES)
    cases = [materialize(i, spec, run) for i, spec in enumerate(specs_)]
    controls: list[str] = []

    async with big_producer(stack.bootstrap) as producer:
        for batch in chunks(cases, BATCH):
            for case in batch:
                await send_case(producer, stack, case)
            # The consumer still works: a valid request sent after the batch completes.
            control = f"control-{len(controls)}-{run}"
            controls.append(control)
            await orch.request(control)
            outcome = await orch.wait_outcome(control, timeout_s=120)
            assert outcome.kind == "completed", outcome.describe()
            assert stack.service.running, stack.service.log_tail()

    def settled(log: EventLog) -> bool:
        for case in cases:
            resolve(case, log)
        return all(c.outcome == c.spec.expect for c in cases if c.spec.expect != NOTHING)

    await orch.settle(timeout_s=120)
    with contextlib.suppress(AssertionError):
        await orch.wait_for(settled, timeout_s=60, what="every case resolved")
    for case in cases:
        resolve(case, orch.events)
    wrong = [c for c in cases if c.outcome != c.spec.expect]
    summary = {
        kind: sum(c.spec.kind.split("/")[0] == kind for c in cases)
        for kind in sorted({c.spec.kind.split("/")[0] for c in cases})
    }
    outcomes = {
        o: sum(c.outcome == o for c in cases) for o in sorted({str(c.outcome) for c in cases})
    }
    digest = hashlib.sha256(repr(specs_).encode()).hexdigest()[:12]
    print(f"\nhostile input: {len(cases)} cases ({EXAMPLES} generated, digest {digest}) {summary}")
    print(f"hostile input: outcomes {outcomes}; controls completed: {len(controls)}")
    assert not wrong, "\n".join(
        f"{c.label()}: expected {c.spec.expect}, got {c.outcome} ({c.detail[:120]})"
        for c in wrong[:40]
    )

    # Large values: the broker took all of them (up to 4 MiB on the request topic); the
    # service's producer (aiokafka's default max_request_size, 1 MiB) cannot park a 1 MiB
    # value plus headers, so those dead letters keep everything but the value.
    for case in cases:
        if case.spec.kind == "key/2MiB+poison":
            [dead] = [r for r in orch.events.dead_letters() if _origin(r) == _sent_at(case)]
            assert dead.key is None and dead.value == case.value, case.label()
            assert dead.header("dlq_key_dropped") == str(2 * ONE_MIB)
        if case.spec.pad_to is None or case.spec.expect != DEAD:
            continue
        assert case.sent is not None
        [dead] = [r for r in orch.events.dead_letters() if _origin(r) == _sent_at(case)]
        if case.spec.pad_to < ONE_MIB:
            assert dead.value == case.value, case.label()
            assert dead.header("dlq_value_dropped") is None
        else:
            assert dead.value is None, case.label()
            assert dead.header("dlq_value_dropped") == str(case.spec.pad_to), case.label()
    largest = max(c.spec.pad_to or 0 for c in cases)
    print(f"hostile input: largest value the broker accepted: {largest} bytes")

    # Never a payment: the only payments are the control requests'.
    with psycopg.connect(stack.database_url) as conn:
        bookings = {row[0] for row in conn.execute("SELECT booking_id FROM payment_payments")}
        streams = conn.execute(
            "SELECT count(DISTINCT stream_id) FROM payment_events"
            " WHERE stream_id NOT IN (SELECT payment_id FROM payment_payments)"
        ).fetchone()
    assert bookings <= set(controls) | {
        b for b in bookings if b.startswith(("settle-", "sentinel-"))
    }
    assert streams == (0,)
    assert stack.service.running

    # The scan.
    scan = Scan()
    by_origin = {
        (c.sent.topic, c.sent.partition, c.sent.offset): c for c in cases if c.sent is not None
    }
    await asyncio.to_thread(scan_database, stack.database_url, scan)
    scan_topics(orch.events, by_origin, scan)
    log_text = stack.service.log_text()
    for n, line in enumerate(log_text.splitlines()):
        scan.look(f"log line {n + 1}", line)
    secret_in_log = db_secret in log_text or STRIPE_KEY in log_text
    print(
        f"hostile input: scanned {scan.places} places (database rows' columns, topic keys,"
        f" values and headers, {len(log_text.splitlines())} log lines):"
        f" {len(scan.card_hits)} card numbers, {len(scan.secret_hits)} secrets;"
        f" {scan.verbatim_dead_letters} dead letters verbatim,"
        f" {scan.masked_dead_letters} with card numbers masked"
    )
    assert not scan.card_hits, scan.card_hits[:20]
    assert scan.masked_dead_letters > 0  # poison carrying card numbers was parked, masked
    assert not scan.altered_dead_letters, scan.altered_dead_letters[:20]
    assert not scan.secret_hits, scan.secret_hits[:20]
    assert not secret_in_log
