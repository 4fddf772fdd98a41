//! The AWS provider's part of `dryrun init` (see [`crate::init`]): what the named RDS
//! instances, Aurora clusters and buckets are, and the newest Amazon Linux 2023 AMI. Reads
//! only.

use aws_sdk_ec2::types::Filter;

use crate::blueprint::Engine;
use crate::init::{BucketSeed, DatabaseSeed, Sources, safe_name};
use crate::provider::ProviderError;

use super::AwsProvider;
use super::names::sdk_message;

impl AwsProvider {
    pub(super) async fn describe(
        &self,
        databases: &[String],
        buckets: &[String],
    ) -> Result<Sources, ProviderError> {
        let c = self.clients();
        let mut out = Sources::default();
        for id in databases {
            if !safe_name(id) {
                return Err(ProviderError::Other(format!(
                    "{id:?} is not an RDS identifier (letters, digits and hyphens)"
                )));
            }
            let mut source = id.clone();
            let seed = match c.rds.describe_db_instances().db_instance_identifier(id).send().await {
                // A member of an Aurora cluster: the cluster is what a run clones.
                Ok(o) if o.db_instances().first().and_then(|i| i.db_cluster_identifier()).is_some() => {
                    let cluster = o.db_instances()[0].db_cluster_identifier().unwrap_or_default();
                    if !safe_name(cluster) {
                        return Err(ProviderError::Other(format!(
                            "`{id}` belongs to an Aurora cluster whose id is not plain"
                        )));
                    }
                    out.notes.push(format!(
                        "`{id}` is an instance of Aurora cluster `{cluster}`: the blueprint clones the cluster"
                    ));
                    source = cluster.to_string();
                    None
                }
                Ok(o) => o.db_instances().first().map(|i| {
                    let engine = i.engine().unwrap_or_default().to_string();
                    (
                        engine.clone(),
                        i.db_name().map(ToString::to_string),
                        format!(
                            "RDS instance `{id}`: {engine} {}, {}, {} GB",
                            i.engine_version().unwrap_or_default(),
                            i.db_instance_class().unwrap_or_default(),
                            i.allocated_storage().unwrap_or_default()
                        ),
                    )
                }),
                Err(e) if e.as_service_error().is_some_and(aws_sdk_rds::operation::describe_db_instances::DescribeDBInstancesError::is_db_instance_not_found_fault) => None,
                Err(e) => {
                    return Err(ProviderError::Other(format!(
                        "describe RDS instance {id}: {}",
                        sdk_message(&e)
                    )));
                }
            };
            let seed = match seed {
                Some(s) => Some(s),
                None => match c.rds.describe_db_clusters().db_cluster_identifier(&source).send().await {
                    Ok(o) => o.db_clusters().first().map(|k| {
                        let engine = k.engine().unwrap_or_default().to_string();
                        (
                            engine.clone(),
                            k.database_name().map(ToString::to_string),
                            format!(
                                "Aurora cluster `{source}`: {engine} {}, {} instance(s)",
                                k.engine_version().unwrap_or_default(),
                                k.db_cluster_members().len()
                            ),
                        )
                    }),
                    Err(e) if e.as_service_error().is_some_and(aws_sdk_rds::operation::describe_db_clusters::DescribeDBClustersError::is_db_cluster_not_found_fault) => None,
                    Err(e) => {
                        return Err(ProviderError::Other(format!(
                            "describe Aurora cluster {id}: {}",
                            sdk_message(&e)
                        )));
                    }
                },
            };
            let Some((engine, db_name, note)) = seed else {
                return Err(ProviderError::Other(format!(
                    "no RDS instance or Aurora cluster `{id}` in {}",
                    self.region
                )));
            };
            let engine = match engine.as_str() {
                "postgres" => Engine::Postgres,
                "mysql" => Engine::Mysql,
                "mariadb" => Engine::Mariadb,
                "aurora-postgresql" => Engine::AuroraPostgresql,
                "aurora-mysql" => Engine::AuroraMysql,
                other => {
                    return Err(ProviderError::Other(format!(
                        "`{id}` runs engine {other:?}, which dryrun does not restore (postgres, mysql, mariadb, aurora-postgresql, aurora-mysql)"
                    )));
                }
            };
            let database = db_name.filter(|d| safe_name(d)).unwrap_or_else(|| {
                if matches!(engine, Engine::Postgres | Engine::AuroraPostgresql) {
                    "postgres".into()
                } else {
                    "app".into()
                }
            });
            out.databases.push(DatabaseSeed {
                source,
                engine,
                database,
                note,
            });
        }
        for b in buckets {
            if !safe_name(b) {
                return Err(ProviderError::Other(format!("{b:?} is not a bucket name")));
            }
            let o = c
                .s3
                .list_objects_v2()
                .bucket(b)
                .max_keys(1)
                .send()
                .await
                .map_err(|e| ProviderError::Other(format!("list s3://{b}: {}", sdk_message(&e))))?;
            out.buckets.push(BucketSeed {
                source: b.clone(),
                note: format!(
                    "S3 bucket `{b}` ({})",
                    if o.contents().is_empty() {
                        "empty"
                    } else {
                        "readable, has objects"
                    }
                ),
            });
        }
        // The newest Amazon Linux 2023 image: the SSM agent, curl and tar are in it.
        let images = c
            .ec2
            .describe_images()
            .owners("amazon")
            .filters(
                Filter::builder()
                    .name("name")
                    .values("al2023-ami-2023*-x86_64")
                    .build(),
            )
            .send()
            .await;
        match images {
            Ok(o) => {
                out.ami = o
                    .images()
                    .iter()
                    .filter(|i| i.image_id().is_some_and(safe_name))
                    .max_by_key(|i| i.creation_date().unwrap_or_default().to_string())
                    .and_then(|i| i.image_id().map(ToString::to_string));
                if out.ami.is_none() {
                    out.notes.push(format!(
                        "no Amazon Linux 2023 AMI found in {}: set params.ami",
                        self.region
                    ));
                }
            }
            Err(e) => out.notes.push(format!(
                "could not look up an Amazon Linux 2023 AMI ({}): set params.ami",
                sdk_message(&e)
            )),
        }
        Ok(out)
    }
}
