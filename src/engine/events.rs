//! Progress events the engine emits while a run is under way.
//!
//! The engine sends them on an unbounded channel and never waits for a reader; views (the
//! terminal display, later the server's live status) consume them. Every string in an event has
//! already been through the run's secret redactor.

use crate::report::Status;
pub use crate::report::{Stage, Step};

/// Something that happened during a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The run has an identity and is about to start provisioning.
    RunStarted {
        /// Run id.
        run_id: String,
        /// Blueprint name.
        blueprint: String,
        /// Provider name.
        provider: String,
        /// Release version (or the reference when no version is known).
        release: String,
    },
    /// A stage began (compile, provision, restore, install, check, teardown).
    StageStarted {
        /// Stage.
        stage: Stage,
    },
    /// A stage ended.
    StageFinished {
        /// Stage.
        stage: Stage,
        /// Outcome.
        status: Status,
        /// Wall time of the stage.
        duration_ms: u64,
    },
    /// A step on a resource began (`create`, `restore`, `install`, `delete`).
    StepStarted {
        /// Resource address, e.g. `database.db`.
        address: String,
        /// Step.
        step: Step,
        /// Short detail, e.g. the backup id being restored.
        detail: Option<String>,
    },
    /// A step on a resource ended.
    StepFinished {
        /// Resource address.
        address: String,
        /// Step.
        step: Step,
        /// Outcome.
        status: Status,
        /// Wall time of the step.
        duration_ms: u64,
        /// Why it failed or was skipped.
        message: Option<String>,
    },
    /// A check began.
    CheckStarted {
        /// Check name.
        name: String,
    },
    /// A check attempt failed and will be retried.
    CheckRetrying {
        /// Check name.
        name: String,
        /// Attempt that failed (1-based).
        attempt: u32,
        /// Why.
        message: String,
    },
    /// A check ended.
    CheckFinished {
        /// Check name.
        name: String,
        /// Outcome.
        status: Status,
        /// Time over all attempts.
        duration_ms: u64,
        /// Actual vs expected.
        message: Option<String>,
    },
    /// A signal arrived. `second` is true for the second one (exit after flushing).
    Interrupted {
        /// Signal name.
        signal: &'static str,
        /// Whether this is the second signal.
        second: bool,
    },
    /// A warning worth showing (e.g. the backup is old).
    Warning {
        /// Message.
        message: String,
    },
}

impl Event {
    /// The same event with `f` applied to each of its texts (names, details, messages).
    #[must_use]
    pub fn map_text(&self, f: impl Fn(&str) -> String) -> Event {
        let opt = |o: &Option<String>| o.as_deref().map(&f);
        match self {
            Event::RunStarted {
                run_id,
                blueprint,
                provider,
                release,
            } => Event::RunStarted {
                run_id: f(run_id),
                blueprint: f(blueprint),
                provider: f(provider),
                release: f(release),
            },
            Event::StepStarted {
                address,
                step,
                detail,
            } => Event::StepStarted {
                address: f(address),
                step: *step,
                detail: opt(detail),
            },
            Event::StepFinished {
                address,
                step,
                status,
                duration_ms,
                message,
            } => Event::StepFinished {
                address: f(address),
                step: *step,
                status: *status,
                duration_ms: *duration_ms,
                message: opt(message),
            },
            Event::CheckStarted { name } => Event::CheckStarted { name: f(name) },
            Event::CheckRetrying {
                name,
                attempt,
                message,
            } => Event::CheckRetrying {
                name: f(name),
                attempt: *attempt,
                message: f(message),
            },
            Event::CheckFinished {
                name,
                status,
                duration_ms,
                message,
            } => Event::CheckFinished {
                name: f(name),
                status: *status,
                duration_ms: *duration_ms,
                message: opt(message),
            },
            Event::Warning { message } => Event::Warning {
                message: f(message),
            },
            Event::StageStarted { .. }
            | Event::StageFinished { .. }
            | Event::Interrupted { .. } => self.clone(),
        }
    }
}
