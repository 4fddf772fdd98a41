//! The candidate release: a directory or a `.tar.gz` with a manifest, `dryrun-release.yaml`.
//!
//! ```yaml
//! version: "2.0.0"          # shown in every report
//! git_sha: 1a2b3c4          # optional
//! install:                  # run in order with `sh -c`, in the unpacked release directory
//!   - name: migrate
//!     run: ./bin/migrate
//!     timeout: 10m          # default 10m
//! start: ./bin/server --port "$PORT"   # optional: a release with no start is install-only
//! health:                   # optional, only with start
//!   http: /healthz          # GET on the service's loopback port must answer 2xx
//!   timeout: 30s
//! ```
//! A tarball may hold the files at its top or under one top-level directory.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::read::GzDecoder;
use serde::Deserialize;

/// Manifest file name.
pub const MANIFEST: &str = "dryrun-release.yaml";

/// Release errors.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// Nothing at that path.
    #[error("release {0} not found: give a directory or a .tar.gz that contains {MANIFEST}")]
    NotFound(String),
    /// The manifest is missing.
    #[error("release {reference} has no {MANIFEST}; add one (see docs/releases.md)")]
    NoManifest {
        /// Release reference.
        reference: String,
    },
    /// The manifest does not parse.
    #[error("{file}:{line}:{col}: {message}")]
    BadManifest {
        /// Manifest path (inside the tarball for tarballs).
        file: String,
        /// Line.
        line: usize,
        /// Column.
        col: usize,
        /// What is wrong.
        message: String,
    },
    /// Reading or unpacking failed.
    #[error("release {reference}: {source}")]
    Io {
        /// Release reference.
        reference: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
}

/// An install step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Name for reports.
    pub name: String,
    /// `sh -c` command line.
    pub run: String,
    /// Time limit.
    pub timeout: Duration,
}

/// How to tell the service is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// HTTP path to GET on the service's port.
    pub http: String,
    /// How long to wait for a 2xx.
    pub timeout: Duration,
}

/// The parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Release version.
    pub version: String,
    /// Git commit, if given.
    pub git_sha: Option<String>,
    /// Install steps.
    pub install: Vec<Step>,
    /// Start command.
    pub start: Option<String>,
    /// Health check.
    pub health: Option<Health>,
}

/// Where the release's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory.
    Dir(PathBuf),
    /// A gzipped tarball.
    Tarball(PathBuf),
}

/// A loaded release.
#[derive(Debug, Clone)]
pub struct Release {
    /// What the user passed.
    pub reference: String,
    /// Where its files are.
    pub source: Source,
    /// Its manifest.
    pub manifest: Manifest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    version: String,
    git_sha: Option<String>,
    #[serde(default)]
    install: Vec<RawStep>,
    start: Option<String>,
    health: Option<RawHealth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    run: String,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    http: String,
    timeout: Option<String>,
}

impl Release {
    /// No release: what `dryrun scan` runs with (it installs nothing).
    #[must_use]
    pub fn none() -> Release {
        Release {
            reference: "(none: dryrun scan)".into(),
            source: Source::Dir(PathBuf::new()),
            manifest: Manifest {
                version: "none".into(),
                git_sha: None,
                install: Vec::new(),
                start: None,
                health: None,
            },
        }
    }

    /// Loads a release from a directory or `.tar.gz` path.
    ///
    /// # Errors
    /// See [`ReleaseError`].
    pub fn load(reference: &str) -> Result<Release, ReleaseError> {
        let path = PathBuf::from(reference);
        let io = |source| ReleaseError::Io {
            reference: reference.to_string(),
            source,
        };
        if path.is_dir() {
            let mpath = path.join(MANIFEST);
            let text = match fs::read_to_string(&mpath) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ReleaseError::NoManifest {
                        reference: reference.to_string(),
                    });
                }
                Err(e) => return Err(io(e)),
            };
            let manifest = parse_manifest(&mpath.display().to_string(), &text)?;
            let dir = fs::canonicalize(&path).map_err(io)?;
            return Ok(Release {
                reference: reference.to_string(),
                source: Source::Dir(dir),
                manifest,
            });
        }
        if path.is_file() {
            let text = read_manifest_from_tarball(&path).map_err(io)?;
            let Some(text) = text else {
                return Err(ReleaseError::NoManifest {
                    reference: reference.to_string(),
                });
            };
            let manifest = parse_manifest(&format!("{reference}!{MANIFEST}"), &text)?;
            let file = fs::canonicalize(&path).map_err(io)?;
            return Ok(Release {
                reference: reference.to_string(),
                source: Source::Tarball(file),
                manifest,
            });
        }
        Err(ReleaseError::NotFound(reference.to_string()))
    }

    /// Loads a release tarball that a provider fetched (e.g. from `s3://BUCKET/KEY`) into
    /// `file`; `reference` stays what the user passed, so reports and the provider see it.
    ///
    /// # Errors
    /// See [`ReleaseError`].
    pub fn load_fetched(reference: &str, file: &Path) -> Result<Release, ReleaseError> {
        let mut r = Release::load(&file.display().to_string())?;
        r.reference = reference.to_string();
        Ok(r)
    }

    /// Copies or unpacks the release's files into `dest` (created if missing).
    ///
    /// # Errors
    /// I/O errors.
    pub fn unpack_into(&self, dest: &Path) -> Result<(), ReleaseError> {
        let io = |source| ReleaseError::Io {
            reference: self.reference.clone(),
            source,
        };
        crate::state::create_private_dir(dest).map_err(io)?;
        match &self.source {
            Source::Dir(dir) => copy_dir(dir, dest).map_err(io),
            Source::Tarball(file) => {
                // tar's unpack refuses entries that would escape the staging directory.
                let staging = dest.join(".unpack");
                let mut ar = tar::Archive::new(GzDecoder::new(File::open(file).map_err(io)?));
                // Owner-only, whatever modes the tarball carries (execute bits are kept).
                ar.set_mask(0o077);
                ar.unpack(&staging).map_err(io)?;
                let root = match tarball_prefix(file).map_err(io)? {
                    Some(p) => staging.join(p),
                    None => staging.clone(),
                };
                for ent in fs::read_dir(&root).map_err(io)? {
                    let ent = ent.map_err(io)?;
                    if ent.path() == staging {
                        continue;
                    }
                    fs::rename(ent.path(), dest.join(ent.file_name())).map_err(io)?;
                }
                fs::remove_dir_all(&staging).map_err(io)
            }
        }
    }
}

fn parse_manifest(file: &str, text: &str) -> Result<Manifest, ReleaseError> {
    // At the mark, or at the top of the file when there is none.
    let bad = |at: Option<&marked_yaml::Marker>, message: String| ReleaseError::BadManifest {
        file: file.to_string(),
        line: at.map_or(1, marked_yaml::Marker::line),
        col: at.map_or(1, marked_yaml::Marker::column),
        message,
    };
    let node = marked_yaml::parse_yaml(0, text).map_err(|e| {
        let (at, msg) = crate::blueprint::compile::load_error(&e);
        bad(at.as_ref(), format!("not valid YAML: {msg}"))
    })?;
    let raw: RawManifest = marked_yaml::from_node(&node).map_err(|e| {
        let mut m = e.start_mark();
        let msg = match &*e {
            marked_yaml::Error::UnknownFieldError(field, expected, _) => {
                m = crate::blueprint::diag::find_key(&node, field).or(m);
                let hint = crate::blueprint::diag::did_you_mean(field, expected.iter().copied())
                    .map_or_else(
                        || format!("allowed: {}", expected.join(", ")),
                        |s| format!("did you mean `{s}`?"),
                    );
                format!("unknown key `{field}`; {hint}")
            }
            other => format!("{other}"),
        };
        bad(m.as_ref(), msg)
    })?;
    // The version, the commit and the step names are shown in terminals, pages and reports as
    // they are: a release that puts escape sequences (or line breaks) in them is refused here,
    // at the line, instead of being filtered everywhere it is shown.
    let plain = |value: &str, at: Option<&marked_yaml::Node>, what: &str| {
        if value
            .chars()
            .any(crate::report::terminal::acts_on_a_terminal)
        {
            return Err(bad(
                at.and_then(|n| n.span().start()),
                format!(
                    "{what} contains control characters (an escape sequence or a line break); \
                     use plain text"
                ),
            ));
        }
        Ok(())
    };
    let top = node.as_mapping();
    plain(
        &raw.version,
        top.and_then(|m| m.get_node("version")),
        "`version`",
    )?;
    if let Some(sha) = &raw.git_sha {
        plain(sha, top.and_then(|m| m.get_node("git_sha")), "`git_sha`")?;
    }
    let steps = top
        .and_then(|m| m.get_node("install"))
        .and_then(|n| n.as_sequence());
    for (i, s) in raw.install.iter().enumerate() {
        let at = steps
            .and_then(|seq| seq.get(i))
            .and_then(|n| n.as_mapping())
            .and_then(|m| m.get_node("name"));
        plain(&s.name, at, &format!("install step {}'s `name`", i + 1))?;
    }
    let dur = |s: Option<&str>, d: Duration| -> Result<Duration, ReleaseError> {
        s.map_or(Ok(d), |s| {
            humantime::parse_duration(s)
                .map_err(|e| bad(None, format!("`{s}` is not a duration: {e}")))
        })
    };
    let mut install = Vec::new();
    for s in raw.install {
        install.push(Step {
            timeout: dur(s.timeout.as_deref(), Duration::from_secs(600))?,
            name: s.name,
            run: s.run,
        });
    }
    let health = match raw.health {
        Some(h) => Some(Health {
            timeout: dur(h.timeout.as_deref(), Duration::from_secs(30))?,
            http: h.http,
        }),
        None => None,
    };
    if health.is_some() && raw.start.is_none() {
        return Err(bad(None, "`health` needs a `start` command".into()));
    }
    Ok(Manifest {
        version: raw.version,
        git_sha: raw.git_sha,
        install,
        start: raw.start,
        health,
    })
}

fn read_manifest_from_tarball(file: &Path) -> std::io::Result<Option<String>> {
    let mut ar = tar::Archive::new(GzDecoder::new(File::open(file)?));
    for entry in ar.entries()? {
        let mut entry = entry?;
        let p = entry.path()?.into_owned();
        if p.file_name().is_some_and(|n| n == MANIFEST) && p.components().count() <= 2 {
            let mut s = String::new();
            entry.read_to_string(&mut s)?;
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// The single top-level directory of a tarball whose manifest sits in it, if any.
fn tarball_prefix(file: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut ar = tar::Archive::new(GzDecoder::new(File::open(file)?));
    for entry in ar.entries()? {
        let entry = entry?;
        let p = entry.path()?.into_owned();
        if p.file_name().is_some_and(|n| n == MANIFEST) {
            let comps: Vec<_> = p.components().collect();
            if comps.len() == 2 {
                return Ok(Some(PathBuf::from(comps[0].as_os_str())));
            }
            return Ok(None);
        }
    }
    Ok(None)
}

/// Recursive copy that keeps symlinks and the owner's permission bits (a directory release may
/// carry scripts) and makes everything owner-only from the moment it exists: directories 0700,
/// files the source's owner bits (0600, 0700 for executables). A copy of production data must
/// not be readable by other users, whatever the source's modes were.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    crate::state::create_private_dir(to)?;
    for ent in fs::read_dir(from)? {
        let ent = ent?;
        let ft = ent.file_type()?;
        let src = ent.path();
        let dst = to.join(ent.file_name());
        if ft.is_dir() {
            copy_dir(&src, &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else {
            let mode = ent.metadata()?.permissions().mode() & 0o700 | 0o600;
            let mut input = File::open(&src)?;
            let mut output = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&dst)?;
            std::io::copy(&mut input, &mut output)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_errors_name_file_line_and_column() {
        let err =
            parse_manifest("r/dryrun-release.yaml", "version: '1'\ninstal: []\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("r/dryrun-release.yaml:2:1:"), "{msg}");
        assert!(msg.contains("instal"), "{msg}");
    }

    #[test]
    fn escape_sequences_and_line_breaks_in_shown_fields_are_refused_at_their_line() {
        let err = parse_manifest("m.yaml", "version: \"1.0\\e]0;pwned\\a\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("m.yaml:1:10: `version` contains control characters"),
            "{msg}"
        );
        assert!(!msg.contains('\x1b'), "{msg:?}");
        let err = parse_manifest(
            "m.yaml",
            "version: '1'\ninstall:\n  - name: ok\n    run: 'true'\n  - name: \"a\\nb\"\n    run: 'true'\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("m.yaml:5:11: install step 2's `name` contains control characters"),
            "{msg}"
        );
        let err = parse_manifest("m.yaml", "version: '1'\ngit_sha: \"ab\\u202ecd\"\n").unwrap_err();
        assert!(err.to_string().starts_with("m.yaml:2:"), "{err}");
        // Plain text (Unicode included) is fine.
        assert!(parse_manifest("m.yaml", "version: '1.0 — été'\n").is_ok());
    }

    #[test]
    fn tarball_with_top_level_directory_unpacks_flat() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("rel-1.0");
        fs::create_dir_all(src.join("migrations")).unwrap();
        fs::write(
            src.join(MANIFEST),
            "version: \"1.0\"\ninstall:\n  - name: a\n    run: 'true'\n",
        )
        .unwrap();
        fs::write(src.join("migrations/1.sql"), "select 1;").unwrap();
        let tgz = dir.path().join("rel.tar.gz");
        let enc =
            flate2::write::GzEncoder::new(File::create(&tgz).unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(enc);
        b.append_dir_all("rel-1.0", &src).unwrap();
        b.into_inner().unwrap().finish().unwrap();
        let rel = Release::load(tgz.to_str().unwrap()).unwrap();
        assert_eq!(rel.manifest.version, "1.0");
        let out = dir.path().join("out");
        rel.unpack_into(&out).unwrap();
        assert!(out.join(MANIFEST).is_file());
        assert!(out.join("migrations/1.sql").is_file());
    }
}
