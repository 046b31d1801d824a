"""Step definitions of the Gherkin scenarios, written against the `PaymentsDriver` seam only."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from pytest_bdd import given, parsers, then, when

from payment.adapters.processors.fake import DECLINE_CODES
from payment.domain.money import CURRENCY_EXPONENTS
from support.localstripe import LocalStripe

from .driver import MemoryDriver, PaymentsDriver, ProcessorSetup, Published
from .real_driver import RealProcessor, RealStackDriver

# Which drivers run the scenarios, by name. Every scenario runs once per selected driver
# (test ids `[memory]`, `[real-fake]`, `[real-sandbox]`). `--stack` selects them: `memory`
# (the in-memory adapters, milliseconds), `real` (PostgreSQL, the broker and the real
# `payment-service run`, once with the fake processor and once with the sandbox) or
# `both`, the default, so that plain `pytest` (CI) runs both; the real-stack ids are
# marked `slow` and `realstack`, so `-m 'not slow'` leaves the in-memory run alone.
# A factory gets the fixture request, so it can pull in fixtures.
DRIVERS: dict[str, Callable[[pytest.FixtureRequest], PaymentsDriver]] = {
    "memory": lambda request: MemoryDriver(),
    "real-fake": lambda request: _real_driver(request, "fake"),
    "real-sandbox": lambda request: _real_driver(request, "sandbox"),
}
STACKS = {
    "memory": ("memory",),
    "real": ("real-fake", "real-sandbox"),
    "both": ("memory", "real-fake", "real-sandbox"),
}
REAL_STACK_MARKS = (pytest.mark.slow, pytest.mark.realstack)

BOOKING = r'"(?P<booking>[^"]*)"'
MONEY = r"(?P<amount>\d+(?:\.\d+)?) (?P<currency>[A-Z]{3})"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # pytest-bdd requests step fixtures while a scenario runs, so `driver` is not in the
    # static fixture closure: the autouse `stack` fixture carries the parameter instead.
    if "stack" not in metafunc.fixturenames:
        return
    chosen = metafunc.config.getoption("--stack", default="both")
    if chosen not in STACKS:
        raise pytest.UsageError(f"--stack {chosen}: one of {sorted(STACKS)}")
    metafunc.parametrize(
        "stack",
        [
            pytest.param(name, id=name, marks=() if name == "memory" else REAL_STACK_MARKS)
            for name in STACKS[chosen]
        ],
        indirect=True,
    )


@pytest.fixture(autouse=True)
def stack(request: pytest.FixtureRequest) -> str:
    """The name of the driver this scenario runs on (a key of DRIVERS)."""
    return str(getattr(request, "param", "memory"))


@pytest.fixture
def driver(request: pytest.FixtureRequest, stack: str) -> Iterator[PaymentsDriver]:
    made = DRIVERS[stack](request)
    yield made
    made.close()


@pytest.fixture(scope="session")
def scenario_localstripe() -> Iterator[LocalStripe]:
    """The sandbox scenarios' own localstripe: other suites' charges stay out of its ledger
    (and out of the adapter's look-ups, whose cost grows with it)."""
    with LocalStripe() as server:
        yield server


@pytest.fixture(scope="session")
def scenario_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the real-stack scenarios' service processes write their logs."""
    return tmp_path_factory.mktemp("bdd-logs")


def _real_driver(request: pytest.FixtureRequest, processor: RealProcessor) -> PaymentsDriver:
    return RealStackDriver(
        processor,
        bootstrap=request.getfixturevalue("kafka_bootstrap"),
        make_database=request.getfixturevalue("make_database"),
        log_dir=request.getfixturevalue("scenario_log_dir"),
        localstripe=(
            request.getfixturevalue("scenario_localstripe") if processor == "sandbox" else None
        ),
    )


@dataclass
class Story:
    """What a scenario remembers between its steps."""

    setup: ProcessorSetup = field(default_factory=ProcessorSetup)
    last_message_id: str = ""
    last_booking: str = ""
    bookings: list[str] = field(default_factory=list)
    amount: int = 0
    outcomes: dict[str, Published | None] = field(default_factory=dict)
    published_before: int = 0
    told: Published | None = None


@pytest.fixture
def story() -> Story:
    return Story()


def minor_units(amount: str, currency: str) -> int:
    """`125.00 EUR` -> 12500: the amount in the currency's minor unit."""
    minor = Decimal(amount).scaleb(CURRENCY_EXPONENTS[currency])
    assert minor == minor.to_integral_value(), f"{amount} {currency} is not a whole minor unit"
    return int(minor)


def _request(
    driver: PaymentsDriver, story: Story, booking: str, amount: int, currency: str, method: str
) -> None:
    story.last_message_id = driver.request(
        booking, amount=amount, currency=currency, payment_method=method, saga_id=f"saga-{booking}"
    )
    story.last_booking = booking


def _outcome_ids(driver: PaymentsDriver, booking: str) -> set[str]:
    return {m.event_id for m in driver.published(booking) if m.is_outcome}


def _bulk_request(driver: PaymentsDriver, bookings: list[str], amount: int) -> None:
    for booking in bookings:
        driver.request(booking, amount=amount, currency="EUR", payment_method="tok_visa")
    driver.deliver_initiated()


# -- the processor ------------------------------------------------------------------------------


@given(parsers.re(r"the payment processor (?P<behaviour>approves|declines) every charge"))
def processor_always(driver: PaymentsDriver, story: Story, behaviour: str) -> None:
    story.setup = ProcessorSetup(mode="success" if behaviour == "approves" else "fail")
    driver.start(story.setup)


@given(
    parsers.re(
        r"the payment processor decides at random with seed (?P<seed>\d+) "
        r"and success rate (?P<rate>[0-9.]+)"
    )
)
def processor_at_random(driver: PaymentsDriver, story: Story, seed: str, rate: str) -> None:
    story.setup = ProcessorSetup(mode="random", success_rate=float(rate), seed=int(seed))
    driver.start(story.setup)


@given("the processor's answer to the next charge will be lost")
def answer_lost(driver: PaymentsDriver) -> None:
    driver.lose_next_response()


@when("the service starts afresh with the same seed")
def start_afresh(driver: PaymentsDriver, story: Story) -> None:
    driver.start(story.setup)


# -- requests -----------------------------------------------------------------------------------


@given(parsers.re(rf"the saga has requested a payment of {MONEY} for booking {BOOKING}"))
@when(parsers.re(rf"the saga requests a payment of {MONEY} for booking {BOOKING}"))
def request_payment(
    driver: PaymentsDriver, story: Story, amount: str, currency: str, booking: str
) -> None:
    _request(driver, story, booking, minor_units(amount, currency), currency, "tok_visa")
    driver.deliver_initiated()


@when(
    parsers.re(
        rf"the saga requests a payment of {MONEY} for booking {BOOKING} "
        r'paid with card number "(?P<card>[^"]*)"'
    )
)
def request_with_card(
    driver: PaymentsDriver, story: Story, amount: str, currency: str, booking: str, card: str
) -> None:
    _request(driver, story, booking, minor_units(amount, currency), currency, card)
    driver.deliver_initiated()


@when(
    parsers.re(
        r'the saga requests (?P<amount>-?\d+) minor units of "(?P<currency>[^"]*)" '
        rf'for booking {BOOKING} paid with "(?P<method>[^"]*)"'
    )
)
def request_raw(
    driver: PaymentsDriver, story: Story, amount: str, currency: str, booking: str, method: str
) -> None:
    _request(driver, story, booking, int(amount), currency, method)
    driver.deliver_initiated()


@when(parsers.re(rf"the saga asks again for {MONEY} for booking {BOOKING} in a new request"))
def ask_again(
    driver: PaymentsDriver, story: Story, amount: str, currency: str, booking: str
) -> None:
    story.published_before = len(driver.published(booking))
    _request(driver, story, booking, minor_units(amount, currency), currency, "tok_visa")
    driver.deliver_initiated()


@when(
    parsers.re(
        rf"the saga sends two requests for {MONEY} for booking {BOOKING} in quick succession"
    )
)
def two_requests(
    driver: PaymentsDriver, story: Story, amount: str, currency: str, booking: str
) -> None:
    money = minor_units(amount, currency)
    _request(driver, story, booking, money, currency, "tok_visa")
    _request(driver, story, booking, money, currency, "tok_visa")
    driver.deliver_initiated()


@when("the same request message is delivered again")
def redeliver(driver: PaymentsDriver, story: Story) -> None:
    story.published_before = len(driver.published(story.last_booking))
    driver.redeliver(story.last_message_id)
    driver.deliver_initiated()


@given(parsers.re(rf"the saga has requested payments of {MONEY} for (?P<count>\d+) new bookings"))
@when(parsers.re(rf"the saga requests payments of {MONEY} for (?P<count>\d+) new bookings"))
def request_many(
    driver: PaymentsDriver, story: Story, amount: str, currency: str, count: str
) -> None:
    assert currency == "EUR", "bulk requests are in EUR"
    story.bookings = [f"BK-R{i:05d}" for i in range(int(count))]
    story.amount = minor_units(amount, currency)
    _bulk_request(driver, story.bookings, story.amount)
    story.outcomes = {b: driver.outcome_for(b) for b in story.bookings}


@when("the saga requests the same bookings again, in reverse order")
def request_again_reversed(driver: PaymentsDriver, story: Story) -> None:
    _bulk_request(driver, story.bookings[::-1], story.amount)


@when("the service reconciles the payments still in progress")
def reconcile(driver: PaymentsDriver) -> None:
    driver.reconcile()


# -- what the saga is told ---------------------------------------------------------------------


OUTCOMES = {
    "completed": ("payment.completed", None),
    "failed": ("payment.failed", None),
    "failed because it was declined": ("payment.failed", "declined"),
    "failed because the request was invalid": ("payment.failed", "invalid_request"),
}
OUTCOME = "(?P<outcome>" + "|".join(sorted(OUTCOMES, key=len, reverse=True)) + ")"


@given(parsers.re(rf"the saga was told the payment for booking {BOOKING} {OUTCOME}"))
@then(parsers.re(rf"the saga is told the payment for booking {BOOKING} {OUTCOME}"))
def told(driver: PaymentsDriver, story: Story, booking: str, outcome: str) -> None:
    message_type, reason = OUTCOMES[outcome]
    told = driver.outcome_for(booking)

    assert told is not None, f"booking {booking} was told nothing"
    assert told.type == message_type, told
    if reason is not None:
        assert told.data["reason"] == reason, told
    assert told.data["booking_id"] == booking
    story.told = told


@then(parsers.re(rf"the completed payment is for {MONEY}"))
def completed_for(story: Story, amount: str, currency: str) -> None:
    assert story.told is not None and story.told.type == "payment.completed"
    assert story.told.data["amount"] == minor_units(amount, currency)
    assert story.told.data["currency"] == currency


@then("the failure explains which decline the processor gave")
def decline_explained(story: Story) -> None:
    assert story.told is not None
    assert any(code in story.told.data["detail"] for code, _ in DECLINE_CODES), story.told


@then(parsers.re(rf"the saga has not been told an outcome for booking {BOOKING} yet"))
def no_outcome_yet(driver: PaymentsDriver, booking: str) -> None:
    assert driver.outcome_for(booking) is None
    assert [m.type for m in driver.published(booking)] == ["payment.initiated"]


@then("the saga is told the same outcome again, with the same event id and content")
def same_outcome_again(driver: PaymentsDriver, story: Story) -> None:
    published = driver.published(story.last_booking)
    new = published[story.published_before :]

    assert story.told is not None
    assert [(m.type, m.event_id, m.data) for m in new] == [
        (story.told.type, story.told.event_id, story.told.data)
    ]


@then(parsers.re(rf"nothing more is published for booking {BOOKING}"))
def nothing_more(driver: PaymentsDriver, story: Story, booking: str) -> None:
    assert len(driver.published(booking)) == story.published_before


@then(parsers.re(rf"booking {BOOKING} was started once and told one outcome"))
def started_once_one_outcome(driver: PaymentsDriver, booking: str) -> None:
    published = driver.published(booking)

    assert [m.type for m in published].count("payment.initiated") == 1
    # A re-publication of the same outcome keeps its event id: still one outcome.
    assert len(_outcome_ids(driver, booking)) == 1


@then(parsers.re(rf"no payment was started for booking {BOOKING}"))
def no_payment_started(driver: PaymentsDriver, booking: str) -> None:
    published = driver.published(booking)

    assert "payment.initiated" not in [m.type for m in published]
    assert all("payment_id" not in m.data for m in published)


@then(parsers.re(rf"booking {BOOKING} was charged exactly once"))
def charged_once(driver: PaymentsDriver, booking: str) -> None:
    assert driver.charges_for(booking) == 1


@then(parsers.re(rf"booking {BOOKING} was never charged"))
def never_charged(driver: PaymentsDriver, booking: str) -> None:
    assert driver.charges_for(booking) == 0


@then(
    parsers.re(rf'nothing published for booking {BOOKING} contains the card number "(?P<card>.+)"')
)
def card_never_repeated(driver: PaymentsDriver, booking: str, card: str) -> None:
    published = json.dumps([m.data for m in driver.published(booking)])

    assert published != "[]"
    for form in (card, card.replace(" ", ""), card.replace(" ", "-")):
        assert form not in published


@then("that request is set aside as a dead letter")
def dead_lettered(driver: PaymentsDriver, story: Story) -> None:
    assert driver.dead_lettered(story.last_message_id)


@then("every one of those bookings is told exactly one outcome")
def one_outcome_each(driver: PaymentsDriver, story: Story) -> None:
    missing = [b for b in story.bookings if len(_outcome_ids(driver, b)) != 1]

    assert not missing, f"{len(missing)} bookings without exactly one outcome, e.g. {missing[:3]}"


@then(
    parsers.re(
        r"the share of completed payments is within (?P<tolerance>[0-9.]+) of (?P<rate>[0-9.]+)"
    )
)
def share_completed(story: Story, tolerance: str, rate: str) -> None:
    completed = sum(
        o is not None and o.type == "payment.completed" for o in story.outcomes.values()
    )
    share = completed / len(story.bookings)

    assert abs(share - float(rate)) <= float(tolerance), f"{share:.3f} completed"


@then("every booking ends exactly as it did the first time")
def same_ends(driver: PaymentsDriver, story: Story) -> None:
    def end(outcome: Published | None) -> tuple[str, str | None, str | None]:
        assert outcome is not None
        return outcome.type, outcome.data.get("reason"), outcome.data.get("detail")

    first = {b: end(o) for b, o in story.outcomes.items()}
    second = {b: end(driver.outcome_for(b)) for b in story.bookings}

    assert second == first


@then("some of those payments completed and some failed")
def both_outcomes(story: Story) -> None:
    types = {o.type for o in story.outcomes.values() if o is not None}

    assert types == {"payment.completed", "payment.failed"}


# -- refunds ------------------------------------------------------------------------------------


@given(
    parsers.re(
        rf"the saga has asked for a refund of (?:{MONEY}|what is left) for booking {BOOKING}"
    )
)
@when(parsers.re(rf"the saga asks for a refund of (?:{MONEY}|what is left) for booking {BOOKING}"))
def ask_refund(
    driver: PaymentsDriver, story: Story, booking: str, amount: str | None, currency: str | None
) -> None:
    minor = None if amount is None or currency is None else minor_units(amount, currency)
    story.last_message_id = driver.refund(booking, amount=minor, saga_id=f"saga-{booking}")
    story.last_booking = booking


@then(
    parsers.re(
        rf"the saga is told {MONEY} of booking {BOOKING} was refunded, "
        r"(?P<total>\d+(?:\.\d+)?) (?P<total_currency>[A-Z]{3}) in all"
    )
)
def told_refunded(
    driver: PaymentsDriver,
    booking: str,
    amount: str,
    currency: str,
    total: str,
    total_currency: str,
) -> None:
    refunded = [m.data for m in driver.published(booking) if m.type == "payment.refunded"]
    wanted = (minor_units(amount, currency), minor_units(total, total_currency), currency)
    assert wanted in [(d["amount"], d["refunded_total"], d["currency"]) for d in refunded], refunded
    assert all(d["saga_id"] == f"saga-{booking}" for d in refunded)


@then(
    parsers.re(
        rf"the saga is told the refund for booking {BOOKING} failed as "
        r"(?P<why>an over-refund|not charged)"
    )
)
def told_refund_failed(driver: PaymentsDriver, booking: str, why: str) -> None:
    failed = [m for m in driver.published(booking) if m.type == "payment.refund_failed"]
    assert failed, driver.published(booking)
    reason = {"an over-refund": "over_refund", "not charged": "not_charged"}[why]
    assert failed[-1].data["reason"] == reason
    assert "refund_id" not in failed[-1].data  # refused: no refund was created


@then(parsers.re(rf"the gateway refunded {MONEY} for booking {BOOKING}"))
def gateway_refunded(driver: PaymentsDriver, amount: str, currency: str, booking: str) -> None:
    assert driver.refunded_at_gateway(booking) == minor_units(amount, currency)
