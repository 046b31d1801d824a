"""Stored event schema versions, and the upcasters that bring older shapes up to date.

Every stored event carries the schema version of its shape (`payment_events.
schema_version`; rows written before versions existed hold 1). Events are always written
in their type's current version. Reading an older one runs the chain of upcasters
`(type, n) -> n + 1`, pure functions on the event's JSON object, up to the current
version, and only then decodes it. A shape change that a tolerant reader absorbs (a new
field with a default) keeps its version; anything else (a rename, a new required field, a
changed meaning) bumps the version in `CURRENT_VERSIONS` and adds the upcaster from the
previous one here, with its own unit test (docs/operations.md, *Stored events*).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from payment.domain.errors import UnknownEventVersion
from payment.domain.events import AnyPaymentEvent, decode_event

EventData = dict[str, Any]
Upcaster = Callable[[EventData], EventData]

# The version each event type is written in (and decoded into).
CURRENT_VERSIONS: Final[Mapping[str, int]] = {
    "PaymentInitiated": 1,
    "ChargeAttempted": 1,
    "ChargeStarted": 1,
    "PaymentCompleted": 1,
    "PaymentFailed": 1,
    "PaymentFlaggedForReview": 1,
    "PaymentReviewResolved": 1,
    "RefundRequested": 1,
    "PaymentRefunded": 1,
    "RefundFailed": 1,
}

# (event type, version n) -> the upcaster from n to n + 1. None yet: every shape is still
# the one release 0.1.0 wrote (tests/fixtures/releases/ holds what each release wrote).
UPCASTERS: Final[Mapping[tuple[str, int], Upcaster]] = {}


def current_version(event_type: str) -> int:
    """The schema version `event_type` is written in now; KeyError for an unknown type."""
    return CURRENT_VERSIONS[event_type]


def upcast(
    event_type: str,
    version: int,
    data: EventData,
    *,
    current: Mapping[str, int] = CURRENT_VERSIONS,
    upcasters: Mapping[tuple[str, int], Upcaster] = UPCASTERS,
) -> EventData:
    """`data` of `event_type` at `version`, brought up to the current version.

    Raises `UnknownEventVersion` for an unknown type, a version below 1 or above the
    current one, or a missing link in the chain.
    """
    target = current.get(event_type)
    if target is None:
        raise UnknownEventVersion(event_type, version, "unknown event type")
    if version < 1 or version > target:
        raise UnknownEventVersion(event_type, version, f"this code reads versions 1 to {target}")
    for n in range(version, target):
        step = upcasters.get((event_type, n))
        if step is None:
            raise UnknownEventVersion(event_type, version, f"no upcaster from {n} to {n + 1}")
        data = step(data)
    return data


def decode_stored(
    event_type: str,
    version: int,
    data: bytes | str,
    *,
    current: Mapping[str, int] = CURRENT_VERSIONS,
    upcasters: Mapping[tuple[str, int], Upcaster] = UPCASTERS,
) -> AnyPaymentEvent:
    """The event of a stored row (its type, schema version and JSON), in the current shape.

    Raises `UnknownEventVersion` as `upcast` does, and msgspec's errors for data that does
    not decode into the current shape after upcasting.
    """
    if current.get(event_type) == version:
        return decode_event(data)  # the common case: no detour through a dict
    raw = msgspec.json.decode(data)
    if not isinstance(raw, dict):
        raise UnknownEventVersion(event_type, version, "stored data is not a JSON object")
    upcast_data = upcast(event_type, version, raw, current=current, upcasters=upcasters)
    event: AnyPaymentEvent = msgspec.convert(upcast_data, AnyPaymentEvent)
    return event
