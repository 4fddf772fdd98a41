//! HMAC-SHA256 signatures in GitHub's scheme: `X-Hub-Signature-256: sha256=<hex of
//! HMAC(secret, raw body)>`, used for incoming webhooks and outgoing callbacks alike.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Header that carries the signature.
pub const HEADER: &str = "x-hub-signature-256";

/// `sha256=<hex>` for `body`.
#[must_use]
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` is a valid signature of `body`. The comparison is constant-time
/// (`Mac::verify_slice`), so timing does not reveal how much of a forgery was right.
#[must_use]
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published example ("Validating webhook deliveries").
    #[test]
    fn passes_githubs_published_test_vector() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        let want = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret, body), want);
        assert!(verify(secret, body, want));
    }

    #[test]
    fn forged_or_malformed_signatures_fail() {
        let good = sign(b"k", b"body");
        assert!(!verify(b"k", b"bodY", &good));
        assert!(!verify(b"other", b"body", &good));
        assert!(!verify(b"k", b"body", "sha1=abc"));
        assert!(!verify(b"k", b"body", "sha256=zz"));
        assert!(!verify(b"k", b"body", ""));
    }
}
