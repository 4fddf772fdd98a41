//! database (`engine: aurora-postgresql` / `aurora-mysql`) → an Aurora clone: the production
//! cluster is cloned copy-on-write (`RestoreDBClusterToPointInTime`, `RestoreType=copy-on-write`,
//! at its latest restorable time) into a cluster named from the run id, private, in the run's
//! security group, tagged at creation; one writer instance is added to it; then it gets a fresh
//! master password. A clone shares the production cluster's storage pages until either side
//! writes, so it is ready in minutes whatever the size, where a snapshot restore copies
//! everything. A time from `--backup` restores to that point instead, which Aurora can only do
//! as a full copy (slower; the report says so).
//!
//! Teardown deletes the instance, then the cluster (Aurora refuses to delete a cluster that
//! still has instances). Both pass the same ownership proof as RDS instances
//! ([`names::owned`]); deletion protection is never turned off.

use std::time::Duration;

use aws_sdk_rds::types::{DbCluster, Tag};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::clients::Clients;
use super::names::{self, TAG_RUN, api, sdk_message};
use super::rds;
use super::wait::{self, Pace, Poll};
use crate::provider::{BackupInfo, BackupPick, Deleted, ProviderError};

/// Longest wait for the new master password to be applied.
const MODIFY_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The writer's class when neither `providers.aws.db_instance_class` nor the production
/// cluster's own writer says (the smallest class both Aurora engines accept).
const DEFAULT_CLASS: &str = "db.t4g.medium";

/// The class of a clone's writer: `class` (the blueprint's), else the production cluster's
/// first member's, else [`DEFAULT_CLASS`]. Reads only.
pub async fn writer_class(c: &Clients, source: Option<&Cluster>, class: Option<&str>) -> String {
    if let Some(cl) = class {
        return cl.to_string();
    }
    match source.and_then(|s| s.members.first()) {
        Some(m) => c
            .rds
            .describe_db_instances()
            .db_instance_identifier(m)
            .send()
            .await
            .ok()
            .and_then(|o| {
                o.db_instances()
                    .first()
                    .and_then(|i| i.db_instance_class().map(ToString::to_string))
            })
            .unwrap_or_else(|| DEFAULT_CLASS.into()),
        None => DEFAULT_CLASS.into(),
    }
}

/// What a described cluster looks like to the provider.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Identifier.
    pub id: String,
    /// `aurora-postgresql` or `aurora-mysql`.
    pub engine: String,
    /// `available`, `creating`, `deleting`, ...
    pub status: String,
    /// Writer endpoint and port, once known.
    pub endpoint: Option<(String, u16)>,
    /// Master user name.
    pub master_user: Option<String>,
    /// Instances in it.
    pub members: Vec<String>,
    /// DB subnet group name.
    pub subnet_group: Option<String>,
    /// The run tag, if any.
    pub run_tag: Option<String>,
    /// All tags.
    pub tags: Vec<(String, String)>,
    /// Whether deletion protection is on.
    pub deletion_protection: bool,
    /// Whether a new master password is still pending.
    pub password_pending: bool,
    /// The restorable window (earliest, latest).
    pub restorable: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    /// Allocated storage in bytes, when reported.
    pub size_bytes: Option<u64>,
    /// ARN.
    pub arn: String,
    /// When it was created.
    pub created: Option<DateTime<Utc>>,
}

impl Cluster {
    fn from_sdk(d: &DbCluster) -> Cluster {
        let tags = rds::tag_pairs(d.tag_list());
        let engine = d.engine().unwrap_or_default().to_string();
        let default_port = if engine.contains("mysql") { 3306 } else { 5432 };
        Cluster {
            id: d.db_cluster_identifier().unwrap_or_default().to_string(),
            status: d.status().unwrap_or("unknown").to_string(),
            endpoint: d.endpoint().map(|e| {
                (
                    e.to_string(),
                    d.port()
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(default_port),
                )
            }),
            engine,
            master_user: d.master_username().map(ToString::to_string),
            members: d
                .db_cluster_members()
                .iter()
                .filter_map(|m| m.db_instance_identifier().map(ToString::to_string))
                .collect(),
            subnet_group: d.db_subnet_group().map(ToString::to_string),
            run_tag: names::tag_value(tags.iter().map(|(k, v)| (k.as_str(), v.as_str())), TAG_RUN)
                .map(ToString::to_string),
            deletion_protection: d.deletion_protection().unwrap_or(false),
            password_pending: d
                .pending_modified_values()
                .and_then(|p| p.master_user_password())
                .is_some(),
            restorable: (
                d.earliest_restorable_time().and_then(names::time_of),
                d.latest_restorable_time().and_then(names::time_of),
            ),
            size_bytes: d
                .allocated_storage()
                .and_then(|g| u64::try_from(g).ok())
                .map(|g| g << 30),
            arn: d.db_cluster_arn().unwrap_or_default().to_string(),
            created: d.cluster_create_time().and_then(names::time_of),
            tags,
        }
    }

    /// The ownership proof ([`names::owned`]) for this cluster and run.
    ///
    /// # Errors
    /// [`ProviderError::Guard`].
    pub fn owned_by(&self, run_id: &str) -> Result<(), ProviderError> {
        names::owned(
            &format!("aurora cluster {}", self.id),
            &self.id,
            run_id,
            &self.tags,
            self.created,
        )
    }
}

/// Describes one cluster; `None` when it does not exist.
///
/// # Errors
/// API errors other than "not found".
pub async fn describe(c: &Clients, id: &str) -> Result<Option<Cluster>, ProviderError> {
    match c.rds.describe_db_clusters().db_cluster_identifier(id).send().await {
        Ok(out) => Ok(out.db_clusters().first().map(Cluster::from_sdk)),
        Err(e)
            if e.as_service_error().is_some_and(
                aws_sdk_rds::operation::describe_db_clusters::DescribeDBClustersError::is_db_cluster_not_found_fault,
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(ProviderError::Other(format!(
            "describe aurora cluster {id}: {}",
            sdk_message(&e)
        ))),
    }
}

/// Every cluster in the region that carries a run tag (`run_id` given: that run's only).
///
/// # Errors
/// API errors.
pub async fn tagged(c: &Clients, run_id: Option<&str>) -> Result<Vec<Cluster>, ProviderError> {
    let mut pages = c.rds.describe_db_clusters().into_paginator().send();
    let mut out = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(api("list aurora clusters"))?;
        for d in page.db_clusters() {
            let cl = Cluster::from_sdk(d);
            if let Some(tag) = &cl.run_tag
                && run_id.is_none_or(|r| r == tag)
            {
                out.push(cl);
            }
        }
    }
    Ok(out)
}

/// The point to clone the production cluster `source` at: its latest restorable time (the
/// backup id says `latest`), or the time `pick` names within its restorable window. Reads only.
///
/// # Errors
/// [`ProviderError::NoBackup`] naming what is wrong (no such cluster, another engine, a time
/// outside the window, a snapshot id); API errors.
pub async fn find_point(
    c: &Clients,
    source: &str,
    engine: &str,
    pick: &BackupPick,
) -> Result<BackupInfo, ProviderError> {
    let Some(cl) = describe(c, source).await? else {
        return Err(ProviderError::NoBackup(format!(
            "no aurora cluster `{source}` in {} (engine: {engine} clones a cluster; for an RDS instance use engine: postgres, mysql or mariadb)",
            c.region
        )));
    };
    if cl.engine != engine {
        return Err(ProviderError::NoBackup(format!(
            "aurora cluster `{source}` runs {}, not {engine}: set `engine: {}` in the blueprint",
            cl.engine, cl.engine
        )));
    }
    let (earliest, latest) = cl.restorable;
    let window = || {
        format!(
            "its restorable window is {} to {}",
            earliest.map_or_else(|| "?".into(), |t| t.to_rfc3339()),
            latest.map_or_else(|| "?".into(), |t| t.to_rfc3339())
        )
    };
    let (id, taken_at) = match pick {
        BackupPick::Latest => (
            "latest".to_string(),
            latest.or(cl.created).unwrap_or_else(Utc::now),
        ),
        BackupPick::Before(t) => {
            if earliest.is_some_and(|e| *t < e) || latest.is_some_and(|l| *t > l) {
                return Err(ProviderError::NoBackup(format!(
                    "aurora cluster `{source}` cannot be restored to {}: {}",
                    t.to_rfc3339(),
                    window()
                )));
            }
            (t.to_rfc3339(), *t)
        }
        BackupPick::Id(id) => {
            return Err(ProviderError::NoBackup(format!(
                "`--backup {id}`: an Aurora copy is a clone of the live cluster `{source}`, not a snapshot; use `--backup latest` (a copy-on-write clone) or an RFC 3339 time to restore to that point (a full copy, slower); {}",
                window()
            )));
        }
    };
    Ok(BackupInfo {
        id,
        source: source.to_string(),
        taken_at,
        size_bytes: cl.size_bytes,
        location: cl.arn,
    })
}

/// What a clone needs.
#[derive(Debug)]
pub struct CloneRequest<'a> {
    /// New cluster identifier.
    pub id: &'a str,
    /// Its writer instance's identifier.
    pub instance: &'a str,
    /// Production cluster.
    pub source: &'a str,
    /// `aurora-postgresql` / `aurora-mysql`.
    pub engine: &'a str,
    /// `None`: copy-on-write at the latest restorable time; a time: a full copy to it.
    pub to_time: Option<DateTime<Utc>>,
    /// The run's security group.
    pub security_group: &'a str,
    /// DB subnet group (None: the production cluster's).
    pub subnet_group: Option<&'a str>,
    /// Writer class (None: production's writer's, else [`DEFAULT_CLASS`]).
    pub class: Option<&'a str>,
    /// Tags at creation.
    pub tags: &'a [(String, String)],
    /// Run id (the guard).
    pub run_id: &'a str,
    /// Longest wait for each of cluster and instance to be `available`.
    pub timeout: Duration,
}

/// Clones the cluster, adds the writer and waits until both are available. A retried clone
/// whose cluster or instance already exists adopts it if it passes the ownership proof.
/// Returns the cluster.
///
/// # Errors
/// API errors, the guard, a timeout naming the last state.
pub async fn clone(
    c: &Clients,
    r: &CloneRequest<'_>,
    cancel: &CancellationToken,
) -> Result<Cluster, ProviderError> {
    let tags: Vec<Tag> = r
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let source = describe(c, r.source).await?;
    let subnet_group = r
        .subnet_group
        .map(ToString::to_string)
        .or_else(|| source.as_ref().and_then(|s| s.subnet_group.clone()))
        .filter(|g| !g.is_empty());
    let restore = c
        .rds
        .restore_db_cluster_to_point_in_time()
        .db_cluster_identifier(r.id)
        .source_db_cluster_identifier(r.source)
        .vpc_security_group_ids(r.security_group)
        .deletion_protection(false)
        .copy_tags_to_snapshot(false)
        .set_db_subnet_group_name(subnet_group)
        .set_tags(Some(tags.clone()));
    let restore = match r.to_time {
        None => restore
            .restore_type("copy-on-write")
            .use_latest_restorable_time(true),
        Some(t) => restore
            .restore_type("full-copy")
            .restore_to_time(aws_sdk_rds::primitives::DateTime::from_secs(t.timestamp())),
    };
    if let Err(e) = restore.send().await {
        let exists = e.as_service_error().is_some_and(
            aws_sdk_rds::operation::restore_db_cluster_to_point_in_time::RestoreDBClusterToPointInTimeError::is_db_cluster_already_exists_fault,
        );
        if !exists {
            return Err(ProviderError::Other(format!(
                "clone of aurora cluster {} into {} failed: {}",
                r.source,
                r.id,
                sdk_message(&e)
            )));
        }
        match describe(c, r.id).await? {
            Some(found) => found.owned_by(r.run_id)?,
            None => names::guard(&format!("aurora cluster {}", r.id), r.run_id, None)?,
        }
    }
    wait_available(c, r.id, r.timeout, cancel, false).await?;

    // The writer: production's class unless the blueprint says otherwise.
    let class = writer_class(c, source.as_ref(), r.class).await;
    let sent = c
        .rds
        .create_db_instance()
        .db_instance_identifier(r.instance)
        .db_cluster_identifier(r.id)
        .engine(r.engine)
        .db_instance_class(&class)
        .publicly_accessible(false)
        .set_tags(Some(tags))
        .send()
        .await;
    if let Err(e) = sent {
        let exists = e.as_service_error().is_some_and(
            aws_sdk_rds::operation::create_db_instance::CreateDBInstanceError::is_db_instance_already_exists_fault,
        );
        if !exists {
            return Err(ProviderError::Other(format!(
                "add writer instance {} to aurora cluster {} failed: {}",
                r.instance,
                r.id,
                sdk_message(&e)
            )));
        }
        match rds::describe(c, r.instance).await? {
            Some(found) => found.owned_by(r.run_id)?,
            None => names::guard(&format!("rds instance {}", r.instance), r.run_id, None)?,
        }
    }
    rds::wait_available(c, r.instance, r.timeout, cancel, false).await?;
    wait_available(c, r.id, r.timeout, cancel, false).await
}

/// Waits until the cluster is `available` (and, with `password`, the new master password is
/// no longer pending).
///
/// # Errors
/// Timeout naming the last state; the cluster vanishing; API errors.
pub async fn wait_available(
    c: &Clients,
    id: &str,
    max: Duration,
    cancel: &CancellationToken,
    password: bool,
) -> Result<Cluster, ProviderError> {
    let what = if password {
        format!("aurora cluster {id} to apply its new master password")
    } else {
        format!("aurora cluster {id} to become available")
    };
    wait::until(&what, max, Pace::SLOW, Some(cancel), || async {
        match describe(c, id).await? {
            None => Err(ProviderError::Other(format!(
                "aurora cluster {id} disappeared while it was being cloned"
            ))),
            Some(cl) if cl.status == "available" && !(password && cl.password_pending) => {
                Ok(Poll::Done(cl))
            }
            Some(cl)
                if matches!(
                    cl.status.as_str(),
                    "failed" | "incompatible-restore" | "incompatible-parameters" | "inaccessible-encryption-credentials"
                ) =>
            {
                Err(ProviderError::Other(format!(
                    "aurora cluster {id} is `{}`: the clone cannot finish; see the RDS events of the cluster",
                    cl.status
                )))
            }
            Some(cl) => Ok(Poll::Pending(cl.status)),
        }
    })
    .await
}

/// Sets a new master password on a cluster of this run and waits until it is applied.
///
/// # Errors
/// The guard, API errors, a timeout.
pub async fn set_password(
    c: &Clients,
    cl: &Cluster,
    run_id: &str,
    password: &crate::secret::Secret,
    cancel: &CancellationToken,
) -> Result<Cluster, ProviderError> {
    cl.owned_by(run_id)?;
    c.rds
        .modify_db_cluster()
        .db_cluster_identifier(&cl.id)
        .master_user_password(password.expose())
        .apply_immediately(true)
        .send()
        .await
        .map_err(api(format!(
            "set a fresh master password on aurora cluster {}",
            cl.id
        )))?;
    wait_available(c, &cl.id, MODIFY_TIMEOUT, cancel, true).await
}

impl rds::Copy for Cluster {
    fn status(&self) -> &str {
        &self.status
    }
    fn protected(&self) -> bool {
        self.deletion_protection
    }
    fn owned_by(&self, run_id: &str) -> Result<(), ProviderError> {
        Cluster::owned_by(self, run_id)
    }
}

/// Deletes a cluster of this run and its instances: each instance that passes the ownership
/// proof first ([`rds::delete`]), then the cluster, without a final snapshot
/// ([`rds::delete_until_gone`]); waits until it is gone. A cluster with an instance that is not
/// this run's (someone added one), or with deletion protection on, is refused and stays.
///
/// # Errors
/// The guard, deletion protection, API errors, a timeout naming the last state.
pub async fn delete(c: &Clients, id: &str, run_id: &str) -> Result<Deleted, ProviderError> {
    if let Some(cl) = describe(c, id).await? {
        // Proven, and not protected, before its instances are touched.
        cl.owned_by(run_id)?;
        if cl.deletion_protection {
            return Err(rds::protected(&format!("aurora cluster {id}"), run_id));
        }
        for m in &cl.members {
            rds::delete(c, m, run_id).await?;
        }
    }
    rds::delete_until_gone(
        &format!("aurora cluster {id}"),
        run_id,
        || describe(c, id),
        || async {
            match c
                .rds
                .delete_db_cluster()
                .db_cluster_identifier(id)
                .skip_final_snapshot(true)
                .send()
                .await
            {
                Ok(_) => Ok(rds::Sent::Accepted),
                Err(e) if e.as_service_error().is_some_and(aws_sdk_rds::operation::delete_db_cluster::DeleteDBClusterError::is_db_cluster_not_found_fault) => Ok(rds::Sent::Gone),
                // Instances still deleting, or the cluster busy: accepted later.
                Err(e) if e.as_service_error().is_some_and(aws_sdk_rds::operation::delete_db_cluster::DeleteDBClusterError::is_invalid_db_cluster_state_fault) => Ok(rds::Sent::NotYet),
                Err(e) => Err(ProviderError::Other(format!(
                    "delete aurora cluster {id}: {}",
                    sdk_message(&e)
                ))),
            }
        },
    )
    .await
}
