//! Outgoing messages: the signed callback a webhook asked for, and Slack-compatible
//! notifications (`{"text": …}`) on failure and on old backups.

use std::time::Duration;

use serde_json::json;

use crate::report::{RunReport, Status, human_secs};

use super::jobs::App;
use super::signature;

/// The summary POSTed to a callback URL.
#[must_use]
pub fn summary(app: &App, rep: &RunReport) -> serde_json::Value {
    json!({
        "event": "run.finished",
        "run_id": rep.run_id,
        "blueprint": rep.blueprint,
        "provider": rep.provider,
        "trigger": rep.trigger,
        "status": rep.status,
        "exit_code": rep.exit_code,
        "release": rep.release,
        "backup": rep.backup,
        "started_at": rep.started_at,
        "finished_at": rep.finished_at,
        "duration_ms": rep.duration_ms,
        "failure": rep.failure,
        "checks": {"passed": rep.count_checks(Status::Passed), "failed": rep.count_checks(Status::Failed), "error": rep.count_checks(Status::Error), "total": rep.checks.len()},
        "left_behind": rep.left_behind.len(),
        "status_url": format!("{}/v1/runs/{}", app.base_url, rep.run_id),
        "dashboard_url": format!("{}/runs/{}", app.base_url, rep.run_id),
    })
}

/// `scheme://host:port` of a URL, for logs: paths and queries of callback and chat webhook
/// URLs often hold their tokens.
fn origin(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(
        |_| "(invalid url)".to_string(),
        |u| u.origin().ascii_serialization(),
    )
}

/// POSTs the signed summary with retries and exponential backoff; returns the outcome for
/// the history (`delivered (attempt N)` or `failed: …`).
pub async fn callback(app: &App, url: &str, rep: &RunReport) -> String {
    let body = serde_json::to_vec(&summary(app, rep)).unwrap_or_default();
    let sig = app
        .secret
        .as_ref()
        .map(|s| signature::sign(s.expose().as_bytes(), &body));
    let attempts = app.cfg.callbacks.attempts.max(1);
    let mut backoff = app.cfg.callbacks.backoff;
    let mut last = String::new();
    for attempt in 1..=attempts {
        let mut req = app
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("x-dryrun-event", "run.finished")
            .header("x-dryrun-delivery", format!("{}-{attempt}", rep.run_id))
            .body(body.clone());
        if let Some(s) = &sig {
            req = req.header(signature::HEADER, s);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => return format!("delivered (attempt {attempt})"),
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => {
                last = if e.is_connect() {
                    "connection refused".into()
                } else {
                    // Without the URL: callback URLs may carry tokens.
                    e.without_url().to_string()
                }
            }
        }
        if attempt < attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }
    tracing::warn!(run_id = %rep.run_id, to = %origin(url), last, "callback failed");
    format!("failed after {attempts} attempts: {last}")
}

/// Sends the notifications a finished run calls for.
pub async fn notify(app: &App, rep: &RunReport) {
    let mut lines = Vec::new();
    if app.cfg.notify.on_failure && rep.status != Status::Passed {
        lines.push(format!(
            "dryrun: {} of release {} on {} {} ({}){}",
            rep.blueprint,
            rep.release
                .version
                .as_deref()
                .unwrap_or(&rep.release.reference),
            rep.provider,
            rep.status.as_str().to_uppercase(),
            rep.run_id,
            rep.failure
                .as_ref()
                .map(|f| format!("\n{}", f.lines().take(6).collect::<Vec<_>>().join("\n")))
                .unwrap_or_default()
        ));
    }
    if let (Some(max), Some(b)) = (app.cfg.notify.max_backup_age, &rep.backup)
        && b.age_seconds > i64::try_from(max.as_secs()).unwrap_or(i64::MAX)
    {
        lines.push(format!(
            "dryrun: the latest backup of {} ({}) is {} old, more than the {} allowed",
            b.source,
            b.id,
            human_secs(b.age_seconds),
            humantime::format_duration(max)
        ));
    }
    if !rep.left_behind.is_empty() {
        lines.push(format!(
            "dryrun: run {} left {} item(s) behind; `dryrun cleanup {}` lists them",
            rep.run_id,
            rep.left_behind.len(),
            rep.run_id
        ));
    }
    if lines.is_empty() {
        return;
    }
    let mut text = lines.join("\n");
    text.push_str(&format!("\n{}/runs/{}", app.base_url, rep.run_id));
    self::text(app, &text).await;
}

/// POSTs `{"text": …}` to the notification URL, if configured (three attempts).
pub async fn text(app: &App, text: &str) {
    let Some(url) = &app.cfg.notify.url else {
        return;
    };
    let body = json!({ "text": text });
    for attempt in 1..=3u32 {
        match app.http.post(url).json(&body).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(status = %r.status(), attempt, "notification refused"),
            Err(e) => tracing::warn!(error = %e.without_url(), attempt, "notification failed"),
        }
        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
    }
}
