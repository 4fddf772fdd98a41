//! Crash safety: SIGKILL at any moment, then `dryrun cleanup` leaves nothing; signals tear down.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn journal_lines(state: &Path) -> usize {
    run_ids(state)
        .first()
        .and_then(|id| {
            std::fs::read_to_string(state.join("runs").join(id).join("journal.jsonl")).ok()
        })
        .map_or(0, |t| t.lines().count())
}

fn spawn_run(state: &Path, blueprint: &str, release: &str) -> Child {
    Command::new(bin())
        .current_dir(root())
        .env("DRYRUN_STATE_DIR", state)
        .args(["run", blueprint, "--release", release, "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn cleanup_all(state: &Path) -> (i32, String) {
    let out = run(dryrun(state).args(["cleanup", "--all", "--yes"]));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Kills a run with SIGKILL once its journal has `k` lines (or after `delay`), then checks that
/// cleanup removes everything and that a second cleanup has nothing to do.
fn kill_then_cleanup(blueprint: &str, release: &str, k: Option<usize>, delay: Duration) -> usize {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let mut child = spawn_run(state.path(), blueprint, release);
    let start = Instant::now();
    if let Some(k) = k {
        while journal_lines(state.path()) < k && start.elapsed() < Duration::from_secs(20) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    } else {
        std::thread::sleep(delay);
    }
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    let seen = journal_lines(state.path());
    let (code, out) = cleanup_all(state.path());
    assert_eq!(
        code, 0,
        "cleanup after kill at journal line {seen} failed:\n{out}"
    );
    for id in run_ids(state.path()) {
        assert_nothing_left(state.path(), &id);
    }
    let (code, out) = cleanup_all(state.path());
    assert_eq!(code, 0);
    assert!(
        out.contains("nothing to clean up"),
        "second cleanup should have nothing to do:\n{out}"
    );
    seen
}

#[test]
fn cleanup_after_kill_at_every_journal_step_leaves_nothing() {
    require_demo_shop();
    // A complete run first, to learn how many journal entries a run writes.
    let state = state_dir();
    let out = run(dryrun(state.path()).args([
        "run",
        "blueprints/demo/shop.yaml",
        "--release",
        "blueprints/demo/releases/v2",
        "-q",
    ]));
    assert_eq!(out.status.code(), Some(0));
    let total = journal_lines(state.path());
    assert!(total >= 10, "journal too short: {total}");
    let mut covered = Vec::new();
    for k in 1..=total {
        covered.push(kill_then_cleanup(
            "blueprints/demo/shop.yaml",
            "blueprints/demo/releases/v2",
            Some(k),
            Duration::ZERO,
        ));
    }
    covered.sort_unstable();
    covered.dedup();
    eprintln!("killed at journal positions {covered:?} of {total}");
}

#[test]
fn cleanup_after_kill_at_random_moments_leaves_nothing() {
    require_demo_shop();
    for ms in [0, 3, 10, 25, 50, 90, 140, 200] {
        kill_then_cleanup(
            "blueprints/demo/shop.yaml",
            "blueprints/demo/releases/v2",
            None,
            Duration::from_millis(ms),
        );
    }
}

#[test]
fn cleanup_after_kill_with_a_running_postgres_cluster_leaves_nothing() {
    if !have_postgres() {
        return;
    }
    // Lines: 1 Started, 2 Creating db (cluster being made), 3 Created db (cluster running), ...
    for k in [2, 3, 5, 6] {
        kill_then_cleanup(
            "blueprints/demo/shop-pg.yaml",
            "blueprints/demo/releases/pg-v2",
            Some(k),
            Duration::ZERO,
        );
    }
}

/// A release whose service never becomes healthy and ignores SIGTERM for `term_ignore` seconds.
fn stuck_release(dir: &Path, ignore_term: bool) -> std::path::PathBuf {
    let rel = dir.join("stuck-release");
    std::fs::create_dir_all(&rel).unwrap();
    let start = if ignore_term {
        "trap '' TERM; sleep 60 & wait; sleep 60"
    } else {
        "exec sleep 60"
    };
    let mut f = std::fs::File::create(rel.join("dryrun-release.yaml")).unwrap();
    writeln!(
        f,
        "version: \"9.9.9\"\nstart: \"{start}\"\nhealth:\n  http: /healthz\n  timeout: 60s"
    )
    .unwrap();
    let bp = dir.join("stuck.yaml");
    std::fs::write(
        &bp,
        "name: stuck\nresources:\n  app:\n    type: service\n    ready_timeout: 60s\n",
    )
    .unwrap();
    rel
}

fn wait_for_service_pid(state: &Path) {
    let start = Instant::now();
    loop {
        let id = run_ids(state).first().cloned();
        if let Some(id) = id {
            let j = std::fs::read_to_string(state.join("runs").join(&id).join("journal.jsonl"))
                .unwrap_or_default();
            if j.contains("\"pid\":\"") {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the service never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
fn first_sigint_stops_the_run_and_tears_down() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let rel = stuck_release(state.path(), false);
    let bp = state.path().join("stuck.yaml");
    let mut child = Command::new(bin())
        .env("DRYRUN_STATE_DIR", state.path())
        .args([
            "run",
            bp.to_str().unwrap(),
            "--release",
            rel.to_str().unwrap(),
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_service_pid(state.path());
    let t = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = child.wait().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "teardown after SIGINT took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(3));
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["status"], "error");
    assert!(
        r["failure"]
            .as_str()
            .unwrap()
            .contains("interrupted by SIGINT"),
        "{stdout}"
    );
    assert_eq!(r["left_behind"].as_array().unwrap().len(), 0);
    assert_nothing_left(state.path(), r["run_id"].as_str().unwrap());
}

#[test]
fn second_sigint_abandons_teardown_reports_left_behind_and_cleanup_finishes() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let rel = stuck_release(state.path(), true);
    let bp = state.path().join("stuck.yaml");
    let mut child = Command::new(bin())
        .env("DRYRUN_STATE_DIR", state.path())
        .args([
            "run",
            bp.to_str().unwrap(),
            "--release",
            rel.to_str().unwrap(),
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_service_pid(state.path());
    signal(&child, nix::sys::signal::Signal::SIGINT);
    // The service ignores SIGTERM, so teardown waits out its grace period; interrupt that.
    std::thread::sleep(Duration::from_millis(1000));
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(4), "left behind must exit 4");
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let left = r["left_behind"].as_array().unwrap();
    assert_eq!(left.len(), 1, "{stdout}");
    assert_eq!(left[0]["address"], "service.app");
    let (code, out) = cleanup_all(state.path());
    assert_eq!(code, 0, "{out}");
    assert_nothing_left(state.path(), r["run_id"].as_str().unwrap());
}

#[test]
fn a_service_that_never_becomes_ready_hits_its_deadline_and_names_its_last_state() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let rel = stuck_release(state.path(), false);
    std::fs::write(
        state.path().join("stuck.yaml"),
        "name: stuck\nresources:\n  app:\n    type: service\n    ready_timeout: 2s\n",
    )
    .unwrap();
    let t = Instant::now();
    let out = run(dryrun(state.path()).args([
        "run",
        state.path().join("stuck.yaml").to_str().unwrap(),
        "--release",
        rel.to_str().unwrap(),
        "--json",
    ]));
    assert!(t.elapsed() < Duration::from_secs(15));
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unhealthy release would break"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failure = r["failure"].as_str().unwrap();
    assert!(
        failure.contains("service.app did not become healthy"),
        "{failure}"
    );
    assert!(
        failure.contains("no healthy answer within 2s: last GET /healthz: connection refused"),
        "{failure}"
    );
    assert_eq!(r["left_behind"].as_array().unwrap().len(), 0);
    assert_nothing_left(state.path(), r["run_id"].as_str().unwrap());
}

#[test]
fn teardown_past_its_deadline_reports_what_is_left_and_cleanup_finishes_it() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    // The service ignores SIGTERM, so deleting it takes the 5 s grace period; teardown has 1 s.
    let rel = stuck_release(state.path(), true);
    std::fs::write(
        state.path().join("stuck.yaml"),
        "name: stuck\nresources:\n  app:\n    type: service\n    ready_timeout: 1s\n",
    )
    .unwrap();
    let out = run(dryrun(state.path()).args([
        "run",
        state.path().join("stuck.yaml").to_str().unwrap(),
        "--release",
        rel.to_str().unwrap(),
        "--json",
        "--teardown-timeout",
        "1s",
    ]));
    assert_eq!(
        out.status.code(),
        Some(4),
        "left behind wins over the failed health check"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let left = r["left_behind"].as_array().unwrap();
    assert_eq!(left.len(), 1, "{r}");
    assert_eq!(left[0]["address"], "service.app");
    assert!(
        left[0]["reason"]
            .as_str()
            .unwrap()
            .contains("teardown deadline of 1s passed"),
        "{left:?}"
    );
    let id = r["run_id"].as_str().unwrap();
    let (code, out) = cleanup_all(state.path());
    assert_eq!(code, 0, "{out}");
    assert_nothing_left(state.path(), id);
}

fn tree_digest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let mut ents: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        ents.sort_by_key(std::fs::DirEntry::file_name);
        for e in ents {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// Runs the demo with `DRYRUN_CRASH_AT=k` for every side-effect point k of a run (journal
/// writes, provider create/restore/install/delete/sweep), cleans up after each crash and
/// checks that nothing is left and production is unchanged.
fn crash_at_every_point(blueprint: &str, release: &str) -> usize {
    #[cfg(not(feature = "failpoints"))]
    panic!("build with --features dryrun/failpoints (scripts/test does)");
    let production = root().join("blueprints/demo/production");
    let before = tree_digest(&production);
    // Count the points of a complete run (one resource at a time, so the order is stable).
    let state = state_dir();
    let log = state.path().join("points.log");
    let out = run(dryrun(state.path())
        .env("DRYRUN_FAILPOINT_LOG", &log)
        .args([
            "run",
            blueprint,
            "--release",
            release,
            "-q",
            "--concurrency",
            "1",
        ]));
    assert_eq!(out.status.code(), Some(0));
    let points: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(points.len() >= 20, "too few points: {points:?}");
    for k in 1..=points.len() {
        let state = state_dir();
        let _reaper = Reaper(state.path().to_path_buf());
        let out = dryrun(state.path())
            .env("DRYRUN_CRASH_AT", k.to_string())
            .args([
                "run",
                blueprint,
                "--release",
                release,
                "-q",
                "--concurrency",
                "1",
            ])
            .output()
            .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(6),
            "point {k} ({}) did not abort the run: {:?}",
            points[k - 1],
            out.status
        );
        let (code, text) = cleanup_all(state.path());
        assert_eq!(
            code,
            0,
            "cleanup after a crash at point {k} ({}) failed:\n{text}",
            points[k - 1]
        );
        for id in run_ids(state.path()) {
            assert_nothing_left(state.path(), &id);
        }
        let (_, again) = cleanup_all(state.path());
        assert!(again.contains("nothing to clean up"), "point {k}: {again}");
    }
    assert!(tree_digest(&production) == before, "production changed");
    points.len()
}

#[test]
fn crash_at_every_failpoint_then_cleanup_leaves_nothing() {
    require_demo_shop();
    let n = crash_at_every_point("blueprints/demo/shop.yaml", "blueprints/demo/releases/v2");
    eprintln!("crash points covered (local, SQLite demo): {n}");
}

#[test]
fn crash_at_every_failpoint_with_postgres_then_cleanup_leaves_nothing() {
    if !have_postgres() {
        return;
    }
    let n = crash_at_every_point(
        "blueprints/demo/shop-pg.yaml",
        "blueprints/demo/releases/pg-v2",
    );
    eprintln!("crash points covered (local, PostgreSQL demo): {n}");
}
