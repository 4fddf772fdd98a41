-- 0003_add_order_notes: new in release 2.0.0. Customers can leave a note on an order.
-- Safe on production data: adds a nullable column (no table rewrite in PostgreSQL 11+).

ALTER TABLE orders ADD COLUMN notes text;
