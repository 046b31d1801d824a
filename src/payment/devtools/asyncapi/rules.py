"""Rules of contract section 3 that the msgspec types do not carry, overlaid on their schemas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import msgspec

from payment.application import messages as contract
from payment.domain.money import CURRENCY_EXPONENTS, DEFAULT_MAX_AMOUNT

Schema = dict[str, Any]

# --- Rules of contract section 3 that the msgspec types do not carry ----------------------
#
# The message types are lenient on purpose: a request that decodes but breaks a rule must
# be answered with `payment.failed` / `invalid_request` (contract 4.4), not dead-lettered as
# undecodable (4.5), so `msgspec.Meta` constraints on them would change behaviour. The rules
# are overlaid on the generated schemas here instead; tests/contract/test_asyncapi.py checks
# them against payment.application.validation and payment.domain.money.

BOOKING_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,64}$"
MAX_ID_CHARS: Final = 64
MAX_PAYMENT_METHOD_CHARS: Final = 255
MIN_AMOUNT: Final = 1
CURRENCIES: Final = tuple(sorted(CURRENCY_EXPONENTS))
FAILURE_REASONS: Final = tuple(sorted(contract.PUBLISHED_FAILURE_REASONS))
MAX_REASON_CHARS: Final = 255

_UUID: Final[Schema] = {"format": "uuid"}
_TIMESTAMP: Final[Schema] = {"format": "date-time", "description": "RFC 3339, UTC."}
_VERSION: Final[Schema] = {
    "minimum": 1,
    "description": "The event's version in its payment stream (also sent as `ce_sequence`).",
}
_CURRENCY: Final[Schema] = {
    "enum": list(CURRENCIES),
    "description": "ISO 4217 alphabetic code, uppercase, from the service's allowlist.",
}


class Overlay(NamedTuple):
    """Contract rules added to the generated schema of one message type.

    `required` lists optional fields of the type that a valid message must carry anyway
    (non-null); `fields` maps a field to the JSON Schema keywords it gains (on the non-null
    branch of a nullable field). Naming an unknown field, or contradicting a keyword msgspec
    generated, raises `ValueError`, so an overlay cannot silently outlive its field.
    """

    required: tuple[str, ...] = ()
    fields: Mapping[str, Schema] = {}


def _requested_booking(description: str) -> Schema:
    """The booking id of a request: validated, so it is a valid one."""
    return {
        "pattern": BOOKING_ID_PATTERN,
        "minLength": 1,
        "maxLength": MAX_ID_CHARS,
        "description": description,
    }


def _requested_amount(description: str) -> Schema:
    return {"minimum": MIN_AMOUNT, "maximum": DEFAULT_MAX_AMOUNT, "description": description}


# The ids every event of an accepted payment carries (a rejection echoes what it got).
_OF_A_PAYMENT: Final[Mapping[str, Schema]] = {
    "payment_id": _UUID,
    "booking_id": {"pattern": BOOKING_ID_PATTERN},
    "saga_id": {"maxLength": MAX_ID_CHARS},
}


OVERLAYS: Final[Mapping[type[msgspec.Struct], Overlay]] = {
    contract.RequestPaymentMessage: Overlay(
        required=("amount", "currency", "payment_method"),
        fields={
            "booking_id": _requested_booking("The booking to charge; one payment per booking."),
            "amount": _requested_amount(
                "Integer number of minor units of `currency` (not a float, not a string). "
                "The maximum is the default of `PAYMENT_MAX_AMOUNT`; a deployment may set "
                "another."
            ),
            "currency": _CURRENCY,
            "payment_method": {
                "minLength": 1,
                "maxLength": MAX_PAYMENT_METHOD_CHARS,
                "description": (
                    "Gateway token. A 13-19 digit Luhn-valid number (a card number) is "
                    "rejected with `invalid_request` and never stored, logged or published."
                ),
            },
            "customer_id": {"maxLength": MAX_ID_CHARS},
            "saga_id": {
                "maxLength": MAX_ID_CHARS,
                "description": "Echoed on every outcome event.",
            },
        },
    ),
    contract.PaymentInitiatedMessage: Overlay(
        fields={
            **_OF_A_PAYMENT,
            "amount": {"minimum": MIN_AMOUNT},
            "currency": _CURRENCY,
            "customer_id": {"maxLength": MAX_ID_CHARS},
            "initiated_at": _TIMESTAMP,
            "version": _VERSION,
        },
    ),
    contract.PaymentCompletedMessage: Overlay(
        fields={
            **_OF_A_PAYMENT,
            "amount": {"minimum": MIN_AMOUNT},
            "currency": _CURRENCY,
            "processor": {"description": "The gateway that charged, e.g. `fake`, `stripe`."},
            "provider_reference": {"description": "The gateway's id of the charge."},
            "completed_at": _TIMESTAMP,
            "version": _VERSION,
        },
    ),
    # booking_id and saga_id are echoed as received: a rejection may carry invalid ones.
    contract.PaymentFailedMessage: Overlay(
        fields={
            "payment_id": {**_UUID, "description": "Absent when no payment was created."},
            "reason": {
                "enum": list(FAILURE_REASONS),
                "description": (
                    "`declined` by the gateway; `invalid_request` (a rule of the request was "
                    "broken, no processor call); `processor_unavailable` (the gateway could "
                    "not be reached and no charge can have happened); `cancelled` (a refund "
                    "for the booking arrived before its payment request and closed it: "
                    "nothing was charged, no payment exists)."
                ),
            },
            "detail": {"description": "Human-readable; never secrets or card data."},
            "failed_at": _TIMESTAMP,
            "version": {**_VERSION, "description": "Absent when no payment was created."},
        },
    ),
    contract.RefundPaymentMessage: Overlay(
        fields={
            "booking_id": _requested_booking("The booking whose payment to refund."),
            "amount": _requested_amount(
                "Minor units to refund, at most what is still refundable; absent: all "
                "that is still refundable (nothing left: `over_refund`)."
            ),
            "reason": {
                "maxLength": MAX_REASON_CHARS,
                "description": "Stored with the refund; never card data.",
            },
            "saga_id": {"maxLength": MAX_ID_CHARS, "description": "Echoed on the outcome."},
        },
    ),
    contract.PaymentRefundedMessage: Overlay(
        fields={
            **_OF_A_PAYMENT,
            "refund_id": {**_UUID, "description": "One per refund request."},
            "amount": {"minimum": MIN_AMOUNT, "description": "This refund's amount."},
            "refunded_total": {
                "minimum": MIN_AMOUNT,
                "description": "All refunded of the payment so far, this refund included.",
            },
            "currency": _CURRENCY,
            "provider_reference": {"description": "The gateway's id of the refund."},
            "refunded_at": _TIMESTAMP,
            "version": _VERSION,
        },
    ),
    contract.PaymentRefundFailedMessage: Overlay(
        fields={
            "payment_id": {**_UUID, "description": "Absent when the booking has no payment."},
            "refund_id": {**_UUID, "description": "Absent when no refund was created."},
            "reason": {
                "enum": sorted(contract.REFUND_FAILED_REASONS),
                "description": (
                    "`not_charged` (the payment failed, or never existed: the booking is then "
                    "closed); `over_refund` (more than is still refundable); `declined` by the "
                    "gateway; `invalid_request` (a rule of the request was broken)."
                ),
            },
            "detail": {"description": "Human-readable; never secrets or card data."},
            "failed_at": _TIMESTAMP,
            "version": {
                **_VERSION,
                "description": "The payment stream's version; absent when there is no payment.",
            },
        },
    ),
}


def apply_overlay(schema: Schema, overlay: Overlay) -> Schema:
    """`schema` (one generated object schema) with the overlay's rules added; a new dict."""
    result: Schema = msgspec.json.decode(msgspec.json.encode(schema))  # a deep copy
    properties: dict[str, Schema] = result["properties"]
    for name in (*overlay.required, *overlay.fields):
        if name not in properties:
            raise ValueError(f"overlay names {name!r}, not a field of {result.get('title')}")
    for name in overlay.required:
        properties[name] = _without_null(properties[name])
    for name, rules in overlay.fields.items():
        # Annotations describe the field; assertions constrain its (non-null) value.
        notes = {key: value for key, value in rules.items() if key in _ANNOTATIONS}
        checks = {key: value for key, value in rules.items() if key not in _ANNOTATIONS}
        _merge(properties[name], notes, name)
        _merge(_non_null_branch(properties[name]), checks, name)
    required = set(result.get("required", ())) | set(overlay.required)
    result["required"] = [name for name in properties if name in required]
    return result


_ANNOTATIONS: Final = frozenset({"title", "description", "examples"})


def _without_null(field: Schema) -> Schema:
    branches = field.get("anyOf")
    if branches is None:
        return field
    kept = [branch for branch in branches if branch != {"type": "null"}]
    if len(kept) != 1:
        raise ValueError(f"cannot make a required field of {field}")
    rest = {key: value for key, value in field.items() if key not in ("anyOf", "default")}
    return {**kept[0], **rest}


def _non_null_branch(field: Schema) -> Schema:
    branches = field.get("anyOf")
    if branches is None:
        return field
    kept = [branch for branch in branches if branch != {"type": "null"}]
    if len(kept) != 1:
        raise ValueError(f"cannot apply rules to {field}")
    target: Schema = kept[0]
    return target


def _merge(target: Schema, rules: Schema, name: str) -> None:
    for key, value in rules.items():
        if key in target and target[key] != value:
            raise ValueError(f"overlay on {name!r} contradicts generated {key!r}")
        target[key] = value
