"""The event loop of `payment-service run`: uvloop when installed, asyncio's otherwise."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest
from aiokafka.conn import AIOKafkaConnection

from payment.runtime import event_loop


@pytest.fixture(autouse=True)
def aiokafka_as_it_was(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`run` wraps aiokafka's writing methods on uvloop: put them back afterwards."""
    for name in ("send", "_send_sasl_token"):
        monkeypatch.setattr(AIOKafkaConnection, name, getattr(AIOKafkaConnection, name))
    yield


async def _running_loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_run_answers_the_coroutines_result_on_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert event_loop.run(_running_loop_type()) is uvloop.Loop


def test_on_uvloop_aiokafka_takes_a_write_to_a_reset_connection_as_a_connection_error() -> None:
    pytest.importorskip("uvloop")
    event_loop.run(_running_loop_type())
    for name in ("send", "_send_sasl_token"):
        assert getattr(AIOKafkaConnection, name)._payment_tolerates_closed_transports


def test_without_uvloop_the_service_runs_on_asyncios_own_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    send = AIOKafkaConnection.send

    loop_type = event_loop.run(_running_loop_type())

    assert loop_type.__module__.startswith("asyncio")
    assert AIOKafkaConnection.send is send  # nothing to work around on asyncio's loop


def test_an_error_of_the_coroutine_comes_out_of_run() -> None:
    async def fail() -> None:
        raise LookupError("from the service")

    with pytest.raises(LookupError, match="from the service"):
        event_loop.run(fail())
