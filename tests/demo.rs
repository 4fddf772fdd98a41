//! The demo end to end on the local provider: real processes, real SQLite and PostgreSQL.

mod common;

use common::*;

fn run_demo(
    state: &std::path::Path,
    blueprint: &str,
    release: &str,
    extra: &[&str],
    report_dir: &std::path::Path,
) -> (i32, String, String) {
    require_demo_shop();
    let out = run(dryrun(state)
        .args(["run", blueprint, "--release", release, "--report-dir"])
        .arg(report_dir)
        .args(extra));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_v2_passes_reports_everything_and_leaves_nothing() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let reports = state.path().join("out");
    let (code, stdout, _) = run_demo(
        state.path(),
        "blueprints/demo/shop.yaml",
        "blueprints/demo/releases/v2",
        &[],
        &reports,
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("dry run PASSED"), "{stdout}");
    assert!(stdout.contains("left behind: none"));
    let ids = run_ids(state.path());
    assert_eq!(ids.len(), 1);
    assert_nothing_left(state.path(), &ids[0]);

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(r["status"], "passed");
    assert_eq!(r["release"]["version"], "2.0.0");
    assert_eq!(r["release"]["ref"], "blueprints/demo/releases/v2");
    assert_eq!(r["trigger"], "cli");
    assert_eq!(r["provider"], "local");
    assert_eq!(r["backup"]["id"], "shop-db-2026-11-21T0300Z");
    assert!(r["backup"]["age_seconds"].as_i64().unwrap() > 0);
    let stages: Vec<&str> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "compile",
            "provision",
            "restore",
            "install",
            "check",
            "teardown"
        ]
    );
    assert!(
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "passed" && s["duration_ms"].is_u64())
    );
    assert_eq!(r["checks"].as_array().unwrap().len(), 10);
    // The demo's personal data was masked, its mail went to the sink, the firewall held.
    let m = &r["masking"]["databases"][0];
    assert_eq!(m["rows"], 3000);
    assert_eq!(m["columns"].as_array().unwrap().len(), 2);
    let mail = &r["side_effects"]["mail"][0];
    assert_eq!(mail["subject"], "Order confirmation #1");
    assert!(
        mail["to"][0].as_str().unwrap().ends_with("@example.com"),
        "{mail}"
    );
    assert_eq!(r["firewall"]["enforced"], true, "{}", r["firewall"]);
    assert!(
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] == "passed")
    );
    assert!(
        r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["destroyed"] == true)
    );
    assert_eq!(r["left_behind"].as_array().unwrap().len(), 0);
    assert!(reports.join("junit.xml").is_file() && reports.join("report.md").is_file());
    // History keeps the report too.
    assert_eq!(report(state.path(), &ids[0])["run_id"], ids[0].as_str());
}

#[test]
fn demo_v3_fails_quoting_the_database_error_and_still_tears_down() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let reports = state.path().join("out");
    let (code, stdout, _) = run_demo(
        state.path(),
        "blueprints/demo/shop.yaml",
        "blueprints/demo/releases/v3",
        &[],
        &reports,
    );
    assert_eq!(code, 1, "a failing migration means the release would break");
    assert!(
        stdout.contains("UNIQUE constraint failed: customers.email"),
        "{stdout}"
    );
    let md = std::fs::read_to_string(reports.join("report.md")).unwrap();
    assert!(
        md.contains("statement: CREATE UNIQUE INDEX customers_email_unique ON customers(email);"),
        "{md}"
    );
    assert!(md.contains("error: UNIQUE constraint failed: customers.email"));
    let junit = std::fs::read_to_string(reports.join("junit.xml")).unwrap();
    assert!(junit.contains("UNIQUE constraint failed"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(r["status"], "failed");
    assert_eq!(r["stages"][3]["name"], "install");
    assert_eq!(r["stages"][3]["status"], "failed");
    assert!(
        r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["destroyed"] == true)
    );
    assert_eq!(r["left_behind"].as_array().unwrap().len(), 0);
    assert_nothing_left(state.path(), r["run_id"].as_str().unwrap());
}

#[test]
fn older_backup_is_restored_by_id_and_by_time() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let reports = state.path().join("out");
    let (code, _, _) = run_demo(
        state.path(),
        "blueprints/demo/shop.yaml",
        "blueprints/demo/releases/v2",
        &["--backup", "shop-db-2026-11-20T0300Z", "-q"],
        &reports,
    );
    assert_eq!(code, 0);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(r["backup"]["id"], "shop-db-2026-11-20T0300Z");
    let (code, _, _) = run_demo(
        state.path(),
        "blueprints/demo/shop.yaml",
        "blueprints/demo/releases/v2",
        &["--backup", "2026-11-20T12:00:00Z", "-q"],
        &reports,
    );
    assert_eq!(code, 0);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(r["backup"]["id"], "shop-db-2026-11-20T0300Z");
}

#[test]
fn unknown_backup_is_an_infrastructure_error_that_creates_nothing() {
    let state = state_dir();
    let reports = state.path().join("out");
    let (code, stdout, _) = run_demo(
        state.path(),
        "blueprints/demo/shop.yaml",
        "blueprints/demo/releases/v2",
        &["--backup", "nope", "-q"],
        &reports,
    );
    assert_eq!(code, 3);
    assert!(
        stdout.contains("no complete backup with id `nope`"),
        "{stdout}"
    );
    let ids = run_ids(state.path());
    assert!(!state.path().join("copies").join(&ids[0]).exists());
    let r = report(state.path(), &ids[0]);
    assert_eq!(
        r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| !x["id"].as_str().unwrap().is_empty())
            .count(),
        0
    );
}

#[test]
fn secret_value_never_appears_in_output_reports_logs_or_journal() {
    // Characters that URL-, HTML- and JSON-encoding change, so that every form differs.
    let canary = "canary+7f3a/9c1e=5b2d?4f60&x";
    let forms = canary_forms(canary);
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    require_demo_shop();
    let reports = state.path().join("out");
    for release in ["blueprints/demo/releases/v2", "blueprints/demo/releases/v3"] {
        let out = run(dryrun(state.path())
            .env("DEMO_API_TOKEN", canary)
            .env("DRYRUN_LOG", "debug")
            .args([
                "run",
                "blueprints/demo/shop.yaml",
                "--release",
                release,
                "--report-dir",
            ])
            .arg(&reports));
        assert!(out.status.code() == Some(0) || out.status.code() == Some(1));
        assert_no_canary("stdout", &out.stdout, &forms);
        assert_no_canary("stderr", &out.stderr, &forms);
    }
    let files = assert_no_canary_in_dir(state.path(), &forms);
    eprintln!(
        "searched {files} files for {} canary forms: 0 hits",
        forms.len()
    );
}

#[test]
fn postgres_demo_restores_a_dump_and_rehearses_migrations() {
    if !have_postgres() {
        return;
    }
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let reports = state.path().join("out");
    let (code, stdout, _) = run_demo(
        state.path(),
        "blueprints/demo/shop-pg.yaml",
        "blueprints/demo/releases/pg-v2",
        &["-q"],
        &reports,
    );
    assert_eq!(code, 0, "{stdout}");
    let (code, stdout, _) = run_demo(
        state.path(),
        "blueprints/demo/shop-pg.yaml",
        "blueprints/demo/releases/pg-v3",
        &["-q"],
        &reports,
    );
    assert_eq!(code, 1);
    assert!(
        stdout.contains("could not create unique index \"customers_email_unique\""),
        "{stdout}"
    );
    assert!(stdout.contains("is duplicated"), "{stdout}");
    for id in run_ids(state.path()) {
        assert_nothing_left(state.path(), &id);
    }
}

#[test]
fn kept_copy_stays_until_expiry_then_cleanup_expired_reaps_it() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let reports = state.path().join("out");
    let (code, stdout, _) = run_demo(
        state.path(),
        "blueprints/demo/shop.yaml",
        "blueprints/demo/releases/v2",
        &["--keep", "2s", "-q"],
        &reports,
    );
    assert_eq!(code, 0, "{stdout}");
    let id = run_ids(state.path()).remove(0);
    let r = report(state.path(), &id);
    assert!(r["kept_until"].is_string());
    // The copy is still there and serving.
    assert!(state.path().join("copies").join(&id).is_dir());
    assert!(
        !dryrun::process::find_tagged(&id, None).is_empty(),
        "the kept service should still run"
    );
    // Not expired yet: nothing to do.
    let out = run(dryrun(state.path()).args(["cleanup", "--expired", "--yes"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to clean up"));
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let out = run(dryrun(state.path()).args(["cleanup", "--expired"]));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listing.contains("would destroy") && listing.contains("service.app"),
        "{listing}"
    );
    assert!(
        state.path().join("copies").join(&id).is_dir(),
        "listing must not delete"
    );
    let out = run(dryrun(state.path()).args(["cleanup", "--expired", "--yes"]));
    assert_eq!(out.status.code(), Some(0));
    assert_nothing_left(state.path(), &id);
}

#[test]
fn a_release_that_prints_a_secret_leaves_no_trace_of_it_in_logs_or_reports() {
    let canary = "canary-printed-by-release-91c4";
    let state = state_dir();
    let dir = state.path().join("bp");
    std::fs::create_dir_all(dir.join("rel")).unwrap();
    std::fs::write(dir.join("rel/dryrun-release.yaml"), "version: \"1\"\ninstall:\n  - name: leak\n    run: 'echo \"the token is $TOKEN\"; echo \"and again: $TOKEN\" >&2'\n").unwrap();
    std::fs::write(
        dir.join("leaky.yaml"),
        format!("name: leaky\nsecrets:\n  token:\n    env: LEAKY_TOKEN_UNSET\n    default: {canary}\nresources:\n  app:\n    type: service\n    env:\n      TOKEN: \"{{{{secrets.token}}}}\"\n"),
    )
    .unwrap();
    let out = run(dryrun(state.path()).args([
        "run",
        dir.join("leaky.yaml").to_str().unwrap(),
        "--release",
        dir.join("rel").to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(0));
    let id = run_ids(state.path()).remove(0);
    let log = std::fs::read_to_string(
        state
            .path()
            .join("runs")
            .join(&id)
            .join("logs/app.install.leak.log"),
    )
    .unwrap();
    assert!(log.contains("the token is [redacted]"), "{log}");
    fn scan(dir: &std::path::Path, canary: &str) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                scan(&p, canary);
            } else if !p.ends_with("leaky.yaml") {
                assert!(
                    !String::from_utf8_lossy(&std::fs::read(&p).unwrap()).contains(canary),
                    "canary in {}",
                    p.display()
                );
            }
        }
    }
    scan(state.path(), canary);
}

/// The canary search finds a secret inside longer encoded texts at any alignment.
#[test]
fn canary_forms_find_a_secret_inside_longer_encodings() {
    use base64::Engine as _;
    let canary = "canary+7f3a/9c1e=5b2d?4f60&x";
    let forms = canary_forms(canary);
    let found = |text: &str| forms.iter().any(|f| text.contains(f.as_str()));
    for prefix in ["", "u:", "us:", "use:"] {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{prefix}{canary}!"));
        assert!(found(&format!("Authorization: Basic {b}")), "{prefix}: {b}");
    }
    assert!(found(&format!("x={}", hex::encode(format!("k={canary}")))));
    assert!(found("token=canary%2B7f3a%2F9c1e%3D5b2d%3F4f60%26x"));
    assert!(found("<td>canary+7f3a&#x2F;9c1e&#x3D;5b2d?4f60&amp;x</td>"));
    assert!(!found("canary+7f3a/9c1e=5b2d?4f6"));
}
