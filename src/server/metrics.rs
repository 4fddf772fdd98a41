//! Prometheus metrics at `/metrics` (prometheus-client, text exposition format).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::report::RunReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    status: String,
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    stages: Family<StageLabels, Histogram>,
    /// Runs waiting for their environment or a slot.
    pub queue_depth: Gauge,
    /// Runs under way.
    pub running: Gauge,
    left_behind: Counter,
    /// Webhook deliveries refused, by reason.
    rejected: Family<Vec<(String, String)>, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    #[must_use]
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dryrun");
        let runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "runs",
            "Finished dry runs by status and trigger",
            runs.clone(),
        );
        let stages = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ])
        });
        registry.register(
            "stage_duration_seconds",
            "Stage durations of finished runs",
            stages.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Runs waiting for their environment or a slot",
            queue_depth.clone(),
        );
        let running = Gauge::default();
        registry.register("running", "Runs under way", running.clone());
        let left_behind = Counter::default();
        registry.register(
            "resources_left_behind",
            "Resources teardown could not remove",
            left_behind.clone(),
        );
        let rejected = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "webhook_rejected",
            "Webhook deliveries refused, by reason",
            rejected.clone(),
        );
        Metrics {
            registry,
            runs,
            stages,
            queue_depth,
            running,
            left_behind,
            rejected,
        }
    }

    /// Records a finished run.
    pub fn finished(&self, rep: &RunReport, trigger: &str) {
        self.runs
            .get_or_create(&RunLabels {
                status: rep.status.as_str().into(),
                trigger: trigger.into(),
            })
            .inc();
        for s in &rep.stages {
            #[allow(clippy::cast_precision_loss)]
            self.stages
                .get_or_create(&StageLabels {
                    stage: s.name.to_string(),
                })
                .observe(s.duration_ms as f64 / 1000.0);
        }
        self.left_behind.inc_by(rep.left_behind.len() as u64);
    }

    /// Records a run that ended without a report (cancelled, interrupted).
    pub fn ended(&self, status: &str, trigger: &str) {
        self.runs
            .get_or_create(&RunLabels {
                status: status.into(),
                trigger: trigger.into(),
            })
            .inc();
    }

    /// Records a refused webhook delivery.
    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// Text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
