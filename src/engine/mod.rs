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
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::blueprint::{Blueprint, ResourceSpec};
use crate::checks::{self, CheckEnv};
use crate::journal::{Entry, Journal, JournalError};
use crate::provider::{
    BackupInfo, BackupPick, Outputs, Provider, ProviderError, RecordSink, ResourceRecord, RunInfo,
};
use crate::release::Release;
use crate::report::{CheckReport, RunReport, Status, Trigger};
use crate::secret::{Redactor, Secret};
use crate::state::StateDir;

pub use events::{Event, Stage, Step};
pub use migrate::hints as release_hints;

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
    /// Where the journal's entries also go (the shared control database), if anywhere.
    pub mirror: Option<Arc<dyn crate::journal::Mirror>>,
    /// `dryrun scan`: restore the databases and classify their columns; mask nothing, install
    /// nothing (the caller passes a blueprint without services and checks).
    pub scan: bool,
    /// The baseline release's run, when `--baseline` ran one first: its check timings are
    /// compared with the candidate's (report.json `baseline`, `guards.max_p95_regression`).
    pub baseline: Option<crate::migrations::Baseline>,
    /// Durations (ms) of the blueprint's recent runs, for the cost estimate's expected
    /// duration ([`crate::cost::expected_from`]); empty: none known.
    pub history_ms: Vec<i64>,
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
    /// The side-effect sinks could not listen on loopback.
    #[error("start the side-effect sinks on 127.0.0.1: {0}")]
    Sinks(std::io::Error),
    /// `budget.max_usd` refuses the run (nothing was created).
    #[error("budget: {0}; nothing was created")]
    Budget(String),
}

/// Generates a run id: `BLUEPRINT-YYYYMMDD-HHMMSS-XXXXXXXX` (UTC, 32 random bits). Unique in
/// practice; the history row's primary key (and the run directory, created exclusively) make it
/// unique for certain: a taken id is drawn again ([`crate::runner`], the server's `submit`).
#[must_use]
pub fn new_run_id(blueprint: &str) -> String {
    use rand::RngExt as _;
    let suffix: u32 = rand::rng().random();
    format!(
        "{blueprint}-{}-{suffix:08x}",
        Utc::now().format("%Y%m%d-%H%M%S")
    )
}

mod finish;
mod migrate;
mod teardown;
mod walk;

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
    spans: Mutex<BTreeMap<Stage, Span>>,
    events: UnboundedSender<Event>,
    cancel: CancellationToken,
    /// The personal data gate and masking rules, and what they did.
    privacy: PrivacyRun,
    /// The SMTP and HTTP sinks the release sends to instead of the world.
    sinks: crate::sinks::Sinks,
    /// The blueprint's egress firewall.
    firewall: crate::firewall::Policy,
    /// How each database copy came to be, by resource name (report.json `backup.clone`).
    clones: Mutex<BTreeMap<String, crate::provider::CloneInfo>>,
    /// When the run started, for the offsets of [`Shared::steps`].
    t0: Instant,
    /// Every finished resource step with its address, in the order they ended (report.json
    /// `resources[].steps`: the run's timeline).
    steps: Mutex<Vec<(String, crate::report::StepSpan)>>,
    /// The migration monitors and what they saw ([`migrate`]).
    trace: tokio::sync::Mutex<migrate::Tracing>,
    /// `migration_trace:` (off for `dryrun scan`, which installs nothing).
    migration_trace: bool,
}

/// The run's side of [`crate::privacy`].
struct PrivacyRun {
    rules: BTreeMap<String, Vec<crate::privacy::Rule>>,
    gate: crate::privacy::Gate,
    /// Random per run: masked values are deterministic within this copy only.
    key: crate::privacy::MaskKey,
    scan: bool,
    done: Mutex<Vec<crate::privacy::DatabaseMasking>>,
}

impl Shared {
    fn emit(&self, ev: Event) {
        if let Event::StepFinished {
            address,
            step,
            status,
            duration_ms,
            ..
        } = &ev
        {
            let end = millis(self.t0.elapsed());
            self.steps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((
                    address.clone(),
                    crate::report::StepSpan {
                        step: *step,
                        start_ms: end.saturating_sub(*duration_ms),
                        duration_ms: *duration_ms,
                        status: *status,
                    },
                ));
        }
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

    fn records(&self) -> Vec<ResourceRecord> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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

    fn span(&self, stage: Stage, start: Instant, status: Status, message: Option<String>) {
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

fn failure(address: &str, step: Step, e: &ProviderError, redactor: &Redactor) -> Failure {
    Failure {
        status: e.blame().into(),
        message: redactor.redact(&format!("{step} of {address} failed: {e}")),
    }
}

/// Runs a blueprint end to end and returns its report: the steps below, in order. Each step
/// is a function of this module or a submodule; `run` only hands their results on.
///
/// # Errors
/// Only errors that stop the run before anything is created ([`EngineError`]); every later
/// failure is part of the report.
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
    // 0. on a billed provider, the cost: `budget.max_usd` refuses a run before anything exists
    // (`dryrun scan` restores copies too). Boxed: the AWS provider's describes would otherwise
    // sit in every run's future.
    let estimate = Box::pin(estimate(bp, provider.as_ref(), &opts)).await?;
    // 1. secrets and the journal; then the backups, all found before anything is created.
    let shared = Arc::new(begin(
        bp,
        provider,
        state,
        &opts,
        (started_at, t0),
        events,
        &shutdown,
    )?);
    let (backups, failures) = find_backups(bp, shared.provider.as_ref(), &opts.backup).await;
    // The release's SQL, linted before anything is provisioned.
    let hints = migrate::hints(bp, &opts.release).await;
    // 2. provision, restore, install (the migration monitor watches the install).
    let mut walked = walk::walk(
        bp,
        &shared,
        &backups,
        failures,
        opts.concurrency,
        &shutdown.soft,
    )
    .await;
    // 3. checks.
    let checked = run_checks(bp, &shared, state, &walked, &shutdown.soft).await;
    // The guards: the migrations' locks and rewrites, and the checks against the baseline.
    let comparison = opts
        .baseline
        .as_ref()
        .map(|b| crate::migrations::compare(b, &checked.reports));
    let judged = migrate::judge(
        &shared,
        &bp.guards,
        hints,
        comparison.as_ref(),
        &mut walked.failures,
    )
    .await;
    // What the firewall refused, read while the copy still runs.
    let firewall = shared.provider.egress(&shared.run.run_id).await;
    if let Some(f) = &firewall {
        shared.sinks.add_blocked(f.1.clone());
    }
    let verdict = Verdict::of(&walked.failures, &checked, &shutdown);
    // 4. teardown (or keep).
    let torn = teardown::tear_down_or_keep(
        bp,
        &walked.graph,
        &shared,
        opts.keep,
        &verdict,
        &shutdown.hard,
        opts.teardown_timeout,
    )
    .await;
    // 5. the end of the journal and the report.
    let report = finish::report(
        bp,
        &shared,
        &opts,
        finish::Outcome {
            started_at,
            t0,
            backups,
            walked,
            checked,
            verdict,
            torn,
            firewall: firewall.map(|f| f.0),
            judged,
            comparison,
            estimate,
        },
    );
    redact_logs(&shared.run.log_dir, &shared.run.redactor);
    let _ = crate::report::json::write(&report, &state.run_dir(&report.run_id));
    Ok(report)
}

/// Step 0: what the run would cost on a billed provider (`None` on the local one), judged
/// against `budget.max_usd`. Without a budget an estimate that cannot be made is only logged.
///
/// # Errors
/// [`EngineError::Budget`]: over budget, or no estimate to judge a budget by.
async fn estimate(
    bp: &Blueprint,
    provider: &dyn Provider,
    opts: &RunOptions,
) -> Result<Option<crate::cost::Estimate>, EngineError> {
    let billed = match provider.billed(bp).await {
        Ok(b) => b,
        Err(e) if bp.budget.is_some() => {
            return Err(EngineError::Budget(format!(
                "the cost cannot be estimated ({e}), so budget.max_usd cannot be honoured"
            )));
        }
        Err(e) => {
            tracing::warn!(error = %e, "no cost estimate");
            None
        }
    };
    let Some((region, units)) = billed else {
        return Ok(None);
    };
    let worst = crate::cost::worst_case(bp, opts.keep, opts.teardown_timeout);
    let e = crate::cost::estimate(
        &units,
        &region,
        crate::cost::expected_from(&opts.history_ms),
        worst,
    );
    if let Some(max) = bp.budget {
        // A baseline and its candidate share the budget: each makes its own copy.
        let pair = opts.baseline.is_some()
            || opts
                .run_id
                .as_deref()
                .is_some_and(|id| id.ends_with("-baseline"));
        e.within_times(max, if pair { 2 } else { 1 })
            .map_err(EngineError::Budget)?;
    }
    Ok(Some(e))
}

/// Step 1: registers the secrets the caller and the provider hold, resolves the blueprint's
/// secrets (a run that cannot get one creates nothing), opens the journal and announces the
/// run.
fn begin(
    bp: &Blueprint,
    provider: Arc<dyn Provider>,
    state: &StateDir,
    opts: &RunOptions,
    (started_at, t0): (DateTime<Utc>, Instant),
    events: UnboundedSender<Event>,
    shutdown: &Shutdown,
) -> Result<Shared, EngineError> {
    let run_id = opts.run_id.clone().unwrap_or_else(|| new_run_id(&bp.name));
    let redactor = Redactor::new();
    for s in opts.secrets.iter().chain(provider.held_secrets().iter()) {
        redactor.register(s);
    }
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

    let sinks = crate::sinks::Sinks::start().map_err(EngineError::Sinks)?;
    let journal = Arc::new(Journal::create(state, &run_id, opts.mirror.clone())?);
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

    let _ = events.send(Event::RunStarted {
        run_id: run_id.clone(),
        blueprint: bp.name.clone(),
        provider: provider.name().to_string(),
        release: opts.release.manifest.version.clone(),
    });
    let _ = events.send(Event::StageFinished {
        stage: Stage::Compile,
        status: Status::Passed,
        duration_ms: opts.compile_ms,
    });
    let base_ctx = json!({
        "params": bp.params,
        "secrets": Value::Object(secrets),
        "release": {"ref": opts.release.reference, "version": opts.release.manifest.version, "git_sha": opts.release.manifest.git_sha.clone().unwrap_or_default()},
        "run": {"id": run_id, "blueprint": bp.name},
        "resources": {},
        "sinks": sinks.context(),
    });
    Ok(Shared {
        provider,
        journal,
        run: RunInfo {
            run_id: run_id.clone(),
            blueprint: bp.name.clone(),
            expires_at,
            log_dir: state.run_dir(&run_id).join("logs"),
            redactor,
            release: Some(opts.release.clone()),
        },
        release: opts.release.clone(),
        base_ctx,
        vetted: bp.vetted(),
        outputs: Mutex::new(BTreeMap::new()),
        records: Mutex::new(Vec::new()),
        spans: Mutex::new(BTreeMap::new()),
        events,
        cancel: shutdown.soft.clone(),
        privacy: PrivacyRun {
            rules: bp.masking.clone(),
            gate: bp.pii_gate,
            key: crate::privacy::MaskKey::random(),
            scan: opts.scan,
            done: Mutex::new(Vec::new()),
        },
        sinks,
        firewall: bp.firewall.clone(),
        clones: Mutex::default(),
        t0,
        steps: Mutex::default(),
        trace: tokio::sync::Mutex::default(),
        migration_trace: bp.migration_trace && !opts.scan,
    })
}

/// The backup each database restores (a resource's pin unless the run names one); a backup
/// that cannot be found is a failure that stops the run before anything is created.
async fn find_backups(
    bp: &Blueprint,
    provider: &dyn Provider,
    pick: &BackupPick,
) -> (BTreeMap<String, BackupInfo>, Vec<Failure>) {
    let mut backups = BTreeMap::new();
    let mut failures = Vec::new();
    for r in &bp.resources {
        if let ResourceSpec::Database(db) = &r.spec {
            let pick = match (pick, &db.backup) {
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
    (backups, failures)
}

/// What step 3 found.
struct Checked {
    /// One report per check, in blueprint order.
    reports: Vec<CheckReport>,
    /// Whether the checks ran (every resource up, not interrupted).
    ran: bool,
    /// Their wall time.
    ms: u64,
}

/// Step 3: the checks, in blueprint order, when every resource is up; otherwise each is
/// reported skipped with the reason.
async fn run_checks(
    bp: &Blueprint,
    shared: &Shared,
    state: &StateDir,
    walked: &walk::Walk,
    cancel: &CancellationToken,
) -> Checked {
    let ran = walked.all_ok() && !cancel.is_cancelled();
    let start = Instant::now();
    if !ran {
        let why = if cancel.is_cancelled() {
            "skipped: interrupted"
        } else {
            "skipped: upstream failed"
        };
        let reports = bp
            .checks
            .iter()
            .map(|c| CheckReport {
                name: c.name.clone(),
                kind: c.spec.kind(),
                status: Status::Skipped,
                duration_ms: 0,
                attempts: 0,
                message: Some(why.into()),
                output: None,
                timings_ms: Vec::new(),
            })
            .collect();
        return Checked {
            reports,
            ran,
            ms: 0,
        };
    }
    shared.emit(Event::StageStarted {
        stage: Stage::Check,
    });
    let run_id = &shared.run.run_id;
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
        &state.work_dir(run_id).join("checks-home"),
        &bp.local.pass_env,
    );
    let records = shared.records();
    let mut reports = Vec::new();
    for c in &bp.checks {
        shared.emit(Event::CheckStarted {
            name: c.name.clone(),
        });
        let env = CheckEnv {
            ctx: &ctx,
            outputs: &outputs,
            redactor: &shared.run.redactor,
            run_id,
            cwd: &cwd,
            cancel,
            provider: shared.provider.as_ref(),
            run: &shared.run,
            records: &records,
            vetted: &vetted,
            child_env: &child_env,
            sinks: &shared.sinks,
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
        reports.push(rep);
    }
    Checked {
        reports,
        ran,
        ms: millis(start.elapsed()),
    }
}

/// The run's status and first failure, decided before teardown.
pub(crate) struct Verdict {
    status: Status,
    /// The message the report leads with (completed after teardown when interrupted).
    failure: Option<String>,
    interrupted: bool,
}

impl Verdict {
    fn of(failures: &[Failure], checked: &Checked, shutdown: &Shutdown) -> Verdict {
        let mut status = Status::Passed;
        for f in failures {
            status = status.merge(f.status);
        }
        for c in &checked.reports {
            // A check that could not run (Error) makes the run an infrastructure error:
            // nothing was learnt about the release from it.
            if matches!(c.status, Status::Failed | Status::Error) {
                status = status.merge(c.status);
            }
        }
        let interrupted = shutdown.soft.is_cancelled();
        if interrupted {
            status = status.merge(Status::Error);
        }
        let failure = if interrupted {
            let signal = shutdown
                .reason
                .lock()
                .ok()
                .and_then(|r| r.clone())
                .unwrap_or_else(|| "a signal".into());
            Some(format!("interrupted by {signal}"))
        } else {
            failures.first().map(|f| f.message.clone()).or_else(|| {
                // The first check of the worst status decides the exit code: one that could
                // not run (3; its message says so) before one that failed (1).
                checked
                    .reports
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
        Verdict {
            status,
            failure,
            interrupted,
        }
    }
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

#[cfg(test)]
mod tests;
