//! The state directory: where runs keep their journals, reports, logs and (for the local
//! provider) every resource they create.
//!
//! ```text
//! STATE/
//!   runs/RUN_ID/journal.jsonl   write-ahead journal (history; kept)
//!   runs/RUN_ID/lock            held (flock) while the run's process lives
//!   runs/RUN_ID/report.json     the final report (history; kept)
//!   runs/RUN_ID/logs/           service and step logs (history; kept)
//!   copies/RUN_ID/              the local provider's resources (removed by teardown)
//! ```
//!
//! Chosen by `--state-dir`, else `DRYRUN_STATE_DIR`, else `$XDG_STATE_HOME/dryrun`, else
//! `~/.local/state/dryrun`.

use std::path::{Path, PathBuf};

/// A state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Uses `root` as given (made absolute, so that child processes with another working
    /// directory see the same paths).
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir().map_or(root.clone(), |d| d.join(&root))
        };
        StateDir { root }
    }

    /// The documented default: `$XDG_STATE_HOME/dryrun` or `~/.local/state/dryrun`.
    #[must_use]
    pub fn default_root() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(x).join("dryrun");
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".local/state/dryrun")
    }

    /// The root.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// History directory of a run.
    #[must_use]
    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.root.join("runs").join(run_id)
    }

    /// All run history directories.
    #[must_use]
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// Where the local provider puts a run's resources.
    #[must_use]
    pub fn work_dir(&self, run_id: &str) -> PathBuf {
        self.root.join("copies").join(run_id)
    }

    /// Parent of all work directories.
    #[must_use]
    pub fn work_root(&self) -> PathBuf {
        self.root.join("copies")
    }
}
