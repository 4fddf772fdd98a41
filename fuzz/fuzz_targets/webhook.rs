//! Webhook payload handling: header and body checks (signature, timestamp, delivery id, JSON
//! body) and the path rules for the blueprint and release it names. The input is split into
//! headers and body at the first NUL; the body is signed correctly half of the time so that
//! the body and path checks are reached.
#![no_main]

use dryrun::server::signature;
use dryrun::server::webhook::{self, HookHeaders, Verified};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret";

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let head = String::from_utf8_lossy(head);
    let mut parts = head.split('\n');
    let sig_raw = parts.next().unwrap_or("");
    let timestamp = parts.next();
    let delivery = parts.next();
    let event = parts.next();
    let good = signature::sign(SECRET, body);
    let sig = if sig_raw.starts_with('!') { sig_raw } else { good.as_str() };
    let h = HookHeaders { signature: Some(sig), timestamp, delivery, event };
    if let Ok(Verified::Run { body, .. }) = webhook::verify(SECRET, &h, body, 1_700_000_000, 300) {
        for p in [&body.blueprint, &body.release] {
            if dryrun::reference::lexically_inside(p) {
                assert!(!p.starts_with('/') && !p.split('/').any(|c| c == ".."), "{p:?} passed the path rules");
            }
            if let Ok(dryrun::reference::Resolved::Local(_)) = dryrun::reference::classify(p, "release", &[]) {
                assert!(!p.contains("://"), "{p:?} passed as a path");
            }
        }
    }
});
