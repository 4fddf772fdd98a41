//! Ephemeral PostgreSQL clusters for `engine: postgres` on the local provider.
//!
//! `initdb` (scram-sha-256, a fresh generated password), `pg_ctl start` on a free 127.0.0.1
//! port with Unix sockets off, `pg_restore` of a custom-format dump, `pg_ctl stop -m immediate`
//! on teardown. The binaries are found in `DRYRUN_PG_BIN` (an explicit choice wins), then on
//! PATH, then in Debian's `/usr/lib/postgresql/VERSION/bin` (newest version).
//!
//! PostgreSQL refuses to run as root. When dryrun runs as root it runs the server as the user
//! named by `DRYRUN_PG_USER` (default `postgres`), hands that user the cluster directory, and
//! checks first that the user can reach it.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::provider::ProviderError;
use crate::secret::Secret;

use crate::process;

/// Superuser created in every copy.
pub const SUPERUSER: &str = "dryrun";

/// Where a PostgreSQL binary is.
///
/// # Errors
/// [`ProviderError::MissingBinary`] with an install hint.
pub fn binary(name: &str) -> Result<PathBuf, ProviderError> {
    if let Some(dir) = std::env::var_os("DRYRUN_PG_BIN") {
        let p = Path::new(&dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let p = e.path().join("bin").join(name);
            p.is_file().then_some((v, p))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).ok_or_else(|| ProviderError::MissingBinary {
        binary: name.to_string(),
        hint: "engine `postgres` needs the PostgreSQL server binaries (Debian/Ubuntu: `apt-get install postgresql`); or set DRYRUN_PG_BIN to their directory".into(),
    })
}

/// The unprivileged user to run the server as, when we are root.
#[derive(Debug, Clone)]
pub struct RunAs {
    /// User name.
    pub name: String,
    /// Uid.
    pub uid: u32,
    /// Gid.
    pub gid: u32,
}

/// `None` when not root; otherwise the user the server must run as.
///
/// # Errors
/// When running as root and the user does not exist.
pub fn run_as() -> Result<Option<RunAs>, ProviderError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let name = std::env::var("DRYRUN_PG_USER").unwrap_or_else(|_| "postgres".into());
    match nix::unistd::User::from_name(&name) {
        Ok(Some(u)) => Ok(Some(RunAs {
            name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })),
        _ => Err(ProviderError::Other(format!(
            "PostgreSQL refuses to run as root and user `{name}` does not exist; create it, set DRYRUN_PG_USER to an unprivileged user, or run dryrun as an ordinary user"
        ))),
    }
}

/// Checks that `user` can walk down to `dir` (every ancestor searchable by it).
///
/// # Errors
/// Names the ancestor that blocks and how to fix it.
pub fn check_reachable(dir: &Path, user: &RunAs) -> Result<(), ProviderError> {
    let mut p = PathBuf::new();
    for comp in dir.components() {
        p.push(comp);
        let Ok(md) = std::fs::metadata(&p) else { break };
        let mode = md.permissions().mode();
        let ok = if md.uid() == user.uid {
            mode & 0o100 != 0
        } else if md.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(ProviderError::Other(format!(
                "PostgreSQL refuses to run as root, so dryrun runs it as `{}`, who cannot enter {} (mode {:o}); choose a --state-dir that user can reach (e.g. under /var/tmp) or run dryrun as an ordinary user",
                user.name,
                p.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// A PostgreSQL tool with the minimal child environment ([`process::ChildEnv`], `HOME` = the
/// cluster's directory), run as `user` when dryrun is root.
fn command(bin: &Path, user: Option<&RunAs>, home: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(bin);
    c.env_clear().envs(process::ChildEnv::new(home, &[]).vars());
    if let Some(u) = user {
        c.uid(u.uid).gid(u.gid);
    }
    c
}

async fn run_checked(
    mut c: tokio::process::Command,
    what: &str,
    timeout: Duration,
) -> Result<String, ProviderError> {
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c
        .spawn()
        .map_err(ProviderError::io(format!("start {what}")))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| ProviderError::Timeout {
            what: what.to_string(),
            waited: timeout,
            last_state: "running".into(),
        })?
        .map_err(ProviderError::io(format!("wait for {what}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(ProviderError::Other(format!(
            "{what} failed ({}):\n{}",
            out.status,
            process::tail(&text, 4000)
        )))
    }
}

/// A cluster's location and settings.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Resource directory (holds `data/` and `postgres.log`).
    pub dir: PathBuf,
    /// Port on 127.0.0.1.
    pub port: u16,
}

impl Cluster {
    /// Data directory.
    #[must_use]
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Creates and starts the cluster with a fresh superuser password; tags the server with the
    /// run id so that `sweep` can find it.
    ///
    /// # Errors
    /// Missing binaries, initdb or start failures (with PostgreSQL's own log tail).
    pub async fn init_and_start(
        &self,
        password: &Secret,
        run_id: &str,
        address: &str,
    ) -> Result<(), ProviderError> {
        let user = run_as()?;
        let initdb = binary("initdb")?;
        self.hand_over(user.as_ref())?;
        let pwfile = self.dir.join(".pw");
        crate::state::create_private_file(&pwfile)
            .and_then(|mut f| std::io::Write::write_all(&mut f, password.expose().as_bytes()))
            .map_err(ProviderError::io("write password file"))?;
        if let Some(u) = &user {
            let _ = nix::unistd::chown(&pwfile, Some(u.uid.into()), Some(u.gid.into()));
        }
        let base = process::ChildEnv::new(&self.dir, &[]);
        let mut c = command(&initdb, user.as_ref(), &self.dir);
        process::tagged(&mut c, &base, &BTreeMap::new(), run_id, address);
        c.arg("-D")
            .arg(self.data())
            .args([
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        let res = run_checked(c, "initdb", Duration::from_secs(120)).await;
        let _ = std::fs::remove_file(&pwfile);
        res?;
        self.start(run_id, address).await
    }

    /// Hands the directory to the server's user when dryrun is root (the cluster's directory is
    /// the user's own, 0700; every directory above it must let the user pass).
    fn hand_over(&self, user: Option<&RunAs>) -> Result<(), ProviderError> {
        if let Some(u) = user {
            nix::unistd::chown(&self.dir, Some(u.uid.into()), Some(u.gid.into())).map_err(|e| {
                ProviderError::Other(format!("chown {} to {}: {e}", self.dir.display(), u.name))
            })?;
            check_reachable(&self.dir, u)?;
        }
        Ok(())
    }

    /// Starts the server of an existing data directory on this cluster's port, tagged with the
    /// run id.
    ///
    /// # Errors
    /// Start failures with PostgreSQL's own log tail.
    pub async fn start(&self, run_id: &str, address: &str) -> Result<(), ProviderError> {
        let user = run_as()?;
        let pg_ctl = binary("pg_ctl")?;
        let base = process::ChildEnv::new(&self.dir, &[]);
        let mut c = command(&pg_ctl, user.as_ref(), &self.dir);
        c.arg("-D").arg(self.data()).arg("-l").arg(self.dir.join("postgres.log"))
            .arg("-o").arg(format!("-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off -c full_page_writes=off -c synchronous_commit=off", self.port))
            .args(["-w", "-t", "60", "start"]);
        let mut env = BTreeMap::new();
        env.insert("LC_ALL".to_string(), "C".to_string());
        process::tagged(&mut c, &base, &env, run_id, address);
        if let Err(e) = run_checked(c, "pg_ctl start", Duration::from_secs(90)).await {
            let log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
            return Err(ProviderError::Other(format!(
                "{e}\npostgres.log:\n{}",
                process::tail(&log, 3000)
            )));
        }
        Ok(())
    }

    /// Gives the superuser of a stopped cluster (a clone of a golden copy) this run's password,
    /// in single-user mode: no connection, so no old password is needed or kept anywhere. The
    /// statement goes through stdin, never the command line.
    ///
    /// # Errors
    /// When the single-user backend fails (its output is shown; it holds no password).
    pub async fn set_password(
        &self,
        password: &Secret,
        run_id: &str,
        address: &str,
    ) -> Result<(), ProviderError> {
        use tokio::io::AsyncWriteExt as _;
        let user = run_as()?;
        self.hand_over(user.as_ref())?;
        let postgres = binary("postgres")?;
        let mut c = command(&postgres, user.as_ref(), &self.dir);
        process::tagged(
            &mut c,
            &process::ChildEnv::new(&self.dir, &[]),
            &BTreeMap::new(),
            run_id,
            address,
        );
        c.arg("--single")
            .arg("-D")
            .arg(self.data())
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "unix_socket_directories=",
                "-c",
                "fsync=off",
                "postgres",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(ProviderError::io("start postgres --single"))?;
        let statement = format!(
            "ALTER ROLE \"{SUPERUSER}\" PASSWORD '{}';\n",
            password.expose().replace('\'', "''")
        );
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(statement.as_bytes())
                .await
                .map_err(ProviderError::io("write to postgres --single"))?;
        }
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .map_err(|_| ProviderError::Timeout {
                what: "postgres --single".into(),
                waited: Duration::from_secs(120),
                last_state: "running".into(),
            })?
            .map_err(ProviderError::io("wait for postgres --single"))?;
        let text = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.contains("ERROR:") {
            return Err(ProviderError::Other(format!(
                "set the copy's password (postgres --single) failed ({}):\n{}",
                out.status,
                process::tail(&text, 3000)
            )));
        }
        Ok(())
    }

    /// Removes the WAL segments a cleanly stopped cluster does not need: everything in
    /// `pg_wal` but the segment holding its last checkpoint (`pg_controldata`: "Latest
    /// checkpoint's REDO WAL file"). The rest are segments recycled for later use — about
    /// `max_wal_size` after a big restore, as much as the data itself — which every clone would
    /// copy. A cluster that is not cleanly shut down is left as it is.
    ///
    /// # Errors
    /// pg_controldata's failure, or a file that cannot be removed.
    pub async fn trim_wal(&self) -> Result<u64, ProviderError> {
        let bin = binary("pg_controldata")?;
        let mut c = tokio::process::Command::new(bin);
        c.env_clear()
            .envs(process::ChildEnv::new(&self.dir, &[]).vars())
            .env("LC_ALL", "C")
            .arg(self.data());
        let text = run_checked(c, "pg_controldata", Duration::from_secs(60)).await?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if field("Database cluster state:").as_deref() != Some("shut down") {
            return Ok(0);
        }
        let Some(keep) = field("Latest checkpoint's REDO WAL file:") else {
            return Ok(0);
        };
        let mut freed = 0;
        let wal = self.data().join("pg_wal");
        for e in std::fs::read_dir(&wal).map_err(ProviderError::io("read pg_wal"))? {
            let e = e.map_err(ProviderError::io("read pg_wal"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let segment = name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if segment && name != keep {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(e.path())
                    .map_err(ProviderError::io(format!("remove {name} from pg_wal")))?;
            }
        }
        Ok(freed)
    }

    /// Stops the cluster cleanly (`-m fast`: a shutdown checkpoint), so that a clone of its
    /// data directory starts without recovery.
    ///
    /// # Errors
    /// pg_ctl's error output.
    pub async fn stop_clean(&self) -> Result<(), ProviderError> {
        pg_ctl_stop(&self.data(), "fast", Duration::from_secs(120)).await
    }

    /// Creates the database `name` and restores a custom-format dump into it.
    ///
    /// # Errors
    /// pg_restore's own error output.
    pub async fn restore(
        &self,
        name: &str,
        password: &Secret,
        dump: &Path,
        run_id: &str,
        address: &str,
    ) -> Result<(), ProviderError> {
        binary("pg_restore")?;
        self.create_database(name, password).await?;
        let jobs = jobs();
        let c = self.pg_restore(&["-j", &jobs, "-d", name], dump, password, run_id, address);
        run_checked(c, "pg_restore", Duration::from_secs(3600))
            .await
            .map(|_| ())
    }

    /// [`Cluster::restore`] that masks `plan`'s columns while the data loads: the schema
    /// (`--section=pre-data`), then each table's rows from `pg_restore --section=data -f -`
    /// through [`crate::privacy::stream::mask_line`] into `COPY … FROM STDIN`, the other
    /// statements of the data section as they are, then indexes and constraints
    /// (`--section=post-data`). The copy never holds the masked columns' originals.
    ///
    /// # Errors
    /// pg_restore's error output, or the copy's error for a statement or row.
    pub async fn restore_masked(
        &self,
        name: &str,
        password: &Secret,
        dump: &Path,
        (run_id, address): (&str, &str),
        plan: &crate::privacy::stream::MaskPlan,
    ) -> Result<crate::privacy::stream::Streamed, ProviderError> {
        use crate::privacy::stream::{self, Streamed};
        binary("pg_restore")?;
        self.create_database(name, password).await?;
        let pre = self.pg_restore(
            &["--section=pre-data", "-d", name],
            dump,
            password,
            run_id,
            address,
        );
        run_checked(pre, "pg_restore (schema)", Duration::from_secs(3600)).await?;
        let post_script = self.pg_restore(
            &["--section=post-data", "-f", "-"],
            dump,
            password,
            run_id,
            address,
        );
        let unique = stream::unique_columns(
            &run_checked(
                post_script,
                "pg_restore (read constraints)",
                Duration::from_secs(600),
            )
            .await?,
        );

        let client = self.connect(name, password).await?;
        let fail = |what: String| {
            move |e: tokio_postgres::Error| {
                ProviderError::Other(format!(
                    "restore into the copy: {what}: {}",
                    crate::pg::error(&e)
                ))
            }
        };
        // varchar(n) limits of the masked columns, now that the tables exist; `null` on a NOT
        // NULL column is refused here, before a row loads, as the in-copy path refuses it.
        let mut max_len = std::collections::BTreeMap::new();
        for r in plan
            .rules
            .iter()
            .filter(|r| r.strategy != crate::privacy::Strategy::Keep)
        {
            let (schema, table) = r.table.split_once('.').unwrap_or(("public", &r.table));
            let row = client
                .query_opt(
                    "SELECT character_maximum_length, is_nullable = 'NO' FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
                    &[&schema, &table, &r.column],
                )
                .await
                .map_err(fail(format!("column {}.{}", r.table, r.column)))?;
            if r.strategy == crate::privacy::Strategy::Null
                && row.as_ref().is_some_and(|row| row.get::<_, bool>(1))
            {
                return Err(ProviderError::Other(format!(
                    "masking rule {}.{}: the column is NOT NULL, so `null` cannot apply; use `redact` or `hash`",
                    r.table, r.column
                )));
            }
            if let Some(Some(n)) = row.map(|r| r.get::<_, Option<i32>>(0)) {
                max_len.insert(
                    (r.table.clone(), r.column.clone()),
                    usize::try_from(n).unwrap_or(0),
                );
            }
        }

        let mut data = self.pg_restore(
            &["--section=data", "-f", "-"],
            dump,
            password,
            run_id,
            address,
        );
        data.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = data
            .spawn()
            .map_err(ProviderError::io("start pg_restore (data)"))?;
        let stderr = child.stderr.take();
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            if let Some(mut e) = stderr {
                use tokio::io::AsyncReadExt as _;
                let _ = (&mut e).take(64 * 1024).read_to_string(&mut text).await;
            }
            text
        });
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ProviderError::Other("pg_restore (data): no output".into()))?;
        let mut lines = tokio::io::BufReader::with_capacity(1 << 20, stdout);
        let mut out = Streamed::default();
        let mut sql = String::new();
        let mut line = Vec::new();
        while next_line(&mut lines, &mut line).await? {
            let text = String::from_utf8_lossy(&line);
            let Some((table, columns)) = stream::copy_header(text.trim_end()) else {
                // psql meta-commands (`\restrict KEY`, which pg_dump writes since the 2025
                // security releases) are for psql, not the server.
                if !text.starts_with('\\') {
                    sql.push_str(&text);
                }
                continue;
            };
            if !sql.trim().is_empty() {
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(fail("a statement of the data section".into()))?;
            }
            sql.clear();
            let mut cols = stream::columns_for(plan, &table, &columns, &unique, &max_len);
            let rows = copy_rows(
                &client,
                text.trim_end(),
                &table,
                &mut lines,
                &mut cols,
                &plan.key,
            )
            .await?;
            if !cols.is_empty() {
                out.rows += rows;
                for c in cols {
                    let key = (table.clone(), columns[c.index].clone());
                    out.originals.insert(key.clone(), c.originals);
                    out.masked.insert(key);
                }
            }
        }
        if !sql.trim().is_empty() {
            client
                .batch_execute(&sql)
                .await
                .map_err(fail("a statement of the data section".into()))?;
        }
        let status = child
            .wait()
            .await
            .map_err(ProviderError::io("wait for pg_restore (data)"))?;
        if !status.success() {
            return Err(ProviderError::Other(format!(
                "pg_restore (data) failed ({status}):\n{}",
                process::tail(&errors.await.unwrap_or_default(), 4000)
            )));
        }
        drop(client);
        let jobs = jobs();
        let post = self.pg_restore(
            &["--section=post-data", "-j", &jobs, "-d", name],
            dump,
            password,
            run_id,
            address,
        );
        run_checked(
            post,
            "pg_restore (indexes and constraints)",
            Duration::from_secs(3600),
        )
        .await?;
        Ok(out)
    }

    async fn connect(
        &self,
        db: &str,
        password: &Secret,
    ) -> Result<tokio_postgres::Client, ProviderError> {
        crate::pg::connect(&format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={db} password={}",
            self.port,
            password.expose()
        ))
        .await
        .map_err(|e| {
            ProviderError::Other(format!(
                "connect to the copy on 127.0.0.1:{}: {e}",
                self.port
            ))
        })
    }

    async fn create_database(&self, name: &str, password: &Secret) -> Result<(), ProviderError> {
        let client = self.connect("postgres", password).await?;
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
            .map_err(|e| ProviderError::Other(format!("create database {name}: {e}")))
    }

    /// `pg_restore` with `args` on `dump`, connected to this cluster, tagged with the run.
    fn pg_restore(
        &self,
        args: &[&str],
        dump: &Path,
        password: &Secret,
        run_id: &str,
        address: &str,
    ) -> tokio::process::Command {
        let bin = binary("pg_restore").unwrap_or_else(|_| PathBuf::from("pg_restore"));
        let mut c = command(&bin, None, &self.dir);
        c.args([
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "-h",
            "127.0.0.1",
            "-U",
            SUPERUSER,
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .args(args)
        .arg(dump);
        let mut env = BTreeMap::new();
        env.insert("PGPASSWORD".to_string(), password.expose().to_string());
        env.insert("PGCONNECT_TIMEOUT".to_string(), "10".to_string());
        process::tagged(
            &mut c,
            &process::ChildEnv::new(&self.dir, &[]),
            &env,
            run_id,
            address,
        );
        c
    }

    /// Stops the cluster now (`-m immediate`; the copy is thrown away anyway).
    /// Idempotent: a cluster that is not running is fine.
    pub async fn stop(data: &Path) {
        if !data.join("postmaster.pid").exists() {
            return;
        }
        let _ = pg_ctl_stop(data, "immediate", Duration::from_secs(20)).await;
    }
}

/// `pg_ctl stop -m MODE` on the data directory `data`, waiting up to `wait`.
async fn pg_ctl_stop(data: &Path, mode: &str, wait: Duration) -> Result<(), ProviderError> {
    let pg_ctl = binary("pg_ctl")?;
    let user = run_as()?;
    let mut c = command(&pg_ctl, user.as_ref(), data.parent().unwrap_or(data));
    c.arg("-D")
        .arg(data)
        .args(["-m", mode, "-w", "-t"])
        .arg(wait.as_secs().to_string())
        .arg("stop");
    run_checked(c, "pg_ctl stop", wait + Duration::from_secs(30))
        .await
        .map(|_| ())
}

/// Parallel jobs for `pg_restore -j`: one per core (at least two; the tables and indexes of a
/// dump load independently).
fn jobs() -> String {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get().max(2))
        .to_string()
}

/// The PostgreSQL server's version (`postgres -V`), part of a golden copy's identity: a data
/// directory only starts under the major version that wrote it.
///
/// # Errors
/// The binary is missing or does not answer.
pub async fn version() -> Result<String, ProviderError> {
    static VERSION: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    VERSION
        .get_or_try_init(|| async {
            let bin = binary("postgres")?;
            let mut c = tokio::process::Command::new(bin);
            c.env_clear().arg("-V");
            run_checked(c, "postgres -V", Duration::from_secs(30))
                .await
                .map(|v| v.trim().to_string())
        })
        .await
        .cloned()
}

/// Reads the next line of `r` into `line` (cleared first); `false` at the end.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> Result<bool, ProviderError> {
    use tokio::io::AsyncBufReadExt as _;
    line.clear();
    Ok(r.read_until(b'\n', line)
        .await
        .map_err(ProviderError::io("read pg_restore (data)"))?
        > 0)
}

/// Sends one table's rows, read from `lines` up to the `\.` end marker, into `header`
/// (`COPY … FROM stdin;`), masking `cols` on the way; returns how many rows.
async fn copy_rows<R: tokio::io::AsyncBufRead + Unpin>(
    client: &tokio_postgres::Client,
    header: &str,
    table: &str,
    lines: &mut R,
    cols: &mut [crate::privacy::stream::StreamColumn],
    key: &crate::privacy::MaskKey,
) -> Result<u64, ProviderError> {
    use futures_util::SinkExt as _;
    const CHUNK: usize = 1 << 20;
    let fail = |e: tokio_postgres::Error| {
        ProviderError::Other(format!(
            "restore into the copy: rows of {table}: {}",
            crate::pg::error(&e)
        ))
    };
    let sink = client
        .copy_in::<_, bytes::Bytes>(header)
        .await
        .map_err(fail)?;
    let mut sink = std::pin::pin!(sink);
    let (mut line, mut masked, mut buf) = (Vec::new(), Vec::new(), Vec::with_capacity(CHUNK));
    let mut rows = 0u64;
    loop {
        if !next_line(lines, &mut line).await? {
            return Err(ProviderError::BadBackup(format!(
                "the dump's data for {table} ends without its end marker"
            )));
        }
        let row = line.strip_suffix(b"\n").unwrap_or(&line);
        if row == b"\\." {
            break;
        }
        rows += 1;
        if cols.is_empty() {
            buf.extend_from_slice(&line);
        } else {
            crate::privacy::stream::mask_line(row, cols, key, &mut masked);
            buf.extend_from_slice(&masked);
            buf.push(b'\n');
        }
        if buf.len() >= CHUNK {
            sink.send(bytes::Bytes::from(std::mem::take(&mut buf)))
                .await
                .map_err(fail)?;
        }
    }
    if !buf.is_empty() {
        sink.send(bytes::Bytes::from(buf)).await.map_err(fail)?;
    }
    sink.as_mut().finish().await.map_err(fail)?;
    Ok(rows)
}
