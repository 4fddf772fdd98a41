//! The local provider's part of `dryrun doctor` (see [`crate::doctor`]): each database's
//! latest backup, the PostgreSQL binaries and whether their `pg_restore` reads the dumps,
//! the bucket directories, the egress firewall, and room for the copies.

use std::time::Duration;

use crate::blueprint::{Blueprint, Engine, ResourceSpec};
use crate::doctor::{self, Finding};
use crate::provider::{BackupPick, Provider as _};

use super::{LocalProvider, postgres};

/// The binaries the postgres engine runs (restore, start, stop, check).
const PG_BINARIES: [&str; 5] = ["postgres", "initdb", "pg_ctl", "pg_restore", "pg_dump"];

impl LocalProvider {
    /// What `bp` needs on this machine (`None`: what any blueprint may need; a missing
    /// PostgreSQL is then a warning).
    pub(super) async fn doctor_checks(&self, bp: Option<&Blueprint>) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut needed: Option<u64> = None;
        let mut dumps = Vec::new();
        let resources = bp.map(|b| b.resources.as_slice()).unwrap_or_default();
        for r in resources {
            let check = format!("{} backup", r.address());
            match &r.spec {
                ResourceSpec::Database(db) => {
                    let pick = db.backup.clone().map_or(BackupPick::Latest, BackupPick::Id);
                    match self.find_backup(db, &pick).await {
                        Ok(b) => {
                            let size = b.size_bytes.or_else(|| {
                                std::fs::metadata(&b.location).ok().map(|m| m.len())
                            });
                            needed = Some(needed.unwrap_or(0) + size.unwrap_or(0));
                            let age = (chrono::Utc::now() - b.taken_at).num_seconds();
                            out.push(Finding::pass(
                                check,
                                format!(
                                    "{} ({} engine) taken {} (age {}){}",
                                    b.id,
                                    db.engine.as_str(),
                                    b.taken_at.format("%Y-%m-%d %H:%M UTC"),
                                    crate::report::human_secs(age),
                                    size.map(|n| format!(", {}", crate::report::human_bytes(n)))
                                        .unwrap_or_default()
                                ),
                            ));
                            if db.engine == Engine::Postgres {
                                dumps.push((r.address(), b));
                            }
                        }
                        Err(e) => out.push(Finding::fail(
                            check,
                            e.to_string(),
                            if matches!(db.engine, Engine::Sqlite | Engine::Postgres) {
                                "the store keeps BACKUPS/SOURCE/ID/backup.json with the data file beside it (docs/providers/local.md); `providers.local.backups` in the blueprint names BACKUPS"
                            } else {
                                "run it with `--provider aws` (`dryrun doctor BLUEPRINT --provider aws` checks that side)"
                            },
                        )),
                    }
                }
                ResourceSpec::Bucket(b) => {
                    let Ok(settings) = self.settings() else {
                        continue;
                    };
                    let dir = settings.buckets.join(&b.source);
                    let check = format!("{} source", r.address());
                    match std::fs::read_dir(&dir) {
                        Ok(rd) => out.push(Finding::pass(
                            check,
                            format!("{} ({} entries at the top)", dir.display(), rd.count()),
                        )),
                        Err(e) => out.push(Finding::fail(
                            check,
                            format!("cannot read bucket directory {}: {e}", dir.display()),
                            "`providers.local.buckets` names a directory with one directory per production bucket (docs/providers/local.md)",
                        )),
                    }
                }
                ResourceSpec::Service(_) => {}
            }
        }
        let needs_pg = bp.is_none()
            || resources.iter().any(
                |r| matches!(&r.spec, ResourceSpec::Database(d) if d.engine == Engine::Postgres),
            );
        if needs_pg {
            out.extend(self.postgres_checks(bp.is_some(), &dumps).await);
        } else {
            out.push(Finding::skip(
                "postgres binaries",
                "no database of the blueprint uses engine `postgres`",
            ));
        }
        out.push(firewall_check(bp).await);
        out.push(doctor::free_space(&self.state, needed));
        out
    }

    async fn postgres_checks(
        &self,
        required: bool,
        dumps: &[(String, crate::provider::BackupInfo)],
    ) -> Vec<Finding> {
        let mut out = Vec::new();
        let check = "postgres binaries";
        // Without a blueprint that needs PostgreSQL, what is missing is only a warning.
        let miss = |check: &str, detail: String, fix: &str| {
            if required {
                Finding::fail(check, detail, fix)
            } else {
                Finding::warn(check, detail, fix)
            }
        };
        let missing: Vec<&str> = PG_BINARIES
            .iter()
            .copied()
            .filter(|b| postgres::binary(b).is_err())
            .collect();
        if !missing.is_empty() {
            let detail = format!("not found: {}", missing.join(", "));
            let fix = "Debian/Ubuntu: `apt-get install postgresql`; or set DRYRUN_PG_BIN to the directory that holds them (e.g. /usr/lib/postgresql/16/bin)";
            out.push(if required {
                Finding::fail(check, detail, fix)
            } else {
                Finding::warn(
                    check,
                    format!("{detail}: blueprints with engine `postgres` cannot run here"),
                    fix,
                )
            });
            return out;
        }
        let dir = postgres::binary("postgres")
            .ok()
            .and_then(|p| p.parent().map(|d| d.display().to_string()))
            .unwrap_or_default();
        match postgres::version().await {
            Ok(v) => out.push(Finding::pass(check, format!("{v} in {dir}"))),
            Err(e) => out.push(Finding::fail(
                check,
                format!("`postgres -V` failed: {e}"),
                "reinstall the PostgreSQL server package, or set DRYRUN_PG_BIN to a working installation",
            )),
        }
        // PostgreSQL refuses to run as root: dryrun runs it as another user, who must reach
        // the state directory.
        match postgres::run_as() {
            Ok(None) => {}
            Ok(Some(user)) => match postgres::check_reachable(self.state.root(), &user) {
                Ok(()) => out.push(Finding::pass(
                    "postgres user",
                    format!(
                        "running as root: clusters run as `{}`, who can reach {}",
                        user.name,
                        self.state.root().display()
                    ),
                )),
                Err(e) => out.push(miss(
                    "postgres user",
                    e.to_string(),
                    "put the state directory where that user can reach it (e.g. under /var/tmp with mode 755 on the way), or run dryrun as an ordinary user",
                )),
            },
            Err(e) => out.push(miss(
                "postgres user",
                e.to_string(),
                "create the user (`useradd --system postgres`) or set DRYRUN_PG_USER",
            )),
        }
        let Ok(pg_restore) = postgres::binary("pg_restore") else {
            return out;
        };
        for (address, b) in dumps {
            let check = format!("{address} dump readable");
            let mut c = tokio::process::Command::new(&pg_restore);
            c.env_clear()
                .arg("--list")
                .arg(&b.location)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            let res = tokio::time::timeout(Duration::from_secs(60), c.output()).await;
            match res {
                Ok(Ok(o)) if o.status.success() => out.push(Finding::pass(
                    check,
                    format!("pg_restore reads {} ({})", b.id, b.location),
                )),
                Ok(Ok(o)) => {
                    let why = String::from_utf8_lossy(&o.stderr);
                    out.push(Finding::fail(
                        check,
                        format!(
                            "pg_restore cannot read {}: {}",
                            b.id,
                            why.lines().next().unwrap_or("no message").trim()
                        ),
                        "pg_restore reads dumps of its own major version and older: install the PostgreSQL version production runs (or newer) and point DRYRUN_PG_BIN at it",
                    ));
                }
                Ok(Err(e)) => out.push(Finding::fail(
                    check,
                    format!("cannot start pg_restore: {e}"),
                    "reinstall the PostgreSQL server package",
                )),
                Err(_) => out.push(Finding::warn(
                    check,
                    format!("pg_restore --list did not finish within 60 s on {}", b.id),
                    "a dump this slow to list may be on a slow or remote disk: copy the store nearer",
                )),
            }
        }
        out
    }
}

/// Whether the release's egress can be confined here (a network namespace; nftables records
/// what it refuses).
async fn firewall_check(bp: Option<&Blueprint>) -> Finding {
    use crate::firewall::{Mode, Netns};
    let check = "egress firewall";
    let mode = bp.map_or(Mode::Auto, |b| b.firewall.mode);
    if mode == Mode::Off {
        return Finding::skip(check, "the blueprint says `firewall: off`");
    }
    if bp.is_some_and(|b| {
        !b.resources
            .iter()
            .any(|r| matches!(r.spec, ResourceSpec::Service(_)))
    }) {
        return Finding::skip(check, "the blueprint runs no service");
    }
    // The namespace lives as long as its handle: dropped at the end of this block.
    let made = tokio::task::spawn_blocking(|| Netns::create().map(|ns| ns.how()))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    let fix = if crate::state::running_as_root() {
        "as root the namespace should be possible: install iproute2 (`ip`) and util-linux (`nsenter`), and lift a sandbox that forbids namespaces (systemd RestrictNamespaces=, a container without CAP_SYS_ADMIN; packaging/dryrun.service says how)"
    } else {
        "run dryrun as root or with CAP_SYS_ADMIN and CAP_NET_ADMIN (docs/security.md)"
    };
    match made {
        Ok(how) if how.contains("not recorded") => {
            Finding::warn(check, how, "apt-get install nftables")
        }
        Ok(how) => Finding::pass(check, how),
        Err(why) if mode == Mode::Required => Finding::fail(
            check,
            format!("`firewall: required`, but the release cannot be confined: {why}"),
            fix,
        ),
        Err(why) => Finding::warn(
            check,
            format!("not enforced (`firewall: auto` runs anyway and says so in the report): {why}"),
            fix,
        ),
    }
}
