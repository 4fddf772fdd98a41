//! Blueprint text → compile (YAML, validation, templates, cycles) → diagnostics rendering, or
//! → graph, plan views and late template rendering. Must never panic, hang or blow up memory.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use dryrun::blueprint::{self, CheckSpec, CompileError, ResourceSpec};
use dryrun::graph::Plan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let params = BTreeMap::from([("p".to_string(), "v".to_string())]);
    match blueprint::compile(Path::new("fuzz.yaml"), &text, &params) {
        Err(CompileError::Invalid(d)) => {
            let _ = d.render(false);
            let _ = d.short();
        }
        Err(CompileError::Read { .. }) => {}
        Ok(bp) => {
            let plan = Plan::new(&bp, "local", Vec::new(), Vec::new());
            let _ = (plan.to_text(), plan.to_json(), plan.to_dot());
            let order = dryrun::graph::Graph::new(&bp).order();
            assert_eq!(order.len(), bp.resources.len(), "a compiled blueprint has no cycle");
            let ctx = serde_json::json!({
                "params": bp.params, "secrets": {}, "release": {"ref": "r", "version": "1", "git_sha": ""},
                "run": {"id": "run", "blueprint": bp.name},
                "resources": bp.resources.iter().map(|r| (r.name.clone(), serde_json::json!({
                    "url": "u", "host": "h", "port": "1", "name": "n", "user": "u", "password": "p",
                    "path": "/p", "engine": "sqlite", "backup_id": "b", "dir": "/d"
                }))).collect::<serde_json::Map<_, _>>(),
            });
            for r in &bp.resources {
                if let ResourceSpec::Service(s) = &r.spec {
                    for t in s.env.values().chain(s.start.iter()) {
                        let _ = t.render(&ctx);
                    }
                }
            }
            for c in &bp.checks {
                match &c.spec {
                    CheckSpec::Http { url, headers, body, .. } => {
                        let _ = url.render(&ctx);
                        for t in headers.values().chain(body.iter()) {
                            let _ = t.render(&ctx);
                        }
                    }
                    CheckSpec::Command { run, .. } => {
                        let _ = run.render(&ctx);
                    }
                    CheckSpec::Sql { query, .. } => {
                        let _ = query.render(&ctx);
                    }
                }
            }
        }
    }
});
