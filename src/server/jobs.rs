//! Accepting runs and running them: the queue.
//!
//! A run is accepted only after its blueprint compiles and its release loads (so a bad request
//! creates nothing), then recorded as `queued` and handed to a task that waits, in order, for
//! its environment (one run per blueprint and provider at a time; FIFO), for a global slot
//! (`concurrency`) and for the environment's file lease (shared with CLI runs), then runs the
//! engine. `queue_limit` bounds how many wait; beyond it the webhook answers 429.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::blueprint::{self, Blueprint, CompileError};
use crate::engine::{self, Event, RunOptions, Shutdown};
use crate::lease;
use crate::provider::{BackupPick, Provider};
use crate::reference;
use crate::release::Release;
use crate::report::{RunReport, Trigger};
use crate::secret::Secret;
use crate::state::StateDir;

use super::config::Config;
use super::history::{History, Inserted, RunRow};
use super::metrics::Metrics;
use super::{ServeError, notify};

/// Lines of live progress kept per running run (shown by the API and the run page).
const PROGRESS_LINES: usize = 200;

/// A request to start a dry run (webhook, dashboard form or schedule). Kept with the queued
/// run in the history (it holds no secret), so that the run survives a restart.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunRequest {
    /// Blueprint path under the blueprints root.
    pub blueprint: String,
    /// Release: a path under the blueprints root (or a provider URL such as `s3://…`).
    pub release: String,
    /// Blueprint params.
    pub params: BTreeMap<String, String>,
    /// Backup id, `latest` or an RFC 3339 time.
    pub backup: Option<String>,
    /// Where to POST the signed summary when the run ends.
    pub callback_url: Option<String>,
    /// Webhook delivery id (deduplicated).
    pub delivery: Option<String>,
    /// Schedule name, for scheduled runs.
    pub schedule: Option<String>,
    /// `webhook` or `schedule` (the dashboard's form counts as the portal's button: webhook).
    pub trigger: Option<Trigger>,
    /// Provider of the run (a schedule's own); default: the server's.
    #[serde(default)]
    pub provider: Option<String>,
}

/// Why a request was not accepted. Nothing was created for any of these.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The path is absolute, contains `..` or leaves the root through a symlink.
    #[error("{0}")]
    BadPath(String),
    /// The blueprint does not compile or the release does not load.
    #[error("{0}")]
    Invalid(String),
    /// The callback URL is not in `[callbacks] allow`.
    #[error(
        "callback_url {0} is not allowed: add its prefix to [callbacks] allow in the server config"
    )]
    CallbackNotAllowed(String),
    /// Too many runs waiting.
    #[error("the queue is full ({0} runs waiting); retry later")]
    QueueFull(usize),
    /// The run's provider cannot be used (its configuration).
    #[error("{0}")]
    Unavailable(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// History database.
    #[error(transparent)]
    History(#[from] super::history::HistoryError),
    /// The state directory (claiming the run's directory).
    #[error("state directory: {0}")]
    State(#[from] std::io::Error),
}

/// What `submit` did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new run was queued.
    New(RunRow),
    /// The delivery id was seen before; this is the original run.
    Duplicate(RunRow),
}

struct Job {
    row: RunRow,
    bp: Blueprint,
    release: Release,
    backup: BackupPick,
    callback_url: Option<String>,
    provider: Arc<dyn Provider>,
}

/// What a request needs to run, loaded and checked.
struct Prepared {
    bp: Blueprint,
    release: Release,
    backup: BackupPick,
    provider: Arc<dyn Provider>,
}

/// The server's shared state.
pub struct App {
    /// Configuration.
    pub cfg: Config,
    /// State directory.
    pub state: StateDir,
    /// Blueprints root (canonical).
    pub blueprints: PathBuf,
    /// History database.
    pub history: Arc<History>,
    /// Metrics.
    pub metrics: Metrics,
    /// Webhook secret (from the environment variable the config names).
    pub secret: Option<Secret>,
    /// Base URL for links.
    pub base_url: String,
    /// Callbacks and notifications: their queue and what delivers them.
    pub outbox: Arc<super::notify::Outbox>,
    /// Tokens, sessions and CSRF.
    pub auth: super::auth::Auth,
    /// The `Host` and `Origin` values the server answers.
    pub hosts: super::auth::Hosts,
    envs: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    running: Mutex<HashMap<String, Shutdown>>,
    progress: Mutex<HashMap<String, VecDeque<String>>>,
    tracker: TaskTracker,
    /// Fires when the server stops accepting.
    pub stop: CancellationToken,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("blueprints", &self.blueprints)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Builds the server state.
    ///
    /// # Errors
    /// History database or blueprints root problems.
    pub fn new(
        cfg: Config,
        state: StateDir,
        blueprints: &Path,
        addr: SocketAddr,
    ) -> Result<App, ServeError> {
        let blueprints = blueprints.canonicalize().map_err(|e| {
            ServeError::Other(format!("blueprints root {}: {e}", blueprints.display()))
        })?;
        match state.ensure() {
            Ok(Some(w)) => eprintln!("dryrun serve: warning: {w}"),
            Ok(None) => {}
            Err(e) => {
                return Err(ServeError::Other(format!(
                    "state directory {}: {e}",
                    state.root().display()
                )));
            }
        }
        let history = Arc::new(History::open(&state.root().join("history.sqlite"))?);
        let secret = std::env::var(&cfg.webhook.secret_env)
            .ok()
            .filter(|s| !s.is_empty())
            .map(Secret::new);
        if secret.is_none() {
            eprintln!(
                "dryrun serve: {} is not set: the webhook answers 503 until it is",
                cfg.webhook.secret_env
            );
        }
        let base_url = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"))
            .trim_end_matches('/')
            .to_string();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            // A callback URL passed the allow-list; a redirect to elsewhere would not have.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ServeError::Other(format!("http client: {e}")))?;
        let slots = Arc::new(Semaphore::new(cfg.concurrency));
        let auth = super::auth::Auth::from_config(&cfg.auth, base_url.starts_with("https://"))
            .map_err(ServeError::Auth)?;
        let hosts = super::auth::Hosts::new(addr, cfg.public_url.as_deref(), &cfg.allowed_hosts);
        let outbox = Arc::new(super::notify::Outbox {
            history: history.clone(),
            wake: tokio::sync::Notify::new(),
            http,
            secret: secret.clone(),
            base_url: base_url.clone(),
            callbacks: cfg.callbacks.clone(),
            notify: cfg.notify.clone(),
        });
        Ok(App {
            cfg,
            state,
            blueprints,
            history,
            metrics: Metrics::new(),
            secret,
            base_url,
            outbox,
            auth,
            hosts,
            envs: Mutex::new(HashMap::new()),
            slots,
            waiting: AtomicUsize::new(0),
            running: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    /// Resolves a `blueprint` or `release` reference from a request against the blueprints
    /// root with the rules of [`crate::reference`]: a path that stays inside the root, or (for a
    /// release) a remote object the server's provider fetches.
    ///
    /// # Errors
    /// [`SubmitError::BadPath`] (400) or [`SubmitError::Invalid`] (422, not found).
    pub fn resolve(
        &self,
        value: &str,
        what: &str,
        remote: &[&str],
    ) -> Result<reference::Resolved, SubmitError> {
        reference::resolve_under(&self.blueprints, value, what, remote).map_err(|e| {
            if e.status() == 422 {
                SubmitError::Invalid(e.to_string())
            } else {
                SubmitError::BadPath(e.to_string())
            }
        })
    }

    /// Blueprint files under the root (for the dashboard's form), relative paths.
    #[must_use]
    pub fn blueprint_files(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<String>) {
            if depth > 4 {
                return;
            }
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            let mut ents: Vec<_> = rd.flatten().collect();
            ents.sort_by_key(std::fs::DirEntry::file_name);
            for e in ents {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.')
                    || name == "target"
                    || name == "production"
                    || name == "releases"
                {
                    continue;
                }
                if p.is_dir() {
                    walk(root, &p, depth + 1, out);
                } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && name != crate::release::MANIFEST
                    && let Ok(rel) = p.strip_prefix(root)
                {
                    out.push(rel.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.blueprints, &self.blueprints, 0, &mut out);
        out
    }

    /// Every secret the server holds, registered with each run's redactor: the webhook secret
    /// (which also signs callbacks) and the notification URL (chat webhook URLs carry their
    /// token).
    #[must_use]
    pub fn held_secrets(&self) -> Vec<Secret> {
        let mut v: Vec<Secret> = self.secret.iter().cloned().collect();
        v.extend(self.cfg.notify.url.iter().map(Secret::new));
        v.extend(self.auth.held_secrets());
        v
    }

    fn env_lock(&self, env: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.envs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(env.to_string())
            .or_default()
            .clone()
    }

    /// Accepts a run: validates, records it as queued and starts its task.
    ///
    /// # Errors
    /// See [`SubmitError`]; nothing is created on error.
    pub async fn submit(self: &Arc<Self>, req: RunRequest) -> Result<Submitted, SubmitError> {
        if self.stop.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        if let Some(d) = &req.delivery
            && let Some(orig) = self.history.delivery(d)?
        {
            return Ok(Submitted::Duplicate(orig));
        }
        let Prepared {
            bp,
            release,
            backup,
            provider,
        } = self.prepare(&req).await?;
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= self.cfg.queue_limit {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(prev));
        }
        let trigger = req.trigger.unwrap_or(Trigger::Webhook);
        let request = serde_json::to_string(&req).unwrap_or_default();
        let new_row = |run_id: &str| RunRow {
            release_version: Some(release.manifest.version.clone()),
            delivery: req.delivery.clone(),
            schedule: req.schedule.clone(),
            ..RunRow::queued(
                run_id,
                &bp.name,
                &req.blueprint,
                provider.name(),
                trigger_name(trigger),
                &req.release,
            )
        };
        // The id is claimed in the state directory and in the history: never a collision, even
        // with CLI runs and other workers starting in the same second. The request is kept with
        // the row, so that a queued run survives a restart.
        let mut duplicate = None;
        let claimed = engine::claim_run_id(&self.state, &bp.name, |id| {
            match self.history.insert_queued(&new_row(id), Some(&request))? {
                Inserted::New => Ok(true),
                Inserted::IdTaken => Ok(false),
                Inserted::Duplicate(orig) => {
                    duplicate = Some(*orig);
                    Ok(true)
                }
            }
        });
        let run_id = match claimed {
            Ok(id) => id,
            Err(e) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        };
        if let Some(orig) = duplicate {
            let _ = std::fs::remove_dir(self.state.run_dir(&run_id));
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Ok(Submitted::Duplicate(orig));
        }
        let row = new_row(&run_id);
        self.enqueue(
            Job {
                row: row.clone(),
                bp,
                release,
                backup,
                callback_url: req.callback_url,
                provider,
            },
            trigger,
        );
        Ok(Submitted::New(row))
    }

    /// Starts the task of an accepted run (counted in `waiting` already).
    fn enqueue(self: &Arc<Self>, job: Job, trigger: Trigger) {
        self.metrics.queue_depth.inc();
        let app = self.clone();
        self.tracker
            .spawn(async move { app.run_job(job, trigger).await });
    }

    /// Checks a request and loads what its run needs: the callback URL against the allow-list,
    /// the blueprint (compiled with its params), the run's provider (`provider::choose`) and the
    /// release, resolved under the root or — `s3://…` for the AWS provider — fetched through the
    /// provider to read its manifest.
    ///
    /// # Errors
    /// See [`SubmitError`].
    async fn prepare(&self, req: &RunRequest) -> Result<Prepared, SubmitError> {
        if let Some(cb) = &req.callback_url
            && !self.outbox.callback_allowed(cb)
        {
            return Err(SubmitError::CallbackNotAllowed(cb.clone()));
        }
        let bp_path = match self.resolve(&req.blueprint, "blueprint", &[])? {
            reference::Resolved::Local(p) => p,
            reference::Resolved::Remote(r) => {
                return Err(SubmitError::BadPath(format!(
                    "blueprint `{r}` must be a path"
                )));
            }
        };
        let bp = match blueprint::compile_file(&bp_path, &req.params) {
            Ok(bp) => bp,
            Err(CompileError::Invalid(d)) => {
                return Err(SubmitError::Invalid(format!(
                    "blueprint {} is invalid:\n{}",
                    req.blueprint,
                    d.short()
                        .replace(&self.blueprints.display().to_string(), "")
                )));
            }
            Err(e) => return Err(SubmitError::Invalid(e.to_string())),
        };
        let provider_name = req.provider.as_deref().unwrap_or(&self.cfg.provider);
        let provider = crate::provider::choose(provider_name, &self.state, Some(&bp), None)
            .await
            .map_err(|e| SubmitError::Unavailable(format!("the {provider_name} provider: {e}")))?;
        let hide = |e: String| e.replace(&self.blueprints.display().to_string(), "");
        let release = match self.resolve(
            &req.release,
            "release",
            crate::provider::remote_schemes(provider_name),
        )? {
            reference::Resolved::Local(p) => Release::load(&p.display().to_string())
                .map_err(|e| SubmitError::Invalid(hide(e.to_string())))?,
            reference::Resolved::Remote(r) => {
                let file = provider
                    .fetch_release(&r, &self.state.root().join("releases"))
                    .await
                    .map_err(|e| SubmitError::Invalid(format!("release {r}: {e}")))?
                    .ok_or_else(|| {
                        SubmitError::BadPath(format!(
                            "release {r}: the {provider_name} provider does not fetch it"
                        ))
                    })?;
                Release::load_fetched(&r, &file)
                    .map_err(|e| SubmitError::Invalid(hide(e.to_string())))?
            }
        };
        let backup = match req.backup.as_deref() {
            None | Some("latest") => BackupPick::Latest,
            Some(s) => match chrono::DateTime::parse_from_rfc3339(s) {
                Ok(t) => BackupPick::Before(t.with_timezone(&Utc)),
                Err(_) => BackupPick::Id(s.to_string()),
            },
        };
        Ok(Prepared {
            bp,
            release,
            backup,
            provider,
        })
    }

    async fn run_job(self: Arc<Self>, job: Job, trigger: Trigger) {
        let run_id = job.row.run_id.clone();
        let env = job.row.environment.clone();
        let dequeue = || {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_depth.dec();
        };
        // Wait in order for the environment, then a slot, then the cross-process lease.
        let env_lock = self.env_lock(&env);
        let env_guard = tokio::select! {
            g = env_lock.lock_owned() => g,
            () = self.stop.cancelled() => { dequeue(); return self.cancelled(&run_id, trigger); }
        };
        let slot = tokio::select! {
            p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => { dequeue(); return self.cancelled(&run_id, trigger); } },
            () = self.stop.cancelled() => { dequeue(); return self.cancelled(&run_id, trigger); }
        };
        let mut held = match lease::acquire(&self.state, &env, &self.stop, |holder| {
            self.push_progress(
                &run_id,
                format!(
                    "waiting for environment {env}: run {} holds it",
                    holder.unwrap_or_else(|| "?".into())
                ),
            );
        })
        .await
        {
            Ok(l) => l,
            Err(lease::LeaseError::Cancelled(_)) => {
                dequeue();
                return self.cancelled(&run_id, trigger);
            }
            Err(e) => {
                dequeue();
                let _ = self
                    .history
                    .set_status(&run_id, "error", Some(&e.to_string()));
                self.metrics.ended("error", trigger_name(trigger));
                return;
            }
        };
        held.set_holder(&run_id);
        dequeue();
        let _ = self.history.set_running(&run_id, Utc::now());
        self.metrics.running.inc();
        let shutdown = Shutdown::default();
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(run_id.clone(), shutdown.clone());

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let me = self.clone();
        let rid = run_id.clone();
        let progress = tokio::spawn(async move {
            // The same text as `dryrun run`'s plain progress, a line at a time.
            let mut lines = crate::report::terminal::PlainLines::default();
            while let Some(ev) = rx.recv().await {
                for line in lines.render(&ev).unwrap_or_default().lines() {
                    me.push_progress(&rid, line.to_string());
                }
            }
        });
        let provider = job.provider.clone();
        let opts = RunOptions {
            release: job.release.clone(),
            backup: job.backup.clone(),
            keep: None,
            trigger,
            concurrency: 4,
            run_id: Some(run_id.clone()),
            compile_ms: 0,
            teardown_timeout: engine::TEARDOWN_TIMEOUT,
            secrets: self
                .held_secrets()
                .into_iter()
                .chain(job.callback_url.iter().map(Secret::new))
                .collect(),
        };
        let started = Instant::now();
        let result = engine::run(&job.bp, provider, &self.state, opts, tx, shutdown).await;
        let _ = progress.await;
        // Teardown has ended: the environment, the slot and the lease are free before any
        // message goes out (the outbox delivers them in the background).
        drop(held);
        drop(slot);
        drop(env_guard);
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&run_id);
        self.metrics.running.dec();
        match result {
            Ok(rep) => {
                if let Err(e) = self.history.finish(&rep) {
                    tracing::error!(run_id = %run_id, error = %e, "cannot record the run in history");
                }
                self.metrics.finished(&rep, trigger_name(trigger));
                tracing::info!(run_id = %run_id, status = %rep.status, ms = started.elapsed().as_millis() as u64, "run finished");
                self.after_run(&job, &rep);
            }
            Err(e) => {
                let _ = self
                    .history
                    .set_status(&run_id, "error", Some(&e.to_string()));
                self.metrics.ended("error", trigger_name(trigger));
            }
        }
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&run_id);
    }

    /// The server stops while the run waits: it stays `queued` (with its request) and runs
    /// after the next start.
    fn cancelled(&self, run_id: &str, _trigger: Trigger) {
        tracing::info!(run_id = %run_id, "server stopping: the run stays queued for the next start");
    }

    fn after_run(&self, job: &Job, rep: &RunReport) {
        if let Some(url) = &job.callback_url {
            notify::callback(&self.outbox, url, rep);
        }
        notify::notify(&self.outbox, rep);
    }

    fn push_progress(&self, run_id: &str, line: String) {
        let mut p = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let q = p.entry(run_id.to_string()).or_default();
        if q.len() >= PROGRESS_LINES {
            q.pop_front();
        }
        q.push_back(line);
    }

    /// Live progress lines of a running run.
    #[must_use]
    pub fn progress(&self, run_id: &str) -> Vec<String> {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(run_id)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Runs waiting for their environment, a slot or a lease.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Stops accepting, tears down running runs (first signal to each), waits up to `grace`,
    /// then gives up on teardown (second signal). Returns the runs still going at the end.
    pub async fn drain(&self, grace: Duration) -> Vec<String> {
        self.stop.cancel();
        self.tracker.close();
        for s in self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
        {
            if let Ok(mut r) = s.reason.lock() {
                *r = Some("server shutdown (SIGTERM)".into());
            }
            s.soft.cancel();
        }
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return Vec::new();
        }
        let still: Vec<String> = {
            let running = self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for s in running.values() {
                s.hard.cancel();
            }
            running.keys().cloned().collect()
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await;
        still
    }

    /// At start-up: runs that were queued or running when the server died are marked
    /// interrupted, and what the running ones created is cleaned up through their journals.
    pub async fn recover_interrupted(self: &Arc<Self>) {
        let Ok(rows) = self.history.in_status(&["queued", "running"]) else {
            return;
        };
        for r in rows {
            if r.status == "queued" {
                self.resume(r).await;
                continue;
            }
            let provider = match crate::provider::choose(&r.provider, &self.state, None, None).await
            {
                Ok(p) => p,
                Err(e) => {
                    let why = format!(
                        "the server stopped during the run; cleanup at restart could not use the {} provider: {e}; run `dryrun cleanup {} --provider {}`",
                        r.provider, r.run_id, r.provider
                    );
                    eprintln!("dryrun serve: run {} was interrupted: {why}", r.run_id);
                    let _ = self
                        .history
                        .set_status(&r.run_id, "interrupted", Some(&why));
                    continue;
                }
            };
            let provider = provider.as_ref();
            let target = engine::cleanup::Target::Run(r.run_id.clone());
            let outcome = match engine::cleanup::survey(&self.state, provider, &target).await {
                Ok(plan)
                    if plan.iter().any(|p| {
                        p.skipped
                            .as_deref()
                            .is_some_and(|s| s.starts_with("in progress"))
                    }) =>
                {
                    continue; // another process still runs it
                }
                Ok(plan) => match engine::cleanup::execute(&self.state, provider, &plan).await {
                    Ok(done) => {
                        let failed: Vec<String> = done
                            .iter()
                            .flat_map(|c| c.failed.iter().map(|(w, why)| format!("{w}: {why}")))
                            .collect();
                        if failed.is_empty() {
                            "the server stopped during the run; its resources were cleaned up at restart".to_string()
                        } else {
                            format!(
                                "the server stopped during the run; cleanup at restart left: {}",
                                failed.join("; ")
                            )
                        }
                    }
                    Err(e) => {
                        format!("the server stopped during the run; cleanup at restart failed: {e}")
                    }
                },
                Err(_) => {
                    "the server stopped before the run wrote its journal; nothing was created"
                        .to_string()
                }
            };
            eprintln!("dryrun serve: run {} was interrupted: {outcome}", r.run_id);
            let _ = self
                .history
                .set_status(&r.run_id, "interrupted", Some(&outcome));
        }
    }
}

impl App {
    /// A run that was accepted (queued) when the server stopped or died: it runs now, from the
    /// request kept with it — unless it waited longer than `queue_max_age` (then `expired`) or
    /// its blueprint or release no longer loads (then `error`); either way its callback says so.
    async fn resume(self: &Arc<Self>, r: RunRow) {
        let age = Utc::now() - r.queued_at;
        let max =
            chrono::Duration::from_std(self.cfg.queue_max_age).unwrap_or(chrono::Duration::MAX);
        let request = self
            .history
            .request(&r.run_id)
            .ok()
            .flatten()
            .and_then(|j| serde_json::from_str::<RunRequest>(&j).ok());
        let not_run = |status: &str, why: String| {
            eprintln!("dryrun serve: queued run {} {status}: {why}", r.run_id);
            let _ = self.history.set_status(&r.run_id, status, Some(&why));
            let _ = std::fs::remove_dir(self.state.run_dir(&r.run_id));
            if let Some(url) = request.as_ref().and_then(|q| q.callback_url.as_deref()) {
                notify::callback_not_run(&self.outbox, url, &r.run_id, status, &why);
            }
        };
        let Some(req) = request.clone() else {
            return not_run(
                "interrupted",
                "the server stopped before the run started and its request was not kept; nothing was created".into(),
            );
        };
        if age > max {
            return not_run(
                "expired",
                format!(
                    "it waited {} in the queue, longer than queue_max_age ({}); nothing was created",
                    crate::report::human_secs(age.num_seconds()),
                    humantime::format_duration(self.cfg.queue_max_age)
                ),
            );
        }
        match self.prepare(&req).await {
            Ok(Prepared {
                bp,
                release,
                backup,
                provider,
            }) => {
                eprintln!(
                    "dryrun serve: queued run {} resumes after the restart",
                    r.run_id
                );
                self.waiting.fetch_add(1, Ordering::SeqCst);
                let trigger = req.trigger.unwrap_or(Trigger::Webhook);
                self.enqueue(
                    Job {
                        row: r,
                        bp,
                        release,
                        backup,
                        callback_url: req.callback_url,
                        provider,
                    },
                    trigger,
                );
            }
            Err(e) => not_run(
                "error",
                format!("it could not be resumed after a restart: {e}; nothing was created"),
            ),
        }
    }
}

/// History name of a trigger.
#[must_use]
pub fn trigger_name(t: Trigger) -> &'static str {
    match t {
        Trigger::Cli => "cli",
        Trigger::Webhook => "webhook",
        Trigger::Schedule => "schedule",
    }
}

/// Starts one task per `[[schedule]]`: at each firing, submit the rehearsal.
pub fn start_schedules(app: &Arc<App>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut out = Vec::new();
    for s in app.cfg.schedule.clone() {
        let app = app.clone();
        out.push(tokio::spawn(async move {
            let Ok(cron) = super::schedule::parse(&s.cron) else { return };
            let tz: chrono_tz::Tz = s.timezone.parse().unwrap_or(chrono_tz::Tz::UTC);
            loop {
                let now = Utc::now();
                let Some(next) = super::schedule::next_after(&cron, tz, now) else { return };
                let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = app.stop.cancelled() => return,
                }
                let req = RunRequest {
                    blueprint: s.blueprint.clone(),
                    release: s.release.clone(),
                    params: s.params.clone(),
                    provider: s.provider.clone(),
                    schedule: Some(s.name.clone()),
                    trigger: Some(Trigger::Schedule),
                    ..RunRequest::default()
                };
                match app.submit(req).await {
                    Ok(Submitted::New(row)) => tracing::info!(schedule = %s.name, run_id = %row.run_id, "scheduled rehearsal queued"),
                    Ok(Submitted::Duplicate(_)) => {}
                    Err(e) => {
                        tracing::error!(schedule = %s.name, error = %e, "scheduled rehearsal not started");
                        eprintln!("dryrun serve: schedule {}: not started: {e}", s.name);
                        notify::text(&app.outbox, &format!("dryrun: scheduled rehearsal `{}` could not start: {e}", s.name));
                    }
                }
                // Never fire twice for the same instant.
                let after = Utc::now();
                if after < next {
                    tokio::time::sleep((next - after).to_std().unwrap_or(Duration::ZERO)).await;
                }
            }
        }));
    }
    out
}
