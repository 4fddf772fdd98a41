//! The local provider through its trait, with real SQLite files, real PostgreSQL clusters and
//! real processes.

mod common;

use std::collections::BTreeMap;

use dryrun::blueprint::{DatabaseSpec, Engine, LocalSettings};
use dryrun::provider::local::LocalProvider;
use dryrun::provider::{BackupPick, Deleted, Provider, ResourceRequest, RunInfo};
use dryrun::secret::Redactor;
use dryrun::state::StateDir;

fn provider(state: &std::path::Path) -> LocalProvider {
    let prod = common::root().join("blueprints/demo/production");
    LocalProvider::new(
        StateDir::new(state),
        Some(LocalSettings {
            backups: prod.join("backups"),
            buckets: prod.join("buckets"),
            pass_env: Vec::new(),
            cache: true,
        }),
    )
}

fn run_info(state: &std::path::Path, id: &str) -> RunInfo {
    RunInfo {
        run_id: id.into(),
        blueprint: "t".into(),
        expires_at: chrono::Utc::now(),
        log_dir: state.join("runs").join(id).join("logs"),
        redactor: Redactor::new(),
        release: None,
    }
}

fn db(engine: Engine, source: &str) -> DatabaseSpec {
    DatabaseSpec {
        engine,
        source: source.into(),
        database: "shop".into(),
        backup: None,
    }
}

#[tokio::test]
async fn delete_of_a_resource_that_was_never_created_is_already_gone() {
    let state = common::state_dir();
    let p = provider(state.path());
    let run = run_info(state.path(), "never-1");
    let req = ResourceRequest::Database(db(Engine::Sqlite, "shop-db"));
    let planned = p.plan_record(&run, "db", &req);
    assert_eq!(p.delete(&planned).await.unwrap(), Deleted::AlreadyGone);
}

#[tokio::test]
async fn sqlite_copy_is_restored_verified_and_deleted_idempotently() {
    let state = common::state_dir();
    let p = provider(state.path());
    let run = run_info(state.path(), "sqlite-1");
    let spec = db(Engine::Sqlite, "shop-db");
    let backup = p.find_backup(&spec, &BackupPick::Latest).await.unwrap();
    assert_eq!(
        backup.id, "shop-db-2026-11-21T0300Z",
        "the incomplete 11-22 backup must be skipped"
    );
    let req = ResourceRequest::Database(spec);
    let planned = p.plan_record(&run, "db", &req);
    let created = p.create(&run, &planned, &req).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    p.restore(&run, &created.record, &req, Some(&backup), &cancel)
        .await
        .unwrap();
    let path = created.outputs["path"].value.clone();
    let n: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT count(*) FROM customers", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3000);
    assert_eq!(p.delete(&created.record).await.unwrap(), Deleted::Destroyed);
    assert!(!std::path::Path::new(&path).exists());
    assert_eq!(
        p.delete(&created.record).await.unwrap(),
        Deleted::AlreadyGone
    );
}

#[tokio::test]
async fn postgres_copy_has_a_fresh_password_listens_on_loopback_and_is_destroyed() {
    if !common::have_postgres() {
        return;
    }
    let state = common::state_dir();
    let p = provider(state.path());
    let run = run_info(state.path(), "pg-1");
    let spec = db(Engine::Postgres, "shop-pg");
    let backup = p.find_backup(&spec, &BackupPick::Latest).await.unwrap();
    let req = ResourceRequest::Database(spec);
    let planned = p.plan_record(&run, "db", &req);
    let created = p.create(&run, &planned, &req).await;
    let created = match created {
        Ok(c) => c,
        Err(e) => {
            let _ = p.delete(&planned).await;
            panic!("create failed: {e}");
        }
    };
    let guard = scopeguard(&p, &created.record);
    let cancel = tokio_util::sync::CancellationToken::new();
    p.restore(&run, &created.record, &req, Some(&backup), &cancel)
        .await
        .unwrap();
    let port = created.outputs["port"].value.clone();
    assert!(created.outputs["url"].secret && created.outputs["password"].secret);
    let password = created.outputs["password"].value.clone();
    assert!(password.len() >= 20);
    assert_eq!(
        run.redactor
            .redact(&created.outputs["url"].value)
            .matches("[redacted]")
            .count(),
        1,
        "the password is registered for redaction"
    );
    // The right password works on 127.0.0.1 …
    let url = created.outputs["url"].value.clone();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let h = tokio::spawn(conn);
    let n: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3000);
    let listen: String = client
        .query_one("SHOW listen_addresses", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listen, "127.0.0.1");
    drop(client);
    let _ = h.await;
    // … a wrong one does not.
    let bad = format!("host=127.0.0.1 port={port} user=dryrun password=wrong dbname=shop");
    assert!(
        tokio_postgres::connect(&bad, tokio_postgres::NoTls)
            .await
            .is_err()
    );
    drop(guard);
    assert_eq!(p.delete(&created.record).await.unwrap(), Deleted::Destroyed);
    assert!(dryrun::process::find_tagged("pg-1", None).is_empty());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err(),
        "the cluster must be stopped"
    );
    assert_eq!(
        p.delete(&created.record).await.unwrap(),
        Deleted::AlreadyGone
    );
}

/// Best-effort cleanup if an assertion fails mid-test (the cluster must not outlive the test).
struct Guard(Option<(std::path::PathBuf, String)>);

fn scopeguard(_p: &LocalProvider, rec: &dryrun::provider::ResourceRecord) -> Guard {
    Guard(Some((
        rec.data.get("pgdata").map(Into::into).unwrap_or_default(),
        rec.data.get("run_id").cloned().unwrap_or_default(),
    )))
}

impl Drop for Guard {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some((pgdata, _)) = self.0.take()
            && let Ok(pg_ctl) = dryrun::provider::local::postgres::binary("pg_ctl")
        {
            let mut c = std::process::Command::new(pg_ctl);
            if nix::unistd::geteuid().is_root()
                && let Ok(Some(u)) = nix::unistd::User::from_name("postgres")
            {
                std::os::unix::process::CommandExt::uid(&mut c, u.uid.as_raw());
            }
            let _ = c
                .arg("-D")
                .arg(pgdata)
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}

#[tokio::test]
async fn service_without_manifest_health_waits_for_its_port_and_is_ended_by_delete() {
    common::require_demo_shop();
    let state = common::state_dir();
    let bin_dir = common::bin().parent().unwrap().to_path_buf();
    let p = provider(state.path()).with_bin_dir(bin_dir);
    let run = run_info(state.path(), "svc-1");
    // Ends the run's processes also when an assertion below fails.
    struct EndTagged;
    impl Drop for EndTagged {
        fn drop(&mut self) {
            for t in dryrun::process::find_tagged("svc-1", None) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(t.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _end = EndTagged;
    // A release that starts demo-shop without a health path: readiness = the port accepts.
    let rel_dir = state.path().join("rel");
    std::fs::create_dir_all(&rel_dir).unwrap();
    std::fs::write(rel_dir.join("dryrun-release.yaml"), "version: \"1\"\nstart: 'exec \"$DRYRUN_BIN_DIR/demo-shop\" serve --db \"$DATABASE_PATH\" --uploads . --port \"$PORT\"'\n").unwrap();
    let release = dryrun::release::Release::load(rel_dir.to_str().unwrap()).unwrap();
    let dbfile = common::root()
        .join("blueprints/demo/production/backups/shop-db/shop-db-2026-11-21T0300Z/shop.sqlite");
    let spec = dryrun::blueprint::ServiceSpec {
        env: BTreeMap::new(),
        start: None,
        ready_timeout: std::time::Duration::from_secs(20),
        aws: None,
    };
    let req = ResourceRequest::Service(spec.clone());
    let planned = p.plan_record(&run, "app", &req);
    let created = p.create(&run, &planned, &req).await.unwrap();
    struct Sink;
    impl dryrun::provider::RecordSink for Sink {
        fn update(&self, _: &dryrun::provider::ResourceRecord) -> Result<(), std::io::Error> {
            Ok(())
        }
    }
    let env = BTreeMap::from([
        ("DATABASE_PATH".to_string(), dbfile.display().to_string()),
        ("API_TOKEN".to_string(), "t0ken-for-test".to_string()),
    ]);
    let inst = p
        .install(
            &run,
            dryrun::provider::InstallRequest {
                record: &created.record,
                spec: &spec,
                release: &release,
                env,
                start: None,
                ready_timeout: spec.ready_timeout,
                cancel: Default::default(),
                firewall: &dryrun::firewall::Policy::default(),
                reachable: Vec::new(),
            },
            &Sink,
        )
        .await
        .unwrap();
    // The service, and its log pump (a `dryrun __log-pump` process): both tagged, so that
    // delete and cleanup end both.
    let procs = dryrun::process::find_tagged("svc-1", Some("service.app"));
    assert_eq!(procs.len(), 2, "{procs:?}");
    let svc: Vec<_> = procs.iter().filter(|p| p.comm == "demo-shop").collect();
    assert_eq!(svc.len(), 1, "{procs:?}");
    assert_eq!(
        svc[0].pgid, svc[0].pid,
        "a service runs in its own process group"
    );
    assert!(procs.iter().any(|p| p.comm == "dryrun"), "{procs:?}");
    let url = format!("{}/healthz", inst.outputs["url"].value);
    let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert_eq!(body.trim(), "ok");
    assert_eq!(p.delete(&inst.record).await.unwrap(), Deleted::Destroyed);
    assert!(dryrun::process::find_tagged("svc-1", None).is_empty());
}

#[tokio::test]
async fn aws_only_engines_are_refused_by_the_local_provider_with_the_fix() {
    let state = common::state_dir();
    let p = provider(state.path());
    for engine in [
        Engine::Mysql,
        Engine::Mariadb,
        Engine::AuroraPostgresql,
        Engine::AuroraMysql,
    ] {
        let e = p
            .find_backup(
                &db(engine, "shop-db"),
                &dryrun::provider::BackupPick::Latest,
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "engine `{}` is restored by the AWS provider only",
                engine.as_str()
            )) && e.contains("--provider aws"),
            "{e}"
        );
    }
}
