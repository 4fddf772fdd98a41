//! Step 2 of a run: walk the graph dependencies first and provision each resource — create,
//! restore (databases, buckets), install (services) — at most `concurrency` at a time.
//!
//! A service's create needs nothing from other resources (its env and start command are
//! rendered at install), so it starts at once, alongside the restores it will wait for: on AWS
//! the instance boots while the database restores, and the critical path is
//! max(restore, boot) + install + checks rather than their sum.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::blueprint::template::Position;
use crate::blueprint::{Blueprint, Resource, ResourceSpec};
use crate::graph::Graph;
use crate::journal::Entry;
use crate::provider::{BackupInfo, InstallRequest, ProviderError, ResourceRequest};
use crate::report::Status;

use super::{Event, Failure, Shared, Step, failure, millis, panic_text};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NodeState {
    Pending,
    /// A service being created before its dependencies are up.
    Creating,
    /// A service created early, waiting for its dependencies to install.
    Created,
    Running,
    Ok,
    Failed,
    Skipped,
}

/// What a provisioning task did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Created a service early (install follows when its dependencies are up).
    Early,
    /// Everything left of create, restore and install.
    Rest,
}

/// Where the walk left each resource.
pub(super) struct Walk {
    pub graph: Graph,
    pub state: Vec<NodeState>,
    pub status: Vec<Status>,
    pub message: Vec<Option<String>>,
    /// Every failed step, backups first, in the order they happened.
    pub failures: Vec<Failure>,
}

impl Walk {
    /// Every resource is up.
    pub fn all_ok(&self) -> bool {
        self.failures.is_empty() && self.state.iter().all(|s| *s == NodeState::Ok)
    }
}

/// Provisions the blueprint's resources in dependency order. A resource whose dependency failed
/// is "skipped: upstream failed"; after `cancel` nothing new starts. `failures` (the backups
/// not found) stop the walk before anything is created.
pub(super) async fn walk(
    bp: &Blueprint,
    shared: &Arc<Shared>,
    backups: &BTreeMap<String, BackupInfo>,
    failures: Vec<Failure>,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Walk {
    let mut graph = Graph::new(bp);
    // Nothing of the release starts before every database passed the personal data gate.
    let databases: Vec<usize> = bp
        .resources
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.spec, ResourceSpec::Database(_)))
        .map(|(i, _)| i)
        .collect();
    for (i, r) in bp.resources.iter().enumerate() {
        if matches!(r.spec, ResourceSpec::Service(_)) {
            for &d in &databases {
                if !graph.nodes[i].deps.contains(&d) {
                    graph.nodes[i].deps.push(d);
                }
            }
        }
    }
    let n = graph.nodes.len();
    let mut w = Walk {
        graph,
        state: vec![NodeState::Pending; n],
        status: vec![Status::Pending; n],
        message: vec![None; n],
        failures,
    };
    if !w.failures.is_empty() {
        return w;
    }
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set: JoinSet<(usize, Phase, Result<(), Failure>)> = JoinSet::new();
    let mut task_node: HashMap<tokio::task::Id, usize> = HashMap::new();
    loop {
        if !cancel.is_cancelled() {
            for i in w.graph.order() {
                if !matches!(w.state[i], NodeState::Pending | NodeState::Created) {
                    continue;
                }
                let deps = &w.graph.nodes[i].deps;
                if let Some(&bad) = deps
                    .iter()
                    .find(|&&d| matches!(w.state[d], NodeState::Failed | NodeState::Skipped))
                {
                    w.status[i] = Status::Skipped;
                    let msg = format!("skipped: upstream failed ({})", w.graph.nodes[bad].address);
                    // A service created early is skipped at install (teardown deletes it).
                    let step = if w.state[i] == NodeState::Created {
                        Step::Install
                    } else {
                        Step::Create
                    };
                    w.state[i] = NodeState::Skipped;
                    shared.emit(Event::StepFinished {
                        address: w.graph.nodes[i].address.clone(),
                        step,
                        status: Status::Skipped,
                        duration_ms: 0,
                        message: Some(msg.clone()),
                    });
                    w.message[i] = Some(msg);
                    continue;
                }
                let ready = deps.iter().all(|&d| w.state[d] == NodeState::Ok);
                let early = !ready
                    && w.state[i] == NodeState::Pending
                    && matches!(bp.resources[i].spec, ResourceSpec::Service(_));
                if ready || early {
                    let phase = if early { Phase::Early } else { Phase::Rest };
                    let created = w.state[i] == NodeState::Created;
                    w.state[i] = if early {
                        NodeState::Creating
                    } else {
                        NodeState::Running
                    };
                    let resource = bp.resources[i].clone();
                    let backup = backups.get(&resource.name).cloned();
                    let sh = shared.clone();
                    let sem = sem.clone();
                    let handle = set.spawn(async move {
                        let _permit = sem.acquire_owned().await;
                        let r = match phase {
                            Phase::Early => create(&sh, &resource).await.map(|_| ()),
                            Phase::Rest => {
                                provision(&sh, &resource, backup.as_ref(), created).await
                            }
                        };
                        (i, phase, r)
                    });
                    task_node.insert(handle.id(), i);
                }
            }
        }
        let Some(res) = set.join_next().await else {
            break;
        };
        match res {
            Ok((i, Phase::Early, Ok(()))) => w.state[i] = NodeState::Created,
            Ok((i, Phase::Rest, Ok(()))) => {
                w.state[i] = NodeState::Ok;
                w.status[i] = Status::Passed;
            }
            Ok((i, _, Err(f))) => {
                w.state[i] = NodeState::Failed;
                w.status[i] = f.status;
                w.message[i] = Some(f.message.clone());
                w.failures.push(f);
            }
            Err(join_err) => {
                // A panicking provider must not stop teardown: the resource whose task
                // panicked fails (blamed on the environment); its siblings go on.
                let idx = task_node.get(&join_err.id()).copied();
                let address = idx.map_or_else(
                    || "a resource".to_string(),
                    |i| w.graph.nodes[i].address.clone(),
                );
                let msg = format!(
                    "provisioning of {address} panicked: {}",
                    panic_text(join_err)
                );
                if let Some(i) = idx {
                    w.state[i] = NodeState::Failed;
                    w.status[i] = Status::Error;
                    w.message[i] = Some(msg.clone());
                    shared.emit(Event::StepFinished {
                        address: address.clone(),
                        step: Step::Create,
                        status: Status::Error,
                        duration_ms: 0,
                        message: Some(msg.clone()),
                    });
                }
                w.failures.push(Failure {
                    status: Status::Error,
                    message: msg,
                });
            }
        }
    }
    for i in 0..n {
        match w.state[i] {
            NodeState::Pending => {
                w.message[i] = Some("not started: the run was interrupted".into());
            }
            NodeState::Created => {
                w.message[i] = Some("created, not installed: the run was interrupted".into());
            }
            _ => {}
        }
    }
    w
}

impl Shared {
    /// What the release may reach on this machine: the sinks and every database copy that
    /// listens on loopback (the firewall opens a door to each).
    fn reachable(&self) -> Vec<std::net::SocketAddr> {
        let mut v = vec![self.sinks.smtp, self.sinks.http];
        let outs = self
            .outputs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Databases are the resources with an `engine` output (a service's own port is not a
        // door out: it is relayed in).
        for o in outs.values().filter(|o| o.contains_key("engine")) {
            let (Some(h), Some(p)) = (o.get("host"), o.get("port")) else {
                continue;
            };
            if let Ok(a) = format!("{}:{}", h.value, p.value).parse::<std::net::SocketAddr>()
                && a.ip().is_loopback()
            {
                v.push(a);
            }
        }
        v
    }

    /// A step of `address` that began at `t` failed: its stage's time and status, the event,
    /// and the failure to return.
    fn step_failed(&self, address: &str, step: Step, t: Instant, f: Failure) -> Failure {
        self.span(step.stage(), t, f.status, Some(f.message.clone()));
        self.emit(Event::StepFinished {
            address: address.to_string(),
            step,
            status: f.status,
            duration_ms: millis(t.elapsed()),
            message: Some(f.message.clone()),
        });
        f
    }

    /// A step of `address` that began at `t` passed.
    fn step_passed(&self, address: &str, step: Step, t: Instant) {
        self.span(step.stage(), t, Status::Passed, None);
        self.emit(Event::StepFinished {
            address: address.to_string(),
            step,
            status: Status::Passed,
            duration_ms: millis(t.elapsed()),
            message: None,
        });
    }

    /// Journals an entry; a resource step never goes ahead without its entry on disk.
    fn journal(&self, address: &str, entry: &Entry) -> Result<(), Failure> {
        self.journal.append(entry).map_err(|e| Failure {
            status: Status::Error,
            message: format!("{address}: {e}"),
        })
    }
}

/// The personal data gate and masking of a restored database, before anything else reads it
/// (services wait for every database: see [`walk`]). A database the runner cannot reach
/// (AWS without `runner_in_vpc`) cannot be scanned: with the gate on or rules to apply, that
/// stops the run too.
async fn protect(
    sh: &Shared,
    name: &str,
    address: &str,
    streamed: Option<&crate::privacy::stream::Streamed>,
) -> Result<(), Failure> {
    let rules = sh.privacy.rules.get(name).cloned().unwrap_or_default();
    if sh.privacy.gate == crate::privacy::Gate::Off && rules.is_empty() && !sh.privacy.scan {
        return Ok(());
    }
    sh.emit(Event::StepStarted {
        address: address.to_string(),
        step: Step::Mask,
        detail: Some(if sh.privacy.scan {
            "scan only".into()
        } else {
            format!("{} rule(s)", rules.len())
        }),
    });
    let t = Instant::now();
    let fail = |message: String| {
        sh.step_failed(
            address,
            Step::Mask,
            t,
            Failure {
                status: Status::Error,
                message: sh.run.redactor.redact(&message),
            },
        )
    };
    if let Err(why) = sh.direct(name, "personal data gate").await {
        return Err(fail(format!(
            "personal data gate: {address} cannot be scanned or masked from this runner ({why}); masking needs a direct connection: run dryrun where it reaches the database, or set `pii_gate: off` and no `masking` rules if the copy holds no personal data"
        )));
    }
    let outputs = sh
        .outputs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(name)
        .cloned()
        .unwrap_or_default();
    let result = async {
        let get = |k: &str| outputs.get(k).map(|o| o.value.clone()).unwrap_or_default();
        let engine = get("engine");
        let location = get(if engine == "sqlite" { "path" } else { "url" });
        let mut db = crate::privacy::open(name, &engine, &location).await?;
        crate::privacy::protect(
            name,
            db.as_mut(),
            &rules,
            sh.privacy.gate,
            &sh.privacy.key,
            (sh.privacy.scan, streamed),
        )
        .await
    }
    .await;
    match result {
        Ok(done) => {
            sh.privacy
                .done
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(done);
            // Not a span of the restore stage: `restore_ms` measures restoring only (masking has
            // its own times in report.json `masking`).
            sh.emit(Event::StepFinished {
                address: address.to_string(),
                step: Step::Mask,
                status: Status::Passed,
                duration_ms: millis(t.elapsed()),
                message: None,
            });
            Ok(())
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// What the provider is asked to make for a resource.
fn request(r: &Resource) -> ResourceRequest {
    match &r.spec {
        ResourceSpec::Database(d) => ResourceRequest::Database(d.clone()),
        ResourceSpec::Bucket(b) => ResourceRequest::Bucket(b.clone()),
        ResourceSpec::Service(s) => ResourceRequest::Service(s.clone()),
    }
}

/// Creates one resource: journaled before (`Creating`) and after (`Created`).
async fn create(sh: &Shared, r: &Resource) -> Result<crate::provider::Created, Failure> {
    let address = r.address();
    let req = request(r);
    let redactor = &sh.run.redactor;
    if sh.cancel.is_cancelled() {
        return Err(Failure {
            status: Status::Error,
            message: format!("{address}: not started, the run was interrupted"),
        });
    }

    // create
    let planned = sh.provider.plan_record(&sh.run, &r.name, &req);
    sh.journal(
        &address,
        &Entry::Creating {
            record: planned.clone(),
        },
    )?;
    sh.set_record(&planned);
    sh.emit(Event::StepStarted {
        address: address.clone(),
        step: Step::Create,
        detail: None,
    });
    let t = Instant::now();
    crate::failpoint::point("provider: before create");
    let created = tokio::select! {
        c = sh.provider.create(&sh.run, &planned, &req) => c,
        () = sh.cancel.cancelled() => Err(ProviderError::Cancelled),
    };
    crate::failpoint::point("provider: after create");
    let created = created.map_err(|e| {
        sh.step_failed(
            &address,
            Step::Create,
            t,
            failure(&address, Step::Create, &e, redactor),
        )
    })?;
    sh.journal(
        &address,
        &Entry::Created {
            record: created.record.clone(),
        },
    )?;
    sh.set_record(&created.record);
    sh.add_outputs(&r.name, created.outputs.clone());
    sh.step_passed(&address, Step::Create, t);
    Ok(created)
}

/// Creates (unless `created`: a service created early), restores and installs one resource.
async fn provision(
    sh: &Shared,
    r: &Resource,
    backup: Option<&BackupInfo>,
    created: bool,
) -> Result<(), Failure> {
    let address = r.address();
    let req = request(r);
    let redactor = &sh.run.redactor;
    let record = if created {
        if sh.cancel.is_cancelled() {
            return Err(Failure {
                status: Status::Error,
                message: format!("{address}: not installed, the run was interrupted"),
            });
        }
        sh.records()
            .into_iter()
            .find(|x| x.address == address)
            .ok_or_else(|| Failure {
                status: Status::Error,
                message: format!("{address}: created, but its record is gone"),
            })?
    } else {
        create(sh, r).await?.record
    };

    // restore
    if matches!(r.spec, ResourceSpec::Database(_) | ResourceSpec::Bucket(_)) {
        let detail = backup.map(|b| b.id.clone()).or_else(|| match &r.spec {
            ResourceSpec::Bucket(b) => Some(b.source.clone()),
            _ => None,
        });
        sh.emit(Event::StepStarted {
            address: address.clone(),
            step: Step::Restore,
            detail,
        });
        let t = Instant::now();
        crate::failpoint::point("provider: before restore");
        // Masking rules go with the restore: a provider that can mask while the data loads does.
        let plan = crate::privacy::stream::MaskPlan {
            rules: sh.privacy.rules.get(&r.name).cloned().unwrap_or_default(),
            key: sh.privacy.key.clone(),
        };
        let restored = if matches!(r.spec, ResourceSpec::Database(_)) {
            let plan = if sh.privacy.scan {
                crate::privacy::stream::MaskPlan {
                    rules: Vec::new(),
                    key: plan.key,
                }
            } else {
                plan
            };
            sh.provider
                .restore_database(&sh.run, &record, &req, backup, &sh.cancel, &plan)
                .await
        } else {
            sh.provider
                .restore(&sh.run, &record, &req, backup, &sh.cancel)
                .await
                .map(|outputs| crate::provider::Restored {
                    outputs,
                    ..Default::default()
                })
        };
        crate::failpoint::point("provider: after restore");
        let restored = restored.map_err(|e| {
            sh.step_failed(
                &address,
                Step::Restore,
                t,
                failure(&address, Step::Restore, &e, redactor),
            )
        })?;
        let (outputs, streamed) = (restored.outputs, restored.streamed);
        if let Some(c) = restored.clone {
            sh.clones
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(r.name.clone(), c);
        }
        sh.add_outputs(&r.name, outputs);
        sh.step_passed(&address, Step::Restore, t);
        if matches!(r.spec, ResourceSpec::Database(_)) {
            protect(sh, &r.name, &address, streamed.as_ref()).await?;
            sh.trace_ready(&r.name).await;
        }
    }

    // install
    if let ResourceSpec::Service(spec) = &r.spec {
        sh.emit(Event::StepStarted {
            address: address.clone(),
            step: Step::Install,
            detail: Some(sh.release.manifest.version.clone()),
        });
        let t = Instant::now();
        let install_error = |what: String| {
            sh.step_failed(
                &address,
                Step::Install,
                t,
                Failure {
                    status: Status::Error,
                    message: redactor.redact(&format!("install of {address} failed: {what}")),
                },
            )
        };
        let ctx = sh.ctx();
        let mut env = BTreeMap::new();
        for (k, v) in &spec.env {
            let value = v
                .render(&ctx)
                .map_err(|e| install_error(format!("env {k}: {e}")))?;
            env.insert(k.clone(), value);
        }
        let start = spec
            .start
            .as_ref()
            .map(|s| s.render_in(&ctx, Position::Shell, &sh.vetted))
            .transpose()
            .map_err(|e| install_error(format!("start: {e}")))?;
        let rec = sh
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|x| x.address == address)
            .cloned()
            .unwrap_or(record);
        let req = InstallRequest {
            record: &rec,
            spec,
            release: &sh.release,
            env,
            start,
            ready_timeout: spec.ready_timeout,
            cancel: sh.cancel.clone(),
            firewall: &sh.firewall,
            reachable: sh.reachable(),
        };
        // The migration monitor watches every ready PostgreSQL and SQLite copy while the
        // release installs.
        sh.trace_begin().await;
        crate::failpoint::point("provider: before install");
        let installed = sh.provider.install(&sh.run, req, sh).await;
        crate::failpoint::point("provider: after install");
        sh.trace_end().await;
        let inst = installed.map_err(|e| {
            sh.step_failed(
                &address,
                Step::Install,
                t,
                failure(&address, Step::Install, &e, redactor),
            )
        })?;
        sh.set_record(&inst.record);
        sh.trace
            .lock()
            .await
            .installs
            .push((address.clone(), inst.steps.clone()));
        sh.add_outputs(&r.name, inst.outputs);
        sh.step_passed(&address, Step::Install, t);
    }
    Ok(())
}
