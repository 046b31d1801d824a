"""Race helpers shared by the port contract suites."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from payment.application.errors import RETRYABLE_CONFLICTS
from payment.application.ports import UnitOfWork, UnitOfWorkFactory

Write = Callable[[UnitOfWork], Awaitable[object]]


async def attempt(uow_factory: UnitOfWorkFactory, write: Write) -> bool:
    """Run `write` in a fresh unit of work and commit; False if it lost a race."""
    try:
        async with uow_factory() as uow:
            if await write(uow) is False:
                return False
            await uow.commit()
    except RETRYABLE_CONFLICTS:
        return False
    return True


async def race(uow_factory: UnitOfWorkFactory, first: Write, second: Write) -> tuple[bool, bool]:
    """Two writers overlapping: `first` writes, `second` writes and commits meanwhile,
    then `first` commits. Which of them each adapter lets win may differ (PostgreSQL
    makes `second` wait for `first`; memory finds the clash at commit); the contract is
    that exactly one does."""
    async with uow_factory() as uow:
        await first(uow)
        second_task = asyncio.create_task(attempt(uow_factory, second))
        # Long enough for `second` to reach its write (and block there, on PostgreSQL).
        await asyncio.sleep(0.1)
        try:
            await uow.commit()
            first_won = True
        except RETRYABLE_CONFLICTS:
            first_won = False
    return first_won, await second_task
