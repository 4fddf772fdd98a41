-- 0002_orders_index: "my orders" and the daily report were slow. Already applied in production.

CREATE INDEX orders_customer_id_idx ON orders (customer_id);
CREATE INDEX orders_created_at_idx ON orders (created_at);
