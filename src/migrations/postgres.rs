//! The lock and rewrite monitor for PostgreSQL.
//!
//! One connection of its own, opened before the release's install starts: it records every
//! table and index's `relfilenode`, then samples `pg_stat_activity` joined with `pg_locks`
//! (and the WAL position) every [`super::PERIOD`] until the install ends, then reads the
//! `relfilenode`s again. Each sample is one round trip of one query; the sampler never takes a
//! lock a migration could wait for (it reads statistics views only).
//!
//! What a sample cannot see: a statement that starts and ends between two samples shows up
//! afterwards as its backend's last query (`state = idle…`, exact duration from
//! `state_change`), but its locks are gone by then. A lock is "held" from the first to the last
//! sample that saw it, so a hold is measured to within one sampling period.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use super::{LockHold, Migration, TraceReport, mode_name};

/// Relations below this oid are the system's own (`FirstNormalObjectId`).
const FIRST_USER_OID: u32 = 16384;

/// Why tracing did not work.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Could not connect or a sample failed.
    #[error("{0}")]
    Db(String),
}

fn db(e: &tokio_postgres::Error) -> TraceError {
    TraceError::Db(crate::pg::error(e))
}

/// A table or index before/after the install.
#[derive(Debug, Clone)]
struct Rel {
    name: String,
    filenode: u32,
    rows: Option<u64>,
    bytes: Option<u64>,
}

async fn relations(c: &Client) -> Result<HashMap<u32, Rel>, TraceError> {
    let rows = c
        .query(
            "SELECT c.oid, c.oid::regclass::text, c.relfilenode, c.reltuples::float8, pg_relation_size(c.oid)::int8
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'i', 'm', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'",
            &[],
        )
        .await
        .map_err(|e| db(&e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let tuples: f64 = r.get(3);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rows = (tuples >= 0.0).then_some(tuples as u64);
            let bytes: i64 = r.get(4);
            (
                r.get::<_, u32>(0),
                Rel {
                    name: r.get(1),
                    filenode: r.get(2),
                    rows,
                    bytes: u64::try_from(bytes).ok(),
                },
            )
        })
        .collect())
}

const SAMPLE: &str = "SELECT w.lsn, w.now, a.pid, a.query_start, a.state, a.state_change, a.query,
        l.relation, l.relation::regclass::text, l.mode
 FROM (SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8 AS lsn, clock_timestamp() AS now) w
 LEFT JOIN pg_stat_activity a
   ON a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
  AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database())
 LEFT JOIN pg_locks l
   ON l.pid = a.pid AND l.locktype = 'relation' AND l.granted AND l.relation >= 16384
  AND l.database = a.datid";

#[derive(Debug)]
struct Stmt {
    query: String,
    start: DateTime<Utc>,
    last_active: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    lsn_before: i64,
    lsn_after: Option<i64>,
}

#[derive(Debug)]
struct Held {
    stmt: usize,
    relation: u32,
    name: String,
    mode: String,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct Sampler {
    stmts: Vec<Stmt>,
    by_key: HashMap<(i32, DateTime<Utc>), usize>,
    /// The statement each backend ran last.
    current: HashMap<i32, usize>,
    /// Locks by (backend, relation, mode, statement that took it): a lock is one hold from the
    /// sample that first saw it to the last.
    held: Vec<Held>,
    open: HashMap<(i32, u32, String), usize>,
    prev_lsn: Option<i64>,
    prev_at: Option<Instant>,
    samples: u64,
    max_gap: Duration,
}

impl Sampler {
    async fn sample(&mut self, c: &Client, q: &Statement) -> Result<(), TraceError> {
        let rows = c.query(q, &[]).await.map_err(|e| db(&e))?;
        let now_i = Instant::now();
        if let Some(p) = self.prev_at {
            self.max_gap = self.max_gap.max(now_i - p);
        }
        self.prev_at = Some(now_i);
        self.samples += 1;
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let lsn: i64 = first.get(0);
        let now: DateTime<Utc> = first.get(1);
        let before = self.prev_lsn.unwrap_or(lsn);
        let mut seen_pids = Vec::new();
        let mut seen_locks = Vec::new();
        for r in &rows {
            let Some(pid) = r.get::<_, Option<i32>>(2) else {
                continue;
            };
            let (Some(start), Some(query)) = (
                r.get::<_, Option<DateTime<Utc>>>(3),
                r.get::<_, Option<String>>(6),
            ) else {
                continue;
            };
            let state: Option<String> = r.get(4);
            let active = state.as_deref() == Some("active");
            let idx = match self.by_key.get(&(pid, start)) {
                Some(&i) => i,
                None => {
                    self.stmts.push(Stmt {
                        query,
                        start,
                        last_active: if active { now } else { start },
                        end: None,
                        lsn_before: before,
                        lsn_after: None,
                    });
                    let i = self.stmts.len() - 1;
                    self.by_key.insert((pid, start), i);
                    i
                }
            };
            if !seen_pids.contains(&pid) {
                seen_pids.push(pid);
                if let Some(prev) = self.current.insert(pid, idx)
                    && prev != idx
                {
                    self.close(prev, Some(start), lsn);
                }
                if active {
                    self.stmts[idx].last_active = now;
                } else {
                    let ended: Option<DateTime<Utc>> = r.get(5);
                    self.close(idx, ended, lsn);
                }
            }
            if let (Some(rel), Some(name), Some(mode)) = (
                r.get::<_, Option<u32>>(7),
                r.get::<_, Option<String>>(8),
                r.get::<_, Option<String>>(9),
            ) {
                if rel < FIRST_USER_OID {
                    continue;
                }
                let key = (pid, rel, mode.clone());
                let h = match self.open.get(&key) {
                    Some(&h) => h,
                    None => {
                        self.held.push(Held {
                            stmt: idx,
                            relation: rel,
                            name,
                            mode,
                            first: now,
                            last: now,
                        });
                        let h = self.held.len() - 1;
                        self.open.insert(key.clone(), h);
                        h
                    }
                };
                self.held[h].last = now;
                seen_locks.push(key);
            }
        }
        // Backends gone since the last sample ended their statement.
        let gone: Vec<i32> = self
            .current
            .keys()
            .filter(|p| !seen_pids.contains(p))
            .copied()
            .collect();
        for p in gone {
            if let Some(i) = self.current.remove(&p) {
                self.close(i, None, lsn);
            }
        }
        // A lock no longer seen was released: the next time it is a new hold.
        self.open.retain(|k, _| seen_locks.contains(k));
        self.prev_lsn = Some(lsn);
        Ok(())
    }

    fn close(&mut self, i: usize, at: Option<DateTime<Utc>>, lsn: i64) {
        let s = &mut self.stmts[i];
        if s.end.is_none() {
            s.end = Some(at.unwrap_or(s.last_active).max(s.start));
        }
        if s.lsn_after.is_none() {
            s.lsn_after = Some(lsn);
        }
    }

    fn finish(
        self,
        database: &str,
        before: &HashMap<u32, Rel>,
        after: &HashMap<u32, Rel>,
    ) -> (Vec<Migration>, TraceReport) {
        let ms = |d: chrono::TimeDelta| u64::try_from(d.num_milliseconds()).unwrap_or(0);
        let mut rewritten: Vec<(u32, String)> = before
            .iter()
            .filter_map(|(oid, b)| {
                let a = after.get(oid)?;
                (a.filenode != b.filenode && b.filenode != 0).then(|| (*oid, a.name.clone()))
            })
            .collect();
        rewritten.sort_by(|a, b| a.1.cmp(&b.1));
        let mut out: Vec<Migration> = self
            .stmts
            .iter()
            .map(|s| Migration {
                database: database.to_string(),
                statement: s.query.clone(),
                duration_ms: ms(s.end.unwrap_or(s.last_active) - s.start),
                locks: Vec::new(),
                rewrites: Vec::new(),
                wal_bytes: s
                    .lsn_after
                    .and_then(|a| u64::try_from(a - s.lsn_before).ok()),
            })
            .collect();
        for h in &self.held {
            let known = before.get(&h.relation);
            // A relation that existed neither before nor after is PostgreSQL's own transient
            // copy during a rewrite; TOAST tables go with their table. Neither names anything
            // the user knows.
            if (known.is_none() && !after.contains_key(&h.relation))
                || h.name.starts_with("pg_toast.")
            {
                continue;
            }
            let name = after
                .get(&h.relation)
                .map_or_else(|| h.name.clone(), |r| r.name.clone());
            let (mode, blocks) = mode_name(&h.mode);
            out[h.stmt].locks.push(LockHold {
                relation: name,
                mode,
                held_ms: ms(h.last - h.first),
                blocks: blocks.map(str::to_string),
                existing: known.is_some(),
                rows: known.and_then(|r| r.rows),
                bytes: known.and_then(|r| r.bytes),
            });
        }
        // A rewrite belongs to the first statement that held ACCESS EXCLUSIVE on the relation,
        // else to the first that held any lock on it.
        for (oid, name) in &rewritten {
            let by = |strong: bool| {
                self.held
                    .iter()
                    .filter(|h| h.relation == *oid && (!strong || h.mode == "AccessExclusiveLock"))
                    .min_by_key(|h| h.first)
                    .map(|h| h.stmt)
            };
            if let Some(i) = by(true).or_else(|| by(false)) {
                out[i].rewrites.push(name.clone());
            }
        }
        for m in &mut out {
            m.locks
                .sort_by(|a, b| b.held_ms.cmp(&a.held_ms).then(a.relation.cmp(&b.relation)));
        }
        let report = TraceReport {
            database: database.to_string(),
            status: "traced".into(),
            reason: None,
            samples: self.samples,
            period_ms: super::millis(super::PERIOD),
            max_gap_ms: super::millis(self.max_gap),
            rewritten: rewritten.into_iter().map(|r| r.1).collect(),
        };
        (out, report)
    }
}

/// A running monitor; [`Monitor::stop`] ends it and returns what it saw.
#[derive(Debug)]
pub struct Monitor {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(Vec<Migration>, TraceReport), TraceError>>,
}

impl Monitor {
    /// Connects, records the relations and takes the first sample: when this returns, the
    /// install may start.
    ///
    /// # Errors
    /// The connection or the first sample failed.
    pub async fn start(database: &str, url: &str, period: Duration) -> Result<Monitor, TraceError> {
        let c = crate::pg::connect(url).await.map_err(TraceError::Db)?;
        // The monitor must never be what a migration waits for, nor wait long itself.
        c.batch_execute("SET application_name = 'dryrun-migration-monitor'; SET statement_timeout = '5s'; SET lock_timeout = '100ms'")
            .await
            .map_err(|e| db(&e))?;
        let before = relations(&c).await?;
        // Parsed and planned once: a sample is then one Bind/Execute round trip, which keeps
        // the monitor's share of a 2-core machine (and so its overhead on the migration) small.
        let q = c.prepare(SAMPLE).await.map_err(|e| db(&e))?;
        let mut sampler = Sampler::default();
        sampler.sample(&c, &q).await?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let database = database.to_string();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => sampler.sample(&c, &q).await?,
                    () = token.cancelled() => break,
                }
            }
            sampler.sample(&c, &q).await?;
            let after = relations(&c).await?;
            Ok(sampler.finish(&database, &before, &after))
        });
        Ok(Monitor { stop, task })
    }

    /// Takes a last sample and returns the statements seen, worst first.
    ///
    /// # Errors
    /// A sample failed (the database went away).
    pub async fn stop(self) -> Result<(Vec<Migration>, TraceReport), TraceError> {
        self.stop.cancel();
        let (mut m, r) = self
            .task
            .await
            .map_err(|e| TraceError::Db(format!("monitor task: {e}")))??;
        super::sort_worst_first(&mut m);
        Ok((m, r))
    }
}
