-- 0003: dead letters already re-driven by `payment-service dead-letters redrive`.

-- One row per dead letter (its place on the dead-letter topic). The tool inserts it, then
-- re-publishes the original record, then records where the copy went and commits, all in
-- one transaction: a dead letter is re-driven at most once, even by two operators at the
-- same time (the second waits on the row, then finds it). A crash between the broker's
-- acknowledgement and the commit leaves no row, so a later run re-drives it again; the
-- inbox then absorbs the second copy (same ce_source and ce_id).
CREATE TABLE payment_dead_letter_redrives (
    dlq_topic          text        NOT NULL,
    dlq_partition      integer     NOT NULL,
    dlq_offset         bigint      NOT NULL,
    original_topic     text        NOT NULL,
    original_partition integer,
    original_offset    bigint,
    redriven_partition integer,
    redriven_offset    bigint,
    redriven_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
