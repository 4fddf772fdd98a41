//! dryrun rehearses a release on an exact, throw-away copy of production.
//!
//! # Layout
//! The modules follow one run, in order (docs/ARCHITECTURE.md walks through them):
//!
//! | stage | module | what it does |
//! |---|---|---|
//! | compile | [`blueprint`] | YAML + handlebars → typed, validated [`blueprint::Blueprint`], all diagnostics at once |
//! | plan | [`graph`] | resources → dependency graph, topological order, text/json/dot plan |
//! | run | [`engine`] | walks the graph concurrently, journals every create first, tears down always |
//! | crash safety | [`journal`] | the write-ahead journal per run; `dryrun cleanup` replays it |
//! | backends | [`provider`] | the one [`provider::Provider`] trait; [`provider::local`] is the embedded default |
//! | release | [`release`] | loads the candidate release and its manifest |
//! | references | [`reference`] | the rules for `blueprint`/`release` values from outside: paths stay in the root, only known remote forms |
//! | checks | [`checks`] | http / command / sql / mail checks with timeouts and retries |
//! | personal data | [`privacy`] | the gate that refuses unclassified personal data, masking inside the copy, verification |
//! | side effects | [`sinks`], [`firewall`] | SMTP/HTTP sinks that record what the release sends; the local provider's egress firewall |
//! | report | [`report`] | the run report model and its views (terminal, JSON, JUnit, Markdown) |
//! | edge | [`cli`] | the `dryrun` command line; the only place that uses anyhow |
//! | first hour | [`init`], [`doctor`] | `dryrun init` scaffolds from production's sources; `dryrun doctor` checks what a blueprint needs |
//! | start | [`runner`] | one way to start a run for the CLI and the server: lease, history row, engine, outcome; recovery of a dead run |
//! | control plane | [`control`] | history, queue, dedup, leases, heartbeats, outbox, journal mirror: SQLite for one machine, PostgreSQL for several workers |
//! | triggers | [`server`] | `dryrun serve`: signed portal webhook, queue, API, schedules, dashboard, metrics |
//! | environments | [`lease`] | the environment key and the file lease (one run per environment across processes on one machine) |
//!
//! [`pg`] is the one way to connect to a PostgreSQL copy and word its errors.
//! [`process`] starts the release's processes (tagged, grouped, minimal environment, redacted
//! logs) for the local provider and command checks; [`secret`] keeps secrets out of every view; [`state`] lays out the state directory;
//! [`failpoint`] marks the side-effect points the crash tests abort at (feature `failpoints`).

pub mod blueprint;
pub mod checks;
pub mod cli;
pub mod control;
pub mod cost;
pub mod doctor;
pub mod engine;
pub mod failpoint;
pub mod firewall;
pub mod graph;
pub mod init;
pub mod journal;
pub mod lease;
pub mod migrations;
pub mod pg;
pub mod privacy;
pub mod process;
pub mod provider;
pub mod reference;
pub mod release;
pub mod report;
pub mod runner;
pub mod secret;
pub mod server;
pub mod sinks;
pub mod state;
