"""StripeProcessor over real HTTP: localstripe, a cutting proxy, and canned Stripe answers."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from payment.adapters.memory import MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.processors.stripe import StripeProcessor
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    ReconcilePayment,
    RequestPayment,
)
from payment.application.handlers import (
    ExecuteResult,
    ExecutionPolicy,
    RequestResult,
    execute_payment,
    reconcile_payment,
    request_payment,
)
from payment.domain.events import PaymentCompleted
from payment.domain.processor import (
    Approved,
    Declined,
    OutcomeUnknown,
    ProcessorError,
    ProcessorUnavailable,
)
from support.localstripe import (
    API_KEY,
    LocalStripe,
    charge_request,
    localstripe,
    own_localstripe,
    proxied_processor,
    sandbox_processor,
    stripe_processor,
    stripe_proxy,
)
from support.proxy import TcpProxy
from support.waiting import eventually

# Fixtures imported from the support module, re-exported so pytest (and ruff) see them used.
__all__ = ["localstripe", "proxied_processor", "stripe_processor", "stripe_proxy"]

pytestmark = pytest.mark.filterwarnings(
    # The SDK hands httpx its form body as `data=`; nothing this project can change.
    "ignore:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning"
)


def _assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in (API_KEY, *secrets):
        assert secret not in text


# -- against localstripe ---------------------------------------------------------------


async def test_approved_charge_is_one_confirmed_intent(
    stripe_processor: StripeProcessor, localstripe: LocalStripe
) -> None:
    request = charge_request("pm_card_visa", amount=1999, currency="EUR", booking_id="bk-42")
    outcome = await stripe_processor.charge(request)

    assert isinstance(outcome, Approved)
    [intent] = localstripe.intents_for(request.payment_id)
    assert outcome.provider_reference == intent["id"]
    assert intent["status"] == "succeeded"
    assert (intent["amount"], intent["currency"]) == (1999, "eur")
    assert intent["metadata"] == {"payment_id": str(request.payment_id), "booking_id": "bk-42"}


async def test_declined_charge_carries_the_decline_code(
    stripe_processor: StripeProcessor, localstripe: LocalStripe
) -> None:
    request = charge_request("pm_card_chargeCustomerFail")
    outcome = await stripe_processor.charge(request)

    # localstripe reports `code` only; real Stripe adds a `decline_code`, preferred if present.
    assert outcome == Declined(code="card_declined", message="Your card was declined.")
    [intent] = localstripe.intents_for(request.payment_id)
    assert intent["status"] == "requires_payment_method"


@pytest.mark.parametrize(
    ("amount", "currency", "stripe_amount"),
    [
        (500, "JPY", 500),  # zero-decimal at ISO and at Stripe
        (1234, "EUR", 1234),
        (5120, "KWD", 5120),  # three decimals, last digit 0
        (5, "ISK", 500),  # ISO: whole krónur; Stripe: two decimals, always 00
        (12345, "HUF", 12345),  # two decimals for charges (zero only for payouts)
        (70000, "UGX", 70000),
    ],
)
async def test_amounts_are_sent_in_stripe_units(
    stripe_processor: StripeProcessor,
    localstripe: LocalStripe,
    amount: int,
    currency: str,
    stripe_amount: int,
) -> None:
    request = charge_request(amount=amount, currency=currency)
    assert isinstance(await stripe_processor.charge(request), Approved)
    [intent] = localstripe.intents_for(request.payment_id)
    assert (intent["amount"], intent["currency"]) == (stripe_amount, currency.lower())


async def test_an_amount_stripe_cannot_represent_is_declined_without_a_call(
    stripe_processor: StripeProcessor, localstripe: LocalStripe
) -> None:
    request = charge_request(amount=5124, currency="KWD")
    outcome = await stripe_processor.charge(request)
    assert isinstance(outcome, Declined)
    assert outcome.code == "amount_not_representable"
    assert localstripe.intents_for(request.payment_id) == []


async def test_an_unknown_payment_method_is_declined_without_echoing_it(
    stripe_processor: StripeProcessor,
) -> None:
    request = charge_request("pm_doesNotExist4242")
    outcome = await stripe_processor.charge(request)
    assert isinstance(outcome, Declined)
    _assert_no_secrets(repr(outcome), request.payment_method)


async def test_localstripe_ignores_idempotency_keys(localstripe: LocalStripe) -> None:
    # Why the localstripe dialect looks a payment up before charging: without it, the same
    # key charges twice there (real Stripe would replay the first answer).
    async with sandbox_processor(localstripe.url, lookup_before_charge=False) as processor:
        request = charge_request()
        first = await processor.charge(request)
        second = await processor.charge(request)
    assert isinstance(first, Approved) and isinstance(second, Approved)
    assert first.provider_reference != second.provider_reference
    assert len(localstripe.intents_for(request.payment_id)) == 2


async def test_lookup_reports_the_decline(
    stripe_processor: StripeProcessor,
) -> None:
    request = charge_request("pm_card_chargeCustomerFail")
    declined = await stripe_processor.charge(request)
    assert await stripe_processor.lookup(request) == declined


# -- outages and lost answers ----------------------------------------------------------


async def test_stopped_server_is_unavailable() -> None:
    with own_localstripe() as server:
        # No lookup before charging: the create call itself must see the outage.
        async with sandbox_processor(server.url, lookup_before_charge=False) as processor:
            assert isinstance(await processor.charge(charge_request()), Approved)
            server.stop()
            request = charge_request()
            # The pooled keep-alive connection is dead too: it must not pass for "sent".
            with pytest.raises(ProcessorUnavailable) as charged:
                await processor.charge(request)
            with pytest.raises(ProcessorUnavailable) as looked_up:
                await processor.lookup(request)
    for exc in (charged.value, looked_up.value):
        _assert_no_secrets(str(exc), request.payment_method)
        assert exc.__cause__ is None and exc.__suppress_context__


@pytest.mark.parametrize("lookup_first", [False, True])
async def test_refused_connection_is_unavailable(
    stripe_proxy: TcpProxy, lookup_first: bool
) -> None:
    await stripe_proxy.stop()
    async with sandbox_processor(stripe_proxy.url, lookup_before_charge=lookup_first) as processor:
        with pytest.raises(ProcessorUnavailable):
            await processor.charge(charge_request())


async def test_lost_response_is_unknown_and_lookup_finds_the_charge(
    proxied_processor: StripeProcessor, stripe_proxy: TcpProxy, localstripe: LocalStripe
) -> None:
    request = charge_request()
    stripe_proxy.mode, stripe_proxy.target = "drop_response", b"POST "

    with pytest.raises(OutcomeUnknown) as lost:
        await proxied_processor.charge(request)
    assert stripe_proxy.dropped_responses == 1
    _assert_no_secrets(str(lost.value), request.payment_method)

    stripe_proxy.mode = "forward"
    [intent] = localstripe.intents_for(request.payment_id)
    assert await proxied_processor.lookup(request) == Approved(provider_reference=intent["id"])
    # And charging again (same key) answers from the existing intent: still one.
    assert await proxied_processor.charge(request) == Approved(provider_reference=intent["id"])
    assert len(localstripe.intents_for(request.payment_id)) == 1


async def test_no_answer_in_time_is_unknown(
    stripe_proxy: TcpProxy, stripe_processor: StripeProcessor, localstripe: LocalStripe
) -> None:
    request = charge_request()
    stripe_proxy.mode, stripe_proxy.target = "hang", b"POST "
    async with sandbox_processor(
        stripe_proxy.url, timeout_s=2.0, lookup_before_charge=False
    ) as processor:
        with pytest.raises(OutcomeUnknown):
            await processor.charge(request)
    # The client gave up; the server may still be working on the request (a loaded
    # machine): its answer reaches the proxy, which keeps it.
    await eventually(lambda: stripe_proxy.hung_responses > 0, 30, what="the answer held back")
    assert stripe_proxy.hung_responses == 1
    assert isinstance(await stripe_processor.lookup(request), Approved)
    assert len(localstripe.intents_for(request.payment_id)) == 1


async def test_cut_before_the_server_is_unknown_and_lookup_finds_nothing(
    proxied_processor: StripeProcessor, stripe_proxy: TcpProxy, localstripe: LocalStripe
) -> None:
    # The client cannot tell a request cut on its way from one cut on the way back.
    request = charge_request()
    stripe_proxy.mode, stripe_proxy.target = "cut", b"POST "
    with pytest.raises(OutcomeUnknown):
        await proxied_processor.charge(request)
    assert stripe_proxy.cut_requests == 1
    stripe_proxy.mode = "forward"
    assert await proxied_processor.lookup(request) is None
    assert localstripe.intents_for(request.payment_id) == []


# -- the reconcile path, end to end over the in-memory unit of work --------------------


@pytest.mark.parametrize("failure", ["drop_response", "cut"])
async def test_reconcile_completes_an_unknown_charge_with_one_intent(
    proxied_processor: StripeProcessor,
    stripe_proxy: TcpProxy,
    localstripe: LocalStripe,
    failure: str,
) -> None:
    uow_factory = MemoryUnitOfWorkFactory()
    clock = SystemClock()
    policy = ExecutionPolicy(call_timeout_s=5.0, max_attempts=2, backoff_initial_s=0.01)
    booking_id = f"bk-{uuid.uuid4().hex[:12]}"
    requested = await request_payment(
        RequestPayment(
            inbound=InboundRef(source="test", message_id=str(uuid.uuid4())),
            booking_id=booking_id,
            amount=4200,
            currency="EUR",
            payment_method="pm_card_visa",
        ),
        uow_factory,
        clock,
    )
    assert requested is RequestResult.ACCEPTED
    payment_id = uow_factory.db.bookings[booking_id]

    stripe_proxy.mode = "drop_response" if failure == "drop_response" else "cut"
    stripe_proxy.target = b"POST "
    executed = await execute_payment(
        ExecutePayment(
            inbound=InboundRef(source="test", message_id=str(uuid.uuid4())),
            payment_id=payment_id,
        ),
        uow_factory,
        proxied_processor,
        clock,
        policy,
    )
    assert executed is ExecuteResult.UNKNOWN

    stripe_proxy.mode = "forward"
    reconciled = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uow_factory, proxied_processor, clock, policy
    )
    assert reconciled is ExecuteResult.COMPLETED

    [intent] = localstripe.intents_for(payment_id)
    completed = [e for e in uow_factory.db.streams[payment_id] if isinstance(e, PaymentCompleted)]
    assert [(e.processor, e.provider_reference) for e in completed] == [("sandbox", intent["id"])]


# -- secrets ---------------------------------------------------------------------------


async def test_sdk_logs_never_carry_the_key_or_the_payment_method(
    stripe_processor: StripeProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = ["pm_card_visa", "pm_card_chargeCustomerFail", "pm_doesNotExist4242"]
    for token in tokens:
        request = charge_request(token)
        await stripe_processor.charge(request)
        await stripe_processor.lookup(request)
    assert "Post details" in caplog.text  # the SDK did log its form bodies...
    _assert_no_secrets(caplog.text, *tokens)  # ...scrubbed


def test_repr_hides_the_key(localstripe: LocalStripe) -> None:
    processor = sandbox_processor(localstripe.url)
    _assert_no_secrets(repr(processor))
    _assert_no_secrets(repr(vars(processor)))


# -- canned answers: what localstripe cannot produce ------------------------------------


class CannedStripe:
    """An HTTP server answering every request with one canned status and body."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b"{}"
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def answer(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                self.requests.append(head + await reader.readexactly(length))
                writer.write(
                    b"HTTP/1.1 %d Canned\r\nContent-Type: application/json\r\n"
                    b"Request-Id: req_canned123\r\nContent-Length: %d\r\n\r\n%s"
                    % (self.status, len(self.body), self.body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest_asyncio.fixture
async def canned() -> AsyncIterator[CannedStripe]:
    server = CannedStripe()
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def real_dialect(canned: CannedStripe) -> AsyncIterator[StripeProcessor]:
    """The processor as it talks to real Stripe (search, automatic_payment_methods)."""
    async with StripeProcessor(
        API_KEY, api_base=canned.url, name="sandbox", timeout_s=2.0, dialect="stripe"
    ) as processor:
        yield processor


def _error(kind: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": f"{kind} for pm_secretToken9"}
    if code:
        error["code"] = code
    error.update(extra)
    return {"error": error}


def _intent(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "pi_canned1", "object": "payment_intent", "status": status, **extra}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, _intent("succeeded"), Approved(provider_reference="pi_canned1")),
        (200, _intent("requires_capture"), Approved(provider_reference="pi_canned1")),
        (
            402,
            _error("card_error", "card_declined", decline_code="insufficient_funds"),
            "declined:insufficient_funds",
        ),
        (402, _error("card_error", "expired_card"), "declined:expired_card"),
        (400, _error("invalid_request_error", "amount_too_small"), "declined:amount_too_small"),
        (404, _error("invalid_request_error", "resource_missing"), "declined:resource_missing"),
        (
            200,
            _intent("requires_action", next_action={"type": "use_stripe_sdk"}),
            "declined:authentication_required",
        ),
        (400, _error("idempotency_error"), OutcomeUnknown),
        (401, _error("invalid_request_error"), ProcessorUnavailable),
        (403, _error("invalid_request_error"), ProcessorUnavailable),
        (429, _error("invalid_request_error", "rate_limit"), ProcessorUnavailable),
        (429, _error("invalid_request_error", "lock_timeout"), ProcessorUnavailable),
        (409, _error("idempotency_error"), OutcomeUnknown),
        (500, _error("api_error"), OutcomeUnknown),
        (502, b"<html>Bad Gateway</html>", OutcomeUnknown),
        (503, _error("api_error"), OutcomeUnknown),
        (200, _intent("processing"), OutcomeUnknown),
        (200, b"not json", OutcomeUnknown),
    ],
    ids=lambda v: str(v)[:40] if not isinstance(v, dict) else None,
)
async def test_error_mapping(
    canned: CannedStripe,
    real_dialect: StripeProcessor,
    status: int,
    body: Any,
    expected: Any,
) -> None:
    canned.answer(status, body)
    request = charge_request("pm_secretToken9")
    if isinstance(expected, type) and issubclass(expected, ProcessorError):
        with pytest.raises(expected) as raised:
            await real_dialect.charge(request)
        _assert_no_secrets(str(raised.value), request.payment_method)
        return
    outcome = await real_dialect.charge(request)
    _assert_no_secrets(repr(outcome), request.payment_method)
    if isinstance(expected, str):
        assert isinstance(outcome, Declined)
        assert f"declined:{outcome.code}" == expected
    else:
        assert outcome == expected


async def test_real_dialect_sends_one_confirmed_intent_with_the_key(
    canned: CannedStripe, real_dialect: StripeProcessor
) -> None:
    canned.answer(200, _intent("succeeded"))
    request = charge_request("pm_card_visa", amount=1000, currency="JPY")
    await real_dialect.charge(request)
    [sent] = canned.requests
    head, _, form = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/payment_intents ")
    assert f"idempotency-key: {request.idempotency_key}".encode() in head.lower()
    for field in (
        b"amount=1000",
        b"currency=jpy",
        b"confirm=true",
        b"automatic_payment_methods[enabled]=true",
        b"automatic_payment_methods[allow_redirects]=never",
        f"metadata[payment_id]={request.payment_id}".encode(),
    ):
        assert field in form.replace(b"%5B", b"[").replace(b"%5D", b"]")


async def test_real_dialect_looks_up_by_search(
    canned: CannedStripe, real_dialect: StripeProcessor
) -> None:
    request = charge_request()
    found = _intent("succeeded", metadata={"payment_id": str(request.payment_id)})
    canned.answer(200, {"object": "search_result", "data": [found], "has_more": False})
    assert await real_dialect.lookup(request) == Approved(provider_reference="pi_canned1")
    [sent] = canned.requests
    assert sent.startswith(b"GET /v1/payment_intents/search?")

    canned.answer(200, {"object": "search_result", "data": [], "has_more": False})
    assert await real_dialect.lookup(request) is None

    canned.answer(500, _error("api_error"))
    with pytest.raises(ProcessorUnavailable):
        await real_dialect.lookup(request)


async def test_a_processing_intent_is_an_unknown_outcome_not_an_absent_charge(
    canned: CannedStripe, real_dialect: StripeProcessor
) -> None:
    request = charge_request()
    mine = {"payment_id": str(request.payment_id)}
    processing = _intent("processing", metadata=mine)
    canned.answer(200, {"object": "search_result", "data": [processing], "has_more": False})
    # "Nothing found" would let a failure be reported while money may still be taken.
    with pytest.raises(OutcomeUnknown):
        await real_dialect.lookup(request)
    succeeded = {**_intent("succeeded", metadata=mine), "id": "pi_canned2"}
    canned.answer(
        200, {"object": "search_result", "data": [processing, succeeded], "has_more": False}
    )
    assert await real_dialect.lookup(request) == Approved(provider_reference="pi_canned2")


async def test_auto_dialect_detects_localstripe(localstripe: LocalStripe) -> None:
    async with StripeProcessor(API_KEY, api_base=localstripe.url, name="sandbox") as processor:
        assert processor.dialect is None
        request = charge_request()
        assert isinstance(await processor.charge(request), Approved)
        assert processor.dialect == "localstripe"
        assert isinstance(await processor.charge(request), Approved)
    assert len(localstripe.intents_for(request.payment_id)) == 1


async def test_auto_dialect_detects_stripe_and_retries_an_unanswered_probe(
    canned: CannedStripe,
) -> None:
    async with StripeProcessor(API_KEY, api_base=canned.url, name="sandbox") as processor:
        canned.answer(401, _error("invalid_request_error"))
        with pytest.raises(ProcessorUnavailable):
            await processor.charge(charge_request())
        assert processor.dialect is None
        canned.answer(200, {"object": "search_result", "data": [], "has_more": False})
        assert await processor.lookup(charge_request()) is None
        assert processor.dialect == "stripe"
    probes = [r for r in canned.requests if b"dialect-probe" in r]
    assert len(probes) == 2
    assert not any(r.startswith(b"POST") for r in canned.requests)


def test_stripe_itself_needs_no_probe() -> None:
    assert StripeProcessor("sk_live_abc", name="stripe").dialect == "stripe"


@pytest.mark.parametrize(
    ("kind", "base"),
    [("sandbox", "localhost:8420"), ("sandbox", "ftp://x"), ("stripe", "http://api.example")],
)
def test_a_bad_api_base_is_refused_naming_the_variable(kind: str, base: str) -> None:
    key = "sk_test_abc" if kind == "sandbox" else "sk_live_abc"
    with pytest.raises(ValueError, match="PAYMENT_STRIPE_API_BASE"):
        StripeProcessor(key, api_base=base, name=kind)  # type: ignore[arg-type]


async def test_the_sdk_does_not_retry(canned: CannedStripe, real_dialect: StripeProcessor) -> None:
    canned.answer(503, _error("api_error"))
    with pytest.raises(OutcomeUnknown):
        await real_dialect.charge(charge_request())
    assert len(canned.requests) == 1
