//! CLI edge: golden output for diagnostics and plans, help texts, every shipped blueprint valid.
//! Set UPDATE_GOLDEN=1 to rewrite the golden files after an intended change.

mod common;

use std::path::Path;

use common::*;

fn golden(name: &str, actual: &str) {
    let path = root().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing golden file {}; run with UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(actual, want, "output differs from {}", path.display());
}

#[test]
fn validate_reports_every_error_with_file_line_col_and_hints() {
    let state = state_dir();
    let out = run(dryrun(state.path()).args([
        "--color",
        "never",
        "validate",
        "tests/fixtures/broken.yaml",
    ]));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    golden("validate-broken.txt", &stderr);
    for needle in [
        "broken.yaml:7:11",
        "did you mean `database`?",
        "did you mean `depends_on`?",
        "did you mean `http`?",
        "did you mean `teardown`?",
        "unknown resource `queue`",
        "7 errors",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?}");
    }
}

#[test]
fn dependency_cycle_is_reported_with_its_chain() {
    let state = state_dir();
    let out = run(dryrun(state.path()).args([
        "--color",
        "never",
        "validate",
        "tests/fixtures/cycle.yaml",
    ]));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("dependency cycle: a → c → b → a")
            || stderr.contains("dependency cycle: a → b → c → a"),
        "{stderr}"
    );
}

#[test]
fn every_blueprint_under_blueprints_validates() {
    let mut files = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && p.file_name().is_some_and(|n| n != "dryrun-release.yaml")
            {
                out.push(p);
            }
        }
    }
    walk(&root().join("blueprints"), &mut files);
    assert!(
        files.len() >= 2,
        "expected the demo blueprints, found {files:?}"
    );
    let state = state_dir();
    for f in files {
        let out = run(dryrun(state.path()).arg("validate").arg(&f));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{} does not validate",
            f.display()
        );
    }
}

fn plan(format: &str) -> String {
    let state = state_dir();
    let out = run(dryrun(state.path())
        .env("DRYRUN_NOW", "2026-11-22T03:00:00Z")
        .args(["plan", "blueprints/demo/shop.yaml", "--format", format]));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !state.path().join("copies").exists(),
        "plan must create nothing"
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn plan_text_is_stable() {
    golden("plan-shop.txt", &plan("text"));
}

#[test]
fn plan_json_is_stable() {
    let json = plan("json");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["backups"][0]["id"], "shop-db-2026-11-21T0300Z");
    assert_eq!(v["backups"][0]["age_seconds"], 86_400);
    golden("plan-shop.json", &json);
}

#[test]
fn plan_dot_is_stable() {
    golden("plan-shop.dot", &plan("dot"));
}

#[test]
fn plan_with_unknown_backup_id_names_the_available_ones() {
    let state = state_dir();
    let out = run(dryrun(state.path()).args([
        "plan",
        "blueprints/demo/shop.yaml",
        "--backup",
        "shop-db-2026-11-19T0300Z",
    ]));
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("available: shop-db-2026-11-21T0300Z, shop-db-2026-11-20T0300Z"),
        "{stdout}"
    );
}

#[test]
fn run_help_lists_the_exit_codes() {
    let state = state_dir();
    let out = run(dryrun(state.path()).args(["run", "--help"]));
    assert_eq!(out.status.code(), Some(0));
    let s = String::from_utf8(out.stdout).unwrap();
    for code in [
        "0  every check passed",
        "1  a check",
        "2  blueprint or usage",
        "3  infrastructure",
        "4  teardown left",
    ] {
        assert!(s.contains(code), "missing {code:?} in:\n{s}");
    }
}

#[test]
fn unknown_param_is_a_usage_error_with_a_hint() {
    let state = state_dir();
    let out = run(dryrun(state.path()).args([
        "--color",
        "never",
        "plan",
        "blueprints/demo/shop.yaml",
        "--param",
        "min_customer=5",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("did you mean `min_customers`?")
    );
}

#[test]
fn plan_with_a_release_only_reads_its_sql_and_runs_nothing() {
    let state = state_dir();
    let rel = state.path().join("hostile-release");
    let marker = state.path().join("ran");
    std::fs::create_dir_all(rel.join("migrations")).unwrap();
    std::fs::write(
        rel.join("dryrun-release.yaml"),
        format!(
            "version: \"6.6.6\"\ninstall:\n  - name: migrate\n    run: touch {} && psql -f migrations/0001.sql\n",
            marker.display()
        ),
    )
    .unwrap();
    // The SQL names a shell command and a file outside; linting must do neither.
    std::fs::write(
        rel.join("migrations/0001.sql"),
        format!(
            "CREATE INDEX i ON orders (x);\nCOPY orders FROM PROGRAM 'touch {}';\n",
            marker.display()
        ),
    )
    .unwrap();
    let out = run(dryrun(state.path()).args([
        "plan",
        "blueprints/demo/shop-pg.yaml",
        "--release",
        rel.to_str().unwrap(),
        "--format",
        "json",
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["hints"][0]["rule"], "index-not-concurrently", "{p:#}");
    assert_eq!(p["hints"][0]["file"], "migrations/0001.sql", "{p:#}");
    // The rules are PostgreSQL's: a blueprint whose databases are SQLite gets none (SQLite has
    // no CONCURRENTLY and no lock_timeout to advise).
    let out = run(dryrun(state.path()).args([
        "plan",
        "blueprints/demo/shop.yaml",
        "--release",
        rel.to_str().unwrap(),
        "--format",
        "json",
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["hints"], serde_json::json!([]), "{p:#}");
    assert!(!marker.exists(), "plan ran something of the release");
    assert!(run_ids(state.path()).is_empty());
    assert!(!state.path().join("copies").exists());

    // A release that is not one is a usage error, before anything else.
    let out = run(dryrun(state.path()).args([
        "plan",
        "blueprints/demo/shop.yaml",
        "--release",
        "../../etc",
    ]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn missing_release_is_a_usage_error_and_creates_nothing() {
    let state = state_dir();
    let out = run(dryrun(state.path()).args([
        "run",
        "blueprints/demo/shop.yaml",
        "--release",
        "no/such/release",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(run_ids(state.path()).is_empty());
}

#[test]
fn a_run_stopped_by_a_missing_secret_leaves_no_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("release")).unwrap();
    std::fs::write(
        dir.path().join("release/dryrun-release.yaml"),
        "version: \"1.0.0\"\ninstall:\n  - name: noop\n    run: \"true\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("sec.yaml"),
        "name: sec\nsecrets:\n  token:\n    env: DRYRUN_TEST_SURELY_UNSET_VAR\nresources:\n  job:\n    type: service\n    env:\n      TOKEN: \"{{secrets.token}}\"\n",
    )
    .unwrap();
    let state = state_dir();
    let out = run(dryrun(state.path())
        .env_remove("DRYRUN_TEST_SURELY_UNSET_VAR")
        .arg("run")
        .arg(dir.path().join("sec.yaml"))
        .arg("--release")
        .arg(dir.path().join("release")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("DRYRUN_TEST_SURELY_UNSET_VAR"), "{err}");
    assert!(
        run_ids(state.path()).is_empty(),
        "left: {:?}",
        run_ids(state.path())
    );
}
