"""bench/ids.py's id maker swap: every module that uses `new_id` gets the kind, then back."""

from __future__ import annotations

import uuid

import payment.application.handlers.request as request_handler
import payment.domain.payment as payment_module
from payment.domain import ids
from support.bench_scripts import load_bench_script

bench_ids = load_bench_script("ids")


def test_a_kind_reaches_every_module_that_makes_ids_and_leaves_them_as_they_were() -> None:
    original = ids.new_id

    with bench_ids.ids_of_kind(uuid.uuid4):
        assert payment_module.new_id is uuid.uuid4
        assert request_handler.new_id is uuid.uuid4
        assert ids.new_id is original

    assert payment_module.new_id is original
    assert request_handler.new_id is original


def test_the_bench_v7_kind_is_the_service_id_maker() -> None:
    assert bench_ids.KINDS["v7"] is ids.new_id
    assert bench_ids.KINDS["v4"] is uuid.uuid4
