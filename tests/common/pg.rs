//! A throw-away PostgreSQL server on 127.0.0.1 for the shared control plane: `initdb` into a
//! temporary directory, `pg_ctl start` on a free port, stopped (`-m immediate`) and deleted on
//! drop — also when the test fails. Durable settings (fsync on), as a real control database.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;

use dryrun::provider::local::postgres::{binary, run_as};

/// A running server.
pub struct ControlDb {
    dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    pg_ctl: PathBuf,
    user: Option<(u32, u32)>,
}

const PASSWORD: &str = "control-db-test-password";

impl ControlDb {
    /// Starts one.
    pub fn start() -> ControlDb {
        let dir = tempfile::Builder::new()
            .prefix("dryrun-controldb-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let user = run_as()
            .expect("an unprivileged user for PostgreSQL")
            .map(|u| (u.uid, u.gid));
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, PASSWORD).unwrap();
        if let Some((uid, gid)) = user {
            nix::unistd::chown(&data, Some(uid.into()), Some(gid.into())).unwrap();
            nix::unistd::chown(&pw, Some(uid.into()), Some(gid.into())).unwrap();
        }
        let as_user = |c: &mut Command| {
            use std::os::unix::process::CommandExt as _;
            if let Some((uid, gid)) = user {
                c.uid(uid).gid(gid);
            }
            c.env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("LC_ALL", "C");
        };
        let mut c = Command::new(binary("initdb").unwrap());
        as_user(&mut c);
        let out = c
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "dryrun",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pw.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg_ctl = binary("pg_ctl").unwrap();
        // A free port: bind, read it, let go (the server takes it a moment later).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("postgres.log");
        std::fs::write(&log, "").unwrap();
        if let Some((uid, gid)) = user {
            nix::unistd::chown(&log, Some(uid.into()), Some(gid.into())).unwrap();
        }
        let mut c = Command::new(&pg_ctl);
        as_user(&mut c);
        let out = c
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
            ))
            .args(["-w", "-t", "60", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        ControlDb {
            dir,
            port,
            pg_ctl,
            user,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!(
            "postgres://dryrun:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// The password in the URL (tests check it never shows).
    pub fn password() -> &'static str {
        PASSWORD
    }

    /// A plain client, for checks.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    }
}

impl Drop for ControlDb {
    fn drop(&mut self) {
        let mut c = Command::new(&self.pg_ctl);
        {
            use std::os::unix::process::CommandExt as _;
            if let Some((uid, gid)) = self.user {
                c.uid(uid).gid(gid);
            }
        }
        let _ = c
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .output();
    }
}
