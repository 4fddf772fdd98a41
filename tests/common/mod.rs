//! Shared helpers for the integration tests: run the real `dryrun` binary against a fresh
//! state directory and check that nothing of a run is left.
#![allow(dead_code)]

pub mod browser;
pub mod pg;
pub mod server;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `dryrun` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dryrun"))
}

/// A state directory that an unprivileged PostgreSQL user can traverse (tests run as root in CI).
pub fn state_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("dryrun-test-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A `dryrun` command with the state directory set, run from the repository root.
pub fn dryrun(state: &Path) -> Command {
    let mut c = Command::new(bin());
    c.current_dir(root())
        .env("DRYRUN_STATE_DIR", state)
        .env("NO_COLOR", "1")
        .env_remove("DEMO_API_TOKEN");
    c
}

/// Runs and returns the output; prints it when the test fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run dryrun");
    eprintln!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The demo app must be built next to dryrun (scripts/test builds the workspace first).
pub fn require_demo_shop() {
    let p = bin().parent().unwrap().join("demo-shop");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace`; scripts/test does)",
        p.display()
    );
}

/// Whether PostgreSQL server binaries are installed. In CI they must be (scripts/test installs
/// them), so a missing install fails there instead of skipping.
pub fn have_postgres() -> bool {
    let found = dryrun::provider::local::postgres::binary("initdb").is_ok()
        && dryrun::provider::local::postgres::binary("pg_restore").is_ok();
    if !found && std::env::var_os("CI").is_some() {
        panic!("PostgreSQL binaries are missing in CI: scripts/test must install them");
    }
    if !found {
        eprintln!(
            "skipping: PostgreSQL server binaries not installed (apt-get install postgresql)"
        );
    }
    found
}

/// Run ids in a state directory.
pub fn run_ids(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state.join("runs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Asserts that no process or directory of the run remains.
pub fn assert_nothing_left(state: &Path, run_id: &str) {
    let procs = dryrun::process::find_tagged(run_id, None);
    assert!(procs.is_empty(), "processes of {run_id} remain: {procs:?}");
    let work = state.join("copies").join(run_id);
    assert!(!work.exists(), "work directory {} remains", work.display());
    let builds: Vec<_> = std::fs::read_dir(state.join("golden"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".building-") && n.ends_with(&format!(".{run_id}")))
        .collect();
    assert!(
        builds.is_empty(),
        "unfinished golden copies of {run_id} remain: {builds:?}"
    );
}

/// The report.json of a run from its history directory.
pub fn report(state: &Path, run_id: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(state.join("runs").join(run_id).join("report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Ends leftovers of a failed test so that one failure does not leak processes.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .env("DRYRUN_STATE_DIR", &self.0)
            .args(["cleanup", "--all", "--yes"])
            .output();
    }
}

/// The forms in which a secret could leak: raw, hex (both cases), base64 (standard and
/// URL-safe, at each of the three alignments it can have inside a longer encoded text, e.g.
/// `user:password` in a Basic auth header), percent-encoded (URL and form), HTML-escaped (as
/// templates write it) and JSON-escaped.
pub fn canary_forms(canary: &str) -> Vec<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let mut forms = vec![
        canary.to_string(),
        hex::encode(canary),
        hex::encode_upper(canary),
    ];
    for offset in 0..3usize {
        let mut bytes = vec![b'x'; offset];
        bytes.extend_from_slice(canary.as_bytes());
        let whole = bytes.len() / 3 * 4; // characters of complete groups
        let start = if offset == 0 { 0 } else { 4 };
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let enc = engine.encode(&bytes);
            if whole > start + 8 {
                forms.push(enc[start..whole].to_string());
            }
        }
    }
    let percent = |space_plus: bool| {
        canary
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' if space_plus => "+".to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    forms.push(percent(false));
    forms.push(percent(true));
    forms.push(percent(false).to_lowercase());
    let html: String = canary
        .chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#x27;".to_string(),
            '`' => "&#x60;".to_string(),
            '=' => "&#x3D;".to_string(),
            '/' => "&#x2F;".to_string(),
            c => c.to_string(),
        })
        .collect();
    forms.push(html);
    forms.push(
        serde_json::to_string(canary)
            .unwrap()
            .trim_matches('"')
            .to_string(),
    );
    forms.sort();
    forms.dedup();
    forms
}

/// Panics if any form of any canary occurs in `text`; `what` names where it was found.
pub fn assert_no_canary(what: &str, text: &[u8], forms: &[String]) {
    let text = String::from_utf8_lossy(text);
    for f in forms {
        assert!(
            !text.contains(f.as_str()),
            "canary form `{f}` found in {what}"
        );
    }
}

/// [`assert_no_canary`] over every file under `dir` (binary files too: SQLite, gzip are read as
/// bytes); returns the number of files searched.
pub fn assert_no_canary_in_dir(dir: &Path, forms: &[String]) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            n += assert_no_canary_in_dir(&p, forms);
        } else if ft.is_file()
            && let Ok(bytes) = std::fs::read(&p)
        {
            assert_no_canary(&p.display().to_string(), &bytes, forms);
            n += 1;
        }
    }
    n
}
