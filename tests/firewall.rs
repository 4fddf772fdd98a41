//! The side-effect firewall of the local provider, end to end with the real binary: the
//! release's install steps and service run confined to loopback; what they send to the sinks
//! is recorded; what they try elsewhere is refused and recorded; `firewall.allow` opens a door.
//!
//! Traffic stays on this machine: the one off-loopback destination tried (192.0.2.10, the
//! RFC 5737 documentation range) is tried only from inside the run's network namespace, which
//! has no link to any network, under `firewall: required` (a run that cannot confine its
//! release stops before install).

mod common;

use std::io::Read as _;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A TCP server on `addr` that counts connections and answers `hello`.
fn counting_server(addr: &str) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut s = s;
            let _ = std::io::Write::write_all(&mut s, b"hello\n");
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf);
        }
    });
    (port, n)
}

const PROBE: &str = r#"
import os, smtplib, socket, sys, urllib.request
def tcp(host, port):
    try:
        s = socket.create_connection((host, int(port)), timeout=3)
        data = s.recv(16)
        s.close()
        return "connected " + data.decode().strip()
    except OSError as e:
        return "refused " + type(e).__name__
print("documentation-net:", tcp("192.0.2.10", 80))
print("unlisted-loopback:", tcp("127.0.0.2", os.environ["UNLISTED_PORT"]))
print("allowed:", tcp("127.0.0.3", os.environ["ALLOWED_PORT"]))
with smtplib.SMTP(os.environ["SMTP_HOST"], int(os.environ["SMTP_PORT"]), timeout=5) as m:
    m.sendmail("shop@example.com", ["buyer.1@example.com"], "Subject: Order confirmation #1\r\n\r\nthanks\r\n")
print("mail: sent")
r = urllib.request.urlopen(urllib.request.Request(os.environ["HOOK_URL"] + "/v1/charges?amount=5", data=b"x", method="POST"), timeout=5)
print("http:", r.status)
"#;

fn release(dir: &Path) -> std::path::PathBuf {
    let r = dir.join("release");
    std::fs::create_dir_all(&r).unwrap();
    std::fs::write(r.join("probe.py"), PROBE).unwrap();
    std::fs::write(
        r.join("dryrun-release.yaml"),
        "version: \"1.0.0\"\ninstall:\n  - name: probe\n    run: python3 probe.py\nstart: exec python3 -m http.server \"$PORT\" --bind 127.0.0.1\nhealth:\n  http: /probe.py\n  timeout: 20s\n",
    )
    .unwrap();
    r
}

#[test]
fn the_release_reaches_only_loopback_doors_and_its_attempts_and_mail_are_recorded() {
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let (unlisted, unlisted_hits) = counting_server("127.0.0.2:0");
    let (allowed, allowed_hits) = counting_server("127.0.0.3:0");
    let rel = release(dir.path());
    let bp = dir.path().join("fw.yaml");
    std::fs::write(
        &bp,
        format!(
            r#"name: fw
firewall:
  mode: required
  allow: ["127.0.0.3:{allowed}"]
resources:
  app:
    type: service
    env:
      SMTP_HOST: "{{{{sinks.smtp.host}}}}"
      SMTP_PORT: "{{{{sinks.smtp.port}}}}"
      HOOK_URL: "{{{{sinks.http.url}}}}"
      UNLISTED_PORT: "{unlisted}"
      ALLOWED_PORT: "{allowed}"
checks:
  - name: served-through-the-relay
    type: http
    url: "{{{{resources.app.url}}}}/probe.py"
  - name: confirmation-mailed
    type: mail
    expect: {{count: 1, to_contains: "buyer.1@", subject_contains: Order confirmation}}
  - name: no-mail-to-others
    type: mail
    expect: {{count: 0, to_contains: "someone-else@"}}
"#
        ),
    )
    .unwrap();
    let out = common::run(
        common::dryrun(state.path())
            .arg("run")
            .arg(&bp)
            .arg("--release")
            .arg(&rel),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "the run passes");
    let id = common::run_ids(state.path()).pop().unwrap();
    let log = std::fs::read_to_string(
        state
            .path()
            .join("runs")
            .join(&id)
            .join("logs/app.install.probe.log"),
    )
    .unwrap();
    assert!(
        log.contains("documentation-net: refused ConnectionRefusedError"),
        "{log}"
    );
    assert!(log.contains("unlisted-loopback: refused"), "{log}");
    assert!(log.contains("allowed: connected hello"), "{log}");
    assert!(
        log.contains("mail: sent") && log.contains("http: 200"),
        "{log}"
    );
    assert_eq!(
        unlisted_hits.load(Ordering::SeqCst),
        0,
        "the unlisted server was reached"
    );
    assert_eq!(
        allowed_hits.load(Ordering::SeqCst),
        1,
        "the allowed server was not reached"
    );

    let report = common::report(state.path(), &id);
    assert_eq!(report["firewall"]["enforced"], true, "{report}");
    assert_eq!(report["firewall"]["mode"], "required");
    let se = &report["side_effects"];
    assert!(
        se["blocked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == "192.0.2.10:80"),
        "{se}"
    );
    assert_eq!(se["mail"][0]["to"][0], "buyer.1@example.com");
    assert_eq!(se["mail"][0]["subject"], "Order confirmation #1");
    assert_eq!(se["http"][0]["method"], "POST");
    assert_eq!(se["http"][0]["path"], "/v1/charges");
    assert!(stdout.contains("firewall: enforced"), "{stdout}");
    assert!(
        stdout.contains("blocked: the release tried to connect to")
            && stdout.contains("192.0.2.10:80")
    );
    assert!(stdout.contains("mail (sink): shop@example.com -> buyer.1@example.com"));
    common::assert_nothing_left(state.path(), &id);
}

#[test]
fn a_required_firewall_that_cannot_be_made_stops_the_run_before_install() {
    // dryrun without CAP_SYS_ADMIN (setpriv drops it from the bounding set) cannot make a
    // network namespace: `required` stops the run, `auto` runs and says it was not enforced.
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .find(|p| Path::new(p).is_file())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "setpriv (util-linux) is missing in CI"
        );
        return;
    };
    let state = common::state_dir();
    let _reaper = common::Reaper(state.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    // A release that tries no connection at all: in `auto` mode it runs unconfined.
    let rel = dir.path().join("noop");
    std::fs::create_dir_all(&rel).unwrap();
    std::fs::write(
        rel.join("dryrun-release.yaml"),
        "version: \"1.0.0\"\ninstall:\n  - name: noop\n    run: echo installed\n",
    )
    .unwrap();
    for (mode, code) in [("required", 3), ("auto", 0)] {
        let bp = dir.path().join(format!("{mode}.yaml"));
        std::fs::write(
            &bp,
            format!("name: fw-{mode}\nfirewall: {mode}\nresources:\n  app:\n    type: service\n"),
        )
        .unwrap();
        let mut cmd = std::process::Command::new(setpriv);
        cmd.args(["--bounding-set=-sys_admin", "--"])
            .arg(common::bin())
            .current_dir(common::root())
            .env("DRYRUN_STATE_DIR", state.path())
            .env("NO_COLOR", "1");
        let out = common::run(cmd.arg("run").arg(&bp).arg("--release").arg(&rel));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{text}");
        let id = common::run_ids(state.path())
            .into_iter()
            .find(|r| r.starts_with(&format!("fw-{mode}-")))
            .unwrap();
        let log = state
            .path()
            .join("runs")
            .join(&id)
            .join("logs/app.install.noop.log");
        if mode == "required" {
            assert!(
                text.contains("`firewall: required`, but the release cannot be confined"),
                "{text}"
            );
            assert!(!log.exists(), "no install step ran");
        } else {
            assert!(log.exists(), "the install step ran");
            assert!(
                text.contains("firewall: NOT enforced: cannot create a network namespace"),
                "{text}"
            );
            assert_eq!(
                common::report(state.path(), &id)["firewall"]["enforced"],
                false
            );
        }
    }
}
