//! Secrets: values that must never reach a terminal, a log, a report or the journal.
//!
//! A [`Secret`] prints as `[redacted]` through both `Debug` and `Display` and has no serde
//! implementation, so putting one in a report or the journal does not compile. Values that have to
//! leave the type (a password handed to a child process's environment, a rendered template that
//! contains a token) are registered with the run's [`Redactor`], and every string that goes to a
//! view passes through [`Redactor::redact`] first.

use std::fmt;
use std::sync::{Arc, RwLock};

/// A secret value. `Debug` and `Display` print `[redacted]`; there is no `Serialize`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    #[must_use]
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Generates a random secret of `len` URL-safe characters (a fresh password for a copy).
    #[must_use]
    pub fn generate(len: usize) -> Self {
        use rand::RngExt as _;
        const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
        let mut rng = rand::rng();
        let s = (0..len)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        Secret(s)
    }

    /// The raw value. Call only where the value leaves for its one legitimate use.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Replaces every known secret value in a string with `[redacted]`.
///
/// Shared by everything in a run (cheap to clone). Values shorter than four characters are not
/// registered: redacting them would mangle ordinary output and they protect nothing.
#[derive(Clone, Default)]
pub struct Redactor {
    values: Arc<RwLock<Vec<String>>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.values.read().map(|v| v.len()).unwrap_or(0);
        write!(f, "Redactor({n} values)")
    }
}

impl Redactor {
    /// An empty redactor.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a secret; its raw, URL-encoded, hex and base64 forms are redacted from then
    /// on (an encoded secret in a log is as good as the secret).
    pub fn register(&self, secret: &Secret) {
        let raw = secret.expose();
        if raw.len() < 4 {
            return;
        }
        use base64::Engine as _;
        let b = raw.as_bytes();
        let forms = [
            raw.to_string(),
            url_encode(raw),
            hex::encode(b),
            hex::encode_upper(b),
            base64::engine::general_purpose::STANDARD.encode(b),
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(b),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
        ];
        if let Ok(mut v) = self.values.write() {
            for f in forms {
                if !v.contains(&f) {
                    v.push(f);
                }
            }
            // Longest first, so a secret that contains another is replaced whole.
            v.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// `text` with every registered value replaced by `[redacted]`.
    #[must_use]
    pub fn redact(&self, text: &str) -> String {
        let Ok(values) = self.values.read() else {
            return text.to_string();
        };
        let mut out = text.to_string();
        for v in values.iter() {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), "[redacted]");
            }
        }
        out
    }
}

fn url_encode(s: &str) -> String {
    percent_encode(s, b"")
}

/// Percent-encodes every byte but the RFC 3986 unreserved ones and those in `keep`.
#[must_use]
pub fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
    }

    #[test]
    fn redactor_replaces_raw_and_url_encoded_forms() {
        let r = Redactor::new();
        r.register(&Secret::new("p@ss word"));
        assert_eq!(
            r.redact("a p@ss word b p%40ss%20word"),
            "a [redacted] b [redacted]"
        );
    }

    #[test]
    fn redactor_replaces_hex_and_base64_forms() {
        let r = Redactor::new();
        r.register(&Secret::new("canary-123"));
        let text = "a 63616e6172792d313233 b Y2FuYXJ5LTEyMw== c";
        assert_eq!(r.redact(text), "a [redacted] b [redacted] c");
    }

    #[test]
    fn generated_secrets_differ() {
        assert_ne!(Secret::generate(24).expose(), Secret::generate(24).expose());
        assert_eq!(Secret::generate(24).expose().len(), 24);
    }
}
