//! A fault-injecting HTTP proxy between `dryrun` and the emulator, for tests/aws_faults.rs.
//!
//! `dryrun` is pointed at the proxy (`AWS_ENDPOINT_URL`); the proxy forwards to moto server and,
//! by a seeded random draw per request, answers instead with what AWS sends when it is busy:
//! - **throttling** (not forwarded): EC2 `RequestLimitExceeded` (503), RDS/STS `Throttling`
//!   (400, query XML), S3 `SlowDown` (503), SSM `ThrottlingException` (400, JSON);
//! - **server errors**: half of them before forwarding (an empty 503, as from a load balancer),
//!   half *after* moto handled the request (a 500 `InternalError` replaces its answer): the
//!   service acted, the client does not know, and the SDK sends the same request again;
//! - **latency**: every forwarded request waits a random time, a few of them seconds.
//!
//! Rules can also force one answer for an operation (`deny`: a non-retryable error) or lose
//! answers of chosen operations more often (`lose_answers`), so that the idempotency of every
//! create is exercised in every run and not only when the dice say so.
//!
//! Everything stays on 127.0.0.1. The proxy runs on its own runtime thread and stops on drop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// What to inject.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Seed of the draws (printed by the tests, so a failing sequence can be replayed).
    pub seed: u64,
    /// Share of requests answered with a throttling error.
    pub throttle: f64,
    /// Share of requests answered with HTTP 500/503.
    pub server_error: f64,
    /// Upper bound of the latency added to every forwarded request.
    pub latency: Duration,
    /// Share of forwarded requests that wait 1–3 s instead.
    pub slow: f64,
    /// Operations whose answer is lost (after moto acted) with this probability.
    pub lose_answers: BTreeMap<&'static str, f64>,
    /// Operations always answered with this non-retryable error `(status, code)`.
    pub deny: BTreeMap<&'static str, (u16, &'static str)>,
}

impl Faults {
    /// No faults at all.
    pub fn none(seed: u64) -> Faults {
        Faults {
            seed,
            throttle: 0.0,
            server_error: 0.0,
            latency: Duration::ZERO,
            slow: 0.0,
            lose_answers: BTreeMap::new(),
            deny: BTreeMap::new(),
        }
    }
}

/// What the proxy did, by operation (`ec2:RunInstances`, `s3:PUT`, ...).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Requests received.
    pub requests: BTreeMap<String, u64>,
    /// Throttled (not forwarded).
    pub throttled: BTreeMap<String, u64>,
    /// 500/503 without forwarding.
    pub failed_before: BTreeMap<String, u64>,
    /// Forwarded, handled by moto, answer replaced by a 500.
    pub lost_answers: BTreeMap<String, u64>,
    /// Answered with the `deny` rule's error.
    pub denied: BTreeMap<String, u64>,
    /// Requests moto handled (forwarded), with moto's status class: `op 2xx`.
    pub forwarded: BTreeMap<String, u64>,
    /// Total latency added.
    pub latency: Duration,
}

impl Stats {
    /// Sum of a counter.
    pub fn total(m: &BTreeMap<String, u64>) -> u64 {
        m.values().sum()
    }
}

struct Shared {
    upstream: String,
    faults: Faults,
    rng: StdRng,
    stats: Stats,
}

/// A running proxy.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: give this to `dryrun` as the endpoint.
    pub endpoint: String,
    shared: Arc<Mutex<Shared>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (moto's endpoint).
    pub fn start(upstream: &str, faults: Faults) -> FaultProxy {
        let shared = Arc::new(Mutex::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            rng: StdRng::seed_from_u64(faults.seed),
            faults,
            stats: Stats::default(),
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap();
                let app = axum::Router::new().fallback(move |req: Request<Body>| {
                    let state = state.clone();
                    let client = client.clone();
                    async move { handle(&state, &client, req).await }
                });
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        FaultProxy {
            endpoint,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> Stats {
        self.shared.lock().unwrap().stats.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `ec2`, `rds`, `s3`, `ssm`, `sts` from the SigV4 credential scope: the `Authorization`
/// header, or a presigned URL's `X-Amz-Credential` (the release download on an instance).
fn service(headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').nth(3))
        .or_else(|| {
            uri.query()?
                .split('&')
                .find_map(|p| p.strip_prefix("X-Amz-Credential="))?
                .split("%2F")
                .nth(3)
        })
        .unwrap_or("unknown")
        .to_string()
}

/// The operation: the query `Action`, the JSON target, or S3's method (with `copy` for
/// CopyObject).
fn operation(svc: &str, headers: &HeaderMap, method: &str, body: &[u8]) -> String {
    if let Some(t) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        return t.rsplit('.').next().unwrap_or(t).to_string();
    }
    if svc == "s3" {
        return if headers.contains_key("x-amz-copy-source") {
            "CopyObject".into()
        } else {
            method.to_string()
        };
    }
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|p| p.strip_prefix("Action="))
        .unwrap_or("unknown")
        .to_string()
}

fn request_id(rng: &mut StdRng) -> String {
    format!("{:016x}{:016x}", rng.random::<u64>(), rng.random::<u64>())
}

/// An error answer in the service's protocol.
fn error(svc: &str, status: u16, code: &str, message: &str, id: &str) -> Response<Body> {
    let (ctype, body) = match svc {
        "ec2" => (
            "text/xml;charset=UTF-8",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{id}</RequestID></Response>"
            ),
        ),
        "s3" => (
            "application/xml",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{id}</RequestId></Error>"
            ),
        ),
        "ssm" => (
            "application/x-amz-json-1.1",
            format!("{{\"__type\":\"{code}\",\"message\":\"{message}\"}}"),
        ),
        _ => (
            "text/xml",
            format!(
                "<ErrorResponse><Error><Type>{}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{id}</RequestId></ErrorResponse>",
                if status >= 500 { "Receiver" } else { "Sender" }
            ),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("x-amzn-requestid", id)
        .header("x-amz-request-id", id)
        .body(Body::from(body))
        .unwrap()
}

fn throttled(svc: &str, id: &str) -> Response<Body> {
    match svc {
        "ec2" => error(
            svc,
            503,
            "RequestLimitExceeded",
            "Request limit exceeded.",
            id,
        ),
        "s3" => error(svc, 503, "SlowDown", "Please reduce your request rate.", id),
        "ssm" => error(svc, 400, "ThrottlingException", "Rate exceeded", id),
        _ => error(svc, 400, "Throttling", "Rate exceeded", id),
    }
}

fn internal(svc: &str, id: &str) -> Response<Body> {
    let code = match svc {
        "ssm" => "InternalServerError",
        "rds" | "sts" => "InternalFailure",
        _ => "InternalError",
    };
    error(
        svc,
        500,
        code,
        "We encountered an internal error. Please try again.",
        id,
    )
}

enum Plan {
    Throttle,
    FailBefore,
    LoseAnswer,
    Deny(u16, &'static str),
    Forward,
}

fn bump(m: &mut BTreeMap<String, u64>, key: &str) {
    *m.entry(key.to_string()).or_default() += 1;
}

async fn handle(
    state: &Arc<Mutex<Shared>>,
    client: &reqwest::Client,
    req: Request<Body>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 256 << 20)
        .await
        .unwrap_or_default();
    let svc = service(&parts.headers, &parts.uri);
    let op = operation(&svc, &parts.headers, parts.method.as_str(), &body);
    let key = format!("{svc}:{op}");
    let (plan, delay, id, upstream) = {
        let mut s = state.lock().unwrap();
        let Shared {
            faults,
            rng,
            stats,
            upstream,
        } = &mut *s;
        bump(&mut stats.requests, &key);
        let id = request_id(rng);
        let draw: f64 = rng.random();
        let plan = if let Some((status, code)) = faults.deny.get(op.as_str()) {
            bump(&mut stats.denied, &key);
            Plan::Deny(*status, code)
        } else if draw < faults.throttle {
            bump(&mut stats.throttled, &key);
            Plan::Throttle
        } else if draw < faults.throttle + faults.server_error / 2.0 {
            bump(&mut stats.failed_before, &key);
            Plan::FailBefore
        } else if draw < faults.throttle + faults.server_error
            || rng.random_bool(faults.lose_answers.get(op.as_str()).copied().unwrap_or(0.0))
        {
            bump(&mut stats.lost_answers, &key);
            Plan::LoseAnswer
        } else {
            Plan::Forward
        };
        let delay = if matches!(plan, Plan::Forward | Plan::LoseAnswer) {
            if rng.random_bool(faults.slow) {
                Duration::from_millis(rng.random_range(1000..3000))
            } else if faults.latency > Duration::ZERO {
                faults.latency.mul_f64(rng.random())
            } else {
                Duration::ZERO
            }
        } else {
            Duration::ZERO
        };
        stats.latency += delay;
        (plan, delay, id, upstream.clone())
    };
    match plan {
        Plan::Throttle => return throttled(&svc, &id),
        Plan::FailBefore => {
            return Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(Body::empty())
                .unwrap();
        }
        Plan::Deny(status, code) => {
            let message = if code.contains("Throttl") {
                "Rate exceeded"
            } else {
                "You are not authorized to perform this operation."
            };
            return error(&svc, status, code, message, &id);
        }
        Plan::Forward | Plan::LoseAnswer => {}
    }
    tokio::time::sleep(delay).await;
    let url = format!(
        "{upstream}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut fwd = client.request(parts.method.clone(), &url).body(body);
    for (k, v) in &parts.headers {
        if !matches!(
            k.as_str(),
            "host" | "content-length" | "connection" | "expect" | "transfer-encoding"
        ) {
            fwd = fwd.header(k, v);
        }
    }
    let answer = match fwd.send().await {
        Ok(a) => a,
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(format!("fault proxy: upstream: {e}")))
                .unwrap();
        }
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap_or_default();
    {
        let mut s = state.lock().unwrap();
        bump(
            &mut s.stats.forwarded,
            &format!("{key} {}xx", status.as_u16() / 100),
        );
    }
    if matches!(plan, Plan::LoseAnswer) {
        return internal(&svc, &id);
    }
    // A HEAD answer's Content-Length describes the object, not the (empty) body.
    let head = parts.method == axum::http::Method::HEAD;
    let mut out = Response::builder().status(status);
    for (k, v) in &headers {
        let framing = matches!(k.as_str(), "connection" | "transfer-encoding")
            || (k.as_str() == "content-length" && !head);
        if !framing {
            out = out.header(k, v);
        }
    }
    out.body(Body::from(bytes)).unwrap()
}
