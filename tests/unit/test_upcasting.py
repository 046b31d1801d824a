"""Stored event schema versions: upcasting, refusals, and the guard on shape changes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from payment.domain import events
from payment.domain.errors import UnknownEventVersion
from payment.domain.events import PaymentCompleted, encode_event
from payment.domain.upcasting import (
    CURRENT_VERSIONS,
    UPCASTERS,
    EventData,
    Upcaster,
    decode_stored,
    upcast,
)

SCHEMAS = Path(__file__).parents[1] / "fixtures" / "event_schemas.json"

# One example per upcaster of UPCASTERS: (type, from version) -> (data before, data after).
# Adding an upcaster without its example fails test_every_upcaster_has_its_example.
EXAMPLES: dict[tuple[str, int], tuple[EventData, EventData]] = {}

COMPLETED = PaymentCompleted(
    event_id=uuid.UUID("00000000-0000-4000-8000-000000000003"),
    payment_id=uuid.UUID("00000000-0000-4000-8000-0000000000aa"),
    version=3,
    occurred_at=datetime(2026, 1, 5, 9, 0, 1, tzinfo=UTC),
    processor="fake",
    provider_reference="fake_ref",
)


def renamed_reference(data: EventData) -> EventData:
    """A made-up v1 -> v2 step: `provider_ref` became `provider_reference`."""
    data = dict(data)
    data["provider_reference"] = data.pop("provider_ref")
    return data


def with_processor(data: EventData) -> EventData:
    """A made-up v2 -> v3 step: `processor` became required (v2 rows were all `fake`)."""
    return {"processor": "fake", **data}


CHAIN: dict[tuple[str, int], Upcaster] = {
    ("PaymentCompleted", 1): renamed_reference,
    ("PaymentCompleted", 2): with_processor,
}
AT_3 = {**CURRENT_VERSIONS, "PaymentCompleted": 3}


def v1_completed() -> EventData:
    data: dict[str, Any] = json.loads(encode_event(COMPLETED))
    data["provider_ref"] = data.pop("provider_reference")
    del data["processor"]
    return data


def test_current_version_decodes_as_written() -> None:
    assert decode_stored("PaymentCompleted", 1, encode_event(COMPLETED)) == COMPLETED


def test_an_old_version_runs_every_upcaster_in_order_then_decodes() -> None:
    stored = json.dumps(v1_completed())
    assert decode_stored("PaymentCompleted", 1, stored, current=AT_3, upcasters=CHAIN) == (
        COMPLETED
    )


def test_a_chain_starts_at_the_stored_version() -> None:
    v2 = renamed_reference(v1_completed())
    assert upcast("PaymentCompleted", 2, v2, current=AT_3, upcasters=CHAIN) == json.loads(
        encode_event(COMPLETED)
    )


def test_the_current_version_is_not_touched() -> None:
    data = json.loads(encode_event(COMPLETED))
    assert upcast("PaymentCompleted", 3, data, current=AT_3, upcasters=CHAIN) is data


@pytest.mark.parametrize(
    ("version", "says"),
    [(4, "reads versions 1 to 3"), (0, "reads versions 1 to 3")],
)
def test_a_version_outside_the_known_ones_is_refused(version: int, says: str) -> None:
    with pytest.raises(UnknownEventVersion, match=says) as caught:
        upcast("PaymentCompleted", version, {}, current=AT_3, upcasters=CHAIN)
    assert (caught.value.event_type, caught.value.version) == ("PaymentCompleted", version)


def test_a_missing_link_is_refused() -> None:
    with pytest.raises(UnknownEventVersion, match="no upcaster from 2 to 3"):
        first_only = {("PaymentCompleted", 1): renamed_reference}
        upcast("PaymentCompleted", 1, v1_completed(), current=AT_3, upcasters=first_only)
    with pytest.raises(UnknownEventVersion, match="no upcaster from 1 to 2"):
        upcast("PaymentCompleted", 1, v1_completed(), current=AT_3, upcasters={})


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(UnknownEventVersion, match="unknown event type"):
        decode_stored("PaymentTeleported", 1, b"{}")


def test_a_version_written_by_a_later_release_is_refused() -> None:
    with pytest.raises(UnknownEventVersion, match="reads versions 1 to 1"):
        decode_stored("PaymentCompleted", 2, encode_event(COMPLETED))


def test_upcasted_data_that_still_does_not_fit_is_an_error() -> None:
    broken = {("PaymentCompleted", 1): lambda data: data, ("PaymentCompleted", 2): with_processor}
    with pytest.raises(msgspec.ValidationError, match="provider_reference"):
        decode_stored(
            "PaymentCompleted", 1, json.dumps(v1_completed()), current=AT_3, upcasters=broken
        )


def test_every_event_type_has_a_version() -> None:
    tagged = {cls.__name__ for cls in events.AnyPaymentEvent.__args__}  # type: ignore[attr-defined]
    assert set(CURRENT_VERSIONS) == tagged


def test_every_upcaster_has_its_example() -> None:
    assert set(UPCASTERS) == set(EXAMPLES)
    for key, (before, after) in EXAMPLES.items():
        assert UPCASTERS[key](before) == after, key


def test_every_older_version_has_its_upcaster() -> None:
    for kind, current in CURRENT_VERSIONS.items():
        for n in range(1, current):
            assert (kind, n) in UPCASTERS, f"{kind}: no upcaster from {n} to {n + 1}"


def shape(kind: str) -> Any:
    """The event type's JSON schema without its prose (a docstring is not a shape)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("description", "title")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(msgspec.json.schema(getattr(events, kind)))


@pytest.mark.parametrize("kind", sorted(CURRENT_VERSIONS))
def test_a_shape_change_bumps_the_version(kind: str) -> None:
    """Each version's shape is recorded in tests/fixtures/event_schemas.json, never edited.

    A changed field without a new version (and its upcaster) fails here. To add version
    N: bump CURRENT_VERSIONS, add the upcaster from N-1 with its example above, and add
    `"N": shape(kind)` next to the earlier versions in the file.
    """
    recorded = json.loads(SCHEMAS.read_text(encoding="utf-8"))[kind]
    version = str(CURRENT_VERSIONS[kind])
    assert version in recorded, f"{kind} v{version}: its shape is not recorded"
    assert shape(kind) == recorded[version], (
        f"{kind}'s stored shape changed but its schema version is still {version}: "
        "bump it and add an upcaster (domain/upcasting.py)"
    )
