"""Past payments written straight into the service's tables, for benches of a big store.

`write_past_payments(url, kind, n)`: n completed payments in the service's tables (three
events, the payment's row, two published outbox rows, two inbox entries each; rows of
the size the service writes, the events' data filler rather than decodable events), with
ids of `kind` ("v4": random; "v7": one millisecond apart, ending n ms before now, so
older than any id made afterwards), then VACUUM ANALYZE and a CHECKPOINT, so that what
follows starts where a checkpoint left the pages. Takes about a minute a million.
"""

from __future__ import annotations

import time

import psycopg

KINDS = ("v4", "v7")

# An id of the kind for row i of n, in SQL: v4 random; v7 one millisecond per row, ending
# `n` ms before now, then random bits (version and variant nibbles set).
_SQL_ID = {
    "v4": "gen_random_uuid()",
    "v7": (
        "(lpad(to_hex((extract(epoch FROM now()) * 1000)::bigint - {n} + i), 12, '0')"
        " || '7' || substr(md5(random()::text), 1, 3)"
        " || to_hex(8 + floor(random() * 4)::int) || substr(md5(random()::text), 1, 15))::uuid"
    ),
}

_PREFILL = """
CREATE TEMP TABLE past AS
SELECT i, {pid} AS pid, {e1} AS e1, {e2} AS e2, {e3} AS e3,
       now() - make_interval(secs => ({n} - i) / 1000.0) AS at
FROM generate_series(1, {n}) AS i;

INSERT INTO payment_payments (payment_id, booking_id, status, created_at, updated_at)
SELECT pid, 'past-' || i, 'COMPLETED', at, at FROM past;

INSERT INTO payment_events (stream_id, version, event_id, event_type, data, occurred_at)
SELECT pid, v, e, t, jsonb_build_object(
         'payment_id', pid, 'booking_id', 'past-' || i, 'amount', 1999, 'currency', 'EUR',
         'payment_method', 'pm_card_visa', 'idempotency_key', gen_random_uuid(),
         'provider_reference', 'fake_' || md5(pid::text)), at
FROM past, LATERAL (VALUES (1, e1, 'PaymentInitiated'), (2, e2, 'ChargeStarted'),
                           (3, e3, 'PaymentCompleted')) AS ev(v, e, t);

INSERT INTO payment_outbox (event_id, type, key, subject, sequence, time, data,
                            traceparent, published_at)
SELECT e, t, pid::text, pid::text, v, at, convert_to(repeat('x', 280), 'UTF8'),
       '00-' || md5(e::text) || '-' || substr(md5(pid::text), 1, 16) || '-01', at
FROM past, LATERAL (VALUES (1, e1, 'payment.initiated'), (3, e3, 'payment.completed'))
     AS ob(v, e, t);

INSERT INTO payment_inbox (source, message_id, received_at)
SELECT {request_source}, gen_random_uuid()::text, at FROM past
UNION ALL
SELECT 'payment-service', e1::text, at FROM past;
"""


def write_past_payments(
    url: str, kind: str, payments: int, request_source: str = "bench-orchestrator"
) -> float:
    """Write them into the migrated database at `url`; the seconds it took.

    The requests' inbox entries take `request_source` (the ce_source the run's requests
    will carry, so that they share an index range), the service's own its default source.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown id kind {kind!r}: one of {', '.join(KINDS)}")
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        id_sql = {name: _SQL_ID[kind].format(n=payments) for name in ("pid", "e1", "e2", "e3")}
        source = "'" + request_source.replace("'", "''") + "'"
        script = _PREFILL.format(n=payments, request_source=source, **id_sql)
        for statement in script.split(";\n"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - started
