//! Step 4 of a run: tear the copy down in reverse dependency order (or keep it, as the
//! teardown policy says), then sweep for anything else tagged with the run id.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::blueprint::{Blueprint, TeardownPolicy};
use crate::graph::Graph;
use crate::journal::{Entry, Journal};
use crate::provider::{Deleted, Provider, ProviderError, ResourceRecord};
use crate::report::{LeftBehind, Stage, Status};

use super::{Event, Shared, Step, Verdict, millis};

/// What teardown did.
pub(super) struct TornDown {
    /// Addresses destroyed.
    pub destroyed: BTreeMap<String, bool>,
    /// What remains, and why.
    pub left_behind: Vec<LeftBehind>,
    /// The copy is kept until then (no teardown).
    pub kept_until: Option<DateTime<Utc>>,
    /// Journal entries that could not be written (reported; never lose the report).
    pub journal_errors: Vec<String>,
    /// Passed, Error (something left) or Skipped (kept).
    pub status: Status,
    /// Wall time.
    pub ms: u64,
}

/// Tears the copy down, or keeps it when the run was not interrupted and `keep` (the
/// `--keep` option) or the blueprint's teardown policy says so.
pub(super) async fn tear_down_or_keep(
    bp: &Blueprint,
    graph: &Graph,
    shared: &Shared,
    keep: Option<Duration>,
    verdict: &Verdict,
    hard: &CancellationToken,
    timeout: Duration,
) -> TornDown {
    let keep_for = if verdict.interrupted {
        None
    } else {
        match (keep, bp.teardown) {
            (Some(k), _) => Some(k),
            (None, TeardownPolicy::Keep { keep_for }) => Some(keep_for),
            (None, TeardownPolicy::OnSuccess { keep_for }) if verdict.status != Status::Passed => {
                Some(keep_for)
            }
            _ => None,
        }
    };
    let records = shared.records();
    let mut out = TornDown {
        destroyed: BTreeMap::new(),
        left_behind: Vec::new(),
        kept_until: None,
        journal_errors: Vec::new(),
        status: Status::Skipped,
        ms: 0,
    };
    let start = Instant::now();
    shared.emit(Event::StageStarted {
        stage: Stage::Teardown,
    });
    if let Some(k) = keep_for {
        let until =
            Utc::now() + chrono::Duration::from_std(k).unwrap_or(chrono::Duration::hours(1));
        if let Err(e) = shared.journal.append(&Entry::Kept { until }) {
            out.journal_errors.push(e.to_string());
        }
        out.kept_until = Some(until);
    } else {
        let provider = shared.provider.as_ref();
        let (d, lb) = teardown(
            graph,
            &records,
            provider,
            &shared.journal,
            &|ev| shared.emit(ev),
            hard,
            timeout,
        )
        .await;
        out.destroyed = d;
        out.left_behind = lb;
        if !hard.is_cancelled() {
            let run_id = &shared.run.run_id;
            // Like a delete, a sweep that fails (its listing calls throttled past the SDK's
            // retries) is tried again after a pause: "sweep failed" is reported as left behind.
            let mut pauses = DELETE_RETRY_PAUSES.iter();
            let swept = loop {
                crate::failpoint::point("provider: before sweep");
                let swept = provider.sweep(run_id, true).await;
                crate::failpoint::point("provider: after sweep");
                match (&swept, pauses.next()) {
                    (Err(e), Some(&pause)) if !hard.is_cancelled() => {
                        tracing::warn!(
                            "sweep of run {run_id} failed ({e}); trying again in {}",
                            humantime::format_duration(pause)
                        );
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = hard.cancelled() => break swept,
                        }
                    }
                    _ => break swept,
                }
            };
            match swept {
                Ok(orphans) => {
                    for o in orphans.into_iter().filter(|o| !o.removed) {
                        out.left_behind.push(LeftBehind {
                            address: "run".into(),
                            id: o.id,
                            reason: o.reason.unwrap_or_else(|| "could not be removed".into()),
                        });
                    }
                }
                Err(e) => out.left_behind.push(LeftBehind {
                    address: "run".into(),
                    id: run_id.clone(),
                    reason: format!("sweep failed: {e}"),
                }),
            }
        }
        out.status = if out.left_behind.is_empty() {
            Status::Passed
        } else {
            Status::Error
        };
    }
    out.ms = millis(start.elapsed());
    shared.emit(Event::StageFinished {
        stage: Stage::Teardown,
        status: out.status,
        duration_ms: out.ms,
    });
    out
}

/// Pauses before the second and third attempt of a failed delete in teardown.
#[cfg(not(test))]
const DELETE_RETRY_PAUSES: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(8)];
#[cfg(test)]
const DELETE_RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(10), Duration::from_millis(20)];

/// Deletes `records` in reverse dependency order, each failed delete up to three times (see
/// [`DELETE_RETRY_PAUSES`]); keeps going past failures.
/// Returns which addresses were destroyed and what is left behind.
pub(crate) async fn teardown(
    graph: &Graph,
    records: &[ResourceRecord],
    provider: &dyn Provider,
    journal: &Journal,
    emit: &(dyn Fn(Event) + Sync),
    hard: &CancellationToken,
    timeout: Duration,
) -> (BTreeMap<String, bool>, Vec<LeftBehind>) {
    let mut destroyed = BTreeMap::new();
    let mut left = Vec::new();
    // Reverse creation order respects dependencies: dependents were created after what they need.
    let mut order: Vec<usize> = graph.order();
    order.reverse();
    let deadline = Instant::now() + timeout;
    let mut todo: Vec<ResourceRecord> = order
        .iter()
        .filter_map(|&i| {
            records
                .iter()
                .find(|r| r.address == graph.nodes[i].address)
                .cloned()
        })
        .collect();
    // Records the graph does not know (should not happen) go last.
    for r in records {
        if !todo.iter().any(|t| t.address == r.address) {
            todo.push(r.clone());
        }
    }
    let mut remaining = todo.clone();
    for rec in todo {
        if hard.is_cancelled() || Instant::now() >= deadline {
            break;
        }
        emit(Event::StepStarted {
            address: rec.address.clone(),
            step: Step::Delete,
            detail: None,
        });
        let t = Instant::now();
        let mut pauses = DELETE_RETRY_PAUSES.iter();
        let res = loop {
            crate::failpoint::point("provider: before delete");
            let res = tokio::select! {
                r = provider.delete(&rec) => Some(r),
                () = hard.cancelled() => None,
                () = tokio::time::sleep_until(deadline.into()) => None,
            };
            crate::failpoint::point("provider: after delete");
            // A failed delete is tried again after a pause while the deadline allows: cloud
            // APIs fail transiently (throttling past the SDK's retries, a dependency still
            // detaching), and leaving the resource behind is the expensive outcome.
            match (&res, pauses.next()) {
                // A guard refusal or a protection will not change by waiting.
                (Some(Err(e)), Some(&pause))
                    if !matches!(e, ProviderError::Guard(_) | ProviderError::Protected(_))
                        && Instant::now() + pause < deadline
                        && !hard.is_cancelled() =>
                {
                    tracing::warn!(
                        "{}: delete failed ({e}); trying again in {}",
                        rec.address,
                        humantime::format_duration(pause)
                    );
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = hard.cancelled() => break res,
                    }
                }
                _ => break res,
            }
        };
        match res {
            Some(Ok(d)) => {
                let _ = journal.append(&Entry::Deleted {
                    address: rec.address.clone(),
                });
                destroyed.insert(rec.address.clone(), true);
                remaining.retain(|r| r.address != rec.address);
                let msg = (d == Deleted::AlreadyGone).then(|| "already gone".to_string());
                emit(Event::StepFinished {
                    address: rec.address.clone(),
                    step: Step::Delete,
                    status: Status::Passed,
                    duration_ms: millis(t.elapsed()),
                    message: msg,
                });
            }
            Some(Err(e)) => {
                let reason = e.to_string();
                let _ = journal.append(&Entry::DeleteFailed {
                    address: rec.address.clone(),
                    reason: reason.clone(),
                });
                emit(Event::StepFinished {
                    address: rec.address.clone(),
                    step: Step::Delete,
                    status: Status::Error,
                    duration_ms: millis(t.elapsed()),
                    message: Some(reason.clone()),
                });
                left.push(LeftBehind {
                    address: rec.address.clone(),
                    id: rec.id.clone(),
                    reason,
                });
                remaining.retain(|r| r.address != rec.address);
            }
            None => break,
        }
    }
    for rec in remaining {
        let reason = if hard.is_cancelled() {
            "teardown abandoned at the second signal; run `dryrun cleanup` to finish".to_string()
        } else {
            format!(
                "teardown deadline of {} passed; run `dryrun cleanup` to finish",
                humantime::format_duration(timeout)
            )
        };
        left.push(LeftBehind {
            address: rec.address.clone(),
            id: rec.id.clone(),
            reason,
        });
    }
    (destroyed, left)
}
