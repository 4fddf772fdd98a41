//! The `dryrun` command line. The only module that uses anyhow: library errors get their
//! context here and become exit codes.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::blueprint::{self, Blueprint, CompileError, ResourceSpec};
use crate::control::RunStatus;
use crate::engine::cleanup::{self, Target};
use crate::engine::{self, Event, Shutdown};
use crate::graph::{Plan, PlannedBackup};
use crate::journal;
use crate::lease;
use crate::provider::{BackupPick, Provider};
use crate::release::{Release, ReleaseError};
use crate::report::terminal::{Progress, ProgressMode};
use crate::report::{self, Trigger, exit};
use crate::runner;
use crate::secret::Secret;
use crate::state::StateDir;

const RUN_AFTER_HELP: &str = "\
Exit codes:
  0  every check passed and nothing was left behind
  1  a check, a migration or a health check failed: the release would break
  2  blueprint or usage error (nothing was created)
  3  infrastructure error: provisioning, restore or install failed for reasons of the environment,
     or a check could not be run (its status is `error`)
  4  teardown left something behind (listed at the end; `dryrun cleanup` finishes it)

Ctrl-C or SIGTERM stops new work and tears the copy down; a second one stops waiting, flushes the
journal and prints what is left behind for `dryrun cleanup`.

Example:
  dryrun run blueprints/demo/shop.yaml --release blueprints/demo/releases/v2 --report-dir out/";

/// Rehearse a release on a throw-away copy of production.
#[derive(Debug, Parser)]
#[command(
    name = "dryrun",
    version,
    about,
    long_about = "Rehearse a release on an exact, throw-away copy of production.\n\n\
dryrun compiles a blueprint, restores the latest production backup into an ephemeral copy, installs \
the candidate release, runs the checks, tears the copy down (always) and reports what happened."
)]
pub struct Cli {
    /// State directory: journals, reports, logs and local resources.
    /// Default: $XDG_STATE_HOME/dryrun or ~/.local/state/dryrun.
    #[arg(long, global = true, env = "DRYRUN_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Only print the final result (no live progress).
    #[arg(long, short, global = true)]
    quiet: bool,

    /// Colour: auto (when stdout is a terminal and NO_COLOR is unset), always, never.
    #[arg(long, global = true, value_enum, default_value_t = Color::Auto)]
    color: Color,

    /// AWS endpoint for every service, for emulators such as moto (default: AWS_ENDPOINT_URL,
    /// else the real AWS endpoints).
    #[arg(long, global = true, value_name = "URL")]
    endpoint_url: Option<String>,

    /// Shared control database for several `dryrun serve` workers and CLI runs
    /// (postgres://USER@HOST:PORT/DB): history, queue, environment leases and journals live
    /// there. Default: SQLite in the state directory. Prefer the variable: a URL with a
    /// password on the command line shows in `ps`.
    #[arg(
        long,
        global = true,
        env = "DRYRUN_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ProviderName {
    /// Processes, directories, SQLite and PostgreSQL on this machine.
    Local,
    /// RDS, S3 and EC2 through the AWS SDK (standard credential chain and region).
    #[cfg(feature = "aws")]
    Aws,
}

impl ProviderName {
    fn as_str(self) -> &'static str {
        match self {
            ProviderName::Local => "local",
            #[cfg(feature = "aws")]
            ProviderName::Aws => "aws",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TokenRole {
    /// See the dashboard and the API.
    Read,
    /// Also start dry runs from the dashboard.
    Run,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PlanFormat {
    Text,
    Json,
    Dot,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check blueprints: every error at once, with file:line:col. Exit 0 valid, 2 invalid.
    Validate {
        /// Blueprint files.
        #[arg(required = true, value_name = "BLUEPRINT")]
        blueprints: Vec<PathBuf>,
        /// Parameter values (K=V) to validate with; required params without one are reported.
        #[arg(long = "param", short = 'p', value_name = "K=V", value_parser = parse_kv)]
        params: Vec<(String, String)>,
    },
    /// Write a starting blueprint and release manifest from what production has: the local
    /// backup store's sources and bucket directories, or on AWS the named RDS instances,
    /// Aurora clusters and buckets (read only). The blueprint validates as written; read its
    /// comments, then `dryrun doctor` it.
    #[command(
        after_long_help = "Examples:\n  dryrun init --name shop --backups /srv/backups --buckets /srv/buckets\n  dryrun init --name shop --provider aws --database shop-prod --database shop-aurora --bucket shop-assets\n\n\
Writes DIR/NAME.yaml and DIR/release/dryrun-release.yaml; existing files are kept unless --force.\n\
Names from the store or the account that are not plain (letters, digits, `.`, `_`, `-`) are left out and reported."
    )]
    Init {
        /// Blueprint name (a lowercase letter, then lowercase letters, digits, `-`, `_`).
        #[arg(long, default_value = "rehearsal")]
        name: String,
        /// Directory to write into.
        #[arg(long, default_value = ".", value_name = "DIR")]
        dir: PathBuf,
        /// Backend the blueprint is for.
        #[arg(long, value_enum, default_value_t = ProviderName::Local)]
        provider: ProviderName,
        /// Local provider: the backup store (one directory per production source).
        #[arg(long, value_name = "DIR")]
        backups: Option<PathBuf>,
        /// Local provider: the production buckets (one directory per bucket).
        #[arg(long, value_name = "DIR")]
        buckets: Option<PathBuf>,
        /// AWS: an RDS instance or Aurora cluster to restore (repeatable).
        #[arg(long = "database", value_name = "ID")]
        databases: Vec<String>,
        /// AWS: a production bucket to copy (repeatable).
        #[arg(long = "bucket", value_name = "NAME")]
        bucket_names: Vec<String>,
        /// Overwrite files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Check this machine (and with `--provider aws` the account) for what the blueprints
    /// need, and say how to fix each miss: state directory, free space, backups, PostgreSQL
    /// binaries that read the dumps, the egress firewall; on AWS credentials, region,
    /// snapshots, buckets, a dry-run launch of each service, the subnet's route to SSM.
    /// Creates nothing. Exit 0 when nothing failed (warnings allowed), 1 otherwise.
    #[command(
        after_long_help = "Examples:\n  dryrun doctor                                   # this machine, any blueprint\n  dryrun doctor blueprints/demo/shop-pg.yaml\n  dryrun doctor blueprints/aws/shop.yaml --provider aws --json\n\n\
Statuses: ok, warn (doctor cannot tell, or the run goes on with less), FAIL (a rehearsal would fail), skip (not needed).\n\
See docs/cli.md#dryrun-doctor for every check and what it does not try."
    )]
    Doctor {
        /// Blueprint files (none: what any blueprint may need).
        #[arg(value_name = "BLUEPRINT")]
        blueprints: Vec<PathBuf>,
        /// Parameter values (K=V) the blueprints are compiled with.
        #[arg(long = "param", short = 'p', value_name = "K=V", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Backend to check.
        #[arg(long, value_enum, default_value_t = ProviderName::Local)]
        provider: ProviderName,
        /// Print the findings as JSON (`{provider, blueprints, ok, findings: [{check, status,
        /// detail, fix}]}`).
        #[arg(long)]
        json: bool,
    },
    /// Show what a run would create, which backup it would restore and (on AWS) what it would
    /// cost; creates nothing.
    Plan {
        /// Blueprint file.
        blueprint: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Output format.
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        /// Also lint this release's SQL migrations (the files its install steps name, else
        /// every .sql file) for statements known to lock or rewrite big tables; nothing is
        /// installed.
        #[arg(long, value_name = "REF")]
        release: Option<String>,
    },
    /// Rehearse a release: restore, install, check, tear down, report.
    #[command(after_long_help = RUN_AFTER_HELP, after_help = "Exit codes: 0 passed, 1 release would break, 2 usage, 3 infrastructure, 4 left behind (see --help).")]
    Run {
        /// Blueprint file.
        blueprint: PathBuf,
        /// The candidate release: a directory or .tar.gz with a dryrun-release.yaml (with
        /// `--provider aws`: s3://BUCKET/KEY of a .tar.gz).
        #[arg(long, value_name = "REF")]
        release: String,
        #[command(flatten)]
        common: Common,
        /// Write report.json, junit.xml and report.md here.
        #[arg(long, value_name = "DIR")]
        report_dir: Option<PathBuf>,
        /// Keep the copy this long instead of tearing it down (e.g. 30m, 2h);
        /// `dryrun cleanup --expired` removes it afterwards.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        keep: Option<Duration>,
        /// Print report.json to stdout instead of the summary.
        #[arg(long)]
        json: bool,
        /// Resources provisioned at once.
        #[arg(long, default_value_t = 4, value_name = "N")]
        concurrency: usize,
        /// How long teardown may take in all; what remains then is reported as left behind
        /// (exit 4) for `dryrun cleanup` to finish.
        #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = humantime::parse_duration)]
        teardown_timeout: Duration,
        /// Run id to use instead of a generated one (a retried CI job that must find what its
        /// first attempt made; tests).
        #[arg(long, value_name = "ID", hide = true)]
        run_id: Option<String>,
        /// The release in production now (same forms as --release): it is rehearsed first, on
        /// its own copy of the same backup, with the same checks; the report then puts each
        /// check's p50/p95 next to the candidate's (`repeat: N` on a check times it N times)
        /// and `guards.max_p95_regression` fails the run on a slowdown. The baseline's report
        /// is in run RUN_ID-baseline.
        #[arg(long, value_name = "REF")]
        baseline: Option<String>,
    },
    /// Find personal data in the latest backup: restore each database into a throw-away copy,
    /// classify every column (names and a sample of values through the detectors), print the
    /// findings and a starting `masking:` block, tear the copy down. Installs nothing, masks
    /// nothing. Exit 0 when the blueprint's rules classify every finding, 1 when some column
    /// has no rule, 3 when the copy could not be made.
    #[command(
        after_help = "Example:\n  dryrun scan blueprints/demo/shop.yaml >> masking-draft.yaml"
    )]
    Scan {
        /// Blueprint file.
        blueprint: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Print report.json (with `masking.databases[].findings`) instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Destroy what interrupted or kept runs left behind. Lists first; deletes only with --yes.
    Cleanup {
        /// The run to clean (see `dryrun runs`).
        #[arg(conflicts_with_all = ["all", "expired"], required_unless_present_any = ["all", "expired"])]
        run_id: Option<String>,
        /// Every run that is not closed and not in progress (kept copies included).
        #[arg(long, conflicts_with = "expired")]
        all: bool,
        /// Kept copies past their keep time and runs past their TTL.
        #[arg(long)]
        expired: bool,
        /// Provider whose resources to clean.
        #[arg(long, value_enum, default_value_t = ProviderName::Local)]
        provider: ProviderName,
        /// Delete (without it, cleanup only lists).
        #[arg(long, short)]
        yes: bool,
    },
    /// Serve the portal webhook, scheduled rehearsals, the API and the dashboard.
    #[command(
        after_long_help = "The webhook secret comes from DRYRUN_WEBHOOK_SECRET (or the variable [webhook] secret_env names).\n\
SIGTERM or Ctrl-C stops accepting, lets running dry runs tear down within shutdown_grace, then exits.\n\
Configuration reference: docs/server.md.\n\nExample:\n  DRYRUN_WEBHOOK_SECRET=... dryrun serve --config dryrun.toml --listen 127.0.0.1:8080"
    )]
    Serve {
        /// Config file (TOML; see docs/server.md). Without it, defaults apply.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the config; default 127.0.0.1:8080).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Blueprints root: webhook and dashboard paths are relative to it (default: the
        /// config's `blueprints`, else the current directory).
        #[arg(long, value_name = "DIR")]
        blueprints: Option<PathBuf>,
        /// Dry runs at once over all environments (overrides the config).
        #[arg(long, value_name = "N")]
        concurrency: Option<usize>,
        /// Provider of webhook, form and scheduled runs (overrides the config's `provider`; a
        /// `[[schedule]]` may set its own). With `aws`, the standard credential chain and region,
        /// and `AWS_ENDPOINT_URL` for an emulator.
        #[arg(long, value_enum)]
        provider: Option<ProviderName>,
    },
    /// Make an API/dashboard token for `dryrun serve`: prints the token once and the config
    /// lines that hold only its SHA-256.
    #[command(
        after_long_help = "Example:\n  dryrun token --name ops-alice --role run >> /tmp/token.txt\n\n\
The token goes to its holder (an `Authorization: Bearer TOKEN` header, or the dashboard's /login page);\n\
the [[auth.tokens]] block goes into the server's config. Roles: read (dashboard, API, logs, metrics),\n\
run (also start dry runs from the dashboard). See docs/security.md."
    )]
    Token {
        /// Who will hold it (shown in the server's log and on the dashboard).
        #[arg(long, default_value = "ops")]
        name: String,
        /// What it may do.
        #[arg(long, value_enum, default_value_t = TokenRole::Read)]
        role: TokenRole,
    },
    /// Remove the history of old runs: journals, reports and logs of closed runs, and their
    /// rows in the history database. Runs that left something behind or are kept stay.
    /// `dryrun serve` does this by itself (config `retention`).
    Prune {
        /// Remove runs that started longer ago than this.
        #[arg(long, default_value = "90d", value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Duration,
    },
    /// Internal: a service's log pump (started by the local provider).
    #[command(name = "__log-pump", hide = true)]
    LogPump {
        /// Log file to write.
        file: PathBuf,
    },
    /// Golden copies: each backup the local provider restored once, kept stopped under the
    /// state directory and cloned by every later run of it (copy-on-write where the file
    /// system can). They hold production data (masked as the blueprint said when they were
    /// built): prune what you no longer rehearse against.
    #[command(
        after_long_help = "Examples:\n  dryrun cache list\n  dryrun cache prune --older-than 14d\n  dryrun cache prune --max-size 50GB\n  dryrun cache prune --all\n\n\
A copy a run is cloning is never removed. Runs can skip the cache with `dryrun run --no-cache` or\n\
`providers.local.cache: false`. See docs/providers/local.md."
    )]
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// List past runs, newest first.
    Runs {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// As JSON lines (one report per run).
        #[arg(long)]
        json: bool,
    },
}

/// `dryrun cache` subcommands.
#[derive(Debug, Subcommand)]
enum CacheAction {
    /// List golden copies, least recently used first: backup, engine, size, last use.
    List {
        /// As JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Remove golden copies (and what crashed builds left). With no option, nothing is
    /// removed: say which.
    Prune {
        /// Copies not used for this long (e.g. 14d).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// Then least-recently-used copies until the cache fits (e.g. 50GB, 512MB).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Every copy.
        #[arg(long, conflicts_with_all = ["older_than", "max_size"])]
        all: bool,
    },
}

/// `50GB`, `512MB`, `1.5TB`, `1048576` (bytes); powers of 1024.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 50GB, 512MB)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => return Err(format!("`{other}` is not a size unit (B, KB, MB, GB, TB)")),
    };
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    Ok((n * mult as f64) as u64)
}

#[derive(Debug, Args)]
struct Common {
    /// Blueprint parameter (repeatable).
    #[arg(long = "param", short = 'p', value_name = "K=V", value_parser = parse_kv)]
    params: Vec<(String, String)>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = ProviderName::Local)]
    provider: ProviderName,
    /// Backup to restore: `latest`, a backup id, or an RFC 3339 time (the newest backup taken
    /// at or before it).
    #[arg(long, default_value = "latest", value_name = "ID|latest|TIME")]
    backup: String,
    /// Restore every database from its backup instead of cloning its golden copy (local
    /// provider; see `dryrun cache`). Nothing is read from or added to the cache.
    #[arg(long)]
    no_cache: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not K=V"))
}

fn parse_backup(s: &str) -> BackupPick {
    if s == "latest" {
        BackupPick::Latest
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        BackupPick::Before(t.with_timezone(&Utc))
    } else {
        BackupPick::Id(s.to_string())
    }
}

/// An error that already knows its exit code and has been printed.
#[derive(Debug)]
struct Exit(i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// Runs the CLI; returns the process exit code.
#[must_use]
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE as u8 } else { 0 });
        }
    };
    // Copies of production, logs and reports are owner-only from the moment they exist, and so
    // is everything the release's processes create.
    crate::state::private_umask();
    if let Command::LogPump { file } = &cli.command {
        return match crate::process::log_pump_main(file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(exit::INFRA as u8),
        };
    }
    init_logging(matches!(cli.command, Command::Serve { .. }));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INFRA as u8);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(u8::try_from(*code).unwrap_or(1));
            }
            // Errors quote blueprints, releases and API answers: nothing in them may act on the
            // terminal.
            eprintln!(
                "error: {}",
                crate::report::terminal::printable(&format!("{e:#}"))
            );
            let code = if e.chain().any(|c| {
                c.is::<ReleaseError>()
                    || matches!(
                        c.downcast_ref::<engine::EngineError>(),
                        Some(engine::EngineError::MissingSecret { .. })
                    )
                    || matches!(
                        c.downcast_ref::<cleanup::CleanupError>(),
                        Some(cleanup::CleanupError::UnknownRun(..))
                    )
            }) {
                exit::USAGE
            } else {
                exit::INFRA
            };
            ExitCode::from(code as u8)
        }
    }
}

/// Log lines on stderr: dryrun's own warnings and errors (and, for `serve`, its info lines:
/// listening, runs finished, schedules fired). `DRYRUN_LOG` takes a `tracing` filter instead,
/// e.g. `DRYRUN_LOG=dryrun=debug` (every AWS request) or `DRYRUN_LOG=debug`.
fn init_logging(serve: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DRYRUN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if serve { "dryrun=info" } else { "dryrun=warn" })
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    // A CLI run's lines sit between its progress lines, where a timestamp is noise; a server's
    // log needs one.
    let _ = if serve {
        builder.try_init()
    } else {
        builder.without_time().try_init()
    };
}

fn use_color(c: Color) -> bool {
    match c {
        Color::Always => true,
        Color::Never => false,
        // Diagnostics and progress go to stderr, the summary to stdout: both must be terminals.
        Color::Auto => {
            std::io::stdout().is_terminal()
                && std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none()
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let color = use_color(cli.color);
    let state = StateDir::new(cli.state_dir.clone().unwrap_or_else(StateDir::default_root));
    let endpoint = cli.endpoint_url.clone();
    let endpoint = endpoint.as_deref();
    let database_url = cli.database_url.clone();
    let database_url = database_url.as_deref();
    match cli.command {
        Command::Validate { blueprints, params } => {
            validate(&blueprints, &params.into_iter().collect(), color)
        }
        Command::Plan {
            blueprint,
            common,
            format,
            release,
        } => {
            plan(
                &blueprint,
                (&common, release.as_deref()),
                format,
                &state,
                color,
                (endpoint, database_url),
            )
            .await
        }
        Command::Scan {
            blueprint,
            common,
            json,
        } => {
            run(
                &blueprint,
                (None, None),
                &common,
                None,
                None,
                json,
                (4, engine::TEARDOWN_TIMEOUT, None),
                cli.quiet,
                &state,
                color,
                (endpoint, database_url),
            )
            .await
        }
        Command::Run {
            blueprint,
            release,
            common,
            report_dir,
            keep,
            json,
            concurrency,
            teardown_timeout,
            run_id,
            baseline,
        } => {
            run(
                &blueprint,
                (Some(&release), baseline.as_deref()),
                &common,
                report_dir.as_deref(),
                keep,
                json,
                (concurrency, teardown_timeout, run_id),
                cli.quiet,
                &state,
                color,
                (endpoint, database_url),
            )
            .await
        }
        Command::Cleanup {
            run_id,
            all,
            expired,
            provider,
            yes,
        } => {
            let target = match (run_id, all, expired) {
                (Some(id), _, _) => Target::Run(id),
                (None, true, _) => Target::All,
                _ => Target::Expired,
            };
            cleanup_cmd(&state, provider, &target, yes, (endpoint, database_url)).await
        }
        Command::Doctor {
            blueprints,
            params,
            provider,
            json,
        } => {
            let params = params.into_iter().collect();
            let report = doctor_cmd(
                &state,
                &blueprints,
                &params,
                provider,
                (endpoint, database_url),
            )
            .await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                // Findings quote API answers and names from the account.
                print!("{}", crate::report::terminal::printable(&report.to_text()));
            }
            Ok(if report.ok {
                exit::PASSED
            } else {
                exit::FAILED
            })
        }
        Command::Init {
            name,
            dir,
            provider,
            backups,
            buckets,
            databases,
            bucket_names,
            force,
        } => {
            init_cmd(
                &state,
                (&name, &dir, force),
                provider,
                (backups.as_deref(), buckets.as_deref()),
                (&databases, &bucket_names),
                endpoint,
            )
            .await
        }
        Command::Runs { limit, json } => runs(&state, limit, json),
        Command::Cache { action } => cache_cmd(&state, &action),
        Command::LogPump { .. } => Ok(exit::PASSED),
        Command::Prune { older_than } => {
            let control = open_control(&state, database_url).await?;
            let n = crate::server::prune(&state, control.as_ref(), older_than).await;
            println!(
                "removed {n} run(s) older than {}",
                humantime::format_duration(older_than)
            );
            Ok(exit::PASSED)
        }
        Command::Token { name, role } => {
            if name.is_empty() || name.contains(['"', '\\', '\n']) {
                eprintln!("error: --name `{name}`: use a plain name such as ops-alice");
                return Ok(exit::USAGE);
            }
            let (token, hash) = crate::server::auth::new_token();
            let role = match role {
                TokenRole::Read => "read",
                TokenRole::Run => "run",
            };
            println!("token: {}", token.expose());
            println!();
            println!("# for the server's config (it holds only the token's SHA-256):");
            println!("[[auth.tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{hash}\"");
            Ok(exit::PASSED)
        }
        Command::Serve {
            config,
            listen,
            blueprints,
            concurrency,
            provider,
        } => {
            serve_cmd(
                cli.state_dir.is_some(),
                state,
                config,
                listen,
                blueprints,
                (concurrency, provider, cli.database_url),
            )
            .await
        }
    }
}

/// A path as the blueprint in `dir` should name it: relative to `dir` when it lies below it,
/// else absolute.
fn relative_to(path: &Path, dir: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (p, d) = (abs(path), abs(dir));
    p.strip_prefix(&d)
        .map_or_else(|_| p.display().to_string(), |r| r.display().to_string())
}

/// `dryrun init`: finds the sources, writes the blueprint and the release manifest (never over
/// a file unless `force`), and compiles what it wrote.
async fn init_cmd(
    state: &StateDir,
    (name, dir, force): (&str, &Path, bool),
    provider: ProviderName,
    (backups, buckets): (Option<&Path>, Option<&Path>),
    (databases, bucket_names): (&[String], &[String]),
    endpoint: Option<&str>,
) -> anyhow::Result<i32> {
    if !blueprint::valid_name(name) {
        eprintln!(
            "error: --name `{name}`: use lowercase letters, digits, `-` and `_`, starting with a letter, at most 40 (e.g. shop)"
        );
        return Ok(exit::USAGE);
    }
    let (sources, local) = match provider {
        ProviderName::Local => {
            if !databases.is_empty() || !bucket_names.is_empty() {
                eprintln!(
                    "error: --database and --bucket name AWS sources; the local provider reads --backups and --buckets"
                );
                return Ok(exit::USAGE);
            }
            let Some(store) = backups else {
                eprintln!("error: --backups DIR is required with the local provider");
                return Ok(exit::USAGE);
            };
            for (flag, d) in
                std::iter::once(("--backups", store)).chain(buckets.map(|b| ("--buckets", b)))
            {
                if let Err(e) = std::fs::read_dir(d) {
                    eprintln!(
                        "error: {flag} {}: cannot read the directory: {e}",
                        d.display()
                    );
                    return Ok(exit::USAGE);
                }
            }
            let found = crate::init::scan_local(store, buckets)
                .with_context(|| format!("read the backup store {}", store.display()))?;
            let paths = crate::init::LocalPaths {
                backups: relative_to(store, dir),
                buckets: buckets
                    .filter(|_| !found.buckets.is_empty())
                    .map(|b| relative_to(b, dir)),
            };
            for p in std::iter::once(&paths.backups).chain(&paths.buckets) {
                if !crate::init::safe_path(p) {
                    eprintln!(
                        "error: the path {p:?} would go into the blueprint as it is, and holds characters other than letters, digits, `.`, `_`, `-` and `/`: move or link the store to a plain path"
                    );
                    return Ok(exit::USAGE);
                }
            }
            (found, Some(paths))
        }
        #[cfg(feature = "aws")]
        ProviderName::Aws => {
            if databases.is_empty() && bucket_names.is_empty() {
                eprintln!(
                    "error: name production's sources: --database ID (RDS instance or Aurora cluster) and/or --bucket NAME"
                );
                return Ok(exit::USAGE);
            }
            if let Some(bad) = databases
                .iter()
                .chain(bucket_names)
                .find(|n| !crate::init::safe_name(n))
            {
                eprintln!("error: {bad:?} is not an RDS identifier or a bucket name");
                return Ok(exit::USAGE);
            }
            let p = provider_for(provider, state, None, endpoint).await?;
            let mut found = p
                .describe_sources(databases, bucket_names)
                .await
                .context("describe production's sources")?;
            found.notes.push(
                "the blueprint has `pii_gate: off`: the personal data gate and masking connect to the copy from the runner, which needs providers.aws.runner_in_vpc; turn the gate on with the runner inside the VPC (docs/data-safety.md)".into(),
            );
            (found, None)
        }
    };
    #[cfg(not(feature = "aws"))]
    let _ = (state, endpoint);
    // Notes quote names and API answers: no control character reaches the terminal.
    let notes: Vec<String> = sources
        .notes
        .iter()
        .map(|n| crate::sinks::clean(n, usize::MAX))
        .collect();
    if sources.databases.is_empty() && sources.buckets.is_empty() {
        for n in &notes {
            eprintln!("note: {n}");
        }
        eprintln!("error: found no backup source and no bucket to rehearse with");
        return Ok(exit::USAGE);
    }
    let file = dir.join(format!("{name}.yaml"));
    let manifest = dir.join("release").join("dryrun-release.yaml");
    for f in [&file, &manifest] {
        if f.exists() && !force {
            eprintln!(
                "error: {} exists; pass --force to overwrite it",
                f.display()
            );
            return Ok(exit::USAGE);
        }
    }
    std::fs::create_dir_all(dir.join("release"))
        .with_context(|| format!("create {}", dir.join("release").display()))?;
    // The blueprint is compiled beside its final place (relative paths resolve the same) and
    // renamed into it only when it validates: a failure leaves nothing behind.
    let text = crate::init::blueprint_yaml(name, &sources, local.as_ref());
    let draft = dir.join(format!(".{name}.yaml.dryrun-init"));
    std::fs::write(&draft, &text).with_context(|| format!("write {}", draft.display()))?;
    if let Err(e) = blueprint::compile_file(&draft, &BTreeMap::new()) {
        let _ = std::fs::remove_file(&draft);
        let shown = match &e {
            CompileError::Invalid(d) => d.render(false),
            CompileError::Read { .. } => e.to_string(),
        };
        eprint!("{shown}");
        anyhow::bail!(
            "the blueprint init made does not validate, so nothing was written (a dryrun bug; please report it)"
        );
    }
    std::fs::write(&manifest, crate::init::release_yaml())
        .with_context(|| format!("write {}", manifest.display()))?;
    std::fs::rename(&draft, &file).with_context(|| format!("write {}", file.display()))?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    println!(
        "wrote {} ({} database(s), {} bucket(s), 1 service, {} check(s)) and {}",
        file.display(),
        sources.databases.len(),
        sources.buckets.len(),
        sources.databases.len(),
        manifest.display()
    );
    let aws = if local.is_none() {
        " --provider aws"
    } else {
        ""
    };
    println!(
        "next:
  dryrun doctor {}{aws}
  dryrun scan {}{aws}      # personal data: what to mask
  dryrun run {}{aws} --release {}",
        file.display(),
        file.display(),
        file.display(),
        dir.join("release").display()
    );
    Ok(exit::PASSED)
}

/// `dryrun doctor`: the state directory, the control database when one is named, then each
/// blueprint's needs on the provider (prefixed with the blueprint's name when there are
/// several).
async fn doctor_cmd(
    state: &StateDir,
    paths: &[PathBuf],
    params: &BTreeMap<String, String>,
    name: ProviderName,
    (endpoint, database_url): (Option<&str>, Option<&str>),
) -> crate::doctor::Report {
    use crate::doctor::Finding;
    let mut findings = vec![crate::doctor::state_dir_check(state)];
    if let Some(url) = database_url {
        findings.push(match crate::pg::connect(url).await {
            Ok(c) => match c.query_one("SELECT version()", &[]).await {
                Ok(row) => Finding::pass(
                    "control database",
                    row.get::<_, String>(0)
                        .split(" on ")
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                ),
                Err(e) => Finding::fail(
                    "control database",
                    crate::pg::error(&e),
                    "check DRYRUN_DATABASE_URL (docs/server.md, \"Several workers on PostgreSQL\")",
                ),
            },
            Err(e) => Finding::fail(
                "control database",
                e,
                "check DRYRUN_DATABASE_URL: host, port, user, database, and the password in PGPASSWORD or ~/.pgpass",
            ),
        });
    }
    let mut names = Vec::new();
    let several = paths.len() > 1;
    if paths.is_empty() {
        match crate::provider::choose(
            name.as_str(),
            state,
            None,
            endpoint.map(ToString::to_string),
        )
        .await
        {
            Ok(p) => findings.extend(p.doctor(None).await),
            Err(e) => findings.push(Finding::fail(
                format!("{} provider", name.as_str()),
                e.to_string(),
                "see docs/providers/",
            )),
        }
    }
    for path in paths {
        let bp = match blueprint::compile_file(path, params) {
            Ok(bp) => bp,
            Err(e) => {
                let detail = match &e {
                    CompileError::Invalid(d) => d.render(false),
                    CompileError::Read { .. } => e.to_string(),
                };
                findings.push(Finding::fail(
                    format!("blueprint {}", path.display()),
                    detail.lines().next().unwrap_or_default().to_string(),
                    format!(
                        "`dryrun validate {}` lists every error with file:line:col",
                        path.display()
                    ),
                ));
                continue;
            }
        };
        names.push(bp.name.clone());
        let mut found = match crate::provider::choose(
            name.as_str(),
            state,
            Some(&bp),
            endpoint.map(ToString::to_string),
        )
        .await
        {
            Ok(p) => p.doctor(Some(&bp)).await,
            Err(e) => vec![Finding::fail(
                format!("{} provider", name.as_str()),
                e.to_string(),
                "see docs/providers/",
            )],
        };
        if several {
            for f in &mut found {
                f.check = format!("{}: {}", bp.name, f.check);
            }
        }
        findings.extend(found);
    }
    crate::doctor::Report::new(name.as_str(), names, findings)
}

fn compile(
    path: &Path,
    params: &BTreeMap<String, String>,
    color: bool,
) -> anyhow::Result<Blueprint> {
    match blueprint::compile_file(path, params) {
        Ok(bp) => Ok(bp),
        Err(CompileError::Invalid(d)) => {
            eprint!("{}", d.render(color));
            Err(Exit(exit::USAGE).into())
        }
        Err(e @ CompileError::Read { .. }) => {
            eprintln!("error: {e}");
            Err(Exit(exit::USAGE).into())
        }
    }
}

fn validate(
    paths: &[PathBuf],
    params: &BTreeMap<String, String>,
    color: bool,
) -> anyhow::Result<i32> {
    let mut bad = 0;
    for p in paths {
        match blueprint::compile_file(p, params) {
            Ok(bp) => println!(
                "{}: valid ({} resource{}, {} check{})",
                p.display(),
                bp.resources.len(),
                if bp.resources.len() == 1 { "" } else { "s" },
                bp.checks.len(),
                if bp.checks.len() == 1 { "" } else { "s" }
            ),
            Err(CompileError::Invalid(d)) => {
                bad += 1;
                eprint!("{}", d.render(color));
            }
            Err(e) => {
                bad += 1;
                eprintln!("error: {e}");
            }
        }
    }
    Ok(if bad > 0 { exit::USAGE } else { exit::PASSED })
}

fn cache_cmd(state: &StateDir, action: &CacheAction) -> anyhow::Result<i32> {
    use crate::provider::local::golden::{Cache, Prune};
    use crate::report::human_bytes;
    let cache = Cache::new(state);
    match *action {
        CacheAction::List { json } => {
            let entries = cache
                .list()
                .with_context(|| format!("read {}", cache.root().display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(exit::PASSED);
            }
            if entries.is_empty() {
                println!("no golden copies in {}", cache.root().display());
                return Ok(exit::PASSED);
            }
            println!(
                "{:<10} {:<40} {:>9}  {:<17} {:<17} KEY",
                "ENGINE", "BACKUP", "SIZE", "BUILT", "LAST USED"
            );
            let mut total = 0;
            for e in &entries {
                total += e.size_bytes;
                let id = &e.golden.identity;
                let masked = if id.masking.is_empty() {
                    String::new()
                } else {
                    format!(" (masked: {} rule(s))", id.masking.len())
                };
                println!(
                    "{:<10} {:<40} {:>9}  {:<17} {:<17} {}{}{}",
                    id.engine,
                    format!("{}/{}", id.source, id.backup_id),
                    human_bytes(e.size_bytes),
                    e.golden.built_at.format("%Y-%m-%d %H:%M"),
                    e.last_used.format("%Y-%m-%d %H:%M"),
                    e.golden.key,
                    masked,
                    if e.in_use { " [in use]" } else { "" }
                );
            }
            println!(
                "{} golden cop{}, {} in {}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" },
                human_bytes(total),
                cache.root().display()
            );
            Ok(exit::PASSED)
        }
        CacheAction::Prune {
            older_than,
            max_size,
            all,
        } => {
            if !all && older_than.is_none() && max_size.is_none() {
                eprintln!(
                    "error: say what to prune: --older-than DURATION, --max-size SIZE or --all (see `dryrun cache prune --help`)"
                );
                return Err(Exit(exit::USAGE).into());
            }
            let done = cache
                .prune(&Prune {
                    all,
                    older_than,
                    max_bytes: max_size,
                })
                .with_context(|| format!("prune {}", cache.root().display()))?;
            let mut freed = 0;
            for p in &done {
                match &p.kept {
                    Some(why) => println!("kept    {} ({why})", p.key),
                    None => {
                        freed += p.size_bytes;
                        println!("removed {} ({})", p.key, human_bytes(p.size_bytes));
                    }
                }
            }
            println!(
                "{} removed, {} freed; {} left",
                done.iter().filter(|p| p.kept.is_none()).count(),
                human_bytes(freed),
                cache.list().map(|l| l.len()).unwrap_or(0)
            );
            Ok(exit::PASSED)
        }
    }
}

async fn provider_for(
    name: ProviderName,
    state: &StateDir,
    bp: Option<&Blueprint>,
    endpoint: Option<&str>,
) -> anyhow::Result<Arc<dyn Provider>> {
    crate::provider::choose(name.as_str(), state, bp, endpoint.map(ToString::to_string))
        .await
        .with_context(|| format!("configure the {} provider", name.as_str()))
}

/// The plan's cost on a billed provider: the estimate (expected duration from the history, when
/// there is one; a plan creates no history file), and `budget:` judged as `dryrun run` would.
async fn plan_cost(
    plan: &mut Plan,
    bp: &Blueprint,
    provider: &dyn Provider,
    state: &StateDir,
    database_url: Option<&str>,
) -> anyhow::Result<()> {
    let billed = match provider.billed(bp).await {
        Ok(b) => b,
        Err(e) if bp.budget.is_some() => {
            plan.budget = Some(crate::graph::PlannedBudget {
                max_usd: bp.budget.unwrap_or_default(),
                within: false,
                refusal: Some(format!(
                    "the cost cannot be estimated ({e}), so budget.max_usd cannot be honoured"
                )),
            });
            return Ok(());
        }
        Err(e) => {
            eprintln!("warning: no cost estimate: {e}");
            return Ok(());
        }
    };
    let Some((region, units)) = billed else {
        return Ok(());
    };
    let history = if database_url.is_some() || state.root().join("history.sqlite").is_file() {
        let control = open_control(state, database_url).await?;
        runner::history_ms(control.as_ref(), &bp.name).await
    } else {
        Vec::new()
    };
    let e = crate::cost::estimate(
        &units,
        &region,
        crate::cost::expected_from(&history),
        crate::cost::worst_case(bp, None, engine::TEARDOWN_TIMEOUT),
    );
    plan.budget = bp.budget.map(|max| {
        let refusal = e.within(max).err();
        crate::graph::PlannedBudget {
            max_usd: max,
            within: refusal.is_none(),
            refusal,
        }
    });
    plan.cost = Some(e);
    Ok(())
}

async fn plan(
    path: &Path,
    (common, release): (&Common, Option<&str>),
    format: PlanFormat,
    state: &StateDir,
    color: bool,
    (endpoint, database_url): (Option<&str>, Option<&str>),
) -> anyhow::Result<i32> {
    let params = common.params.iter().cloned().collect();
    let bp = compile(path, &params, color)?;
    let provider = provider_for(common.provider, state, Some(&bp), endpoint).await?;
    let pick = parse_backup(&common.backup);
    let now = std::env::var("DRYRUN_NOW")
        .ok()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(&s).ok())
        .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
    let mut backups = Vec::new();
    let mut errors = Vec::new();
    for r in &bp.resources {
        if let ResourceSpec::Database(db) = &r.spec {
            let p = match (&pick, &db.backup) {
                (BackupPick::Latest, Some(pin)) => BackupPick::Id(pin.clone()),
                (p, _) => p.clone(),
            };
            match provider.find_backup(db, &p).await {
                Ok(b) => backups.push(PlannedBackup {
                    resource: r.address(),
                    id: b.id,
                    taken_at: b.taken_at,
                    age_seconds: (now - b.taken_at).num_seconds(),
                }),
                Err(e) => errors.push(format!("{}: {e}", r.address())),
            }
        }
    }
    let has_errors = !errors.is_empty();
    let mut plan = Plan::new(&bp, provider.name(), backups, errors);
    if let Some(reference) = release {
        let release = load_release(provider.as_ref(), state, reference).await?;
        plan.hints = Some(engine::release_hints(&bp, &release).await);
    }
    plan_cost(&mut plan, &bp, provider.as_ref(), state, database_url).await?;
    print!(
        "{}",
        match format {
            // The plan quotes the release (SQL file names, parser errors) and API answers.
            PlanFormat::Text => crate::report::terminal::printable(&plan.to_text()).into_owned(),
            PlanFormat::Json => plan.to_json(),
            PlanFormat::Dot => plan.to_dot(),
        }
    );
    Ok(if has_errors {
        exit::INFRA
    } else if plan.budget.as_ref().is_some_and(|b| !b.within) {
        // What `dryrun run` would answer.
        exit::USAGE
    } else {
        exit::PASSED
    })
}

/// Fetches (a remote reference) and loads a release; an unusable one is a usage error.
async fn load_release(
    provider: &dyn crate::provider::Provider,
    state: &StateDir,
    reference: &str,
) -> anyhow::Result<Release> {
    let fetched = provider
        .fetch_release(reference, &state.root().join("releases"))
        .await
        .with_context(|| format!("fetch release {reference}"))?;
    let loaded = match &fetched {
        Some(file) => Release::load_fetched(reference, file),
        None => Release::load(reference),
    };
    loaded.map_err(|e| {
        // The message quotes the manifest (an unknown key as written).
        eprintln!(
            "error: {}",
            crate::report::terminal::printable(&e.to_string())
        );
        Exit(exit::USAGE).into()
    })
}

#[allow(clippy::too_many_arguments)]
/// `dryrun run` and, with no release, `dryrun scan` (databases only, classified, not masked).
async fn run(
    path: &Path,
    (release_ref, baseline_ref): (Option<&str>, Option<&str>),
    common: &Common,
    report_dir: Option<&Path>,
    keep: Option<Duration>,
    json: bool,
    (concurrency, teardown_timeout, run_id_arg): (usize, Duration, Option<String>),
    quiet: bool,
    state: &StateDir,
    color: bool,
    (endpoint, database_url): (Option<&str>, Option<&str>),
) -> anyhow::Result<i32> {
    if let Some(id) = &run_id_arg
        && !crate::state::is_run_id(id)
    {
        eprintln!("error: --run-id `{id}`: use letters, digits, `-` and `_` (at most 80)");
        return Err(Exit(exit::USAGE).into());
    }
    if let Some(id) = &run_id_arg
        && state.run_dir(id).exists()
    {
        eprintln!(
            "error: --run-id `{id}`: a run with that id already exists in {}",
            state.root().display()
        );
        return Err(Exit(exit::USAGE).into());
    }
    let t = Instant::now();
    let params = common.params.iter().cloned().collect();
    let mut bp = compile(path, &params, color)?;
    if common.no_cache {
        bp.local.cache = false;
    }
    let compile_ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(0);
    let scan = release_ref.is_none();
    if scan {
        bp.resources
            .retain(|r| matches!(r.spec, crate::blueprint::ResourceSpec::Database(_)));
        bp.checks.clear();
        bp.teardown = crate::blueprint::TeardownPolicy::Always;
        // A scan masks nothing: a golden copy of it would keep production's personal data.
        bp.local.cache = false;
    }
    let release_ref = release_ref.unwrap_or("");
    // The operator's own path may be anywhere; a URL must be one the provider fetches.
    for (r, flag) in [
        (Some(release_ref), "--release"),
        (baseline_ref, "--baseline"),
    ] {
        if let Some(r) = r
            && !scan
            && let Err(e) = crate::reference::classify(
                r,
                flag,
                crate::provider::remote_schemes(common.provider.as_str()),
            )
        {
            eprintln!("error: {e}");
            return Err(Exit(exit::USAGE).into());
        }
    }
    if let Some(w) = state
        .ensure()
        .with_context(|| format!("create state directory {}", state.root().display()))?
        && !quiet
    {
        eprintln!("warning: {w}");
    }
    let provider = provider_for(common.provider, state, Some(&bp), endpoint).await?;
    match provider.describe_target().await {
        Ok(Some(line)) if !quiet => eprintln!("{line}"),
        Ok(_) => {}
        Err(e) => return Err(e).context("the run could not start"),
    }
    let release = if scan {
        Release::none()
    } else {
        load_release(provider.as_ref(), state, release_ref).await?
    };
    let baseline = match baseline_ref {
        Some(b) => Some(load_release(provider.as_ref(), state, b).await?),
        None => None,
    };

    let shutdown = Shutdown::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let mode = if json {
        ProgressMode::Quiet
    } else {
        ProgressMode::detect(quiet)
    };
    let printer = tokio::spawn(async move {
        let mut p = Progress::new(mode);
        while let Some(ev) = rx.recv().await {
            p.handle(&ev);
        }
        p.finish();
    });
    let signals = tokio::spawn(watch_signals(shutdown.clone(), tx.clone()));

    // One run per environment: wait for a CLI or server run that holds it. The id, the lease
    // and the history row come from the runner, as for a server run.
    let control = open_control(state, database_url).await?;
    // Shared with `dryrun serve` workers on PostgreSQL: heartbeat while waiting and running,
    // or they would take this run for dead and recover it under our feet.
    let alive = {
        let shutdown = shutdown.clone();
        runner::keep_alive(control.clone(), move |e| {
            eprintln!("error: {e}; stopping the run");
            if let Ok(mut r) = shutdown.reason.lock() {
                *r = Some("the control database took this process for dead".into());
            }
            shutdown.soft.cancel();
        })
    };
    let env = lease::environment(provider.name(), &bp.name);
    let started = runner::start_direct(
        control.as_ref(),
        state,
        &bp,
        provider.name(),
        (release_ref, &release.manifest.version),
        run_id_arg,
        &shutdown.soft,
        &mut |holder| {
            eprintln!(
                "waiting for environment {env}: run {} holds it",
                holder.unwrap_or_else(|| "?".into())
            );
        },
    )
    .await;
    let started = match started {
        Ok(s) => s,
        Err(e @ runner::StartError::Cancelled(_)) => {
            signals.abort();
            drop(tx);
            let _ = printer.await;
            eprintln!("{e}");
            return Ok(exit::INFRA);
        }
        Err(runner::StartError::IdTaken(id)) => {
            signals.abort();
            drop(tx);
            let _ = printer.await;
            eprintln!(
                "error: --run-id `{id}`: a run with that id already exists in {}",
                state.root().display()
            );
            return Err(Exit(exit::USAGE).into());
        }
        Err(e) => return Err(e).context("take the environment lease"),
    };
    if let Some(e) = &started.history_error {
        eprintln!("warning: history database: {e}; the run is recorded in its journal only");
    }
    let masking_rules = bp.masking.clone();
    let launch = runner::Launch {
        bp,
        provider,
        release,
        backup: parse_backup(&common.backup),
        trigger: Trigger::Cli,
        keep,
        concurrency,
        compile_ms,
        teardown_timeout,
        secrets: database_url.map(Secret::new).into_iter().collect(),
        scan,
        baseline,
    };
    let done = runner::execute(
        control.as_ref(),
        state,
        &started.run_id,
        started.lease,
        launch,
        tx,
        shutdown,
    )
    .await;
    if let Some(e) = &done.history_error
        && started.history_error.is_none()
    {
        eprintln!("warning: the run is not in the history database: {e}");
    }
    let result = done.result;
    drop(alive);
    control.stopped().await;
    signals.abort();
    let _ = printer.await;
    let report = match result {
        Ok(r) => r,
        Err(e @ (engine::EngineError::MissingSecret { .. } | engine::EngineError::Budget(_))) => {
            eprintln!("error: {e}");
            return Ok(exit::USAGE);
        }
        Err(e) => return Err(e).context("the run could not start"),
    };
    let mut report_error = None;
    if let Some(dir) = report_dir {
        let written = report::json::write(&report, dir)
            .and_then(|_| report::junit::write(&report, dir))
            .and_then(|_| report::markdown::write(&report, dir));
        if let Err(e) = written {
            report_error = Some(e);
        }
    }
    if json {
        print!("{}", report::json::to_json(&report));
    } else if scan {
        let (text, code) = report::terminal::scan_summary(&report, &masking_rules);
        print!("{text}");
        return Ok(code);
    } else {
        print!("{}", report::terminal::summary(&report, color));
        if let (Some(dir), None) = (report_dir, &report_error) {
            println!("reports: {}", dir.display());
        }
    }
    if let Some(e) = report_error {
        eprintln!(
            "error: {e}; the run itself ended with exit code {} (report.json is also in {})",
            report.exit_code,
            state.run_dir(&report.run_id).display()
        );
        return Ok(report.exit_code.max(exit::INFRA));
    }
    Ok(report.exit_code)
}

async fn watch_signals(shutdown: Shutdown, tx: tokio::sync::mpsc::UnboundedSender<Event>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut count = 0;
    loop {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        count += 1;
        if count == 1 {
            if let Ok(mut r) = shutdown.reason.lock() {
                *r = Some(name.to_string());
            }
            let _ = tx.send(Event::Interrupted {
                signal: name,
                second: false,
            });
            shutdown.soft.cancel();
        } else if count == 2 {
            let _ = tx.send(Event::Interrupted {
                signal: name,
                second: true,
            });
            shutdown.hard.cancel();
        } else {
            // Third signal: the journal is already on disk (every entry is flushed as written).
            eprintln!(
                "dryrun: {name} again; exiting now. `dryrun cleanup --all` lists what remains."
            );
            std::process::exit(130);
        }
    }
}

async fn cleanup_cmd(
    state: &StateDir,
    provider: ProviderName,
    target: &Target,
    yes: bool,
    (endpoint, database_url): (Option<&str>, Option<&str>),
) -> anyhow::Result<i32> {
    let provider = provider_for(provider, state, None, endpoint).await?;
    let plan = cleanup::survey(state, provider.as_ref(), target).await?;
    let todo: Vec<_> = plan.iter().filter(|r| r.skipped.is_none()).collect();
    for r in &plan {
        if let Some(why) = &r.skipped
            && matches!(target, Target::Run(_))
        {
            println!("{}: skipped, {why}", r.state.run_id);
        }
    }
    if todo.is_empty() {
        println!("nothing to clean up");
        return Ok(exit::PASSED);
    }
    if !yes {
        println!("would destroy (run again with --yes to do it):");
        for r in &todo {
            if r.journal {
                println!(
                    "  run {} ({}, started {})",
                    r.state.run_id,
                    r.state.blueprint,
                    r.state
                        .started_at
                        .map_or_else(|| "?".into(), |t| t.to_rfc3339())
                );
            } else {
                println!(
                    "  run {} ({}, found by tag; no journal in this state directory)",
                    r.state.run_id, r.state.blueprint
                );
            }
            for x in r.resources.iter().chain(r.orphans.iter()) {
                println!("    {x}");
            }
            if r.resources.is_empty() && r.orphans.is_empty() {
                println!("    (nothing remains; the run will be marked closed)");
            }
        }
        return Ok(exit::PASSED);
    }
    let done = cleanup::execute(state, provider.as_ref(), &plan).await?;
    // Runs that crashed still say `running` in the shared history: record what happened.
    match open_control(state, database_url).await {
        Ok(control) => {
            for c in &done {
                let Ok(Some((row, _))) = control.get(&c.run_id).await else {
                    continue;
                };
                if row.status.is_active() {
                    let what = if c.closed {
                        "the run's process died; `dryrun cleanup` removed what it created"
                    } else {
                        "the run's process died; `dryrun cleanup` could not remove everything"
                    };
                    let _ = control
                        .set_status(&c.run_id, RunStatus::Interrupted, Some(what))
                        .await;
                } else if row.status == RunStatus::Interrupted && c.closed {
                    // Another worker marked it (its process died on this machine): say that
                    // the resources it pointed to are gone now.
                    let host = control.worker().host.clone();
                    let note = format!(
                        "{}; later removed by `dryrun cleanup` on {host} at {}",
                        row.failure.as_deref().unwrap_or("interrupted"),
                        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
                    );
                    let _ = control
                        .set_status(&c.run_id, RunStatus::Interrupted, Some(&note))
                        .await;
                }
            }
            // With a shared history, another worker may have marked a run of this machine
            // interrupted while its journal here was already closed (the worker died between
            // closing it and recording the outcome, before the journal's mirror caught up):
            // cleanup skips closed runs, so say here that nothing of it remains.
            if database_url.is_some() && !matches!(target, Target::Expired) {
                let host = control.worker().host.clone();
                for r in crate::journal::list_runs(state).unwrap_or_default() {
                    if !r.closed
                        || matches!(target, Target::Run(id) if *id != r.run_id)
                        || done.iter().any(|c| c.run_id == r.run_id)
                    {
                        continue;
                    }
                    let Ok(Some((row, _))) = control.get(&r.run_id).await else {
                        continue;
                    };
                    let note = row.failure.as_deref().unwrap_or("interrupted");
                    if row.status == RunStatus::Interrupted
                        && !note.contains("nothing of the run remains")
                        && !note.contains("later removed by")
                    {
                        let note = format!(
                            "{note}; later found by `dryrun cleanup` on {host} at {}: its journal is closed: nothing of the run remains",
                            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
                        );
                        let _ = control
                            .set_status(&r.run_id, RunStatus::Interrupted, Some(&note))
                            .await;
                    }
                }
            }
        }
        Err(e) => eprintln!("warning: the history is not updated: {e:#}"),
    }
    let mut left = 0;
    for c in &done {
        println!(
            "run {}: {}",
            c.run_id,
            if c.closed {
                "cleaned up"
            } else {
                "NOT fully cleaned"
            }
        );
        for r in &c.removed {
            println!("  destroyed {r}");
        }
        for (what, why) in &c.failed {
            left += 1;
            println!("  left behind {what}: {why}");
        }
    }
    println!(
        "left behind: {}",
        if left == 0 {
            "none".to_string()
        } else {
            left.to_string()
        }
    );
    Ok(if left == 0 {
        exit::PASSED
    } else {
        exit::LEFT_BEHIND
    })
}

fn runs(state: &StateDir, limit: usize, json: bool) -> anyhow::Result<i32> {
    let runs = journal::list_runs(state).context("read run history")?;
    if runs.is_empty() {
        if !json {
            println!("no runs in {}", state.root().display());
        }
        return Ok(exit::PASSED);
    }
    if !json {
        println!(
            "{:<36} {:<20} {:<20} {:<9} RELEASE",
            "RUN", "STATUS", "STARTED", "DURATION"
        );
    }
    for r in runs.iter().take(limit) {
        let rep_path = state.run_dir(&r.run_id).join("report.json");
        let rep: Option<report::RunReport> = std::fs::read_to_string(&rep_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if json {
            match &rep {
                Some(rep) => println!("{}", serde_json::to_string(rep)?),
                None => println!(
                    "{}",
                    serde_json::json!({"run_id": r.run_id, "blueprint": r.blueprint, "status": r.status.clone().unwrap_or_else(|| "interrupted".into())})
                ),
            }
            continue;
        }
        let locked = journal::try_lock(&state.run_dir(&r.run_id))
            .ok()
            .flatten()
            .is_none();
        let status = match (&r.status, r.closed, locked) {
            (None, _, true) => "running".to_string(),
            (None, false, false) => "crashed".to_string(),
            (None, true, false) => "crashed, cleaned".to_string(),
            (Some(s), false, _) if r.kept_until.is_none() => format!("{s}, left behind"),
            (Some(s), false, _) => format!("{s}, kept"),
            (Some(s), true, _) => s.clone(),
        };
        println!(
            "{:<36} {:<20} {:<20} {:<9} {}",
            r.run_id,
            status,
            r.started_at
                .map_or_else(|| "?".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
            rep.as_ref()
                .map_or_else(|| "-".into(), |x| report::human_ms(x.duration_ms)),
            // The version is the release's own text: one line, nothing that acts on a terminal.
            crate::sinks::clean(
                &rep.as_ref()
                    .and_then(|x| x.release.version.clone())
                    .unwrap_or_else(|| r.release.clone()),
                80
            ),
        );
    }
    let needs_cleanup = runs.iter().any(|r| {
        !r.closed
            && r.kept_until.is_none()
            && journal::try_lock(&state.run_dir(&r.run_id))
                .ok()
                .flatten()
                .is_some()
    });
    if !json && needs_cleanup {
        println!("\nsome runs may have left resources: `dryrun cleanup --all` lists them");
    }
    Ok(exit::PASSED)
}

/// The control plane for a CLI command: the shared database when `--database-url` (or
/// `DRYRUN_DATABASE_URL`) names one, else SQLite in the state directory.
async fn open_control(
    state: &StateDir,
    database_url: Option<&str>,
) -> anyhow::Result<Arc<dyn crate::control::Control>> {
    if let Some(w) = state
        .ensure()
        .with_context(|| format!("create state directory {}", state.root().display()))?
    {
        tracing::debug!("{w}");
    }
    crate::control::open(state, database_url, "cli", crate::control::LEASE_TIMEOUT)
        .await
        .context(if database_url.is_some() {
            "open the control database"
        } else {
            "open the history database"
        })
}

async fn serve_cmd(
    state_from_cli: bool,
    state: StateDir,
    config: Option<PathBuf>,
    listen: Option<String>,
    blueprints: Option<PathBuf>,
    (concurrency, provider, database_url): (Option<usize>, Option<ProviderName>, Option<String>),
) -> anyhow::Result<i32> {
    let mut cfg = match &config {
        Some(p) => crate::server::Config::load(p).map_err(|e| {
            eprintln!("error: {e}");
            Exit(exit::USAGE)
        })?,
        None => crate::server::Config::default(),
    };
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if let Some(c) = concurrency {
        cfg.concurrency = c.max(1);
    }
    if let Some(p) = provider {
        cfg.provider = p.as_str().to_string();
    }
    if database_url.is_some() {
        cfg.database_url = database_url;
    }
    let state = match (
        &cfg.state_dir,
        state_from_cli || std::env::var_os("DRYRUN_STATE_DIR").is_some(),
    ) {
        (Some(dir), false) => StateDir::new(dir.clone()),
        _ => state,
    };
    let root = blueprints
        .or_else(|| cfg.blueprints.clone())
        .unwrap_or_else(|| PathBuf::from("."));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
        // A second signal while draining: exit now; journals are on disk for `dryrun cleanup`.
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!(
            "dryrun serve: second signal; exiting now. `dryrun cleanup --all` finishes what is left."
        );
        std::process::exit(exit::LEFT_BEHIND);
    });
    if let Err(e) = cfg.validate() {
        eprintln!("error: {e}");
        return Err(Exit(exit::USAGE).into());
    }
    let stopped = Box::pin(crate::server::serve(cfg, state, root, shutdown, None))
        .await
        .map_err(|e| {
            eprintln!("error: {e}");
            Exit(match e {
                crate::server::ServeError::Config(_) | crate::server::ServeError::Auth(_) => {
                    exit::USAGE
                }
                _ => exit::INFRA,
            })
        })?;
    Ok(if !stopped.abandoned.is_empty() {
        exit::LEFT_BEHIND
    } else if stopped.taken_for_dead {
        exit::INFRA
    } else {
        exit::PASSED
    })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_powers_of_1024_and_nonsense_is_refused() {
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5 GB"), Ok(3 << 29));
        assert_eq!(parse_size("50gib"), Ok(50 << 30));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in [
            "",
            "GB",
            "-5GB",
            "1.2.3GB",
            "5PB",
            "NaN",
            "1e9",
            "5 GB; rm -rf /",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} was accepted");
        }
        // Absurdly large sizes saturate instead of wrapping around to a small cap.
        assert_eq!(parse_size("99999999999999999999TB"), Ok(u64::MAX));
    }
}
