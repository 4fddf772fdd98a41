//! Masking while the data loads: the rows of a PostgreSQL dump's data section pass through
//! dryrun on their way into the copy (`pg_restore --section=data -f -` → here → `COPY … FROM
//! STDIN`), and the masked columns are rewritten in the stream. The copy never holds their
//! originals, and no `UPDATE` rewrites the table afterwards — PostgreSQL's own UPDATE of three
//! columns, with their index entries, costs more than the whole stream (docs/data-safety.md has
//! the figures).
//!
//! This module is the pure part: the `COPY` header and the text format's fields (tab
//! separated, `\N` for NULL, backslash escapes), and which single-column unique constraints the
//! post-data section declares (for the strategies that keep unique columns distinct). The
//! local provider runs the processes (`provider::local::postgres`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use regex::Regex;

use super::strategy::{self, ColumnFacts, MaskKey, Strategy};
use super::{Rule, SAMPLE_ROWS};

/// What to mask while restoring: the blueprint's rules and the run's key.
#[derive(Debug, Clone)]
pub struct MaskPlan {
    /// Rules (`keep` ones included; they are skipped).
    pub rules: Vec<Rule>,
    /// The run's key.
    pub key: MaskKey,
}

impl MaskPlan {
    /// Whether any rule changes data.
    #[must_use]
    pub fn masks(&self) -> bool {
        self.rules.iter().any(|r| r.strategy != Strategy::Keep)
    }
}

/// What a restore masked on the way in.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    /// `(table, column)` masked in the stream.
    pub masked: BTreeSet<(String, String)>,
    /// Rows of the tables that had masked columns.
    pub rows: u64,
    /// Up to [`SAMPLE_ROWS`] original values per masked column, for the verification probe
    /// (memory only).
    pub originals: BTreeMap<(String, String), Vec<String>>,
}

/// A `COPY schema.table (col, …) FROM stdin;` line: the table as rules name it and its columns.
#[must_use]
pub fn copy_header(line: &str) -> Option<(String, Vec<String>)> {
    let rest = line.strip_prefix("COPY ")?.strip_suffix(" FROM stdin;")?;
    let (name, rest) = ident_path(rest)?;
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    let mut cols = Vec::new();
    let mut s = inner;
    loop {
        let (c, r) = ident(s.trim_start())?;
        cols.push(c);
        let r = r.trim_start();
        if r.is_empty() {
            break;
        }
        s = r.strip_prefix(',')?;
    }
    let table = match name.as_slice() {
        [schema, t] if schema == "public" => t.clone(),
        [schema, t] => format!("{schema}.{t}"),
        [t] => t.clone(),
        _ => return None,
    };
    Some((table, cols))
}

/// An identifier, plain or double-quoted, and the rest.
fn ident(s: &str) -> Option<(String, &str)> {
    if let Some(q) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = q.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if q[i + 1..].starts_with('"') {
                    out.push('"');
                    chars.next();
                } else {
                    return Some((out, &q[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        None
    } else {
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(s.len());
        (end > 0).then(|| (s[..end].to_string(), &s[end..]))
    }
}

/// `a.b` or `a`, quoted or not.
fn ident_path(s: &str) -> Option<(Vec<String>, &str)> {
    let (first, rest) = ident(s)?;
    if let Some(r) = rest.strip_prefix('.') {
        let (second, rest) = ident(r)?;
        Some((vec![first, second], rest))
    } else {
        Some((vec![first], rest))
    }
}

/// A field of the text format, decoded; `None` is `\N`.
#[must_use]
pub fn decode(field: &[u8]) -> Option<Vec<u8>> {
    if field == b"\\N" {
        return None;
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' || i + 1 == field.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let n = field[i + 1];
        i += 2;
        match n {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(n - b'0');
                let mut k = 0;
                while k < 2 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                    v = v * 8 + u32::from(field[i] - b'0');
                    i += 1;
                    k += 1;
                }
                out.push(u8::try_from(v & 0xff).unwrap_or(0));
            }
            b'x' if i < field.len() && field[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut k = 0;
                while k < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                    v = v * 16 + char::from(field[i]).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                out.push(u8::try_from(v).unwrap_or(0));
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// A value encoded for the text format; `None` is `\N`.
#[must_use]
pub fn encode(v: Option<&str>) -> Vec<u8> {
    let Some(v) = v else {
        return b"\\N".to_vec();
    };
    let mut out = Vec::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    out
}

/// A masked column of one COPY block: its position, strategy, facts and originals seen.
#[derive(Debug)]
pub struct StreamColumn {
    /// Position in the COPY column list.
    pub index: usize,
    /// Strategy.
    pub strategy: Strategy,
    /// Unique / length.
    pub facts: ColumnFacts,
    /// Originals kept for the verification probe (up to [`SAMPLE_ROWS`]).
    pub originals: Vec<String>,
}

/// The masked columns of a COPY block of `table` with `columns`, by `plan`'s rules; `unique`
/// and `max_len` as the schema declares them.
#[must_use]
pub fn columns_for(
    plan: &MaskPlan,
    table: &str,
    columns: &[String],
    unique: &BTreeSet<(String, String)>,
    max_len: &BTreeMap<(String, String), usize>,
) -> Vec<StreamColumn> {
    plan.rules
        .iter()
        .filter(|r| r.table == table && r.strategy != Strategy::Keep)
        .filter_map(|r| {
            let key = (table.to_string(), r.column.clone());
            Some(StreamColumn {
                index: columns.iter().position(|c| c == &r.column)?,
                strategy: r.strategy,
                facts: ColumnFacts {
                    unique: unique.contains(&key),
                    max_len: max_len.get(&key).copied(),
                },
                originals: Vec::new(),
            })
        })
        .collect()
}

/// Masks the columns `cols` of one data line (without its newline) into `out`.
pub fn mask_line(line: &[u8], cols: &mut [StreamColumn], key: &MaskKey, out: &mut Vec<u8>) {
    out.clear();
    for (i, field) in line.split(|b| *b == b'\t').enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        let Some(col) = cols.iter_mut().find(|c| c.index == i) else {
            out.extend_from_slice(field);
            continue;
        };
        let original = decode(field).map(|v| String::from_utf8_lossy(&v).into_owned());
        if let Some(o) = &original
            && col.originals.len() < SAMPLE_ROWS
        {
            col.originals.push(o.clone());
        }
        let masked = strategy::mask(col.strategy, original.as_deref(), key, col.facts);
        out.extend_from_slice(&encode(masked.as_deref()));
    }
}

static UNIQUE_CONSTRAINT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?m)^ALTER TABLE (?:ONLY )?(\S+)\s*\n?\s*ADD CONSTRAINT \S+ (?:UNIQUE|PRIMARY KEY) \(([^,()]+)\);"#)
        .expect("static regex")
});
static UNIQUE_INDEX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?m)^CREATE UNIQUE INDEX \S+ ON (?:ONLY )?(\S+) USING \w+ \(([^,()]+)\);"#)
        .expect("static regex")
});

/// The single-column unique constraints and indexes a post-data section declares, as
/// `(table, column)` named like rules.
#[must_use]
pub fn unique_columns(post_data: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for re in [&*UNIQUE_CONSTRAINT, &*UNIQUE_INDEX] {
        for c in re.captures_iter(post_data) {
            let Some((path, _)) = ident_path(&c[1]) else {
                continue;
            };
            let Some((col, _)) = ident(c[2].trim()) else {
                continue;
            };
            let table = match path.as_slice() {
                [s, t] if s == "public" => t.clone(),
                [s, t] => format!("{s}.{t}"),
                [t] => t.clone(),
                _ => continue,
            };
            out.insert((table, col));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_headers_name_the_table_as_rules_do() {
        assert_eq!(
            copy_header("COPY public.people (id, email, \"Full Name\") FROM stdin;"),
            Some((
                "people".into(),
                vec!["id".into(), "email".into(), "Full Name".into()]
            ))
        );
        assert_eq!(
            copy_header("COPY crm.\"my \"\"odd\"\" table\" (a) FROM stdin;")
                .unwrap()
                .0,
            "crm.my \"odd\" table"
        );
        assert_eq!(copy_header("SELECT 1;"), None);
        assert_eq!(copy_header("COPY public.t (a, FROM stdin;"), None);
    }

    #[test]
    fn fields_round_trip_through_the_text_format() {
        for v in [
            "plain",
            "tab\there",
            "new\nline",
            "back\\slash",
            "",
            "é ünïcode",
        ] {
            assert_eq!(decode(&encode(Some(v))).unwrap(), v.as_bytes(), "{v}");
        }
        assert_eq!(decode(b"\\N"), None);
        assert_eq!(encode(None), b"\\N");
        assert_eq!(decode(b"a\\101\\x42c").unwrap(), b"aABc");
    }

    #[test]
    fn only_the_masked_fields_change_and_originals_are_sampled() {
        let key = MaskKey::from_bytes([5; 32]);
        let mut cols = vec![StreamColumn {
            index: 1,
            strategy: Strategy::Email,
            facts: ColumnFacts {
                unique: true,
                max_len: None,
            },
            originals: Vec::new(),
        }];
        let mut out = Vec::new();
        mask_line(
            b"7\tada@lovelace.org\t\\N\tx\\ty",
            &mut cols,
            &key,
            &mut out,
        );
        let s = String::from_utf8(out.clone()).unwrap();
        let f: Vec<&str> = s.split('\t').collect();
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], "7");
        assert!(f[1].ends_with("@example.com"), "{s}");
        assert_eq!(&f[2..], ["\\N", "x\\ty"]);
        assert_eq!(cols[0].originals, vec!["ada@lovelace.org"]);
        mask_line(b"8\t\\N\t\\N\tz", &mut cols, &key, &mut out);
        assert_eq!(out, b"8\t\\N\t\\N\tz", "NULL stays NULL");
    }

    #[test]
    fn unique_columns_are_read_from_the_post_data_section() {
        let post = "ALTER TABLE ONLY public.people\n    ADD CONSTRAINT people_email_key UNIQUE (email);\n\
                    ALTER TABLE ONLY public.people\n    ADD CONSTRAINT people_pkey PRIMARY KEY (id);\n\
                    ALTER TABLE ONLY public.pairs\n    ADD CONSTRAINT pairs_key UNIQUE (a, b);\n\
                    CREATE UNIQUE INDEX members_phone ON crm.members USING btree (phone);\n";
        let u = unique_columns(post);
        assert!(u.contains(&("people".into(), "email".into())));
        assert!(u.contains(&("people".into(), "id".into())));
        assert!(u.contains(&("crm.members".into(), "phone".into())));
        assert_eq!(u.len(), 3, "{u:?}");
    }
}
