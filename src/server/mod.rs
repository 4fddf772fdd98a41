//! `dryrun serve`: the portal webhook, scheduled rehearsals, the run queue, history, the API,
//! the dashboard and metrics, in one long-running process.
//!
//! | module | what |
//! |---|---|
//! | [`auth`] | tokens, sessions and roles; CSRF tokens; the `Host` and `Origin` rules |
//! | [`config`] | the TOML config file |
//! | [`signature`] | HMAC-SHA256 in GitHub's scheme, for webhooks and callbacks |
//! | [`webhook`] | the webhook's checks as a pure function (signature, timestamp, delivery, body) |
//! | [`jobs`] | accepting runs into the queue, the claim loop (global limit; the control plane gives one run per environment), running them through [`crate::runner`], heartbeats and recovery |
//! | [`routes`] | the HTTP API and the webhook |
//! | [`dashboard`] | the server-rendered pages |
//! | [`notify`] | signed callbacks and Slack-compatible notifications |
//! | [`outbox`] | their persistent queue and the task that delivers it |
//! | [`schedule`] | cron schedules |
//! | [`metrics`] | Prometheus metrics |
//!
//! Docs: docs/server.md.

pub mod auth;
pub mod config;
pub mod dashboard;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod routes;
pub mod schedule;
pub mod signature;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::StateDir;

pub use config::Config;
pub use jobs::App;

/// Server errors that stop it from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Bad `[auth]` settings (a token variable that is not set, a malformed hash).
    #[error("{0}")]
    Auth(String),
    /// The control plane (history database or control database).
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// Cannot listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else at start-up.
    #[error("{0}")]
    Other(String),
}

/// How `serve` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// Runs that were still tearing down when the grace period ended.
    pub abandoned: Vec<String>,
    /// The worker stopped because the other workers had taken it for dead (its heartbeat
    /// stopped for longer than `lease_timeout`): a failure, so that a supervisor restarts it.
    pub taken_for_dead: bool,
}

/// Removes what is older than `retention`: finished runs' history rows, their delivery ids and
/// delivered messages, and the history directories (journal, report, logs) of closed runs.
/// Returns how many runs went.
pub async fn prune(
    state: &StateDir,
    control: &dyn crate::control::Control,
    retention: Duration,
) -> usize {
    let before = chrono::Utc::now()
        - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(90));
    let dirs = crate::journal::prune(state, before).unwrap_or_default();
    // A run whose journal stays (it left something, or is kept) keeps its history row too.
    let rows = control
        .prune(before, &|id| state.run_dir(id).exists())
        .await
        .unwrap_or_default();
    let n = dirs.len().max(rows.len());
    if n > 0 {
        tracing::info!(
            runs = n,
            retention = %humantime::format_duration(retention),
            "pruned old runs"
        );
    }
    n
}

/// Prunes at start and then every hour.
fn start_retention(app: &Arc<App>) -> tokio::task::JoinHandle<()> {
    let app = app.clone();
    tokio::spawn(async move {
        loop {
            prune(&app.state, app.control.as_ref(), app.cfg.retention).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    })
}

/// Runs the server until `shutdown` fires, then drains: stops accepting, lets running dry runs
/// tear down within the configured grace period; queued runs stay queued for the next start
/// (or another worker).
///
/// # Errors
/// Start-up failures ([`ServeError`]).
pub async fn serve(
    cfg: Config,
    state: StateDir,
    blueprints: PathBuf,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<Stopped, ServeError> {
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: cfg.listen.clone(),
        source,
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
    let database_url = cfg.database_url.clone();
    let control =
        crate::control::open(&state, database_url.as_deref(), "serve", cfg.lease_timeout).await?;
    let app = Arc::new(App::new(
        cfg,
        state,
        &blueprints,
        addr,
        control.clone(),
        database_url.as_deref(),
    )?);
    app.recover_at_start().await;
    let worker = app.start_worker();
    let heartbeat = app.start_heartbeat();
    let schedules = jobs::start_schedules(&app);
    let retention = start_retention(&app);
    let outbox_stop = CancellationToken::new();
    let outbox = outbox::start(&app.outbox, outbox_stop.clone());
    eprintln!(
        "dryrun serve: listening on http://{addr} (blueprints in {}; {} as worker {})",
        app.blueprints.display(),
        match control.backend() {
            "sqlite" => "history in the state directory".to_string(),
            other => format!("shared {other} control database"),
        },
        control.worker().id
    );
    if let Some(tx) = ready {
        let _ = tx.send(addr);
    }
    let router = routes::router(app.clone());
    let stop = shutdown.clone();
    let server =
        axum::serve(listener, router).with_graceful_shutdown(async move { stop.cancelled().await });
    let server = tokio::spawn(async move { server.await });
    // Stops at the signal, or when this worker finds it was taken for dead (see
    // `App::start_heartbeat`).
    let taken_for_dead = tokio::select! {
        () = shutdown.cancelled() => false,
        () = app.stop.cancelled() => {
            shutdown.cancel();
            true
        }
    };
    eprintln!(
        "dryrun serve: shutting down: no new runs; waiting up to {} for running dry runs to tear down",
        humantime::format_duration(app.cfg.shutdown_grace)
    );
    for s in schedules {
        s.abort();
    }
    retention.abort();
    let abandoned = app.drain(app.cfg.shutdown_grace).await;
    let _ = worker.await;
    heartbeat.abort();
    // Messages of the runs that just ended get a few seconds; what is still queued then is
    // sent at the next start.
    outbox::flush(&app.outbox, Duration::from_secs(5)).await;
    outbox_stop.cancel();
    let _ = outbox.await;
    control.stopped().await;
    // Open HTTP connections (a dashboard polling) must not keep the process alive.
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if abandoned.is_empty() {
        eprintln!("dryrun serve: stopped; nothing left running");
    } else {
        eprintln!(
            "dryrun serve: stopped; runs still tearing down when the grace period ended: {} (`dryrun cleanup --all` finishes them)",
            abandoned.join(", ")
        );
    }
    Ok(Stopped {
        abandoned,
        taken_for_dead,
    })
}
