//! The AWS provider end to end against moto server: the real `dryrun` binary, the emulator's
//! real state read back with describe/list calls and its request recorder. (tests/aws_sim.rs
//! runs the instance side for real, with the instance simulator in front of moto.)
//!
//! What moto cannot do, and how these tests treat it: SSM commands are accepted and reported
//! `Success` with exit code 0 and empty output, but nothing runs — so command checks "pass"
//! with moto's exit code, http checks cannot run ("printed no result": status `error`, the
//! reference run exits 3), and the tests assert exactly that; instance and database addresses are fake private addresses that nothing
//! connects to (sql checks are skipped because `runner_in_vpc` is off); `ClientToken` is
//! ignored (reconciliation by tags is tested instead); `PubliclyAccessible=false` is not
//! stored by moto's restore, so the request itself is checked in the recorder.
#![cfg(feature = "aws")]

mod common;
#[path = "aws/moto.rs"]
mod moto;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use moto::{Moto, PROD_BUCKET, PROD_DB, PROD_PASSWORD, SNAPSHOTS};

const RELEASE: &str = "s3://shop-releases/shop-2.0.0.tar.gz";

fn dryrun_aws(m: &Moto, state: &Path) -> Command {
    let mut c = dryrun(state);
    m.env(&mut c);
    c
}

/// `dryrun run` of a blueprint against the emulator with the fixture params.
fn run_args(m: &Moto, blueprint: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "run".into(),
        blueprint.into(),
        "--provider".into(),
        "aws".into(),
        "--release".into(),
        RELEASE.into(),
        "--param".into(),
        format!("source_db={PROD_DB}"),
        "--param".into(),
        format!("assets_bucket={PROD_BUCKET}"),
        "--param".into(),
        format!("ami={}", m.ami),
        "--json".into(),
    ];
    v.extend(extra.iter().map(ToString::to_string));
    v
}

fn report_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not a report ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A small blueprint like the reference one, with the given checks.
fn blueprint(dir: &Path, checks: &str) -> PathBuf {
    moto::app_blueprint(dir, checks, "2m")
}

/// Every text dryrun left in the state directory (journals, reports, logs).
fn state_text(state: &Path) -> String {
    fn walk(p: &Path, out: &mut String) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_none_or(|x| x != "gz") {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let mut s = String::new();
    walk(state, &mut s);
    s
}

fn assert_nothing_tagged(m: &Moto, run_id: Option<&str>) {
    let left = m.tagged(run_id);
    assert!(left.is_empty(), "tagged resources remain: {left:?}");
}

#[test]
fn reference_run_restores_latest_snapshot_reports_and_leaves_nothing_tagged() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let before = m.production();
    let out = run(dryrun_aws(&m, state.path()).args(run_args(&m, "blueprints/aws/shop.yaml", &[])));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Against moto the http checks cannot run (SSM runs nothing there): nothing was learnt
    // from them, so the run is an infrastructure error (3), not a release failure (1).
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("aws: region us-east-1, account 123456789012"),
        "region and account are printed at the start:\n{stderr}"
    );
    let r = report_of(&out);
    let run_id = r["run_id"].as_str().unwrap().to_string();
    assert_eq!(r["provider"], "aws");
    assert_eq!(r["release"]["version"], "2.0.0");
    assert_eq!(r["release"]["ref"], RELEASE);
    assert_eq!(
        r["backup"]["id"], SNAPSHOTS[2],
        "the latest snapshot is restored"
    );
    assert!(r["backup"]["age_seconds"].as_i64().unwrap() >= 0);
    assert!(r["left_behind"].as_array().unwrap().is_empty(), "{stdout}");
    for res in r["resources"].as_array().unwrap() {
        assert_eq!(res["destroyed"], true, "{res}");
    }
    let check = |name: &str| {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    // What moto returns for SSM: Success, exit code 0, no output.
    let home = check("homepage");
    assert_eq!(home["status"], "error");
    assert!(
        home["message"]
            .as_str()
            .unwrap()
            .starts_with("could not run: SSM command "),
        "{home}"
    );
    assert!(
        home["message"]
            .as_str()
            .unwrap()
            .contains("printed no result"),
        "{home}"
    );
    assert!(
        r["failure"]
            .as_str()
            .unwrap()
            .starts_with("check `homepage` could not run: SSM command"),
        "{}",
        r["failure"]
    );
    let installed = check("release-installed");
    assert_eq!(installed["status"], "passed", "moto reports exit code 0");
    assert!(
        installed["message"]
            .as_str()
            .unwrap()
            .contains("ran through SSM command")
    );
    let sql = check("customers-restored");
    assert_eq!(sql["status"], "skipped");
    assert!(
        sql["message"].as_str().unwrap().contains("runner_in_vpc"),
        "{sql}"
    );
    let calls: u64 = r["api_calls"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(calls > 10, "api calls are counted: {}", r["api_calls"]);

    // The emulator's state: nothing of the run remains; production is unchanged.
    assert_nothing_tagged(&m, None);
    assert_eq!(m.production(), before, "production changed");

    // What was asked of the emulator.
    let reqs = m.requests();
    let one = |action: &str| {
        reqs.iter()
            .find(|q| q.action == action)
            .unwrap_or_else(|| panic!("no {action} request"))
            .clone()
    };
    let restore = one("RestoreDBInstanceFromDBSnapshot");
    assert_eq!(restore.params["DBSnapshotIdentifier"], SNAPSHOTS[2]);
    assert_eq!(restore.params["PubliclyAccessible"], "false");
    let sg_of_run = restore.params["VpcSecurityGroupIds.VpcSecurityGroupId.1"].clone();
    assert!(sg_of_run.starts_with("sg-"), "{:?}", restore.params);
    let restore_tags: Vec<&String> = restore.params.values().collect();
    for t in [
        "dryrun:run-id",
        "dryrun:blueprint",
        "dryrun:expires-at",
        "dryrun:created-by",
    ] {
        assert!(
            restore_tags.iter().any(|v| *v == t),
            "tag {t} at creation: {:?}",
            restore.params
        );
    }
    assert!(restore.params.values().any(|v| v == &run_id));
    // A fresh master password on the copy, never on production.
    let modify: Vec<_> = reqs
        .iter()
        .filter(|q| q.action == "ModifyDBInstance")
        .collect();
    assert_eq!(modify.len(), 1, "{modify:?}");
    assert_ne!(modify[0].params["DBInstanceIdentifier"], PROD_DB);
    let fresh = modify[0].params["MasterUserPassword"].clone();
    assert_eq!(fresh.len(), 32);
    assert_ne!(fresh, PROD_PASSWORD);
    // Production is only read: no mutating request names it.
    for q in &reqs {
        let mutating = [
            "Modify",
            "Delete",
            "Terminate",
            "Put",
            "Create",
            "Restore",
            "Authorize",
            "Copy",
        ]
        .iter()
        .any(|p| {
            q.action.starts_with(p)
                || q.action.starts_with(&format!("PUT /{PROD_BUCKET}"))
                || q.action.starts_with(&format!("DELETE /{PROD_BUCKET}"))
        });
        if mutating && !q.action.starts_with("PUT /dryrun-") {
            let ident = q
                .params
                .get("DBInstanceIdentifier")
                .cloned()
                .unwrap_or_default();
            assert_ne!(ident, PROD_DB, "mutating call on production: {q:?}");
        }
        assert!(
            !q.action.starts_with(&format!("PUT /{PROD_BUCKET}")),
            "{q:?}"
        );
        assert!(
            !q.action.starts_with(&format!("DELETE /{PROD_BUCKET}")),
            "{q:?}"
        );
    }
    // The security group admits its members only.
    let ingress = one("AuthorizeSecurityGroupIngress");
    assert!(
        !ingress.body.contains("0.0.0.0%2F0") && !ingress.body.contains("0.0.0.0/0"),
        "{ingress:?}"
    );
    assert_eq!(ingress.params["GroupId"], sg_of_run);
    assert!(ingress.params.values().any(|v| v == &sg_of_run));
    // Bucket: public access blocked.
    let pab = reqs
        .iter()
        .find(|q| q.action.starts_with("PUT /dryrun-") && q.url.contains("publicAccessBlock"))
        .expect("PutPublicAccessBlock");
    for flag in [
        "BlockPublicAcls",
        "IgnorePublicAcls",
        "BlockPublicPolicy",
        "RestrictPublicBuckets",
    ] {
        assert!(
            pab.body.contains(&format!("<{flag}>true</{flag}>")),
            "{}",
            pab.body
        );
    }
    // Instance: client token and tags at creation, the run's group, an SSM install wait.
    let launch = one("RunInstances");
    assert!(
        launch.params["ClientToken"].starts_with("dryrun-"),
        "{:?}",
        launch.params
    );
    assert_eq!(launch.params["SecurityGroupId.1"], sg_of_run);
    assert!(launch.params.values().any(|v| v == &run_id));
    let send: Vec<_> = reqs
        .iter()
        .filter(|q| q.action == "AmazonSSM.SendCommand")
        .collect();
    assert!(
        send.len() >= 3,
        "install wait + http + command checks go through SSM: {send:?}"
    );

    // The commands SSM holds: the install wait and the checks, all on the run's instance.
    let commands =
        m.rt.block_on(async { m.ssm.list_commands().send().await.unwrap() });
    let instance = r["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["address"] == "service.app")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(commands.commands().len() >= 3);
    for c in commands.commands() {
        assert_eq!(c.instance_ids(), std::slice::from_ref(&instance));
        assert_eq!(c.document_name(), Some("AWS-RunShellScript"));
        let text = format!("{:?}", c.parameters());
        assert!(!text.contains(PROD_PASSWORD));
    }
    assert!(
        commands
            .commands()
            .iter()
            .any(|c| format!("{:?}", c.parameters()).contains("curl -sS")),
        "http checks run curl on the instance"
    );

    // Secrets: production's master password and the copy's fresh one appear nowhere.
    let everything = format!("{stdout}\n{stderr}\n{}", state_text(state.path()));
    assert!(
        !everything.contains(PROD_PASSWORD),
        "production password leaked"
    );
    assert!(
        !everything.contains(&fresh),
        "the fresh master password leaked"
    );
}

#[test]
fn kept_copy_is_private_tagged_and_blocked_then_cleanup_removes_it() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let bp = blueprint(
        state.path(),
        "  - name: installed\n    type: command\n    run: test -f /var/lib/dryrun/status\n",
    );
    let out = run(dryrun_aws(&m, state.path()).args(run_args(
        &m,
        bp.to_str().unwrap(),
        &["--keep", "1h"],
    )));
    assert_eq!(out.status.code(), Some(0));
    let r = report_of(&out);
    let run_id = r["run_id"].as_str().unwrap().to_string();
    let live = m.tagged(Some(&run_id));
    assert_eq!(
        live.len(),
        4,
        "db, bucket, instance, security group: {live:?}"
    );

    m.rt.block_on(async {
        let tags_ok = |tags: &[(String, String)]| {
            for k in [
                "dryrun:run-id",
                "dryrun:blueprint",
                "dryrun:expires-at",
                "dryrun:created-by",
            ] {
                assert!(tags.iter().any(|(a, _)| a == k), "missing {k}: {tags:?}");
            }
            assert!(
                tags.iter()
                    .any(|(a, b)| a == "dryrun:run-id" && b == &run_id)
            );
        };
        let db_id = r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == "database.db")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let d = m
            .rds
            .describe_db_instances()
            .db_instance_identifier(&db_id)
            .send()
            .await
            .unwrap();
        let d = &d.db_instances()[0];
        assert_eq!(d.db_instance_status(), Some("available"));
        assert_ne!(
            d.publicly_accessible(),
            Some(true),
            "the copy must not be public"
        );
        let tags: Vec<(String, String)> = d
            .tag_list()
            .iter()
            .map(|t| (t.key().unwrap().into(), t.value().unwrap().into()))
            .collect();
        tags_ok(&tags);
        let sgs: Vec<&str> = d
            .vpc_security_groups()
            .iter()
            .filter_map(|g| g.vpc_security_group_id())
            .collect();
        assert_eq!(sgs.len(), 1);
        let sg = m
            .ec2
            .describe_security_groups()
            .group_ids(sgs[0])
            .send()
            .await
            .unwrap();
        let sg = &sg.security_groups()[0];
        tags_ok(
            &sg.tags()
                .iter()
                .map(|t| (t.key().unwrap().into(), t.value().unwrap().into()))
                .collect::<Vec<_>>(),
        );
        // Egress: AWS's default (everything, anywhere) is replaced by the members, HTTPS (SSM
        // and S3) and nothing else.
        let egress = sg.ip_permissions_egress();
        assert!(
            !egress.iter().any(|p| p.ip_protocol() == Some("-1")
                && p.ip_ranges()
                    .iter()
                    .any(|r| r.cidr_ip() == Some("0.0.0.0/0"))),
            "open egress remains: {egress:?}"
        );
        assert!(egress.iter().any(|p| {
            p.ip_protocol() == Some("tcp")
                && p.from_port() == Some(443)
                && p.ip_ranges()
                    .iter()
                    .any(|r| r.cidr_ip() == Some("0.0.0.0/0"))
        }));
        assert!(egress.iter().any(|p| {
            p.user_id_group_pairs()
                .iter()
                .any(|g| g.group_id() == sg.group_id())
        }));
        assert_eq!(egress.len(), 2, "{egress:?}");
        for p in sg.ip_permissions() {
            for range in p.ip_ranges() {
                assert_ne!(range.cidr_ip(), Some("0.0.0.0/0"), "world-open ingress");
            }
            for range in p.ipv6_ranges() {
                assert_ne!(range.cidr_ipv6(), Some("::/0"), "world-open ingress");
            }
        }
        assert!(
            sg.ip_permissions().iter().any(|p| p
                .user_id_group_pairs()
                .iter()
                .any(|u| u.group_id() == sg.group_id())),
            "members may reach each other"
        );
        let bucket = r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == "bucket.assets")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let pab =
            m.s3.get_public_access_block()
                .bucket(&bucket)
                .send()
                .await
                .unwrap();
        let c = pab.public_access_block_configuration().unwrap();
        assert_eq!(
            (
                c.block_public_acls(),
                c.ignore_public_acls(),
                c.block_public_policy(),
                c.restrict_public_buckets()
            ),
            (Some(true), Some(true), Some(true), Some(true))
        );
        let t =
            m.s3.get_bucket_tagging()
                .bucket(&bucket)
                .send()
                .await
                .unwrap();
        tags_ok(
            &t.tag_set()
                .iter()
                .map(|t| (t.key().to_string(), t.value().to_string()))
                .collect::<Vec<_>>(),
        );
        let objs = m.s3.list_objects_v2().bucket(&bucket).send().await.unwrap();
        let mut keys: Vec<&str> = objs.contents().iter().filter_map(|o| o.key()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["img/SKU-1001.svg", "img/SKU-1002.svg", "img/a b+c.png"],
            "the prefix is copied"
        );
        let ins = m
            .ec2
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:dryrun:run-id")
                    .values(&run_id)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let i = &ins.reservations()[0].instances()[0];
        assert_eq!(
            i.state().and_then(|s| s.name()).map(|n| n.as_str()),
            Some("running")
        );
        assert_eq!(i.security_groups()[0].group_id(), sg.group_id());
        tags_ok(
            &i.tags()
                .iter()
                .map(|t| (t.key().unwrap().into(), t.value().unwrap().into()))
                .collect::<Vec<_>>(),
        );
    });

    // The kept copy is listed, then removed.
    let out = run(dryrun_aws(&m, state.path()).args(["cleanup", &run_id, "--provider", "aws"]));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("would destroy") && listing.contains("security group sg-"),
        "{listing}"
    );
    assert_eq!(m.tagged(Some(&run_id)).len(), 4, "listing deletes nothing");
    let out =
        run(dryrun_aws(&m, state.path()).args(["cleanup", &run_id, "--provider", "aws", "--yes"]));
    assert_eq!(out.status.code(), Some(0));
    assert_nothing_tagged(&m, None);
    let out =
        run(dryrun_aws(&m, state.path()).args(["cleanup", "--all", "--provider", "aws", "--yes"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to clean up"));
}

#[test]
fn passing_and_failing_command_checks_both_tear_down() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    // moto reports exit code 0 for every command: expecting 0 passes, expecting 3 fails.
    let bp = blueprint(
        state.path(),
        "  - name: ok\n    type: command\n    run: 'true'\n  - name: expects-three\n    type: command\n    run: exit 3\n    expect:\n      exit_code: 3\n",
    );
    let out = run(dryrun_aws(&m, state.path()).args(run_args(&m, bp.to_str().unwrap(), &[])));
    assert_eq!(out.status.code(), Some(1), "a failed check exits 1");
    let r = report_of(&out);
    assert_eq!(r["status"], "failed");
    assert_eq!(r["checks"][0]["status"], "passed");
    assert_eq!(r["checks"][1]["status"], "failed");
    assert!(
        r["checks"][1]["message"]
            .as_str()
            .unwrap()
            .contains("expected exit code 3, got 0")
    );
    assert_eq!(
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "teardown")
            .unwrap()["status"],
        "passed"
    );
    assert_nothing_tagged(&m, None);

    let bp = blueprint(
        state.path(),
        "  - name: ok\n    type: command\n    run: 'true'\n",
    );
    let out = run(dryrun_aws(&m, state.path()).args(run_args(&m, bp.to_str().unwrap(), &[])));
    assert_eq!(out.status.code(), Some(0));
    assert_nothing_tagged(&m, None);
}

#[test]
fn restore_from_an_older_snapshot_by_id() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let bp = blueprint(
        state.path(),
        "  - name: ok\n    type: command\n    run: 'true'\n",
    );
    let out = run(dryrun_aws(&m, state.path()).args(run_args(
        &m,
        bp.to_str().unwrap(),
        &["--backup", SNAPSHOTS[0]],
    )));
    assert_eq!(out.status.code(), Some(0));
    let r = report_of(&out);
    assert_eq!(r["backup"]["id"], SNAPSHOTS[0]);
    let restores: Vec<_> = m
        .requests()
        .into_iter()
        .filter(|q| q.action == "RestoreDBInstanceFromDBSnapshot")
        .collect();
    assert_eq!(restores.len(), 1);
    assert_eq!(restores[0].params["DBSnapshotIdentifier"], SNAPSHOTS[0]);
    assert_nothing_tagged(&m, None);

    // An unknown id creates nothing and lists what exists.
    let out = run(dryrun_aws(&m, state.path()).args(run_args(
        &m,
        bp.to_str().unwrap(),
        &["--backup", "shop-prod-1999"],
    )));
    assert_eq!(out.status.code(), Some(3));
    let r = report_of(&out);
    let failure = r["failure"].as_str().unwrap();
    assert!(
        failure.contains("no snapshot with id `shop-prod-1999`") && failure.contains(SNAPSHOTS[1]),
        "{failure}"
    );
    assert_nothing_tagged(&m, None);
}

fn journal_lines(state: &Path) -> usize {
    run_ids(state)
        .first()
        .and_then(|id| {
            std::fs::read_to_string(state.join("runs").join(id).join("journal.jsonl")).ok()
        })
        .map_or(0, |t| t.lines().count())
}

/// Starts a run and kills it with SIGKILL once its journal has `k` lines.
fn kill_at(m: &Moto, state: &Path, bp: &Path, k: usize) -> usize {
    let mut cmd = Command::new(bin());
    m.env(&mut cmd);
    let mut child = cmd
        .current_dir(root())
        .env("DRYRUN_STATE_DIR", state)
        .args(run_args(m, bp.to_str().unwrap(), &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while journal_lines(state) < k && start.elapsed() < Duration::from_secs(20) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    journal_lines(state)
}

#[test]
fn cleanup_after_kill_at_every_journal_step_leaves_nothing_tagged() {
    let Some(m) = Moto::start() else { return };
    let dir = state_dir();
    let bp = blueprint(
        dir.path(),
        "  - name: ok\n    type: command\n    run: 'true'\n",
    );
    let full = state_dir();
    let out = run(dryrun_aws(&m, full.path()).args(run_args(&m, bp.to_str().unwrap(), &[])));
    assert_eq!(out.status.code(), Some(0));
    let total = journal_lines(full.path());
    assert!(total >= 10, "journal too short: {total}");
    let mut seen = Vec::new();
    for k in 1..total {
        let state = state_dir();
        seen.push(kill_at(&m, state.path(), &bp, k));
        let out = run(dryrun_aws(&m, state.path()).args([
            "cleanup",
            "--all",
            "--provider",
            "aws",
            "--yes",
        ]));
        assert_eq!(out.status.code(), Some(0), "cleanup after kill at line {k}");
        assert_nothing_tagged(&m, None);
        let out = run(dryrun_aws(&m, state.path()).args([
            "cleanup",
            "--all",
            "--provider",
            "aws",
            "--yes",
        ]));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("nothing to clean up"),
            "cleanup is idempotent"
        );
    }
    eprintln!("killed at journal lines {seen:?} of {total}");
}

#[test]
fn cleanup_by_tag_after_the_state_directory_is_lost() {
    let Some(m) = Moto::start() else { return };
    let dir = state_dir();
    let bp = blueprint(
        dir.path(),
        "  - name: ok\n    type: command\n    run: 'true'\n",
    );
    // Killed once the instance id is journaled: a database, a bucket, a group, an instance.
    let state = state_dir();
    kill_at(&m, state.path(), &bp, 7);
    let left = m.tagged(None);
    assert!(!left.is_empty(), "the kill should leave something to find");
    let before = m.production();
    drop(state); // the state directory, journals and all, is gone
    let empty = state_dir();
    let out = run(dryrun_aws(&m, empty.path()).args(["cleanup", "--all", "--provider", "aws"]));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("found by tag"), "{listing}");
    // Not expired yet (the tags say start + 1h): --expired leaves the run alone.
    let out = run(dryrun_aws(&m, empty.path()).args([
        "cleanup",
        "--expired",
        "--provider",
        "aws",
        "--yes",
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to clean up"));
    assert_eq!(m.tagged(None), left, "listing deletes nothing");
    let out =
        run(dryrun_aws(&m, empty.path()).args(["cleanup", "--all", "--provider", "aws", "--yes"]));
    assert_eq!(out.status.code(), Some(0));
    assert_nothing_tagged(&m, None);
    assert_eq!(m.production(), before);
    let out =
        run(dryrun_aws(&m, empty.path()).args(["cleanup", "--all", "--provider", "aws", "--yes"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to clean up"));
}

#[test]
fn production_guard_refuses_decoys_named_in_a_forged_journal() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    // Decoys: production-like resources without the run tag, and one tagged for another run.
    let (decoy_instance, decoy_sg) = m.rt.block_on(async {
        m.rds
            .create_db_instance()
            .db_instance_identifier("decoy-db")
            .engine("postgres")
            .db_instance_class("db.t3.micro")
            .master_username("x")
            .master_user_password("decoy-password-123")
            .allocated_storage(20)
            .send()
            .await
            .unwrap();
        m.s3.create_bucket()
            .bucket("decoy-bucket")
            .send()
            .await
            .unwrap();
        m.s3.put_object()
            .bucket("decoy-bucket")
            .key("keep.txt")
            .body(b"keep".to_vec().into())
            .send()
            .await
            .unwrap();
        m.s3.create_bucket()
            .bucket("dryrun-decoy-other-run")
            .send()
            .await
            .unwrap();
        m.s3.put_bucket_tagging()
            .bucket("dryrun-decoy-other-run")
            .tagging(
                aws_sdk_s3::types::Tagging::builder()
                    .tag_set(
                        aws_sdk_s3::types::Tag::builder()
                            .key("dryrun:run-id")
                            .value("other-run")
                            .build()
                            .unwrap(),
                    )
                    .tag_set(
                        aws_sdk_s3::types::Tag::builder()
                            .key("dryrun:created-by")
                            .value("dryrun 0.1.0")
                            .build()
                            .unwrap(),
                    )
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        let sg = m
            .ec2
            .create_security_group()
            .group_name("decoy-sg")
            .description("production")
            .send()
            .await
            .unwrap()
            .group_id()
            .unwrap()
            .to_string();
        let i = m
            .ec2
            .run_instances()
            .image_id(&m.ami)
            .min_count(1)
            .max_count(1)
            .send()
            .await
            .unwrap();
        (i.instances()[0].instance_id().unwrap().to_string(), sg)
    });
    // A journal that claims the decoys (a corrupted or hostile state directory).
    let run_id = "forged-20261122-000000-0000";
    let dir = state.path().join("runs").join(run_id);
    std::fs::create_dir_all(&dir).unwrap();
    let rec = |address: &str, kind: &str, id: &str| {
        format!(
            "{{\"event\":\"creating\",\"record\":{{\"address\":\"{address}\",\"kind\":\"{kind}\",\"id\":\"{id}\",\"data\":{{\"run_id\":\"{run_id}\",\"region\":\"us-east-1\"}}}}}}\n"
        )
    };
    let journal = format!(
        "{{\"event\":\"started\",\"run_id\":\"{run_id}\",\"blueprint\":\"forged\",\"blueprint_path\":\"x\",\"provider\":\"aws\",\"release\":\"x\",\"at\":\"2026-11-22T00:00:00Z\",\"expires_at\":\"2026-11-22T01:00:00Z\",\"pid\":1}}\n{}{}{}{}",
        rec("database.db", "database", "decoy-db"),
        rec("bucket.assets", "bucket", "decoy-bucket"),
        rec("bucket.other", "bucket", "dryrun-decoy-other-run"),
        rec("service.app", "service", &decoy_instance),
    );
    std::fs::write(dir.join("journal.jsonl"), journal).unwrap();
    let out =
        run(dryrun_aws(&m, state.path()).args(["cleanup", run_id, "--provider", "aws", "--yes"]));
    assert_eq!(out.status.code(), Some(4), "refusals are left behind");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "refusing to modify rds instance decoy-db: it has no dryrun:run-id tag",
        "refusing to modify s3 bucket decoy-bucket: it has no dryrun:run-id tag",
        "refusing to modify s3 bucket dryrun-decoy-other-run: its dryrun:run-id tag is `other-run`",
        &format!("refusing to modify ec2 instance {decoy_instance}: it has no dryrun:run-id tag"),
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    // Cleanup by tag never sees the untagged decoys; the bucket tagged for `other-run` is,
    // by its tag, that run's leftover and is removed as such.
    let out = run(dryrun_aws(&m, state_dir().path()).args([
        "cleanup",
        "--all",
        "--provider",
        "aws",
        "--yes",
    ]));
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("run other-run: cleaned up"));
    m.rt.block_on(async {
        let d = m
            .rds
            .describe_db_instances()
            .db_instance_identifier("decoy-db")
            .send()
            .await
            .unwrap();
        assert_eq!(d.db_instances()[0].db_instance_status(), Some("available"));
        let o =
            m.s3.list_objects_v2()
                .bucket("decoy-bucket")
                .send()
                .await
                .unwrap();
        assert_eq!(o.key_count(), Some(1));
        let g = m
            .ec2
            .describe_security_groups()
            .group_ids(&decoy_sg)
            .send()
            .await
            .unwrap();
        assert_eq!(g.security_groups().len(), 1);
        let i = m
            .ec2
            .describe_instances()
            .instance_ids(&decoy_instance)
            .send()
            .await
            .unwrap();
        assert_eq!(
            i.reservations()[0].instances()[0]
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str()),
            Some("running")
        );
    });
}

/// A production-like RDS instance carrying (forged or mistaken) dryrun tags.
fn tagged_db(m: &Moto, id: &str, run_id: &str, protected: bool) {
    m.rt.block_on(async {
        let tag = |k: &str, v: &str| aws_sdk_rds::types::Tag::builder().key(k).value(v).build();
        m.rds
            .create_db_instance()
            .db_instance_identifier(id)
            .engine("postgres")
            .db_instance_class("db.t3.micro")
            .master_username("x")
            .master_user_password("tagged-password-123")
            .allocated_storage(20)
            .deletion_protection(protected)
            .tags(tag("dryrun:run-id", run_id))
            .tags(tag("dryrun:created-by", "dryrun 0.1.0"))
            .tags(tag("dryrun:blueprint", "shop"))
            .tags(tag("dryrun:expires-at", "2026-11-22T05:00:00Z"))
            .send()
            .await
            .unwrap();
    });
}

fn db_state(m: &Moto, id: &str) -> Option<(String, bool)> {
    m.rt.block_on(async {
        let d = m
            .rds
            .describe_db_instances()
            .db_instance_identifier(id)
            .send()
            .await
            .ok()?;
        let d = d.db_instances().first()?;
        Some((
            d.db_instance_status().unwrap_or("").to_string(),
            d.deletion_protection().unwrap_or(false),
        ))
    })
}

#[test]
fn cleanup_by_tag_never_touches_what_is_not_provably_dryruns() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let old_run = "shop-20261122-025412-0503";
    // Production, tagged as if dryrun made it (the attack the tag alone would let through),
    // with deletion protection on; a `dryrun-` copy that is protected; and a `dryrun-` copy
    // that existed before the run its tag names started.
    tagged_db(&m, "shop-orders-prod", old_run, true);
    tagged_db(&m, "shop-reports-prod", old_run, false);
    tagged_db(&m, "dryrun-protected-copy", old_run, true);
    tagged_db(
        &m,
        "dryrun-older-than-its-run",
        "shop-20991231-000000-0000",
        false,
    );
    let prod_instance = m.rt.block_on(async {
        let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
        let i = m
            .ec2
            .run_instances()
            .image_id(&m.ami)
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                    .tags(tag("dryrun:run-id", old_run))
                    .tags(tag("dryrun:created-by", "dryrun 0.1.0"))
                    .tags(tag("dryrun:expires-at", "2026-11-22T05:00:00Z"))
                    .tags(tag("Name", "shop-web-prod"))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        i.instances()[0].instance_id().unwrap().to_string()
    });
    for target in ["--expired", "--all"] {
        let out = run(dryrun_aws(&m, state.path()).args([
            "cleanup",
            target,
            "--provider",
            "aws",
            "--yes",
        ]));
        assert_eq!(
            out.status.code(),
            Some(4),
            "{target}: refusals are reported left behind"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "rds instance shop-orders-prod: its name `shop-orders-prod` does not start with `dryrun-`",
            "rds instance shop-reports-prod: its name `shop-reports-prod` does not start with `dryrun-`",
            "rds instance dryrun-protected-copy has deletion protection on; dryrun never turns it off",
            "rds instance dryrun-older-than-its-run: it was created at",
            &format!(
                "ec2 instance {prod_instance}: its name `shop-web-prod` does not start with `dryrun-`"
            ),
        ] {
            assert!(
                text.contains(needle),
                "{target}: missing `{needle}` in:\n{text}"
            );
        }
    }
    for id in [
        "shop-orders-prod",
        "shop-reports-prod",
        "dryrun-protected-copy",
        "dryrun-older-than-its-run",
    ] {
        let (status, protected) = db_state(&m, id).unwrap_or_else(|| panic!("{id} was deleted"));
        assert_eq!(status, "available", "{id}");
        if id.contains("orders") || id.contains("protected") {
            assert!(protected, "{id}: deletion protection was turned off");
        }
    }
    let mutations: Vec<String> = m
        .requests()
        .into_iter()
        .filter(|q| {
            matches!(
                q.action.as_str(),
                "ModifyDBInstance" | "DeleteDBInstance" | "TerminateInstances"
            )
        })
        .map(|q| format!("{} {:?}", q.action, q.params))
        .collect();
    assert!(
        mutations.is_empty(),
        "mutating requests were sent: {mutations:?}"
    );
    let state_of = m.rt.block_on(async {
        let d = m
            .ec2
            .describe_instances()
            .instance_ids(&prod_instance)
            .send()
            .await
            .unwrap();
        d.reservations()[0].instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
    });
    assert_eq!(state_of.as_deref(), Some("running"));
}

#[test]
fn a_retried_run_adopts_its_tagged_instance_instead_of_launching_another() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let bp = blueprint(
        state.path(),
        "  - name: ok\n    type: command\n    run: 'true'\n",
    );
    let run_id = "app-20261122-000000-beef";
    // What a first attempt left: two instances for service.app (moto ignores ClientToken, so a
    // retried RunInstances made a second one).
    let ids = m.rt.block_on(async {
        let mut ids = Vec::new();
        for _ in 0..2 {
            let i = m
                .ec2
                .run_instances()
                .image_id(&m.ami)
                .min_count(1)
                .max_count(1)
                .client_token(format!("dryrun-{run_id}-app"))
                .tag_specifications(
                    aws_sdk_ec2::types::TagSpecification::builder()
                        .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                        .tags(
                            aws_sdk_ec2::types::Tag::builder()
                                .key("dryrun:run-id")
                                .value(run_id)
                                .build(),
                        )
                        .tags(
                            aws_sdk_ec2::types::Tag::builder()
                                .key("dryrun:resource")
                                .value("service.app")
                                .build(),
                        )
                        // The rest of the tag set every dryrun launch carries.
                        .tags(
                            aws_sdk_ec2::types::Tag::builder()
                                .key("dryrun:created-by")
                                .value("dryrun 0.1.0")
                                .build(),
                        )
                        .tags(
                            aws_sdk_ec2::types::Tag::builder()
                                .key("Name")
                                .value(format!("dryrun-{run_id}-app"))
                                .build(),
                        )
                        .build(),
                )
                .send()
                .await
                .unwrap();
            ids.push(i.instances()[0].instance_id().unwrap().to_string());
        }
        ids
    });
    let launches_before = m
        .requests()
        .iter()
        .filter(|q| q.action == "RunInstances")
        .count();
    let out = run(dryrun_aws(&m, state.path()).args(run_args(
        &m,
        bp.to_str().unwrap(),
        &["--run-id", run_id],
    )));
    assert_eq!(out.status.code(), Some(0));
    let r = report_of(&out);
    let app = r["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["address"] == "service.app")
        .unwrap()
        .clone();
    assert_eq!(
        app["id"],
        ids[0].as_str(),
        "the first tagged instance is adopted"
    );
    let launches = m
        .requests()
        .iter()
        .filter(|q| q.action == "RunInstances")
        .count();
    assert_eq!(launches, launches_before, "no new instance was launched");
    assert_nothing_tagged(&m, None);
}

#[test]
fn the_copys_password_and_productions_never_appear_in_any_form() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let reports = state.path().join("out");
    // With debug logging on (every AWS request logged): logs must not carry secrets either.
    let out = run(dryrun_aws(&m, state.path())
        .env("DRYRUN_LOG", "debug")
        .args(run_args(&m, "blueprints/aws/shop.yaml", &["--report-dir"]))
        .arg(&reports));
    assert_eq!(out.status.code(), Some(3), "moto's http checks cannot run");
    // The generated password, as the emulator received it.
    let fresh = m
        .requests()
        .into_iter()
        .find(|q| q.action == "ModifyDBInstance")
        .map(|q| q.params["MasterUserPassword"].clone())
        .expect("ModifyDBInstance with a fresh password");
    assert_eq!(fresh.len(), 32);
    let mut forms = canary_forms(&fresh);
    forms.extend(canary_forms(PROD_PASSWORD));
    forms.extend(canary_forms(moto::SECRET_KEY));
    assert_no_canary("stdout", &out.stdout, &forms);
    assert_no_canary("stderr", &out.stderr, &forms);
    let files = assert_no_canary_in_dir(state.path(), &forms);
    assert!(files >= 3, "journal, report, JUnit: {files}");
    eprintln!(
        "searched stdout, stderr and {files} files for {} forms of 2 passwords: 0 hits",
        forms.len()
    );
}

/// A database-only blueprint of `engine` from `source` (the gate off: the emulator's copy has
/// an address nothing connects to).
fn db_blueprint(dir: &Path, engine: &str, source: &str) -> PathBuf {
    let p = dir.join(format!("{engine}.yaml"));
    std::fs::write(
        &p,
        format!(
            "name: {engine}\npii_gate: off\nresources:\n  db:\n    type: database\n    engine: {engine}\n    source: {source}\n    database: shop\nttl: 1h\n"
        ),
    )
    .unwrap();
    p
}

/// `dryrun run` of a [`db_blueprint`] (it declares no params).
fn db_run_args(bp: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "run",
        bp.to_str().unwrap(),
        "--provider",
        "aws",
        "--release",
        RELEASE,
        "--json",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    v.extend(extra.iter().map(ToString::to_string));
    v
}

#[test]
fn aurora_is_cloned_copy_on_write_privately_and_torn_down_instance_then_cluster() {
    let Some(m) = Moto::start() else { return };
    m.aurora_and_mysql();
    let before = m.aurora_production();
    let dir = tempfile::tempdir().unwrap();
    let bp = db_blueprint(dir.path(), "aurora-postgresql", moto::PROD_AURORA);
    let state = state_dir();
    let out = run(dryrun_aws(&m, state.path()).args(db_run_args(&bp, &[])));
    assert_eq!(out.status.code(), Some(0));
    let r = report_of(&out);
    assert_eq!(r["backup"]["id"], "latest", "{r}");
    assert_eq!(r["backup"]["source"], moto::PROD_AURORA);
    let run_id = r["run_id"].as_str().unwrap().to_string();

    let reqs = m.requests();
    let find = |action: &str| -> Vec<&moto::Request> {
        reqs.iter().filter(|q| q.action == action).collect()
    };
    let restore = find("RestoreDBClusterToPointInTime");
    assert_eq!(restore.len(), 1, "{reqs:?}");
    let p = &restore[0].params;
    assert_eq!(
        p.get("RestoreType").map(String::as_str),
        Some("copy-on-write"),
        "{p:?}"
    );
    assert_eq!(
        p.get("UseLatestRestorableTime").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        p.get("SourceDBClusterIdentifier").map(String::as_str),
        Some(moto::PROD_AURORA)
    );
    assert_eq!(
        p.get("DeletionProtection").map(String::as_str),
        Some("false")
    );
    assert!(
        p.keys().any(|k| k.starts_with("VpcSecurityGroupIds")),
        "{p:?}"
    );
    assert!(
        p.values().any(|v| v == &run_id),
        "tagged at creation: {p:?}"
    );
    let clone = p["DBClusterIdentifier"].clone();
    assert!(clone.starts_with("dryrun-"), "{clone}");
    let writer = find("CreateDBInstance");
    assert_eq!(writer.len(), 1);
    let w = &writer[0].params;
    assert_eq!(w.get("DBClusterIdentifier"), Some(&clone));
    assert_eq!(
        w.get("PubliclyAccessible").map(String::as_str),
        Some("false")
    );
    // A fresh password on the clone, never on production.
    let modify = find("ModifyDBCluster");
    assert_eq!(modify.len(), 1);
    assert_eq!(modify[0].params.get("DBClusterIdentifier"), Some(&clone));
    // Teardown: the writer, then the cluster; production is never a target.
    let pos = |a: &str| {
        reqs.iter()
            .position(|q| q.action == a)
            .unwrap_or_else(|| panic!("no {a}"))
    };
    assert!(pos("DeleteDBInstance") < pos("DeleteDBCluster"));
    for q in &reqs {
        if q.action.starts_with("Delete") || q.action.starts_with("Modify") {
            assert!(
                !q.params.values().any(|v| v.starts_with("shop-")),
                "{} touched production: {:?}",
                q.action,
                q.params
            );
        }
    }
    assert_nothing_tagged(&m, None);
    assert_eq!(m.aurora_production(), before, "production changed");
}

#[test]
fn aurora_refuses_a_snapshot_id_a_time_outside_its_window_and_the_wrong_engine_before_creating_anything()
 {
    let Some(m) = Moto::start() else { return };
    m.aurora_and_mysql();
    let dir = tempfile::tempdir().unwrap();
    let state = state_dir();
    let pg = db_blueprint(dir.path(), "aurora-postgresql", moto::PROD_AURORA);
    let my = db_blueprint(dir.path(), "aurora-mysql", moto::PROD_AURORA);
    for (bp, backup, want) in [
        (
            &pg,
            "nightly-1",
            "an Aurora copy is a clone of the live cluster",
        ),
        (&pg, "2020-01-01T00:00:00Z", "restorable window"),
        (&my, "latest", "runs aurora-postgresql, not aurora-mysql"),
    ] {
        let out = run(dryrun_aws(&m, state.path()).args(db_run_args(bp, &["--backup", backup])));
        assert_eq!(out.status.code(), Some(3), "{backup}");
        let r = report_of(&out);
        let failure = r["failure"].as_str().unwrap_or_default();
        assert!(failure.contains(want), "{backup}: {failure}");
    }
    assert!(
        !m.requests()
            .iter()
            .any(|q| q.action.starts_with("Restore") || q.action.starts_with("Create")),
        "something was created"
    );
    assert_nothing_tagged(&m, None);
}

#[test]
fn a_run_killed_during_an_aurora_clone_is_cleaned_up_by_tag_and_production_is_never_touched() {
    let Some(m) = Moto::start() else { return };
    m.aurora_and_mysql();
    let before = m.aurora_production();
    let state = state_dir();
    let dir = tempfile::tempdir().unwrap();
    let bp = db_blueprint(dir.path(), "aurora-postgresql", moto::PROD_AURORA);
    // Crash right after the clone is made (cluster and writer), before anything records it
    // as restored: the point's number comes from a counting run's failpoint log.
    let log = dir.path().join("points");
    let counting = state_dir();
    let out = run(dryrun_aws(&m, counting.path())
        .args(db_run_args(&bp, &[]))
        .env("DRYRUN_FAILPOINT_LOG", &log));
    assert_eq!(out.status.code(), Some(0));
    let points = std::fs::read_to_string(&log).unwrap();
    let at = points
        .lines()
        .find(|l| l.ends_with(" provider: after restore"))
        .and_then(|l| l.split(' ').next())
        .expect("the restore's failpoint")
        .to_string();
    let status = dryrun_aws(&m, state.path())
        .args(db_run_args(&bp, &[]))
        .env("DRYRUN_CRASH_AT", &at)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    let left = m.tagged(None);
    assert!(
        left.iter().any(|t| t.starts_with("cluster dryrun-")),
        "{left:?}"
    );
    assert!(
        left.iter().any(|t| t.starts_with("rds dryrun-")),
        "the writer: {left:?}"
    );
    let run_id = std::fs::read_dir(state.path().join("runs"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned();
    // A production cluster that someone tagged with the run's id: cleanup must refuse it.
    m.rt.block_on(async {
        m.rds
            .add_tags_to_resource()
            .resource_name(format!(
                "arn:aws:rds:{}:123456789012:cluster:{}",
                moto::REGION,
                moto::PROD_AURORA
            ))
            .tags(
                aws_sdk_rds::types::Tag::builder()
                    .key("dryrun:run-id")
                    .value(&run_id)
                    .build(),
            )
            .send()
            .await
            .unwrap();
    });
    let out =
        run(dryrun_aws(&m, state.path()).args(["cleanup", &run_id, "--provider", "aws", "--yes"]));
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("aurora cluster {}", moto::PROD_AURORA)),
        "the decoy is reported left behind: {text}"
    );
    let left = m.tagged(None);
    assert_eq!(left, [format!("cluster {}", moto::PROD_AURORA)], "{text}");
    let after = m.aurora_production();
    assert_eq!(
        after.split(" tags=").next(),
        before.split(" tags=").next(),
        "production's cluster changed"
    );
}

#[test]
fn plan_prices_the_copy_and_a_budget_refuses_a_run_before_anything_exists() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let before = m.production();
    // The reference blueprint: RDS from production's class and storage, EC2, the S3 copy.
    let mut plan = run_args(&m, "blueprints/aws/shop.yaml", &[]);
    plan[0] = "plan".into();
    plan.retain(|a| a != "--json" && a != "--release" && a != RELEASE);
    let out = run(dryrun_aws(&m, state.path())
        .args(&plan)
        .args(["--format", "json"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &p["cost"];
    assert_eq!(c["prices_as_of"], dryrun::cost::prices_as_of(), "{c:#}");
    assert_eq!(c["expected_basis"], "no history: assumed 1 h", "{c:#}");
    // ttl 3h + the 10 min teardown deadline.
    assert!(
        (c["max_hours"].as_f64().unwrap() - 3.17).abs() < 0.01,
        "{c:#}"
    );
    let item = |a: &str| {
        c["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["address"] == a)
            .unwrap_or_else(|| panic!("no {a}: {c:#}"))
            .clone()
    };
    let db = item("database.db");
    assert_eq!(
        db["what"], "RDS postgres db.t3.micro, 20 GB storage",
        "{db:#}"
    );
    assert!((db["hourly_usd"].as_f64().unwrap() - (0.018 + 20.0 * 0.115 / 730.0)).abs() < 1e-9);
    let app = item("service.app");
    assert_eq!(app["what"], "EC2 t3.small, 8 GB gp3 root volume", "{app:#}");
    let assets = item("bucket.assets");
    let objects = moto::prod_objects().len();
    assert!(
        assets["what"]
            .as_str()
            .unwrap()
            .starts_with(&format!("S3 copy of {objects} object(s)")),
        "{assets:#}"
    );
    assert!(assets["once_usd"].as_f64().unwrap() > 0.0);
    let sum: f64 = ["database.db", "service.app", "bucket.assets"]
        .iter()
        .map(|a| item(a)["hourly_usd"].as_f64().unwrap())
        .sum();
    assert!(
        (c["hourly_usd"].as_f64().unwrap() - sum).abs() < 0.001,
        "{c:#}"
    );
    assert!(c["max_usd"].as_f64().unwrap() > c["expected_usd"].as_f64().unwrap());
    // A plan creates nothing, not even a history file.
    assert!(!state.path().join("history.sqlite").exists());
    let text = run(dryrun_aws(&m, state.path()).args(&plan));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("cost: $") && text.contains("worst case $"),
        "{text}"
    );

    // A budget below the worst case: plan says so (exit 2), run refuses before anything exists.
    let dir = tempfile::tempdir().unwrap();
    let bp = db_blueprint(dir.path(), "postgres", PROD_DB);
    let with_budget = |max: &str| {
        let text = std::fs::read_to_string(&bp).unwrap();
        std::fs::write(
            &bp,
            format!(
                "{}budget:\n  max_usd: {max}\n",
                text.split("budget:").next().unwrap()
            ),
        )
        .unwrap();
    };
    // (0.018 + 20 GB × 0.115 / 730) per hour × (1 h ttl + 10 min) = $0.0247.
    with_budget("0.02");
    let out = run(dryrun_aws(&m, state.path()).args([
        "plan",
        bp.to_str().unwrap(),
        "--provider",
        "aws",
        "--format",
        "json",
    ]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["budget"]["within"], false, "{p:#}");
    assert!(
        (p["cost"]["max_usd"].as_f64().unwrap() - 0.025).abs() < 0.0015,
        "{p:#}"
    );
    let out = run(dryrun_aws(&m, state.path()).args(db_run_args(&bp, &[])));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("over budget.max_usd $0.02") && err.contains("nothing was created"),
        "{err}"
    );
    assert_nothing_tagged(&m, None);
    assert_eq!(m.production(), before);

    // Within budget: the run goes on, and its report has the estimate and what it cost.
    with_budget("1");
    let out = run(dryrun_aws(&m, state.path()).args(db_run_args(&bp, &[])));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = report_of(&out);
    let cost = &r["cost"];
    assert_eq!(
        cost["estimate"]["items"][0]["address"], "database.db",
        "{cost:#}"
    );
    // The RDS minimum (10 minutes) at least.
    let actual = cost["actual_usd"].as_f64().unwrap();
    assert!((0.003..0.03).contains(&actual), "{cost:#}");
    assert_nothing_tagged(&m, None);
}

/// `dryrun doctor` of the reference blueprint with the fixture params, as JSON.
fn doctor_aws(m: &Moto, state: &Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = run(dryrun_aws(m, state)
        .args([
            "doctor",
            "blueprints/aws/shop.yaml",
            "--provider",
            "aws",
            "--json",
            "--param",
            &format!("source_db={PROD_DB}"),
            "--param",
            &format!("assets_bucket={PROD_BUCKET}"),
            "--param",
            &format!("ami={}", m.ami),
        ])
        .args(extra));
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).expect("doctor --json"),
    )
}

fn finding(r: &serde_json::Value, check: &str) -> serde_json::Value {
    r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no finding `{check}`: {r:#}"))
        .clone()
}

/// Asserts a finding's status and that its detail holds `detail`.
fn expect_finding(r: &serde_json::Value, check: &str, status: &str, detail: &str) {
    let f = finding(r, check);
    assert_eq!(f["status"], status, "{check}: {r:#}");
    assert!(
        f["detail"].as_str().unwrap().contains(detail),
        "{check}: {f:#}"
    );
}

#[test]
fn doctor_reads_the_account_dry_runs_the_launch_and_finds_the_route_to_ssm_creating_nothing() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let before = m.production();
    // No instance profile: SSM could not reach the instance. The default VPC of the emulator
    // has no default route and no endpoints.
    let (code, r) = doctor_aws(&m, state.path(), &[]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(finding(&r, "aws region")["status"], "pass");
    expect_finding(&r, "aws credentials", "pass", "account");
    expect_finding(&r, "database.db backup", "pass", SNAPSHOTS[2]);
    assert_eq!(
        finding(&r, "bucket.assets source")["status"],
        "pass",
        "{r:#}"
    );
    assert_eq!(finding(&r, "instance profile")["status"], "fail", "{r:#}");
    // The fixtures' AMI (the emulator's first Amazon image) is a Windows one: the boot
    // template and the install are shell scripts.
    let windows =
        m.rt.block_on(m.ec2.describe_images().image_ids(&m.ami).send())
            .unwrap()
            .images()[0]
            .platform()
            .is_some_and(|p| p.as_str() == "windows");
    if windows {
        expect_finding(&r, "service.app ami", "fail", "Windows image");
    }
    expect_finding(
        &r,
        "service.app launch (dry run)",
        "pass",
        "would be allowed",
    );
    expect_finding(&r, "service.app route to ssm", "fail", "no default route");
    let route = finding(&r, "service.app route to ssm");
    assert!(
        route["fix"].as_str().unwrap().contains("NAT gateway"),
        "{route:#}"
    );
    assert_eq!(finding(&r, "other permissions")["status"], "skip");

    // A profile that does not exist: the dry-run launch says so.
    let (_, r) = doctor_aws(
        &m,
        state.path(),
        &["--param", "instance_profile=no-such-profile"],
    );
    expect_finding(
        &r,
        "service.app launch (dry run)",
        "fail",
        "the launch would fail",
    );

    // Interface endpoints for ssm, ssmmessages and ec2messages, but none for S3: the instance
    // could not fetch the release.
    let endpoint = |service: &str, kind: aws_sdk_ec2::types::VpcEndpointType| {
        m.rt.block_on(async {
            let vpc = m
                .ec2
                .describe_vpcs()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("is-default")
                        .values("true")
                        .build(),
                )
                .send()
                .await
                .unwrap()
                .vpcs()[0]
                .vpc_id()
                .unwrap()
                .to_string();
            m.ec2
                .create_vpc_endpoint()
                .vpc_id(&vpc)
                .vpc_endpoint_type(kind)
                .service_name(format!("com.amazonaws.{}.{service}", moto::REGION))
                .send()
                .await
                .unwrap();
        });
    };
    for s in ["ssm", "ssmmessages", "ec2messages"] {
        endpoint(s, aws_sdk_ec2::types::VpcEndpointType::Interface);
    }
    let (_, r) = doctor_aws(&m, state.path(), &[]);
    expect_finding(
        &r,
        "service.app route to ssm",
        "fail",
        "lacks endpoints for s3",
    );
    // With the S3 gateway endpoint too, the route check passes; and an Ubuntu image of the
    // emulator's catalogue is of a family that ships the SSM agent.
    endpoint("s3", aws_sdk_ec2::types::VpcEndpointType::Gateway);
    let ubuntu = m.rt.block_on(async {
        m.ec2
            .describe_images()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("name")
                    .values("ubuntu/images/*")
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .images()[0]
            .image_id()
            .unwrap()
            .to_string()
    });
    let (_, r) = doctor_aws(&m, state.path(), &["--param", &format!("ami={ubuntu}")]);
    expect_finding(&r, "service.app ami", "pass", "ubuntu");
    expect_finding(
        &r,
        "service.app route to ssm",
        "pass",
        "endpoints for ssm, ssmmessages, ec2messages and s3",
    );

    // Wrong credentials: one failure that says how to configure them, nothing else asked.
    let out = run(dryrun_aws(&m, state.path())
        .args(["doctor", "--provider", "aws", "--json"])
        .env("AWS_ACCESS_KEY_ID", "")
        .env("AWS_SECRET_ACCESS_KEY", ""));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let who = finding(&r, "aws credentials");
    assert_eq!(who["status"], "fail", "{r:#}");
    assert!(
        who["fix"].as_str().unwrap().contains("AWS_PROFILE"),
        "{who:#}"
    );

    // Doctor created nothing: no instance, nothing tagged, production as it was.
    let instances = m.rt.block_on(m.ec2.describe_instances().send()).unwrap();
    assert!(instances.reservations().is_empty(), "{instances:?}");
    assert_nothing_tagged(&m, None);
    assert_eq!(m.production(), before);
    assert!(!state.path().join("history.sqlite").exists());
}

#[test]
fn init_describes_the_production_instance_and_bucket_and_what_it_writes_validates() {
    let Some(m) = Moto::start() else { return };
    let state = state_dir();
    let dir = tempfile::tempdir().unwrap();
    let out = run(dryrun_aws(&m, state.path()).args([
        "init",
        "--provider",
        "aws",
        "--name",
        "shop-aws",
        "--dir",
        dir.path().to_str().unwrap(),
        "--database",
        PROD_DB,
        "--bucket",
        PROD_BUCKET,
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = std::fs::read_to_string(dir.path().join("shop-aws.yaml")).unwrap();
    for want in [
        &format!("engine: postgres\n    source: \"{PROD_DB}\"") as &str,
        &format!("type: bucket\n    source: \"{PROD_BUCKET}\""),
        "RDS instance `shop-prod`: postgres",
        "ami: \"{{params.ami}}\"",
        "instance_profile: \"{{params.instance_profile}}\"",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let v = run(dryrun(state.path()).args([
        "validate",
        dir.path().join("shop-aws.yaml").to_str().unwrap(),
    ]));
    assert_eq!(v.status.code(), Some(0), "{v:?}");
    // A source that does not exist is named; nothing is written.
    let other = tempfile::tempdir().unwrap();
    let out = run(dryrun_aws(&m, state.path()).args([
        "init",
        "--provider",
        "aws",
        "--dir",
        other.path().to_str().unwrap(),
        "--database",
        "no-such-db",
    ]));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no RDS instance or Aurora cluster `no-such-db`")
    );
    assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 0);
    assert_nothing_tagged(&m, None);
}
