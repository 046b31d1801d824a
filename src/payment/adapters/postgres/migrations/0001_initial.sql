-- 0001: event store, payment index, outbox and inbox.

-- Every event of every payment stream. `position` is the global order of appends;
-- (stream_id, version) is the optimistic lock: a second writer of the same version
-- fails with a unique violation instead of forking the stream.
CREATE TABLE payment_events (
    position     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id    uuid        NOT NULL,
    version      integer     NOT NULL CHECK (version > 0),
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    data         jsonb       NOT NULL,
    metadata     jsonb       NOT NULL DEFAULT '{}',
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payment_events_stream_version_key UNIQUE (stream_id, version),
    CONSTRAINT payment_events_event_id_key UNIQUE (event_id)
);

-- Booking -> payment (the unique booking_id is "one payment per booking") and the
-- payment's current status, kept in step with its stream by the handlers.
CREATE TABLE payment_payments (
    payment_id  uuid        PRIMARY KEY,
    booking_id  text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('INITIATED', 'COMPLETED', 'FAILED')),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    CONSTRAINT payment_payments_booking_id_key UNIQUE (booking_id)
);

-- The reconciler asks for the oldest in-flight payments; terminal ones (nearly all rows)
-- stay out of this index.
CREATE INDEX payment_payments_in_flight_idx
    ON payment_payments (updated_at, payment_id)
    WHERE status = 'INITIATED';

-- Messages to publish, written in the transaction of the state they announce.
-- event_id is not unique: a re-request queues the same event (same ce_id) again.
-- The identity must keep CACHE 1 (the default): the outbox ordering argument relies on
-- positions being handed out in time order across sessions.
CREATE TABLE payment_outbox (
    position     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL,
    type         text        NOT NULL,
    key          text        NOT NULL,
    subject      text,
    sequence     integer,
    time         timestamptz NOT NULL,
    data         bytea       NOT NULL,
    traceparent  text,
    tracestate   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

-- The relay's query reads only unpublished rows, in position order; published rows (the
-- bulk of the table) are not in this index at all.
CREATE INDEX payment_outbox_unpublished_idx
    ON payment_outbox (position)
    WHERE published_at IS NULL;

-- `payment-service show`: the outbox rows of one payment.
CREATE INDEX payment_outbox_subject_idx ON payment_outbox (subject, position);

-- Every published row leaves a dead tuple in the partial index; vacuum early so the
-- relay's index scan does not wade through them.
ALTER TABLE payment_outbox SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05
);

-- Wakes a listening relay. Statement level and with an empty payload, so one transaction
-- sends at most one notification (PostgreSQL folds identical ones), delivered on commit.
CREATE FUNCTION payment_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('payment_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER payment_outbox_notify
    AFTER INSERT ON payment_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION payment_outbox_notify();

-- Inbound messages already handled, by CloudEvents (source, id).
CREATE TABLE payment_inbox (
    source      text        NOT NULL,
    message_id  text        NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (source, message_id)
);
