"""Topic names of one test, so tests sharing a broker never see each other's messages."""

from __future__ import annotations

import uuid

from payment.adapters.kafka.topics import Topics


def unique_topics(prefix: str) -> Topics:
    """Every topic the service uses, its contract name under a fresh `prefix-…` prefix."""
    base = f"{prefix}-{uuid.uuid4().hex[:10]}"
    contract = Topics()
    names = {name: f"{base}.{getattr(contract, name)}" for name in Topics.__struct_fields__}
    return Topics(**names)
