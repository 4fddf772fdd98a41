//! Golden copies: a backup restored once, kept stopped, and cloned for every later run.
//!
//! ```text
//! STATE/golden/KEY.lock            flock: shared while a run clones, exclusive while building/pruning
//! STATE/golden/KEY/golden.json     what it is ([`Golden`]); written last, so its presence means done
//! STATE/golden/KEY/data/           PostgreSQL: a cleanly stopped data directory
//! STATE/golden/KEY/db.sqlite       SQLite: the verified backup file
//! STATE/golden/KEY/used            touched on every clone (least-recently-used order for prune)
//! STATE/golden/.building-KEY.RUN/  a build in progress by run RUN; never read; removed by the
//!                                  next builder, the run's cleanup, or prune
//! ```
//!
//! The key ([`Identity::key`]) covers everything that makes two copies differ: the backup (id
//! and SHA-256 from the backup's metadata), the engine and its version, the database name and
//! the masking rules the copy was restored with. A backup without a SHA-256 in its metadata has
//! no trustworthy identity and is never cached.
//!
//! # Crash safety and concurrency
//! A golden copy is built in a `.building-…` directory and renamed into place after its
//! `golden.json` is written and synced: a crash leaves a building directory no run reads (its
//! server, tagged with the run id, is ended by the run's cleanup). Runs of the same key take the
//! key's lock: shared to clone, exclusive to build, so concurrent runs build it once and prune
//! never removes a copy that is being cloned. The locks are `flock`s, released by the kernel
//! when a process dies.
//!
//! Cloning ([`clone_tree`]) uses the file system's copy-on-write (`FICLONE`, through the
//! `reflink-copy` crate) when it can — XFS with reflink, btrfs — and otherwise copies the files
//! in parallel with `copy_file_range` (`std::fs::copy`).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::provider::CloneMethod;

/// What a golden copy is, as `golden.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Golden {
    /// Cache key (the directory name).
    pub key: String,
    /// What it was restored from.
    pub identity: Identity,
    /// `(table, column)` masked while it was restored; their originals are not in it.
    #[serde(default)]
    pub masked: Vec<(String, String)>,
    /// Rows of the tables with masked columns.
    #[serde(default)]
    pub masked_rows: u64,
    /// When it was built.
    pub built_at: DateTime<Utc>,
    /// How long building took (restore included).
    pub build_ms: u64,
    /// Run that built it.
    pub built_by: String,
}

impl Golden {
    /// What a clone of it has masked already (nothing to mask again; the originals were
    /// checked against it when it was built and are kept nowhere).
    #[must_use]
    pub fn streamed(&self) -> Option<crate::privacy::stream::Streamed> {
        (!self.masked.is_empty()).then(|| crate::privacy::stream::Streamed {
            masked: self.masked.iter().cloned().collect(),
            rows: self.masked_rows,
            originals: std::collections::BTreeMap::new(),
        })
    }
}

/// Everything that makes two golden copies differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `postgres` or `sqlite`.
    pub engine: String,
    /// The engine's version (`postgres -V`, the SQLite library's version).
    pub engine_version: String,
    /// Production source.
    pub source: String,
    /// Backup id.
    pub backup_id: String,
    /// SHA-256 of the backup file, from its metadata.
    pub backup_sha256: String,
    /// Database name inside the copy.
    pub database: String,
    /// The masking rules it was restored with, `table.column=strategy`, sorted; empty: none.
    pub masking: Vec<String>,
}

impl Identity {
    /// The cache key: readable (source and backup id, sanitised) plus a hash of everything.
    #[must_use]
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            &self.engine,
            &self.engine_version,
            &self.source,
            &self.backup_id,
            &self.backup_sha256,
            &self.database,
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for m in &self.masking {
            h.update(m.as_bytes());
            h.update([0]);
        }
        let hash = hex::encode(h.finalize());
        let readable: String = format!("{}-{}", self.source, self.backup_id)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        format!("{readable}-{}", &hash[..16])
    }
}

/// The golden copy cache of one state directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// A golden copy ready to clone; the key's lock is held (shared or exclusive) until dropped.
#[derive(Debug)]
pub struct Ready {
    /// What it is.
    pub golden: Golden,
    /// Its directory.
    pub dir: PathBuf,
    _lock: File,
}

/// A golden copy to build (the key's exclusive lock is held); [`Building::finish`] puts it in
/// place, dropping it unfinished removes what was built.
#[derive(Debug)]
pub struct Building {
    key: String,
    dir: PathBuf,
    target: PathBuf,
    lock: Option<File>,
}

/// The result of [`Cache::acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// Built before: clone it.
    Hit(Box<Ready>),
    /// Not there: build it in [`Building::dir`].
    Miss(Building),
}

/// One golden copy, for `dryrun cache list`.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// What it is.
    #[serde(flatten)]
    pub golden: Golden,
    /// Bytes on disk (shared copy-on-write blocks counted once per copy).
    pub size_bytes: u64,
    /// Last time a run cloned it (or when it was built).
    pub last_used: DateTime<Utc>,
    /// Whether a run holds it right now.
    pub in_use: bool,
}

/// What `dryrun cache prune` removes.
#[derive(Debug, Clone, Default)]
pub struct Prune {
    /// Remove every copy.
    pub all: bool,
    /// Remove copies not used for this long.
    pub older_than: Option<Duration>,
    /// Then remove least-recently-used copies until the cache is at most this big.
    pub max_bytes: Option<u64>,
}

/// What prune did with one copy.
#[derive(Debug, Clone, Serialize)]
pub struct Pruned {
    /// Cache key (or a building directory's name).
    pub key: String,
    /// Bytes freed (0 when kept).
    pub size_bytes: u64,
    /// Why it was kept, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
}

const META: &str = "golden.json";
const USED: &str = "used";
const POLL: Duration = Duration::from_millis(100);

impl Cache {
    /// The cache under `STATE/golden`.
    #[must_use]
    pub fn new(state: &crate::state::StateDir) -> Self {
        Cache {
            root: state.root().join("golden"),
        }
    }

    /// Where the copies are.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock_file(&self, key: &str) -> io::Result<File> {
        crate::state::create_private_dir(&self.root)?;
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.root.join(format!("{key}.lock")))
    }

    /// The golden copy of `id`, or the right to build it. Waits (cancellably) while another
    /// run builds the same copy, then uses that one.
    ///
    /// # Errors
    /// I/O errors of the cache directory; [`io::ErrorKind::Interrupted`] when cancelled.
    pub async fn acquire(
        &self,
        id: &Identity,
        run_id: &str,
        cancel: &CancellationToken,
    ) -> io::Result<Acquired> {
        let key = id.key();
        let dir = self.root.join(&key);
        // Shared first: a hit never waits for another run's clone.
        let lock = self.lock_file(&key)?;
        wait_lock(&lock, false, cancel).await?;
        if let Some(golden) = read_meta(&dir).filter(|g| &g.identity == id) {
            return Ok(Acquired::Hit(Box::new(Ready::new(golden, dir, lock))));
        }
        drop(lock);
        let lock = self.lock_file(&key)?;
        wait_lock(&lock, true, cancel).await?;
        if let Some(golden) = read_meta(&dir).filter(|g| &g.identity == id) {
            return Ok(Acquired::Hit(Box::new(Ready::new(golden, dir, lock))));
        }
        // Nobody else builds this key now: what a crashed builder left is garbage.
        self.remove_leftovers(&key);
        if dir.exists() {
            remove_aside(&self.root, &dir)?;
        }
        let building = self.root.join(format!(".building-{key}.{run_id}"));
        if building.exists() {
            fs::remove_dir_all(&building)?;
        }
        crate::state::create_private_dir(&building)?;
        Ok(Acquired::Miss(Building {
            key,
            dir: building,
            target: dir,
            lock: Some(lock),
        }))
    }

    /// Building directories run `run_id` left (it crashed while building): for its cleanup.
    #[must_use]
    pub fn builds_of(&self, run_id: &str) -> Vec<PathBuf> {
        let suffix = format!(".{run_id}");
        fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(".building-") && n.ends_with(&suffix)
            })
            .map(|e| e.path())
            .collect()
    }

    fn remove_leftovers(&self, key: &str) {
        let prefix = format!(".building-{key}.");
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Every golden copy, least recently used first.
    ///
    /// # Errors
    /// When the cache directory cannot be read (a missing one is empty).
    pub fn list(&self) -> io::Result<Vec<Entry>> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let path = e.path();
            if !path.is_dir() || e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Some(golden) = read_meta(&path) else {
                continue;
            };
            let last_used = fs::metadata(path.join(USED))
                .and_then(|m| m.modified())
                .map_or(golden.built_at, DateTime::<Utc>::from);
            let in_use = self
                .lock_file(&golden.key)
                .map(|f| f.try_lock().is_err())
                .unwrap_or(false);
            out.push(Entry {
                size_bytes: tree_size(&path),
                golden,
                last_used,
                in_use,
            });
        }
        out.sort_by_key(|e| e.last_used);
        Ok(out)
    }

    /// Removes golden copies by `policy`; copies a run holds are kept (and said so), as are
    /// builds in progress. Leftovers of crashed builds are removed.
    ///
    /// # Errors
    /// When the cache directory cannot be read.
    pub fn prune(&self, policy: &Prune) -> io::Result<Vec<Pruned>> {
        let mut done = Vec::new();
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(".building-") else {
                continue;
            };
            // `.building-KEY.RUN`: stale when nobody holds KEY's lock.
            let Some((key, _run)) = rest.split_once('.') else {
                continue;
            };
            if let Ok(f) = self.lock_file(key)
                && f.try_lock().is_ok()
            {
                let size = tree_size(&e.path());
                if fs::remove_dir_all(e.path()).is_ok() {
                    done.push(Pruned {
                        key: name.clone(),
                        size_bytes: size,
                        kept: None,
                    });
                }
            }
        }
        let entries = self.list()?;
        let now = Utc::now();
        let mut total: u64 = entries.iter().map(|e| e.size_bytes).sum();
        for e in entries {
            let old = policy
                .older_than
                .is_some_and(|d| (now - e.last_used).to_std().unwrap_or_default() >= d);
            let over = policy.max_bytes.is_some_and(|m| total > m);
            if !(policy.all || old || over) {
                continue;
            }
            let lock = self.lock_file(&e.golden.key)?;
            if lock.try_lock().is_err() {
                done.push(Pruned {
                    key: e.golden.key.clone(),
                    size_bytes: 0,
                    kept: Some("a run is using it".into()),
                });
                continue;
            }
            remove_aside(&self.root, &self.root.join(&e.golden.key))?;
            total = total.saturating_sub(e.size_bytes);
            done.push(Pruned {
                key: e.golden.key.clone(),
                size_bytes: e.size_bytes,
                kept: None,
            });
        }
        Ok(done)
    }
}

impl Ready {
    fn new(golden: Golden, dir: PathBuf, lock: File) -> Self {
        // The clone about to happen is a use: least-recently-used order for prune.
        if let Ok(f) = crate::state::create_private_file(&dir.join(USED)) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ready {
            golden,
            dir,
            _lock: lock,
        }
    }
}

impl Building {
    /// Where to build: the engine's files go here (`data/` or `db.sqlite`).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Cache key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Writes `golden.json`, syncs the copy and renames it into place; the key's lock stays
    /// held by the returned [`Ready`].
    ///
    /// # Errors
    /// I/O errors; the building directory is removed then.
    pub fn finish(mut self, golden: &Golden) -> io::Result<Ready> {
        let meta = serde_json::to_vec_pretty(golden).map_err(io::Error::other)?;
        let mut f = crate::state::create_private_file(&self.dir.join(META))?;
        io::Write::write_all(&mut f, &meta)?;
        sync_tree(&self.dir)?;
        fs::rename(&self.dir, &self.target)?;
        if let Some(parent) = self.target.parent() {
            File::open(parent)?.sync_all()?;
        }
        let lock = self.lock.take().ok_or_else(|| io::Error::other("lock"))?;
        Ok(Ready::new(golden.clone(), self.target.clone(), lock))
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        if self.lock.is_some() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Takes `lock` (exclusive or shared), polling so that `cancel` can stop the wait.
async fn wait_lock(lock: &File, exclusive: bool, cancel: &CancellationToken) -> io::Result<()> {
    loop {
        let r = if exclusive {
            lock.try_lock()
        } else {
            lock.try_lock_shared()
        };
        match r {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = cancel.cancelled() => {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
        }
    }
}

fn read_meta(dir: &Path) -> Option<Golden> {
    let text = fs::read(dir.join(META)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Renames `dir` to a hidden name (so no run can find it any more), then removes it.
fn remove_aside(root: &Path, dir: &Path) -> io::Result<()> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let aside = root.join(format!(".removing-{name}-{}", std::process::id()));
    fs::rename(dir, &aside)?;
    fs::remove_dir_all(&aside)
}

/// Bytes in the files under `dir`.
#[must_use]
pub fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

fn sync_tree(dir: &Path) -> io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                File::open(e.path())?.sync_all()?;
            }
        }
        File::open(&d)?.sync_all()?;
    }
    Ok(())
}

/// Clones the tree `src` into `dst` (which must not exist): copy-on-write when the file system
/// allows it, else a parallel copy. Modes are kept; with `owner`, every entry is handed to that
/// uid/gid (the PostgreSQL user when dryrun is root). Symbolic links are recreated as they are.
///
/// # Errors
/// I/O errors; `dst` may then hold part of the tree (the caller's directory is removed by
/// teardown).
pub fn clone_tree(src: &Path, dst: &Path, owner: Option<(u32, u32)>) -> io::Result<CloneMethod> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let mut files: Vec<(PathBuf, PathBuf, u64)> = Vec::new();
    let mut stack = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((s, d)) = stack.pop() {
        let mode = fs::metadata(&s)?.permissions().mode() & 0o7777;
        fs::DirBuilder::new().mode(mode).create(&d)?;
        chown(&d, owner)?;
        for e in fs::read_dir(&s)? {
            let e = e?;
            let ft = e.file_type()?;
            let to = d.join(e.file_name());
            if ft.is_dir() {
                stack.push((e.path(), to));
            } else if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(e.path())?, &to)?;
                if let Some((u, g)) = owner {
                    std::os::unix::fs::lchown(&to, Some(u), Some(g))?;
                }
            } else if ft.is_file() {
                files.push((e.path(), to, e.metadata()?.len()));
            }
        }
    }
    // Biggest first, so that the two workers end together.
    files.sort_by_key(|f| std::cmp::Reverse(f.2));
    let method = match files.first() {
        Some((s, d, _)) if reflink_copy::reflink(s, d).is_ok() => CloneMethod::Reflink,
        Some((_, d, _)) => {
            let _ = fs::remove_file(d);
            CloneMethod::Copy
        }
        None => CloneMethod::Copy,
    };
    let skip = usize::from(method == CloneMethod::Reflink);
    let next = std::sync::atomic::AtomicUsize::new(skip);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let one = |(s, d, _): &(PathBuf, PathBuf, u64)| -> io::Result<()> {
        if method == CloneMethod::Reflink {
            // A file the file system will not clone (another device below) is copied.
            if reflink_copy::reflink(s, d).is_err() {
                let _ = fs::remove_file(d);
                fs::copy(s, d)?;
            }
        } else {
            fs::copy(s, d)?;
        }
        let mode = fs::metadata(s)?.permissions().mode();
        fs::set_permissions(d, fs::Permissions::from_mode(mode))?;
        chown(d, owner)
    };
    if let Some(first) = files.first().filter(|_| skip == 1) {
        let mode = fs::metadata(&first.0)?.permissions().mode();
        fs::set_permissions(&first.1, fs::Permissions::from_mode(mode))?;
        chown(&first.1, owner)?;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(f) = files.get(i) else {
                            return Ok(());
                        };
                        one(f)?;
                    }
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("clone worker panicked")))
        })
    })?;
    Ok(method)
}

/// Clones one file (`dst` must not exist): copy-on-write when the file system allows it, else a
/// copy. The mode is kept.
///
/// # Errors
/// I/O errors.
pub fn clone_file(src: &Path, dst: &Path) -> io::Result<CloneMethod> {
    if reflink_copy::reflink(src, dst).is_ok() {
        let mode = fs::metadata(src)?.permissions();
        fs::set_permissions(dst, mode)?;
        return Ok(CloneMethod::Reflink);
    }
    let _ = fs::remove_file(dst);
    fs::copy(src, dst)?;
    Ok(CloneMethod::Copy)
}

/// Hands every entry under `dir` (and `dir`) to `uid`/`gid`, symbolic links themselves.
///
/// # Errors
/// I/O errors.
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::os::unix::fs::lchown(&d, Some(uid), Some(gid))?;
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid))?;
            }
        }
    }
    Ok(())
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    match owner {
        Some((u, g)) => std::os::unix::fs::chown(path, Some(u), Some(g)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(backup: &str) -> Identity {
        Identity {
            engine: "sqlite".into(),
            engine_version: "3".into(),
            source: "shop/db".into(),
            backup_id: backup.into(),
            backup_sha256: "ab".into(),
            database: "shop".into(),
            masking: vec![],
        }
    }

    fn golden(id: &Identity) -> Golden {
        Golden {
            key: id.key(),
            identity: id.clone(),
            masked: vec![],
            masked_rows: 0,
            built_at: Utc::now(),
            build_ms: 1,
            built_by: "run-1".into(),
        }
    }

    #[test]
    fn the_key_changes_with_everything_that_makes_copies_differ_and_names_one_directory() {
        let a = identity("b1");
        let k = a.key();
        assert!(k.starts_with("shop_db-b1-"), "{k}");
        assert!(!k.contains('/') && !k.contains(".."));
        for change in [
            |i: &mut Identity| i.engine_version = "4".into(),
            |i: &mut Identity| i.backup_sha256 = "cd".into(),
            |i: &mut Identity| i.database = "other".into(),
            |i: &mut Identity| i.masking = vec!["t.c=hash".into()],
        ] {
            let mut b = a.clone();
            change(&mut b);
            assert_ne!(b.key(), k);
        }
        let hostile = identity("../../etc\u{0}passwd/..");
        assert!(!hostile.key().contains('/') && !hostile.key().contains(".."));
    }

    #[tokio::test]
    async fn a_build_is_used_only_once_finished_and_an_unfinished_one_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache {
            root: tmp.path().join("golden"),
        };
        let id = identity("b1");
        let cancel = CancellationToken::new();
        // A build that never finishes (a crash, an error): nothing in place, nothing left.
        let Acquired::Miss(b) = cache.acquire(&id, "run-1", &cancel).await.unwrap() else {
            panic!("hit on an empty cache")
        };
        fs::write(b.dir().join("db.sqlite"), b"half").unwrap();
        let building = b.dir().to_path_buf();
        drop(b);
        assert!(!building.exists());
        assert!(cache.list().unwrap().is_empty());
        // A crashed process's building directory (no Drop ran) is not a golden copy either.
        let stale = cache.root.join(format!(".building-{}.run-0", id.key()));
        fs::create_dir_all(&stale).unwrap();
        assert_eq!(cache.builds_of("run-0"), vec![stale.clone()]);
        fs::write(stale.join(META), serde_json::to_vec(&golden(&id)).unwrap()).unwrap();
        let Acquired::Miss(b) = cache.acquire(&id, "run-1", &cancel).await.unwrap() else {
            panic!("a building directory was used")
        };
        assert!(!stale.exists(), "the next builder removes it");
        fs::write(b.dir().join("db.sqlite"), b"whole").unwrap();
        let ready = b.finish(&golden(&id)).unwrap();
        assert_eq!(fs::read(ready.dir.join("db.sqlite")).unwrap(), b"whole");
        drop(ready);
        let Acquired::Hit(r) = cache.acquire(&id, "run-1", &cancel).await.unwrap() else {
            panic!("miss after a finished build")
        };
        assert_eq!(r.golden.key, id.key());
    }

    #[tokio::test]
    async fn a_second_run_waits_for_the_build_and_prune_keeps_what_is_held() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache {
            root: tmp.path().join("golden"),
        };
        let id = identity("b2");
        let cancel = CancellationToken::new();
        let Acquired::Miss(b) = cache.acquire(&id, "run-1", &cancel).await.unwrap() else {
            panic!()
        };
        let c2 = cache.clone();
        let id2 = id.clone();
        let waiter = tokio::spawn(async move {
            matches!(
                c2.acquire(&id2, "run-2", &CancellationToken::new())
                    .await
                    .unwrap(),
                Acquired::Hit(_)
            )
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiter.is_finished(),
            "the second run must wait for the build"
        );
        fs::write(b.dir().join("db.sqlite"), b"x").unwrap();
        let ready = b.finish(&golden(&id)).unwrap();
        drop(ready);
        assert!(
            waiter.await.unwrap(),
            "the second run uses the first one's build"
        );

        // Held by a run: prune keeps it; released: prune removes it.
        let Acquired::Hit(held) = cache.acquire(&id, "run-1", &cancel).await.unwrap() else {
            panic!()
        };
        let p = cache
            .prune(&Prune {
                all: true,
                ..Prune::default()
            })
            .unwrap();
        assert_eq!(p.len(), 1);
        assert!(p[0].kept.is_some());
        assert_eq!(cache.list().unwrap().len(), 1);
        assert!(cache.list().unwrap()[0].in_use);
        drop(held);
        let p = cache
            .prune(&Prune {
                max_bytes: Some(0),
                ..Prune::default()
            })
            .unwrap();
        assert!(p[0].kept.is_none() && p[0].size_bytes > 0);
        assert!(cache.list().unwrap().is_empty());

        // A waiting run can be cancelled.
        let Acquired::Miss(_b) = cache.acquire(&id, "run-1", &cancel).await.unwrap() else {
            panic!()
        };
        let stop = CancellationToken::new();
        stop.cancel();
        let e = cache.acquire(&id, "run-3", &stop).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn clone_tree_copies_modes_links_and_contents() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("base/1")).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o700)).unwrap();
        for i in 0..20 {
            fs::write(
                src.join("base/1").join(i.to_string()),
                vec![i as u8; 1000 * i],
            )
            .unwrap();
        }
        fs::write(src.join("PG_VERSION"), b"15\n").unwrap();
        fs::set_permissions(src.join("PG_VERSION"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("base", src.join("link")).unwrap();
        let dst = tmp.path().join("dst");
        let m = clone_tree(&src, &dst, None).unwrap();
        assert!(matches!(m, CloneMethod::Copy | CloneMethod::Reflink));
        for i in 0..20 {
            assert_eq!(
                fs::read(dst.join("base/1").join(i.to_string())).unwrap(),
                vec![i as u8; 1000 * i]
            );
        }
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dst), 0o700);
        assert_eq!(mode(&dst.join("PG_VERSION")), 0o600);
        assert_eq!(fs::read_link(dst.join("link")).unwrap(), Path::new("base"));
        assert_eq!(tree_size(&dst), tree_size(&src));
        // Writing the clone leaves the golden copy as it was.
        fs::write(dst.join("PG_VERSION"), b"changed").unwrap();
        assert_eq!(fs::read(src.join("PG_VERSION")).unwrap(), b"15\n");
    }
}
