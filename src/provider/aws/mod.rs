//! The AWS provider: the same loop on RDS, S3 and EC2 through the official SDK.
//!
//! | kind | the copy | restore | teardown |
//! |---|---|---|---|
//! | `database` (postgres) | an RDS instance `dryrun-RUN-NAME`, not publicly accessible, in the run's security group | `RestoreDBInstanceFromDBSnapshot` of the latest available snapshot (or `--backup ID`), then a fresh master password | delete without final snapshot, automated backups deleted, wait until gone |
//! | `bucket` | an S3 bucket `dryrun-RUN-NAME`, every public-access block on | server-side copies of the production bucket (or prefix), 16 at a time | delete every version and delete marker, delete the bucket |
//! | `service` | an EC2 instance from the service's `aws.ami`, in the run's security group, user data from the install template | — | terminate, wait |
//!
//! Every resource is tagged at creation with `dryrun:run-id`, `dryrun:blueprint`,
//! `dryrun:expires-at` and `dryrun:created-by` ([`names::tags`]). The run's security group
//! (members only, no 0.0.0.0/0 ingress) is a run-level resource: it is created by the first
//! resource that needs it and removed by [`Provider::sweep`] after the resources.
//!
//! # Guarantees
//! - **Production is only read**: snapshots are listed, the production instance described, the
//!   production bucket listed and copied from.
//! - **The production guard**: every mutating call (modify, delete, terminate, put, tag) is
//!   preceded by a look at the resource's live tags and refused with
//!   [`ProviderError::Guard`] unless its `dryrun:run-id` is the run's own. `delete` works only
//!   from a journaled record; `sweep` finds resources only by the run's tag.
//! - **Idempotent creates**: names and the RunInstances `ClientToken` derive from the run id
//!   and the resource; a retried create adopts what carries the run's tag (instances are
//!   reconciled by tag before launching, because emulators ignore `ClientToken`).
//! - **Every wait has a maximum** and its timeout names the resource and its last state
//!   ([`wait`]).
//!
//! # Checks
//! http and command checks run on the service's instance through SSM Run Command ([`ssm`]);
//! sql checks run from the runner only when `providers.aws.runner_in_vpc` is set, else they
//! are reported skipped. No code path connects to the copy's private addresses from the runner
//! unless that setting says the runner is inside the VPC.

pub mod aurora;
pub mod clients;
mod doctor;
pub mod ec2;
mod init;
pub mod names;
pub mod rds;
pub mod s3;
pub mod ssm;
pub mod wait;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::blueprint::{AwsSettings, Blueprint, DatabaseSpec, Engine, ResourceKind, ResourceSpec};
use crate::provider::{
    BackupInfo, BackupPick, Created, Deleted, InstallRequest, Installed, Orphan, Output, Outputs,
    Probe, ProbeAnswer, ProbeOutcome, ProbeRequest, Provider, ProviderError, RecordSink,
    ResourceRecord, ResourceRequest, RunInfo, TaggedRun,
};
use crate::secret::Secret;
use clients::{Clients, Connection};
use names::{TAG_BLUEPRINT, TAG_EXPIRES, TAG_RUN};

/// The root volume the estimate assumes for a service's instance (the size of the common
/// Amazon Linux and Debian AMIs' root volume; dryrun does not resize it).
const ROOT_VOLUME_GB: u64 = 8;

/// The user data used when a service has no `aws.user_data`: it runs at boot, while the
/// databases are still being restored, so it gets nothing that depends on them. It fetches the
/// release through the presigned URL, unpacks it, and leaves `/var/lib/dryrun/fetched`
/// (`fetch EXIT_CODE`), which the install ([`INSTALL`], through SSM) waits for.
pub const DEFAULT_USER_DATA: &str = r#"#!/bin/sh
# dryrun: service {{service}} of run {{run.id}}, release {{release.version}}
mkdir -p /opt/dryrun/release /var/log/dryrun /var/lib/dryrun
fetched() { echo "fetch $1" > /var/lib/dryrun/fetched; exit 0; }
curl -fsS --retry 5 -o /opt/dryrun/release.tar.gz '{{{release.url}}}' > /var/log/dryrun/step-fetch.log 2>&1 || fetched $?
tar -xzf /opt/dryrun/release.tar.gz -C /opt/dryrun/release >> /var/log/dryrun/step-fetch.log 2>&1 || fetched $?
fetched 0
"#;

/// The install, sent through SSM once the service's inputs exist (its dependencies are up):
/// waits for the boot's `fetched` file, writes the env file, runs the install steps (each line
/// `dryrun-running: NAME` first, so a command stopped at its deadline says where), starts the
/// release, writes `/var/lib/dryrun/status` (`STEP EXIT_CODE`), then waits for the health check
/// while watching the service's process (pid in /var/lib/dryrun/app.pid). Exit codes: 0
/// healthy, 1 a step failed (`dryrun-step:`/`dryrun-exit:` lines, then the log's tail), 2
/// unhealthy, 3 the service exited, 124 the boot did not fetch the release by the deadline.
/// Values arrive quoted or base64 (the env): none can end a quote of the script.
const INSTALL: &str = r#"deadline=$(( $(date +%s) + {{secs}} ))
while [ ! -f /var/lib/dryrun/fetched ]; do
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "dryrun-step: boot"; tail -c 3500 /var/log/dryrun/*.log /var/log/cloud-init-output.log 2>/dev/null; exit 124; fi
  sleep 1
done
failed() { echo "$1 $2" > /var/lib/dryrun/status; echo "dryrun-step: $1"; echo "dryrun-exit: $2"; tail -c 3500 "/var/log/dryrun/step-$1.log"; exit 1; }
if ! mkdir /var/lib/dryrun/installing 2>/dev/null; then
  # A SendCommand the SDK sent again (its answer was lost): the first one installs; this one
  # waits for its outcome and then for health, and starts nothing.
  while [ ! -f /var/lib/dryrun/status ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "dryrun-step: install"; exit 124; fi
    sleep 1
  done
  read step code < /var/lib/dryrun/status
  [ "$step $code" = "install 0" ] || { echo "dryrun-step: $step"; echo "dryrun-exit: $code"; tail -c 3500 "/var/log/dryrun/step-$step.log"; exit 1; }
else
read step code < /var/lib/dryrun/fetched
[ "$code" = 0 ] || failed fetch "$code"
rel=/opt/dryrun/release
[ -f "$rel/dryrun-release.yaml" ] || rel=$(dirname "$(ls -d /opt/dryrun/release/*/dryrun-release.yaml 2>/dev/null | head -n 1)")
cd "$rel" 2>/dev/null && [ -f dryrun-release.yaml ] || { echo "no dryrun-release.yaml in the release" >> /var/log/dryrun/step-fetch.log; failed fetch 1; }
umask 077
printf '%s' '{{env_b64}}' | base64 -d > /opt/dryrun/env || failed fetch $?
. /opt/dryrun/env
{{{install_steps}}}
{{{start}}}
echo "install 0" > /var/lib/dryrun/status
fi
exited() { [ -f /var/lib/dryrun/app.pid ] && ! kill -0 "$(cat /var/lib/dryrun/app.pid)" 2>/dev/null; }
{{#if has_health}}until curl -fsS -o /dev/null --max-time 5 {{{health_url}}}; do
  if exited; then echo "dryrun-exited: the service exited before GET "{{{health}}}" answered 2xx"; tail -c 3000 /var/log/dryrun/app.log; exit 3; fi
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "dryrun-unhealthy: GET "{{{health}}}" never answered 2xx"; tail -c 3000 /var/log/dryrun/app.log; exit 2; fi
  sleep 1
done
{{/if}}if exited; then echo "dryrun-exited: the service exited after it started"; tail -c 3000 /var/log/dryrun/app.log; exit 3; fi
echo "dryrun-ready"
"#;

/// Marker line that the http check script prints before the response body.
const HTTP_MARKER: &str = "__dryrun_http_status=";

/// The AWS provider.
pub struct AwsProvider {
    conn: Connection,
    /// The secret parts of the loaded credentials (for every run's redactor).
    held: Vec<Secret>,
    region: String,
    settings: AwsSettings,
    subnet_hint: Option<String>,
    db_sources: Vec<String>,
    groups: tokio::sync::Mutex<HashMap<String, String>>,
    sources: tokio::sync::Mutex<HashMap<String, Option<rds::Instance>>>,
    /// The blueprint's egress firewall: the security group's egress rules.
    firewall: crate::firewall::Policy,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider")
            .field("region", &self.region)
            .field("endpoint", &self.conn.endpoint)
            .finish_non_exhaustive()
    }
}

fn out(value: impl Into<String>) -> Output {
    Output {
        value: value.into(),
        secret: false,
    }
}

fn secret_out(value: impl Into<String>) -> Output {
    Output {
        value: value.into(),
        secret: true,
    }
}

impl AwsProvider {
    /// Connects with the standard credential chain. `bp` (absent for cleanup) gives
    /// `providers.aws` and hints for the VPC; `endpoint` (else `AWS_ENDPOINT_URL`) points at an
    /// emulator.
    ///
    /// # Errors
    /// When no region is configured.
    pub async fn connect(
        bp: Option<&Blueprint>,
        endpoint: Option<String>,
    ) -> Result<AwsProvider, ProviderError> {
        let settings = bp.map(|b| b.aws.clone()).unwrap_or_default();
        let conn = Connection::load(settings.region.clone(), endpoint).await;
        let region = settings
            .region
            .clone()
            .or_else(|| conn.default_region())
            .ok_or_else(|| {
                ProviderError::Other(
                    "no AWS region: set AWS_REGION (or a profile's region) or providers.aws.region"
                        .into(),
                )
            })?;
        let mut subnet_hint = None;
        let mut db_sources = Vec::new();
        for r in bp.map(|b| b.resources.as_slice()).unwrap_or_default() {
            match &r.spec {
                ResourceSpec::Service(s) => {
                    if subnet_hint.is_none() {
                        subnet_hint = s.aws.as_ref().and_then(|a| a.subnet_id.clone());
                    }
                }
                ResourceSpec::Database(d) => db_sources.push(d.source.clone()),
                ResourceSpec::Bucket(_) => {}
            }
        }
        let held = conn.credential_secrets().await;
        Ok(AwsProvider {
            conn,
            held,
            region,
            settings,
            subnet_hint,
            db_sources,
            groups: tokio::sync::Mutex::new(HashMap::new()),
            sources: tokio::sync::Mutex::new(HashMap::new()),
            firewall: bp.map(|b| b.firewall.clone()).unwrap_or_default(),
        })
    }

    /// The region runs use.
    #[must_use]
    pub fn region(&self) -> &str {
        &self.region
    }

    fn clients(&self) -> Clients {
        self.conn.clients(&self.region)
    }

    fn clients_for(&self, record: &ResourceRecord) -> Clients {
        self.conn.clients(
            record
                .data
                .get("region")
                .map_or(self.region.as_str(), String::as_str),
        )
    }

    /// The production instance (described once; read only).
    async fn source(&self, id: &str) -> Result<Option<rds::Instance>, ProviderError> {
        let mut cache = self.sources.lock().await;
        if let Some(s) = cache.get(id) {
            return Ok(s.clone());
        }
        let found = rds::describe(&self.clients(), id).await?;
        cache.insert(id.to_string(), found.clone());
        Ok(found)
    }

    async fn vpc(&self) -> Result<String, ProviderError> {
        let c = self.clients();
        if let Some(v) = &self.settings.vpc_id {
            return Ok(v.clone());
        }
        if let Some(s) = &self.subnet_hint {
            return ec2::subnet_vpc(&c, s).await;
        }
        if let Some(src) = self.db_sources.first()
            && let Some(inst) = self.source(src).await?
            && let Some((_, Some(vpc))) = &inst.subnet_group
        {
            return Ok(vpc.clone());
        }
        ec2::default_vpc(&c).await
    }

    /// The run's security group, created on first use.
    async fn group(&self, run: &RunInfo) -> Result<String, ProviderError> {
        let mut groups = self.groups.lock().await;
        if let Some(g) = groups.get(&run.run_id) {
            return Ok(g.clone());
        }
        let vpc = self.vpc().await?;
        let name = names::security_group_name(&run.run_id);
        let runner_cidr = if self.settings.runner_in_vpc {
            self.settings.runner_cidr.as_deref()
        } else {
            None
        };
        let egress = match self.firewall.mode {
            crate::firewall::Mode::Off => None,
            _ => Some(ec2::egress_allow(&self.firewall.allow)?),
        };
        let id = ec2::create_group(
            &self.clients(),
            &name,
            &vpc,
            &names::tags(run, "run", &name),
            &run.run_id,
            (runner_cidr, egress.as_deref()),
        )
        .await?;
        groups.insert(run.run_id.clone(), id.clone());
        Ok(id)
    }

    fn run_id_of(record: &ResourceRecord) -> Result<&str, ProviderError> {
        record
            .data
            .get("run_id")
            .map(String::as_str)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                ProviderError::Guard(format!(
                    "{} ({}): its journal record names no run",
                    record.address, record.id
                ))
            })
    }

    async fn restore_database(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        db: &DatabaseSpec,
        backup: &BackupInfo,
        cancel: &CancellationToken,
    ) -> Result<Outputs, ProviderError> {
        let c = self.clients_for(record);
        let sg = match record.data.get("security_group") {
            Some(g) => g.clone(),
            None => self.group(run).await?,
        };
        let tags = names::tags(run, &record.address, &record.id);
        // Production's credentials must not open the copy.
        let password = Secret::generate(32);
        run.redactor.register(&password);
        let (endpoint, user) = if db.engine.is_aurora() {
            let instance = record.data.get("instance").cloned().ok_or_else(|| {
                ProviderError::Other(format!(
                    "{}: its record names no writer instance",
                    record.address
                ))
            })?;
            let cl = aurora::clone(
                &c,
                &aurora::CloneRequest {
                    id: &record.id,
                    instance: &instance,
                    source: &db.source,
                    engine: db.engine.as_str(),
                    to_time: (backup.id != "latest").then_some(backup.taken_at),
                    security_group: &sg,
                    subnet_group: self.settings.db_subnet_group.as_deref(),
                    class: self.settings.db_instance_class.as_deref(),
                    tags: &tags,
                    run_id: &run.run_id,
                    timeout: self.settings.restore_timeout,
                },
                cancel,
            )
            .await?;
            let cl = aurora::set_password(&c, &cl, &run.run_id, &password, cancel).await?;
            (cl.endpoint, cl.master_user)
        } else {
            let subnet_group = match &self.settings.db_subnet_group {
                Some(g) => Some(g.clone()),
                None => self
                    .source(&db.source)
                    .await?
                    .and_then(|s| s.subnet_group.map(|(name, _)| name))
                    .filter(|n| !n.is_empty()),
            };
            let inst = rds::restore(
                &c,
                &rds::RestoreRequest {
                    id: &record.id,
                    snapshot: &backup.id,
                    security_group: &sg,
                    subnet_group: subnet_group.as_deref(),
                    class: self.settings.db_instance_class.as_deref(),
                    tags: &tags,
                    run_id: &run.run_id,
                    timeout: self.settings.restore_timeout,
                },
                cancel,
            )
            .await?;
            let inst = rds::set_password(&c, &inst, &run.run_id, &password, cancel).await?;
            (inst.endpoint, inst.master_user)
        };
        let (host, port) = endpoint.ok_or_else(|| {
            ProviderError::Other(format!(
                "{} ({}) has no endpoint",
                record.address, record.id
            ))
        })?;
        let (scheme, default_user) = if db.engine.is_mysql() {
            ("mysql", "admin")
        } else {
            ("postgres", "postgres")
        };
        let user = user.unwrap_or_else(|| default_user.into());
        let mut o = Outputs::new();
        o.insert("host".into(), out(&host));
        o.insert("port".into(), out(port.to_string()));
        o.insert("user".into(), out(&user));
        o.insert("name".into(), out(&db.database));
        o.insert("engine".into(), out(scheme));
        o.insert("backup_id".into(), out(&backup.id));
        o.insert("password".into(), secret_out(password.expose()));
        o.insert(
            "url".into(),
            secret_out(format!(
                "{scheme}://{user}:{}@{host}:{port}/{}",
                password.expose(),
                db.database
            )),
        );
        Ok(o)
    }

    /// The user data a service's instance boots with (the default [`DEFAULT_USER_DATA`] or
    /// the service's `aws.user_data`): the run, the service, its port and the release with
    /// its presigned URL — nothing that depends on other resources.
    fn boot_user_data(
        run: &RunInfo,
        address: &str,
        release: &crate::release::Release,
        template: &str,
        url: &str,
        port: u16,
    ) -> Result<String, ProviderError> {
        let ctx = json!({
            "run": {"id": run.run_id, "blueprint": run.blueprint},
            "service": address.trim_start_matches("service."),
            "port": port,
            "release": {
                "ref": release.reference,
                "version": release.manifest.version,
                "git_sha": release.manifest.git_sha.clone().unwrap_or_default(),
                "url": url,
            },
        });
        let text = crate::blueprint::template::render(template, &ctx).map_err(|e| {
            ProviderError::Other(format!("{address}: aws.user_data cannot be rendered: {e}"))
        })?;
        if text.len() > 16 * 1024 {
            return Err(ProviderError::Other(format!(
                "{address}: the user data is {} bytes; EC2 allows 16 KiB",
                text.len()
            )));
        }
        Ok(text)
    }

    /// The [`INSTALL`] script for `req`, with `secs` until its deadline.
    fn install_script(
        req: &InstallRequest<'_>,
        run: &RunInfo,
        port: u16,
        secs: u64,
    ) -> Result<String, ProviderError> {
        let mut env = req.env.clone();
        env.insert("PORT".into(), port.to_string());
        env.insert("DRYRUN_RUN_ID".into(), run.run_id.clone());
        env.insert(
            "DRYRUN_RELEASE_VERSION".into(),
            req.release.manifest.version.clone(),
        );
        let env_exports: Vec<String> = env
            .iter()
            .map(|(k, v)| format!("export {k}={}", ssm::quote(v)))
            .collect();
        let steps: Vec<String> = req
            .release
            .manifest
            .install
            .iter()
            .map(|s| {
                let name: String = s
                    .name
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
                    .collect();
                format!(
                    "echo \"dryrun-running: {name}\"\ntimeout {} sh -c {} > /var/log/dryrun/step-{name}.log 2>&1 || failed {name} $?",
                    s.timeout.as_secs().max(1),
                    ssm::quote(&s.run)
                )
            })
            .collect();
        let start = req
            .start
            .clone()
            .or_else(|| req.release.manifest.start.clone())
            .map(|s| {
                format!(
                    "nohup setsid sh -c {} > /var/log/dryrun/app.log 2>&1 < /dev/null &\necho $! > /var/lib/dryrun/app.pid",
                    ssm::quote(&s)
                )
            })
            .unwrap_or_default();
        let health = req
            .release
            .manifest
            .health
            .as_ref()
            .map(|h| h.http.clone())
            .unwrap_or_default();
        crate::blueprint::template::render(
            INSTALL,
            &json!({
                "secs": secs,
                // The exports as base64: no value, whatever it holds, can end a quote of the
                // script.
                "env_b64": names::base64(format!("{}\n", env_exports.join("\n")).as_bytes()),
                "install_steps": steps.join("\n"),
                "start": start,
                "has_health": !health.is_empty(),
                "health": ssm::quote(&health),
                "health_url": ssm::quote(&format!("http://127.0.0.1:{port}{health}")),
            }),
        )
        .map_err(ProviderError::Other)
    }

    /// Launches a service's instance with its boot user data and waits until it runs: a
    /// retried create adopts the instance that carries the resource's tag, and a duplicate
    /// launched by a retried RunInstances is terminated.
    async fn launch(
        &self,
        run: &RunInfo,
        record: &mut ResourceRecord,
        s: &crate::blueprint::ServiceSpec,
        sg: &str,
    ) -> Result<ec2::Instance, ProviderError> {
        let address = record.address.clone();
        let aws = s
            .aws
            .clone()
            .ok_or_else(|| ProviderError::Other(format!("{address} has no `aws:` block")))?;
        let release = run
            .release
            .as_ref()
            .ok_or_else(|| ProviderError::Other(format!("{address}: no release to install")))?;
        let (bucket, key) = names::parse_s3_url(&release.reference).ok_or_else(|| {
            ProviderError::Other(format!(
                "on AWS the release must be an S3 object: --release s3://BUCKET/KEY (got `{}`)",
                release.reference
            ))
        })?;
        let c = self.clients_for(record);
        let ttl = (run.expires_at - Utc::now())
            .to_std()
            .unwrap_or(Duration::from_secs(3600))
            .clamp(Duration::from_secs(900), Duration::from_secs(7 * 24 * 3600));
        let url = s3::presign_get(&c, &bucket, &key, ttl).await?;
        let template = aws.user_data.as_deref().unwrap_or(DEFAULT_USER_DATA);
        let user_data = Self::boot_user_data(run, &address, release, template, &url, aws.port)?;

        // Reconcile by tag first: a retried create must not make a second instance, and
        // emulators ignore ClientToken.
        let mut existing = ec2::tagged(&c, Some(&run.run_id), Some(&address)).await?;
        let inst = if existing.is_empty() {
            let tags = names::tags(run, &address, &record.id);
            let inst = ec2::launch(
                &c,
                &ec2::Launch {
                    ami: &aws.ami,
                    instance_type: &aws.instance_type,
                    subnet: aws.subnet_id.as_deref(),
                    security_group: sg,
                    client_token: record.data.get("client_token").map_or(&record.id, |t| t),
                    user_data: &user_data,
                    profile: self.settings.instance_profile.as_deref(),
                    tags: &tags,
                },
            )
            .await?;
            // And after: when an answer to RunInstances is lost and the SDK retries, AWS
            // returns the first instance again (same ClientToken) but an emulator launches a
            // second one. Whatever else carries this resource's tag is such a duplicate.
            let extra: Vec<ec2::Instance> = ec2::tagged(&c, Some(&run.run_id), Some(&address))
                .await?
                .into_iter()
                .filter(|i| i.id != inst.id)
                .collect();
            if !extra.is_empty() {
                let ids: Vec<&str> = extra.iter().map(|i| i.id.as_str()).collect();
                tracing::warn!(
                    "{address}: a retried RunInstances launched {} more instance(s) ({}); terminating them and keeping {}",
                    extra.len(),
                    ids.join(", "),
                    inst.id
                );
                ec2::terminate(&c, &extra, &run.run_id).await?;
                record
                    .data
                    .insert("duplicates_terminated".into(), ids.join(","));
            }
            inst
        } else {
            let keep = existing.remove(0);
            ec2::terminate(&c, &existing, &run.run_id).await?;
            keep
        };
        record.id.clone_from(&inst.id);
        record.data.insert("instance_id".into(), inst.id.clone());
        // The create is cancelled by dropping it (the engine's select): no token of its own.
        ec2::wait_running(&c, &inst.id, s.ready_timeout, &CancellationToken::new()).await
    }
    /// The instance a check runs on: the service whose address the URL names, else the first.
    fn instance_for<'r>(
        records: &'r [ResourceRecord],
        url: Option<&str>,
    ) -> Option<&'r ResourceRecord> {
        let services: Vec<&ResourceRecord> = records
            .iter()
            .filter(|r| r.kind == ResourceKind::Service && r.data.contains_key("instance_id"))
            .collect();
        url.and_then(|u| {
            services.iter().copied().find(|r| {
                r.data.get("private_ip").is_some_and(|ip| {
                    u.contains(&format!("//{ip}:")) || u.contains(&format!("//{ip}/"))
                })
            })
        })
        .or_else(|| services.first().copied())
    }
}

/// What an http check's SSM command showed. curl failing (refused, timed out) is the copy not
/// answering: the check fails, as on the runner. No result line means the script did not run:
/// nothing was learnt, an error (exit 3).
fn http_outcome(
    inv: &ssm::Invocation,
    instance: &str,
    request: &str,
) -> Result<ProbeOutcome, ProviderError> {
    let via = inv.via(instance);
    match parse_http(&inv.stdout) {
        Some((status, body)) if inv.exit_code == 0 => Ok(ProbeOutcome::Remote {
            answer: ProbeAnswer::Http { status, body },
            via,
        }),
        Some(_) => Ok(ProbeOutcome::Failed {
            message: format!(
                "{request} from {instance}: curl exit code {}: {}",
                inv.exit_code,
                inv.stderr.trim()
            ),
            via,
        }),
        None => Err(ProviderError::Other(format!(
            "{via} ended `{}` with exit code {} but printed no result: the script did not run on the instance (an emulator such as moto accepts commands without running them)",
            inv.status, inv.exit_code
        ))),
    }
}

/// What a command check's SSM command showed. `TimedOut` is the command running past the
/// check's timeout, as a hung command would on the runner: the check fails. `Cancelled`,
/// `Undeliverable`, `Terminated`: it did not run to the end, an error.
fn command_outcome(
    inv: &ssm::Invocation,
    instance: &str,
    timeout: Duration,
) -> Result<ProbeOutcome, ProviderError> {
    let via = inv.via(instance);
    match inv.status.as_str() {
        "Success" | "Failed" => Ok(ProbeOutcome::Remote {
            via,
            answer: ProbeAnswer::Command {
                exit_code: Some(inv.exit_code),
                output: format!("{}{}", inv.stdout, inv.stderr),
            },
        }),
        "TimedOut" => Ok(ProbeOutcome::Failed {
            message: format!(
                "command did not finish within {}",
                humantime::format_duration(timeout.max(ssm::MIN_EXECUTION))
            ),
            via,
        }),
        other => Err(ProviderError::Other(format!(
            "{via} ended `{other}`: {}",
            inv.stderr.trim()
        ))),
    }
}

fn parse_http(stdout: &str) -> Option<(u16, String)> {
    let (first, rest) = stdout.split_once('\n').unwrap_or((stdout, ""));
    let status = first.trim().strip_prefix(HTTP_MARKER)?;
    let code = status.split_whitespace().next()?.parse().ok()?;
    Some((code, rest.to_string()))
}

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn find_backup(
        &self,
        db: &DatabaseSpec,
        pick: &BackupPick,
    ) -> Result<BackupInfo, ProviderError> {
        match db.engine {
            Engine::Sqlite => Err(ProviderError::Other(
                "engine `sqlite` is not available on AWS; the AWS provider restores RDS snapshots (`engine: postgres`, `mysql`, `mariadb`) and clones Aurora clusters (`aurora-postgresql`, `aurora-mysql`)".into(),
            )),
            e if e.is_aurora() => {
                aurora::find_point(&self.clients(), &db.source, e.as_str(), pick).await
            }
            e => rds::find_snapshot(&self.clients(), &db.source, e.as_str(), pick).await,
        }
    }

    fn plan_record(&self, run: &RunInfo, name: &str, req: &ResourceRequest) -> ResourceRecord {
        let mut data = BTreeMap::new();
        data.insert("run_id".into(), run.run_id.clone());
        data.insert("region".into(), self.region.clone());
        let (kind, id) = match req {
            ResourceRequest::Database(d) => {
                data.insert("source".into(), d.source.clone());
                data.insert("engine".into(), d.engine.as_str().to_string());
                if d.engine.is_aurora() {
                    data.insert(
                        "instance".into(),
                        names::db_cluster_instance_id(&run.run_id, name),
                    );
                }
                data.insert(
                    "security_group_name".into(),
                    names::security_group_name(&run.run_id),
                );
                (
                    ResourceKind::Database,
                    names::db_instance_id(&run.run_id, name),
                )
            }
            ResourceRequest::Bucket(b) => {
                data.insert("source".into(), b.source.clone());
                (ResourceKind::Bucket, names::bucket_name(&run.run_id, name))
            }
            ResourceRequest::Service(_) => {
                let token = names::client_token(&run.run_id, name);
                data.insert("client_token".into(), token.clone());
                data.insert(
                    "security_group_name".into(),
                    names::security_group_name(&run.run_id),
                );
                (ResourceKind::Service, token)
            }
        };
        ResourceRecord {
            address: format!("{kind}.{name}"),
            kind,
            id,
            data,
        }
    }

    async fn create(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
    ) -> Result<Created, ProviderError> {
        let mut record = record.clone();
        let mut outputs = Outputs::new();
        match req {
            ResourceRequest::Database(d) => {
                // The instance itself is made by the restore (RDS restores into a new instance).
                let sg = self.group(run).await?;
                record.data.insert("security_group".into(), sg);
                outputs.insert(
                    "engine".into(),
                    out(if d.engine.is_mysql() {
                        "mysql"
                    } else {
                        "postgres"
                    }),
                );
                outputs.insert("name".into(), out(&d.database));
            }
            ResourceRequest::Bucket(_) => {
                let tags = names::tags(run, &record.address, &record.id);
                s3::create(&self.clients(), &record.id, &tags, &run.run_id).await?;
                outputs.insert("name".into(), out(&record.id));
                outputs.insert("url".into(), out(format!("s3://{}", record.id)));
                outputs.insert("path".into(), out(format!("s3://{}/", record.id)));
            }
            ResourceRequest::Service(s) => {
                let ok = s.aws.as_ref().is_some_and(|a| !a.ami.is_empty());
                if !ok {
                    return Err(ProviderError::Other(format!(
                        "{} has no `aws.ami`: give the service an `aws:` block with the AMI to run (e.g. `ami: \"{{{{params.ami}}}}\"`)",
                        record.address
                    )));
                }
                // The instance boots now, while the databases restore; the install (env,
                // steps, start) follows through SSM when they are up.
                let sg = self.group(run).await?;
                record.data.insert("security_group".into(), sg.clone());
                let running = self.launch(run, &mut record, s, &sg).await?;
                let ip = running.private_ip.unwrap_or_default();
                let port = s.aws.as_ref().map_or(8080, |a| a.port);
                record.data.insert("private_ip".into(), ip.clone());
                outputs.insert("host".into(), out(&ip));
                outputs.insert("port".into(), out(port.to_string()));
                outputs.insert("url".into(), out(format!("http://{ip}:{port}")));
                outputs.insert("dir".into(), out("/opt/dryrun/release"));
            }
        }
        Ok(Created { record, outputs })
    }

    async fn restore(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        req: &ResourceRequest,
        backup: Option<&BackupInfo>,
        cancel: &CancellationToken,
    ) -> Result<Outputs, ProviderError> {
        match req {
            ResourceRequest::Database(db) => {
                let backup = backup.ok_or_else(|| {
                    ProviderError::NoBackup(format!("{}: no snapshot chosen", record.address))
                })?;
                self.restore_database(run, record, db, backup, cancel).await
            }
            ResourceRequest::Bucket(b) => {
                let c = self.clients_for(record);
                let copied =
                    s3::copy_all(&c, &b.source, b.prefix.as_deref(), &record.id, cancel).await?;
                tracing::debug!(bucket = %record.id, objects = copied.objects, bytes = copied.bytes, "bucket copied");
                Ok(Outputs::new())
            }
            ResourceRequest::Service(_) => Ok(Outputs::new()),
        }
    }

    async fn install(
        &self,
        run: &RunInfo,
        req: InstallRequest<'_>,
        _sink: &dyn RecordSink,
    ) -> Result<Installed, ProviderError> {
        let started = Instant::now();
        let address = req.record.address.clone();
        let port = req.spec.aws.as_ref().map_or(8080, |a| a.port);
        let instance = req.record.data.get("instance_id").cloned().ok_or_else(|| {
            ProviderError::Other(format!(
                "{address}: no instance was launched for it (its create did not finish)"
            ))
        })?;
        let c = self.clients_for(req.record);
        // `ready_timeout` counts from here: the instance may have booted long before, while
        // the databases restored.
        let remaining = req.ready_timeout.max(Duration::from_secs(30));
        let script = Self::install_script(&req, run, port, remaining.as_secs())?;
        let inv = ssm::run(
            &c,
            &instance,
            &format!("dryrun {} install of {address}", run.run_id),
            &script,
            remaining + Duration::from_secs(30),
            &req.cancel,
        )
        .await?;
        let output = run.redactor.redact(&crate::process::tail(
            &format!("{}{}", inv.stdout, inv.stderr),
            4000,
        ));
        let via = inv.via(&instance);
        let last = |prefix: &str| {
            inv.stdout
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix(prefix))
                .map(ToString::to_string)
        };
        match (inv.status.as_str(), inv.exit_code) {
            ("Success", 0) => {}
            // The instance could not fetch or unpack the release (S3 unreachable, a damaged
            // object): nothing was learnt about the release itself.
            (_, 1) if last("dryrun-step: ").as_deref() == Some("fetch") => {
                return Err(ProviderError::Other(format!(
                    "{address}: the instance could not fetch the release ({via}):\n{output}"
                )));
            }
            (_, 124) => {
                let step = last("dryrun-step: ").unwrap_or_else(|| "boot".into());
                let status = if step == "boot" {
                    "the instance had not fetched the release after"
                } else {
                    "still running after"
                };
                return Err(ProviderError::InstallStep {
                    step,
                    status: format!("{status} {}; {via}", humantime::format_duration(remaining)),
                    output,
                });
            }
            (_, 1) => {
                let step = last("dryrun-step: ").unwrap_or_else(|| "install".into());
                let status = last("dryrun-exit: ")
                    .map_or_else(|| "failed".to_string(), |c| format!("exit code {c}"));
                return Err(ProviderError::InstallStep {
                    step,
                    status: format!("{status}; {via}"),
                    output,
                });
            }
            // SSM stopped the script at its deadline: inside the step it last announced.
            ("TimedOut", _) => {
                let step = last("dryrun-running: ").unwrap_or_else(|| "install".into());
                return Err(ProviderError::InstallStep {
                    step,
                    status: format!(
                        "still running after {}; {via}",
                        humantime::format_duration(remaining)
                    ),
                    output,
                });
            }
            (_, 2 | 3) => {
                return Err(ProviderError::Unhealthy {
                    address,
                    reason: format!("{via} reported:\n{output}"),
                });
            }
            (status, code) => {
                return Err(ProviderError::Other(format!(
                    "{address}: the install ({via}) ended `{status}` with exit code {code}:\n{output}"
                )));
            }
        }
        let ip = req
            .record
            .data
            .get("private_ip")
            .cloned()
            .unwrap_or_default();
        let mut outputs = Outputs::new();
        outputs.insert("host".into(), out(&ip));
        outputs.insert("port".into(), out(port.to_string()));
        outputs.insert("url".into(), out(format!("http://{ip}:{port}")));
        outputs.insert("dir".into(), out("/opt/dryrun/release"));
        Ok(Installed {
            record: req.record.clone(),
            outputs,
            steps: vec![("install-and-health (SSM)".into(), started.elapsed())],
        })
    }

    async fn delete(&self, record: &ResourceRecord) -> Result<Deleted, ProviderError> {
        let run_id = Self::run_id_of(record)?;
        let c = self.clients_for(record);
        match record.kind {
            ResourceKind::Database
                if record
                    .data
                    .get("engine")
                    .is_some_and(|e| e.starts_with("aurora-")) =>
            {
                aurora::delete(&c, &record.id, run_id).await
            }
            ResourceKind::Database => rds::delete(&c, &record.id, run_id).await,
            ResourceKind::Bucket => {
                let name = record.address.strip_prefix("bucket.").unwrap_or_default();
                let journaled_name = record.id == names::bucket_name(run_id, name);
                s3::delete(&c, &record.id, run_id, journaled_name).await
            }
            ResourceKind::Service => {
                let mut found = ec2::tagged(&c, Some(run_id), Some(&record.address)).await?;
                if record.id.starts_with("i-") && !found.iter().any(|i| i.id == record.id) {
                    found.extend(
                        ec2::describe(&c, std::slice::from_ref(&record.id))
                            .await?
                            .into_iter()
                            .filter(|i| i.state != "terminated"),
                    );
                }
                if found.is_empty() {
                    return Ok(Deleted::AlreadyGone);
                }
                ec2::terminate(&c, &found, run_id).await?;
                Ok(Deleted::Destroyed)
            }
        }
    }

    async fn sweep(&self, run_id: &str, remove: bool) -> Result<Vec<Orphan>, ProviderError> {
        let c = self.clients();
        let instances = ec2::tagged(&c, Some(run_id), None).await?;
        let databases = rds::tagged(&c, Some(run_id)).await?;
        let clusters = aurora::tagged(&c, Some(run_id)).await?;
        let buckets = s3::tagged(&c, Some(run_id)).await?;
        let groups = ec2::groups(&c, Some(run_id), None).await?;
        let mut found = Vec::new();
        let mut push = |id: String, r: Result<(), ProviderError>| {
            found.push(Orphan {
                id,
                removed: remove && r.is_ok(),
                reason: r.err().map(|e| e.to_string()),
            });
        };
        // Dependency order: instances, databases, buckets, then the group they used. A
        // resource that carries the run's tag but fails the rest of the ownership proof (a
        // production instance someone tagged) is reported, never touched.
        let (instances, foreign): (Vec<_>, Vec<_>) = instances
            .into_iter()
            .partition(|i| i.owned_by(run_id).is_ok());
        for i in &foreign {
            push(format!("ec2 instance {}", i.id), i.owned_by(run_id));
        }
        let ids: Vec<String> = instances
            .iter()
            .map(|i| {
                format!(
                    "ec2 instance {} ({})",
                    i.id,
                    names::tag_value(
                        i.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                        names::TAG_RESOURCE
                    )
                    .unwrap_or("?")
                )
            })
            .collect();
        let r = if remove {
            ec2::terminate(&c, &instances, run_id).await
        } else {
            Ok(())
        };
        for id in ids {
            push(
                id,
                r.as_ref()
                    .copied()
                    .map_err(|e| ProviderError::Other(e.to_string())),
            );
        }
        for d in &databases {
            let r = if remove {
                rds::delete(&c, &d.id, run_id).await.map(|_| ())
            } else {
                Ok(())
            };
            push(format!("rds instance {} ({})", d.id, d.status), r);
        }
        // After the instances: Aurora deletes no cluster that still has one.
        for cl in &clusters {
            let r = if remove {
                aurora::delete(&c, &cl.id, run_id).await.map(|_| ())
            } else {
                Ok(())
            };
            push(format!("aurora cluster {} ({})", cl.id, cl.status), r);
        }
        for (b, _) in &buckets {
            let r = if remove {
                s3::delete(&c, b, run_id, false).await.map(|_| ())
            } else {
                Ok(())
            };
            push(format!("s3 bucket {b}"), r);
        }
        for g in &groups {
            let r = if remove {
                ec2::delete_group(&c, g, run_id).await.map(|_| ())
            } else {
                Ok(())
            };
            push(format!("security group {}", g.id), r);
        }
        if remove {
            self.groups.lock().await.remove(run_id);
        }
        Ok(found)
    }

    async fn probe(
        &self,
        run: &RunInfo,
        req: ProbeRequest<'_>,
    ) -> Result<ProbeOutcome, ProviderError> {
        let url = match req.probe {
            Probe::Sql { database, .. } => {
                return Ok(if self.settings.runner_in_vpc {
                    ProbeOutcome::Local
                } else {
                    ProbeOutcome::Skipped(format!(
                        "skipped: not run, the runner cannot reach database.{database}'s private endpoint; set providers.aws.runner_in_vpc: true when dryrun runs inside the VPC, or check through a command check on the instance"
                    ))
                });
            }
            Probe::Http { url, .. } => Some(url.as_str()),
            Probe::Command { .. } => None,
        };
        let Some(target) = Self::instance_for(req.records, url) else {
            return Ok(ProbeOutcome::Skipped(
                "skipped: this run has no service instance to run the check on through SSM".into(),
            ));
        };
        let instance = target.data.get("instance_id").cloned().unwrap_or_default();
        let c = self.clients_for(target);
        let cancel = CancellationToken::new();
        let comment = format!("dryrun {} check {}", run.run_id, req.check);
        match req.probe {
            Probe::Http {
                method,
                url,
                headers,
                body,
            } => {
                let mut cmd = format!(
                    "body=$(mktemp); code=$(curl -sS -o \"$body\" -w '%{{http_code}}' --max-time {} -X {}",
                    req.timeout.as_secs().max(1),
                    ssm::quote(method)
                );
                for (k, v) in headers {
                    cmd.push_str(&format!(" -H {}", ssm::quote(&format!("{k}: {v}"))));
                }
                if let Some(b) = body {
                    cmd.push_str(&format!(" --data-binary {}", ssm::quote(b)));
                }
                cmd.push_str(&format!(
                    " {}); rc=$?; echo \"{HTTP_MARKER}$code curl_exit=$rc\"; cat \"$body\"; rm -f \"$body\"; exit $rc",
                    ssm::quote(url)
                ));
                let inv = ssm::run(&c, &instance, &comment, &cmd, req.timeout, &cancel).await?;
                http_outcome(&inv, &instance, &format!("{method} {url}"))
            }
            Probe::Command { run: script } => {
                let inv = ssm::run(&c, &instance, &comment, script, req.timeout, &cancel).await?;
                command_outcome(&inv, &instance, req.timeout)
            }
            Probe::Sql { .. } => Ok(ProbeOutcome::Local),
        }
    }

    async fn fetch_release(
        &self,
        reference: &str,
        dir: &Path,
    ) -> Result<Option<PathBuf>, ProviderError> {
        let Some((bucket, key)) = names::parse_s3_url(reference) else {
            return Ok(None);
        };
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(reference.as_bytes());
        let base = key.rsplit('/').next().unwrap_or("release.tar.gz");
        let dest = dir.join(format!("{}-{base}", hex::encode(&digest[..6])));
        s3::download(&self.clients(), &bucket, &key, &dest).await?;
        Ok(Some(dest))
    }

    async fn tagged_runs(&self) -> Result<Vec<TaggedRun>, ProviderError> {
        let c = self.clients();
        let mut all: Vec<Vec<(String, String)>> = Vec::new();
        all.extend(
            ec2::tagged(&c, None, None)
                .await?
                .into_iter()
                .map(|i| i.tags),
        );
        all.extend(rds::tagged(&c, None).await?.into_iter().map(|i| i.tags));
        all.extend(aurora::tagged(&c, None).await?.into_iter().map(|i| i.tags));
        all.extend(s3::tagged(&c, None).await?.into_iter().map(|(_, t)| t));
        all.extend(
            ec2::groups(&c, None, None)
                .await?
                .into_iter()
                .map(|g| g.tags),
        );
        let mut runs: BTreeMap<String, TaggedRun> = BTreeMap::new();
        for tags in all {
            let get =
                |k: &str| names::tag_value(tags.iter().map(|(a, b)| (a.as_str(), b.as_str())), k);
            let Some(run_id) = get(TAG_RUN) else { continue };
            let entry = runs.entry(run_id.to_string()).or_insert_with(|| TaggedRun {
                run_id: run_id.to_string(),
                blueprint: None,
                expires_at: None,
            });
            if entry.blueprint.is_none() {
                entry.blueprint = get(TAG_BLUEPRINT).map(ToString::to_string);
            }
            if let Some(e) = get(TAG_EXPIRES).and_then(|t| DateTime::parse_from_rfc3339(t).ok()) {
                let e = e.with_timezone(&Utc);
                entry.expires_at = Some(entry.expires_at.map_or(e, |x| x.min(e)));
            }
        }
        Ok(runs.into_values().collect())
    }

    async fn doctor(&self, bp: Option<&Blueprint>) -> Vec<crate::doctor::Finding> {
        self.doctor_checks(bp).await
    }

    async fn describe_sources(
        &self,
        databases: &[String],
        buckets: &[String],
    ) -> Result<crate::init::Sources, ProviderError> {
        self.describe(databases, buckets).await
    }

    async fn describe_target(&self) -> Result<Option<String>, ProviderError> {
        let who = self
            .clients()
            .sts
            .get_caller_identity()
            .send()
            .await
            .map_err(names::api("read the account id (sts:GetCallerIdentity)"))?;
        let mut line = format!(
            "aws: region {}, account {}",
            self.region,
            who.account().unwrap_or("?")
        );
        if let Some(e) = &self.conn.endpoint {
            line.push_str(&format!(", endpoint {e}"));
        }
        Ok(Some(line))
    }

    fn held_secrets(&self) -> Vec<Secret> {
        self.held.clone()
    }

    async fn egress(&self, run_id: &str) -> Option<(crate::firewall::FirewallReport, Vec<String>)> {
        let group = self.groups.lock().await.get(run_id).cloned()?;
        let mode = self.firewall.mode;
        let report = if mode == crate::firewall::Mode::Off {
            crate::firewall::FirewallReport {
                mode,
                enforced: false,
                how: format!(
                    "off (the blueprint's `firewall: off`): security group {group} keeps AWS's open egress"
                ),
                allowed: Vec::new(),
            }
        } else {
            let mut allowed = vec![
                "the group's members".to_string(),
                "0.0.0.0/0:443 (SSM and S3 endpoints)".to_string(),
            ];
            allowed.extend(self.firewall.allow.iter().cloned());
            crate::firewall::FirewallReport {
                mode,
                enforced: true,
                how: format!(
                    "security group {group}: egress only to its members, HTTPS and the allowed addresses (attempts are not recorded on AWS)"
                ),
                allowed,
            }
        };
        Some((report, Vec::new()))
    }

    fn api_calls(&self) -> BTreeMap<String, u64> {
        self.conn.calls()
    }

    async fn billed(
        &self,
        bp: &Blueprint,
    ) -> Result<Option<(String, Vec<(String, crate::cost::Unit)>)>, ProviderError> {
        use crate::cost::Unit;
        let c = self.clients();
        let mut units = Vec::new();
        for r in &bp.resources {
            let address = r.address();
            let unit = match &r.spec {
                ResourceSpec::Database(d) if d.engine.is_aurora() => {
                    let source = aurora::describe(&c, &d.source).await?;
                    Unit::Aurora {
                        engine: d.engine.as_str().to_string(),
                        class: aurora::writer_class(
                            &c,
                            source.as_ref(),
                            self.settings.db_instance_class.as_deref(),
                        )
                        .await,
                    }
                }
                ResourceSpec::Database(d) => {
                    let source = self.source(&d.source).await?.ok_or_else(|| {
                        ProviderError::Other(format!(
                            "{address}: production instance {} not found in {} (its class and storage are what the copy takes)",
                            d.source, self.region
                        ))
                    })?;
                    Unit::Rds {
                        engine: d.engine.as_str().to_string(),
                        class: self
                            .settings
                            .db_instance_class
                            .clone()
                            .or(source.class)
                            .unwrap_or_else(|| "unknown".into()),
                        storage_gb: source.storage_gb.unwrap_or(0),
                    }
                }
                ResourceSpec::Bucket(b) => {
                    let (objects, bytes) = s3::measure(&c, &b.source, b.prefix.as_deref()).await?;
                    Unit::S3Copy { objects, bytes }
                }
                ResourceSpec::Service(s) => Unit::Ec2 {
                    instance_type: s
                        .aws
                        .as_ref()
                        .map_or_else(|| "t3.micro".into(), |a| a.instance_type.clone()),
                    volume_gb: ROOT_VOLUME_GB,
                },
            };
            units.push((address, unit));
        }
        Ok(Some((self.region.clone(), units)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(runner_in_vpc: bool) -> AwsProvider {
        let text = format!(
            "name: t\nproviders:\n  aws:\n    region: eu-west-1\n    runner_in_vpc: {runner_in_vpc}\nresources:\n  db:\n    type: database\n    engine: postgres\n    source: prod\n"
        );
        let bp = crate::blueprint::compile(Path::new("t.yaml"), &text, &BTreeMap::new()).unwrap();
        // The endpoint is never contacted: probes of sql checks and of runs without instances
        // are decided without a request.
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(AwsProvider::connect(
            Some(&bp),
            Some("http://127.0.0.1:9".into()),
        ))
        .unwrap()
    }

    fn invocation(status: &str, exit_code: i32, stdout: &str, stderr: &str) -> ssm::Invocation {
        ssm::Invocation {
            command_id: "c-1".into(),
            status: status.into(),
            exit_code,
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn a_copy_that_does_not_answer_fails_the_check_a_script_that_did_not_run_is_an_error() {
        let answered = invocation(
            "Success",
            0,
            &format!("{HTTP_MARKER}503 curl_exit=0\nbusy"),
            "",
        );
        assert_eq!(
            http_outcome(&answered, "i-1", "GET http://10.0.0.5/").unwrap(),
            ProbeOutcome::Remote {
                answer: ProbeAnswer::Http {
                    status: 503,
                    body: "busy".into()
                },
                via: "SSM command c-1 on i-1".into()
            }
        );
        let refused = invocation(
            "Failed",
            7,
            &format!("{HTTP_MARKER}000 curl_exit=7\n"),
            "curl: (7) Failed to connect to 10.0.0.5 port 8080: Connection refused",
        );
        match http_outcome(&refused, "i-1", "GET http://10.0.0.5:8080/").unwrap() {
            ProbeOutcome::Failed { message, via } => {
                assert!(
                    message.contains("curl exit code 7") && message.contains("Connection refused"),
                    "{message}"
                );
                assert_eq!(via, "SSM command c-1 on i-1");
            }
            other => panic!("{other:?}"),
        }
        let not_run = http_outcome(&invocation("Success", 0, "", ""), "i-1", "GET /").unwrap_err();
        assert_eq!(not_run.blame(), crate::provider::Blame::Environment);
        assert!(
            not_run.to_string().contains("printed no result"),
            "{not_run}"
        );

        let hung = command_outcome(
            &invocation("TimedOut", -1, "", ""),
            "i-1",
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(
            matches!(&hung, ProbeOutcome::Failed { message, .. } if message == "command did not finish within 30s"),
            "{hung:?}"
        );
        // SSM lets a command run at least 30 s, whatever the check's timeout.
        let hung_short = command_outcome(
            &invocation("TimedOut", -1, "", ""),
            "i-1",
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(
            matches!(&hung_short, ProbeOutcome::Failed { message, .. } if message == "command did not finish within 30s"),
            "{hung_short:?}"
        );
        let exited = command_outcome(
            &invocation("Failed", 3, "out", "err"),
            "i-1",
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(matches!(
            exited,
            ProbeOutcome::Remote {
                answer: ProbeAnswer::Command {
                    exit_code: Some(3),
                    ..
                },
                ..
            }
        ));
        let undelivered = command_outcome(
            &invocation("Undeliverable", -1, "", ""),
            "i-1",
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(
            undelivered.to_string().contains("ended `Undeliverable`"),
            "{undelivered}"
        );
    }

    #[test]
    fn sql_checks_are_skipped_unless_the_runner_is_in_the_vpc() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let run = RunInfo {
            run_id: "t-1".into(),
            blueprint: "t".into(),
            expires_at: Utc::now(),
            log_dir: PathBuf::from("/nonexistent"),
            redactor: crate::secret::Redactor::new(),
            release: None,
        };
        let sql = Probe::Sql {
            database: "db".into(),
            query: "select 1".into(),
        };
        let req = |p: &'static Probe| ProbeRequest {
            check: "c",
            probe: p,
            records: &[],
            timeout: Duration::from_secs(5),
        };
        let sql: &'static Probe = Box::leak(Box::new(sql));
        let outside = provider(false);
        assert_eq!(outside.region(), "eu-west-1");
        match rt.block_on(outside.probe(&run, req(sql))).unwrap() {
            ProbeOutcome::Skipped(why) => assert!(why.contains("runner_in_vpc"), "{why}"),
            other => panic!("{other:?}"),
        }
        let inside = provider(true);
        assert_eq!(
            rt.block_on(inside.probe(&run, req(sql))).unwrap(),
            ProbeOutcome::Local
        );
        // An http check with no instance to run on is skipped, never sent to the private URL.
        let http: &'static Probe = Box::leak(Box::new(Probe::Http {
            method: "GET".into(),
            url: "http://10.0.0.5:8080/".into(),
            headers: Vec::new(),
            body: None,
        }));
        assert!(matches!(
            rt.block_on(outside.probe(&run, req(http))).unwrap(),
            ProbeOutcome::Skipped(_)
        ));
    }

    #[test]
    fn http_result_is_parsed_from_the_marker_line() {
        assert_eq!(
            parse_http("__dryrun_http_status=200 curl_exit=0\n{\"ok\":true}"),
            Some((200, "{\"ok\":true}".into()))
        );
        assert_eq!(parse_http(""), None);
    }

    /// The env file the user data writes, decoded.
    fn env_of(user_data: &str) -> String {
        let b64 = user_data
            .lines()
            .find_map(|l| l.strip_prefix("printf '%s' '"))
            .and_then(|l| l.split('\'').next())
            .unwrap();
        use base64::Engine as _;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    }

    fn render_with_env(env: BTreeMap<String, String>) -> String {
        let rel = tempfile::tempdir().unwrap();
        std::fs::write(rel.path().join("dryrun-release.yaml"), "version: \"1\"\n").unwrap();
        let release = crate::release::Release::load(rel.path().to_str().unwrap()).unwrap();
        let run = RunInfo {
            run_id: "shop-1".into(),
            blueprint: "shop".into(),
            expires_at: Utc::now(),
            log_dir: rel.path().into(),
            redactor: crate::secret::Redactor::new(),
            release: None,
        };
        let record = ResourceRecord {
            address: "service.app".into(),
            kind: ResourceKind::Service,
            id: "t".into(),
            data: BTreeMap::new(),
        };
        let spec = crate::blueprint::ServiceSpec {
            env: BTreeMap::new(),
            start: None,
            ready_timeout: Duration::from_secs(60),
            aws: None,
        };
        let policy = crate::firewall::Policy::default();
        let req = InstallRequest {
            record: &record,
            spec: &spec,
            release: &release,
            env,
            start: None,
            ready_timeout: Duration::from_secs(60),
            cancel: CancellationToken::new(),
            firewall: &policy,
            reachable: Vec::new(),
        };
        AwsProvider::install_script(&req, &run, 8080, 60).unwrap()
    }

    #[test]
    fn an_env_value_cannot_end_the_env_file_and_run_code() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pwned");
        let m = marker.display();
        let evil = format!("x\nDRYRUN_ENV\ntouch {m}\n'; touch {m}; '\n$(touch {m})\n`touch {m}`");
        let text = render_with_env(BTreeMap::from([("EVIL".to_string(), evil.clone())]));
        assert!(
            !text.contains("touch"),
            "a value reached the script as text:\n{text}"
        );
        // Run the line that writes the env file, for real, then source the file.
        let line = text
            .lines()
            .find(|l| l.contains("base64 -d"))
            .unwrap()
            .replace(
                "/opt/dryrun/env",
                &dir.path().join("env").display().to_string(),
            );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "failed() {{ exit 9; }}\n{line}\n. {}/env\nprintf '%s' \"$EVIL\"",
                dir.path().display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), evil);
        assert!(!marker.exists(), "a value ran code");
    }

    #[test]
    fn boot_user_data_fetches_the_release_and_the_install_gets_quoted_env_and_steps() {
        let rel = tempfile::tempdir().unwrap();
        std::fs::write(
            rel.path().join("dryrun-release.yaml"),
            "version: \"2.0\"\ninstall:\n  - name: migrate\n    run: ./migrate 'x'\nstart: ./serve\n",
        )
        .unwrap();
        let release = crate::release::Release::load(rel.path().to_str().unwrap()).unwrap();
        let run = RunInfo {
            run_id: "shop-1".into(),
            blueprint: "shop".into(),
            expires_at: Utc::now(),
            log_dir: rel.path().into(),
            redactor: crate::secret::Redactor::new(),
            release: None,
        };
        let record = ResourceRecord {
            address: "service.app".into(),
            kind: ResourceKind::Service,
            id: "t".into(),
            data: BTreeMap::new(),
        };
        let spec = crate::blueprint::ServiceSpec {
            env: BTreeMap::new(),
            start: None,
            ready_timeout: Duration::from_secs(60),
            aws: None,
        };
        let policy = crate::firewall::Policy::default();
        let req = InstallRequest {
            record: &record,
            spec: &spec,
            release: &release,
            env: BTreeMap::from([(
                "DATABASE_URL".to_string(),
                "postgres://u:p'w@h/db".to_string(),
            )]),
            start: None,
            ready_timeout: Duration::from_secs(60),
            cancel: CancellationToken::new(),
            firewall: &policy,
            reachable: Vec::new(),
        };
        let boot = AwsProvider::boot_user_data(
            &run,
            "service.app",
            &release,
            DEFAULT_USER_DATA,
            "http://x/r?a=1&b=2",
            8080,
        )
        .unwrap();
        assert!(boot.starts_with("#!/bin/sh\n"), "{boot}");
        assert!(boot.contains("'http://x/r?a=1&b=2'"), "{boot}");
        assert!(boot.contains("/var/lib/dryrun/fetched"), "{boot}");
        let text = AwsProvider::install_script(&req, &run, 8080, 60).unwrap();
        let env = env_of(&text);
        assert!(
            env.contains(r"export DATABASE_URL='postgres://u:p'\''w@h/db'"),
            "{env}"
        );
        assert!(text.contains("echo \"dryrun-running: migrate\"\ntimeout 600 sh -c './migrate '\\''x'\\''' > /var/log/dryrun/step-migrate.log 2>&1 || failed migrate $?"), "{text}");
        assert!(text.contains("nohup setsid sh -c './serve'"), "{text}");
        // The boot knows nothing of the database: it runs before the copy exists.
        assert!(
            !boot.contains("DATABASE_URL") && !boot.contains("base64"),
            "{boot}"
        );
        // A custom template that asks for the env fails to render, naming it.
        let err = AwsProvider::boot_user_data(
            &run,
            "service.app",
            &release,
            "{{env_b64}}",
            "http://x/r",
            8080,
        )
        .unwrap_err();
        assert!(err.to_string().contains("env_b64"), "{err}");
    }
}
