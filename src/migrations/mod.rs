//! Migration safety: what the release's migrations would do to production while they run.
//!
//! - [`postgres`]: a monitor connection samples `pg_stat_activity` and `pg_locks` every
//!   [`PERIOD`] while the release installs, and compares every relation's `relfilenode` before
//!   and after: per statement its duration, the locks it took and how long each was held, the
//!   relations it rewrote and the WAL it wrote ([`Migration`]). Any migration tool works: the
//!   monitor only watches the database.
//! - [`lint`]: static hints on the release's SQL files before anything is provisioned
//!   ([`Hint`]), each linked afterwards to what the trace measured.
//! - [`Guards`] (blueprint `guards:`) turn findings into a failed run, and [`compare`] puts a
//!   baseline release's check timings next to the candidate's (`dryrun run --baseline`).
//!
//! docs/migrations.md is the user's guide.

pub mod lint;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use lint::Hint;

/// How often the monitor samples (the bound: at most 10 ms).
pub const PERIOD: Duration = Duration::from_millis(10);

/// One statement the release ran during its install, as the monitor saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    /// Database resource name.
    pub database: String,
    /// The statement's text as the server reported it (secrets redacted; PostgreSQL keeps
    /// the first `track_activity_query_size` bytes, 1 KiB by default).
    pub statement: String,
    /// From the statement's start to its end (or to the last sample that saw it running).
    pub duration_ms: u64,
    /// Locks on tables and indexes the statement took, with how long each was held (until the
    /// transaction ended, to within one sampling period).
    pub locks: Vec<LockHold>,
    /// Relations whose storage was rewritten (their `relfilenode` changed).
    pub rewrites: Vec<String>,
    /// WAL written while the statement ran (bytes between the samples around it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_bytes: Option<u64>,
}

/// A lock a statement held on a relation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockHold {
    /// Relation (table or index) as `regclass` prints it.
    pub relation: String,
    /// Lock mode in PostgreSQL's SQL spelling, e.g. `ACCESS EXCLUSIVE`.
    pub mode: String,
    /// First to last sample that saw it held (0: seen in one sample only).
    pub held_ms: u64,
    /// What production's traffic cannot do while it is held: `reads and writes`, `writes`,
    /// or absent when it blocks neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<String>,
    /// Whether the relation existed before the install (a table the migration creates blocks
    /// nobody in production).
    pub existing: bool,
    /// Rows of the relation before the install (the planner's estimate), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Size on disk before the install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl LockHold {
    /// Blocks production's reads or writes on a relation production has.
    #[must_use]
    pub fn blocking(&self) -> bool {
        self.existing && self.blocks.is_some()
    }
}

/// `AccessExclusiveLock` → (`ACCESS EXCLUSIVE`, what it blocks).
#[must_use]
pub fn mode_name(pg: &str) -> (String, Option<&'static str>) {
    let blocks = match pg {
        "AccessExclusiveLock" => Some("reads and writes"),
        "ExclusiveLock" | "ShareRowExclusiveLock" | "ShareLock" => Some("writes"),
        _ => None,
    };
    let base = pg.strip_suffix("Lock").unwrap_or(pg);
    let mut out = String::new();
    for (i, c) in base.char_indices() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_uppercase());
    }
    (out, blocks)
}

/// How the trace of one database went (report.json `migration_trace`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceReport {
    /// Database resource name.
    pub database: String,
    /// `traced` or `skipped`.
    pub status: String,
    /// Why it was not traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Samples taken.
    pub samples: u64,
    /// The sampling period asked for.
    pub period_ms: u64,
    /// The longest gap between two samples (the real resolution).
    pub max_gap_ms: u64,
    /// Every relation whose storage the install rewrote.
    pub rewritten: Vec<String>,
}

impl TraceReport {
    /// A database that was not traced, and why.
    #[must_use]
    pub fn skipped(database: &str, reason: String) -> TraceReport {
        TraceReport {
            database: database.to_string(),
            status: "skipped".into(),
            reason: Some(reason),
            samples: 0,
            period_ms: millis(PERIOD),
            max_gap_ms: 0,
            rewritten: Vec::new(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The worst first: the longest lock that blocks production, then the longest statement.
pub fn sort_worst_first(m: &mut [Migration]) {
    let key = |m: &Migration| {
        let lock = m
            .locks
            .iter()
            .filter(|l| l.blocking())
            .map(|l| l.held_ms)
            .max();
        (lock.is_some(), lock.unwrap_or(0), m.duration_ms)
    };
    m.sort_by_key(|x| std::cmp::Reverse(key(x)));
}

/// One line for a statement: `ALTER TABLE events … held ACCESS EXCLUSIVE on events for 4.2 s
/// (table rewrite, 1.2 M rows)`.
#[must_use]
pub fn describe(m: &Migration) -> String {
    let stmt = short(&m.statement, 100);
    let worst = m
        .locks
        .iter()
        .filter(|l| l.blocking())
        .max_by_key(|l| l.held_ms);
    let Some(l) = worst else {
        let rewrite = if m.rewrites.is_empty() {
            String::new()
        } else {
            format!(", rewrote {}", m.rewrites.join(", "))
        };
        return format!(
            "{stmt} ran {}{rewrite}, no lock that blocks production",
            human_ms(m.duration_ms)
        );
    };
    let mut why = Vec::new();
    if m.rewrites.iter().any(|r| same_relation(r, &l.relation)) {
        why.push("table rewrite".to_string());
    }
    if let Some(r) = l.rows {
        why.push(format!("{} rows", human_count(r)));
    } else if let Some(b) = l.bytes {
        why.push(human_bytes(b));
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({})", why.join(", "))
    };
    format!(
        "{stmt} held {} on {} for {}{why}; blocks {}",
        l.mode,
        l.relation,
        human_ms(l.held_ms),
        l.blocks.as_deref().unwrap_or("nothing")
    )
}

/// The statement on one line, cut to `n` characters, without control characters (the release
/// wrote it; an escape sequence in it must not act in a terminal).
#[must_use]
pub fn short(s: &str, n: usize) -> String {
    let one = crate::sinks::clean(
        &s.split_whitespace().collect::<Vec<_>>().join(" "),
        usize::MAX,
    );
    if one.chars().count() > n {
        format!("{} …", one.chars().take(n).collect::<String>().trim_end())
    } else {
        one
    }
}

/// `public.events` and `events` name the same relation.
#[must_use]
pub fn same_relation(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        s.trim_matches('"')
            .strip_prefix("public.")
            .unwrap_or(s)
            .trim_matches('"')
            .to_string()
    };
    strip(a).eq_ignore_ascii_case(&strip(b))
}

fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        #[allow(clippy::cast_precision_loss)]
        let s = ms as f64 / 1000.0;
        format!("{s:.1} s")
    }
}

#[allow(clippy::cast_precision_loss)]
fn human_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1} k", n as f64 / 1e3),
        _ => format!("{:.1} M", n as f64 / 1e6),
    }
}

#[allow(clippy::cast_precision_loss)]
fn human_bytes(n: u64) -> String {
    match n {
        0..1_048_576 => format!("{} KiB", n / 1024),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.1} GiB", n as f64 / 1_073_741_824.0),
    }
}

/// The run's migration findings as text lines, for the terminal summary and report.md: the
/// guards, the statements worst first (at most `top`), databases not traced, the hints with
/// what was measured, and baseline vs candidate. Empty when there is nothing to say.
#[must_use]
pub fn summary_lines(r: &crate::report::RunReport, top: usize) -> Vec<String> {
    use crate::report::Status;
    let mut out = Vec::new();
    for g in &r.guards {
        let mark = match g.status {
            Status::Passed => "ok",
            Status::Failed => "FAILED",
            _ => "skipped",
        };
        out.push(format!(
            "guard {} ({}): {mark}{}",
            g.guard,
            g.limit,
            g.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    let notable: Vec<&Migration> = r
        .migrations
        .iter()
        .filter(|m| {
            m.locks.iter().any(LockHold::blocking) || !m.rewrites.is_empty() || m.duration_ms >= 100
        })
        .take(top)
        .collect();
    if !notable.is_empty() {
        let period = r
            .migration_trace
            .first()
            .map_or(millis(PERIOD), |t| t.period_ms);
        out.push(format!(
            "migrations ({} statement(s) seen, sampled every {period} ms; worst first):",
            r.migrations.len()
        ));
        for m in notable {
            out.push(format!("  {}", describe(m)));
        }
    }
    for t in r.migration_trace.iter().filter(|t| t.status != "traced") {
        out.push(format!(
            "migration trace: {} not traced: {}",
            t.database,
            t.reason.as_deref().unwrap_or("?")
        ));
    }
    for h in &r.hints {
        out.push(format!(
            "hint {}:{} {}: {}",
            h.file, h.line, h.rule, h.message
        ));
        out.push(format!("  fix: {}", h.fix));
        if let Some(m) = &h.measured {
            out.push(format!("  measured: {m}"));
        }
    }
    if let Some(b) = &r.baseline {
        out.push(format!(
            "baseline {} (run {}): {}",
            b.release,
            b.run_id,
            b.failure.as_deref().unwrap_or(b.status.as_str())
        ));
        for c in &b.checks {
            let base = match (c.baseline_p50_ms, c.baseline_p95_ms) {
                (Some(p50), Some(p95)) => format!("baseline p50 {p50} ms p95 {p95} ms"),
                _ => "not passed on the baseline".into(),
            };
            let change = c
                .p95_change_pct
                .map(|p| format!(" ({p:+.0}% p95)"))
                .unwrap_or_default();
            // What `max_p95_regression` leaves aside is said so, lest a +110 % of one sample
            // read as a verdict.
            let judged = if c.p95_change_pct.is_none() {
                String::new()
            } else if !b.comparable {
                ", not judged: the baseline is no yardstick".to_string()
            } else if c.samples < MIN_SAMPLES || c.baseline_samples.unwrap_or(0) < MIN_SAMPLES {
                format!(", not judged: fewer than {MIN_SAMPLES} timings (`repeat: 20`)")
            } else {
                String::new()
            };
            out.push(format!(
                "  {}: p50 {} ms p95 {} ms over {} run(s); {base}{change}{judged}",
                c.name, c.p50_ms, c.p95_ms, c.samples
            ));
        }
    }
    out
}

/// Blueprint `guards:`: findings that fail the run (exit 1).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Guards {
    /// A lock that blocks production's reads or writes on a relation that existed before the
    /// install (`ACCESS EXCLUSIVE`, `EXCLUSIVE`, `SHARE ROW EXCLUSIVE`, `SHARE`), held longer.
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub max_exclusive_lock: Option<Duration>,
    /// The release's install steps together (its migrations), per service.
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub max_migration: Option<Duration>,
    /// Tables (or indexes) the install must not rewrite.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forbid_rewrite: Vec<String>,
    /// Largest allowed growth of a check's p95 over the baseline's, in percent
    /// (`dryrun run --baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_p95_regression: Option<f64>,
}

mod opt_duration {
    use std::time::Duration;
    #[allow(clippy::ref_option)]
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

impl Guards {
    /// No guard set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Guards::default()
    }
}

/// One guard's verdict (report.json `guards`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardResult {
    /// `max_exclusive_lock`, `max_migration`, `forbid_rewrite` or `max_p95_regression`.
    pub guard: String,
    /// The limit as written.
    pub limit: String,
    /// `passed`, `failed`, or `skipped` (nothing to judge: e.g. no trace, no baseline).
    pub status: crate::report::Status,
    /// What crossed the limit (the statement quoted), or why it was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the guards judge.
#[derive(Debug, Clone, Copy)]
pub struct Findings<'a> {
    /// Traced statements.
    pub migrations: &'a [Migration],
    /// Per database, how the trace went.
    pub traces: &'a [TraceReport],
    /// Per service, its install steps and their times.
    pub installs: &'a [(String, Vec<(String, Duration)>)],
    /// Baseline vs candidate, when a baseline ran.
    pub comparison: Option<&'a Comparison>,
}

/// Judges every guard that is set.
#[must_use]
pub fn judge(g: &Guards, f: Findings<'_>) -> Vec<GuardResult> {
    use crate::report::Status;
    let mut out = Vec::new();
    let traced = f.traces.iter().any(|t| t.status == "traced");
    let untraced = || {
        let why: Vec<String> = f
            .traces
            .iter()
            .map(|t| {
                format!(
                    "{}: {}",
                    t.database,
                    t.reason.as_deref().unwrap_or("not traced")
                )
            })
            .collect();
        if why.is_empty() {
            "no database was traced (the install did not run)".to_string()
        } else {
            format!("not traced ({})", why.join("; "))
        }
    };
    if let Some(limit) = g.max_exclusive_lock {
        let limit_ms = millis(limit);
        let worst = f
            .migrations
            .iter()
            .flat_map(|m| m.locks.iter().map(move |l| (m, l)))
            .filter(|(_, l)| l.blocking())
            .max_by_key(|(_, l)| l.held_ms);
        let (status, message) = match worst {
            _ if !traced => (Status::Skipped, Some(untraced())),
            Some((m, l)) if l.held_ms > limit_ms => (
                Status::Failed,
                Some(format!(
                    "`{}` held {} on {} for {} (limit {}): production's {} on {} would wait that long",
                    short(&m.statement, 200),
                    l.mode,
                    l.relation,
                    human_ms(l.held_ms),
                    humantime::format_duration(limit),
                    l.blocks.as_deref().unwrap_or("queries"),
                    l.relation
                )),
            ),
            Some((m, l)) => (
                Status::Passed,
                Some(format!(
                    "longest: {} on {} for {} (`{}`)",
                    l.mode,
                    l.relation,
                    human_ms(l.held_ms),
                    short(&m.statement, 80)
                )),
            ),
            None => (
                Status::Passed,
                Some("no lock that blocks production was seen".into()),
            ),
        };
        out.push(GuardResult {
            guard: "max_exclusive_lock".into(),
            limit: humantime::format_duration(limit).to_string(),
            status,
            message,
        });
    }
    if let Some(limit) = g.max_migration {
        let worst = f
            .installs
            .iter()
            .map(|(svc, steps)| (svc, steps, steps.iter().map(|s| s.1).sum::<Duration>()))
            .max_by_key(|x| x.2);
        let (status, message) = match worst {
            None => (
                Status::Skipped,
                Some("no service finished its install steps".into()),
            ),
            Some((svc, steps, total)) => {
                let each: Vec<String> = steps
                    .iter()
                    .map(|(n, d)| format!("{n} {}", human_ms(millis(*d))))
                    .collect();
                let text = format!(
                    "install steps of {svc} took {} ({})",
                    human_ms(millis(total)),
                    each.join(", ")
                );
                if total > limit {
                    (
                        Status::Failed,
                        Some(format!(
                            "{text}; the limit is {}",
                            humantime::format_duration(limit)
                        )),
                    )
                } else {
                    (Status::Passed, Some(text))
                }
            }
        };
        out.push(GuardResult {
            guard: "max_migration".into(),
            limit: humantime::format_duration(limit).to_string(),
            status,
            message,
        });
    }
    if !g.forbid_rewrite.is_empty() {
        let mut hits = Vec::new();
        for t in f.traces {
            for r in &t.rewritten {
                if g.forbid_rewrite.iter().any(|x| same_relation(x, r)) {
                    let by = f
                        .migrations
                        .iter()
                        .find(|m| m.database == t.database && m.rewrites.contains(r));
                    hits.push(match by {
                        Some(m) => format!("`{}` rewrote {r}", short(&m.statement, 200)),
                        None => format!("the install rewrote {r} (statement not seen)"),
                    });
                }
            }
        }
        let (status, message) = if !traced {
            (Status::Skipped, Some(untraced()))
        } else if hits.is_empty() {
            (Status::Passed, None)
        } else {
            (Status::Failed, Some(hits.join("; ")))
        };
        out.push(GuardResult {
            guard: "forbid_rewrite".into(),
            limit: g.forbid_rewrite.join(", "),
            status,
            message,
        });
    }
    if let Some(limit) = g.max_p95_regression {
        let (status, message) = match f.comparison {
            None => (
                Status::Skipped,
                Some("no baseline ran (`dryrun run --baseline REF`)".into()),
            ),
            Some(c) if !c.comparable => (
                Status::Skipped,
                Some(match &c.failure {
                    Some(f) => format!(
                        "a check failed on the baseline run {}, or none passed there ({f}); \
                         nothing to compare with",
                        c.run_id
                    ),
                    None => format!(
                        "no check passed on the baseline run {}; nothing to compare with",
                        c.run_id
                    ),
                }),
            ),
            Some(c) => {
                let judged: Vec<(&CheckComparison, f64)> = c
                    .checks
                    .iter()
                    .filter(|x| {
                        x.samples >= MIN_SAMPLES && x.baseline_samples.unwrap_or(0) >= MIN_SAMPLES
                    })
                    .filter_map(|x| x.p95_change_pct.map(|p| (x, p)))
                    .collect();
                let grew = |x: &CheckComparison| {
                    x.p95_ms > x.baseline_p95_ms.unwrap_or(0).saturating_add(NOISE_MS)
                };
                let worst = judged
                    .iter()
                    .filter(|(x, _)| grew(x))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .or_else(|| judged.iter().max_by(|a, b| a.1.total_cmp(&b.1)));
                match worst {
                    Some((x, p)) if *p > limit && grew(x) => (
                        Status::Failed,
                        Some(format!(
                            "check `{}`: p95 {} ms, baseline {} {} ms (+{p:.0}%, limit {limit}%)",
                            x.name,
                            x.p95_ms,
                            c.release,
                            x.baseline_p95_ms.unwrap_or_default()
                        )),
                    ),
                    Some((x, p)) => (
                        Status::Passed,
                        Some(if grew(x) || *p <= 0.0 {
                            let noise = judged.iter().any(|(y, q)| !grew(y) && q > p);
                            format!(
                                "largest: check `{}` {p:+.0}%{}",
                                x.name,
                                if noise {
                                    format!(" (larger ones within the {NOISE_MS} ms noise floor)")
                                } else {
                                    String::new()
                                }
                            )
                        } else {
                            format!(
                                "largest: check `{}` {p:+.0}% (within the {NOISE_MS} ms noise floor)",
                                x.name
                            )
                        }),
                    ),
                    None => (
                        Status::Skipped,
                        Some(format!(
                            "no check passed at least {MIN_SAMPLES} times on both releases \
                             (give the checks to compare `repeat: 20` or more)"
                        )),
                    ),
                }
            }
        };
        out.push(GuardResult {
            guard: "max_p95_regression".into(),
            limit: format!("{limit}%"),
            status,
            message,
        });
    }
    out
}

/// The timings a baseline run leaves for the candidate's comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// The baseline's run id.
    pub run_id: String,
    /// Its release (version or reference).
    pub release: String,
    /// How it ended.
    pub status: crate::report::Status,
    /// Its deciding failure.
    pub failure: Option<String>,
    /// Whether it is a yardstick: its checks ran, and each passed or could not run from here
    /// (skipped, e.g. a sql check on AWS without `runner_in_vpc`), at least one passed. Its own
    /// guards do not matter (production has been through its migrations already); a check
    /// that failed there, or an install that never got to the checks, does.
    #[serde(default)]
    pub comparable: bool,
    /// Per check: the time of each passing repetition.
    pub timings: BTreeMap<String, Vec<u64>>,
}

impl Baseline {
    /// Takes a finished baseline run's check timings.
    #[must_use]
    pub fn of(r: &crate::report::RunReport) -> Baseline {
        Baseline {
            run_id: r.run_id.clone(),
            release: r
                .release
                .version
                .clone()
                .unwrap_or_else(|| r.release.reference.clone()),
            status: r.status,
            failure: r.failure.clone(),
            comparable: r.checks.iter().all(|c| {
                matches!(
                    c.status,
                    crate::report::Status::Passed | crate::report::Status::Skipped
                )
            }) && r
                .checks
                .iter()
                .any(|c| c.status == crate::report::Status::Passed),
            timings: r
                .checks
                .iter()
                .filter(|c| c.status == crate::report::Status::Passed)
                .map(|c| (c.name.clone(), c.timings_ms.clone()))
                .collect(),
        }
    }
}

/// Baseline vs candidate (report.json `baseline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The baseline's run id (its report is in its run directory).
    pub run_id: String,
    /// The baseline release.
    pub release: String,
    /// How the baseline run ended.
    pub status: crate::report::Status,
    /// Its deciding failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Its timings are a yardstick: its checks passed or were skipped from here, at least one
    /// passed; its own guards do not count (see [`Baseline::comparable`]).
    #[serde(default)]
    pub comparable: bool,
    /// Per check, in blueprint order.
    pub checks: Vec<CheckComparison>,
}

/// One check on both releases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckComparison {
    /// Check name.
    pub name: String,
    /// Candidate: repetitions timed, p50, p95.
    pub samples: usize,
    /// Candidate p50.
    pub p50_ms: u64,
    /// Candidate p95.
    pub p95_ms: u64,
    /// Baseline p50 (absent: it did not pass there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_p50_ms: Option<u64>,
    /// Baseline p95.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_p95_ms: Option<u64>,
    /// Baseline: repetitions timed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_samples: Option<usize>,
    /// (candidate p95 − baseline p95) / baseline p95 × 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_change_pct: Option<f64>,
}

/// The fewest timings, on each side, of a check `max_p95_regression` judges: a single slow
/// sample is noise. (A nearest-rank p95 of fewer than 20 samples is the slowest one:
/// `repeat: 20` or more is advised.)
pub const MIN_SAMPLES: usize = 5;

/// Growth of a p95 by this much or less never fails `max_p95_regression`: timings are whole
/// milliseconds, so a 1 ms check reads 1 or 2 ms by rounding alone (+100 %).
pub const NOISE_MS: u64 = 2;

/// The nearest-rank percentile `p` (0–100) of `v`; `None` when empty.
#[must_use]
pub fn percentile(v: &[u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// Puts the candidate's passing checks next to the baseline's.
#[must_use]
pub fn compare(b: &Baseline, checks: &[crate::report::CheckReport]) -> Comparison {
    let mut out = Vec::new();
    for c in checks
        .iter()
        .filter(|c| c.status == crate::report::Status::Passed && !c.timings_ms.is_empty())
    {
        let (Some(p50), Some(p95)) = (
            percentile(&c.timings_ms, 50.0),
            percentile(&c.timings_ms, 95.0),
        ) else {
            continue;
        };
        let base = b.timings.get(&c.name).filter(|t| !t.is_empty());
        let bp50 = base.and_then(|t| percentile(t, 50.0));
        let bp95 = base.and_then(|t| percentile(t, 95.0));
        #[allow(clippy::cast_precision_loss)]
        let change = bp95.map(|b| {
            // A 0 ms baseline: measure growth against 1 ms (the clock's unit here).
            let b = b.max(1) as f64;
            (p95 as f64 - b) / b * 100.0
        });
        out.push(CheckComparison {
            name: c.name.clone(),
            samples: c.timings_ms.len(),
            p50_ms: p50,
            p95_ms: p95,
            baseline_p50_ms: bp50,
            baseline_p95_ms: bp95,
            baseline_samples: base.map(Vec::len),
            p95_change_pct: change,
        });
    }
    Comparison {
        run_id: b.run_id.clone(),
        release: b.release.clone(),
        status: b.status,
        failure: b.failure.clone(),
        comparable: b.comparable,
        checks: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(relation: &str, mode: &str, held_ms: u64, existing: bool) -> LockHold {
        let (mode, blocks) = mode_name(mode);
        LockHold {
            relation: relation.into(),
            mode,
            held_ms,
            blocks: blocks.map(str::to_string),
            existing,
            rows: Some(1_200_000),
            bytes: None,
        }
    }

    fn mig(statement: &str, locks: Vec<LockHold>, rewrites: &[&str]) -> Migration {
        Migration {
            database: "db".into(),
            statement: statement.into(),
            duration_ms: 4300,
            locks,
            rewrites: rewrites.iter().map(|s| (*s).to_string()).collect(),
            wal_bytes: Some(1 << 20),
        }
    }

    fn traced(rewritten: &[&str]) -> Vec<TraceReport> {
        vec![TraceReport {
            database: "db".into(),
            status: "traced".into(),
            reason: None,
            samples: 100,
            period_ms: 10,
            max_gap_ms: 12,
            rewritten: rewritten.iter().map(|s| (*s).to_string()).collect(),
        }]
    }

    #[test]
    fn lock_modes_are_named_as_sql_spells_them_with_what_they_block() {
        assert_eq!(
            mode_name("AccessExclusiveLock"),
            ("ACCESS EXCLUSIVE".into(), Some("reads and writes"))
        );
        assert_eq!(mode_name("ShareLock"), ("SHARE".into(), Some("writes")));
        assert_eq!(
            mode_name("ShareRowExclusiveLock"),
            ("SHARE ROW EXCLUSIVE".into(), Some("writes"))
        );
        assert_eq!(
            mode_name("RowExclusiveLock"),
            ("ROW EXCLUSIVE".into(), None)
        );
        assert_eq!(
            mode_name("ShareUpdateExclusiveLock"),
            ("SHARE UPDATE EXCLUSIVE".into(), None)
        );
    }

    #[test]
    fn a_long_exclusive_lock_on_an_existing_table_fails_the_guard_with_the_statement_quoted() {
        let g = Guards {
            max_exclusive_lock: Some(Duration::from_secs(1)),
            ..Guards::default()
        };
        let ms = vec![
            mig(
                "ALTER TABLE events ADD COLUMN trace uuid DEFAULT gen_random_uuid()",
                vec![lock("events", "AccessExclusiveLock", 4200, true)],
                &["events"],
            ),
            // A new table's exclusive lock blocks nobody.
            mig(
                "CREATE TABLE audit (id int)",
                vec![lock("audit", "AccessExclusiveLock", 9000, false)],
                &[],
            ),
        ];
        let tr = traced(&["events"]);
        let f = Findings {
            migrations: &ms,
            traces: &tr,
            installs: &[],
            comparison: None,
        };
        let r = judge(&g, f);
        assert_eq!(r[0].status, crate::report::Status::Failed, "{r:?}");
        let msg = r[0].message.as_deref().unwrap();
        assert!(
            msg.contains("`ALTER TABLE events ADD COLUMN trace uuid DEFAULT gen_random_uuid()`"),
            "{msg}"
        );
        assert!(
            msg.contains("ACCESS EXCLUSIVE on events for 4.2 s (limit 1s)"),
            "{msg}"
        );
        assert_eq!(
            describe(&ms[0]),
            "ALTER TABLE events ADD COLUMN trace uuid DEFAULT gen_random_uuid() held ACCESS EXCLUSIVE on events for 4.2 s (table rewrite, 1.2 M rows); blocks reads and writes"
        );
        // Under the limit it passes; with no trace it is skipped, not passed.
        let g2 = Guards {
            max_exclusive_lock: Some(Duration::from_secs(5)),
            ..Guards::default()
        };
        assert_eq!(judge(&g2, f)[0].status, crate::report::Status::Passed);
        let none = [TraceReport::skipped("db", "runner outside the VPC".into())];
        let f3 = Findings { traces: &none, ..f };
        let r3 = judge(&g2, f3);
        assert_eq!(r3[0].status, crate::report::Status::Skipped);
        assert!(
            r3[0]
                .message
                .as_deref()
                .unwrap()
                .contains("runner outside the VPC")
        );
    }

    #[test]
    fn forbidden_rewrites_match_with_or_without_the_schema_and_name_the_statement() {
        let g = Guards {
            forbid_rewrite: vec!["orders".into(), "public.events".into()],
            ..Guards::default()
        };
        let ms = vec![mig("VACUUM FULL events", vec![], &["events"])];
        let tr = traced(&["events", "customers"]);
        let r = judge(
            &g,
            Findings {
                migrations: &ms,
                traces: &tr,
                installs: &[],
                comparison: None,
            },
        );
        assert_eq!(r[0].status, crate::report::Status::Failed);
        assert_eq!(
            r[0].message.as_deref(),
            Some("`VACUUM FULL events` rewrote events")
        );
        let tr = traced(&["customers"]);
        let r = judge(
            &g,
            Findings {
                migrations: &ms,
                traces: &tr,
                installs: &[],
                comparison: None,
            },
        );
        assert_eq!(r[0].status, crate::report::Status::Passed);
    }

    #[test]
    fn max_migration_adds_the_install_steps_of_each_service() {
        let g = Guards {
            max_migration: Some(Duration::from_secs(5)),
            ..Guards::default()
        };
        let installs = vec![(
            "service.app".to_string(),
            vec![
                ("migrate".to_string(), Duration::from_secs(4)),
                ("seed".to_string(), Duration::from_secs(2)),
            ],
        )];
        let r = judge(
            &g,
            Findings {
                migrations: &[],
                traces: &[],
                installs: &installs,
                comparison: None,
            },
        );
        assert_eq!(r[0].status, crate::report::Status::Failed);
        assert_eq!(
            r[0].message.as_deref(),
            Some(
                "install steps of service.app took 6.0 s (migrate 4.0 s, seed 2.0 s); the limit is 5s"
            )
        );
    }

    #[test]
    fn percentiles_are_nearest_rank_and_regressions_are_judged_against_the_baseline() {
        assert_eq!(percentile(&[], 95.0), None);
        assert_eq!(percentile(&[7], 95.0), Some(7));
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&v, 50.0), Some(10));
        assert_eq!(percentile(&v, 95.0), Some(19));
        let b = Baseline {
            run_id: "r-baseline".into(),
            release: "1.0".into(),
            status: crate::report::Status::Passed,
            failure: None,
            comparable: true,
            timings: [("list".to_string(), vec![10; 20])].into(),
        };
        let mut c = crate::report::CheckReport {
            name: "list".into(),
            kind: crate::blueprint::CheckKind::Http,
            status: crate::report::Status::Passed,
            duration_ms: 0,
            attempts: 1,
            message: None,
            output: None,
            timings_ms: vec![13; 20],
        };
        let cmp = compare(&b, std::slice::from_ref(&c));
        assert_eq!(cmp.checks[0].p95_change_pct, Some(30.0));
        let g = Guards {
            max_p95_regression: Some(20.0),
            ..Guards::default()
        };
        let f = |cmp: &Comparison| {
            judge(
                &g,
                Findings {
                    migrations: &[],
                    traces: &[],
                    installs: &[],
                    comparison: Some(cmp),
                },
            )
        };
        let r = f(&cmp);
        assert_eq!(r[0].status, crate::report::Status::Failed);
        assert_eq!(
            r[0].message.as_deref(),
            Some("check `list`: p95 13 ms, baseline 1.0 10 ms (+30%, limit 20%)")
        );
        // A baseline that failed only its own guards (production has been through its
        // migrations) is still a yardstick: every check passed on it.
        let guarded = Comparison {
            status: crate::report::Status::Failed,
            failure: Some("guard max_exclusive_lock (1s): …".into()),
            ..cmp.clone()
        };
        assert_eq!(f(&guarded)[0].status, crate::report::Status::Failed);
        // One whose checks did not all pass (or never ran) is not.
        let failed = Comparison {
            status: crate::report::Status::Failed,
            failure: Some("install failed".into()),
            comparable: false,
            ..cmp
        };
        let r = f(&failed);
        assert_eq!(r[0].status, crate::report::Status::Skipped);
        assert!(
            r[0].message.as_deref().unwrap().starts_with(
                "a check failed on the baseline run r-baseline, or none passed there (install failed)"
            ),
            "{r:?}"
        );
        let mut ok = c.clone();
        ok.timings_ms = vec![11; 20];
        assert_eq!(
            f(&compare(&b, &[ok])).first().unwrap().status,
            crate::report::Status::Passed
        );
        // Fewer than MIN_SAMPLES timings on either side: a p95 that is the slowest sample is
        // not judged.
        let mut few = c.clone();
        few.timings_ms = vec![13; MIN_SAMPLES - 1];
        let r = f(&compare(&b, &[few]));
        assert_eq!(r[0].status, crate::report::Status::Skipped, "{r:?}");
        assert!(
            r[0].message
                .as_deref()
                .unwrap()
                .contains("at least 5 times"),
            "{r:?}"
        );
        // A millisecond check that reads 1 ms on the baseline and 3 ms now (+200 %) is within
        // the noise floor; 4 ms is not.
        let fast = Baseline {
            timings: [("list".to_string(), vec![1; 20])].into(),
            ..b
        };
        c.timings_ms = vec![3; 20];
        let r = f(&compare(&fast, std::slice::from_ref(&c)));
        assert_eq!(r[0].status, crate::report::Status::Passed, "{r:?}");
        assert_eq!(
            r[0].message.as_deref(),
            Some("largest: check `list` +200% (within the 2 ms noise floor)")
        );
        c.timings_ms = vec![4; 20];
        assert_eq!(
            f(&compare(&fast, std::slice::from_ref(&c)))[0].status,
            crate::report::Status::Failed
        );
        // Two checks: one +200 % within the noise floor, one +25 % that counts: the second
        // decides.
        let two = Baseline {
            timings: [
                ("tiny".to_string(), vec![1; 20]),
                ("list".to_string(), vec![20; 20]),
            ]
            .into(),
            ..fast
        };
        let mut tiny = c.clone();
        tiny.name = "tiny".into();
        tiny.timings_ms = vec![3; 20];
        c.timings_ms = vec![25; 20];
        let r = f(&compare(&two, &[tiny.clone(), c.clone()]));
        assert_eq!(r[0].status, crate::report::Status::Failed, "{r:?}");
        assert!(
            r[0].message.as_deref().unwrap().starts_with("check `list`"),
            "{r:?}"
        );
        c.timings_ms = vec![23; 20];
        let r = f(&compare(&two, &[tiny, c]));
        assert_eq!(r[0].status, crate::report::Status::Passed, "{r:?}");
        assert_eq!(
            r[0].message.as_deref(),
            Some("largest: check `list` +15% (larger ones within the 2 ms noise floor)")
        );
    }

    #[test]
    fn the_summary_says_which_compared_checks_the_guard_leaves_aside() {
        let mut r = crate::report::terminal::testutil::sample_report(crate::report::Status::Passed);
        let row = |name: &str, samples: usize, base: usize| CheckComparison {
            name: name.into(),
            samples,
            p50_ms: 44,
            p95_ms: 44,
            baseline_p50_ms: Some(21),
            baseline_p95_ms: Some(21),
            baseline_samples: Some(base),
            p95_change_pct: Some(110.0),
        };
        r.baseline = Some(Comparison {
            run_id: "r-baseline".into(),
            release: "1.0".into(),
            status: crate::report::Status::Passed,
            failure: None,
            comparable: true,
            checks: vec![row("once", 1, 1), row("many", 20, 20)],
        });
        let lines = summary_lines(&r, 5);
        let once = lines.iter().find(|l| l.contains("once:")).unwrap();
        assert!(
            once.ends_with("(+110% p95), not judged: fewer than 5 timings (`repeat: 20`)"),
            "{once}"
        );
        let many = lines.iter().find(|l| l.contains("many:")).unwrap();
        assert!(many.ends_with("(+110% p95)"), "{many}");
        // A baseline that is no yardstick: nothing is judged.
        if let Some(b) = &mut r.baseline {
            b.comparable = false;
        }
        let lines = summary_lines(&r, 5);
        let many = lines.iter().find(|l| l.contains("many:")).unwrap();
        assert!(
            many.ends_with("(+110% p95), not judged: the baseline is no yardstick"),
            "{many}"
        );
    }

    #[test]
    fn a_baseline_is_a_yardstick_when_its_checks_passed_whatever_its_guards_said() {
        use crate::report::Status;
        let mut r = crate::report::terminal::testutil::sample_report(Status::Passed);
        assert!(Baseline::of(&r).comparable);
        // Failed by its own guard: still a yardstick.
        r.status = Status::Failed;
        r.failure = Some("guard max_exclusive_lock (1s): …".into());
        assert!(Baseline::of(&r).comparable);
        // A check it could not run from here (skipped) does not matter either.
        r.checks[1].status = Status::Skipped;
        assert!(Baseline::of(&r).comparable);
        // A check that failed there does.
        r.checks[0].status = Status::Failed;
        assert!(!Baseline::of(&r).comparable);
        // And so do checks that never ran (the install failed).
        for c in &mut r.checks {
            c.status = Status::Skipped;
        }
        assert!(!Baseline::of(&r).comparable);
    }
}
