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

from collections.abc import Sequence
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()


def json_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a JSON array of objects (keys are the recordset's column names)."""
    return _encoder.encode(rows).decode()
