//! References that arrive from outside — the `blueprint` and `release` of a webhook, the
//! dashboard's form or a schedule, and the CLI's `--release` — and the rules that turn them into
//! something to load.
//!
//! # Rules
//! - A value that starts like a URL (`scheme:`, with or without `//`) is remote. It is accepted
//!   only in the one exact form a provider fetches — today `s3://BUCKET/KEY` for a provider that
//!   supports `s3` — and refused otherwise: `file:`, `http:`, `S3://`, `s3:/path`, `s3://b` and
//!   every other scheme, so that no value reaches a loader as something it would guess at.
//! - A value that contains `://` anywhere is refused: `/some/dir://r` and `dir://r` are valid
//!   local paths on Linux, and no honest reference needs them to be.
//! - Every other value is a path. From the server ([`resolve_under`]) it must be relative,
//!   without `..`, and resolve — canonicalised, symlinks followed — to a place inside the root.
//!   From the CLI ([`classify`]) it is the operator's own path and may be anywhere.
//! - Empty values, values over [`MAX_LEN`] bytes and values with control characters are refused.
//!
//! Every function here is pure apart from the `canonicalize` of [`resolve_under`], and the
//! `reference` fuzz target drives them with arbitrary input.

use std::path::{Component, Path, PathBuf};

/// Longest reference accepted, in bytes.
pub const MAX_LEN: usize = 1024;

/// What a reference is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A local path (from [`resolve_under`]: canonical and inside the root).
    Local(PathBuf),
    /// A remote object the run's provider fetches, in its canonical form (`s3://BUCKET/KEY`).
    Remote(String),
}

/// Why a reference was refused. [`RefError::NotFound`] is "unprocessable" (HTTP 422); every
/// other variant is a malformed or forbidden value (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    /// Empty.
    #[error("{what} is empty")]
    Empty {
        /// `blueprint` or `release`.
        what: String,
    },
    /// Too long or with control characters.
    #[error("{what} is not a usable reference: {why}")]
    Malformed {
        /// `blueprint` or `release`.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// A scheme nobody fetches here, or a URL in a form the provider does not take.
    #[error("{what} `{value}`: {why}")]
    Remote {
        /// `blueprint` or `release`.
        what: String,
        /// The value as given (control characters already refused).
        value: String,
        /// Why, and what is accepted.
        why: String,
    },
    /// Absolute, or with `..`.
    #[error("{what} `{value}` must be a relative path inside the blueprints root, without `..`")]
    Outside {
        /// `blueprint` or `release`.
        what: String,
        /// The value.
        value: String,
    },
    /// Resolves outside the root (through a symlink).
    #[error("{what} `{value}` leaves the blueprints root (through a symlink)")]
    Escapes {
        /// `blueprint` or `release`.
        what: String,
        /// The value.
        value: String,
    },
    /// Nothing there.
    #[error("{what} `{value}` not found under the blueprints root")]
    NotFound {
        /// `blueprint` or `release`.
        what: String,
        /// The value.
        value: String,
    },
}

impl RefError {
    /// The HTTP status the server answers with.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            RefError::NotFound { .. } => 422,
            _ => 400,
        }
    }
}

/// The scheme a value starts with, if it starts like a URL: RFC 3986's
/// `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":"`.
#[must_use]
pub fn scheme(value: &str) -> Option<&str> {
    let (head, _) = value.split_once(':')?;
    let mut chars = head.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(head)
}

fn basic(value: &str, what: &str) -> Result<(), RefError> {
    if value.is_empty() {
        return Err(RefError::Empty { what: what.into() });
    }
    if value.len() > MAX_LEN {
        return Err(RefError::Malformed {
            what: what.into(),
            why: format!("{} bytes; at most {MAX_LEN}", value.len()),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(RefError::Malformed {
            what: what.into(),
            why: "it contains control characters".into(),
        });
    }
    Ok(())
}

/// Whether `b` is a valid S3 bucket name (3–63 of `a-z 0-9 . -`, starting and ending with a
/// letter or digit).
fn bucket_ok(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Classifies a reference without a root: a remote object `remote` allows, or a path.
/// `remote` lists the schemes the run's provider fetches (see
/// [`crate::provider::remote_schemes`]).
///
/// # Errors
/// [`RefError`] for empty, malformed, `://`-bearing and remote values the provider does not
/// fetch.
pub fn classify(value: &str, what: &str, remote: &[&str]) -> Result<Resolved, RefError> {
    basic(value, what)?;
    let refuse = |why: String| RefError::Remote {
        what: what.into(),
        value: value.into(),
        why,
    };
    let accepted = if remote.is_empty() {
        "this provider takes only paths".to_string()
    } else {
        format!(
            "accepted remote forms: {}",
            remote
                .iter()
                .map(|s| format!("{s}://BUCKET/KEY"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if let Some(s) = scheme(value) {
        if s != "s3" || !remote.contains(&"s3") {
            return Err(refuse(format!(
                "`{s}:` references are not fetched here; {accepted}"
            )));
        }
        let Some(rest) = value.strip_prefix("s3://") else {
            return Err(refuse(format!("write it as s3://BUCKET/KEY; {accepted}")));
        };
        let Some((bucket, key)) = rest.split_once('/') else {
            return Err(refuse(
                "an s3:// reference needs a key: s3://BUCKET/KEY".into(),
            ));
        };
        if !bucket_ok(bucket) {
            return Err(refuse(format!("`{bucket}` is not an S3 bucket name")));
        }
        if key.is_empty() || key.contains("://") {
            return Err(refuse(
                "an s3:// reference needs a key: s3://BUCKET/KEY".into(),
            ));
        }
        return Ok(Resolved::Remote(value.to_string()));
    }
    if value.contains("://") {
        return Err(refuse(format!("a path may not contain `://`; {accepted}")));
    }
    Ok(Resolved::Local(PathBuf::from(value)))
}

/// Whether `rel` is a relative path without `..`, root or prefix components (the lexical half
/// of the path rule; [`resolve_under`] adds the symlink-aware half).
#[must_use]
pub fn lexically_inside(rel: &str) -> bool {
    let p = Path::new(rel);
    !rel.is_empty()
        && !rel.contains('\0')
        && !p.is_absolute()
        && !p.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        })
}

/// Resolves a reference from the server (webhook, form, schedule) against the blueprints root
/// `root`, which must be canonical: a remote object `remote` allows, or a path that exists and
/// whose canonical form is inside `root`.
///
/// # Errors
/// See [`RefError`]; nothing is created or run for any of them.
pub fn resolve_under(
    root: &Path,
    value: &str,
    what: &str,
    remote: &[&str],
) -> Result<Resolved, RefError> {
    match classify(value, what, remote)? {
        Resolved::Remote(r) => Ok(Resolved::Remote(r)),
        Resolved::Local(_) => {
            if !lexically_inside(value) {
                return Err(RefError::Outside {
                    what: what.into(),
                    value: value.into(),
                });
            }
            let canon = root
                .join(value)
                .canonicalize()
                .map_err(|_| RefError::NotFound {
                    what: what.into(),
                    value: value.into(),
                })?;
            if !canon.starts_with(root) {
                return Err(RefError::Escapes {
                    what: what.into(),
                    value: value.into(),
                });
            }
            Ok(Resolved::Local(canon))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_recognised_like_rfc_3986() {
        assert_eq!(scheme("s3://b/k"), Some("s3"));
        assert_eq!(scheme("file:/etc"), Some("file"));
        assert_eq!(scheme("git+ssh://x"), Some("git+ssh"));
        assert_eq!(scheme("releases/v2:rc1"), None);
        assert_eq!(scheme("./v2:rc1"), None);
        assert_eq!(scheme("1x:y"), None);
        assert_eq!(scheme(":x"), None);
    }

    #[test]
    fn only_the_exact_s3_form_is_remote_and_only_where_allowed() {
        let ok = classify("s3://shop-releases/a/b.tar.gz", "release", &["s3"]).unwrap();
        assert_eq!(ok, Resolved::Remote("s3://shop-releases/a/b.tar.gz".into()));
        for bad in [
            "s3:/shop/x",
            "s3:shop/x",
            "S3://shop-releases/x",
            "s3://",
            "s3://shop-releases",
            "s3://shop-releases/",
            "s3://Bad_Bucket/x",
            "s3://ab/x",
            "file:///etc",
            "file:rel",
            "http://127.0.0.1/x.tgz",
            "https://example.com/x.tgz",
            "/some/dir://r",
            "dir://r",
            "a/b://c",
        ] {
            let e = classify(bad, "release", &["s3"]).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}: {e}");
        }
        let e = classify("s3://shop-releases/x", "release", &[]).unwrap_err();
        assert!(e.to_string().contains("takes only paths"), "{e}");
    }

    #[test]
    fn empty_long_and_control_values_are_refused() {
        assert!(matches!(
            classify("", "release", &[]),
            Err(RefError::Empty { .. })
        ));
        assert!(classify(&"a".repeat(MAX_LEN + 1), "release", &[]).is_err());
        assert!(classify("a\nb", "release", &[]).is_err());
        assert!(classify("a\0b", "release", &[]).is_err());
    }

    #[test]
    fn paths_resolve_inside_the_root_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("releases/v2")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        assert_eq!(
            resolve_under(&root, "releases/v2", "release", &[]).unwrap(),
            Resolved::Local(root.join("releases/v2"))
        );
        for (bad, status) in [
            ("/etc", 400),
            ("../x", 400),
            ("releases/../../x", 400),
            ("escape", 400),
            ("escape/hostname", 400),
            ("missing", 422),
        ] {
            let e = resolve_under(&root, bad, "release", &[]).unwrap_err();
            assert_eq!(e.status(), status, "{bad}: {e}");
        }
    }

    #[test]
    fn path_rule_refuses_absolute_parent_and_empty_paths() {
        for ok in ["demo/shop.yaml", "a", "a/./b.yaml", "releases/v2"] {
            assert!(lexically_inside(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/..", "..", "a\0b"] {
            assert!(!lexically_inside(bad), "{bad:?}");
        }
    }
}
