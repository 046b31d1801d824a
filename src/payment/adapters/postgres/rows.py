"""Many rows as one JSON parameter, for statements that read them with json_to_recordset.

A batch statement built from scalar parameters needs a different text for every row
count, and psycopg spends a few microseconds binding each parameter: for a few hundred
rows of a consumer batch, binding costs more than the statement. One JSON array, encoded
by msgspec in C, is a single text parameter of one fixed statement; PostgreSQL's
json_to_recordset turns it back into typed rows (UUIDs, RFC 3339 timestamps and integers
as msgspec writes them). Measured on this machine for 200 outbox-like rows: about 3 µs
of client CPU per row, against about 25 with VALUES rows of scalar parameters or with
unnest() over arrays.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()


def json_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a JSON array of objects (keys are the recordset's column names)."""
    return _encoder.encode(rows).decode()


def int_array(values: Iterable[int]) -> str:
    """An array literal of integers (`{1,2,3}`), for a `%s::bigint[]` parameter.

    psycopg binds a list element by element in Python (1.6 µs per integer, 5.3 per UUID
    here); one text value costs 0.3 and 1.7. Digits, hex and dashes need no quoting.
    """
    return "{" + ",".join(str(int(v)) for v in values) + "}"


def uuid_array(values: Iterable[uuid.UUID]) -> str:
    """An array literal of UUIDs, for a `%s::uuid[]` parameter (see `int_array`)."""
    return "{" + ",".join(str(v) for v in values) + "}"
