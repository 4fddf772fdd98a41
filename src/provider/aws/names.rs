//! Names, tags and error text: everything that makes a created resource recognisable as this
//! run's, from another process and without a journal.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::provider::{ProviderError, RunInfo};

/// Tag that carries the run id. Cleanup by tag and the production guard key on it.
pub const TAG_RUN: &str = "dryrun:run-id";
/// Tag with the blueprint name.
pub const TAG_BLUEPRINT: &str = "dryrun:blueprint";
/// Tag with the time after which `dryrun cleanup --expired` may reap the resource (RFC 3339).
pub const TAG_EXPIRES: &str = "dryrun:expires-at";
/// Tag naming the tool and version that created the resource.
pub const TAG_CREATED_BY: &str = "dryrun:created-by";
/// Tag with the blueprint address (`service.app`), used to reconcile retried creates.
pub const TAG_RESOURCE: &str = "dryrun:resource";

/// Prefix of every name dryrun gives a resource.
pub const PREFIX: &str = "dryrun-";

/// The tags every created resource carries, in order: run id, blueprint, expiry, creator,
/// resource address, `Name`.
#[must_use]
pub fn tags(run: &RunInfo, address: &str, name: &str) -> Vec<(String, String)> {
    vec![
        (TAG_RUN.into(), run.run_id.clone()),
        (TAG_BLUEPRINT.into(), run.blueprint.clone()),
        (
            TAG_EXPIRES.into(),
            run.expires_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
        (
            TAG_CREATED_BY.into(),
            format!("dryrun {}", env!("CARGO_PKG_VERSION")),
        ),
        (TAG_RESOURCE.into(), address.into()),
        ("Name".into(), name.into()),
    ]
}

/// A name made of lower-case letters, digits and single hyphens, at most `max` characters,
/// starting with a letter. Deterministic; long inputs keep their start and get a hash suffix,
/// so two different inputs never collapse into the same name.
#[must_use]
pub fn dns_name(parts: &[&str], max: usize) -> String {
    let joined = parts.join("-");
    let mut s = String::with_capacity(joined.len());
    for c in joined.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (s.is_empty() || s.ends_with('-')) {
            continue;
        }
        s.push(c);
    }
    while s.ends_with('-') {
        s.pop();
    }
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s.insert_str(0, "d-");
    }
    if s.len() > max {
        let digest = Sha256::digest(joined.as_bytes());
        let mut h = String::new();
        for b in &digest[..4] {
            let _ = write!(h, "{b:02x}");
        }
        s.truncate(max - h.len() - 1);
        while s.ends_with('-') {
            s.pop();
        }
        s.push('-');
        s.push_str(&h);
    }
    s
}

/// RDS instance identifier of a database resource (63 characters at most).
#[must_use]
pub fn db_instance_id(run_id: &str, name: &str) -> String {
    dns_name(&["dryrun", run_id, name], 63)
}

/// RDS instance identifier of the writer in an Aurora database resource's cluster (the cluster
/// takes [`db_instance_id`]).
#[must_use]
pub fn db_cluster_instance_id(run_id: &str, name: &str) -> String {
    dns_name(&["dryrun", run_id, name, "writer"], 63)
}

/// S3 bucket name of a bucket resource (valid and deterministic; 63 characters at most).
#[must_use]
pub fn bucket_name(run_id: &str, name: &str) -> String {
    dns_name(&["dryrun", run_id, name], 63)
}

/// Name of the run's security group.
#[must_use]
pub fn security_group_name(run_id: &str) -> String {
    dns_name(&["dryrun", run_id], 255)
}

/// `ClientToken` of a service's RunInstances (64 characters at most): a retried create with the
/// same token makes no second instance on AWS.
#[must_use]
pub fn client_token(run_id: &str, name: &str) -> String {
    dns_name(&["dryrun", run_id, name], 64)
}

/// `s3://BUCKET/KEY` → (bucket, key).
#[must_use]
pub fn parse_s3_url(s: &str) -> Option<(String, String)> {
    let rest = s.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then(|| (bucket.to_string(), key.to_string()))
}

/// The value of `key` in a tag list.
pub fn tag_value<'a>(
    tags: impl IntoIterator<Item = (&'a str, &'a str)>,
    key: &str,
) -> Option<&'a str> {
    tags.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// The production guard: a mutation is allowed only on a resource whose `dryrun:run-id` tag is
/// the run's own. `what` names the resource (`rds instance prod-db`).
///
/// # Errors
/// [`ProviderError::Guard`] naming the resource and what its tag says.
pub fn guard(what: &str, run_id: &str, tag: Option<&str>) -> Result<(), ProviderError> {
    match tag {
        Some(t) if t == run_id && !run_id.is_empty() => Ok(()),
        Some(t) => Err(ProviderError::Guard(format!(
            "{what}: its {TAG_RUN} tag is `{t}`, not `{run_id}`"
        ))),
        None => Err(ProviderError::Guard(format!(
            "{what}: it has no {TAG_RUN} tag"
        ))),
    }
}

/// How much earlier than its run's start a resource may say it was created (clocks differ).
const CLOCK_SKEW_SECS: i64 = 600;

/// When a run started, read from its id (`BLUEPRINT-YYYYMMDD-HHMMSS-XXXXXXXX`, UTC); `None` for an
/// id of another shape (a `--run-id` given by hand).
#[must_use]
pub fn run_started(run_id: &str) -> Option<DateTime<Utc>> {
    let mut parts = run_id.rsplitn(4, '-');
    let _suffix = parts.next()?;
    let time = parts.next()?;
    let date = parts.next()?;
    parts.next()?;
    if date.len() != 8 || time.len() != 6 {
        return None;
    }
    chrono::NaiveDateTime::parse_from_str(&format!("{date}{time}"), "%Y%m%d%H%M%S")
        .ok()
        .map(|t| t.and_utc())
}

/// The ownership proof before any change to a resource: it is this run's only if
/// - it carries `dryrun:run-id` = the run (checked first, so the usual refusal names the tag),
/// - its name or identifier starts with [`PREFIX`] (a production resource that merely got
///   tagged — by mistake or by an attacker — has its own name),
/// - it carries `dryrun:created-by` (every tag set dryrun writes has it),
/// - and, where the cloud reports a creation time and the run id holds a start time, it was
///   not created before the run started (give or take clock skew).
///
/// `what` names the resource in the refusal (`rds instance prod-db`), `name` is its name or
/// identifier (for an EC2 instance its `Name` tag).
///
/// # Errors
/// [`ProviderError::Guard`] saying which condition failed.
pub fn owned(
    what: &str,
    name: &str,
    run_id: &str,
    tags: &[(String, String)],
    created: Option<DateTime<Utc>>,
) -> Result<(), ProviderError> {
    let get = |k: &str| tag_value(tags.iter().map(|(a, b)| (a.as_str(), b.as_str())), k);
    guard(what, run_id, get(TAG_RUN))?;
    if !name.starts_with(PREFIX) {
        return Err(ProviderError::Guard(format!(
            "{what}: its name `{name}` does not start with `{PREFIX}`, so it is not a copy dryrun made, whatever its tags say"
        )));
    }
    if !get(TAG_CREATED_BY).is_some_and(|v| v.starts_with("dryrun")) {
        return Err(ProviderError::Guard(format!(
            "{what}: it has no {TAG_CREATED_BY} tag"
        )));
    }
    if let (Some(c), Some(s)) = (created, run_started(run_id))
        && c < s - chrono::Duration::seconds(CLOCK_SKEW_SECS)
    {
        return Err(ProviderError::Guard(format!(
            "{what}: it was created at {}, before run {run_id} started ({})",
            c.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            s.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )));
    }
    Ok(())
}

/// An AWS timestamp as a chrono time.
#[must_use]
pub fn time_of(t: &aws_sdk_s3::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// Error codes the SDK's standard retry mode treats as throttling.
const THROTTLING: [&str; 8] = [
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "SlowDown",
    "RequestThrottled",
];

/// A readable message for an SDK error: the service's code and message when there is one,
/// else the full error chain. Errors the SDK retries (throttling, HTTP 5xx, no answer) reach
/// here only after every attempt failed, and the message says so.
pub fn sdk_message<E>(e: &aws_sdk_s3::error::SdkError<E>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::error::ProvideErrorMetadata as _;
    use aws_sdk_s3::error::SdkError;
    let base = match (e.code(), e.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_string(),
        _ => match e.raw_response().map(|r| r.status().as_u16()) {
            Some(s) if s >= 500 => format!("HTTP {s} without an error code"),
            _ => aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
        },
    };
    let throttled = e.code().is_some_and(|c| THROTTLING.contains(&c));
    let server = e.raw_response().is_some_and(|r| r.status().as_u16() >= 500);
    let no_answer = matches!(e, SdkError::TimeoutError(_) | SdkError::DispatchFailure(_));
    let attempts = super::clients::max_attempts();
    if throttled {
        format!(
            "{base} (AWS throttled all {attempts} attempts, with backoff; run again later, ask for a higher API rate limit, or raise AWS_MAX_ATTEMPTS)"
        )
    } else if server || no_answer {
        format!(
            "{base} (failed all {attempts} attempts, with backoff: the AWS endpoint is unavailable or unreachable; run again later)"
        )
    } else {
        base
    }
}

/// The service's error code of an SDK error, if any.
pub fn sdk_code<E>(e: &aws_sdk_s3::error::SdkError<E>) -> Option<&str>
where
    E: aws_sdk_s3::error::ProvideErrorMetadata,
{
    use aws_sdk_s3::error::ProvideErrorMetadata as _;
    e.code()
}

/// Wraps an SDK error as a provider error that says what was being done.
pub fn api<E>(
    what: impl std::fmt::Display,
) -> impl FnOnce(aws_sdk_s3::error::SdkError<E>) -> ProviderError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    move |e| ProviderError::Other(format!("{what}: {}", sdk_message(&e)))
}

/// Standard base64 (user data must be base64 in RunInstances).
#[must_use]
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_deterministic_and_bounded() {
        let id = "shop_blue-20261122-025412-0503";
        let b = bucket_name(id, "assets");
        assert_eq!(b, "dryrun-shop-blue-20261122-025412-0503-assets");
        assert_eq!(b, bucket_name(id, "assets"));
        let long = bucket_name(&"x".repeat(80), "assets");
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, bucket_name(&"x".repeat(81), "assets"));
        assert!(!long.contains("--") && !long.ends_with('-'));
        assert!(client_token(&"y".repeat(100), "app").len() <= 64);
    }

    #[test]
    fn guard_refuses_untagged_and_foreign_resources() {
        assert!(guard("rds instance a", "r1", Some("r1")).is_ok());
        let e = guard("rds instance prod-db", "r1", None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "refusing to modify rds instance prod-db: it has no dryrun:run-id tag: it was not created by this run"
        );
        let e = guard("s3 bucket x", "r1", Some("r2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`r2`"), "{e}");
    }

    #[test]
    fn ownership_needs_the_prefix_the_tags_and_a_creation_after_the_run_started() {
        let run = "shop-20261122-025412-0503";
        let tags = |run_id: &str, creator: bool| {
            let mut t = vec![(TAG_RUN.to_string(), run_id.to_string())];
            if creator {
                t.push((TAG_CREATED_BY.to_string(), "dryrun 0.1.0".to_string()));
            }
            t
        };
        let at = |s: &str| Some(s.parse::<DateTime<Utc>>().unwrap());
        assert_eq!(run_started(run), at("2026-11-22T02:54:12Z"));
        assert_eq!(run_started("other-run"), None);
        let ok = owned(
            "rds instance dryrun-x",
            "dryrun-x",
            run,
            &tags(run, true),
            at("2026-11-22T03:00:00Z"),
        );
        assert!(ok.is_ok());
        for (name, t, created, want) in [
            (
                "shop-prod",
                tags(run, true),
                at("2026-11-22T03:00:00Z"),
                "does not start with `dryrun-`",
            ),
            (
                "dryrun-x",
                tags(run, false),
                None,
                "no dryrun:created-by tag",
            ),
            ("dryrun-x", tags("other", true), None, "tag is `other`"),
            ("dryrun-x", Vec::new(), None, "has no dryrun:run-id tag"),
            (
                "dryrun-x",
                tags(run, true),
                at("2024-01-01T00:00:00Z"),
                "before run",
            ),
        ] {
            let e = owned("rds instance x", name, run, &t, created)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
        // A few minutes of clock skew are tolerated.
        assert!(
            owned(
                "x",
                "dryrun-x",
                run,
                &tags(run, true),
                at("2026-11-22T02:50:00Z")
            )
            .is_ok()
        );
    }

    #[test]
    fn s3_urls_and_base64() {
        assert_eq!(
            parse_s3_url("s3://b/k/x.tar.gz"),
            Some(("b".into(), "k/x.tar.gz".into()))
        );
        assert_eq!(parse_s3_url("s3://b/"), None);
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hi!"), "aGkh");
        assert_eq!(base64(b"h"), "aA==");
    }
}
