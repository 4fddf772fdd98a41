//! The PostgreSQL control plane against a real PostgreSQL server (initdb on a free port): what
//! several workers sharing one database rely on — claims exactly once and in order per
//! environment, one run per environment, deduplication across workers, recovery of a dead
//! worker's leases, journal entries stored before `append` returns.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::pg::ControlDb;
use dryrun::control::postgres::Postgres;
use dryrun::control::{Control, Dedup, Inserted, RunRow, RunStatus, Worker};
use dryrun::report::Trigger;
use dryrun::state::StateDir;

fn have_pg() -> bool {
    common::have_postgres()
}

/// A worker with its own state directory (as on its own machine).
async fn worker(db: &ControlDb, lease_timeout: Duration) -> (Postgres, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let w = Worker::this_process(&state, "test").unwrap();
    (
        Postgres::connect(&db.url(), w, lease_timeout)
            .await
            .unwrap(),
        dir,
    )
}

/// What worker `w` recovers once the silent workers' timeout has passed (it heartbeats
/// meanwhile); empty after 10 s.
async fn orphans_seen_by(w: &Postgres) -> Vec<dryrun::control::Orphan> {
    let t = Instant::now();
    loop {
        w.heartbeat().await.unwrap();
        let orphans = w.orphans(false).await.unwrap();
        if !orphans.is_empty() || t.elapsed() > Duration::from_secs(10) {
            return orphans;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn queued(id: &str, blueprint: &str) -> RunRow {
    RunRow::queued(id, blueprint, "bp.yaml", "local", Trigger::Webhook, "r")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_claim_every_run_once_in_order_one_per_environment() {
    if !have_pg() {
        return;
    }
    let db = ControlDb::start();
    // Three workers connect at once: the schema is made once, under its lock.
    let (a, b, c) = tokio::join!(
        worker(&db, Duration::from_secs(15)),
        worker(&db, Duration::from_secs(15)),
        worker(&db, Duration::from_secs(15))
    );
    let workers: Vec<Arc<Postgres>> = vec![Arc::new(a.0), Arc::new(b.0), Arc::new(c.0)];
    let envs = ["e0", "e1", "e2", "e3", "e4"];
    let t0 = Utc::now();
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..200 {
        let env = envs[i % envs.len()];
        let id = format!("run-{i:03}");
        let row = RunRow {
            queued_at: t0 + chrono::Duration::microseconds(i64::try_from(i).unwrap()),
            ..queued(&id, env)
        };
        assert_eq!(
            workers[i % 3]
                .insert(&row, Some("{}"), Dedup::None)
                .await
                .unwrap(),
            Inserted::New
        );
        expected.entry(format!("local:{env}")).or_default().push(id);
    }
    // Each worker claims as fast as it can, holds the environment a moment, gives it back.
    let in_use: Arc<Mutex<HashSet<String>>> = Arc::default();
    let order: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let claimed_by: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, w) in workers.iter().enumerate() {
        let (w, in_use, order, claimed_by) =
            (w.clone(), in_use.clone(), order.clone(), claimed_by.clone());
        tasks.push(tokio::spawn(async move {
            let mut idle = 0;
            while idle < 20 {
                let Some(c) = w.claim().await.unwrap() else {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                idle = 0;
                assert_eq!(c.row.status, RunStatus::Running);
                assert_eq!(c.row.worker.as_deref(), Some(w.worker().id.as_str()));
                assert!(
                    in_use.lock().unwrap().insert(c.lease.environment.clone()),
                    "environment {} claimed while in use",
                    c.lease.environment
                );
                assert!(
                    claimed_by
                        .lock()
                        .unwrap()
                        .insert(c.row.run_id.clone(), n)
                        .is_none(),
                    "run {} claimed twice",
                    c.row.run_id
                );
                order
                    .lock()
                    .unwrap()
                    .entry(c.lease.environment.clone())
                    .or_default()
                    .push(c.row.run_id.clone());
                tokio::time::sleep(Duration::from_millis(1)).await;
                w.set_status(&c.row.run_id, RunStatus::Passed, None)
                    .await
                    .unwrap();
                in_use.lock().unwrap().remove(&c.lease.environment);
                w.release(c.lease).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let claimed_by = claimed_by.lock().unwrap().clone();
    assert_eq!(claimed_by.len(), 200, "every run claimed once");
    let per_worker: Vec<usize> = (0..3)
        .map(|n| claimed_by.values().filter(|&&w| w == n).count())
        .collect();
    eprintln!(
        "claimed 200 runs over 5 environments with 3 workers in {secs:.2} s: {:.0} claims/s; per worker {per_worker:?}",
        200.0 / secs
    );
    let order = order.lock().unwrap().clone();
    assert_eq!(order, expected, "first in, first out per environment");
    assert_eq!(workers[0].queued().await.unwrap(), 0);
    assert!(
        workers[0].claim().await.unwrap().is_none(),
        "nothing left to claim"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_delivery_or_firing_at_two_workers_makes_one_run() {
    if !have_pg() {
        return;
    }
    let db = ControlDb::start();
    let (a, _da) = worker(&db, Duration::from_secs(15)).await;
    let (b, _db) = worker(&db, Duration::from_secs(15)).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let at = Utc::now();
    for i in 0..50 {
        let d = format!("delivery-{i}");
        let fire_name = format!("nightly-{i}");
        let rows = [
            queued(&format!("a-{i}"), "shop"),
            queued(&format!("b-{i}"), "shop"),
            queued(&format!("fa-{i}"), "shop"),
            queued(&format!("fb-{i}"), "shop"),
        ];
        let fire = Dedup::Fire {
            schedule: &fire_name,
            at,
        };
        let (ra, rb, fa, fb) = tokio::join!(
            a.insert(&rows[0], None, Dedup::Delivery(&d)),
            b.insert(&rows[1], None, Dedup::Delivery(&d)),
            a.insert(&rows[2], None, fire),
            b.insert(&rows[3], None, fire),
        );
        for (x, y, what) in [(ra, rb, "delivery"), (fa, fb, "firing")] {
            let (x, y) = (x.unwrap(), y.unwrap());
            let news = [&x, &y]
                .iter()
                .filter(|r| matches!(r, Inserted::New))
                .count();
            assert_eq!(news, 1, "{what} {i}: {x:?} / {y:?}");
            let dup = [x, y]
                .into_iter()
                .find_map(|r| match r {
                    Inserted::Duplicate(o) => Some(o),
                    _ => None,
                })
                .expect("the other one is told the original run");
            assert!(dup.run_id.ends_with(&format!("-{i}")));
        }
    }
    assert_eq!(a.count().await.unwrap(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_is_taken_for_dead_and_its_leases_recovered_by_one_other() {
    if !have_pg() {
        return;
    }
    let db = ControlDb::start();
    let timeout = Duration::from_secs(2);
    let (dead, _d1) = worker(&db, timeout).await;
    let (b, _d2) = worker(&db, timeout).await;
    let (c, _d3) = worker(&db, timeout).await;
    dead.insert(&queued("r1", "shop"), Some("{}"), Dedup::None)
        .await
        .unwrap();
    let claimed = dead.claim().await.unwrap().unwrap();
    dead.heartbeat().await.unwrap();
    let last_beat = Instant::now();
    // While the worker is within its timeout, nobody touches its lease.
    assert!(b.orphans(false).await.unwrap().is_empty());
    // A CLI run waiting for that environment waits.
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut holder = None;
    let waiting = tokio::time::timeout(
        Duration::from_millis(700),
        c.lease("local:shop", "cli-run", &cancel, &mut |h| holder = h),
    )
    .await;
    assert!(waiting.is_err(), "the lease is held");
    assert_eq!(holder.as_deref(), Some("r1"));
    // b and c keep heartbeating; `dead` does not.
    let t = Instant::now();
    let mut got = Vec::new();
    while t.elapsed() < Duration::from_secs(10) && got.is_empty() {
        b.heartbeat().await.unwrap();
        c.heartbeat().await.unwrap();
        let (ob, oc) = tokio::join!(b.orphans(false), c.orphans(false));
        got.extend(ob.unwrap().into_iter().map(|o| ("b", o)));
        got.extend(oc.unwrap().into_iter().map(|o| ("c", o)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waited = last_beat.elapsed();
    assert_eq!(got.len(), 1, "exactly one worker recovers the run: {got:?}");
    let (by, orphan) = got.pop().unwrap();
    assert_eq!(orphan.row.run_id, "r1");
    assert_eq!(
        orphan.worker.as_ref().map(|w| w.id.as_str()),
        Some(dead.worker().id.as_str())
    );
    assert!(
        waited >= timeout - Duration::from_millis(500),
        "not before the timeout"
    );
    eprintln!(
        "lease of a silent worker recovered by {by} after {} ms (timeout {} ms)",
        waited.as_millis(),
        timeout.as_millis()
    );
    // The dead worker learns it was taken for dead at its next heartbeat.
    let e = dead.heartbeat().await.unwrap_err().to_string();
    assert!(e.contains("taken for dead"), "{e}");
    // Its own late release of the lease is harmless; the recovering worker's release frees it.
    let recovering = if by == "b" { &b } else { &c };
    recovering.release(orphan.lease.unwrap()).await;
    drop(claimed);
    let lease = tokio::time::timeout(
        Duration::from_secs(5),
        c.lease("local:shop", "cli-run", &cancel, &mut |_| {}),
    )
    .await
    .expect("free again")
    .unwrap();
    assert_eq!(lease.run_id, "cli-run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_are_in_the_database_when_append_returns() {
    if !have_pg() {
        return;
    }
    let db = ControlDb::start();
    let (w, _d) = worker(&db, Duration::from_secs(15)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    w.insert(&queued("run-j", "shop"), Some("{}"), Dedup::None)
        .await
        .unwrap();
    assert_eq!(w.claim().await.unwrap().unwrap().row.run_id, "run-j");
    let j = dryrun::journal::Journal::create(&state, "run-j", w.journal_mirror()).unwrap();
    let entries = [
        dryrun::journal::Entry::Kept { until: Utc::now() },
        dryrun::journal::Entry::Closed {
            at: Utc::now(),
            by: "test".into(),
        },
    ];
    for e in &entries {
        j.append(e).unwrap();
    }
    let stored = w.journal("run-j").await.unwrap();
    assert_eq!(stored.len(), 2);
    let parsed: Vec<dryrun::journal::Entry> = stored
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed, entries);
    // The database stops: the next append fails (and the step it announces does not happen).
    drop(db);
    let e = j
        .append(&dryrun::journal::Entry::Closed {
            at: Utc::now(),
            by: "test".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("control database"), "{e}");
    assert!(!e.contains(ControlDb::password()), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_one_machine_keeps_another_machines_unsettled_runs() {
    if !have_pg() {
        return;
    }
    let db = ControlDb::start();
    let ((a, _da), (b, _db)) = tokio::join!(
        worker(&db, Duration::from_secs(15)),
        worker(&db, Duration::from_secs(15))
    );
    let long_ago = Utc::now() - chrono::Duration::days(100);
    let ended = |id: &str, w: Option<&Postgres>, status: RunStatus, left: i64| RunRow {
        status,
        queued_at: long_ago,
        started_at: Some(long_ago),
        finished_at: Some(long_ago),
        left_behind: Some(left),
        worker: w.map(|w| w.worker().id.clone()),
        ..queued(id, "shop")
    };
    for row in [
        ended("a-passed", Some(&a), RunStatus::Passed, 0),
        ended("a-interrupted", Some(&a), RunStatus::Interrupted, 0),
        ended("b-passed", Some(&b), RunStatus::Passed, 0),
        ended("b-interrupted", Some(&b), RunStatus::Interrupted, 0),
        ended("b-left", Some(&b), RunStatus::Failed, 2),
        ended("expired", None, RunStatus::Expired, 0),
    ] {
        a.insert(&row, None, Dedup::None).await.unwrap();
    }
    // Machine a prunes; none of these runs has a directory on a.
    let mut gone = a
        .prune(Utc::now() - chrono::Duration::days(90), &|_| false)
        .await
        .unwrap();
    gone.sort();
    assert_eq!(gone, ["a-interrupted", "a-passed", "b-passed", "expired"]);
    for kept in ["b-interrupted", "b-left"] {
        assert!(a.get(kept).await.unwrap().is_some(), "{kept} was pruned");
    }
    // Machine b, whose state directory says nothing remains, prunes its own.
    let gone = b
        .prune(Utc::now() - chrono::Duration::days(90), &|_| false)
        .await
        .unwrap();
    assert_eq!(gone.len(), 2, "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_claimed_by_a_dead_worker_that_had_not_begun_is_queued_again_in_place() {
    if !have_pg() {
        return;
    }
    let db = ControlDb::start();
    let timeout = Duration::from_secs(2);
    let (dead, _d1) = worker(&db, timeout).await;
    let (b, dir_b) = worker(&db, timeout).await;
    let t0 = Utc::now();
    for (i, (id, env)) in [
        ("never-began", "shop"),
        ("began", "blog"),
        ("next", "shop"),
        ("ended", "wiki"),
    ]
    .into_iter()
    .enumerate()
    {
        let row = RunRow {
            queued_at: t0 + chrono::Duration::milliseconds(i64::try_from(i).unwrap()),
            ..queued(id, env)
        };
        dead.insert(&row, Some("{}"), Dedup::None).await.unwrap();
    }
    let first = dead.claim().await.unwrap().unwrap();
    let second = dead.claim().await.unwrap().unwrap();
    assert_eq!(
        (first.row.run_id.as_str(), second.row.run_id.as_str()),
        ("never-began", "began")
    );
    let third = dead.claim().await.unwrap().unwrap();
    assert_eq!(third.row.run_id, "ended");
    // "began" wrote its first journal entry; "never-began" died before its own; "ended" had
    // closed its journal (nothing remained) but not yet recorded its outcome.
    let mirror = dead.journal_mirror().unwrap();
    mirror.append("began", r#"{"entry":"started"}"#).unwrap();
    mirror.append("ended", r#"{"entry":"started"}"#).unwrap();
    let closed = dryrun::journal::Entry::Closed {
        at: Utc::now(),
        by: "run".into(),
    };
    mirror
        .append("ended", &serde_json::to_string(&closed).unwrap())
        .unwrap();
    dead.heartbeat().await.unwrap();
    let orphans = orphans_seen_by(&b).await;
    assert_eq!(orphans.len(), 3);
    let state_b = StateDir::new(dir_b.path());
    let mut outcomes = BTreeMap::new();
    for o in orphans {
        let id = o.row.run_id.clone();
        outcomes.insert(id, dryrun::runner::recover(&b, &state_b, o).await);
    }
    match &outcomes["never-began"] {
        Some(dryrun::runner::Recovered::Requeued(why)) => {
            assert!(why.contains("queued again"), "{why}");
        }
        other => panic!("never-began: {other:?}"),
    }
    match &outcomes["ended"] {
        Some(dryrun::runner::Recovered::Interrupted(note)) => {
            assert!(note.contains("nothing of the run remains"), "{note}");
        }
        other => panic!("ended: {other:?}"),
    }
    match &outcomes["began"] {
        Some(dryrun::runner::Recovered::Interrupted(note)) => {
            assert!(note.contains("local resources are on"), "{note}");
        }
        other => panic!("began: {other:?}"),
    }
    let (row, _) = b.get("never-began").await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.worker, row.started_at),
        (RunStatus::Queued, None, None)
    );
    // Its place in the queue is kept: it is claimed before the run accepted after it.
    let again = b.claim().await.unwrap().unwrap();
    assert_eq!(again.row.run_id, "never-began");
    assert_eq!(again.row.worker.as_deref(), Some(b.worker().id.as_str()));
    let (row, _) = b.get("began").await.unwrap().unwrap();
    assert_eq!(row.status, RunStatus::Interrupted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_taken_for_dead_can_neither_journal_nor_record_a_run_another_took_over() {
    if !have_pg() {
        return;
    }
    let db = ControlDb::start();
    let timeout = Duration::from_secs(2);
    let (frozen, _d1) = worker(&db, timeout).await;
    let (b, dir_b) = worker(&db, timeout).await;
    frozen
        .insert(&queued("r", "shop"), Some("{}"), Dedup::None)
        .await
        .unwrap();
    frozen.claim().await.unwrap().unwrap();
    let mirror = frozen.journal_mirror().unwrap();
    // While it is its own run, the frozen-to-be worker journals.
    mirror.append("r", r#"{"entry":"started"}"#).unwrap();
    frozen.heartbeat().await.unwrap();
    let mut orphans = orphans_seen_by(&b).await;
    assert_eq!(orphans.len(), 1);
    let state_b = StateDir::new(dir_b.path());
    let outcome = dryrun::runner::recover(&b, &state_b, orphans.pop().unwrap()).await;
    assert!(
        matches!(outcome, Some(dryrun::runner::Recovered::Interrupted(_))),
        "{outcome:?}"
    );
    // The frozen worker wakes up mid-run: its next step cannot be journaled, so it is not
    // taken; its outcome does not overwrite the survivor's record.
    let e = mirror.append("r", r#"{"entry":"creating"}"#).unwrap_err();
    assert!(e.contains("no longer this worker's"), "{e}");
    let e = frozen.fail("r", "late").await.unwrap_err().to_string();
    assert!(e.contains("no longer this worker's"), "{e}");
    let (row, _) = b.get("r").await.unwrap().unwrap();
    assert_eq!(row.status, RunStatus::Interrupted);
    assert_ne!(row.failure.as_deref(), Some("late"));
    assert_eq!(b.journal("r").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_run_id_in_the_shared_database_never_names_a_path_during_recovery() {
    if !have_pg() {
        return;
    }
    let db = ControlDb::start();
    let timeout = Duration::from_secs(2);
    let (dead, _d1) = worker(&db, timeout).await;
    let (b, dir_b) = worker(&db, timeout).await;
    // A row written by a compromised machine: its id climbs out of `runs/`, and its journal
    // (stored in the database) would be copied to that path by the AWS recovery.
    let hostile = "../../dryrun-escaped";
    let row = RunRow {
        provider: "aws".into(),
        environment: "aws:shop".into(),
        ..queued(hostile, "shop")
    };
    dead.insert(&row, Some("{}"), Dedup::None).await.unwrap();
    assert_eq!(dead.claim().await.unwrap().unwrap().row.run_id, hostile);
    dead.journal_mirror()
        .unwrap()
        .append(hostile, r#"{"entry":"started"}"#)
        .unwrap();
    dead.heartbeat().await.unwrap();
    let mut orphans = orphans_seen_by(&b).await;
    assert_eq!(orphans.len(), 1);
    let state_b = StateDir::new(dir_b.path().join("state"));
    let outcome = dryrun::runner::recover(&b, &state_b, orphans.pop().unwrap()).await;
    match outcome {
        Some(dryrun::runner::Recovered::Interrupted(note)) => {
            assert!(note.contains("not a valid run id"), "{note}");
        }
        other => panic!("{other:?}"),
    }
    let escaped = dir_b.path().join("dryrun-escaped");
    assert!(!escaped.exists(), "{} was written", escaped.display());
    let (row, _) = b.get(hostile).await.unwrap().unwrap();
    assert_eq!(row.status, RunStatus::Interrupted);
}
