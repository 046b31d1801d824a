"""bench/offered_requests.py: the load generator's schedule, requests and outcomes."""

from __future__ import annotations

import msgspec

from support.bench_scripts import load_bench_script

offered = load_bench_script("offered_requests")


def test_no_request_goes_before_its_time() -> None:
    start, rate = 100.0, 100.0
    assert offered.requests_due(start - 0.0099, start, rate, 50) == 0  # was 1: 10 ms early
    assert offered.requests_due(start - 1.0, start, rate, 50) == 0
    assert offered.requests_due(start, start, rate, 50) == 1
    assert offered.requests_due(start + 0.0099, start, rate, 50) == 1
    assert offered.requests_due(start + 0.0101, start, rate, 50) == 2
    assert offered.requests_due(start + 60, start, rate, 50) == 50  # never more than offered


def test_a_request_is_a_cloudevent_for_a_new_booking() -> None:
    value, headers = offered.request_message("b-1", b"bench-e2e-x")
    _, other = offered.request_message("b-1", b"bench-e2e-x")
    assert msgspec.json.decode(value) == {
        "booking_id": "b-1",
        "amount": 1999,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "saga_id": "saga-b-1",
    }
    named = dict(headers)
    assert named["ce_type"] == b"saga.request_payment" and named["ce_source"] == b"bench-e2e-x"
    assert named["ce_id"] != dict(other)["ce_id"]


def test_only_an_outcome_names_a_booking() -> None:
    assert offered.outcome_booking(b'{"booking_id": "b-1", "status": "COMPLETED"}') == "b-1"
    assert offered.outcome_booking(None) is None
    assert offered.outcome_booking(b"not json") is None
    assert offered.outcome_booking(b'{"payment_id": "p-1"}') is None
    assert offered.outcome_booking(b'{"booking_id": 7}') is None
