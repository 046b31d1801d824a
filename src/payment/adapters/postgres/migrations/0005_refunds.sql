-- 0005: refunds (expand only; docs/refunds.md).
--
-- A booking closed by a refund that overtook its payment request (contract 4.8) holds a
-- row of its own in payment_payments, status CANCELLED, under the same unique booking_id
-- as a payment: a refund closing the booking and a request claiming it cannot both win.
-- Its payment_id names no stream. The previous release never writes the new status and
-- its queries select INITIATED rows or look rows up by booking id only.
ALTER TABLE payment_payments DROP CONSTRAINT IF EXISTS payment_payments_status_check;
ALTER TABLE payment_payments ADD CONSTRAINT payment_payments_status_check
    CHECK (status IN ('INITIATED', 'COMPLETED', 'FAILED', 'CANCELLED')) NOT VALID;
ALTER TABLE payment_payments VALIDATE CONSTRAINT payment_payments_status_check;

-- Refunds requested and not yet settled: since when (NULL: none). Set beside the
-- RefundRequested event, cleared beside the event that settles the last one; the refund
-- worker reads it through the partial index (rows with a refund pending are few).
ALTER TABLE payment_payments ADD COLUMN IF NOT EXISTS refund_pending_since timestamptz;

CREATE INDEX IF NOT EXISTS payment_payments_refund_pending_idx
    ON payment_payments (refund_pending_since, payment_id)
    WHERE refund_pending_since IS NOT NULL;
