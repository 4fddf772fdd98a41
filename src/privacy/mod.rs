//! Personal data in the copy: the gate that refuses unclassified personal data, the masking
//! that runs inside the copy after restore and before the release or any check sees it, and
//! the probe that verifies the result.
//!
//! [`protect`] is the one flow, for every engine: list the columns ([`Db::columns`]), check the
//! blueprint's rules against them, sample every table ([`Db::sample`]) and run the detectors
//! ([`detect`]), stop with every unclassified column named ([`PrivacyError::Unclassified`]),
//! mask ([`Db::mask`], with [`strategy::mask`] as the one definition of each strategy), then
//! verify: no sampled original is left in a masked column ([`Db::count_originals`]) and no
//! detector fires on a column that is neither kept nor masked into fake personal data.
//!
//! Sampled values live in memory only for the length of [`protect`]; reports, logs and errors
//! carry column names and counts, never a value.

pub mod detect;
mod postgres;
mod sqlite;
pub mod strategy;
pub mod stream;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Instant;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use detect::Kind;
pub use strategy::{ColumnFacts, MaskKey, Strategy};

/// How many non-null values per column the gate looks at.
pub const SAMPLE_ROWS: usize = 2000;

/// One `table.column: strategy` line of the blueprint's `masking:` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Table, `schema.table` outside PostgreSQL's `public` schema.
    pub table: String,
    /// Column.
    pub column: String,
    /// What to do with it.
    pub strategy: Strategy,
}

/// A column as the database describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Table (as in [`Rule::table`]).
    pub table: String,
    /// Column name.
    pub name: String,
    /// Declared type, for the cast back after masking.
    pub sql_type: String,
    /// NOT NULL.
    pub not_null: bool,
    /// A single-column UNIQUE index or constraint.
    pub unique: bool,
    /// Declared maximum length in characters.
    pub max_len: Option<usize>,
    /// Whether its values are sampled (binary and boolean columns are not).
    pub sampled: bool,
}

impl Column {
    fn facts(&self) -> ColumnFacts {
        ColumnFacts {
            unique: self.unique,
            max_len: self.max_len,
        }
    }

    fn address(&self) -> String {
        format!("{}.{}", self.table, self.name)
    }
}

/// What the gate found in one column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Table.
    pub table: String,
    /// Column.
    pub column: String,
    /// What it looks like.
    pub kind: Kind,
    /// Sampled values the detector recognised (0 for a name hint).
    pub hits: usize,
    /// Non-null values sampled.
    pub sampled: usize,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == Kind::NameHint {
            write!(
                f,
                "{}.{}: its name says personal data",
                self.table, self.column
            )
        } else {
            write!(
                f,
                "{}.{}: looks like {} ({}/{} sampled)",
                self.table,
                self.column,
                self.kind.describe(),
                self.hits,
                self.sampled
            )
        }
    }
}

/// A masked column in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedColumn {
    /// Table.
    pub table: String,
    /// Column.
    pub column: String,
    /// Strategy applied (`keep` columns are listed too: the author's decision is on record).
    pub strategy: Strategy,
}

/// What [`protect`] did to one database, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseMasking {
    /// Database resource name.
    pub resource: String,
    /// Columns with a rule, with their strategy.
    pub columns: Vec<MaskedColumn>,
    /// Columns the gate sampled.
    pub scanned_columns: usize,
    /// What the gate found (every finding had a rule, or the run would have stopped).
    pub findings: Vec<Finding>,
    /// Rows rewritten by masking, summed over tables.
    pub rows: u64,
    /// Time spent sampling and detecting.
    pub scan_ms: u64,
    /// Time spent masking inside the copy (after restore).
    pub mask_ms: u64,
    /// Whether the restore masked columns while the data loaded (their time is in the
    /// restore's).
    #[serde(default)]
    pub masked_in_restore: bool,
    /// Time spent verifying.
    pub verify_ms: u64,
}

/// Whether the gate runs: `on` (the default) or `off` (the blueprint's `pii_gate: off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Gate {
    /// Unclassified personal data stops the run.
    #[default]
    On,
    /// No scan; masking rules still apply.
    Off,
}

/// report.json `masking`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MaskingReport {
    /// The gate's setting.
    pub gate: Gate,
    /// One entry per database that was protected.
    pub databases: Vec<DatabaseMasking>,
}

/// Why the copy may not be used.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// Columns that look like personal data and have no rule.
    #[error("{}", unclassified_message(.resource, .findings))]
    Unclassified {
        /// Database resource.
        resource: String,
        /// Every unclassified column.
        findings: Vec<Finding>,
    },
    /// Rules that name what the restored database does not have, or cannot apply.
    #[error("masking rules for database `{resource}` do not fit the restored data:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Rules {
        /// Database resource.
        resource: String,
        /// One line per rule.
        problems: Vec<String>,
    },
    /// Masking ran but the copy still holds what it should not.
    #[error("masking of database `{resource}` did not hold: {problem}")]
    Verify {
        /// Database resource.
        resource: String,
        /// What the probe found (column and count, never a value).
        problem: String,
    },
    /// The database could not be read or written.
    #[error("database `{resource}`: {message}")]
    Db {
        /// Database resource.
        resource: String,
        /// The engine's error.
        message: String,
    },
}

fn unclassified_message(resource: &str, findings: &[Finding]) -> String {
    let mut s = format!(
        "personal data gate: database `{resource}` has {} column(s) that look like personal data and have no masking rule:\n",
        findings.len()
    );
    for f in findings {
        let _ = writeln!(s, "  - {f}");
    }
    s.push_str("add a rule for each to the blueprint (a strategy, or `keep` if it is not personal data):\n");
    s.push_str(&snippet(resource, findings));
    s
}

/// The `masking:` block that classifies `findings` with the suggested strategies.
#[must_use]
pub fn snippet(resource: &str, findings: &[Finding]) -> String {
    let mut s = format!("masking:\n  {resource}:\n");
    let mut seen = BTreeSet::new();
    for f in findings {
        if seen.insert((&f.table, &f.column)) {
            let _ = writeln!(
                s,
                "    {}.{}: {}",
                f.table,
                f.column,
                quoted(f.kind.suggested_strategy())
            );
        }
    }
    s
}

fn quoted(strategy: &str) -> String {
    if strategy == "null" {
        "\"null\"".into()
    } else {
        strategy.into()
    }
}

/// A restored copy the gate can read and masking can write.
#[async_trait]
pub trait Db: Send {
    /// Every column of every user table.
    async fn columns(&mut self) -> Result<Vec<Column>, String>;
    /// Up to `limit` rows of `cols` (all of one table) as text; `None` is NULL.
    async fn sample(
        &mut self,
        table: &str,
        cols: &[&Column],
        limit: usize,
    ) -> Result<Vec<Vec<Option<String>>>, String>;
    /// Rewrites `cols` of `table` with their strategies in one transaction; rows changed.
    async fn mask(
        &mut self,
        table: &str,
        cols: &[(&Column, Strategy)],
        key: &MaskKey,
    ) -> Result<u64, String>;
    /// How many rows of `table` still hold one of `values` in `col`.
    async fn count_originals(
        &mut self,
        table: &str,
        col: &Column,
        values: &[String],
    ) -> Result<u64, String>;
}

/// Opens a restored database the way sql checks reach it: a SQLite file (`engine` `sqlite`,
/// `location` its path) or PostgreSQL (`postgres`, `location` its URL).
///
/// # Errors
/// An engine masking does not support, or a database that cannot be opened.
pub async fn open(
    resource: &str,
    engine: &str,
    location: &str,
) -> Result<Box<dyn Db>, PrivacyError> {
    let err = |message: String| PrivacyError::Db {
        resource: resource.to_string(),
        message,
    };
    match engine {
        "sqlite" => Ok(Box::new(sqlite::Sqlite::open(location).map_err(err)?)),
        "postgres" => Ok(Box::new(
            postgres::Postgres::connect(location).await.map_err(err)?,
        )),
        other => Err(err(format!("masking does not support engine `{other}`"))),
    }
}

/// Samples every table of `db`, classifies every column, and (with `gate` on) refuses
/// unclassified personal data; then masks by `rules` and verifies. With `scan_only`, nothing is
/// written and every finding is returned (for `dryrun scan`). Columns in `streamed` were masked
/// while the data loaded ([`stream`]): they are not masked again, and their originals for the
/// verification come from the stream.
///
/// # Errors
/// See [`PrivacyError`].
pub async fn protect(
    resource: &str,
    db: &mut dyn Db,
    rules: &[Rule],
    gate: Gate,
    key: &MaskKey,
    (scan_only, streamed): (bool, Option<&stream::Streamed>),
) -> Result<DatabaseMasking, PrivacyError> {
    let pre_masked = |c: &Column| {
        streamed.is_some_and(|s| s.masked.contains(&(c.table.clone(), c.name.clone())))
    };
    let dberr = |message: String| PrivacyError::Db {
        resource: resource.to_string(),
        message,
    };
    let columns = db.columns().await.map_err(dberr)?;
    let rule_of = |c: &Column| {
        rules
            .iter()
            .find(|r| r.table == c.table && r.column == c.name)
            .map(|r| r.strategy)
    };

    // The rules must name real columns and fit them.
    let mut problems = Vec::new();
    for r in rules {
        match columns
            .iter()
            .find(|c| c.table == r.table && c.name == r.column)
        {
            None => {
                let near = crate::blueprint::diag::did_you_mean(
                    &format!("{}.{}", r.table, r.column),
                    columns
                        .iter()
                        .map(Column::address)
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str),
                )
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
                problems.push(format!(
                    "{}.{}: no such column in the restored database{near}",
                    r.table, r.column
                ));
            }
            Some(c) if c.not_null && r.strategy == Strategy::Null => problems.push(format!(
                "{}.{}: is NOT NULL, so `null` cannot apply; use `redact` or `hash`",
                r.table, r.column
            )),
            Some(_) => {}
        }
    }
    if !problems.is_empty() && !scan_only {
        return Err(PrivacyError::Rules {
            resource: resource.to_string(),
            problems,
        });
    }

    // Scan.
    let t = Instant::now();
    let mut by_table: BTreeMap<&str, Vec<&Column>> = BTreeMap::new();
    for c in &columns {
        by_table.entry(&c.table).or_default().push(c);
    }
    let mut findings = Vec::new();
    let mut originals: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut scanned = 0;
    for (table, cols) in &by_table {
        let sampled: Vec<&Column> = cols.iter().copied().filter(|c| c.sampled).collect();
        for c in cols {
            if detect::name_hint(&c.name) {
                findings.push(Finding {
                    table: c.table.clone(),
                    column: c.name.clone(),
                    kind: Kind::NameHint,
                    hits: 0,
                    sampled: 0,
                });
            }
        }
        if sampled.is_empty() {
            continue;
        }
        scanned += sampled.len();
        let rows = db
            .sample(table, &sampled, SAMPLE_ROWS)
            .await
            .map_err(dberr)?;
        for (i, c) in sampled.iter().enumerate() {
            let values: Vec<&str> = rows.iter().filter_map(|r| r[i].as_deref()).collect();
            findings.extend(classify(c, &values));
            if rule_of(c).is_some_and(|s| s != Strategy::Keep) && !pre_masked(c) {
                originals.insert(
                    (c.table.clone(), c.name.clone()),
                    values.iter().map(|v| (*v).to_string()).collect(),
                );
            }
        }
    }
    // A column flagged by a value detector does not need its name hint listed too.
    let valued: BTreeSet<(String, String)> = findings
        .iter()
        .filter(|f| f.kind != Kind::NameHint)
        .map(|f| (f.table.clone(), f.column.clone()))
        .collect();
    findings.retain(|f| {
        f.kind != Kind::NameHint || !valued.contains(&(f.table.clone(), f.column.clone()))
    });
    let scan_ms = millis(t);
    let mut report = DatabaseMasking {
        resource: resource.to_string(),
        columns: rules
            .iter()
            .map(|r| MaskedColumn {
                table: r.table.clone(),
                column: r.column.clone(),
                strategy: r.strategy,
            })
            .collect(),
        scanned_columns: scanned,
        findings: findings.clone(),
        rows: 0,
        scan_ms,
        mask_ms: 0,
        masked_in_restore: false,
        verify_ms: 0,
    };
    if scan_only {
        return Ok(report);
    }
    let unclassified: Vec<Finding> = findings
        .into_iter()
        .filter(|f| {
            !rules
                .iter()
                .any(|r| r.table == f.table && r.column == f.column)
        })
        .collect();
    if gate == Gate::On && !unclassified.is_empty() {
        return Err(PrivacyError::Unclassified {
            resource: resource.to_string(),
            findings: unclassified,
        });
    }

    // Mask, one transaction per table, what the restore did not mask on the way in.
    let t = Instant::now();
    if let Some(s) = streamed {
        report.rows += s.rows;
        originals.extend(s.originals.clone());
    }
    for (table, cols) in &by_table {
        let masked: Vec<(&Column, Strategy)> = cols
            .iter()
            .filter(|c| !pre_masked(c))
            .filter_map(|c| rule_of(c).filter(|s| *s != Strategy::Keep).map(|s| (*c, s)))
            .collect();
        if masked.is_empty() {
            continue;
        }
        report.rows += db.mask(table, &masked, key).await.map_err(dberr)?;
    }
    report.mask_ms = millis(t);
    report.masked_in_restore = streamed.is_some_and(|s| !s.masked.is_empty());

    // Verify.
    let t = Instant::now();
    no_originals_left(resource, db, &columns, &originals).await?;
    if gate == Gate::On {
        for (table, cols) in &by_table {
            let probe: Vec<&Column> = cols
                .iter()
                .copied()
                // Only what masking changed into something that must not look personal: the
                // other columns were scanned above and nothing has written them since.
                .filter(|c| c.sampled && rule_of(c).is_some_and(|s| !s.looks_personal()))
                .collect();
            if probe.is_empty() {
                continue;
            }
            let rows = db.sample(table, &probe, SAMPLE_ROWS).await.map_err(dberr)?;
            for (i, c) in probe.iter().enumerate() {
                let values: Vec<&str> = rows.iter().filter_map(|r| r[i].as_deref()).collect();
                if let Some(f) = classify(c, &values).into_iter().next() {
                    return Err(PrivacyError::Verify {
                        resource: resource.to_string(),
                        problem: format!("after masking, {f}"),
                    });
                }
            }
        }
    }
    report.verify_ms = millis(t);
    Ok(report)
}

/// Checks that no column in `originals` still holds one of its sampled original values.
async fn no_originals_left(
    resource: &str,
    db: &mut dyn Db,
    columns: &[Column],
    originals: &BTreeMap<(String, String), Vec<String>>,
) -> Result<(), PrivacyError> {
    for ((table, column), values) in originals {
        let Some(c) = columns
            .iter()
            .find(|c| &c.table == table && &c.name == column)
        else {
            continue;
        };
        if values.is_empty() {
            continue;
        }
        let left = db
            .count_originals(table, c, values)
            .await
            .map_err(|message| PrivacyError::Db {
                resource: resource.to_string(),
                message,
            })?;
        if left > 0 {
            return Err(PrivacyError::Verify {
                resource: resource.to_string(),
                problem: format!(
                    "{table}.{column} still holds {left} original value(s) after masking"
                ),
            });
        }
    }
    Ok(())
}

/// The verification half of [`protect`] for a copy masked while it was restored, on its own:
/// none of the originals `streamed` sampled is left in the PostgreSQL copy at `url`. The local
/// provider runs it on a golden copy before the copy is kept, since later runs clone it
/// without the originals (they never leave memory).
///
/// # Errors
/// [`PrivacyError::Verify`] naming the column; the copy's errors.
pub async fn verify_streamed(
    resource: &str,
    url: &str,
    streamed: &stream::Streamed,
) -> Result<(), PrivacyError> {
    let mut db = open(resource, "postgres", url).await?;
    let columns = db.columns().await.map_err(|message| PrivacyError::Db {
        resource: resource.to_string(),
        message,
    })?;
    no_originals_left(resource, db.as_mut(), &columns, &streamed.originals).await
}

/// The value detectors' findings for one column's sample.
fn classify(c: &Column, values: &[&str]) -> Vec<Finding> {
    let mut hits: BTreeMap<Kind, usize> = BTreeMap::new();
    for v in values {
        if let Some(k) = detect::value_kind(v) {
            *hits.entry(k).or_default() += 1;
        }
    }
    hits.into_iter()
        .filter(|(k, n)| k.flags(*n, values.len()))
        .map(|(kind, n)| Finding {
            table: c.table.clone(),
            column: c.name.clone(),
            kind,
            hits: n,
            sampled: values.len(),
        })
        .collect()
}

fn millis(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// `"name"` with embedded quotes doubled: an SQL identifier, whatever the catalog holds.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
