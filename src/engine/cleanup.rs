//! `dryrun cleanup`: finish what interrupted or kept runs left behind, from their journals and
//! from the provider's tags.
//!
//! Lists before it deletes: [`survey`] changes nothing; [`execute`] deletes, journals each
//! deletion and closes the run when nothing of it remains. Runs whose process still holds the
//! run lock are never touched. Running it twice is harmless: a closed run is skipped.
//!
//! Runs are found from the journals in the state directory *and* from the provider's tags
//! ([`Provider::tagged_runs`]): a run whose journal is missing (a lost state directory) is
//! cleaned by its tag alone. Such a run has no lock here, so `--all` would also clean a run in
//! progress from another state directory or machine; `--expired` only takes runs past the
//! expiry their tags carry.

use chrono::Utc;

use crate::journal::{self, Entry, Journal, RunState};
use crate::provider::{Deleted, Provider};
use crate::state::StateDir;

/// Which runs to clean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One run.
    Run(String),
    /// Every run that is not closed and not in progress.
    All,
    /// Kept copies past their keep time, and unclosed runs past their TTL.
    Expired,
}

/// What cleanup found for one run.
#[derive(Debug, Clone)]
pub struct RunCleanup {
    /// The run as its journal tells it.
    pub state: RunState,
    /// Resources from the journal that may still exist.
    pub resources: Vec<String>,
    /// Anything else carrying the run's tag.
    pub orphans: Vec<String>,
    /// Why the run is skipped (in progress, not expired).
    pub skipped: Option<String>,
    /// Whether the run has a journal in this state directory (false: found only by its tag,
    /// e.g. after the state directory was lost).
    pub journal: bool,
}

/// Outcome for one run after [`execute`].
#[derive(Debug, Clone)]
pub struct Cleaned {
    /// Run id.
    pub run_id: String,
    /// What was removed.
    pub removed: Vec<String>,
    /// What could not be removed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Whether the run is closed now.
    pub closed: bool,
}

/// Errors of cleanup as a whole.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Journals could not be read.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// The run id is unknown.
    #[error("no run `{0}` in {1}; `dryrun runs` lists the runs")]
    UnknownRun(String, String),
    /// The provider could not list tagged resources.
    #[error("could not list resources by tag: {0}")]
    Provider(String),
}

/// Lists what cleanup would do, changing nothing.
///
/// # Errors
/// Unreadable journals, or an unknown run id.
pub async fn survey(
    state: &StateDir,
    provider: &dyn Provider,
    target: &Target,
) -> Result<Vec<RunCleanup>, CleanupError> {
    let runs = journal::list_runs(state)?;
    let now = Utc::now();
    // Runs that own tagged resources, whatever the journals say: a lost state directory or a
    // lost journal line must not be a leak.
    let tagged = provider
        .tagged_runs()
        .await
        .map_err(|e| CleanupError::Provider(e.to_string()))?;
    let has_tags = |id: &str| tagged.iter().any(|t| t.run_id == id);
    let mut selected: Vec<RunState> = match target {
        Target::Run(id) => match runs.into_iter().find(|r| &r.run_id == id) {
            Some(r) => vec![r],
            None if has_tags(id) => Vec::new(),
            None => {
                return Err(CleanupError::UnknownRun(
                    id.clone(),
                    state.root().display().to_string(),
                ));
            }
        },
        Target::All => runs
            .into_iter()
            .filter(|r| !r.closed || has_tags(&r.run_id))
            .collect(),
        Target::Expired => runs
            .into_iter()
            .filter(|r| !r.closed || has_tags(&r.run_id))
            .filter(|r| {
                r.kept_until
                    .map_or_else(|| r.expires_at.is_some_and(|e| e <= now), |k| k <= now)
            })
            .collect(),
    };
    let known: Vec<String> = journal::list_runs(state)?
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    let mut tag_only: Vec<String> = Vec::new();
    for t in &tagged {
        if known.contains(&t.run_id) {
            continue;
        }
        let wanted = match target {
            Target::Run(id) => &t.run_id == id,
            Target::All => true,
            Target::Expired => t.expires_at.is_some_and(|e| e <= now),
        };
        if wanted {
            tag_only.push(t.run_id.clone());
            selected.push(RunState {
                run_id: t.run_id.clone(),
                blueprint: t.blueprint.clone().unwrap_or_else(|| "?".into()),
                provider: provider.name().to_string(),
                expires_at: t.expires_at,
                ..RunState::default()
            });
        }
    }
    let mut out = Vec::new();
    for s in selected {
        if s.provider != provider.name() && !s.provider.is_empty() {
            continue;
        }
        let has_journal = !tag_only.contains(&s.run_id);
        let locked = has_journal && journal::try_lock(&state.run_dir(&s.run_id))?.is_none();
        let skipped = if locked {
            Some(format!(
                "in progress (pid {})",
                s.pid.map_or_else(|| "?".into(), |p| p.to_string())
            ))
        } else if s.closed && !has_tags(&s.run_id) {
            Some("closed: nothing left".into())
        } else {
            None
        };
        let orphans = if skipped.is_none() {
            provider
                .sweep(&s.run_id, false)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.id)
                .collect()
        } else {
            Vec::new()
        };
        let resources = s
            .live
            .iter()
            .map(|r| format!("{} ({})", r.address, r.id))
            .collect();
        out.push(RunCleanup {
            state: s,
            resources,
            orphans,
            skipped,
            journal: has_journal,
        });
    }
    Ok(out)
}

/// Deletes what `survey` listed for the runs that are not skipped.
///
/// # Errors
/// Unreadable journals.
pub async fn execute(
    state: &StateDir,
    provider: &dyn Provider,
    plan: &[RunCleanup],
) -> Result<Vec<Cleaned>, CleanupError> {
    let mut out = Vec::new();
    for rc in plan.iter().filter(|r| r.skipped.is_none()) {
        let run_id = rc.state.run_id.clone();
        if !rc.journal {
            // Found only by tag: nothing to journal; the sweep removes what carries the tag.
            let mut removed = Vec::new();
            let mut failed = Vec::new();
            sweep_into(provider, &run_id, &mut removed, &mut failed).await;
            out.push(Cleaned {
                run_id,
                closed: failed.is_empty(),
                removed,
                failed,
            });
            continue;
        }
        let j = match Journal::reopen(state, &run_id) {
            Ok(j) => j,
            Err(journal::JournalError::Locked(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        for rec in rc.state.live.iter().rev() {
            match provider.delete(rec).await {
                Ok(d) => {
                    j.append(&Entry::Deleted {
                        address: rec.address.clone(),
                    })?;
                    removed.push(format!(
                        "{}{}",
                        rec.address,
                        if d == Deleted::AlreadyGone {
                            " (already gone)"
                        } else {
                            ""
                        }
                    ));
                }
                Err(e) => {
                    j.append(&Entry::DeleteFailed {
                        address: rec.address.clone(),
                        reason: e.to_string(),
                    })?;
                    failed.push((rec.address.clone(), e.to_string()));
                }
            }
        }
        sweep_into(provider, &run_id, &mut removed, &mut failed).await;
        let closed = failed.is_empty();
        if closed {
            j.append(&Entry::Closed {
                at: Utc::now(),
                by: "cleanup".into(),
            })?;
        }
        out.push(Cleaned {
            run_id,
            removed,
            failed,
            closed,
        });
    }
    Ok(out)
}

/// Sweeps the run's tag and sorts what was found into removed and failed.
async fn sweep_into(
    provider: &dyn Provider,
    run_id: &str,
    removed: &mut Vec<String>,
    failed: &mut Vec<(String, String)>,
) {
    match provider.sweep(run_id, true).await {
        Ok(orphans) => {
            for o in orphans {
                if o.removed {
                    removed.push(o.id);
                } else {
                    failed.push((
                        o.id,
                        o.reason.unwrap_or_else(|| "could not be removed".into()),
                    ));
                }
            }
        }
        Err(e) => failed.push((run_id.to_string(), format!("sweep failed: {e}"))),
    }
}
