//! The personal data gate and masking on hostile input: detectors on any value, the COPY
//! header and text-format fields of a dump's data section, and every strategy. Whatever the
//! input: nothing panics; a field survives encode → decode unchanged; a masked line keeps its
//! number of fields and its unmasked fields byte for byte; NULL stays NULL; a phone number keeps
//! its length.
#![no_main]

use dryrun::privacy::detect;
use dryrun::privacy::stream::{self, StreamColumn};
use dryrun::privacy::{ColumnFacts, MaskKey, Strategy, strategy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let value = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let header = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let line = parts.next().unwrap_or_default();

    let _ = detect::value_kind(&value);
    let _ = detect::name_hint(&value);
    let _ = stream::copy_header(&header);

    assert_eq!(
        stream::decode(&stream::encode(Some(&value))).unwrap(),
        value.as_bytes()
    );

    let key = MaskKey::from_bytes([9; 32]);
    for name in Strategy::NAMES {
        let s = Strategy::parse(name).unwrap();
        for unique in [false, true] {
            let facts = ColumnFacts {
                unique,
                max_len: None,
            };
            assert_eq!(strategy::mask(s, None, &key, facts), None);
            let out = strategy::mask(s, Some(&value), &key, facts);
            if s == Strategy::Phone {
                assert_eq!(out.as_deref().map(str::len), Some(value.len()));
            }
            let cut = strategy::mask(
                s,
                Some(&value),
                &key,
                ColumnFacts {
                    unique,
                    max_len: Some(5),
                },
            );
            assert!(cut.is_none_or(|c| c.chars().count() <= 5 || s == Strategy::Keep));
        }
    }

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
    stream::mask_line(line, &mut cols, &key, &mut out);
    let fields: Vec<&[u8]> = line.split(|b| *b == b'\t').collect();
    let masked: Vec<&[u8]> = out.split(|b| *b == b'\t').collect();
    assert_eq!(fields.len(), masked.len());
    for (i, (a, b)) in fields.iter().zip(&masked).enumerate() {
        if i != 1 {
            assert_eq!(a, b, "field {i} changed");
        } else if *a == b"\\N" {
            assert_eq!(*b, b"\\N");
        }
    }
});
