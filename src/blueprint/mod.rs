//! Blueprints: the YAML file that describes a throw-away copy of production.
//!
//! [`compile`] turns text into a typed, validated [`Blueprint`] or into every [`Diagnostic`] at
//! once. The model here has no spans and no templates left unchecked; values that depend on
//! resources created at run time stay [`Template`]s and are rendered by the engine.
//! The format is documented in docs/blueprints.md.

pub(crate) mod compile;
pub mod diag;
pub mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use compile::{CompileError, compile, compile_file, valid_name};
pub use diag::{Diagnostic, Diagnostics};

/// A value that may contain handlebars expressions (`{{params.x}}`, `{{resources.db.url}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Template {
    /// The text as written.
    pub src: String,
}

impl Template {
    /// Renders against a context built by the engine.
    ///
    /// # Errors
    /// Handlebars' message when a value is missing.
    pub fn render(&self, ctx: &Value) -> Result<String, String> {
        template::render(&self.src, ctx)
    }

    /// Renders for a position that parses the text (a shell command, an SQL query): see
    /// [`template::render_in`]. `vetted` are the values of params with a declared rule.
    ///
    /// # Errors
    /// Handlebars' message, or the value that is not safe there.
    pub fn render_in(
        &self,
        ctx: &Value,
        pos: template::Position,
        vetted: &[String],
    ) -> Result<String, String> {
        template::render_in(&self.src, ctx, pos, vetted)
    }

    /// Resource names this template reads outputs of.
    #[must_use]
    pub fn resource_refs(&self) -> Vec<String> {
        template::references(&self.src)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.segments.first().is_some_and(|s| s == "resources"))
            .filter_map(|r| r.segments.get(1).cloned())
            .collect()
    }
}

/// A compiled, validated blueprint.
#[derive(Debug, Clone, Serialize)]
pub struct Blueprint {
    /// Short name, used in run ids, tags and reports.
    pub name: String,
    /// What this environment is.
    pub description: Option<String>,
    /// The file it came from.
    pub path: PathBuf,
    /// Parameter values after defaults and `--param` were applied (and validated).
    pub params: BTreeMap<String, String>,
    /// Params that declare a `pattern` or `values`: their values were validated against it at
    /// compile time and may go anywhere a template can put them.
    pub param_rules: BTreeMap<String, ParamRule>,
    /// Declared secrets: name → where the value comes from.
    pub secrets: BTreeMap<String, SecretSource>,
    /// Local provider settings (paths already resolved against the blueprint's directory).
    pub local: LocalSettings,
    /// AWS provider settings (`providers.aws`; params already rendered).
    pub aws: AwsSettings,
    /// Resources in file order.
    pub resources: Vec<Resource>,
    /// Checks in file order.
    pub checks: Vec<Check>,
    /// What happens to the copy when the run ends.
    pub teardown: TeardownPolicy,
    /// How long anything this blueprint creates may live at most: written to the run's journal
    /// (and, on cloud providers, tagged on every resource) so that `dryrun cleanup --expired`
    /// can reap it.
    #[serde(with = "humantime_serde_compat")]
    pub ttl: Duration,
    /// `masking:` rules by database resource name (see [`crate::privacy`]).
    pub masking: BTreeMap<String, Vec<crate::privacy::Rule>>,
    /// `pii_gate:`: whether unclassified personal data stops the run (default `on`).
    pub pii_gate: crate::privacy::Gate,
    /// `firewall:`: whether the release's processes are confined to loopback (local provider).
    pub firewall: crate::firewall::Policy,
    /// `guards:`: migration findings that fail the run ([`crate::migrations::Guards`]).
    pub guards: crate::migrations::Guards,
    /// `migration_trace:`: whether PostgreSQL databases are traced while the release installs
    /// (default on).
    pub migration_trace: bool,
    /// `budget: {max_usd}`: a run on a billed provider whose worst case costs more is refused
    /// before anything is created ([`crate::cost`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<f64>,
}

impl Blueprint {
    /// Values of the params that declare a `pattern` or `values` (already validated): what
    /// [`template::render_in`] lets through in shell and SQL positions as the author declared.
    #[must_use]
    pub fn vetted(&self) -> Vec<String> {
        self.param_rules
            .keys()
            .filter_map(|k| self.params.get(k).cloned())
            .collect()
    }

    /// The resource of that name.
    #[must_use]
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// Directory the blueprint file is in (relative paths in it resolve against this).
    #[must_use]
    pub fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }
}

/// A param's declared `pattern` (full match) and `values` (an enum).
#[derive(Debug, Clone, Serialize)]
pub struct ParamRule {
    /// The regular expression as written (anchored when compiled).
    pub pattern: Option<String>,
    /// The allowed values.
    pub values: Option<Vec<String>>,
    #[serde(skip)]
    pub(crate) regex: Option<regex::Regex>,
}

impl ParamRule {
    /// Whether `value` is allowed.
    ///
    /// # Errors
    /// What it fails (for a message that follows the value).
    pub fn check(&self, value: &str) -> Result<(), String> {
        if let Some(vals) = &self.values
            && !vals.iter().any(|v| v == value)
        {
            return Err(format!("is not one of: {}", vals.join(", ")));
        }
        if let (Some(re), Some(p)) = (&self.regex, &self.pattern)
            && !re.is_match(value)
        {
            return Err(format!("does not match its pattern `{p}`"));
        }
        Ok(())
    }

    /// What an allowed value is, for a hint.
    #[must_use]
    pub fn describe(&self) -> String {
        match (&self.pattern, &self.values) {
            (Some(p), Some(v)) => format!("matches `{p}` and is one of: {}", v.join(", ")),
            (Some(p), None) => format!("matches `{p}` (whole value)"),
            (None, Some(v)) => format!("is one of: {}", v.join(", ")),
            (None, None) => "is allowed".into(),
        }
    }
}

/// Where a secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretSource {
    /// Environment variable that holds it.
    pub env: String,
    /// Whether a documented default exists (its value is never shown).
    pub has_default: bool,
    /// The default, for demo blueprints only; never serialized.
    #[serde(skip)]
    pub default: Option<String>,
}

/// Local provider settings from `providers.local`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalSettings {
    /// Backup store: one directory per production source (see docs/providers/local.md).
    pub backups: PathBuf,
    /// Production buckets: one directory per bucket.
    pub buckets: PathBuf,
    /// Variables of dryrun's environment that install steps, services and command checks may
    /// see besides the minimal set (`PATH`, `LANG`, `LC_*`, `TZ`): `providers.local.pass_env`.
    pub pass_env: Vec<String>,
    /// Whether databases are cloned from golden copies (`providers.local.cache`, default on;
    /// `--no-cache` turns it off for one run): docs/providers/local.md.
    pub cache: bool,
}

/// AWS provider settings from `providers.aws`. Every field is optional; docs/providers/aws.md
/// says what each default is. Values may use `{{params.…}}` and are rendered at compile time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct AwsSettings {
    /// Region; default: the standard chain (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// VPC of the run's security group; default: the VPC of the service's subnet, else of the
    /// production database's subnet group, else the default VPC.
    pub vpc_id: Option<String>,
    /// DB subnet group for restored databases; default: the production instance's.
    pub db_subnet_group: Option<String>,
    /// Instance class of restored databases; default: the production instance's.
    pub db_instance_class: Option<String>,
    /// IAM instance profile for services (needs SSM and read access to the release object).
    pub instance_profile: Option<String>,
    /// Whether the runner can reach private addresses in the VPC (sql checks connect only then).
    pub runner_in_vpc: bool,
    /// CIDR of the runner, allowed to reach restored databases when `runner_in_vpc` is set.
    pub runner_cidr: Option<String>,
    /// Longest wait for a restored database to become available.
    #[serde(with = "humantime_serde_compat")]
    pub restore_timeout: Duration,
}

/// One resource of the copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resource {
    /// Name in the blueprint (unique).
    pub name: String,
    /// What it is.
    pub spec: ResourceSpec,
    /// Explicit `depends_on`.
    pub depends_on: Vec<String>,
    /// Dependencies implied by `{{resources.X.…}}` references.
    pub implied: Vec<String>,
}

impl Resource {
    /// `kind.name`, e.g. `database.db`.
    #[must_use]
    pub fn address(&self) -> String {
        format!("{}.{}", self.spec.kind(), self.name)
    }

    /// All dependencies, explicit and implied, without duplicates.
    #[must_use]
    pub fn all_deps(&self) -> Vec<String> {
        let mut v = self.depends_on.clone();
        for d in &self.implied {
            if !v.contains(d) {
                v.push(d.clone());
            }
        }
        v
    }
}

/// What a resource is; its address is `kind.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    /// A database restored from a production backup.
    Database,
    /// A bucket copied from a production bucket.
    Bucket,
    /// A service running the candidate release.
    Service,
}

impl ResourceKind {
    /// `database`, `bucket` or `service`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Database => "database",
            ResourceKind::Bucket => "bucket",
            ResourceKind::Service => "service",
        }
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// An HTTP request.
    Http,
    /// A command.
    Command,
    /// A SQL query.
    Sql,
    /// Mail the SMTP sink received.
    Mail,
}

impl CheckKind {
    /// `http`, `command`, `sql` or `mail`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Http => "http",
            CheckKind::Command => "command",
            CheckKind::Sql => "sql",
            CheckKind::Mail => "mail",
        }
    }
}

impl std::fmt::Display for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The closed set of resource kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ResourceSpec {
    /// A database restored from a production backup.
    Database(DatabaseSpec),
    /// A bucket copied from a production bucket.
    Bucket(BucketSpec),
    /// A service running the candidate release.
    Service(ServiceSpec),
}

impl ResourceSpec {
    /// `database`, `bucket` or `service`.
    #[must_use]
    pub fn kind(&self) -> ResourceKind {
        match self {
            ResourceSpec::Database(_) => ResourceKind::Database,
            ResourceSpec::Bucket(_) => ResourceKind::Bucket,
            ResourceSpec::Service(_) => ResourceKind::Service,
        }
    }

    /// Outputs a resource of this kind offers to templates.
    #[must_use]
    pub fn outputs(kind: &str) -> &'static [&'static str] {
        match kind {
            "database" => &[
                "url",
                "host",
                "port",
                "name",
                "user",
                "password",
                "path",
                "engine",
                "backup_id",
            ],
            "bucket" => &["name", "path", "url"],
            "service" => &["url", "host", "port", "dir"],
            _ => &[],
        }
    }
}

/// Database engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Engine {
    /// SQLite file.
    #[serde(rename = "sqlite")]
    Sqlite,
    /// PostgreSQL.
    #[serde(rename = "postgres")]
    Postgres,
    /// MySQL (RDS instance snapshots; AWS only).
    #[serde(rename = "mysql")]
    Mysql,
    /// MariaDB (RDS instance snapshots; AWS only).
    #[serde(rename = "mariadb")]
    Mariadb,
    /// Aurora PostgreSQL (a copy-on-write clone of the cluster; AWS only).
    #[serde(rename = "aurora-postgresql")]
    AuroraPostgresql,
    /// Aurora MySQL (a copy-on-write clone of the cluster; AWS only).
    #[serde(rename = "aurora-mysql")]
    AuroraMysql,
}

impl Engine {
    /// Every engine, as written in blueprints.
    pub const ALL: [Engine; 6] = [
        Engine::Sqlite,
        Engine::Postgres,
        Engine::Mysql,
        Engine::Mariadb,
        Engine::AuroraPostgresql,
        Engine::AuroraMysql,
    ];

    /// Name as written in blueprints.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
            Engine::Mariadb => "mariadb",
            Engine::AuroraPostgresql => "aurora-postgresql",
            Engine::AuroraMysql => "aurora-mysql",
        }
    }

    /// Speaks the PostgreSQL protocol (sql checks, masking and the personal data gate work).
    #[must_use]
    pub fn is_postgres(self) -> bool {
        matches!(self, Engine::Postgres | Engine::AuroraPostgresql)
    }

    /// Speaks the MySQL protocol: dryrun restores and tears it down, but runs no sql check,
    /// scan or masking in it (no MySQL client in dryrun).
    #[must_use]
    pub fn is_mysql(self) -> bool {
        matches!(self, Engine::Mysql | Engine::Mariadb | Engine::AuroraMysql)
    }

    /// An Aurora cluster, copied as a clone rather than restored from a snapshot.
    #[must_use]
    pub fn is_aurora(self) -> bool {
        matches!(self, Engine::AuroraPostgresql | Engine::AuroraMysql)
    }
}

/// `type: database`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatabaseSpec {
    /// Engine.
    pub engine: Engine,
    /// Production source whose backups are restored (local: store directory; AWS: RDS instance).
    pub source: String,
    /// Database name inside the copy (PostgreSQL; default `app`).
    pub database: String,
    /// Backup to restore instead of the latest (the CLI's `--backup` overrides).
    pub backup: Option<String>,
}

/// `type: bucket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BucketSpec {
    /// Production bucket to copy from.
    pub source: String,
    /// Only objects under this prefix.
    pub prefix: Option<String>,
}

/// `type: service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    /// Environment for install steps and the service process (templates).
    pub env: BTreeMap<String, Template>,
    /// Replaces the release manifest's start command.
    pub start: Option<Template>,
    /// How long to wait for the health check after start.
    #[serde(with = "humantime_serde_compat")]
    pub ready_timeout: Duration,
    /// How the service runs on AWS (`aws:`); ignored by the local provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws: Option<ServiceAws>,
}

/// A service's `aws:` block: the EC2 instance that runs the release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceAws {
    /// AMI id (params rendered).
    pub ami: String,
    /// Instance type; default `t3.micro`.
    pub instance_type: String,
    /// Subnet; default: the default subnet of the VPC.
    pub subnet_id: Option<String>,
    /// Port the release listens on (`PORT` in its environment); default 8080.
    pub port: u16,
    /// Handlebars template of the instance's user data; default: the provider's, which fetches
    /// the release through a presigned URL, runs its install steps and starts it.
    pub user_data: Option<String>,
}

/// A check run against the copy after install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Unique name.
    pub name: String,
    /// Time limit of one attempt.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Extra attempts after a failure.
    pub retries: u32,
    /// Pause between attempts.
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    /// Times a passing check is run and timed (`repeat:`, default 1): report.json
    /// `checks[].timings_ms`, compared with a baseline's p50/p95.
    pub repeat: u32,
    /// What to check.
    pub spec: CheckSpec,
}

/// The closed set of check kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CheckSpec {
    /// An HTTP request.
    Http {
        /// URL (template).
        url: Template,
        /// Method, default GET.
        method: String,
        /// Request headers (templates).
        headers: BTreeMap<String, Template>,
        /// Request body (template).
        body: Option<Template>,
        /// Expected status; default 200.
        status: u16,
        /// Substring the body must contain.
        body_contains: Option<String>,
        /// JSON pointer → expected value (compared as text).
        json: BTreeMap<String, String>,
    },
    /// A shell command run on the runner.
    Command {
        /// `sh -c` command line (template).
        run: Template,
        /// Expected exit code; default 0.
        exit_code: i32,
        /// Substring stdout+stderr must contain.
        output_contains: Option<String>,
    },
    /// A query against a restored database.
    Sql {
        /// Database resource name.
        database: String,
        /// Query (template).
        query: Template,
        /// Expected first column of the first row, as text.
        value: Option<String>,
        /// Expected number of rows.
        rows: Option<u64>,
    },
    /// Mail the run's SMTP sink received ([`crate::sinks`]).
    Mail {
        /// How many (matching) mails; default: at least one.
        count: Option<u64>,
        /// Substring of a recipient address.
        to_contains: Option<String>,
        /// Substring of the subject.
        subject_contains: Option<String>,
    },
}

impl CheckSpec {
    /// `http`, `command` or `sql`.
    #[must_use]
    pub fn kind(&self) -> CheckKind {
        match self {
            CheckSpec::Http { .. } => CheckKind::Http,
            CheckSpec::Command { .. } => CheckKind::Command,
            CheckSpec::Sql { .. } => CheckKind::Sql,
            CheckSpec::Mail { .. } => CheckKind::Mail,
        }
    }

    /// Resource names the check needs (its templates' references and, for sql, its database).
    #[must_use]
    pub fn resource_refs(&self) -> Vec<String> {
        match self {
            CheckSpec::Http {
                url, headers, body, ..
            } => {
                let mut v = url.resource_refs();
                for t in headers.values().chain(body.iter()) {
                    v.extend(t.resource_refs());
                }
                v
            }
            CheckSpec::Command { run, .. } => run.resource_refs(),
            CheckSpec::Sql {
                database, query, ..
            } => {
                let mut v = query.resource_refs();
                v.push(database.clone());
                v
            }
            CheckSpec::Mail { .. } => Vec::new(),
        }
    }
}

/// What happens to the copy when the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum TeardownPolicy {
    /// Tear down after every run (the default).
    Always,
    /// Tear down after a passing run; keep a failed one for `keep_for` to look at.
    OnSuccess {
        /// How long a failed copy is kept.
        #[serde(with = "humantime_serde_compat")]
        keep_for: Duration,
    },
    /// Keep the copy for `keep_for`, then `dryrun cleanup --expired` removes it.
    Keep {
        /// How long.
        #[serde(with = "humantime_serde_compat")]
        keep_for: Duration,
    },
}

/// Serializes durations as humantime strings ("2h 30m") in plans and JSON.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}
