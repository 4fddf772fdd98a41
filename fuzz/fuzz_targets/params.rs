//! Param validation and rendering into shell commands and SQL queries. The input is split at
//! NUL bytes into a param `pattern` (empty: none), a param value and a template. Properties:
//! - a blueprint compiles only if the value matches the declared pattern, or — without one —
//!   only if the value is safe in the shell command and the SQL query that use it;
//! - rendering a template in a shell or SQL position never writes a hostile value (one that is
//!   not vetted) into the output, whatever the template does with it.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use dryrun::blueprint::template::{self, Position};
use dryrun::blueprint::{self, CheckSpec};
use libfuzzer_sys::fuzz_target;

const POISON: &str = "$(touch /tmp/pwned)';--";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let pattern = parts.next().unwrap_or("");
    let value = parts.next().unwrap_or("").to_string();
    let tpl = parts.next().unwrap_or("");

    // 1. Compile a blueprint that uses the param in a shell command and an SQL query.
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let rule = if pattern.is_empty() { String::new() } else { format!(", pattern: {}", q(pattern)) };
    let yaml = format!(
        "name: f\nparams:\n  p: {{default: \"x\"{rule}}}\nresources:\n  db: {{type: database, engine: sqlite, source: s}}\nchecks:\n  - name: c\n    type: command\n    run: \"echo {{{{params.p}}}}\"\n  - name: q\n    type: sql\n    database: db\n    query: \"select '{{{{params.p}}}}'\"\n"
    );
    let params = BTreeMap::from([("p".to_string(), value.clone())]);
    if let Ok(bp) = blueprint::compile(Path::new("f.yaml"), &yaml, &params) {
        if pattern.is_empty() {
            assert!(template::unsafe_in(&value, Position::Shell).is_none(), "{value:?} compiled unvetted");
            assert!(template::unsafe_in(&value, Position::Sql).is_none(), "{value:?} compiled unvetted");
        } else {
            let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
            assert!(re.is_match(&value), "{value:?} does not match {pattern:?} but compiled");
        }
        let ctx = serde_json::json!({"params": bp.params});
        for c in &bp.checks {
            if let CheckSpec::Command { run, .. } = &c.spec {
                let _ = run.render_in(&ctx, Position::Shell, &bp.vetted());
            }
        }
    }

    // 2. Any template, a hostile value in the context: it never reaches the output.
    let ctx = serde_json::json!({
        "params": {"p": POISON, "ok": "safe-1"},
        "resources": {"db": {"path": "/s/copies/r/db/x.sqlite", "url": POISON}},
        "secrets": {"t": POISON},
    });
    for pos in [Position::Shell, Position::Sql] {
        if let Ok(out) = template::render_in(tpl, &ctx, pos, &[]) {
            assert!(tpl.contains(POISON) || !out.contains(POISON), "{tpl:?} wrote the poison in {pos:?}");
        }
    }
});
