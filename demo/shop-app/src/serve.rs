//! `demo-shop serve`: the shop's web server (read-only over the database).
//!
//! Routes:
//! - `GET /`                   HTML page: "Demo Shop", the version, row counts
//! - `GET /healthz`            200 "ok" if the database opens and schema_migrations has rows, else 503 + reason
//! - `GET /api/stats`          counts, schema version and app version as JSON
//! - `GET /api/customers/{id}` one customer as JSON, or 404
//! - `GET /uploads/{name}`     a file from the uploads directory (no `..`, no slashes: 400)
//! - `GET /api/admin/stats`    needs `Authorization: Bearer $API_TOKEN`; 401 otherwise
//! - `POST /api/orders/{id}/confirm`  mails the order confirmation to the customer through the
//!   SMTP server in `$SMTP_URL` (`smtp://HOST:PORT`); 202, or 404 / 503

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::{Value, json};

#[derive(Debug)]
pub struct ServeOptions {
    pub db: PathBuf,
    pub uploads: PathBuf,
    pub port: u16,
    pub api_token: String,
    pub app_version: String,
    pub smtp_url: Option<String>,
}

struct AppState {
    db: PathBuf,
    uploads: PathBuf,
    api_token: String,
    app_version: String,
    smtp_url: Option<String>,
}

type Shared = Arc<AppState>;

pub fn run(opts: ServeOptions) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(serve(opts))
}

async fn serve(opts: ServeOptions) -> Result<(), String> {
    if !opts.db.is_file() {
        eprintln!(
            "warning: database {} does not exist; /healthz will report 503",
            opts.db.display()
        );
    }
    if !opts.uploads.is_dir() {
        eprintln!(
            "warning: uploads directory {} does not exist",
            opts.uploads.display()
        );
    }
    let state: Shared = Arc::new(AppState {
        db: opts.db.clone(),
        uploads: opts.uploads.clone(),
        api_token: opts.api_token,
        app_version: opts.app_version,
        smtp_url: opts.smtp_url,
    });
    let app = Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/api/stats", get(stats))
        .route("/api/customers/{id}", get(customer))
        .route("/uploads/{name}", get(upload))
        .route("/api/admin/stats", get(admin_stats))
        .route(
            "/api/orders/{id}/confirm",
            axum::routing::post(confirm_order),
        )
        .layer(middleware::from_fn(log_request))
        .with_state(state.clone());

    // Loopback only: this is a demo app with a throw-away copy of "production".
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, opts.port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!(
        "demo-shop {} listening on http://{local} (db {}, uploads {})",
        state.app_version,
        opts.db.display(),
        opts.uploads.display()
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))?;
    println!("demo-shop stopped");
    Ok(())
}

/// Resolves on SIGTERM (what dryrun and service managers send) or Ctrl-C; axum then
/// stops accepting connections and lets requests in flight finish.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => println!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => println!("interrupt received, shutting down"),
    }
}

/// One line per request. Headers are never logged (the Authorization header holds the token).
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    println!(
        "{method} {path} {} {} ms",
        response.status().as_u16(),
        started.elapsed().as_millis()
    );
    response
}

/// Runs `f` on a fresh read-only connection on the blocking pool. Opening per request
/// is cheap for SQLite and keeps the handlers free of locking. Read-only also means a
/// missing file is an error instead of a new empty database.
async fn with_db<T, F>(state: &Shared, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
{
    let path = state.db.clone();
    tokio::task::spawn_blocking(move || {
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| format!("cannot open database {}: {e}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        f(&conn).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("database task failed: {e}"))?
}

#[derive(Debug, Clone)]
struct Counts {
    customers: i64,
    orders: i64,
    products: i64,
    schema_version: Option<String>,
}

fn counts(conn: &Connection) -> rusqlite::Result<Counts> {
    let count =
        |table: &str| conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0));
    Ok(Counts {
        customers: count("customers")?,
        orders: count("orders")?,
        products: count("products")?,
        schema_version: conn.query_row("SELECT max(version) FROM schema_migrations", [], |r| {
            r.get(0)
        })?,
    })
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn index(State(state): State<Shared>) -> Response {
    let version = html_escape(&state.app_version);
    let (status, body) = match with_db(&state, counts).await {
        Ok(c) => (
            StatusCode::OK,
            format!(
                "<p>{} customers, {} products, {} orders.</p>\n<p>Schema version: <code>{}</code></p>",
                c.customers,
                c.products,
                c.orders,
                html_escape(c.schema_version.as_deref().unwrap_or("none"))
            ),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "<p>The shop database is not available: {}</p>",
                html_escape(&e)
            ),
        ),
    };
    let page = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>Demo Shop</title></head>\n\
         <body>\n<h1>Demo Shop</h1>\n<p>Version {version}</p>\n{body}\n</body>\n</html>\n"
    );
    (status, Html(page)).into_response()
}

async fn healthz(State(state): State<Shared>) -> Response {
    let result = with_db(&state, |conn| {
        conn.query_row("SELECT count(*) FROM schema_migrations", [], |r| {
            r.get::<_, i64>(0)
        })
    })
    .await;
    match result {
        Ok(n) if n > 0 => (StatusCode::OK, "ok\n").into_response(),
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: schema_migrations is empty\n",
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {e}\n")).into_response(),
    }
}

async fn stats(State(state): State<Shared>) -> Response {
    match with_db(&state, counts).await {
        Ok(c) => axum::Json(json!({
            "customers": c.customers,
            "orders": c.orders,
            "products": c.products,
            "schema_version": c.schema_version,
            "version": state.app_version,
        }))
        .into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn customer(State(state): State<Shared>, Path(id): Path<i64>) -> Response {
    let found = with_db(&state, move |conn| {
        conn.query_row(
            "SELECT c.id, c.email, c.name, c.created_at,
                    (SELECT count(*) FROM orders o WHERE o.customer_id = c.id)
             FROM customers c WHERE c.id = ?1",
            [id],
            |r| {
                Ok(json!({
                    "id": r.get::<_, i64>(0)?,
                    "email": r.get::<_, String>(1)?,
                    "name": r.get::<_, String>(2)?,
                    "created_at": r.get::<_, String>(3)?,
                    "orders": r.get::<_, i64>(4)?,
                }))
            },
        )
        .optional()
    })
    .await;
    match found {
        Ok(Some(customer)) => axum::Json(customer).into_response(),
        Ok(None) => json_error(StatusCode::NOT_FOUND, format!("customer {id} not found")),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Mails the confirmation of order `id` to its customer.
async fn confirm_order(State(state): State<Shared>, Path(id): Path<i64>) -> Response {
    let Some(url) = state.smtp_url.clone() else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "no SMTP_URL configured");
    };
    let found = with_db(&state, move |conn| {
        conn.query_row(
            "SELECT c.email, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = ?1",
            [id],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()
    })
    .await;
    let (email, name) = match found {
        Ok(Some(x)) => x,
        Ok(None) => return json_error(StatusCode::NOT_FOUND, format!("order {id} not found")),
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let to = email.clone();
    let sent = tokio::task::spawn_blocking(move || {
        send_mail(
            &url,
            "shop@example.com",
            &to,
            &format!("Order confirmation #{id}"),
            &format!("Dear {name},\r\nthank you for order #{id}.\r\n"),
        )
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match sent {
        Ok(()) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"order": id, "mailed": true})),
        )
            .into_response(),
        Err(e) => json_error(StatusCode::BAD_GATEWAY, format!("mail not sent: {e}")),
    }
}

/// The sending half of SMTP, enough for one plain-text message (the demo has no mail crate).
fn send_mail(url: &str, from: &str, to: &str, subject: &str, body: &str) -> Result<(), String> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let addr = url
        .strip_prefix("smtp://")
        .ok_or("SMTP_URL must be smtp://HOST:PORT")?;
    let stream = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let mut expect = |code: &str| -> Result<(), String> {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            if !line.starts_with(code) {
                return Err(format!("server said: {}", line.trim()));
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    };
    expect("220")?;
    let message = format!("From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{body}\r\n.\r\n");
    for (cmd, code) in [
        ("EHLO demo-shop\r\n".to_string(), "250"),
        (format!("MAIL FROM:<{from}>\r\n"), "250"),
        (format!("RCPT TO:<{to}>\r\n"), "250"),
        ("DATA\r\n".to_string(), "354"),
        (message, "250"),
        ("QUIT\r\n".to_string(), "221"),
    ] {
        w.write_all(cmd.as_bytes()).map_err(|e| e.to_string())?;
        expect(code)?;
    }
    Ok(())
}

/// A plain file name: no path separators, no `..`, nothing hidden, no NUL.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains("..")
        && !name.contains(['/', '\\', '\0'])
}

fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "txt" => "text/plain; charset=utf-8",
        "json" => "application/json",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

async fn upload(State(state): State<Shared>, Path(name): Path<String>) -> Response {
    if !is_safe_name(&name) {
        return (StatusCode::BAD_REQUEST, "bad file name\n").into_response();
    }
    match tokio::fs::read(state.uploads.join(&name)).await {
        Ok(bytes) => {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(&name)),
            );
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            (headers, bytes).into_response()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (StatusCode::NOT_FOUND, "no such upload\n").into_response()
        }
        Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
            (StatusCode::NOT_FOUND, "no such upload\n").into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read upload: {e}\n"),
        )
            .into_response(),
    }
}

/// Compares two byte strings in time that depends only on their lengths, not on where
/// they first differ. A plain `==` returns at the first differing byte, so an attacker
/// timing many requests could learn the token one byte at a time. (The length itself
/// is not secret enough to matter here.) Hand-written to avoid a dependency for 10 lines.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ") else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

async fn admin_stats(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &state.api_token) {
        let mut response = json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let result = with_db(&state, |conn| {
        let c = counts(conn)?;
        let duplicate_emails: i64 = conn.query_row(
            "SELECT count(*) - count(DISTINCT email) FROM customers",
            [],
            |r| r.get(0),
        )?;
        let latest_order_at: Option<String> =
            conn.query_row("SELECT max(created_at) FROM orders", [], |r| r.get(0))?;
        let revenue_cents: i64 = conn.query_row(
            "SELECT coalesce(sum(o.quantity * p.price_cents), 0) FROM orders o JOIN products p ON p.id = o.product_id",
            [],
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare("SELECT version, applied_at FROM schema_migrations ORDER BY version")?;
        let migrations = stmt
            .query_map([], |r| Ok(json!({ "version": r.get::<_, String>(0)?, "applied_at": r.get::<_, String>(1)? })))?
            .collect::<rusqlite::Result<Vec<Value>>>()?;
        Ok(json!({
            "customers": c.customers,
            "orders": c.orders,
            "products": c.products,
            "duplicate_emails": duplicate_emails,
            "latest_order_at": latest_order_at,
            "revenue_cents": revenue_cents,
            "schema_version": c.schema_version,
            "schema_migrations": migrations,
        }))
    })
    .await;
    match result {
        Ok(mut body) => {
            body["version"] = json!(state.app_version);
            axum::Json(body).into_response()
        }
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cret!"));
        assert!(!constant_time_eq(b"", b"x"));
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "tok"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tok"),
        );
        assert!(authorized(&h, "tok"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic tok"));
        assert!(!authorized(&h, "tok"));
    }

    #[test]
    fn upload_names() {
        assert!(is_safe_name("SKU-1001.svg"));
        for bad in ["", "..", "../etc/passwd", "a/b", "a\\b", ".hidden", "x..y"] {
            assert!(!is_safe_name(bad), "{bad:?}");
        }
    }
}
