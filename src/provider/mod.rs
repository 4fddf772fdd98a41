//! The provider trait: the only door between the engine and a backend.
//!
//! Verbs are small and each has its own request type: find a backup, create a resource, restore
//! data into it, install the release on it, delete it, and sweep for anything a run left without
//! a journal entry. The engine holds an `Arc<dyn Provider>` and knows no backend types; the
//! local provider ([`local`]) and the AWS provider implement the same trait.
//!
//! # Guarantees a provider gives
//! - `delete` is idempotent and works from a [`ResourceRecord`] journaled *before* `create`
//!   ran, so a crash at any moment leaves something `delete` can finish.
//! - Everything created carries the run id (a tag, an environment variable, a path) so that
//!   `sweep` finds what the journal missed.
//! - A provider never mutates anything it did not create.
//!
//! # Optional verbs
//! A few verbs have default implementations that keep the local provider's behaviour (where
//! everything is on this machine) and that a cloud provider overrides:
//! [`Provider::probe`] runs a check where the copy can be reached (AWS: on the instance through
//! SSM Run Command), [`Provider::fetch_release`] fetches a release the backend keeps (AWS:
//! `s3://BUCKET/KEY`), [`Provider::tagged_runs`] lists runs that own tagged resources so that
//! cleanup finds them without a journal, [`Provider::describe_target`] names the account and
//! region at the start of a run, and [`Provider::api_calls`] counts requests for the report.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(test)]
pub mod fake;
pub mod local;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::blueprint::{BucketSpec, DatabaseSpec, ServiceSpec};
use crate::release::Release;
use crate::secret::Redactor;

/// The providers this build has, by name.
pub const NAMES: &[&str] = &[
    "local",
    #[cfg(feature = "aws")]
    "aws",
];

/// The one place that chooses a backend by name, for the CLI and the server alike: `local`
/// (with the blueprint's `providers.local` settings) or `aws` (the standard credential chain;
/// `endpoint`, else `AWS_ENDPOINT_URL`, points at an emulator). `bp` is `None` for cleanup,
/// which needs only journals and tags.
///
/// # Errors
/// An unknown name; the AWS provider's configuration errors (no region).
pub async fn choose(
    name: &str,
    state: &crate::state::StateDir,
    bp: Option<&crate::blueprint::Blueprint>,
    endpoint: Option<String>,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    #[cfg(not(feature = "aws"))]
    let _ = &endpoint;
    match name {
        "local" => Ok(std::sync::Arc::new(local::LocalProvider::new(
            state.clone(),
            bp.map(|b| b.local.clone()),
        ))),
        #[cfg(feature = "aws")]
        "aws" => Ok(std::sync::Arc::new(
            aws::AwsProvider::connect(bp, endpoint).await?,
        )),
        #[cfg(not(feature = "aws"))]
        "aws" => Err(ProviderError::Other(
            "this dryrun was built without the AWS provider (--no-default-features); build it with `cargo build --release` to get it".into(),
        )),
        other => Err(ProviderError::Other(format!(
            "unknown provider `{other}`; this build has: {}",
            NAMES.join(", ")
        ))),
    }
}

/// The remote release schemes the provider named `provider` fetches (see
/// [`Provider::fetch_release`] and [`crate::reference`]): `s3` for `aws`, none for `local`.
#[must_use]
pub fn remote_schemes(provider: &str) -> &'static [&'static str] {
    match provider {
        "aws" => &["s3"],
        _ => &[],
    }
}

/// Which backup to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupPick {
    /// The newest complete backup.
    Latest,
    /// A backup by id.
    Id(String),
    /// The newest complete backup taken at or before this time.
    Before(DateTime<Utc>),
}

/// A production backup a database can be restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    /// Identity (snapshot id, directory name).
    pub id: String,
    /// Production source.
    pub source: String,
    /// When production was captured.
    pub taken_at: DateTime<Utc>,
    /// Size in bytes, when known.
    pub size_bytes: Option<u64>,
    /// Where it lives (local: file path; AWS: snapshot ARN).
    pub location: String,
}

/// Facts about the run every request carries.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// Run id: the tag on everything created.
    pub run_id: String,
    /// Blueprint name.
    pub blueprint: String,
    /// When resources of this run may be reaped.
    pub expires_at: DateTime<Utc>,
    /// Where the run keeps its logs (history, not a resource).
    pub log_dir: PathBuf,
    /// Redacts secrets from anything a provider returns for display.
    pub redactor: Redactor,
    /// The candidate release (`None` outside a run: cleanup). A service's `create` may need it
    /// before install (AWS: the instance fetches it while it boots).
    pub release: Option<crate::release::Release>,
}

/// What the journal records about a resource: enough for `delete` and `sweep` to find it
/// again from another process. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRecord {
    /// `kind.name`.
    pub address: String,
    /// `database`, `bucket`, `service`.
    pub kind: crate::blueprint::ResourceKind,
    /// Provider identity (a directory, an instance id).
    pub id: String,
    /// Provider-specific details (pids, ports, engine), plain data.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// An output of a created resource, offered to templates as `resources.NAME.OUTPUT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The value.
    pub value: String,
    /// Secret outputs (passwords, URLs with passwords) are registered with the redactor.
    pub secret: bool,
}

/// Outputs by name.
pub type Outputs = BTreeMap<String, Output>;

/// What `create` is asked to make.
#[derive(Debug, Clone)]
pub enum ResourceRequest {
    /// A database.
    Database(DatabaseSpec),
    /// A bucket.
    Bucket(BucketSpec),
    /// A service.
    Service(ServiceSpec),
}

/// Result of `create`.
#[derive(Debug, Clone)]
pub struct Created {
    /// The record to journal (replaces the planned one).
    pub record: ResourceRecord,
    /// Outputs known right after creation.
    pub outputs: Outputs,
}

/// Persists record updates (a pid learned after spawn) to the journal before going on.
pub trait RecordSink: Send + Sync {
    /// Journal an updated record. Errors are the journal's; the provider stops on one.
    ///
    /// # Errors
    /// When the journal cannot be written.
    fn update(&self, record: &ResourceRecord) -> Result<(), std::io::Error>;
}

/// What [`Provider::restore_database`] gave.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// Outputs learnt by restoring (`backup_id`).
    pub outputs: Outputs,
    /// Columns masked while the data loaded.
    pub streamed: Option<crate::privacy::stream::Streamed>,
    /// How the copy came to be, when the provider knows better than "restored".
    pub clone: Option<CloneInfo>,
}

/// How a database copy came to be: report.json `backup.clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneInfo {
    /// `restore` (from the backup into the copy), `reflink` or `copy` (from a golden copy).
    pub method: CloneMethod,
    /// Whether a golden copy was used: `hit`, `miss` (built by this run), `off`.
    pub golden: GoldenUse,
    /// Until the copy was ready (restore, clone and start), in ms.
    pub ms: u64,
    /// Of which building the golden copy (on a miss), in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// Why no golden copy was used, when `golden` is `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// See [`CloneInfo::method`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMethod {
    /// Restored from the backup into the copy itself.
    Restore,
    /// Cloned from a golden copy by copy-on-write (`FICLONE`).
    Reflink,
    /// Cloned from a golden copy by copying its files.
    Copy,
}

/// See [`CloneInfo::golden`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GoldenUse {
    /// An existing golden copy was cloned.
    Hit,
    /// This run built the golden copy (then cloned it).
    Miss,
    /// No golden copy: `--no-cache`, `providers.local.cache: false`, or a backup without a
    /// checksum.
    Off,
}

impl std::fmt::Display for CloneMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloneMethod::Restore => "restore",
            CloneMethod::Reflink => "reflink",
            CloneMethod::Copy => "copy",
        })
    }
}

impl std::fmt::Display for GoldenUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GoldenUse::Hit => "hit",
            GoldenUse::Miss => "miss",
            GoldenUse::Off => "off",
        })
    }
}

/// What `install` is given.
#[derive(Debug)]
pub struct InstallRequest<'a> {
    /// The service's record (from `create`).
    pub record: &'a ResourceRecord,
    /// The service spec.
    pub spec: &'a ServiceSpec,
    /// The candidate release.
    pub release: &'a Release,
    /// Rendered environment (may contain secrets; never logged).
    pub env: BTreeMap<String, String>,
    /// Rendered start command override.
    pub start: Option<String>,
    /// How long to wait for health.
    pub ready_timeout: Duration,
    /// Stops waiting when cancelled.
    pub cancel: CancellationToken,
    /// The blueprint's egress firewall.
    pub firewall: &'a crate::firewall::Policy,
    /// Addresses on this machine the release must reach besides the run's own copies (the
    /// side-effect sinks).
    pub reachable: Vec<std::net::SocketAddr>,
}

/// Result of `install`.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Updated record (pids, ports).
    pub record: ResourceRecord,
    /// Outputs (url, port).
    pub outputs: Outputs,
    /// Install steps and how long each took, for the report.
    pub steps: Vec<(String, Duration)>,
}

/// Result of `delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// It existed and is gone now.
    Destroyed,
    /// It was already gone (or never created).
    AlreadyGone,
}

/// Something `sweep` found that carries a run's tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// What it is (`process 1234`, `directory …`).
    pub id: String,
    /// Whether `sweep` removed it.
    pub removed: bool,
    /// Why it could not be removed, if so.
    pub reason: Option<String>,
}

/// A check's action with its templates rendered, ready to run somewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// An HTTP request.
    Http {
        /// Method.
        method: String,
        /// URL.
        url: String,
        /// Headers (may hold secrets; never logged).
        headers: Vec<(String, String)>,
        /// Body.
        body: Option<String>,
    },
    /// A shell command.
    Command {
        /// `sh -c` command line.
        run: String,
    },
    /// A query against a database resource of the run.
    Sql {
        /// Database resource name.
        database: String,
        /// Query.
        query: String,
    },
}

/// What a probe saw; the checks module compares it with the expectations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// HTTP status and body.
    Http {
        /// Status code.
        status: u16,
        /// Body text.
        body: String,
    },
    /// Exit code (None: killed by a signal) and stdout+stderr.
    Command {
        /// Exit code.
        exit_code: Option<i32>,
        /// Output.
        output: String,
    },
    /// Rows, every value as text.
    Sql {
        /// Rows.
        rows: Vec<Vec<String>>,
    },
}

/// Where and how a probe ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Run it on the runner, as the local provider's copies are reachable from here (default).
    Local,
    /// The provider ran it where the copy is reachable.
    Remote {
        /// What was seen.
        answer: ProbeAnswer,
        /// Where it ran, for the report (`SSM command ID on i-...`).
        via: String,
    },
    /// It cannot run from this runner; the reason goes into the report as `skipped`.
    Skipped(String),
    /// The provider ran it where the copy is reachable, and the copy gave no answer to compare
    /// (connection refused, no answer within the timeout): the attempt fails, as the same
    /// error on the runner would.
    Failed {
        /// What went wrong.
        message: String,
        /// Where it ran.
        via: String,
    },
}

/// What [`Provider::probe`] is given.
#[derive(Debug)]
pub struct ProbeRequest<'a> {
    /// Check name.
    pub check: &'a str,
    /// The rendered action.
    pub probe: &'a Probe,
    /// Records of the run's resources (to find the instance to run on).
    pub records: &'a [ResourceRecord],
    /// Time limit of this attempt.
    pub timeout: Duration,
}

/// A run that owns resources carrying its tag, found by the provider without a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedRun {
    /// Run id from the tag.
    pub run_id: String,
    /// Blueprint name from the tag, if present.
    pub blueprint: Option<String>,
    /// Expiry from the tag, if present and readable.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Who is to blame for a failure: decides exit code 1 versus 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The release would break: a migration, an install step, a health check.
    Release,
    /// The environment failed: provisioning, restore, missing tools, timeouts of the backend.
    Environment,
}

/// Provider errors. Messages are lower-case, name the resource and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// A release install step failed (exit status non-zero); `output` is its captured tail.
    #[error("install step `{step}` failed ({status})\n{output}")]
    InstallStep {
        /// Step name from the manifest.
        step: String,
        /// Exit status description.
        status: String,
        /// The step's output, truncated; the database's own error is in here.
        output: String,
    },
    /// The service started but never became healthy, or exited.
    #[error("{address} did not become healthy: {reason}")]
    Unhealthy {
        /// Resource address.
        address: String,
        /// What was last seen, plus the log tail.
        reason: String,
    },
    /// A wait hit its deadline.
    #[error("{what} did not finish within {}: last state {last_state}", humantime::format_duration(*waited))]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// Last state seen.
        last_state: String,
    },
    /// No backup matches.
    #[error("{0}")]
    NoBackup(String),
    /// A backup exists but is damaged.
    #[error("{0}")]
    BadBackup(String),
    /// A tool the provider needs is not installed.
    #[error("`{binary}` not found: {hint}")]
    MissingBinary {
        /// The program.
        binary: String,
        /// How to install it.
        hint: String,
    },
    /// The production guard refused a mutation.
    #[error("refusing to modify {0}: it was not created by this run")]
    Guard(String),
    /// The resource is protected (deletion protection); dryrun never lowers a protection.
    #[error("{0}")]
    Protected(String),
    /// The run was cancelled while this was under way.
    #[error("cancelled")]
    Cancelled,
    /// Any other environment failure, with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Any other environment failure.
    #[error("{0}")]
    Other(String),
}

impl ProviderError {
    /// Whether the release or the environment is to blame.
    #[must_use]
    pub fn blame(&self) -> Blame {
        match self {
            ProviderError::InstallStep { .. } | ProviderError::Unhealthy { .. } => Blame::Release,
            _ => Blame::Environment,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProviderError {
        let context = context.into();
        move |source| ProviderError::Io { context, source }
    }
}

/// A backend that can build and destroy copies.
#[async_trait]
pub trait Provider: Send + Sync {
    /// `local` or `aws`.
    fn name(&self) -> &'static str;

    /// Finds the backup `db` would be restored from. Reads production, changes nothing.
    async fn find_backup(
        &self,
        db: &DatabaseSpec,
        pick: &BackupPick,
    ) -> Result<BackupInfo, ProviderError>;

    /// The record `create` will produce, known before it runs (journaled first).
    fn plan_record(&self, run: &RunInfo, name: &str, req: &ResourceRequest) -> ResourceRecord;

    /// Creates the (empty) resource.
    async fn create(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
    ) -> Result<Created, ProviderError>;

    /// Restores a database from a backup, or copies a bucket from production.
    async fn restore(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
        backup: Option<&BackupInfo>,
        cancel: &CancellationToken,
    ) -> Result<Outputs, ProviderError>;

    /// Restores a database (masking rules in `plan`, nothing to mask when it has none): a
    /// provider that can mask while the data loads does (the local provider, PostgreSQL:
    /// [`crate::privacy::stream`]) and says which columns; the engine masks the rest inside the
    /// copy. A provider that clones rather than restores (golden copies, copy-on-write clones)
    /// says how in [`Restored::clone`]. Default: the plain restore, nothing masked on the way.
    ///
    /// # Errors
    /// As [`Provider::restore`].
    async fn restore_database(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
        backup: Option<&BackupInfo>,
        cancel: &CancellationToken,
        _plan: &crate::privacy::stream::MaskPlan,
    ) -> Result<Restored, ProviderError> {
        Ok(Restored {
            outputs: self.restore(run, record, req, backup, cancel).await?,
            ..Restored::default()
        })
    }

    /// Installs and starts the release on a service; waits until healthy.
    async fn install(
        &self,
        run: &RunInfo,
        req: InstallRequest<'_>,
        sink: &dyn RecordSink,
    ) -> Result<Installed, ProviderError>;

    /// Deletes a resource. Idempotent; works from a planned record of a create that never ran.
    async fn delete(&self, record: &ResourceRecord) -> Result<Deleted, ProviderError>;

    /// Finds everything tagged with `run_id`; with `remove`, removes it. Used after teardown
    /// and by `dryrun cleanup` so that a lost journal entry is not a leak.
    async fn sweep(&self, run_id: &str, remove: bool) -> Result<Vec<Orphan>, ProviderError>;

    /// Runs a check's action where the copy can be reached, or says it cannot.
    ///
    /// The default, [`ProbeOutcome::Local`], lets the checks module run it on the runner,
    /// which is right when the copy listens on this machine (the local provider). A cloud
    /// provider whose copy has private addresses runs it remotely (AWS: through SSM Run
    /// Command on the service's instance) or returns [`ProbeOutcome::Skipped`] with the reason.
    ///
    /// # Errors
    /// When the backend could not run it (an API that kept failing, a script that never ran).
    /// With [`Blame::Environment`] the check is an error — the run exits 3: nothing was learnt
    /// about the release; with [`Blame::Release`] it fails (exit 1). Either way the message is
    /// the check's. A check that ran and got no answer from the copy is
    /// [`ProbeOutcome::Failed`], not an error.
    async fn probe(
        &self,
        _run: &RunInfo,
        _req: ProbeRequest<'_>,
    ) -> Result<ProbeOutcome, ProviderError> {
        Ok(ProbeOutcome::Local)
    }

    /// Fetches a release that the backend keeps (AWS: `s3://BUCKET/KEY`) into `dir` and
    /// returns the local file. `Ok(None)` means the reference is not this provider's (the
    /// default): it is then loaded as a local directory or tarball.
    ///
    /// # Errors
    /// When the reference is the provider's but cannot be fetched.
    async fn fetch_release(
        &self,
        _reference: &str,
        _dir: &Path,
    ) -> Result<Option<PathBuf>, ProviderError> {
        Ok(None)
    }

    /// Runs that own resources carrying a run tag, found without journals, so that a lost
    /// state directory is not a leak. Default: none (the local provider's resources live in
    /// the state directory and are found from journals).
    ///
    /// # Errors
    /// When the backend cannot be listed.
    async fn tagged_runs(&self) -> Result<Vec<TaggedRun>, ProviderError> {
        Ok(Vec::new())
    }

    /// One line naming where runs happen (AWS: region and account), printed at the start of a
    /// run. Default: nothing to say.
    ///
    /// # Errors
    /// When the backend cannot be reached or the credentials are refused.
    async fn describe_target(&self) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    /// Secrets the provider itself holds (AWS: the secret access key and session token it
    /// loaded), registered with every run's redactor so that nothing the run shows can hold
    /// them. Default: none.
    fn held_secrets(&self) -> Vec<crate::secret::Secret> {
        Vec::new()
    }

    /// The egress firewall of a run's release processes: how it confined them and the
    /// destinations it refused (`address:port`). Called after the checks, before teardown.
    /// Default: `None` (the provider confines nothing itself; AWS: the security group,
    /// docs/providers/aws.md).
    async fn egress(
        &self,
        _run_id: &str,
    ) -> Option<(crate::firewall::FirewallReport, Vec<String>)> {
        None
    }

    /// Requests made to the backend so far, by operation (AWS: counted by an SDK
    /// interceptor). Reported with the run. Default: none counted.
    fn api_calls(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }

    /// `dryrun doctor`: what this backend needs for `bp` (`None`: what any blueprint may
    /// need), each miss with its fix. Reads only. Default: nothing to check.
    async fn doctor(
        &self,
        _bp: Option<&crate::blueprint::Blueprint>,
    ) -> Vec<crate::doctor::Finding> {
        Vec::new()
    }

    /// `dryrun init`: what the named production databases and buckets are (engine, database
    /// name), read only. Default: this provider describes no sources (the local provider's
    /// store is scanned by [`crate::init::scan_local`]).
    ///
    /// # Errors
    /// A source that does not exist or cannot be read.
    async fn describe_sources(
        &self,
        _databases: &[String],
        _buckets: &[String],
    ) -> Result<crate::init::Sources, ProviderError> {
        Err(ProviderError::Other(format!(
            "the {} provider describes no named sources",
            self.name()
        )))
    }

    /// What a run of `bp` would create, per resource address, in the units it is billed by,
    /// and the region (priced by [`crate::cost`]). Reads only. Default: `None`, nothing is
    /// billed (the local provider).
    ///
    /// # Errors
    /// When what production looks like cannot be read (the classes and sizes a copy takes
    /// from it).
    async fn billed(
        &self,
        _bp: &crate::blueprint::Blueprint,
    ) -> Result<Option<(String, Vec<(String, crate::cost::Unit)>)>, ProviderError> {
        Ok(None)
    }
}
