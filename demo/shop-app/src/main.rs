//! `demo-shop`: the small web shop that `blueprints/demo` rehearses releases of.
//! It is demo material for dryrun, not part of dryrun itself.

mod clock;
mod data;
mod migrate;
mod prng;
mod seed;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rusqlite::{Connection, OpenFlags};

#[derive(Debug, Parser)]
#[command(
    name = "demo-shop",
    version,
    about = "The demo web shop for dryrun: seed its \"production\" data, migrate its schema, serve it.",
    after_help = "Example:\n  demo-shop seed --out shop.sqlite --migrations blueprints/demo/releases/v2/migrations --schema-version 0002\n  demo-shop migrate --db shop.sqlite blueprints/demo/releases/v2/migrations\n  API_TOKEN=secret APP_VERSION=2.0.0 demo-shop serve --db shop.sqlite --uploads blueprints/demo/production/buckets/uploads --port 8080"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the shop's made-up "production" data, deterministically for a seed.
    ///
    /// The schema is made by applying the migration files of --migrations up to
    /// --schema-version (recorded in schema_migrations), then the rows are inserted.
    /// The generated history runs from 2025-01-06 (the shop opened) to
    /// 2026-11-21T03:00:00Z; --as-of keeps only what existed at an earlier moment, so an
    /// older backup is a prefix of a newer one. About 1 % of the customers signed up
    /// twice with the same e-mail address (exact duplicates).
    Seed {
        /// File to write (refused if it exists, unless --force).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// What to write.
        #[arg(long, value_enum, default_value = "sqlite")]
        format: seed::Format,
        /// Customers in the full history, duplicates included.
        #[arg(long, value_name = "N", default_value_t = 3000)]
        customers: u32,
        /// Seed of the random generator: the same seed gives the same rows.
        #[arg(long, value_name = "S", default_value_t = 42)]
        seed: u64,
        /// Keep only rows created at or before this moment (RFC 3339, e.g.
        /// 2026-11-20T03:00:00Z, or a date for midnight UTC).
        #[arg(long, value_name = "RFC3339-DATE", value_parser = clock::parse_rfc3339)]
        as_of: Option<i64>,
        /// Directory of migration files (*.sql) that make the schema. For --format sql use
        /// PostgreSQL-dialect files (blueprints/demo/releases/pg-v2/migrations).
        #[arg(long, value_name = "DIR")]
        migrations: PathBuf,
        /// Apply only migrations at or before this version: a number (`2`, `0002`) or a
        /// full version (`0002_orders_index`). Default: all of them.
        #[arg(long, value_name = "VERSION")]
        schema_version: Option<String>,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Apply the pending migrations of DIR to a SQLite database.
    ///
    /// DIR/*.sql are applied in file-name order, skipping those already recorded in
    /// schema_migrations (version = file name without .sql). Each file runs in its own
    /// transaction, statement by statement; statements are split at lines ending in `;`
    /// (so a statement must end with `;` at the end of a line, and no line inside a
    /// statement may end with `;`: no trigger bodies, no multi-line strings; files must
    /// not contain BEGIN/COMMIT). On a failure the file is rolled back, stderr gets
    /// "migration FILE failed", the statement and SQLite's error, and the exit status is 1.
    Migrate {
        /// The SQLite database; it must exist unless --create is given.
        #[arg(long, value_name = "PATH")]
        db: PathBuf,
        /// Directory of migration files.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Create the database if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Serve the shop over HTTP on 127.0.0.1 only, until SIGTERM or Ctrl-C.
    ///
    /// Environment: API_TOKEN (required; guards /api/admin/stats, never printed),
    /// APP_VERSION (shown on the page and in /api/stats; default "unknown").
    ///
    /// Routes: GET / (HTML), /healthz (200 "ok" when the database opens and
    /// schema_migrations has rows, else 503 with the reason), /api/stats,
    /// /api/customers/{id}, /uploads/{name}, /api/admin/stats (needs
    /// "Authorization: Bearer $API_TOKEN").
    Serve {
        /// The SQLite database (opened read-only, per request).
        #[arg(long, value_name = "PATH")]
        db: PathBuf,
        /// Directory served under /uploads/.
        #[arg(long, value_name = "DIR")]
        uploads: PathBuf,
        /// TCP port on 127.0.0.1 (0 picks a free one and prints it).
        #[arg(long, value_name = "PORT")]
        port: u16,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Seed {
            out,
            format,
            customers,
            seed,
            as_of,
            migrations,
            schema_version,
            force,
        } => {
            let opts = seed::SeedOptions {
                out,
                format,
                customers,
                seed,
                as_of,
                migrations,
                schema_version,
                force,
            };
            match seed::run(&opts) {
                Ok(s) => {
                    println!(
                        "wrote {} ({} bytes): {} customers ({} duplicate e-mail addresses), {} products, {} orders; schema at {}",
                        opts.out.display(),
                        s.bytes,
                        s.customers,
                        s.duplicate_emails,
                        s.products,
                        s.orders,
                        s.schema_version
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("seed: {e}")),
            }
        }
        Command::Migrate { db, dir, create } => run_migrate(&db, &dir, create),
        Command::Serve { db, uploads, port } => {
            let api_token = std::env::var("API_TOKEN").unwrap_or_default();
            if api_token.is_empty() {
                eprintln!(
                    "demo-shop serve: API_TOKEN is not set; set it to the secret that /api/admin/stats requires"
                );
                return ExitCode::from(2);
            }
            let app_version = std::env::var("APP_VERSION")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "unknown".to_owned());
            match serve::run(serve::ServeOptions {
                db,
                uploads,
                port,
                api_token,
                app_version,
                smtp_url: std::env::var("SMTP_URL").ok().filter(|u| !u.is_empty()),
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("serve: {e}")),
            }
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("demo-shop {message}");
    ExitCode::FAILURE
}

fn run_migrate(db: &std::path::Path, dir: &std::path::Path, create: bool) -> ExitCode {
    let all = match migrate::load_dir(dir) {
        Ok(all) => all,
        Err(e) => return fail(&format!("migrate: {e}")),
    };
    if !create && !db.is_file() {
        return fail(&format!(
            "migrate: database {} does not exist (use --create to make a new one)",
            db.display()
        ));
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn = match Connection::open_with_flags(db, flags) {
        Ok(conn) => conn,
        Err(e) => return fail(&format!("migrate: cannot open {}: {e}", db.display())),
    };
    let pending: Vec<migrate::Migration> =
        match migrate::ensure_table(&conn).and_then(|()| migrate::pending(&conn, &all)) {
            Ok(p) => p.into_iter().cloned().collect(),
            Err(e) => return fail(&format!("migrate: {}: {e}", db.display())),
        };
    if pending.is_empty() {
        println!("nothing to apply");
    }
    for m in &pending {
        match migrate::apply_one(&mut conn, m, &clock::format_rfc3339(clock::now_secs())) {
            Ok(took) => println!("applied {} ({} ms)", m.file_name, took.as_millis()),
            Err(migrate::MigrateError::Failed(failure)) => {
                eprintln!("{failure}");
                println!(
                    "rolled back {}; schema is still at {}",
                    m.file_name,
                    migrate::current_version(&conn)
                        .as_deref()
                        .unwrap_or("(nothing)")
                );
                return ExitCode::FAILURE;
            }
            Err(e) => return fail(&format!("migrate: {}: {e}", m.file_name)),
        }
    }
    println!(
        "schema is at {}",
        migrate::current_version(&conn)
            .as_deref()
            .unwrap_or("(nothing)")
    );
    ExitCode::SUCCESS
}
