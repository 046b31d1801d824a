"""Optimistic conflicts: a unit of work a concurrent writer got in first is done again afresh."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from payment.application.errors import RETRYABLE_CONFLICTS
from payment.application.ports import UnitOfWork, UnitOfWorkFactory
from payment.domain.payment import Payment

# Bounds a pathological storm of writers of one payment or booking.
MAX_CONFLICT_RETRIES = 10

T = TypeVar("T")


async def retrying(
    uow_factory: UnitOfWorkFactory, work: Callable[[UnitOfWork], Awaitable[T]], what: str
) -> T:
    """`work` in a fresh unit of work, again while a concurrent writer refuses it (the
    optimistic lock, a booking claimed first): each try reads what the winner left."""
    for _ in range(MAX_CONFLICT_RETRIES):
        try:
            async with uow_factory() as uow:
                return await work(uow)
        except RETRYABLE_CONFLICTS:
            continue
    raise RuntimeError(f"{what}: too many conflicting writers")


def loaded_once(
    payment_id: uuid.UUID, known: Payment | None
) -> Callable[[UnitOfWork], Awaitable[Payment]]:
    """The payment for each try of `retrying`: `known` (as loaded before) for the first,
    read afresh for every later one (someone wrote meanwhile) or when nothing is known.

    The first try then costs no second read: the optimistic lock on `known`'s version
    still refuses the save if anyone wrote since it was loaded.
    """
    unused = [known] if known is not None else []

    async def current(uow: UnitOfWork) -> Payment:
        return unused.pop() if unused else await uow.load(payment_id)

    return current
