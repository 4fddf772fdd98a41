//! Processes the local provider starts: tagged, grouped, and found again by their tag.
//!
//! Every child gets `DRYRUN_RUN_ID` and `DRYRUN_RESOURCE` in its environment and its own
//! process group. The environment is the local provider's "tag": after a SIGKILL of dryrun,
//! `cleanup` scans /proc for processes that carry the run's id and ends exactly those, so a
//! recycled pid of someone else's process is never signalled.
//!
//! Children inherit nothing else of dryrun's environment ([`ChildEnv`]): the webhook secret,
//! cloud credentials and production passwords that dryrun's own process holds stay with it.
//! Their output reaches the run's log files only through [`LogPump`], which redacts secrets as
//! it writes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;

use crate::secret::Redactor;

/// Variables a child inherits from dryrun's own environment (the rest it does not see):
/// `PATH`, `LANG`, `TZ` and every `LC_*`.
pub const INHERITED: &[&str] = &["PATH", "LANG", "TZ"];

/// `PATH` for children when dryrun has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The environment a child process starts from: `PATH`, `LANG`, `LC_*` and `TZ` from
/// dryrun's environment, `HOME` set to a directory inside the copy, and the variables a
/// blueprint names in `providers.local.pass_env`. Nothing else is inherited; the caller adds
/// the documented `DRYRUN_*` variables and the blueprint's `env`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildEnv {
    vars: BTreeMap<String, String>,
}

impl ChildEnv {
    /// The base environment with `HOME` = `home` and the named variables passed through
    /// (those that are set).
    #[must_use]
    pub fn new(home: &Path, pass: &[String]) -> ChildEnv {
        let mut vars = BTreeMap::new();
        for (k, v) in std::env::vars_os() {
            let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
                continue;
            };
            if INHERITED.contains(&k) || k.starts_with("LC_") || pass.iter().any(|p| p == k) {
                vars.insert(k.to_string(), v.to_string());
            }
        }
        vars.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.to_string());
        vars.insert("HOME".into(), home.display().to_string());
        ChildEnv { vars }
    }

    /// The variables.
    #[must_use]
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }

    /// `HOME` of the children.
    #[must_use]
    pub fn home(&self) -> Option<PathBuf> {
        self.vars.get("HOME").map(PathBuf::from)
    }
}

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Environment variable carrying the run id (the local tag).
pub const RUN_ENV: &str = "DRYRUN_RUN_ID";
/// Environment variable carrying the resource address.
pub const RESOURCE_ENV: &str = "DRYRUN_RESOURCE";

/// A `sh -c` command in its own process group, tagged with the run and resource, with the
/// environment `base` + `env` and nothing else.
#[must_use]
pub fn shell(
    cmdline: &str,
    cwd: &Path,
    base: &ChildEnv,
    env: &BTreeMap<String, String>,
    run_id: &str,
    address: &str,
) -> tokio::process::Command {
    shell_in(None, cmdline, cwd, base, env, (run_id, address))
}

/// [`shell`] run through a wrapper program that ends by executing its arguments (`nsenter
/// --net=PATH --`: the firewall's namespace, [`crate::firewall`]), or directly without one;
/// tagged in the same way.
pub fn shell_in(
    wrapper: Option<&(std::path::PathBuf, Vec<String>)>,
    cmdline: &str,
    cwd: &Path,
    base: &ChildEnv,
    env: &BTreeMap<String, String>,
    (run_id, address): (&str, &str),
) -> tokio::process::Command {
    let mut c = match wrapper {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg("sh");
            c
        }
        None => tokio::process::Command::new("sh"),
    };
    c.arg("-c").arg(cmdline).current_dir(cwd);
    tagged(&mut c, base, env, run_id, address);
    c
}

/// Gives a command the environment `base` + `env` + the tag (clearing everything it would
/// inherit) and puts it in its own process group.
pub fn tagged(
    c: &mut tokio::process::Command,
    base: &ChildEnv,
    env: &BTreeMap<String, String>,
    run_id: &str,
    address: &str,
) {
    c.env_clear()
        .envs(&base.vars)
        .envs(env)
        .env(RUN_ENV, run_id)
        .env(RESOURCE_ENV, address)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
}

/// The hidden `dryrun` subcommand that runs a [detached log pump](spawn_detached_pump).
pub const PUMP_COMMAND: &str = "__log-pump";

/// Starts a log pump in its own process (`dryrun __log-pump FILE`, tagged like the service)
/// and returns it with the write end of its pipe, to be the service's stdout and stderr. It
/// outlives dryrun: a kept copy's service goes on logging — redacted — after `dryrun run` has
/// exited, where a pump inside dryrun would leave it writing into a closed pipe. The secrets
/// travel through the pipe itself, ahead of the output, never through arguments or the
/// environment. The pump ends when the service's output closes (or with the service's tag).
///
/// # Errors
/// When the pipe or the process cannot be made.
pub fn spawn_detached_pump(
    exe: &Path,
    path: &Path,
    redactor: &Redactor,
    base: &ChildEnv,
    run_id: &str,
    address: &str,
) -> std::io::Result<(tokio::process::Child, std::io::PipeWriter)> {
    use std::io::Write as _;
    let (reader, mut writer) = std::io::pipe()?;
    let mut c = tokio::process::Command::new(exe);
    c.arg(PUMP_COMMAND).arg(path);
    tagged(&mut c, base, &BTreeMap::new(), run_id, address);
    c.stdin(reader).stdout(Stdio::null()).stderr(Stdio::null());
    let child = c.spawn()?;
    drop(c);
    let header = serde_json::to_vec(&redactor.forms()).map_err(std::io::Error::other)?;
    writer.write_all(format!("{}\n", header.len()).as_bytes())?;
    writer.write_all(&header)?;
    Ok((child, writer))
}

/// The body of `dryrun __log-pump FILE`: reads the secret forms from stdin (a line with their
/// length, then a JSON list), then copies the rest of stdin into `path` (created 0600),
/// redacted as it goes, until the writers close it.
///
/// # Errors
/// I/O errors; a malformed header.
pub fn log_pump_main(path: &Path) -> std::io::Result<()> {
    use std::io::{BufRead as _, Read as _};
    let mut input = std::io::BufReader::new(std::io::stdin().lock());
    let mut line = String::new();
    input.read_line(&mut line)?;
    let n: usize = line
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("log pump: bad header"))?;
    let mut header = vec![0u8; n];
    input.read_exact(&mut header)?;
    let forms: Vec<String> = serde_json::from_slice(&header).map_err(std::io::Error::other)?;
    let mut stream = Redactor::from_forms(forms).stream();
    let mut file = crate::state::create_private_file(path)?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        file.write_all(&stream.push(&buf[..n]))?;
    }
    file.write_all(&stream.finish())
}

/// Copies a child's stdout and stderr into one log file, redacting every secret the run's
/// [`Redactor`] knows before a byte is written: a secret never reaches the disk, not even
/// when dryrun is killed mid-run (only a possible secret's first bytes are held back, see
/// [`crate::secret::StreamRedactor`]). Invalid UTF-8 is redacted like any other bytes.
#[derive(Debug)]
pub struct LogPump {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl LogPump {
    /// Starts copying the child's piped stdout and stderr to `path` (created 0600).
    ///
    /// # Errors
    /// When the log file cannot be created.
    pub fn start(
        child: &mut tokio::process::Child,
        path: &Path,
        redactor: &Redactor,
    ) -> std::io::Result<LogPump> {
        let file = Arc::new(Mutex::new(crate::state::create_private_file(path)?));
        let mut tasks = Vec::new();
        let mut spawn = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let file = file.clone();
            let mut stream = redactor.stream();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let write = |bytes: &[u8]| {
                    if !bytes.is_empty()
                        && let Ok(mut f) = file.lock()
                    {
                        let _ = f.write_all(bytes);
                    }
                };
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => write(&stream.push(&buf[..n])),
                    }
                }
                write(&stream.finish());
            }));
        };
        if let Some(o) = child.stdout.take() {
            spawn(Box::new(o));
        }
        if let Some(e) = child.stderr.take() {
            spawn(Box::new(e));
        }
        Ok(LogPump { tasks })
    }

    /// Waits until both streams ended, at most `limit` (a process the child left in the
    /// background may keep them open; its later output still goes to the log).
    pub async fn settle(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        for t in &mut self.tasks {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
    }
}

/// A process found in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tagged {
    /// Pid.
    pub pid: i32,
    /// Process group.
    pub pgid: i32,
    /// Resource address from its environment (the process can set it: no control characters).
    pub resource: String,
    /// Command name (the release chooses it: no control characters).
    pub comm: String,
}

/// Live (non-zombie) processes tagged with `run_id` (and `address`, if given).
#[must_use]
pub fn find_tagged(run_id: &str, address: Option<&str>) -> Vec<Tagged> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let want = format!("{RUN_ENV}={run_id}");
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let Ok(environ) = std::fs::read(ent.path().join("environ")) else {
            continue;
        };
        let mut has_run = false;
        let mut resource = String::new();
        for var in environ.split(|b| *b == 0) {
            if var == want.as_bytes() {
                has_run = true;
            } else if let Some(r) = var.strip_prefix(format!("{RESOURCE_ENV}=").as_bytes()) {
                resource = String::from_utf8_lossy(r).into_owned();
            }
        }
        if !has_run || address.is_some_and(|a| a != resource) {
            continue;
        }
        let Some((state, pgid, comm)) = stat(pid) else {
            continue;
        };
        if state == 'Z' || state == 'X' {
            continue;
        }
        // Both end up in messages that `dryrun cleanup` prints to a terminal.
        out.push(Tagged {
            pid,
            pgid,
            resource: crate::sinks::clean(&resource, 200),
            comm: crate::sinks::clean(&comm, 64),
        });
    }
    out
}

/// State, process group and command name from /proc/PID/stat.
fn stat(pid: i32) -> Option<(char, i32, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let mut rest = s[close + 2..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let pgid = rest.next()?.parse().ok()?;
    Some((state, pgid, comm))
}

/// Whether `pid` is alive (not a zombie).
#[must_use]
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|(s, _, _)| s != 'Z' && s != 'X')
}

/// Ends every process tagged with `run_id` (and `address`): SIGTERM to each and to its group
/// when the group leader is tagged too, then SIGKILL to what is left after `grace`. Returns
/// the processes that were still alive after SIGKILL (normally none).
pub async fn end_tagged(run_id: &str, address: Option<&str>, grace: Duration) -> Vec<Tagged> {
    let procs = find_tagged(run_id, address);
    if procs.is_empty() {
        return procs;
    }
    signal_all(&procs, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        let left = find_tagged(run_id, address);
        if left.is_empty() {
            return left;
        }
        if Instant::now() >= deadline {
            signal_all(&left, Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = find_tagged(run_id, address);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn signal_all(procs: &[Tagged], sig: Signal) {
    let tagged_pids: Vec<i32> = procs.iter().map(|p| p.pid).collect();
    for p in procs {
        // Signal the whole group only if its leader is one of ours.
        if tagged_pids.contains(&p.pgid) {
            let _ = killpg(Pid::from_raw(p.pgid), sig);
        }
        let _ = kill(Pid::from_raw(p.pid), sig);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it soon after).
///
/// # Errors
/// If no port can be bound.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// The last `max` bytes of a text, cut at a line start, with a marker when cut.
#[must_use]
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.trim_end().to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let cut = &text[start..];
    let cut = cut.find('\n').map_or(cut, |i| &cut[i + 1..]);
    format!(
        "[… {} bytes cut …]\n{}",
        text.len() - cut.len(),
        cut.trim_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_name_and_resource_the_release_chose_carry_no_control_characters() {
        let dir = tempfile::tempdir().unwrap();
        // A shell started under a name with an escape sequence: its comm is that name (a
        // shell, not sleep, which may be a multi-call binary that picks its applet by name).
        let evil = dir.path().join("z\u{1b}]0;t\u{7}q");
        std::os::unix::fs::symlink("/bin/sh", &evil).unwrap();
        let run_id = format!("process-test-{}", std::process::id());
        let env: BTreeMap<String, String> =
            [("EVIL".to_string(), evil.display().to_string())].into();
        let mut child = shell(
            "exec \"$EVIL\" -c 'while :; do sleep 1; done'",
            dir.path(),
            &ChildEnv::new(dir.path(), &[]),
            &env,
            &run_id,
            "service.a\u{1b}[2Jb",
        )
        // Ended even when an assertion below fails first.
        .kill_on_drop(true)
        .spawn()
        .unwrap();
        let start = std::time::Instant::now();
        let found = loop {
            let f = find_tagged(&run_id, None);
            if f.iter().any(|p| p.comm.starts_with('z')) {
                break f;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{f:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The resource filter still matches the address as it was given.
        assert!(!find_tagged(&run_id, Some("service.a\u{1b}[2Jb")).is_empty());
        let left = end_tagged(&run_id, None, Duration::from_secs(2)).await;
        let _ = child.wait().await;
        assert!(left.is_empty(), "{left:?}");
        let p = found.iter().find(|p| p.comm.starts_with('z')).unwrap();
        assert_eq!(p.comm, "z]0;tq");
        assert_eq!(p.resource, "service.a[2Jb");
    }
}
