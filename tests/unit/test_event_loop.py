"""The event loop of `payment-service run`: uvloop when installed, asyncio's otherwise."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop
from aiokafka.conn import AIOKafkaConnection

from payment.runtime import event_loop


async def _running_loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_run_answers_the_coroutines_result_on_uvloop_when_installed() -> None:
    assert event_loop.run(_running_loop_type()) is uvloop.Loop


def test_on_uvloop_aiokafka_takes_a_write_to_a_reset_connection_as_a_connection_error() -> None:
    event_loop.run(_running_loop_type())
    assert getattr(AIOKafkaConnection.send, "_payment_tolerates_closed_transports", False)


def test_without_uvloop_the_service_runs_on_asyncios_own_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError

    loop_type = event_loop.run(_running_loop_type())

    assert loop_type is not uvloop.Loop
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_an_error_of_the_coroutine_comes_out_of_run() -> None:
    async def fail() -> None:
        raise LookupError("from the service")

    with pytest.raises(LookupError, match="from the service"):
        event_loop.run(fail())
