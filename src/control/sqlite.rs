//! The embedded control plane: SQLite in `STATE/history.sqlite` (WAL mode, so readers never
//! wait for the writer) and `flock` leases in `STATE/leases` ([`crate::lease`]), for the CLI and
//! one `dryrun serve` on one machine. Journals stay files.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, params};
use tokio_util::sync::CancellationToken;

use super::{
    Claimed, Control, ControlError, Dedup, Held, Inserted, Lease, Orphan, OutboxItem, OutboxKind,
    RunRow, RunStatus, TrendPoint, Worker, parse_trigger, trigger_name,
};
use crate::report::RunReport;
use crate::state::StateDir;

/// The SQLite control plane.
#[derive(Debug)]
pub struct Sqlite {
    conn: Mutex<Connection>,
    state: StateDir,
    worker: Worker,
}

const COLUMNS: &str = "run_id, blueprint, blueprint_path, provider, environment, trigger, release, release_version, status, queued_at, started_at, finished_at, duration_ms, restore_ms, backup_id, backup_age_s, exit_code, left_behind, failure, delivery, schedule, callback, worker";

fn conversion(col: usize, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, Type::Text, e.to_string().into())
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let trigger: String = r.get(5)?;
    let status: String = r.get(8)?;
    Ok(RunRow {
        run_id: r.get(0)?,
        blueprint: r.get(1)?,
        blueprint_path: r.get(2)?,
        provider: r.get(3)?,
        environment: r.get(4)?,
        trigger: parse_trigger(&trigger).map_err(|e| conversion(5, e))?,
        release: r.get(6)?,
        release_version: r.get(7)?,
        status: status.parse().map_err(|e| conversion(8, e))?,
        queued_at: r.get(9)?,
        started_at: r.get(10)?,
        finished_at: r.get(11)?,
        duration_ms: r.get(12)?,
        restore_ms: r.get(13)?,
        backup_id: r.get(14)?,
        backup_age_s: r.get(15)?,
        exit_code: r.get(16)?,
        left_behind: r.get(17)?,
        failure: r.get(18)?,
        delivery: r.get(19)?,
        schedule: r.get(20)?,
        callback: r.get(21)?,
        worker: r.get(22)?,
    })
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Sqlite {
    /// Opens (creating) `STATE/history.sqlite`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn open(state: &StateDir, worker: Worker) -> Result<Sqlite, ControlError> {
        let conn = open_file(&state.root().join("history.sqlite"))?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            state: state.clone(),
            worker,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get_row(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<RunRow>> {
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM runs WHERE run_id = ?1"),
            [run_id],
            row,
        )
        .optional()
    }
}

/// Opens the database file, creating it owner-only, and brings its schema up to date.
fn open_file(path: &Path) -> Result<Connection, ControlError> {
    if let Some(p) = path.parent() {
        let _ = crate::state::create_private_dir(p);
    }
    // Created owner-only before SQLite opens it; SQLite gives its -wal and -shm files the
    // database file's mode.
    if !path.exists() {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
    }
    // Switching a new database to WAL takes an exclusive lock that SQLite does not wait for:
    // processes opening it at the same moment (a CLI run as the server starts) retry.
    let mut tries = 0;
    loop {
        match open_once(path) {
            Err(ControlError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 100 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn open_once(path: &Path) -> Result<Connection, ControlError> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS runs (
           run_id TEXT PRIMARY KEY, blueprint TEXT NOT NULL, blueprint_path TEXT NOT NULL,
           provider TEXT NOT NULL, environment TEXT NOT NULL, trigger TEXT NOT NULL,
           release TEXT NOT NULL, release_version TEXT, status TEXT NOT NULL,
           queued_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, duration_ms INTEGER,
           restore_ms INTEGER, backup_id TEXT, backup_age_s INTEGER, exit_code INTEGER,
           left_behind INTEGER, failure TEXT, delivery TEXT, schedule TEXT, callback TEXT,
           report TEXT);
         CREATE INDEX IF NOT EXISTS runs_by_time ON runs(queued_at);
         CREATE INDEX IF NOT EXISTS runs_by_blueprint ON runs(blueprint, queued_at);
         CREATE TABLE IF NOT EXISTS deliveries (
           id TEXT PRIMARY KEY, run_id TEXT NOT NULL, received_at TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS fires (
           schedule TEXT NOT NULL, fire_at TEXT NOT NULL, run_id TEXT NOT NULL,
           PRIMARY KEY (schedule, fire_at));
         CREATE TABLE IF NOT EXISTS outbox (
           id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, kind TEXT NOT NULL,
           url TEXT, body TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
           next_at TEXT NOT NULL, created_at TEXT NOT NULL, last_error TEXT,
           done_at TEXT, outcome TEXT);
         CREATE INDEX IF NOT EXISTS outbox_due ON outbox(done_at, next_at);",
    )?;
    // Columns added after the first release: the request a queued run was accepted with, the
    // worker that runs it. Checked and added in one immediate transaction: a CLI run and the
    // server may open the database at the same moment.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for (col, ty) in [("request", "TEXT"), ("worker", "TEXT")] {
        let has: bool = tx
            .prepare("SELECT 1 FROM pragma_table_info('runs') WHERE name = ?1")?
            .exists([col])?;
        if !has {
            tx.execute_batch(&format!("ALTER TABLE runs ADD COLUMN {col} {ty}"))?;
        }
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS runs_queue ON runs(status, environment, queued_at)",
    )?;
    tx.commit()?;
    Ok(conn)
}

#[async_trait]
impl Control for Sqlite {
    fn backend(&self) -> &'static str {
        "sqlite"
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
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let seen: Option<String> = match dedup {
            Dedup::None => None,
            Dedup::Delivery(d) => tx
                .query_row("SELECT run_id FROM deliveries WHERE id = ?1", [d], |x| {
                    x.get(0)
                })
                .optional()?,
            Dedup::Fire { schedule, at } => tx
                .query_row(
                    "SELECT run_id FROM fires WHERE schedule = ?1 AND fire_at = ?2",
                    params![schedule, at],
                    |x| x.get(0),
                )
                .optional()?,
        };
        if let Some(run_id) = seen
            && let Some(orig) = Self::get_row(&tx, &run_id)?
        {
            return Ok(Inserted::Duplicate(Box::new(orig)));
        }
        let inserted = tx.execute(
            &format!("INSERT INTO runs ({COLUMNS}, request) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24) ON CONFLICT (run_id) DO NOTHING"),
            params![
                r.run_id, r.blueprint, r.blueprint_path, r.provider, r.environment, trigger_name(r.trigger), r.release, r.release_version, r.status.as_str(),
                r.queued_at, r.started_at, r.finished_at, r.duration_ms, r.restore_ms, r.backup_id, r.backup_age_s, r.exit_code,
                r.left_behind, r.failure, r.delivery, r.schedule, r.callback, r.worker, request
            ],
        )?;
        if inserted == 0 {
            // The transaction is dropped: the delivery id is not recorded either.
            return Ok(Inserted::IdTaken);
        }
        match dedup {
            Dedup::None => {}
            Dedup::Delivery(d) => {
                tx.execute(
                    "INSERT OR REPLACE INTO deliveries (id, run_id, received_at) VALUES (?1, ?2, ?3)",
                    params![d, r.run_id, r.queued_at],
                )?;
            }
            Dedup::Fire { schedule, at } => {
                tx.execute(
                    "INSERT OR REPLACE INTO fires (schedule, fire_at, run_id) VALUES (?1, ?2, ?3)",
                    params![schedule, at, r.run_id],
                )?;
            }
        }
        tx.commit()?;
        Ok(Inserted::New)
    }

    async fn delivery(&self, id: &str) -> Result<Option<RunRow>, ControlError> {
        let conn = self.conn();
        let run_id: Option<String> = conn
            .query_row("SELECT run_id FROM deliveries WHERE id = ?1", [id], |x| {
                x.get(0)
            })
            .optional()?;
        match run_id {
            None => Ok(None),
            Some(r) => Ok(Self::get_row(&conn, &r)?),
        }
    }

    async fn set_status(
        &self,
        run_id: &str,
        status: RunStatus,
        failure: Option<&str>,
    ) -> Result<(), ControlError> {
        self.conn().execute(
            "UPDATE runs SET status = ?2, failure = COALESCE(?3, failure), finished_at = COALESCE(finished_at, ?4) WHERE run_id = ?1",
            params![run_id, status.as_str(), failure, Utc::now()],
        )?;
        Ok(())
    }

    async fn fail(&self, run_id: &str, text: &str) -> Result<(), ControlError> {
        self.set_status(run_id, RunStatus::Error, Some(text)).await
    }

    async fn requeue(&self, run_id: &str) -> Result<bool, ControlError> {
        Ok(self.conn().execute(
            "UPDATE runs SET status = 'queued', worker = NULL, started_at = NULL, finished_at = NULL WHERE run_id = ?1 AND status = 'running'",
            params![run_id],
        )? == 1)
    }

    async fn finish(&self, rep: &RunReport) -> Result<(), ControlError> {
        let json = serde_json::to_string(rep).unwrap_or_default();
        self.conn().execute(
            "UPDATE runs SET status = ?2, release_version = ?3, started_at = COALESCE(started_at, ?4), finished_at = ?5,
               duration_ms = ?6, restore_ms = ?7, backup_id = ?8, backup_age_s = ?9, exit_code = ?10, left_behind = ?11,
               failure = ?12, report = ?13 WHERE run_id = ?1",
            params![
                rep.run_id,
                RunStatus::of_report(rep.status).as_str(),
                rep.release.version,
                rep.started_at,
                rep.finished_at,
                i64::try_from(rep.duration_ms).unwrap_or(i64::MAX),
                rep.restore_ms.and_then(|m| i64::try_from(m).ok()),
                rep.backup.as_ref().map(|b| b.id.clone()),
                rep.backup.as_ref().map(|b| b.age_seconds),
                rep.exit_code,
                i64::try_from(rep.left_behind.len()).unwrap_or(0),
                rep.failure,
                json
            ],
        )?;
        Ok(())
    }

    async fn request(&self, run_id: &str) -> Result<Option<String>, ControlError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT request FROM runs WHERE run_id = ?1",
                [run_id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    async fn set_callback(&self, run_id: &str, outcome: &str) -> Result<(), ControlError> {
        self.conn().execute(
            "UPDATE runs SET callback = ?2 WHERE run_id = ?1",
            params![run_id, outcome],
        )?;
        Ok(())
    }

    async fn get(&self, run_id: &str) -> Result<Option<(RunRow, Option<RunReport>)>, ControlError> {
        let conn = self.conn();
        let found = conn
            .query_row(
                &format!("SELECT {COLUMNS}, report FROM runs WHERE run_id = ?1"),
                [run_id],
                |r| Ok((row(r)?, r.get::<_, Option<String>>(23)?)),
            )
            .optional()?;
        match found {
            None => Ok(None),
            Some((row, None)) => Ok(Some((row, None))),
            Some((row, Some(j))) => {
                let rep = serde_json::from_str(&j)
                    .map_err(|e| ControlError::Report(run_id.to_string(), e))?;
                Ok(Some((row, Some(rep))))
            }
        }
    }

    async fn list(
        &self,
        status: Option<RunStatus>,
        blueprint: Option<&str>,
        n: usize,
    ) -> Result<Vec<RunRow>, ControlError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM runs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR blueprint = ?2) ORDER BY queued_at DESC, run_id DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![status.map(RunStatus::as_str), blueprint, limit(n)],
            row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    async fn trend(&self, blueprint: &str, n: usize) -> Result<Vec<TrendPoint>, ControlError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT run_id, started_at, status, restore_ms, duration_ms, backup_age_s FROM runs
             WHERE blueprint = ?1 AND started_at IS NOT NULL AND status IN ('passed', 'failed', 'error')
             ORDER BY started_at DESC LIMIT ?2",
        )?;
        let mut v: Vec<TrendPoint> = stmt
            .query_map(params![blueprint, limit(n)], |r| {
                let status: String = r.get(2)?;
                Ok(TrendPoint {
                    run_id: r.get(0)?,
                    started_at: r.get(1)?,
                    status: status.parse().map_err(|e| conversion(2, e))?,
                    restore_ms: r.get(3)?,
                    duration_ms: r.get(4)?,
                    backup_age_s: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

    async fn blueprints(&self) -> Result<Vec<String>, ControlError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT DISTINCT blueprint FROM runs ORDER BY blueprint")?;
        let v = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(v)
    }

    async fn count(&self) -> Result<i64, ControlError> {
        Ok(self
            .conn()
            .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))?)
    }

    async fn queued(&self) -> Result<i64, ControlError> {
        Ok(self.conn().query_row(
            "SELECT count(*) FROM runs WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?)
    }

    async fn prune(
        &self,
        before: DateTime<Utc>,
        keep: &(dyn for<'a> Fn(&'a str) -> bool + Sync),
    ) -> Result<Vec<String>, ControlError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let ids: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT run_id FROM runs WHERE status NOT IN ('queued', 'running') AND COALESCE(finished_at, queued_at) < ?1",
            )?;
            st.query_map(params![before], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|id| !keep(id))
                .collect()
        };
        for id in &ids {
            tx.execute("DELETE FROM runs WHERE run_id = ?1", params![id])?;
            tx.execute("DELETE FROM deliveries WHERE run_id = ?1", params![id])?;
            tx.execute("DELETE FROM fires WHERE run_id = ?1", params![id])?;
        }
        tx.execute(
            "DELETE FROM outbox WHERE done_at IS NOT NULL AND done_at < ?1",
            params![before],
        )?;
        tx.commit()?;
        Ok(ids)
    }

    async fn outbox_add(
        &self,
        run_id: &str,
        kind: OutboxKind,
        url: Option<&str>,
        body: &str,
    ) -> Result<i64, ControlError> {
        let now = Utc::now();
        let conn = self.conn();
        conn.execute(
            "INSERT INTO outbox (run_id, kind, url, body, next_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![run_id, kind.as_str(), url, body, now],
        )?;
        Ok(conn.last_insert_rowid())
    }

    async fn outbox_claim(
        &self,
        n: usize,
        hold: Duration,
    ) -> Result<Vec<OutboxItem>, ControlError> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::MAX);
        let conn = self.conn();
        let mut st = conn.prepare(
            "UPDATE outbox SET next_at = ?3 WHERE id IN (
               SELECT id FROM outbox WHERE done_at IS NULL AND next_at <= ?1 ORDER BY next_at, id LIMIT ?2)
             RETURNING id, run_id, kind, url, body, attempts",
        )?;
        let mut v: Vec<OutboxItem> = st
            .query_map(params![now, limit(n), until], |r| {
                let kind: String = r.get(2)?;
                Ok(OutboxItem {
                    id: r.get(0)?,
                    run_id: r.get(1)?,
                    kind: OutboxKind::parse(&kind),
                    url: r.get(3)?,
                    body: r.get(4)?,
                    attempts: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        v.sort_by_key(|i| i.id);
        Ok(v)
    }

    async fn outbox_next(&self) -> Result<Option<DateTime<Utc>>, ControlError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT min(next_at) FROM outbox WHERE done_at IS NULL",
                [],
                |r| r.get::<_, Option<DateTime<Utc>>>(0),
            )
            .optional()?
            .flatten())
    }

    async fn outbox_retry(
        &self,
        id: i64,
        attempts: u32,
        next_at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), ControlError> {
        self.conn().execute(
            "UPDATE outbox SET attempts = ?2, next_at = ?3, last_error = ?4 WHERE id = ?1",
            params![id, attempts, next_at, error],
        )?;
        Ok(())
    }

    async fn outbox_done(&self, id: i64, attempts: u32, outcome: &str) -> Result<(), ControlError> {
        self.conn().execute(
            "UPDATE outbox SET attempts = ?2, done_at = ?3, outcome = ?4 WHERE id = ?1",
            params![id, attempts, Utc::now(), outcome],
        )?;
        Ok(())
    }

    async fn outbox_pending(&self) -> Result<i64, ControlError> {
        Ok(self.conn().query_row(
            "SELECT count(*) FROM outbox WHERE done_at IS NULL",
            [],
            |r| r.get(0),
        )?)
    }

    async fn claim(&self) -> Result<Option<Claimed>, ControlError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // The oldest queued run of each environment, oldest first.
        let heads: Vec<(String, String)> = {
            let mut st = tx.prepare(
                "SELECT run_id, environment FROM runs r WHERE status = 'queued'
                   AND NOT EXISTS (SELECT 1 FROM runs o WHERE o.environment = r.environment
                     AND o.status = 'queued' AND (o.queued_at < r.queued_at
                       OR (o.queued_at = r.queued_at AND o.run_id < r.run_id)))
                 ORDER BY queued_at, run_id LIMIT 64",
            )?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        for (run_id, env) in heads {
            // The file lease is shared with CLI runs on this state directory; one that holds
            // it keeps the environment's queue waiting.
            let Some(file) = crate::lease::try_acquire(&self.state, &env)? else {
                continue;
            };
            let mut file = file;
            file.set_holder(&run_id);
            let n = tx.execute(
                "UPDATE runs SET status = 'running', started_at = ?2, worker = ?3 WHERE run_id = ?1 AND status = 'queued'",
                params![run_id, Utc::now(), self.worker.id],
            )?;
            if n == 0 {
                continue;
            }
            let request: Option<String> = tx.query_row(
                "SELECT request FROM runs WHERE run_id = ?1",
                [&run_id],
                |r| r.get(0),
            )?;
            let row = Self::get_row(&tx, &run_id)?
                .ok_or_else(|| ControlError::Damaged(format!("run {run_id} vanished")))?;
            tx.commit()?;
            return Ok(Some(Claimed {
                row,
                request,
                lease: Lease {
                    environment: env,
                    run_id,
                    held: Held::File(file),
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
        let mut file = crate::lease::acquire(&self.state, environment, cancel, on_wait)
            .await
            .map_err(|e| match e {
                crate::lease::LeaseError::Cancelled(env) => ControlError::Cancelled(env),
                other => ControlError::Lease(other),
            })?;
        file.set_holder(run_id);
        Ok(Lease {
            environment: environment.to_string(),
            run_id: run_id.to_string(),
            held: Held::File(file),
        })
    }

    async fn release(&self, lease: Lease) {
        drop(lease);
    }

    async fn heartbeat(&self) -> Result<(), ControlError> {
        Ok(())
    }

    async fn stopped(&self) {}

    async fn orphans(&self, at_start: bool) -> Result<Vec<Orphan>, ControlError> {
        if !at_start {
            return Ok(Vec::new());
        }
        Ok(self
            .list(Some(RunStatus::Running), None, usize::MAX)
            .await?
            .into_iter()
            .map(|row| Orphan {
                row,
                worker: None,
                lease: None,
            })
            .collect())
    }

    async fn journal(&self, _run_id: &str) -> Result<Vec<String>, ControlError> {
        Ok(Vec::new())
    }

    fn journal_mirror(&self) -> Option<Arc<dyn crate::journal::Mirror>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Trigger;

    fn worker(state: &StateDir) -> Worker {
        Worker::this_process(state, "test").unwrap()
    }

    fn queued(id: &str, env_blueprint: &str) -> RunRow {
        RunRow::queued(
            id,
            env_blueprint,
            "demo/shop.yaml",
            "local",
            Trigger::Webhook,
            "r",
        )
    }

    #[tokio::test]
    async fn a_delivery_id_or_a_firing_starts_one_run_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let h = Sqlite::open(&state, worker(&state)).unwrap();
        let d = Dedup::Delivery("d1");
        assert_eq!(
            h.insert(&queued("r1", "shop"), None, d).await.unwrap(),
            Inserted::New
        );
        let at = Utc::now();
        let fire = Dedup::Fire {
            schedule: "nightly",
            at,
        };
        assert_eq!(
            h.insert(&queued("f1", "shop"), None, fire).await.unwrap(),
            Inserted::New
        );
        drop(h);
        let h = Sqlite::open(&state, worker(&state)).unwrap();
        match h.insert(&queued("r2", "shop"), None, d).await.unwrap() {
            Inserted::Duplicate(orig) => assert_eq!(orig.run_id, "r1"),
            other => panic!("duplicate delivery answered {other:?}"),
        }
        match h.insert(&queued("f2", "shop"), None, fire).await.unwrap() {
            Inserted::Duplicate(orig) => assert_eq!(orig.run_id, "f1"),
            other => panic!("second firing answered {other:?}"),
        }
        assert_eq!(h.count().await.unwrap(), 2);
        assert_eq!(h.delivery("d1").await.unwrap().unwrap().run_id, "r1");
    }

    #[test]
    fn thousands_of_runs_in_the_same_second_never_share_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        // Four "processes" (own connections), a thousand runs each, same blueprint and second,
        // each with its own delivery id.
        let ids: Vec<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    let state = &state;
                    s.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        let h = Sqlite::open(state, worker(state)).unwrap();
                        rt.block_on(async {
                            let mut out = Vec::new();
                            for i in 0..1000 {
                                let d = format!("d-{w}-{i}");
                                loop {
                                    let id = crate::engine::new_run_id("shop");
                                    match h
                                        .insert(&queued(&id, "shop"), None, Dedup::Delivery(&d))
                                        .await
                                        .unwrap()
                                    {
                                        Inserted::New => {
                                            out.push(id);
                                            break;
                                        }
                                        Inserted::IdTaken => {}
                                        Inserted::Duplicate(_) => panic!("fresh delivery id"),
                                    }
                                }
                            }
                            out
                        })
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 4000);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let h = Sqlite::open(&state, worker(&state)).unwrap();
        rt.block_on(async {
            assert_eq!(h.count().await.unwrap(), 4000);
            // A taken id is reported as such (and its delivery id is not recorded).
            assert_eq!(
                h.insert(&queued(&ids[0], "shop"), None, Dedup::Delivery("d-new"))
                    .await
                    .unwrap(),
                Inserted::IdTaken
            );
            assert!(h.delivery("d-new").await.unwrap().is_none());
        });
    }

    #[tokio::test]
    async fn claims_are_first_in_first_out_per_environment_and_one_per_environment() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let h = Sqlite::open(&state, worker(&state)).unwrap();
        let t0 = Utc::now();
        for (i, (id, bp)) in [
            ("a1", "shop"),
            ("b1", "blog"),
            ("a2", "shop"),
            ("b2", "blog"),
        ]
        .into_iter()
        .enumerate()
        {
            let row = RunRow {
                queued_at: t0 + chrono::Duration::milliseconds(i64::try_from(i).unwrap()),
                ..queued(id, bp)
            };
            h.insert(&row, Some("{}"), Dedup::None).await.unwrap();
        }
        let first = h.claim().await.unwrap().unwrap();
        let second = h.claim().await.unwrap().unwrap();
        assert_eq!(
            (first.row.run_id.as_str(), second.row.run_id.as_str()),
            ("a1", "b1")
        );
        assert_eq!(first.row.status, RunStatus::Running);
        assert_eq!(first.request.as_deref(), Some("{}"));
        // Both environments are in use: nothing more to claim until one is given back.
        assert!(h.claim().await.unwrap().is_none());
        // A CLI run on the same state directory holding a lease also keeps its queue waiting.
        h.release(first.lease).await;
        let cli = crate::lease::try_acquire(&state, "local:shop")
            .unwrap()
            .unwrap();
        assert!(h.claim().await.unwrap().is_none());
        drop(cli);
        assert_eq!(h.claim().await.unwrap().unwrap().row.run_id, "a2");
        assert_eq!(h.queued().await.unwrap(), 1);
    }
}
