-- 0006_order_event_trace: new in release 4.0.0. Every order event gets a trace id, and the
-- support screen filters events by kind.
-- UNSAFE on production data: the volatile default (gen_random_uuid() is computed per row)
-- rewrites all of order_events under an ACCESS EXCLUSIVE lock, and the index is built
-- without CONCURRENTLY (a SHARE lock: no writes until it is built). Release 5.0.0 is the
-- safe version.

ALTER TABLE order_events ADD COLUMN trace_id uuid DEFAULT gen_random_uuid();
CREATE INDEX order_events_kind_idx ON order_events (kind);
