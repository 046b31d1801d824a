"""Which errors mean "the database or the broker is unreachable right now"."""

from __future__ import annotations

from aiokafka.errors import KafkaError

from payment.adapters.postgres.errors import is_transient as is_transient_database_error

# The consumer retries these for as long as they last and never dead-letters because of
# them. Database errors are judged by SQLSTATE class (adapters/postgres/errors.py), not
# by Python type.
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (KafkaError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """True for an outage of the database or the broker: wait and retry, never park."""
    return isinstance(exc, _TRANSIENT_TYPES) or is_transient_database_error(exc)
