//! Masking strategies: what a masked value becomes. One pure function per strategy, used by
//! every engine (SQLite calls it as an SQL function, PostgreSQL on the values it streams out),
//! so that what a strategy guarantees is tested once here.
//!
//! Guarantees, for every strategy but `keep`:
//! - NULL stays NULL and a value stays a value (`null` excepted, which the engines refuse on a
//!   NOT NULL column before anything changes);
//! - deterministic within a copy: the same original gives the same masked value (joins and
//!   duplicates survive), keyed by the run's masking key, so the original cannot be looked up
//!   from the output without the key;
//! - distinct originals stay distinct on UNIQUE columns: `phone` is a keyed permutation of the
//!   digits (a Feistel network over the digit string, so two numbers never meet), the others
//!   carry 64 bits of the keyed hash when the column is unique;
//! - the shape stays: an e-mail address stays an address (at `example.com`, RFC 2606), a phone
//!   number keeps its length, `+`, spaces and dashes, a name stays two words.

use std::fmt::Write as _;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A masking strategy, as written in the blueprint's `masking:` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Not personal data: left as it is.
    Keep,
    /// Replaced by NULL.
    Null,
    /// Replaced by a fixed text.
    Redact,
    /// Replaced by a keyed hash (hex).
    Hash,
    /// A fake, unique e-mail address.
    Email,
    /// A fake person's name.
    Name,
    /// The digits replaced by a keyed permutation of them.
    Phone,
}

impl Strategy {
    /// Every strategy's name, as written.
    pub const NAMES: &'static [&'static str] =
        &["keep", "null", "redact", "hash", "email", "name", "phone"];

    /// From its name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Strategy> {
        Some(match s {
            "keep" => Strategy::Keep,
            "null" => Strategy::Null,
            "redact" => Strategy::Redact,
            "hash" => Strategy::Hash,
            "email" => Strategy::Email,
            "name" => Strategy::Name,
            "phone" => Strategy::Phone,
            _ => return None,
        })
    }

    /// Its name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        Strategy::NAMES[self as usize]
    }

    /// Whether masked values deliberately look like personal data (fake addresses, names,
    /// numbers): the verification probe does not run detectors on them.
    #[must_use]
    pub fn looks_personal(self) -> bool {
        matches!(
            self,
            Strategy::Email | Strategy::Name | Strategy::Phone | Strategy::Keep
        )
    }
}

/// The key masking is done with: random per run unless given. Holds the keyed states ready
/// (HMAC with its pads hashed, and the key-prefixed SHA-256 the phone permutation's rounds
/// use), so that a value costs only the hashing of its own bytes.
#[derive(Clone)]
pub struct MaskKey {
    mac: Hmac<Sha256>,
    prf: Sha256,
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey([redacted])")
    }
}

impl MaskKey {
    /// A fresh random key.
    #[must_use]
    pub fn random() -> MaskKey {
        MaskKey::from_bytes(rand::random())
    }

    /// A key from bytes (tests, benchmarks).
    #[must_use]
    pub fn from_bytes(b: [u8; 32]) -> MaskKey {
        MaskKey {
            mac: <Hmac<Sha256> as KeyInit>::new_from_slice(&b)
                .expect("HMAC takes keys of any length"),
            prf: Sha256::new_with_prefix(b),
        }
    }

    /// HMAC-SHA-256 of the length-prefixed parts.
    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// The Feistel rounds' function: SHA-256 of the key followed by a fixed-length block
    /// (digit count, round, half). With inputs of one fixed length, prefixing the key is a
    /// PRF (length extension needs a longer input), and it costs one compression, not HMAC's
    /// two.
    fn round(&self, n: u8, round: u8, half: u64) -> u64 {
        let mut h = self.prf.clone();
        h.update([n, round]);
        h.update(half.to_le_bytes());
        let out = h.finalize();
        u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
    }
}

/// How a column is masked: its strategy and what the engine knows about it.
#[derive(Debug, Clone, Copy)]
pub struct ColumnFacts {
    /// The column has a single-column UNIQUE index or constraint.
    pub unique: bool,
    /// Its declared maximum length in characters (`varchar(n)`), if any.
    pub max_len: Option<usize>,
}

const FIRST: &[&str] = &[
    "Ada",
    "Alan",
    "Grace",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "John",
    "Radia",
    "Ken",
    "Margaret",
    "Dennis",
    "Hedy",
    "Niklaus",
    "Katherine",
    "Tim",
    "Sophie",
    "Linus",
    "Anita",
    "Guido",
    "Karen",
    "Bjarne",
    "Shafi",
    "Leslie",
    "Carol",
    "Robin",
    "Mary",
    "Peter",
    "Joan",
    "Vint",
    "Lynn",
    "Brian",
];
const LAST: &[&str] = &[
    "Abbott",
    "Baker",
    "Carter",
    "Dalton",
    "Ellis",
    "Fisher",
    "Garner",
    "Hughes",
    "Irving",
    "Jensen",
    "Keller",
    "Lambert",
    "Mercer",
    "Norris",
    "Olsen",
    "Parker",
    "Quinn",
    "Rowe",
    "Sutton",
    "Turner",
    "Underwood",
    "Vance",
    "Walsh",
    "Xavier",
    "Young",
    "Zimmer",
    "Archer",
    "Brooks",
    "Cole",
    "Doyle",
    "Foster",
    "Grant",
];

/// The masked form of `value` (`None` is SQL NULL). `keep` returns it unchanged.
#[must_use]
pub fn mask(s: Strategy, value: Option<&str>, key: &MaskKey, col: ColumnFacts) -> Option<String> {
    let v = value?;
    let out = match s {
        Strategy::Keep => return Some(v.to_string()),
        Strategy::Null => return None,
        Strategy::Redact => {
            if col.unique {
                format!("redacted-{}", hex16(key, b"redact", v))
            } else {
                "redacted".to_string()
            }
        }
        Strategy::Hash => hex::encode(&key.mac(&[b"hash", v.as_bytes()])[..16]),
        Strategy::Email => {
            let h = key.mac(&[b"email", v.as_bytes()]);
            format!(
                "{}.{}.{}@example.com",
                FIRST[usize::from(h[0]) % FIRST.len()].to_ascii_lowercase(),
                LAST[usize::from(h[1]) % LAST.len()].to_ascii_lowercase(),
                hex::encode(&h[2..10])
            )
        }
        Strategy::Name => {
            let h = key.mac(&[b"name", v.as_bytes()]);
            let mut n = format!(
                "{} {}",
                FIRST[usize::from(h[0]) % FIRST.len()],
                LAST[usize::from(h[1]) % LAST.len()]
            );
            if col.unique {
                let _ = write!(n, " {}", hex::encode(&h[2..10]));
            }
            n
        }
        Strategy::Phone => phone(v, key),
    };
    Some(match col.max_len {
        Some(m) if out.chars().count() > m => out.chars().take(m).collect(),
        _ => out,
    })
}

fn hex16(key: &MaskKey, domain: &[u8], v: &str) -> String {
    hex::encode(&key.mac(&[domain, v.as_bytes()])[..8])
}

/// Replaces the digits of `v` by a keyed permutation of the digit string (everything else
/// stays where it was). The permutation is an eight-round Feistel network over the number the
/// digits spell, split in two halves of decimal width; each round adds a keyed function of one
/// half to the other modulo its width, which is invertible, so the whole is a bijection on the
/// strings of that length: distinct numbers stay distinct, as UNIQUE needs.
fn phone(v: &str, key: &MaskKey) -> String {
    let digits: Vec<u8> = v
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect();
    let n = digits.len();
    if n == 0 {
        return v.to_string();
    }
    let permuted = if n <= 18 {
        feistel(&digits, key)
    } else {
        // Longer than a u64 holds: not a phone number; the digits come from the hash.
        let h = key.mac(&[b"phone-long", v.as_bytes()]);
        (0..n).map(|i| h[i % 32] % 10).collect()
    };
    let mut it = permuted.into_iter();
    v.chars()
        .map(|c| {
            if c.is_ascii_digit() {
                char::from(b'0' + it.next().unwrap_or(0))
            } else {
                c
            }
        })
        .collect()
}

fn feistel(digits: &[u8], key: &MaskKey) -> Vec<u8> {
    let n = digits.len();
    let num = |d: &[u8]| d.iter().fold(0u64, |a, &x| a * 10 + u64::from(x));
    let (mut la, mut lb) = (n / 2, n - n / 2);
    let (mut a, mut b) = (num(&digits[..la]), num(&digits[la..]));
    let n_tag = u8::try_from(n).unwrap_or(u8::MAX);
    for round in 0u8..8 {
        let m = 10u64.pow(u32::try_from(la).unwrap_or(0));
        let f = key.round(n_tag, round, b) % m;
        let c = (a + f) % m;
        (a, b) = (b, c);
        (la, lb) = (lb, la);
    }
    let mut out = Vec::with_capacity(n);
    for (x, w) in [(a, la), (b, lb)] {
        let s = format!("{x:0w$}");
        out.extend(s.bytes().map(|c| c - b'0'));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::privacy::detect::{Kind, value_kind};

    const PLAIN: ColumnFacts = ColumnFacts {
        unique: false,
        max_len: None,
    };
    const UNIQUE: ColumnFacts = ColumnFacts {
        unique: true,
        max_len: None,
    };

    fn key() -> MaskKey {
        MaskKey::from_bytes([7; 32])
    }

    #[test]
    fn nulls_stay_null_and_values_stay_values() {
        for name in Strategy::NAMES {
            let s = Strategy::parse(name).unwrap();
            assert_eq!(s.as_str(), *name);
            assert_eq!(mask(s, None, &key(), PLAIN), None, "{name}");
            if s != Strategy::Null {
                assert!(
                    mask(s, Some("ada@lovelace.org"), &key(), PLAIN).is_some(),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn masked_values_keep_their_shape_and_lose_the_original() {
        let e = mask(Strategy::Email, Some("ada@lovelace.org"), &key(), PLAIN).unwrap();
        assert!(
            e.ends_with("@example.com") && !e.contains("lovelace.org"),
            "{e}"
        );
        assert_eq!(
            value_kind(&e),
            None,
            "a masked address is not flagged again"
        );
        let p = mask(Strategy::Phone, Some("+44 20 7946 0958"), &key(), PLAIN).unwrap();
        assert_eq!(p.len(), "+44 20 7946 0958".len());
        assert!(p.starts_with('+') && p.chars().nth(3) == Some(' '), "{p}");
        assert_ne!(p, "+44 20 7946 0958");
        assert_eq!(
            value_kind(&p),
            Some(Kind::Phone),
            "still shaped like a phone number"
        );
        let n = mask(Strategy::Name, Some("Ada Lovelace"), &key(), PLAIN).unwrap();
        assert_eq!(n.split(' ').count(), 2, "{n}");
        let h = mask(Strategy::Hash, Some("x"), &key(), PLAIN).unwrap();
        assert_eq!(h.len(), 32);
        let cut = mask(
            Strategy::Email,
            Some("ada@lovelace.org"),
            &key(),
            ColumnFacts {
                unique: false,
                max_len: Some(10),
            },
        )
        .unwrap();
        assert_eq!(cut.chars().count(), 10, "varchar(10) holds the result");
    }

    #[test]
    fn deterministic_per_key_and_different_across_keys() {
        let a = mask(Strategy::Email, Some("ada@lovelace.org"), &key(), PLAIN);
        assert_eq!(
            a,
            mask(Strategy::Email, Some("ada@lovelace.org"), &key(), PLAIN)
        );
        let other = MaskKey::from_bytes([8; 32]);
        assert_ne!(
            a,
            mask(Strategy::Email, Some("ada@lovelace.org"), &other, PLAIN)
        );
    }

    #[test]
    fn phone_masking_is_a_permutation_so_unique_numbers_stay_unique() {
        // Every 4-digit string maps to a distinct 4-digit string.
        let mut seen = HashSet::new();
        for i in 0..10_000 {
            let v = format!("{i:04}");
            let m = mask(Strategy::Phone, Some(&v), &key(), UNIQUE).unwrap();
            assert_eq!(m.len(), 4);
            assert!(seen.insert(m), "collision at {v}");
        }
        // Odd lengths too.
        let mut seen = HashSet::new();
        for i in 0..1000 {
            let v = format!("+1 {i:03}");
            assert!(seen.insert(mask(Strategy::Phone, Some(&v), &key(), UNIQUE).unwrap()));
        }
        assert_eq!(
            mask(Strategy::Phone, Some("7"), &key(), UNIQUE)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn unique_columns_get_distinct_values_for_every_strategy() {
        for s in [
            Strategy::Redact,
            Strategy::Name,
            Strategy::Email,
            Strategy::Hash,
        ] {
            let mut seen = HashSet::new();
            for i in 0..5000 {
                let v = format!("person{i}@mail.test");
                assert!(
                    seen.insert(mask(s, Some(&v), &key(), UNIQUE)),
                    "{s:?} collided"
                );
            }
        }
    }

    #[test]
    fn the_key_never_prints() {
        assert_eq!(
            format!("{:?}", MaskKey::from_bytes([1; 32])),
            "MaskKey([redacted])"
        );
    }
}
