//! Headless Chromium for browser tests, driven over WebDriver: a `chromedriver` started on a
//! free 127.0.0.1 port in its own process group, with a fresh Chromium profile, killed (the
//! whole group) when dropped, also when the test fails.
//!
//! Chromium and chromedriver come from Debian's `chromium` and `chromium-driver` packages
//! (scripts/test installs them). Without them a test skips, except in CI (`CI` set), where it
//! fails.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::json;

use super::server::free_port;

/// The Chromium binary (a wrapper script of the Debian package).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The WebDriver server for it.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Flags for a quiet, loopback-only headless Chromium. Besides the usual headless flags, the
/// host resolver resolves no name and every proxied request goes to a closed loopback port, so
/// the browser cannot reach anything but the IP literal of the server under test.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1;[::1]",
    "--window-size=1280,1400",
];

/// A running chromedriver.
pub struct ChromeDriver {
    child: Option<Child>,
    /// Its WebDriver URL (`http://127.0.0.1:PORT`).
    pub url: String,
    dir: tempfile::TempDir,
}

/// Whether Chromium and chromedriver are installed. In CI they must be (scripts/test installs
/// them), so a missing install fails there instead of skipping.
pub fn have_chromium() -> bool {
    let found = Path::new(CHROMIUM).is_file() && Path::new(CHROMEDRIVER).is_file();
    if !found && std::env::var_os("CI").is_some() {
        panic!(
            "{CHROMIUM} or {CHROMEDRIVER} is missing in CI: scripts/test must install the Debian packages chromium and chromium-driver"
        );
    }
    if !found {
        eprintln!(
            "skipping: {CHROMIUM} or {CHROMEDRIVER} not installed (apt-get install chromium chromium-driver; scripts/test does)"
        );
    }
    found
}

impl ChromeDriver {
    /// Starts chromedriver on a free loopback port and waits until it answers `/status`.
    /// `None` (with a message) when Chromium is not installed outside CI.
    pub fn start() -> Option<ChromeDriver> {
        if !have_chromium() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("dryrun-browser-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("chromedriver.log")).unwrap();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group: Drop kills chromedriver and the Chromium it started.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {CHROMEDRIVER}: {e}"));
        let mut d = ChromeDriver {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        d.wait_ready(port);
        Some(d)
    }

    fn wait_ready(&mut self, port: u16) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("chromedriver exited {status}:\n{}", self.log());
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(
                    b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                );
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                if resp.contains("\"ready\":true") {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver not ready after 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A new WebDriver session: headless Chromium with [`FLAGS`] and a fresh profile.
    pub async fn session(&self) -> Client {
        let profile = tempfile::Builder::new()
            .prefix("profile-")
            .tempdir_in(self.dir.path())
            .unwrap()
            .keep();
        let mut args: Vec<String> = FLAGS.iter().map(|s| (*s).to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("WebDriver session: {e}\n{}", self.log()))
    }

    /// A scratch directory that lives as long as the driver (screenshots).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// chromedriver's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }

    /// Where a file of the test goes: the scratch directory, or `DRYRUN_TEST_ARTIFACTS` when
    /// set (so that a person can look at a screenshot after the test).
    pub fn artifact(&self, name: &str) -> PathBuf {
        match std::env::var_os("DRYRUN_TEST_ARTIFACTS") {
            Some(d) => {
                std::fs::create_dir_all(&d).unwrap();
                PathBuf::from(d).join(name)
            }
            None => self.dir.path().join(name),
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The group id is chromedriver's pid (process_group(0)); Chromium and its helpers
            // inherit the group.
            let pgid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}
