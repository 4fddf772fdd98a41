//! A new user's first commands on the local provider: `dryrun init` scaffolds from a real
//! backup store and what it writes validates and plans; `dryrun doctor` passes on a machine
//! that has what the blueprint needs and fails, with the fix, on each miss (a dump this
//! machine's pg_restore cannot read, a missing backup, a state directory others can write).
//! The AWS side of both commands is in tests/aws.rs.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::*;

fn doctor_json(state: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = run(dryrun(state).arg("doctor").args(args).arg("--json"));
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn finding<'a>(r: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no finding `{check}`: {r:#}"))
}

#[test]
fn init_scaffolds_from_the_demo_store_and_what_it_writes_validates_plans_and_passes_doctor() {
    let state = state_dir();
    let out_dir = tempfile::tempdir().unwrap();
    let store = root().join("blueprints/demo/production");
    let init = || {
        run(dryrun(state.path()).args([
            "init",
            "--name",
            "shop-start",
            "--dir",
            out_dir.path().to_str().unwrap(),
            "--backups",
            store.join("backups").to_str().unwrap(),
            "--buckets",
            store.join("buckets").to_str().unwrap(),
        ]))
    };
    let out = init();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let file = out_dir.path().join("shop-start.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    // Every source of the store, with its engine from backup.json, and the bucket.
    for want in [
        "engine: sqlite\n    source: \"shop-db\"",
        "engine: postgres\n    source: \"shop-pg\"\n",
        "engine: postgres\n    source: \"shop-pg-large\"",
        "type: bucket\n    source: \"uploads\"",
        "SHOP_DB_PATH: \"{{resources.shop-db.path}}\"",
        "SHOP_PG_URL: \"{{resources.shop-pg.url}}\"",
        "name: shop-db-has-tables",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let manifest = out_dir.path().join("release/dryrun-release.yaml");
    assert!(manifest.is_file());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 database(s), 1 bucket(s)"), "{stdout}");
    assert!(stdout.contains("dryrun doctor"), "{stdout}");

    let v = run(dryrun(state.path()).args(["validate", file.to_str().unwrap()]));
    assert_eq!(v.status.code(), Some(0), "{v:?}");
    // plan finds each source's latest backup and loads the scaffolded release manifest.
    let p = run(dryrun(state.path()).args([
        "plan",
        file.to_str().unwrap(),
        "--release",
        out_dir.path().join("release").to_str().unwrap(),
        "--format",
        "json",
    ]));
    assert_eq!(p.status.code(), Some(0), "{p:?}");
    let plan: serde_json::Value = serde_json::from_slice(&p.stdout).unwrap();
    assert_eq!(plan["backups"].as_array().unwrap().len(), 3, "{plan:#}");

    // Files that exist are kept without --force.
    let again = init();
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);

    // doctor on what init wrote: every backup found; with PostgreSQL here, its pg_restore
    // reads both dumps.
    if !have_postgres() {
        return;
    }
    let (code, r) = doctor_json(state.path(), &[file.to_str().unwrap()]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["blueprints"], serde_json::json!(["shop-start"]));
    for check in [
        "database.shop-db backup",
        "database.shop-pg backup",
        "database.shop-pg-large backup",
        "bucket.uploads source",
        "postgres binaries",
        "database.shop-pg dump readable",
        "database.shop-pg-large dump readable",
    ] {
        assert_eq!(finding(&r, check)["status"], "pass", "{check}: {r:#}");
    }
    assert_ne!(finding(&r, "state directory")["status"], "fail", "{r:#}");
    assert_eq!(finding(&r, "free space")["status"], "pass", "{r:#}");
}

#[test]
fn init_leaves_out_names_that_could_inject_a_template_or_yaml_and_still_validates() {
    let state = state_dir();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("backups");
    let demo = root().join("blueprints/demo/production/backups/shop-db/shop-db-2026-11-21T0300Z");
    // A good source, and two whose names an attacker with write access to the store chose;
    // the good one's backup id (it goes into a comment) is the attacker's too.
    for source in ["orders", "x{{secrets.api_token}}", "a\nresources: {}"] {
        let dir = store.join(source).join("b1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(demo.join("shop.sqlite"), dir.join("shop.sqlite")).unwrap();
        let id = "b1\nresources:\n  evil: {type: bucket, source: x}\n# {{secrets.api_token}}";
        let meta = serde_json::json!({"id": id, "source": source, "engine": "sqlite",
            "taken_at": "2026-11-21T03:00:00Z", "file": "shop.sqlite", "complete": true});
        std::fs::write(dir.join("backup.json"), meta.to_string()).unwrap();
    }
    let out_dir = t.path().join("out");
    let out = run(dryrun(state.path()).args([
        "init",
        "--name",
        "orders",
        "--dir",
        out_dir.to_str().unwrap(),
        "--backups",
        store.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = std::fs::read_to_string(out_dir.join("orders.yaml")).unwrap();
    assert!(text.contains("source: \"orders\""), "{text}");
    assert!(!text.contains("{{secrets"), "{text}");
    assert!(!text.contains("resources: {}"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("resources:")).count(),
        1,
        "{text}"
    );
    assert!(!text.contains("\n  evil:"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("left out backup source").count(), 2, "{err}");
    // The blueprint points at the store by an absolute path (it is not below --dir).
    assert!(
        text.contains(&format!(
            "backups: \"{}\"",
            std::fs::canonicalize(&store).unwrap().display()
        )),
        "{text}"
    );
    let v =
        run(dryrun(state.path()).args(["validate", out_dir.join("orders.yaml").to_str().unwrap()]));
    assert_eq!(v.status.code(), Some(0), "{v:?}");
    // An empty store is refused, and a bad name too.
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(dryrun(state.path()).args([
        "init",
        "--dir",
        out_dir.to_str().unwrap(),
        "--backups",
        empty.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(dryrun(state.path()).args([
        "init",
        "--name",
        "Bad Name",
        "--backups",
        store.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn doctor_fails_with_the_fix_on_an_unreadable_dump_a_missing_backup_and_an_open_state_dir() {
    if !have_postgres() {
        return;
    }
    let state = state_dir();
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = t.path().join("backups");
    // A "dump" pg_restore cannot read (what a newer server's dump looks like to an older
    // pg_restore: a header it refuses).
    let dir = store.join("ledger/l1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("dump.pgc"),
        b"PGDMP\x63\x0f\x00garbage that is no archive",
    )
    .unwrap();
    let meta = serde_json::json!({"id": "l1", "source": "ledger", "engine": "postgres",
        "taken_at": "2026-11-21T03:00:00Z", "file": "dump.pgc", "complete": true});
    std::fs::write(dir.join("backup.json"), meta.to_string()).unwrap();
    let bp = t.path().join("ledger.yaml");
    std::fs::write(
        &bp,
        format!(
            "name: ledger\nproviders:\n  local:\n    backups: {}\nresources:\n  ledger:\n    type: database\n    engine: postgres\n    source: ledger\n    database: ledger\n  gone:\n    type: database\n    engine: sqlite\n    source: gone\n    database: gone\nchecks: []\n",
            store.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, r) = doctor_json(state.path(), &[bp.to_str().unwrap()]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["ok"], false);
    let dump = finding(&r, "database.ledger dump readable");
    assert_eq!(dump["status"], "fail", "{r:#}");
    assert!(
        dump["detail"]
            .as_str()
            .unwrap()
            .contains("pg_restore cannot read l1"),
        "{dump:#}"
    );
    assert!(
        dump["fix"].as_str().unwrap().contains("DRYRUN_PG_BIN"),
        "{dump:#}"
    );
    let gone = finding(&r, "database.gone backup");
    assert_eq!(gone["status"], "fail", "{r:#}");
    assert!(
        gone["detail"].as_str().unwrap().contains("gone"),
        "{gone:#}"
    );
    let sd = finding(&r, "state directory");
    assert_eq!(sd["status"], "fail", "{r:#}");
    assert!(sd["fix"].as_str().unwrap().contains("chmod"), "{sd:#}");
    // The text form says the same, each fix under its miss, and counts.
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(dryrun(state.path()).args(["doctor", bp.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL database.ledger dump readable"),
        "{text}"
    );
    assert!(
        text.contains("fix: pg_restore reads dumps of its own major version"),
        "{text}"
    );
    assert!(text.contains("2 failed"), "{text}");
    // Nothing was created in the state directory.
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
}

#[test]
fn doctor_without_a_blueprint_checks_the_machine_and_says_what_it_skips() {
    let state = state_dir();
    let (code, r) = doctor_json(state.path(), &[]);
    assert_eq!(r["provider"], "local");
    assert_eq!(r["blueprints"], serde_json::json!([]));
    // postgres: present in CI (a pass), a warning elsewhere; never a failure without a
    // blueprint that needs it.
    let pg = finding(&r, "postgres binaries");
    assert_ne!(pg["status"], "fail", "{r:#}");
    let fw = finding(&r, "egress firewall");
    assert!(fw["status"] == "pass" || fw["status"] == "warn", "{r:#}");
    assert_eq!(code, 0, "{r:#}");
    let help = run(dryrun(state.path()).args(["doctor", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("Exit 0 when nothing failed"), "{help}");
}

#[test]
fn a_backup_whose_data_file_points_outside_its_directory_is_never_read() {
    let state = state_dir();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("backups");
    let secret = t.path().join("secret.sqlite");
    std::fs::write(&secret, b"not production").unwrap();
    // backup.json is a file anyone who writes the store can shape.
    for (source, file) in [
        ("up", "../../../secret.sqlite".to_string()),
        ("abs", secret.display().to_string()),
    ] {
        let dir = store.join(source).join("b1");
        std::fs::create_dir_all(&dir).unwrap();
        let meta = serde_json::json!({"id": "b1", "source": source, "engine": "sqlite",
            "taken_at": "2026-11-21T03:00:00Z", "file": file, "complete": true});
        std::fs::write(dir.join("backup.json"), meta.to_string()).unwrap();
    }
    // init finds no usable backup in either source.
    let out = run(dryrun(state.path()).args([
        "init",
        "--dir",
        t.path().join("out").to_str().unwrap(),
        "--backups",
        store.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("no complete backup").count(), 2, "{err}");
    // doctor and plan of a blueprint naming them: no backup, and the secret is never named.
    let bp = t.path().join("esc.yaml");
    std::fs::write(
        &bp,
        format!(
            "name: esc\nproviders:\n  local:\n    backups: {}\nresources:\n  up:\n    type: database\n    engine: sqlite\n    source: up\n    database: up\n  abs:\n    type: database\n    engine: sqlite\n    source: abs\n    database: abs\nchecks: []\n",
            store.display()
        ),
    )
    .unwrap();
    let (code, r) = doctor_json(state.path(), &[bp.to_str().unwrap()]);
    assert_eq!(code, 1, "{r:#}");
    for check in ["database.up backup", "database.abs backup"] {
        assert_eq!(finding(&r, check)["status"], "fail", "{r:#}");
    }
    assert!(!r.to_string().contains("secret.sqlite"), "{r:#}");
    let plan = run(dryrun(state.path()).args(["plan", bp.to_str().unwrap()]));
    assert_eq!(plan.status.code(), Some(3), "{plan:?}");
}
