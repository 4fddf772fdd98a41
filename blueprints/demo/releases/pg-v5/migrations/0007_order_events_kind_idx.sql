-- 0007_order_events_kind_idx (release 5.0.0): the index, built CONCURRENTLY so production
-- keeps writing. CREATE INDEX CONCURRENTLY cannot run inside a transaction block: this file
-- runs without --single-transaction, each statement on its own.

SET lock_timeout = '2s';
CREATE INDEX CONCURRENTLY IF NOT EXISTS order_events_kind_idx ON order_events (kind);
