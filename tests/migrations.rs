//! Migration safety on real PostgreSQL (local provider): the lock monitor, the guards, the
//! lint hints and baseline vs candidate, through the `dryrun` binary.

mod common;

use common::*;
use serde_json::Value;

fn rehearse(state: &std::path::Path, blueprint: &str, args: &[&str]) -> (i32, String, Value) {
    let out = run(dryrun(state).args(["run", blueprint]).args(args).arg("-q"));
    let stdout =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let id = run_ids(state)
        .into_iter()
        .filter(|id| !id.ends_with("-baseline"))
        .max_by_key(|id| {
            std::fs::metadata(state.join("runs").join(id))
                .and_then(|m| m.modified())
                .ok()
        })
        .expect("a run");
    let r = report(state, &id);
    (out.status.code().unwrap_or(-1), stdout, r)
}

fn guard<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["guards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["guard"] == name)
        .unwrap_or_else(|| panic!("no guard {name}: {r:#}"))
}

/// The traced statement that contains `needle`.
fn statement_containing<'a>(r: &'a Value, needle: &str) -> &'a Value {
    r["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["statement"].as_str().unwrap().contains(needle))
        .unwrap_or_else(|| panic!("no statement with {needle}: {:#}", r["migrations"]))
}

/// The traced statement that starts with `prefix`.
fn statement<'a>(r: &'a Value, prefix: &str) -> &'a Value {
    r["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["statement"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no statement {prefix}: {:#}", r["migrations"]))
}

#[test]
fn a_rewriting_migration_is_failed_by_the_lock_guard_and_the_safe_one_passes() {
    if !have_postgres() {
        return;
    }
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());

    // pg-v4: ADD COLUMN … DEFAULT gen_random_uuid() rewrites 400 000 rows under ACCESS
    // EXCLUSIVE, then a plain CREATE INDEX (SHARE). The migration itself succeeds.
    let (code, out, r) = rehearse(
        state.path(),
        "blueprints/demo/shop-pg-guards.yaml",
        &["--release", "blueprints/demo/releases/pg-v4"],
    );
    assert_eq!(code, 1, "{out}");
    let g = guard(&r, "max_exclusive_lock");
    assert_eq!(g["status"], "failed", "{g:#}");
    let msg = g["message"].as_str().unwrap();
    assert!(
        msg.contains(
            "`ALTER TABLE order_events ADD COLUMN trace_id uuid DEFAULT gen_random_uuid();`"
        ) && msg.contains("held ACCESS EXCLUSIVE on order_events for"),
        "{msg}"
    );
    assert!(
        r["failure"]
            .as_str()
            .unwrap()
            .contains("guard max_exclusive_lock"),
        "{r:#}"
    );
    assert!(
        out.contains("ALTER TABLE order_events ADD COLUMN trace_id"),
        "{out}"
    );
    assert_eq!(guard(&r, "forbid_rewrite")["status"], "failed");
    assert_eq!(guard(&r, "max_migration")["status"], "passed");
    // The service's install commands with their times, inside its install step.
    let svc = r["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["address"] == "service.migrator")
        .unwrap();
    let steps = svc["install_steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{svc:#}");
    assert_eq!(steps[0]["name"], "migrate-0006");
    let install = svc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["step"] == "install")
        .unwrap();
    let ms = steps[0]["duration_ms"].as_u64().unwrap();
    assert!(
        ms > 250 && ms <= install["duration_ms"].as_u64().unwrap(),
        "{svc:#}"
    );

    // The statement, its lock and how long it was held, the rewrite, the WAL it wrote.
    let alter = statement(&r, "ALTER TABLE order_events ADD COLUMN trace_id");
    let lock = alter["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "order_events" && l["mode"] == "ACCESS EXCLUSIVE")
        .unwrap_or_else(|| panic!("{alter:#}"));
    assert!(lock["held_ms"].as_u64().unwrap() > 250, "{lock:#}");
    assert_eq!(lock["existing"], true);
    assert!(lock["bytes"].as_u64().unwrap() > 10_000_000, "{lock:#}");
    assert!(
        alter["rewrites"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "order_events"),
        "{alter:#}"
    );
    assert!(
        alter["wal_bytes"].as_u64().unwrap() > 1_000_000,
        "{alter:#}"
    );
    // Worst first: the rewrite is the first statement reported.
    assert_eq!(&r["migrations"][0], alter);
    // The index build runs in the ALTER's transaction, which already holds SHARE and ACCESS
    // EXCLUSIVE on order_events (PostgreSQL reports a lock once per transaction): the index
    // statement is seen with its new index, and the table's SHARE lock belongs to the ALTER.
    let index = statement(&r, "CREATE INDEX order_events_kind_idx");
    assert!(
        index["locks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "order_events_kind_idx" && l["existing"] == false),
        "{index:#}"
    );
    assert!(
        alter["locks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "order_events" && l["mode"] == "SHARE"),
        "{alter:#}"
    );
    // Nothing but relations the user knows: no transient rewrite copies, no TOAST tables.
    for m in r["migrations"].as_array().unwrap() {
        for l in m["locks"].as_array().unwrap() {
            let rel = l["relation"].as_str().unwrap();
            assert!(
                rel.parse::<u64>().is_err() && !rel.starts_with("pg_toast."),
                "{m:#}"
            );
        }
    }
    let trace = &r["migration_trace"][0];
    assert_eq!(trace["status"], "traced", "{trace:#}");
    assert!(trace["samples"].as_u64().unwrap() > 20, "{trace:#}");
    // The lint saw both before provisioning, and each hint says what was measured.
    let hints = r["hints"].as_array().unwrap();
    let rules: Vec<&str> = hints.iter().map(|h| h["rule"].as_str().unwrap()).collect();
    assert_eq!(
        rules,
        [
            "volatile-default",
            "missing-lock-timeout",
            "index-not-concurrently"
        ],
        "{hints:#?}"
    );
    assert_eq!(hints[0]["file"], "migrations/0006_order_event_trace.sql");
    assert_eq!(hints[0]["line"], 8);
    assert!(
        hints[0]["measured"]
            .as_str()
            .unwrap()
            .contains("held ACCESS EXCLUSIVE on order_events for"),
        "{:#}",
        hints[0]
    );
    for id in run_ids(state.path()) {
        assert_nothing_left(state.path(), &id);
    }

    // `dryrun plan --release` shows the same hints before anything exists.
    let plan = state_dir();
    let out = run(dryrun(plan.path()).args([
        "plan",
        "blueprints/demo/shop-pg-guards.yaml",
        "--release",
        "blueprints/demo/releases/pg-v4",
        "--format",
        "json",
    ]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    let planned: Vec<&str> = p["hints"]
        .as_array()
        .unwrap_or_else(|| panic!("{p:#}"))
        .iter()
        .map(|h| h["rule"].as_str().unwrap())
        .collect();
    assert_eq!(planned, rules);
    assert!(run_ids(plan.path()).is_empty(), "plan created a run");
    let text = run(dryrun(plan.path()).args([
        "plan",
        "blueprints/demo/shop-pg-guards.yaml",
        "--release",
        "blueprints/demo/releases/pg-v4",
    ]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("release SQL hints (3):")
            && text.contains("migrations/0006_order_event_trace.sql:8 volatile-default"),
        "{text}"
    );

    // pg-v5: no default on ADD COLUMN (metadata only), then CREATE INDEX CONCURRENTLY outside
    // a transaction (the release's own transaction handling): passes every guard.
    let state = state_dir();
    let _reaper2 = Reaper(state.path().to_path_buf());
    let (code, out, r) = rehearse(
        state.path(),
        "blueprints/demo/shop-pg-guards.yaml",
        &["--release", "blueprints/demo/releases/pg-v5"],
    );
    assert_eq!(code, 0, "{out}\n{:#}", r["guards"]);
    for g in ["max_exclusive_lock", "forbid_rewrite", "max_migration"] {
        assert_eq!(guard(&r, g)["status"], "passed", "{:#}", r["guards"]);
    }
    assert_eq!(r["migration_trace"][0]["rewritten"], serde_json::json!([]));
    assert!(r.get("hints").is_none(), "{:#}", r["hints"]);
    let cic = statement_containing(&r, "CREATE INDEX CONCURRENTLY");
    assert!(
        cic["locks"]
            .as_array()
            .unwrap()
            .iter()
            // The new index's own ACCESS EXCLUSIVE lock (sometimes sampled, for a moment)
            // blocks nobody: production has no queries on a relation that did not exist.
            .all(|l| l["blocks"].is_null() || l["existing"] == false),
        "{cic:#}"
    );
    for id in run_ids(state.path()) {
        assert_nothing_left(state.path(), &id);
    }
}

/// A release for the baseline test: one install step that defines `report_total()`, which
/// sleeps `sleep` seconds.
fn slow_release(dir: &std::path::Path, version: &str, sleep: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("dryrun-release.yaml"),
        format!(
            "version: \"{version}\"\ninstall:\n  - name: define\n    run: psql \"$DATABASE_URL\" -X -q -v ON_ERROR_STOP=1 -c \"CREATE FUNCTION report_total() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM orders, pg_sleep({sleep})'\"\n  - name: leak\n    run: psql \"$DATABASE_URL\" -X -q -v ON_ERROR_STOP=1 -c \"SELECT pg_sleep(0.3), '$DATABASE_URL' AS secret_in_a_statement\"\n"
        ),
    )
    .unwrap();
}

/// A state directory (reaped at the end) whose `work/bp.yaml` is [`pg_blueprint`]`(name,
/// rest)`; returns the work directory.
fn pg_work(name: &str, rest: &str) -> (tempfile::TempDir, Reaper, std::path::PathBuf) {
    let state = state_dir();
    let reaper = Reaper(state.path().to_path_buf());
    let dir = state.path().join("work");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bp.yaml"), pg_blueprint(name, rest)).unwrap();
    (state, reaper, dir)
}

/// A blueprint `name` over the demo's PostgreSQL backups: database `db`, service `app` with
/// its URL, the demo's masking; `rest` adds guards and checks.
fn pg_blueprint(name: &str, rest: &str) -> String {
    format!(
        "name: {name}\nproviders:\n  local:\n    backups: {}\nresources:\n  db:\n    type: database\n    engine: postgres\n    source: shop-pg\n    database: shop\n  app:\n    type: service\n    env:\n      DATABASE_URL: \"{{{{resources.db.url}}}}\"\nmasking:\n  db:\n    customers.email: email\n    customers.name: name\n{rest}",
        root().join("blueprints/demo/production/backups").display()
    )
}

#[test]
fn baseline_and_candidate_run_on_the_same_backup_and_an_injected_slowdown_fails_the_run() {
    if !have_postgres() {
        return;
    }
    let (state, _reaper, dir) = pg_work(
        "slow",
        "guards:\n  max_p95_regression: 100%\nchecks:\n  - name: report\n    type: sql\n    database: db\n    query: SELECT report_total() > 0\n    repeat: 10\n    expect:\n      value: \"t\"\n",
    );
    slow_release(&dir.join("fast"), "1.0.0", "0.005");
    slow_release(&dir.join("slow"), "1.1.0", "1.0");
    let bp = dir.join("bp.yaml");
    let bp = bp.to_str().unwrap();
    let fast = dir.join("fast");
    let slow = dir.join("slow");

    // Candidate 1 s slower per query than the baseline (several times its p95): the guard fails the run (exit 1).
    let (code, out, r) = rehearse(
        state.path(),
        bp,
        &[
            "--release",
            slow.to_str().unwrap(),
            "--baseline",
            fast.to_str().unwrap(),
            "--backup",
            "shop-pg-2026-11-20T0300Z",
        ],
    );
    assert_eq!(code, 1, "{out}");
    let b = &r["baseline"];
    assert_eq!(b["release"], "1.0.0", "{b:#}");
    assert_eq!(b["status"], "passed", "{b:#}");
    let c = &b["checks"][0];
    assert_eq!(c["name"], "report");
    assert_eq!(c["samples"], 10);
    assert!(c["p95_ms"].as_u64().unwrap() >= 1000, "{c:#}");
    assert!(c["baseline_p95_ms"].as_u64().unwrap() < 1000, "{c:#}");
    assert!(c["p95_change_pct"].as_f64().unwrap() > 100.0, "{c:#}");
    let g = guard(&r, "max_p95_regression");
    assert_eq!(g["status"], "failed");
    assert!(
        g["message"]
            .as_str()
            .unwrap()
            .starts_with("check `report`: p95 "),
        "{g:#}"
    );
    assert!(out.contains("baseline 1.0.0"), "{out}");
    // Both copies came from the same backup (the one --backup named), each its own copy.
    let baseline = report(state.path(), b["run_id"].as_str().unwrap());
    assert_eq!(baseline["backups"][0]["id"], "shop-pg-2026-11-20T0300Z");
    assert_eq!(r["backups"][0]["id"], "shop-pg-2026-11-20T0300Z");
    assert_eq!(
        baseline["checks"][0]["timings_ms"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    assert_ne!(baseline["resources"][0]["id"], r["resources"][0]["id"]);
    // A statement that carries the copy's password (here in its whole URL) is traced with it
    // redacted, in the candidate's report and the baseline's.
    for rep in [&r, &baseline] {
        let leak = statement_containing(rep, "secret_in_a_statement");
        // The URL is a secret output as a whole (it carries the password).
        let text = leak["statement"].as_str().unwrap();
        assert!(
            text.contains("'[redacted]' AS secret_in_a_statement") && !text.contains("://"),
            "{text}"
        );
    }

    // The same release on both sides: no regression past 100 %, the run passes.
    let state = state_dir();
    let _reaper2 = Reaper(state.path().to_path_buf());
    let (code, out, r) = rehearse(
        state.path(),
        bp,
        &[
            "--release",
            fast.to_str().unwrap(),
            "--baseline",
            fast.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}\n{:#}", r["baseline"]);
    assert_eq!(guard(&r, "max_p95_regression")["status"], "passed");
    for id in run_ids(state.path()) {
        assert_nothing_left(state.path(), &id);
    }

    // A baseline that fails only its own guards is still a yardstick: production has been
    // through its migrations; its checks passed, so they are compared.
    let text = std::fs::read_to_string(dir.join("bp.yaml")).unwrap();
    let guarded = dir.join("bp-guarded.yaml");
    std::fs::write(
        &guarded,
        text.replace("guards:\n", "guards:\n  max_migration: 1ms\n"),
    )
    .unwrap();
    let state = state_dir();
    let _reaper3 = Reaper(state.path().to_path_buf());
    let (code, out, r) = rehearse(
        state.path(),
        guarded.to_str().unwrap(),
        &[
            "--release",
            fast.to_str().unwrap(),
            "--baseline",
            fast.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(guard(&r, "max_migration")["status"], "failed");
    let b = &r["baseline"];
    assert_eq!(b["status"], "failed", "{b:#}");
    assert_eq!(b["comparable"], true, "{b:#}");
    assert_eq!(
        guard(&r, "max_p95_regression")["status"],
        "passed",
        "{:#}",
        r["guards"]
    );
    for id in run_ids(state.path()) {
        assert_nothing_left(state.path(), &id);
    }
}

#[test]
fn a_sql_check_keeps_one_session_across_its_attempts_and_repetitions() {
    if !have_postgres() {
        return;
    }
    // The query answers `reused` only in a session where it ran before: the first attempt
    // fails, its retry passes, and so do the repetitions, when all run on one connection.
    let (state, _reaper, dir) = pg_work(
        "session",
        "checks:\n  - name: one-session\n    type: sql\n    database: db\n    query: \"SELECT CASE WHEN current_setting('dryrun.seen', true) = 'y' THEN 'reused' ELSE set_config('dryrun.seen', 'y', false) END\"\n    retries: 1\n    interval: 10ms\n    repeat: 5\n    expect:\n      value: reused\n  - name: no-open-transaction\n    type: sql\n    database: db\n    query: \"BEGIN; SELECT CASE WHEN now() = statement_timestamp() THEN 'fresh' ELSE 'stale' END\"\n    repeat: 3\n    expect:\n      value: fresh\n",
    );
    slow_release(&dir.join("rel"), "1.0.0", "0.001");
    let (code, out, r) = rehearse(
        state.path(),
        dir.join("bp.yaml").to_str().unwrap(),
        &["--release", dir.join("rel").to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    let c = &r["checks"][0];
    assert_eq!(c["status"], "passed", "{c:#}");
    assert_eq!(c["attempts"], 2, "{c:#}");
    assert_eq!(c["timings_ms"].as_array().unwrap().len(), 5, "{c:#}");
    // A transaction the query left open is rolled back after each attempt: a repetition
    // inside the first one's transaction would see its start time (`stale`).
    assert_eq!(r["checks"][1]["status"], "passed", "{:#}", r["checks"][1]);
    for id in run_ids(state.path()) {
        assert_nothing_left(state.path(), &id);
    }
}

/// A release for the SQLite test: the demo's migrations through `demo-shop migrate` (its own
/// transaction per file), then `extra`, Python run against the copy (a second tool, its own
/// transaction handling).
fn sqlite_release(dir: &std::path::Path, version: &str, extra: &str) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let migrations = root().join("blueprints/demo/releases/v2/migrations");
    std::fs::create_dir_all(dir.join("migrations")).unwrap();
    for f in std::fs::read_dir(&migrations).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join("migrations").join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("bin/extra.py"), extra).unwrap();
    std::fs::write(
        dir.join("dryrun-release.yaml"),
        format!(
            "version: \"{version}\"\ninstall:\n  - name: migrate\n    run: '\"$DRYRUN_BIN_DIR/demo-shop\" migrate --db \"$DATABASE_PATH\" migrations'\n  - name: extra\n    run: python3 bin/extra.py \"$DATABASE_PATH\"\n"
        ),
    )
    .unwrap();
}

#[test]
fn sqlite_write_locks_and_rebuilds_are_traced_and_judged() {
    require_demo_shop();
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let dir = state.path().join("work");
    let backups = root().join("blueprints/demo/production/backups");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bp.yaml"),
        format!(
            "name: lite\nproviders:\n  local:\n    backups: {}\nresources:\n  db:\n    type: database\n    engine: sqlite\n    source: shop-db\n    database: shop\n  app:\n    type: service\n    env:\n      DATABASE_PATH: \"{{{{resources.db.path}}}}\"\nmasking:\n  db:\n    customers.email: email\n    customers.name: name\nguards:\n  max_exclusive_lock: 500ms\n  forbid_rewrite: [orders]\n",
            backups.display()
        ),
    )
    .unwrap();
    // The unsafe one rebuilds `orders` (SQLite's copy-drop-rename) and keeps the write lock
    // for a second (rollback-journal mode, as the backup is).
    sqlite_release(
        &dir.join("rebuild"),
        "3.0.0",
        "import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\nc.execute('BEGIN IMMEDIATE')\nc.execute('CREATE TABLE orders_new AS SELECT * FROM orders')\nc.execute('DROP TABLE orders')\nc.execute('ALTER TABLE orders_new RENAME TO orders')\ntime.sleep(1.0)\nc.execute('COMMIT')\ntime.sleep(0.1)\nc.execute('CREATE TABLE \"esc\\x1b[2Jape\" (a)')\n",
    );
    // The safe one switches to WAL and writes data for 0.2 s: no schema change, a short hold.
    sqlite_release(
        &dir.join("safe"),
        "2.1.0",
        "import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\nassert c.execute('PRAGMA journal_mode=WAL').fetchone()[0] == 'wal'\nc.execute('BEGIN IMMEDIATE')\nc.execute(\"UPDATE orders SET notes = 'checked' WHERE id % 7 = 0\")\ntime.sleep(0.2)\nc.execute('COMMIT')\n",
    );
    let bp = dir.join("bp.yaml");
    let bp = bp.to_str().unwrap();

    let rebuild = dir.join("rebuild");
    let (code, out, r) = rehearse(state.path(), bp, &["--release", rebuild.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let trace = &r["migration_trace"][0];
    assert_eq!(trace["database"], "db", "{trace:#}");
    assert_eq!(trace["status"], "traced", "{trace:#}");
    assert_eq!(
        trace["rewritten"],
        serde_json::json!(["orders"]),
        "{trace:#}"
    );
    // The transaction's schema change, as the file keeps it: `orders` rebuilt under its name
    // (new text, new pages), its indexes gone with the old table.
    let m = statement_containing(&r, "DROP INDEX orders_created_at_idx");
    assert!(
        m["statement"]
            .as_str()
            .unwrap()
            .starts_with("orders became: CREATE TABLE \"orders\"("),
        "{m:#}"
    );
    assert_eq!(m["rewrites"], serde_json::json!(["orders"]));
    let w = &m["locks"][0];
    assert_eq!(w["mode"], "WRITE", "{m:#}");
    assert_eq!(w["blocks"], "writes");
    let held = w["held_ms"].as_u64().unwrap();
    assert!((900..3000).contains(&held), "{m:#}");
    assert!(m["duration_ms"].as_u64().unwrap() >= 900, "{m:#}");
    let g = guard(&r, "max_exclusive_lock");
    assert_eq!(g["status"], "failed", "{g:#}");
    assert!(
        g["message"]
            .as_str()
            .unwrap()
            .contains("held WRITE on db (the whole database file)"),
        "{g:#}"
    );
    assert_eq!(guard(&r, "forbid_rewrite")["status"], "failed");
    // demo-shop's own migration, its own entry (ADD COLUMN: the table's text changes, its pages
    // stay; too quick to hold the lock for a sample).
    let add = statement(&r, "orders became: CREATE TABLE orders (");
    assert!(
        add["statement"].as_str().unwrap().contains("notes TEXT"),
        "{add:#}"
    );
    assert_eq!(add["rewrites"], serde_json::json!([]), "{add:#}");
    assert!(add["duration_ms"].as_u64().unwrap() < 500, "{add:#}");
    assert!(out.contains("held WRITE on db"), "{out}");
    // A name the release chose, with a terminal escape in it, is in the report as it is and
    // reaches the terminal without its control characters.
    statement_containing(&r, "esc\u{1b}[2Jape");
    assert!(!out.contains('\u{1b}'), "{out:?}");

    let safe = dir.join("safe");
    let (code, out, r) = rehearse(state.path(), bp, &["--release", safe.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{:#}", r["migrations"]);
    assert_eq!(r["migration_trace"][0]["status"], "traced");
    assert_eq!(r["migration_trace"][0]["rewritten"], serde_json::json!([]));
    // The WAL-mode write was seen through the -shm file's write lock.
    // (Its schema is read after the commit unless the release closed its WAL too quickly.)
    let data = statement(&r, "write transaction");
    let held = data["locks"][0]["held_ms"].as_u64().unwrap();
    assert!((150..1500).contains(&held), "{data:#}");
    assert_eq!(guard(&r, "max_exclusive_lock")["status"], "passed");
    assert_eq!(guard(&r, "forbid_rewrite")["status"], "passed");
    for id in run_ids(state.path()) {
        assert_nothing_left(state.path(), &id);
    }
}
