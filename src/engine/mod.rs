//! The engine: one run, from a compiled blueprint to a report.
//!
//! 1. resolve secrets and backups (nothing is created if either is missing);
//! 2. walk the graph dependencies first, at most `concurrency` resources at a time: journal
//!    `Creating` → create → journal `Created` → restore (databases, buckets) → install
//!    (services); a resource whose dependency failed is "skipped: upstream failed";
//! 3. run the checks;
//! 4. tear down in reverse dependency order — after success, failure or a signal — unless the
//!    teardown policy keeps the copy; then sweep for anything tagged with the run id;
//! 5. build the [`RunReport`].
//!
//! Cancellation is a parameter ([`Shutdown`]): `soft` stops new work and tears down; `hard`
//! (the second Ctrl-C) abandons teardown once the journal is flushed and reports everything not
//! yet destroyed as left behind. docs/teardown.md states the guarantees.

pub mod cleanup;
pub mod events;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::blueprint::template::Position;
use crate::blueprint::{Blueprint, ResourceSpec, TeardownPolicy};
use crate::checks::{self, CheckEnv};
use crate::graph::Graph;
use crate::journal::{Entry, Journal, JournalError};
use crate::provider::{
    BackupInfo, BackupPick, Deleted, InstallRequest, Outputs, Provider, ProviderError, RecordSink,
    ResourceRecord, ResourceRequest, RunInfo,
};
use crate::release::Release;
use crate::report::{
    BackupReport, CheckReport, LeftBehind, ReleaseReport, ResourceReport, RunReport, StageReport,
    Status, Trigger, exit_code,
};
use crate::secret::{Redactor, Secret};
use crate::state::StateDir;

pub use events::Event;

/// Stage names in loop order.
pub const STAGES: [&str; 6] = [
    "compile",
    "provision",
    "restore",
    "install",
    "check",
    "teardown",
];

/// Default for [`RunOptions::teardown_timeout`].
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(600);

/// Options of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The candidate release.
    pub release: Release,
    /// Which backup to restore (overrides per-resource pins unless `Latest`).
    pub backup: BackupPick,
    /// Keep the copy this long instead of tearing it down.
    pub keep: Option<Duration>,
    /// How the run was started.
    pub trigger: Trigger,
    /// Resources provisioned at once.
    pub concurrency: usize,
    /// Run id to use (default: generated).
    pub run_id: Option<String>,
    /// Time compile took (the caller compiled).
    pub compile_ms: u64,
    /// How long teardown may take in all before what remains is reported as left behind
    /// (exit 4; `dryrun cleanup` finishes it). Default [`TEARDOWN_TIMEOUT`].
    pub teardown_timeout: Duration,
    /// Secrets the caller holds (the server's webhook secret, API tokens, notification URL):
    /// registered with the run's redactor before anything runs, so that no log, report or
    /// message of the run can show them. The provider's own ([`Provider::held_secrets`]) are
    /// added by the engine.
    pub secrets: Vec<Secret>,
}

/// Cancellation of a run.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// First signal: stop new work, tear down.
    pub soft: CancellationToken,
    /// Second signal: stop tearing down; report what is left.
    pub hard: CancellationToken,
    /// Name of the signal that triggered `soft`, for the report.
    pub reason: Arc<Mutex<Option<String>>>,
}

/// Errors that stop a run before anything is created.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A declared secret has no value.
    #[error("secret `{name}`: environment variable {env} is not set; export it before the run")]
    MissingSecret {
        /// Secret name.
        name: String,
        /// Variable.
        env: String,
    },
    /// The journal cannot be written: nothing is created without it.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Generates a run id: `BLUEPRINT-YYYYMMDD-HHMMSS-XXXXXXXX` (UTC, 32 random bits). Unique in
/// practice; [`claim_run_id`] makes it unique for certain.
#[must_use]
pub fn new_run_id(blueprint: &str) -> String {
    use rand::RngExt as _;
    let suffix: u32 = rand::rng().random();
    format!(
        "{blueprint}-{}-{suffix:08x}",
        Utc::now().format("%Y%m%d-%H%M%S")
    )
}

/// Picks a new run id and claims it atomically, across processes and workers: its run
/// directory is created exclusively (`StateDir::claim_run`), then `record` records it (the
/// history row; `Ok(false)` means the id is taken there). A taken id is given up (its directory
/// removed) and another one drawn, so two runs never share an id however many start in the same
/// second.
///
/// # Errors
/// What `record` returns, or an I/O error creating the directory.
pub fn claim_run_id<E: From<std::io::Error>>(
    state: &StateDir,
    blueprint: &str,
    mut record: impl FnMut(&str) -> Result<bool, E>,
) -> Result<String, E> {
    loop {
        let id = new_run_id(blueprint);
        if !state.claim_run(&id)? {
            continue;
        }
        match record(&id) {
            Ok(true) => return Ok(id),
            Ok(false) => {
                let _ = std::fs::remove_dir(state.run_dir(&id));
            }
            Err(e) => {
                let _ = std::fs::remove_dir(state.run_dir(&id));
                return Err(e);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    Pending,
    Running,
    Ok,
    Failed,
    Skipped,
}

/// Spans of a stage's steps, to compute its wall time.
#[derive(Debug, Default, Clone)]
struct Span {
    start: Option<Instant>,
    end: Option<Instant>,
    status: Option<Status>,
    message: Option<String>,
}

impl Span {
    fn add(&mut self, start: Instant, end: Instant, status: Status, message: Option<String>) {
        self.start = Some(self.start.map_or(start, |s| s.min(start)));
        self.end = Some(self.end.map_or(end, |e| e.max(end)));
        let worse = self.status.is_none_or(|s| status > s);
        if worse && message.is_some() {
            self.message = message;
        }
        self.status = Some(self.status.map_or(status, |s| s.merge(status)));
    }

    fn ms(&self) -> u64 {
        match (self.start, self.end) {
            (Some(s), Some(e)) => millis(e.duration_since(s)),
            _ => 0,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Shared {
    provider: Arc<dyn Provider>,
    journal: Arc<Journal>,
    run: RunInfo,
    release: Release,
    base_ctx: Value,
    /// Values of params with a declared rule (allowed in shell positions as declared).
    vetted: Vec<String>,
    outputs: Mutex<BTreeMap<String, Outputs>>,
    records: Mutex<Vec<ResourceRecord>>,
    spans: Mutex<BTreeMap<&'static str, Span>>,
    events: UnboundedSender<Event>,
    cancel: CancellationToken,
}

impl Shared {
    fn emit(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    fn ctx(&self) -> Value {
        let mut ctx = self.base_ctx.clone();
        let outs = self
            .outputs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut res = serde_json::Map::new();
        for (name, o) in outs.iter() {
            let m: serde_json::Map<String, Value> = o
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.value.clone())))
                .collect();
            res.insert(name.clone(), Value::Object(m));
        }
        ctx["resources"] = Value::Object(res);
        ctx
    }

    fn set_record(&self, record: &ResourceRecord) {
        let mut recs = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = recs.iter_mut().find(|r| r.address == record.address) {
            let mut data = r.data.clone();
            data.extend(record.data.clone());
            *r = ResourceRecord {
                data,
                ..record.clone()
            };
        } else {
            recs.push(record.clone());
        }
    }

    fn add_outputs(&self, name: &str, o: Outputs) {
        for v in o.values().filter(|v| v.secret) {
            self.run.redactor.register(&Secret::new(v.value.clone()));
        }
        self.outputs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .extend(o);
    }

    fn span(&self, stage: &'static str, start: Instant, status: Status, message: Option<String>) {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(stage)
            .or_default()
            .add(start, Instant::now(), status, message);
    }
}

impl RecordSink for Shared {
    fn update(&self, record: &ResourceRecord) -> Result<(), std::io::Error> {
        self.journal
            .append(&Entry::Created {
                record: record.clone(),
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.set_record(record);
        Ok(())
    }
}

/// A failed step: blame decides failed (1) versus error (3).
#[derive(Debug, Clone)]
struct Failure {
    status: Status,
    message: String,
}

fn failure(address: &str, step: &str, e: &ProviderError, redactor: &Redactor) -> Failure {
    Failure {
        status: e.blame().into(),
        message: redactor.redact(&format!("{step} of {address} failed: {e}")),
    }
}

/// Runs a blueprint end to end and returns its report.
///
/// # Errors
/// Only errors that stop the run before anything is created ([`EngineError`]); every later
/// failure is part of the report.
#[allow(clippy::too_many_lines)]
pub async fn run(
    bp: &Blueprint,
    provider: Arc<dyn Provider>,
    state: &StateDir,
    opts: RunOptions,
    events: UnboundedSender<Event>,
    shutdown: Shutdown,
) -> Result<RunReport, EngineError> {
    let started_at = Utc::now();
    let t0 = Instant::now();
    let run_id = opts.run_id.clone().unwrap_or_else(|| new_run_id(&bp.name));
    let redactor = Redactor::new();
    for s in opts.secrets.iter().chain(provider.held_secrets().iter()) {
        redactor.register(s);
    }

    // Secrets first: a run that cannot get its secrets creates nothing.
    let mut secrets = serde_json::Map::new();
    for (name, src) in &bp.secrets {
        let value = std::env::var(&src.env)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| src.default.clone());
        let Some(value) = value else {
            return Err(EngineError::MissingSecret {
                name: name.clone(),
                env: src.env.clone(),
            });
        };
        redactor.register(&Secret::new(value.clone()));
        secrets.insert(name.clone(), Value::String(value));
    }

    let journal = Arc::new(Journal::create(state, &run_id)?);
    let expires_at =
        started_at + chrono::Duration::from_std(bp.ttl).unwrap_or(chrono::Duration::hours(6));
    journal.append(&Entry::Started {
        run_id: run_id.clone(),
        blueprint: bp.name.clone(),
        blueprint_path: bp.path.display().to_string(),
        provider: provider.name().to_string(),
        release: opts.release.reference.clone(),
        at: started_at,
        expires_at,
        pid: std::process::id(),
    })?;

    let release_report = ReleaseReport {
        reference: opts.release.reference.clone(),
        version: Some(opts.release.manifest.version.clone()),
        git_sha: opts.release.manifest.git_sha.clone(),
    };
    let _ = events.send(Event::RunStarted {
        run_id: run_id.clone(),
        blueprint: bp.name.clone(),
        provider: provider.name().to_string(),
        release: opts.release.manifest.version.clone(),
    });
    let _ = events.send(Event::StageFinished {
        stage: "compile",
        status: Status::Passed,
        duration_ms: opts.compile_ms,
    });

    let base_ctx = json!({
        "params": bp.params,
        "secrets": Value::Object(secrets),
        "release": {"ref": opts.release.reference, "version": opts.release.manifest.version, "git_sha": opts.release.manifest.git_sha.clone().unwrap_or_default()},
        "run": {"id": run_id, "blueprint": bp.name},
        "resources": {},
    });
    let shared = Arc::new(Shared {
        provider: provider.clone(),
        journal: journal.clone(),
        run: RunInfo {
            run_id: run_id.clone(),
            blueprint: bp.name.clone(),
            expires_at,
            log_dir: state.run_dir(&run_id).join("logs"),
            redactor: redactor.clone(),
        },
        release: opts.release.clone(),
        base_ctx,
        vetted: bp.vetted(),
        outputs: Mutex::new(BTreeMap::new()),
        records: Mutex::new(Vec::new()),
        spans: Mutex::new(BTreeMap::new()),
        events: events.clone(),
        cancel: shutdown.soft.clone(),
    });

    // Backups: find them all before creating anything.
    let mut backups: BTreeMap<String, BackupInfo> = BTreeMap::new();
    let mut failures: Vec<Failure> = Vec::new();
    for r in &bp.resources {
        if let ResourceSpec::Database(db) = &r.spec {
            let pick = match (&opts.backup, &db.backup) {
                (BackupPick::Latest, Some(pin)) => BackupPick::Id(pin.clone()),
                (p, _) => p.clone(),
            };
            match provider.find_backup(db, &pick).await {
                Ok(b) => {
                    backups.insert(r.name.clone(), b);
                }
                Err(e) => failures.push(Failure {
                    status: Status::Error,
                    message: format!("backup for {}: {e}", r.address()),
                }),
            }
        }
    }

    // Provision, restore, install.
    let graph = Graph::new(bp);
    let n = graph.nodes.len();
    let mut node_state = vec![NodeState::Pending; n];
    let mut node_msg: Vec<Option<String>> = vec![None; n];
    let mut node_status: Vec<Status> = vec![Status::Pending; n];
    if failures.is_empty() {
        let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
        let mut set: JoinSet<(usize, Result<(), Failure>)> = JoinSet::new();
        let mut task_node: std::collections::HashMap<tokio::task::Id, usize> =
            std::collections::HashMap::new();
        loop {
            if !shutdown.soft.is_cancelled() {
                for i in graph.order() {
                    if node_state[i] != NodeState::Pending {
                        continue;
                    }
                    let deps = &graph.nodes[i].deps;
                    if let Some(&bad) = deps
                        .iter()
                        .find(|&&d| matches!(node_state[d], NodeState::Failed | NodeState::Skipped))
                    {
                        node_state[i] = NodeState::Skipped;
                        node_status[i] = Status::Skipped;
                        let msg =
                            format!("skipped: upstream failed ({})", graph.nodes[bad].address);
                        shared.emit(Event::StepFinished {
                            address: graph.nodes[i].address.clone(),
                            step: "create",
                            status: Status::Skipped,
                            duration_ms: 0,
                            message: Some(msg.clone()),
                        });
                        node_msg[i] = Some(msg);
                        continue;
                    }
                    if deps.iter().all(|&d| node_state[d] == NodeState::Ok) {
                        node_state[i] = NodeState::Running;
                        let resource = bp.resources[i].clone();
                        let backup = backups.get(&resource.name).cloned();
                        let sh = shared.clone();
                        let sem = sem.clone();
                        let handle = set.spawn(async move {
                            let _permit = sem.acquire_owned().await;
                            (i, provision(&sh, &resource, backup.as_ref()).await)
                        });
                        task_node.insert(handle.id(), i);
                    }
                }
            }
            let Some(res) = set.join_next().await else {
                break;
            };
            match res {
                Ok((i, Ok(()))) => {
                    node_state[i] = NodeState::Ok;
                    node_status[i] = Status::Passed;
                }
                Ok((i, Err(f))) => {
                    node_state[i] = NodeState::Failed;
                    node_status[i] = f.status;
                    node_msg[i] = Some(f.message.clone());
                    failures.push(f);
                }
                Err(join_err) => {
                    // A panicking provider must not stop teardown: the resource whose task
                    // panicked fails (blamed on the environment); its siblings go on.
                    let idx = task_node.get(&join_err.id()).copied();
                    let address = idx.map_or_else(
                        || "a resource".to_string(),
                        |i| graph.nodes[i].address.clone(),
                    );
                    let msg = format!(
                        "provisioning of {address} panicked: {}",
                        panic_text(join_err)
                    );
                    if let Some(i) = idx {
                        node_state[i] = NodeState::Failed;
                        node_status[i] = Status::Error;
                        node_msg[i] = Some(msg.clone());
                        shared.emit(Event::StepFinished {
                            address: address.clone(),
                            step: "create",
                            status: Status::Error,
                            duration_ms: 0,
                            message: Some(msg.clone()),
                        });
                    }
                    failures.push(Failure {
                        status: Status::Error,
                        message: msg,
                    });
                }
            }
        }
        for i in 0..n {
            if node_state[i] == NodeState::Pending {
                node_msg[i] = Some("not started: the run was interrupted".into());
            }
        }
    }

    // Checks.
    let mut check_reports: Vec<CheckReport> = Vec::new();
    let provisioned = failures.is_empty()
        && node_state.iter().all(|s| *s == NodeState::Ok)
        && !shutdown.soft.is_cancelled();
    let check_start = Instant::now();
    if provisioned {
        let _ = events.send(Event::StageStarted { stage: "check" });
        let ctx = shared.ctx();
        let outputs = shared
            .outputs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let cwd = bp.dir().to_path_buf();
        let vetted = bp.vetted();
        // Command checks run on this machine get the minimal environment, HOME in the copy.
        let child_env = crate::process::ChildEnv::new(
            &state.work_dir(&run_id).join("checks-home"),
            &bp.local.pass_env,
        );
        let check_records = shared
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for c in &bp.checks {
            shared.emit(Event::CheckStarted {
                name: c.name.clone(),
            });
            let env = CheckEnv {
                ctx: &ctx,
                outputs: &outputs,
                redactor: &redactor,
                run_id: &run_id,
                cwd: &cwd,
                cancel: &shutdown.soft,
                provider: provider.as_ref(),
                run: &shared.run,
                records: &check_records,
                vetted: &vetted,
                child_env: &child_env,
            };
            let name = c.name.clone();
            let rep = checks::run(c, &env, |attempt, msg| {
                shared.emit(Event::CheckRetrying {
                    name: name.clone(),
                    attempt,
                    message: msg.to_string(),
                });
            })
            .await;
            shared.emit(Event::CheckFinished {
                name: rep.name.clone(),
                status: rep.status,
                duration_ms: rep.duration_ms,
                message: rep.message.clone(),
            });
            check_reports.push(rep);
        }
    } else {
        for c in &bp.checks {
            check_reports.push(CheckReport {
                name: c.name.clone(),
                kind: c.spec.kind().to_string(),
                status: Status::Skipped,
                duration_ms: 0,
                attempts: 0,
                message: Some(if shutdown.soft.is_cancelled() {
                    "skipped: interrupted".into()
                } else {
                    "skipped: upstream failed".into()
                }),
                output: None,
            });
        }
    }
    let check_ms = millis(check_start.elapsed());

    // Status before teardown.
    let mut status = Status::Passed;
    for f in &failures {
        status = status.merge(f.status);
    }
    for c in &check_reports {
        // A check that could not run (Error) makes the run an infrastructure error: nothing
        // was learnt about the release from it.
        if matches!(c.status, Status::Failed | Status::Error) {
            status = status.merge(c.status);
        }
    }
    let interrupted = shutdown.soft.is_cancelled();
    if interrupted {
        status = status.merge(Status::Error);
    }
    let signal_name = shutdown
        .reason
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .unwrap_or_else(|| "a signal".into());
    let failure_msg = if interrupted {
        // Completed after teardown, when it is known whether the copy is gone.
        Some(format!("interrupted by {signal_name}"))
    } else {
        failures.first().map(|f| f.message.clone()).or_else(|| {
            // The first check of the worst status decides the exit code: one that could not
            // run (3; its message says so) before one that failed (1).
            check_reports
                .iter()
                .rev()
                .filter(|c| matches!(c.status, Status::Failed | Status::Error))
                .max_by_key(|c| c.status)
                .map(|c| {
                    format!(
                        "check `{}` {}{}",
                        c.name,
                        if c.status == Status::Failed {
                            "failed: "
                        } else {
                            ""
                        },
                        c.message.as_deref().unwrap_or_default()
                    )
                })
        })
    };

    // Teardown (or keep).
    let keep_for = if interrupted {
        None
    } else {
        match (opts.keep, bp.teardown) {
            (Some(k), _) => Some(k),
            (None, TeardownPolicy::Keep { keep_for }) => Some(keep_for),
            (None, TeardownPolicy::OnSuccess { keep_for }) if status != Status::Passed => {
                Some(keep_for)
            }
            _ => None,
        }
    };
    let records: Vec<ResourceRecord> = shared
        .records
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut destroyed: BTreeMap<String, bool> = BTreeMap::new();
    let mut left_behind: Vec<LeftBehind> = Vec::new();
    let mut kept_until: Option<DateTime<Utc>> = None;
    // Journal failures after resources exist must not lose the report: they are reported.
    let mut journal_errors: Vec<String> = Vec::new();
    let td_start = Instant::now();
    let _ = events.send(Event::StageStarted { stage: "teardown" });
    let teardown_status;
    if let Some(k) = keep_for {
        let until =
            Utc::now() + chrono::Duration::from_std(k).unwrap_or(chrono::Duration::hours(1));
        if let Err(e) = journal.append(&Entry::Kept { until }) {
            journal_errors.push(e.to_string());
        }
        kept_until = Some(until);
        teardown_status = Status::Skipped;
    } else {
        let (d, lb) = teardown(
            &graph,
            &records,
            provider.as_ref(),
            &journal,
            &events,
            &shutdown.hard,
            opts.teardown_timeout,
        )
        .await;
        destroyed = d;
        left_behind = lb;
        if !shutdown.hard.is_cancelled() {
            crate::failpoint::point("provider: before sweep");
            let swept = provider.sweep(&run_id, true).await;
            crate::failpoint::point("provider: after sweep");
            match swept {
                Ok(orphans) => {
                    for o in orphans.into_iter().filter(|o| !o.removed) {
                        left_behind.push(LeftBehind {
                            address: "run".into(),
                            id: o.id,
                            reason: o.reason.unwrap_or_else(|| "could not be removed".into()),
                        });
                    }
                }
                Err(e) => left_behind.push(LeftBehind {
                    address: "run".into(),
                    id: run_id.clone(),
                    reason: format!("sweep failed: {e}"),
                }),
            }
        }
        teardown_status = if left_behind.is_empty() {
            Status::Passed
        } else {
            Status::Error
        };
    }
    let teardown_ms = millis(td_start.elapsed());
    let _ = events.send(Event::StageFinished {
        stage: "teardown",
        status: teardown_status,
        duration_ms: teardown_ms,
    });

    let finished_at = Utc::now();
    if let Err(e) = journal.append(&Entry::Finished {
        status: status.as_str().into(),
        left_behind: left_behind.len(),
        at: finished_at,
    }) {
        journal_errors.push(e.to_string());
    }
    if left_behind.is_empty()
        && kept_until.is_none()
        && journal_errors.is_empty()
        && let Err(e) = journal.append(&Entry::Closed {
            at: finished_at,
            by: "run".into(),
        })
    {
        journal_errors.push(e.to_string());
    }
    for e in &journal_errors {
        status = status.merge(Status::Error);
        left_behind.push(LeftBehind {
            address: "journal".into(),
            id: journal.path().display().to_string(),
            reason: format!("could not record the end of the run ({e}); `dryrun cleanup {run_id}` will check it again"),
        });
    }
    let failure_msg = if interrupted {
        let how = if left_behind.is_empty() {
            "the copy was torn down".to_string()
        } else {
            format!(
                "teardown did not finish: {} item(s) left behind, see below; `dryrun cleanup {run_id} --yes` finishes it",
                left_behind.len()
            )
        };
        failure_msg.map(|m| format!("{m}; {how}"))
    } else {
        failure_msg
    };

    // Report.
    let spans = shared
        .spans
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut stages = vec![StageReport {
        name: "compile".into(),
        status: Status::Passed,
        duration_ms: opts.compile_ms,
        message: None,
    }];
    for name in ["provision", "restore", "install"] {
        let s = spans.get(name).cloned().unwrap_or_default();
        let (st, msg) = match s.status {
            Some(st) => (st, s.message.clone()),
            None if !failures.is_empty() && name == "provision" && records.is_empty() => {
                (Status::Error, failures.first().map(|f| f.message.clone()))
            }
            None => (Status::Skipped, None),
        };
        stages.push(StageReport {
            name: name.into(),
            status: st,
            duration_ms: s.ms(),
            message: msg,
        });
    }
    let check_status = if provisioned {
        check_reports
            .iter()
            .fold(Status::Passed, |a, c| a.merge(c.status))
    } else {
        Status::Skipped
    };
    let names = |s: Status| -> Vec<&str> {
        check_reports
            .iter()
            .filter(|c| c.status == s)
            .map(|c| c.name.as_str())
            .collect()
    };
    let check_message = [
        ("failed", names(Status::Failed)),
        ("could not run", names(Status::Error)),
    ]
    .iter()
    .filter(|(_, n)| !n.is_empty())
    .map(|(what, n)| format!("{what}: {}", n.join(", ")))
    .collect::<Vec<_>>()
    .join("; ");
    stages.push(StageReport {
        name: "check".into(),
        status: check_status,
        duration_ms: if provisioned { check_ms } else { 0 },
        message: (!check_message.is_empty()).then_some(check_message),
    });
    stages.push(StageReport {
        name: "teardown".into(),
        status: teardown_status,
        duration_ms: teardown_ms,
        message: if let Some(u) = kept_until {
            Some(format!(
                "kept until {}; `dryrun cleanup --expired` removes it after that",
                u.to_rfc3339()
            ))
        } else if left_behind.is_empty() {
            None
        } else {
            Some(format!("{} item(s) left behind", left_behind.len()))
        },
    });

    let backup_reports: Vec<BackupReport> = bp
        .resources
        .iter()
        .filter_map(|r| {
            backups.get(&r.name).map(|b| BackupReport {
                id: b.id.clone(),
                source: b.source.clone(),
                resource: r.address(),
                taken_at: b.taken_at,
                age_seconds: (started_at - b.taken_at).num_seconds(),
            })
        })
        .collect();
    let resources: Vec<ResourceReport> = graph
        .order()
        .into_iter()
        .map(|i| {
            let addr = graph.nodes[i].address.clone();
            let rec = records.iter().find(|r| r.address == addr);
            ResourceReport {
                address: addr.clone(),
                kind: bp.resources[i].spec.kind().to_string(),
                id: rec.map(|r| r.id.clone()).unwrap_or_default(),
                destroyed: rec.is_none() || destroyed.get(&addr).copied().unwrap_or(false),
                status: node_status[i],
                message: node_msg[i].clone(),
            }
        })
        .collect();
    let restore_ms = spans.get("restore").map(Span::ms);
    let report = RunReport {
        run_id: run_id.clone(),
        blueprint: bp.name.clone(),
        blueprint_path: bp.path.display().to_string(),
        release: release_report,
        provider: provider.name().to_string(),
        trigger: opts.trigger,
        status,
        exit_code: exit_code(status, left_behind.len()),
        started_at,
        finished_at,
        duration_ms: millis(t0.elapsed()) + opts.compile_ms,
        backup: backup_reports.first().cloned(),
        backups: backup_reports,
        restore_ms,
        stages,
        checks: check_reports,
        resources,
        left_behind,
        kept_until,
        failure: failure_msg.map(|m| redactor.redact(&m)),
        api_calls: provider.api_calls(),
    };
    redact_logs(&shared.run.log_dir, &redactor);
    let _ = crate::report::json::write(&report, &state.run_dir(&run_id));
    Ok(report)
}

/// Rewrites the run's log files with every secret known at the end redacted. Logs are redacted
/// as they are written ([`crate::process::LogPump`]); this second pass covers a
/// secret that became known after a line was written. Bytes, not text: invalid UTF-8 does not
/// skip it. The rewrite goes through a private temporary file and a rename.
fn redact_logs(dir: &std::path::Path, redactor: &Redactor) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for ent in rd.flatten() {
        let p = ent.path();
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        let clean = redactor.redact_bytes(&bytes);
        if clean != bytes
            && let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir)
            && std::io::Write::write_all(&mut tmp, &clean).is_ok()
        {
            let _ = tmp.persist(&p);
        }
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return "the task was cancelled".into();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Creates, restores and installs one resource.
async fn provision(
    sh: &Shared,
    r: &crate::blueprint::Resource,
    backup: Option<&BackupInfo>,
) -> Result<(), Failure> {
    let address = r.address();
    let req = match &r.spec {
        ResourceSpec::Database(d) => ResourceRequest::Database(d.clone()),
        ResourceSpec::Bucket(b) => ResourceRequest::Bucket(b.clone()),
        ResourceSpec::Service(s) => ResourceRequest::Service(s.clone()),
    };
    let redactor = &sh.run.redactor;
    if sh.cancel.is_cancelled() {
        return Err(Failure {
            status: Status::Error,
            message: format!("{address}: not started, the run was interrupted"),
        });
    }

    // create
    let planned = sh.provider.plan_record(&sh.run, &r.name, &req);
    sh.journal
        .append(&Entry::Creating {
            record: planned.clone(),
        })
        .map_err(|e| Failure {
            status: Status::Error,
            message: format!("{address}: {e}"),
        })?;
    sh.set_record(&planned);
    sh.emit(Event::StepStarted {
        address: address.clone(),
        step: "create",
        detail: None,
    });
    let t = Instant::now();
    crate::failpoint::point("provider: before create");
    let created = tokio::select! {
        c = sh.provider.create(&sh.run, &planned, &req) => c,
        () = sh.cancel.cancelled() => Err(ProviderError::Cancelled),
    };
    crate::failpoint::point("provider: after create");
    let created = match created {
        Ok(c) => c,
        Err(e) => {
            let f = failure(&address, "create", &e, redactor);
            sh.span("provision", t, f.status, Some(f.message.clone()));
            sh.emit(Event::StepFinished {
                address,
                step: "create",
                status: f.status,
                duration_ms: millis(t.elapsed()),
                message: Some(f.message.clone()),
            });
            return Err(f);
        }
    };
    sh.journal
        .append(&Entry::Created {
            record: created.record.clone(),
        })
        .map_err(|e| Failure {
            status: Status::Error,
            message: format!("{address}: {e}"),
        })?;
    sh.set_record(&created.record);
    sh.add_outputs(&r.name, created.outputs);
    sh.span("provision", t, Status::Passed, None);
    sh.emit(Event::StepFinished {
        address: address.clone(),
        step: "create",
        status: Status::Passed,
        duration_ms: millis(t.elapsed()),
        message: None,
    });

    // restore
    if matches!(r.spec, ResourceSpec::Database(_) | ResourceSpec::Bucket(_)) {
        let detail = backup.map(|b| b.id.clone()).or_else(|| match &r.spec {
            ResourceSpec::Bucket(b) => Some(b.source.clone()),
            _ => None,
        });
        sh.emit(Event::StepStarted {
            address: address.clone(),
            step: "restore",
            detail,
        });
        let t = Instant::now();
        crate::failpoint::point("provider: before restore");
        let restored = sh
            .provider
            .restore(&sh.run, &created.record, &req, backup, &sh.cancel)
            .await;
        crate::failpoint::point("provider: after restore");
        match restored {
            Ok(o) => {
                sh.add_outputs(&r.name, o);
                sh.span("restore", t, Status::Passed, None);
                sh.emit(Event::StepFinished {
                    address: address.clone(),
                    step: "restore",
                    status: Status::Passed,
                    duration_ms: millis(t.elapsed()),
                    message: None,
                });
            }
            Err(e) => {
                let f = failure(&address, "restore", &e, redactor);
                sh.span("restore", t, f.status, Some(f.message.clone()));
                sh.emit(Event::StepFinished {
                    address,
                    step: "restore",
                    status: f.status,
                    duration_ms: millis(t.elapsed()),
                    message: Some(f.message.clone()),
                });
                return Err(f);
            }
        }
    }

    // install
    if let ResourceSpec::Service(spec) = &r.spec {
        sh.emit(Event::StepStarted {
            address: address.clone(),
            step: "install",
            detail: Some(sh.release.manifest.version.clone()),
        });
        let t = Instant::now();
        let ctx = sh.ctx();
        let mut env = BTreeMap::new();
        for (k, v) in &spec.env {
            match v.render(&ctx) {
                Ok(s) => {
                    env.insert(k.clone(), s);
                }
                Err(e) => {
                    let f = Failure {
                        status: Status::Error,
                        message: redactor
                            .redact(&format!("install of {address} failed: env {k}: {e}")),
                    };
                    sh.span("install", t, f.status, Some(f.message.clone()));
                    sh.emit(Event::StepFinished {
                        address,
                        step: "install",
                        status: f.status,
                        duration_ms: millis(t.elapsed()),
                        message: Some(f.message.clone()),
                    });
                    return Err(f);
                }
            }
        }
        let start = match spec
            .start
            .as_ref()
            .map(|s| s.render_in(&ctx, Position::Shell, &sh.vetted))
            .transpose()
        {
            Ok(s) => s,
            Err(e) => {
                let f = Failure {
                    status: Status::Error,
                    message: redactor.redact(&format!("install of {address} failed: start: {e}")),
                };
                sh.span("install", t, f.status, Some(f.message.clone()));
                sh.emit(Event::StepFinished {
                    address,
                    step: "install",
                    status: f.status,
                    duration_ms: millis(t.elapsed()),
                    message: Some(f.message.clone()),
                });
                return Err(f);
            }
        };
        let rec = sh
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|x| x.address == address)
            .cloned()
            .unwrap_or(created.record.clone());
        let req = InstallRequest {
            record: &rec,
            spec,
            release: &sh.release,
            env,
            start,
            ready_timeout: spec.ready_timeout,
            cancel: sh.cancel.clone(),
        };
        crate::failpoint::point("provider: before install");
        let installed = sh.provider.install(&sh.run, req, sh).await;
        crate::failpoint::point("provider: after install");
        match installed {
            Ok(inst) => {
                sh.set_record(&inst.record);
                sh.add_outputs(&r.name, inst.outputs);
                sh.span("install", t, Status::Passed, None);
                sh.emit(Event::StepFinished {
                    address,
                    step: "install",
                    status: Status::Passed,
                    duration_ms: millis(t.elapsed()),
                    message: None,
                });
            }
            Err(e) => {
                let f = failure(&address, "install", &e, redactor);
                sh.span("install", t, f.status, Some(f.message.clone()));
                sh.emit(Event::StepFinished {
                    address,
                    step: "install",
                    status: f.status,
                    duration_ms: millis(t.elapsed()),
                    message: Some(f.message.clone()),
                });
                return Err(f);
            }
        }
    }
    Ok(())
}

/// Pauses before the second and third attempt of a failed delete in teardown.
#[cfg(not(test))]
const DELETE_RETRY_PAUSES: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(8)];
#[cfg(test)]
const DELETE_RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(10), Duration::from_millis(20)];

/// Deletes `records` in reverse dependency order, each failed delete up to three times (see
/// [`DELETE_RETRY_PAUSES`]); keeps going past failures.
/// Returns which addresses were destroyed and what is left behind.
pub(crate) async fn teardown(
    graph: &Graph,
    records: &[ResourceRecord],
    provider: &dyn Provider,
    journal: &Journal,
    events: &UnboundedSender<Event>,
    hard: &CancellationToken,
    timeout: Duration,
) -> (BTreeMap<String, bool>, Vec<LeftBehind>) {
    let mut destroyed = BTreeMap::new();
    let mut left = Vec::new();
    // Reverse creation order respects dependencies: dependents were created after what they need.
    let mut order: Vec<usize> = graph.order();
    order.reverse();
    let deadline = Instant::now() + timeout;
    let mut todo: Vec<ResourceRecord> = order
        .iter()
        .filter_map(|&i| {
            records
                .iter()
                .find(|r| r.address == graph.nodes[i].address)
                .cloned()
        })
        .collect();
    // Records the graph does not know (should not happen) go last.
    for r in records {
        if !todo.iter().any(|t| t.address == r.address) {
            todo.push(r.clone());
        }
    }
    let mut remaining = todo.clone();
    for rec in todo {
        if hard.is_cancelled() || Instant::now() >= deadline {
            break;
        }
        let _ = events.send(Event::StepStarted {
            address: rec.address.clone(),
            step: "delete",
            detail: None,
        });
        let t = Instant::now();
        let mut pauses = DELETE_RETRY_PAUSES.iter();
        let res = loop {
            crate::failpoint::point("provider: before delete");
            let res = tokio::select! {
                r = provider.delete(&rec) => Some(r),
                () = hard.cancelled() => None,
                () = tokio::time::sleep_until(deadline.into()) => None,
            };
            crate::failpoint::point("provider: after delete");
            // A failed delete is tried again after a pause while the deadline allows: cloud
            // APIs fail transiently (throttling past the SDK's retries, a dependency still
            // detaching), and leaving the resource behind is the expensive outcome.
            match (&res, pauses.next()) {
                // A guard refusal or a protection will not change by waiting.
                (Some(Err(e)), Some(&pause))
                    if !matches!(e, ProviderError::Guard(_) | ProviderError::Protected(_))
                        && Instant::now() + pause < deadline
                        && !hard.is_cancelled() =>
                {
                    tracing::warn!(
                        "{}: delete failed ({e}); trying again in {}",
                        rec.address,
                        humantime::format_duration(pause)
                    );
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = hard.cancelled() => break res,
                    }
                }
                _ => break res,
            }
        };
        match res {
            Some(Ok(d)) => {
                let _ = journal.append(&Entry::Deleted {
                    address: rec.address.clone(),
                });
                destroyed.insert(rec.address.clone(), true);
                remaining.retain(|r| r.address != rec.address);
                let msg = (d == Deleted::AlreadyGone).then(|| "already gone".to_string());
                let _ = events.send(Event::StepFinished {
                    address: rec.address.clone(),
                    step: "delete",
                    status: Status::Passed,
                    duration_ms: millis(t.elapsed()),
                    message: msg,
                });
            }
            Some(Err(e)) => {
                let reason = e.to_string();
                let _ = journal.append(&Entry::DeleteFailed {
                    address: rec.address.clone(),
                    reason: reason.clone(),
                });
                let _ = events.send(Event::StepFinished {
                    address: rec.address.clone(),
                    step: "delete",
                    status: Status::Error,
                    duration_ms: millis(t.elapsed()),
                    message: Some(reason.clone()),
                });
                left.push(LeftBehind {
                    address: rec.address.clone(),
                    id: rec.id.clone(),
                    reason,
                });
                remaining.retain(|r| r.address != rec.address);
            }
            None => break,
        }
    }
    for rec in remaining {
        let reason = if hard.is_cancelled() {
            "teardown abandoned at the second signal; run `dryrun cleanup` to finish".to_string()
        } else {
            format!(
                "teardown deadline of {} passed; run `dryrun cleanup` to finish",
                humantime::format_duration(timeout)
            )
        };
        left.push(LeftBehind {
            address: rec.address.clone(),
            id: rec.id.clone(),
            reason,
        });
    }
    (destroyed, left)
}

#[cfg(test)]
mod tests;
