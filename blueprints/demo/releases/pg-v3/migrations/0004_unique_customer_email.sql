-- 0004_unique_customer_email: new in release 3.0.0. One account per e-mail address.
-- Fails on production data: some customers signed up twice with the same address,
-- so PostgreSQL reports: could not create unique index "customers_email_unique".

CREATE UNIQUE INDEX customers_email_unique ON customers(email);
