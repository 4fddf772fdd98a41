//! SDK clients: one set per region, built from the standard configuration chain, with the
//! standard retry mode and an interceptor that counts every request sent.
//!
//! Retries: the SDK's standard mode (exponential backoff with jitter, a retry quota) retries
//! throttling errors, HTTP 5xx answers and dropped connections; every other error fails the call
//! at once. [`max_attempts`] is 10 per call unless `AWS_MAX_ATTEMPTS` says otherwise: with the
//! SDK's default of 3, a burst of throttling (30 % of calls answered `Throttling` in
//! tests/aws_faults.rs) fails a run of ~70 calls most of the time; with 10 it practically never
//! does, at a worst-case wait of about two minutes for one call.
//!
//! The retry quota: every retry takes tokens from a bucket (5 for throttling, more for a
//! dropped connection), a call that succeeds at once gives one back, and an empty bucket stops
//! all retrying. The SDK's default bucket (500 tokens, one per service for the whole process)
//! never refills with time: a long throttling burst empties it, and from then on every call
//! fails at its first error — teardown's deletes and the sweep included, which then leave the
//! copy behind, and in a long-lived `dryrun serve` every later run as well. Each region's
//! clients here have their own buckets ([`retry_partition`]) of the same size that also refill
//! [`RETRY_QUOTA_REFILL`] tokens a second, so a pause (teardown waits 2 s and 8 s between
//! attempts) gives retries back while a storm of them stays bounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::ConfigBag;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;

/// Attempts per call when `AWS_MAX_ATTEMPTS` does not say (see the module docs).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

/// Tokens in each service's retry bucket (the SDK's default size).
const RETRY_QUOTA: usize = 500;
/// Tokens a retry bucket gets back each second (see the module docs).
const RETRY_QUOTA_REFILL: f32 = 10.0;

/// `service`'s retry partition in `region`: its own bucket, refilled with time.
fn retry_partition(service: &str, region: &str) -> aws_sdk_ec2::config::retry::RetryPartition {
    use aws_sdk_ec2::config::retry::{RetryPartition, TokenBucket};
    RetryPartition::custom(format!("dryrun-{service}-{region}"))
        .token_bucket(
            TokenBucket::builder()
                .capacity(RETRY_QUOTA)
                .refill_rate(RETRY_QUOTA_REFILL)
                .build(),
        )
        .build()
}

/// Attempts per call: `AWS_MAX_ATTEMPTS` (1–100) if set, else [`DEFAULT_MAX_ATTEMPTS`].
#[must_use]
pub fn max_attempts() -> u32 {
    std::env::var("AWS_MAX_ATTEMPTS")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|n| (1..=100).contains(n))
        .unwrap_or(DEFAULT_MAX_ATTEMPTS)
}

/// Whether an operation changes something (everything but Describe/List/Get/Head calls).
fn mutates(operation: &str) -> bool {
    !["Describe", "List", "Get", "Head"]
        .iter()
        .any(|p| operation.starts_with(p))
}

fn operation(cfg: &ConfigBag) -> (String, bool) {
    cfg.load::<Metadata>().map_or_else(
        || ("unknown".to_string(), true),
        |m| (format!("{}.{}", m.service(), m.name()), mutates(m.name())),
    )
}

/// Counts requests by `Service.Operation`; every attempt counts (a retried call costs twice).
/// With the `failpoints` feature, every attempt of a mutating call is also a crash point,
/// before it is sent and after its answer arrived (the service acted, dryrun has not yet
/// heard): `aws: before Ec2.RunInstances`, `aws: after Ec2.RunInstances`.
#[derive(Debug, Clone, Default)]
pub struct CallCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl CallCounter {
    /// Counts so far.
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "dryrun-call-counter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // Presigning runs the same pipeline up to here but sends nothing; its signature is in
        // the query string instead of a header.
        if context.request().uri().contains("X-Amz-Signature=") {
            return Ok(());
        }
        let (op, mutating) = operation(cfg);
        if mutating {
            crate::failpoint::point(&format!("aws: before {op}"));
        }
        tracing::debug!(operation = %op, "aws request");
        *self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(op)
            .or_default() += 1;
        Ok(())
    }

    fn read_after_transmit(
        &self,
        _context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let (op, mutating) = operation(cfg);
        if mutating {
            crate::failpoint::point(&format!("aws: after {op}"));
        }
        Ok(())
    }
}

/// The clients of one region.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Region name.
    pub region: String,
    /// EC2.
    pub ec2: aws_sdk_ec2::Client,
    /// RDS.
    pub rds: aws_sdk_rds::Client,
    /// S3.
    pub s3: aws_sdk_s3::Client,
    /// SSM.
    pub ssm: aws_sdk_ssm::Client,
    /// STS (account id only).
    pub sts: aws_sdk_sts::Client,
}

/// Shared SDK configuration and a cache of per-region clients.
#[derive(Debug)]
pub struct Connection {
    base: aws_config::SdkConfig,
    /// Endpoint override (emulators); S3 then uses path-style addressing.
    pub endpoint: Option<String>,
    counter: CallCounter,
    by_region: Mutex<HashMap<String, Clients>>,
}

impl Connection {
    /// The secret parts of the credentials the chain resolves to (secret access key, session
    /// token), for the redactor of every run; none when they cannot be resolved within 10 s
    /// (the run then fails on its first call anyway, with the SDK's message).
    pub async fn credential_secrets(&self) -> Vec<crate::secret::Secret> {
        use aws_sdk_s3::config::ProvideCredentials as _;
        let Some(p) = self.base.credentials_provider() else {
            return Vec::new();
        };
        match tokio::time::timeout(Duration::from_secs(10), p.provide_credentials()).await {
            Ok(Ok(c)) => std::iter::once(c.secret_access_key())
                .chain(c.session_token())
                .map(crate::secret::Secret::new)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Loads the standard chain (environment, profile, SSO, instance role). `region` overrides
    /// the chain's region; `endpoint` (else `AWS_ENDPOINT_URL`) points every client at an
    /// emulator.
    pub async fn load(region: Option<String>, endpoint: Option<String>) -> Connection {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(max_attempts()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .build(),
            );
        if let Some(r) = region {
            loader = loader.region(aws_config::Region::new(r));
        }
        let endpoint = endpoint.filter(|e| !e.is_empty()).or_else(|| {
            std::env::var("AWS_ENDPOINT_URL")
                .ok()
                .filter(|e| !e.is_empty())
        });
        if let Some(e) = &endpoint {
            loader = loader.endpoint_url(e);
        }
        let base = loader.load().await;
        Connection {
            base,
            endpoint,
            counter: CallCounter::default(),
            by_region: Mutex::new(HashMap::new()),
        }
    }

    /// The configured region, if the chain found one.
    #[must_use]
    pub fn default_region(&self) -> Option<String> {
        self.base.region().map(ToString::to_string)
    }

    /// Request counts so far.
    #[must_use]
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.counter.snapshot()
    }

    /// Clients for `region` (cached).
    #[must_use]
    pub fn clients(&self, region: &str) -> Clients {
        let mut map = self
            .by_region
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = map.get(region) {
            return c.clone();
        }
        let r = aws_config::Region::new(region.to_string());
        let counter = self.counter.clone();
        let ec2 = aws_sdk_ec2::config::Builder::from(&self.base)
            .region(r.clone())
            .retry_partition(retry_partition("ec2", region))
            .interceptor(counter.clone())
            .build();
        let rds = aws_sdk_rds::config::Builder::from(&self.base)
            .region(r.clone())
            .retry_partition(retry_partition("rds", region))
            .interceptor(counter.clone())
            .build();
        let s3 = aws_sdk_s3::config::Builder::from(&self.base)
            .region(r.clone())
            .retry_partition(retry_partition("s3", region))
            .force_path_style(self.endpoint.is_some())
            .interceptor(counter.clone())
            .build();
        let ssm = aws_sdk_ssm::config::Builder::from(&self.base)
            .region(r.clone())
            .retry_partition(retry_partition("ssm", region))
            .interceptor(counter.clone())
            .build();
        let sts = aws_sdk_sts::config::Builder::from(&self.base)
            .region(r)
            .retry_partition(retry_partition("sts", region))
            .interceptor(counter)
            .build();
        let c = Clients {
            region: region.to_string(),
            ec2: aws_sdk_ec2::Client::from_conf(ec2),
            rds: aws_sdk_rds::Client::from_conf(rds),
            s3: aws_sdk_s3::Client::from_conf(s3),
            ssm: aws_sdk_ssm::Client::from_conf(ssm),
            sts: aws_sdk_sts::Client::from_conf(sts),
        };
        map.insert(region.to_string(), c.clone());
        c
    }
}
