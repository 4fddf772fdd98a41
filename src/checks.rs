//! Checks: http, command and sql, each with a per-attempt timeout and retries.
//!
//! Where the action runs is the provider's choice ([`Provider::probe`]): on the runner for the
//! local provider, on the instance through SSM for AWS; the expectations are always compared
//! here. Every result carries the status, the time spent, the number of attempts and a message that
//! says what was expected and what was seen. Output is captured and truncated; secrets are
//! redacted before anything leaves this module.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::blueprint::template::Position;
use crate::blueprint::{Check, CheckSpec};
use crate::process;
use crate::provider::{
    Blame, Outputs, Probe, ProbeAnswer, ProbeOutcome, ProbeRequest, Provider, ResourceRecord,
    RunInfo,
};
use crate::report::{CheckReport, Status};
use crate::secret::Redactor;

/// How much longer than the check's timeout a provider may take to run a check remotely (API
/// calls, delivery, retries with backoff) before the attempt is an error.
#[cfg(not(test))]
const PROBE_GRACE: Duration = Duration::from_secs(120);
#[cfg(test)]
const PROBE_GRACE: Duration = Duration::from_millis(300);

/// Most bytes of output kept in a report.
const OUTPUT_LIMIT: usize = 4000;

/// What a check needs from the run.
pub struct CheckEnv<'a> {
    /// Template context (params, secrets, release, run, resources).
    pub ctx: &'a Value,
    /// Outputs of every resource, by resource name.
    pub outputs: &'a BTreeMap<String, Outputs>,
    /// Redactor of the run.
    pub redactor: &'a Redactor,
    /// Run id (tags command processes).
    pub run_id: &'a str,
    /// Working directory for command checks (the blueprint's directory).
    pub cwd: &'a std::path::Path,
    /// Stops retries and attempts.
    pub cancel: &'a CancellationToken,
    /// The provider, which runs the action where the copy can be reached.
    pub provider: &'a dyn Provider,
    /// The run, as the provider knows it.
    pub run: &'a RunInfo,
    /// Records of the run's resources.
    pub records: &'a [ResourceRecord],
    /// Values of params with a declared `pattern`/`values` ([`crate::blueprint::Blueprint::vetted`]).
    pub vetted: &'a [String],
    /// Environment of command checks run on this machine ([`process::ChildEnv`]).
    pub child_env: &'a process::ChildEnv,
    /// The run's side-effect sinks (`mail` checks read what they received).
    pub sinks: &'a crate::sinks::Sinks,
}

/// Why an attempt gave no verdict, and who is to blame. The release (a template that does not
/// render, a refused connection, a timeout): the check fails. The environment (an API that kept
/// failing, a provider that never answered): nothing was learnt about the release, so the check
/// is an error — the run exits 3, not 1, and does not claim the release would break.
#[derive(Debug)]
struct NoVerdict {
    blame: Blame,
    message: String,
}

impl From<String> for NoVerdict {
    fn from(message: String) -> Self {
        NoVerdict {
            blame: Blame::Release,
            message,
        }
    }
}

/// One attempt's verdict.
struct Verdict {
    passed: bool,
    /// The check could not run from here (the message says why); no retries.
    skipped: bool,
    message: Option<String>,
    output: Option<String>,
}

impl std::fmt::Debug for CheckEnv<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckEnv")
            .field("run_id", &self.run_id)
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

/// Runs a check with its retries and returns the report entry.
pub async fn run(
    check: &Check,
    env: &CheckEnv<'_>,
    mut on_retry: impl FnMut(u32, &str),
) -> CheckReport {
    let started = Instant::now();
    let mut attempts = 0;
    let mut last;
    let mut timings_ms = Vec::new();
    let conn = PgConn::default();
    loop {
        attempts += 1;
        let _ = conn.query_time();
        let began = Instant::now();
        let attempt = tokio::select! {
            v = attempt(check, env, &conn) => v,
            () = env.cancel.cancelled() => Err(NoVerdict::from("cancelled".to_string())),
        };
        last = match attempt {
            _ if env.cancel.is_cancelled() => (
                Status::Skipped,
                Some("skipped: interrupted".to_string()),
                None,
            ),
            Ok(v) => (
                if v.skipped {
                    Status::Skipped
                } else if v.passed {
                    Status::Passed
                } else {
                    Status::Failed
                },
                v.message,
                v.output,
            ),
            Err(NoVerdict {
                blame: Blame::Release,
                message,
            }) => (Status::Failed, Some(message), None),
            Err(NoVerdict {
                blame: Blame::Environment,
                message,
            }) => (
                Status::Error,
                Some(format!("could not run: {message}")),
                None,
            ),
        };
        if last.0 == Status::Passed {
            timings_ms.push(ms(conn.query_time().unwrap_or_else(|| began.elapsed())));
        }
        if matches!(last.0, Status::Passed | Status::Skipped)
            || attempts > check.retries
            || env.cancel.is_cancelled()
        {
            break;
        }
        on_retry(
            attempts,
            &env.redactor.redact(last.1.as_deref().unwrap_or("")),
        );
        tokio::select! {
            () = tokio::time::sleep(check.interval) => {}
            () = env.cancel.cancelled() => break,
        }
    }
    // `repeat: N`: a passing check is timed N times in all; every repetition must pass.
    if last.0 == Status::Passed {
        for n in 2..=check.repeat {
            let _ = conn.query_time();
            let began = Instant::now();
            let v = tokio::select! {
                v = attempt(check, env, &conn) => v,
                () = env.cancel.cancelled() => break,
            };
            match v {
                Ok(v) if v.passed && !v.skipped => {
                    timings_ms.push(ms(conn.query_time().unwrap_or_else(|| began.elapsed())));
                }
                Ok(v) => {
                    last = (
                        Status::Failed,
                        Some(format!(
                            "repetition {n} of {}: {}",
                            check.repeat,
                            v.message.unwrap_or_default()
                        )),
                        v.output,
                    );
                    break;
                }
                Err(e) => {
                    last = (
                        if e.blame == Blame::Release {
                            Status::Failed
                        } else {
                            Status::Error
                        },
                        Some(format!("repetition {n} of {}: {}", check.repeat, e.message)),
                        None,
                    );
                    break;
                }
            }
        }
    }
    CheckReport {
        name: check.name.clone(),
        kind: check.spec.kind(),
        status: last.0,
        duration_ms: ms(started.elapsed()),
        timings_ms,
        attempts,
        message: last.1.map(|m| env.redactor.redact(&m)),
        output: last
            .2
            .map(|o| env.redactor.redact(&process::tail(&o, OUTPUT_LIMIT))),
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A `sql` check's PostgreSQL session, kept from one attempt (and repetition) to the next, and
/// the time its last query took: a check's timing is its query's, never a connection's
/// start-up and password exchange. Taken out while a query runs, so a query cut off by the
/// check's timeout drops its connection with it.
#[derive(Default)]
struct PgConn {
    kept: std::sync::Mutex<Option<(String, tokio_postgres::Client)>>,
    query: std::sync::Mutex<Option<std::time::Duration>>,
}

impl PgConn {
    /// The kept session on `url` if it is still open (`true`), else a new one.
    async fn take(&self, url: &str) -> Result<(tokio_postgres::Client, bool), String> {
        let kept = lock(&self.kept).take();
        match kept {
            Some((u, c)) if u == url && !c.is_closed() => Ok((c, true)),
            _ => Ok((crate::pg::connect(url).await?, false)),
        }
    }

    /// Keeps `c` for the next attempt, out of any transaction the query left open (`BEGIN;
    /// SELECT …` works, and its snapshot and locks must not outlive the attempt).
    async fn keep(&self, url: &str, c: tokio_postgres::Client) {
        if c.batch_execute("ROLLBACK").await.is_ok() {
            *lock(&self.kept) = Some((url.to_string(), c));
        }
    }

    /// How long the last query took, once (`None`: no query ran since).
    fn query_time(&self) -> Option<std::time::Duration> {
        lock(&self.query).take()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn attempt(check: &Check, env: &CheckEnv<'_>, conn: &PgConn) -> Result<Verdict, NoVerdict> {
    if let CheckSpec::Mail {
        count,
        to_contains,
        subject_contains,
    } = &check.spec
    {
        let render = |t: &Option<String>| {
            t.as_ref()
                .map(|s| crate::blueprint::template::render(s, env.ctx))
                .transpose()
        };
        let (to, subject) = (render(to_contains)?, render(subject_contains)?);
        return Ok(mail_verdict(
            &env.sinks.snapshot().mail,
            *count,
            to.as_deref(),
            subject.as_deref(),
        ));
    }
    let probe = render_probe(&check.spec, env)?;
    let req = ProbeRequest {
        check: &check.name,
        probe: &probe,
        records: env.records,
        timeout: check.timeout,
    };
    // A remote probe bounds the action itself by the check's timeout (curl --max-time, SSM's
    // execution timeout: running past it fails the check); the API calls around it may take
    // longer when the API is slow. This limit only catches a provider that never answers.
    let outer = check.timeout + PROBE_GRACE;
    let probed = tokio::time::timeout(outer, env.provider.probe(env.run, req))
        .await
        .map_err(|_| NoVerdict {
            blame: Blame::Environment,
            message: format!(
                "the {} provider did not run it within {}",
                env.provider.name(),
                humantime::format_duration(outer)
            ),
        })?;
    let (answer, via) = match probed.map_err(|e| NoVerdict {
        blame: e.blame(),
        message: e.to_string(),
    })? {
        ProbeOutcome::Local => {
            let local =
                tokio::time::timeout(check.timeout, run_local(&check.name, &probe, env, conn))
                    .await
                    .map_err(|_| {
                        format!(
                            "timed out after {}",
                            humantime::format_duration(check.timeout)
                        )
                    })?;
            (local?, None)
        }
        ProbeOutcome::Remote { answer, via } => (answer, Some(via)),
        ProbeOutcome::Failed { message, via } => {
            return Err(format!("{message} (ran through {via})").into());
        }
        ProbeOutcome::Skipped(reason) => {
            return Ok(Verdict {
                passed: false,
                skipped: true,
                message: Some(reason),
                output: None,
            });
        }
    };
    let mut v = evaluate(&check.spec, env, &probe, answer)?;
    if let Some(via) = via {
        v.message = Some(match v.message {
            Some(m) => format!("{m} (ran through {via})"),
            None => format!("ran through {via}"),
        });
    }
    Ok(v)
}

/// A `mail` check: the mails matching `to`/`subject` (all when neither is given), `count` of
/// them (default: at least one).
fn mail_verdict(
    mail: &[crate::sinks::Mail],
    count: Option<u64>,
    to: Option<&str>,
    subject: Option<&str>,
) -> Verdict {
    let matching = mail
        .iter()
        .filter(|m| to.is_none_or(|t| m.to.iter().any(|r| r.contains(t))))
        .filter(|m| subject.is_none_or(|s| m.subject.contains(s)))
        .count() as u64;
    let mut what = Vec::new();
    if let Some(t) = to {
        what.push(format!("to an address containing \"{t}\""));
    }
    if let Some(s) = subject {
        what.push(format!("with a subject containing \"{s}\""));
    }
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(" {}", what.join(" "))
    };
    let ok = count.map_or(matching > 0, |c| matching == c);
    let problems = if ok {
        Vec::new()
    } else {
        vec![format!(
            "expected {} mail(s){what}, the SMTP sink received {matching} (of {} in all)",
            count.map_or_else(|| "at least 1".to_string(), |c| c.to_string()),
            mail.len()
        )]
    };
    verdict(&problems, "mail", None)
}

/// Renders the check's templates into the action to run.
fn render_probe(spec: &CheckSpec, env: &CheckEnv<'_>) -> Result<Probe, String> {
    Ok(match spec {
        CheckSpec::Http {
            url,
            method,
            headers,
            body,
            ..
        } => Probe::Http {
            method: method.clone(),
            url: url.render(env.ctx)?,
            headers: headers
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.render(env.ctx)?)))
                .collect::<Result<_, String>>()?,
            body: body.as_ref().map(|b| b.render(env.ctx)).transpose()?,
        },
        CheckSpec::Command { run, .. } => Probe::Command {
            run: run.render_in(env.ctx, Position::Shell, env.vetted)?,
        },
        CheckSpec::Sql {
            database, query, ..
        } => Probe::Sql {
            database: database.clone(),
            query: query.render_in(env.ctx, Position::Sql, env.vetted)?,
        },
        CheckSpec::Mail { .. } => return Err("a mail check has no probe".into()),
    })
}

/// Runs the action on this machine (the copy listens on loopback).
async fn run_local(
    name: &str,
    probe: &Probe,
    env: &CheckEnv<'_>,
    conn: &PgConn,
) -> Result<ProbeAnswer, String> {
    match probe {
        Probe::Http {
            method,
            url,
            headers,
            body,
        } => {
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(|e| e.to_string())?;
            let m = reqwest::Method::from_bytes(method.as_bytes())
                .map_err(|e| format!("method {method}: {e}"))?;
            let mut req = client.request(m, url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(b) = body {
                req = req.body(b.clone());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| format!("{method} {url}: {}", describe_reqwest(&e)))?;
            let status = resp.status().as_u16();
            let body = resp
                .text()
                .await
                .map_err(|e| format!("{method} {url}: reading body: {e}"))?;
            Ok(ProbeAnswer::Http { status, body })
        }
        Probe::Command { run } => {
            if let Some(home) = env.child_env.home() {
                crate::state::create_private_dir(&home)
                    .map_err(|e| format!("create {}: {e}", home.display()))?;
            }
            let mut cmd = process::shell(
                run,
                env.cwd,
                env.child_env,
                &BTreeMap::new(),
                env.run_id,
                &format!("check.{name}"),
            );
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let child = cmd.spawn().map_err(|e| format!("cannot start `sh`: {e}"))?;
            let pid = child.id();
            // If the attempt times out, this future is dropped: end the command's process group.
            let guard = KillGroup(pid);
            let out = child
                .wait_with_output()
                .await
                .map_err(|e| format!("waiting for the command: {e}"))?;
            std::mem::forget(guard);
            Ok(ProbeAnswer::Command {
                exit_code: out.status.code(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            })
        }
        Probe::Sql { database, query } => {
            let outs = env
                .outputs
                .get(database)
                .ok_or_else(|| format!("database `{database}` was not created"))?;
            let engine = outs.get("engine").map(|o| o.value.as_str()).unwrap_or("");
            let rows = match engine {
                "sqlite" => {
                    let path = outs
                        .get("path")
                        .map(|o| o.value.clone())
                        .unwrap_or_default();
                    let q2 = query.clone();
                    tokio::task::spawn_blocking(move || sqlite_query(&path, &q2))
                        .await
                        .map_err(|e| e.to_string())??
                }
                "postgres" => {
                    let url = outs.get("url").map(|o| o.value.clone()).unwrap_or_default();
                    postgres_query(&url, query, conn).await?
                }
                other => return Err(format!("sql checks do not support engine `{other}`")),
            };
            Ok(ProbeAnswer::Sql { rows })
        }
    }
}

/// Compares what was seen with the check's expectations.
fn evaluate(
    spec: &CheckSpec,
    env: &CheckEnv<'_>,
    probe: &Probe,
    answer: ProbeAnswer,
) -> Result<Verdict, String> {
    match (spec, answer) {
        (
            CheckSpec::Http {
                status,
                body_contains,
                json,
                ..
            },
            ProbeAnswer::Http { status: got, body },
        ) => {
            let (method, url) = match probe {
                Probe::Http { method, url, .. } => (method.as_str(), url.as_str()),
                _ => ("GET", ""),
            };
            let mut problems = Vec::new();
            if got != *status {
                problems.push(format!("expected status {status}, got {got}"));
            }
            if let Some(needle) = body_contains {
                let needle = crate::blueprint::template::render(needle, env.ctx)?;
                if !body.contains(needle.as_str()) {
                    problems.push(format!("expected body to contain {needle:?}, it does not"));
                }
            }
            if !json.is_empty() {
                match serde_json::from_str::<Value>(&body) {
                    Err(e) => problems.push(format!("expected a JSON body: {e}")),
                    Ok(doc) => {
                        for (ptr, want) in json {
                            let want = &crate::blueprint::template::render(want, env.ctx)?;
                            let ptr_norm = if ptr.starts_with('/') {
                                ptr.clone()
                            } else {
                                format!("/{}", ptr.replace('.', "/"))
                            };
                            match doc.pointer(&ptr_norm) {
                                None => problems
                                    .push(format!("expected JSON {ptr} = {want:?}, it is missing")),
                                Some(v) => {
                                    let got = as_text(v);
                                    if &got != want {
                                        problems.push(format!(
                                            "expected JSON {ptr} = {want:?}, got {got:?}"
                                        ));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Ok(verdict(&problems, &format!("{method} {url}"), Some(body)))
        }
        (
            CheckSpec::Command {
                exit_code,
                output_contains,
                ..
            },
            ProbeAnswer::Command {
                exit_code: code,
                output,
            },
        ) => {
            let mut problems = Vec::new();
            if code != Some(*exit_code) {
                problems.push(format!(
                    "expected exit code {exit_code}, got {}",
                    code.map_or_else(|| "a signal".to_string(), |c| c.to_string())
                ));
            }
            if let Some(needle) = output_contains {
                let needle = crate::blueprint::template::render(needle, env.ctx)?;
                if !output.contains(needle.as_str()) {
                    problems.push(format!(
                        "expected output to contain {needle:?}, it does not"
                    ));
                }
            }
            Ok(verdict(&problems, "command", Some(output)))
        }
        (CheckSpec::Sql { value, rows, .. }, ProbeAnswer::Sql { rows: result }) => {
            let mut problems = Vec::new();
            if let Some(want) = rows
                && result.len() as u64 != *want
            {
                problems.push(format!("expected {want} rows, got {}", result.len()));
            }
            if let Some(want) = value {
                let want = &crate::blueprint::template::render(want, env.ctx)?;
                match result.first().and_then(|r| r.first()) {
                    None => problems.push(format!(
                        "expected value {want:?}, the query returned no rows"
                    )),
                    Some(got) if got != want => {
                        problems.push(format!("expected value {want:?}, got {got:?}"));
                    }
                    Some(_) => {}
                }
            }
            let preview: Vec<String> = result.iter().take(5).map(|r| r.join(" | ")).collect();
            Ok(verdict(&problems, "query", Some(preview.join("\n"))))
        }
        (spec, answer) => Err(format!(
            "the provider answered a {} check with {answer:?}",
            spec.kind()
        )),
    }
}

fn verdict(problems: &[String], what: &str, output: Option<String>) -> Verdict {
    if problems.is_empty() {
        Verdict {
            passed: true,
            skipped: false,
            message: None,
            output,
        }
    } else {
        Verdict {
            passed: false,
            skipped: false,
            message: Some(format!("{what}: {}", problems.join("; "))),
            output,
        }
    }
}

struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let pid = i32::try_from(pid).unwrap_or(0);
            if pid > 0 {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection refused (is the service listening?)".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        e.to_string()
    }
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

fn sqlite_query(path: &str, q: &str) -> Result<Vec<Vec<String>>, String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("open {path}: {e}"))?;
    let mut stmt = conn.prepare(q).map_err(|e| format!("query failed: {e}"))?;
    let n = stmt.column_count();
    let mut rows = stmt.query([]).map_err(|e| format!("query failed: {e}"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| format!("query failed: {e}"))? {
        let mut r = Vec::with_capacity(n);
        for i in 0..n {
            let v: rusqlite::types::Value = row.get(i).map_err(|e| e.to_string())?;
            r.push(match v {
                rusqlite::types::Value::Null => "null".into(),
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Real(f) => f.to_string(),
                rusqlite::types::Value::Text(t) => t,
                rusqlite::types::Value::Blob(b) => format!("<{} bytes>", b.len()),
            });
        }
        out.push(r);
        if out.len() >= 10_000 {
            break;
        }
    }
    Ok(out)
}

async fn postgres_query(url: &str, q: &str, conn: &PgConn) -> Result<Vec<Vec<String>>, String> {
    let (mut client, mut reused) = conn.take(url).await?;
    let msgs = loop {
        let began = Instant::now();
        // simple_query returns every value as text, which is how expectations are written.
        match client.simple_query(q).await {
            Ok(m) => {
                *lock(&conn.query) = Some(began.elapsed());
                break m;
            }
            // The kept session ended meanwhile (the server restarted, the backend was
            // terminated): once more on a new one.
            Err(e)
                if reused
                    && (client.is_closed()
                        || e.is_closed()
                        || e.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)) =>
            {
                client = crate::pg::connect(url).await?;
                reused = false;
            }
            // Not kept: the failed query may have left the session in a failed transaction.
            Err(e) => return Err(format!("query failed: {}", crate::pg::error(&e))),
        }
    };
    conn.keep(url, client).await;
    let mut out = Vec::new();
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            out.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("null").to_string())
                    .collect(),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::Mail;

    fn mail(to: &str, subject: &str) -> Mail {
        Mail {
            from: "shop@example.com".into(),
            to: vec![to.into()],
            subject: subject.into(),
        }
    }

    #[test]
    fn mail_checks_count_the_matching_mails() {
        let got = [
            mail("a@example.com", "Order #1"),
            mail("b@example.com", "Welcome"),
        ];
        assert!(mail_verdict(&got, None, None, None).passed);
        assert!(mail_verdict(&got, Some(2), None, None).passed);
        assert!(mail_verdict(&got, Some(1), Some("a@"), Some("Order")).passed);
        assert!(mail_verdict(&got, Some(0), Some("c@"), None).passed);
        let v = mail_verdict(&got, Some(1), Some("a@"), Some("Welcome"));
        assert!(!v.passed);
        assert_eq!(
            v.message.unwrap(),
            "mail: expected 1 mail(s) to an address containing \"a@\" with a subject containing \"Welcome\", the SMTP sink received 0 (of 2 in all)"
        );
        assert!(!mail_verdict(&[], None, None, None).passed, "none received");
    }
}
