//! Static hints on a release's SQL migrations, before anything is provisioned.
//!
//! The files are parsed with `sqlparser` (PostgreSQL dialect); each known-dangerous statement
//! becomes a [`Hint`] with its file and line, why it is dangerous on a big table and the safe
//! form. After the run, [`link`] puts next to each hint what the trace measured for that
//! statement, so a hint is never just a rule of thumb: the copy says whether it mattered on
//! production's data.
//!
//! Which files: the `.sql` files an install step names (`-f migrations/0005.sql`); when no
//! step names one (a migration tool that reads a directory), every `.sql` file of the release.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sqlparser::ast::{
    AlterColumnOperation, AlterTableOperation, ColumnOption, Spanned, Statement, TableConstraint,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::Migration;

/// Files larger than this are not read (a migration this size is data, not schema).
const MAX_FILE_BYTES: u64 = 1 << 20;
/// At most this many files are linted.
const MAX_FILES: usize = 500;

/// Functions whose value differs per row: a column default that calls one rewrites the table.
const VOLATILE: &[&str] = &[
    "random(",
    "gen_random_uuid(",
    "uuid_generate_v1(",
    "uuid_generate_v4(",
    "clock_timestamp(",
    "timeofday(",
    "nextval(",
    "txid_current(",
];

/// One hint (report.json `hints`, `dryrun plan`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// File, relative to the release.
    pub file: String,
    /// Line of the statement (1-based).
    pub line: u64,
    /// Rule id: `index-not-concurrently`, `volatile-default`, `set-not-null`,
    /// `alter-column-type`, `constraint-not-valid`, `missing-lock-timeout`, `unparsed`.
    pub rule: String,
    /// The statement, on one line.
    pub statement: String,
    /// What it does to production while it runs.
    pub message: String,
    /// The safe form.
    pub fix: String,
    /// What the trace measured for this statement (after a run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<String>,
}

/// Lints the release's migrations found under `dir` (the unpacked or source directory),
/// given its install steps' command lines.
#[must_use]
pub fn lint_dir(dir: &Path, steps: &[String]) -> Vec<Hint> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files);
    files.sort();
    let named: Vec<&String> = files
        .iter()
        .filter(|f| steps.iter().any(|s| s.contains(f.as_str())))
        .collect();
    let chosen: Vec<&String> = if named.is_empty() {
        files.iter().collect()
    } else {
        named
    };
    let chosen_len = chosen.len();
    let mut out = Vec::new();
    for f in chosen.into_iter().take(MAX_FILES) {
        let p = dir.join(f);
        let not_linted = |why: String| Hint {
            file: f.clone(),
            line: 1,
            rule: "unparsed".into(),
            statement: String::new(),
            message: format!("not linted: {why}"),
            fix: "nothing to fix if PostgreSQL accepts the file; the trace still measures it"
                .into(),
            measured: None,
        };
        match std::fs::metadata(&p) {
            // A data load, not a schema change: parsing it would cost more than it tells.
            Ok(m) if m.len() > MAX_FILE_BYTES => out.push(not_linted(format!(
                "{} bytes, more than the linter reads ({MAX_FILE_BYTES})",
                m.len()
            ))),
            Ok(_) => match std::fs::read_to_string(&p) {
                Ok(text) => out.extend(lint_text(f, &text)),
                Err(e) => out.push(not_linted(format!("unreadable ({e})"))),
            },
            Err(e) => out.push(not_linted(format!("unreadable ({e})"))),
        }
    }
    if chosen_len > MAX_FILES {
        out.push(Hint {
            file: ".".into(),
            line: 1,
            rule: "unparsed".into(),
            statement: String::new(),
            message: format!(
                "not linted: {} of {chosen_len} .sql files past the first {MAX_FILES}",
                chosen_len - MAX_FILES
            ),
            fix: "name the migration files in the install step to lint only those".into(),
            measured: None,
        });
    }
    // File names and the identifiers in messages come from the release: no control characters
    // reach a terminal or a page (statements are cleaned by `short`).
    for h in &mut out {
        h.file = crate::sinks::clean(&h.file, usize::MAX);
        h.message = crate::sinks::clean(&h.message, usize::MAX);
    }
    out
}

/// `.sql` files below `dir`, relative paths; symbolic links are not followed (a release cannot
/// point the linter outside itself).
fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let p = e.path();
        if t.is_dir() {
            collect(root, &p, out);
        } else if t.is_file()
            && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("sql"))
            && let Ok(rel) = p.strip_prefix(root)
            && out.len() < MAX_FILES * 2
        {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// Lints one file's text.
#[must_use]
pub fn lint_text(file: &str, text: &str) -> Vec<Hint> {
    let stmts = match Parser::parse_sql(&PostgreSqlDialect {}, text) {
        Ok(s) => s,
        Err(e) => {
            return vec![Hint {
                file: file.to_string(),
                line: 1,
                rule: "unparsed".into(),
                statement: String::new(),
                message: format!("not linted: the SQL parser stopped ({e})"),
                fix: "nothing to fix if PostgreSQL accepts the file; the trace still measures it"
                    .into(),
                measured: None,
            }];
        }
    };
    let mut out = Vec::new();
    let mut created: Vec<String> = Vec::new();
    let mut lock_timeout = false;
    let mut warned_timeout = false;
    for st in &stmts {
        let line = st.span().start.line;
        let one = super::short(&st.to_string(), 400);
        let mut hint = |rule: &str, message: String, fix: &str| {
            out.push(Hint {
                file: file.to_string(),
                line,
                rule: rule.into(),
                statement: one.clone(),
                message,
                fix: fix.into(),
                measured: None,
            });
        };
        let text = st.to_string().to_lowercase();
        if matches!(st, Statement::Set(_)) && text.contains("lock_timeout") {
            lock_timeout = true;
            continue;
        }
        let mut risky_ddl = false;
        match st {
            Statement::CreateTable(t) => created.push(last(&t.name.to_string())),
            Statement::CreateIndex(ci) => {
                let table = last(&ci.table_name.to_string());
                if !ci.concurrently && !created.contains(&table) {
                    risky_ddl = true;
                    hint(
                        "index-not-concurrently",
                        format!(
                            "CREATE INDEX without CONCURRENTLY holds a SHARE lock on {table} until the index is built: production cannot write to {table} meanwhile"
                        ),
                        "CREATE INDEX CONCURRENTLY … (outside a transaction block; it waits for running writes instead of blocking new ones)",
                    );
                }
            }
            Statement::AlterTable(at) => {
                let table = last(&at.name.to_string());
                if created.contains(&table) {
                    continue;
                }
                risky_ddl = true;
                for op in &at.operations {
                    match op {
                        AlterTableOperation::AddColumn { column_def, .. } => {
                            let volatile = column_def.options.iter().any(|o| match &o.option {
                                ColumnOption::Default(e) => {
                                    let e = e.to_string().to_lowercase();
                                    VOLATILE.iter().any(|f| e.contains(f))
                                }
                                _ => false,
                            });
                            if volatile {
                                hint(
                                    "volatile-default",
                                    format!(
                                        "adding {} with a volatile DEFAULT rewrites every row of {table} under an ACCESS EXCLUSIVE lock: production can neither read nor write {table} until it ends",
                                        column_def.name
                                    ),
                                    "add the column without a default (or with a constant one), then fill it in batches and set the default afterwards",
                                );
                            }
                        }
                        AlterTableOperation::AlterColumn { column_name, op } => match op {
                            AlterColumnOperation::SetNotNull => hint(
                                "set-not-null",
                                format!(
                                    "SET NOT NULL on {table}.{column_name} scans the whole table under an ACCESS EXCLUSIVE lock"
                                ),
                                "first ADD CONSTRAINT … CHECK (col IS NOT NULL) NOT VALID, then VALIDATE CONSTRAINT (a weaker lock); SET NOT NULL then skips the scan (PostgreSQL 12+)",
                            ),
                            AlterColumnOperation::SetDataType { .. } => hint(
                                "alter-column-type",
                                format!(
                                    "changing the type of {table}.{column_name} rewrites {table} and its indexes under an ACCESS EXCLUSIVE lock (except a few binary-compatible changes)"
                                ),
                                "add a new column, backfill it in batches, switch readers, drop the old one",
                            ),
                            _ => {}
                        },
                        AlterTableOperation::AddConstraint {
                            constraint: TableConstraint::ForeignKey(_) | TableConstraint::Check(_),
                            not_valid: false,
                        } => hint(
                            "constraint-not-valid",
                            format!(
                                "adding a CHECK or FOREIGN KEY constraint validates every row of {table} while holding a lock that blocks writes"
                            ),
                            "ADD CONSTRAINT … NOT VALID, then ALTER TABLE … VALIDATE CONSTRAINT in a separate transaction",
                        ),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if risky_ddl && !lock_timeout && !warned_timeout {
            warned_timeout = true;
            hint(
                "missing-lock-timeout",
                "no lock_timeout is set before this DDL: if production holds a conflicting lock, the statement waits, and every query behind it waits too".into(),
                "SET lock_timeout = '2s'; at the top of the file, and retry the migration when it times out",
            );
        }
    }
    out
}

/// `public.events` → `events`.
fn last(name: &str) -> String {
    name.rsplit('.')
        .next()
        .unwrap_or(name)
        .trim_matches('"')
        .to_lowercase()
}

/// A statement's text for comparison: lower case, without whitespace or the final `;` (the
/// parser's rendering and the server's text differ in spacing only).
fn normalise(s: &str) -> String {
    s.trim_end_matches(" …")
        .trim()
        .trim_end_matches(';')
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase()
}

/// Puts next to each hint what the trace measured for its statement (texts compared
/// [`normalise`]d; a hint's statement cut at 400 characters matches as a prefix).
pub fn link(hints: &mut [Hint], traced: &[Migration], was_traced: bool) {
    if !was_traced {
        return;
    }
    for h in hints.iter_mut().filter(|h| !h.statement.is_empty()) {
        let want = normalise(&h.statement);
        let found = traced
            .iter()
            .find(|m| normalise(&m.statement).starts_with(&want));
        h.measured = Some(match found {
            Some(m) => super::describe(m),
            None => "not seen running: already applied in production, not run by this release, or shorter than one sampling period".into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(h: &[Hint]) -> Vec<(u64, &str)> {
        h.iter().map(|h| (h.line, h.rule.as_str())).collect()
    }

    #[test]
    fn dangerous_statements_are_named_with_their_line_and_safe_ones_are_not() {
        let sql = "-- 0005\n\
            ALTER TABLE order_events ADD COLUMN trace_id uuid DEFAULT gen_random_uuid();\n\
            CREATE INDEX order_events_kind_idx ON order_events (kind);\n\
            ALTER TABLE orders ALTER COLUMN notes SET NOT NULL;\n\
            ALTER TABLE orders ALTER COLUMN quantity TYPE bigint;\n\
            ALTER TABLE orders ADD CONSTRAINT q CHECK (quantity < 100);\n";
        let h = lint_text("migrations/0005.sql", sql);
        assert_eq!(
            rules(&h),
            vec![
                (2, "volatile-default"),
                (2, "missing-lock-timeout"),
                (3, "index-not-concurrently"),
                (4, "set-not-null"),
                (5, "alter-column-type"),
                (6, "constraint-not-valid"),
            ],
            "{h:#?}"
        );
        assert!(h[0].message.contains("rewrites every row of order_events"));
        assert!(
            h[0].statement
                .starts_with("ALTER TABLE order_events ADD COLUMN trace_id")
        );

        let safe = "SET lock_timeout = '2s';\n\
            ALTER TABLE order_events ADD COLUMN trace_id uuid;\n\
            ALTER TABLE order_events ADD COLUMN source text DEFAULT 'web';\n\
            CREATE INDEX CONCURRENTLY order_events_kind_idx ON order_events (kind);\n\
            ALTER TABLE orders ADD CONSTRAINT q CHECK (quantity < 100) NOT VALID;\n\
            CREATE TABLE audit (id bigint, at timestamptz DEFAULT clock_timestamp());\n\
            CREATE INDEX audit_at ON audit (at);\n\
            ALTER TABLE audit ADD COLUMN u uuid DEFAULT gen_random_uuid();\n";
        assert_eq!(rules(&lint_text("ok.sql", safe)), vec![]);
    }

    #[test]
    fn an_oversize_file_is_not_parsed_and_the_hint_says_so() {
        let d = tempfile::tempdir().unwrap();
        let big = "INSERT INTO t VALUES (1);\n".repeat(50_000); // 1.3 MB
        assert!(big.len() as u64 > MAX_FILE_BYTES);
        std::fs::write(d.path().join("0002_load.sql"), big).unwrap();
        std::fs::write(d.path().join("0001_idx.sql"), "CREATE INDEX a ON t (x);").unwrap();
        let h = lint_dir(d.path(), &[]);
        assert_eq!(
            h.iter()
                .map(|h| (h.file.as_str(), h.rule.as_str()))
                .collect::<Vec<_>>(),
            vec![
                ("0001_idx.sql", "index-not-concurrently"),
                ("0001_idx.sql", "missing-lock-timeout"),
                ("0002_load.sql", "unparsed")
            ]
        );
        assert!(h[2].message.contains("more than the linter reads"), "{h:?}");
    }

    #[test]
    fn escape_sequences_in_a_release_file_name_or_identifier_do_not_reach_the_hint() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("0001_\x1b[2Jx.sql"),
            "CREATE INDEX a ON \"t\x1b]0;owned\x07\" (x);",
        )
        .unwrap();
        let h = lint_dir(d.path(), &[]);
        assert_eq!(h[0].rule, "index-not-concurrently", "{h:?}");
        for h in &h {
            for text in [&h.file, &h.message, &h.statement] {
                assert!(!text.chars().any(char::is_control), "{text:?}");
            }
        }
        assert!(h[0].message.contains("t]0;owned"), "{h:?}");
    }

    #[test]
    fn a_file_the_parser_cannot_read_is_said_so_not_ignored() {
        let h = lint_text("x.sql", "ALTER TABLE ((( nonsense");
        assert_eq!(rules(&h), vec![(1, "unparsed")]);
    }

    #[test]
    fn only_files_an_install_step_names_are_linted_and_symlinks_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("migrations")).unwrap();
        std::fs::write(
            d.path().join("migrations/0001_old.sql"),
            "CREATE INDEX a ON t (x);",
        )
        .unwrap();
        std::fs::write(
            d.path().join("migrations/0002_new.sql"),
            "SET lock_timeout = '1s'; CREATE INDEX b ON t (y);",
        )
        .unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(
            outside.path().join("secret.sql"),
            "CREATE INDEX s ON t (z);",
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        let step = vec!["psql \"$DATABASE_URL\" -f migrations/0002_new.sql".to_string()];
        let h = lint_dir(d.path(), &step);
        assert_eq!(h.len(), 1, "{h:#?}");
        assert_eq!(h[0].file, "migrations/0002_new.sql");
        // A tool that reads the directory: every file, but nothing behind the link.
        let h = lint_dir(d.path(), &["migrate up".to_string()]);
        let files: Vec<&str> = h.iter().map(|h| h.file.as_str()).collect();
        assert!(files.contains(&"migrations/0001_old.sql"), "{files:?}");
        assert!(!files.iter().any(|f| f.contains("secret")), "{files:?}");
    }

    #[test]
    fn hints_are_linked_to_what_the_trace_measured() {
        let mut h = lint_text(
            "m.sql",
            "SET lock_timeout = '1s';\nCREATE INDEX b ON t (y);\nCREATE INDEX c ON t (z);",
        );
        let traced = vec![Migration {
            database: "db".into(),
            statement: "CREATE INDEX b\n   ON t (y);".into(),
            duration_ms: 1500,
            locks: vec![super::super::LockHold {
                relation: "t".into(),
                mode: "SHARE".into(),
                held_ms: 1490,
                blocks: Some("writes".into()),
                existing: true,
                rows: Some(2_000_000),
                bytes: None,
            }],
            rewrites: vec![],
            wal_bytes: None,
        }];
        link(&mut h, &traced, true);
        assert_eq!(
            h[0].measured.as_deref(),
            Some("CREATE INDEX b ON t (y); held SHARE on t for 1.5 s (2.0 M rows); blocks writes")
        );
        assert!(
            h[1].measured
                .as_deref()
                .unwrap()
                .starts_with("not seen running")
        );
    }
}
