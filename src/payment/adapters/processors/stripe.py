"""The Stripe adapter of the PaymentProcessor port: one confirmed PaymentIntent per charge,
one Refund per refund."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self
from urllib.parse import urlsplit

import httpx
import stripe

from payment.adapters.processors.stripe_refunds import StripeRefunds
from payment.domain.money import Money
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    Declined,
    GatewayErrorReplayed,
    OutcomeUnknown,
    ProcessorRateLimited,
    ProcessorUnavailable,
    RefundOutcome,
    RefundRequest,
)

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams

log = logging.getLogger(__name__)

ProcessorKind = Literal["stripe", "sandbox"]
# "localstripe" speaks a subset of the API: no search, no idempotency keys, and it refuses
# parameters it does not know (such as automatic_payment_methods).
Dialect = Literal["stripe", "localstripe"]

API_KEY_VARIABLE: Final = "PAYMENT_STRIPE_API_KEY"
API_BASE_VARIABLE: Final = "PAYMENT_STRIPE_API_BASE"

# Stripe may forget an idempotency key once it is 24 hours old; a create under a forgotten
# key makes a new PaymentIntent. Payments older than this (an hour's margin for the calls
# in progress) are looked up before they are charged (ExecutionPolicy.key_lifetime_s).
IDEMPOTENCY_KEY_LIFETIME_S: Final = 23 * 3600.0

# Stripe's search is eventually consistent: a PaymentIntent usually appears in it within a
# minute. A miss on a younger payment is not "no charge" (ExecutionPolicy.lookup_settle_s).
SEARCH_LAG_S: Final = 60.0

# -- amounts ---------------------------------------------------------------------------

# Stripe's zero-decimal currencies (docs.stripe.com/currencies#zero-decimal): the amount is
# in whole units. MGA is two-decimal in ISO 4217 but zero-decimal at Stripe.
STRIPE_ZERO_DECIMAL: Final = frozenset(
    {
        "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA",
        "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF",
    }
)  # fmt: skip
# Stripe accepts three decimals for these, but only with the last digit 0 (for its payment
# partners' sake): KWD 5.124 must be sent as 5120 or 5130, never 5124.
STRIPE_THREE_DECIMAL: Final = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})
# ISK is zero-decimal in ISO 4217 but, for backwards compatibility, two-decimal in Stripe's
# API with the fraction always 00 (5 ISK is sent as 500). HUF and TWD are two-decimal for
# charges (zero-decimal only for payouts), which is also ISO's exponent: no special case.
STRIPE_TWO_DECIMAL_WHOLE_UNITS: Final = frozenset({"ISK"})


class StripeAmountError(ValueError):
    """An amount that Stripe cannot represent exactly in its own units for the currency."""


def stripe_exponent(currency: str) -> int:
    """The number of decimals Stripe's API uses for `currency` (uppercase ISO 4217 code)."""
    if currency in STRIPE_ZERO_DECIMAL:
        return 0
    if currency in STRIPE_THREE_DECIMAL:
        return 3
    if currency in STRIPE_TWO_DECIMAL_WHOLE_UNITS:
        return 2
    return 2


def to_stripe_amount(money: Money) -> int:
    """`money` (ISO 4217 minor units) as Stripe's integer `amount` for its currency.

    Exact or not at all: raises `StripeAmountError` rather than round, because rounding a
    charge silently takes a different sum from the customer than the one they agreed to.
    """
    iso = money.exponent
    target = stripe_exponent(money.currency)
    if money.amount < 1:
        raise StripeAmountError("amount must be positive")
    if target >= iso:
        scale: int = 10 ** (target - iso)
        amount = money.amount * scale
    else:
        factor: int = 10 ** (iso - target)
        if money.amount % factor:
            raise StripeAmountError(
                f"{money.currency} is charged in whole units at Stripe: "
                f"{money.amount} minor units is not a multiple of {factor}"
            )
        amount = money.amount // factor
    if money.currency in STRIPE_THREE_DECIMAL and amount % 10:
        raise StripeAmountError(
            f"{money.currency} amounts at Stripe must end in 0: "
            f"{money.amount} minor units cannot be charged exactly"
        )
    # ISK whole units: after scaling by 100 the amount is always divisible by 100.
    return amount


# -- start-up validation ---------------------------------------------------------------

_TEST_KEY_PREFIXES: Final = ("sk_test_", "rk_test_")
_LIVE_KEY_PREFIXES: Final = ("sk_live_", "rk_live_")


def validate_stripe_key(processor_kind: str, api_key: str | None) -> None:
    """Refuse a key that does not fit the processor kind, in one line naming the variable.

    `sandbox` needs a test-mode secret or restricted key; `stripe` refuses a test-mode key
    (a live service charging nobody is an outage nobody notices). The key itself is never
    part of the message.
    """
    if processor_kind not in ("stripe", "sandbox"):
        raise ValueError(f"PAYMENT_PROCESSOR={processor_kind!r} does not use a Stripe key")
    if not api_key:
        raise ValueError(f"{API_KEY_VARIABLE} is required when PAYMENT_PROCESSOR={processor_kind}")
    if api_key != api_key.strip() or any(ch.isspace() for ch in api_key):
        raise ValueError(f"{API_KEY_VARIABLE} contains whitespace; check how it is set")
    if api_key.startswith(("pk_test_", "pk_live_")):
        raise ValueError(
            f"{API_KEY_VARIABLE} is a publishable key; the service needs a secret (sk_) "
            "or restricted (rk_) key"
        )
    if processor_kind == "sandbox":
        if not api_key.startswith(_TEST_KEY_PREFIXES):
            raise ValueError(
                f"{API_KEY_VARIABLE} must be a test-mode key (sk_test_… or rk_test_…) "
                "when PAYMENT_PROCESSOR=sandbox"
            )
        return
    if api_key.startswith(_TEST_KEY_PREFIXES):
        raise ValueError(
            f"{API_KEY_VARIABLE} is a test-mode key but PAYMENT_PROCESSOR=stripe charges for "
            "real: use a live key (sk_live_… or rk_live_…) or PAYMENT_PROCESSOR=sandbox"
        )
    if not api_key.startswith(_LIVE_KEY_PREFIXES):
        raise ValueError(
            f"{API_KEY_VARIABLE} is not a Stripe secret or restricted key (sk_live_… or rk_live_…)"
        )


def _check_api_base(processor_kind: str, api_base: str | None) -> None:
    if api_base is None:
        return
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{API_BASE_VARIABLE} must be an http(s)://host[:port] URL")
    if processor_kind == "stripe" and parts.scheme != "https":
        # A live key in clear text is a leaked key.
        raise ValueError(f"{API_BASE_VARIABLE} must use https with PAYMENT_PROCESSOR=stripe")


def _origin(api_base: str | None) -> str:
    # scheme://host:port only: a URL may carry credentials, which must not be logged.
    if api_base is None:
        return "https://api.stripe.com"
    parts = urlsplit(api_base)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


# -- keeping secrets out of messages and logs ------------------------------------------

_REDACTIONS: Final = (
    (re.compile(r"\b[spr]k_(?:live|test)_[A-Za-z0-9]+"), "<redacted-key>"),
    # payment_method=… in logged form bodies, "payment_method": "…" in logged JSON.
    (re.compile(r"""(payment_method["']?\s*[:=]\s*["']?)[^"'&\s,}]+"""), r"\1<redacted>"),
    # Token-shaped ids (mixed case or digits, unlike codes such as card_declined).
    (re.compile(r"\b(?:pm|tok|src|card)_(?=[A-Za-z0-9_]*[0-9A-Z])[A-Za-z0-9_]{6,}"), "<redacted>"),
    (re.compile(r"\b\d{13,19}\b"), "<redacted-number>"),
)
_CODE: Final = re.compile(r"[a-z0-9_]{1,64}")
_REQUEST_ID: Final = re.compile(r"req_[A-Za-z0-9]{1,64}")


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text[:300]


def _safe_code(code: str | None, default: str) -> str:
    # Codes become event fields and metric labels: only Stripe's snake_case vocabulary.
    return code if code is not None and _CODE.fullmatch(code) else default


class _Secret:
    """A string that stays out of reprs, tracebacks' locals and `vars()` dumps."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<redacted>"


class _RedactStripeLogs(logging.Filter):
    """Scrubs the SDK's own log records, which carry form bodies and response bodies."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _scrub(record.getMessage())
        record.args = None
        return True


def _install_log_redaction() -> None:
    sdk_logger = logging.getLogger("stripe")
    if not any(isinstance(f, _RedactStripeLogs) for f in sdk_logger.filters):
        sdk_logger.addFilter(_RedactStripeLogs())


# -- the adapter -----------------------------------------------------------------------

# Errors raised before the request left this process: the charge cannot have happened.
_NOT_SENT: Final = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)

_APPROVED_STATUSES: Final = frozenset({"succeeded", "requires_capture"})


class StripeProcessor:
    """Charges through Stripe's PaymentIntents API with the official SDK's async HTTPX client.

    One PaymentIntent is created and confirmed in one call, with the ChargeRequest's
    idempotency key as Stripe's `Idempotency-Key`, so a repeated charge returns the first
    answer. The SDK never retries by itself: retries belong to the application, which
    knows whether the first attempt may have charged.
    """

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        name: ProcessorKind = "stripe",
        timeout_s: float = 8.0,
        connect_timeout_s: float = 3.0,
        max_connections: int = 100,
        dialect: Dialect | Literal["auto"] = "auto",
        lookup_before_charge: bool | None = None,
    ) -> None:
        """`dialect="auto"` means Stripe itself without `api_base`; with one, the first call
        asks the server whether it has the search API, which localstripe lacks.

        `lookup_before_charge` defaults to on for localstripe only (it ignores keys).
        """
        validate_stripe_key(name, api_key)
        _check_api_base(name, api_base)
        if dialect not in ("auto", "stripe", "localstripe"):
            raise ValueError(f"unknown Stripe dialect {dialect!r}")
        self.name: str = name
        self._dialect: Dialect | None = (
            dialect if dialect != "auto" else ("stripe" if api_base is None else None)
        )
        self._lookup_before_charge = lookup_before_charge
        # payment id -> (its lock, how many calls hold or wait for it)
        self._charging: dict[uuid.UUID, tuple[asyncio.Lock, int]] = {}
        self._api_base = api_base
        self._api_key = _Secret(api_key)
        # The application's deadline (ExecutionPolicy.call_timeout_s) is longer, so that
        # this adapter times out first and can tell "never connected" from "no answer".
        self._http = stripe.HTTPXClient(
            timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))
        )
        # The pool matches the calls allowed in flight (LimitedProcessor): the SDK takes
        # no pool limits, so its async client is replaced before it ever connects.
        self._http._client_async = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=stripe.ca_bundle_path),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=self._http,
            max_network_retries=0,
        )
        self._refunds = StripeRefunds(
            self._client,
            self._resolve_dialect,
            describe=_describe,
            safe_code=_safe_code,
            to_amount=lambda request: to_stripe_amount(request.money),
            not_sent=_NOT_SENT,
        )
        _install_log_redaction()

    @property
    def dialect(self) -> Dialect | None:
        """The API dialect of the server, None until an `auto` probe has answered."""
        return self._dialect

    def _looks_up_before_charge(self, dialect: Dialect) -> bool:
        # Where the gateway ignores idempotency keys, looking the payment up first is the
        # only thing standing between a retried charge and a second PaymentIntent.
        if self._lookup_before_charge is not None:
            return self._lookup_before_charge
        return dialect == "localstripe"

    def __repr__(self) -> str:
        where = "stripe" if self._api_base is None else _origin(self._api_base)
        return f"StripeProcessor(name={self.name!r}, api={where!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.close_async()  # type: ignore[no-untyped-call]  # SDK lacks hints

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        try:
            amount = to_stripe_amount(request.money)
        except StripeAmountError as exc:
            # Nothing was sent; no retry can change the answer.
            return Declined(code="amount_not_representable", message=str(exc))
        dialect = await self._resolve_dialect()
        if not self._looks_up_before_charge(dialect):
            return await self._create(request, amount, dialect)
        # Look-up-then-create is not atomic: two calls for one payment in this process (the
        # consumer's and the reconciler's, after a restart) would both find nothing and
        # create two PaymentIntents at a gateway that ignores idempotency keys. So one at
        # a time per payment: the second finds the first one's intent. (Across instances
        # nothing serialises them; only Stripe's own idempotency keys do.)
        async with self._one_charge_at_a_time(request.payment_id):
            found = await self._find(request)
            if found:
                known = self._outcome_of_many(request, found)
                if known is None:
                    raise OutcomeUnknown("stripe: an earlier attempt is not final yet")
                return known
            return await self._create(request, amount, dialect)

    @contextlib.asynccontextmanager
    async def _one_charge_at_a_time(self, payment_id: uuid.UUID) -> AsyncIterator[None]:
        lock, users = self._charging.get(payment_id, (asyncio.Lock(), 0))
        self._charging[payment_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._charging[payment_id]
            if users == 1:
                del self._charging[payment_id]
            else:
                self._charging[payment_id] = (lock, users - 1)

    async def _create(self, request: ChargeRequest, amount: int, dialect: Dialect) -> ChargeOutcome:
        try:
            intent = await self._client.v1.payment_intents.create_async(
                self._create_params(request, amount, dialect),
                {"idempotency_key": str(request.idempotency_key)},
            )
        except stripe.StripeError as exc:
            return self._outcome_of_error(request, exc)
        outcome = _outcome_of(intent, request.payment_method)
        if outcome is None:
            status = _safe_code(_text(intent, "status"), "unknown")
            raise OutcomeUnknown(f"stripe: the PaymentIntent is {status}, not final")
        return outcome

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        found = await self._find(request)
        return self._outcome_of_many(request, found) if found else None

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        """One Stripe Refund on the charge's PaymentIntent per refund (adapters/processors/
        stripe_refunds.py)."""
        return await self._refunds.refund(request)

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        return await self._refunds.lookup_refund(request)

    # -- internals ---------------------------------------------------------------------

    async def _resolve_dialect(self) -> Dialect:
        if self._dialect is not None:
            return self._dialect
        try:
            await self._client.v1.payment_intents.search_async(
                {"query": "metadata['payment_id']:'dialect-probe'", "limit": 1}
            )
            dialect: Dialect = "stripe"
        except stripe.InvalidRequestError as exc:
            # localstripe routes /search to "retrieve the intent called search": 404.
            dialect = "localstripe" if exc.http_status == 404 else "stripe"
        except stripe.StripeError as exc:
            # Nothing was charged; the next call asks again.
            raise ProcessorUnavailable(f"stripe: API not reachable ({_describe(exc)})") from None
        log.info("the Stripe API at %s speaks the %s dialect", _origin(self._api_base), dialect)
        self._dialect = dialect
        return dialect

    def _create_params(
        self, request: ChargeRequest, amount: int, dialect: Dialect
    ) -> PaymentIntentCreateParams:
        params: PaymentIntentCreateParams = {
            "amount": amount,
            "currency": request.money.currency.lower(),
            "payment_method": request.payment_method,
            "confirm": True,
            "metadata": {
                "payment_id": str(request.payment_id),
                "booking_id": request.booking_id,
            },
        }
        if dialect == "stripe":
            # A server-side charge has no page to return to: without this, Stripe demands
            # a return_url for the redirect-based methods enabled in the Dashboard.
            params["automatic_payment_methods"] = {"enabled": True, "allow_redirects": "never"}
        return params

    def _outcome_of_error(self, request: ChargeRequest, exc: stripe.StripeError) -> Declined:
        """Map an SDK error on create: a decline, or raise Unavailable / Unknown."""
        where = _describe(exc)
        secrets = (request.payment_method, self._api_key.value)
        if isinstance(exc, stripe.CardError):
            code = _text(exc.error, "decline_code") or exc.code
            return Declined(
                code=_safe_code(code, "card_declined"),
                message=_scrub(exc.user_message or "the card was declined", *secrets),
            )
        if isinstance(exc, stripe.IdempotencyError):
            # The key was used before with other parameters: that earlier request may
            # have charged. Only a lookup can tell.
            raise OutcomeUnknown(f"stripe: idempotency key reused ({where})") from None
        if isinstance(exc, stripe.InvalidRequestError):
            # Validation failed before anything executed, and Stripe keeps no idempotent
            # result for it: retrying is pointless, and the charge did not happen.
            log.warning("stripe refused payment %s as invalid (%s)", request.payment_id, where)
            return Declined(
                code=_safe_code(exc.code, "invalid_request"),
                message=_scrub(exc.user_message or "invalid request", *secrets),
            )
        if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
            log.error("stripe rejected the credentials (%s): check %s", where, API_KEY_VARIABLE)
            raise ProcessorUnavailable(f"stripe: credentials rejected ({where})") from None
        if isinstance(exc, stripe.RateLimitError):
            # Stripe rejects rate-limited and lock-contended requests before executing them.
            raise _rate_limited(exc) from None
        if isinstance(exc, stripe.APIConnectionError):
            if isinstance(exc.__cause__, _NOT_SENT):
                raise ProcessorUnavailable(f"stripe: could not connect ({where})") from None
            raise OutcomeUnknown(
                f"stripe: connection lost after sending the request ({where})"
            ) from None
        if _replayed(exc) and (exc.http_status or 0) >= 500:
            # Stripe stores a key's first answer, a 500 included, and replays it for 24 h.
            raise GatewayErrorReplayed(
                f"stripe: replays the stored error of this idempotency key ({where})"
            ) from None
        # 409 (a request with the same key in flight), 5xx, unreadable bodies: the request
        # reached Stripe or something in front of it, and may have been executed.
        raise OutcomeUnknown(f"stripe: no usable answer ({where})") from None

    async def _find(self, request: ChargeRequest) -> list[stripe.PaymentIntent]:
        """Every PaymentIntent carrying this payment's id in its metadata."""
        dialect = await self._resolve_dialect()
        try:
            if dialect == "stripe":
                return await self._search(request.payment_id)
            return await self._scan(request.payment_id)
        except stripe.RateLimitError as exc:
            raise _rate_limited(exc) from None
        except stripe.StripeError as exc:
            raise ProcessorUnavailable(f"stripe: lookup failed ({_describe(exc)})") from None

    async def _search(self, payment_id: uuid.UUID) -> list[stripe.PaymentIntent]:
        # Search is eventually consistent (usually under a minute behind): a miss here is
        # covered by charging again with the same idempotency key, which Stripe honours.
        result = await self._client.v1.payment_intents.search_async(
            {"query": f"metadata['payment_id']:'{payment_id}'", "limit": 100}
        )
        return _matching(result.data, payment_id)

    async def _scan(self, payment_id: uuid.UUID) -> list[stripe.PaymentIntent]:
        # For gateways without search (localstripe keeps everything in memory and lists
        # oldest first, so the whole list is walked: a bound would miss the newest).
        found: list[stripe.PaymentIntent] = []
        seen: set[str] = set()
        starting_after: str | None = None
        while True:
            page = await self._client.v1.payment_intents.list_async(
                {"limit": 100, "starting_after": starting_after}
                if starting_after
                else {"limit": 100}
            )
            found += _matching(page.data, payment_id)
            ids = [_text(i, "id") for i in page.data]
            last = ids[-1] if ids else None
            # A cursor the server did not recognise restarts the list: stop, don't loop.
            if not page.has_more or last is None or last in seen:
                return found
            seen.update(i for i in ids if i is not None)
            starting_after = last

    def _outcome_of_many(
        self, request: ChargeRequest, intents: Sequence[stripe.PaymentIntent]
    ) -> ChargeOutcome | None:
        if len(intents) > 1:
            # Only a gateway that ignores idempotency keys lets this happen; money may
            # have been taken twice, which needs a human.
            log.warning(
                "payment %s has %d PaymentIntents at stripe: %s",
                request.payment_id,
                len(intents),
                ", ".join(_text(i, "id") or "?" for i in intents),
            )
        outcomes = [_outcome_of(i, request.payment_method) for i in intents]
        # Money taken wins; then a charge still moving; a decline only when all are final.
        for outcome in outcomes:
            if isinstance(outcome, Approved):
                return outcome
        processing = [_text(i, "id") or "?" for i in intents if _text(i, "status") == "processing"]
        if processing:
            # Money may still be taken: neither "no charge" (which would let a failure be
            # reported, or a new intent be created once the key has expired) nor final.
            raise OutcomeUnknown(f"stripe: PaymentIntent {processing[0]} is still processing")
        if any(o is None for o in outcomes):
            return None
        return outcomes[0]


def _replayed(exc: stripe.StripeError) -> bool:
    headers = exc.headers or {}
    return any(k.lower() == "idempotent-replayed" and v == "true" for k, v in headers.items())


def _rate_limited(exc: stripe.RateLimitError) -> ProcessorRateLimited:
    return ProcessorRateLimited(
        f"stripe: rate limited ({_describe(exc)})", retry_after_s=_retry_after(exc)
    )


def _retry_after(exc: stripe.StripeError) -> float | None:
    """The `Retry-After` of an answer, in seconds (delta-seconds form only)."""
    headers = exc.headers or {}
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        seconds = float(raw) if raw is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 3600 else None


def _matching(
    intents: Iterable[stripe.PaymentIntent], payment_id: uuid.UUID
) -> list[stripe.PaymentIntent]:
    wanted = str(payment_id)
    return [i for i in intents if _metadata(i, "payment_id") == wanted]


def _metadata(intent: stripe.PaymentIntent, key: str) -> str | None:
    metadata = getattr(intent, "metadata", None)
    if metadata is None:
        return None
    return _text(metadata, key)


def _outcome_of(intent: stripe.PaymentIntent, *secrets: str) -> ChargeOutcome | None:
    """The final outcome a PaymentIntent records, or None while it can still change."""
    status = _text(intent, "status")
    reference = _text(intent, "id")
    if reference is None:
        return None
    if status in _APPROVED_STATUSES:
        return Approved(provider_reference=reference)
    if status == "requires_payment_method":
        error: object = getattr(intent, "last_payment_error", None)
        if error is None:
            return None  # created but never confirmed
        return Declined(
            code=_safe_code(_text(error, "decline_code") or _text(error, "code"), "card_declined"),
            message=_scrub(_text(error, "message") or "the payment was declined", *secrets),
        )
    if status == "requires_action":
        # Customer authentication (3-D Secure) is needed, and no customer is present
        # to give it: for this service, the charge was refused.
        return Declined(
            code="authentication_required",
            message="the payment method requires customer authentication",
        )
    if status == "canceled":
        return Declined(
            code=_safe_code(_text(intent, "cancellation_reason"), "canceled"),
            message="the PaymentIntent was canceled",
        )
    # processing, requires_confirmation: not final.
    return None


def _text(obj: object, name: str) -> str | None:
    # The SDK raises AttributeError for fields a response leaves out (localstripe leaves
    # out many, Stripe a few): absent and null mean the same here.
    value = getattr(obj, name, None)
    return value if isinstance(value, str) else None


def _describe(exc: stripe.StripeError) -> str:
    """Error type, HTTP status, Stripe code and request id: enough to debug, nothing secret."""
    parts = [type(exc).__name__]
    if exc.http_status is not None:
        parts.append(f"HTTP {exc.http_status}")
    if exc.code:
        parts.append(_safe_code(exc.code, "?"))
    if exc.request_id and _REQUEST_ID.fullmatch(exc.request_id):
        parts.append(f"request {exc.request_id}")
    cause = exc.__cause__
    if cause is not None:
        parts.append(type(cause).__name__)
    return ", ".join(parts)


__all__: Sequence[str] = [
    "API_BASE_VARIABLE",
    "API_KEY_VARIABLE",
    "IDEMPOTENCY_KEY_LIFETIME_S",
    "SEARCH_LAG_S",
    "STRIPE_THREE_DECIMAL",
    "STRIPE_TWO_DECIMAL_WHOLE_UNITS",
    "STRIPE_ZERO_DECIMAL",
    "Dialect",
    "ProcessorKind",
    "StripeAmountError",
    "StripeProcessor",
    "stripe_exponent",
    "to_stripe_amount",
    "validate_stripe_key",
]
