"""Identifiers the service makes for what it stores: UUID version 7 (RFC 9562).

A version 7 UUID starts with the Unix time in milliseconds, so the ids made one after the
other sort next to each other. The B-tree indexes keyed on them (a payment's stream, the
event ids, the inbox entries of the events the service consumes itself) then grow at
their right edge, where version 4's random ids touch a leaf page anywhere in the index
for each insert: more pages dirty in memory, and each written to the WAL in full the
first time it changes after a checkpoint. Ids no index holds (the gateway's idempotency
keys, a charge attempt's `charger`) stay version 4.

The order is for the indexes only: nothing reads meaning into it, so a wall clock that
steps back costs locality, not correctness (the 74 random bits keep the ids apart).
"""

from __future__ import annotations

import secrets
import time
import uuid

_MS_MASK = (1 << 48) - 1
_RAND_B_BITS = 62
_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0b10 << 62


def new_id() -> uuid.UUID:
    """A fresh UUIDv7: 48 bits of Unix milliseconds, the version, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = secrets.randbits(12 + _RAND_B_BITS)  # rand_a (12 bits), then rand_b
    rand_a = rand >> _RAND_B_BITS
    rand_b = rand & ((1 << _RAND_B_BITS) - 1)
    return uuid.UUID(int=(ms & _MS_MASK) << 80 | _VERSION_7 | rand_a << 64 | _VARIANT_RFC | rand_b)
