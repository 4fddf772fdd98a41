//! The AWS provider end to end with the instance side executed for real: moto with the instance
//! simulator in front (scripts/aws_sim.py). The user data dryrun renders boots each instance
//! in a sandbox of its own (mount, network, PID namespaces; the instance's private address is
//! local there), SSM commands — the install and health wait, http and command checks — run in
//! it, and TerminateInstances ends it. tests/aws.rs has the same runs on bare moto, where
//! nothing runs on the instance.
#![cfg(feature = "aws")]

mod common;
#[path = "aws/moto.rs"]
mod moto;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;
use moto::{Moto, PROD_BUCKET, PROD_DB, release_tarball_with};

const RELEASE: &str = "s3://shop-releases/shop-2.0.0.tar.gz";

fn dryrun_aws(m: &Moto, state: &Path) -> Command {
    let mut c = dryrun(state);
    m.env(&mut c);
    c
}

fn run_args(m: &Moto, blueprint: &str, release: &str) -> Vec<String> {
    [
        "run",
        blueprint,
        "--provider",
        "aws",
        "--release",
        release,
        "--param",
        &format!("source_db={PROD_DB}"),
        "--param",
        &format!("assets_bucket={PROD_BUCKET}"),
        "--param",
        &format!("ami={}", m.ami),
        "--json",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn report_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not a report ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn check(r: &serde_json::Value, name: &str) -> serde_json::Value {
    r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no check {name} in {r}"))
}

/// Nothing tagged in the emulator, no sandbox alive, production as it was.
fn assert_clean(m: &Moto, before: &str) {
    assert!(m.tagged(None).is_empty(), "left: {:?}", m.tagged(None));
    assert!(
        m.sandboxes().is_empty(),
        "sandboxes still running: {:?}\n{}",
        m.sandboxes(),
        m.sim_log()
    );
    assert_eq!(m.production(), before, "production changed");
}

/// The files an instance's sandbox left (its /var/lib and /var/log), by instance id.
fn instance_file(m: &Moto, path: &str) -> Vec<String> {
    let dir = m.sim_dir.clone().unwrap();
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("i-"))
        .filter_map(|e| std::fs::read_to_string(e.path().join(path)).ok())
        .collect()
}

#[test]
fn the_reference_run_passes_end_to_end_with_the_instance_side_executed() {
    let Some(m) = Moto::start_sim() else { return };
    let state = state_dir();
    let before = m.production();
    let started = Instant::now();
    let out =
        run(dryrun_aws(&m, state.path()).args(run_args(&m, "blueprints/aws/shop.yaml", RELEASE)));
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", m.sim_log());
    let r = report_of(&out);
    for name in ["homepage", "release-version-served", "release-installed"] {
        let c = check(&r, name);
        assert_eq!(c["status"], "passed", "{c}");
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .contains("ran through SSM command"),
            "{c}"
        );
    }
    assert_eq!(check(&r, "customers-restored")["status"], "skipped");
    // The release really ran on the instance: the user data's logs and status are there.
    assert_eq!(instance_file(&m, "varlib/dryrun/status"), ["install 0\n"]);
    let migrate = instance_file(&m, "varlog/dryrun/step-migrate.log");
    assert_eq!(
        migrate,
        ["migrated (database given)\n"],
        "the env file reached the step"
    );
    let app = instance_file(&m, "varlog/dryrun/app.log").concat();
    assert!(app.contains("shop 2.0.0 listening on 8080"), "{app}");
    assert!(
        app.contains("\"GET /api/stats HTTP/1.1\" 200"),
        "the check reached the server:\n{app}"
    );
    assert_clean(&m, &before);
    let calls: u64 = r["api_calls"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let stages: Vec<String> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {} ms", s["name"].as_str().unwrap(), s["duration_ms"]))
        .collect();
    eprintln!(
        "reference run on the simulator: exit 0 in {:.1} s, {calls} AWS API calls ({}); stages: {}",
        took.as_secs_f64(),
        r["api_calls"],
        stages.join(", ")
    );
}

/// With a cloud's pace (the restore takes 4 s, the instance boots in 3 s), the instance boots
/// while the database restores and the install follows through SSM once the database is up:
/// the boot is off the critical path. The order is read from the run's own timeline and from
/// the emulator's request log, not from timings.
#[test]
fn the_instance_boots_while_the_database_restores_and_installs_through_ssm_after() {
    let Some(m) = Moto::start_sim_paced(4, 3) else {
        return;
    };
    let state = state_dir();
    let before = m.production();
    let out =
        run(dryrun_aws(&m, state.path()).args(run_args(&m, "blueprints/aws/shop.yaml", RELEASE)));
    assert_eq!(out.status.code(), Some(0), "{}", m.sim_log());
    let r = report_of(&out);
    let span = |address: &str, step: &str| -> (u64, u64) {
        let res = r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == address)
            .unwrap_or_else(|| panic!("no {address} in {r}"));
        let s = res["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step"] == step)
            .unwrap_or_else(|| panic!("no {step} of {address}: {res}"));
        let start = s["start_ms"].as_u64().unwrap();
        (start, start + s["duration_ms"].as_u64().unwrap())
    };
    let restore = span("database.db", "restore");
    let create = span("service.app", "create");
    let install = span("service.app", "install");
    assert!(
        restore.1 - restore.0 >= 4000,
        "the emulator's restore takes 4 s: {restore:?}"
    );
    assert!(
        create.0 < restore.1,
        "the instance was launched after the restore ended: {create:?} {restore:?}"
    );
    assert!(install.0 >= restore.1, "{install:?} {restore:?}");
    // In the emulator's log: RunInstances came before the restored instance was available,
    // and the install (the SSM command that carries the env) after.
    let reqs = m.requests();
    let at = |op: &str| {
        reqs.iter()
            .position(|q| q.action == op)
            .unwrap_or_else(|| panic!("no {op}"))
    };
    assert!(at("RunInstances") < at("ModifyDBInstance"));
    let install_cmd = reqs
        .iter()
        .position(|q| q.action == "AmazonSSM.SendCommand" && q.body.contains("install of"))
        .expect("the install's SendCommand");
    assert!(install_cmd > at("ModifyDBInstance"));
    // The user data the instance booted with holds nothing of the database.
    let booted = instance_file(&m, "varlib/cloud/instance/user-data.txt").concat();
    assert!(booted.contains("/var/lib/dryrun/fetched"), "{booted}");
    assert!(
        !booted.contains("DATABASE_URL") && !booted.contains("base64"),
        "{booted}"
    );
    assert_eq!(instance_file(&m, "varlib/dryrun/status"), ["install 0\n"]);
    assert_clean(&m, &before);
    eprintln!(
        "paced run: restore {restore:?} ms, instance create {create:?} ms, install {install:?} ms, run {} ms",
        r["duration_ms"]
    );
}

#[test]
fn a_failing_install_step_on_the_instance_fails_the_run_quoting_its_output() {
    let Some(m) = Moto::start_sim() else { return };
    let state = state_dir();
    let before = m.production();
    let release = m.put_release(
        "shop-3.0.0.tar.gz",
        release_tarball_with(
            "3.0.0",
            "#!/bin/sh\necho 'applying 0004_unique_customer_email'\necho 'ERROR:  could not create unique index \"customers_email_unique\"' >&2\nexit 3\n",
            "exec python3 ./bin/server.py",
        ),
    );
    let out =
        run(dryrun_aws(&m, state.path()).args(run_args(&m, "blueprints/aws/shop.yaml", &release)));
    assert_eq!(out.status.code(), Some(1), "{}", m.sim_log());
    let r = report_of(&out);
    let failure = r["failure"].as_str().unwrap();
    assert!(
        failure.contains("install step `migrate` failed (exit code 3")
            && failure.contains("could not create unique index")
            && failure.contains("applying 0004_unique_customer_email"),
        "{failure}"
    );
    assert_clean(&m, &before);
}

#[test]
fn a_release_that_never_becomes_healthy_fails_with_the_health_message() {
    let Some(m) = Moto::start_sim() else { return };
    let state = state_dir();
    let before = m.production();
    let release = m.put_release(
        "shop-unhealthy.tar.gz",
        release_tarball_with(
            "2.1.0",
            "#!/bin/sh\ntrue\n",
            "exec python3 ./bin/server.py --unhealthy",
        ),
    );
    let bp = moto::app_blueprint(
        state.path(),
        "  - name: home\n    type: http\n    url: \"{{resources.app.url}}/\"",
        "20s",
    );
    let out = run(dryrun_aws(&m, state.path()).args(run_args(&m, bp.to_str().unwrap(), &release)));
    assert_eq!(out.status.code(), Some(1), "{}", m.sim_log());
    let failure = report_of(&out)["failure"].as_str().unwrap().to_string();
    assert!(
        failure.contains("service.app did not become healthy")
            && failure.contains("GET /healthz never answered 2xx")
            && failure.contains("\"GET /healthz HTTP/1.1\" 500"),
        "{failure}"
    );
    assert_clean(&m, &before);
}

#[test]
fn a_release_that_exits_after_start_is_reported_as_such() {
    let Some(m) = Moto::start_sim() else { return };
    let state = state_dir();
    let before = m.production();
    let release = m.put_release(
        "shop-exits.tar.gz",
        release_tarball_with(
            "2.2.0",
            "#!/bin/sh\ntrue\n",
            "echo 'fatal: SHOP_SECRET_KEY is not set' >&2; exit 7",
        ),
    );
    let bp = moto::app_blueprint(
        state.path(),
        "  - name: home\n    type: http\n    url: \"{{resources.app.url}}/\"",
        "2m",
    );
    let started = Instant::now();
    let out = run(dryrun_aws(&m, state.path()).args(run_args(&m, bp.to_str().unwrap(), &release)));
    assert_eq!(out.status.code(), Some(1), "{}", m.sim_log());
    let failure = report_of(&out)["failure"].as_str().unwrap().to_string();
    assert!(
        failure.contains("service.app did not become healthy")
            && failure.contains("the service exited before GET /healthz answered 2xx")
            && failure.contains("fatal: SHOP_SECRET_KEY is not set"),
        "{failure}"
    );
    assert!(
        started.elapsed().as_secs() < 90,
        "an exited service is reported at once, not at the 2 min deadline"
    );
    assert_clean(&m, &before);
}

#[test]
fn checks_that_fail_on_the_instance_fail_the_run() {
    let Some(m) = Moto::start_sim() else { return };
    let state = state_dir();
    let before = m.production();
    let checks = [
        "  - name: missing-page",
        "    type: http",
        "    url: \"{{resources.app.url}}/admin\"",
        "  - name: wrong-body",
        "    type: http",
        "    url: \"{{resources.app.url}}/\"",
        "    expect: {body_contains: Checkout}",
        "  - name: wrong-version",
        "    type: http",
        "    url: \"{{resources.app.url}}/api/stats\"",
        "    expect: {json: {/version: \"9.9.9\"}}",
        "  - name: command-fails",
        "    type: command",
        "    run: 'echo \"no such table\" >&2; test -f /opt/dryrun/release/missing'",
        "  - name: command-passes",
        "    type: command",
        "    run: 'test -x /opt/dryrun/release/shop-2.0.0/bin/migrate && hostname'",
        "    expect: {output_contains: ip-}",
    ]
    .join("\n");
    let bp = moto::app_blueprint(state.path(), &checks, "2m");
    let out = run(dryrun_aws(&m, state.path()).args(run_args(&m, bp.to_str().unwrap(), RELEASE)));
    assert_eq!(out.status.code(), Some(1), "{}", m.sim_log());
    let r = report_of(&out);
    for (name, want) in [
        ("missing-page", "expected status 200, got 404"),
        ("wrong-body", "expected body to contain \"Checkout\""),
        (
            "wrong-version",
            "expected JSON /version = \"9.9.9\", got \"2.0.0\"",
        ),
        ("command-fails", "expected exit code 0, got 1"),
    ] {
        let c = check(&r, name);
        assert_eq!(c["status"], "failed", "{c}");
        assert!(c["message"].as_str().unwrap().contains(want), "{name}: {c}");
    }
    assert!(
        check(&r, "command-fails")["output"]
            .as_str()
            .unwrap()
            .contains("no such table")
    );
    assert_eq!(
        check(&r, "command-passes")["status"],
        "passed",
        "{}",
        check(&r, "command-passes")
    );
    assert_clean(&m, &before);
}

#[test]
fn the_server_runs_webhook_and_scheduled_rehearsals_on_aws() {
    use common::server::{Server, hook, wait_done};
    let Some(m) = Moto::start_sim() else { return };
    let before = m.production();
    let params = format!(
        "{{ source_db = \"{PROD_DB}\", assets_bucket = \"{PROD_BUCKET}\", ami = \"{}\" }}",
        m.ami
    );
    // A schedule that fires once, a few seconds from now (seconds first; UTC).
    let at = chrono::Utc::now() + chrono::Duration::seconds(4);
    let cron = at.format("%S %M %H * * *").to_string();
    let env = m.env_pairs();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let srv = Server::start_with_env(
        &root().join("blueprints"),
        &format!(
            "provider = \"aws\"\n[[schedule]]\nname = \"nightly-aws\"\ncron = \"{cron}\"\nblueprint = \"aws/shop.yaml\"\nrelease = \"{RELEASE}\"\nparams = {params}\n"
        ),
        common::server::SECRET,
        &env,
    );
    // The emulator's clients have their own runtime: the HTTP side gets another.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
    let body = serde_json::json!({
        "blueprint": "aws/shop.yaml",
        "release": RELEASE,
        "params": {"source_db": PROD_DB, "assets_bucket": PROD_BUCKET, "ami": m.ami},
    })
    .to_string();
    let (code, v) = hook(&srv.url, &body, "aws-1").await;
    assert_eq!(code, 202, "{v}");
    let run_id = v["run_id"].as_str().unwrap().to_string();
    let done = wait_done(&srv.url, &run_id, std::time::Duration::from_secs(120)).await;
    assert_eq!(done["run"]["status"], "passed", "{done}\n{}", m.sim_log());
    assert_eq!(done["run"]["provider"], "aws");
    assert_eq!(done["run"]["environment"], "aws:shop");
    assert_eq!(done["report"]["release"]["version"], "2.0.0");
    assert_eq!(check(&done["report"], "homepage")["status"], "passed");
    // The schedule's rehearsal, on AWS too.
    let start = Instant::now();
    let scheduled = loop {
        let runs = common::server::get(&format!("{}/v1/runs", srv.url)).await;
        let found = runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["trigger"] == "schedule")
            .map(|r| r["run_id"].as_str().unwrap().to_string());
        if let Some(id) = found {
            break id;
        }
        assert!(start.elapsed().as_secs() < 60, "the schedule never fired");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let done = wait_done(&srv.url, &scheduled, std::time::Duration::from_secs(120)).await;
    assert_eq!(done["run"]["status"], "passed", "{done}");
    assert_eq!(done["run"]["provider"], "aws");
    assert_eq!(done["run"]["schedule"], "nightly-aws");
    // An s3:// release is taken only for the AWS provider; a path escaping the root never.
    let (code, _) = hook(
        &srv.url,
        &serde_json::json!({"blueprint": "aws/shop.yaml", "release": "s3:/shop-releases/x", "params": {"ami": m.ami}}).to_string(),
        "aws-bad",
    )
    .await;
    assert_eq!(code, 400);
    });
    drop(srv);
    assert_clean(&m, &before);
}

#[test]
fn a_surviving_worker_tears_down_the_aws_resources_of_a_killed_one_from_the_shared_journal() {
    use common::pg::ControlDb;
    use common::server::{SECRET, Server, hook};
    if !have_postgres() {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    }
    let Some(m) = Moto::start_sim() else { return };
    let before = m.production();
    let db = ControlDb::start();
    let url = db.url();
    let mut env = m.env_pairs();
    env.push(("DRYRUN_DATABASE_URL", url));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Two workers, as on two machines; a short lease timeout keeps the test quick.
    let config = "provider = \"aws\"\nlease_timeout = \"5s\"\n";
    let root = root().join("blueprints");
    let mut a = Server::start_with_env(&root, config, SECRET, &env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = serde_json::json!({
        "blueprint": "aws/shop.yaml",
        "release": RELEASE,
        "params": {"source_db": PROD_DB, "assets_bucket": PROD_BUCKET, "ami": m.ami},
    })
    .to_string();
    let (code, v) = rt.block_on(hook(&a.url, &body, "aws-adopt-1"));
    assert_eq!(code, 202, "{v}");
    let run_id = v["run_id"].as_str().unwrap().to_string();
    // Worker b joins once a has claimed the run.
    let start = Instant::now();
    while rt.block_on(common::server::get(&format!("{}/v1/runs/{run_id}", a.url)))["run"]["status"]
        != "running"
    {
        assert!(
            start.elapsed().as_secs() < 60,
            "worker a never started the run"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut b = Server::start_with_env(&root, config, SECRET, &env);
    // Kill a once the run's instance exists: the copy of production, the bucket and the instance
    // are live in the cloud, and only the shared journal says so.
    let start = Instant::now();
    while !m
        .tagged(Some(&run_id))
        .iter()
        .any(|t| t.starts_with("instance"))
    {
        assert!(
            start.elapsed().as_secs() < 120,
            "the run never launched its instance:\n{}",
            m.sim_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    a.crash();
    let killed = Instant::now();
    let live = m.tagged(Some(&run_id));
    // b takes a for dead after the lease timeout, adopts the journal and tears down.
    let run = rt.block_on(async {
        let client = db.client().await;
        loop {
            let row = client
                .query_one(
                    "SELECT status, failure FROM dryrun_runs WHERE run_id = $1",
                    &[&run_id],
                )
                .await
                .unwrap();
            let status: String = row.get(0);
            if status != "running" {
                break (status, row.get::<_, Option<String>>(1).unwrap_or_default());
            }
            assert!(
                killed.elapsed().as_secs() < 60,
                "the killed worker's run still says running after 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    eprintln!(
        "worker killed with {} live: {live:?}; torn down by the survivor after {:.1} s",
        live.len(),
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(run.0, "interrupted");
    assert!(
        run.1
            .contains("stopped during the run; its resources were cleaned up by worker"),
        "{}",
        run.1
    );
    assert!(!run.1.contains(ControlDb::password()));
    // b's own state has the adopted journal, closed.
    assert!(
        b.state()
            .join("runs")
            .join(&run_id)
            .join("journal.jsonl")
            .exists()
    );
    let (code, err) = b.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains(ControlDb::password()));
    assert_clean(&m, &before);
    drop(a);
}

/// `engine: mysql`: the RDS MySQL snapshot is restored and the release gets a `mysql://` URL
/// to the copy (with a fresh password, not production's); a blueprint that says `postgres`
/// for the MySQL instance is refused before anything is created.
#[test]
fn a_mysql_snapshot_is_restored_for_the_release_and_the_wrong_engine_is_refused_first() {
    let Some(m) = Moto::start_sim() else { return };
    m.aurora_and_mysql();
    let dir = tempfile::tempdir().unwrap();
    let bp = |engine: &str| {
        let p = dir.path().join(format!("{engine}.yaml"));
        std::fs::write(
            &p,
            format!(
                "name: shopmy\npii_gate: off\nparams:\n  ami: {{default: \"\"}}\nresources:\n  db:\n    type: database\n    engine: {engine}\n    source: {}\n    database: shop\n  app:\n    type: service\n    env:\n      DATABASE_URL: \"{{{{resources.db.url}}}}\"\n      APP_VERSION: \"{{{{release.version}}}}\"\n    ready_timeout: 2m\n    aws:\n      ami: \"{{{{params.ami}}}}\"\nttl: 1h\n",
                moto::PROD_MYSQL
            ),
        )
        .unwrap();
        p
    };
    let release = m.put_release(
        "shop-4.0.0.tar.gz",
        release_tarball_with(
            "4.0.0",
            "#!/bin/sh\necho \"scheme ${DATABASE_URL%%://*} user $(echo \"$DATABASE_URL\" | cut -d/ -f3 | cut -d: -f1)\"\n",
            "exec python3 ./bin/server.py",
        ),
    );
    let args = |p: &Path| -> Vec<String> {
        [
            "run",
            p.to_str().unwrap(),
            "--provider",
            "aws",
            "--release",
            &release,
            "--param",
            &format!("ami={}", m.ami),
            "--json",
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    };
    let state = state_dir();
    let wrong = run(dryrun_aws(&m, state.path()).args(args(&bp("postgres"))));
    assert_eq!(wrong.status.code(), Some(3));
    let failure = report_of(&wrong)["failure"].as_str().unwrap().to_string();
    assert!(
        failure
            .contains("is mysql, but the blueprint says `engine: postgres`; set `engine: mysql`"),
        "{failure}"
    );
    assert!(
        m.tagged(None).is_empty(),
        "created something: {:?}",
        m.tagged(None)
    );

    let out = run(dryrun_aws(&m, state.path()).args(args(&bp("mysql"))));
    assert_eq!(out.status.code(), Some(0), "{}", m.sim_log());
    assert_eq!(
        instance_file(&m, "varlog/dryrun/step-migrate.log"),
        ["scheme mysql user shop\n"]
    );
    let reqs = m.requests();
    assert!(
        reqs.iter()
            .any(|q| q.action == "RestoreDBInstanceFromDBSnapshot"
                && q.params.get("DBSnapshotIdentifier").map(String::as_str)
                    == Some("shop-mysql-nightly"))
    );
    assert!(
        reqs.iter()
            .any(|q| q.action == "ModifyDBInstance" && q.params.contains_key("MasterUserPassword"))
    );
    assert!(m.tagged(None).is_empty(), "left: {:?}", m.tagged(None));
    assert!(m.sandboxes().is_empty());
}
