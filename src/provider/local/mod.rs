//! The local provider: the embedded default, no cloud needed.
//!
//! | kind | what a copy is | restore | teardown |
//! |---|---|---|---|
//! | `database` sqlite | a file in the run's work directory | copy of the backup file, SHA-256 and `PRAGMA integrity_check` verified | remove the directory |
//! | `database` postgres | an ephemeral cluster on a free 127.0.0.1 port ([`postgres`]) | `pg_restore` of a custom-format dump | `pg_ctl stop -m immediate`, end tagged processes, remove the directory |
//! | `bucket` | a directory | copy of the production bucket directory | remove the directory |
//! | `service` | the release unpacked and started as a process group on a free loopback port | — | SIGTERM, SIGKILL after a grace period, remove the directory |
//!
//! Everything lives in the state directory under `copies`, as `copies/RUN_ID/NAME`; every process carries the run id in its
//! environment ([`process`]). Production (the backup store, the production bucket directory) is
//! only read.

pub mod backup;
mod doctor;
pub mod golden;
pub mod postgres;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::blueprint::{Engine, LocalSettings, ResourceKind};
use crate::process;
use crate::provider::{
    BackupInfo, BackupPick, CloneInfo, CloneMethod, Created, Deleted, GoldenUse, InstallRequest,
    Installed, Orphan, Output, Outputs, Provider, ProviderError, RecordSink, ResourceRecord,
    ResourceRequest, Restored, RunInfo,
};
use crate::release::copy_dir;
use crate::secret::Secret;
use crate::state::StateDir;

/// Grace period between SIGTERM and SIGKILL for services.
const GRACE: Duration = Duration::from_secs(5);

/// How long to wait for a finished process's output to reach its log file.
const PUMP_SETTLE: Duration = Duration::from_secs(2);

/// A log file as text (lossy: it is shown, and it was redacted as it was written).
fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The local provider.
pub struct LocalProvider {
    state: StateDir,
    settings: Option<LocalSettings>,
    bin_dir: PathBuf,
    passwords: Mutex<HashMap<String, Secret>>,
    /// Each run's egress firewall, from its first install until its sweep.
    firewalls: Mutex<HashMap<String, Firewall>>,
    /// Golden copies of restored backups.
    cache: golden::Cache,
}

/// A run's firewall as the provider holds it.
#[derive(Clone)]
enum Firewall {
    /// The release runs in this namespace.
    Active(crate::firewall::Mode, Arc<crate::firewall::Netns>),
    /// Not confined, and why.
    Open(crate::firewall::Mode, String),
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl LocalProvider {
    /// A provider over `state`. `settings` (backup store, bucket directory) come from the
    /// blueprint; cleanup, which needs only the journal, passes `None`.
    #[must_use]
    pub fn new(state: StateDir, settings: Option<LocalSettings>) -> Self {
        let bin_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."));
        LocalProvider {
            settings,
            bin_dir,
            passwords: Mutex::new(HashMap::new()),
            firewalls: Mutex::new(HashMap::new()),
            cache: golden::Cache::new(&state),
            state,
        }
    }

    /// The run's firewall, if one of its services was installed.
    fn firewall_of(&self, run_id: &str) -> Option<Firewall> {
        self.firewalls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(run_id)
            .cloned()
    }

    /// The run's firewall: made at its first install (the namespace, the relays out to the
    /// sinks, database copies and allowed hosts); `firewall: required` that cannot be enforced
    /// is an error.
    async fn firewall(
        &self,
        run_id: &str,
        policy: &crate::firewall::Policy,
        reachable: &[std::net::SocketAddr],
    ) -> Result<Option<Arc<crate::firewall::Netns>>, ProviderError> {
        use crate::firewall::{Mode, Netns};
        let known = self.firewall_of(run_id);
        let fw = if let Some(f) = known {
            f
        } else {
            let made = if policy.mode == Mode::Off {
                Firewall::Open(
                    Mode::Off,
                    "off (the blueprint's `firewall: off`): the release may connect anywhere"
                        .into(),
                )
            } else {
                let created = tokio::task::spawn_blocking(Netns::create)
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                match created {
                    Ok(ns) => Firewall::Active(policy.mode, Arc::new(ns)),
                    Err(why) if policy.mode == Mode::Required => {
                        return Err(ProviderError::Other(format!(
                            "`firewall: required`, but the release cannot be confined: {why}"
                        )));
                    }
                    Err(why) => Firewall::Open(policy.mode, why),
                }
            };
            self.firewalls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(run_id.to_string(), made.clone());
            made
        };
        let Firewall::Active(_, ns) = fw else {
            return Ok(None);
        };
        let mut doors: Vec<std::net::SocketAddr> = reachable.to_vec();
        for entry in &policy.allow {
            let found = tokio::net::lookup_host(entry.as_str()).await.map_err(|e| {
                ProviderError::Other(format!("firewall.allow `{entry}`: cannot resolve it: {e}"))
            })?;
            doors.extend(found);
        }
        for d in doors {
            ns.relay_out(d).await.map_err(ProviderError::io(format!(
                "open the firewall to {d} for the release"
            )))?;
        }
        Ok(Some(ns))
    }

    /// Directory exported to install steps and services as `DRYRUN_BIN_DIR` (where the `dryrun`
    /// binary and companion tools built with it live).
    #[must_use]
    pub fn with_bin_dir(mut self, dir: PathBuf) -> Self {
        self.bin_dir = dir;
        self
    }

    /// Restores a database (masking `plan`'s columns while the data loads, for PostgreSQL) or
    /// copies a bucket. Databases come from a golden copy ([`golden`]) when the cache is on.
    async fn restore_with(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
        backup: Option<&BackupInfo>,
        cancel: &CancellationToken,
        plan: Option<&crate::privacy::stream::MaskPlan>,
    ) -> Result<Restored, ProviderError> {
        let dir = rec_dir(record);
        let mut outputs = Outputs::new();
        let (mut streamed, mut clone) = (None, None);

        match req {
            ResourceRequest::Database(db) => {
                let backup = backup.ok_or_else(|| {
                    ProviderError::NoBackup(format!("no backup chosen for {}", record.address))
                })?;
                outputs.insert("backup_id".into(), out(backup.id.clone()));
                let done = match db.engine {
                    Engine::Sqlite => {
                        self.restore_sqlite(run, record, (db, backup), cancel, plan)
                            .await
                    }
                    Engine::Postgres => {
                        self.restore_postgres(run, record, db, backup, cancel, plan)
                            .await
                    }
                    other => {
                        return Err(not_local(other));
                    }
                };
                let (s, c) = done?;
                streamed = s;
                clone = Some(c);
            }
            ResourceRequest::Bucket(b) => {
                let settings = self.settings()?;
                let mut src = settings.buckets.join(&b.source);
                if let Some(p) = &b.prefix {
                    src = src.join(p);
                }
                if !src.is_dir() {
                    return Err(ProviderError::NoBackup(format!(
                        "production bucket `{}` not found at {}",
                        b.source,
                        src.display()
                    )));
                }
                let dst = dir.join("data");
                let work = tokio::task::spawn_blocking(move || copy_dir(&src, &dst));
                tokio::select! {
                    r = work => r.map_err(|e| ProviderError::Other(format!("copy task: {e}")))?.map_err(ProviderError::io(format!("copy bucket {}", b.source)))?,
                    () = cancel.cancelled() => return Err(ProviderError::Cancelled),
                }
            }
            ResourceRequest::Service(_) => {}
        }
        Ok(Restored {
            outputs,
            streamed,
            clone,
        })
    }

    /// What a golden copy of `backup` restored for `db` (with `plan`'s masking) is, or why
    /// there is none: the cache is off, or the backup's metadata has no checksum to trust.
    fn golden_identity(
        &self,
        db: &crate::blueprint::DatabaseSpec,
        backup: &BackupInfo,
        engine_version: &str,
        plan: Option<&crate::privacy::stream::MaskPlan>,
    ) -> Result<golden::Identity, String> {
        if !self.settings.as_ref().is_some_and(|s| s.cache) {
            return Err(
                "golden copies are off (`--no-cache` or `providers.local.cache: false`)".into(),
            );
        }
        let Some(sha) = backup::recorded_sha256(backup) else {
            return Err(format!(
                "backup {} has no sha256 in its backup.json, so it has no identity to cache it by",
                backup.id
            ));
        };
        let mut masking: Vec<String> = plan
            .into_iter()
            .flat_map(|p| &p.rules)
            .filter(|r| r.strategy != crate::privacy::Strategy::Keep)
            .map(|r| format!("{}.{}={}", r.table, r.column, r.strategy.as_str()))
            .collect();
        masking.sort();
        Ok(golden::Identity {
            engine: db.engine.as_str().to_string(),
            engine_version: engine_version.to_string(),
            source: backup.source.clone(),
            backup_id: backup.id.clone(),
            backup_sha256: sha,
            database: db.database.clone(),
            masking,
        })
    }

    /// The golden copy of `id`, waiting while another run builds it; cancellable.
    async fn acquire(
        &self,
        id: &golden::Identity,
        run_id: &str,
        cancel: &CancellationToken,
    ) -> Result<golden::Acquired, ProviderError> {
        self.cache.acquire(id, run_id, cancel).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::Interrupted {
                ProviderError::Cancelled
            } else {
                ProviderError::Io {
                    context: format!("golden copy cache {}", self.cache.root().display()),
                    source: e,
                }
            }
        })
    }

    /// A SQLite copy: the backup file, checksum- and integrity-verified, cloned from its golden
    /// copy or (cache off) copied from the backup store. A golden copy is masked by `plan`
    /// when it is built (the gate's masking and verification, run on it), so that the cache
    /// never holds the originals of masked columns; without one the engine masks the copy.
    async fn restore_sqlite(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        (db, backup): (&crate::blueprint::DatabaseSpec, &BackupInfo),
        cancel: &CancellationToken,
        plan: Option<&crate::privacy::stream::MaskPlan>,
    ) -> Result<(Option<crate::privacy::stream::Streamed>, CloneInfo), ProviderError> {
        let t = Instant::now();
        let path = rec_dir(record).join(format!("{}.sqlite", db.database));
        let cancellable = |b: BackupInfo, p: PathBuf| async move {
            let work = tokio::task::spawn_blocking(move || verified_sqlite(&b, &p));
            tokio::select! {
                r = work => r.map_err(|e| ProviderError::Other(format!("restore task: {e}")))?,
                () = cancel.cancelled() => Err(ProviderError::Cancelled),
            }
        };
        let plan = plan.filter(|p| p.masks());
        let id = match self.golden_identity(db, backup, rusqlite::version(), plan) {
            Ok(id) => id,
            Err(reason) => {
                cancellable(backup.clone(), path).await?;
                return Ok((None, CloneInfo::off(t.elapsed(), reason)));
            }
        };
        let (ready, golden, build_ms) = match self.acquire(&id, &run.run_id, cancel).await? {
            golden::Acquired::Hit(r) => (*r, GoldenUse::Hit, None),
            golden::Acquired::Miss(b) => {
                let tb = Instant::now();
                let file = b.dir().join("db.sqlite");
                cancellable(backup.clone(), file.clone()).await?;
                let (mut masked, mut masked_rows) = (Vec::new(), 0);
                if let Some(p) = plan {
                    let mut copy = crate::privacy::open(
                        &record.address,
                        "sqlite",
                        &file.display().to_string(),
                    )
                    .await
                    .map_err(|e| ProviderError::Other(e.to_string()))?;
                    let done = crate::privacy::protect(
                        &record.address,
                        copy.as_mut(),
                        &p.rules,
                        crate::privacy::Gate::Off,
                        &p.key,
                        (false, None),
                    )
                    .await
                    .map_err(|e| ProviderError::Other(run.redactor.redact(&e.to_string())))?;
                    masked = p
                        .rules
                        .iter()
                        .filter(|r| r.strategy != crate::privacy::Strategy::Keep)
                        .map(|r| (r.table.clone(), r.column.clone()))
                        .collect();
                    masked_rows = done.rows;
                }
                keep(b, id, (masked, masked_rows), &run.run_id, tb).await?
            }
        };
        let streamed = ready.golden.streamed();
        let method = clone_golden(ready, move |dir| {
            golden::clone_file(&dir.join("db.sqlite"), &path)
        })
        .await?;
        Ok((
            streamed,
            CloneInfo::cloned(method, golden, t.elapsed(), build_ms),
        ))
    }

    /// A PostgreSQL copy: the golden copy's data directory cloned, given this run's password
    /// and started on the copy's port — or, without a golden copy, initdb and pg_restore. On a
    /// miss the golden copy is built first (restored, masked on the way, the masking verified,
    /// stopped cleanly, its recycled WAL segments removed) by a server tagged with this run, so
    /// that a crash leaves it to the run's cleanup.
    async fn restore_postgres(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        db: &crate::blueprint::DatabaseSpec,
        backup: &BackupInfo,
        cancel: &CancellationToken,
        plan: Option<&crate::privacy::stream::MaskPlan>,
    ) -> Result<(Option<crate::privacy::stream::Streamed>, CloneInfo), ProviderError> {
        let t = Instant::now();
        let password = self
            .passwords
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&Self::key(&run.run_id, &record.address))
            .cloned()
            .ok_or_else(|| {
                ProviderError::Other(format!(
                    "{}: cluster password unknown (create did not run in this process)",
                    record.address
                ))
            })?;
        let port: u16 = record
            .data
            .get("port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cluster = postgres::Cluster {
            dir: rec_dir(record),
            port,
        };
        let ids = (run.run_id.as_str(), record.address.as_str());
        let plan = plan.filter(|p| p.masks());
        let version = postgres::version().await?;
        let id = match self.golden_identity(db, backup, &version, plan) {
            Ok(id) => id,
            Err(reason) => {
                cluster.init_and_start(&password, ids.0, ids.1).await?;
                let streamed =
                    restore_dump(&cluster, db, &password, backup, ids, plan, cancel).await?;
                return Ok((streamed, CloneInfo::off(t.elapsed(), reason)));
            }
        };
        if postgres::run_as()?.is_some() {
            // As for the work area: the building server's user must walk to its directory.
            let root = self.cache.root();
            crate::state::create_private_dir(root)
                .and_then(|()| {
                    std::fs::set_permissions(
                        root,
                        std::os::unix::fs::PermissionsExt::from_mode(0o711),
                    )
                })
                .map_err(ProviderError::io(format!("prepare {}", root.display())))?;
        }
        let (ready, golden, build_ms) = match self.acquire(&id, &run.run_id, cancel).await? {
            golden::Acquired::Hit(r) => (*r, GoldenUse::Hit, None),
            golden::Acquired::Miss(b) => {
                let tb = Instant::now();
                let builder = postgres::Cluster {
                    dir: b.dir().to_path_buf(),
                    port: process::free_port().map_err(ProviderError::io("find a free port"))?,
                };
                let build_password = Secret::generate(24);
                run.redactor.register(&build_password);
                let built = async {
                    builder
                        .init_and_start(&build_password, ids.0, ids.1)
                        .await?;
                    crate::failpoint::point("golden: building");
                    let streamed =
                        restore_dump(&builder, db, &build_password, backup, ids, plan, cancel)
                            .await?;
                    if let Some(s) = &streamed {
                        let url = format!(
                            "postgres://{}:{}@127.0.0.1:{}/{}",
                            postgres::SUPERUSER,
                            build_password.expose(),
                            builder.port,
                            db.database
                        );
                        crate::privacy::verify_streamed(&record.address, &url, s)
                            .await
                            .map_err(|e| {
                                ProviderError::Other(run.redactor.redact(&e.to_string()))
                            })?;
                    }
                    builder.stop_clean().await?;
                    builder.trim_wal().await?;
                    if postgres::run_as()?.is_some() {
                        // Every copy's server runs as the PostgreSQL user, and a release is
                        // superuser in its copy (server-side COPY writes files as that
                        // user): the golden copy is root's, so that no run can change what
                        // later runs clone. Clones are handed back to that user.
                        let dir = builder.dir.clone();
                        tokio::task::spawn_blocking(move || golden::chown_tree(&dir, 0, 0))
                            .await
                            .map_err(|e| ProviderError::Other(format!("chown task: {e}")))?
                            .map_err(ProviderError::io("hand the golden copy to root"))?;
                    }
                    Ok::<_, ProviderError>(streamed)
                };
                let streamed = match built.await {
                    Ok(s) => s,
                    Err(e) => {
                        // Nothing half-built is kept: the server stops, the directory goes.
                        postgres::Cluster::stop(&builder.data()).await;
                        return Err(e);
                    }
                };
                let _ = std::fs::remove_file(builder.dir.join("postgres.log"));
                let masked = streamed
                    .iter()
                    .flat_map(|s| s.masked.iter().cloned())
                    .collect();
                let rows = streamed.as_ref().map_or(0, |s| s.rows);
                keep(b, id, (masked, rows), &run.run_id, tb).await?
            }
        };
        // Masked when it was built: the clone's columns are not masked again, and their
        // originals were checked against the golden copy before it was kept (a miss too: the
        // clone holds the same data, so the engine does not check them a second time).
        let streamed = ready.golden.streamed();
        let owner = postgres::run_as()?.map(|u| (u.uid, u.gid));
        let dst = cluster.data();
        let method = clone_golden(ready, move |dir| {
            golden::clone_tree(&dir.join("data"), &dst, owner)
        })
        .await?;
        cluster.set_password(&password, ids.0, ids.1).await?;
        cluster.start(ids.0, ids.1).await?;
        Ok((
            streamed,
            CloneInfo::cloned(method, golden, t.elapsed(), build_ms),
        ))
    }

    fn settings(&self) -> Result<&LocalSettings, ProviderError> {
        self.settings.as_ref().ok_or_else(|| {
            ProviderError::Other("the local provider has no blueprint settings here".into())
        })
    }

    /// Whether `dir` is provably inside this state directory's work area (`copies/RUN/…`): no
    /// `.` or `..` components, under the work root lexically, and — symlinks followed — under
    /// it on disk too. Records come from journals, which are files: a crafted one must not make
    /// teardown or cleanup remove anything else.
    fn in_work_area(&self, dir: &Path) -> bool {
        use std::path::Component;
        let root = self.state.work_root();
        if dir
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            || !dir.starts_with(&root)
            || dir == root
        {
            return false;
        }
        let Ok(canon_root) = root.canonicalize() else {
            // No work area on disk: nothing under it exists to be removed.
            return !dir.exists();
        };
        // The deepest part of the path that exists must resolve inside the work area.
        let mut existing = dir;
        while std::fs::symlink_metadata(existing).is_err() {
            match existing.parent() {
                Some(p) => existing = p,
                None => return false,
            }
        }
        existing
            .canonicalize()
            .is_ok_and(|c| c.starts_with(&canon_root) && (c != canon_root || existing == root))
    }

    /// Variables the blueprint passes to children (`providers.local.pass_env`).
    fn pass_env(&self) -> &[String] {
        self.settings
            .as_ref()
            .map_or(&[], |s| s.pass_env.as_slice())
    }

    fn key(run_id: &str, address: &str) -> String {
        format!("{run_id}/{address}")
    }
}

/// Copies a SQLite backup to `path`, verifying its checksum, and checks the copy's integrity.
fn verified_sqlite(b: &BackupInfo, path: &Path) -> Result<(), ProviderError> {
    backup::copy_verified(b, path)?;
    let conn = rusqlite::Connection::open(path).map_err(|e| {
        ProviderError::BadBackup(format!("backup {} does not open as SQLite: {e}", b.id))
    })?;
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| {
            ProviderError::BadBackup(format!(
                "backup {}: integrity check failed to run: {e}",
                b.id
            ))
        })?;
    if check != "ok" {
        return Err(ProviderError::BadBackup(format!(
            "backup {} fails PRAGMA integrity_check: {check}",
            b.id
        )));
    }
    Ok(())
}

/// Restores a custom-format dump into `cluster`'s database: the dump is copied next to the
/// cluster first, so that it is checksum-verified before PostgreSQL reads it; masking `plan`'s
/// columns while the data loads.
async fn restore_dump(
    cluster: &postgres::Cluster,
    db: &crate::blueprint::DatabaseSpec,
    password: &Secret,
    backup: &BackupInfo,
    ids: (&str, &str),
    plan: Option<&crate::privacy::stream::MaskPlan>,
    cancel: &CancellationToken,
) -> Result<Option<crate::privacy::stream::Streamed>, ProviderError> {
    let local_dump = cluster.dir.join("restore.dump");
    let (b, d) = (backup.clone(), local_dump.clone());
    let copy = tokio::task::spawn_blocking(move || backup::copy_verified(&b, &d));
    tokio::select! {
        r = copy => r.map_err(|e| ProviderError::Other(format!("restore task: {e}")))??,
        () = cancel.cancelled() => return Err(ProviderError::Cancelled),
    };
    if let Some(u) = postgres::run_as()? {
        let _ = nix::unistd::chown(&local_dump, Some(u.uid.into()), Some(u.gid.into()));
    }
    let r = tokio::select! {
        r = async {
            match plan {
                Some(p) => cluster.restore_masked(&db.database, password, &local_dump, ids, p).await.map(Some),
                None => cluster.restore(&db.database, password, &local_dump, ids.0, ids.1).await.map(|()| None),
            }
        } => r,
        () = cancel.cancelled() => Err(ProviderError::Cancelled),
    };
    let _ = tokio::fs::remove_file(&local_dump).await;
    r
}

/// Records and puts in place a golden copy built since `started` ([`golden::Building::finish`]),
/// with the columns masked while it was built and their row count: the clone's source, a miss.
async fn keep(
    b: golden::Building,
    identity: golden::Identity,
    (masked, masked_rows): (Vec<(String, String)>, u64),
    run_id: &str,
    started: Instant,
) -> Result<(golden::Ready, GoldenUse, Option<u64>), ProviderError> {
    let g = golden::Golden {
        key: b.key().to_string(),
        identity,
        masked,
        masked_rows,
        built_at: chrono::Utc::now(),
        build_ms: millis(started.elapsed()),
        built_by: run_id.to_string(),
    };
    crate::failpoint::point("golden: before keep");
    let ready = tokio::task::spawn_blocking(move || b.finish(&g))
        .await
        .map_err(|e| ProviderError::Other(format!("golden copy task: {e}")))?
        .map_err(ProviderError::io("keep the golden copy"))?;
    Ok((ready, GoldenUse::Miss, Some(millis(started.elapsed()))))
}

/// Clones a golden copy with `clone` (given its directory), off the async threads; the key's
/// lock is held until the clone is complete.
async fn clone_golden(
    ready: golden::Ready,
    clone: impl FnOnce(&Path) -> std::io::Result<CloneMethod> + Send + 'static,
) -> Result<CloneMethod, ProviderError> {
    tokio::task::spawn_blocking(move || {
        let m = clone(&ready.dir);
        drop(ready);
        m
    })
    .await
    .map_err(|e| ProviderError::Other(format!("clone task: {e}")))?
    .map_err(ProviderError::io("clone the golden copy"))
}

impl CloneInfo {
    /// Cloned from a golden copy (`build_ms`: built by this run first).
    fn cloned(
        method: CloneMethod,
        golden: GoldenUse,
        took: Duration,
        build_ms: Option<u64>,
    ) -> Self {
        CloneInfo {
            method,
            golden,
            ms: millis(took),
            build_ms,
            reason: None,
        }
    }

    /// Restored without a golden copy, and why.
    fn off(took: Duration, reason: String) -> Self {
        CloneInfo {
            method: CloneMethod::Restore,
            golden: GoldenUse::Off,
            ms: millis(took),
            build_ms: None,
            reason: Some(reason),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn out(value: impl Into<String>) -> Output {
    Output {
        value: value.into(),
        secret: false,
    }
}

fn secret_out(value: impl Into<String>) -> Output {
    Output {
        value: value.into(),
        secret: true,
    }
}

fn rec_dir(record: &ResourceRecord) -> PathBuf {
    PathBuf::from(
        record
            .data
            .get("dir")
            .cloned()
            .unwrap_or_else(|| record.id.clone()),
    )
}

async fn remove_dir(dir: &Path) -> Result<bool, ProviderError> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ProviderError::Io {
            context: format!("remove {}", dir.display()),
            source: e,
        }),
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn doctor(
        &self,
        bp: Option<&crate::blueprint::Blueprint>,
    ) -> Vec<crate::doctor::Finding> {
        self.doctor_checks(bp).await
    }

    async fn find_backup(
        &self,
        db: &crate::blueprint::DatabaseSpec,
        pick: &BackupPick,
    ) -> Result<BackupInfo, ProviderError> {
        if !matches!(db.engine, Engine::Sqlite | Engine::Postgres) {
            return Err(not_local(db.engine));
        }
        let store = self.settings()?.backups.clone();
        let source = db.source.clone();
        let engine = db.engine.as_str();
        backup::pick(&store, &source, engine, pick)
    }

    fn plan_record(&self, run: &RunInfo, name: &str, req: &ResourceRequest) -> ResourceRecord {
        let (kind, mut data) = match req {
            ResourceRequest::Database(d) => (
                ResourceKind::Database,
                BTreeMap::from([("engine".to_string(), d.engine.as_str().to_string())]),
            ),
            ResourceRequest::Bucket(_) => (ResourceKind::Bucket, BTreeMap::new()),
            ResourceRequest::Service(_) => (ResourceKind::Service, BTreeMap::new()),
        };
        let dir = self.state.work_dir(&run.run_id).join(name);
        data.insert("dir".into(), dir.display().to_string());
        data.insert("run_id".into(), run.run_id.clone());
        ResourceRecord {
            address: format!("{kind}.{name}"),
            kind,
            id: dir.display().to_string(),
            data,
        }
    }

    async fn create(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
    ) -> Result<Created, ProviderError> {
        let dir = rec_dir(record);
        crate::state::create_private_dir(&dir)
            .map_err(ProviderError::io(format!("create {}", dir.display())))?;
        let mut record = record.clone();
        let mut outputs = Outputs::new();
        match req {
            ResourceRequest::Database(db) => {
                outputs.insert("engine".into(), out(db.engine.as_str()));
                match db.engine {
                    Engine::Sqlite => {
                        let path = dir.join(format!("{}.sqlite", db.database));
                        outputs.insert("path".into(), out(path.display().to_string()));
                        outputs.insert("url".into(), out(format!("sqlite://{}", path.display())));
                        outputs.insert("name".into(), out(db.database.clone()));
                        for k in ["host", "port", "user", "password"] {
                            outputs.insert(k.into(), out(""));
                        }
                    }
                    other @ (Engine::Mysql
                    | Engine::Mariadb
                    | Engine::AuroraPostgresql
                    | Engine::AuroraMysql) => return Err(not_local(other)),
                    Engine::Postgres => {
                        if postgres::run_as()?.is_some() {
                            // As root, the cluster runs as an unprivileged user who must walk
                            // down to it: traverse-only (0711) on the directories above it,
                            // which still cannot be listed.
                            for d in [self.state.work_root(), self.state.work_dir(&run.run_id)] {
                                std::fs::set_permissions(
                                    &d,
                                    std::os::unix::fs::PermissionsExt::from_mode(0o711),
                                )
                                .map_err(ProviderError::io(format!("chmod {}", d.display())))?;
                            }
                        }
                        let port =
                            process::free_port().map_err(ProviderError::io("find a free port"))?;
                        let password = Secret::generate(24);
                        run.redactor.register(&password);
                        let cluster = postgres::Cluster { dir, port };
                        record.data.insert("port".into(), port.to_string());
                        // The cluster is made when the data comes (`restore`): from a golden
                        // copy's clone, or by initdb and pg_restore.
                        record
                            .data
                            .insert("pgdata".into(), cluster.data().display().to_string());
                        let url = format!(
                            "postgres://{}:{}@127.0.0.1:{port}/{}",
                            postgres::SUPERUSER,
                            password.expose(),
                            db.database
                        );
                        outputs.insert("url".into(), secret_out(url));
                        outputs.insert("host".into(), out("127.0.0.1"));
                        outputs.insert("port".into(), out(port.to_string()));
                        outputs.insert("name".into(), out(db.database.clone()));
                        outputs.insert("user".into(), out(postgres::SUPERUSER));
                        outputs.insert("password".into(), secret_out(password.expose()));
                        outputs.insert("path".into(), out(""));
                        self.passwords
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(Self::key(&run.run_id, &record.address), password);
                    }
                }
            }
            ResourceRequest::Bucket(b) => {
                let data = dir.join("data");
                outputs.insert("path".into(), out(data.display().to_string()));
                outputs.insert(
                    "name".into(),
                    out(format!(
                        "{}-{}",
                        run.run_id,
                        record.address.trim_start_matches("bucket.")
                    )),
                );
                outputs.insert("url".into(), out(format!("file://{}", data.display())));
                let _ = b;
            }
            ResourceRequest::Service(_) => {
                let port = process::free_port().map_err(ProviderError::io("find a free port"))?;
                record.data.insert("port".into(), port.to_string());
                outputs.insert("host".into(), out("127.0.0.1"));
                outputs.insert("port".into(), out(port.to_string()));
                outputs.insert("url".into(), out(format!("http://127.0.0.1:{port}")));
                outputs.insert("dir".into(), out(dir.join("release").display().to_string()));
            }
        }
        Ok(Created { record, outputs })
    }

    async fn restore(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
        backup: Option<&BackupInfo>,
        cancel: &CancellationToken,
    ) -> Result<Outputs, ProviderError> {
        self.restore_with(run, record, req, backup, cancel, None)
            .await
            .map(|r| r.outputs)
    }

    async fn restore_database(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
        backup: Option<&BackupInfo>,
        cancel: &CancellationToken,
        plan: &crate::privacy::stream::MaskPlan,
    ) -> Result<Restored, ProviderError> {
        self.restore_with(run, record, req, backup, cancel, Some(plan))
            .await
    }

    async fn install(
        &self,
        run: &RunInfo,
        req: InstallRequest<'_>,
        sink: &dyn RecordSink,
    ) -> Result<Installed, ProviderError> {
        let record = req.record.clone();
        let dir = rec_dir(&record);
        let rel_dir = dir.join("release");
        let release = req.release.clone();
        let rd = rel_dir.clone();
        tokio::task::spawn_blocking(move || release.unpack_into(&rd))
            .await
            .map_err(|e| ProviderError::Other(format!("unpack task: {e}")))?
            .map_err(|e| ProviderError::Other(e.to_string()))?;
        let port: u16 = record
            .data
            .get("port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let mut env = req.env.clone();
        env.insert("PORT".into(), port.to_string());
        env.insert("DRYRUN_BIN_DIR".into(), self.bin_dir.display().to_string());
        env.insert("DRYRUN_RELEASE_DIR".into(), rel_dir.display().to_string());
        env.insert(
            "DRYRUN_RELEASE_VERSION".into(),
            req.release.manifest.version.clone(),
        );
        let name = record.address.trim_start_matches("service.").to_string();
        crate::state::create_private_dir(&run.log_dir)
            .map_err(ProviderError::io("create log directory"))?;

        let home = dir.join("home");
        crate::state::create_private_dir(&home)
            .map_err(ProviderError::io(format!("create {}", home.display())))?;
        let base = process::ChildEnv::new(&home, self.pass_env());
        let netns = self
            .firewall(&run.run_id, req.firewall, &req.reachable)
            .await?;
        let wrapper = netns.as_ref().map(|n| n.nsenter());
        let shell = |cmdline: &str, address: &str| {
            process::shell_in(
                wrapper.as_ref(),
                cmdline,
                &rel_dir,
                &base,
                &env,
                (&run.run_id, address),
            )
        };

        let mut steps = Vec::new();
        for step in &req.release.manifest.install {
            let started = Instant::now();
            let log_path = run
                .log_dir
                .join(format!("{name}.install.{}.log", sanitize(&step.name)));
            let mut cmd = shell(&step.run, &record.address);
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = cmd.spawn().map_err(ProviderError::io(format!(
                "start install step `{}`",
                step.name
            )))?;
            let mut pump = process::LogPump::start(&mut child, &log_path, &run.redactor)
                .map_err(ProviderError::io(format!("create {}", log_path.display())))?;
            let status = tokio::select! {
                s = child.wait() => s.map_err(ProviderError::io(format!("wait for install step `{}`", step.name)))?,
                () = tokio::time::sleep(step.timeout) => {
                    process::end_tagged(&run.run_id, Some(&record.address), GRACE).await;
                    pump.settle(PUMP_SETTLE).await;
                    // A step that outlives its limit is the release's problem (a migration too
                    // slow for production data), so it is reported like a failing step.
                    return Err(ProviderError::InstallStep {
                        step: step.name.clone(),
                        status: format!("still running after its timeout of {}; ended it", humantime::format_duration(step.timeout)),
                        output: run.redactor.redact(&process::tail(&read_log(&log_path), 4000)),
                    });
                }
                () = req.cancel.cancelled() => {
                    process::end_tagged(&run.run_id, Some(&record.address), GRACE).await;
                    return Err(ProviderError::Cancelled);
                }
            };
            pump.settle(PUMP_SETTLE).await;
            if !status.success() {
                return Err(ProviderError::InstallStep {
                    step: step.name.clone(),
                    status: status
                        .code()
                        .map_or_else(|| "killed by a signal".into(), |c| format!("exit code {c}")),
                    output: run
                        .redactor
                        .redact(&process::tail(&read_log(&log_path), 4000)),
                });
            }
            steps.push((step.name.clone(), started.elapsed()));
        }

        let mut record = record;
        let mut outputs = Outputs::new();
        outputs.insert("url".into(), out(format!("http://127.0.0.1:{port}")));
        let start = req
            .start
            .clone()
            .or_else(|| req.release.manifest.start.clone());
        if let Some(start) = start {
            let log_path = run.log_dir.join(format!("{name}.log"));
            let mut cmd = shell(&start, &record.address);
            if let Some(ns) = &netns {
                // Health checks and checks reach the service's port through a relay.
                ns.relay_in(port).await.map_err(ProviderError::io(format!(
                    "relay 127.0.0.1:{port} into the firewall of {}",
                    record.address
                )))?;
            }
            // The service's output goes through a pump in its own process, which outlives
            // dryrun with a kept copy; a library user without the `dryrun` binary next to it
            // gets a pump inside this process.
            let exe = self.bin_dir.join("dryrun");
            let mut detached = None;
            if exe.is_file() {
                let (pump, out) = process::spawn_detached_pump(
                    &exe,
                    &log_path,
                    &run.redactor,
                    &base,
                    &run.run_id,
                    &record.address,
                )
                .map_err(ProviderError::io(format!(
                    "start the log pump of {}",
                    record.address
                )))?;
                let err = out
                    .try_clone()
                    .map_err(ProviderError::io("clone the log pipe"))?;
                cmd.stdout(out).stderr(err);
                detached = Some(pump);
            } else {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            let mut child = cmd
                .spawn()
                .map_err(ProviderError::io(format!("start {}", record.address)))?;
            drop(cmd); // our copies of the pipe's write end
            let mut pump = match detached {
                Some(_) => None,
                None => Some(
                    process::LogPump::start(&mut child, &log_path, &run.redactor)
                        .map_err(ProviderError::io(format!("create {}", log_path.display())))?,
                ),
            };
            let pid = child.id().unwrap_or(0);
            record.data.insert("pid".into(), pid.to_string());
            record
                .data
                .insert("log".into(), log_path.display().to_string());
            sink.update(&record)
                .map_err(ProviderError::io("journal the service pid"))?;

            let timeout = req
                .release
                .manifest
                .health
                .as_ref()
                .map_or(req.ready_timeout, |h| h.timeout.min(req.ready_timeout));
            let path = req.release.manifest.health.as_ref().map(|h| h.http.clone());
            let deadline = Instant::now() + timeout;
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .no_proxy()
                .build()
                .map_err(|e| ProviderError::Other(format!("http client: {e}")))?;
            let mut last = "not started".to_string();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    if let Some(p) = &mut pump {
                        p.settle(PUMP_SETTLE).await;
                    }
                    if let Some(p) = &mut detached {
                        let _ = tokio::time::timeout(PUMP_SETTLE, p.wait()).await;
                    }
                    let log = read_log(&log_path);
                    return Err(ProviderError::Unhealthy {
                        address: record.address.clone(),
                        reason: format!(
                            "the process exited ({status}) before it was healthy; log tail:\n{}",
                            run.redactor.redact(&process::tail(&log, 3000))
                        ),
                    });
                }
                // Through the firewall's relay a connection is always accepted: whether the
                // service listens is asked inside, so that "connection refused" stays visible.
                let refused = match &netns {
                    Some(ns) => !ns.listening(port).await,
                    None => false,
                };
                let ok = match &path {
                    Some(p) if refused => {
                        last = format!("GET {p}: connection refused");
                        false
                    }
                    None if refused => false,
                    Some(p) => match client
                        .get(format!("http://127.0.0.1:{port}{p}"))
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => true,
                        Ok(r) => {
                            last = format!("GET {p} answered {}", r.status());
                            false
                        }
                        Err(e) => {
                            last = format!(
                                "GET {p}: {}",
                                if e.is_connect() {
                                    "connection refused".to_string()
                                } else {
                                    e.to_string()
                                }
                            );
                            false
                        }
                    },
                    None if netns.is_some() => true,
                    None => tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok(),
                };
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    let log = read_log(&log_path);
                    return Err(ProviderError::Unhealthy {
                        address: record.address.clone(),
                        reason: format!(
                            "no healthy answer within {}: last {last}; log tail:\n{}",
                            humantime::format_duration(timeout),
                            run.redactor.redact(&process::tail(&log, 3000))
                        ),
                    });
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    () = req.cancel.cancelled() => return Err(ProviderError::Cancelled),
                }
            }
            // The child handle is dropped here; tokio reaps it in the background when it exits.
        }
        Ok(Installed {
            record,
            outputs,
            steps,
        })
    }

    async fn delete(&self, record: &ResourceRecord) -> Result<Deleted, ProviderError> {
        let run_id = record.data.get("run_id").cloned().unwrap_or_default();
        let dir = rec_dir(record);
        if !self.in_work_area(&dir) {
            return Err(ProviderError::Guard(format!(
                "{} ({}): outside this state directory's work area",
                record.address,
                dir.display()
            )));
        }
        let mut had_process = false;
        if let Some(pgdata) = record.data.get("pgdata") {
            let p = PathBuf::from(pgdata);
            if !p.starts_with(&dir) || !self.in_work_area(&p) {
                return Err(ProviderError::Guard(format!(
                    "{}: its PostgreSQL data directory {} is not inside its own directory",
                    record.address,
                    p.display()
                )));
            }
            if p.join("postmaster.pid").exists() {
                had_process = true;
            }
            postgres::Cluster::stop(&p).await;
        }
        if !run_id.is_empty() {
            if !process::find_tagged(&run_id, Some(&record.address)).is_empty() {
                had_process = true;
            }
            let left = process::end_tagged(&run_id, Some(&record.address), GRACE).await;
            if !left.is_empty() {
                let pids: Vec<String> = left
                    .iter()
                    .map(|p| format!("{} ({})", p.pid, p.comm))
                    .collect();
                return Err(ProviderError::Other(format!(
                    "{}: processes survived SIGKILL: {}",
                    record.address,
                    pids.join(", ")
                )));
            }
        }
        self.passwords
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&Self::key(&run_id, &record.address));
        let removed = remove_dir(&dir).await?;
        Ok(if removed || had_process {
            Deleted::Destroyed
        } else {
            Deleted::AlreadyGone
        })
    }

    async fn egress(&self, run_id: &str) -> Option<(crate::firewall::FirewallReport, Vec<String>)> {
        use crate::firewall::FirewallReport;
        let fw = self.firewall_of(run_id)?;
        Some(match fw {
            Firewall::Active(mode, ns) => {
                let blocked = tokio::task::spawn_blocking({
                    let ns = ns.clone();
                    move || ns.blocked()
                })
                .await
                .unwrap_or_default();
                let report = FirewallReport {
                    mode,
                    enforced: true,
                    how: ns.how(),
                    allowed: ns.allowed(),
                };
                (report, blocked)
            }
            Firewall::Open(mode, how) => {
                let report = FirewallReport {
                    mode,
                    enforced: false,
                    how,
                    allowed: Vec::new(),
                };
                (report, Vec::new())
            }
        })
    }

    async fn sweep(&self, run_id: &str, remove: bool) -> Result<Vec<Orphan>, ProviderError> {
        if remove {
            // The relays end; the namespace goes with its last process.
            self.firewalls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(run_id);
        }
        let mut found = Vec::new();
        for p in process::find_tagged(run_id, None) {
            found.push(Orphan {
                id: format!("process {} ({}) of {}", p.pid, p.comm, p.resource),
                removed: false,
                reason: None,
            });
        }
        let work = self.state.work_dir(run_id);
        // Clusters whose journal entry was lost still have their pid file under the work dir.
        if let Ok(rd) = std::fs::read_dir(&work) {
            for ent in rd.flatten() {
                let data = ent.path().join("data");
                if data.join("postmaster.pid").exists() {
                    found.push(Orphan {
                        id: format!("postgres cluster {}", data.display()),
                        removed: false,
                        reason: None,
                    });
                    if remove {
                        postgres::Cluster::stop(&data).await;
                    }
                }
            }
        }
        if work.exists() {
            found.push(Orphan {
                id: format!("directory {}", work.display()),
                removed: false,
                reason: None,
            });
        }
        // A golden copy the run was building when it stopped (never used by any run).
        let builds = self.cache.builds_of(run_id);
        for b in &builds {
            found.push(Orphan {
                id: format!("unfinished golden copy {}", b.display()),
                removed: false,
                reason: None,
            });
        }
        if !remove {
            return Ok(found);
        }
        let survivors = process::end_tagged(run_id, None, GRACE).await;
        let dir_err = remove_dir(&work).await.err();
        let mut build_errs = Vec::new();
        for b in &builds {
            if let Err(e) = remove_dir(b).await {
                build_errs.push(e.to_string());
            }
        }
        for o in &mut found {
            if o.id.starts_with("process") {
                let pid: i32 =
                    o.id.split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                if survivors.iter().any(|s| s.pid == pid) {
                    o.reason = Some("survived SIGKILL".into());
                } else {
                    o.removed = true;
                }
            } else if o.id.starts_with("directory") {
                match &dir_err {
                    Some(e) => o.reason = Some(e.to_string()),
                    None => o.removed = true,
                }
            } else if o.id.starts_with("unfinished golden copy") && !build_errs.is_empty() {
                o.reason = Some(build_errs.join("; "));
            } else {
                o.removed = true;
            }
        }
        Ok(found)
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The error for an engine only the AWS provider restores.
fn not_local(engine: Engine) -> ProviderError {
    ProviderError::Other(format!(
        "engine `{}` is restored by the AWS provider only (RDS{}): run with `--provider aws`; the local provider restores `sqlite` and `postgres` backups",
        engine.as_str(),
        if engine.is_aurora() {
            " Aurora clone"
        } else {
            " snapshot"
        }
    ))
}
