//! The run report: one model, several views.
//!
//! [`RunReport`] is what a run *is* once it has ended; it knows nothing of terminals or files.
//! The views render it: [`terminal`] (live progress and the final summary), [`json`]
//! (report.json, the contract in PRODUCT.md), [`junit`] (junit.xml) and [`markdown`] (report.md).

pub mod json;
pub mod junit;
pub mod markdown;
pub mod terminal;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Outcome of a stage, a check or a whole run.
///
/// Ordered from best to worst so that merging is `max`: a run with one failed check and one
/// infrastructure error is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not reached (the run stopped before it).
    Pending,
    /// Deliberately not run, e.g. "skipped: upstream failed".
    Skipped,
    /// Ran and met every expectation.
    Passed,
    /// Ran and showed that the release would break (a check, a migration, a health check).
    Failed,
    /// Could not run for reasons of the environment (provisioning, restore, timeouts).
    Error,
}

impl Status {
    /// The worse of two statuses.
    #[must_use]
    pub fn merge(self, other: Status) -> Status {
        self.max(other)
    }

    /// Lower-case name as used in report.json.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Skipped => "skipped",
            Status::Passed => "passed",
            Status::Failed => "failed",
            Status::Error => "error",
        }
    }
}

impl From<crate::provider::Blame> for Status {
    /// A failure the release is to blame for is `failed` (exit 1); one of the environment is
    /// `error` (exit 3).
    fn from(b: crate::provider::Blame) -> Status {
        match b {
            crate::provider::Blame::Release => Status::Failed,
            crate::provider::Blame::Environment => Status::Error,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the run was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// `dryrun run` on the command line.
    Cli,
    /// The signed portal webhook handled by `dryrun serve`.
    Webhook,
    /// A scheduled (nightly) rehearsal.
    Schedule,
}

/// The candidate release that was installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReport {
    /// What the user passed as `--release` (path, URL, S3 key).
    #[serde(rename = "ref")]
    pub reference: String,
    /// Version from the release manifest, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Git commit of the release, when the manifest names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<String>,
}

/// The production backup a database was restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    /// Backup identity (snapshot id, backup directory name).
    pub id: String,
    /// Production source it belongs to (database name, RDS instance).
    pub source: String,
    /// Resource address it was restored into, e.g. `database.db`.
    pub resource: String,
    /// When production was captured.
    pub taken_at: DateTime<Utc>,
    /// Age of the backup when the run started (the run's RPO).
    pub age_seconds: i64,
    /// How the copy was made from it (a golden copy cloned, or restored), when the provider
    /// says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<crate::provider::CloneInfo>,
}

/// One stage of the loop: compile, provision, restore, install, check, teardown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReport {
    /// Stage.
    pub name: Stage,
    /// Outcome.
    pub status: Status,
    /// Wall time from the stage's first step to its last.
    pub duration_ms: u64,
    /// Why it failed, or what it skipped; secrets already redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The stages of a run, in the order the loop takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The blueprint compiles.
    Compile,
    /// Resources are created.
    Provision,
    /// Databases and buckets are restored from production backups.
    Restore,
    /// The candidate release is installed into services.
    Install,
    /// The checks run.
    Check,
    /// The copy is torn down (or kept).
    Teardown,
}

impl Stage {
    /// Every stage, in loop order.
    pub const ALL: [Stage; 6] = [
        Stage::Compile,
        Stage::Provision,
        Stage::Restore,
        Stage::Install,
        Stage::Check,
        Stage::Teardown,
    ];

    /// The stage's name as reports and the API spell it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Compile => "compile",
            Stage::Provision => "provision",
            Stage::Restore => "restore",
            Stage::Install => "install",
            Stage::Check => "check",
            Stage::Teardown => "teardown",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Name from the blueprint.
    pub name: String,
    /// `http`, `command` or `sql`.
    pub kind: crate::blueprint::CheckKind,
    /// Outcome of the last attempt.
    pub status: Status,
    /// Time spent over all attempts.
    pub duration_ms: u64,
    /// How many attempts were made.
    pub attempts: u32,
    /// Actual vs expected, or the error; secrets already redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Captured output (truncated), for command and http checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Time of each passing run (`repeat: N` gives N), for p50/p95 against a baseline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timings_ms: Vec<u64>,
}

/// A resource the run created (or tried to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceReport {
    /// Address in the blueprint, `kind.name`, e.g. `database.db`.
    pub address: String,
    /// `database`, `bucket` or `service`.
    pub kind: crate::blueprint::ResourceKind,
    /// Provider identity (directory, pid, instance id); empty if creation never started.
    pub id: String,
    /// Whether teardown destroyed it.
    pub destroyed: bool,
    /// Status of its creation.
    pub status: Status,
    /// Why creation failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Its steps (create, restore, mask, install, delete) on the run's timeline, in the order
    /// they ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepSpan>,
    /// A service's install steps (the release's `install:` commands) and how long each took,
    /// in the order they ran: the `install` step above is these plus starting the service and
    /// waiting for its health.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub install_steps: Vec<InstallStep>,
}

/// One of the release's install commands on a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallStep {
    /// Its `name` in dryrun-release.yaml.
    pub name: String,
    /// How long it ran.
    pub duration_ms: u64,
}

/// A step on one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// The resource is created.
    Create,
    /// A database or bucket is restored.
    Restore,
    /// A restored database is scanned for personal data and masked.
    Mask,
    /// The release is installed into a service.
    Install,
    /// The resource is deleted (teardown).
    Delete,
}

impl Step {
    /// `create`, `restore`, `mask`, `install` or `delete`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Restore => "restore",
            Step::Mask => "mask",
            Step::Install => "install",
            Step::Delete => "delete",
        }
    }

    /// The stage whose time the step counts towards.
    #[must_use]
    pub fn stage(self) -> Stage {
        match self {
            Step::Create => Stage::Provision,
            Step::Restore | Step::Mask => Stage::Restore,
            Step::Install => Stage::Install,
            Step::Delete => Stage::Teardown,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a resource on the run's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpan {
    /// The step.
    pub step: Step,
    /// When it began, in milliseconds after the run started.
    pub start_ms: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// How it ended.
    pub status: Status,
}

/// Something teardown could not remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftBehind {
    /// Resource address, or `run` for run-level leftovers found by the sweep.
    pub address: String,
    /// Provider identity.
    pub id: String,
    /// Why it is still there (the provider's error, "kept until ...", "interrupted").
    pub reason: String,
}

/// The report of one run. Field names are the report.json contract (PRODUCT.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Run identity, also the journal name and the tag on every resource.
    pub run_id: String,
    /// Blueprint name.
    pub blueprint: String,
    /// Blueprint file as given.
    pub blueprint_path: String,
    /// Candidate release.
    pub release: ReleaseReport,
    /// `local` or `aws`.
    pub provider: String,
    /// How the run started.
    pub trigger: Trigger,
    /// `passed`, `failed` or `error`.
    pub status: Status,
    /// Process exit code that corresponds to this report (see `dryrun run --help`).
    pub exit_code: i32,
    /// Start of the run.
    pub started_at: DateTime<Utc>,
    /// End of the run (after teardown).
    pub finished_at: DateTime<Utc>,
    /// Total wall time.
    pub duration_ms: u64,
    /// The first database's backup (the one PRODUCT.md's `backup` field names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupReport>,
    /// Every restored backup, one per database.
    pub backups: Vec<BackupReport>,
    /// Time from the first restore start to the last restore end (the measured RTO part).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    /// Stages in loop order.
    pub stages: Vec<StageReport>,
    /// Checks in blueprint order.
    pub checks: Vec<CheckReport>,
    /// Resources in creation order.
    pub resources: Vec<ResourceReport>,
    /// What teardown could not remove (empty: nothing left behind).
    pub left_behind: Vec<LeftBehind>,
    /// When kept by the teardown policy: resources stay until this time, then `dryrun cleanup
    /// --expired` removes them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_until: Option<DateTime<Utc>>,
    /// The failure that decided the run's status, in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Requests the provider made to its backend, by operation (AWS only; empty otherwise).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub api_calls: BTreeMap<String, u64>,
    /// The personal data gate and masking: per database, the columns with a rule and their
    /// strategy, rows rewritten, times. Absent when the gate was off and nothing was masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masking: Option<crate::privacy::MaskingReport>,
    /// What the release sent to the sinks and what the firewall refused.
    #[serde(default)]
    pub side_effects: crate::sinks::SideEffects,
    /// The egress firewall: whether it confined the release, and how (local provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<crate::firewall::FirewallReport>,
    /// What the release's migrations did while it installed (PostgreSQL, traced), worst first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<crate::migrations::Migration>,
    /// Per database, whether and how it was traced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migration_trace: Vec<crate::migrations::TraceReport>,
    /// The blueprint's `guards:` and their verdicts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<crate::migrations::GuardResult>,
    /// Static hints on the release's SQL, each with what the trace measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hints: Vec<crate::migrations::Hint>,
    /// Baseline vs candidate (`dryrun run --baseline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<crate::migrations::Comparison>,
    /// On a billed provider (AWS): the estimate made before the run, and what it cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Box<crate::cost::CostReport>>,
}

impl RunReport {
    /// The stage of that name, if the run reached it.
    #[must_use]
    pub fn stage(&self, name: Stage) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Number of checks with the given status.
    #[must_use]
    pub fn count_checks(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }
}

/// Exit codes of `dryrun run` (printed in its `--help`).
pub mod exit {
    /// All checks passed, nothing left behind.
    pub const PASSED: i32 = 0;
    /// A check, a migration or a health check failed: the release would break.
    pub const FAILED: i32 = 1;
    /// Blueprint or usage error.
    pub const USAGE: i32 = 2;
    /// Infrastructure error: provisioning, restore or install failed for reasons of the
    /// environment.
    pub const INFRA: i32 = 3;
    /// Teardown left something behind (takes precedence: a leak needs attention first).
    pub const LEFT_BEHIND: i32 = 4;
}

/// Exit code for a run outcome.
#[must_use]
pub fn exit_code(status: Status, left_behind: usize) -> i32 {
    if left_behind > 0 {
        return exit::LEFT_BEHIND;
    }
    match status {
        Status::Passed | Status::Skipped | Status::Pending => exit::PASSED,
        Status::Failed => exit::FAILED,
        Status::Error => exit::INFRA,
    }
}

/// How a copy was made, in words for the terminal, report.md and the dashboard: `cloned from
/// its golden copy (reflink) in 140 ms`, `golden copy built in 24.1 s, cloned (copy)`,
/// `restored (no golden copy: …)`.
#[must_use]
pub fn describe_clone(c: &crate::provider::CloneInfo) -> String {
    use crate::provider::GoldenUse;
    match c.golden {
        GoldenUse::Hit => format!(
            "cloned from its golden copy ({}) in {}",
            c.method,
            human_ms(c.ms)
        ),
        GoldenUse::Miss => format!(
            "golden copy built in {}, cloned ({}); ready in {}",
            human_ms(c.build_ms.unwrap_or(c.ms)),
            c.method,
            human_ms(c.ms)
        ),
        GoldenUse::Off => match &c.reason {
            Some(r) => format!("restored in {} (no golden copy: {r})", human_ms(c.ms)),
            None => format!("restored in {}", human_ms(c.ms)),
        },
    }
}

/// Human size: `512 B`, `3.4 KB`, `1.2 GB` (powers of 1024).
#[must_use]
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Human duration for reports: `850 ms`, `4.2 s`, `3 min 05 s`, `2 h 10 min`, `3 d 4 h`.
#[must_use]
pub fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        human_secs(i64::try_from(ms / 1000).unwrap_or(i64::MAX))
    }
}

/// Human age for backups: `45 s`, `3 min 05 s`, `2 h 10 min`, `3 d 4 h`.
#[must_use]
pub fn human_secs(s: i64) -> String {
    let s = s.max(0);
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else {
        format!("{} d {} h", s / 86_400, (s % 86_400) / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_merge_takes_the_worse() {
        assert_eq!(Status::Passed.merge(Status::Failed), Status::Failed);
        assert_eq!(Status::Error.merge(Status::Failed), Status::Error);
        assert_eq!(Status::Skipped.merge(Status::Passed), Status::Passed);
    }

    #[test]
    fn left_behind_takes_precedence_in_exit_code() {
        assert_eq!(exit_code(Status::Passed, 0), 0);
        assert_eq!(exit_code(Status::Failed, 0), 1);
        assert_eq!(exit_code(Status::Error, 0), 3);
        assert_eq!(exit_code(Status::Passed, 1), 4);
    }

    #[test]
    fn human_durations_read_naturally() {
        assert_eq!(human_ms(850), "850 ms");
        assert_eq!(human_ms(4200), "4.2 s");
        assert_eq!(human_secs(185), "3 min 05 s");
        assert_eq!(human_secs(7800), "2 h 10 min");
        assert_eq!(human_secs(273_600), "3 d 4 h");
    }
}
