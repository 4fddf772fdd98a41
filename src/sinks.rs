//! Side-effect sinks: an SMTP server and an HTTP server on loopback, started per run, that
//! accept everything a release sends and record it for the report instead of letting it reach
//! real customers. Blueprints point the release at them with `{{sinks.smtp.url}}`,
//! `{{sinks.smtp.host}}`, `{{sinks.smtp.port}}` and `{{sinks.http.url}}`; `mail` checks read
//! what the SMTP sink received.
//!
//! The SMTP side is written here rather than taken from a crate: a sink needs the receiving
//! half of RFC 5321 only (greeting, EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT), about a
//! hundred lines, and the crates that implement SMTP servers bring their own TLS and auth
//! stacks that a loopback sink does not use. Input is hostile: lines, messages, connections
//! and recorded items are bounded, and a connection that idles is closed.
//!
//! Only envelope and header facts are kept (from, to, subject; method, host, path): never a
//! body, which could hold anything the release read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Most items recorded per sink; later ones are counted in `dropped`.
pub const MAX_RECORDED: usize = 1000;
/// Longest SMTP command line or header line read.
const MAX_LINE: usize = 4096;
/// Largest message accepted by DATA.
const MAX_MESSAGE: usize = 1 << 20;
/// Connections served at once per sink.
const MAX_CONNECTIONS: usize = 64;
/// An idle connection is closed after this.
const IDLE: Duration = Duration::from_secs(30);

/// A mail the SMTP sink received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mail {
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub to: Vec<String>,
    /// `Subject:` header, as sent (empty when absent).
    pub subject: String,
}

/// A request the HTTP sink received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Method.
    pub method: String,
    /// `Host:` header (the host the release meant to reach).
    pub host: String,
    /// Path without the query string.
    pub path: String,
}

/// report.json `side_effects`: what the release tried to send out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SideEffects {
    /// Mail sent to the SMTP sink.
    pub mail: Vec<Mail>,
    /// Requests sent to the HTTP sink.
    pub http: Vec<Request>,
    /// Connections the egress firewall refused, `address:port` (see [`crate::firewall`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<String>,
    /// Items not recorded because a sink reached [`MAX_RECORDED`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl SideEffects {
    /// Nothing was sent or attempted.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.mail.is_empty() && self.http.is_empty() && self.blocked.is_empty()
    }
}

/// The running sinks of one run; dropping it stops them (the tasks are in a `JoinSet`).
pub struct Sinks {
    /// SMTP sink address.
    pub smtp: SocketAddr,
    /// HTTP sink address.
    pub http: SocketAddr,
    seen: Arc<Mutex<SideEffects>>,
    /// Held for its drop, which aborts the sinks.
    _tasks: JoinSet<()>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks")
            .field("smtp", &self.smtp)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl Sinks {
    /// Starts both sinks on free loopback ports. Call it inside a tokio runtime.
    ///
    /// # Errors
    /// When a loopback port cannot be bound.
    pub fn start() -> std::io::Result<Sinks> {
        let seen = Arc::new(Mutex::new(SideEffects::default()));
        let bind = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        };
        let (smtp_l, http_l) = (bind()?, bind()?);
        let (smtp, http) = (smtp_l.local_addr()?, http_l.local_addr()?);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept(smtp_l, seen.clone(), Kind::Smtp));
        tasks.spawn(accept(http_l, seen.clone(), Kind::Http));
        Ok(Sinks {
            smtp,
            http,
            seen,
            _tasks: tasks,
        })
    }

    /// What was received so far.
    #[must_use]
    pub fn snapshot(&self) -> SideEffects {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records connections the firewall refused.
    pub fn add_blocked(&self, blocked: impl IntoIterator<Item = String>) {
        let mut s = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for b in blocked {
            if !s.blocked.contains(&b) {
                s.blocked.push(b);
            }
        }
    }

    /// The template context `sinks`.
    #[must_use]
    pub fn context(&self) -> serde_json::Value {
        serde_json::json!({
            "smtp": {
                "url": format!("smtp://{}", self.smtp),
                "host": self.smtp.ip().to_string(),
                "port": self.smtp.port().to_string(),
            },
            "http": {
                "url": format!("http://{}", self.http),
                "host": self.http.ip().to_string(),
                "port": self.http.port().to_string(),
            },
        })
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Smtp,
    Http,
}

async fn accept(l: TcpListener, seen: Arc<Mutex<SideEffects>>, kind: Kind) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream); // too many at once: refused, not queued
            continue;
        };
        let seen = seen.clone();
        conns.spawn(async move {
            let _permit = permit;
            let _ = match kind {
                Kind::Smtp => smtp(stream, &seen).await,
                Kind::Http => http(stream, &seen).await,
            };
        });
        while conns.try_join_next().is_some() {}
    }
}

/// Adds an item to the list `f` picks, or counts it as dropped when the list is full.
fn record<T>(seen: &Mutex<SideEffects>, item: T, f: impl FnOnce(&mut SideEffects) -> &mut Vec<T>) {
    let mut s = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let list = f(&mut s);
    if list.len() < MAX_RECORDED {
        list.push(item);
    } else {
        s.dropped += 1;
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (without the line end); `None` at EOF.
async fn line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = tokio::time::timeout(
        IDLE,
        (&mut *r)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"))??;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long",
        ));
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// `<addr>` out of `MAIL FROM:<addr> SIZE=…`.
fn path_arg(rest: &str) -> String {
    let rest = rest.trim();
    clean(
        match (rest.find('<'), rest.find('>')) {
            (Some(a), Some(b)) if b > a => &rest[a + 1..b],
            _ => rest.split_whitespace().next().unwrap_or(""),
        },
        320,
    )
}

/// At most `max` characters of `s` on one line, without control characters (nor bidi
/// overrides): what the release sends is shown in terminals and pages, where an escape sequence
/// must not act. [`crate::report::terminal::printable`] is the same for text with lines.
pub(crate) fn clean(s: &str, max: usize) -> String {
    s.chars()
        .filter(|&c| !crate::report::terminal::acts_on_a_terminal(c))
        .take(max)
        .collect()
}

async fn smtp(stream: TcpStream, seen: &Mutex<SideEffects>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 dryrun-sink ESMTP (nothing is delivered)\r\n")
        .await?;
    let (mut from, mut to) = (None::<String>, Vec::<String>::new());
    while let Some(cmd) = line(&mut r).await? {
        let upper = cmd.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-dryrun-sink\r\n250-SIZE 1048576\r\n250 8BITMIME\r\n"
        } else if upper.starts_with("HELO") {
            b"250 dryrun-sink\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(path_arg(&cmd[10..]));
            to.clear();
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                b"503 MAIL first\r\n"
            } else if to.len() >= 100 {
                b"452 too many recipients\r\n"
            } else {
                to.push(path_arg(&cmd[8..]));
                b"250 OK\r\n"
            }
        } else if upper == "DATA" {
            if to.is_empty() {
                b"503 RCPT first\r\n"
            } else {
                w.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let (subject, size_ok) = read_data(&mut r).await?;
                if size_ok {
                    let mail = Mail {
                        from: from.take().unwrap_or_default(),
                        to: std::mem::take(&mut to),
                        subject,
                    };
                    record(seen, mail, |s| &mut s.mail);
                    b"250 OK: recorded by dryrun, not delivered\r\n"
                } else {
                    from = None;
                    to.clear();
                    b"552 message too large\r\n"
                }
            }
        } else if upper == "RSET" {
            from = None;
            to.clear();
            b"250 OK\r\n"
        } else if upper == "NOOP" {
            b"250 OK\r\n"
        } else if upper == "QUIT" {
            w.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else if upper.starts_with("STARTTLS") || upper.starts_with("AUTH") {
            b"502 not offered by the sink\r\n"
        } else {
            b"500 unknown command\r\n"
        };
        w.write_all(reply).await?;
    }
    Ok(())
}

/// Reads a message up to the lone `.`; returns its `Subject:` and whether it fit the limit.
async fn read_data<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(String, bool)> {
    let (mut subject, mut in_headers, mut size) = (String::new(), true, 0usize);
    loop {
        let Some(l) = line(r).await? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "no end of DATA",
            ));
        };
        if l == "." {
            return Ok((subject, size <= MAX_MESSAGE));
        }
        size += l.len() + 2;
        if in_headers {
            if l.is_empty() {
                in_headers = false;
            } else if subject.is_empty()
                && let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("subject")
            {
                subject = clean(v.trim(), 200);
            }
        }
    }
}

/// The HTTP sink: reads the request head (bounded), drains a declared body up to the limit,
/// answers `200 {"ok":true}` and closes.
async fn http(stream: TcpStream, seen: &Mutex<SideEffects>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let Some(request_line) = line(&mut r).await? else {
        return Ok(());
    };
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (mut host, mut length) = (String::new(), 0usize);
    for _ in 0..100 {
        let Some(h) = line(&mut r).await? else { break };
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("host") {
                host = clean(v.trim(), 255);
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    if length > 0 {
        let mut sink = tokio::io::sink();
        let _ = tokio::time::timeout(
            IDLE,
            tokio::io::copy(
                &mut (&mut r).take(length.min(MAX_MESSAGE) as u64),
                &mut sink,
            ),
        )
        .await;
    }
    let path = clean(target.split('?').next().unwrap_or(""), 500);
    let req = Request {
        method: clean(method, 16),
        host,
        path,
    };
    record(seen, req, |s| &mut s.http);
    w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}").await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn talk(addr: SocketAddr, text: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(text.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn smtp_sink_records_envelope_and_subject_only() {
        let sinks = Sinks::start().unwrap();
        let out = talk(
            sinks.smtp,
            "EHLO app\r\nMAIL FROM:<shop@example.com> SIZE=10\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nFrom: shop\r\nSubject: Your order #42\x1b[2J\r\n\r\nsecret body line\r\n.\r\nQUIT\r\n",
        )
        .await;
        assert!(
            out.contains("250 OK: recorded by dryrun") && out.ends_with("221 bye\r\n"),
            "{out}"
        );
        let seen = sinks.snapshot();
        assert_eq!(
            seen.mail,
            vec![Mail {
                from: "shop@example.com".into(),
                to: vec!["a@example.com".into(), "b@example.com".into()],
                // The escape character is dropped: it cannot act on a terminal that shows it.
                subject: "Your order #42[2J".into()
            }]
        );
        assert!(
            !serde_json::to_string(&seen)
                .unwrap()
                .contains("secret body")
        );
    }

    #[tokio::test]
    async fn smtp_sink_refuses_out_of_order_and_oversized_input() {
        let sinks = Sinks::start().unwrap();
        let out = talk(
            sinks.smtp,
            "DATA\r\nRCPT TO:<x@y.z>\r\nSTARTTLS\r\nQUIT\r\n",
        )
        .await;
        assert!(
            out.contains("503 RCPT first") && out.contains("503 MAIL first") && out.contains("502"),
            "{out}"
        );
        let long = format!("EHLO {}\r\n", "x".repeat(MAX_LINE + 10));
        let _ = talk(sinks.smtp, &long).await; // closed, not buffered without end
        let big = format!(
            "MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n{}\r\n.\r\nQUIT\r\n",
            "y\r\n".repeat(MAX_MESSAGE / 2)
        );
        let out = talk(sinks.smtp, &big).await;
        assert!(out.contains("552 message too large"), "{out}");
        assert!(sinks.snapshot().mail.is_empty());
    }

    #[tokio::test]
    async fn http_sink_records_method_host_and_path_without_query() {
        let sinks = Sinks::start().unwrap();
        let out = talk(
            sinks.http,
            "POST /v1/charges?card=4111111111111111 HTTP/1.1\r\nHost: api.payments.example\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert_eq!(
            sinks.snapshot().http,
            vec![Request {
                method: "POST".into(),
                host: "api.payments.example".into(),
                path: "/v1/charges".into()
            }]
        );
        let ctx = sinks.context();
        assert_eq!(
            ctx["smtp"]["url"],
            format!("smtp://127.0.0.1:{}", sinks.smtp.port())
        );
        assert_eq!(ctx["http"]["port"], sinks.http.port().to_string());
    }
}
