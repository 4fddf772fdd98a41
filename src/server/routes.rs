//! HTTP routes: the portal webhook and the JSON API (`/v1/…`), `/metrics`, `/healthz`; the
//! dashboard's pages come from [`super::dashboard`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::json;

use super::jobs::{App, RunRequest, SubmitError, Submitted};
use super::signature;
use super::webhook::{self, HookHeaders, Verified};
use crate::control::{RunRow, RunStatus};

/// Largest webhook body accepted; larger ones get 413 without being read whole.
pub const MAX_BODY: usize = 1 << 20;

/// The whole router, behind [`guard`].
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/v1/hooks/dryrun",
            post(hook).layer(DefaultBodyLimit::max(MAX_BODY)),
        )
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/junit.xml", get(junit))
        .route("/v1/runs/{id}/logs", get(logs))
        .route("/v1/trend", get(trend))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(super::dashboard::routes())
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// What every request passes before its handler (rules in [`super::auth`]): the `Host` must be
/// one of the server's (DNS rebinding), an `Origin` must be too, a state-changing request may
/// not be cross-site, and with tokens configured the caller needs the route's role. The signed
/// webhook authenticates with its HMAC instead; `/healthz` is open.
async fn guard(
    State(app): State<Arc<App>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return next.run(req).await;
    }
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !app.hosts.allows(host) {
        app.metrics.rejected("host");
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "this server does not answer to that Host; reach it by its listen address, localhost or public_url, or add the name to allowed_hosts",
        );
    }
    if path == "/v1/hooks/dryrun" {
        return next.run(req).await;
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
        && !app.hosts.allows_origin(origin)
    {
        app.metrics.rejected("origin");
        return error(
            StatusCode::FORBIDDEN,
            "requests from another origin are refused",
        );
    }
    let changes = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if changes && headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) == Some("cross-site")
    {
        app.metrics.rejected("cross_site");
        return error(StatusCode::FORBIDDEN, "cross-site requests are refused");
    }
    if !app.auth.enabled() || path == "/login" || path == "/logout" {
        return next.run(req).await;
    }
    let need = if changes {
        super::auth::Role::Run
    } else {
        super::auth::Role::Read
    };
    match app.auth.identify(headers) {
        Some(p) if p.role >= need => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Some(p) => {
            app.metrics.rejected("role");
            error(
                StatusCode::FORBIDDEN,
                format!(
                    "`{}` has the {} role; this needs {}",
                    p.name,
                    p.role.as_str(),
                    need.as_str()
                ),
            )
        }
        None if !changes && (path == "/" || path.starts_with("/runs/")) => {
            axum::response::Redirect::to("/login").into_response()
        }
        None => {
            app.metrics.rejected("unauthenticated");
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "authentication required: send `Authorization: Bearer TOKEN`, or log in on /login",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"dryrun\""),
            );
            r
        }
    }
}

pub(crate) fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn accepted(app: &App, row: &RunRow, status: StatusCode, duplicate: bool) -> Response {
    let body = json!({
        "run_id": row.run_id,
        "status": row.status,
        "status_url": format!("{}/v1/runs/{}", app.base_url, row.run_id),
        "dashboard_url": format!("{}/runs/{}", app.base_url, row.run_id),
        "duplicate": duplicate,
    });
    (status, Json(body)).into_response()
}

pub(crate) fn submit_error(app: &App, e: &SubmitError) -> Response {
    let reason = match e {
        SubmitError::BadPath(_) => "bad_path",
        SubmitError::Invalid(_) => "invalid",
        SubmitError::CallbackNotAllowed(_) => "callback_not_allowed",
        SubmitError::QueueFull(_) => "queue_full",
        SubmitError::Unavailable(_) => "provider",
        SubmitError::ShuttingDown => "shutting_down",
        SubmitError::Control(_) => "control",
    };
    app.metrics.rejected(reason);
    match e {
        SubmitError::BadPath(m) => error(StatusCode::BAD_REQUEST, m.clone()),
        SubmitError::Invalid(m) => error(StatusCode::UNPROCESSABLE_ENTITY, m.clone()),
        SubmitError::CallbackNotAllowed(_) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        SubmitError::QueueFull(_) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("30"));
            r
        }
        SubmitError::ShuttingDown | SubmitError::Unavailable(_) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        SubmitError::Control(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /v1/hooks/dryrun`: signed (X-Hub-Signature-256), replay-protected (delivery id,
/// optional X-Dryrun-Timestamp), answers 202 with the run id at once.
async fn hook(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = &app.secret else {
        app.metrics.rejected("no_secret");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the webhook is disabled: {} is not set on the server",
                app.cfg.webhook.secret_env
            ),
        );
    };
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let hh = HookHeaders {
        signature: h(signature::HEADER),
        timestamp: h("x-dryrun-timestamp"),
        delivery: h("x-github-delivery").or_else(|| h("x-dryrun-delivery")),
        event: h("x-github-event"),
    };
    let max_age = i64::try_from(app.cfg.webhook.max_age.as_secs()).unwrap_or(300);
    let (delivery, req) = match webhook::verify(
        secret.expose().as_bytes(),
        &hh,
        &body,
        chrono::Utc::now().timestamp(),
        max_age,
    ) {
        Ok(Verified::Ping) => {
            return (
                StatusCode::OK,
                Json(json!({ "ok": true, "message": "pong" })),
            )
                .into_response();
        }
        Ok(Verified::Run { delivery, body }) => (delivery, body),
        Err(r) => {
            app.metrics.rejected(r.reason());
            return error(
                StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST),
                r.to_string(),
            );
        }
    };
    match app.control.delivery(&delivery).await {
        Ok(Some(orig)) => return accepted(&app, &orig, StatusCode::OK, true),
        Ok(None) => {}
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    let run = RunRequest {
        blueprint: req.blueprint,
        release: req.release,
        params: req.params,
        backup: req.backup,
        callback_url: req.callback_url,
        baseline: req.baseline,
        delivery: Some(delivery),
        trigger: Some(crate::report::Trigger::Webhook),
        ..RunRequest::default()
    };
    match app.submit(run).await {
        Ok(Submitted::New(row)) => accepted(&app, &row, StatusCode::ACCEPTED, false),
        Ok(Submitted::Duplicate(row)) => accepted(&app, &row, StatusCode::OK, true),
        Err(e) => submit_error(&app, &e),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<String>,
    blueprint: Option<String>,
    limit: Option<usize>,
}

async fn list_runs(State(app): State<Arc<App>>, Query(q): Query<ListQuery>) -> Response {
    let status = match q.status.as_deref().map(str::parse::<RunStatus>).transpose() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("status: {e}")),
    };
    match app
        .control
        .list(
            status,
            q.blueprint.as_deref(),
            q.limit.unwrap_or(50).min(1000),
        )
        .await
    {
        Ok(rows) => Json(json!({ "runs": rows })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn get_run(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.control.get(&id).await {
        Ok(Some((row, report))) => Json(json!({
            "run": row,
            "report": report,
            "progress": app.progress(&id),
            "links": {
                "junit": format!("{}/v1/runs/{id}/junit.xml", app.base_url),
                "logs": format!("{}/v1/runs/{id}/logs", app.base_url),
                "dashboard": format!("{}/runs/{id}", app.base_url),
            }
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no run {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn junit(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.control.get(&id).await {
        Ok(Some((_, Some(rep)))) => (
            [(header::CONTENT_TYPE, "application/xml")],
            crate::report::junit::to_junit(&rep),
        )
            .into_response(),
        Ok(Some((row, None))) => error(
            StatusCode::CONFLICT,
            format!("run {id} is {}: no report yet", row.status),
        ),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no run {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn logs(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if !crate::state::is_run_id(&id) {
        return error(StatusCode::NOT_FOUND, String::from("no such run"));
    }
    let row = match app.control.get(&id).await {
        Ok(Some((row, _))) => row,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no run {id}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let dir = app.state.run_dir(&id).join("logs");
    // Logs stay on the machine that ran the run.
    if !dir.exists()
        && let Some(w) = row.worker.as_deref()
        && !w.is_empty()
        && w != app.control.worker().id
    {
        return (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!(
                "(the logs of run {id} are on the worker that ran it: {w}; ask that worker's API)\n"
            ),
        )
            .into_response();
    }
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.truncate(MAX_LOG_FILES);
    if files.is_empty() {
        return (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "(no logs)\n",
        )
            .into_response();
    }
    // One file at a time, and of each only its tail is read: a huge log costs no memory.
    let body = futures_util::stream::iter(files).then(|f| async move {
        Ok::<_, std::io::Error>(axum::body::Bytes::from(log_tail(&f, LOG_TAIL).await))
    });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Bytes of each log file the logs endpoint shows (its end).
const LOG_TAIL: u64 = 256 * 1024;
/// Log files shown at most.
const MAX_LOG_FILES: usize = 200;

/// `==> NAME <==` and the last `max` bytes of a log file (from a line start), read with a seek.
async fn log_tail(path: &std::path::Path, max: u64) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = async {
        let mut f = tokio::fs::File::open(path).await?;
        let len = f.metadata().await?.len();
        let start = len.saturating_sub(max);
        f.seek(std::io::SeekFrom::Start(start)).await?;
        let mut buf = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
        f.take(max).read_to_end(&mut buf).await?;
        let mut text = String::from_utf8_lossy(&buf).into_owned();
        if start > 0 {
            let cut = text.find('\n').map_or(0, |i| i + 1);
            text = format!("[… {} bytes cut …]\n{}", start + cut as u64, &text[cut..]);
        }
        Ok::<_, std::io::Error>(text)
    }
    .await
    .unwrap_or_else(|e| format!("(cannot read: {e})"));
    format!("==> {name} <==\n{}\n", text.trim_end())
}

#[derive(Debug, Deserialize)]
struct TrendQuery {
    blueprint: String,
    limit: Option<usize>,
}

async fn trend(State(app): State<Arc<App>>, Query(q): Query<TrendQuery>) -> Response {
    match app
        .control
        .trend(&q.blueprint, q.limit.unwrap_or(30).min(365))
        .await
    {
        Ok(points) => Json(json!({ "blueprint": q.blueprint, "points": points })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}
