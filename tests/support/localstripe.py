"""localstripe (a Stripe API emulator) in a subprocess, and pytest fixtures around it."""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from payment.adapters.processors.stripe import StripeProcessor
from payment.domain.money import Money
from payment.domain.processor import ChargeRequest

from .net import free_port
from .proxy import TcpProxy
from .server_process import ServerProcess

API_KEY = "sk_test_localstripe"  # localstripe accepts any sk_ key; sandbox needs sk_test_

# localstripe pickles its whole store to /tmp/localstripe.pickle after every write: slow,
# and shared by every instance on the machine. Each test instance keeps its store in memory.
_BOOT = """
import sys
import localstripe.resources
localstripe.resources.Store.dump_to_disk = lambda self: None
from localstripe.server import start
sys.argv = ["localstripe", *sys.argv[1:]]
start()
"""


class LocalStripe:
    """One localstripe process on a free port, from scratch."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server = ServerProcess("localstripe")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> LocalStripe:
        self._server.start(
            [sys.executable, "-c", _BOOT, "--port", str(self.port), "--from-scratch"],
            probe=lambda: httpx.get(
                f"{self.url}/v1/payment_intents", auth=(API_KEY, ""), timeout=1.0
            ),
            timeout_s=timeout_s,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> LocalStripe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- an oracle independent of the adapter under test ---------------------------------

    def payment_intents(self) -> list[dict[str, Any]]:
        """Every PaymentIntent the emulator holds, read with plain HTTP."""
        intents: list[dict[str, Any]] = []
        params: dict[str, str | int] = {"limit": 100}
        with httpx.Client(base_url=self.url, auth=(API_KEY, ""), timeout=5.0) as client:
            while True:
                page = client.get("/v1/payment_intents", params=params).raise_for_status().json()
                intents += page["data"]
                if not page["has_more"] or not page["data"]:
                    return intents
                params = {"limit": 100, "starting_after": page["data"][-1]["id"]}

    def refunds(self) -> list[dict[str, Any]]:
        """Every Refund the emulator holds, read with plain HTTP."""
        refunds: list[dict[str, Any]] = []
        params: dict[str, str | int] = {"limit": 100}
        with httpx.Client(base_url=self.url, auth=(API_KEY, ""), timeout=5.0) as client:
            while True:
                page = client.get("/v1/refunds", params=params).raise_for_status().json()
                refunds += page["data"]
                if not page["has_more"] or not page["data"]:
                    return refunds
                params = {"limit": 100, "starting_after": page["data"][-1]["id"]}

    def intents_for(self, payment_id: uuid.UUID) -> list[dict[str, Any]]:
        """The PaymentIntents whose metadata names this payment."""
        wanted = str(payment_id)
        return [i for i in self.payment_intents() if i["metadata"].get("payment_id") == wanted]


def charge_request(
    payment_method: str = "pm_card_visa",
    *,
    amount: int = 1000,
    currency: str = "EUR",
    booking_id: str | None = None,
) -> ChargeRequest:
    """A fresh charge (new payment id, new idempotency key)."""
    return ChargeRequest(
        payment_id=uuid.uuid4(),
        booking_id=booking_id or f"bk-{uuid.uuid4().hex[:12]}",
        money=Money.of(amount, currency),
        payment_method=payment_method,
        idempotency_key=uuid.uuid4(),
    )


def sandbox_processor(url: str, **kwargs: Any) -> StripeProcessor:
    """A sandbox StripeProcessor speaking localstripe's dialect at `url`."""
    # Generous: localstripe's list (the lookup) slows down as a session's store grows.
    options: dict[str, Any] = {"name": "sandbox", "dialect": "localstripe", "timeout_s": 10.0}
    options.update(kwargs)
    return StripeProcessor(API_KEY, api_base=url, **options)


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def localstripe() -> Iterator[LocalStripe]:
    """The session's localstripe; tests tell their data apart by fresh payment ids."""
    with LocalStripe() as server:
        yield server


@pytest_asyncio.fixture
async def stripe_processor(localstripe: LocalStripe) -> AsyncIterator[StripeProcessor]:
    """A sandbox StripeProcessor talking to localstripe directly."""
    async with sandbox_processor(localstripe.url) as processor:
        yield processor


@pytest_asyncio.fixture
async def stripe_proxy(localstripe: LocalStripe) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of localstripe, forwarding until told otherwise."""
    async with TcpProxy("127.0.0.1", localstripe.port) as proxy:
        yield proxy


@pytest_asyncio.fixture
async def proxied_processor(stripe_proxy: TcpProxy) -> AsyncIterator[StripeProcessor]:
    """A sandbox StripeProcessor whose every byte goes through `stripe_proxy`."""
    async with sandbox_processor(stripe_proxy.url, timeout_s=10.0) as processor:
        yield processor


@contextlib.contextmanager
def own_localstripe() -> Iterator[LocalStripe]:
    """A private localstripe, for tests that stop it."""
    with LocalStripe() as server:
        yield server
