//! `dryrun doctor`: checks the machine (and, with `--provider aws`, the account) for what the
//! given blueprints need, and says how to fix each miss — before a rehearsal finds out halfway.
//!
//! The checks that are the same for every backend (the state directory, its free space) live
//! here; each provider adds its own through [`crate::provider::Provider::doctor`] (the local
//! provider: engines' binaries, backups, the egress firewall; AWS: credentials, snapshots,
//! buckets, a dry-run launch, the route to SSM). Doctor reads only: it writes no file (whether
//! the state directory is writable is asked with `access(2)`) and creates nothing but, on the
//! local provider, a network namespace that dies with its thread.

use std::path::Path;

use serde::Serialize;

use crate::state::StateDir;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// What the blueprint needs is there.
    Pass,
    /// Doctor cannot tell for sure, or the run goes on with less (e.g. the firewall is not
    /// enforced under `firewall: auto`); does not change the exit code.
    Warn,
    /// A rehearsal would fail (or refuse to start) on this.
    Fail,
    /// Not needed by these blueprints, or not checkable here (the reason says which).
    Skip,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked, e.g. `postgres binaries` or `database.db backup`.
    pub check: String,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix a miss (absent on a pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(
        check: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        fix: Option<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            status,
            detail: detail.into(),
            fix,
        }
    }

    /// A pass.
    pub fn pass(check: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding::new(check, Status::Pass, detail, None)
    }

    /// A failure with its fix.
    pub fn fail(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::new(check, Status::Fail, detail, Some(fix.into()))
    }

    /// A warning with what to do about it.
    pub fn warn(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::new(check, Status::Warn, detail, Some(fix.into()))
    }

    /// Not checked, and why.
    pub fn skip(check: impl Into<String>, why: impl Into<String>) -> Finding {
        Finding::new(check, Status::Skip, why, None)
    }
}

/// Everything doctor found (`dryrun doctor --json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Provider checked.
    pub provider: String,
    /// Blueprints checked (their names); empty: the provider's general needs only.
    pub blueprints: Vec<String>,
    /// `true` when no check failed (exit 0).
    pub ok: bool,
    /// Every check, in the order made.
    pub findings: Vec<Finding>,
}

impl Report {
    /// A report over `findings`.
    #[must_use]
    pub fn new(provider: &str, blueprints: Vec<String>, findings: Vec<Finding>) -> Report {
        Report {
            provider: provider.to_string(),
            blueprints,
            ok: findings.iter().all(|f| f.status != Status::Fail),
            findings,
        }
    }

    /// The terminal form: one line per check, its fix indented below a miss, a last line
    /// that counts.
    #[must_use]
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let what = if self.blueprints.is_empty() {
            "this machine".to_string()
        } else {
            format!("blueprint(s) {}", self.blueprints.join(", "))
        };
        let _ = writeln!(s, "doctor: {what} on provider {}\n", self.provider);
        let width = self
            .findings
            .iter()
            .map(|f| f.check.chars().count())
            .max()
            .unwrap_or(0);
        for f in &self.findings {
            let mark = match f.status {
                Status::Pass => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            let _ = writeln!(
                s,
                "{mark} {:width$}  {}",
                f.check,
                crate::sinks::clean(&f.detail, usize::MAX)
            );
            if let Some(fix) = &f.fix {
                let _ = writeln!(
                    s,
                    "     {:width$}  fix: {}",
                    "",
                    crate::sinks::clean(fix, usize::MAX)
                );
            }
        }
        let count = |st: Status| self.findings.iter().filter(|f| f.status == st).count();
        let _ = writeln!(
            s,
            "\n{} passed, {} failed, {} warnings, {} skipped: {}",
            count(Status::Pass),
            count(Status::Fail),
            count(Status::Warn),
            count(Status::Skip),
            if self.ok {
                "ready to rehearse"
            } else {
                "fix the failures above first"
            }
        );
        s
    }
}

/// The nearest existing ancestor of the state directory (itself when it exists): it decides
/// whether a missing directory can be made, and whose file system the copies go on.
fn nearest_existing(root: &Path) -> &Path {
    root.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
}

/// Whether this process may create entries in `dir` (`access(2)`, which writes nothing: a
/// probe file would follow a planted symlink in a directory others can write).
fn can_write(dir: &Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| e.desc().to_string())
}

/// The state directory: where it is, that dryrun can write there, and that others cannot.
/// Writes nothing.
#[must_use]
pub fn state_dir_check(state: &StateDir) -> Finding {
    use std::os::unix::fs::MetadataExt as _;
    let root = state.root();
    let check = "state directory";
    let existing = nearest_existing(root);
    if existing != root {
        return match can_write(existing) {
            Ok(()) => Finding::pass(
                check,
                format!(
                    "{} does not exist yet; the first run creates it owner-only ({})",
                    root.display(),
                    if crate::state::running_as_root() {
                        "0711: PostgreSQL's user passes through"
                    } else {
                        "0700"
                    }
                ),
            ),
            Err(e) => Finding::fail(
                check,
                format!(
                    "{} does not exist and cannot be created: {} is not writable ({e})",
                    root.display(),
                    existing.display()
                ),
                "create it for the user that runs dryrun (`install -d -m 700 DIR`), or point DRYRUN_STATE_DIR / --state-dir elsewhere",
            ),
        };
    }
    let md = match std::fs::metadata(root) {
        Ok(md) => md,
        Err(e) => {
            return Finding::fail(
                check,
                format!("cannot read {}: {e}", root.display()),
                "point DRYRUN_STATE_DIR / --state-dir at a directory you own",
            );
        }
    };
    if !md.is_dir() {
        return Finding::fail(
            check,
            format!("{} is not a directory", root.display()),
            "point DRYRUN_STATE_DIR / --state-dir at a directory",
        );
    }
    let mode = md.mode() & 0o777;
    let uid = nix::unistd::geteuid().as_raw();
    if md.uid() != uid {
        return Finding::fail(
            check,
            format!(
                "{} belongs to uid {}, not to the user running dryrun (uid {uid}): that user can read the copies of production inside",
                root.display(),
                md.uid()
            ),
            format!(
                "`chown -R {uid} {}` or use another --state-dir",
                root.display()
            ),
        );
    }
    if mode & 0o022 != 0 {
        return Finding::fail(
            check,
            format!(
                "{} is writable by other users (mode {mode:o}): they could swap what dryrun restores or runs",
                root.display()
            ),
            format!("chmod 700 {}", root.display()),
        );
    }
    if let Err(e) = can_write(root) {
        return Finding::fail(
            check,
            format!("{} is not writable: {e}", root.display()),
            "make it writable by its owner (`chmod u+rwx`), or use another --state-dir",
        );
    }
    if mode & 0o044 != 0 {
        // As root, PostgreSQL's own user must pass through (0711, as dryrun makes it).
        let want = if crate::state::running_as_root() {
            "711"
        } else {
            "700"
        };
        return Finding::warn(
            check,
            format!(
                "{} is readable by other users (mode {mode:o}); what dryrun creates inside is owner-only, but the names of runs show",
                root.display()
            ),
            format!("chmod {want} {}", root.display()),
        );
    }
    Finding::pass(
        check,
        format!("{} (mode {mode:o}, yours, writable)", root.display()),
    )
}

/// Free space on the state directory's file system against `needed` bytes (what the copies
/// take; `None` when unknown: only reported).
#[must_use]
pub fn free_space(state: &StateDir, needed: Option<u64>) -> Finding {
    free_space_at(nearest_existing(state.root()), needed)
}

fn free_space_at(dir: &Path, needed: Option<u64>) -> Finding {
    let check = "free space";
    let st = match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => s,
        Err(e) => return Finding::skip(check, format!("cannot read {}: {e}", dir.display())),
    };
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    let human = crate::report::human_bytes;
    match needed {
        // A copy of each backup, and room for the release to grow it: twice what they take.
        Some(n) if free < n.saturating_mul(2) => Finding::fail(
            check,
            format!(
                "{} free under {}, the copies take {} (doctor wants twice that)",
                human(free),
                dir.display(),
                human(n)
            ),
            "free space there (`dryrun cache prune`, `dryrun prune`) or use a larger --state-dir",
        ),
        Some(n) => Finding::pass(
            check,
            format!(
                "{} free under {}; the copies take {}",
                human(free),
                dir.display(),
                human(n)
            ),
        ),
        None => Finding::pass(
            check,
            format!("{} free under {}", human(free), dir.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_state_dir_others_can_write_fails_and_names_the_chmod() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("state");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let f = state_dir_check(&StateDir::new(&root));
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.fix.as_deref().unwrap().contains("chmod 700"), "{f:?}");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let f = state_dir_check(&StateDir::new(&root));
        assert_eq!(f.status, Status::Pass, "{f:?}");
        // A missing one that can be made passes; nothing is left behind by the probe.
        let f = state_dir_check(&StateDir::new(root.join("a/b")));
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn free_space_below_twice_the_copies_fails() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(
            free_space_at(t.path(), Some(u64::MAX / 4)).status,
            Status::Fail
        );
        assert_eq!(free_space_at(t.path(), Some(1)).status, Status::Pass);
    }

    #[test]
    fn the_report_fails_only_on_a_failure_and_prints_each_fix() {
        let r = Report::new(
            "local",
            vec!["shop".into()],
            vec![
                Finding::pass("a", "fine"),
                Finding::warn("b", "unsure", "look"),
                Finding::skip("c", "not needed"),
            ],
        );
        assert!(r.ok);
        let mut f = r.findings;
        f.push(Finding::fail("d", "bro\x1b[2Jken", "mend it"));
        let r = Report::new("local", vec![], f);
        assert!(!r.ok);
        let text = r.to_text();
        assert!(text.contains("FAIL d"), "{text}");
        assert!(text.contains("fix: mend it"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            text.contains("1 passed, 1 failed, 1 warnings, 1 skipped"),
            "{text}"
        );
    }
}
