//! Who may drive the server, and from where: bearer tokens and sessions with roles, CSRF
//! tokens for the dashboard's forms, and the `Host`/`Origin` rules that stop DNS rebinding and
//! cross-site requests.
//!
//! # Rules
//! - **Hosts.** A request is answered only when its `Host` is `localhost`, the listen address,
//!   the `public_url` host or one of `allowed_hosts` — or, when the server listens on every
//!   interface (`0.0.0.0`, `::`), any IP literal (a browser that was led to the server by a
//!   rebinding DNS name sends that name, never an IP literal). The port is not compared.
//! - **Origins.** A request that carries an `Origin` must come from an allowed host; a
//!   state-changing request marked `Sec-Fetch-Site: cross-site` is refused as well.
//! - **Roles.** `read` sees the dashboard and the API (runs, reports, logs, trend, metrics);
//!   `run` may also start runs from the dashboard. The signed webhook needs no token (its HMAC is
//!   its authentication); `/healthz` is open.
//! - **Tokens** are configured as the SHA-256 of the token (so the config file holds no
//!   secret) or as the name of an environment variable that holds it; a browser exchanges one
//!   for a session cookie (`HttpOnly`, `SameSite=Strict`, `Secure` behind https) on `/login`.
//! - **CSRF.** Every form carries a token: HMAC-SHA256, under a key made at start-up, of the
//!   session id (or, without authentication, of a random cookie the page sets). A POST without
//!   the token that matches its own cookie is refused, so a page on another site cannot submit
//!   the form even in a browser that holds the session.
//!
//! Without any token configured the server is open (as before) but only on loopback:
//! `dryrun serve` refuses to listen on another address then.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// Session cookie name.
pub const SESSION_COOKIE: &str = "dryrun_session";
/// Cookie that binds the CSRF token of a visitor without a session.
pub const CSRF_COOKIE: &str = "dryrun_csrf";
/// Name of the CSRF field in forms.
pub const CSRF_FIELD: &str = "csrf";

/// What a token lets its holder do. Ordered: `Run` includes `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The dashboard and the API: runs, reports, logs, trend, metrics.
    Read,
    /// Also start dry runs from the dashboard.
    Run,
}

impl Role {
    /// `read` or `run`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Run => "run",
        }
    }
}

/// `[[auth.tokens]]` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (shown in the log and the dashboard).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Hex SHA-256 of the token (`dryrun token` prints one).
    pub sha256: Option<String>,
    /// Environment variable that holds the token itself.
    pub env: Option<String>,
}

/// `[auth]` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The tokens; none means no authentication (loopback only).
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// How long a dashboard session lasts; default 12h.
    #[serde(default = "default_session_ttl", with = "super::config::humantime_de")]
    pub session_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens: Vec::new(),
            session_ttl: default_session_ttl(),
        }
    }
}

fn default_session_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

struct Token {
    name: String,
    role: Role,
    hash: [u8; 32],
}

struct Session {
    principal: Principal,
    expires: Instant,
}

/// The server's authentication state.
pub struct Auth {
    tokens: Vec<Token>,
    sessions: Mutex<HashMap<String, Session>>,
    session_ttl: Duration,
    csrf_key: Secret,
    secure_cookies: bool,
    held: Vec<Secret>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Constant-time equality of two digests (a plain `==` could stop at the first differing
/// byte; written out because it is four lines).
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex(bytes: usize) -> String {
    use rand::RngExt as _;
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// A new random token (what `dryrun token` hands out) and its hex SHA-256 for the config.
#[must_use]
pub fn new_token() -> (Secret, String) {
    let t = format!("drt_{}", Secret::generate(40).expose());
    let h = hex::encode(sha256(t.as_bytes()));
    (Secret::new(t), h)
}

impl Auth {
    /// Loads the tokens (reading `env` ones from the environment).
    ///
    /// # Errors
    /// A token with neither or both of `sha256` and `env`, a bad hash, an unset variable, a
    /// duplicate name.
    pub fn from_config(cfg: &AuthConfig, secure_cookies: bool) -> Result<Auth, String> {
        let mut tokens: Vec<Token> = Vec::new();
        let mut held = Vec::new();
        for t in &cfg.tokens {
            if tokens.iter().any(|x| x.name == t.name) {
                return Err(format!("[[auth.tokens]] `{}` is listed twice", t.name));
            }
            let hash = match (&t.sha256, &t.env) {
                (Some(h), None) => {
                    let bytes = hex::decode(h.trim()).ok().filter(|b| b.len() == 32);
                    let Some(bytes) = bytes else {
                        return Err(format!(
                            "[[auth.tokens]] `{}`: sha256 must be 64 hex digits (`dryrun token` prints a token and its hash)",
                            t.name
                        ));
                    };
                    let mut a = [0u8; 32];
                    a.copy_from_slice(&bytes);
                    a
                }
                (None, Some(var)) => {
                    let v = std::env::var(var).ok().filter(|v| !v.is_empty());
                    let Some(v) = v else {
                        return Err(format!(
                            "[[auth.tokens]] `{}`: the environment variable {var} is not set",
                            t.name
                        ));
                    };
                    if v.len() < 16 {
                        return Err(format!(
                            "[[auth.tokens]] `{}`: the token in {var} is shorter than 16 characters",
                            t.name
                        ));
                    }
                    let s = Secret::new(v);
                    let h = sha256(s.expose().as_bytes());
                    held.push(s);
                    h
                }
                _ => {
                    return Err(format!(
                        "[[auth.tokens]] `{}`: give exactly one of `sha256` (the token's hash) and `env` (the variable that holds it)",
                        t.name
                    ));
                }
            };
            tokens.push(Token {
                name: t.name.clone(),
                role: t.role,
                hash,
            });
        }
        let csrf_key = Secret::new(random_hex(32));
        held.push(csrf_key.clone());
        Ok(Auth {
            tokens,
            sessions: Mutex::new(HashMap::new()),
            session_ttl: cfg.session_ttl,
            csrf_key,
            secure_cookies,
            held,
        })
    }

    /// Whether any token is configured (else everything but the form's CSRF is open).
    #[must_use]
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Secrets the server holds because of authentication (tokens read from the environment,
    /// the CSRF key), for the redactor.
    #[must_use]
    pub fn held_secrets(&self) -> Vec<Secret> {
        self.held.clone()
    }

    /// The principal a token belongs to.
    #[must_use]
    pub fn check_token(&self, token: &str) -> Option<Principal> {
        let h = sha256(token.trim().as_bytes());
        let mut found = None;
        for t in &self.tokens {
            if same(&t.hash, &h) {
                found = Some(Principal {
                    name: t.name.clone(),
                    role: t.role,
                });
            }
        }
        found
    }

    /// Who made the request: a bearer token, else a live session cookie.
    #[must_use]
    pub fn identify(&self, headers: &HeaderMap) -> Option<Principal> {
        if let Some(t) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return self.check_token(t);
        }
        let id = cookie(headers, SESSION_COOKIE)?;
        let mut sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.get(&id).map(|s| s.principal.clone())
    }

    /// Starts a session for a valid token; returns the cookie to set.
    #[must_use]
    pub fn login(&self, token: &str) -> Option<(Principal, String)> {
        let p = self.check_token(token)?;
        let id = random_hex(32);
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                id.clone(),
                Session {
                    principal: p.clone(),
                    expires: Instant::now() + self.session_ttl,
                },
            );
        let cookie = self.set_cookie(SESSION_COOKIE, &id, Some(self.session_ttl));
        Some((p, cookie))
    }

    /// Ends the request's session; returns the cookie that clears it.
    pub fn logout(&self, headers: &HeaderMap) -> String {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            self.sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        }
        self.set_cookie(SESSION_COOKIE, "", Some(Duration::ZERO))
    }

    fn set_cookie(&self, name: &str, value: &str, max_age: Option<Duration>) -> String {
        let mut c = cookie::Cookie::build((name.to_string(), value.to_string()))
            .path("/")
            .http_only(true)
            .same_site(cookie::SameSite::Strict)
            .secure(self.secure_cookies);
        if let Some(age) = max_age {
            c = c.max_age(cookie::time::Duration::seconds(
                i64::try_from(age.as_secs()).unwrap_or(i64::MAX),
            ));
        }
        c.build().to_string()
    }

    /// The CSRF token for a page, and the cookie to set when the visitor has neither a session
    /// nor a CSRF cookie yet.
    #[must_use]
    pub fn csrf_for_page(&self, headers: &HeaderMap) -> (String, Option<String>) {
        if let Some(b) = cookie(headers, SESSION_COOKIE).or_else(|| cookie(headers, CSRF_COOKIE)) {
            return (self.csrf_token(&b), None);
        }
        let b = random_hex(16);
        (
            self.csrf_token(&b),
            Some(self.set_cookie(CSRF_COOKIE, &b, None)),
        )
    }

    fn csrf_token(&self, binding: &str) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.csrf_key.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(binding.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `token` (from the form) is the CSRF token of this request's cookie.
    #[must_use]
    pub fn check_csrf(&self, headers: &HeaderMap, token: &str) -> bool {
        let Ok(given) = hex::decode(token.trim()) else {
            return false;
        };
        [SESSION_COOKIE, CSRF_COOKIE].iter().any(|name| {
            cookie(headers, name).is_some_and(|b| {
                let mut mac =
                    <Hmac<Sha256> as KeyInit>::new_from_slice(self.csrf_key.expose().as_bytes())
                        .expect("HMAC takes keys of any length");
                mac.update(b.as_bytes());
                mac.verify_slice(&given).is_ok()
            })
        })
    }
}

/// The value of cookie `name` in the request.
#[must_use]
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .flatten()
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
        .filter(|v| !v.is_empty())
}

/// The host names a request may be addressed to (see the module doc).
#[derive(Debug, Clone)]
pub struct Hosts {
    names: Vec<String>,
    any_ip: bool,
}

/// The host part of a `Host` header or URL authority, lower-case, without port or brackets.
fn host_of(authority: &str) -> Option<String> {
    let a = authority.trim();
    if a.is_empty() || a.contains(['/', '@', ' ']) {
        return None;
    }
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split_once(']')?.0
    } else {
        match a.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => a,
        }
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

impl Hosts {
    /// The rules for a server bound to `addr`, reached at `public_url`, with `extra` names.
    #[must_use]
    pub fn new(addr: SocketAddr, public_url: Option<&str>, extra: &[String]) -> Hosts {
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
            addr.ip().to_string(),
        ];
        if let Some(h) = public_url
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| {
                u.host_str()
                    .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
            })
        {
            names.push(h);
        }
        names.extend(extra.iter().map(|h| h.trim().to_ascii_lowercase()));
        Hosts {
            names,
            any_ip: addr.ip().is_unspecified(),
        }
    }

    /// Whether a `Host` header value is one of ours.
    #[must_use]
    pub fn allows(&self, host_header: &str) -> bool {
        let Some(h) = host_of(host_header) else {
            return false;
        };
        self.names.contains(&h) || (self.any_ip && h.parse::<IpAddr>().is_ok())
    }

    /// Whether an `Origin` header value names one of our hosts.
    #[must_use]
    pub fn allows_origin(&self, origin: &str) -> bool {
        let Some(rest) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        self.allows(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hosts_refuse_rebinding_names_and_accept_our_own() {
        let loopback = Hosts::new("127.0.0.1:8080".parse().unwrap(), None, &[]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
        ] {
            assert!(loopback.allows(ok), "{ok}");
        }
        for bad in [
            "attacker.example:8080",
            "10.0.0.5:8080",
            "",
            "127.0.0.1.nip.io",
            "a@127.0.0.1",
        ] {
            assert!(!loopback.allows(bad), "{bad}");
        }
        let public = Hosts::new(
            "0.0.0.0:8080".parse().unwrap(),
            Some("https://dryrun.example.internal"),
            &["dr.internal".into()],
        );
        for ok in [
            "dryrun.example.internal",
            "10.0.0.5:8080",
            "dr.internal:443",
            "[fd00::1]:8080",
        ] {
            assert!(public.allows(ok), "{ok}");
        }
        assert!(!public.allows("evil.example"));
        assert!(public.allows_origin("https://dryrun.example.internal"));
        assert!(!public.allows_origin("https://evil.example"));
        assert!(!public.allows_origin("null"));
    }

    #[test]
    fn tokens_sessions_and_csrf() {
        let (token, hash) = new_token();
        let cfg = AuthConfig {
            tokens: vec![TokenConfig {
                name: "ops".into(),
                role: Role::Run,
                sha256: Some(hash),
                env: None,
            }],
            session_ttl: Duration::from_secs(60),
        };
        let a = Auth::from_config(&cfg, false).unwrap();
        assert!(a.enabled());
        let bearer = format!("Bearer {}", token.expose());
        let p = a.identify(&headers(&[("authorization", &bearer)])).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("ops", Role::Run));
        assert!(
            a.identify(&headers(&[("authorization", "Bearer nope")]))
                .is_none()
        );
        let (_, set) = a.login(token.expose()).unwrap();
        let id = set.split(';').next().unwrap();
        let h = headers(&[("cookie", id)]);
        assert_eq!(a.identify(&h).unwrap().name, "ops");
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        // CSRF: the page's token fits its own cookie, not another's.
        let (csrf, new_cookie) = a.csrf_for_page(&h);
        assert!(new_cookie.is_none());
        assert!(a.check_csrf(&h, &csrf));
        assert!(!a.check_csrf(&headers(&[("cookie", "dryrun_session=other")]), &csrf));
        assert!(!a.check_csrf(&headers(&[]), &csrf));
        assert!(!a.check_csrf(&h, "00"));
        let (anon, set) = a.csrf_for_page(&headers(&[]));
        let anon_cookie = set.unwrap();
        let h2 = headers(&[("cookie", anon_cookie.split(';').next().unwrap())]);
        assert!(a.check_csrf(&h2, &anon));
        a.logout(&h);
        assert!(a.identify(&h).is_none());
    }

    #[test]
    fn bad_token_configs_are_refused() {
        let t = |sha: Option<&str>, env: Option<&str>| AuthConfig {
            tokens: vec![TokenConfig {
                name: "x".into(),
                role: Role::Read,
                sha256: sha.map(str::to_string),
                env: env.map(str::to_string),
            }],
            session_ttl: Duration::from_secs(1),
        };
        assert!(Auth::from_config(&t(None, None), false).is_err());
        assert!(Auth::from_config(&t(Some("abc"), None), false).is_err());
        assert!(Auth::from_config(&t(None, Some("DRYRUN_TEST_SURELY_UNSET_VAR")), false).is_err());
    }
}
