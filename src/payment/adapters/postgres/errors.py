"""Which PostgreSQL errors are an outage to wait out, judged by SQLSTATE class.

psycopg's Python classes do not follow outages: a read-only transaction after a failover
(25006) is an `InternalError`, a lost connection an `OperationalError`, and so is a
syntax of ours the server refuses in some classes. The SQLSTATE says what happened, so
the decision is made on it (PostgreSQL, Appendix A):

- `08` connection exception, `53` insufficient resources (too many connections, disk
  or memory full), `57P0x` the server shutting down or not yet accepting connections,
  `58` system error (I/O), `57014` a statement cancelled (a timeout under load);
- `25006` read-only transaction: a standby promoted or not yet, a database switched
  read-only for maintenance: the next connection may reach a primary;
- `40001` serialization failure and `40P01` deadlock: the transaction lost, a new one
  may win; `55P03` a lock not available now;
- `26000` a prepared statement the session does not hold, `42P05` one it holds already:
  the session is not what the connection's bookkeeping says (prepared_writes.py); a
  fresh connection starts from nothing.

An error without a SQLSTATE that psycopg raises as `OperationalError` (no connection, a
connection lost mid-statement, no free connection in the pool) is an outage too.
Everything else (a constraint, a type, a bug) is not, and must not be retried forever.
"""

from __future__ import annotations

from typing import Final

import psycopg

TRANSIENT_CLASSES: Final = frozenset({"08", "53", "58"})
# The session's prepared statements are not what the connection's bookkeeping says.
PREPARED_STATEMENT_STATES: Final = frozenset({"26000", "42P05"})
TRANSIENT_STATES: Final = frozenset(
    {"25006", "40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "57P04", "57P05"}
    | PREPARED_STATEMENT_STATES
)
# After these the connection itself is suspect (it reaches a read-only server, or one
# going away, or its session's prepared statements are unknown): the pool must not hand
# it out again.
DISCARD_CONNECTION_STATES: Final = frozenset(
    {"25006", "57P01", "57P02", "57P03"} | PREPARED_STATEMENT_STATES
)


def is_transient(exc: BaseException) -> bool:
    """True if `exc` is a database error to wait out and retry, never to give up on."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in TRANSIENT_CLASSES or state in TRANSIENT_STATES


def discards_connection(exc: BaseException) -> bool:
    """True if the connection that raised `exc` should be closed rather than reused."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate in DISCARD_CONNECTION_STATES
