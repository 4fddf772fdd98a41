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
//!
//! # Privacy
//! The state directory holds copies of production data, logs and reports: it is created 0700
//! (0711 when dryrun runs as root, so that the unprivileged PostgreSQL user can walk to its
//! clusters — it still cannot list anything), and every file and directory under it is created
//! owner-only from the start ([`create_private_file`], [`create_private_dir`]; `dryrun` also sets
//! its umask to 077, which its children inherit). Nothing is chmod-ed after it was written.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

/// Creates `dir` and its missing parents, each new one with mode 0700.
///
/// # Errors
/// I/O errors.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Creates (or truncates) a file with mode 0600.
///
/// # Errors
/// I/O errors.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Opens a file for appending, creating it with mode 0600.
///
/// # Errors
/// I/O errors.
pub fn append_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Sets the process umask to 077: every file and directory dryrun and its children create is
/// owner-only. Called first thing by the CLI.
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Whether dryrun runs as root (then PostgreSQL clusters run as an unprivileged user who must be
/// able to walk to them).
#[must_use]
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

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

    /// Creates the root if it is missing: 0700, or 0711 when running as root (see the module
    /// doc). Returns a warning when an existing root is readable or writable by others (dryrun
    /// does not change the mode of a directory it did not create).
    ///
    /// # Errors
    /// I/O errors.
    pub fn ensure(&self) -> io::Result<Option<String>> {
        if !self.root.exists() {
            create_private_dir(&self.root)?;
            if running_as_root() {
                std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o711))?;
            }
            return Ok(None);
        }
        let md = std::fs::metadata(&self.root)?;
        let mode = md.mode() & 0o777;
        Ok((mode & 0o066 != 0).then(|| {
            format!(
                "state directory {} is open to other users (mode {mode:o}); dryrun creates everything inside it owner-only, but `chmod 700 {}` keeps even the names private",
                self.root.display(),
                self.root.display()
            )
        }))
    }

    /// Claims a run id: creates its run directory exclusively. `Ok(false)` when it exists
    /// (another run has that id).
    ///
    /// # Errors
    /// I/O errors other than "exists".
    pub fn claim_run(&self, run_id: &str) -> io::Result<bool> {
        create_private_dir(&self.runs_dir())?;
        match DirBuilder::new().mode(0o700).create(self.run_dir(run_id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The state directory's id, created on first use (`STATE/machine-id`, 16 hex digits):
    /// it names where journals, logs and local resources are when several workers share a
    /// control database, and stays the same when a worker restarts on this directory.
    ///
    /// # Errors
    /// I/O errors.
    pub fn machine_id(&self) -> io::Result<String> {
        use rand::RngExt as _;
        use std::io::Write as _;
        let path = self.root.join("machine-id");
        match std::fs::read_to_string(&path) {
            Ok(s) => return Ok(s.trim().to_string()),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
        create_private_dir(&self.root)?;
        // Written whole to a private file first, then linked into place: the link fails if
        // another process got there first, and nobody ever reads a half-written id.
        let id: u64 = rand::rng().random();
        let mut tmp = tempfile::NamedTempFile::new_in(&self.root)?;
        tmp.write_all(format!("{id:016x}\n").as_bytes())?;
        tmp.as_file().sync_all()?;
        match std::fs::hard_link(tmp.path(), &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(std::fs::read_to_string(&path)?.trim().to_string())
    }

    /// History directory of a run. Only for ids that pass [`is_run_id`]: an id read from
    /// outside (a flag, a URL, a shared database row) is checked first.
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

/// Whether `id` can be a run id: letters, digits, `-` and `_`, at most 80 — so it names one
/// directory under `runs/` and nothing else (no `/`, no `..`). Ids made by dryrun always pass;
/// ids arriving from outside (`--run-id`, URLs, rows of a shared control database) are checked
/// with it before they touch the file system.
#[must_use]
pub fn is_run_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 80
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod run_id_tests {
    use super::is_run_id;

    #[test]
    fn run_ids_name_one_directory_and_nothing_else() {
        assert!(is_run_id("shop-20261130-221540-62c213ff"));
        assert!(is_run_id("my_run-1"));
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            "a.b",
            "a\0b",
            "a b",
            "ä",
            &"x".repeat(81),
        ] {
            assert!(!is_run_id(bad), "{bad:?}");
        }
    }
}
