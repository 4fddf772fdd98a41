-- 0006_order_event_trace, the safe version (release 5.0.0). The column is added without a
-- default (no rewrite: existing rows read NULL), then new rows get a default (metadata only).
-- Old rows are backfilled later in small batches, outside the deploy.
-- lock_timeout: if production holds a conflicting lock, give up after 2 s instead of queueing
-- every query behind this ALTER.

SET lock_timeout = '2s';
ALTER TABLE order_events ADD COLUMN trace_id uuid;
ALTER TABLE order_events ALTER COLUMN trace_id SET DEFAULT gen_random_uuid();
