//! Accepting runs and running them: the queue.
//!
//! A run is accepted only after its blueprint compiles and its release loads (so a bad request
//! creates nothing), then recorded as `queued` with its request in the control plane
//! ([`crate::control`]). Workers — this process's claim loop, and with PostgreSQL every other
//! `dryrun serve` sharing the database — claim queued runs when they have a free slot
//! (`concurrency`): the oldest run of a free environment first, one run per environment, one
//! worker per run. The claimed run is loaded again from its request and started through
//! [`crate::runner`]. `queue_limit` bounds how many wait; beyond it the webhook answers 429.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::blueprint::{self, Blueprint, CompileError};
use crate::control::{
    Claimed, Control, ControlError, Dedup, Inserted, Lease, RunRow, RunStatus, trigger_name,
};
use crate::engine::{self, Event, Shutdown};
use crate::provider::{BackupPick, Provider};
use crate::reference;
use crate::release::Release;
use crate::report::{RunReport, Trigger};
use crate::runner::{self, Launch};
use crate::secret::Secret;
use crate::state::StateDir;

use super::config::Config;
use super::metrics::Metrics;
use super::{ServeError, notify};

/// Lines of live progress kept per running run (shown by the API and the run page).
const PROGRESS_LINES: usize = 200;

/// How often the claim loop looks at the queue when nothing woke it (runs queued by other
/// workers, leases given back by CLI runs).
const POLL: Duration = Duration::from_millis(250);

/// A request to start a dry run (webhook, dashboard form or schedule). Kept with the queued
/// run in the history (it holds no secret), so that the run survives a restart and any worker
/// can run it.
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
    /// The instant the schedule fired for (one run per schedule and instant, across workers).
    #[serde(default)]
    pub fire_at: Option<DateTime<Utc>>,
    /// `webhook` or `schedule` (the dashboard's form counts as the portal's button: webhook).
    pub trigger: Option<Trigger>,
    /// Provider of the run (a schedule's own); default: the server's.
    #[serde(default)]
    pub provider: Option<String>,
    /// The release in production (resolved like `release`), rehearsed first on its own copy of
    /// the same backup as run `RUN_ID-baseline`; the candidate's check timings are compared
    /// with its. Requests queued before this field existed have none.
    #[serde(default)]
    pub baseline: Option<String>,
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
    /// The control plane.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// What `submit` did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new run was queued.
    New(RunRow),
    /// The delivery id (or the schedule's firing) was seen before; this is the original run.
    Duplicate(RunRow),
}

/// What a request needs to run, loaded and checked.
struct Prepared {
    bp: Blueprint,
    release: Release,
    baseline: Option<Release>,
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
    /// The control plane: history, queue, leases, outbox.
    pub control: Arc<dyn Control>,
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
    /// The database URL, if any (registered with every run's redactor: it may hold a password).
    database_url: Option<Secret>,
    slots: Arc<Semaphore>,
    wake: Notify,
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
    /// Builds the server state on an open control plane.
    ///
    /// # Errors
    /// Blueprints root or state directory problems, bad `[auth]` settings.
    pub fn new(
        cfg: Config,
        state: StateDir,
        blueprints: &Path,
        addr: SocketAddr,
        control: Arc<dyn Control>,
        database_url: Option<&str>,
    ) -> Result<App, ServeError> {
        let blueprints = blueprints.canonicalize().map_err(|e| {
            ServeError::Other(format!("blueprints root {}: {e}", blueprints.display()))
        })?;
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
            control: control.clone(),
            wake: Notify::new(),
            busy: std::sync::atomic::AtomicUsize::new(0),
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
            control,
            metrics: Metrics::new(),
            secret,
            base_url,
            outbox,
            auth,
            hosts,
            database_url: database_url.map(Secret::new),
            slots,
            wake: Notify::new(),
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
    /// (which also signs callbacks), the notification URL (chat webhook URLs carry their
    /// token), API tokens and the control database's URL.
    #[must_use]
    pub fn held_secrets(&self) -> Vec<Secret> {
        let mut v: Vec<Secret> = self.secret.iter().cloned().collect();
        v.extend(self.cfg.notify.url.iter().map(Secret::new));
        v.extend(self.auth.held_secrets());
        v.extend(self.database_url.iter().cloned());
        v
    }

    /// Accepts a run: validates it, then records it as queued (with its request) for a worker
    /// to claim.
    ///
    /// # Errors
    /// See [`SubmitError`]; nothing is created on error.
    pub async fn submit(&self, req: RunRequest) -> Result<Submitted, SubmitError> {
        if self.stop.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        if let Some(d) = &req.delivery
            && let Some(orig) = self.control.delivery(d).await?
        {
            return Ok(Submitted::Duplicate(orig));
        }
        let Prepared {
            bp,
            release,
            provider,
            ..
        } = self.prepare(&req).await?;
        let waiting = usize::try_from(self.control.queued().await?).unwrap_or(usize::MAX);
        if waiting >= self.cfg.queue_limit {
            return Err(SubmitError::QueueFull(waiting));
        }
        let trigger = req.trigger.unwrap_or(Trigger::Webhook);
        let request = serde_json::to_string(&req).unwrap_or_default();
        let dedup = match (&req.delivery, &req.schedule, req.fire_at) {
            (Some(d), _, _) => Dedup::Delivery(d),
            (None, Some(s), Some(at)) => Dedup::Fire { schedule: s, at },
            _ => Dedup::None,
        };
        // The id is claimed by the history row's primary key: never a collision, even with CLI
        // runs and other workers starting in the same second. The request is kept with the
        // row, so that the run survives a restart and any worker can run it.
        loop {
            let row = RunRow {
                release_version: Some(release.manifest.version.clone()),
                delivery: req.delivery.clone(),
                schedule: req.schedule.clone(),
                ..RunRow::queued(
                    &engine::new_run_id(&bp.name),
                    &bp.name,
                    &req.blueprint,
                    provider.name(),
                    trigger,
                    &req.release,
                )
            };
            match self.control.insert(&row, Some(&request), dedup).await? {
                Inserted::New => {
                    self.wake.notify_one();
                    return Ok(Submitted::New(row));
                }
                Inserted::Duplicate(orig) => return Ok(Submitted::Duplicate(*orig)),
                Inserted::IdTaken => {}
            }
        }
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
        let release = self
            .load_release(&req.release, "release", provider.as_ref(), provider_name)
            .await?;
        let baseline = match &req.baseline {
            Some(b) => Some(
                self.load_release(b, "baseline", provider.as_ref(), provider_name)
                    .await?,
            ),
            None => None,
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
            baseline,
            backup,
            provider,
        })
    }

    /// Loads a request's release (`what`: `release` or `baseline`): a path under the root, or
    /// a remote object the run's provider fetches to read its manifest.
    async fn load_release(
        &self,
        reference: &str,
        what: &str,
        provider: &dyn Provider,
        provider_name: &str,
    ) -> Result<Release, SubmitError> {
        // The loader's messages say `release …`; a baseline's say which one it was.
        let hide = |e: String| {
            let e = e.replace(&self.blueprints.display().to_string(), "");
            if what == "release" {
                e
            } else {
                format!("{what}: {e}")
            }
        };
        match self.resolve(
            reference,
            what,
            crate::provider::remote_schemes(provider_name),
        )? {
            reference::Resolved::Local(p) => Release::load(&p.display().to_string())
                .map_err(|e| SubmitError::Invalid(hide(e.to_string()))),
            reference::Resolved::Remote(r) => {
                let file = provider
                    .fetch_release(&r, &self.state.root().join("releases"))
                    .await
                    .map_err(|e| SubmitError::Invalid(format!("{what} {r}: {e}")))?
                    .ok_or_else(|| {
                        SubmitError::BadPath(format!(
                            "{what} {r}: the {provider_name} provider does not fetch it"
                        ))
                    })?;
                Release::load_fetched(&r, &file)
                    .map_err(|e| SubmitError::Invalid(hide(e.to_string())))
            }
        }
    }

    /// The claim loop: while a slot is free, claim the next queued run this worker may run and
    /// start it. Ends when the server stops accepting.
    pub fn start_worker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let app = self.clone();
        tokio::spawn(async move {
            let mut complained = false;
            loop {
                let permit = tokio::select! {
                    p = app.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    () = app.stop.cancelled() => return,
                };
                match app.control.claim().await {
                    Ok(Some(c)) => {
                        complained = false;
                        let me = app.clone();
                        app.tracker.spawn(Box::pin(async move {
                            Box::pin(me.clone().run_claimed(c, permit)).await;
                            // Its environment is free again: claim the next run for it now
                            // rather than at the next poll.
                            me.wake.notify_one();
                        }));
                        continue;
                    }
                    Ok(None) => complained = false,
                    Err(e) => {
                        if !complained {
                            tracing::error!(error = %e, "cannot claim queued runs; retrying");
                            eprintln!("dryrun serve: cannot claim queued runs: {e}; retrying");
                            complained = true;
                        }
                    }
                }
                drop(permit);
                if let Ok(n) = app.control.queued().await {
                    app.metrics.queue_depth.set(n);
                }
                tokio::select! {
                    () = app.wake.notified() => {}
                    () = tokio::time::sleep(POLL) => {}
                    () = app.stop.cancelled() => return,
                }
            }
        })
    }

    /// Runs a claimed run: loads it from its request (a run that waited longer than
    /// `queue_max_age`, or whose blueprint or release no longer loads, ends without running,
    /// and its callback says so), then starts it through [`runner::execute`].
    async fn run_claimed(self: Arc<Self>, claimed: Claimed, slot: OwnedSemaphorePermit) {
        let Claimed {
            row,
            request,
            lease,
        } = claimed;
        let run_id = row.run_id.clone();
        let request = request.and_then(|j| serde_json::from_str::<RunRequest>(&j).ok());
        let callback_url = request.as_ref().and_then(|q| q.callback_url.clone());
        let Some(req) = request else {
            return self
                .not_run(
                    &row,
                    lease,
                    None,
                    RunStatus::Interrupted,
                    "the server stopped before the run started and its request was not kept; nothing was created".into(),
                )
                .await;
        };
        let age = Utc::now() - row.queued_at;
        let max =
            chrono::Duration::from_std(self.cfg.queue_max_age).unwrap_or(chrono::Duration::MAX);
        if age > max {
            let why = format!(
                "it waited {} in the queue, longer than queue_max_age ({}); nothing was created",
                crate::report::human_secs(age.num_seconds()),
                humantime::format_duration(self.cfg.queue_max_age)
            );
            return self
                .not_run(
                    &row,
                    lease,
                    callback_url.as_deref(),
                    RunStatus::Expired,
                    why,
                )
                .await;
        }
        let prepared = match self.prepare(&req).await {
            Ok(p) => p,
            Err(e) => {
                let why = format!("it could not be started: {e}; nothing was created");
                return self
                    .not_run(&row, lease, callback_url.as_deref(), RunStatus::Error, why)
                    .await;
            }
        };
        let trigger = req.trigger.unwrap_or(Trigger::Webhook);
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
                let ev = crate::report::terminal::printable_event(&ev);
                for line in lines.render(&ev).unwrap_or_default().lines() {
                    me.push_progress(&rid, line.to_string());
                }
            }
        });
        let launch = Launch {
            bp: prepared.bp,
            provider: prepared.provider,
            release: prepared.release,
            backup: prepared.backup,
            trigger,
            keep: None,
            concurrency: 4,
            compile_ms: 0,
            teardown_timeout: engine::TEARDOWN_TIMEOUT,
            secrets: self
                .held_secrets()
                .into_iter()
                .chain(callback_url.iter().map(Secret::new))
                .collect(),
            scan: false,
            baseline: prepared.baseline,
        };
        let started = Instant::now();
        let done = runner::execute(
            self.control.as_ref(),
            &self.state,
            &run_id,
            lease,
            launch,
            tx,
            shutdown,
        )
        .await;
        let _ = progress.await;
        // Teardown has ended and the lease is back: the slot is free before any message goes
        // out (the outbox delivers them in the background).
        drop(slot);
        self.wake.notify_one();
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&run_id);
        self.metrics.running.dec();
        if let Some(e) = &done.history_error {
            tracing::error!(run_id = %run_id, error = %e, "cannot record the run in the history");
        }
        match done.result {
            Ok(rep) => {
                self.metrics.finished(&rep, trigger_name(trigger));
                tracing::info!(run_id = %run_id, status = %rep.status, ms = started.elapsed().as_millis() as u64, "run finished");
                self.after_run(callback_url.as_deref(), &rep).await;
            }
            Err(_) => self.metrics.ended("error", trigger_name(trigger)),
        }
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&run_id);
    }

    /// A claimed run ends without running: its status and reason, its lease back, its callback.
    async fn not_run(
        &self,
        row: &RunRow,
        lease: Lease,
        callback_url: Option<&str>,
        status: RunStatus,
        why: String,
    ) {
        eprintln!("dryrun serve: queued run {} {status}: {why}", row.run_id);
        let _ = self
            .control
            .set_status(&row.run_id, status, Some(&why))
            .await;
        self.control.release(lease).await;
        self.wake.notify_one();
        self.metrics
            .ended(status.as_str(), trigger_name(row.trigger));
        if let Some(url) = callback_url {
            notify::callback_not_run(&self.outbox, url, &row.run_id, status.as_str(), &why).await;
        }
    }

    async fn after_run(&self, callback_url: Option<&str>, rep: &RunReport) {
        if let Some(url) = callback_url {
            notify::callback(&self.outbox, url, rep).await;
        }
        notify::notify(&self.outbox, rep).await;
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

    /// Sends every running run the first signal (stop, tear down) with `reason` for its report;
    /// a run that already has a reason keeps it (the first cause is the one reported).
    fn interrupt_running(&self, reason: &str) {
        for s in self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
        {
            if let Ok(mut r) = s.reason.lock() {
                r.get_or_insert_with(|| reason.to_string());
            }
            s.soft.cancel();
        }
    }

    /// Stops accepting and claiming, tears down running runs (first signal to each), waits up
    /// to `grace`, then gives up on teardown (second signal). Queued runs stay queued. Returns
    /// the runs still going at the end.
    pub async fn drain(&self, grace: Duration) -> Vec<String> {
        self.stop.cancel();
        self.tracker.close();
        self.interrupt_running("server shutdown (SIGTERM)");
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

    /// At start-up: recovers the runs a previous process left running (SQLite: this state
    /// directory's; PostgreSQL: any worker's that stopped heartbeating), and cleans up local
    /// leftovers of runs on this state directory that another worker marked interrupted.
    pub async fn recover_at_start(self: &Arc<Self>) {
        self.recover(true).await;
        self.clean_local_leftovers().await;
    }

    async fn recover(&self, at_start: bool) {
        let orphans = match self.control.orphans(at_start).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot look for interrupted runs");
                return;
            }
        };
        for o in orphans {
            let run_id = o.row.run_id.clone();
            match runner::recover(self.control.as_ref(), &self.state, o).await {
                Some(runner::Recovered::Interrupted(outcome)) => {
                    eprintln!("dryrun serve: run {run_id} was interrupted: {outcome}");
                    tracing::warn!(run_id = %run_id, outcome = %outcome, "recovered an interrupted run");
                }
                Some(runner::Recovered::Requeued(why)) => {
                    eprintln!("dryrun serve: run {run_id}: {why}");
                    tracing::warn!(run_id = %run_id, outcome = %why, "queued a claimed run again");
                    self.wake.notify_one();
                }
                None => {}
            }
        }
    }

    /// Runs on this state directory that another worker marked interrupted (it could not reach
    /// their local resources) and whose journals are still open: cleaned up now.
    async fn clean_local_leftovers(&self) {
        let Ok(runs) = crate::journal::list_runs(&self.state) else {
            return;
        };
        for r in runs
            .into_iter()
            .filter(|r| !r.closed && r.kept_until.is_none())
        {
            let Ok(Some((row, _))) = self.control.get(&r.run_id).await else {
                continue;
            };
            if row.status != RunStatus::Interrupted {
                continue;
            }
            let Ok(provider) =
                crate::provider::choose(&row.provider, &self.state, None, None).await
            else {
                continue;
            };
            let target = engine::cleanup::Target::Run(r.run_id.clone());
            let Ok(plan) = engine::cleanup::survey(&self.state, provider.as_ref(), &target).await
            else {
                continue;
            };
            if plan.iter().any(|p| p.skipped.is_some()) {
                continue;
            }
            if let Ok(done) = engine::cleanup::execute(&self.state, provider.as_ref(), &plan).await
            {
                let closed = done.iter().all(|c| c.closed);
                let note = format!(
                    "{}; {} when dryrun serve started again on this machine",
                    row.failure.unwrap_or_default(),
                    if closed {
                        "its local resources were cleaned up"
                    } else {
                        "cleanup of its local resources did not finish"
                    }
                );
                let _ = self
                    .control
                    .set_status(&r.run_id, RunStatus::Interrupted, Some(&note))
                    .await;
                eprintln!("dryrun serve: run {}: {note}", r.run_id);
            }
        }
    }

    /// Heartbeats every [`crate::control::HEARTBEAT`] and recovers the runs of workers that
    /// stopped (PostgreSQL; with SQLite both are no-ops). A worker that finds itself taken for
    /// dead stops its runs: another worker is cleaning them up.
    pub fn start_heartbeat(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let app = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(crate::control::HEARTBEAT) => {}
                    () = app.stop.cancelled() => return,
                }
                match app.control.heartbeat().await {
                    Ok(()) => {}
                    Err(e @ ControlError::TakenForDead { .. }) => {
                        eprintln!("dryrun serve: {e}; stopping this worker's runs");
                        tracing::error!(error = %e, "this worker was taken for dead");
                        app.interrupt_running("the worker lost its leases (no heartbeat)");
                        app.stop.cancel();
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
                app.recover(false).await;
            }
        })
    }
}

/// Starts one task per `[[schedule]]`: at each firing, submit the rehearsal. With several
/// workers every one fires; the firing's key (schedule, instant) makes one run of it.
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
                    baseline: s.baseline.clone(),
                    params: s.params.clone(),
                    provider: s.provider.clone(),
                    schedule: Some(s.name.clone()),
                    fire_at: Some(next),
                    trigger: Some(Trigger::Schedule),
                    ..RunRequest::default()
                };
                match app.submit(req).await {
                    Ok(Submitted::New(row)) => tracing::info!(schedule = %s.name, run_id = %row.run_id, "scheduled rehearsal queued"),
                    Ok(Submitted::Duplicate(row)) => tracing::info!(schedule = %s.name, run_id = %row.run_id, "scheduled rehearsal already queued by another worker"),
                    Err(e) => {
                        tracing::error!(schedule = %s.name, error = %e, "scheduled rehearsal not started");
                        eprintln!("dryrun serve: schedule {}: not started: {e}", s.name);
                        notify::text(&app.outbox, &format!("dryrun: scheduled rehearsal `{}` could not start: {e}", s.name)).await;
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
