//! The AWS provider under injected cloud faults and crashes, against moto server.
//!
//! - Faults: a proxy between `dryrun` and the emulator ([`faults`]) throttles 30 % of the
//!   requests, fails 5 % with HTTP 500/503 (half of them after the emulator acted), loses the
//!   answers of creates and deletes more often, and adds latency. Twenty runs of the reference
//!   blueprint must each pass or fail cleanly, leave no duplicate and nothing behind.
//! - Non-retryable errors fail the run at the first attempt; throttling that never ends fails
//!   after the configured attempts with a message that says so.
//! - Crashes (`failpoints` feature): the run aborts at every side-effect point in turn — each
//!   journal write, each provider step, before and after every mutating AWS request — and
//!   `dryrun cleanup` must leave nothing tagged in the emulator, production unchanged.
//!
//! The emulator cannot run SSM commands, so the reference run exits 3 there (its http checks
//! "printed no result" and could not run; tests/aws.rs explains); these tests compare against
//! that outcome. The crash and fault tests also run with the instance simulator in front of the
//! emulator (scripts/aws_sim.py), where the instance side runs for real and the reference run
//! passes; its sandboxes are part of what must not be left behind.
#![cfg(feature = "aws")]

mod common;
#[path = "aws/faults.rs"]
mod faults;
#[path = "aws/moto.rs"]
mod moto;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use faults::{FaultProxy, Faults, Stats};
use moto::{Moto, PROD_BUCKET, PROD_DB};

const BLUEPRINT: &str = "blueprints/aws/shop.yaml";
const RELEASE: &str = "s3://shop-releases/shop-2.0.0.tar.gz";

/// `dryrun ARGS` against `endpoint` (moto or a proxy in front of it).
fn dryrun_at(m: &Moto, endpoint: &str, state: &Path) -> Command {
    let mut c = dryrun(state);
    m.env(&mut c);
    c.env("AWS_ENDPOINT_URL", endpoint);
    c
}

fn run_args(m: &Moto, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "run",
        BLUEPRINT,
        "--provider",
        "aws",
        "--release",
        RELEASE,
        "--json",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    for p in [
        format!("source_db={PROD_DB}"),
        format!("assets_bucket={PROD_BUCKET}"),
        format!("ami={}", m.ami),
    ] {
        v.push("--param".into());
        v.push(p);
    }
    v.extend(extra.iter().map(ToString::to_string));
    v
}

fn cleanup_all(m: &Moto, state: &Path) -> Output {
    dryrun_at(m, &m.endpoint, state)
        .args(["cleanup", "--all", "--provider", "aws", "--yes"])
        .output()
        .unwrap()
}

fn seed() -> u64 {
    std::env::var("DRYRUN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// Every instance the emulator ever launched for a run, terminated ones included.
fn instances_of_run(m: &Moto, run_id: &str) -> Vec<(String, String)> {
    m.rt.block_on(async {
        let out = m
            .ec2
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:dryrun:run-id")
                    .values(run_id)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap().to_string(),
                    i.state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                )
            })
            .collect()
    })
}

fn check_status(r: &serde_json::Value, name: &str) -> String {
    r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| c["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The instances a run reported terminating as duplicates of a retried RunInstances.
fn reconciled(stderr: &str) -> usize {
    stderr
        .lines()
        .filter_map(|l| l.split("a retried RunInstances launched ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}

struct Outcome {
    code: Option<i32>,
    run_id: String,
    report: serde_json::Value,
    stderr: String,
    took: Duration,
}

#[test]
fn twenty_reference_runs_under_injected_faults_pass_or_fail_cleanly_and_leave_nothing() {
    let Some(m) = Moto::start() else { return };
    twenty_runs_under_faults(&m);
}

/// The same twenty runs with the instance simulator behind the fault proxy: the install wait
/// and the checks run on the instances for real, so a run passes (exit 0) unless retries ran
/// out, and the sandboxes are part of "nothing left".
#[test]
fn twenty_reference_runs_under_injected_faults_on_the_instance_simulator() {
    let Some(m) = Moto::start_sim() else { return };
    twenty_runs_under_faults(&m);
}

fn twenty_runs_under_faults(m: &Moto) {
    let sim = m.sim_dir.is_some();
    let seed = seed();
    eprintln!("fault seed {seed} (replay with DRYRUN_FAULT_SEED={seed})");
    let creates_and_deletes = [
        "RunInstances",
        "RestoreDBInstanceFromDBSnapshot",
        "ModifyDBInstance",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "TerminateInstances",
        "DeleteDBInstance",
        "DeleteSecurityGroup",
        "PUT",
        "DELETE",
        "CopyObject",
        "SendCommand",
    ];
    let proxy = FaultProxy::start(
        &m.endpoint,
        Faults {
            seed,
            throttle: 0.30,
            server_error: 0.05,
            latency: Duration::from_millis(100),
            slow: 0.02,
            lose_answers: creates_and_deletes.iter().map(|op| (*op, 0.10)).collect(),
            deny: BTreeMap::new(),
        },
    );
    let before = m.production();
    const RUNS: usize = 20;
    const WORKERS: usize = 10;
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (m, proxy) = (&m, &proxy);
                s.spawn(move || {
                    (0..RUNS / WORKERS)
                        .map(|_| {
                            let state = state_dir();
                            let started = Instant::now();
                            let out = dryrun_at(m, &proxy.endpoint, state.path())
                                .args(run_args(m, &[]))
                                .output()
                                .unwrap();
                            let took = started.elapsed();
                            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                            let report: serde_json::Value = serde_json::from_slice(&out.stdout)
                                .unwrap_or_else(|e| {
                                    panic!("no report on stdout ({e}); stderr:\n{stderr}")
                                });
                            Outcome {
                                code: out.status.code(),
                                run_id: report["run_id"].as_str().unwrap_or_default().into(),
                                report,
                                stderr,
                                took,
                            }
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
    assert_eq!(outcomes.len(), RUNS);

    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let (mut duplicates, mut reconciled_total, mut retries_ran_out) = (0, 0, 0);
    for o in &outcomes {
        let checks: Vec<String> = o.report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("{} {}: {}", c["name"], c["status"], c["message"]))
            .collect();
        let ctx = format!(
            "run {} (exit {:?}), failure {}\nleft behind: {}\nchecks:\n{}\n{}",
            o.run_id,
            o.code,
            o.report["failure"],
            o.report["left_behind"],
            checks.join("\n"),
            o.stderr
        );
        *by_code.entry(format!("{:?}", o.code)).or_default() += 1;
        assert!(!o.stderr.contains("panicked"), "{ctx}");
        let failure = o.report["failure"].as_str().unwrap_or_default();
        if sim && o.code == Some(0) {
            // Passed on the simulator: every check but the skipped sql one ran and passed.
            for name in ["homepage", "release-version-served", "release-installed"] {
                assert_eq!(check_status(&o.report, name), "passed", "{ctx}");
            }
        } else {
            assert_eq!(
                o.code,
                Some(3),
                "a run ends with 3 (the emulator's http checks could not run, or retries ran out), never 1 or 4: {ctx}"
            );
        }
        assert!(
            o.report["left_behind"].as_array().unwrap().is_empty(),
            "{ctx}"
        );
        // Passed or failed cleanly: the same checks as without faults, or a clear reason. Faults
        // never fail a check (that would blame the release); a check they stop is `error`.
        for c in o.report["checks"].as_array().unwrap() {
            let message = c["message"].as_str().unwrap_or_default();
            match c["status"].as_str().unwrap() {
                "failed" => panic!("a fault failed check {}: {ctx}", c["name"]),
                "error" => assert!(
                    message.contains("printed no result")
                        || message.contains("attempts, with backoff"),
                    "{ctx}"
                ),
                _ => {}
            }
        }
        if failure.contains("attempts, with backoff")
            || (sim && failure.contains("the instance could not fetch the release"))
        {
            // Provisioning, teardown, or a check whose SSM calls never got through; on the
            // simulator also the instance's own download of the release, whose curl retries
            // (5) the faults outlasted: an infrastructure error (3), not the release's.
            assert_eq!(o.code, Some(3), "{ctx}");
            eprintln!("run {} failed cleanly: {failure}", o.run_id);
            retries_ran_out += 1;
        } else if sim {
            assert_eq!(o.code, Some(0), "{ctx}");
        } else {
            // The emulator's verdict.
            assert!(
                failure.starts_with("check `homepage` could not run: SSM command ")
                    && failure.contains("printed no result"),
                "{ctx}"
            );
            assert_eq!(
                check_status(&o.report, "release-installed"),
                "passed",
                "{ctx}"
            );
            assert_eq!(
                check_status(&o.report, "customers-restored"),
                "skipped",
                "{ctx}"
            );
        }
        // No duplicate left: every instance beyond the one the run kept was terminated by the
        // run itself, at once after the launch (and it said so).
        let launched = instances_of_run(m, &o.run_id);
        assert!(
            launched.iter().all(|(_, state)| state == "terminated"),
            "{launched:?}\n{ctx}"
        );
        let extra = launched.len().saturating_sub(1);
        duplicates += extra;
        let said = reconciled(&o.stderr);
        reconciled_total += said;
        if o.report["resources"].as_array().unwrap().iter().any(|r| {
            r["address"] == "service.app" && r["id"].as_str().is_some_and(|i| i.starts_with("i-"))
        }) {
            assert_eq!(
                said, extra,
                "duplicates reconciled by the run: {launched:?}\n{ctx}"
            );
        }
    }
    assert!(m.tagged(None).is_empty(), "left: {:?}", m.tagged(None));
    assert!(
        m.sandboxes().is_empty(),
        "sandboxes left: {:?}",
        m.sandboxes()
    );
    assert_eq!(m.production(), before, "production changed");

    let st: Stats = proxy.stats();
    // Only the run's own names were ever created: one restore, one group per run at most.
    for op in [
        "rds:RestoreDBInstanceFromDBSnapshot",
        "ec2:CreateSecurityGroup",
    ] {
        let ok = st.forwarded.get(&format!("{op} 2xx")).copied().unwrap_or(0);
        assert!(
            ok <= RUNS as u64,
            "{op} succeeded {ok} times for {RUNS} runs"
        );
    }
    let slowest = outcomes.iter().max_by_key(|o| o.took).unwrap();
    let stages: Vec<String> = slowest.report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {} ms", s["name"].as_str().unwrap(), s["duration_ms"]))
        .collect();
    eprintln!("slowest run {}: {}", slowest.run_id, stages.join(", "));
    let mut took: Vec<Duration> = outcomes.iter().map(|o| o.took).collect();
    took.sort();
    eprintln!(
        "fault injection{}: {RUNS} runs, exit codes {by_code:?} ({retries_ran_out} with retries run out), {} requests, {} throttled, {} 5xx before, {} answers lost after the emulator acted, {:.1} s latency added; duplicate instances launched by the emulator {duplicates}, reconciled by the runs {reconciled_total}, left 0; run time median {:.1} s, max {:.1} s",
        if sim { " (instance simulator)" } else { "" },
        Stats::total(&st.requests),
        Stats::total(&st.throttled),
        Stats::total(&st.failed_before),
        Stats::total(&st.lost_answers),
        st.latency.as_secs_f64(),
        took[RUNS / 2].as_secs_f64(),
        took[RUNS - 1].as_secs_f64(),
    );
    assert!(
        Stats::total(&st.throttled) > 100 && Stats::total(&st.lost_answers) > 10,
        "the faults were injected: {st:?}"
    );
}

#[test]
fn a_non_retryable_error_fails_the_run_at_the_first_attempt_and_tears_down() {
    let Some(m) = Moto::start() else { return };
    let mut f = Faults::none(1);
    f.deny
        .insert("RunInstances", (403, "UnauthorizedOperation"));
    let proxy = FaultProxy::start(&m.endpoint, f);
    let state = state_dir();
    let out = run(dryrun_at(&m, &proxy.endpoint, state.path()).args(run_args(&m, &[])));
    assert_eq!(out.status.code(), Some(3));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failure = r["failure"].as_str().unwrap();
    assert!(
        failure.contains("UnauthorizedOperation") && failure.contains("service.app"),
        "{failure}"
    );
    assert!(!failure.contains("attempts"), "not retried: {failure}");
    assert_eq!(
        proxy.stats().requests.get("ec2:RunInstances"),
        Some(&1),
        "sent once, not retried"
    );
    assert!(r["left_behind"].as_array().unwrap().is_empty());
    assert!(m.tagged(None).is_empty(), "left: {:?}", m.tagged(None));
}

#[test]
fn endless_throttling_fails_after_the_configured_attempts_with_a_clear_message() {
    let Some(m) = Moto::start() else { return };
    let mut f = Faults::none(2);
    f.deny.insert("ModifyDBInstance", (400, "Throttling"));
    let proxy = FaultProxy::start(&m.endpoint, f);
    let state = state_dir();
    let out = run(dryrun_at(&m, &proxy.endpoint, state.path())
        .env("AWS_MAX_ATTEMPTS", "3")
        .args(run_args(&m, &[])));
    assert_eq!(out.status.code(), Some(3));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failure = r["failure"].as_str().unwrap();
    assert!(
        failure.contains("Throttling") && failure.contains("throttled all 3 attempts"),
        "{failure}"
    );
    assert_eq!(proxy.stats().requests.get("rds:ModifyDBInstance"), Some(&3));
    assert!(r["left_behind"].as_array().unwrap().is_empty());
    assert!(m.tagged(None).is_empty(), "left: {:?}", m.tagged(None));
}

/// Crash at every side-effect point of the reference run, clean up, check the emulator.
#[test]
fn crash_at_every_failpoint_on_aws_then_cleanup_leaves_nothing_tagged() {
    #[cfg(not(feature = "failpoints"))]
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must build with --features dryrun/failpoints (scripts/test does)"
        );
        eprintln!("skipping: needs --features dryrun/failpoints");
        return;
    }
    #[cfg(feature = "failpoints")]
    {
        let Some(m) = Moto::start() else { return };
        crash_at_every_point(&m);
    }
}

/// The same crashes with the instance simulator in front: the runs boot real sandboxes, and
/// cleanup must end them too.
#[test]
fn crash_at_every_failpoint_on_the_instance_simulator_then_cleanup_leaves_nothing() {
    #[cfg(not(feature = "failpoints"))]
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must build with --features dryrun/failpoints (scripts/test does)"
        );
        eprintln!("skipping: needs --features dryrun/failpoints");
        return;
    }
    #[cfg(feature = "failpoints")]
    {
        let Some(m) = Moto::start_sim() else { return };
        crash_at_every_point(&m);
    }
}

#[cfg(feature = "failpoints")]
fn crash_at_every_point(m: &Moto) {
    let sim = m.sim_dir.is_some();
    {
        let before = m.production();
        let state = state_dir();
        let log = state.path().join("points.log");
        let out = run(dryrun_at(m, &m.endpoint, state.path())
            .env("DRYRUN_FAILPOINT_LOG", &log)
            .args(run_args(m, &["--concurrency", "1"])));
        assert_eq!(
            out.status.code(),
            Some(if sim { 0 } else { 3 }),
            "moto's http checks cannot run; on the simulator they pass"
        );
        let points: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let aws = points.iter().filter(|p| p.contains(" aws: ")).count();
        assert!(aws >= 20, "too few AWS points: {points:?}");
        let started = Instant::now();
        for k in 1..=points.len() {
            let state = state_dir();
            let out = dryrun_at(m, &m.endpoint, state.path())
                .env("DRYRUN_CRASH_AT", k.to_string())
                .args(run_args(m, &["--concurrency", "1"]))
                .output()
                .unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&out.status),
                Some(6),
                "point {k} ({}) did not abort the run: {:?}\n{}",
                points[k - 1],
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let out = cleanup_all(m, state.path());
            assert_eq!(
                out.status.code(),
                Some(0),
                "cleanup after a crash at point {k} ({}):\n{}{}",
                points[k - 1],
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let left = m.tagged(None);
            assert!(
                left.is_empty(),
                "after a crash at point {k} ({}) and cleanup: {left:?}",
                points[k - 1]
            );
            let sandboxes = m.sandboxes();
            assert!(
                sandboxes.is_empty(),
                "after a crash at point {k} ({}) and cleanup, sandboxes run: {sandboxes:?}",
                points[k - 1]
            );
            let again = cleanup_all(m, state.path());
            assert!(
                String::from_utf8_lossy(&again.stdout).contains("nothing to clean up"),
                "point {k}: cleanup is idempotent"
            );
        }
        assert_eq!(m.production(), before, "production changed");
        eprintln!(
            "crash points covered (aws, reference blueprint on {}): {} ({aws} around AWS requests) in {:.0} s",
            if sim {
                "the instance simulator"
            } else {
                "moto"
            },
            points.len(),
            started.elapsed().as_secs_f64()
        );
    }
}
