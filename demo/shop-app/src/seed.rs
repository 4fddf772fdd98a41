//! `demo-shop seed`: writes the made-up production data as a SQLite database or as a
//! PostgreSQL-compatible SQL script. The schema comes from the migration files, so the
//! data always matches what the releases' migrations expect.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use crate::clock::format_rfc3339;
use crate::data::{self, Dataset, SHOP_OPENED};
use crate::migrate::{self, Migration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A SQLite database file.
    Sqlite,
    /// A PostgreSQL-compatible SQL script for psql: the migration files' SQL, then INSERTs in batches.
    Sql,
}

#[derive(Debug)]
pub struct SeedOptions {
    pub out: PathBuf,
    pub format: Format,
    pub customers: u32,
    pub seed: u64,
    pub as_of: Option<i64>,
    pub migrations: PathBuf,
    pub schema_version: Option<String>,
    pub force: bool,
}

/// Rows per INSERT statement in the SQL script.
const SQL_BATCH: usize = 500;

#[derive(Debug)]
pub struct SeedSummary {
    pub customers: usize,
    pub duplicate_emails: usize,
    pub products: usize,
    pub orders: usize,
    pub schema_version: String,
    pub bytes: u64,
}

pub fn run(opts: &SeedOptions) -> Result<SeedSummary, String> {
    let migrations: Vec<Migration> = migrate::load_dir(&opts.migrations)?
        .into_iter()
        .filter(|m| {
            opts.schema_version
                .as_deref()
                .is_none_or(|limit| migrate::version_at_or_before(&m.version, limit))
        })
        .collect();
    let Some(last) = migrations.last() else {
        return Err(format!(
            "no migration in {} is at or before schema version {}",
            opts.migrations.display(),
            opts.schema_version.as_deref().unwrap_or("(any)")
        ));
    };
    let schema_version = last.version.clone();

    let mut data = data::generate(opts.customers, opts.seed);
    let cutoff = opts.as_of.unwrap_or(data::HISTORY_END);
    if let Some(as_of) = opts.as_of {
        data = data.cut_at(as_of);
    }
    // When each migration was applied in "production": the first before the shop
    // opened, then one every 60 days, never after the moment the data is taken.
    let applied_at: Vec<String> = (0..migrations.len() as i64)
        .map(|i| format_rfc3339((SHOP_OPENED - 86_400 + i * 60 * 86_400).min(cutoff)))
        .collect();

    if opts.out.exists() {
        if !opts.force {
            return Err(format!(
                "{} already exists (use --force to replace it)",
                opts.out.display()
            ));
        }
        fs::remove_file(&opts.out)
            .map_err(|e| format!("cannot remove {}: {e}", opts.out.display()))?;
    }
    // Write next to the target and rename, so a failed run leaves no half-written file.
    let partial = partial_path(&opts.out);
    let _ = fs::remove_file(&partial);
    let written = match opts.format {
        Format::Sqlite => write_sqlite(&partial, &migrations, &applied_at, &data),
        Format::Sql => write_sql(&partial, &migrations, &applied_at, &data, opts),
    };
    if let Err(e) = written {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, &opts.out).map_err(|e| {
        format!(
            "cannot rename {} to {}: {e}",
            partial.display(),
            opts.out.display()
        )
    })?;
    let bytes = fs::metadata(&opts.out).map(|m| m.len()).unwrap_or(0);

    Ok(SeedSummary {
        customers: data.customers.len(),
        duplicate_emails: data.duplicate_emails(),
        products: data.products.len(),
        orders: data.orders.len(),
        schema_version,
        bytes,
    })
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

fn write_sqlite(
    path: &Path,
    migrations: &[Migration],
    applied_at: &[String],
    data: &Dataset,
) -> Result<(), String> {
    let sql_err = |e: rusqlite::Error| format!("writing {}: {e}", path.display());
    let mut conn = Connection::open(path).map_err(sql_err)?;
    conn.execute_batch("PRAGMA foreign_keys = ON;")
        .map_err(sql_err)?;
    migrate::ensure_table(&conn).map_err(sql_err)?;
    for (m, at) in migrations.iter().zip(applied_at) {
        migrate::apply_one(&mut conn, m, at).map_err(|e| e.to_string())?;
    }

    let tx = conn.transaction().map_err(sql_err)?;
    {
        let mut insert = tx
            .prepare("INSERT INTO products (id, sku, name, price_cents) VALUES (?1, ?2, ?3, ?4)")
            .map_err(sql_err)?;
        for p in &data.products {
            insert
                .execute(params![p.id, p.sku, p.name, p.price_cents])
                .map_err(sql_err)?;
        }
        let mut insert = tx
            .prepare("INSERT INTO customers (id, email, name, created_at) VALUES (?1, ?2, ?3, ?4)")
            .map_err(sql_err)?;
        for c in &data.customers {
            insert
                .execute(params![c.id, c.email, c.name, format_rfc3339(c.created_at)])
                .map_err(sql_err)?;
        }
        let mut insert = tx
            .prepare(
                "INSERT INTO orders (id, customer_id, product_id, quantity, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(sql_err)?;
        for o in &data.orders {
            insert
                .execute(params![
                    o.id,
                    o.customer_id,
                    o.product_id,
                    o.quantity,
                    format_rfc3339(o.created_at)
                ])
                .map_err(sql_err)?;
        }
    }
    tx.commit().map_err(sql_err)?;
    // Compact, and make sure nothing is left in a journal next to the file.
    conn.execute_batch("VACUUM;").map_err(sql_err)?;
    conn.close().map_err(|(_, e)| sql_err(e))?;
    Ok(())
}

/// A SQL string literal (standard_conforming_strings: only `'` needs doubling).
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn write_sql(
    path: &Path,
    migrations: &[Migration],
    applied_at: &[String],
    data: &Dataset,
    opts: &SeedOptions,
) -> Result<(), String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "-- Demo Shop \"production\" data, written by `demo-shop seed --format sql`."
    );
    let _ = writeln!(
        out,
        "-- seed {}, {} customers in the full history, as of {}; schema from {} up to {}.",
        opts.seed,
        opts.customers,
        format_rfc3339(opts.as_of.unwrap_or(data::HISTORY_END)),
        opts.migrations.display(),
        migrations.last().map_or("", |m| m.version.as_str()),
    );
    let _ = writeln!(
        out,
        "-- Load with: psql -v ON_ERROR_STOP=1 --single-transaction -f FILE\n"
    );
    out.push_str("SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n\n");
    out.push_str(
        "CREATE TABLE schema_migrations (\n    version    text PRIMARY KEY,\n    applied_at timestamptz NOT NULL\n);\n\n",
    );
    for m in migrations {
        let _ = writeln!(out, "-- migration {}\n{}\n", m.file_name, m.sql.trim_end());
    }
    let rows: Vec<String> = migrations
        .iter()
        .zip(applied_at)
        .map(|(m, at)| format!("({}, {})", lit(&m.version), lit(at)))
        .collect();
    push_inserts(&mut out, "schema_migrations (version, applied_at)", &rows);

    let rows: Vec<String> = data
        .products
        .iter()
        .map(|p| {
            format!(
                "({}, {}, {}, {})",
                p.id,
                lit(&p.sku),
                lit(&p.name),
                p.price_cents
            )
        })
        .collect();
    push_inserts(&mut out, "products (id, sku, name, price_cents)", &rows);
    let rows: Vec<String> = data
        .customers
        .iter()
        .map(|c| {
            format!(
                "({}, {}, {}, {})",
                c.id,
                lit(&c.email),
                lit(&c.name),
                lit(&format_rfc3339(c.created_at))
            )
        })
        .collect();
    push_inserts(&mut out, "customers (id, email, name, created_at)", &rows);
    let rows: Vec<String> = data
        .orders
        .iter()
        .map(|o| {
            format!(
                "({}, {}, {}, {}, {})",
                o.id,
                o.customer_id,
                o.product_id,
                o.quantity,
                lit(&format_rfc3339(o.created_at))
            )
        })
        .collect();
    push_inserts(
        &mut out,
        "orders (id, customer_id, product_id, quantity, created_at)",
        &rows,
    );

    // Identity/serial columns: move their sequences past the ids inserted above. A
    // column without a sequence gives NULL here, which setval ignores.
    for table in ["products", "customers", "orders"] {
        let _ = writeln!(
            out,
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}));"
        );
    }
    out.push_str("\nANALYZE;\n");
    fs::write(path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn push_inserts(out: &mut String, into: &str, rows: &[String]) {
    for batch in rows.chunks(SQL_BATCH) {
        let _ = writeln!(out, "INSERT INTO {into} VALUES\n{};\n", batch.join(",\n"));
    }
}
