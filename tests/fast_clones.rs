//! Golden copies on the local provider, end to end: real PostgreSQL and SQLite, real processes.
//! The first run of a backup builds its golden copy, later runs clone it; no run changes it; a
//! changed or damaged backup never gets a stale or half golden copy; concurrent runs build it
//! once; `dryrun cache` lists and prunes.

mod common;

use std::path::Path;

use common::*;

fn dryrun_run(state: &Path, blueprint: &Path, release: &str, extra: &[&str]) -> (i32, String) {
    require_demo_shop();
    let out = run(dryrun(state)
        .arg("run")
        .arg(blueprint)
        .args(["--release", release, "-q"])
        .args(extra));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The `backup.clone` of the newest run's report.
fn last_clone(state: &Path) -> serde_json::Value {
    let id = newest_run(state);
    assert_nothing_left(state, &id);
    report(state, &id)["backup"]["clone"].clone()
}

fn newest_run(state: &Path) -> String {
    let mut ids: Vec<(std::time::SystemTime, String)> = run_ids(state)
        .into_iter()
        .map(|id| {
            let t = std::fs::metadata(state.join("runs").join(&id).join("report.json"))
                .and_then(|m| m.modified())
                .unwrap();
            (t, id)
        })
        .collect();
    ids.sort();
    ids.pop().unwrap().1
}

fn cache_list(state: &Path) -> Vec<serde_json::Value> {
    let out = run(dryrun(state).args(["cache", "list", "--json"]));
    assert!(out.status.success());
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

#[test]
fn postgres_golden_copy_is_built_once_cloned_after_and_never_changed_by_a_run() {
    if !have_postgres() {
        return;
    }
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let bp = root().join("blueprints/demo/shop-pg.yaml");
    let release = "blueprints/demo/releases/pg-v2";

    let (code, out) = dryrun_run(state.path(), &bp, release, &[]);
    assert_eq!(code, 0, "{out}");
    let first = last_clone(state.path());
    assert_eq!(first["golden"], "miss", "{first}");
    assert!(matches!(first["method"].as_str(), Some("copy" | "reflink")));
    assert!(first["build_ms"].as_u64().unwrap() <= first["ms"].as_u64().unwrap());

    // pg-v2 adds a column: it applies again on the second clone, so the first run's migration
    // never reached the golden copy.
    let (code, out) = dryrun_run(state.path(), &bp, release, &[]);
    assert_eq!(code, 0, "{out}");
    let second = last_clone(state.path());
    assert_eq!(second["golden"], "hit", "{second}");
    assert!(second["build_ms"].is_null());
    let id = newest_run(state.path());
    let r = report(state.path(), &id);
    // Masked when the golden copy was built: the clone is not masked again, and still counts.
    let m = &r["masking"]["databases"][0];
    assert_eq!(m["masked_in_restore"], true, "{m}");
    assert_eq!(m["rows"], 3000, "{m}");

    let listed = cache_list(state.path());
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["identity"]["engine"], "postgres");
    assert_eq!(
        listed[0]["identity"]["backup_id"],
        "shop-pg-2026-11-21T0300Z"
    );
    assert_eq!(
        listed[0]["identity"]["masking"],
        serde_json::json!(["customers.email=email", "customers.name=name"])
    );
    assert_eq!(listed[0]["in_use"], false);
    let key = listed[0]["key"].as_str().unwrap();
    let golden = state.path().join("golden").join(key);
    assert!(golden.join("data/PG_VERSION").is_file());
    assert!(
        !golden.join("data/postmaster.pid").exists(),
        "the golden copy is stopped"
    );
    assert!(
        !golden.join("postgres.log").exists(),
        "the build's log stays out of the cache"
    );
    let segments = std::fs::read_dir(golden.join("data/pg_wal"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().len() == 24)
        .count();
    assert_eq!(
        segments, 1,
        "only the last checkpoint's WAL segment is kept"
    );
    if nix::unistd::geteuid().is_root() {
        // Every copy's server runs as the PostgreSQL user, and a release is superuser in its
        // copy: the golden copy must not be that user's to change.
        use std::os::unix::fs::MetadataExt as _;
        for p in [
            golden.clone(),
            golden.join("data"),
            golden.join("data/PG_VERSION"),
        ] {
            let md = std::fs::metadata(&p).unwrap();
            assert_eq!(md.uid(), 0, "{} is not root's", p.display());
        }
        let mode = std::fs::metadata(golden.join("data")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    // A scan masks nothing, so it never keeps a golden copy (it would hold the originals).
    let out = run(dryrun(state.path()).arg("scan").arg(&bp));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(cache_list(state.path()).len(), 1);

    // --no-cache: restored from the backup, the cache untouched.
    let (code, out) = dryrun_run(state.path(), &bp, release, &["--no-cache"]);
    assert_eq!(code, 0, "{out}");
    let off = last_clone(state.path());
    assert_eq!(off["golden"], "off");
    assert_eq!(off["method"], "restore");
    assert!(off["reason"].as_str().unwrap().contains("--no-cache"));
    assert_eq!(cache_list(state.path()).len(), 1);

    // Prune: nothing without a policy; --all removes it.
    let out = run(dryrun(state.path()).args(["cache", "prune"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--older-than"));
    let out = run(dryrun(state.path()).args(["cache", "prune", "--older-than", "1d"]));
    assert!(out.status.success());
    assert_eq!(cache_list(state.path()).len(), 1, "used just now");
    let out = run(dryrun(state.path()).args(["cache", "prune", "--all"]));
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 removed"), "{text}");
    assert!(cache_list(state.path()).is_empty());
    assert!(!golden.exists());
}

#[test]
fn concurrent_runs_of_one_backup_build_its_golden_copy_once() {
    if !have_postgres() {
        return;
    }
    require_demo_shop();
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let start = || {
        dryrun(state.path())
            .args([
                "run",
                "blueprints/demo/shop-pg.yaml",
                "--release",
                "blueprints/demo/releases/pg-v2",
                "-q",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (start(), start());
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let mut uses: Vec<String> = run_ids(state.path())
        .iter()
        .map(|id| {
            assert_nothing_left(state.path(), id);
            report(state.path(), id)["backup"]["clone"]["golden"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    uses.sort();
    assert_eq!(uses, ["hit", "miss"]);
    assert_eq!(cache_list(state.path()).len(), 1);
}

/// The demo's SQLite blueprint and backup store, copied where a test may change production.
fn writable_demo(dir: &Path) -> std::path::PathBuf {
    let src = root().join("blueprints/demo");
    let backups = dir.join("production/backups/shop-db");
    std::fs::create_dir_all(&backups).unwrap();
    for b in std::fs::read_dir(src.join("production/backups/shop-db")).unwrap() {
        let b = b.unwrap();
        let to = backups.join(b.file_name());
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(b.path()).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    let buckets = src.join("production/buckets");
    let text = std::fs::read_to_string(src.join("shop.yaml"))
        .unwrap()
        .replace(
            "buckets: production/buckets",
            &format!("buckets: {}", buckets.display()),
        );
    let bp = dir.join("shop.yaml");
    std::fs::write(&bp, text).unwrap();
    bp
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn a_changed_or_damaged_backup_never_gets_a_stale_or_half_golden_copy() {
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let bp = writable_demo(dir.path());
    let release = "blueprints/demo/releases/v2";

    let (code, out) = dryrun_run(state.path(), &bp, release, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(last_clone(state.path())["golden"], "miss");
    let (code, out) = dryrun_run(state.path(), &bp, release, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(last_clone(state.path())["golden"], "hit");
    // Masked when built: no customer address of production is in the cache.
    let listed = cache_list(state.path());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["identity"]["engine"], "sqlite");
    let golden_db = state
        .path()
        .join("golden")
        .join(listed[0]["key"].as_str().unwrap())
        .join("db.sqlite");
    let conn = rusqlite::Connection::open(&golden_db).unwrap();
    let real: i64 = conn
        .query_row(
            "SELECT count(*) FROM customers WHERE email NOT LIKE '%@example.com'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(real, 0, "the golden copy holds unmasked addresses");
    drop(conn);

    // Production's latest backup is replaced under the same id (its checksum updated): the
    // old golden copy is not used for it.
    let latest = dir
        .path()
        .join("production/backups/shop-db/shop-db-2026-11-21T0300Z");
    let older = dir
        .path()
        .join("production/backups/shop-db/shop-db-2026-11-20T0300Z");
    let meta_path = latest.join("backup.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let file = meta["file"].as_str().unwrap().to_string();
    let replacement = std::fs::read(older.join(&file)).unwrap();
    std::fs::write(latest.join(&file), &replacement).unwrap();
    meta["sha256"] = sha256_hex(&replacement).into();
    meta["size_bytes"] = replacement.len().into();
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let (code, out) = dryrun_run(state.path(), &bp, release, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(last_clone(state.path())["golden"], "miss");
    assert_eq!(cache_list(state.path()).len(), 2);

    // Damaged (the file no longer matches its checksum): refused, and nothing is kept.
    let out = run(dryrun(state.path()).args(["cache", "prune", "--all"]));
    assert!(out.status.success());
    let mut bytes = replacement;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(latest.join(&file), &bytes).unwrap();
    let (code, out) = dryrun_run(state.path(), &bp, release, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("damaged"), "{out}");
    assert!(cache_list(state.path()).is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(state.path().join("golden"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
