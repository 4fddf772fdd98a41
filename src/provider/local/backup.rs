//! The local backup store.
//!
//! ```text
//! BACKUPS/SOURCE/BACKUP_ID/backup.json   metadata (below)
//! BACKUPS/SOURCE/BACKUP_ID/FILE          the data: a SQLite file or a pg_dump custom-format dump
//! ```
//! `backup.json`: `{"id", "source", "engine": "sqlite"|"postgres", "taken_at": RFC 3339,
//! "file", "size_bytes", "sha256", "complete": true}`. A backup with `complete: false` (still
//! being written) or without metadata is never chosen. "Latest" is the newest complete backup by
//! `taken_at`.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::blueprint::diag::did_you_mean;
use crate::provider::{BackupInfo, BackupPick, ProviderError};

/// Metadata of one backup.
#[derive(Debug, Clone, Deserialize)]
pub struct Meta {
    /// Id (the directory name).
    pub id: String,
    /// Production source.
    pub source: String,
    /// `sqlite` or `postgres`.
    pub engine: String,
    /// When production was captured.
    pub taken_at: DateTime<Utc>,
    /// Data file name inside the backup directory.
    #[serde(default)]
    pub file: String,
    /// Size of the data file.
    pub size_bytes: Option<u64>,
    /// Hex SHA-256 of the data file.
    pub sha256: Option<String>,
    /// Whether the backup finished.
    pub complete: bool,
}

/// Lists the complete backups of `source`, newest first.
///
/// # Errors
/// [`ProviderError::NoBackup`] when the store or source directory does not exist.
pub fn list(store: &Path, source: &str) -> Result<Vec<(Meta, PathBuf)>, ProviderError> {
    let dir = store.join(source);
    let rd = fs::read_dir(&dir).map_err(|e| {
        ProviderError::NoBackup(format!(
            "no backups of `{source}`: cannot read {} ({e}); the local backup store keeps one directory per source (docs/providers/local.md)",
            dir.display()
        ))
    })?;
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let mpath = ent.path().join("backup.json");
        let Ok(text) = fs::read_to_string(&mpath) else {
            continue;
        };
        let Ok(meta) = serde_json::from_str::<Meta>(&text) else {
            continue;
        };
        // The data file is a name inside the backup's own directory: backup.json is a file
        // anyone who writes the store can shape, and `../..` or an absolute path would make
        // a restore (or `dryrun doctor`) read whatever it names.
        if !is_plain_file_name(&meta.file) {
            tracing::warn!(
                "{}: \"file\" must name a file in the backup's directory; this backup is skipped",
                mpath.display()
            );
            continue;
        }
        if meta.complete {
            out.push((meta, ent.path()));
        }
    }
    out.sort_by(|a, b| b.0.taken_at.cmp(&a.0.taken_at).then(b.0.id.cmp(&a.0.id)));
    Ok(out)
}

/// A single file name: not empty, no `/`, not `.` or `..`, no NUL.
fn is_plain_file_name(f: &str) -> bool {
    !f.is_empty() && f != "." && f != ".." && !f.contains(['/', '\0'])
}

/// Picks a backup of `source`.
///
/// # Errors
/// [`ProviderError::NoBackup`] naming what exists when nothing matches.
pub fn pick(
    store: &Path,
    source: &str,
    engine: &str,
    pick: &BackupPick,
) -> Result<BackupInfo, ProviderError> {
    let all: Vec<_> = list(store, source)?
        .into_iter()
        .filter(|(m, _)| m.engine == engine)
        .collect();
    let ids: Vec<&str> = all.iter().map(|(m, _)| m.id.as_str()).collect();
    let found = match pick {
        BackupPick::Latest => all.first(),
        BackupPick::Id(id) => all.iter().find(|(m, _)| &m.id == id),
        BackupPick::Before(t) => all.iter().find(|(m, _)| m.taken_at <= *t),
    };
    let Some((m, dir)) = found else {
        let what = match pick {
            BackupPick::Latest => "no complete backup".to_string(),
            BackupPick::Id(id) => {
                let hint = did_you_mean(id, ids.iter().copied())
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                format!("no complete backup with id `{id}`{hint}")
            }
            BackupPick::Before(t) => {
                format!("no complete backup taken at or before {}", t.to_rfc3339())
            }
        };
        let avail = if ids.is_empty() {
            "none".to_string()
        } else {
            ids.join(", ")
        };
        return Err(ProviderError::NoBackup(format!(
            "{what} of `{source}` ({engine}) in {}; available: {avail}",
            store.join(source).display()
        )));
    };
    Ok(BackupInfo {
        id: m.id.clone(),
        source: m.source.clone(),
        taken_at: m.taken_at,
        size_bytes: m.size_bytes,
        location: dir.join(&m.file).display().to_string(),
    })
}

/// The SHA-256 the backup's metadata records, if any: what a golden copy of it is keyed by.
#[must_use]
pub fn recorded_sha256(backup: &BackupInfo) -> Option<String> {
    let meta = Path::new(&backup.location).parent()?.join("backup.json");
    let meta: Meta = serde_json::from_str(&fs::read_to_string(meta).ok()?).ok()?;
    meta.sha256
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|s| s.to_ascii_lowercase())
}

/// Copies a backup file to `dest`, verifying its SHA-256 against the metadata on the way.
///
/// # Errors
/// [`ProviderError::BadBackup`] on a checksum or size mismatch; I/O errors otherwise.
pub fn copy_verified(backup: &BackupInfo, dest: &Path) -> Result<u64, ProviderError> {
    let src = Path::new(&backup.location);
    let meta_path = src
        .parent()
        .map(|p| p.join("backup.json"))
        .unwrap_or_default();
    let meta: Option<Meta> = fs::read_to_string(&meta_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut input =
        fs::File::open(src).map_err(ProviderError::io(format!("open backup {}", src.display())))?;
    let mut output = crate::state::create_private_file(dest)
        .map_err(ProviderError::io(format!("create {}", dest.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .map_err(ProviderError::io(format!("read backup {}", src.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(ProviderError::io(format!("write {}", dest.display())))?;
        total += n as u64;
    }
    output
        .sync_all()
        .map_err(ProviderError::io(format!("sync {}", dest.display())))?;
    if let Some(meta) = meta {
        if let Some(size) = meta.size_bytes
            && size != total
        {
            return Err(ProviderError::BadBackup(format!(
                "backup {} is damaged: {total} bytes, metadata says {size}; production's backups need attention",
                backup.id
            )));
        }
        if let Some(want) = meta.sha256 {
            let got = hex::encode(hasher.finalize());
            if !got.eq_ignore_ascii_case(&want) {
                return Err(ProviderError::BadBackup(format!(
                    "backup {} is damaged: sha256 {got}, metadata says {want}; production's backups need attention",
                    backup.id
                )));
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(store: &Path, id: &str, at: &str, complete: bool, data: &[u8]) {
        let d = store.join("src").join(id);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("f.db"), data).unwrap();
        let sha = hex::encode(Sha256::digest(data));
        fs::write(
            d.join("backup.json"),
            format!(r#"{{"id":"{id}","source":"src","engine":"sqlite","taken_at":"{at}","file":"f.db","size_bytes":{},"sha256":"{sha}","complete":{complete}}}"#, data.len()),
        )
        .unwrap();
    }

    #[test]
    fn a_data_file_outside_the_backups_directory_is_never_chosen() {
        let t = tempfile::tempdir().unwrap();
        mk(t.path(), "b1", "2026-11-20T03:00:00Z", true, b"one");
        let outside = t.path().join("secret");
        fs::write(&outside, b"not a backup").unwrap();
        for (id, file) in [
            ("b2", "../../secret"),
            ("b3", outside.to_str().unwrap()),
            ("b4", ".."),
            ("b5", ""),
        ] {
            let d = t.path().join("src").join(id);
            fs::create_dir_all(&d).unwrap();
            let meta = serde_json::json!({"id": id, "source": "src", "engine": "sqlite",
                "taken_at": "2026-11-25T03:00:00Z", "file": file, "complete": true});
            fs::write(d.join("backup.json"), meta.to_string()).unwrap();
        }
        let b = pick(t.path(), "src", "sqlite", &BackupPick::Latest).unwrap();
        assert_eq!(b.id, "b1");
        assert!(b.location.ends_with("src/b1/f.db"), "{}", b.location);
        assert!(pick(t.path(), "src", "sqlite", &BackupPick::Id("b2".into())).is_err());
    }

    #[test]
    fn latest_skips_incomplete_backups() {
        let t = tempfile::tempdir().unwrap();
        mk(t.path(), "b1", "2026-11-20T03:00:00Z", true, b"one");
        mk(t.path(), "b2", "2026-11-21T03:00:00Z", true, b"two");
        mk(t.path(), "b3", "2026-11-22T03:00:00Z", false, b"");
        assert_eq!(
            pick(t.path(), "src", "sqlite", &BackupPick::Latest)
                .unwrap()
                .id,
            "b2"
        );
        assert_eq!(
            pick(t.path(), "src", "sqlite", &BackupPick::Id("b1".into()))
                .unwrap()
                .id,
            "b1"
        );
        let before = "2026-11-20T12:00:00Z".parse().unwrap();
        assert_eq!(
            pick(t.path(), "src", "sqlite", &BackupPick::Before(before))
                .unwrap()
                .id,
            "b1"
        );
        let err = pick(t.path(), "src", "sqlite", &BackupPick::Id("b4".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("available: b2, b1"), "{err}");
    }

    #[test]
    fn only_a_well_formed_recorded_checksum_gives_a_backup_an_identity() {
        let t = tempfile::tempdir().unwrap();
        mk(t.path(), "b1", "2026-11-20T03:00:00Z", true, b"data");
        let b = pick(t.path(), "src", "sqlite", &BackupPick::Latest).unwrap();
        assert_eq!(
            recorded_sha256(&b).as_deref(),
            Some(hex::encode(Sha256::digest(b"data")).as_str())
        );
        let meta = t.path().join("src/b1/backup.json");
        let text = fs::read_to_string(&meta).unwrap();
        let sha = hex::encode(Sha256::digest(b"data"));
        // Hostile or broken values (a path, a shell word, too long, upper case is folded):
        // only 64 hex digits count; anything else means no golden copy.
        for (bad, want) in [
            ("../../../etc/passwd".to_string(), None),
            ("$(touch /tmp/x)".to_string(), None),
            (format!("{sha}00"), None),
            (sha.to_ascii_uppercase(), Some(sha.clone())),
        ] {
            fs::write(&meta, text.replace(&sha, &bad)).unwrap();
            assert_eq!(recorded_sha256(&b), want, "{bad}");
        }
        fs::write(&meta, text.replace(&format!(r#""sha256":"{sha}","#), "")).unwrap();
        assert_eq!(recorded_sha256(&b), None);
    }

    #[test]
    fn damaged_backup_is_refused() {
        let t = tempfile::tempdir().unwrap();
        mk(t.path(), "b1", "2026-11-20T03:00:00Z", true, b"good data");
        let b = pick(t.path(), "src", "sqlite", &BackupPick::Latest).unwrap();
        fs::write(&b.location, b"evil data").unwrap();
        let err = copy_verified(&b, &t.path().join("out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged"), "{err}");
    }
}
