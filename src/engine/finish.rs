//! Step 5 of a run: the journal's last entries and the [`RunReport`].

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::blueprint::Blueprint;
use crate::journal::Entry;
use crate::provider::BackupInfo;
use crate::report::{
    BackupReport, LeftBehind, ReleaseReport, ResourceReport, RunReport, Stage, StageReport, Status,
    exit_code,
};

use super::teardown::TornDown;
use super::walk::Walk;
use super::{Checked, RunOptions, Shared, Verdict, millis};

/// Everything the steps found.
pub(super) struct Outcome {
    pub started_at: DateTime<Utc>,
    pub t0: Instant,
    pub backups: BTreeMap<String, BackupInfo>,
    pub walked: Walk,
    pub checked: Checked,
    pub verdict: Verdict,
    pub torn: TornDown,
    pub firewall: Option<crate::firewall::FirewallReport>,
    pub judged: super::migrate::Judged,
    pub comparison: Option<crate::migrations::Comparison>,
    pub estimate: Option<crate::cost::Estimate>,
}

/// Writes `Finished` (and `Closed` when nothing remains) to the journal and builds the report.
/// A journal entry that cannot be written makes the run an error and is reported as left
/// behind, so `dryrun cleanup` looks at the run again.
pub(super) fn report(bp: &Blueprint, shared: &Shared, opts: &RunOptions, o: Outcome) -> RunReport {
    let Outcome {
        started_at,
        t0,
        backups,
        walked,
        checked,
        verdict,
        mut torn,
        firewall,
        judged,
        comparison,
        estimate,
    } = o;
    let run_id = shared.run.run_id.clone();
    let mut status = verdict.status;
    let finished_at = Utc::now();
    if let Err(e) = shared.journal.append(&Entry::Finished {
        status: status.as_str().into(),
        left_behind: torn.left_behind.len(),
        at: finished_at,
    }) {
        torn.journal_errors.push(e.to_string());
    }
    if torn.left_behind.is_empty()
        && torn.kept_until.is_none()
        && torn.journal_errors.is_empty()
        && let Err(e) = shared.journal.append(&Entry::Closed {
            at: finished_at,
            by: "run".into(),
        })
    {
        torn.journal_errors.push(e.to_string());
    }
    let mut left_behind = torn.left_behind;
    for e in &torn.journal_errors {
        status = status.merge(Status::Error);
        left_behind.push(LeftBehind {
            address: "journal".into(),
            id: shared.journal.path().display().to_string(),
            reason: format!("could not record the end of the run ({e}); `dryrun cleanup {run_id}` will check it again"),
        });
    }
    let failure = if verdict.interrupted {
        let how = if left_behind.is_empty() {
            "the copy was torn down".to_string()
        } else {
            format!(
                "teardown did not finish: {} item(s) left behind, see below; `dryrun cleanup {run_id} --yes` finishes it",
                left_behind.len()
            )
        };
        verdict.failure.map(|m| format!("{m}; {how}"))
    } else {
        verdict.failure
    };

    let records = shared.records();
    let steps = shared
        .steps
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let spans = shared
        .spans
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut stages = vec![StageReport {
        name: Stage::Compile,
        status: Status::Passed,
        duration_ms: opts.compile_ms,
        message: None,
    }];
    for name in [Stage::Provision, Stage::Restore, Stage::Install] {
        let s = spans.get(&name).cloned().unwrap_or_default();
        let (st, msg) = match s.status {
            Some(st) => (st, s.message.clone()),
            None if !walked.failures.is_empty()
                && name == Stage::Provision
                && records.is_empty() =>
            {
                (
                    Status::Error,
                    walked.failures.first().map(|f| f.message.clone()),
                )
            }
            None => (Status::Skipped, None),
        };
        stages.push(StageReport {
            name,
            status: st,
            duration_ms: s.ms(),
            message: msg,
        });
    }
    let check_status = if checked.ran {
        checked
            .reports
            .iter()
            .fold(Status::Passed, |a, c| a.merge(c.status))
    } else {
        Status::Skipped
    };
    let names = |s: Status| -> Vec<&str> {
        checked
            .reports
            .iter()
            .filter(|c| c.status == s)
            .map(|c| c.name.as_str())
            .collect()
    };
    let check_message = [
        ("failed", names(Status::Failed)),
        ("could not run", names(Status::Error)),
    ]
    .iter()
    .filter(|(_, n)| !n.is_empty())
    .map(|(what, n)| format!("{what}: {}", n.join(", ")))
    .collect::<Vec<_>>()
    .join("; ");
    stages.push(StageReport {
        name: Stage::Check,
        status: check_status,
        duration_ms: checked.ms,
        message: (!check_message.is_empty()).then_some(check_message),
    });
    stages.push(StageReport {
        name: Stage::Teardown,
        status: torn.status,
        duration_ms: torn.ms,
        message: if let Some(u) = torn.kept_until {
            Some(format!(
                "kept until {}; `dryrun cleanup --expired` removes it after that",
                u.to_rfc3339()
            ))
        } else if left_behind.is_empty() {
            None
        } else {
            Some(format!("{} item(s) left behind", left_behind.len()))
        },
    });

    let backup_reports: Vec<BackupReport> = bp
        .resources
        .iter()
        .filter_map(|r| {
            backups.get(&r.name).map(|b| BackupReport {
                id: b.id.clone(),
                source: b.source.clone(),
                resource: r.address(),
                taken_at: b.taken_at,
                age_seconds: (started_at - b.taken_at).num_seconds(),
                clone: shared
                    .clones
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&r.name)
                    .cloned(),
            })
        })
        .collect();
    let graph = &walked.graph;
    let resources: Vec<ResourceReport> = graph
        .order()
        .into_iter()
        .map(|i| {
            let addr = graph.nodes[i].address.clone();
            let rec = records.iter().find(|r| r.address == addr);
            ResourceReport {
                address: addr.clone(),
                kind: bp.resources[i].spec.kind(),
                id: rec.map(|r| r.id.clone()).unwrap_or_default(),
                destroyed: rec.is_none() || torn.destroyed.get(&addr).copied().unwrap_or(false),
                status: walked.status[i],
                message: walked.message[i].clone(),
                steps: steps
                    .iter()
                    .filter(|(a, _)| *a == addr)
                    .map(|(_, s)| s.clone())
                    .collect(),
                install_steps: judged
                    .installs
                    .iter()
                    .filter(|(a, _)| *a == addr)
                    .flat_map(|(_, s)| s)
                    .map(|(name, d)| crate::report::InstallStep {
                        name: name.clone(),
                        duration_ms: millis(*d),
                    })
                    .collect(),
            }
        })
        .collect();
    let restore_ms = spans.get(&Stage::Restore).map(super::Span::ms);
    let provider = shared.provider.as_ref();
    let cost = estimate.map(|e| {
        // Each resource is billed from its create's start to its delete's end (or to
        // now: a kept or left-behind resource goes on costing).
        let now = millis(t0.elapsed());
        let lifetimes = resources
            .iter()
            .filter_map(|r| {
                let start = r
                    .steps
                    .iter()
                    .find(|s| s.step == crate::report::Step::Create)?
                    .start_ms;
                let end = r
                    .steps
                    .iter()
                    .find(|s| s.step == crate::report::Step::Delete && s.status == Status::Passed)
                    .map_or(now, |s| s.start_ms + s.duration_ms);
                #[allow(clippy::cast_precision_loss)]
                let h = end.saturating_sub(start) as f64 / 3_600_000.0;
                Some((r.address.clone(), h))
            })
            .collect();
        Box::new(crate::cost::CostReport {
            actual_usd: e.actual(&lifetimes),
            estimate: e,
        })
    });
    RunReport {
        run_id,
        blueprint: bp.name.clone(),
        blueprint_path: bp.path.display().to_string(),
        release: ReleaseReport {
            reference: opts.release.reference.clone(),
            version: Some(opts.release.manifest.version.clone()),
            git_sha: opts.release.manifest.git_sha.clone(),
        },
        provider: provider.name().to_string(),
        trigger: opts.trigger,
        status,
        exit_code: exit_code(status, left_behind.len()),
        started_at,
        finished_at,
        duration_ms: millis(t0.elapsed()) + opts.compile_ms,
        backup: backup_reports.first().cloned(),
        backups: backup_reports,
        restore_ms,
        stages,
        checks: checked.reports,
        resources,
        left_behind,
        kept_until: torn.kept_until,
        failure: failure.map(|m| shared.run.redactor.redact(&m)),
        api_calls: provider.api_calls(),
        side_effects: shared.sinks.snapshot(),
        firewall,
        migrations: judged.migrations,
        migration_trace: judged.traces,
        guards: judged.guards,
        hints: judged.hints,
        baseline: comparison,
        cost,
        masking: {
            let done = shared
                .privacy
                .done
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let databases = bp
                .resources
                .iter()
                .any(|r| matches!(r.spec, crate::blueprint::ResourceSpec::Database(_)));
            databases.then_some(crate::privacy::MaskingReport {
                gate: shared.privacy.gate,
                databases: done,
            })
        },
    }
}
