//! The run's side of [`crate::migrations`]: the lock monitor around the release's install, the
//! lint hints before provisioning, and the guards after the walk.
//!
//! Every PostgreSQL copy the runner reaches directly is watched from the first service's
//! install start to the last one's end (services may install at once: one monitor per
//! database, counted in and out), and so is every SQLite copy on this machine (its file's write
//! locks, [`migrations::sqlite`]). A copy the runner cannot reach (AWS without
//! `runner_in_vpc`), or a MySQL one, is reported in `migration_trace` as skipped, with the
//! reason; the guards that need a trace are then `skipped`, never `passed`.

use std::time::Duration;

use crate::migrations::{
    self, Comparison, Findings, GuardResult, Hint, Migration, TraceReport, postgres::Monitor,
    sqlite::Watcher,
};
use crate::provider::{Probe, ProbeOutcome, ProbeRequest};
use crate::report::Status;

use super::{Failure, Shared};

/// What the monitors saw, and the installs they watched.
#[derive(Debug, Default)]
pub(super) struct Tracing {
    /// Installs running now.
    active: usize,
    monitors: Vec<(String, Watch)>,
    pub migrations: Vec<Migration>,
    pub reports: Vec<TraceReport>,
    /// Per service, its install steps and their times (`guards.max_migration`).
    pub installs: Vec<(String, Vec<(String, Duration)>)>,
    /// Databases restored and masked: the only ones an install's trace watches. One still
    /// being masked is dryrun's own work (its statements are not the release's, and its open
    /// SQLite file must not be touched by another descriptor of this process).
    ready: std::collections::BTreeSet<String>,
}

/// A running trace of one database.
#[derive(Debug)]
enum Watch {
    /// PostgreSQL: its statistics views.
    Pg(Monitor),
    /// SQLite: its file's write locks.
    Sqlite(Watcher),
}

impl Watch {
    async fn stop(self) -> Result<(Vec<Migration>, TraceReport), String> {
        match self {
            Watch::Pg(m) => m.stop().await.map_err(|e| e.to_string()),
            Watch::Sqlite(w) => w.stop().await.map_err(|e| e.to_string()),
        }
    }
}

impl Shared {
    /// Whether this runner connects to database `name` directly (`Err`: why not).
    pub(super) async fn direct(&self, name: &str, what: &'static str) -> Result<(), String> {
        let probe = Probe::Sql {
            database: name.to_string(),
            query: "SELECT 1".into(),
        };
        let records = self.records();
        match self
            .provider
            .probe(
                &self.run,
                ProbeRequest {
                    check: what,
                    probe: &probe,
                    records: &records,
                    timeout: Duration::from_secs(30),
                },
            )
            .await
        {
            Ok(ProbeOutcome::Local) => Ok(()),
            Ok(ProbeOutcome::Skipped(why) | ProbeOutcome::Failed { message: why, .. }) => Err(why),
            Ok(ProbeOutcome::Remote { via, .. }) => Err(format!("only reachable through {via}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Database `name` is restored and masked: installs from now on trace it.
    pub(super) async fn trace_ready(&self, name: &str) {
        self.trace.lock().await.ready.insert(name.to_string());
    }

    /// An install starts: the first one starts a monitor on every ready PostgreSQL and SQLite
    /// copy.
    pub(super) async fn trace_begin(&self) {
        let mut t = self.trace.lock().await;
        t.active += 1;
        if t.active > 1 || !self.migration_trace {
            return;
        }
        let dbs: Vec<(String, String, String, String)> = self
            .outputs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(|(name, o)| {
                let engine = o.get("engine")?.value.clone();
                let url = o.get("url").map(|u| u.value.clone()).unwrap_or_default();
                let path = o.get("path").map(|u| u.value.clone()).unwrap_or_default();
                Some((name.clone(), engine, url, path))
            })
            .collect();
        for (name, engine, url, path) in dbs {
            if !t.ready.contains(&name) {
                continue;
            }
            if engine == "sqlite" {
                // A file on this machine (the local provider's copies; elsewhere the probe
                // says it is not reached directly).
                let started = match self.direct(&name, "migration monitor").await {
                    Err(why) => Err(format!("the runner does not reach it directly ({why})")),
                    Ok(()) => {
                        let (db, path) = (name.clone(), std::path::PathBuf::from(&path));
                        tokio::task::spawn_blocking(move || {
                            Watcher::start(&db, &path, migrations::PERIOD)
                        })
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| format!("the watcher could not start: {e}")))
                    }
                };
                match started {
                    Ok(w) => t.monitors.push((name, Watch::Sqlite(w))),
                    Err(why) => t.reports.push(TraceReport::skipped(&name, why)),
                }
                continue;
            }
            if !matches!(engine.as_str(), "postgres" | "aurora-postgresql") {
                if t.reports.iter().all(|r| r.database != name) {
                    t.reports.push(TraceReport::skipped(
                        &name,
                        format!("engine {engine}: only PostgreSQL and SQLite copies are watched (dryrun has no MySQL client)"),
                    ));
                }
                continue;
            }
            if let Err(why) = self.direct(&name, "migration monitor").await {
                t.reports.push(TraceReport::skipped(
                    &name,
                    format!("the runner does not reach it directly ({why})"),
                ));
                continue;
            }
            match Monitor::start(&name, &url, migrations::PERIOD).await {
                Ok(m) => t.monitors.push((name, Watch::Pg(m))),
                Err(e) => t.reports.push(TraceReport::skipped(
                    &name,
                    self.run
                        .redactor
                        .redact(&format!("the monitor could not start: {e}")),
                )),
            }
        }
    }

    /// An install ended: the last one stops the monitors and keeps what they saw.
    pub(super) async fn trace_end(&self) {
        let mut t = self.trace.lock().await;
        t.active = t.active.saturating_sub(1);
        if t.active > 0 {
            return;
        }
        for (name, m) in std::mem::take(&mut t.monitors) {
            match m.stop().await {
                Ok((ms, report)) => {
                    t.migrations.extend(ms.into_iter().map(|mut m| {
                        m.statement = self.run.redactor.redact(&m.statement);
                        m
                    }));
                    // A second install phase (a service installed after another finished)
                    // adds to the first's report.
                    if let Some(r) = t.reports.iter_mut().find(|r| r.database == name) {
                        r.samples += report.samples;
                        r.max_gap_ms = r.max_gap_ms.max(report.max_gap_ms);
                        r.rewritten.extend(report.rewritten);
                    } else {
                        t.reports.push(report);
                    }
                }
                Err(e) => t.reports.push(TraceReport::skipped(
                    &name,
                    self.run
                        .redactor
                        .redact(&format!("the monitor stopped: {e}")),
                )),
            }
        }
        migrations::sort_worst_first(&mut t.migrations);
    }
}

/// The migrations' findings at the end of the walk.
#[derive(Debug, Default)]
pub(super) struct Judged {
    /// Per service, its install steps and their times.
    pub installs: Vec<(String, Vec<(String, Duration)>)>,
    pub migrations: Vec<Migration>,
    pub traces: Vec<TraceReport>,
    pub guards: Vec<GuardResult>,
    pub hints: Vec<Hint>,
}

/// Judges the guards (a failed guard is a failure of the run: exit 1, the statement quoted)
/// and links the hints to what was measured.
pub(super) async fn judge(
    sh: &Shared,
    guards: &migrations::Guards,
    mut hints: Vec<Hint>,
    comparison: Option<&Comparison>,
    failures: &mut Vec<Failure>,
) -> Judged {
    let t = std::mem::take(&mut *sh.trace.lock().await);
    let results = migrations::judge(
        guards,
        Findings {
            migrations: &t.migrations,
            traces: &t.reports,
            installs: &t.installs,
            comparison,
        },
    );
    for g in results.iter().filter(|g| g.status == Status::Failed) {
        failures.push(Failure {
            status: Status::Failed,
            message: sh.run.redactor.redact(&format!(
                "guard {} ({}): {}",
                g.guard,
                g.limit,
                g.message.as_deref().unwrap_or_default()
            )),
        });
    }
    let traced = t.reports.iter().any(|r| r.status == "traced");
    migrations::lint::link(&mut hints, &t.migrations, traced);
    Judged {
        installs: t.installs,
        migrations: t.migrations,
        traces: t.reports,
        guards: results,
        hints,
    }
}

/// The release's SQL hints, before anything is provisioned (a release without files has none).
/// The rules are PostgreSQL's (`CONCURRENTLY`, `lock_timeout`): a blueprint without a
/// PostgreSQL database gets none.
pub async fn hints(
    bp: &crate::blueprint::Blueprint,
    release: &crate::release::Release,
) -> Vec<Hint> {
    use crate::blueprint::{Engine, ResourceSpec};
    let postgres = bp.resources.iter().any(|r| {
        matches!(&r.spec, ResourceSpec::Database(d) if matches!(d.engine, Engine::Postgres | Engine::AuroraPostgresql))
    });
    if !postgres {
        return Vec::new();
    }
    let release = release.clone();
    tokio::task::spawn_blocking(move || {
        let steps: Vec<String> = release
            .manifest
            .install
            .iter()
            .map(|s| s.run.clone())
            .collect();
        let dir = tempfile::tempdir().ok()?;
        release.unpack_into(dir.path()).ok()?;
        Some(migrations::lint::lint_dir(dir.path(), &steps))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default()
}
