//! The control plane: the run history, the queue of accepted runs, delivery-id and schedule
//! deduplication, environment leases, the outbox of callbacks and notifications, the workers
//! and — with PostgreSQL — the run journals.
//!
//! One trait, [`Control`], two backends:
//!
//! | backend | where | for |
//! |---|---|---|
//! | [`sqlite::Sqlite`] | `STATE/history.sqlite`; leases are `flock`s in `STATE/leases` | one machine: the CLI and one `dryrun serve` on a state directory (the default) |
//! | [`postgres::Postgres`] | a PostgreSQL database (`--database-url`) | several `dryrun serve` workers (and CLI runs) on separate machines sharing one queue |
//!
//! Everything that starts, runs or shows a dry run goes through the trait ([`crate::runner`],
//! the server, the CLI); nothing else knows which backend is in use.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::report::{RunReport, Status, Trigger};
use crate::state::StateDir;

/// Control plane errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// SQLite said no.
    #[error("history database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL said no (or could not be reached).
    #[error("control database: {0}")]
    Postgres(String),
    /// A stored report does not parse.
    #[error("history database: stored report of {0} is damaged: {1}")]
    Report(String, serde_json::Error),
    /// A stored value is not one this version knows.
    #[error("history database: {0}")]
    Damaged(String),
    /// The environment lease could not be taken.
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
    /// Waiting for a lease was cancelled.
    #[error("cancelled while waiting for environment {0}")]
    Cancelled(String),
    /// The other workers took this one for dead (no heartbeat for the lease timeout) and
    /// recovered its runs.
    #[error(
        "worker {worker} was taken for dead (no heartbeat for {silent}) and its runs recovered by another worker"
    )]
    TakenForDead {
        /// This worker's id.
        worker: String,
        /// The lease timeout it exceeded, human-readable.
        silent: String,
    },
}

/// Where a run is in its life. `Passed`, `Failed` and `Error` come from its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Accepted, waiting for its environment and a slot.
    Queued,
    /// Claimed by a worker (or started by the CLI).
    Running,
    /// Ended: every check passed.
    Passed,
    /// Ended: the release would break (exit 1).
    Failed,
    /// Ended: the environment failed (exit 3), or the run could not start.
    Error,
    /// Its process or worker stopped during the run.
    Interrupted,
    /// It waited longer than `queue_max_age`; nothing was created.
    Expired,
    /// Dropped from the queue at a shutdown (versions before queued runs survived one).
    Cancelled,
}

impl RunStatus {
    /// Every status.
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Passed,
        RunStatus::Failed,
        RunStatus::Error,
        RunStatus::Interrupted,
        RunStatus::Expired,
        RunStatus::Cancelled,
    ];

    /// The name stored and shown.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Passed => "passed",
            RunStatus::Failed => "failed",
            RunStatus::Error => "error",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Expired => "expired",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// The status of a run's report.
    #[must_use]
    pub fn of_report(s: Status) -> RunStatus {
        match s {
            Status::Passed | Status::Skipped | Status::Pending => RunStatus::Passed,
            Status::Failed => RunStatus::Failed,
            Status::Error => RunStatus::Error,
        }
    }

    /// Queued or running.
    #[must_use]
    pub fn is_active(self) -> bool {
        matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<RunStatus, String> {
        RunStatus::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown run status `{s}`; one of {}",
                    RunStatus::ALL.map(RunStatus::as_str).join(", ")
                )
            })
    }
}

/// The stored name of a trigger.
#[must_use]
pub fn trigger_name(t: Trigger) -> &'static str {
    match t {
        Trigger::Cli => "cli",
        Trigger::Webhook => "webhook",
        Trigger::Schedule => "schedule",
    }
}

fn parse_trigger(s: &str) -> Result<Trigger, ControlError> {
    match s {
        "cli" => Ok(Trigger::Cli),
        "webhook" => Ok(Trigger::Webhook),
        "schedule" => Ok(Trigger::Schedule),
        other => Err(ControlError::Damaged(format!("unknown trigger `{other}`"))),
    }
}

/// One run as the history knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    /// Run id.
    pub run_id: String,
    /// Blueprint name.
    pub blueprint: String,
    /// Blueprint path under the blueprints root.
    pub blueprint_path: String,
    /// Provider.
    pub provider: String,
    /// Environment key (one run at a time per environment).
    pub environment: String,
    /// How it was started.
    pub trigger: Trigger,
    /// Release reference.
    pub release: String,
    /// Release version, once known.
    pub release_version: Option<String>,
    /// Where it is in its life.
    pub status: RunStatus,
    /// When accepted.
    pub queued_at: DateTime<Utc>,
    /// When it started running.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Total run time.
    pub duration_ms: Option<i64>,
    /// Restore time (RTO part).
    pub restore_ms: Option<i64>,
    /// Backup restored.
    pub backup_id: Option<String>,
    /// Its age at the start (RPO).
    pub backup_age_s: Option<i64>,
    /// Exit code of the run.
    pub exit_code: Option<i32>,
    /// Items left behind.
    pub left_behind: Option<i64>,
    /// The one-line failure.
    pub failure: Option<String>,
    /// Delivery id of the webhook that started it.
    pub delivery: Option<String>,
    /// Schedule that started it.
    pub schedule: Option<String>,
    /// Callback outcome (`delivered`, `failed: …`).
    pub callback: Option<String>,
    /// The worker that runs (or ran) it: `HOST/PID/…`.
    pub worker: Option<String>,
}

impl RunRow {
    /// A run just accepted (`queued`, now): everything about its outcome still unknown.
    #[must_use]
    pub fn queued(
        run_id: &str,
        blueprint: &str,
        blueprint_path: &str,
        provider: &str,
        trigger: Trigger,
        release: &str,
    ) -> RunRow {
        RunRow {
            run_id: run_id.into(),
            blueprint: blueprint.into(),
            blueprint_path: blueprint_path.into(),
            provider: provider.into(),
            environment: crate::lease::environment(provider, blueprint),
            trigger,
            release: release.into(),
            release_version: None,
            status: RunStatus::Queued,
            queued_at: Utc::now(),
            started_at: None,
            finished_at: None,
            duration_ms: None,
            restore_ms: None,
            backup_id: None,
            backup_age_s: None,
            exit_code: None,
            left_behind: None,
            failure: None,
            delivery: None,
            schedule: None,
            callback: None,
            worker: None,
        }
    }
}

/// A point of the rehearsal trend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendPoint {
    /// Run id.
    pub run_id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Status.
    pub status: RunStatus,
    /// Restore time.
    pub restore_ms: Option<i64>,
    /// Total time.
    pub duration_ms: Option<i64>,
    /// Backup age.
    pub backup_age_s: Option<i64>,
}

/// What an outbox message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    /// The signed summary for a run's `callback_url` (the URL is stored with it).
    Callback,
    /// A Slack-compatible `{"text"}` to `[notify] url` (the URL is read from the config at
    /// delivery time and never stored: chat webhook URLs carry their token).
    Notify,
}

impl OutboxKind {
    /// `callback` or `notify`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Callback => "callback",
            OutboxKind::Notify => "notify",
        }
    }

    fn parse(s: &str) -> OutboxKind {
        if s == "callback" {
            OutboxKind::Callback
        } else {
            OutboxKind::Notify
        }
    }
}

/// A message in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Id (stable across attempts: receivers deduplicate on it).
    pub id: i64,
    /// The run it is about (empty for schedule notices).
    pub run_id: String,
    /// Kind.
    pub kind: OutboxKind,
    /// Destination, for callbacks.
    pub url: Option<String>,
    /// Body (JSON).
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
}

/// Outcome of recording a new run.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// New run recorded.
    New,
    /// The delivery id (or the schedule's firing) was seen before: the original run.
    Duplicate(Box<RunRow>),
    /// The run id is taken (another run has it): draw another.
    IdTaken,
}

/// What makes a new run a repeat of an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup<'a> {
    /// Nothing: always a new run (CLI, the dashboard form without an id).
    None,
    /// A webhook delivery id.
    Delivery(&'a str),
    /// A schedule's firing: one run per schedule and instant, across all workers.
    Fire {
        /// Schedule name.
        schedule: &'a str,
        /// The instant it fired for.
        at: DateTime<Utc>,
    },
}

/// Who this process is to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Worker {
    /// Unique per process: `HOST/PID/RANDOM`.
    pub id: String,
    /// The state directory's id (`STATE/machine-id`): where this worker's journals, logs and
    /// local resources are. A restarted worker on the same state directory has the same one.
    pub machine: String,
    /// Host name, for messages.
    pub host: String,
    /// `serve` or `cli`.
    pub role: String,
}

impl Worker {
    /// This process on `state`.
    ///
    /// # Errors
    /// I/O errors reading or creating `STATE/machine-id`.
    pub fn this_process(state: &StateDir, role: &str) -> std::io::Result<Worker> {
        use rand::RngExt as _;
        let machine = state.machine_id()?;
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let nonce: u32 = rand::rng().random();
        Ok(Worker {
            id: format!("{host}/{}/{nonce:08x}", std::process::id()),
            machine,
            host,
            role: role.into(),
        })
    }
}

/// A held environment lease: one run per environment at a time. Give it back with
/// [`Control::release`].
#[derive(Debug)]
pub struct Lease {
    /// The environment.
    pub environment: String,
    /// The run holding it.
    pub run_id: String,
    /// Kept for what it holds: dropping a file lease unlocks it.
    #[allow(dead_code)]
    held: Held,
}

#[derive(Debug)]
enum Held {
    /// A `flock` on `STATE/leases/ENV.lock` (SQLite backend): the kernel releases it when the
    /// process dies.
    File(#[allow(dead_code)] crate::lease::Lease),
    /// A row in the `leases` table (PostgreSQL backend), alive while its worker heartbeats.
    Row,
}

/// An accepted run a worker claimed: it is `running` now, under `lease`.
#[derive(Debug)]
pub struct Claimed {
    /// The run.
    pub row: RunRow,
    /// The request it was accepted with (JSON), if kept.
    pub request: Option<String>,
    /// Its environment's lease.
    pub lease: Lease,
}

/// A run whose worker stopped while it ran: this worker recovers it (cleanup, status).
#[derive(Debug)]
pub struct Orphan {
    /// The run as the history has it.
    pub row: RunRow,
    /// The worker that ran it, if known.
    pub worker: Option<Worker>,
    /// The environment lease this worker now holds for it, if any.
    pub lease: Option<Lease>,
}

/// The control plane. See the module documentation.
#[async_trait]
pub trait Control: Send + Sync + std::fmt::Debug {
    /// `sqlite` or `postgresql`.
    fn backend(&self) -> &'static str;

    /// This process.
    fn worker(&self) -> &Worker;

    // --- runs ---

    /// Records a new run (queued, or running for the CLI) and, atomically, what makes it
    /// unique. A repeat records nothing and returns the original run.
    async fn insert(
        &self,
        row: &RunRow,
        request: Option<&str>,
        dedup: Dedup<'_>,
    ) -> Result<Inserted, ControlError>;

    /// The run a delivery id started, if seen before.
    async fn delivery(&self, id: &str) -> Result<Option<RunRow>, ControlError>;

    /// Sets a run's status (and failure text) without a report.
    async fn set_status(
        &self,
        run_id: &str,
        status: RunStatus,
        failure: Option<&str>,
    ) -> Result<(), ControlError>;

    /// Puts a `running` run that never began back in the queue, at its original place (no
    /// worker, no start time). False when the run is not `running`.
    async fn requeue(&self, run_id: &str) -> Result<bool, ControlError>;

    /// Records the finished run's report. With PostgreSQL only while the run is `running` on
    /// this worker: a worker taken for dead does not overwrite what another recorded.
    async fn finish(&self, rep: &RunReport) -> Result<(), ControlError>;

    /// Records that a run this worker executes ended before its report (status `error`), on
    /// the same terms as [`Control::finish`].
    async fn fail(&self, run_id: &str, text: &str) -> Result<(), ControlError>;

    /// The request a queued run was accepted with (JSON), if it was recorded.
    async fn request(&self, run_id: &str) -> Result<Option<String>, ControlError>;

    /// Records a callback outcome.
    async fn set_callback(&self, run_id: &str, outcome: &str) -> Result<(), ControlError>;

    /// One run and its report.
    async fn get(&self, run_id: &str) -> Result<Option<(RunRow, Option<RunReport>)>, ControlError>;

    /// Runs, newest first, filtered by status and blueprint.
    async fn list(
        &self,
        status: Option<RunStatus>,
        blueprint: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RunRow>, ControlError>;

    /// The trend of finished rehearsals of a blueprint, oldest first.
    async fn trend(&self, blueprint: &str, limit: usize) -> Result<Vec<TrendPoint>, ControlError>;

    /// Distinct blueprints with runs.
    async fn blueprints(&self) -> Result<Vec<String>, ControlError>;

    /// Number of runs recorded.
    async fn count(&self) -> Result<i64, ControlError>;

    /// Number of runs waiting in the queue.
    async fn queued(&self) -> Result<i64, ControlError>;

    /// Deletes finished runs that ended before `before` (and their delivery ids, schedule
    /// firings, journals and delivered messages), except those `keep` names; returns their ids.
    async fn prune(
        &self,
        before: DateTime<Utc>,
        keep: &(dyn for<'a> Fn(&'a str) -> bool + Sync),
    ) -> Result<Vec<String>, ControlError>;

    // --- the outbox ---

    /// Puts a message in the outbox; returns its id.
    async fn outbox_add(
        &self,
        run_id: &str,
        kind: OutboxKind,
        url: Option<&str>,
        body: &str,
    ) -> Result<i64, ControlError>;

    /// Takes up to `limit` messages due now, oldest first, and holds them for `hold` (no other
    /// worker takes them meanwhile; if this one dies they come due again after it).
    async fn outbox_claim(
        &self,
        limit: usize,
        hold: Duration,
    ) -> Result<Vec<OutboxItem>, ControlError>;

    /// When the next pending message is due, if any.
    async fn outbox_next(&self) -> Result<Option<DateTime<Utc>>, ControlError>;

    /// Records a failed attempt and when to try again.
    async fn outbox_retry(
        &self,
        id: i64,
        attempts: u32,
        next_at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), ControlError>;

    /// Records that a message was delivered or given up.
    async fn outbox_done(&self, id: i64, attempts: u32, outcome: &str) -> Result<(), ControlError>;

    /// Messages not delivered or given up yet.
    async fn outbox_pending(&self) -> Result<i64, ControlError>;

    // --- the queue and the environments ---

    /// Claims the oldest queued run whose environment is free — first in, first out per
    /// environment, exactly one worker per run — takes the environment's lease and marks the
    /// run `running` on this worker.
    async fn claim(&self) -> Result<Option<Claimed>, ControlError>;

    /// Waits for an environment's lease for `run_id` (the CLI); `on_wait` is told the holder
    /// once when it is taken.
    async fn lease(
        &self,
        environment: &str,
        run_id: &str,
        cancel: &CancellationToken,
        on_wait: &mut (dyn FnMut(Option<String>) + Send),
    ) -> Result<Lease, ControlError>;

    /// Gives a lease back.
    async fn release(&self, lease: Lease);

    // --- workers ---

    /// Tells the others this worker lives (and keeps its leases). Called every
    /// [`HEARTBEAT`].
    async fn heartbeat(&self) -> Result<(), ControlError>;

    /// This worker stops cleanly: its remaining leases go to whoever recovers them.
    async fn stopped(&self);

    /// Runs this worker should recover now: with SQLite at start-up, the runs left `running`
    /// by a process that is gone; with PostgreSQL, the runs under the leases of workers that
    /// stopped heartbeating for `lease_timeout` (their leases are this worker's now).
    async fn orphans(&self, at_start: bool) -> Result<Vec<Orphan>, ControlError>;

    /// The journal entries stored with the control plane for a run (PostgreSQL; JSON lines,
    /// in order). Empty with SQLite, whose journals are files only.
    async fn journal(&self, run_id: &str) -> Result<Vec<String>, ControlError>;

    /// Where a run's journal entries go besides its file (PostgreSQL), so that another worker
    /// can clean up after this one.
    fn journal_mirror(&self) -> Option<Arc<dyn crate::journal::Mirror>>;
}

/// How often a worker heartbeats (and looks for orphans).
pub const HEARTBEAT: Duration = Duration::from_secs(3);

/// Default time without a heartbeat after which a worker is taken for dead and its leases
/// recovered.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens the control plane: PostgreSQL when `database_url` is given, else SQLite in the state
/// directory.
///
/// # Errors
/// The database cannot be opened, reached or migrated.
pub async fn open(
    state: &StateDir,
    database_url: Option<&str>,
    role: &str,
    lease_timeout: Duration,
) -> Result<Arc<dyn Control>, ControlError> {
    let worker = Worker::this_process(state, role).map_err(|e| {
        ControlError::Damaged(format!(
            "state directory {}: machine id: {e}",
            state.root().display()
        ))
    })?;
    match database_url {
        Some(url) => Ok(Arc::new(
            postgres::Postgres::connect(url, worker, lease_timeout).await?,
        )),
        None => Ok(Arc::new(sqlite::Sqlite::open(state, worker)?)),
    }
}
