//! service → EC2, and the run's security group.
//!
//! The security group admits traffic only from its own members (the service reaches the
//! database; nothing else reaches either), plus the runner's CIDR on the database port when
//! configured. It has no 0.0.0.0/0 ingress. Egress stays open so the instance can reach SSM and
//! the presigned release URL.

use std::time::Duration;

use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, IpPermission, IpRange, ResourceType, Tag, TagSpecification,
    UserIdGroupPair,
};
use tokio_util::sync::CancellationToken;

use super::clients::Clients;
use super::names::{self, TAG_RESOURCE, TAG_RUN, api, sdk_code, sdk_message};
use super::wait::{self, Pace, Poll};
use crate::provider::{Deleted, ProviderError};

/// Longest wait for instances to terminate.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Longest time to retry a security group delete that hits DependencyViolation.
const SG_DELETE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// States of an instance that still exists (everything but `terminated`).
const LIVE_STATES: [&str; 5] = ["pending", "running", "shutting-down", "stopping", "stopped"];

fn tag_specs(kinds: &[ResourceType], tags: &[(String, String)]) -> Vec<TagSpecification> {
    kinds
        .iter()
        .map(|k| {
            TagSpecification::builder()
                .resource_type(k.clone())
                .set_tags(Some(
                    tags.iter()
                        .map(|(key, v)| Tag::builder().key(key).value(v).build())
                        .collect(),
                ))
                .build()
        })
        .collect()
}

fn filter(name: &str, values: &[&str]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.iter().map(ToString::to_string).collect()))
        .build()
}

fn tags_of(tags: &[Tag]) -> Vec<(String, String)> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn tag<'a>(tags: &'a [(String, String)], key: &str) -> Option<&'a str> {
    names::tag_value(tags.iter().map(|(k, v)| (k.as_str(), v.as_str())), key)
}

/// The default VPC of the region.
///
/// # Errors
/// API errors, or no default VPC.
pub async fn default_vpc(c: &Clients) -> Result<String, ProviderError> {
    let out = c
        .ec2
        .describe_vpcs()
        .filters(filter("is-default", &["true"]))
        .send()
        .await
        .map_err(api("find the default vpc"))?;
    out.vpcs()
        .first()
        .and_then(|v| v.vpc_id())
        .map(ToString::to_string)
        .ok_or_else(|| {
            ProviderError::Other(format!(
                "region {} has no default VPC: set providers.aws.vpc_id (or a service's aws.subnet_id)",
                c.region
            ))
        })
}

/// The VPC of a subnet.
///
/// # Errors
/// API errors, or an unknown subnet.
pub async fn subnet_vpc(c: &Clients, subnet: &str) -> Result<String, ProviderError> {
    let out = c
        .ec2
        .describe_subnets()
        .subnet_ids(subnet)
        .send()
        .await
        .map_err(api(format!("describe subnet {subnet}")))?;
    out.subnets()
        .first()
        .and_then(|s| s.vpc_id())
        .map(ToString::to_string)
        .ok_or_else(|| ProviderError::Other(format!("subnet {subnet} not found in {}", c.region)))
}

/// A security group as the provider sees it.
#[derive(Debug, Clone)]
pub struct Group {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Tags.
    pub tags: Vec<(String, String)>,
    /// Ingress CIDRs (for reports and tests).
    pub ingress_cidrs: Vec<String>,
}

/// Security groups that carry a run tag (`run_id` given: that run's; `name`: with that name).
///
/// # Errors
/// API errors.
pub async fn groups(
    c: &Clients,
    run_id: Option<&str>,
    name: Option<&str>,
) -> Result<Vec<Group>, ProviderError> {
    let mut req = c.ec2.describe_security_groups();
    req = match run_id {
        Some(r) => req.filters(filter(&format!("tag:{TAG_RUN}"), &[r])),
        None => req.filters(filter("tag-key", &[TAG_RUN])),
    };
    if let Some(n) = name {
        req = req.filters(filter("group-name", &[n]));
    }
    let out = req
        .send()
        .await
        .map_err(api("list security groups by tag"))?;
    Ok(out
        .security_groups()
        .iter()
        .map(|g| Group {
            id: g.group_id().unwrap_or_default().to_string(),
            name: g.group_name().unwrap_or_default().to_string(),
            tags: tags_of(g.tags()),
            ingress_cidrs: g
                .ip_permissions()
                .iter()
                .flat_map(|p| {
                    p.ip_ranges()
                        .iter()
                        .filter_map(|r| r.cidr_ip().map(ToString::to_string))
                })
                .collect(),
        })
        .collect())
}

/// Creates the run's security group in `vpc`, or adopts the one a retried create made (same
/// name, the run's tag), and allows its members to reach each other (idempotently).
///
/// # Errors
/// API errors; the guard when a group of that name lacks the run's tag.
pub async fn create_group(
    c: &Clients,
    name: &str,
    vpc: &str,
    tags: &[(String, String)],
    run_id: &str,
    runner_cidr: Option<&str>,
) -> Result<String, ProviderError> {
    let created = c
        .ec2
        .create_security_group()
        .group_name(name)
        .description(format!("dryrun copy {run_id}: members only"))
        .vpc_id(vpc)
        .set_tag_specifications(Some(tag_specs(&[ResourceType::SecurityGroup], tags)))
        .send()
        .await;
    let id = match created {
        Ok(out) => out.group_id().unwrap_or_default().to_string(),
        Err(e) if sdk_code(&e) == Some("InvalidGroup.Duplicate") => {
            let found = c
                .ec2
                .describe_security_groups()
                .filters(filter("group-name", &[name]))
                .filters(filter("vpc-id", &[vpc]))
                .send()
                .await
                .map_err(api(format!("describe security group {name}")))?;
            let g = found.security_groups().first().ok_or_else(|| {
                ProviderError::Other(format!(
                    "security group {name} exists but cannot be described"
                ))
            })?;
            let t = tags_of(g.tags());
            let id = g.group_id().unwrap_or_default().to_string();
            names::owned(
                &format!("security group {id} ({name})"),
                g.group_name().unwrap_or_default(),
                run_id,
                &t,
                None,
            )?;
            // The answer to the first attempt was lost: the rules below may be missing.
            id
        }
        Err(e) => {
            return Err(ProviderError::Other(format!(
                "create security group {name}: {}",
                sdk_message(&e)
            )));
        }
    };
    let mut perms = vec![
        IpPermission::builder()
            .ip_protocol("-1")
            .user_id_group_pairs(UserIdGroupPair::builder().group_id(&id).build())
            .build(),
    ];
    if let Some(cidr) = runner_cidr {
        perms.push(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(5432)
                .to_port(5432)
                .ip_ranges(
                    IpRange::builder()
                        .cidr_ip(cidr)
                        .description("dryrun runner: sql checks")
                        .build(),
                )
                .build(),
        );
    }
    match c
        .ec2
        .authorize_security_group_ingress()
        .group_id(&id)
        .set_ip_permissions(Some(perms))
        .send()
        .await
    {
        // A retried call whose first attempt was applied.
        Err(e) if sdk_code(&e) == Some("InvalidPermission.Duplicate") => Ok(id),
        r => r
            .map(|_| id.clone())
            .map_err(api(format!("allow members of {id} to reach each other"))),
    }
}

/// Deletes a security group of this run, retrying DependencyViolation (instances and
/// databases still detaching) with backoff until a deadline.
///
/// # Errors
/// The guard, API errors, a timeout naming the last error.
pub async fn delete_group(c: &Clients, g: &Group, run_id: &str) -> Result<Deleted, ProviderError> {
    g.owned_by(run_id)?;
    let mut first = true;
    wait::until(
        &format!("security group {} to be deleted", g.id),
        SG_DELETE_TIMEOUT,
        Pace {
            first: Duration::from_millis(500),
            cap: Duration::from_secs(15),
        },
        None,
        || {
            let was_first = first;
            first = false;
            async move {
                match c.ec2.delete_security_group().group_id(&g.id).send().await {
                    Ok(_) => Ok(Poll::Done(Deleted::Destroyed)),
                    Err(e) => match sdk_code(&e) {
                        Some("InvalidGroup.NotFound") => Ok(Poll::Done(if was_first {
                            Deleted::AlreadyGone
                        } else {
                            Deleted::Destroyed
                        })),
                        Some("DependencyViolation") => Ok(Poll::Pending(sdk_message(&e))),
                        _ => Err(ProviderError::Other(format!(
                            "delete security group {}: {}",
                            g.id,
                            sdk_message(&e)
                        ))),
                    },
                }
            }
        },
    )
    .await
}

/// An instance as the provider sees it.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Id.
    pub id: String,
    /// State name.
    pub state: String,
    /// Private address.
    pub private_ip: Option<String>,
    /// Tags.
    pub tags: Vec<(String, String)>,
    /// When it was launched.
    pub launched: Option<chrono::DateTime<chrono::Utc>>,
}

impl Instance {
    /// The run tag.
    #[must_use]
    pub fn run_tag(&self) -> Option<&str> {
        tag(&self.tags, TAG_RUN)
    }

    /// The ownership proof ([`names::owned`]; an instance's name is its `Name` tag).
    ///
    /// # Errors
    /// [`ProviderError::Guard`].
    pub fn owned_by(&self, run_id: &str) -> Result<(), ProviderError> {
        names::owned(
            &format!("ec2 instance {}", self.id),
            tag(&self.tags, "Name").unwrap_or_default(),
            run_id,
            &self.tags,
            self.launched,
        )
    }
}

impl Group {
    /// The ownership proof ([`names::owned`]; the API gives no creation time).
    ///
    /// # Errors
    /// [`ProviderError::Guard`].
    pub fn owned_by(&self, run_id: &str) -> Result<(), ProviderError> {
        names::owned(
            &format!("security group {}", self.id),
            &self.name,
            run_id,
            &self.tags,
            None,
        )
    }
}

fn instances_of(
    out: &aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput,
) -> Vec<Instance> {
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| Instance {
            id: i.instance_id().unwrap_or_default().to_string(),
            state: i
                .state()
                .and_then(|s| s.name())
                .map_or_else(|| "unknown".into(), |n| n.as_str().to_string()),
            private_ip: i.private_ip_address().map(ToString::to_string),
            tags: tags_of(i.tags()),
            launched: i.launch_time().and_then(names::time_of),
        })
        .collect()
}

/// Instances that still exist and carry a run tag: `run_id` given, that run's; `address`
/// given, that resource's.
///
/// # Errors
/// API errors.
pub async fn tagged(
    c: &Clients,
    run_id: Option<&str>,
    address: Option<&str>,
) -> Result<Vec<Instance>, ProviderError> {
    let mut req = c
        .ec2
        .describe_instances()
        .filters(filter("instance-state-name", &LIVE_STATES));
    req = match run_id {
        Some(r) => req.filters(filter(&format!("tag:{TAG_RUN}"), &[r])),
        None => req.filters(filter("tag-key", &[TAG_RUN])),
    };
    if let Some(a) = address {
        req = req.filters(filter(&format!("tag:{TAG_RESOURCE}"), &[a]));
    }
    let mut pages = req.into_paginator().send();
    let mut out = Vec::new();
    while let Some(page) = pages.next().await {
        out.extend(instances_of(&page.map_err(api("list instances by tag"))?));
    }
    Ok(out)
}

/// What RunInstances needs.
#[derive(Debug)]
pub struct Launch<'a> {
    /// AMI.
    pub ami: &'a str,
    /// Instance type.
    pub instance_type: &'a str,
    /// Subnet.
    pub subnet: Option<&'a str>,
    /// The run's security group.
    pub security_group: &'a str,
    /// Idempotency token.
    pub client_token: &'a str,
    /// User data (plain text; encoded here).
    pub user_data: &'a str,
    /// Instance profile name.
    pub profile: Option<&'a str>,
    /// Tags at creation (instance and volumes).
    pub tags: &'a [(String, String)],
}

/// Launches one instance.
///
/// # Errors
/// API errors.
pub async fn launch(c: &Clients, l: &Launch<'_>) -> Result<Instance, ProviderError> {
    let out = c
        .ec2
        .run_instances()
        .image_id(l.ami)
        .instance_type(InstanceType::from(l.instance_type))
        .min_count(1)
        .max_count(1)
        .client_token(l.client_token)
        .security_group_ids(l.security_group)
        .set_subnet_id(l.subnet.map(ToString::to_string))
        .user_data(names::base64(l.user_data.as_bytes()))
        .set_iam_instance_profile(
            l.profile
                .map(|p| IamInstanceProfileSpecification::builder().name(p).build()),
        )
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .build(),
        )
        .set_tag_specifications(Some(tag_specs(
            &[ResourceType::Instance, ResourceType::Volume],
            l.tags,
        )))
        .send()
        .await
        .map_err(api(format!("run instance from {}", l.ami)))?;
    let i = out
        .instances()
        .first()
        .ok_or_else(|| ProviderError::Other("RunInstances returned no instance".into()))?;
    Ok(Instance {
        id: i.instance_id().unwrap_or_default().to_string(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map_or_else(|| "pending".into(), |n| n.as_str().to_string()),
        private_ip: i.private_ip_address().map(ToString::to_string),
        tags: tags_of(i.tags()),
        launched: i.launch_time().and_then(names::time_of),
    })
}

/// Describes instances by id (missing ones are left out).
///
/// # Errors
/// API errors other than "not found".
pub async fn describe(c: &Clients, ids: &[String]) -> Result<Vec<Instance>, ProviderError> {
    match c
        .ec2
        .describe_instances()
        .set_instance_ids(Some(ids.to_vec()))
        .send()
        .await
    {
        Ok(out) => Ok(instances_of(&out)),
        Err(e) if sdk_code(&e) == Some("InvalidInstanceID.NotFound") => Ok(Vec::new()),
        Err(e) => Err(ProviderError::Other(format!(
            "describe instances {}: {}",
            ids.join(", "),
            sdk_message(&e)
        ))),
    }
}

/// Waits until an instance is `running`.
///
/// # Errors
/// A timeout naming the last state; the instance ending; API errors.
pub async fn wait_running(
    c: &Clients,
    id: &str,
    max: Duration,
    cancel: &CancellationToken,
) -> Result<Instance, ProviderError> {
    let ids = [id.to_string()];
    wait::until(
        &format!("ec2 instance {id} to be running"),
        max,
        Pace::FAST,
        Some(cancel),
        || async {
            let found = describe(c, &ids).await?;
            match found.into_iter().next() {
                None => Ok(Poll::Pending("not visible yet".into())),
                Some(i) if i.state == InstanceStateName::Running.as_str() => Ok(Poll::Done(i)),
                Some(i) if matches!(i.state.as_str(), "shutting-down" | "terminated" | "stopped" | "stopping") => {
                    Err(ProviderError::Other(format!(
                        "ec2 instance {id} is `{}` instead of starting; see its state reason in the EC2 console",
                        i.state
                    )))
                }
                Some(i) => Ok(Poll::Pending(i.state)),
            }
        },
    )
    .await
}

/// Terminates instances of this run and waits until they are terminated.
///
/// # Errors
/// The guard (an instance lacks the run's tag), API errors, a timeout.
pub async fn terminate(c: &Clients, found: &[Instance], run_id: &str) -> Result<(), ProviderError> {
    if found.is_empty() {
        return Ok(());
    }
    for i in found {
        i.owned_by(run_id)?;
    }
    let ids: Vec<String> = found.iter().map(|i| i.id.clone()).collect();
    c.ec2
        .terminate_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .map_err(api(format!("terminate {}", ids.join(", "))))?;
    wait::until(
        &format!("ec2 instance(s) {} to terminate", ids.join(", ")),
        TERMINATE_TIMEOUT,
        Pace::FAST,
        None,
        || async {
            let now = describe(c, &ids).await?;
            let live: Vec<String> = now
                .iter()
                .filter(|i| i.state != "terminated")
                .map(|i| format!("{} {}", i.id, i.state))
                .collect();
            Ok(if live.is_empty() {
                Poll::Done(())
            } else {
                Poll::Pending(live.join(", "))
            })
        },
    )
    .await
}
