//! `dryrun init`: a starting blueprint and release manifest from what production has — the
//! local backup store's sources (engines from their `backup.json`) and bucket directories, or
//! on AWS named RDS instances / Aurora clusters and buckets (described through
//! [`crate::provider::Provider::describe_sources`], read only).
//!
//! Names come from outside (directory names, AWS ids) and end up in a YAML file that is
//! rendered as a handlebars template: only names of letters, digits, `.`, `_` and `-` are
//! taken; others are left out and named in the notes, never escaped into the file.

use std::fmt::Write as _;
use std::path::Path;

use crate::blueprint::Engine;

/// A production database the blueprint restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseSeed {
    /// Source: backup store directory, RDS instance or Aurora cluster id.
    pub source: String,
    /// Engine.
    pub engine: Engine,
    /// Database name inside the copy.
    pub database: String,
    /// What was found (a comment above the resource).
    pub note: String,
}

/// A production bucket the blueprint copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSeed {
    /// Source bucket (directory on the local provider).
    pub source: String,
    /// What was found.
    pub note: String,
}

/// What production has, as found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// Databases.
    pub databases: Vec<DatabaseSeed>,
    /// Buckets.
    pub buckets: Vec<BucketSeed>,
    /// AMI for the service on AWS (the newest Amazon Linux 2023 the account sees), if found.
    pub ami: Option<String>,
    /// Things left out or worth knowing, printed and written as comments.
    pub notes: Vec<String>,
}

/// Where the blueprint points the local provider (paths as written into the file, relative
/// to the blueprint's directory when they can be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPaths {
    /// `providers.local.backups`.
    pub backups: String,
    /// `providers.local.buckets`, when there are buckets.
    pub buckets: Option<String>,
}

/// Whether a name from outside may go into the blueprint as it is.
#[must_use]
pub fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Whether a path may be written into the blueprint as it is (letters, digits, `.`, `_`,
/// `-`, `/`): anything else could end the YAML value or start a template.
#[must_use]
pub fn safe_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

/// Text for a `#` comment in the blueprint: what a backup id or an API answer holds may end
/// the comment (a newline) or start a template, so only a plain set of characters is kept;
/// anything else becomes `?`.
#[must_use]
pub fn comment_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " .,:;_-()/+@%=`'".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A blueprint resource name for `source`: lowercase, `[a-z][a-z0-9_-]*`, at most 40
/// characters, unique among `taken`.
fn resource_name(source: &str, prefix: &str, taken: &mut Vec<String>) -> String {
    let mut n: String = source
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !n.starts_with(|c: char| c.is_ascii_lowercase()) {
        n = format!("{prefix}-{n}");
    }
    n.truncate(36);
    let base = n.trim_end_matches('-').to_string();
    let mut name = base.clone();
    let mut i = 2;
    while taken.contains(&name) {
        name = format!("{base}-{i}");
        i += 1;
    }
    taken.push(name.clone());
    name
}

/// Scans a local backup store (`BACKUPS/SOURCE/ID/backup.json`) and a buckets directory.
///
/// # Errors
/// When `backups` cannot be read.
pub fn scan_local(backups: &Path, buckets: Option<&Path>) -> std::io::Result<Sources> {
    let mut out = Sources::default();
    for source in plain_dirs(backups, "backup source", &mut out.notes)? {
        let found = crate::provider::local::backup::list(backups, &source).unwrap_or_default();
        let Some((latest, _)) = found.first() else {
            out.notes.push(format!(
                "left out backup source `{source}`: no complete backup (backup.json with \"complete\": true)"
            ));
            continue;
        };
        let engine = match latest.engine.as_str() {
            "sqlite" => Engine::Sqlite,
            "postgres" => Engine::Postgres,
            other => {
                out.notes.push(format!(
                    "left out backup source `{source}`: engine {other:?} is not restored by the local provider"
                ));
                continue;
            }
        };
        // The dump's own database name is not in backup.json: the source's name is a good
        // start (what the release connects to comes from the url output anyway).
        let database = source
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        out.databases.push(DatabaseSeed {
            note: format!(
                "{} backup(s) of `{source}` ({}), latest {} taken {}",
                found.len(),
                latest.engine,
                latest.id,
                latest.taken_at.format("%Y-%m-%d %H:%M UTC")
            ),
            source,
            engine,
            database,
        });
    }
    if let Some(dir) = buckets {
        for source in plain_dirs(dir, "bucket directory", &mut out.notes)? {
            let mut count = 0;
            walk_count(&dir.join(&source), &mut count);
            let count = if count >= COUNT_CAP {
                format!("{COUNT_CAP}+")
            } else {
                count.to_string()
            };
            out.buckets.push(BucketSeed {
                note: format!("bucket directory `{source}`, {count} file(s)"),
                source,
            });
        }
    }
    Ok(out)
}

/// The directories in `dir` whose names are plain ([`safe_name`]), sorted; the others are
/// named in `notes` as left out (`what`: "backup source", "bucket directory").
fn plain_dirs(dir: &Path, what: &str, notes: &mut Vec<String>) -> std::io::Result<Vec<String>> {
    // A linked directory counts (a store on another disk); nothing below it is walked here.
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.retain(|n| {
        let plain = safe_name(n);
        if !plain {
            notes.push(format!(
                "left out {what} {n:?}: use a name of letters, digits, `.`, `_` and `-`"
            ));
        }
        plain
    });
    Ok(names)
}

/// Most files counted in a bucket directory (the number is only for a comment).
const COUNT_CAP: usize = 10_000;

/// Files under `dir`, symlinks not followed (a link to `..` would never end), up to
/// [`COUNT_CAP`].
fn walk_count(dir: &Path, seen: &mut usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if *seen >= COUNT_CAP {
            return;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => walk_count(&e.path(), seen),
            Ok(_) => *seen += 1,
            Err(_) => {}
        }
    }
}

/// The blueprint's text. `provider` is `local` (with `local`) or `aws`.
#[must_use]
pub fn blueprint_yaml(name: &str, src: &Sources, local: Option<&LocalPaths>) -> String {
    let mut s = String::new();
    let aws = local.is_none();
    let _ = writeln!(
        s,
        "# Written by `dryrun init` as a start: read every comment, then\n\
         #   dryrun validate THIS_FILE\n\
         #   dryrun doctor THIS_FILE{aws_flag}\n\
         #   dryrun scan THIS_FILE{aws_flag}          # personal data: prints a masking: block\n\
         #   dryrun run THIS_FILE{aws_flag} --release ./release\n\
         # Reference: docs/blueprints.md.",
        aws_flag = if aws { " --provider aws" } else { "" }
    );
    // The notes name what was left out, and a left-out name is exactly what must not reach
    // this file (not even in a comment): only how many.
    if !src.notes.is_empty() {
        let _ = writeln!(
            s,
            "# note: {} remark(s) from `dryrun init` were printed when it ran (sources left out, defaults to set).",
            src.notes.len()
        );
    }
    let _ = writeln!(s, "name: {name}");
    let _ = writeln!(
        s,
        "description: Rehearsal of {name} on a copy of production (edit me).\n"
    );
    if aws {
        s.push_str("params:\n");
        let _ = writeln!(
            s,
            "  ami:\n    description: AMI of the service's instance (needs the SSM agent, curl and tar; Amazon Linux 2023 has them).\n    default: \"{}\"",
            src.ami.as_deref().unwrap_or("")
        );
        s.push_str("  instance_profile:\n    description: IAM instance profile of the instance (docs/providers/aws-iam/instance-policy.json); SSM needs it.\n    default: \"\"\n\n");
        s.push_str("providers:\n  aws:\n    instance_profile: \"{{params.instance_profile}}\"\n    # sql checks, the personal data gate and masking connect from the runner: only\n    # when it runs inside the VPC (then also set runner_cidr).\n    runner_in_vpc: false\n\n");
        s.push_str("# The personal data gate needs the runner in the VPC; with runner_in_vpc: false the run\n# would stop before install, so it is off here. Turn it back on with the runner inside.\npii_gate: off\n\n");
    } else if let Some(l) = local {
        s.push_str("providers:\n  local:\n");
        let _ = writeln!(
            s,
            "    backups: \"{}\"{}",
            l.backups,
            if Path::new(&l.backups).is_absolute() {
                ""
            } else {
                "    # relative to this file"
            }
        );
        if let Some(b) = &l.buckets {
            let _ = writeln!(s, "    buckets: \"{b}\"");
        }
        s.push('\n');
    }
    s.push_str("resources:\n");
    let mut taken = Vec::new();
    let mut env = Vec::new();
    let mut checks = String::new();
    for db in &src.databases {
        let r = resource_name(&db.source, "db", &mut taken);
        let _ = writeln!(s, "  # {}", comment_text(&db.note));
        let _ = writeln!(
            s,
            "  {r}:\n    type: database\n    engine: {}\n    source: \"{}\"\n    database: \"{}\"",
            db.engine.as_str(),
            db.source,
            db.database
        );
        let var = r.to_ascii_uppercase().replace('-', "_");
        if db.engine == Engine::Sqlite {
            env.push(format!("{var}_PATH: \"{{{{resources.{r}.path}}}}\""));
        } else {
            env.push(format!("{var}_URL: \"{{{{resources.{r}.url}}}}\""));
        }
        let (query, value) = match db.engine {
            Engine::Sqlite => (
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table'",
                "1",
            ),
            Engine::Postgres | Engine::AuroraPostgresql => (
                "SELECT count(*) > 0 FROM information_schema.tables WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
                "t",
            ),
            _ => (
                "SELECT count(*) > 0 FROM information_schema.tables WHERE table_schema = DATABASE()",
                "1",
            ),
        };
        let _ = writeln!(
            checks,
            "  - name: {r}-has-tables\n    type: sql\n    database: {r}\n    query: \"{query}\"\n    expect:\n      value: \"{value}\""
        );
    }
    for b in &src.buckets {
        let r = resource_name(&b.source, "bucket", &mut taken);
        let _ = writeln!(s, "  # {}", comment_text(&b.note));
        let _ = writeln!(s, "  {r}:\n    type: bucket\n    source: \"{}\"", b.source);
        let var = r.to_ascii_uppercase().replace('-', "_");
        if aws {
            env.push(format!("{var}_BUCKET: \"{{{{resources.{r}.name}}}}\""));
        } else {
            env.push(format!("{var}_DIR: \"{{{{resources.{r}.path}}}}\""));
        }
    }
    let app = resource_name("app", "svc", &mut taken);
    s.push_str("  # The candidate release (./release/dryrun-release.yaml): its install steps run your\n  # migrations against the copies, then `start` serves it and the checks below run.\n");
    let _ = writeln!(s, "  {app}:\n    type: service\n    env:");
    for e in &env {
        let _ = writeln!(s, "      {e}");
    }
    s.push_str("      APP_VERSION: \"{{release.version}}\"\n    ready_timeout: 5m\n");
    if aws {
        s.push_str("    aws:\n      ami: \"{{params.ami}}\"\n      instance_type: t3.small\n      port: 8080\n");
    }
    s.push_str("\nchecks:\n");
    s.push_str(&checks);
    let _ = writeln!(
        s,
        "  # Once the release serves HTTP (a `start` in its manifest), check it, e.g.:\n  # - name: homepage\n  #   type: http\n  #   url: \"{{{{resources.{app}.url}}}}/\"\n  #   expect:\n  #     status: 200"
    );
    s.push_str("\nteardown:\n  policy: always\nttl: 2h\n");
    s
}

/// The release manifest's text: an install step that says what to put there, no `start`
/// (install-only until the service is described).
#[must_use]
pub fn release_yaml() -> String {
    "# dryrun release manifest, written by `dryrun init` as a start (docs/releases.md).\n\
     # Put this file at the top of your release (a directory or .tar.gz): --release points at it.\n\
     version: \"0.1.0-draft\"\n\
     install:                      # each step runs with `sh -c` in the release directory, in order\n  \
       - name: migrate\n    \
         run: 'echo \"dryrun init: replace this step with your migrations (the copies are in the environment of this step, named as in the env of the blueprint service)\"'\n\
     # start: 'exec ./bin/server --port \"$PORT\"'   # then the service is started and checked\n\
     # health:\n\
     #   http: /healthz\n\
     #   timeout: 30s\n"
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_are_valid_and_unique() {
        let mut taken = Vec::new();
        assert_eq!(resource_name("Shop-DB", "db", &mut taken), "shop-db");
        assert_eq!(resource_name("shop.db", "db", &mut taken), "shop-db-2");
        assert_eq!(resource_name("9lives", "db", &mut taken), "db-9lives");
        let long = resource_name(&"x".repeat(80), "db", &mut taken);
        assert!(long.len() <= 40, "{long}");
        for n in &taken {
            assert!(crate::blueprint::valid_name(n), "{n}");
        }
    }

    #[test]
    fn names_that_could_carry_a_template_or_yaml_are_refused() {
        for bad in ["a{{b}}", "a\nb: c", "a b", "", "a\"b", "x:y", "a#b"] {
            assert!(!safe_name(bad), "{bad:?}");
        }
        assert!(safe_name("shop-pg_2.prod"));
    }
}
