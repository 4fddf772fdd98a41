//! The dashboard: server-rendered pages (handlebars templates, HTML-escaped) with a little
//! JavaScript for live status; every page and the start form work without JavaScript.
//!
//! With `[[auth.tokens]]` configured, a browser logs in on `/login` with a token and gets a
//! session cookie; the pages show who is logged in, and the start form only to the `run` role.
//! Every form carries a CSRF token bound to the visitor's cookie ([`super::auth`]), so another
//! web page cannot submit it through a browser; `Host` and `Origin` are checked for every
//! request by [`super::routes`]'s guard.

use std::sync::{Arc, LazyLock};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use handlebars::Handlebars;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::report::{human_ms, human_secs};

use super::auth::{Principal, Role};
use super::jobs::{App, RunRequest, SubmitError, Submitted};
use crate::control::RunRow;

static TEMPLATES: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut h = Handlebars::new();
    h.set_strict_mode(false);
    for (name, src) in [
        ("layout", include_str!("templates/layout.hbs")),
        ("index", include_str!("templates/index.hbs")),
        ("run", include_str!("templates/run.hbs")),
        ("login", include_str!("templates/login.hbs")),
    ] {
        h.register_template_string(name, src)
            .expect("dashboard templates are valid");
    }
    h
});

/// Dashboard routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(index))
        .route("/runs/{id}", get(run_page))
        .route("/ui/runs", post(start))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
}

/// What the layout shows about the visitor: who is logged in and the CSRF token of the page's
/// forms (setting the cookie it is bound to when the visitor has none yet).
struct Visitor {
    principal: Option<Principal>,
    csrf: String,
    set_cookie: Option<String>,
    auth: bool,
}

impl Visitor {
    fn of(app: &App, headers: &HeaderMap) -> Visitor {
        let (csrf, set_cookie) = app.auth.csrf_for_page(headers);
        Visitor {
            principal: app.auth.identify(headers),
            csrf,
            set_cookie,
            auth: app.auth.enabled(),
        }
    }

    fn can_run(&self) -> bool {
        !self.auth || self.principal.as_ref().is_some_and(|p| p.role >= Role::Run)
    }

    fn json(&self) -> Value {
        json!({
            "csrf": self.csrf,
            "auth": self.auth,
            "user": self.principal.as_ref().map(|p| json!({"name": p.name, "role": p.role.as_str()})),
            "can_run": self.can_run(),
        })
    }

    fn finish(&self, r: Response) -> Response {
        match &self.set_cookie {
            Some(c) => with_cookie(r, c),
            None => r,
        }
    }
}

/// `r` with a `Set-Cookie` header.
fn with_cookie(mut r: Response, cookie: &str) -> Response {
    if let Ok(v) = header::HeaderValue::from_str(cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

fn page(title: &str, template: &str, data: &Value, refresh: bool) -> Response {
    let body = match TEMPLATES.render(template, data) {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("template {template}: {e}"),
            )
                .into_response();
        }
    };
    match TEMPLATES.render(
        "layout",
        &json!({ "title": title, "body": body, "refresh": refresh, "visitor": data.get("visitor") }),
    ) {
        Ok(html) => Html(html).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("layout: {e}")).into_response(),
    }
}

fn release_label(r: &RunRow) -> String {
    r.release_version
        .clone()
        .unwrap_or_else(|| r.release.clone())
}

fn releases(app: &App) -> Vec<String> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, depth: usize, out: &mut Vec<String>) {
        if depth > 5 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut ents: Vec<_> = rd.flatten().filter(|e| e.path().is_dir()).collect();
        ents.sort_by_key(std::fs::DirEntry::file_name);
        for e in ents {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') || e.file_name() == "target" {
                continue;
            }
            if p.join(crate::release::MANIFEST).is_file() {
                if let Ok(rel) = p.strip_prefix(root) {
                    out.push(rel.display().to_string());
                }
            } else {
                walk(root, &p, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&app.blueprints, &app.blueprints, 0, &mut out);
    out
}

/// Size of a trend chart (SVG user units) and its inner margins.
const CHART_W: f64 = 480.0;
const CHART_H: f64 = 140.0;
const CHART_PAD: (f64, f64, f64, f64) = (10.0, 14.0, 10.0, 18.0); // left, top, right, bottom

/// The rehearsal trend of one blueprint as SVG geometry, for the template to draw without a
/// script: total and restore time as lines on one scale, backup age as a line on its own
/// scale, one mark per run (linked to its page, coloured by its status, a tooltip with its
/// figures), oldest on the left. Points arrive oldest first. Drawn by hand: a few lines of
/// arithmetic, where a charting crate would bring a renderer and its own markup.
fn trend_chart(pts: &[crate::control::TrendPoint]) -> Value {
    let (left, top, right, bottom) = CHART_PAD;
    let (w, h) = (CHART_W - left - right, CHART_H - top - bottom);
    #[allow(clippy::cast_precision_loss)]
    let x = |i: usize| {
        if pts.len() < 2 {
            left + w / 2.0
        } else {
            left + w * i as f64 / (pts.len() - 1) as f64
        }
    };
    #[allow(clippy::cast_precision_loss)]
    let y = |v: i64, max: i64| top + h - h * v as f64 / max.max(1) as f64;
    let max_total = pts.iter().filter_map(|p| p.duration_ms).max().unwrap_or(0);
    let max_age = pts.iter().filter_map(|p| p.backup_age_s).max().unwrap_or(0);
    let line = |get: &dyn Fn(&crate::control::TrendPoint) -> Option<i64>, max: i64| -> String {
        pts.iter()
            .enumerate()
            .filter_map(|(i, p)| get(p).map(|v| format!("{:.1},{:.1}", x(i), y(v, max))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let ms =
        |v: Option<i64>| v.map_or_else(|| "-".into(), |d| human_ms(u64::try_from(d).unwrap_or(0)));
    let marks: Vec<Value> = pts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "run_id": p.run_id,
                "status": p.status,
                "x": format!("{:.1}", x(i)),
                "y": format!("{:.1}", y(p.duration_ms.unwrap_or(0), max_total)),
                "title": format!(
                    "{} · {} · total {} · restore {} · backup age {}",
                    p.started_at.format("%Y-%m-%d %H:%M"),
                    p.status,
                    ms(p.duration_ms),
                    ms(p.restore_ms),
                    p.backup_age_s.map_or_else(|| "-".into(), human_secs)
                ),
            })
        })
        .collect();
    json!({
        "width": CHART_W, "height": CHART_H,
        "base_y": format!("{:.1}", top + h), "left": left, "right": CHART_W - right,
        "total_points": line(&|p| p.duration_ms, max_total),
        "restore_points": line(&|p| p.restore_ms, max_total),
        "age_points": line(&|p| p.backup_age_s, max_age),
        "max_total": ms(Some(max_total)),
        "max_age": human_secs(max_age),
        "marks": marks,
    })
}

/// Width of the timeline's label column and of its time axis (SVG user units), and one row.
const TIMELINE_LABEL: f64 = 150.0;
const TIMELINE_W: f64 = 560.0;
const TIMELINE_ROW: f64 = 22.0;

/// The run's timeline as SVG geometry: one row per resource, one bar per step (create,
/// restore, mask, install, delete) at its start and length on the run's time axis, coloured by step,
/// outlined when on the critical path, with a tooltip. The critical path is the chain of steps
/// that set the run's length: from the provisioning step that ended last (install, usually),
/// back through the step that ended last before each one started (what it waited for),
/// whatever resource it belonged to. Drawn by hand, like [`trend_chart`].
fn timeline_chart(rep: &crate::report::RunReport) -> Option<Value> {
    use crate::report::Step;
    let spans: Vec<(usize, &crate::report::StepSpan)> = rep
        .resources
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.steps.iter().map(move |s| (i, s)))
        .collect();
    let end = spans
        .iter()
        .map(|(_, s)| s.start_ms + s.duration_ms)
        .max()?;
    let total = end.max(1);
    // The critical path, walked backwards from the last provisioning step to end.
    let mut critical: Vec<usize> = Vec::new();
    let provisioning = |s: &crate::report::StepSpan| s.step != Step::Delete;
    let mut at = spans
        .iter()
        .enumerate()
        .filter(|(_, (_, s))| provisioning(s))
        .max_by_key(|(_, (_, s))| s.start_ms + s.duration_ms)
        .map(|(k, _)| k);
    while let Some(k) = at {
        critical.push(k);
        let start = spans[k].1.start_ms;
        // Spans end and start in whole milliseconds: 1 ms of slack.
        at = spans
            .iter()
            .enumerate()
            .filter(|(j, (_, s))| {
                !critical.contains(j)
                    && provisioning(s)
                    && s.start_ms + s.duration_ms <= start + 1
                    && s.start_ms < start
            })
            .max_by_key(|(_, (_, s))| s.start_ms + s.duration_ms)
            .map(|(j, _)| j);
    }
    #[allow(clippy::cast_precision_loss)]
    let x = |ms: u64| TIMELINE_LABEL + TIMELINE_W * ms as f64 / total as f64;
    let rows: Vec<Value> = rep
        .resources
        .iter()
        .enumerate()
        .map(|(i, r)| {
            #[allow(clippy::cast_precision_loss)]
            let top = 6.0 + TIMELINE_ROW * i as f64;
            let bars: Vec<Value> = spans
                .iter()
                .enumerate()
                .filter(|(_, (ri, _))| *ri == i)
                .map(|(k, (_, s))| {
                    let on = critical.contains(&k);
                    json!({
                        "step": s.step.to_string(),
                        "status": s.status,
                        "critical": on,
                        "x": format!("{:.1}", x(s.start_ms)),
                        "y": format!("{:.1}", top + 3.0),
                        "width": format!("{:.1}", (x(s.start_ms + s.duration_ms) - x(s.start_ms)).max(1.5)),
                        "title": format!(
                            "{} {}: {} at {} ({}){}",
                            r.address,
                            s.step,
                            human_ms(s.duration_ms),
                            human_ms(s.start_ms),
                            s.status,
                            if on { " · critical path" } else { "" }
                        ),
                    })
                })
                .collect();
            json!({
                "address": r.address,
                "text_y": format!("{:.1}", top + 15.0),
                "bars": bars,
            })
        })
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let height = 6.0 + TIMELINE_ROW * rep.resources.len() as f64 + 20.0;
    Some(json!({
        "width": TIMELINE_LABEL + TIMELINE_W + 10.0,
        "height": height,
        "axis_y": format!("{:.1}", height - 18.0),
        "label_y": format!("{:.1}", height - 4.0),
        "x0": TIMELINE_LABEL,
        "x1": TIMELINE_LABEL + TIMELINE_W,
        "total": human_ms(end),
        "rows": rows,
        "critical_steps": critical.len(),
    }))
}

async fn index_data(app: &App, visitor: &Visitor, notice: Option<&str>) -> Value {
    let rows = app.control.list(None, None, 50).await.unwrap_or_default();
    let runs: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "run_id": r.run_id, "status": r.status, "trigger": r.trigger, "schedule": r.schedule,
                "blueprint": r.blueprint, "release_label": release_label(r),
                "backup_age": r.backup_age_s.map(human_secs).unwrap_or_default(),
                "duration": r.duration_ms.map(|d| human_ms(u64::try_from(d).unwrap_or(0))).unwrap_or_default(),
                "queued": r.queued_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            })
        })
        .collect();
    let mut trend_points = Vec::new();
    for b in app.control.blueprints().await.unwrap_or_default() {
        if let Ok(pts) = app.control.trend(&b, 14).await {
            trend_points.push((b, pts));
        }
    }
    let trends: Vec<Value> = trend_points
        .into_iter()
        .filter_map(|(b, pts)| {
            if pts.is_empty() {
                return None;
            }
            let chart = trend_chart(&pts);
            let max_total = pts.iter().filter_map(|p| p.duration_ms).max().unwrap_or(1).max(1);
            let points: Vec<Value> = pts
                .iter()
                .rev()
                .map(|p| {
                    let px = |v: Option<i64>| v.map_or(0, |v| (v * 240 / max_total).max(2));
                    json!({
                        "started": p.started_at.format("%Y-%m-%d %H:%M").to_string(), "status": p.status,
                        "restore": p.restore_ms.map(|d| human_ms(u64::try_from(d).unwrap_or(0))).unwrap_or_default(),
                        "total": p.duration_ms.map(|d| human_ms(u64::try_from(d).unwrap_or(0))).unwrap_or_default(),
                        "restore_px": px(p.restore_ms), "total_px": px(p.duration_ms),
                        "backup_age": p.backup_age_s.map(human_secs).unwrap_or_default(),
                    })
                })
                .collect();
            Some(json!({ "blueprint": b, "points": points, "chart": chart }))
        })
        .collect();
    json!({ "runs": runs, "trends": trends, "blueprints": app.blueprint_files(), "releases": releases(app), "notice": notice, "visitor": visitor.json() })
}

async fn index(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let v = Visitor::of(&app, &headers);
    v.finish(page(
        "Dry runs",
        "index",
        &index_data(&app, &v, None).await,
        false,
    ))
}

async fn run_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let visitor = Visitor::of(&app, &headers);
    let (row, rep) = match app.control.get(&id).await {
        Ok(Some(x)) => x,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                Html(format!(
                    "<p>No run {}.</p><p><a href=\"/\">All runs</a></p>",
                    html_escape(&id)
                )),
            )
                .into_response();
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let live = row.status.is_active();
    let mut data = json!({
        "run": row,
        "run_id_json": serde_json::to_string(&row.run_id).unwrap_or_default().replace('<', "\\u003c"),
        "release_label": release_label(&row),
        "live": live,
        "progress": app.progress(&id),
        "failure": row.failure,
        "visitor": visitor.json(),
    });
    if let Some(rep) = rep {
        let max = rep
            .stages
            .iter()
            .map(|s| s.duration_ms)
            .max()
            .unwrap_or(1)
            .max(1);
        data["stages"] = rep
            .stages
            .iter()
            .map(|s| json!({ "name": s.name, "status": s.status, "duration": human_ms(s.duration_ms), "px": (s.duration_ms * 300 / max).max(2), "message": s.message }))
            .collect();
        data["checks"] = rep
            .checks
            .iter()
            .map(|c| json!({ "name": c.name, "kind": c.kind, "status": c.status, "duration": human_ms(c.duration_ms), "attempts": c.attempts, "message": c.message }))
            .collect();
        data["resources"] = serde_json::to_value(&rep.resources).unwrap_or_default();
        data["timeline"] = timeline_chart(&rep).unwrap_or(Value::Null);
        data["left_behind"] = serde_json::to_value(&rep.left_behind).unwrap_or_default();
        if let Some(b) = &rep.backup {
            data["backup"] = serde_json::to_value(b).unwrap_or_default();
            data["backup_taken"] = json!(b.taken_at.format("%Y-%m-%d %H:%M UTC").to_string());
            data["backup_age"] = json!(human_secs(b.age_seconds));
            data["backup_clone"] = json!(b.clone.as_ref().map(crate::report::describe_clone));
        }
        data["failure"] = json!(rep.failure);
        // Guards, statements worst first, hints, baseline: the terminal summary's lines.
        data["migration_lines"] = json!(crate::migrations::summary_lines(&rep, 10));
        if let Some(m) = &rep.masking {
            data["masking"] = json!({
                "gate": m.gate,
                "databases": m.databases.iter().map(|d| json!({
                    "resource": d.resource,
                    "rows": d.rows,
                    "scanned": d.scanned_columns,
                    "ms": d.mask_ms,
                    "columns": d.columns,
                })).collect::<Vec<_>>(),
            });
        }
        let se = &rep.side_effects;
        if !se.is_empty() || rep.firewall.is_some() {
            data["side_effects"] = serde_json::to_value(se).unwrap_or_default();
            data["firewall"] = serde_json::to_value(&rep.firewall).unwrap_or_default();
        }
    }
    visitor.finish(page(&format!("Run {id}"), "run", &data, live))
}

#[derive(Debug, Deserialize)]
struct StartForm {
    blueprint: String,
    release: String,
    #[serde(default)]
    backup: String,
    /// Optional: the release in production, compared with the candidate.
    #[serde(default)]
    baseline: String,
    #[serde(default)]
    csrf: String,
}

fn csrf_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        Html("<p>The form's security token is missing or does not match this browser's cookie: reload the page and submit it again.</p><p><a href=\"/\">Dry runs</a></p>"),
    )
        .into_response()
}

async fn start(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(f): Form<StartForm>,
) -> Response {
    if !app.auth.check_csrf(&headers, &f.csrf) {
        app.metrics.rejected("csrf");
        return csrf_refused();
    }
    let visitor = Visitor::of(&app, &headers);
    let req = RunRequest {
        blueprint: f.blueprint.trim().to_string(),
        release: f.release.trim().to_string(),
        backup: Some(f.backup.trim().to_string()).filter(|b| !b.is_empty()),
        baseline: Some(f.baseline.trim().to_string()).filter(|b| !b.is_empty()),
        trigger: Some(crate::report::Trigger::Webhook),
        ..RunRequest::default()
    };
    match app.submit(req).await {
        Ok(Submitted::New(row) | Submitted::Duplicate(row)) => {
            Redirect::to(&format!("/runs/{}", row.run_id)).into_response()
        }
        Err(e) => {
            let status = match e {
                SubmitError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
                SubmitError::ShuttingDown | SubmitError::Unavailable(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                SubmitError::BadPath(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            let mut r = page(
                "Dry runs",
                "index",
                &index_data(&app, &visitor, Some(&format!("Not started: {e}"))).await,
                false,
            );
            *r.status_mut() = status;
            visitor.finish(r)
        }
    }
}

async fn login_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let v = Visitor::of(&app, &headers);
    v.finish(page(
        "Log in",
        "login",
        &json!({ "visitor": v.json(), "notice": None::<String> }),
        false,
    ))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

async fn login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if !app.auth.check_csrf(&headers, &f.csrf) {
        app.metrics.rejected("csrf");
        return csrf_refused();
    }
    match app.auth.login(&f.token) {
        Some((p, cookie)) => {
            tracing::info!(name = %p.name, role = p.role.as_str(), "dashboard login");
            with_cookie(Redirect::to("/").into_response(), &cookie)
        }
        None => {
            app.metrics.rejected("login");
            let v = Visitor::of(&app, &headers);
            let mut r = page(
                "Log in",
                "login",
                &json!({ "visitor": v.json(), "notice": "That token is not valid." }),
                false,
            );
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            v.finish(r)
        }
    }
}

#[derive(Debug, Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(f): Form<LogoutForm>,
) -> Response {
    if !app.auth.check_csrf(&headers, &f.csrf) {
        return csrf_refused();
    }
    let cookie = app.auth.logout(&headers);
    with_cookie(Redirect::to("/login").into_response(), &cookie)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{RunStatus, TrendPoint};

    fn point(id: &str, status: RunStatus, total: Option<i64>, age: Option<i64>) -> TrendPoint {
        TrendPoint {
            run_id: id.into(),
            started_at: chrono::Utc::now(),
            status,
            restore_ms: total.map(|t| t / 2),
            duration_ms: total,
            backup_age_s: age,
        }
    }

    fn coords(points: &str) -> Vec<(f64, f64)> {
        points
            .split(' ')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn the_trend_chart_puts_the_longest_run_at_the_top_and_the_newest_on_the_right() {
        let c = trend_chart(&[
            point("a", RunStatus::Passed, Some(1000), Some(3600)),
            point("b", RunStatus::Failed, Some(4000), Some(7200)),
            point("c", RunStatus::Error, None, None),
        ]);
        let (left, top, right, bottom) = CHART_PAD;
        let total = coords(c["total_points"].as_str().unwrap());
        // Runs without a figure have a mark but no point on the line.
        assert_eq!(total.len(), 2);
        assert!(
            (total[1].1 - top).abs() < 0.05,
            "longest at the top: {total:?}"
        );
        assert!(
            (total[0].1 - (top + 0.75 * (CHART_H - top - bottom))).abs() < 0.05,
            "a quarter of the longest: {total:?}"
        );
        let marks = c["marks"].as_array().unwrap();
        assert_eq!(marks.len(), 3);
        let xs: Vec<f64> = marks
            .iter()
            .map(|m| m["x"].as_str().unwrap().parse().unwrap())
            .collect();
        assert!((xs[0] - left).abs() < 0.05 && (xs[2] - (CHART_W - right)).abs() < 0.05);
        assert!(xs[0] < xs[1] && xs[1] < xs[2]);
        assert_eq!(
            marks
                .iter()
                .map(|m| m["status"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["passed", "failed", "error"]
        );
        assert!(
            marks[1]["title"].as_str().unwrap().contains("total 4.0 s"),
            "{}",
            marks[1]["title"]
        );
        // Backup age on its own scale: the oldest backup at the top.
        let age = coords(c["age_points"].as_str().unwrap());
        assert!((age[1].1 - top).abs() < 0.05);
        // One run: a single mark in the middle.
        let one = trend_chart(&[point("a", RunStatus::Passed, Some(10), None)]);
        let x: f64 = one["marks"][0]["x"].as_str().unwrap().parse().unwrap();
        assert!((x - (left + (CHART_W - left - right) / 2.0)).abs() < 0.05);
    }
}
