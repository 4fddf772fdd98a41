//! Engine tests against a fake provider that fails, hangs and panics on cue.
//!
//! Each test compiles a small blueprint, runs [`run`] with its own state directory and a fake
//! provider, then looks at three witnesses: the provider's call log, the report, and the
//! journal on disk. Checks are `command` checks so they really run, without a network.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use super::{EngineError, RunOptions, Shutdown, Step, run};
use crate::blueprint::{self, Blueprint};
use crate::journal::{self, Entry};
use crate::provider::fake::{Cue, FakeProvider};
use crate::provider::{BackupPick, ProviderError};
use crate::release::Release;
use crate::report::{RunReport, Status, Trigger};
use crate::state::StateDir;

/// No engine run in these tests may take longer than this; a hang fails instead of blocking.
const RUN_LIMIT: Duration = Duration::from_secs(10);

/// Three resources declared in reverse of their dependency order, so that creating them in
/// file order would be wrong: `app` needs `db` and `files`, `files` needs `db`.
const CHAIN: &str = r#"
name: chain
resources:
  app:
    type: service
    env:
      DATABASE_URL: "{{resources.db.url}}"
      UPLOADS_DIR: "{{resources.files.path}}"
  files:
    type: bucket
    source: uploads
    depends_on: [db]
  db:
    type: database
    engine: sqlite
    source: prod-db
checks:
  - name: passes
    type: command
    run: "true"
"#;

/// A temporary state directory and release; dropped (and removed) with the test.
struct Rig {
    dir: TempDir,
    state: StateDir,
    release: Release,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let rel = dir.path().join("release");
    std::fs::create_dir_all(&rel).unwrap();
    std::fs::write(rel.join(crate::release::MANIFEST), "version: \"1.0\"\n").unwrap();
    let release = Release::load(rel.to_str().unwrap()).unwrap();
    let state = StateDir::new(dir.path().join("state"));
    Rig {
        dir,
        state,
        release,
    }
}

impl Rig {
    fn blueprint(&self, yaml: &str) -> Blueprint {
        let path = self.dir.path().join("blueprint.yaml");
        // The fake's databases are not real files: the personal data gate is tested on real
        // SQLite and PostgreSQL copies (tests/privacy.rs).
        let yaml = if yaml.contains("pii_gate") {
            yaml.to_string()
        } else {
            format!("{yaml}\npii_gate: off\n")
        };
        blueprint::compile(&path, &yaml, &BTreeMap::new())
            .unwrap_or_else(|e| panic!("test blueprint does not compile:\n{e}"))
    }

    fn opts(&self) -> RunOptions {
        RunOptions {
            release: self.release.clone(),
            backup: BackupPick::Latest,
            keep: None,
            trigger: Trigger::Cli,
            concurrency: 4,
            run_id: Some("chain-test-run".into()),
            compile_ms: 0,
            teardown_timeout: super::TEARDOWN_TIMEOUT,
            secrets: Vec::new(),
            mirror: None,
            scan: false,
            baseline: None,
            history_ms: Vec::new(),
        }
    }

    async fn try_run(
        &self,
        bp: &Blueprint,
        fake: &Arc<FakeProvider>,
        opts: RunOptions,
        shutdown: Shutdown,
    ) -> Result<RunReport, EngineError> {
        let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
        let provider = fake.clone();
        tokio::time::timeout(
            RUN_LIMIT,
            run(bp, provider, &self.state, opts, events, shutdown),
        )
        .await
        .expect("the engine did not return within the time limit")
    }

    async fn run(&self, yaml: &str, fake: &Arc<FakeProvider>) -> RunReport {
        let bp = self.blueprint(yaml);
        self.try_run(&bp, fake, self.opts(), Shutdown::default())
            .await
            .unwrap()
    }

    fn journal_path(&self, report: &RunReport) -> std::path::PathBuf {
        self.state.run_dir(&report.run_id).join("journal.jsonl")
    }

    fn journal(&self, report: &RunReport) -> Vec<Entry> {
        journal::read(&self.journal_path(report)).unwrap()
    }
}

fn fake(cues: impl IntoIterator<Item = (&'static str, Cue)>) -> Arc<FakeProvider> {
    Arc::new(
        cues.into_iter()
            .fold(FakeProvider::new(), |f, (addr, cue)| f.cue(addr, cue)),
    )
}

/// Status and message of the report's `i`-th check.
fn check_outcome(report: &RunReport, i: usize) -> (Status, Option<&str>) {
    let c = &report.checks[i];
    (c.status, c.message.as_deref())
}

fn position(entries: &[Entry], pred: impl Fn(&Entry) -> bool) -> Option<usize> {
    entries.iter().position(pred)
}

fn creating(address: &str) -> impl Fn(&Entry) -> bool + '_ {
    move |e| matches!(e, Entry::Creating { record } if record.address == address)
}

fn created(address: &str) -> impl Fn(&Entry) -> bool + '_ {
    move |e| matches!(e, Entry::Created { record } if record.address == address)
}

fn is_closed(e: &Entry) -> bool {
    matches!(e, Entry::Closed { .. })
}

fn resource<'r>(report: &'r RunReport, address: &str) -> &'r crate::report::ResourceReport {
    report
        .resources
        .iter()
        .find(|r| r.address == address)
        .unwrap_or_else(|| panic!("no {address} in the report"))
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Waits (in real time, bounded) until the fake has seen `call`.
async fn wait_for_call(fake: &FakeProvider, call: &str) {
    tokio::time::timeout(RUN_LIMIT, async {
        while !fake.calls().iter().any(|c| c == call) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the engine never called `{call}`"));
}

#[tokio::test]
async fn creates_dependencies_first_and_destroys_in_reverse() {
    let rig = rig();
    let fake = fake([]);
    let report = rig.run(CHAIN, &fake).await;

    assert_eq!(report.status, Status::Passed, "{:?}", report.failure);
    // The service is created at once, alongside the database (its create needs nothing from
    // them); the bucket waits for the database; the install waits for both restores.
    assert_eq!(
        fake.calls_to("create"),
        ["database.db", "service.app", "bucket.files"]
    );
    let calls = fake.calls();
    let at = |c: &str| {
        calls
            .iter()
            .position(|x| x == c)
            .unwrap_or_else(|| panic!("no `{c}` in {calls:?}"))
    };
    assert!(
        at("create database.db") < at("create bucket.files"),
        "{calls:?}"
    );
    assert!(
        at("restore database.db") < at("install service.app"),
        "{calls:?}"
    );
    assert!(
        at("restore bucket.files") < at("install service.app"),
        "{calls:?}"
    );
    // The timeline in the report: each resource's steps, the service's install after both
    // restores ended.
    let span = |a: &str, step: Step| {
        resource(&report, a)
            .steps
            .iter()
            .find(|s| s.step == step)
            .cloned()
            .unwrap_or_else(|| panic!("no {step} step of {a}"))
    };
    let install = span("service.app", Step::Install);
    for a in ["database.db", "bucket.files"] {
        let r = span(a, Step::Restore);
        assert!(
            r.start_ms + r.duration_ms <= install.start_ms,
            "{r:?} {install:?}"
        );
        assert_eq!(r.status, Status::Passed);
    }
    // A span's start is its end minus its duration, both truncated to whole milliseconds: two
    // spans that start in the same millisecond can come out 1 ms apart either way.
    assert!(
        span("service.app", Step::Create).start_ms
            <= span("database.db", Step::Restore).start_ms + 1
    );
    assert_eq!(span("service.app", Step::Delete).status, Status::Passed);
    assert_eq!(
        fake.calls_to("delete"),
        ["service.app", "bucket.files", "database.db"]
    );
    let last_create = fake.calls().iter().rposition(|c| c.starts_with("create"));
    let first_delete = fake.calls().iter().position(|c| c.starts_with("delete"));
    assert!(last_create < first_delete, "{:?}", fake.calls());
}

#[tokio::test]
async fn every_create_is_journaled_before_it_happens() {
    let rig = rig();
    let fake = fake([(
        "bucket.files",
        Cue::FailCreate(ProviderError::Other("quota exceeded (fake)".into())),
    )]);
    let report = rig.run(CHAIN, &fake).await;
    let entries = rig.journal(&report);

    // At the moment of each create, its Creating entry was already on disk.
    let seen = fake.journaled_before_create();
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["bucket.files", "database.db", "service.app"]
    );
    assert!(seen.values().all(|&on_disk| on_disk), "{seen:?}");

    let db_creating = position(&entries, creating("database.db")).expect("Creating database.db");
    let db_created = position(&entries, created("database.db")).expect("Created database.db");
    assert!(db_creating < db_created, "{entries:#?}");

    // The failed create is journaled, never confirmed, and still deleted in teardown.
    assert!(position(&entries, creating("bucket.files")).is_some());
    assert!(position(&entries, created("bucket.files")).is_none());
    assert!(
        fake.calls_to("delete")
            .contains(&"bucket.files".to_string())
    );
    // The service created early, never installed, is deleted too.
    assert!(fake.calls_to("delete").contains(&"service.app".to_string()));
    assert!(!fake.calls().iter().any(|c| c.starts_with("install")));
    assert!(
        entries
            .iter()
            .any(|e| matches!(e, Entry::Deleted { address } if address == "bucket.files"))
    );
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
}

#[tokio::test]
async fn dependent_of_failed_resource_is_skipped_upstream_failed() {
    let rig = rig();
    let fake = fake([(
        "database.db",
        Cue::FailCreate(ProviderError::Other("no capacity (fake)".into())),
    )]);
    let report = rig.run(CHAIN, &fake).await;

    // The service was created alongside the database (early), then skipped at install and
    // deleted; the bucket waited for the database and was never planned.
    assert_eq!(fake.calls_to("create"), ["database.db", "service.app"]);
    for dependent in ["bucket.files", "service.app"] {
        let r = resource(&report, dependent);
        assert_eq!(r.status, Status::Skipped, "{r:?}");
        let msg = r.message.as_deref().unwrap_or_default();
        assert!(msg.contains("skipped: upstream failed"), "{msg}");
    }
    assert!(resource(&report, "bucket.files").id.is_empty());
    let app = resource(&report, "service.app");
    assert!(app.destroyed, "{app:?}");
    // Its timeline: created, skipped at install, deleted.
    let steps: Vec<(Step, Status)> = app.steps.iter().map(|s| (s.step, s.status)).collect();
    assert_eq!(
        steps,
        [
            (Step::Create, Status::Passed),
            (Step::Install, Status::Skipped),
            (Step::Delete, Status::Passed)
        ],
        "{app:?}"
    );
    assert!(fake.calls_to("delete").contains(&"service.app".to_string()));
    assert!(!fake.calls().iter().any(|c| c.starts_with("install")));
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
    assert_eq!(resource(&report, "database.db").status, Status::Error);
    assert_eq!(report.status, Status::Error);
    assert_eq!(report.exit_code, 3);
    assert!(report.checks.iter().all(|c| c.status == Status::Skipped));
}

#[tokio::test]
async fn teardown_runs_after_check_failure() {
    let rig = rig();
    let fake = fake([]);
    let yaml = CHAIN.replace(r#"run: "true""#, r#"run: "exit 3""#);
    let report = rig.run(&yaml, &fake).await;

    assert_eq!(
        report.checks[0].status,
        Status::Failed,
        "{:?}",
        report.checks
    );
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.exit_code, 1);
    assert_eq!(
        sorted(fake.calls_to("delete")),
        sorted(fake.calls_to("create"))
    );
    assert!(
        report.resources.iter().all(|r| r.destroyed),
        "{:?}",
        report.resources
    );
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
    assert!(rig.journal(&report).iter().any(is_closed));
}

#[tokio::test]
async fn a_check_the_provider_could_not_run_is_an_error_exit_3_not_a_release_failure() {
    let rig = rig();
    let fake = fake([("check.passes", Cue::FailProbe(u32::MAX))]);
    let yaml = format!("{CHAIN}  - name: breaks\n    type: command\n    run: \"exit 3\"\n");
    let report = rig.run(&yaml, &fake).await;

    assert_eq!(
        check_outcome(&report, 0),
        (
            Status::Error,
            Some(
                "could not run: send an SSM command to i-0fake: Throttling: Rate exceeded (fake; 4294967294 more to come)"
            )
        )
    );
    assert_eq!(report.checks[1].status, Status::Failed);
    // Nothing was learnt about the release from `passes`: the run is incomplete (3), and the
    // failure line names the check that could not run.
    assert_eq!(report.status, Status::Error);
    assert_eq!(report.exit_code, 3);
    assert!(
        report
            .failure
            .as_deref()
            .unwrap()
            .starts_with("check `passes` could not run: send an SSM command"),
        "{:?}",
        report.failure
    );
    assert_eq!(
        report
            .stage(crate::report::Stage::Check)
            .unwrap()
            .message
            .as_deref(),
        Some("failed: breaks; could not run: passes")
    );
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
    assert_eq!(
        sorted(fake.calls_to("delete")),
        sorted(fake.calls_to("create"))
    );
}

#[tokio::test]
async fn a_copy_that_does_not_answer_a_remote_check_fails_it_exit_1() {
    let rig = rig();
    let fake = fake([("check.passes", Cue::NoAnswer)]);
    let report = rig.run(CHAIN, &fake).await;

    assert_eq!(
        check_outcome(&report, 0),
        (
            Status::Failed,
            Some(
                "GET http://10.0.0.5:8080/ from i-0fake: curl exit code 7: Connection refused (ran through SSM command c-1 on i-0fake)"
            )
        )
    );
    assert_eq!(report.exit_code, 1);
}

#[tokio::test]
async fn a_local_check_past_its_timeout_fails_a_provider_that_never_runs_it_is_an_error() {
    let rig = rig();
    let fake = fake([("check.stuck", Cue::HangProbe)]);
    let yaml = CHAIN.replace(
        r#"run: "true""#,
        "run: \"sleep 5\"\n    timeout: 200ms\n  - name: stuck\n    type: command\n    run: \"true\"\n    timeout: 100ms",
    );
    let started = std::time::Instant::now();
    let report = rig.run(&yaml, &fake).await;

    // The command ran here and hung: the release is to blame.
    assert_eq!(
        check_outcome(&report, 0),
        (Status::Failed, Some("timed out after 200ms"))
    );
    // The provider never ran it: nothing was learnt.
    assert_eq!(
        check_outcome(&report, 1),
        (
            Status::Error,
            Some("could not run: the fake provider did not run it within 400ms")
        )
    );
    assert_eq!(report.exit_code, 3);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_check_whose_probe_fails_once_is_retried_and_passes() {
    let rig = rig();
    let fake = fake([("check.passes", Cue::FailProbe(1))]);
    let yaml = CHAIN.replace(
        r#"run: "true""#,
        "run: \"true\"\n    retries: 1\n    interval: 10ms",
    );
    let report = rig.run(&yaml, &fake).await;

    assert_eq!(
        report.checks[0].status,
        Status::Passed,
        "{:?}",
        report.checks
    );
    assert_eq!(report.checks[0].attempts, 2);
    // (The migration monitor asks too whether the SQLite copy is on this machine.)
    let checks: Vec<String> = fake
        .calls_to("probe")
        .into_iter()
        .filter(|c| c != "check.migration monitor")
        .collect();
    assert_eq!(checks, ["check.passes", "check.passes"]);
    assert_eq!(report.exit_code, 0, "{:?}", report.failure);
}

#[tokio::test]
async fn install_failure_is_a_release_failure_exit_1() {
    let rig = rig();
    let fake = fake([("service.app", Cue::FailInstall)]);
    let report = rig.run(CHAIN, &fake).await;

    assert_eq!(fake.calls_to("install"), ["service.app"]);
    assert_eq!(report.status, Status::Failed, "{:?}", report.failure);
    assert_eq!(report.exit_code, 1);
    let failure = report.failure.as_deref().unwrap_or_default();
    assert!(
        failure.contains("install of service.app failed"),
        "{failure}"
    );
    assert_eq!(resource(&report, "service.app").status, Status::Failed);
    assert_eq!(
        report.stage(crate::report::Stage::Install).unwrap().status,
        Status::Failed
    );
    assert!(report.checks.iter().all(|c| c.status == Status::Skipped));
    assert_eq!(
        fake.calls_to("delete"),
        ["service.app", "bucket.files", "database.db"]
    );
    assert!(report.left_behind.is_empty());
}

#[tokio::test]
async fn restore_failure_is_an_infrastructure_error_exit_3() {
    let rig = rig();
    let fake = fake([("database.db", Cue::FailRestore)]);
    let report = rig.run(CHAIN, &fake).await;

    assert_eq!(fake.calls_to("restore"), ["database.db"]);
    assert_eq!(fake.calls_to("create"), ["database.db", "service.app"]);
    assert_eq!(report.status, Status::Error, "{:?}", report.failure);
    assert_eq!(report.exit_code, 3);
    let failure = report.failure.as_deref().unwrap_or_default();
    assert!(
        failure.contains("restore of database.db failed"),
        "{failure}"
    );
    assert_eq!(
        report.stage(crate::report::Stage::Restore).unwrap().status,
        Status::Error
    );
    assert_eq!(fake.calls_to("delete"), ["service.app", "database.db"]);
    assert!(report.left_behind.is_empty());
}

#[tokio::test]
async fn panicking_provider_still_tears_down() {
    let rig = rig();
    let fake = fake([("bucket.files", Cue::PanicCreate)]);
    let report = rig.run(CHAIN, &fake).await;

    assert_eq!(report.status, Status::Error);
    assert_eq!(report.exit_code, 3);
    let failure = report.failure.as_deref().unwrap_or_default();
    assert!(failure.contains("panicked"), "{failure}");
    assert_eq!(
        fake.calls_to("create"),
        ["database.db", "service.app", "bucket.files"]
    );
    // The panicking resource was journaled before create, so it is deleted like the rest.
    assert_eq!(
        fake.calls_to("delete"),
        ["service.app", "bucket.files", "database.db"]
    );
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
    assert!(rig.journal(&report).iter().any(is_closed));
}

/// When one provisioning task panics while an unrelated one is still running, only the
/// panicking resource is to blame.
#[tokio::test]
async fn panic_blames_only_the_panicking_resource() {
    let rig = rig();
    let yaml = r#"
name: siblings
resources:
  slow:
    type: database
    engine: sqlite
    source: prod-db
  boom:
    type: bucket
    source: uploads
  app:
    type: service
    env:
      DATABASE_URL: "{{resources.slow.url}}"
"#;
    let fake = fake([
        ("database.slow", Cue::SlowCreate(Duration::from_millis(300))),
        ("bucket.boom", Cue::PanicCreate),
    ]);
    let report = rig.run(yaml, &fake).await;

    assert_eq!(resource(&report, "database.slow").status, Status::Passed);
    let app = resource(&report, "service.app");
    let msg = app.message.as_deref().unwrap_or_default();
    assert!(
        !msg.contains("database.slow"),
        "service.app is blamed on database.slow, which passed: {msg}"
    );
    assert_eq!(
        fake.calls_to("create"),
        ["database.slow", "bucket.boom", "service.app"]
    );
    let boom = resource(&report, "bucket.boom");
    assert_eq!(boom.status, Status::Error);
    let why = boom.message.as_deref().unwrap_or_default();
    assert!(
        why.contains("panicked"),
        "bucket.boom has no reason: {boom:?}"
    );
}

#[tokio::test]
async fn hanging_create_is_cancelled_by_soft_shutdown_and_torn_down() {
    let rig = rig();
    let fake = fake([("bucket.files", Cue::HangCreate)]);
    let bp = rig.blueprint(CHAIN);
    let shutdown = Shutdown::default();
    *shutdown.reason.lock().unwrap() = Some("SIGINT".into());
    let soft = shutdown.soft.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        soft.cancel();
    });
    let report = rig.try_run(&bp, &fake, rig.opts(), shutdown).await.unwrap();

    assert_eq!(report.status, Status::Error);
    assert_eq!(report.exit_code, 3);
    let failure = report.failure.as_deref().unwrap_or_default();
    assert!(failure.contains("interrupted by SIGINT"), "{failure}");
    assert_eq!(
        fake.calls_to("create"),
        ["database.db", "service.app", "bucket.files"]
    );
    assert_eq!(
        fake.calls_to("delete"),
        ["service.app", "bucket.files", "database.db"]
    );
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
    let app = resource(&report, "service.app");
    assert!(
        app.message
            .as_deref()
            .unwrap_or_default()
            .contains("interrupted"),
        "{app:?}"
    );
    assert!(report.checks.iter().all(|c| c.status == Status::Skipped));
}

#[tokio::test]
async fn hard_shutdown_during_teardown_reports_left_behind() {
    let rig = rig();
    let fake = fake([("service.app", Cue::HangDelete)]);
    let bp = rig.blueprint(CHAIN);
    let shutdown = Shutdown::default();
    let hard = shutdown.hard.clone();
    let watcher = fake.clone();
    tokio::spawn(async move {
        wait_for_call(&watcher, "delete service.app").await;
        hard.cancel();
    });
    let report = rig.try_run(&bp, &fake, rig.opts(), shutdown).await.unwrap();

    assert_eq!(report.exit_code, 4);
    let left: Vec<&str> = report
        .left_behind
        .iter()
        .map(|l| l.address.as_str())
        .collect();
    assert_eq!(left, ["service.app", "bucket.files", "database.db"]);
    assert!(
        report
            .left_behind
            .iter()
            .all(|l| l.reason.contains("second signal") && l.reason.contains("dryrun cleanup")),
        "{:?}",
        report.left_behind
    );
    assert_eq!(fake.calls_to("delete"), ["service.app"]);
    assert!(
        fake.calls_to("sweep").is_empty(),
        "no sweep after the second signal"
    );

    let entries = rig.journal(&report);
    assert!(!entries.iter().any(is_closed), "{entries:#?}");
    let state = journal::replay(&entries);
    assert!(!state.closed);
    assert_eq!(state.live.len(), 3, "{:?}", state.live);
}

/// First Ctrl-C while a create hangs, second while a delete hangs: the one-line failure must
/// not claim the copy is gone when the report lists what is left of it.
#[tokio::test]
async fn interrupted_run_with_left_behind_does_not_claim_teardown() {
    let rig = rig();
    let fake = fake([
        ("bucket.files", Cue::HangCreate),
        ("database.db", Cue::HangDelete),
    ]);
    let bp = rig.blueprint(CHAIN);
    let shutdown = Shutdown::default();
    let (soft, hard) = (shutdown.soft.clone(), shutdown.hard.clone());
    let watcher = fake.clone();
    tokio::spawn(async move {
        wait_for_call(&watcher, "create bucket.files").await;
        soft.cancel();
        wait_for_call(&watcher, "delete database.db").await;
        hard.cancel();
    });
    let report = rig.try_run(&bp, &fake, rig.opts(), shutdown).await.unwrap();

    assert_eq!(report.exit_code, 4);
    let left: Vec<&str> = report
        .left_behind
        .iter()
        .map(|l| l.address.as_str())
        .collect();
    assert_eq!(left, ["database.db"]);
    let failure = report.failure.as_deref().unwrap_or_default();
    assert!(!failure.contains("was torn down"), "{failure}");
}

#[tokio::test]
async fn failed_delete_is_left_behind_and_exit_4() {
    let rig = rig();
    let fake = fake([("database.db", Cue::FailDelete)]);
    let report = rig.run(CHAIN, &fake).await;

    assert_eq!(report.status, Status::Passed);
    assert_eq!(report.exit_code, 4);
    // The failed delete is tried three times in all; teardown goes on past the failure.
    assert_eq!(
        fake.calls_to("delete"),
        [
            "service.app",
            "bucket.files",
            "database.db",
            "database.db",
            "database.db"
        ]
    );
    assert_eq!(report.left_behind.len(), 1, "{:?}", report.left_behind);
    let left = &report.left_behind[0];
    assert_eq!(left.address, "database.db");
    assert_eq!(left.id, "fake-db");
    assert!(left.reason.contains("busy"), "{left:?}");
    assert!(!resource(&report, "database.db").destroyed);

    let entries = rig.journal(&report);
    assert!(
        entries
            .iter()
            .any(|e| matches!(e, Entry::DeleteFailed { address, .. } if address == "database.db")),
        "{entries:#?}"
    );
    assert!(!entries.iter().any(is_closed));
    assert!(
        entries
            .iter()
            .any(|e| matches!(e, Entry::Finished { left_behind: 1, .. }))
    );
}

#[tokio::test]
async fn a_guard_refusal_in_teardown_is_not_retried() {
    let rig = rig();
    let fake = fake([("database.db", Cue::GuardDelete)]);
    let report = rig.run(CHAIN, &fake).await;
    assert_eq!(report.exit_code, 4);
    assert_eq!(
        fake.calls_to("delete"),
        ["service.app", "bucket.files", "database.db"]
    );
    assert!(
        report.left_behind[0]
            .reason
            .contains("no dryrun:run-id tag")
    );
}

#[tokio::test]
async fn successful_run_closes_journal() {
    let rig = rig();
    let fake = fake([("database.db", Cue::Ok)]);
    let report = rig.run(CHAIN, &fake).await;

    assert_eq!(report.status, Status::Passed, "{:?}", report.failure);
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.checks[0].status, Status::Passed);
    assert_eq!(fake.calls_to("sweep"), std::slice::from_ref(&report.run_id));
    let state = journal::replay(&rig.journal(&report));
    assert!(state.closed);
    assert!(state.live.is_empty(), "{:?}", state.live);
    assert_eq!(state.status.as_deref(), Some("passed"));
}

#[tokio::test]
async fn a_failed_sweep_is_tried_again_and_only_a_lasting_failure_is_left_behind() {
    let first = rig();
    let fake = Arc::new(FakeProvider::new().fail_sweeps(2));
    let report = first.run(CHAIN, &fake).await;
    assert_eq!(fake.calls_to("sweep").len(), 3, "{:?}", fake.calls());
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
    assert_eq!(report.exit_code, 0);

    let rig2 = rig();
    let fake = Arc::new(FakeProvider::new().fail_sweeps(3));
    let report = rig2.run(CHAIN, &fake).await;
    assert_eq!(fake.calls_to("sweep").len(), 3, "{:?}", fake.calls());
    assert_eq!(report.left_behind.len(), 1, "{:?}", report.left_behind);
    assert!(
        report.left_behind[0].reason.contains("sweep failed: "),
        "{:?}",
        report.left_behind
    );
    assert_eq!(report.exit_code, crate::report::exit::LEFT_BEHIND);
}

#[tokio::test]
async fn teardown_policy_keep_keeps_resources_and_records_expiry() {
    let rig = rig();
    let fake = fake([]);
    let yaml = format!("{CHAIN}teardown:\n  policy: keep\n  keep_for: 2h\n");
    let before = chrono::Utc::now();
    let report = rig.run(&yaml, &fake).await;

    assert!(fake.calls_to("delete").is_empty(), "{:?}", fake.calls());
    assert!(fake.calls_to("sweep").is_empty());
    let until = report.kept_until.expect("kept_until is set");
    let expected = before + chrono::Duration::hours(2);
    assert!(
        (until - expected).num_seconds().abs() < 60,
        "kept until {until}, expected about {expected}"
    );
    assert!(report.resources.iter().all(|r| !r.destroyed));
    assert_eq!(report.exit_code, 0);

    let entries = rig.journal(&report);
    assert!(entries.contains(&Entry::Kept { until }), "{entries:#?}");
    assert!(!entries.iter().any(is_closed));
    let state = journal::replay(&entries);
    assert_eq!(state.kept_until, Some(until));
    assert_eq!(state.live.len(), 3);
}

#[tokio::test]
async fn missing_secret_creates_nothing() {
    const VAR: &str = "DRYRUN_ENGINE_TEST_UNSET_SECRET_5D1E8B";
    assert!(std::env::var_os(VAR).is_none(), "{VAR} must not be set");
    let rig = rig();
    let fake = fake([]);
    let yaml = CHAIN.replacen(
        "resources:",
        &format!("secrets:\n  api_token:\n    env: {VAR}\nresources:"),
        1,
    );
    let bp = rig.blueprint(&yaml);
    let err = rig
        .try_run(&bp, &fake, rig.opts(), Shutdown::default())
        .await
        .unwrap_err();

    assert!(
        matches!(&err, EngineError::MissingSecret { name, env } if name == "api_token" && env == VAR),
        "{err:?}"
    );
    assert!(err.to_string().contains(VAR), "{err}");
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    assert!(!rig.state.runs_dir().exists(), "no journal was started");
}

/// The secret's value reaches the engine through the blueprint's `default` rather than an
/// exported variable: `std::env::set_var` is `unsafe` in edition 2024 (other test threads read
/// the environment) and the crate denies `unsafe_code`. Both sources take the same path into
/// the template context and the redactor.
#[tokio::test]
async fn secrets_never_reach_report_or_journal() {
    const VALUE: &str = "canary-3f9c2e71b8d4-not-for-reports";
    const VAR: &str = "DRYRUN_ENGINE_TEST_CANARY_9A4C1F";
    assert!(std::env::var_os(VAR).is_none(), "{VAR} must not be set");
    let rig = rig();
    let fake = fake([]);
    let yaml = format!(
        r#"
name: canary
secrets:
  api_token:
    env: {VAR}
    default: {VALUE}
resources:
  db:
    type: database
    engine: sqlite
    source: prod-db
  app:
    type: service
    env:
      DATABASE_URL: "{{{{resources.db.url}}}}"
      API_TOKEN: "{{{{secrets.api_token}}}}"
checks:
  - name: leaks-token
    type: command
    run: "echo token={{{{secrets.api_token}}}}; exit 3"
"#
    );
    let report = rig.run(&yaml, &fake).await;

    assert_eq!(report.status, Status::Failed, "{:?}", report.failure);
    let check = &report.checks[0];
    assert_eq!(
        check.output.as_deref().map(str::trim),
        Some("token=[redacted]"),
        "{check:?}"
    );

    let json = serde_json::to_string(&report).unwrap();
    assert!(!json.contains(VALUE), "{json}");
    assert!(json.contains("token=[redacted]"), "{json}");
    let on_disk =
        std::fs::read_to_string(rig.state.run_dir(&report.run_id).join("report.json")).unwrap();
    assert!(!on_disk.contains(VALUE));
    let journal = std::fs::read_to_string(rig.journal_path(&report)).unwrap();
    assert!(!journal.contains(VALUE), "{journal}");
}

#[tokio::test]
async fn concurrency_limit_is_respected() {
    let rig = rig();
    let fake = Arc::new(FakeProvider::new().create_delay(Duration::from_millis(100)));
    let yaml = r#"
name: wide
resources:
  a: {type: bucket, source: a}
  b: {type: bucket, source: b}
  c: {type: bucket, source: c}
  d: {type: bucket, source: d}
"#;
    let bp = rig.blueprint(yaml);
    let opts = RunOptions {
        concurrency: 2,
        ..rig.opts()
    };
    let report = rig
        .try_run(&bp, &fake, opts, Shutdown::default())
        .await
        .unwrap();

    assert_eq!(report.status, Status::Passed, "{:?}", report.failure);
    assert_eq!(fake.calls_to("create").len(), 4);
    assert_eq!(fake.max_concurrent_creates(), 2);
}
