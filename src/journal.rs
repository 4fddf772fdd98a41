//! The write-ahead journal of a run.
//!
//! One JSON object per line in `runs/RUN_ID/journal.jsonl`, appended and flushed to disk
//! (`fdatasync`) before the side effect it announces. A run killed with SIGKILL at any moment
//! leaves a journal whose replay ([`replay`]) lists every resource that may exist; `dryrun
//! cleanup` deletes those and marks the run closed.
//!
//! # Guarantees
//! - `Creating` is on disk before the provider is asked to create; the record in it is enough
//!   for `delete` to find the resource.
//! - A torn last line (crash mid-write) is ignored on read; every line before it is intact.
//! - While a run's process lives it holds an exclusive lock on `runs/RUN_ID/lock`; cleanup never
//!   touches a locked run. The kernel drops the lock when the process dies, however it dies.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::provider::ResourceRecord;
use crate::state::StateDir;

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal could not be written or read.
    #[error("journal {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the run.
    #[error("run {0} is in progress in another process")]
    Locked(String),
    /// A run with that id has a journal already.
    #[error("run {0} exists already: a run id is never used twice")]
    Exists(String),
    /// The control database did not store the entry.
    #[error("journal of run {0} in the control database: {1}")]
    Mirror(String, String),
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Entry {
    /// The run began.
    Started {
        /// Run id.
        run_id: String,
        /// Blueprint name.
        blueprint: String,
        /// Blueprint path.
        blueprint_path: String,
        /// Provider name.
        provider: String,
        /// Release reference.
        release: String,
        /// Start time.
        at: DateTime<Utc>,
        /// When anything left of this run may be reaped.
        expires_at: DateTime<Utc>,
        /// Process id of the run.
        pid: u32,
    },
    /// About to create; the record is what delete needs.
    Creating {
        /// Planned record.
        record: ResourceRecord,
    },
    /// Created (or updated, e.g. a pid learned after spawn).
    Created {
        /// Actual record.
        record: ResourceRecord,
    },
    /// Deleted (or found already gone).
    Deleted {
        /// Address.
        address: String,
    },
    /// Delete failed; the resource may still exist.
    DeleteFailed {
        /// Address.
        address: String,
        /// Provider error.
        reason: String,
    },
    /// Kept by the teardown policy until the given time.
    Kept {
        /// Expiry.
        until: DateTime<Utc>,
    },
    /// The run ended; `left_behind` resources remain (zero means clean).
    Finished {
        /// Status.
        status: String,
        /// Count of what remains.
        left_behind: usize,
        /// Time.
        at: DateTime<Utc>,
    },
    /// Cleanup finished what the run left; nothing of it remains.
    Closed {
        /// Time.
        at: DateTime<Utc>,
        /// Who closed it (`run`, `cleanup`).
        by: String,
    },
}

/// Where a journal's entries go besides its file: the control database, when several workers
/// share one ([`crate::control::postgres`]), so that another worker can clean up after this one
/// dies. `append` returns once the entry is stored there.
pub trait Mirror: Send + Sync + std::fmt::Debug {
    /// Stores one entry (a JSON line) of `run_id`'s journal.
    ///
    /// # Errors
    /// The entry could not be stored; the journal's append fails with it and the step it
    /// announces does not happen.
    fn append(&self, run_id: &str, line: &str) -> Result<(), String>;
}

/// An open journal; holds the run's lock for its lifetime.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
    _lock: File,
    run_id: String,
    mirror: Option<std::sync::Arc<dyn Mirror>>,
}

impl Journal {
    /// Creates the run's directory, takes its lock and opens a new journal.
    ///
    /// # Errors
    /// I/O errors, or [`JournalError::Locked`] if the run is held elsewhere.
    pub fn create(
        state: &StateDir,
        run_id: &str,
        mirror: Option<std::sync::Arc<dyn Mirror>>,
    ) -> Result<Journal, JournalError> {
        let dir = state.run_dir(run_id);
        crate::state::create_private_dir(&dir).map_err(|source| JournalError::Io {
            path: dir.clone(),
            source,
        })?;
        let lock = try_lock(&dir)?.ok_or_else(|| JournalError::Locked(run_id.to_string()))?;
        // A new run never writes into another run's journal (an id used twice).
        if dir.join("journal.jsonl").exists() {
            return Err(JournalError::Exists(run_id.to_string()));
        }
        Ok(Journal {
            mirror,
            ..Self::open_locked(&dir, lock, run_id)?
        })
    }

    /// Opens an existing run's journal for appending (cleanup), taking its lock.
    ///
    /// # Errors
    /// [`JournalError::Locked`] while the run's process lives.
    pub fn reopen(state: &StateDir, run_id: &str) -> Result<Journal, JournalError> {
        let dir = state.run_dir(run_id);
        let lock = try_lock(&dir)?.ok_or_else(|| JournalError::Locked(run_id.to_string()))?;
        Self::open_locked(&dir, lock, run_id)
    }

    fn open_locked(dir: &Path, lock: File, run_id: &str) -> Result<Journal, JournalError> {
        let path = dir.join("journal.jsonl");
        let file = crate::state::append_private_file(&path).map_err(|source| JournalError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Journal {
            path,
            file: Mutex::new(file),
            _lock: lock,
            run_id: run_id.to_string(),
            mirror: None,
        })
    }

    /// Appends an entry and flushes it to disk before returning.
    ///
    /// # Errors
    /// I/O errors; the caller must not perform the announced side effect then.
    pub fn append(&self, entry: &Entry) -> Result<(), JournalError> {
        crate::failpoint::point("journal: before write");
        let mut line = serde_json::to_string(entry).map_err(|e| JournalError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        line.push('\n');
        let mut f = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        blocking(|| f.write_all(line.as_bytes()).and_then(|()| f.sync_data())).map_err(
            |source| JournalError::Io {
                path: self.path.clone(),
                source,
            },
        )?;
        crate::failpoint::point("journal: after fsync");
        if let Some(m) = &self.mirror {
            blocking(|| m.append(&self.run_id, line.trim_end()))
                .map_err(|e| JournalError::Mirror(self.run_id.clone(), e))?;
        }
        Ok(())
    }

    /// The journal file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Runs a blocking disk operation (an `fsync` takes milliseconds) without stalling the async
/// runtime: on a multi-threaded runtime the worker hands its other tasks to another thread
/// first, so `dryrun serve` keeps answering HTTP while runs journal. Elsewhere it just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Takes the run's lock without waiting; `None` if another process holds it.
///
/// # Errors
/// I/O errors opening the lock file.
pub fn try_lock(run_dir: &Path) -> Result<Option<File>, JournalError> {
    let path = run_dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| JournalError::Io {
            path: path.clone(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(source)) => Err(JournalError::Io { path, source }),
    }
}

/// Reads a journal, ignoring a torn last line.
///
/// # Errors
/// I/O errors reading the file.
pub fn read(path: &Path) -> Result<Vec<Entry>, JournalError> {
    let f = File::open(path).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Entry>(&line) {
            Ok(e) => out.push(e),
            Err(_) => break, // torn write at a crash: nothing after it was acknowledged
        }
    }
    Ok(out)
}

/// What a journal says about a run.
#[derive(Debug, Clone, Default)]
pub struct RunState {
    /// Run id.
    pub run_id: String,
    /// Blueprint name.
    pub blueprint: String,
    /// Provider.
    pub provider: String,
    /// Release reference.
    pub release: String,
    /// Start.
    pub started_at: Option<DateTime<Utc>>,
    /// Expiry stamped at start.
    pub expires_at: Option<DateTime<Utc>>,
    /// Resources that may still exist, in creation order.
    pub live: Vec<ResourceRecord>,
    /// Status from `Finished`, if the run got that far.
    pub status: Option<String>,
    /// Kept until, if the policy kept the copy.
    pub kept_until: Option<DateTime<Utc>>,
    /// Whether the run is closed (nothing remains).
    pub closed: bool,
    /// Pid of the run's process.
    pub pid: Option<u32>,
}

/// Replays journal entries into the run's state.
#[must_use]
pub fn replay(entries: &[Entry]) -> RunState {
    let mut s = RunState::default();
    for e in entries {
        match e {
            Entry::Started {
                run_id,
                blueprint,
                provider,
                release,
                at,
                expires_at,
                pid,
                ..
            } => {
                s.run_id.clone_from(run_id);
                s.blueprint.clone_from(blueprint);
                s.provider.clone_from(provider);
                s.release.clone_from(release);
                s.started_at = Some(*at);
                s.expires_at = Some(*expires_at);
                s.pid = Some(*pid);
            }
            Entry::Creating { record } | Entry::Created { record } => {
                if let Some(r) = s.live.iter_mut().find(|r| r.address == record.address) {
                    // Keep what the planned record knew; the newer record wins on conflicts.
                    let mut merged = r.data.clone();
                    merged.extend(record.data.clone());
                    *r = ResourceRecord {
                        data: merged,
                        ..record.clone()
                    };
                } else {
                    s.live.push(record.clone());
                }
                s.closed = false;
            }
            Entry::Deleted { address } => s.live.retain(|r| &r.address != address),
            Entry::DeleteFailed { .. } => {}
            Entry::Kept { until } => s.kept_until = Some(*until),
            Entry::Finished {
                status,
                left_behind,
                ..
            } => {
                s.status = Some(status.clone());
                if *left_behind == 0 && s.kept_until.is_none() && s.live.is_empty() {
                    s.closed = true;
                }
            }
            Entry::Closed { .. } => s.closed = true,
        }
    }
    s
}

/// Every run in the state directory with its replayed state, newest first.
///
/// # Errors
/// I/O errors listing the directory.
pub fn list_runs(state: &StateDir) -> Result<Vec<RunState>, JournalError> {
    let dir = state.runs_dir();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(JournalError::Io { path: dir, source }),
    };
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let p = ent.path().join("journal.jsonl");
        if p.exists() {
            let mut s = replay(&read(&p)?);
            if s.run_id.is_empty() {
                s.run_id = ent.file_name().to_string_lossy().into_owned();
            }
            out.push(s);
        }
    }
    out.sort_by(|a, b| {
        b.started_at
            .cmp(&a.started_at)
            .then(b.run_id.cmp(&a.run_id))
    });
    Ok(out)
}

/// Removes the history directories (journal, report, logs) of runs that started before
/// `before` and are closed — nothing of them remains anywhere — and whose process is gone.
/// Runs that left something behind or are kept are never removed: their journals are what
/// `dryrun cleanup` needs. A run whose lock is held at that moment is skipped (a later prune
/// removes it). Returns the run ids removed.
///
/// # Errors
/// I/O errors listing the directory.
pub fn prune(state: &StateDir, before: DateTime<Utc>) -> Result<Vec<String>, JournalError> {
    let mut removed = Vec::new();
    for r in list_runs(state)? {
        let old = r.started_at.is_some_and(|t| t < before);
        if !old || !r.closed || !crate::state::is_run_id(&r.run_id) {
            continue;
        }
        let dir = state.run_dir(&r.run_id);
        if try_lock(&dir).ok().flatten().is_none() {
            continue;
        }
        if fs::remove_dir_all(&dir).is_ok() {
            removed.push(r.run_id);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_only_old_closed_runs() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path());
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let started = |id: &str, when: &str| Entry::Started {
            run_id: id.into(),
            blueprint: "b".into(),
            blueprint_path: "b.yaml".into(),
            provider: "local".into(),
            release: "r".into(),
            at: at(when),
            expires_at: at(when),
            pid: 1,
        };
        let closed = Entry::Closed {
            at: at("2026-01-01T00:00:00Z"),
            by: "run".into(),
        };
        for (id, when, entries) in [
            ("old-closed", "2026-01-01T00:00:00Z", vec![closed.clone()]),
            (
                "old-left",
                "2026-01-01T00:00:00Z",
                vec![Entry::Creating { record: rec("a") }],
            ),
            ("new-closed", "2026-11-29T00:00:00Z", vec![closed]),
        ] {
            let j = Journal::create(&state, id, None).unwrap();
            j.append(&started(id, when)).unwrap();
            for e in entries {
                j.append(&e).unwrap();
            }
        }
        // A run whose lock is held is skipped until a later prune. Here the lock is ours and
        // released, but another test's thread may fork a child in the instant the journal's
        // lock file is open: the child shares the lock until it execs. So prune again, briefly,
        // until it is gone; nothing else may be removed on the way.
        let mut removed = Vec::new();
        for _ in 0..200 {
            removed.extend(prune(&state, at("2026-09-01T00:00:00Z")).unwrap());
            if !removed.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(removed, ["old-closed"]);
        assert!(!state.run_dir("old-closed").exists());
        assert!(
            state.run_dir("old-left").exists(),
            "a run that left something keeps its journal"
        );
        assert!(state.run_dir("new-closed").exists());
    }

    fn rec(a: &str) -> ResourceRecord {
        ResourceRecord {
            address: a.into(),
            kind: crate::blueprint::ResourceKind::Database,
            id: format!("id-{a}"),
            data: Default::default(),
        }
    }

    #[test]
    fn replay_tracks_live_resources_until_deleted() {
        let entries = vec![
            Entry::Creating {
                record: rec("database.db"),
            },
            Entry::Created {
                record: rec("database.db"),
            },
            Entry::Creating {
                record: rec("service.app"),
            },
            Entry::Deleted {
                address: "database.db".into(),
            },
        ];
        let s = replay(&entries);
        assert_eq!(
            s.live
                .iter()
                .map(|r| r.address.as_str())
                .collect::<Vec<_>>(),
            ["service.app"]
        );
        assert!(!s.closed);
    }

    #[test]
    fn torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.jsonl");
        let good = serde_json::to_string(&Entry::Creating {
            record: rec("bucket.b"),
        })
        .unwrap();
        fs::write(&p, format!("{good}\n{{\"event\":\"crea")).unwrap();
        assert_eq!(read(&p).unwrap().len(), 1);
    }

    #[test]
    fn a_locked_run_cannot_be_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let j = Journal::create(&state, "r1", None).unwrap();
        assert!(matches!(
            Journal::reopen(&state, "r1"),
            Err(JournalError::Locked(_))
        ));
        drop(j);
        assert!(Journal::reopen(&state, "r1").is_ok());
    }
}
