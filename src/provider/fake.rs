//! A fake provider for engine tests: fails, hangs and panics on cue.
//!
//! Every call is logged in order as `"VERB ADDRESS"` (`"create database.db"`, `"sweep RUN_ID"`).
//! Behaviour is set per resource address with a [`Cue`]; an address without one succeeds. Each
//! `create` also notes whether the journal already held its `Creating` entry, so a test can
//! check the write-ahead guarantee at the moment it matters.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{
    BackupInfo, BackupPick, Created, Deleted, InstallRequest, Installed, Orphan, Output, Outputs,
    ProbeOutcome, ProbeRequest, Provider, ProviderError, RecordSink, ResourceRecord,
    ResourceRequest, RunInfo,
};
use crate::blueprint::DatabaseSpec;
use crate::journal::{self, Entry};

/// What the fake does for one resource.
#[derive(Debug)]
pub enum Cue {
    /// Everything succeeds.
    Ok,
    /// `create` returns this error.
    FailCreate(ProviderError),
    /// `restore` fails: the environment is to blame (exit 3).
    FailRestore,
    /// `install` fails with an install step: the release is to blame (exit 1).
    FailInstall,
    /// `create` never returns; only the engine's cancellation ends it.
    HangCreate,
    /// `create` panics.
    PanicCreate,
    /// `create` succeeds after this long.
    SlowCreate(Duration),
    /// `delete` returns an error.
    FailDelete,
    /// `delete` refuses: the resource is not the run's (a guard error).
    GuardDelete,
    /// `delete` never returns.
    HangDelete,
    /// Keyed `check.NAME`: the probe of that check fails this many more times, the
    /// environment to blame (an API that kept throttling), then runs locally.
    FailProbe(u32),
    /// Keyed `check.NAME`: the probe ran remotely and the copy did not answer.
    NoAnswer,
    /// Keyed `check.NAME`: the probe never returns (an API that never answers).
    HangProbe,
}

/// The fake. Share it as `Arc<FakeProvider>` and hand the engine a clone as `Arc<dyn Provider>`.
#[derive(Debug, Default)]
pub struct FakeProvider {
    cues: Mutex<BTreeMap<String, Cue>>,
    calls: Mutex<Vec<String>>,
    journaled_before_create: Mutex<BTreeMap<String, bool>>,
    create_delay: Duration,
    creating_now: AtomicUsize,
    max_creating: AtomicUsize,
    sweeps_to_fail: AtomicUsize,
}

impl FakeProvider {
    /// A fake where everything succeeds.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the behaviour of one address (`kind.name`).
    #[must_use]
    pub fn cue(self, address: &str, cue: Cue) -> Self {
        self.cues.lock().unwrap().insert(address.to_string(), cue);
        self
    }

    /// Makes every `create` take this long (to observe concurrency).
    #[must_use]
    pub fn create_delay(mut self, d: Duration) -> Self {
        self.create_delay = d;
        self
    }

    /// Makes the next `n` sweeps fail (the provider's listing calls throttled away).
    #[must_use]
    pub fn fail_sweeps(self, n: usize) -> Self {
        self.sweeps_to_fail.store(n, Ordering::SeqCst);
        self
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// Addresses (or run ids) passed to one verb, in order.
    pub fn calls_to(&self, verb: &str) -> Vec<String> {
        let prefix = format!("{verb} ");
        self.calls()
            .iter()
            .filter_map(|c| c.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }

    /// For each created address: was its `Creating` entry on disk when `create` was called?
    pub fn journaled_before_create(&self) -> BTreeMap<String, bool> {
        self.journaled_before_create.lock().unwrap().clone()
    }

    /// Most `create` calls in flight at once.
    pub fn max_concurrent_creates(&self) -> usize {
        self.max_creating.load(Ordering::SeqCst)
    }

    fn log(&self, verb: &str, what: &str) {
        self.calls.lock().unwrap().push(format!("{verb} {what}"));
    }

    fn cued(&self, address: &str, pred: fn(&Cue) -> bool) -> bool {
        self.cues.lock().unwrap().get(address).is_some_and(pred)
    }

    /// Takes a `FailCreate` error out of the cue (errors are not `Clone`; create runs once).
    fn take_create_error(&self, address: &str) -> Option<ProviderError> {
        let mut cues = self.cues.lock().unwrap();
        match cues.remove(address)? {
            Cue::FailCreate(e) => Some(e),
            other => {
                cues.insert(address.to_string(), other);
                None
            }
        }
    }

    fn note_journal(&self, run: &RunInfo, address: &str) {
        let path = run.log_dir.parent().unwrap().join("journal.jsonl");
        let on_disk = journal::read(&path)
            .unwrap_or_default()
            .iter()
            .any(|e| matches!(e, Entry::Creating { record } if record.address == address));
        self.journaled_before_create
            .lock()
            .unwrap()
            .insert(address.to_string(), on_disk);
    }
}

fn outputs(pairs: &[(&str, String)]) -> Outputs {
    pairs
        .iter()
        .map(|(k, v)| {
            let out = Output {
                value: v.clone(),
                secret: false,
            };
            ((*k).to_string(), out)
        })
        .collect()
}

/// Decrements the in-flight count however `create` ends (error, cancellation, panic).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn find_backup(
        &self,
        db: &DatabaseSpec,
        _pick: &BackupPick,
    ) -> Result<BackupInfo, ProviderError> {
        self.log("find_backup", &db.source);
        Ok(BackupInfo {
            id: format!("{}-backup", db.source),
            source: db.source.clone(),
            taken_at: Utc::now(),
            size_bytes: None,
            location: "/nowhere".into(),
        })
    }

    fn plan_record(&self, _run: &RunInfo, name: &str, req: &ResourceRequest) -> ResourceRecord {
        let kind = match req {
            ResourceRequest::Database(_) => crate::blueprint::ResourceKind::Database,
            ResourceRequest::Bucket(_) => crate::blueprint::ResourceKind::Bucket,
            ResourceRequest::Service(_) => crate::blueprint::ResourceKind::Service,
        };
        ResourceRecord {
            address: format!("{kind}.{name}"),
            kind,
            id: format!("fake-{name}"),
            data: BTreeMap::new(),
        }
    }

    async fn create(
        &self,
        run: &RunInfo,
        record: &ResourceRecord,
        _req: &ResourceRequest,
    ) -> Result<Created, ProviderError> {
        let address = record.address.as_str();
        self.log("create", address);
        self.note_journal(run, address);
        let now = self.creating_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_creating.fetch_max(now, Ordering::SeqCst);
        let _in_flight = InFlight(&self.creating_now);
        let slow = match self.cues.lock().unwrap().get(address) {
            Some(Cue::SlowCreate(d)) => *d,
            _ => Duration::ZERO,
        };
        tokio::time::sleep(self.create_delay + slow).await;
        if let Some(e) = self.take_create_error(address) {
            return Err(e);
        }
        if self.cued(address, |c| matches!(c, Cue::HangCreate)) {
            std::future::pending::<()>().await;
        }
        if self.cued(address, |c| matches!(c, Cue::PanicCreate)) {
            panic!("fake provider panics on cue creating {address}");
        }
        let id = &record.id;
        Ok(Created {
            record: record.clone(),
            outputs: outputs(&[
                ("url", format!("fake://{id}")),
                ("path", format!("/fake/{id}")),
                ("engine", "sqlite".into()),
                ("name", id.clone()),
            ]),
        })
    }

    async fn restore(
        &self,
        _run: &RunInfo,
        record: &ResourceRecord,
        _req: &ResourceRequest,
        backup: Option<&BackupInfo>,
        _cancel: &CancellationToken,
    ) -> Result<Outputs, ProviderError> {
        self.log("restore", &record.address);
        if self.cued(&record.address, |c| matches!(c, Cue::FailRestore)) {
            return Err(ProviderError::BadBackup(format!(
                "backup for {} is damaged (fake)",
                record.address
            )));
        }
        let id = backup.map(|b| b.id.clone()).unwrap_or_default();
        Ok(outputs(&[("backup_id", id)]))
    }

    async fn install(
        &self,
        _run: &RunInfo,
        req: InstallRequest<'_>,
        _sink: &dyn RecordSink,
    ) -> Result<Installed, ProviderError> {
        let address = &req.record.address;
        self.log("install", address);
        if self.cued(address, |c| matches!(c, Cue::FailInstall)) {
            return Err(ProviderError::InstallStep {
                step: "migrate".into(),
                status: "exit status 1".into(),
                output: "ERROR: column \"notes\" already exists".into(),
            });
        }
        Ok(Installed {
            record: req.record.clone(),
            outputs: outputs(&[("url", format!("http://127.0.0.1:1/{}", req.record.id))]),
            steps: Vec::new(),
        })
    }

    async fn probe(
        &self,
        _run: &RunInfo,
        req: ProbeRequest<'_>,
    ) -> Result<ProbeOutcome, ProviderError> {
        let address = format!("check.{}", req.check);
        self.log("probe", &address);
        if let Some(Cue::FailProbe(n)) = self.cues.lock().unwrap().get_mut(&address)
            && *n > 0
        {
            *n -= 1;
            return Err(ProviderError::Other(format!(
                "send an SSM command to i-0fake: Throttling: Rate exceeded (fake; {n} more to come)"
            )));
        }
        if self.cued(&address, |c| matches!(c, Cue::HangProbe)) {
            std::future::pending::<()>().await;
        }
        if self.cued(&address, |c| matches!(c, Cue::NoAnswer)) {
            return Ok(ProbeOutcome::Failed {
                message:
                    "GET http://10.0.0.5:8080/ from i-0fake: curl exit code 7: Connection refused"
                        .into(),
                via: "SSM command c-1 on i-0fake".into(),
            });
        }
        Ok(ProbeOutcome::Local)
    }

    async fn delete(&self, record: &ResourceRecord) -> Result<Deleted, ProviderError> {
        self.log("delete", &record.address);
        if self.cued(&record.address, |c| matches!(c, Cue::HangDelete)) {
            std::future::pending::<()>().await;
        }
        if self.cued(&record.address, |c| matches!(c, Cue::GuardDelete)) {
            return Err(ProviderError::Guard(format!(
                "{}: it has no dryrun:run-id tag (fake)",
                record.address
            )));
        }
        if self.cued(&record.address, |c| matches!(c, Cue::FailDelete)) {
            return Err(ProviderError::Other(format!(
                "{} is busy (fake); retry `dryrun cleanup`",
                record.address
            )));
        }
        Ok(Deleted::Destroyed)
    }

    async fn sweep(&self, run_id: &str, _remove: bool) -> Result<Vec<Orphan>, ProviderError> {
        self.log("sweep", run_id);
        if self
            .sweeps_to_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(ProviderError::Other(
                "list tagged resources: throttled".into(),
            ));
        }
        Ok(Vec::new())
    }
}
