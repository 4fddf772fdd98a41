//! report.json: the machine-readable report, whose field names are the contract in PRODUCT.md.
//!
//! This module also owns [`ReportError`] and the atomic file write that every file view
//! (report.json, junit.xml, report.md) goes through, so that a reader never sees half a report.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::RunReport;

/// File name of the JSON report inside the report directory.
pub const FILE_NAME: &str = "report.json";

/// Writing a report file failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The report directory does not exist and could not be created.
    #[error("cannot create report directory {path}")]
    CreateDir {
        /// Directory that was to be created.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The temporary file next to the report could not be created, written or flushed.
    #[error("cannot write report {path}")]
    Write {
        /// Report file that was being written (through a temporary file beside it).
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The finished temporary file could not be renamed over the report.
    #[error("cannot move {from} into place as {path}")]
    Rename {
        /// Temporary file holding the finished report (removed again on this error).
        from: PathBuf,
        /// Report file that was to be replaced.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// The report as pretty-printed JSON with a trailing newline.
///
/// # Panics
/// Never in practice: a [`RunReport`] holds only strings, numbers, enums and timestamps.
#[must_use]
pub fn to_json(report: &RunReport) -> String {
    let mut json = serde_json::to_string_pretty(report).expect("a RunReport always serializes");
    json.push('\n');
    json
}

/// Writes `report.json` into `dir` (created if missing) and returns its path.
///
/// # Guarantees
/// The file is replaced atomically: readers see the previous report or the new one, never a
/// partial file.
///
/// # Errors
/// [`ReportError`] when the directory cannot be created or the file cannot be written or
/// renamed into place.
pub fn write(report: &RunReport, dir: &Path) -> Result<PathBuf, ReportError> {
    write_atomic(dir, FILE_NAME, to_json(report).as_bytes())
}

/// Writes `contents` to `dir/name` through a temporary file in `dir` and a rename.
///
/// Creates `dir` when missing. The temporary file is removed again if anything fails.
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &[u8],
) -> Result<PathBuf, ReportError> {
    crate::journal::blocking(|| write_atomic_blocking(dir, name, contents))
}

fn write_atomic_blocking(dir: &Path, name: &str, contents: &[u8]) -> Result<PathBuf, ReportError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);

    crate::state::create_private_dir(dir).map_err(|source| ReportError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(name);
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{unique}.tmp", std::process::id()));

    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        });
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(ReportError::Write { path, source });
    }
    if let Err(source) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(ReportError::Rename {
            from: tmp,
            path,
            source,
        });
    }
    // Make the rename itself durable where the platform allows; failure here loses nothing
    // that the rename has not already made visible.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Status;
    use crate::report::terminal::testutil::{sample_report, scratch_dir};

    #[test]
    fn json_round_trips_into_the_same_report() {
        for status in [Status::Passed, Status::Failed, Status::Error] {
            let report = sample_report(status);
            let back: RunReport = serde_json::from_str(&to_json(&report)).unwrap();
            assert_eq!(back, report);
        }
    }

    #[test]
    fn json_uses_the_product_contract_field_names() {
        let report = sample_report(Status::Failed);
        let value: serde_json::Value = serde_json::from_str(&to_json(&report)).unwrap();

        assert_eq!(value["run_id"], "dr-20261122-0300-a1b2");
        assert_eq!(value["blueprint"], "shop");
        assert_eq!(value["release"]["ref"], "./dist/shop-2.0.0.tar.gz");
        assert_eq!(value["release"]["version"], "2.0.0");
        assert_eq!(value["provider"], "local");
        assert_eq!(value["trigger"], "cli");
        assert_eq!(value["status"], "failed");
        assert!(value["started_at"].is_string());
        assert!(value["finished_at"].is_string());
        assert_eq!(value["backup"]["id"], "shop-db-2026-11-21T0300Z");
        assert!(value["backup"]["taken_at"].is_string());
        assert_eq!(value["backup"]["age_seconds"], 93_600);
        assert_eq!(value["stages"][0]["name"], "compile");
        assert_eq!(value["stages"][0]["status"], "passed");
        assert!(value["stages"][0]["duration_ms"].is_u64());
        assert!(value["checks"][0]["duration_ms"].is_u64());
        assert_eq!(value["resources"][0]["address"], "database.db");
        assert_eq!(value["resources"][0]["destroyed"], true);
        assert!(value["left_behind"].as_array().unwrap().is_empty());
    }

    #[test]
    fn json_omits_absent_optional_fields() {
        let mut report = sample_report(Status::Passed);
        report.release.git_sha = None;
        let value: serde_json::Value = serde_json::from_str(&to_json(&report)).unwrap();
        assert!(value["release"].get("git_sha").is_none());
        assert!(value["stages"][0].get("message").is_none());
    }

    #[test]
    fn json_ends_with_a_newline() {
        assert!(to_json(&sample_report(Status::Passed)).ends_with("}\n"));
    }

    #[test]
    fn write_replaces_report_json_and_leaves_no_temp_file() {
        let dir = scratch_dir("json-write");
        let first = sample_report(Status::Failed);
        write(&first, &dir).unwrap();
        let second = sample_report(Status::Passed);
        let path = write(&second, &dir).unwrap();

        assert_eq!(path, dir.join("report.json"));
        let back: RunReport = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, second);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["report.json"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_creates_a_missing_report_dir() {
        let dir = scratch_dir("json-nested").join("a/b");
        let path = write(&sample_report(Status::Passed), &dir).unwrap();
        assert!(path.is_file());
        fs::remove_dir_all(dir.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn write_error_names_the_path_and_keeps_the_io_source() {
        let dir = scratch_dir("json-blocked");
        fs::create_dir_all(&dir).unwrap();
        let blocker = dir.join("not-a-dir");
        fs::write(&blocker, "").unwrap();

        let err = write(&sample_report(Status::Passed), &blocker.join("reports")).unwrap_err();
        assert!(matches!(err, ReportError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        fs::remove_dir_all(&dir).unwrap();
    }
}
