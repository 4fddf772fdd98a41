//! Outgoing messages: the signed callback a webhook asked for, and Slack-compatible
//! notifications (`{"text": …}`) on failure and on old backups. They are queued in the
//! persistent outbox (in the control plane, [`crate::control::Control::outbox_add`]) and
//! delivered by [`super::outbox`], so a slow or dead receiver never holds a run's environment or
//! concurrency slot, and a restart loses none.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::report::{RunReport, Status, human_secs};

use super::config::{CallbackConfig, NotifyConfig};
use super::signature;
use crate::control::{Control, OutboxItem, OutboxKind};
use crate::secret::Secret;

/// What queueing and delivering messages needs: the control plane (where the outbox is), the
/// HTTP client, the signing secret, the server's base URL and the `[callbacks]` and `[notify]`
/// settings. Shared by the server (which queues) and the delivery task.
#[derive(Debug)]
pub struct Outbox {
    /// The control plane (its outbox table).
    pub control: Arc<dyn Control>,
    /// Wakes the delivery task when a message is queued.
    pub wake: tokio::sync::Notify,
    /// Messages being delivered by this process right now.
    pub busy: std::sync::atomic::AtomicUsize,
    /// HTTP client: no proxy, no redirects, 10 s per attempt.
    pub http: reqwest::Client,
    /// Signs callbacks (the webhook secret).
    pub secret: Option<Secret>,
    /// Base URL for links.
    pub base_url: String,
    /// `[callbacks]`.
    pub callbacks: CallbackConfig,
    /// `[notify]`.
    pub notify: NotifyConfig,
}

impl Outbox {
    /// Whether a callback URL starts with one of `[callbacks] allow` (and has no user info or
    /// control characters that could make it mean something else to the HTTP client).
    #[must_use]
    pub fn callback_allowed(&self, url: &str) -> bool {
        let parsed_ok = reqwest::Url::parse(url)
            .is_ok_and(|u| u.username().is_empty() && u.password().is_none());
        parsed_ok
            && !url.chars().any(char::is_control)
            && self
                .callbacks
                .allow
                .iter()
                .any(|p| !p.is_empty() && url.starts_with(p.as_str()))
    }
}

/// The summary POSTed to a callback URL.
#[must_use]
pub fn summary(out: &Outbox, rep: &RunReport) -> serde_json::Value {
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
        "status_url": format!("{}/v1/runs/{}", out.base_url, rep.run_id),
        "dashboard_url": format!("{}/runs/{}", out.base_url, rep.run_id),
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

/// Queues the signed summary for the run's callback URL ([`super::outbox`] delivers it).
pub async fn callback(out: &Outbox, url: &str, rep: &RunReport) {
    let body = serde_json::to_string(&summary(out, rep)).unwrap_or_default();
    match out
        .control
        .outbox_add(&rep.run_id, OutboxKind::Callback, Some(url), &body)
        .await
    {
        Ok(_) => {
            let _ = out.control.set_callback(&rep.run_id, "pending").await;
            out.wake.notify_one();
        }
        Err(e) => {
            tracing::error!(run_id = %rep.run_id, error = %e, "cannot queue the callback");
            let _ = out
                .control
                .set_callback(&rep.run_id, &format!("not sent: {e}"))
                .await;
        }
    }
}

/// Queues the callback of a run that ended without running (expired in the queue, or its
/// blueprint no longer loads after a restart): `{"event": "run.expired"|"run.not_run", …}`.
pub async fn callback_not_run(out: &Outbox, url: &str, run_id: &str, status: &str, reason: &str) {
    let body = json!({
        "event": if status == "expired" { "run.expired" } else { "run.not_run" },
        "run_id": run_id,
        "status": status,
        "failure": reason,
        "status_url": format!("{}/v1/runs/{run_id}", out.base_url),
        "dashboard_url": format!("{}/runs/{run_id}", out.base_url),
    })
    .to_string();
    if out
        .control
        .outbox_add(run_id, OutboxKind::Callback, Some(url), &body)
        .await
        .is_ok()
    {
        let _ = out.control.set_callback(run_id, "pending").await;
        out.wake.notify_one();
    }
}

/// Queues the notifications a finished run calls for.
pub async fn notify(out: &Outbox, rep: &RunReport) {
    let mut lines = Vec::new();
    if out.notify.on_failure && rep.status != Status::Passed {
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
    if let (Some(max), Some(b)) = (out.notify.max_backup_age, &rep.backup)
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
    text.push_str(&format!("\n{}/runs/{}", out.base_url, rep.run_id));
    queue_text(out, &rep.run_id, &text).await;
}

/// Queues `{"text": …}` for the notification URL, if one is configured.
pub async fn text(out: &Outbox, text: &str) {
    queue_text(out, "", text).await;
}

async fn queue_text(out: &Outbox, run_id: &str, text: &str) {
    if out.notify.url.is_none() {
        return;
    }
    let body = json!({ "text": text }).to_string();
    match out
        .control
        .outbox_add(run_id, OutboxKind::Notify, None, &body)
        .await
    {
        Ok(_) => out.wake.notify_one(),
        Err(e) => tracing::error!(error = %e, "cannot queue a notification"),
    }
}

/// Attempts and first backoff of a message kind: callbacks as `[callbacks]` says,
/// notifications three times from 500 ms.
#[must_use]
pub fn policy(out: &Outbox, kind: OutboxKind) -> (u32, Duration) {
    match kind {
        OutboxKind::Callback => (out.callbacks.attempts.max(1), out.callbacks.backoff),
        OutboxKind::Notify => (3, Duration::from_millis(500)),
    }
}

/// One delivery attempt of an outbox message. Redirects are not followed (the client is built
/// so): a callback URL passed the allow-list, where a redirect would lead has not. A callback
/// URL is checked against `[callbacks] allow` again, as the config may have changed since it
/// was queued.
///
/// # Errors
/// What went wrong, without the URL (it may hold a token).
pub async fn deliver(out: &Outbox, item: &OutboxItem) -> Result<(), String> {
    let (url, signed) = match item.kind {
        OutboxKind::Callback => {
            let url = item.url.clone().unwrap_or_default();
            if !out.callback_allowed(&url) {
                return Err("the callback URL is no longer in [callbacks] allow".into());
            }
            (url, true)
        }
        OutboxKind::Notify => match &out.notify.url {
            Some(u) => (u.clone(), false),
            None => return Err("[notify] url is no longer configured".into()),
        },
    };
    let mut req = out
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(item.body.clone());
    if signed {
        req = req
            .header("x-dryrun-event", "run.finished")
            .header("x-dryrun-delivery", format!("{}-{}", item.run_id, item.id))
            .header("x-dryrun-attempt", (item.attempts + 1).to_string());
        if let Some(s) = &out.secret {
            req = req.header(
                signature::HEADER,
                signature::sign(s.expose().as_bytes(), item.body.as_bytes()),
            );
        }
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) if r.status().is_redirection() => Err(format!(
            "HTTP {} (redirects are not followed: give the final URL)",
            r.status()
        )),
        Ok(r) => Err(format!("HTTP {}", r.status())),
        Err(e) => Err(if e.is_connect() {
            "connection refused".into()
        } else if e.is_timeout() {
            "no answer within 10 s".into()
        } else {
            // Without the URL: callback URLs may carry tokens.
            e.without_url().to_string()
        }),
    }
}

/// Logs a message given up on (origin only).
pub fn gave_up(item: &OutboxItem, url: Option<&str>, last: &str) {
    tracing::warn!(
        run_id = %item.run_id,
        kind = item.kind.as_str(),
        to = %url.map(origin).unwrap_or_default(),
        last,
        "delivery failed"
    );
}
