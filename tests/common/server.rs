//! A real `dryrun serve` for integration tests: started on a free 127.0.0.1 port with its own
//! state directory and config, ended (SIGTERM, then SIGKILL) when dropped.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bin, root, state_dir};

/// Secret the test servers use.
pub const SECRET: &str = "test-webhook-secret-8c2f";

/// A running server.
pub struct Server {
    pub child: Option<Child>,
    /// Webhook secret ([`SECRET`] unless started with another).
    pub secret: String,
    /// Extra environment of the server process.
    pub env: Vec<(String, String)>,
    pub state: PathBuf,
    pub url: String,
    pub port: u16,
    pub config: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts a server with `extra` appended to its config (TOML) and the repository's
    /// blueprints/ as its root.
    pub fn start(extra: &str) -> Server {
        Self::start_with_root(&root().join("blueprints"), extra)
    }

    /// Starts a server whose blueprints root is `blueprints`.
    pub fn start_with_root(blueprints: &Path, extra: &str) -> Server {
        Self::start_with_env(blueprints, extra, SECRET, &[])
    }

    /// Starts a server with its own webhook secret and extra environment variables.
    pub fn start_with_env(
        blueprints: &Path,
        extra: &str,
        secret: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let dir = state_dir();
        let state = dir.path().join("state");
        let config = dir.path().join("dryrun.toml");
        let port = free_port();
        std::fs::write(&config, format!("listen = \"127.0.0.1:{port}\"\nblueprints = \"{}\"\nshutdown_grace = \"20s\"\n{extra}", blueprints.display())).unwrap();
        let mut s = Server {
            child: None,
            state,
            url: format!("http://127.0.0.1:{port}"),
            port,
            config,
            secret: secret.to_string(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            _dir: Some(dir),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(bin())
            .current_dir(root())
            .env("DRYRUN_STATE_DIR", &self.state)
            .env("DRYRUN_WEBHOOK_SECRET", &self.secret)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "dryrun serve did not start"
            );
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let mut err = String::new();
                let _ = self
                    .child
                    .as_mut()
                    .unwrap()
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err);
                panic!("dryrun serve exited {status}: {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops with SIGTERM and waits; returns the exit code and stderr.
    pub fn stop(&mut self) -> (Option<i32>, String) {
        let Some(mut child) = self.child.take() else {
            return (None, String::new());
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if start.elapsed() > Duration::from_secs(40) {
                let _ = child.kill();
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        eprintln!("--- server stderr\n{err}");
        (status.and_then(|s| s.code()), err)
    }

    /// Kills the server with SIGKILL (a crash).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same server again (same state and config).
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    /// The server's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The state directory.
    pub fn state(&self) -> &Path {
        &self.state
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(bin())
            .env("DRYRUN_STATE_DIR", &self.state)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["cleanup", "--all", "--yes"])
            .output();
    }
}

/// `sha256=…` of a body with the test secret.
pub fn sign(body: &[u8]) -> String {
    dryrun::server::signature::sign(SECRET.as_bytes(), body)
}

/// POSTs a webhook signed with the test secret; returns status and JSON body.
pub async fn hook(url: &str, body: &str, delivery: &str) -> (u16, serde_json::Value) {
    hook_signed(url, SECRET, body, delivery).await
}

/// POSTs a webhook signed with `secret`; returns status and JSON body.
pub async fn hook_signed(
    url: &str,
    secret: &str,
    body: &str,
    delivery: &str,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/hooks/dryrun"))
        .header(
            "x-hub-signature-256",
            dryrun::server::signature::sign(secret.as_bytes(), body.as_bytes()),
        )
        .header("x-dryrun-delivery", delivery)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// GETs JSON.
pub async fn get(url: &str) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Waits until the run has a final status; returns the run JSON (`run` + `report`).
pub async fn wait_done(url: &str, run_id: &str, limit: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let v = get(&format!("{url}/v1/runs/{run_id}")).await;
        let st = v["run"]["status"].as_str().unwrap_or("").to_string();
        if !st.is_empty() && st != "queued" && st != "running" {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "run {run_id} still {st} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
