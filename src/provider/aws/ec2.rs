//! service → EC2, and the run's security group.
//!
//! The security group admits traffic only from its own members (the service reaches the
//! database; nothing else reaches either), plus the runner's CIDR on the database port when
//! configured. It has no 0.0.0.0/0 ingress. Unless the blueprint says `firewall: off`, its
//! egress is reduced to its members, HTTPS (the SSM agent and the presigned release URL) and the
//! blueprint's `firewall.allow` addresses (`restrict_egress`; docs/data-safety.md).

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
    /// Egress rules as `protocol port-range destination` (for tests).
    pub egress: Vec<String>,
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
            egress: g
                .ip_permissions_egress()
                .iter()
                .flat_map(|p| {
                    let ports = format!(
                        "{} {}-{}",
                        p.ip_protocol().unwrap_or("?"),
                        p.from_port().unwrap_or(-1),
                        p.to_port().unwrap_or(-1)
                    );
                    p.ip_ranges()
                        .iter()
                        .filter_map(|r| r.cidr_ip().map(ToString::to_string))
                        .chain(
                            p.ipv6_ranges()
                                .iter()
                                .filter_map(|r| r.cidr_ipv6().map(ToString::to_string)),
                        )
                        .chain(
                            p.user_id_group_pairs()
                                .iter()
                                .filter_map(|g| g.group_id().map(ToString::to_string)),
                        )
                        .map(move |d| format!("{ports} {d}"))
                        .collect::<Vec<_>>()
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
    (runner_cidr, egress): (Option<&str>, Option<&[EgressRule]>),
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
        Err(e) if sdk_code(&e) == Some("InvalidPermission.Duplicate") => {}
        r => {
            r.map_err(api(format!("allow members of {id} to reach each other")))?;
        }
    }
    if let Some(allow) = egress {
        restrict_egress(c, &id, allow).await?;
    }
    Ok(id)
}

/// An egress rule of the run's group: a CIDR and a TCP port.
pub type EgressRule = (String, u16);

/// `firewall.allow` entries as egress rules: on AWS each is `IP:PORT` or `CIDR:PORT`.
///
/// # Errors
/// An entry that names a host (security groups take addresses only).
pub fn egress_allow(allow: &[String]) -> Result<Vec<EgressRule>, ProviderError> {
    allow
        .iter()
        .map(|a| {
            let (host, port) = a.rsplit_once(':').unwrap_or((a, ""));
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let addr = host.split('/').next().unwrap_or(host);
            match (addr.parse::<std::net::IpAddr>(), port.parse::<u16>()) {
                (Ok(ip), Ok(p)) => {
                    let cidr = if host.contains('/') {
                        host.to_string()
                    } else if ip.is_ipv4() {
                        format!("{host}/32")
                    } else {
                        format!("{host}/128")
                    };
                    Ok((cidr, p))
                }
                _ => Err(ProviderError::Other(format!(
                    "firewall.allow `{a}`: on AWS an entry is IP:PORT or CIDR:PORT (a security group cannot name a host)"
                ))),
            }
        })
        .collect()
}

/// Replaces AWS's default open egress of the run's group by: its members (the copy's database),
/// HTTPS anywhere (the SSM agent and the release download reach the SSM and S3 endpoints; with
/// VPC endpoints this could be their prefix lists), and the blueprint's allowed addresses.
async fn restrict_egress(
    c: &Clients,
    id: &str,
    allow: &[(String, u16)],
) -> Result<(), ProviderError> {
    let all = IpPermission::builder()
        .ip_protocol("-1")
        .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
        .build();
    match c
        .ec2
        .revoke_security_group_egress()
        .group_id(id)
        .ip_permissions(all)
        .send()
        .await
    {
        Err(e) if sdk_code(&e) == Some("InvalidPermission.NotFound") => {}
        r => {
            r.map_err(api(format!("close the default egress of {id}")))?;
        }
    }
    let mut perms = vec![
        IpPermission::builder()
            .ip_protocol("-1")
            .user_id_group_pairs(UserIdGroupPair::builder().group_id(id).build())
            .build(),
        IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(443)
            .to_port(443)
            .ip_ranges(
                IpRange::builder()
                    .cidr_ip("0.0.0.0/0")
                    .description("SSM and S3 endpoints (HTTPS)")
                    .build(),
            )
            .build(),
    ];
    for (cidr, port) in allow {
        let p = i32::from(*port);
        let b = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(p)
            .to_port(p);
        perms.push(if cidr.contains(':') {
            b.ipv6_ranges(
                aws_sdk_ec2::types::Ipv6Range::builder()
                    .cidr_ipv6(cidr)
                    .description("firewall.allow")
                    .build(),
            )
            .build()
        } else {
            b.ip_ranges(
                IpRange::builder()
                    .cidr_ip(cidr)
                    .description("firewall.allow")
                    .build(),
            )
            .build()
        });
    }
    match c
        .ec2
        .authorize_security_group_egress()
        .group_id(id)
        .set_ip_permissions(Some(perms))
        .send()
        .await
    {
        Err(e) if sdk_code(&e) == Some("InvalidPermission.Duplicate") => Ok(()),
        r => r
            .map(|_| ())
            .map_err(api(format!("allow the egress the copy needs from {id}"))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_become_cidr_rules_and_host_names_are_refused() {
        let ok = egress_allow(&[
            "10.1.2.3:5432".into(),
            "10.0.0.0/16:443".into(),
            "[2001:db8::1]:8443".into(),
        ])
        .unwrap();
        assert_eq!(
            ok,
            vec![
                ("10.1.2.3/32".to_string(), 5432),
                ("10.0.0.0/16".to_string(), 443),
                ("2001:db8::1/128".to_string(), 8443)
            ]
        );
        let e = egress_allow(&["search.internal:443".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("on AWS an entry is IP:PORT or CIDR:PORT"), "{e}");
    }
}
