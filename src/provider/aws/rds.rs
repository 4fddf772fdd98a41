//! database → RDS: the latest available snapshot of the production instance is restored into
//! an instance named from the run id, private, in the run's security group, tagged at creation;
//! then it gets a fresh master password so that production credentials do not open the copy.

use std::time::Duration;

use aws_sdk_rds::types::{DbInstance, Tag};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::clients::Clients;
use super::names::{self, TAG_RUN, api, guard, sdk_message};
use super::wait::{self, Pace, Poll};
use crate::provider::{BackupInfo, BackupPick, Deleted, ProviderError};

/// Longest wait for a restored instance to be deleted.
const DELETE_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// Longest wait for the new master password to be applied.
const MODIFY_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// What a described instance looks like to the provider.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Identifier.
    pub id: String,
    /// `available`, `creating`, `deleting`, ...
    pub status: String,
    /// Endpoint address and port, once known.
    pub endpoint: Option<(String, u16)>,
    /// Master user name.
    pub master_user: Option<String>,
    /// The run tag, if any.
    pub run_tag: Option<String>,
    /// All tags.
    pub tags: Vec<(String, String)>,
    /// DB subnet group name and its VPC.
    pub subnet_group: Option<(String, Option<String>)>,
    /// Whether deletion protection is on.
    pub deletion_protection: bool,
    /// Whether a new master password is still pending.
    pub password_pending: bool,
    /// Whether the instance is publicly accessible (None: the API did not say).
    pub public: Option<bool>,
    /// When it was created, as RDS reports it.
    pub created: Option<DateTime<Utc>>,
    /// Instance class (what a restored copy takes unless the blueprint says otherwise).
    pub class: Option<String>,
    /// Allocated storage, GB.
    pub storage_gb: Option<u64>,
}

impl Instance {
    /// The ownership proof ([`names::owned`]) for this instance and run.
    ///
    /// # Errors
    /// [`ProviderError::Guard`].
    pub fn owned_by(&self, run_id: &str) -> Result<(), ProviderError> {
        names::owned(
            &format!("rds instance {}", self.id),
            &self.id,
            run_id,
            &self.tags,
            self.created,
        )
    }
}

impl Instance {
    fn from_sdk(d: &DbInstance) -> Instance {
        let tags = tag_pairs(d.tag_list());
        Instance {
            id: d.db_instance_identifier().unwrap_or_default().to_string(),
            status: d.db_instance_status().unwrap_or("unknown").to_string(),
            endpoint: d.endpoint().and_then(|e| {
                Some((
                    e.address()?.to_string(),
                    u16::try_from(e.port()?).unwrap_or(5432),
                ))
            }),
            master_user: d.master_username().map(ToString::to_string),
            run_tag: names::tag_value(tags.iter().map(|(k, v)| (k.as_str(), v.as_str())), TAG_RUN)
                .map(ToString::to_string),
            subnet_group: d.db_subnet_group().map(|g| {
                (
                    g.db_subnet_group_name().unwrap_or_default().to_string(),
                    g.vpc_id().map(ToString::to_string),
                )
            }),
            deletion_protection: d.deletion_protection().unwrap_or(false),
            password_pending: d
                .pending_modified_values()
                .and_then(|p| p.master_user_password())
                .is_some(),
            public: d.publicly_accessible(),
            created: d.instance_create_time().and_then(names::time_of),
            class: d.db_instance_class().map(ToString::to_string),
            storage_gb: d.allocated_storage().and_then(|g| u64::try_from(g).ok()),
            tags,
        }
    }
}

/// An RDS tag list (instances and clusters alike) as key/value pairs.
pub(super) fn tag_pairs(tags: &[Tag]) -> Vec<(String, String)> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Describes one instance; `None` when it does not exist.
///
/// # Errors
/// API errors other than "not found".
pub async fn describe(c: &Clients, id: &str) -> Result<Option<Instance>, ProviderError> {
    match c.rds.describe_db_instances().db_instance_identifier(id).send().await {
        Ok(out) => Ok(out.db_instances().first().map(Instance::from_sdk)),
        Err(e)
            if e
                .as_service_error()
                .is_some_and(aws_sdk_rds::operation::describe_db_instances::DescribeDBInstancesError::is_db_instance_not_found_fault) =>
        {
            Ok(None)
        }
        Err(e) => Err(ProviderError::Other(format!(
            "describe rds instance {id}: {}",
            sdk_message(&e)
        ))),
    }
}

/// Every instance in the region that carries a run tag (`run_id` given: that run's only).
///
/// # Errors
/// API errors.
pub async fn tagged(c: &Clients, run_id: Option<&str>) -> Result<Vec<Instance>, ProviderError> {
    let mut pages = c.rds.describe_db_instances().into_paginator().send();
    let mut out = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(api("list rds instances"))?;
        for d in page.db_instances() {
            let i = Instance::from_sdk(d);
            if let Some(tag) = &i.run_tag
                && run_id.is_none_or(|r| r == tag)
            {
                out.push(i);
            }
        }
    }
    Ok(out)
}

/// Finds the snapshot to restore: the newest *available* one (automated or manual) of the
/// production instance `source`, or the one `pick` names; its engine must be `engine` (the
/// blueprint's: `postgres`, `mysql` or `mariadb`). Reads only.
///
/// # Errors
/// [`ProviderError::NoBackup`] listing what exists, or naming the engine that differs; API
/// errors.
pub async fn find_snapshot(
    c: &Clients,
    source: &str,
    engine: &str,
    pick: &BackupPick,
) -> Result<BackupInfo, ProviderError> {
    let mut pages = c
        .rds
        .describe_db_snapshots()
        .db_instance_identifier(source)
        .into_paginator()
        .send();
    // (id, taken at, status, size in bytes, ARN, engine)
    type Snap = (String, DateTime<Utc>, String, Option<u64>, String, String);
    let mut snaps: Vec<Snap> = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(api(format!("list snapshots of rds instance {source}")))?;
        for s in page.db_snapshots() {
            let Some(id) = s.db_snapshot_identifier() else {
                continue;
            };
            let Some(t) = s.snapshot_create_time() else {
                continue;
            };
            let Some(taken) = DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()) else {
                continue;
            };
            snaps.push((
                id.to_string(),
                taken,
                s.status().unwrap_or("unknown").to_string(),
                s.allocated_storage()
                    .and_then(|g| u64::try_from(g).ok())
                    .map(|g| g << 30),
                s.db_snapshot_arn().unwrap_or(id).to_string(),
                s.engine().unwrap_or_default().to_string(),
            ));
        }
    }
    snaps.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let available: Vec<_> = snaps.iter().filter(|s| s.2 == "available").collect();
    let chosen = match pick {
        BackupPick::Latest => available.first(),
        BackupPick::Id(want) => available.iter().find(|s| &s.0 == want),
        BackupPick::Before(t) => available.iter().find(|s| s.1 <= *t),
    };
    if let Some((id, taken, _, size, arn, snap_engine)) = chosen.copied() {
        // A blueprint that says mysql for a PostgreSQL instance would give the release a URL
        // of the wrong kind: say so before anything is restored.
        if !snap_engine.is_empty() && snap_engine != engine {
            return Err(ProviderError::NoBackup(format!(
                "snapshot `{id}` of rds instance `{source}` is {snap_engine}, but the blueprint says `engine: {engine}`; set `engine: {snap_engine}`"
            )));
        }
        return Ok(BackupInfo {
            id: id.clone(),
            source: source.to_string(),
            taken_at: *taken,
            size_bytes: *size,
            location: arn.clone(),
        });
    }
    let listed: Vec<String> = snaps
        .iter()
        .take(10)
        .map(|s| {
            if s.2 == "available" {
                s.0.clone()
            } else {
                format!("{} ({})", s.0, s.2)
            }
        })
        .collect();
    let what = match pick {
        BackupPick::Latest => "no available snapshot".to_string(),
        BackupPick::Id(id) => match snaps.iter().find(|s| &s.0 == id) {
            Some(s) => format!(
                "snapshot `{id}` is `{}`, not `available`; retry after it is available",
                s.2
            ),
            None => format!("no snapshot with id `{id}`"),
        },
        BackupPick::Before(t) => format!(
            "no available snapshot taken at or before {}",
            t.to_rfc3339()
        ),
    };
    Err(ProviderError::NoBackup(format!(
        "{what} of rds instance `{source}` in {}; {}",
        c.region,
        if listed.is_empty() {
            "it has no snapshots (does the instance exist in this region?)".to_string()
        } else {
            format!("snapshots: {}", listed.join(", "))
        }
    )))
}

/// What a restore needs.
#[derive(Debug)]
pub struct RestoreRequest<'a> {
    /// New instance identifier.
    pub id: &'a str,
    /// Snapshot to restore.
    pub snapshot: &'a str,
    /// The run's security group.
    pub security_group: &'a str,
    /// DB subnet group (None: the account's default).
    pub subnet_group: Option<&'a str>,
    /// Instance class (None: the snapshot's).
    pub class: Option<&'a str>,
    /// Tags at creation.
    pub tags: &'a [(String, String)],
    /// Run id (the guard).
    pub run_id: &'a str,
    /// Longest wait for `available`.
    pub timeout: Duration,
}

/// Restores the snapshot into a new instance and waits until it is available. A retried
/// restore whose instance already exists adopts it if it carries the run's tag.
///
/// # Errors
/// API errors, the guard, or a timeout naming the last state.
pub async fn restore(
    c: &Clients,
    r: &RestoreRequest<'_>,
    cancel: &CancellationToken,
) -> Result<Instance, ProviderError> {
    let tags: Vec<Tag> = r
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let sent = c
        .rds
        .restore_db_instance_from_db_snapshot()
        .db_instance_identifier(r.id)
        .db_snapshot_identifier(r.snapshot)
        .publicly_accessible(false)
        .vpc_security_group_ids(r.security_group)
        .deletion_protection(false)
        .copy_tags_to_snapshot(false)
        .multi_az(false)
        .set_db_subnet_group_name(r.subnet_group.map(ToString::to_string))
        .set_db_instance_class(r.class.map(ToString::to_string))
        .set_tags(Some(tags))
        .send()
        .await;
    if let Err(e) = sent {
        let exists = e.as_service_error().is_some_and(
            aws_sdk_rds::operation::restore_db_instance_from_db_snapshot::RestoreDBInstanceFromDBSnapshotError::is_db_instance_already_exists_fault,
        );
        if !exists {
            return Err(ProviderError::Other(format!(
                "restore of snapshot {} into rds instance {} failed: {}",
                r.snapshot,
                r.id,
                sdk_message(&e)
            )));
        }
        // A retried restore: the instance is ours only if it proves it.
        match describe(c, r.id).await? {
            Some(found) => found.owned_by(r.run_id)?,
            None => guard(&format!("rds instance {}", r.id), r.run_id, None)?,
        }
    }
    wait_available(c, r.id, r.timeout, cancel, false).await
}

/// Waits until the instance is `available` (and, with `password`, the new master password is
/// no longer pending).
///
/// # Errors
/// Timeout naming the last state; the instance vanishing; API errors.
pub async fn wait_available(
    c: &Clients,
    id: &str,
    max: Duration,
    cancel: &CancellationToken,
    password: bool,
) -> Result<Instance, ProviderError> {
    let what = if password {
        format!("rds instance {id} to apply its new master password")
    } else {
        format!("rds instance {id} to become available")
    };
    wait::until(&what, max, Pace::SLOW, Some(cancel), || async {
        match describe(c, id).await? {
            None => Err(ProviderError::Other(format!(
                "rds instance {id} disappeared while it was being restored"
            ))),
            Some(i) if i.status == "available" && !(password && i.password_pending) => {
                Ok(Poll::Done(i))
            }
            Some(i) if matches!(i.status.as_str(), "failed" | "incompatible-restore" | "incompatible-parameters" | "storage-full" | "inaccessible-encryption-credentials") => {
                Err(ProviderError::Other(format!(
                    "rds instance {id} is `{}`: the restore cannot finish; see the RDS events of the instance",
                    i.status
                )))
            }
            Some(i) => Ok(Poll::Pending(if i.password_pending {
                format!("{} (new master password pending)", i.status)
            } else {
                i.status
            })),
        }
    })
    .await
}

/// Sets a new master password on an instance of this run and waits until it is applied.
///
/// # Errors
/// The guard, API errors, a timeout.
pub async fn set_password(
    c: &Clients,
    inst: &Instance,
    run_id: &str,
    password: &crate::secret::Secret,
    cancel: &CancellationToken,
) -> Result<Instance, ProviderError> {
    inst.owned_by(run_id)?;
    c.rds
        .modify_db_instance()
        .db_instance_identifier(&inst.id)
        .master_user_password(password.expose())
        .apply_immediately(true)
        .send()
        .await
        .map_err(api(format!(
            "set a fresh master password on rds instance {}",
            inst.id
        )))?;
    wait_available(c, &inst.id, MODIFY_TIMEOUT, cancel, true).await
}

/// A copy RDS deletes: an instance or an Aurora cluster, as described.
pub(super) trait Copy {
    /// `available`, `deleting`, ...
    fn status(&self) -> &str;
    /// Whether deletion protection is on.
    fn protected(&self) -> bool;
    /// The ownership proof ([`names::owned`]).
    fn owned_by(&self, run_id: &str) -> Result<(), ProviderError>;
}

impl Copy for Instance {
    fn status(&self) -> &str {
        &self.status
    }
    fn protected(&self) -> bool {
        self.deletion_protection
    }
    fn owned_by(&self, run_id: &str) -> Result<(), ProviderError> {
        Instance::owned_by(self, run_id)
    }
}

/// What one delete request got.
pub(super) enum Sent {
    /// Accepted: the copy is being deleted.
    Accepted,
    /// It was already gone.
    Gone,
    /// Refused for its state (creating, modifying, still has instances): try again later.
    NotYet,
}

/// The refusal of a copy that has deletion protection on.
pub(super) fn protected(what: &str, run_id: &str) -> ProviderError {
    ProviderError::Protected(format!(
        "{what} has deletion protection on; dryrun never turns it off. If it is really this run's copy, turn it off yourself and run `dryrun cleanup {run_id} --provider aws --yes`"
    ))
}

/// The delete both kinds of copy share: before each request the copy is described again and
/// must pass the ownership proof and have no deletion protection (dryrun never turns it off);
/// a refusal for its state is retried; waits until it is gone. `what` names it (`rds instance
/// ID`).
///
/// # Errors
/// The guard, deletion protection, `send`'s errors, a timeout naming the last state.
pub(super) async fn delete_until_gone<T, L, LF, S, SF>(
    what: &str,
    run_id: &str,
    look: L,
    send: S,
) -> Result<Deleted, ProviderError>
where
    T: Copy,
    L: Fn() -> LF,
    LF: std::future::Future<Output = Result<Option<T>, ProviderError>>,
    S: Fn() -> SF,
    SF: std::future::Future<Output = Result<Sent, ProviderError>>,
{
    let Some(first) = look().await? else {
        return Ok(Deleted::AlreadyGone);
    };
    first.owned_by(run_id)?;
    if first.protected() {
        return Err(protected(what, run_id));
    }
    let seen = std::sync::Mutex::new(Some(first));
    wait::until(
        &format!("{what} to be deleted"),
        DELETE_TIMEOUT,
        Pace::SLOW,
        None,
        || async {
            let prior = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let copy = match prior {
                Some(c) => c,
                None => match look().await? {
                    None => return Ok(Poll::Done(())),
                    Some(c) => c,
                },
            };
            if copy.status() == "deleting" {
                return Ok(Poll::Pending("deleting".into()));
            }
            copy.owned_by(run_id)?;
            if copy.protected() {
                return Err(ProviderError::Protected(format!(
                    "{what} got deletion protection while it was being deleted; dryrun never turns it off"
                )));
            }
            Ok(match send().await? {
                Sent::Accepted => Poll::Pending("deleting".into()),
                Sent::Gone => Poll::Done(()),
                Sent::NotYet => Poll::Pending(format!("{} (delete not accepted yet)", copy.status())),
            })
        },
    )
    .await?;
    Ok(Deleted::Destroyed)
}

/// Deletes an instance of this run — one that passes [`Instance::owned_by`] — without a final
/// snapshot (it is a throw-away copy; a snapshot of it would be one more thing to leak) and
/// with its automated backups; instances still `creating`, `modifying` or `backing-up` are
/// retried until they accept the delete; waits until the instance is gone. Deletion
/// protection is never turned off: an instance that has it is refused and stays (reported left
/// behind with the reason).
///
/// # Errors
/// The guard (the instance is not provably this run's), deletion protection, API errors, a
/// timeout naming the last state.
pub async fn delete(c: &Clients, id: &str, run_id: &str) -> Result<Deleted, ProviderError> {
    delete_until_gone(
        &format!("rds instance {id}"),
        run_id,
        || describe(c, id),
        || async {
            match c
                .rds
                .delete_db_instance()
                .db_instance_identifier(id)
                .skip_final_snapshot(true)
                .delete_automated_backups(true)
                .send()
                .await
            {
                Ok(_) => Ok(Sent::Accepted),
                Err(e) if e.as_service_error().is_some_and(aws_sdk_rds::operation::delete_db_instance::DeleteDBInstanceError::is_db_instance_not_found_fault) => Ok(Sent::Gone),
                // creating, modifying, backing-up: the delete is accepted later.
                Err(e) if e.as_service_error().is_some_and(aws_sdk_rds::operation::delete_db_instance::DeleteDBInstanceError::is_invalid_db_instance_state_fault) => Ok(Sent::NotYet),
                Err(e) => Err(ProviderError::Other(format!(
                    "delete rds instance {id}: {}",
                    sdk_message(&e)
                ))),
            }
        },
    )
    .await
}
