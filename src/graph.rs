//! The resource graph and the plan.
//!
//! Nodes are resources; an edge `a → b` means `a` needs `b` first (explicit `depends_on` or a
//! `{{resources.b.…}}` reference). Creation walks dependencies first; destruction walks the
//! same graph reversed. Compile has already rejected cycles, so [`Graph::new`] cannot fail.
//! The plan ([`Plan`]) is the graph plus the backups that would be restored, printed as stable
//! text, JSON or Graphviz dot; producing it creates nothing.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::blueprint::{Blueprint, CheckSpec, ResourceSpec, TeardownPolicy};
use crate::report::human_secs;

/// A node: one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// Resource name.
    pub name: String,
    /// `kind.name`.
    pub address: String,
    /// Indices of the nodes this one needs.
    pub deps: Vec<usize>,
}

/// The dependency graph of a blueprint's resources.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Nodes in blueprint order.
    pub nodes: Vec<Node>,
}

impl Graph {
    /// Builds the graph of a compiled (cycle-free) blueprint.
    #[must_use]
    pub fn new(bp: &Blueprint) -> Graph {
        let names: Vec<&str> = bp.resources.iter().map(|r| r.name.as_str()).collect();
        let nodes = bp
            .resources
            .iter()
            .map(|r| Node {
                name: r.name.clone(),
                address: r.address(),
                deps: r
                    .all_deps()
                    .iter()
                    .filter_map(|d| names.iter().position(|n| n == d))
                    .collect(),
            })
            .collect();
        Graph { nodes }
    }

    /// Creation order: dependencies first; among ready nodes, blueprint order (stable output).
    #[must_use]
    pub fn order(&self) -> Vec<usize> {
        let n = self.nodes.len();
        let mut done = vec![false; n];
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(next) =
                (0..n).find(|&i| !done[i] && self.nodes[i].deps.iter().all(|&d| done[d]))
            else {
                break; // unreachable for compiled blueprints (no cycles)
            };
            done[next] = true;
            out.push(next);
        }
        out
    }

    /// Nodes that need `i`.
    #[must_use]
    pub fn dependents(&self, i: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&j| self.nodes[j].deps.contains(&i))
            .collect()
    }
}

/// A backup the plan would restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedBackup {
    /// Database address.
    pub resource: String,
    /// Backup id.
    pub id: String,
    /// When production was captured.
    pub taken_at: DateTime<Utc>,
    /// Age at planning time.
    pub age_seconds: i64,
}

/// One resource in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedResource {
    /// `kind.name`.
    pub address: String,
    /// Kind.
    pub kind: crate::blueprint::ResourceKind,
    /// What will be created, in a few words.
    pub summary: String,
    /// Addresses it waits for.
    pub depends_on: Vec<String>,
}

/// One check in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedCheck {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: crate::blueprint::CheckKind,
    /// What it looks at.
    pub target: String,
}

/// `budget:` judged against the plan's estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedBudget {
    /// The blueprint's `budget.max_usd`.
    pub max_usd: f64,
    /// Whether `dryrun run` would start.
    pub within: bool,
    /// Why it would be refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// What `dryrun run` would do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Blueprint name.
    pub blueprint: String,
    /// Blueprint file.
    pub path: String,
    /// Provider.
    pub provider: String,
    /// Resources in creation order.
    pub resources: Vec<PlannedResource>,
    /// Backups to restore (or why none could be found).
    pub backups: Vec<PlannedBackup>,
    /// Problems finding backups (the run would fail with exit 3).
    pub backup_errors: Vec<String>,
    /// Checks in order.
    pub checks: Vec<PlannedCheck>,
    /// Teardown policy in words.
    pub teardown: String,
    /// TTL stamped on resources.
    pub ttl: String,
    /// With `--release`: the release's SQL hints (known-dangerous statements), before anything
    /// is provisioned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hints: Option<Vec<crate::migrations::lint::Hint>>,
    /// On a billed provider: what the run would cost (expected and worst case).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::cost::Estimate>,
    /// `budget.max_usd`, and whether the worst case is within it (`Err`: why the run would
    /// be refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<PlannedBudget>,
}

impl Plan {
    /// Builds the plan; `backups` are the provider's answers per database, in blueprint order.
    #[must_use]
    pub fn new(
        bp: &Blueprint,
        provider: &str,
        backups: Vec<PlannedBackup>,
        backup_errors: Vec<String>,
    ) -> Plan {
        let g = Graph::new(bp);
        let resources = g
            .order()
            .into_iter()
            .map(|i| {
                let r = &bp.resources[i];
                let summary = match &r.spec {
                    ResourceSpec::Database(d) => {
                        let from = backups
                            .iter()
                            .find(|b| b.resource == r.address())
                            .map_or_else(
                                || d.backup.clone().unwrap_or_else(|| "latest backup".into()),
                                |b| b.id.clone(),
                            );
                        format!(
                            "{} copy of `{}`, restored from {from}",
                            d.engine.as_str(),
                            d.source
                        )
                    }
                    ResourceSpec::Bucket(b) => format!(
                        "copy of bucket `{}`{}",
                        b.source,
                        b.prefix
                            .as_ref()
                            .map(|p| format!(" (prefix {p})"))
                            .unwrap_or_default()
                    ),
                    ResourceSpec::Service(s) => format!(
                        "candidate release, {} env var{}, ready within {}",
                        s.env.len(),
                        if s.env.len() == 1 { "" } else { "s" },
                        humantime::format_duration(s.ready_timeout)
                    ),
                };
                PlannedResource {
                    address: r.address(),
                    kind: r.spec.kind(),
                    summary,
                    depends_on: g.nodes[i]
                        .deps
                        .iter()
                        .map(|&d| g.nodes[d].address.clone())
                        .collect(),
                }
            })
            .collect();
        let checks = bp
            .checks
            .iter()
            .map(|c| PlannedCheck {
                name: c.name.clone(),
                kind: c.spec.kind(),
                target: match &c.spec {
                    CheckSpec::Http { url, method, .. } => format!("{method} {}", url.src),
                    CheckSpec::Command { run, .. } => run.src.clone(),
                    CheckSpec::Sql {
                        database, query, ..
                    } => format!("{database}: {}", query.src),
                    CheckSpec::Mail { .. } => "the run's SMTP sink".to_string(),
                },
            })
            .collect();
        let teardown = match bp.teardown {
            TeardownPolicy::Always => "always".to_string(),
            TeardownPolicy::OnSuccess { keep_for } => format!(
                "on success (a failed copy is kept {})",
                humantime::format_duration(keep_for)
            ),
            TeardownPolicy::Keep { keep_for } => {
                format!("keep for {}", humantime::format_duration(keep_for))
            }
        };
        Plan {
            blueprint: bp.name.clone(),
            path: bp.path.display().to_string(),
            provider: provider.to_string(),
            resources,
            backups,
            backup_errors,
            checks,
            teardown,
            ttl: humantime::format_duration(bp.ttl).to_string(),
            hints: None,
            cost: None,
            budget: None,
        }
    }

    /// Stable text form.
    #[must_use]
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "plan: blueprint `{}` ({}) on provider {}\n\n",
            self.blueprint, self.path, self.provider
        );
        s.push_str(&format!(
            "resources, in creation order ({}):\n",
            self.resources.len()
        ));
        let w = self
            .resources
            .iter()
            .map(|r| r.address.len())
            .max()
            .unwrap_or(0);
        for (i, r) in self.resources.iter().enumerate() {
            s.push_str(&format!("  {}. {:<w$}  {}\n", i + 1, r.address, r.summary));
            if !r.depends_on.is_empty() {
                s.push_str(&format!(
                    "     {:<w$}  after {}\n",
                    "",
                    r.depends_on.join(", ")
                ));
            }
        }
        s.push_str("\nbackups:\n");
        for b in &self.backups {
            s.push_str(&format!(
                "  {}: {} taken {} (age {})\n",
                b.resource,
                b.id,
                b.taken_at.format("%Y-%m-%d %H:%M UTC"),
                human_secs(b.age_seconds)
            ));
        }
        for e in &self.backup_errors {
            s.push_str(&format!("  error: {e}\n"));
        }
        if self.backups.is_empty() && self.backup_errors.is_empty() {
            s.push_str("  none (no databases)\n");
        }
        s.push_str(&format!("\nchecks ({}):\n", self.checks.len()));
        for c in &self.checks {
            s.push_str(&format!("  - {} ({}): {}\n", c.name, c.kind, c.target));
        }
        s.push_str(&format!(
            "\nteardown: {}; ttl {}\n",
            self.teardown, self.ttl
        ));
        if let Some(hints) = &self.hints {
            s.push_str(&format!("\nrelease SQL hints ({}):\n", hints.len()));
            for h in hints {
                s.push_str(&format!(
                    "  {}:{} {}: {}\n    {}\n    fix: {}\n",
                    h.file,
                    h.line,
                    h.rule,
                    h.message,
                    crate::migrations::short(&h.statement, 120),
                    h.fix
                ));
            }
            if hints.is_empty() {
                s.push_str("  none: no known-dangerous statement in the release's .sql files\n");
            }
        }
        if let Some(c) = &self.cost {
            s.push('\n');
            for l in c.lines() {
                s.push_str(&l);
                s.push('\n');
            }
        }
        if let Some(b) = &self.budget {
            match &b.refusal {
                None => s.push_str(&format!(
                    "budget: worst case within max_usd ${:.2}\n",
                    b.max_usd
                )),
                Some(why) => s.push_str(&format!(
                    "budget: `dryrun run` would be REFUSED (exit 2): {why}\n"
                )),
            }
        }
        s.push_str("nothing was created.\n");
        s
    }

    /// JSON form.
    #[must_use]
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Graphviz dot: an edge from each resource to what it needs.
    #[must_use]
    pub fn to_dot(&self) -> String {
        let mut s = format!("digraph \"{}\" {{\n  rankdir=LR;\n", self.blueprint);
        for r in &self.resources {
            let shape = match r.kind {
                crate::blueprint::ResourceKind::Database => "cylinder",
                crate::blueprint::ResourceKind::Bucket => "folder",
                crate::blueprint::ResourceKind::Service => "box",
            };
            s.push_str(&format!("  \"{}\" [shape={shape}];\n", r.address));
        }
        for r in &self.resources {
            for d in &r.depends_on {
                s.push_str(&format!("  \"{}\" -> \"{d}\";\n", r.address));
            }
        }
        s.push_str("}\n");
        s
    }
}
