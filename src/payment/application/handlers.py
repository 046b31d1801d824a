"""Command handlers: one async function per command, one transaction per handled message."""

from __future__ import annotations

import asyncio
import enum
import random
import uuid
from collections.abc import Sequence
from datetime import datetime

import msgspec

from payment.application import failpoints
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    ReconcilePayment,
    RequestPayment,
    TraceHeaders,
)
from payment.application.errors import (
    RETRYABLE_CONFLICTS,
    BookingAlreadyClaimed,
    PaymentConflict,
)
from payment.application.messages import (
    OutboundMessage,
    cancelled_message,
    initiated_message,
    outcome_message,
    rejection_message,
)
from payment.application.ports import Clock, UnitOfWork, UnitOfWorkFactory
from payment.application.retry import full_jitter
from payment.application.validation import Valid, validate_request, well_formed_booking_id
from payment.domain.errors import ChargeInProgress
from payment.domain.events import AnyPaymentEvent, AttemptResult
from payment.domain.money import DEFAULT_MAX_AMOUNT
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    Declined,
    GatewayErrorReplayed,
    OutcomeUnknown,
    PaymentProcessor,
    ProcessorUnavailable,
)

# Optimistic conflicts are retried with fresh state; this bounds a pathological storm.
MAX_CONFLICT_RETRIES = 10

REPLAYED_ERROR_DETAIL = (
    "the gateway replays a stored error for this payment's idempotency key: nothing can be"
    " charged under it until the key expires (Stripe: 24 h); see docs/operations.md"
)


class RequestResult(enum.StrEnum):
    ACCEPTED = "accepted"  # a new payment was initiated
    DUPLICATE = "duplicate"  # this message was handled before: nothing changed
    REJECTED = "rejected"  # broke a rule: payment.failed / invalid_request queued
    REPLAYED = "replayed"  # booking already paid or failed: its outcome queued again
    IN_FLIGHT = "in_flight"  # booking's payment still running: its outcome will follow
    CANCELLED = "cancelled"  # a refund closed the booking first: payment.failed / cancelled


class ExecuteResult(enum.StrEnum):
    DUPLICATE = "duplicate"
    NOT_FOUND = "not_found"
    ALREADY_TERMINAL = "already_terminal"
    COMPLETED = "completed"
    FAILED = "failed"
    UNKNOWN = "unknown"  # outcome unknown: left in flight for the reconciler
    BUSY = "busy"  # another executor or reconciler is charging it and records the outcome
    FLAGGED = "flagged"  # unknown past the review window: flagged for a human


class ExecutionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How hard to try the gateway before giving up on a payment for now."""

    # None: the processor bounds its own calls (the LimitedProcessor, whose timeout does
    # not count the wait for a slot under the gateway's limits).
    call_timeout_s: float | None = 10.0
    max_attempts: int = 4
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    review_after_s: float = 3600.0
    # How long the gateway honours an idempotency key (None: for good). A payment older
    # than this is looked up before it is charged: under an expired key a charge is a
    # new charge, whatever an earlier attempt whose answer was lost did.
    key_lifetime_s: float | None = None
    # How long a ChargeStarted keeps other callers from charging the payment: longer than
    # one charge_payment (its attempts, backoffs and the lookup), so that a live charger
    # is never overtaken; a dead one's payment is charged again once it has passed.
    charge_lease_s: float = 60.0
    # How far the gateway's lookup lags behind its charges (Stripe's search: about a
    # minute). A miss on a younger payment proves nothing: it counts as unknown.
    lookup_settle_s: float = 0.0


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    max_amount: int = DEFAULT_MAX_AMOUNT


async def request_payment(
    cmd: RequestPayment,
    uow_factory: UnitOfWorkFactory,
    clock: Clock,
    settings: Settings = Settings(),
) -> RequestResult:
    """Handle `saga.request_payment` (contract sections 3-4).

    Raises `PaymentConflict` for a re-request whose amount or currency differs from the
    booking's payment, or that breaks a rule of section 3: the caller dead-letters it.
    """
    checked = validate_request(cmd, max_amount=settings.max_amount)
    for _ in range(MAX_CONFLICT_RETRIES):
        try:
            async with uow_factory() as uow:
                if not await uow.inbox.mark(
                    cmd.inbound.source, cmd.inbound.message_id, clock.now()
                ):
                    return RequestResult.DUPLICATE
                failpoints.hit("after_inbox_insert")
                result = await _request_in(uow, cmd, checked, clock)
                await uow.commit()
                if result is RequestResult.ACCEPTED:
                    failpoints.hit("after_initiated_commit")
                return result
        except RETRYABLE_CONFLICTS:
            # Lost a race (for the booking, say): a fresh transaction sees the winner.
            continue
    raise RuntimeError("request_payment: too many conflicting writers for one booking")


async def _request_in(
    uow: UnitOfWork, cmd: RequestPayment, checked: Valid | str, clock: Clock
) -> RequestResult:
    now = clock.now()
    if isinstance(checked, str):
        await refuse_if_booking_has_payment(uow, cmd, checked)
        await uow.outbox.add([rejection_for(cmd, checked, now)])
        return RequestResult.REJECTED

    payment, events = initiate_for(cmd, checked, now)
    # Claim first: a new booking (the common case) then costs no lookup. The claim leaves
    # the transaction usable when the booking is taken, so the existing payment is read
    # in it; a claim refused only at commit retries the whole handling.
    try:
        await uow.payments.claim_booking(cmd.booking_id, payment.id, now)
    except BookingAlreadyClaimed:
        existing_id = await uow.payments.payment_for_booking(cmd.booking_id)
        if existing_id is None:
            if await uow.payments.booking_closed(cmd.booking_id):
                # A refund overtook this request and closed the booking (contract 4.8).
                message = cancelled_message(
                    booking_id=cmd.booking_id, saga_id=cmd.saga_id, at=now, trace=cmd.trace
                )
                await uow.outbox.add([message])
                return RequestResult.CANCELLED
            raise  # its claimer rolled back meanwhile: retry from the start
        return await _existing_payment(uow, cmd, checked, existing_id)
    await uow.events.append(payment.id, 0, events)
    await uow.outbox.add([initiated_message(payment, cmd.trace)])
    return RequestResult.ACCEPTED


async def refuse_if_booking_has_payment(uow: UnitOfWork, cmd: RequestPayment, broken: str) -> None:
    """Raise `PaymentConflict` if the booking of a request that breaks rule `broken`
    already has a payment (contract 4.3): the caller dead-letters the request, and the
    booking gets no `payment.failed` it did not earn."""
    if not well_formed_booking_id(cmd.booking_id):
        return  # no payment was ever made for a booking id that breaks the rules
    existing_id = await uow.payments.payment_for_booking(cmd.booking_id)
    if existing_id is not None:
        raise PaymentConflict(
            existing_id, f"re-request for a booking that has a payment breaks a rule: {broken}"
        )


async def _existing_payment(
    uow: UnitOfWork, cmd: RequestPayment, checked: Valid, existing_id: uuid.UUID
) -> RequestResult:
    """A valid request for a booking that already has a payment (contract 4.3)."""
    existing = Payment.replay(await uow.events.load(existing_id))
    if existing.money != checked.money:
        raise PaymentConflict(
            existing.id,
            "re-request differs in amount or currency from the booking's payment",
        )
    if existing.is_terminal:
        await uow.outbox.add([outcome_message(existing, cmd.trace)])
        return RequestResult.REPLAYED
    return RequestResult.IN_FLIGHT


async def execute_payment(
    cmd: ExecutePayment,
    uow_factory: UnitOfWorkFactory,
    processor: PaymentProcessor,
    clock: Clock,
    policy: ExecutionPolicy = ExecutionPolicy(),
) -> ExecuteResult:
    """Handle `payment.initiated`: charge once per idempotency key, record the outcome.

    No transaction is held open during the gateway call; the gateway's idempotency makes
    a second concurrent execution of the same payment harmless, and the optimistic lock
    lets exactly one of them record the outcome.
    """
    async with uow_factory() as uow:
        events = await uow.events.load(cmd.payment_id)
    if not events:
        await mark_handled(uow_factory, cmd.inbound, clock)
        return ExecuteResult.NOT_FOUND
    payment = Payment.replay(events)
    if payment.is_terminal:
        await mark_handled(uow_factory, cmd.inbound, clock)
        return ExecuteResult.ALREADY_TERMINAL
    started = await start_charge(payment, uow_factory, clock, policy)
    if isinstance(started, ExecuteResult):
        # Finished meanwhile, or another executor or reconciler is charging it: that
        # one records the outcome.
        await mark_handled(uow_factory, cmd.inbound, clock)
        return started
    payment, charger = started
    return await _charge_and_record(
        payment, charger, cmd.inbound, cmd.trace, uow_factory, processor, clock, policy
    )


async def reconcile_payment(
    cmd: ReconcilePayment,
    uow_factory: UnitOfWorkFactory,
    processor: PaymentProcessor,
    clock: Clock,
    policy: ExecutionPolicy = ExecutionPolicy(),
) -> ExecuteResult:
    """Resolve a payment left in flight: look it up at the gateway; if the gateway holds
    no charge for it, charge again (same key).

    Only the gateway's "no such charge" leads to a charge. A charge it reports as still
    in progress is waited for, and so is an answer it cannot give now (unreachable, no
    answer in time): nothing is charged or recorded meanwhile (once the gateway's
    idempotency window has passed, a new charge would take the money twice), and the
    payment goes to the back of the queue. A payment still unknown past
    `policy.review_after_s` is flagged for review, once; it is never failed blindly.
    """
    async with uow_factory() as uow:
        events = await uow.events.load(cmd.payment_id)
    if not events:
        return ExecuteResult.NOT_FOUND
    payment = Payment.replay(events)
    if payment.is_terminal:
        return ExecuteResult.ALREADY_TERMINAL
    known = await _lookup(_charge_request(payment), processor, policy, _age(payment, clock.now()))
    if isinstance(known, Approved | Declined):
        return await record_outcome(
            payment.id, None, cmd.trace, [("lookup", known)], known, uow_factory, processor, clock
        )
    started = (
        await start_charge(payment, uow_factory, clock, policy)
        if not isinstance(known, OutcomeUnknown)
        else ExecuteResult.UNKNOWN
    )
    if started is ExecuteResult.ALREADY_TERMINAL:
        return started
    result: ExecuteResult
    if isinstance(started, ExecuteResult):
        # The gateway cannot say now (or the charge is still in progress), or another
        # caller is charging: nothing to record, but to the back of the reconciler's
        # queue all the same (as an unknown attempt is), so that payments the gateway
        # cannot settle now do not starve others.
        async with uow_factory() as uow:
            await uow.payments.requeue(payment.id, clock.now())
            await uow.commit()
        result = started
    else:
        payment, charger = started
        result = await _charge_and_record(
            payment, charger, None, cmd.trace, uow_factory, processor, clock, policy
        )
    if result is ExecuteResult.UNKNOWN:
        assert payment.initiated_at is not None
        age = (clock.now() - payment.initiated_at).total_seconds()
        if age >= policy.review_after_s and not payment.flagged_for_review:
            return await _flag(payment.id, uow_factory, clock, age)
    return result


async def start_charge(
    payment: Payment, uow_factory: UnitOfWorkFactory, clock: Clock, policy: ExecutionPolicy
) -> tuple[Payment, uuid.UUID] | ExecuteResult:
    """Write ahead that a new charger is about to call the gateway (`ChargeStarted`).

    Returns the payment as it now is and the charger's id; or ALREADY_TERMINAL, or
    BUSY when another charger's lease runs (that one records the outcome). Committed
    before the call, so executors and reconcilers of every instance see it: see
    docs/adr/0004-charge-started.md.
    """
    charger = uuid.uuid4()
    for _ in range(MAX_CONFLICT_RETRIES):
        try:
            async with uow_factory() as uow:
                if payment.is_terminal:
                    return ExecuteResult.ALREADY_TERMINAL
                expected = payment.version
                try:
                    events = payment.start_charge(
                        charger=charger, at=clock.now(), lease_s=policy.charge_lease_s
                    )
                except ChargeInProgress:
                    return ExecuteResult.BUSY
                await uow.events.append(payment.id, expected, events)
                await uow.commit()
                return payment, charger
        except RETRYABLE_CONFLICTS:
            async with uow_factory() as uow:
                payment = Payment.replay(await uow.events.load(payment.id))
    raise RuntimeError("start_charge: too many conflicting writers for one payment")


# -- steps shared with the batch handlers (batches.py) ----------------------------------


def rejection_for(cmd: RequestPayment, detail: str, at: datetime) -> OutboundMessage:
    """`payment.failed` / `invalid_request` for a request refused with `detail` (no payment)."""
    return rejection_message(
        booking_id=cmd.booking_id, saga_id=cmd.saga_id, detail=detail, at=at, trace=cmd.trace
    )


def initiate_for(
    cmd: RequestPayment, checked: Valid, at: datetime
) -> tuple[Payment, list[AnyPaymentEvent]]:
    """A new payment for a valid request, and its events (not stored yet)."""
    return Payment.initiate(
        payment_id=uuid.uuid4(),
        booking_id=cmd.booking_id,
        money=checked.money,
        payment_method=checked.payment_method,
        saga_id=checked.saga_id,
        customer_id=checked.customer_id,
        at=at,
    )


def apply_outcome(
    payment: Payment,
    attempts: AttemptLog,
    final: ChargeOutcome | ProcessorUnavailable | OutcomeUnknown,
    processor_name: str,
    now: datetime,
    trace: TraceHeaders,
    charger: uuid.UUID | None = None,
) -> tuple[ExecuteResult, list[AnyPaymentEvent], PaymentStatus, OutboundMessage | None]:
    """Apply `charger`'s attempts and `final` outcome to `payment` (not stored yet).

    Returns the result, the new events, the payment's status for the index and its
    outcome message (None while the outcome is still unknown).
    """
    new: list[AnyPaymentEvent] = []
    for kind, item in attempts:
        new += payment.record_attempt(
            processor=processor_name,
            result=_result_of(item),
            detail=_detail_of(kind, item),
            at=now,
        )
    result = _decide(payment, final, processor_name, now, new, charger)
    replayed = isinstance(final, GatewayErrorReplayed)
    if replayed and not payment.is_terminal and not payment.flagged_for_review:
        # Stuck for a day otherwise (until the key expires): a human is told at once.
        new += payment.flag_for_review(detail=REPLAYED_ERROR_DETAIL, at=now)
        result = ExecuteResult.FLAGGED
    if payment.is_terminal:
        # The trace of the message that caused this outcome (the request's, carried on
        # payment.initiated): contract section 2.
        return result, new, _status(payment), outcome_message(payment, trace)
    # Still unknown: back to the end of the reconciler's queue, so a few unresolvable
    # payments cannot starve newer ones.
    return result, new, PaymentStatus.INITIATED, None


# -- internals (charge_payment, record_outcome and mark_handled also serve batches.py) --

AttemptLog = list[tuple[str, ChargeOutcome | ProcessorUnavailable | OutcomeUnknown]]


def _charge_request(payment: Payment) -> ChargeRequest:
    assert payment.money is not None and payment.idempotency_key is not None
    return ChargeRequest(
        payment_id=payment.id,
        booking_id=payment.booking_id,
        money=payment.money,
        payment_method=payment.payment_method,
        idempotency_key=payment.idempotency_key,
        customer_id=payment.customer_id,
    )


async def _charge_and_record(
    payment: Payment,
    charger: uuid.UUID,
    inbound: InboundRef | None,
    trace: TraceHeaders,
    uow_factory: UnitOfWorkFactory,
    processor: PaymentProcessor,
    clock: Clock,
    policy: ExecutionPolicy,
) -> ExecuteResult:
    attempts, outcome = await charge_payment(payment, processor, policy, clock.now(), charger)
    return await record_outcome(
        payment.id, inbound, trace, attempts, outcome, uow_factory, processor, clock, payment,
        charger=charger,
    )  # fmt: skip


async def charge_payment(
    payment: Payment,
    processor: PaymentProcessor,
    policy: ExecutionPolicy,
    now: datetime,
    charger: uuid.UUID | None = None,
) -> tuple[AttemptLog, ChargeOutcome | ProcessorUnavailable | OutcomeUnknown]:
    """Call the gateway until it answers (or `policy` gives up): the attempts and the last.

    A payment initiated longer ago than the gateway keeps idempotency keys is looked up
    first (`_lookup_before_late_charge`). `charger`: the caller's ChargeStarted.
    """
    request = _charge_request(payment)
    age = _age(payment, now)
    if _key_may_have_expired(payment, policy, now):
        settled = await _lookup_before_late_charge(request, processor, policy, age)
        if settled is not None:
            return settled
    attempts: AttemptLog = []
    outcome: ChargeOutcome | ProcessorUnavailable | OutcomeUnknown
    for attempt in range(1, policy.max_attempts + 1):
        failpoints.hit("before_charge")
        try:
            # asyncio.timeout, not wait_for: no extra task per gateway call.
            async with asyncio.timeout(policy.call_timeout_s):
                outcome = await processor.charge(request)
        except TimeoutError:
            # The request may have reached the gateway: never treat it as a failure.
            outcome = OutcomeUnknown("no answer within the call timeout")
        except (ProcessorUnavailable, OutcomeUnknown) as exc:
            outcome = exc
        failpoints.hit("after_charge")
        attempts.append(("charge", outcome))
        if not isinstance(outcome, ProcessorUnavailable) or attempt == policy.max_attempts:
            break
        await asyncio.sleep(_backoff(attempt, policy))
    if isinstance(outcome, ProcessorUnavailable) and not payment.only_charger(charger):
        outcome = await _confirm_no_charge(request, processor, policy, attempts, outcome, age)
    return attempts, outcome


def _age(payment: Payment, now: datetime) -> float:
    assert payment.initiated_at is not None
    return (now - payment.initiated_at).total_seconds()


def _key_may_have_expired(payment: Payment, policy: ExecutionPolicy, now: datetime) -> bool:
    if policy.key_lifetime_s is None or payment.initiated_at is None:
        return False
    return (now - payment.initiated_at).total_seconds() >= policy.key_lifetime_s


async def _lookup_before_late_charge(
    request: ChargeRequest, processor: PaymentProcessor, policy: ExecutionPolicy, age_s: float
) -> tuple[AttemptLog, ChargeOutcome | OutcomeUnknown] | None:
    """The gateway may have forgotten this payment's idempotency key, so a charge now
    would not find an earlier one (made before a crash, its answer lost): ask first.

    Returns the charge the gateway holds, or OutcomeUnknown (nothing charged, the payment
    stays in flight) if it cannot say; None when it holds no charge: charging is safe.
    """
    found = await _lookup(request, processor, policy, age_s)
    if isinstance(found, OutcomeUnknown):
        return [], OutcomeUnknown(f"the idempotency key may have expired and {found}: not charged")
    if found is not None:
        return [("lookup", found)], found
    return None


async def _confirm_no_charge(
    request: ChargeRequest,
    processor: PaymentProcessor,
    policy: ExecutionPolicy,
    attempts: AttemptLog,
    unavailable: ProcessorUnavailable,
    age_s: float,
) -> ChargeOutcome | ProcessorUnavailable | OutcomeUnknown:
    """Before failing as unavailable, ask the gateway whether it holds a charge anyway.

    Our own refused calls charged nothing, but an earlier call whose answer was never
    recorded (a crash after the charge in a version without ChargeStarted, say) may
    have: only the gateway's "no such charge" makes `processor_unavailable` safe. If it
    cannot be asked either, or its answer may lag (`lookup_settle_s`), the payment stays
    in flight for the reconciler. (Where the stream proves the caller the only charger,
    `charge_payment` does not ask: see `Payment.only_charger`.)
    """
    found = await _lookup(request, processor, policy, age_s)
    if isinstance(found, OutcomeUnknown):
        return found
    if found is not None:
        attempts.append(("lookup", found))
        return found
    return unavailable


async def _lookup(
    request: ChargeRequest, processor: PaymentProcessor, policy: ExecutionPolicy, age_s: float
) -> ChargeOutcome | OutcomeUnknown | None:
    """What the gateway holds for this payment (`age_s` old): its charge, None for "no
    charge", or OutcomeUnknown when it cannot say now (unreachable, no answer in time, a
    charge still in progress, or a miss younger than the lookup's lag) — then an earlier
    charge cannot be ruled out."""
    try:
        async with asyncio.timeout(policy.call_timeout_s):
            found = await processor.lookup(request)
    except (ProcessorUnavailable, OutcomeUnknown, TimeoutError) as exc:
        return OutcomeUnknown(
            f"the gateway cannot rule out an unrecorded earlier charge now ({type(exc).__name__})"
        )
    if found is None and age_s < policy.lookup_settle_s:
        return OutcomeUnknown(
            f"no charge found, but the gateway's lookup may lag {policy.lookup_settle_s:g}s"
        )
    return found


def _backoff(attempt: int, policy: ExecutionPolicy) -> float:
    # Full jitter: spreads retries of many payments hitting one outage.
    return full_jitter(
        attempt, initial=policy.backoff_initial_s, maximum=policy.backoff_max_s, rng=random.random
    )


async def record_outcome(
    payment_id: uuid.UUID,
    inbound: InboundRef | None,
    trace: TraceHeaders,
    attempts: AttemptLog,
    final: ChargeOutcome | ProcessorUnavailable | OutcomeUnknown,
    uow_factory: UnitOfWorkFactory,
    processor: PaymentProcessor,
    clock: Clock,
    known: Payment | None = None,
    *,
    charger: uuid.UUID | None = None,
) -> ExecuteResult:
    """Record `charger`'s attempts and outcome; `known`: the payment as loaded before it.

    The first try appends after `known` without loading the stream again: the optimistic
    lock on its version still refuses the append if anyone wrote meanwhile, and the retry
    then reads the stream afresh.
    """
    for _ in range(MAX_CONFLICT_RETRIES):
        try:
            async with uow_factory() as uow:
                now = clock.now()
                # A redelivery handled before still records what its calls gave: a known
                # outcome is the gateway's answer under the payment's one key (the payment
                # would wait for the reconciler otherwise), and its attempts end its
                # ChargeStarted's lease.
                duplicate = inbound is not None and not await uow.inbox.mark(
                    inbound.source, inbound.message_id, now
                )
                if known is not None:
                    # Used once: its state changes below, and a retry must read afresh.
                    payment, known = known, None
                else:
                    payment = Payment.replay(await uow.events.load(payment_id))
                if payment.is_terminal:
                    # Another execution recorded the outcome first (same idempotency key,
                    # so the same charge): keep only the inbox mark.
                    await uow.commit()
                    return ExecuteResult.ALREADY_TERMINAL
                expected = payment.version
                result, new, status, message = apply_outcome(
                    payment, attempts, final, processor.name, now, trace, charger
                )
                await uow.events.append(payment_id, expected, new)
                await uow.payments.set_status(payment_id, status, now)
                if message is not None:
                    await uow.outbox.add([message])
                terminal = payment.is_terminal
                if terminal:
                    failpoints.hit("before_terminal_commit")
                await uow.commit()
                if terminal:
                    failpoints.hit("after_terminal_commit")
                return ExecuteResult.DUPLICATE if duplicate and not terminal else result
        except RETRYABLE_CONFLICTS:
            continue
    raise RuntimeError("execute_payment: too many conflicting writers for one payment")


def _decide(
    payment: Payment,
    final: ChargeOutcome | ProcessorUnavailable | OutcomeUnknown,
    processor_name: str,
    now: datetime,
    new: list[AnyPaymentEvent],
    charger: uuid.UUID | None,
) -> ExecuteResult:
    match final:
        case Approved():
            new += payment.complete(
                processor=processor_name, provider_reference=final.provider_reference, at=now
            )
            return ExecuteResult.COMPLETED
        case Declined():
            new += payment.fail(
                reason="declined", detail=_decline_detail(final), at=now, decline_code=final.code
            )
            return ExecuteResult.FAILED
        case ProcessorUnavailable() if not payment.may_fail_unavailable(charger):
            # An earlier attempt's outcome is unknown, or another caller started a charge
            # that may still reach the gateway: "unavailable" now says nothing about
            # those, so the payment stays in flight for the reconciler.
            return ExecuteResult.UNKNOWN
        case ProcessorUnavailable():
            new += payment.fail(
                reason="processor_unavailable",
                detail="the payment processor could not be reached; no charge was made",
                at=now,
                charger=charger,
            )
            return ExecuteResult.FAILED
        case _:
            return ExecuteResult.UNKNOWN


def _status(payment: Payment) -> PaymentStatus:
    assert payment.status is not None
    return payment.status


def _result_of(item: ChargeOutcome | ProcessorUnavailable | OutcomeUnknown) -> AttemptResult:
    match item:
        case Approved():
            return "approved"
        case Declined():
            return "declined"
        case ProcessorUnavailable():
            return "unavailable"
        case _:
            return "unknown"


def _detail_of(kind: str, item: ChargeOutcome | ProcessorUnavailable | OutcomeUnknown) -> str:
    match item:
        case Approved():
            return f"{kind}: approved, reference {item.provider_reference}"
        case Declined():
            return f"{kind}: declined ({item.code})"
        case _:
            return f"{kind}: {type(item).__name__}: {item}"


def _decline_detail(declined: Declined) -> str:
    return f"payment declined by the processor ({declined.code})"


async def mark_handled(uow_factory: UnitOfWorkFactory, inbound: InboundRef, clock: Clock) -> None:
    """Mark a message handled that changes nothing else (its own transaction)."""
    async with uow_factory() as uow:
        if await uow.inbox.mark(inbound.source, inbound.message_id, clock.now()):
            await uow.commit()


async def _flag(
    payment_id: uuid.UUID, uow_factory: UnitOfWorkFactory, clock: Clock, age: float
) -> ExecuteResult:
    for _ in range(MAX_CONFLICT_RETRIES):
        try:
            async with uow_factory() as uow:
                payment = Payment.replay(await uow.events.load(payment_id))
                if payment.is_terminal or payment.flagged_for_review:
                    return ExecuteResult.ALREADY_TERMINAL
                expected = payment.version
                now = clock.now()
                events = payment.flag_for_review(
                    detail=f"outcome unknown for {age:.0f}s: needs manual review", at=now
                )
                await uow.events.append(payment_id, expected, events)
                await uow.payments.set_status(payment_id, PaymentStatus.INITIATED, now)
                await uow.commit()
                return ExecuteResult.FLAGGED
        except RETRYABLE_CONFLICTS:
            continue
    raise RuntimeError("flag_for_review: too many conflicting writers")


__all__: Sequence[str] = [
    "ExecuteResult",
    "ExecutionPolicy",
    "RequestResult",
    "Settings",
    "execute_payment",
    "reconcile_payment",
    "request_payment",
]
