//! The AWS provider's part of `dryrun doctor` (see [`crate::doctor`]). Reads only, with one
//! exception that creates nothing: a `RunInstances` with `DryRun=true`, which AWS answers
//! `DryRunOperation` when the identity may launch what the blueprint describes (AMI, type,
//! subnet, instance profile, the run's tags) and `UnauthorizedOperation` when it may not.
//!
//! What doctor does not try: restoring a snapshot, deleting, writing to S3 — RDS and S3 have
//! no dry-run flag, and this build carries no IAM client for the IAM policy simulator (it
//! would add a large SDK crate to every build for one command; docs/cli.md says so). The
//! policy to compare the identity's with is docs/providers/aws-iam/runner-policy.json.

use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceMetadataOptionsRequest,
    InstanceType, ResourceType, Tag, TagSpecification,
};

use crate::blueprint::{Blueprint, ResourceSpec, ServiceAws};
use crate::doctor::Finding;
use crate::provider::{BackupPick, Provider as _};

use super::AwsProvider;
use super::names::{self, TAG_BLUEPRINT, TAG_CREATED_BY, TAG_RUN};

const POLICY_FIX: &str = "give the identity the actions in docs/providers/aws-iam/runner-policy.json (docs/providers/aws.md, \"Permissions\")";

/// AMI name patterns of Linux images that ship the SSM agent (AWS's list: Amazon Linux 2 and
/// 2023, Ubuntu Server 16.04+; Windows Server has it too, but dryrun's boot template and
/// install are shell scripts).
const SSM_AGENT_IMAGES: [&str; 4] = ["amzn2", "al2023", "amazon linux", "ubuntu"];

fn filter(name: &str, values: &[&str]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.iter().map(ToString::to_string).collect()))
        .build()
}

impl AwsProvider {
    /// What `bp` needs in the account (`None`: credentials and region only).
    pub(super) async fn doctor_checks(&self, bp: Option<&Blueprint>) -> Vec<Finding> {
        let mut out = vec![Finding::pass(
            "aws region",
            format!(
                "{}{}",
                self.region,
                if self.settings.region.is_some() {
                    " (providers.aws.region)"
                } else {
                    " (the credential chain: AWS_REGION or the profile)"
                }
            ),
        )];
        match self.describe_target().await {
            Ok(line) => out.push(Finding::pass(
                "aws credentials",
                line.unwrap_or_default()
                    .trim_start_matches("aws: ")
                    .to_string(),
            )),
            Err(e) => {
                out.push(Finding::fail(
                    "aws credentials",
                    e.to_string(),
                    "configure the standard chain: AWS_PROFILE (and `aws sso login`), AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance role",
                ));
                // Nothing else can be asked without an identity.
                return out;
            }
        }
        let Some(bp) = bp else {
            return out;
        };
        let c = self.clients();
        let mut services = Vec::new();
        for r in &bp.resources {
            match &r.spec {
                ResourceSpec::Database(db) => {
                    let check = format!("{} backup", r.address());
                    let pick = db.backup.clone().map_or(BackupPick::Latest, BackupPick::Id);
                    out.push(match self.find_backup(db, &pick).await {
                        Ok(b) => Finding::pass(
                            check,
                            format!(
                                "{} of `{}` taken {} (age {})",
                                b.id,
                                db.source,
                                b.taken_at.format("%Y-%m-%d %H:%M UTC"),
                                crate::report::human_secs(
                                    (chrono::Utc::now() - b.taken_at).num_seconds()
                                )
                            ),
                        ),
                        Err(e) => Finding::fail(
                            check,
                            e.to_string(),
                            format!(
                                "the source must be an RDS instance (or Aurora cluster) `{}` in {} with an available snapshot, readable by the identity (rds:DescribeDBSnapshots, rds:DescribeDBInstances)",
                                db.source, self.region
                            ),
                        ),
                    });
                }
                ResourceSpec::Bucket(b) => {
                    let check = format!("{} source", r.address());
                    let res =
                        c.s3.list_objects_v2()
                            .bucket(&b.source)
                            .set_prefix(b.prefix.clone())
                            .max_keys(1)
                            .send()
                            .await;
                    out.push(match res {
                        Ok(o) => Finding::pass(
                            check,
                            format!(
                                "s3://{} is readable ({})",
                                b.source,
                                if o.contents().is_empty() {
                                    "empty"
                                } else {
                                    "has objects"
                                }
                            ),
                        ),
                        Err(e) => Finding::fail(
                            check,
                            format!("cannot list s3://{}: {}", b.source, names::sdk_message(&e)),
                            "the identity needs s3:ListBucket and s3:GetObject on the production bucket; check its name in the blueprint",
                        ),
                    });
                }
                ResourceSpec::Service(s) => match &s.aws {
                    Some(a) => services.push((r.address(), a.clone())),
                    None => out.push(Finding::fail(
                        format!("{} aws", r.address()),
                        "the service has no `aws:` block (an AMI at least)",
                        "add `aws: {ami: ami-…}` to the service (docs/providers/aws.md)",
                    )),
                },
            }
        }
        if services.is_empty() {
            out.push(Finding::skip("ssm", "the blueprint runs no service"));
        } else if self.settings.instance_profile.is_none() {
            out.push(Finding::fail(
                "instance profile",
                "providers.aws.instance_profile is not set: the instance gets no role, and SSM (which installs the release) cannot reach it",
                "set providers.aws.instance_profile to a profile whose role has AmazonSSMManagedInstanceCore and docs/providers/aws-iam/instance-policy.json",
            ));
        } else {
            out.push(Finding::pass(
                "instance profile",
                format!(
                    "{} (its role's permissions are not read: no IAM client)",
                    self.settings
                        .instance_profile
                        .as_deref()
                        .unwrap_or_default()
                ),
            ));
        }
        for (address, a) in &services {
            out.push(self.image_check(address, a).await);
            out.push(self.launch_check(address, a, bp).await);
            out.push(self.route_check(address, a).await);
        }
        out.push(Finding::skip(
            "other permissions",
            "restore, delete and S3 writes cannot be tried without creating something (no dry-run flag in RDS or S3), and this build does not call the IAM policy simulator: compare the identity's policy with docs/providers/aws-iam/runner-policy.json",
        ));
        out
    }

    /// The AMI exists here and runs the SSM agent (by its name: doctor cannot look inside).
    async fn image_check(&self, address: &str, a: &ServiceAws) -> Finding {
        let check = format!("{address} ami");
        let res = self
            .clients()
            .ec2
            .describe_images()
            .image_ids(&a.ami)
            .send()
            .await;
        let image = match res {
            Ok(o) => o.images().first().cloned(),
            Err(e) => {
                return Finding::fail(
                    check,
                    format!("cannot describe {}: {}", a.ami, names::sdk_message(&e)),
                    "check the AMI id and region (ec2:DescribeImages)",
                );
            }
        };
        let Some(image) = image else {
            return Finding::fail(
                check,
                format!("{} does not exist in {}", a.ami, self.region),
                "AMIs are per region: copy it here or use this region's id",
            );
        };
        let name = image.name().unwrap_or_default().to_string();
        let windows = image
            .platform()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("windows"))
            || name.to_ascii_lowercase().contains("windows");
        if windows {
            return Finding::fail(
                check,
                format!("{} ({name}) is a Windows image", a.ami),
                "the boot template (user data) and the install (SSM AWS-RunShellScript) are shell scripts: use a Linux AMI with the SSM agent, curl and tar (Amazon Linux 2023)",
            );
        }
        let lower = format!(
            "{} {}",
            name.to_ascii_lowercase(),
            image.description().unwrap_or_default().to_ascii_lowercase()
        );
        if SSM_AGENT_IMAGES.iter().any(|p| lower.contains(p)) {
            Finding::pass(
                check,
                format!(
                    "{} ({name}): an image family that ships the SSM agent",
                    a.ami
                ),
            )
        } else {
            Finding::warn(
                check,
                format!(
                    "{} ({name}): doctor cannot tell whether it runs the SSM agent",
                    a.ami
                ),
                "make sure amazon-ssm-agent is installed and enabled in the image, or use Amazon Linux 2023 / Ubuntu",
            )
        }
    }

    /// `RunInstances` with `DryRun=true`: the launch the run would make, permission included.
    async fn launch_check(&self, address: &str, a: &ServiceAws, bp: &Blueprint) -> Finding {
        let check = format!("{address} launch (dry run)");
        let tags = [
            ("Name", "dryrun-doctor"),
            (TAG_RUN, "doctor"),
            (TAG_CREATED_BY, "dryrun doctor"),
            (TAG_BLUEPRINT, bp.name.as_str()),
        ];
        let spec = |kind: ResourceType| {
            TagSpecification::builder()
                .resource_type(kind)
                .set_tags(Some(
                    tags.iter()
                        .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                        .collect(),
                ))
                .build()
        };
        let res = self
            .clients()
            .ec2
            .run_instances()
            .dry_run(true)
            .image_id(&a.ami)
            .instance_type(InstanceType::from(a.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .set_subnet_id(a.subnet_id.clone())
            .set_iam_instance_profile(
                self.settings
                    .instance_profile
                    .as_ref()
                    .map(|p| IamInstanceProfileSpecification::builder().name(p).build()),
            )
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .build(),
            )
            .tag_specifications(spec(ResourceType::Instance))
            .tag_specifications(spec(ResourceType::Volume))
            .send()
            .await;
        match res {
            Err(e) if names::sdk_code(&e) == Some("DryRunOperation") => Finding::pass(
                check,
                format!(
                    "ec2:RunInstances of {} {} would be allowed",
                    a.instance_type, a.ami
                ),
            ),
            Err(e) if names::sdk_code(&e) == Some("UnauthorizedOperation") => Finding::fail(
                check,
                format!("ec2:RunInstances is refused: {}", names::sdk_message(&e)),
                POLICY_FIX,
            ),
            Err(e) => Finding::fail(
                check,
                format!("the launch would fail: {}", names::sdk_message(&e)),
                "check the service's aws.instance_type, aws.subnet_id and the AMI",
            ),
            // An endpoint that ignores DryRun launched something: end it at once, and say so.
            Ok(o) => {
                let ids: Vec<String> = o
                    .instances()
                    .iter()
                    .filter_map(|i| i.instance_id().map(ToString::to_string))
                    .collect();
                let ended = self
                    .clients()
                    .ec2
                    .terminate_instances()
                    .set_instance_ids(Some(ids.clone()))
                    .send()
                    .await
                    .is_ok();
                Finding::fail(
                    check,
                    format!(
                        "the endpoint ignored DryRun and launched {} ({})",
                        ids.join(", "),
                        if ended {
                            "terminated again"
                        } else {
                            "NOT terminated: end it by hand"
                        }
                    ),
                    "point dryrun at a real EC2 endpoint (AWS_ENDPOINT_URL / --endpoint-url)",
                )
            }
        }
    }

    /// The instance's subnet can reach the SSM endpoints: a route to a NAT gateway, to an
    /// internet gateway with public addresses, or interface endpoints for ssm, ssmmessages
    /// and ec2messages in the VPC.
    async fn route_check(&self, address: &str, a: &ServiceAws) -> Finding {
        let check = format!("{address} route to ssm");
        let clients = self.clients();
        let ec2 = &clients.ec2;
        let subnets = match &a.subnet_id {
            Some(s) => ec2.describe_subnets().subnet_ids(s),
            None => ec2
                .describe_subnets()
                .filters(filter("default-for-az", &["true"])),
        }
        .send()
        .await;
        let subnet = match subnets {
            Ok(o) => o.subnets().first().cloned(),
            Err(e) => {
                return Finding::fail(
                    check,
                    format!("cannot describe the subnet: {}", names::sdk_message(&e)),
                    "ec2:DescribeSubnets",
                );
            }
        };
        let Some(subnet) = subnet else {
            return Finding::fail(
                check,
                match &a.subnet_id {
                    Some(s) => format!("subnet {s} not found in {}", self.region),
                    None => format!("no default subnet in {}", self.region),
                },
                "set the service's aws.subnet_id to a subnet of this region",
            );
        };
        let sid = subnet.subnet_id().unwrap_or_default().to_string();
        let vpc = subnet.vpc_id().unwrap_or_default().to_string();
        let public = subnet.map_public_ip_on_launch().unwrap_or(false);
        // The run's security group is made in the run's VPC (providers.aws.vpc_id, else the
        // service's subnet's, the database's subnet group's, the default one): an instance
        // in a subnet of another VPC cannot be launched with it.
        if let Ok(run_vpc) = self.vpc().await
            && run_vpc != vpc
        {
            return Finding::fail(
                check,
                format!(
                    "subnet {sid} is in VPC {vpc}, but the run's security group goes into VPC {run_vpc}"
                ),
                "set providers.aws.vpc_id to the subnet's VPC, or give the service a subnet of the run's VPC (aws.subnet_id)",
            );
        }
        // The subnet's own route table, else the VPC's main one.
        let mut table = None;
        for f in [
            filter("association.subnet-id", &[sid.as_str()]),
            filter("association.main", &["true"]),
        ] {
            let res = ec2
                .describe_route_tables()
                .filters(filter("vpc-id", &[vpc.as_str()]))
                .filters(f)
                .send()
                .await;
            match res {
                Ok(o) => {
                    if let Some(t) = o.route_tables().first() {
                        table = Some(t.clone());
                        break;
                    }
                }
                Err(e) => {
                    return Finding::fail(
                        check,
                        format!("cannot read route tables: {}", names::sdk_message(&e)),
                        "ec2:DescribeRouteTables",
                    );
                }
            }
        }
        let default_route = table.as_ref().and_then(|t| {
            t.routes()
                .iter()
                .find(|r| {
                    r.destination_cidr_block() == Some("0.0.0.0/0")
                        && r.state().is_none_or(|st| st.as_str() != "blackhole")
                })
                .cloned()
        });
        if let Some(r) = &default_route {
            if let Some(nat) = r.nat_gateway_id() {
                return Finding::pass(
                    check,
                    format!("subnet {sid}: default route via NAT gateway {nat}"),
                );
            }
            if let Some(gw) = r.gateway_id().filter(|g| g.starts_with("igw-"))
                && public
            {
                return Finding::pass(
                    check,
                    format!("subnet {sid}: default route via {gw}, public addresses on launch"),
                );
            }
        }
        // A route doctor cannot follow (transit gateway, peering, a NAT instance, a virtual
        // private gateway) may well lead out: say so instead of failing.
        let elsewhere = default_route.as_ref().and_then(|r| {
            r.transit_gateway_id()
                .or(r.vpc_peering_connection_id())
                .or(r.network_interface_id())
                .or(r.instance_id())
                .or(r.gateway_id().filter(|g| !g.starts_with("igw-")))
                .map(ToString::to_string)
        });
        let region = &self.region;
        // The instance also fetches the release from S3 (a presigned URL): without a route
        // out, that takes an S3 endpoint (gateway or interface).
        let wanted: Vec<String> = ["ssm", "ssmmessages", "ec2messages", "s3"]
            .iter()
            .map(|s| format!("com.amazonaws.{region}.{s}"))
            .collect();
        let found: Vec<String> = match ec2
            .describe_vpc_endpoints()
            .filters(filter("vpc-id", &[vpc.as_str()]))
            .send()
            .await
        {
            Ok(o) => o
                .vpc_endpoints()
                .iter()
                .filter(|e| {
                    e.state()
                        .is_none_or(|st| st.as_str().eq_ignore_ascii_case("available"))
                })
                .filter_map(|e| e.service_name().map(ToString::to_string))
                .collect(),
            Err(e) => {
                return Finding::fail(
                    check,
                    format!("cannot read VPC endpoints: {}", names::sdk_message(&e)),
                    "ec2:DescribeVpcEndpoints",
                );
            }
        };
        let missing: Vec<&String> = wanted.iter().filter(|w| !found.contains(w)).collect();
        if missing.is_empty() {
            return Finding::pass(
                check,
                format!(
                    "subnet {sid}: VPC {vpc} has endpoints for ssm, ssmmessages, ec2messages and s3"
                ),
            );
        }
        if let Some(via) = elsewhere {
            return Finding::warn(
                check,
                format!(
                    "subnet {sid}: default route via {via}, which doctor cannot follow; VPC {vpc} lacks endpoints for {}",
                    missing
                        .iter()
                        .map(|m| m.rsplit('.').next().unwrap_or(m))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "make sure that route reaches the SSM and S3 endpoints of the region (or add the VPC endpoints)",
            );
        }
        let why = match &default_route {
            Some(r) if r.gateway_id().is_some_and(|g| g.starts_with("igw-")) => {
                "its default route goes to an internet gateway, but the subnet gives no public address on launch"
            }
            Some(_) => "its default route leads to no NAT or internet gateway",
            None => "it has no default route",
        };
        Finding::fail(
            check,
            format!(
                "subnet {sid} cannot reach SSM: {why}, and VPC {vpc} lacks endpoints for {}",
                missing
                    .iter()
                    .map(|m| m.rsplit('.').next().unwrap_or(m))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "route 0.0.0.0/0 through a NAT gateway, or add interface VPC endpoints for ssm, ssmmessages and ec2messages (private DNS on) and an S3 gateway endpoint",
        )
    }
}
