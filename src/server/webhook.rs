//! The portal webhook's checks as one pure function, so that they can be unit-tested and
//! fuzzed without a server: signature, timestamp, delivery id, body shape.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::signature;

/// JSON body of the portal webhook.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookBody {
    /// Blueprint path under the blueprints root.
    pub blueprint: String,
    /// Release reference.
    pub release: String,
    /// Blueprint params.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Backup id, `latest` or an RFC 3339 time.
    pub backup: Option<String>,
    /// Where to POST the signed summary.
    pub callback_url: Option<String>,
    /// The release in production, rehearsed first on its own copy of the same backup; the
    /// candidate's check timings are compared with its (`guards.max_p95_regression`).
    pub baseline: Option<String>,
}

/// The request headers that matter.
#[derive(Debug, Clone, Default)]
pub struct HookHeaders<'a> {
    /// `X-Hub-Signature-256`.
    pub signature: Option<&'a str>,
    /// `X-Dryrun-Timestamp` (Unix seconds).
    pub timestamp: Option<&'a str>,
    /// `X-GitHub-Delivery` or `X-Dryrun-Delivery`.
    pub delivery: Option<&'a str>,
    /// `X-GitHub-Event`.
    pub event: Option<&'a str>,
}

/// Why a delivery is refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// 401.
    #[error(
        "missing or invalid X-Hub-Signature-256 (HMAC-SHA256 of the raw body with the shared secret)"
    )]
    Signature,
    /// 401.
    #[error("X-Dryrun-Timestamp is more than {0} s away from the server's clock")]
    Stale(i64),
    /// 400.
    #[error("X-Dryrun-Timestamp must be Unix seconds")]
    BadTimestamp,
    /// 400.
    #[error(
        "missing delivery id: send X-Dryrun-Delivery (or X-GitHub-Delivery) with a unique id per delivery, 1 to 200 characters"
    )]
    Delivery,
    /// 400.
    #[error(
        "body: {0}; expected {{\"blueprint\", \"release\", \"params\"?, \"backup\"?, \"callback_url\"?, \"baseline\"?}}"
    )]
    Body(String),
}

impl Rejection {
    /// HTTP status code.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Rejection::Signature | Rejection::Stale(_) => 401,
            Rejection::BadTimestamp | Rejection::Delivery | Rejection::Body(_) => 400,
        }
    }

    /// Short reason for metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Signature => "signature",
            Rejection::Stale(_) | Rejection::BadTimestamp => "stale",
            Rejection::Delivery => "no_delivery",
            Rejection::Body(_) => "body",
        }
    }
}

/// What a verified delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// GitHub's ping: answer 200, start nothing.
    Ping,
    /// Start a run (after the delivery id is checked against the history).
    Run {
        /// Delivery id.
        delivery: String,
        /// Body.
        body: HookBody,
    },
}

/// Checks a delivery: signature first (nothing else is looked at before it), then the
/// optional timestamp, the delivery id and the body.
///
/// # Errors
/// The first [`Rejection`] that applies.
pub fn verify(
    secret: &[u8],
    h: &HookHeaders<'_>,
    body: &[u8],
    now: i64,
    max_age: i64,
) -> Result<Verified, Rejection> {
    if !signature::verify(secret, body, h.signature.unwrap_or("")) {
        return Err(Rejection::Signature);
    }
    if let Some(ts) = h.timestamp {
        match ts.trim().parse::<i64>() {
            Ok(t) if now.checked_sub(t).is_some_and(|d| d.abs() <= max_age) => {}
            Ok(_) => return Err(Rejection::Stale(max_age)),
            Err(_) => return Err(Rejection::BadTimestamp),
        }
    }
    if h.event == Some("ping") {
        return Ok(Verified::Ping);
    }
    let delivery = h
        .delivery
        .filter(|d| !d.is_empty() && d.len() <= 200)
        .ok_or(Rejection::Delivery)?;
    let body: HookBody =
        serde_json::from_slice(body).map_err(|e| Rejection::Body(e.to_string()))?;
    Ok(Verified::Run {
        delivery: delivery.to_string(),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(sig: &'a str, delivery: &'a str) -> HookHeaders<'a> {
        HookHeaders {
            signature: Some(sig),
            delivery: Some(delivery),
            ..HookHeaders::default()
        }
    }

    #[test]
    fn a_good_delivery_is_verified() {
        let body = br#"{"blueprint":"demo/shop.yaml","release":"demo/releases/v2"}"#;
        let sig = signature::sign(b"k", body);
        let v = verify(b"k", &headers(&sig, "d1"), body, 1000, 300).unwrap();
        let Verified::Run { delivery, body } = v else {
            panic!()
        };
        assert_eq!(delivery, "d1");
        assert_eq!(body.release, "demo/releases/v2");
        assert_eq!(body.baseline, None);
        let body = br#"{"blueprint":"b.yaml","release":"r/next","baseline":"r/current"}"#;
        let sig = signature::sign(b"k", body);
        let Ok(Verified::Run { body, .. }) = verify(b"k", &headers(&sig, "d2"), body, 1000, 300)
        else {
            panic!()
        };
        assert_eq!(body.baseline.as_deref(), Some("r/current"));
    }

    #[test]
    fn the_signature_is_checked_before_anything_else() {
        assert_eq!(
            verify(b"k", &HookHeaders::default(), b"not json", 0, 300),
            Err(Rejection::Signature)
        );
    }

    #[test]
    fn stale_and_future_timestamps_are_refused_and_overflow_is_harmless() {
        let body = b"{}";
        let sig = signature::sign(b"k", body);
        for ts in ["699", "1301", "-9223372036854775808", "9223372036854775807"] {
            let h = HookHeaders {
                timestamp: Some(ts),
                ..headers(&sig, "d")
            };
            assert_eq!(
                verify(b"k", &h, body, 1000, 300),
                Err(Rejection::Stale(300)),
                "{ts}"
            );
        }
        let h = HookHeaders {
            timestamp: Some("soon"),
            ..headers(&sig, "d")
        };
        assert_eq!(
            verify(b"k", &h, body, 1000, 300),
            Err(Rejection::BadTimestamp)
        );
    }
}
