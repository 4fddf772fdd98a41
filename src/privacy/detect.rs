//! Detectors for personal data: what the gate looks for in column names and sampled values.
//!
//! Written here rather than taken from a crate: the checks are small (a regex, Luhn, the IBAN
//! mod-97 rule, `std::net` address parsing) and the thresholds are this tool's policy. Every
//! detector is a pure function over one value, so that the gate's verdict is reproducible from
//! the sample and unit-tested without a database.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// What a detector recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// E-mail addresses (found anywhere in the text).
    Email,
    /// Telephone numbers (written with `+` or separators).
    Phone,
    /// Payment card numbers (13–19 digits that pass the Luhn check).
    Card,
    /// International bank account numbers (mod-97 check).
    Iban,
    /// IPv4 or IPv6 addresses.
    Ip,
    /// The column's name says it holds personal data (names, birth dates, addresses, ids).
    NameHint,
}

impl Kind {
    /// The words of a gate message: "looks like e-mail addresses".
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Email => "e-mail addresses",
            Kind::Phone => "phone numbers",
            Kind::Card => "payment card numbers",
            Kind::Iban => "bank account numbers (IBAN)",
            Kind::Ip => "IP addresses",
            Kind::NameHint => "personal data by its name",
        }
    }

    /// The strategy to suggest in the `masking:` snippet.
    #[must_use]
    pub fn suggested_strategy(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::Card | Kind::Iban => "redact",
            Kind::Ip => "hash",
            Kind::NameHint => "redact",
        }
    }

    /// Whether `hits` of `sampled` values are enough to flag the column. E-mail addresses and
    /// IBANs are flagged on a single hit (their checks rarely match anything else); card numbers
    /// need half the sample (a random 16-digit id passes Luhn one time in ten); phone numbers
    /// and IP addresses a fifth (a notes column mentioning one server is not a column of them).
    #[must_use]
    pub fn flags(self, hits: usize, sampled: usize) -> bool {
        if hits == 0 {
            return false;
        }
        match self {
            Kind::Email | Kind::Iban | Kind::NameHint => true,
            Kind::Card => hits * 2 >= sampled,
            Kind::Phone | Kind::Ip => hits * 5 >= sampled,
        }
    }
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(\.[A-Za-z0-9\-]{1,63})*\.[A-Za-z]{2,24}",
    )
    .expect("static regex")
});
static PHONE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\+?[0-9(][0-9 ().\-/]{5,22}[0-9]$").expect("static regex"));
static DATE_LIKE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^[0-9]{4}[-/.][0-9]{1,2}[-/.][0-9]{1,2}|^[0-9]{1,2}[-/.][0-9]{1,2}[-/.][0-9]{2,4}$",
    )
    .expect("static regex")
});
static NAME_HINT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(^|_)(e_?mail|phone|mobile|telephone|tel|first_?name|last_?name|full_?name|given_?name|family_?name|surname|maiden_?name|birth_?date|date_of_birth|birthday|dob|ssn|social_security|passport|national_id|tax_id|iban|card_?number|cc_?number|street|address|postcode|postal_?code|zip_?code|ip_?address)($|_)",
    )
    .expect("static regex")
});

/// The value detector that recognises `v`, if any; tried in the order e-mail, IBAN, card, IP,
/// phone (the first that matches counts).
#[must_use]
pub fn value_kind(v: &str) -> Option<Kind> {
    let t = v.trim();
    if t.len() < 3 || t.len() > 100_000 {
        return None;
    }
    if t.contains('@') && EMAIL.is_match(t) && !is_masked_email(t) {
        return Some(Kind::Email);
    }
    if t.len() <= 40 {
        if is_iban(t) {
            return Some(Kind::Iban);
        }
        if is_card(t) {
            return Some(Kind::Card);
        }
        if is_ip(t) {
            return Some(Kind::Ip);
        }
        if is_phone(t) {
            return Some(Kind::Phone);
        }
    }
    None
}

/// Whether a column name says it holds personal data (`email`, `first_name`, `dob`, …).
#[must_use]
pub fn name_hint(column: &str) -> bool {
    NAME_HINT.is_match(column)
}

/// The fake addresses the `email` strategy writes (RFC 2606's reserved domain) do not count as
/// personal data: they are what a masked column holds.
fn is_masked_email(t: &str) -> bool {
    EMAIL
        .find_iter(t)
        .all(|m| m.as_str().to_ascii_lowercase().ends_with("@example.com"))
}

fn digits(t: &str) -> Vec<u8> {
    t.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

/// A telephone number as people write it: 8–15 digits, and a `+` or a separator (a bare run of
/// digits is more often an id than a phone number); dates do not count.
fn is_phone(t: &str) -> bool {
    if !PHONE.is_match(t) || DATE_LIKE.is_match(t) {
        return false;
    }
    let n = digits(t).len();
    let written_as_phone = t.starts_with('+') || t.bytes().any(|b| b" ()-./".contains(&b));
    (8..=15).contains(&n) && written_as_phone
}

/// 13–19 digits, optionally grouped by spaces or dashes, passing the Luhn check.
fn is_card(t: &str) -> bool {
    if !t
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b' ' || b == b'-')
    {
        return false;
    }
    let d = digits(t);
    if !(13..=19).contains(&d.len()) || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    luhn(&d)
}

/// The Luhn checksum over digits (most significant first).
#[must_use]
pub fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Two letters, two check digits, 11–30 alphanumerics (spaces allowed), mod 97 == 1.
fn is_iban(t: &str) -> bool {
    let s: Vec<u8> = t.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&s.len())
        || !s[..2].iter().all(u8::is_ascii_uppercase)
        || !s[2..4].iter().all(u8::is_ascii_digit)
        || !s[4..].iter().all(u8::is_ascii_alphanumeric)
    {
        return false;
    }
    let rearranged = s[4..].iter().chain(&s[..4]);
    let mut rem: u32 = 0;
    for &b in rearranged {
        let v = if b.is_ascii_digit() {
            u32::from(b - b'0')
        } else {
            u32::from(b.to_ascii_uppercase() - b'A') + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn is_ip(t: &str) -> bool {
    let host = t.split('/').next().unwrap_or(t);
    host.parse::<Ipv4Addr>().is_ok() || (host.contains(':') && host.parse::<Ipv6Addr>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_recognised_and_ordinary_text_is_not() {
        assert_eq!(value_kind("ada@lovelace.org"), Some(Kind::Email));
        assert_eq!(
            value_kind("write to Ada <ada@lovelace.org> today"),
            Some(Kind::Email)
        );
        assert_eq!(
            value_kind("user.3f9c@example.com"),
            None,
            "masked addresses are not PII"
        );
        assert_eq!(value_kind("+44 20 7946 0958"), Some(Kind::Phone));
        assert_eq!(value_kind("(415) 555-0132"), Some(Kind::Phone));
        assert_eq!(value_kind("4111 1111 1111 1111"), Some(Kind::Card));
        assert_eq!(value_kind("4111111111111112"), None, "Luhn fails");
        assert_eq!(value_kind("GB82 WEST 1234 5698 7654 32"), Some(Kind::Iban));
        assert_eq!(
            value_kind("GB83 WEST 1234 5698 7654 32"),
            None,
            "mod 97 fails"
        );
        assert_eq!(value_kind("192.168.10.7"), Some(Kind::Ip));
        assert_eq!(value_kind("2001:db8::1"), Some(Kind::Ip));
        for plain in [
            "2026-11-30",
            "2026-11-30 10:15:00",
            "30/11/2026",
            "SKU-1001",
            "1234567890",
            "Blue widget, large",
            "12:30",
            "v1.2.3",
            "",
        ] {
            assert_eq!(value_kind(plain), None, "{plain}");
        }
    }

    #[test]
    fn column_names_that_say_personal_data() {
        for n in [
            "email",
            "customer_email",
            "first_name",
            "dob",
            "date_of_birth",
            "phone",
            "zip_code",
            "ip_address",
        ] {
            assert!(name_hint(n), "{n}");
        }
        for n in [
            "name",
            "product_name",
            "sku",
            "total_cents",
            "created_at",
            "status",
            "telemetry",
            "contact",
        ] {
            assert!(!name_hint(n), "{n}");
        }
    }

    #[test]
    fn thresholds_follow_each_detectors_false_positive_rate() {
        assert!(Kind::Email.flags(1, 2000));
        assert!(!Kind::Card.flags(200, 2000));
        assert!(Kind::Card.flags(1000, 2000));
        assert!(!Kind::Phone.flags(399, 2000));
        assert!(Kind::Phone.flags(400, 2000));
        assert!(!Kind::Email.flags(0, 2000));
    }
}
