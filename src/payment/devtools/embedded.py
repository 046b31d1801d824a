"""Embedded Kafka-compatible broker and PostgreSQL child processes for `dev` and the tests.

The servers live in modules of their own (embedded_broker, embedded_postgres) on the
child-process supervision they share (child_process); this module names them together
with their errors.
"""

from __future__ import annotations

from payment.devtools.child_process import EmbeddedError, EmbeddedExtraMissing, EmbeddedStartError
from payment.devtools.embedded_broker import EmbeddedBroker
from payment.devtools.embedded_postgres import EmbeddedPostgres

__all__ = [
    "EmbeddedBroker",
    "EmbeddedError",
    "EmbeddedExtraMissing",
    "EmbeddedPostgres",
    "EmbeddedStartError",
]
