//! The shared control plane: PostgreSQL, for several `dryrun serve` workers (each with its own
//! state directory, as on separate machines) and CLI runs sharing one queue.
//!
//! Tables (all `dryrun_*`, created at first connection under an advisory lock):
//!
//! | table | holds |
//! |---|---|
//! | `dryrun_runs` | the history and the queue: one row per run, `status = 'queued'` until a worker claims it |
//! | `dryrun_deliveries`, `dryrun_fires` | webhook delivery ids and schedule firings already turned into a run (primary keys: a repeat makes no run, whichever worker sees it) |
//! | `dryrun_leases` | one row per environment in use (primary key: one run per environment across all workers) |
//! | `dryrun_workers` | each worker process and its last heartbeat |
//! | `dryrun_journal` | every run's journal entries, written before the step they announce |
//! | `dryrun_outbox` | callbacks and notifications to deliver |
//!
//! A run is claimed with `SELECT … FOR UPDATE SKIP LOCKED` on the oldest queued run of a free
//! environment plus an insert into `dryrun_leases`, in one transaction. A worker that has not
//! heartbeaten for `lease_timeout` is dead: the first worker to notice marks it stopped and
//! takes its leases over in one `UPDATE`; the runs under them are then recovered (marked
//! interrupted, their resources cleaned up from the journal in this database).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::{
    Claimed, Control, ControlError, Dedup, Held, Inserted, Lease, Orphan, OutboxItem, OutboxKind,
    RunRow, RunStatus, TrendPoint, Worker, parse_trigger, trigger_name,
};
use crate::report::RunReport;

/// The PostgreSQL control plane.
pub struct Postgres {
    pool: Pool,
    config: tokio_postgres::Config,
    worker: Worker,
    lease_timeout: Duration,
    mirror: Arc<JournalWriter>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL or the config: they may hold the password.
        f.debug_struct("Postgres")
            .field("worker", &self.worker.id)
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL error as one line, with the server's own message when there is one.
fn pg(e: &tokio_postgres::Error) -> ControlError {
    ControlError::Postgres(describe(e))
}

fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn pool_error(e: &deadpool_postgres::PoolError) -> ControlError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => ControlError::Postgres(other.to_string()),
    }
}

const COLUMNS: &str = "run_id, blueprint, blueprint_path, provider, environment, trigger, release, release_version, status, queued_at, started_at, finished_at, duration_ms, restore_ms, backup_id, backup_age_s, exit_code, left_behind, failure, delivery, schedule, callback, worker";

fn row(r: &Row) -> Result<RunRow, ControlError> {
    let trigger: String = r.get(5);
    let status: String = r.get(8);
    Ok(RunRow {
        run_id: r.get(0),
        blueprint: r.get(1),
        blueprint_path: r.get(2),
        provider: r.get(3),
        environment: r.get(4),
        trigger: parse_trigger(&trigger)?,
        release: r.get(6),
        release_version: r.get(7),
        status: status.parse().map_err(ControlError::Damaged)?,
        queued_at: r.get(9),
        started_at: r.get(10),
        finished_at: r.get(11),
        duration_ms: r.get(12),
        restore_ms: r.get(13),
        backup_id: r.get(14),
        backup_age_s: r.get(15),
        exit_code: r.get(16),
        left_behind: r.get(17),
        failure: r.get(18),
        delivery: r.get(19),
        schedule: r.get(20),
        callback: r.get(21),
        worker: r.get(22),
    })
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dryrun_runs (
  run_id TEXT PRIMARY KEY, blueprint TEXT NOT NULL, blueprint_path TEXT NOT NULL,
  provider TEXT NOT NULL, environment TEXT NOT NULL, trigger TEXT NOT NULL,
  release TEXT NOT NULL, release_version TEXT, status TEXT NOT NULL,
  queued_at TIMESTAMPTZ NOT NULL, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,
  duration_ms BIGINT, restore_ms BIGINT, backup_id TEXT, backup_age_s BIGINT, exit_code INTEGER,
  left_behind BIGINT, failure TEXT, delivery TEXT, schedule TEXT, callback TEXT, worker TEXT,
  request TEXT, report TEXT);
CREATE INDEX IF NOT EXISTS dryrun_runs_by_time ON dryrun_runs(queued_at);
CREATE INDEX IF NOT EXISTS dryrun_runs_by_blueprint ON dryrun_runs(blueprint, queued_at);
CREATE INDEX IF NOT EXISTS dryrun_runs_queue ON dryrun_runs(environment, queued_at, run_id) WHERE status = 'queued';
CREATE TABLE IF NOT EXISTS dryrun_deliveries (
  id TEXT PRIMARY KEY, run_id TEXT NOT NULL, received_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS dryrun_fires (
  schedule TEXT NOT NULL, fire_at TIMESTAMPTZ NOT NULL, run_id TEXT NOT NULL,
  PRIMARY KEY (schedule, fire_at));
CREATE TABLE IF NOT EXISTS dryrun_leases (
  environment TEXT PRIMARY KEY, run_id TEXT NOT NULL, worker TEXT NOT NULL,
  acquired_at TIMESTAMPTZ NOT NULL, adopted_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS dryrun_workers (
  id TEXT PRIMARY KEY, machine TEXT NOT NULL, host TEXT NOT NULL, role TEXT NOT NULL,
  started_at TIMESTAMPTZ NOT NULL, seen_at TIMESTAMPTZ NOT NULL, stopped_at TIMESTAMPTZ,
  stopped_by TEXT);
CREATE TABLE IF NOT EXISTS dryrun_journal (
  id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS dryrun_journal_by_run ON dryrun_journal(run_id, id);
CREATE TABLE IF NOT EXISTS dryrun_outbox (
  id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, kind TEXT NOT NULL, url TEXT, body TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_at TIMESTAMPTZ NOT NULL, created_at TIMESTAMPTZ NOT NULL,
  last_error TEXT, done_at TIMESTAMPTZ, outcome TEXT);
CREATE INDEX IF NOT EXISTS dryrun_outbox_due ON dryrun_outbox(next_at) WHERE done_at IS NULL;
";

/// Parses a `postgres://` URL (or a `key=value` connection string).
///
/// # Errors
/// The URL does not parse; the message never repeats it (it may hold a password).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, ControlError> {
    let config = url.parse::<tokio_postgres::Config>().map_err(|e| {
        ControlError::Postgres(format!(
            "the database URL does not parse ({}); expected postgres://USER@HOST:PORT/DATABASE",
            describe(&e)
        ))
    })?;
    // The connection is made without TLS (no TLS stack is linked for it yet): a URL that
    // demands TLS is refused here, plainly, rather than failing at connect time with a
    // driver message.
    if !matches!(
        config.get_ssl_mode(),
        tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer
    ) {
        return Err(ControlError::Postgres(
            "the database URL asks for TLS (sslmode=require), which dryrun does not support yet: reach the control database over a private network, a Unix socket or a TLS tunnel, and drop sslmode (see docs/server.md#several-workers-on-postgresql)".into(),
        ));
    }
    Ok(config)
}

impl Postgres {
    /// The outcome of an update of a run this worker executes: none when the run is no longer
    /// this worker's (another recovered it after this one was taken for dead).
    fn owned(&self, run_id: &str, updated: u64) -> Result<(), ControlError> {
        if updated == 1 {
            Ok(())
        } else {
            Err(ControlError::Postgres(format!(
                "run {run_id} is no longer this worker's ({}): another worker recovered it after this one was taken for dead; its outcome here is not recorded",
                self.worker.id
            )))
        }
    }

    /// Connects, creates or updates the tables, and registers this worker.
    ///
    /// # Errors
    /// The URL does not parse, the database cannot be reached, or the schema cannot be made.
    pub async fn connect(
        url: &str,
        worker: Worker,
        lease_timeout: Duration,
    ) -> Result<Postgres, ControlError> {
        let mut config = parse_url(url)?;
        if config.get_application_name().is_none() {
            config.application_name("dryrun");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let mgr = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(8)
            .build()
            .map_err(|e| ControlError::Postgres(e.to_string()))?;
        let mut client = pool.get().await.map_err(|e| pool_error(&e))?;
        let tx = client.transaction().await.map_err(|e| pg(&e))?;
        // Workers starting together must not race on CREATE TABLE.
        tx.execute("SELECT pg_advisory_xact_lock(7232837362637201)", &[])
            .await
            .map_err(|e| pg(&e))?;
        tx.batch_execute(SCHEMA).await.map_err(|e| pg(&e))?;
        tx.execute(
            "INSERT INTO dryrun_workers (id, machine, host, role, started_at, seen_at) VALUES ($1, $2, $3, $4, now(), now())",
            &[&worker.id, &worker.machine, &worker.host, &worker.role],
        )
        .await
        .map_err(|e| pg(&e))?;
        tx.commit().await.map_err(|e| pg(&e))?;
        drop(client);
        let mirror = Arc::new(JournalWriter::start(config.clone(), worker.id.clone()));
        Ok(Postgres {
            pool,
            config,
            worker,
            lease_timeout,
            mirror,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, ControlError> {
        self.pool.get().await.map_err(|e| pool_error(&e))
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, ControlError> {
        let c = self.client().await?;
        let st = c.prepare_cached(sql).await.map_err(|e| pg(&e))?;
        c.query(&st, params).await.map_err(|e| pg(&e))
    }

    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, ControlError> {
        let c = self.client().await?;
        let st = c.prepare_cached(sql).await.map_err(|e| pg(&e))?;
        c.execute(&st, params).await.map_err(|e| pg(&e))
    }

    async fn get_row(
        c: &impl deadpool_postgres::GenericClient,
        run_id: &str,
    ) -> Result<Option<RunRow>, ControlError> {
        let st = c
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM dryrun_runs WHERE run_id = $1"
            ))
            .await
            .map_err(|e| pg(&e))?;
        c.query_opt(&st, &[&run_id])
            .await
            .map_err(|e| pg(&e))?
            .as_ref()
            .map(row)
            .transpose()
    }

    /// The database's view of a worker, for messages about its runs.
    async fn worker_row(&self, id: &str) -> Result<Option<Worker>, ControlError> {
        Ok(self
            .query(
                "SELECT id, machine, host, role FROM dryrun_workers WHERE id = $1",
                &[&id],
            )
            .await?
            .first()
            .map(|r| Worker {
                id: r.get(0),
                machine: r.get(1),
                host: r.get(2),
                role: r.get(3),
            }))
    }

    /// The connection settings (for tests and tools that need their own connection).
    #[must_use]
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

/// The run a delivery id or a schedule's firing already made, if any.
async fn seen(
    c: &deadpool_postgres::Object,
    dedup: Dedup<'_>,
) -> Result<Option<String>, ControlError> {
    let rows = match dedup {
        Dedup::None => return Ok(None),
        Dedup::Delivery(d) => c
            .query("SELECT run_id FROM dryrun_deliveries WHERE id = $1", &[&d])
            .await
            .map_err(|e| pg(&e))?,
        Dedup::Fire { schedule, at } => c
            .query(
                "SELECT run_id FROM dryrun_fires WHERE schedule = $1 AND fire_at = $2",
                &[&schedule, &at],
            )
            .await
            .map_err(|e| pg(&e))?,
    };
    Ok(rows.first().map(|r| r.get::<_, String>(0)))
}

#[async_trait]
impl Control for Postgres {
    fn backend(&self) -> &'static str {
        "postgresql"
    }

    fn worker(&self) -> &Worker {
        &self.worker
    }

    async fn insert(
        &self,
        r: &RunRow,
        request: Option<&str>,
        dedup: Dedup<'_>,
    ) -> Result<Inserted, ControlError> {
        let mut c = self.client().await?;
        if let Some(orig) = seen(&c, dedup).await?
            && let Some(row) = Self::get_row(&c, &orig).await?
        {
            return Ok(Inserted::Duplicate(Box::new(row)));
        }
        let tx = c.transaction().await.map_err(|e| pg(&e))?;
        let st = tx
            .prepare_cached(&format!("INSERT INTO dryrun_runs ({COLUMNS}, request) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24) ON CONFLICT (run_id) DO NOTHING"))
            .await
            .map_err(|e| pg(&e))?;
        let inserted = tx
            .execute(
                &st,
                &[
                    &r.run_id,
                    &r.blueprint,
                    &r.blueprint_path,
                    &r.provider,
                    &r.environment,
                    &trigger_name(r.trigger),
                    &r.release,
                    &r.release_version,
                    &r.status.as_str(),
                    &r.queued_at,
                    &r.started_at,
                    &r.finished_at,
                    &r.duration_ms,
                    &r.restore_ms,
                    &r.backup_id,
                    &r.backup_age_s,
                    &r.exit_code,
                    &r.left_behind,
                    &r.failure,
                    &r.delivery,
                    &r.schedule,
                    &r.callback,
                    &r.worker,
                    &request,
                ],
            )
            .await
            .map_err(|e| pg(&e))?;
        if inserted == 0 {
            return Ok(Inserted::IdTaken);
        }
        // The key's primary key decides between workers that received the same delivery (or
        // fired the same schedule) at once: the second insert waits for the first transaction
        // and then does nothing.
        let won = match dedup {
            Dedup::None => 1,
            Dedup::Delivery(d) => tx
                .execute(
                    "INSERT INTO dryrun_deliveries (id, run_id, received_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                    &[&d, &r.run_id, &r.queued_at],
                )
                .await
                .map_err(|e| pg(&e))?,
            Dedup::Fire { schedule, at } => tx
                .execute(
                    "INSERT INTO dryrun_fires (schedule, fire_at, run_id) VALUES ($1, $2, $3) ON CONFLICT (schedule, fire_at) DO NOTHING",
                    &[&schedule, &at, &r.run_id],
                )
                .await
                .map_err(|e| pg(&e))?,
        };
        if won == 0 {
            drop(tx);
            return match seen(&c, dedup).await? {
                Some(orig) => Ok(match Self::get_row(&c, &orig).await? {
                    Some(row) => Inserted::Duplicate(Box::new(row)),
                    None => Inserted::IdTaken,
                }),
                None => Ok(Inserted::IdTaken),
            };
        }
        tx.commit().await.map_err(|e| pg(&e))?;
        Ok(Inserted::New)
    }

    async fn delivery(&self, id: &str) -> Result<Option<RunRow>, ControlError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT run_id FROM dryrun_deliveries WHERE id = $1")
            .await
            .map_err(|e| pg(&e))?;
        let Some(r) = c.query_opt(&st, &[&id]).await.map_err(|e| pg(&e))? else {
            return Ok(None);
        };
        Self::get_row(&c, r.get::<_, &str>(0)).await
    }

    async fn set_status(
        &self,
        run_id: &str,
        status: RunStatus,
        failure: Option<&str>,
    ) -> Result<(), ControlError> {
        self.execute(
            "UPDATE dryrun_runs SET status = $2, failure = COALESCE($3, failure), finished_at = COALESCE(finished_at, now()) WHERE run_id = $1",
            &[&run_id, &status.as_str(), &failure],
        )
        .await?;
        Ok(())
    }

    async fn requeue(&self, run_id: &str) -> Result<bool, ControlError> {
        Ok(self
            .execute(
                "UPDATE dryrun_runs SET status = 'queued', worker = NULL, started_at = NULL, finished_at = NULL WHERE run_id = $1 AND status = 'running'",
                &[&run_id],
            )
            .await?
            == 1)
    }

    async fn finish(&self, rep: &RunReport) -> Result<(), ControlError> {
        let json = serde_json::to_string(rep).unwrap_or_default();
        let n = self.execute(
            "UPDATE dryrun_runs SET status = $2, release_version = $3, started_at = COALESCE(started_at, $4), finished_at = $5,
               duration_ms = $6, restore_ms = $7, backup_id = $8, backup_age_s = $9, exit_code = $10, left_behind = $11,
               failure = $12, report = $13 WHERE run_id = $1 AND worker = $14 AND status = 'running'",
            &[
                &rep.run_id,
                &RunStatus::of_report(rep.status).as_str(),
                &rep.release.version,
                &rep.started_at,
                &rep.finished_at,
                &i64::try_from(rep.duration_ms).unwrap_or(i64::MAX),
                &rep.restore_ms.and_then(|m| i64::try_from(m).ok()),
                &rep.backup.as_ref().map(|b| b.id.clone()),
                &rep.backup.as_ref().map(|b| b.age_seconds),
                &rep.exit_code,
                &i64::try_from(rep.left_behind.len()).unwrap_or(0),
                &rep.failure,
                &json,
                &self.worker.id,
            ],
        )
        .await?;
        self.owned(&rep.run_id, n)
    }

    async fn fail(&self, run_id: &str, text: &str) -> Result<(), ControlError> {
        let n = self
            .execute(
                "UPDATE dryrun_runs SET status = 'error', failure = $2, finished_at = now()
                 WHERE run_id = $1 AND worker = $3 AND status = 'running'",
                &[&run_id, &text, &self.worker.id],
            )
            .await?;
        self.owned(run_id, n)
    }

    async fn request(&self, run_id: &str) -> Result<Option<String>, ControlError> {
        Ok(self
            .query(
                "SELECT request FROM dryrun_runs WHERE run_id = $1",
                &[&run_id],
            )
            .await?
            .first()
            .and_then(|r| r.get(0)))
    }

    async fn set_callback(&self, run_id: &str, outcome: &str) -> Result<(), ControlError> {
        self.execute(
            "UPDATE dryrun_runs SET callback = $2 WHERE run_id = $1",
            &[&run_id, &outcome],
        )
        .await?;
        Ok(())
    }

    async fn get(&self, run_id: &str) -> Result<Option<(RunRow, Option<RunReport>)>, ControlError> {
        let rows = self
            .query(
                &format!("SELECT {COLUMNS}, report FROM dryrun_runs WHERE run_id = $1"),
                &[&run_id],
            )
            .await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let rep = match r.get::<_, Option<&str>>(23) {
            None => None,
            Some(j) => Some(
                serde_json::from_str(j).map_err(|e| ControlError::Report(run_id.to_string(), e))?,
            ),
        };
        Ok(Some((row(r)?, rep)))
    }

    async fn list(
        &self,
        status: Option<RunStatus>,
        blueprint: Option<&str>,
        n: usize,
    ) -> Result<Vec<RunRow>, ControlError> {
        self.query(
            &format!("SELECT {COLUMNS} FROM dryrun_runs WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR blueprint = $2) ORDER BY queued_at DESC, run_id DESC LIMIT $3"),
            &[&status.map(RunStatus::as_str), &blueprint, &limit(n)],
        )
        .await?
        .iter()
        .map(row)
        .collect()
    }

    async fn trend(&self, blueprint: &str, n: usize) -> Result<Vec<TrendPoint>, ControlError> {
        let mut v = self
            .query(
                "SELECT run_id, started_at, status, restore_ms, duration_ms, backup_age_s FROM dryrun_runs
                 WHERE blueprint = $1 AND started_at IS NOT NULL AND status IN ('passed', 'failed', 'error')
                 ORDER BY started_at DESC LIMIT $2",
                &[&blueprint, &limit(n)],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(TrendPoint {
                    run_id: r.get(0),
                    started_at: r.get(1),
                    status: r.get::<_, &str>(2).parse().map_err(ControlError::Damaged)?,
                    restore_ms: r.get(3),
                    duration_ms: r.get(4),
                    backup_age_s: r.get(5),
                })
            })
            .collect::<Result<Vec<_>, ControlError>>()?;
        v.reverse();
        Ok(v)
    }

    async fn blueprints(&self) -> Result<Vec<String>, ControlError> {
        Ok(self
            .query(
                "SELECT DISTINCT blueprint FROM dryrun_runs ORDER BY blueprint",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn count(&self) -> Result<i64, ControlError> {
        Ok(self
            .query("SELECT count(*) FROM dryrun_runs", &[])
            .await?
            .first()
            .map_or(0, |r| r.get(0)))
    }

    async fn queued(&self) -> Result<i64, ControlError> {
        Ok(self
            .query(
                "SELECT count(*) FROM dryrun_runs WHERE status = 'queued'",
                &[],
            )
            .await?
            .first()
            .map_or(0, |r| r.get(0)))
    }

    async fn prune(
        &self,
        before: DateTime<Utc>,
        keep: &(dyn for<'a> Fn(&'a str) -> bool + Sync),
    ) -> Result<Vec<String>, ControlError> {
        // `keep` looks at this machine's state directory only. A run from another machine
        // (or one whose worker row is gone) is judged by its row: one that was interrupted
        // or left something behind stays until its own machine prunes it, where its journal
        // says whether anything remains.
        let ids: Vec<String> = self
            .query(
                "SELECT r.run_id, (w.machine IS NOT DISTINCT FROM $2) AS mine,
                        (r.status = 'interrupted' OR COALESCE(r.left_behind, 0) > 0) AS unsettled,
                        (r.worker IS NULL) AS never_ran
                 FROM dryrun_runs r LEFT JOIN dryrun_workers w ON w.id = r.worker
                 WHERE r.status NOT IN ('queued', 'running') AND COALESCE(r.finished_at, r.queued_at) < $1",
                &[&before, &self.worker.machine],
            )
            .await?
            .iter()
            .filter(|r| {
                let id: String = r.get(0);
                let (mine, unsettled, never_ran): (bool, bool, bool) =
                    (r.get(1), r.get(2), r.get(3));
                if mine || never_ran {
                    !keep(&id)
                } else {
                    !unsettled
                }
            })
            .map(|r| r.get::<_, String>(0))
            .collect();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg(&e))?;
        for sql in [
            "DELETE FROM dryrun_runs WHERE run_id = ANY($1)",
            "DELETE FROM dryrun_deliveries WHERE run_id = ANY($1)",
            "DELETE FROM dryrun_fires WHERE run_id = ANY($1)",
            "DELETE FROM dryrun_journal WHERE run_id = ANY($1)",
        ] {
            tx.execute(sql, &[&ids]).await.map_err(|e| pg(&e))?;
        }
        tx.execute(
            "DELETE FROM dryrun_outbox WHERE done_at IS NOT NULL AND done_at < $1",
            &[&before],
        )
        .await
        .map_err(|e| pg(&e))?;
        tx.execute(
            "DELETE FROM dryrun_workers w WHERE stopped_at < $1 AND NOT EXISTS (SELECT 1 FROM dryrun_leases l WHERE l.worker = w.id)",
            &[&before],
        )
        .await
        .map_err(|e| pg(&e))?;
        tx.commit().await.map_err(|e| pg(&e))?;
        Ok(ids)
    }

    async fn outbox_add(
        &self,
        run_id: &str,
        kind: OutboxKind,
        url: Option<&str>,
        body: &str,
    ) -> Result<i64, ControlError> {
        Ok(self
            .query(
                "INSERT INTO dryrun_outbox (run_id, kind, url, body, next_at, created_at) VALUES ($1, $2, $3, $4, now(), now()) RETURNING id",
                &[&run_id, &kind.as_str(), &url, &body],
            )
            .await?
            .first()
            .map_or(0, |r| r.get(0)))
    }

    async fn outbox_claim(
        &self,
        n: usize,
        hold: Duration,
    ) -> Result<Vec<OutboxItem>, ControlError> {
        let hold_s = hold.as_secs_f64();
        let mut v: Vec<OutboxItem> = self
            .query(
                "UPDATE dryrun_outbox SET next_at = now() + make_interval(secs => $2) WHERE id IN (
                   SELECT id FROM dryrun_outbox WHERE done_at IS NULL AND next_at <= now()
                   ORDER BY next_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, run_id, kind, url, body, attempts",
                &[&limit(n), &hold_s],
            )
            .await?
            .iter()
            .map(|r| OutboxItem {
                id: r.get(0),
                run_id: r.get(1),
                kind: OutboxKind::parse(r.get(2)),
                url: r.get(3),
                body: r.get(4),
                attempts: u32::try_from(r.get::<_, i32>(5)).unwrap_or(0),
            })
            .collect();
        v.sort_by_key(|i| i.id);
        Ok(v)
    }

    async fn outbox_next(&self) -> Result<Option<DateTime<Utc>>, ControlError> {
        Ok(self
            .query(
                "SELECT min(next_at) FROM dryrun_outbox WHERE done_at IS NULL",
                &[],
            )
            .await?
            .first()
            .and_then(|r| r.get(0)))
    }

    async fn outbox_retry(
        &self,
        id: i64,
        attempts: u32,
        next_at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), ControlError> {
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        self.execute(
            "UPDATE dryrun_outbox SET attempts = $2, next_at = $3, last_error = $4 WHERE id = $1",
            &[&id, &attempts, &next_at, &error],
        )
        .await?;
        Ok(())
    }

    async fn outbox_done(&self, id: i64, attempts: u32, outcome: &str) -> Result<(), ControlError> {
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        self.execute(
            "UPDATE dryrun_outbox SET attempts = $2, done_at = now(), outcome = $3 WHERE id = $1",
            &[&id, &attempts, &outcome],
        )
        .await?;
        Ok(())
    }

    async fn outbox_pending(&self) -> Result<i64, ControlError> {
        Ok(self
            .query(
                "SELECT count(*) FROM dryrun_outbox WHERE done_at IS NULL",
                &[],
            )
            .await?
            .first()
            .map_or(0, |r| r.get(0)))
    }

    async fn claim(&self) -> Result<Option<Claimed>, ControlError> {
        let mut c = self.client().await?;
        // A lost race for an environment's lease (another worker claimed a run of it at the
        // same moment) is tried again; the loser then sees the lease and moves on.
        for _ in 0..4 {
            let tx = c.transaction().await.map_err(|e| pg(&e))?;
            // The oldest queued run of each environment that has one (a loose index scan
            // over the queue index: one probe per environment, however long the queue), of
            // those the oldest whose environment is free.
            let head = tx
                .prepare_cached(
                    "WITH RECURSIVE envs(environment) AS (
                       (SELECT environment FROM dryrun_runs WHERE status = 'queued' ORDER BY environment LIMIT 1)
                       UNION ALL
                       SELECT (SELECT r.environment FROM dryrun_runs r WHERE r.status = 'queued'
                                 AND r.environment > e.environment ORDER BY r.environment LIMIT 1)
                       FROM envs e WHERE e.environment IS NOT NULL)
                     SELECT h.run_id, h.environment FROM envs e
                     CROSS JOIN LATERAL (
                       SELECT r.run_id, r.environment, r.queued_at FROM dryrun_runs r
                       WHERE r.status = 'queued' AND r.environment = e.environment
                       ORDER BY r.queued_at, r.run_id LIMIT 1) h
                     WHERE e.environment IS NOT NULL
                       AND NOT EXISTS (SELECT 1 FROM dryrun_leases l WHERE l.environment = e.environment)
                     ORDER BY h.queued_at, h.run_id
                     LIMIT 1",
                )
                .await
                .map_err(|e| pg(&e))?;
            let Some(h) = tx.query_opt(&head, &[]).await.map_err(|e| pg(&e))? else {
                return Ok(None);
            };
            // Another worker may be taking the same run: whoever locks it first has it (a
            // run that is no longer queued when the lock is granted is skipped too).
            let locked = tx
                .query_opt(
                    "SELECT 1 FROM dryrun_runs WHERE run_id = $1 AND status = 'queued' FOR UPDATE SKIP LOCKED",
                    &[&h.get::<_, String>(0)],
                )
                .await
                .map_err(|e| pg(&e))?;
            if locked.is_none() {
                drop(tx);
                continue;
            }
            let (run_id, env): (String, String) = (h.get(0), h.get(1));
            let took = tx
                .execute(
                    "INSERT INTO dryrun_leases (environment, run_id, worker, acquired_at) VALUES ($1, $2, $3, now()) ON CONFLICT (environment) DO NOTHING",
                    &[&env, &run_id, &self.worker.id],
                )
                .await
                .map_err(|e| pg(&e))?;
            if took == 0 {
                drop(tx);
                continue;
            }
            let claimed = tx
                .query_one(
                    &format!("UPDATE dryrun_runs SET status = 'running', started_at = now(), worker = $2 WHERE run_id = $1 RETURNING {COLUMNS}, request"),
                    &[&run_id, &self.worker.id],
                )
                .await
                .map_err(|e| pg(&e))?;
            tx.commit().await.map_err(|e| pg(&e))?;
            return Ok(Some(Claimed {
                row: row(&claimed)?,
                request: claimed.get(23),
                lease: Lease {
                    environment: env,
                    run_id,
                    held: Held::Row,
                },
            }));
        }
        Ok(None)
    }

    async fn lease(
        &self,
        environment: &str,
        run_id: &str,
        cancel: &CancellationToken,
        on_wait: &mut (dyn FnMut(Option<String>) + Send),
    ) -> Result<Lease, ControlError> {
        let mut told = false;
        loop {
            let took = self
                .execute(
                    "INSERT INTO dryrun_leases (environment, run_id, worker, acquired_at) VALUES ($1, $2, $3, now()) ON CONFLICT (environment) DO NOTHING",
                    &[&environment, &run_id, &self.worker.id],
                )
                .await?;
            if took == 1 {
                return Ok(Lease {
                    environment: environment.to_string(),
                    run_id: run_id.to_string(),
                    held: Held::Row,
                });
            }
            if !told {
                let holder = self
                    .query(
                        "SELECT run_id FROM dryrun_leases WHERE environment = $1",
                        &[&environment],
                    )
                    .await?
                    .first()
                    .map(|r| r.get(0));
                on_wait(holder);
                told = true;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = cancel.cancelled() => return Err(ControlError::Cancelled(environment.to_string())),
            }
        }
    }

    async fn release(&self, lease: Lease) {
        // Retried briefly: a lease left behind holds its environment until this worker stops
        // and another one recovers it.
        for attempt in 0..5 {
            match self
                .execute(
                    "DELETE FROM dryrun_leases WHERE environment = $1 AND run_id = $2",
                    &[&lease.environment, &lease.run_id],
                )
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(environment = %lease.environment, error = %e, attempt, "could not release the environment lease");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }

    async fn heartbeat(&self) -> Result<(), ControlError> {
        let n = self
            .execute(
                "UPDATE dryrun_workers SET seen_at = now() WHERE id = $1 AND stopped_at IS NULL",
                &[&self.worker.id],
            )
            .await?;
        if n == 0 {
            return Err(ControlError::TakenForDead {
                worker: self.worker.id.clone(),
                silent: humantime::format_duration(self.lease_timeout).to_string(),
            });
        }
        Ok(())
    }

    async fn stopped(&self) {
        let _ = self
            .execute(
                "UPDATE dryrun_workers SET stopped_at = now(), stopped_by = 'itself' WHERE id = $1 AND stopped_at IS NULL",
                &[&self.worker.id],
            )
            .await;
    }

    async fn orphans(&self, _at_start: bool) -> Result<Vec<Orphan>, ControlError> {
        let timeout = self.lease_timeout.as_secs_f64();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg(&e))?;
        // Workers silent for longer than the timeout are stopped (by us), then every lease of a
        // stopped worker becomes ours — in one transaction: concurrent reapers wait on the row
        // locks, then find the leases no longer match.
        tx.execute(
            "UPDATE dryrun_workers SET stopped_at = now(), stopped_by = $1
             WHERE stopped_at IS NULL AND id <> $1 AND seen_at < now() - make_interval(secs => $2)",
            &[&self.worker.id, &timeout],
        )
        .await
        .map_err(|e| pg(&e))?;
        let adopted = tx
            .query(
                "UPDATE dryrun_leases l SET worker = $1, adopted_at = now()
                 FROM dryrun_workers w
                 WHERE l.worker = w.id AND w.stopped_at IS NOT NULL AND w.id <> $1
                 RETURNING l.environment, l.run_id, w.id, w.machine, w.host, w.role",
                &[&self.worker.id],
            )
            .await
            .map_err(|e| pg(&e))?;
        tx.commit().await.map_err(|e| pg(&e))?;
        let mut out = Vec::new();
        for a in adopted {
            let (environment, run_id): (String, String) = (a.get(0), a.get(1));
            let lease = Lease {
                environment,
                run_id: run_id.clone(),
                held: Held::Row,
            };
            let worker = Worker {
                id: a.get(2),
                machine: a.get(3),
                host: a.get(4),
                role: a.get(5),
            };
            match Self::get_row(&c, &run_id).await? {
                Some(row) => out.push(Orphan {
                    row,
                    worker: Some(worker),
                    lease: Some(lease),
                }),
                // A lease without a run (the CLI died between the two): nothing to recover.
                None => self.release(lease).await,
            }
        }
        Ok(out)
    }

    async fn journal(&self, run_id: &str) -> Result<Vec<String>, ControlError> {
        Ok(self
            .query(
                "SELECT entry FROM dryrun_journal WHERE run_id = $1 ORDER BY id",
                &[&run_id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn journal_mirror(&self) -> Option<Arc<dyn crate::journal::Mirror>> {
        Some(self.mirror.clone())
    }
}

impl Postgres {
    /// Who a worker id is, for messages (`None` if unknown).
    ///
    /// # Errors
    /// Database errors.
    pub async fn describe_worker(&self, id: &str) -> Result<Option<Worker>, ControlError> {
        self.worker_row(id).await
    }
}

type Job = (
    String,
    String,
    std::sync::mpsc::SyncSender<Result<(), String>>,
);

/// Writes journal entries to `dryrun_journal` from a thread of its own, with its own
/// connection: the journal's `append` is synchronous (it runs before the step it announces, in
/// any runtime), so it hands the entry over and waits for the insert to commit.
///
/// The insert is also the fence between workers: it is made only while the run's row says
/// `running` on this worker. A worker that was taken for dead (frozen, cut off) and whose run
/// another worker has recovered or claimed again cannot journal — so cannot take — one more
/// step of it; teardown, which ignores journal errors, still removes what it had made.
#[derive(Debug)]
struct JournalWriter {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
}

impl JournalWriter {
    fn start(config: tokio_postgres::Config, worker: String) -> JournalWriter {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("dryrun-journal-pg".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let mut client: Option<tokio_postgres::Client> = None;
                while let Ok((run_id, line, reply)) = rx.recv() {
                    let result = rt.block_on(async {
                        // One reconnect per entry: a database restart costs one retry.
                        for _ in 0..2 {
                            if client.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
                                match config.connect(tokio_postgres::NoTls).await {
                                    Ok((c, conn)) => {
                                        tokio::spawn(conn);
                                        client = Some(c);
                                    }
                                    Err(e) => return Err(describe(&e)),
                                }
                            }
                            let Some(c) = client.as_ref() else { continue };
                            match c
                                .execute(
                                    "INSERT INTO dryrun_journal (run_id, entry) SELECT $1, $2
                                     WHERE EXISTS (SELECT 1 FROM dryrun_runs
                                       WHERE run_id = $1 AND worker = $3 AND status = 'running')",
                                    &[&run_id, &line, &worker],
                                )
                                .await
                            {
                                Ok(1) => return Ok(()),
                                Ok(_) => {
                                    return Err(format!(
                                        "run {run_id} is no longer this worker's ({worker}): another worker recovered it after this one was taken for dead"
                                    ));
                                }
                                Err(e) if c.is_closed() => {
                                    tracing::warn!(error = %describe(&e), "journal connection lost; reconnecting");
                                    client = None;
                                }
                                Err(e) => return Err(describe(&e)),
                            }
                        }
                        Err("the connection to the control database keeps closing".into())
                    });
                    let _ = reply.send(result);
                }
            })
            .ok();
        JournalWriter {
            jobs: std::sync::Mutex::new(tx),
        }
    }
}

impl crate::journal::Mirror for JournalWriter {
    fn append(&self, run_id: &str, line: &str) -> Result<(), String> {
        let (reply, wait) = std::sync::mpsc::sync_channel(1);
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send((run_id.to_string(), line.to_string(), reply))
            .map_err(|_| "the journal writer has stopped".to_string())?;
        wait.recv()
            .map_err(|_| "the journal writer has stopped".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_parse_without_repeating_the_password_and_tls_is_refused_plainly() {
        assert!(parse_url("postgres://dryrun:pw@127.0.0.1:5432/dryrun").is_ok());
        assert!(parse_url("postgres://dryrun:pw@127.0.0.1:5432/dryrun?sslmode=prefer").is_ok());
        let e = parse_url("postgres://dryrun:s3cret-pw@db.internal/dryrun?sslmode=require")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=require") && e.contains("TLS"), "{e}");
        assert!(!e.contains("s3cret-pw"));
        let e = parse_url("postgres://dryrun:s3cret-pw@db.internal:notaport/dryrun")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not parse"), "{e}");
        assert!(!e.contains("s3cret-pw"), "{e}");
    }
}
