"""Write statements prepared once per server session (SQL `PREPARE`), run by `EXECUTE`.

A unit of work sends its writes bound on the client, several to one simple-protocol
message (transaction.py): one round trip, and little of the service's CPU. PostgreSQL then
parses, analyses and plans each of them every time: a third of its CPU at 50 payments/s,
a fifth at 1,000/s (`perf`, docs/performance.md). So each statement with values sent
that way (the writes, and a read after them) is prepared once per session, in the message
of its first use, and sent as `EXECUTE name(values)`: still one message, its values still
bound on the client, and the server keeps the parse tree and, after a few executions, a
generic plan.

Prepared statements belong to the server session. The service already needs session
pooling behind PgBouncer (docs/operations.md), so a session's statements stay with its
connection. What each session holds is tracked per connection (`SessionStatements`), and
forgotten whenever it may have changed behind our back: a failed message (its PREPAREs up
to the failure ran, and PREPARE is not undone by a rollback) and a rollback (psycopg's
sends DEALLOCATE ALL when it prepared statements of its own, as it does at
`prepare_threshold=0`). The next message on that connection first reads
`pg_prepared_statements`. So code that rolls back a pooled connection other than through
the unit of work (`transaction.finish`) must `SESSIONS.forget` it (retention.py does), and
none may run DISCARD, DEALLOCATE or DDL on one (psycopg deallocates everything after
those too). A session that lost them all the same answers `invalid_sql_statement_name`
(26000): errors.py treats that as an outage of the connection, which the unit of work
closes; its caller retries as after any outage.
"""

from __future__ import annotations

import functools
import hashlib
import re
import weakref
from typing import NamedTuple

from payment.adapters.postgres.pool import Connection

# Our statements' names; psycopg names its own `_pg3_…`.
NAME_PREFIX = "payment_w_"
# More distinct statements than this in one session are sent as they are. The adapters
# have a few dozen (some in one form per row count, up to a bound); this only caps a bug.
MAX_PER_SESSION = 128

_HELD = f"SELECT name FROM pg_prepared_statements WHERE starts_with(name, '{NAME_PREFIX}')"
_PLACEHOLDER = re.compile(r"%%|%s|%")


class PreparedWrite(NamedTuple):
    """How one statement is prepared, and executed with its values bound on the client."""

    name: str
    prepare: str  # PREPARE name AS the statement, its placeholders numbered ($1, $2, …)
    execute: str  # EXECUTE name(%s, …): one client-side placeholder per value


@functools.lru_cache(maxsize=MAX_PER_SESSION * 2)
def prepared_form(query: str | bytes) -> PreparedWrite | None:
    """The prepared form of a statement whose values are `%s` placeholders; None for one
    without values (BEGIN) or with any other placeholder (named, binary): sent as it is."""
    text = query.decode() if isinstance(query, bytes) else query
    count = 0
    numbered: list[str] = []
    last = 0
    for match in _PLACEHOLDER.finditer(text):
        numbered.append(text[last : match.start()])
        last = match.end()
        if match.group() == "%%":
            numbered.append("%")
        elif match.group() == "%s":
            count += 1
            numbered.append(f"${count}")
        else:
            return None  # %(name)s, %b, %t: not worth a parser of our own
    numbered.append(text[last:])
    if count == 0:
        return None
    name = NAME_PREFIX + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return PreparedWrite(
        name=name,
        prepare=f"PREPARE {name} AS {''.join(numbered).strip()}",
        execute=f"EXECUTE {name}({', '.join(['%s'] * count)})",
    )


class SessionStatements:
    """Which of our statements each pooled connection's server session holds."""

    def __init__(self) -> None:
        self._held: weakref.WeakKeyDictionary[Connection, set[str]] = weakref.WeakKeyDictionary()

    async def held(self, conn: Connection) -> set[str]:
        """The names `conn`'s session holds (read from the server if not known)."""
        names = self._held.get(conn)
        if names is None:
            cur = await conn.execute(_HELD, prepare=False)
            names = {str(row[0]) for row in await cur.fetchall()}
            self._held[conn] = names
        return names

    def forget(self, conn: Connection) -> None:
        """`conn`'s session may have changed: read it again before the next message."""
        self._held.pop(conn, None)

    def to_prepare(self, held: set[str], forms: list[PreparedWrite]) -> list[PreparedWrite]:
        """The forms a message must prepare first: new to the session, each once, within
        `MAX_PER_SESSION`. The caller marks them held once the message succeeded."""
        new: dict[str, PreparedWrite] = {}
        for form in forms:
            if form.name not in held and len(held) + len(new) < MAX_PER_SESSION:
                new.setdefault(form.name, form)
        return list(new.values())


# The sessions of every pool of the process (connections are told apart by identity).
SESSIONS = SessionStatements()
