//! The personal data gate and masking, end to end with the real binary, real SQLite files and
//! real PostgreSQL clusters: a production holding personal data in columns with unremarkable
//! names, a release whose install step prints every row it can read to its log, and the
//! guarantees checked by query, by checksum and by searching everything the run left.

mod common;

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

const ROWS: usize = 500;
/// Every original e-mail address has this domain: the canary searched for afterwards.
const CANARY_DOMAIN: &str = "realmail-canary.test";

fn luhn_complete(prefix: &str) -> String {
    // The check digit that makes prefix+digit pass Luhn.
    (0..10)
        .map(|d| format!("{prefix}{d}"))
        .find(|s| dryrun::privacy::detect::luhn(&s.bytes().map(|b| b - b'0').collect::<Vec<_>>()))
        .unwrap()
}

/// The production rows: (contact, display, line, ref, ip).
fn people() -> Vec<[String; 5]> {
    (0..ROWS)
        .map(|i| {
            [
                format!("person{i}@{CANARY_DOMAIN}"),
                format!("Canaryname{i} Realperson"),
                format!("+44 20 7946 {i:04}"),
                luhn_complete(&format!("411111{i:09}")),
                format!("10.{}.{}.7", i / 250, i % 250),
            ]
        })
        .collect()
}

const SQLITE_SCHEMA: &str = "CREATE TABLE members (
    id INTEGER PRIMARY KEY,
    contact TEXT NOT NULL UNIQUE,
    display TEXT NOT NULL,
    line TEXT,
    ref TEXT,
    ip TEXT,
    memo TEXT,
    joined TEXT
);";

/// A SQLite production backup under `dir/backups/members/…`; returns the backup file.
fn sqlite_backup(dir: &Path) -> PathBuf {
    let b = dir.join("backups/members/members-2026-11-29T0300Z");
    std::fs::create_dir_all(&b).unwrap();
    let file = b.join("prod.sqlite");
    let c = rusqlite::Connection::open(&file).unwrap();
    c.execute_batch(SQLITE_SCHEMA).unwrap();
    for (i, p) in people().iter().enumerate() {
        c.execute(
            "INSERT INTO members VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'plain note', '2026-01-02')",
            rusqlite::params![i as i64 + 1, p[0], p[1], p[2], p[3], p[4]],
        )
        .unwrap();
    }
    drop(c);
    std::fs::write(
        b.join("backup.json"),
        r#"{"id":"members-2026-11-29T0300Z","source":"members","engine":"sqlite","taken_at":"2026-11-29T03:00:00Z","file":"prod.sqlite","complete":true}"#,
    )
    .unwrap();
    file
}

/// A release whose install step touches `marker` and prints every row of `members` it can read.
fn release(dir: &Path, engine: &str) -> PathBuf {
    let r = dir.join("release");
    std::fs::create_dir_all(&r).unwrap();
    let dump = if engine == "sqlite" {
        // Every row, then the file's raw bytes: originals left in freed space would show.
        r#"python3 -c "import os,sqlite3; [print(row) for row in sqlite3.connect(os.environ['DB']).execute('SELECT * FROM members')]; print(open(os.environ['DB'], 'rb').read())""#
    } else {
        r#"psql "$DB" -c 'SELECT * FROM members'"#
    };
    std::fs::write(
        r.join("dryrun-release.yaml"),
        format!(
            "version: \"1.0.0\"\ninstall:\n  - name: mark\n    run: 'touch \"$MARKER\"'\n  - name: read-everything\n    run: '{}'\n",
            dump.replace('\'', "''")
        ),
    )
    .unwrap();
    r
}

fn blueprint(dir: &Path, engine: &str, extra: &str, checks: &str) -> PathBuf {
    let db_env = if engine == "sqlite" {
        "{{resources.db.path}}"
    } else {
        "{{resources.db.url}}"
    };
    let text = format!(
        "name: members\nproviders:\n  local:\n    backups: backups\nresources:\n  db:\n    type: database\n    engine: {engine}\n    source: members\n    database: members\n  app:\n    type: service\n    env:\n      DB: \"{db_env}\"\n      MARKER: \"{}\"\n{extra}\nchecks:\n{checks}",
        dir.join("installed").display()
    );
    let p = dir.join("members.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `dryrun run BLUEPRINT --release RELEASE EXTRA…` with the state directory `state`.
fn dryrun_run(
    state: &Path,
    bp: &Path,
    rel: &Path,
    extra: &[&std::ffi::OsStr],
) -> std::process::Output {
    common::run(
        common::dryrun(state)
            .arg("run")
            .arg(bp)
            .arg("--release")
            .arg(rel)
            .args(extra),
    )
}

fn sha256(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

const ALL_RULES: &str = "masking:
  db:
    members.contact: email
    members.display: name
    members.line: phone
    members.ref: redact
    members.ip: hash
    members.memo: keep
    members.joined: keep
";

const NO_CHECKS: &str = "  - {name: rows, type: sql, database: db, query: SELECT count(*) FROM members, expect: {value: \"500\"}}\n";

#[test]
fn unclassified_personal_data_stops_the_run_before_install_with_every_column_named() {
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let prod = sqlite_backup(dir.path());
    let before = sha256(&prod);
    let rel = release(dir.path(), "sqlite");
    // Rules for two columns only: the gate must still find the other three.
    let bp = blueprint(
        dir.path(),
        "sqlite",
        "masking:\n  db:\n    members.display: name\n    members.memo: keep\n",
        NO_CHECKS,
    );
    let out = dryrun_run(state.path(), &bp, &rel, &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3), "the gate is an error, exit 3");
    for line in [
        "members.contact: looks like e-mail addresses (500/500 sampled)",
        "members.line: looks like phone numbers (500/500 sampled)",
        "members.ref: looks like payment card numbers (500/500 sampled)",
        "members.ip: looks like IP addresses (500/500 sampled)",
        "    members.contact: email",
        "    members.line: phone",
    ] {
        assert!(text.contains(line), "missing `{line}`");
    }
    assert!(!text.contains("members.memo:") && !text.contains("members.joined:"));
    assert!(
        !dir.path().join("installed").exists(),
        "the release was installed"
    );
    assert!(!text.contains(CANARY_DOMAIN), "a sampled value was printed");
    let id = common::run_ids(state.path()).pop().unwrap();
    let report = common::report(state.path(), &id);
    assert_eq!(report["status"], "error");
    assert!(
        report["failure"]
            .as_str()
            .unwrap()
            .contains("personal data gate")
    );
    common::assert_nothing_left(state.path(), &id);
    assert_eq!(sha256(&prod), before, "production's backup changed");

    // The same blueprint with the gate off runs the install: the marker is a real witness.
    let off = blueprint(dir.path(), "sqlite", "pii_gate: off\n", NO_CHECKS);
    let out = dryrun_run(state.path(), &off, &rel, &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(dir.path().join("installed").exists());
    assert!(String::from_utf8_lossy(&out.stdout).contains("personal data gate: off"));
}

fn masked_checks(engine: &str) -> String {
    let glob = if engine == "sqlite" {
        "line NOT GLOB '+[0-9][0-9] [0-9][0-9] [0-9][0-9][0-9][0-9] [0-9][0-9][0-9][0-9]'"
    } else {
        "line !~ '^[+][0-9]{2} [0-9]{2} [0-9]{4} [0-9]{4}$'"
    };
    [
        ("rows", "SELECT count(*) FROM members", "500"),
        ("no-original-address", &format!("SELECT count(*) FROM members WHERE contact LIKE '%{CANARY_DOMAIN}%'"), "0"),
        ("fake-addresses", "SELECT count(*) FROM members WHERE contact NOT LIKE '%@example.com'", "0"),
        ("unique-kept", "SELECT count(DISTINCT contact) - count(*) FROM members", "0"),
        ("unique-phones", "SELECT count(DISTINCT line) - count(*) FROM members", "0"),
        ("not-null-kept", "SELECT count(*) FROM members WHERE contact IS NULL OR display IS NULL OR line IS NULL", "0"),
        ("names-replaced", "SELECT count(*) FROM members WHERE display LIKE 'Canaryname%'", "0"),
        ("phone-shape", &format!("SELECT count(*) FROM members WHERE {glob}"), "0"),
        ("phones-changed", "SELECT count(*) FROM members WHERE line LIKE '+44 20 7946 %'", "0"),
        ("cards-redacted", "SELECT count(*) FROM members WHERE ref <> 'redacted'", "0"),
        ("ips-hashed", "SELECT count(*) FROM members WHERE length(ip) <> 32 OR ip LIKE '10.%'", "0"),
        ("memo-kept", "SELECT count(*) FROM members WHERE memo = 'plain note'", "500"),
    ]
    .iter()
    .map(|(n, q, v)| format!("  - name: {n}\n    type: sql\n    database: db\n    query: \"{q}\"\n    expect: {{value: \"{v}\"}}\n"))
    .collect()
}

/// Runs the masked blueprint and checks the report, the canary and production's backup.
/// Records the backup's checksum in its metadata: the local provider then keeps a golden copy
/// of it (masked) and clones it on later runs.
fn with_checksum(prod: &Path) {
    let meta = prod.parent().unwrap().join("backup.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    m["sha256"] = sha256(prod).into();
    std::fs::write(&meta, m.to_string()).unwrap();
}

/// A masked run (twice with `cached`: building the golden copy, then cloning it), every check
/// and the search for the originals after each.
fn masked_run(state: &Path, dir: &Path, engine: &str, prod: &Path, cached: bool) {
    if cached {
        with_checksum(prod);
    }
    for golden in if cached {
        &["miss", "hit"][..]
    } else {
        &["off"][..]
    } {
        let _ = std::fs::remove_file(dir.join("installed"));
        masked_run_once(state, dir, engine, prod, golden);
    }
}

fn masked_run_once(state: &Path, dir: &Path, engine: &str, prod: &Path, golden: &str) {
    let before = sha256(prod);
    let rel = release(dir, engine);
    let bp = blueprint(dir, engine, ALL_RULES, &masked_checks(engine));
    let reports = dir.join("reports");
    let out = dryrun_run(
        state,
        &bp,
        &rel,
        &[std::ffi::OsStr::new("--report-dir"), reports.as_os_str()],
    );
    assert_eq!(out.status.code(), Some(0), "every masking check passes");
    assert!(dir.join("installed").exists());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("masking: db: 5 column(s) masked, 2 kept, 500 row(s)"),
        "{stdout}"
    );
    let id = common::run_ids(state)
        .into_iter()
        .find(|id| common::report(state, id)["backup"]["clone"]["golden"] == *golden)
        .unwrap_or_else(|| panic!("no run with golden copy `{golden}`"));
    let report = common::report(state, &id);
    let m = &report["masking"]["databases"][0];
    assert_eq!(report["masking"]["gate"], "on");
    assert_eq!(m["rows"], 500);
    // PostgreSQL's rows are masked while they load (no original ever enters the copy), a
    // golden copy's when it is built; SQLite's without one inside the copy after restore.
    assert_eq!(
        m["masked_in_restore"],
        engine == "postgres" || golden != "off",
        "{m}"
    );
    assert_eq!(m["columns"].as_array().unwrap().len(), 7);
    assert!(
        m["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["column"] == "line" && c["strategy"] == "phone")
    );
    common::assert_nothing_left(state, &id);
    assert_eq!(sha256(prod), before, "production's backup changed");

    // The release read every row and printed it: its log holds masked values only.
    let logs = state.join("runs").join(&id).join("logs");
    let log: String = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        log.contains("@example.com"),
        "the release printed the rows it read:\n{log}"
    );
    let canaries = [
        CANARY_DOMAIN.to_string(),
        "Canaryname".to_string(),
        "+44 20 7946 0".to_string(),
        people()[7][3].clone(),
    ];
    let forms: Vec<String> = canaries
        .iter()
        .flat_map(|c| common::canary_forms(c))
        .collect();
    let searched = common::assert_no_canary_in_dir(state, &forms)
        + common::assert_no_canary_in_dir(&reports, &forms);
    assert!(searched >= 5, "searched {searched} files");
    common::assert_no_canary("stdout", &out.stdout, &forms);
    common::assert_no_canary("stderr", &out.stderr, &forms);
}

#[test]
fn sqlite_masking_keeps_constraints_and_shape_and_leaves_no_original_anywhere() {
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let prod = sqlite_backup(dir.path());
    masked_run(state.path(), dir.path(), "sqlite", &prod, false);
}

#[test]
fn sqlite_golden_copy_is_masked_when_built_and_holds_no_original() {
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let prod = sqlite_backup(dir.path());
    masked_run(state.path(), dir.path(), "sqlite", &prod, true);
}

#[test]
fn postgres_masking_keeps_constraints_and_shape_and_leaves_no_original_anywhere() {
    if !common::have_postgres() {
        return;
    }
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = common::state_dir(); // traversable by the postgres user
    let prod = postgres_backup(dir.path());
    masked_run(state.path(), dir.path(), "postgres", &prod, true);
}

/// A pg_dump (custom format) production backup made from a throw-away server.
fn postgres_backup(dir: &Path) -> PathBuf {
    let server = common::pg::ControlDb::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute(
            "CREATE TABLE members (
                id serial PRIMARY KEY,
                contact varchar(60) NOT NULL UNIQUE,
                display text NOT NULL,
                line varchar(20) NOT NULL,
                ref text,
                ip text,
                memo text,
                joined date
            );",
        )
        .await
        .unwrap();
        for p in people() {
            c.execute(
                "INSERT INTO members (contact, display, line, ref, ip, memo, joined) VALUES ($1, $2, $3, $4, $5, 'plain note', '2026-01-02')",
                &[&p[0], &p[1], &p[2], &p[3], &p[4]],
            )
            .await
            .unwrap();
        }
    });
    let b = dir.join("backups/members/members-2026-11-29T0300Z");
    std::fs::create_dir_all(&b).unwrap();
    let file = b.join("dump.pgc");
    let out =
        std::process::Command::new(dryrun::provider::local::postgres::binary("pg_dump").unwrap())
            .env("PGPASSWORD", common::pg::ControlDb::password())
            .args([
                "-Fc",
                "--no-owner",
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "dryrun",
                "-d",
                "postgres",
                "-f",
            ])
            .arg(&file)
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        b.join("backup.json"),
        r#"{"id":"members-2026-11-29T0300Z","source":"members","engine":"postgres","taken_at":"2026-11-29T03:00:00Z","file":"dump.pgc","complete":true}"#,
    )
    .unwrap();
    file
}

#[test]
fn rules_that_do_not_fit_the_restored_data_are_named_before_install() {
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    sqlite_backup(dir.path());
    let rel = release(dir.path(), "sqlite");
    let bp = blueprint(
        dir.path(),
        "sqlite",
        &ALL_RULES.replace("members.contact: email", "members.contactt: email\n    members.display2: \"null\"\n    members.contact: email")
            .replace("members.display: name", "members.display: \"null\""),
        NO_CHECKS,
    );
    let out = dryrun_run(state.path(), &bp, &rel, &[]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("members.contactt: no such column in the restored database (did you mean `members.contact`?)"), "{text}");
    assert!(
        text.contains("members.display: is NOT NULL, so `null` cannot apply"),
        "{text}"
    );
    assert!(!dir.path().join("installed").exists());
}

#[test]
fn scan_prints_the_classification_and_a_starting_masking_block() {
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let prod = sqlite_backup(dir.path());
    let before = sha256(&prod);
    let bp = blueprint(
        dir.path(),
        "sqlite",
        "masking:\n  db:\n    members.contact: email\n",
        NO_CHECKS,
    );
    let out = common::run(common::dryrun(state.path()).arg("scan").arg(&bp));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "columns without a rule: exit 1");
    assert!(
        text.contains(
            "members.contact: looks like e-mail addresses (500/500 sampled)  [rule: email]"
        ),
        "{text}"
    );
    assert!(
        text.contains("members.ip: looks like IP addresses (500/500 sampled)  [rule: no rule]")
    );
    assert!(text.contains("masking:\n  db:\n    members.line: phone\n    members.ref: redact\n    members.ip: hash\n"), "{text}");
    assert!(
        !text.contains("members.contact: email\n    members.line"),
        "ruled columns are not in the starting block"
    );
    assert!(!text.contains(CANARY_DOMAIN));
    assert!(
        !dir.path().join("installed").exists(),
        "scan installs nothing"
    );
    assert_eq!(sha256(&prod), before);
    let id = common::run_ids(state.path()).pop().unwrap();
    common::assert_nothing_left(state.path(), &id);

    // The printed block, pasted into the blueprint, classifies everything: exit 0.
    let block = text.split("masking:\n  db:\n").nth(1).unwrap();
    let bp = blueprint(
        dir.path(),
        "sqlite",
        &format!("masking:\n  db:\n    members.contact: email\n{block}"),
        NO_CHECKS,
    );
    let out = common::run(common::dryrun(state.path()).arg("scan").arg(&bp));
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("every finding has a masking rule"));
}

#[test]
fn postgres_refuses_null_on_a_not_null_column_before_a_row_loads() {
    if !common::have_postgres() {
        return;
    }
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = common::state_dir();
    postgres_backup(dir.path());
    let rel = release(dir.path(), "postgres");
    let bp = blueprint(
        dir.path(),
        "postgres",
        &ALL_RULES.replace("members.display: name", "members.display: \"null\""),
        NO_CHECKS,
    );
    let out = dryrun_run(state.path(), &bp, &rel, &[]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("masking rule members.display: the column is NOT NULL, so `null` cannot apply; use `redact` or `hash`"),
        "{text}"
    );
    assert!(!dir.path().join("installed").exists());
    let id = common::run_ids(state.path()).pop().unwrap();
    common::assert_nothing_left(state.path(), &id);
}

/// The in-copy path (AWS with `runner_in_vpc`, or anything a restore did not mask on the way
/// in): `privacy::protect` on a PostgreSQL database reached by URL, masking by COPY out, a
/// temporary table and one UPDATE, then the verification.
#[tokio::test]
async fn postgres_reached_by_url_is_masked_in_place_and_verified() {
    use dryrun::privacy::{self, Gate, MaskKey, Rule, Strategy};
    if !common::have_postgres() {
        return;
    }
    let server = common::pg::ControlDb::start();
    let (c, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(
        "CREATE TABLE members (id serial PRIMARY KEY, contact varchar(60) NOT NULL UNIQUE,
                               line varchar(20), memo text)",
    )
    .await
    .unwrap();
    for p in people() {
        c.execute(
            "INSERT INTO members (contact, line, memo) VALUES ($1, $2, 'plain note')",
            &[&p[0], &p[2]],
        )
        .await
        .unwrap();
    }
    let rules = vec![
        Rule {
            table: "members".into(),
            column: "contact".into(),
            strategy: Strategy::Email,
        },
        Rule {
            table: "members".into(),
            column: "line".into(),
            strategy: Strategy::Phone,
        },
        Rule {
            table: "members".into(),
            column: "memo".into(),
            strategy: Strategy::Keep,
        },
    ];
    let mut db = privacy::open("db", "postgres", &server.url())
        .await
        .unwrap();
    let done = privacy::protect(
        "db",
        db.as_mut(),
        &rules,
        Gate::On,
        &MaskKey::random(),
        (false, None),
    )
    .await
    .unwrap();
    assert_eq!(done.rows, ROWS as u64);
    assert!(!done.masked_in_restore);
    let q = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        q("SELECT count(*) FROM members WHERE contact LIKE '%realmail-canary.test'").await,
        0
    );
    assert_eq!(
        q("SELECT count(*) FROM members WHERE line LIKE '+44 20 7946 %'").await,
        0
    );
    assert_eq!(
        q("SELECT count(DISTINCT contact) - count(*) FROM members").await,
        0
    );
    assert_eq!(
        q("SELECT count(*) FROM members WHERE memo = 'plain note'").await,
        ROWS as i64
    );

    // Without a rule for `line`, the gate refuses before anything is written.
    c.batch_execute("UPDATE members SET line = '+44 20 7946 0001' WHERE id = 1")
        .await
        .unwrap();
    let err = privacy::protect(
        "db",
        db.as_mut(),
        &rules[..1],
        Gate::On,
        &MaskKey::random(),
        (false, None),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("members.line: looks like phone numbers"),
        "{err}"
    );
}

/// Table and column names come from production's schema and the blueprint: quotes and SQL in
/// them are names, never statements.
#[tokio::test]
async fn hostile_table_and_column_names_are_quoted_and_never_run() {
    use dryrun::privacy::{self, Gate, MaskKey, PrivacyError, Rule, Strategy};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("copy.sqlite");
    let table = "we\"ird; DROP TABLE keepme; --";
    let column = "co\"l";
    {
        let c = rusqlite::Connection::open(&file).unwrap();
        c.execute_batch(
            "CREATE TABLE keepme (x TEXT);
             INSERT INTO keepme VALUES ('still here');
             CREATE TABLE \"we\"\"ird; DROP TABLE keepme; --\" (\"co\"\"l\" TEXT UNIQUE);",
        )
        .unwrap();
        for p in people() {
            c.execute(
                "INSERT INTO \"we\"\"ird; DROP TABLE keepme; --\" VALUES (?1)",
                [&p[0]],
            )
            .unwrap();
        }
    }
    let path = file.to_str().unwrap();
    let key = MaskKey::random();

    // A rule whose column is SQL names nothing and runs nothing.
    let bad = vec![Rule {
        table: "keepme".into(),
        column: "x\"; DROP TABLE keepme; --".into(),
        strategy: Strategy::Null,
    }];
    let mut db = privacy::open("db", "sqlite", path).await.unwrap();
    let err = privacy::protect("db", db.as_mut(), &bad, Gate::Off, &key, (false, None))
        .await
        .unwrap_err();
    assert!(matches!(err, PrivacyError::Rules { .. }), "{err}");

    let rules = vec![
        Rule {
            table: table.into(),
            column: column.into(),
            strategy: Strategy::Email,
        },
        Rule {
            table: "keepme".into(),
            column: "x".into(),
            strategy: Strategy::Keep,
        },
    ];
    let done = privacy::protect("db", db.as_mut(), &rules, Gate::On, &key, (false, None))
        .await
        .unwrap();
    assert_eq!(done.rows, ROWS as u64);
    drop(db);
    let c = rusqlite::Connection::open(&file).unwrap();
    let kept: String = c
        .query_row("SELECT x FROM keepme", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept, "still here");
    let originals: i64 = c
        .query_row(
            &format!("SELECT count(*) FROM \"we\"\"ird; DROP TABLE keepme; --\" WHERE \"co\"\"l\" LIKE '%{CANARY_DOMAIN}'"),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(originals, 0);
}
