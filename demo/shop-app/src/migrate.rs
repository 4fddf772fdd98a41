//! Schema migrations: `DIR/*.sql`, applied in file-name order, recorded in
//! `schema_migrations(version, applied_at)` where the version is the file stem
//! (`0003_add_order_notes`).
//!
//! Each file runs in its own transaction, one statement at a time, so that when a
//! statement fails we can say which one, and the file leaves no trace behind.
//!
//! Limitation (by design, to stay tiny): a file is split into statements at every line
//! whose last non-blank character is `;`. So a statement must end with `;` at the end
//! of a line, and must not contain a line ending in `;` inside it (as in a
//! `CREATE TRIGGER ... BEGIN ...; END;` body or a string literal spanning lines), and a
//! comment after the `;` on the same line hides the end of the statement. Files must not
//! contain their own `BEGIN`/`COMMIT`: the transaction is ours.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// `0003_add_order_notes.sql`
    pub file_name: String,
    /// `0003_add_order_notes`
    pub version: String,
    pub sql: String,
}

/// One failed statement of a migration file. Its `Display` is the exact message that
/// `demo-shop migrate` prints to stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationFailure {
    pub file_name: String,
    /// The failing statement on a single line, comments dropped, whitespace collapsed.
    pub statement: String,
    /// SQLite's own error message.
    pub error: String,
}

impl fmt::Display for MigrationFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migration {} failed\n  statement: {}\n  error: {}",
            self.file_name, self.statement, self.error
        )
    }
}

#[derive(Debug)]
pub enum MigrateError {
    /// A statement of a migration failed; that file was rolled back.
    Failed(MigrationFailure),
    /// Anything else: unreadable directory, database that does not open, ...
    Other(String),
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::Failed(failure) => failure.fmt(f),
            MigrateError::Other(message) => f.write_str(message),
        }
    }
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Other(e.to_string())
    }
}

/// Reads `dir/*.sql`, sorted by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<Migration>, String> {
    let entries = fs::read_dir(dir)
        .map_err(|e| format!("cannot read migrations directory {}: {e}", dir.display()))?;
    let mut migrations = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let path = entry.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(version) = file_name.strip_suffix(".sql") else {
            continue;
        };
        if version.is_empty() || !path.is_file() {
            continue;
        }
        let sql = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        migrations.push(Migration {
            file_name: file_name.to_owned(),
            version: version.to_owned(),
            sql,
        });
    }
    migrations.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    Ok(migrations)
}

/// The number a version starts with: `0002_orders_index` -> 2. Versions without a
/// leading number have none.
pub fn version_number(version: &str) -> Option<u64> {
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Whether `version` is at or before `limit`. `limit` may be a number (`2`, `0002`) or
/// a full version (`0002_orders_index`); numbers are compared when both have one.
pub fn version_at_or_before(version: &str, limit: &str) -> bool {
    match (version_number(version), version_number(limit)) {
        (Some(v), Some(l)) => v <= l,
        _ => version <= limit,
    }
}

/// Splits a migration file into statements: see the module documentation. Chunks that
/// hold only comments and blank lines are dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        current.push_str(line);
        current.push('\n');
        if line.trim_end().ends_with(';') {
            if !one_line(&current).is_empty() {
                statements.push(current.trim().to_owned());
            }
            current.clear();
        }
    }
    if !one_line(&current).is_empty() {
        statements.push(current.trim().to_owned());
    }
    statements
}

/// A statement on one line for messages: whole-line `--` comments dropped, each line
/// trimmed, joined with single spaces.
pub fn one_line(statement: &str) -> String {
    statement
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn ensure_table(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    TEXT PRIMARY KEY,
             applied_at TEXT NOT NULL
         );",
    )
}

pub fn applied_versions(conn: &Connection) -> rusqlite::Result<BTreeSet<String>> {
    let mut stmt = conn.prepare("SELECT version FROM schema_migrations")?;
    let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
    rows.collect()
}

/// The highest applied version, or `None` when nothing was applied (or the table is
/// missing).
pub fn current_version(conn: &Connection) -> Option<String> {
    conn.query_row("SELECT max(version) FROM schema_migrations", [], |row| {
        row.get::<_, Option<String>>(0)
    })
    .optional()
    .ok()
    .flatten()
    .flatten()
}

/// Applies one migration file in a transaction and records it. On failure the
/// transaction is rolled back and the failing statement is reported.
pub fn apply_one(
    conn: &mut Connection,
    migration: &Migration,
    applied_at: &str,
) -> Result<Duration, MigrateError> {
    let started = Instant::now();
    let tx = conn.transaction()?;
    for statement in split_statements(&migration.sql) {
        if let Err(e) = tx.execute_batch(&statement) {
            // Dropping `tx` rolls the whole file back.
            return Err(MigrateError::Failed(MigrationFailure {
                file_name: migration.file_name.clone(),
                statement: one_line(&statement),
                error: e.to_string(),
            }));
        }
    }
    tx.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
        params![migration.version, applied_at],
    )
    .map_err(|e| {
        MigrateError::Failed(MigrationFailure {
            file_name: migration.file_name.clone(),
            statement: format!(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ('{}', '{applied_at}')",
                migration.version
            ),
            error: e.to_string(),
        })
    })?;
    tx.commit()?;
    Ok(started.elapsed())
}

/// The migrations of `all` that `conn` has not applied yet, in order.
pub fn pending<'a>(
    conn: &Connection,
    all: &'a [Migration],
) -> rusqlite::Result<Vec<&'a Migration>> {
    let done = applied_versions(conn)?;
    Ok(all.iter().filter(|m| !done.contains(&m.version)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(file_name: &str, sql: &str) -> Migration {
        Migration {
            file_name: file_name.to_owned(),
            version: file_name.trim_end_matches(".sql").to_owned(),
            sql: sql.to_owned(),
        }
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn splits_on_semicolons_at_end_of_line() {
        let sql = "-- a comment;\nCREATE TABLE a (\n  x INTEGER -- inline\n);\n\n\
                   CREATE INDEX a_x ON a (x);   \n-- trailing comment\n";
        let statements = split_statements(sql);
        assert_eq!(statements.len(), 2, "{statements:?}");
        assert_eq!(
            one_line(&statements[0]),
            "CREATE TABLE a ( x INTEGER -- inline );"
        );
        assert_eq!(one_line(&statements[1]), "CREATE INDEX a_x ON a (x);");
        assert_eq!(split_statements("SELECT 1"), vec!["SELECT 1".to_owned()]);
        assert!(split_statements("-- nothing\n\n").is_empty());
    }

    #[test]
    fn compares_versions_by_number() {
        assert!(version_at_or_before("0002_orders_index", "0002"));
        assert!(version_at_or_before("0002_orders_index", "2"));
        assert!(version_at_or_before("0001_initial", "0002_orders_index"));
        assert!(!version_at_or_before("0003_add_order_notes", "0002"));
    }

    #[test]
    fn failure_names_the_statement_and_sqlite_error_and_rolls_back() {
        let mut conn = Connection::open_in_memory().unwrap();
        ensure_table(&conn).unwrap();
        let setup = migration(
            "0001_initial.sql",
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT NOT NULL);\n\
             INSERT INTO customers (email) VALUES ('a@example.com'), ('a@example.com');\n",
        );
        apply_one(&mut conn, &setup, "2026-01-01T00:00:00Z").unwrap();

        let bad = migration(
            "0002_unique_email.sql",
            "-- one account per address\nCREATE TABLE audit (x INTEGER);\n\
             CREATE UNIQUE INDEX customers_email_unique\n    ON customers(email);\n",
        );
        let Err(MigrateError::Failed(failure)) = apply_one(&mut conn, &bad, "2026-01-02T00:00:00Z")
        else {
            panic!("the unique index must fail on duplicate e-mails");
        };
        assert_eq!(
            failure.to_string(),
            "migration 0002_unique_email.sql failed\n  \
             statement: CREATE UNIQUE INDEX customers_email_unique ON customers(email);\n  \
             error: UNIQUE constraint failed: customers.email"
        );
        // The whole file was rolled back: no `audit` table, not recorded.
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM sqlite_master WHERE name = 'audit'"
            ),
            0
        );
        assert_eq!(current_version(&conn).as_deref(), Some("0001_initial"));
    }

    #[test]
    fn applies_pending_files_in_order_from_a_directory() {
        let dir =
            std::env::temp_dir().join(format!("demo-shop-migrate-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("0002_b.sql"), "ALTER TABLE t ADD COLUMN b TEXT;\n").unwrap();
        fs::write(dir.join("0001_a.sql"), "CREATE TABLE t (a INTEGER);\n").unwrap();
        fs::write(dir.join("README.md"), "not a migration").unwrap();
        let all = load_dir(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            all.iter().map(|m| m.version.as_str()).collect::<Vec<_>>(),
            ["0001_a", "0002_b"]
        );

        let mut conn = Connection::open_in_memory().unwrap();
        ensure_table(&conn).unwrap();
        assert_eq!(current_version(&conn), None);
        let first: Vec<Migration> = pending(&conn, &all[..1])
            .unwrap()
            .into_iter()
            .cloned()
            .collect();
        apply_one(&mut conn, &first[0], "t0").unwrap();
        let rest: Vec<Migration> = pending(&conn, &all).unwrap().into_iter().cloned().collect();
        assert_eq!(rest.len(), 1);
        apply_one(&mut conn, &rest[0], "t1").unwrap();
        assert_eq!(current_version(&conn).as_deref(), Some("0002_b"));
        assert!(pending(&conn, &all).unwrap().is_empty());
    }
}
