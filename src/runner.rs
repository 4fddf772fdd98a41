//! One way to start a run, for `dryrun run` and `dryrun serve` alike.
//!
//! A run needs an id nobody else has, its environment's lease (one run per environment), a
//! history row, the engine, the outcome in the history and the lease back — in that order,
//! whatever started it. The CLI gets id, lease and row from [`start_direct`]; the server claims
//! a queued run ([`crate::control::Control::claim`], which gives all three at once). Both then
//! call [`execute`]. [`recover`] is what a worker does for a run whose process died.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::blueprint::Blueprint;
use crate::control::{Control, ControlError, Dedup, Inserted, Lease, Orphan, RunRow, RunStatus};
use crate::engine::{self, EngineError, Event, RunOptions, Shutdown};
use crate::provider::{BackupPick, Provider};
use crate::release::Release;
use crate::report::{RunReport, Trigger};
use crate::secret::Secret;
use crate::state::StateDir;

/// Everything a run needs besides its id and lease, loaded and checked.
#[derive(Clone)]
pub struct Launch {
    /// The compiled blueprint.
    pub bp: Blueprint,
    /// Where it runs ([`crate::provider::choose`]).
    pub provider: Arc<dyn Provider>,
    /// The candidate release.
    pub release: Release,
    /// Which backup to restore.
    pub backup: BackupPick,
    /// How it was started.
    pub trigger: Trigger,
    /// Keep the copy this long instead of tearing it down.
    pub keep: Option<Duration>,
    /// Resources provisioned at once.
    pub concurrency: usize,
    /// Time compile took.
    pub compile_ms: u64,
    /// Teardown's time limit.
    pub teardown_timeout: Duration,
    /// Secrets the caller holds, for the run's redactor.
    pub secrets: Vec<Secret>,
    /// `dryrun scan` ([`RunOptions::scan`]).
    pub scan: bool,
    /// `--baseline`: the release in production, rehearsed first on its own copy of the same
    /// backup (run `RUN_ID-baseline`), its check timings compared with the candidate's.
    pub baseline: Option<Release>,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("blueprint", &self.bp.name)
            .field("provider", &self.provider.name())
            .field("release", &self.release.reference)
            .finish_non_exhaustive()
    }
}

/// Why a direct (CLI) run did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `--run-id` names a run that exists.
    #[error("a run with id `{0}` already exists")]
    IdTaken(String),
    /// Cancelled while waiting for the environment; nothing was created.
    #[error("interrupted while waiting for environment {0}; nothing was created")]
    Cancelled(String),
    /// The state directory.
    #[error("state directory: {0}")]
    State(#[from] std::io::Error),
    /// The control plane (the lease could not be taken).
    #[error(transparent)]
    Control(ControlError),
}

/// A direct run that holds its environment.
#[derive(Debug)]
pub struct Started {
    /// Its id.
    pub run_id: String,
    /// Its environment's lease.
    pub lease: Lease,
    /// The history could not record it (the run goes on; its journal has it).
    pub history_error: Option<ControlError>,
}

/// Starts a run from the CLI: claims an id (`id`, or a new one) in the state directory, waits
/// for the environment's lease (`on_wait` hears who holds it) and records the run as running.
///
/// # Errors
/// See [`StartError`].
#[allow(clippy::too_many_arguments)]
pub async fn start_direct(
    control: &dyn Control,
    state: &StateDir,
    bp: &Blueprint,
    provider: &str,
    release: (&str, &str),
    id: Option<String>,
    cancel: &CancellationToken,
    on_wait: &mut (dyn FnMut(Option<String>) + Send),
) -> Result<Started, StartError> {
    let env = crate::lease::environment(provider, &bp.name);
    loop {
        let run_id = id.clone().unwrap_or_else(|| engine::new_run_id(&bp.name));
        if !state.claim_run(&run_id)? {
            if id.is_some() {
                return Err(StartError::IdTaken(run_id));
            }
            continue;
        }
        let lease = match control.lease(&env, &run_id, cancel, on_wait).await {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir(state.run_dir(&run_id));
                return Err(match e {
                    ControlError::Cancelled(env) => StartError::Cancelled(env),
                    other => StartError::Control(other),
                });
            }
        };
        let row = RunRow {
            release_version: Some(release.1.to_string()),
            status: RunStatus::Running,
            started_at: Some(Utc::now()),
            worker: Some(control.worker().id.clone()),
            ..RunRow::queued(
                &run_id,
                &bp.name,
                &bp.path.display().to_string(),
                provider,
                Trigger::Cli,
                release.0,
            )
        };
        match control.insert(&row, None, Dedup::None).await {
            Ok(Inserted::New | Inserted::Duplicate(_)) => {
                return Ok(Started {
                    run_id,
                    lease,
                    history_error: None,
                });
            }
            Ok(Inserted::IdTaken) => {
                // Taken on another machine sharing the database (or by a run whose directory
                // is gone): give it back and draw again.
                control.release(lease).await;
                let _ = std::fs::remove_dir(state.run_dir(&run_id));
                if id.is_some() {
                    return Err(StartError::IdTaken(run_id));
                }
            }
            Err(e) => {
                return Ok(Started {
                    run_id,
                    lease,
                    history_error: Some(e),
                });
            }
        }
    }
}

/// Keeps a process that is not `dryrun serve` (a CLI run) alive in the control plane while it
/// waits for or holds an environment lease: a heartbeat every [`crate::control::HEARTBEAT`].
/// Without it, workers sharing a PostgreSQL control plane would take the process for dead
/// after their lease timeout and recover its run while it still runs. With SQLite the
/// heartbeat does nothing. `on_dead` is called once if the process was taken for dead anyway
/// (it was stopped or cut off for longer than the timeout); the heartbeat stops when the
/// returned guard is dropped.
pub fn keep_alive(
    control: Arc<dyn Control>,
    on_dead: impl FnOnce(&ControlError) + Send + 'static,
) -> KeepAlive {
    KeepAlive(tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::time::sleep(crate::control::HEARTBEAT).await;
            match control.heartbeat().await {
                Ok(()) => failing = false,
                Err(e @ ControlError::TakenForDead { .. }) => {
                    on_dead(&e);
                    return;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "heartbeat failed; retrying");
                    }
                    failing = true;
                }
            }
        }
    }))
}

/// The heartbeat of [`keep_alive`]; stops when dropped.
#[derive(Debug)]
pub struct KeepAlive(tokio::task::JoinHandle<()>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Rehearses the baseline release under the candidate's lease, as run `RUN_ID-baseline` (its own
/// journal, copy and teardown), then pins the candidate to the backups the baseline restored, so
/// both releases meet the same data.
async fn run_baseline(
    control: &dyn Control,
    state: &StateDir,
    run_id: &str,
    launch: &mut Launch,
    release: Release,
    events: &UnboundedSender<Event>,
    shutdown: &Shutdown,
) -> crate::migrations::Baseline {
    let id = format!("{run_id}-baseline");
    let failed = |why: String| crate::migrations::Baseline {
        run_id: id.clone(),
        release: release.reference.clone(),
        status: crate::report::Status::Error,
        failure: Some(why),
        comparable: false,
        timings: std::collections::BTreeMap::new(),
    };
    match state.claim_run(&id) {
        Ok(true) => {}
        Ok(false) => return failed(format!("run id {id} is taken")),
        Err(e) => return failed(format!("state directory: {e}")),
    }
    let opts = RunOptions {
        release: release.clone(),
        backup: launch.backup.clone(),
        keep: None,
        trigger: launch.trigger,
        concurrency: launch.concurrency,
        run_id: Some(id.clone()),
        compile_ms: launch.compile_ms,
        teardown_timeout: launch.teardown_timeout,
        secrets: launch.secrets.clone(),
        mirror: control.journal_mirror(),
        scan: false,
        baseline: None,
        history_ms: Vec::new(),
    };
    let rep = match engine::run(
        &launch.bp,
        launch.provider.clone(),
        state,
        opts,
        events.clone(),
        shutdown.clone(),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return failed(e.to_string()),
    };
    for b in &rep.backups {
        let name = b
            .resource
            .split_once('.')
            .map_or(b.resource.as_str(), |x| x.1);
        for r in &mut launch.bp.resources {
            if r.name == name
                && let crate::blueprint::ResourceSpec::Database(d) = &mut r.spec
            {
                d.backup = Some(b.id.clone());
            }
        }
    }
    if !rep.backups.is_empty() {
        launch.backup = BackupPick::Latest;
    }
    crate::migrations::Baseline::of(&rep)
}

/// How long the blueprint's last finished runs took (for the cost estimate; none when the
/// history cannot be read).
pub async fn history_ms(control: &dyn Control, blueprint: &str) -> Vec<i64> {
    control
        .trend(blueprint, 10)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.duration_ms)
        .collect()
}

/// What [`execute`] did.
#[derive(Debug)]
pub struct Executed {
    /// The engine's result.
    pub result: Result<RunReport, EngineError>,
    /// The history could not record the outcome.
    pub history_error: Option<ControlError>,
}

/// Runs a run that holds its lease and has its history row: the engine, then the outcome in
/// the history, then the lease back (teardown has ended by then).
pub async fn execute(
    control: &dyn Control,
    state: &StateDir,
    run_id: &str,
    lease: Lease,
    launch: Launch,
    events: UnboundedSender<Event>,
    shutdown: Shutdown,
) -> Executed {
    let mut launch = launch;
    let baseline = match launch.baseline.take() {
        Some(b) => {
            Some(run_baseline(control, state, run_id, &mut launch, b, &events, &shutdown).await)
        }
        None => None,
    };
    let opts = RunOptions {
        release: launch.release,
        backup: launch.backup,
        keep: launch.keep,
        trigger: launch.trigger,
        concurrency: launch.concurrency,
        run_id: Some(run_id.to_string()),
        compile_ms: launch.compile_ms,
        teardown_timeout: launch.teardown_timeout,
        secrets: launch.secrets,
        mirror: control.journal_mirror(),
        scan: launch.scan,
        baseline,
        history_ms: history_ms(control, &launch.bp.name).await,
    };
    let result = engine::run(&launch.bp, launch.provider, state, opts, events, shutdown).await;
    let recorded = match &result {
        Ok(rep) => control.finish(rep).await,
        Err(e) => {
            // The engine stopped before its journal (a missing secret): nothing was created,
            // and the run's claimed directory is empty. Only an empty directory is removed.
            let _ = std::fs::remove_dir(state.run_dir(run_id));
            control.fail(run_id, &e.to_string()).await
        }
    };
    control.release(lease).await;
    Executed {
        result,
        history_error: recorded.err(),
    }
}

/// Recovers a run whose process or worker stopped while it ran: cleans up what it created —
/// from its journal in this state directory, or (PostgreSQL) from the journal entries in the
/// control database, or by its tag — marks it `interrupted` with what happened, and gives its
/// lease back. A run of the local provider on another machine can only be cleaned there; its
/// history says so. A server run whose worker died after claiming it but before its first
/// journal entry created nothing anywhere: it is queued again, at its place in the queue.
/// Returns what was done, or `None` when the run is still in progress in a process on this
/// machine (left alone).
pub async fn recover(control: &dyn Control, state: &StateDir, orphan: Orphan) -> Option<Recovered> {
    let Orphan { row, worker, lease } = orphan;
    let who = worker.as_ref().map_or_else(
        || "the server".to_string(),
        |w| format!("worker {} ({} on {})", w.id, w.role, w.host),
    );
    if !row.status.is_active() {
        // It ended; only its lease was left.
        if let Some(l) = lease {
            control.release(l).await;
        }
        return None;
    }
    let run_id = row.run_id.clone();
    if !crate::state::is_run_id(&run_id) {
        // Only a damaged or tampered shared database has such a row: its id must not name a
        // path here. Nothing is touched.
        return conclude(
            control,
            &run_id,
            lease,
            format!("{who} stopped during the run; its id is not a valid run id, so nothing was cleaned up from here"),
        )
        .await;
    }
    let here = worker
        .as_ref()
        .is_none_or(|w| w.machine == control.worker().machine);
    let journal_file = state.run_dir(&run_id).join("journal.jsonl");
    if !journal_file.exists() && !here {
        let entries = control.journal(&run_id).await;
        // No journal entry in the database: the worker died between the claim and the run's
        // first entry, which precedes every side effect. (An unreadable journal is not
        // taken for an empty one.)
        if entries.as_ref().is_ok_and(Vec::is_empty)
            && row.trigger != Trigger::Cli
            && matches!(control.requeue(&run_id).await, Ok(true))
        {
            if let Some(l) = lease {
                control.release(l).await;
            }
            return Some(Recovered::Requeued(format!(
                "{who} stopped after claiming the run and before it began (nothing was created); it is queued again"
            )));
        }
        let entries = entries.unwrap_or_default();
        // The run ended and its journal was closed (nothing of it remains), but its worker
        // died before recording the outcome.
        let closed = entries.iter().any(|l| {
            matches!(
                serde_json::from_str::<crate::journal::Entry>(l),
                Ok(crate::journal::Entry::Closed { .. })
            )
        });
        if closed {
            return conclude(
                control,
                &run_id,
                lease,
                format!(
                    "{who} stopped after the run ended and before recording its outcome; its journal is closed: nothing of the run remains"
                ),
            )
            .await;
        }
        if row.provider == "local" {
            let w = worker.as_ref();
            return conclude(
                control,
                &run_id,
                lease,
                format!(
                    "{who} stopped during the run; its local resources are on {} (state directory id {}): `dryrun cleanup {run_id} --yes` there removes them, and so does restarting `dryrun serve` there",
                    w.map_or("?", |w| w.host.as_str()),
                    w.map_or("?", |w| w.machine.as_str()),
                ),
            )
            .await;
        }
        if !entries.is_empty() {
            // The journal from the control database becomes this worker's copy.
            if let Err(e) = adopt_journal(state, &run_id, &entries) {
                tracing::warn!(run_id = %run_id, error = %e, "cannot copy the journal; cleaning up by tag");
            }
        }
    }
    let provider = match crate::provider::choose(&row.provider, state, None, None).await {
        Ok(p) => p,
        Err(e) => {
            return conclude(
                control,
                &run_id,
                lease,
                format!(
                    "{who} stopped during the run; cleanup could not use the {} provider: {e}; run `dryrun cleanup {run_id} --provider {}`",
                    row.provider, row.provider
                ),
            )
            .await;
        }
    };
    let target = engine::cleanup::Target::Run(run_id.clone());
    let outcome = match engine::cleanup::survey(state, provider.as_ref(), &target).await {
        Ok(plan)
            if plan.iter().any(|p| {
                p.skipped
                    .as_deref()
                    .is_some_and(|s| s.starts_with("in progress"))
            }) =>
        {
            // Another process on this machine still runs it: not an orphan after all. Its lease
            // stays; that process gives it back when the run ends.
            return None;
        }
        Ok(plan) => match engine::cleanup::execute(state, provider.as_ref(), &plan).await {
            Ok(done) => {
                let failed: Vec<String> = done
                    .iter()
                    .flat_map(|c| c.failed.iter().map(|(w, why)| format!("{w}: {why}")))
                    .collect();
                let by = if here && worker.is_none() {
                    "at restart".to_string()
                } else {
                    format!("by worker {}", control.worker().id)
                };
                if failed.is_empty() {
                    format!("{who} stopped during the run; its resources were cleaned up {by}")
                } else {
                    format!(
                        "{who} stopped during the run; cleanup {by} left: {}",
                        failed.join("; ")
                    )
                }
            }
            Err(e) => format!("{who} stopped during the run; cleanup failed: {e}"),
        },
        Err(_) => format!("{who} stopped before the run wrote its journal; nothing was created"),
    };
    conclude(control, &run_id, lease, outcome).await
}

/// Marks a recovered run interrupted with `text` and gives its lease back.
async fn conclude(
    control: &dyn Control,
    run_id: &str,
    lease: Option<Lease>,
    text: String,
) -> Option<Recovered> {
    let _ = control
        .set_status(run_id, RunStatus::Interrupted, Some(&text))
        .await;
    if let Some(l) = lease {
        control.release(l).await;
    }
    Some(Recovered::Interrupted(text))
}

/// What [`recover`] did with a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Marked `interrupted`, with this text (what was cleaned up, or where to clean up).
    Interrupted(String),
    /// It had not begun: queued again (the text says why).
    Requeued(String),
}

/// Writes journal entries from the control database as this state directory's journal of the
/// run, so that `cleanup` works on it as on any local run.
fn adopt_journal(state: &StateDir, run_id: &str, entries: &[String]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = state.run_dir(run_id);
    crate::state::create_private_dir(&dir)?;
    let mut f = crate::state::create_private_file(&dir.join("journal.jsonl"))?;
    for e in entries {
        f.write_all(e.as_bytes())?;
        f.write_all(b"\n")?;
    }
    f.sync_all()
}
