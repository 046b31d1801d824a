"""A consumed broker record for tests that run without a broker (the sending side's fake
is in record_senders.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

Headers = Sequence[tuple[str, bytes | None]]


class ConsumedRecord(NamedTuple):
    """A record as a consumer hands it over (what `ports.ConsumedRecord` reads)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
