//! bucket → S3: a bucket named from the run id, public access blocked, tagged; filled by
//! server-side copies from the production bucket (or prefix) with bounded parallelism;
//! emptied of every version and delete marker before it is deleted.

use std::sync::Arc;

use aws_sdk_s3::types::{
    BucketLocationConstraint, CreateBucketConfiguration, Delete, ObjectIdentifier,
    PublicAccessBlockConfiguration, Tag, Tagging,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::clients::Clients;
use super::names::{self, PREFIX, TAG_RUN, api, sdk_code, sdk_message};
use crate::provider::{Deleted, ProviderError};

/// Server-side copies in flight at once.
const COPY_PARALLELISM: usize = 16;
/// CopyObject's limit; larger objects need a multipart copy, which is not implemented.
const COPY_LIMIT: i64 = 5 * 1024 * 1024 * 1024;

/// A bucket's tags: `None` when the bucket does not exist, an empty list when it has none.
///
/// # Errors
/// API errors other than "no such bucket" / "no tag set".
pub async fn tags(
    c: &Clients,
    bucket: &str,
) -> Result<Option<Vec<(String, String)>>, ProviderError> {
    match c.s3.get_bucket_tagging().bucket(bucket).send().await {
        Ok(out) => Ok(Some(
            out.tag_set()
                .iter()
                .map(|t| (t.key().to_string(), t.value().to_string()))
                .collect(),
        )),
        Err(e) => match sdk_code(&e) {
            Some("NoSuchBucket") => Ok(None),
            Some("NoSuchTagSet" | "NoSuchTagSetError") => Ok(Some(Vec::new())),
            _ => Err(ProviderError::Other(format!(
                "read the tags of s3 bucket {bucket}: {}",
                sdk_message(&e)
            ))),
        },
    }
}

fn run_tag(tags: &[(String, String)]) -> Option<&str> {
    names::tag_value(tags.iter().map(|(k, v)| (k.as_str(), v.as_str())), TAG_RUN)
}

/// Creates the run's bucket: tagged (at creation where S3 supports it, and again with
/// PutBucketTagging), every public-access block on. A bucket of that name that already exists
/// is adopted only if it carries the run's tag (a retried create).
///
/// # Errors
/// The guard, API errors.
pub async fn create(
    c: &Clients,
    bucket: &str,
    tag_list: &[(String, String)],
    run_id: &str,
) -> Result<(), ProviderError> {
    let what = format!("s3 bucket {bucket}");
    if let Some(existing) = tags(c, bucket).await? {
        names::owned(&what, bucket, run_id, &existing, None)?;
        return Ok(());
    }
    let s3_tags: Vec<Tag> = tag_list
        .iter()
        .filter_map(|(k, v)| Tag::builder().key(k).value(v).build().ok())
        .collect();
    let mut cfg = CreateBucketConfiguration::builder().set_tags(Some(s3_tags.clone()));
    if c.region != "us-east-1" {
        cfg = cfg.location_constraint(BucketLocationConstraint::from(c.region.as_str()));
    }
    match c
        .s3
        .create_bucket()
        .bucket(bucket)
        .create_bucket_configuration(cfg.build())
        .send()
        .await
    {
        Ok(_) => {}
        Err(e) if sdk_code(&e) == Some("BucketAlreadyOwnedByYou") => {
            let existing = tags(c, bucket).await?.unwrap_or_default();
            names::owned(&what, bucket, run_id, &existing, None)?;
        }
        Err(e) => {
            return Err(ProviderError::Other(format!(
                "create {what}: {}",
                sdk_message(&e)
            )));
        }
    }
    let tagging = Tagging::builder()
        .set_tag_set(Some(s3_tags))
        .build()
        .map_err(|e| ProviderError::Other(format!("tags of {what}: {e}")))?;
    c.s3.put_bucket_tagging()
        .bucket(bucket)
        .tagging(tagging)
        .send()
        .await
        .map_err(api(format!("tag {what}")))?;
    c.s3.put_public_access_block()
        .bucket(bucket)
        .public_access_block_configuration(
            PublicAccessBlockConfiguration::builder()
                .block_public_acls(true)
                .ignore_public_acls(true)
                .block_public_policy(true)
                .restrict_public_buckets(true)
                .build(),
        )
        .send()
        .await
        .map_err(api(format!("block public access to {what}")))?;
    Ok(())
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Copied {
    /// Objects copied.
    pub objects: u64,
    /// Bytes copied.
    pub bytes: u64,
}

/// Pages through the objects of `source` under `prefix` (1 000 per request).
fn listing(
    c: &Clients,
    source: &str,
    prefix: Option<&str>,
) -> aws_sdk_s3::operation::list_objects_v2::paginator::ListObjectsV2Paginator {
    c.s3.list_objects_v2()
        .bucket(source)
        .set_prefix(prefix.map(ToString::to_string))
        .into_paginator()
}

/// Counts the objects a copy of `source` (under `prefix`) would copy, and their bytes. Reads
/// only: one LIST per 1 000 objects.
///
/// # Errors
/// API errors (the bucket does not exist, access denied).
pub async fn measure(
    c: &Clients,
    source: &str,
    prefix: Option<&str>,
) -> Result<(u64, u64), ProviderError> {
    let mut pages = listing(c, source, prefix).send();
    let (mut n, mut bytes) = (0u64, 0u64);
    while let Some(page) = pages.next().await {
        let page = page.map_err(api(format!("list production bucket {source}")))?;
        for obj in page.contents() {
            n += 1;
            bytes += u64::try_from(obj.size().unwrap_or(0)).unwrap_or(0);
        }
    }
    Ok((n, bytes))
}

/// Copies every object of `source` (under `prefix`) into `dest`, server-side, at most
/// [`COPY_PARALLELISM`] at a time, page by page. `source` is only read.
///
/// # Errors
/// The first failed copy or listing; [`ProviderError::Cancelled`].
pub async fn copy_all(
    c: &Clients,
    source: &str,
    prefix: Option<&str>,
    dest: &str,
    cancel: &CancellationToken,
) -> Result<Copied, ProviderError> {
    let sem = Arc::new(Semaphore::new(COPY_PARALLELISM));
    let mut set: JoinSet<Result<u64, ProviderError>> = JoinSet::new();
    let mut copied = Copied::default();
    let mut pages = listing(c, source, prefix).send();
    loop {
        let page = tokio::select! {
            p = pages.next() => p,
            () = cancel.cancelled() => return Err(ProviderError::Cancelled),
        };
        let Some(page) = page else { break };
        let page = page.map_err(api(format!("list production bucket {source}")))?;
        for obj in page.contents() {
            let Some(key) = obj.key() else { continue };
            let size = obj.size().unwrap_or(0);
            if size > COPY_LIMIT {
                return Err(ProviderError::Other(format!(
                    "s3://{source}/{key} is {size} bytes; copies above 5 GiB (multipart copy) are not supported yet"
                )));
            }
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => p.map_err(|e| ProviderError::Other(e.to_string()))?,
                () = cancel.cancelled() => return Err(ProviderError::Cancelled),
            };
            let s3 = c.s3.clone();
            let key = key.to_string();
            let src = format!("{source}/{}", encode_key(&key));
            let dest = dest.to_string();
            set.spawn(async move {
                let _permit = permit;
                s3.copy_object()
                    .bucket(&dest)
                    .key(&key)
                    .copy_source(src)
                    .send()
                    .await
                    .map_err(api(format!("copy {key} into s3 bucket {dest}")))?;
                Ok(u64::try_from(size).unwrap_or(0))
            });
            // Reap finished copies so that an early error stops the listing.
            while let Some(done) = set.try_join_next() {
                copied.bytes += done.map_err(|e| ProviderError::Other(e.to_string()))??;
                copied.objects += 1;
            }
        }
    }
    while let Some(done) = set.join_next().await {
        copied.bytes += done.map_err(|e| ProviderError::Other(e.to_string()))??;
        copied.objects += 1;
    }
    Ok(copied)
}

/// Empties (every version and delete marker) and deletes a bucket of this run.
///
/// `journaled_name`: the caller has the bucket from this run's journal under the name
/// [`names::bucket_name`] gives for this run. Such a bucket may lack its tags — CreateBucket
/// and PutBucketTagging are two calls, and a crash can fall between them (tests/aws_faults.rs
/// crashes there) — and is then deleted if it is also empty: nothing but this run makes a
/// bucket of that name, and nothing was copied into it before the tags were set.
///
/// # Errors
/// The guard (another run's tag, or no tag when not `journaled_name` and empty), API errors.
pub async fn delete(
    c: &Clients,
    bucket: &str,
    run_id: &str,
    journaled_name: bool,
) -> Result<Deleted, ProviderError> {
    let what = format!("s3 bucket {bucket}");
    let Some(existing) = tags(c, bucket).await? else {
        return Ok(Deleted::AlreadyGone);
    };
    if existing.is_empty() && journaled_name {
        let page =
            c.s3.list_object_versions()
                .bucket(bucket)
                .max_keys(1)
                .send()
                .await
                .map_err(api(format!("list the versions in {what}")))?;
        if !page.versions().is_empty() || !page.delete_markers().is_empty() {
            return Err(ProviderError::Guard(format!(
                "{what}: it has no {TAG_RUN} tag and is not empty; check who uses it, then delete it by hand"
            )));
        }
        return match c.s3.delete_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(Deleted::Destroyed),
            Err(e) if sdk_code(&e) == Some("NoSuchBucket") => Ok(Deleted::AlreadyGone),
            Err(e) => Err(ProviderError::Other(format!(
                "delete {what}: {}",
                sdk_message(&e)
            ))),
        };
    }
    names::owned(&what, bucket, run_id, &existing, None)?;
    let mut key_marker: Option<String> = None;
    let mut version_marker: Option<String> = None;
    loop {
        let page =
            c.s3.list_object_versions()
                .bucket(bucket)
                .set_key_marker(key_marker.clone())
                .set_version_id_marker(version_marker.clone())
                .send()
                .await
                .map_err(api(format!("list the versions in {what}")))?;
        let mut ids: Vec<ObjectIdentifier> = Vec::new();
        for v in page.versions() {
            if let Some(k) = v.key() {
                ids.extend(
                    ObjectIdentifier::builder()
                        .key(k)
                        .set_version_id(v.version_id().map(ToString::to_string))
                        .build()
                        .ok(),
                );
            }
        }
        for m in page.delete_markers() {
            if let Some(k) = m.key() {
                ids.extend(
                    ObjectIdentifier::builder()
                        .key(k)
                        .set_version_id(m.version_id().map(ToString::to_string))
                        .build()
                        .ok(),
                );
            }
        }
        for chunk in ids.chunks(1000) {
            let del = Delete::builder()
                .set_objects(Some(chunk.to_vec()))
                .quiet(true)
                .build()
                .map_err(|e| ProviderError::Other(format!("delete request for {what}: {e}")))?;
            let out =
                c.s3.delete_objects()
                    .bucket(bucket)
                    .delete(del)
                    .send()
                    .await
                    .map_err(api(format!("empty {what}")))?;
            if let Some(err) = out.errors().first() {
                return Err(ProviderError::Other(format!(
                    "empty {what}: {} could not be deleted: {}",
                    err.key().unwrap_or("?"),
                    err.message().unwrap_or("no reason given")
                )));
            }
        }
        if page.is_truncated() == Some(true) {
            key_marker = page.next_key_marker().map(ToString::to_string);
            version_marker = page.next_version_id_marker().map(ToString::to_string);
        } else {
            break;
        }
    }
    match c.s3.delete_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(Deleted::Destroyed),
        Err(e) if sdk_code(&e) == Some("NoSuchBucket") => Ok(Deleted::AlreadyGone),
        Err(e) => Err(ProviderError::Other(format!(
            "delete {what}: {}",
            sdk_message(&e)
        ))),
    }
}

/// Buckets named `dryrun-…` in the provider's region that carry a run tag (`run_id` given:
/// that run's), with their tags.
///
/// # Errors
/// API errors.
pub async fn tagged(
    c: &Clients,
    run_id: Option<&str>,
) -> Result<Vec<(String, Vec<(String, String)>)>, ProviderError> {
    let mut out = Vec::new();
    let mut pages =
        c.s3.list_buckets()
            .bucket_region(&c.region)
            .prefix(PREFIX)
            .into_paginator()
            .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(api("list s3 buckets"))?;
        for b in page.buckets() {
            let Some(name) = b.name() else { continue };
            if !name.starts_with(PREFIX) {
                continue;
            }
            let Some(t) = tags(c, name).await? else {
                continue;
            };
            if let Some(tag) = run_tag(&t)
                && run_id.is_none_or(|r| r == tag)
            {
                out.push((name.to_string(), t));
            }
        }
    }
    Ok(out)
}

/// Downloads an object (the release) into `dest`.
///
/// # Errors
/// API and I/O errors.
pub async fn download(
    c: &Clients,
    bucket: &str,
    key: &str,
    dest: &std::path::Path,
) -> Result<(), ProviderError> {
    let out =
        c.s3.get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(api(format!("get s3://{bucket}/{key}")))?;
    let data = out
        .body
        .collect()
        .await
        .map_err(|e| ProviderError::Other(format!("read s3://{bucket}/{key}: {e}")))?
        .into_bytes();
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(ProviderError::io(format!("create {}", dir.display())))?;
    }
    tokio::fs::write(dest, &data)
        .await
        .map_err(ProviderError::io(format!("write {}", dest.display())))
}

/// A presigned GET URL for the release object, valid for `ttl`.
///
/// # Errors
/// Presigning errors.
pub async fn presign_get(
    c: &Clients,
    bucket: &str,
    key: &str,
    ttl: std::time::Duration,
) -> Result<String, ProviderError> {
    let cfg = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl)
        .map_err(|e| ProviderError::Other(format!("presign s3://{bucket}/{key}: {e}")))?;
    let req =
        c.s3.get_object()
            .bucket(bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(api(format!("presign s3://{bucket}/{key}")))?;
    Ok(req.uri().to_string())
}

/// Percent-encodes a key for `x-amz-copy-source`, keeping `/`.
fn encode_key(key: &str) -> String {
    crate::secret::percent_encode(key, b"/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn copy_source_keys_are_percent_encoded() {
        assert_eq!(super::encode_key("img/a b+c.png"), "img/a%20b%2Bc.png");
    }
}
