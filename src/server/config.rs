//! `dryrun serve` configuration: a TOML file (`--config FILE`, documented in docs/server.md),
//! with flags and environment variables for the essentials.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse or has a bad value.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong (with line and column from the TOML parser).
        message: String,
    },
}

/// The server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on; default 127.0.0.1:8080.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Root directory of the blueprints the webhook and the dashboard may start (relative to
    /// the config file); default: the current directory.
    pub blueprints: Option<PathBuf>,
    /// State directory (overrides `DRYRUN_STATE_DIR`).
    pub state_dir: Option<PathBuf>,
    /// Provider for every run; default `local`.
    #[serde(default = "default_provider")]
    pub provider: String,
    /// Dry runs at once, over all environments; default 2.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Runs waiting at most; beyond it the webhook answers 429. Default 64.
    #[serde(default = "default_queue_limit")]
    pub queue_limit: usize,
    /// How long an accepted run may wait (across restarts) before it expires unrun; default 24h.
    #[serde(default = "default_queue_max_age", with = "humantime_de")]
    pub queue_max_age: Duration,
    /// Base URL for `status_url` in webhook answers and callbacks; default `http://LISTEN`.
    pub public_url: Option<String>,
    /// How long a SIGTERM lets running dry runs tear down before giving up; default 2m.
    #[serde(default = "default_grace", with = "humantime_de")]
    pub shutdown_grace: Duration,
    /// Webhook settings.
    #[serde(default)]
    pub webhook: WebhookConfig,
    /// Callback settings.
    #[serde(default)]
    pub callbacks: CallbackConfig,
    /// Failure notifications.
    #[serde(default)]
    pub notify: NotifyConfig,
    /// Nightly rehearsals.
    #[serde(default)]
    pub schedule: Vec<Schedule>,
    /// Tokens and sessions for the dashboard and the API (see [`super::auth`]).
    #[serde(default)]
    pub auth: super::auth::AuthConfig,
    /// Host names the server answers to besides `localhost`, the listen address and the
    /// `public_url` host (requests for any other `Host` are refused: DNS rebinding).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// How long finished runs' history rows, reports, journals and logs are kept; default 90d.
    #[serde(default = "default_retention", with = "humantime_de")]
    pub retention: Duration,
    /// The shared control database (`postgres://…`) for several workers; default: SQLite in
    /// the state directory. `--database-url` and `DRYRUN_DATABASE_URL` override it.
    pub database_url: Option<String>,
    /// How long a worker may go without a heartbeat before the others take it for dead and
    /// recover its runs (PostgreSQL only); default 15s, at least 5s.
    #[serde(default = "default_lease_timeout", with = "humantime_de")]
    pub lease_timeout: Duration,
}

/// `[webhook]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Environment variable holding the shared secret; default `DRYRUN_WEBHOOK_SECRET`.
    #[serde(default = "default_secret_env")]
    pub secret_env: String,
    /// Oldest accepted `X-Dryrun-Timestamp`; default 300 s.
    #[serde(default = "default_max_age", with = "humantime_de")]
    pub max_age: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secret_env: default_secret_env(),
            max_age: default_max_age(),
        }
    }
}

/// `[callbacks]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackConfig {
    /// URL prefixes a `callback_url` must start with (anything else is refused with 422, so
    /// a webhook cannot make the server call arbitrary addresses). Default: none allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Attempts per callback; default 5.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// First backoff, doubled per attempt; default 500ms.
    #[serde(default = "default_backoff", with = "humantime_de")]
    pub backoff: Duration,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            allow: Vec::new(),
            attempts: default_attempts(),
            backoff: default_backoff(),
        }
    }
}

/// `[notify]`: a Slack-compatible incoming webhook (`{"text": …}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where to POST; notifications are off without it.
    pub url: Option<String>,
    /// Notify when a run does not pass; default true.
    #[serde(default = "default_true")]
    pub on_failure: bool,
    /// Notify when a run restored a backup older than this (backup verification).
    #[serde(default, with = "humantime_opt")]
    pub max_backup_age: Option<Duration>,
}

/// `[[schedule]]`: a rehearsal on a cron schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Name, shown in history.
    pub name: String,
    /// Cron expression (5 fields, or 6 with seconds first).
    pub cron: String,
    /// IANA time zone the expression is read in; default UTC.
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// Blueprint path under the blueprints root.
    pub blueprint: String,
    /// Release: the one in production.
    pub release: String,
    /// A release to compare with: rehearsed first on its own copy of the same backup, the
    /// checks' p50/p95 of `release` against its (`guards.max_p95_regression`). E.g. the
    /// nightly rehearses `releases/next` with `baseline = "releases/current"`.
    pub baseline: Option<String>,
    /// Blueprint params.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Provider of this rehearsal; default: the server's `provider`.
    pub provider: Option<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_provider() -> String {
    "local".into()
}
fn default_concurrency() -> usize {
    2
}
fn default_queue_limit() -> usize {
    64
}
fn default_queue_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_grace() -> Duration {
    Duration::from_secs(120)
}
fn default_secret_env() -> String {
    "DRYRUN_WEBHOOK_SECRET".into()
}
fn default_max_age() -> Duration {
    Duration::from_secs(300)
}
fn default_attempts() -> u32 {
    5
}
fn default_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_true() -> bool {
    true
}
fn default_tz() -> String {
    "UTC".into()
}
fn default_retention() -> Duration {
    Duration::from_secs(90 * 24 * 3600)
}
fn default_lease_timeout() -> Duration {
    crate::control::LEASE_TIMEOUT
}

pub(crate) mod humantime_de {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write e.g. 30s, 5m, 2h"
            ))
        })
    }
}

mod humantime_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration ({e})")))
    }
}

impl Default for Config {
    fn default() -> Self {
        defaults()
    }
}

fn defaults() -> Config {
    Config {
        listen: default_listen(),
        blueprints: None,
        state_dir: None,
        provider: default_provider(),
        concurrency: default_concurrency(),
        queue_limit: default_queue_limit(),
        queue_max_age: default_queue_max_age(),
        public_url: None,
        shutdown_grace: default_grace(),
        webhook: WebhookConfig::default(),
        callbacks: CallbackConfig::default(),
        notify: NotifyConfig::default(),
        schedule: Vec::new(),
        auth: super::auth::AuthConfig::default(),
        allowed_hosts: Vec::new(),
        retention: default_retention(),
        database_url: None,
        lease_timeout: default_lease_timeout(),
    }
}

impl Config {
    /// Reads a config file; relative paths in it resolve against its directory.
    ///
    /// # Errors
    /// Unreadable file, TOML errors (with line and column), bad cron or time zone.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Some(b) = &cfg.blueprints
            && b.is_relative()
        {
            cfg.blueprints = Some(dir.join(b));
        }
        if let Some(s) = &cfg.state_dir
            && s.is_relative()
        {
            cfg.state_dir = Some(dir.join(s));
        }
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Checks values serde cannot: cron expressions, time zones, limits.
    ///
    /// # Errors
    /// A message naming the bad entry.
    pub fn validate(&self) -> Result<(), String> {
        let known = |p: &str| crate::provider::NAMES.contains(&p);
        if !known(&self.provider) {
            return Err(format!(
                "provider `{}`: this build has {}",
                self.provider,
                crate::provider::NAMES.join(", ")
            ));
        }
        for s in &self.schedule {
            if let Some(p) = &s.provider
                && !known(p)
            {
                return Err(format!(
                    "schedule `{}`: provider `{p}`: this build has {}",
                    s.name,
                    crate::provider::NAMES.join(", ")
                ));
            }
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if self.auth.tokens.is_empty() && !listens_on_loopback_only(&self.listen) {
            return Err(format!(
                "listen = \"{}\" is reachable beyond this machine, and no [[auth.tokens]] are configured: anyone who can reach it could read production's reports and start runs; add a token (`dryrun token` makes one) or listen on 127.0.0.1",
                self.listen
            ));
        }
        if self.retention < Duration::from_secs(3600) {
            return Err("retention must be at least 1h".into());
        }
        if self.lease_timeout < Duration::from_secs(5) {
            return Err(format!(
                "lease_timeout must be at least 5s (a worker heartbeats every {}s)",
                crate::control::HEARTBEAT.as_secs()
            ));
        }
        if let Some(url) = &self.database_url {
            crate::control::postgres::parse_url(url).map_err(|e| format!("database_url: {e}"))?;
        }
        for s in &self.schedule {
            super::schedule::parse(&s.cron)
                .map_err(|e| format!("schedule `{}`: cron `{}`: {e}", s.name, s.cron))?;
            s.timezone.parse::<chrono_tz::Tz>().map_err(|_| format!("schedule `{}`: unknown time zone `{}` (use an IANA name such as Europe/Berlin)", s.name, s.timezone))?;
        }
        Ok(())
    }
}

/// Whether every address `listen` resolves to is a loopback address.
fn listens_on_loopback_only(listen: &str) -> bool {
    use std::net::ToSocketAddrs as _;
    match listen.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert!(
            c.callbacks.allow.is_empty(),
            "no callback destination is allowed by default"
        );
        assert_eq!(c.webhook.max_age, Duration::from_secs(300));
    }

    #[test]
    fn listening_beyond_loopback_needs_a_token() {
        let mut c = Config {
            listen: "0.0.0.0:8080".into(),
            ..Config::default()
        };
        let e = c.validate().unwrap_err();
        assert!(e.contains("[[auth.tokens]]"), "{e}");
        c.listen = "127.0.0.1:8080".into();
        assert!(c.validate().is_ok());
        c.listen = "localhost:8080".into();
        assert!(c.validate().is_ok());
        c.listen = "0.0.0.0:8080".into();
        c.auth.tokens.push(super::super::auth::TokenConfig {
            name: "ops".into(),
            role: super::super::auth::Role::Read,
            sha256: Some("00".repeat(32)),
            env: None,
        });
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_short_lease_timeout_and_a_bad_database_url_are_refused_without_the_password() {
        let mut c = Config {
            lease_timeout: Duration::from_secs(1),
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .contains("lease_timeout must be at least 5s")
        );
        c.lease_timeout = Duration::from_secs(5);
        assert!(c.validate().is_ok());
        for url in [
            "postgres://u:hunter2-pw@db:notaport/x",
            "postgres://u:hunter2-pw@db/x?sslmode=require",
        ] {
            c.database_url = Some(url.into());
            let e = c.validate().unwrap_err();
            assert!(e.starts_with("database_url: "), "{e}");
            assert!(!e.contains("hunter2-pw"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_schedules_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listn = \"x\"\n").unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("listn"));
        std::fs::write(&p, "[[schedule]]\nname = \"n\"\ncron = \"61 * * * *\"\nblueprint = \"b\"\nrelease = \"r\"\n").unwrap();
        assert!(
            Config::load(&p)
                .unwrap_err()
                .to_string()
                .contains("schedule `n`")
        );
        std::fs::write(&p, "[[schedule]]\nname = \"n\"\ncron = \"0 3 * * *\"\ntimezone = \"Mars/Olympus\"\nblueprint = \"b\"\nrelease = \"r\"\n").unwrap();
        assert!(
            Config::load(&p)
                .unwrap_err()
                .to_string()
                .contains("unknown time zone")
        );
    }
}
