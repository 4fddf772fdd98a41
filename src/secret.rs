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

impl Redactor {
    /// Every registered form, longest first (what a log pump in another process needs).
    #[must_use]
    pub fn forms(&self) -> Vec<String> {
        self.values.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// A redactor that knows exactly `forms` (as [`Redactor::forms`] returned them).
    #[must_use]
    pub fn from_forms(mut forms: Vec<String>) -> Redactor {
        forms.retain(|f| !f.is_empty());
        forms.sort_by_key(|s| std::cmp::Reverse(s.len()));
        forms.dedup();
        Redactor {
            values: Arc::new(RwLock::new(forms)),
        }
    }

    /// `bytes` with every registered value replaced by `[redacted]`. Works on bytes, so output
    /// that is not valid UTF-8 is redacted too.
    #[must_use]
    pub fn redact_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = self.stream();
        let mut out = s.push(bytes);
        out.extend(s.finish());
        out
    }

    /// A redactor for a stream of bytes (a child's output on its way to a log file).
    #[must_use]
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor {
            values: self.values.clone(),
            pending: Vec::new(),
        }
    }
}

/// Redacts a byte stream chunk by chunk. Everything is passed on at once except a tail that
/// could be the start of a secret (at most the longest secret form minus one byte), which waits
/// for the next chunk. A secret split over two writes is therefore redacted whole, and nothing
/// unredacted is ever handed out. Values registered with the [`Redactor`] later apply from then
/// on.
#[derive(Debug)]
pub struct StreamRedactor {
    values: Arc<RwLock<Vec<String>>>,
    pending: Vec<u8>,
}

impl StreamRedactor {
    /// Adds a chunk; returns the redacted bytes that are final.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        self.drain(false)
    }

    /// The stream ended: returns the rest, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        self.drain(true)
    }

    fn drain(&mut self, last: bool) -> Vec<u8> {
        let Ok(values) = self.values.read() else {
            // A poisoned lock: hand out nothing rather than something unredacted.
            self.pending.clear();
            return b"[redacted]".to_vec();
        };
        // Bytes no secret starts with are passed on after one table lookup.
        let mut first = [false; 256];
        for v in values.iter() {
            if let Some(&c) = v.as_bytes().first() {
                first[usize::from(c)] = true;
            }
        }
        let b = &self.pending;
        let n = b.len();
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        'scan: while i < n {
            if !first[usize::from(b[i])] {
                out.push(b[i]);
                i += 1;
                continue;
            }
            let rest = &b[i..];
            // Longest first (the list is sorted so): a longer secret that this could still
            // become wins over a shorter one that is complete.
            for v in values.iter() {
                let v = v.as_bytes();
                if rest.starts_with(v) {
                    out.extend_from_slice(b"[redacted]");
                    i += v.len();
                    continue 'scan;
                }
                if !last && v.len() > rest.len() && v.starts_with(rest) {
                    break 'scan;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        self.pending.drain(..i);
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
    fn a_stream_never_hands_out_a_secret_even_split_across_chunks() {
        let r = Redactor::new();
        r.register(&Secret::new("hunter2-secret"));
        let mut s = r.stream();
        let mut out = Vec::new();
        for chunk in [
            &b"log: hun"[..],
            b"ter2-sec",
            b"ret done\n",
            b"\xff\xfehunter2-secret\xff",
        ] {
            let part = s.push(chunk);
            assert!(
                !String::from_utf8_lossy(&part).contains("hunter2"),
                "{part:?}"
            );
            out.extend(part);
        }
        out.extend(s.finish());
        assert_eq!(
            out,
            b"log: [redacted] done\n\xff\xfe[redacted]\xff".to_vec()
        );
        // What cannot be a secret's start is passed on at once.
        let mut s = r.stream();
        assert_eq!(s.push(b"plain line\nh"), b"plain line\n".to_vec());
        assert_eq!(s.finish(), b"h".to_vec());
        assert_eq!(
            r.redact_bytes(b"a\xffhunter2-secret"),
            b"a\xff[redacted]".to_vec()
        );
    }

    #[test]
    fn generated_secrets_differ() {
        assert_ne!(Secret::generate(24).expose(), Secret::generate(24).expose());
        assert_eq!(Secret::generate(24).expose().len(), 24);
    }
}
