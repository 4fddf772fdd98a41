-- 0004_unique_customer_email: new in release 3.0.0. One account per e-mail address.
-- Looks harmless on a developer's database, but production has customers who signed
-- up twice with the same address, so building the index fails there:
-- "UNIQUE constraint failed: customers.email". That is what the dry run is for.

CREATE UNIQUE INDEX customers_email_unique ON customers(email);
