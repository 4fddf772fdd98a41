//! Run history in SQLite (`STATE/history.sqlite`): runs, their reports (stages, checks,
//! resources), delivery ids. Survives restarts; WAL mode so readers never wait for the writer.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::report::RunReport;

/// History errors.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// SQLite said no.
    #[error("history database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored report does not parse.
    #[error("history database: stored report of {0} is damaged: {1}")]
    Report(String, serde_json::Error),
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
    /// `cli`, `webhook`, `schedule`, `dashboard`.
    pub trigger: String,
    /// Release reference.
    pub release: String,
    /// Release version, once known.
    pub release_version: Option<String>,
    /// `queued`, `running`, `passed`, `failed`, `error`, `interrupted`, `cancelled`.
    pub status: String,
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
}

impl RunRow {
    /// A run just accepted (`queued`, now): everything about its outcome still unknown.
    #[must_use]
    pub fn queued(
        run_id: &str,
        blueprint: &str,
        blueprint_path: &str,
        provider: &str,
        trigger: &str,
        release: &str,
    ) -> RunRow {
        RunRow {
            run_id: run_id.into(),
            blueprint: blueprint.into(),
            blueprint_path: blueprint_path.into(),
            provider: provider.into(),
            environment: crate::lease::environment(provider, blueprint),
            trigger: trigger.into(),
            release: release.into(),
            release_version: None,
            status: "queued".into(),
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
    pub status: String,
    /// Restore time.
    pub restore_ms: Option<i64>,
    /// Total time.
    pub duration_ms: Option<i64>,
    /// Backup age.
    pub backup_age_s: Option<i64>,
}

/// The history database.
#[derive(Debug)]
pub struct History {
    conn: Mutex<Connection>,
}

const COLUMNS: &str = "run_id, blueprint, blueprint_path, provider, environment, trigger, release, release_version, status, queued_at, started_at, finished_at, duration_ms, restore_ms, backup_id, backup_age_s, exit_code, left_behind, failure, delivery, schedule, callback";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        run_id: r.get(0)?,
        blueprint: r.get(1)?,
        blueprint_path: r.get(2)?,
        provider: r.get(3)?,
        environment: r.get(4)?,
        trigger: r.get(5)?,
        release: r.get(6)?,
        release_version: r.get(7)?,
        status: r.get(8)?,
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
    })
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

/// Outcome of recording a new run with a delivery id.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// New run recorded.
    New,
    /// The delivery id was seen before: the original run.
    Duplicate(Box<RunRow>),
    /// The run id is taken (another run has it): draw another.
    IdTaken,
}

impl History {
    /// Opens (creating) the database.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn open(path: &Path) -> Result<History, HistoryError> {
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
        // Switching a new database to WAL takes an exclusive lock that SQLite does not wait
        // for: processes opening it at the same moment (a CLI run as the server starts) retry.
        let mut tries = 0;
        loop {
            match Self::open_once(path) {
                Err(HistoryError::Sql(rusqlite::Error::SqliteFailure(e, _)))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 100 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path) -> Result<History, HistoryError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
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
             CREATE TABLE IF NOT EXISTS outbox (
               id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, kind TEXT NOT NULL,
               url TEXT, body TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
               next_at TEXT NOT NULL, created_at TEXT NOT NULL, last_error TEXT,
               done_at TEXT, outcome TEXT);
             CREATE INDEX IF NOT EXISTS outbox_due ON outbox(done_at, next_at);",
        )?;
        // Added after the first release: the request a queued run was accepted with. Checked
        // and added in one immediate transaction: a CLI run and the server may open the
        // database at the same moment.
        let mut conn = conn;
        {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let has_request: bool = tx
                .prepare("SELECT 1 FROM pragma_table_info('runs') WHERE name = 'request'")?
                .exists([])?;
            if !has_request {
                tx.execute_batch("ALTER TABLE runs ADD COLUMN request TEXT")?;
            }
            tx.commit()?;
        }
        Ok(History {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a queued run and, atomically, its delivery id. A delivery id seen before records
    /// nothing and returns the original run.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn insert_queued(
        &self,
        r: &RunRow,
        request: Option<&str>,
    ) -> Result<Inserted, HistoryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(d) = &r.delivery {
            let existing: Option<String> = tx
                .query_row("SELECT run_id FROM deliveries WHERE id = ?1", [d], |x| {
                    x.get(0)
                })
                .optional()?;
            if let Some(run_id) = existing {
                let orig = tx.query_row(
                    &format!("SELECT {COLUMNS} FROM runs WHERE run_id = ?1"),
                    [&run_id],
                    row,
                )?;
                return Ok(Inserted::Duplicate(Box::new(orig)));
            }
            tx.execute(
                "INSERT INTO deliveries (id, run_id, received_at) VALUES (?1, ?2, ?3)",
                params![d, r.run_id, r.queued_at],
            )?;
        }
        let inserted = tx.execute(
            &format!("INSERT INTO runs ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22) ON CONFLICT (run_id) DO NOTHING"),
            params![
                r.run_id, r.blueprint, r.blueprint_path, r.provider, r.environment, r.trigger, r.release, r.release_version, r.status,
                r.queued_at, r.started_at, r.finished_at, r.duration_ms, r.restore_ms, r.backup_id, r.backup_age_s, r.exit_code,
                r.left_behind, r.failure, r.delivery, r.schedule, r.callback
            ],
        )?;
        if inserted == 0 {
            // The transaction is dropped: the delivery id is not recorded either.
            return Ok(Inserted::IdTaken);
        }
        if let Some(req) = request {
            tx.execute(
                "UPDATE runs SET request = ?2 WHERE run_id = ?1",
                params![r.run_id, req],
            )?;
        }
        tx.commit()?;
        Ok(Inserted::New)
    }

    /// The run a delivery id started, if seen before.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn delivery(&self, id: &str) -> Result<Option<RunRow>, HistoryError> {
        let conn = self.conn();
        let run_id: Option<String> = conn
            .query_row("SELECT run_id FROM deliveries WHERE id = ?1", [id], |x| {
                x.get(0)
            })
            .optional()?;
        match run_id {
            None => Ok(None),
            Some(r) => Ok(conn
                .query_row(
                    &format!("SELECT {COLUMNS} FROM runs WHERE run_id = ?1"),
                    [r],
                    row,
                )
                .optional()?),
        }
    }

    /// Marks a run as running.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_running(&self, run_id: &str, at: DateTime<Utc>) -> Result<(), HistoryError> {
        self.conn().execute(
            "UPDATE runs SET status = 'running', started_at = ?2 WHERE run_id = ?1",
            params![run_id, at],
        )?;
        Ok(())
    }

    /// Sets a run's status (and failure text) without a report (cancelled, interrupted).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_status(
        &self,
        run_id: &str,
        status: &str,
        failure: Option<&str>,
    ) -> Result<(), HistoryError> {
        self.conn().execute(
            "UPDATE runs SET status = ?2, failure = COALESCE(?3, failure), finished_at = COALESCE(finished_at, ?4) WHERE run_id = ?1",
            params![run_id, status, failure, Utc::now()],
        )?;
        Ok(())
    }

    /// Records the finished run's report.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn finish(&self, rep: &RunReport) -> Result<(), HistoryError> {
        let json = serde_json::to_string(rep).unwrap_or_default();
        self.conn().execute(
            "UPDATE runs SET status = ?2, release_version = ?3, started_at = COALESCE(started_at, ?4), finished_at = ?5,
               duration_ms = ?6, restore_ms = ?7, backup_id = ?8, backup_age_s = ?9, exit_code = ?10, left_behind = ?11,
               failure = ?12, report = ?13 WHERE run_id = ?1",
            params![
                rep.run_id,
                rep.status.as_str(),
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

    /// The request a queued run was accepted with (JSON), if it was recorded.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn request(&self, run_id: &str) -> Result<Option<String>, HistoryError> {
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

    /// Records a callback outcome.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_callback(&self, run_id: &str, outcome: &str) -> Result<(), HistoryError> {
        self.conn().execute(
            "UPDATE runs SET callback = ?2 WHERE run_id = ?1",
            params![run_id, outcome],
        )?;
        Ok(())
    }

    /// Puts a message in the outbox (delivered by [`super::outbox`]); returns its id.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_add(
        &self,
        run_id: &str,
        kind: OutboxKind,
        url: Option<&str>,
        body: &str,
    ) -> Result<i64, HistoryError> {
        let now = Utc::now();
        let conn = self.conn();
        conn.execute(
            "INSERT INTO outbox (run_id, kind, url, body, next_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![run_id, kind.as_str(), url, body, now],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Messages due at `now` that are not delivered or given up yet, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, HistoryError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, run_id, kind, url, body, attempts FROM outbox WHERE done_at IS NULL AND next_at <= ?1 ORDER BY next_at, id LIMIT ?2",
        )?;
        let rows = st.query_map(
            params![now, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                let kind: String = r.get(2)?;
                Ok(OutboxItem {
                    id: r.get(0)?,
                    run_id: r.get(1)?,
                    kind: if kind == "callback" {
                        OutboxKind::Callback
                    } else {
                        OutboxKind::Notify
                    },
                    url: r.get(3)?,
                    body: r.get(4)?,
                    attempts: r.get(5)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When the next pending message is due, if any.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_next(&self) -> Result<Option<DateTime<Utc>>, HistoryError> {
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

    /// Records a failed attempt and when to try again.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_retry(
        &self,
        id: i64,
        attempts: u32,
        next_at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), HistoryError> {
        self.conn().execute(
            "UPDATE outbox SET attempts = ?2, next_at = ?3, last_error = ?4 WHERE id = ?1",
            params![id, attempts, next_at, error],
        )?;
        Ok(())
    }

    /// Records that a message was delivered or given up.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_done(&self, id: i64, attempts: u32, outcome: &str) -> Result<(), HistoryError> {
        self.conn().execute(
            "UPDATE outbox SET attempts = ?2, done_at = ?3, outcome = ?4 WHERE id = ?1",
            params![id, attempts, Utc::now(), outcome],
        )?;
        Ok(())
    }

    /// Messages not delivered or given up yet.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_pending(&self) -> Result<i64, HistoryError> {
        Ok(self.conn().query_row(
            "SELECT count(*) FROM outbox WHERE done_at IS NULL",
            [],
            |r| r.get(0),
        )?)
    }

    /// Deletes finished runs (and their deliveries and delivered messages) that ended before
    /// `before`, except those `keep` names; returns their ids. Runs that are queued or running
    /// are kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn prune(
        &self,
        before: DateTime<Utc>,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, HistoryError> {
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
        }
        tx.execute(
            "DELETE FROM outbox WHERE done_at IS NOT NULL AND done_at < ?1",
            params![before],
        )?;
        tx.commit()?;
        Ok(ids)
    }

    /// One run and its report.
    ///
    /// # Errors
    /// SQLite errors, a damaged stored report.
    pub fn get(&self, run_id: &str) -> Result<Option<(RunRow, Option<RunReport>)>, HistoryError> {
        let conn = self.conn();
        let found = conn
            .query_row(
                &format!("SELECT {COLUMNS}, report FROM runs WHERE run_id = ?1"),
                [run_id],
                |r| Ok((row(r)?, r.get::<_, Option<String>>(22)?)),
            )
            .optional()?;
        match found {
            None => Ok(None),
            Some((row, None)) => Ok(Some((row, None))),
            Some((row, Some(j))) => {
                let rep = serde_json::from_str(&j)
                    .map_err(|e| HistoryError::Report(run_id.to_string(), e))?;
                Ok(Some((row, Some(rep))))
            }
        }
    }

    /// Runs, newest first, filtered by status and blueprint.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn list(
        &self,
        status: Option<&str>,
        blueprint: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RunRow>, HistoryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM runs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR blueprint = ?2) ORDER BY queued_at DESC, run_id DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![status, blueprint, i64::try_from(limit).unwrap_or(i64::MAX)],
            row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Runs in one of the given statuses (for start-up recovery).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn in_status(&self, statuses: &[&str]) -> Result<Vec<RunRow>, HistoryError> {
        let mut out = Vec::new();
        for s in statuses {
            out.extend(self.list(Some(s), None, usize::MAX)?);
        }
        Ok(out)
    }

    /// The trend of finished rehearsals of a blueprint, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn trend(&self, blueprint: &str, limit: usize) -> Result<Vec<TrendPoint>, HistoryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT run_id, started_at, status, restore_ms, duration_ms, backup_age_s FROM runs
             WHERE blueprint = ?1 AND started_at IS NOT NULL AND status IN ('passed', 'failed', 'error')
             ORDER BY started_at DESC LIMIT ?2",
        )?;
        let mut v: Vec<TrendPoint> = stmt
            .query_map(
                params![blueprint, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok(TrendPoint {
                        run_id: r.get(0)?,
                        started_at: r.get(1)?,
                        status: r.get(2)?,
                        restore_ms: r.get(3)?,
                        duration_ms: r.get(4)?,
                        backup_age_s: r.get(5)?,
                    })
                },
            )?
            .collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

    /// Distinct blueprints with runs.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn blueprints(&self) -> Result<Vec<String>, HistoryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT DISTINCT blueprint FROM runs ORDER BY blueprint")?;
        let v = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(v)
    }

    /// Number of runs recorded.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn count(&self) -> Result<i64, HistoryError> {
        Ok(self
            .conn()
            .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(id: &str, delivery: Option<&str>) -> RunRow {
        RunRow {
            delivery: delivery.map(Into::into),
            ..RunRow::queued(id, "shop", "demo/shop.yaml", "local", "webhook", "r")
        }
    }

    #[test]
    fn a_delivery_id_starts_one_run_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.sqlite");
        let h = History::open(&p).unwrap();
        assert_eq!(
            h.insert_queued(&queued("r1", Some("d1")), None).unwrap(),
            Inserted::New
        );
        drop(h);
        let h = History::open(&p).unwrap();
        match h.insert_queued(&queued("r2", Some("d1")), None).unwrap() {
            Inserted::Duplicate(orig) => assert_eq!(orig.run_id, "r1"),
            other => panic!("duplicate delivery answered {other:?}"),
        }
        assert_eq!(h.count().unwrap(), 1);
        assert_eq!(h.delivery("d1").unwrap().unwrap().run_id, "r1");
    }

    #[test]
    fn thousands_of_runs_claimed_in_the_same_second_never_share_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::state::StateDir::new(dir.path());
        let p = dir.path().join("h.sqlite");
        // Four "processes" (own connections), a thousand runs each, same blueprint and second,
        // each with its own delivery id; plus the same id offered twice to the history.
        let ids: Vec<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    let (state, p) = (&state, &p);
                    s.spawn(move || {
                        let h = History::open(p).unwrap();
                        (0..1000)
                            .map(|i| {
                                crate::engine::claim_run_id(state, "shop", |id| {
                                    let row = queued(id, Some(&format!("d-{w}-{i}")));
                                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                                        match h.insert_queued(&row, None)? {
                                            Inserted::New => true,
                                            Inserted::IdTaken => false,
                                            Inserted::Duplicate(_) => panic!("fresh delivery id"),
                                        },
                                    )
                                })
                                .unwrap()
                            })
                            .collect::<Vec<_>>()
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
        let h = History::open(&p).unwrap();
        assert_eq!(h.count().unwrap(), 4000);
        assert!(ids.iter().all(|id| state.run_dir(id).is_dir()));
        // A taken id is reported as such (and its delivery id is not recorded).
        assert_eq!(
            h.insert_queued(&queued(&ids[0], Some("d-new")), None)
                .unwrap(),
            Inserted::IdTaken
        );
        assert!(h.delivery("d-new").unwrap().is_none());
    }
}
