//! The terminal views: live progress while a run is under way ([`Progress`]) and the final
//! summary printed after it ([`summary`]).
//!
//! Both write to stderr-sized screens: compact, one fact per line, failure messages quoted
//! verbatim beneath the thing that failed. Colour is opt-in, so a redirected log stays plain.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::{BackupReport, ReleaseReport, RunReport, Stage, Status, human_ms, human_secs};
use crate::engine::events::{Event, Step};

/// Width the summary wraps its stage line at.
const WRAP_AT: usize = 80;

/// Whether `c`, printed, would act on a terminal instead of being shown: control characters
/// (ESC starts the sequences that clear the screen, set the title or write the clipboard —
/// OSC 52 —, CR overwrites a line) and the bidi overrides that reorder what is displayed.
pub(crate) fn acts_on_a_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` as a terminal may show it: line breaks and tabs kept, everything else that
/// [acts on a terminal](acts_on_a_terminal) dropped. Every text the terminal views print goes
/// through it — the release's version, step names and output, check output, database content,
/// error messages quoting any of them — because all of it may come from a hostile release.
#[must_use]
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let keep = |c: char| c == '\n' || c == '\t' || !acts_on_a_terminal(c);
    if s.chars().all(keep) {
        std::borrow::Cow::Borrowed(s)
    } else {
        std::borrow::Cow::Owned(s.chars().filter(|&c| keep(c)).collect())
    }
}

/// `ev` with each of its texts [printable](printable).
#[must_use]
pub fn printable_event(ev: &Event) -> Event {
    ev.map_text(|s| printable(s).into_owned())
}

/// A copy of `report` with every string [printable](printable), keys included. The copy goes
/// through serde_json, so no field can be forgotten when the report grows; `None` if that
/// round trip fails (the caller then prints without colour and filters its whole output).
fn printable_report(report: &RunReport) -> Option<RunReport> {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => {
                if let std::borrow::Cow::Owned(o) = printable(s) {
                    *s = o;
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            serde_json::Value::Object(m) => {
                let old = std::mem::take(m);
                for (k, mut v) in old {
                    walk(&mut v);
                    m.insert(printable(&k).into_owned(), v);
                }
            }
            _ => {}
        }
    }
    let mut v = serde_json::to_value(report).ok()?;
    walk(&mut v);
    serde_json::from_value(v).ok()
}

/// The final summary of a run, as printed after it ended.
///
/// Holds the same facts as report.md: headline (status, blueprint, release, provider, run id,
/// total time), the deciding failure, backup identity and age, restore time, stages, checks
/// (failure messages verbatim beneath them), resources and what was left behind. The last line
/// is always `left behind: ...`. ANSI colour codes appear only when `color` is true.
#[must_use]
pub fn summary(report: &RunReport, color: bool) -> String {
    match printable_report(report) {
        Some(r) => summary_of(&r, color),
        None => printable(&summary_of(report, false)).into_owned(),
    }
}

fn summary_of(report: &RunReport, color: bool) -> String {
    let p = Paint(color);
    let mut out = String::new();

    let word = report.status.as_str().to_uppercase();
    let word = p.paint(status_color(report.status), &word);
    let _ = writeln!(
        out,
        "dry run {word}: {} with release {} on {} (run {}) in {}",
        report.blueprint,
        release_label(&report.release),
        report.provider,
        report.run_id,
        human_ms(report.duration_ms),
    );
    if report.status > Status::Passed
        && let Some(failure) = &report.failure
    {
        let _ = writeln!(out, "{} {failure}", p.paint(RED, "failure:"));
    }

    summary_backups(&mut out, report);
    summary_stages(&mut out, report, p);
    summary_checks(&mut out, report, p);
    for line in crate::migrations::summary_lines(report, 5) {
        let _ = writeln!(out, "{line}");
    }
    summary_resources(&mut out, report, p);
    if let Some(c) = &report.cost {
        let _ = writeln!(out, "{}", c.line());
    }
    summary_left_behind(&mut out, report, p);
    out
}

fn summary_backups(out: &mut String, report: &RunReport) {
    let backups: Vec<&BackupReport> = if report.backups.is_empty() {
        report.backup.iter().collect()
    } else {
        report.backups.iter().collect()
    };
    let several = backups.len() > 1;
    for backup in &backups {
        let _ = write!(
            out,
            "backup {} taken {}, age {}",
            backup.id,
            backup.taken_at.format("%Y-%m-%d %H:%M UTC"),
            human_secs(backup.age_seconds),
        );
        if several {
            let _ = write!(out, ", into {}", backup.resource);
        } else if let Some(ms) = report.restore_ms {
            let _ = write!(out, ", restored in {}", human_ms(ms));
        }
        if let Some(c) = &backup.clone {
            let _ = write!(out, "\n  {}", super::describe_clone(c));
        }
        out.push('\n');
    }
    match (several, report.restore_ms) {
        (true, Some(ms)) => {
            let _ = writeln!(out, "restore took {}", human_ms(ms));
        }
        (false, _) if backups.is_empty() => out.push_str("backup: none restored\n"),
        _ => {}
    }
}

fn summary_stages(out: &mut String, report: &RunReport, p: Paint) {
    if report.stages.is_empty() {
        out.push_str("stages: none\n");
        return;
    }
    let lead = "stages: ";
    let mut width = lead.len();
    out.push_str(lead);
    for (i, stage) in report.stages.iter().enumerate() {
        let mut item = stage.name.to_string();
        if ran(stage.status) {
            let _ = write!(item, " {}", human_ms(stage.duration_ms));
        }
        let item_width = 2 + item.chars().count();
        if i > 0 {
            if width + 2 + item_width > WRAP_AT {
                out.push('\n');
                out.push_str(&" ".repeat(lead.len()));
                width = lead.len();
            } else {
                out.push_str("  ");
                width += 2;
            }
        }
        let _ = write!(out, "{} {item}", p.mark(stage.status));
        width += item_width;
    }
    out.push('\n');
    for stage in report.stages.iter().filter(|s| failed(s.status)) {
        if let Some(message) = &stage.message {
            let _ = writeln!(out, "  {} {}", p.mark(stage.status), stage.name);
            push_indented(out, message, 6);
        }
    }
}

fn summary_checks(out: &mut String, report: &RunReport, p: Paint) {
    if report.checks.is_empty() {
        out.push_str("checks: none\n");
        return;
    }
    let counts: Vec<String> = [
        Status::Passed,
        Status::Failed,
        Status::Error,
        Status::Skipped,
        Status::Pending,
    ]
    .into_iter()
    .filter_map(|s| {
        let n = report.count_checks(s);
        (n > 0).then(|| format!("{n} {}", s.as_str()))
    })
    .collect();
    let _ = writeln!(out, "checks: {}", counts.join(", "));

    let name_width = report
        .checks
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0);
    for check in &report.checks {
        let _ = write!(
            out,
            "  {} {:<name_width$}  ",
            p.mark(check.status),
            check.name
        );
        if ran(check.status) {
            out.push_str(&human_ms(check.duration_ms));
            if check.attempts > 1 {
                let _ = write!(out, ", {} attempts", check.attempts);
            }
            out.push('\n');
            if failed(check.status)
                && let Some(message) = &check.message
            {
                push_indented(out, message, 6);
            }
        } else {
            out.push_str(&not_run_note(check.status, check.message.as_deref()));
            out.push('\n');
        }
    }
}

fn summary_resources(out: &mut String, report: &RunReport, p: Paint) {
    let created = report.resources.iter().filter(|r| !r.id.is_empty()).count();
    let destroyed = report.resources.iter().filter(|r| r.destroyed).count();
    if created == 0 {
        out.push_str("resources: none created");
    } else {
        let _ = write!(out, "resources: {created} created, {destroyed} destroyed");
    }
    if let Some(until) = report.kept_until {
        let _ = write!(
            out,
            ", kept until {} (then `dryrun cleanup --expired`)",
            until.format("%Y-%m-%d %H:%M UTC")
        );
    }
    out.push('\n');
    for resource in report.resources.iter().filter(|r| failed(r.status)) {
        let _ = writeln!(out, "  {} {}", p.mark(resource.status), resource.address);
        if let Some(message) = &resource.message {
            push_indented(out, message, 6);
        }
    }
    if let Some(m) = &report.masking {
        summary_masking(out, m);
    }
    summary_side_effects(out, report);
    if !report.api_calls.is_empty() {
        let total: u64 = report.api_calls.values().sum();
        let _ = writeln!(out, "api calls: {total} ({} provider)", report.provider);
    }
}

/// What the release sent to the sinks and what the firewall refused; the firewall's state.
fn summary_side_effects(out: &mut String, report: &RunReport) {
    let se = &report.side_effects;
    for m in se.mail.iter().take(10) {
        let _ = writeln!(
            out,
            "mail (sink): {} -> {}: {:?}",
            m.from,
            m.to.join(", "),
            m.subject
        );
    }
    for r in se.http.iter().take(10) {
        let _ = writeln!(out, "http (sink): {} {}{}", r.method, r.host, r.path);
    }
    let more =
        (se.mail.len().saturating_sub(10) + se.http.len().saturating_sub(10)) as u64 + se.dropped;
    if more > 0 {
        let _ = writeln!(out, "  … and {more} more (report.json side_effects)");
    }
    if let Some(f) = &report.firewall {
        let state = if f.enforced {
            "enforced"
        } else {
            "NOT enforced"
        };
        let _ = writeln!(out, "firewall: {state}: {}", f.how);
    }
    if !se.blocked.is_empty() {
        let _ = writeln!(
            out,
            "blocked: the release tried to connect to {}",
            se.blocked.join(", ")
        );
    }
}

/// One line per protected database: what was masked, what was kept, how long it took.
fn summary_masking(out: &mut String, m: &crate::privacy::MaskingReport) {
    use crate::privacy::{Gate, Strategy};
    if m.databases.is_empty() {
        if m.gate == Gate::Off {
            out.push_str("personal data gate: off (the blueprint's `pii_gate: off`)\n");
        }
        return;
    }
    for d in &m.databases {
        let masked: Vec<String> = d
            .columns
            .iter()
            .filter(|c| c.strategy != Strategy::Keep)
            .map(|c| format!("{}.{} ({})", c.table, c.column, c.strategy.as_str()))
            .collect();
        let kept = d.columns.len() - masked.len();
        let gate = match m.gate {
            Gate::On => format!("gate passed, {} column(s) scanned", d.scanned_columns),
            Gate::Off => "gate off".to_string(),
        };
        let how = if d.masked_in_restore {
            "while restoring".to_string()
        } else {
            format!("in {} ms", d.mask_ms)
        };
        let _ = writeln!(
            out,
            "masking: {}: {} column(s) masked, {kept} kept, {} row(s) {how}; {gate}",
            d.resource,
            masked.len(),
            d.rows,
        );
        if !masked.is_empty() {
            let _ = writeln!(out, "  {}", masked.join(", "));
        }
    }
}

/// `dryrun scan`'s output: every finding with the rule that covers it, then a `masking:` block
/// for the findings without one; and the exit code (0: every finding has a rule; 1: some have
/// none; the run's own code when the copy could not be made).
#[must_use]
pub fn scan_summary(
    report: &RunReport,
    rules: &std::collections::BTreeMap<String, Vec<crate::privacy::Rule>>,
) -> (String, i32) {
    let mut out = String::new();
    if report.status != Status::Passed {
        let _ = writeln!(
            out,
            "scan failed: {}",
            report
                .failure
                .as_deref()
                .unwrap_or("the copy could not be made")
        );
        return (printable(&out).into_owned(), report.exit_code);
    }
    let mut missing = 0;
    let dbs = report
        .masking
        .as_ref()
        .map(|m| m.databases.as_slice())
        .unwrap_or_default();
    for d in dbs {
        let rules = rules.get(&d.resource).cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "database {}: {} column(s) scanned, {} finding(s)",
            d.resource,
            d.scanned_columns,
            d.findings.len()
        );
        let mut unruled = Vec::new();
        for f in &d.findings {
            let rule = rules
                .iter()
                .find(|r| r.table == f.table && r.column == f.column)
                .map_or("no rule", |r| r.strategy.as_str());
            let _ = writeln!(out, "  {f}  [rule: {rule}]");
            if rule == "no rule" {
                unruled.push(f.clone());
            }
        }
        if !unruled.is_empty() {
            missing += unruled.len();
            let _ = writeln!(
                out,
                "\nstarting rules for {} (review each: `keep` what is not personal data):",
                d.resource
            );
            out.push_str(&crate::privacy::snippet(&d.resource, &unruled));
        }
    }
    if missing == 0 {
        out.push_str("every finding has a masking rule\n");
    }
    // Column names and findings come from the copy of production: no colour here, so the
    // whole text is filtered.
    (printable(&out).into_owned(), i32::from(missing > 0))
}

fn summary_left_behind(out: &mut String, report: &RunReport, p: Paint) {
    if report.left_behind.is_empty() {
        out.push_str("left behind: none\n");
        return;
    }
    let _ = writeln!(out, "{}", p.paint(RED, "left behind:"));
    for item in &report.left_behind {
        let mut reason = item.reason.lines();
        let _ = writeln!(
            out,
            "  {} {} {}: {}",
            p.paint(YELLOW, "!"),
            item.address,
            item.id,
            reason.next().unwrap_or_default()
        );
        for line in reason {
            push_line(out, line, 6);
        }
    }
}

/// Whether a status means the thing actually ran (so its duration means something).
fn ran(status: Status) -> bool {
    !matches!(status, Status::Pending | Status::Skipped)
}

fn failed(status: Status) -> bool {
    matches!(status, Status::Failed | Status::Error)
}

/// `skipped: upstream failed`, `not reached`: why something did not run, on one line.
fn not_run_note(status: Status, message: Option<&str>) -> String {
    let first = message.and_then(|m| m.lines().next()).unwrap_or_default();
    match (status, first) {
        (Status::Pending, "") => "not reached".to_owned(),
        (_, "") => status.as_str().to_owned(),
        (_, m) if m.starts_with(status.as_str()) => m.to_owned(),
        (_, m) => format!("{}: {m}", status.as_str()),
    }
}

/// `2.0.0 (9f8e7d6c5b4a)`: the version (or the reference) and the short git sha.
fn release_label(release: &ReleaseReport) -> String {
    let name = release.version.as_deref().unwrap_or(&release.reference);
    match &release.git_sha {
        Some(sha) => format!("{name} ({})", sha.get(..12).unwrap_or(sha)),
        None => name.to_owned(),
    }
}

/// Appends `text` line by line, each non-empty line indented by `indent` spaces.
fn push_indented(out: &mut String, text: &str, indent: usize) {
    for line in text.lines() {
        push_line(out, line, indent);
    }
}

fn push_line(out: &mut String, line: &str, indent: usize) {
    if !line.is_empty() {
        out.push_str(&" ".repeat(indent));
        out.push_str(line);
    }
    out.push('\n');
}

const GREEN: &str = "32";
const RED: &str = "1;31";
const YELLOW: &str = "33";
const DIM: &str = "2";
const BOLD: &str = "1";

fn status_color(status: Status) -> &'static str {
    match status {
        Status::Passed => "1;32",
        Status::Failed | Status::Error => RED,
        Status::Skipped | Status::Pending => YELLOW,
    }
}

/// ANSI colouring that is a no-op when colour is off.
#[derive(Debug, Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn paint(self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// `✓` passed, `✗` failed, `!` error, `-` skipped or not reached.
    fn mark(self, status: Status) -> String {
        match status {
            Status::Passed => self.paint(GREEN, "✓"),
            Status::Failed => self.paint(RED, "✗"),
            Status::Error => self.paint(RED, "!"),
            Status::Skipped | Status::Pending => self.paint(DIM, "-"),
        }
    }
}

/// How [`Progress`] shows a run while it is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Spinners that finish into `✓`/`✗` lines; for a terminal on stderr.
    Fancy,
    /// One deterministic line per start and finish, e.g.
    /// `[provision] database.db create ... ok (120 ms)`; for logs and CI.
    Plain,
    /// Nothing but warnings and interruptions.
    Quiet,
}

impl ProgressMode {
    /// The mode for stderr as it is: `Quiet` when asked, `Fancy` on a terminal (unless
    /// `TERM=dumb`), `Plain` otherwise.
    #[must_use]
    pub fn detect(quiet: bool) -> ProgressMode {
        use std::io::IsTerminal;
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        if quiet {
            ProgressMode::Quiet
        } else if io::stderr().is_terminal() && !dumb {
            ProgressMode::Fancy
        } else {
            ProgressMode::Plain
        }
    }
}

/// What a spinner stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Stage(Stage),
    Step(String, Step),
    Check(String),
}

/// Events as plain text lines — the one textual rendering of progress, used by the terminal's
/// `Plain` mode and by `dryrun serve` for a run's live progress (`GET /v1/runs/{id}`, the run
/// page). It remembers the current stage and each step's label between events.
#[derive(Debug, Default)]
pub struct PlainLines {
    stage: Option<Stage>,
    labels: HashMap<Key, String>,
}

impl PlainLines {
    /// The text of an event: one line, plus the message indented beneath it; `None` for an
    /// event that shows nothing.
    pub fn render(&mut self, ev: &Event) -> Option<String> {
        let mut out = String::new();
        match ev {
            Event::RunStarted { .. } | Event::Interrupted { .. } | Event::Warning { .. } => {
                return alert_line(ev).or_else(|| Some(run_line(ev)));
            }
            Event::StageStarted { stage } => {
                self.stage = Some(*stage);
                let _ = writeln!(out, "[{stage}] started");
            }
            Event::StageFinished {
                stage,
                status,
                duration_ms,
            } => {
                self.stage = None;
                let _ = writeln!(out, "[{stage}] {}", outcome(*status, *duration_ms));
            }
            Event::StepStarted {
                address,
                step,
                detail,
            } => {
                let label = format!("{address} {step}{}", detail_suffix(detail.as_deref()));
                let _ = writeln!(
                    out,
                    "[{}] {label} ...",
                    self.stage.unwrap_or_else(|| step.stage())
                );
                self.labels.insert(Key::Step(address.clone(), *step), label);
            }
            Event::StepFinished {
                address,
                step,
                status,
                duration_ms,
                message,
            } => {
                let label = self
                    .labels
                    .remove(&Key::Step(address.clone(), *step))
                    .unwrap_or_else(|| format!("{address} {step}"));
                let prefix = self.stage.unwrap_or_else(|| step.stage());
                let _ = writeln!(
                    out,
                    "[{prefix}] {label} ... {}",
                    outcome(*status, *duration_ms)
                );
                push_indented(&mut out, message.as_deref().unwrap_or_default(), 4);
            }
            Event::CheckStarted { name } => {
                let _ = writeln!(out, "[check] {name} ...");
            }
            Event::CheckRetrying {
                name,
                attempt,
                message,
            } => {
                let _ = writeln!(out, "[check] {name} attempt {attempt} failed, retrying");
                push_indented(&mut out, message, 4);
            }
            Event::CheckFinished {
                name,
                status,
                duration_ms,
                message,
            } => {
                let _ = writeln!(out, "[check] {name} ... {}", outcome(*status, *duration_ms));
                push_indented(&mut out, message.as_deref().unwrap_or_default(), 4);
            }
        }
        Some(out)
    }
}

/// The live progress display: feed it every [`Event`] of a run, then call
/// [`finish`](Progress::finish).
///
/// `Plain` and `Quiet` write to stderr (or the writer given to
/// [`with_writer`](Progress::with_writer)); `Fancy` draws indicatif spinners on stderr and
/// colours its marks unless `NO_COLOR` is set. Write errors (a closed stderr) are ignored:
/// progress is never worth failing a run over.
pub struct Progress {
    mode: ProgressMode,
    out: Box<dyn Write + Send>,
    color: bool,
    stage: Option<Stage>,
    labels: HashMap<Key, String>,
    plain: PlainLines,
    multi: Option<MultiProgress>,
    bars: HashMap<Key, ProgressBar>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("mode", &self.mode)
            .field("stage", &self.stage)
            .field("running", &self.bars.len())
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// A display in `mode` on stderr.
    #[must_use]
    pub fn new(mode: ProgressMode) -> Progress {
        Progress::with_writer(mode, Box::new(io::stderr()))
    }

    /// A display whose `Plain` and `Quiet` output goes to `out` (`Fancy` always draws on
    /// stderr).
    #[must_use]
    pub fn with_writer(mode: ProgressMode, out: Box<dyn Write + Send>) -> Progress {
        let fancy = mode == ProgressMode::Fancy;
        Progress {
            mode,
            out,
            color: fancy && std::env::var_os("NO_COLOR").is_none(),
            stage: None,
            labels: HashMap::new(),
            plain: PlainLines::default(),
            multi: fancy.then(MultiProgress::new),
            bars: HashMap::new(),
        }
    }

    /// Renders one event (its text [printable](printable)).
    pub fn handle(&mut self, ev: &Event) {
        let ev = &printable_event(ev);
        match self.mode {
            ProgressMode::Quiet => {
                if let Some(line) = alert_line(ev) {
                    self.emit(&line);
                }
            }
            ProgressMode::Plain => {
                if let Some(text) = self.plain.render(ev) {
                    self.emit(&text);
                }
            }
            ProgressMode::Fancy => self.fancy(ev),
        }
    }

    /// Clears any spinner still running (e.g. after an interruption). Idempotent; also done on
    /// drop.
    pub fn finish(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
            if let Some(multi) = &self.multi {
                multi.remove(&bar);
            }
        }
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
        let _ = self.out.flush();
    }

    fn emit(&mut self, text: &str) {
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
    }

    fn fancy(&mut self, ev: &Event) {
        let p = Paint(self.color);
        match ev {
            Event::RunStarted { .. } => self.println(&p.paint(BOLD, run_line(ev).trim_end())),
            Event::Interrupted { .. } | Event::Warning { .. } => {
                if let Some(line) = alert_line(ev) {
                    self.println(&p.paint(YELLOW, line.trim_end()));
                }
            }
            Event::StageStarted { stage } => {
                self.stage = Some(*stage);
                self.spin(
                    Key::Stage(*stage),
                    "{spinner:.cyan} {msg:.bold} {elapsed:.dim}",
                    stage.as_str(),
                );
            }
            Event::StageFinished {
                stage,
                status,
                duration_ms,
            } => {
                self.stage = None;
                self.stop(&Key::Stage(*stage));
                let line = format!(
                    "{} {stage} {}",
                    p.mark(*status),
                    fancy_time(*status, *duration_ms)
                );
                self.println(&line);
            }
            Event::StepStarted {
                address,
                step,
                detail,
            } => {
                let label = format!("{step} {address}{}", detail_suffix(detail.as_deref()));
                let key = Key::Step(address.clone(), *step);
                self.spin(
                    key.clone(),
                    "  {spinner:.cyan} {msg} {elapsed:.dim}",
                    &label,
                );
                self.labels.insert(key, label);
            }
            Event::StepFinished {
                address,
                step,
                status,
                duration_ms,
                message,
            } => {
                let key = Key::Step(address.clone(), *step);
                self.stop(&key);
                let label = self
                    .labels
                    .remove(&key)
                    .unwrap_or_else(|| format!("{step} {address}"));
                self.finished_line(*status, &label, *duration_ms, message.as_deref());
            }
            Event::CheckStarted { name } => {
                self.spin(
                    Key::Check(name.clone()),
                    "  {spinner:.cyan} {msg} {elapsed:.dim}",
                    &format!("check {name}"),
                );
            }
            Event::CheckRetrying {
                name,
                attempt,
                message,
            } => {
                if let Some(bar) = self.bars.get(&Key::Check(name.clone())) {
                    let last = message.lines().next().unwrap_or_default();
                    bar.set_message(format!(
                        "check {name}, attempt {} (last: {last})",
                        attempt + 1
                    ));
                }
            }
            Event::CheckFinished {
                name,
                status,
                duration_ms,
                message,
            } => {
                self.stop(&Key::Check(name.clone()));
                let label = format!("check {name}");
                self.finished_line(*status, &label, *duration_ms, message.as_deref());
            }
        }
    }

    fn finished_line(&self, status: Status, label: &str, duration_ms: u64, message: Option<&str>) {
        let p = Paint(self.color);
        let mut line = format!(
            "  {} {label} {}\n",
            p.mark(status),
            fancy_time(status, duration_ms)
        );
        if status != Status::Passed {
            push_indented(&mut line, message.unwrap_or_default(), 6);
        }
        self.println(line.trim_end());
    }

    fn spin(&mut self, key: Key, template: &str, message: &str) {
        let Some(multi) = &self.multi else { return };
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = multi.add(ProgressBar::new_spinner().with_style(style));
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(100));
        if let Some(old) = self.bars.insert(key, bar) {
            old.finish_and_clear();
            multi.remove(&old);
        }
    }

    fn stop(&mut self, key: &Key) {
        if let Some(bar) = self.bars.remove(key) {
            bar.finish_and_clear();
            if let Some(multi) = &self.multi {
                multi.remove(&bar);
            }
        }
    }

    fn println(&self, text: &str) {
        if let Some(multi) = &self.multi {
            let _ = multi.println(text);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `dry run started: shop with release 2.0.0 on local (run dr-1)`.
fn run_line(ev: &Event) -> String {
    match ev {
        Event::RunStarted {
            run_id,
            blueprint,
            provider,
            release,
        } => format!(
            "dry run started: {blueprint} with release {release} on {provider} (run {run_id})\n"
        ),
        _ => String::new(),
    }
}

/// Lines every mode shows, `Quiet` included: warnings and interruptions.
fn alert_line(ev: &Event) -> Option<String> {
    match ev {
        Event::Warning { message } => {
            let mut out = String::new();
            let mut lines = message.lines();
            let _ = writeln!(out, "warning: {}", lines.next().unwrap_or_default());
            for line in lines {
                push_line(&mut out, line, 4);
            }
            Some(out)
        }
        Event::Interrupted {
            signal,
            second: false,
        } => Some(format!(
            "interrupted by {signal}: tearing down (send it again to stop once the journal is flushed)\n"
        )),
        Event::Interrupted {
            signal,
            second: true,
        } => Some(format!(
            "second {signal}: stopping once the journal is flushed; `dryrun cleanup` removes what is left\n"
        )),
        _ => None,
    }
}

/// ` ← shop-db-2026-11-21T0300Z`, or nothing.
fn detail_suffix(detail: Option<&str>) -> String {
    detail
        .filter(|d| !d.is_empty())
        .map(|d| format!(" ← {d}"))
        .unwrap_or_default()
}

/// `ok (120 ms)`, `FAILED (2.1 s)`, `skipped`.
fn outcome(status: Status, duration_ms: u64) -> String {
    let word = match status {
        Status::Passed => "ok",
        Status::Failed => "FAILED",
        Status::Error => "ERROR",
        Status::Skipped => "skipped",
        Status::Pending => "not reached",
    };
    if ran(status) {
        format!("{word} ({})", human_ms(duration_ms))
    } else {
        word.to_owned()
    }
}

fn fancy_time(status: Status, duration_ms: u64) -> String {
    if ran(status) {
        format!("({})", human_ms(duration_ms))
    } else {
        status.as_str().to_owned()
    }
}

/// Report fixtures shared by the view tests.
#[cfg(test)]
pub(crate) mod testutil {
    use chrono::{DateTime, TimeZone, Utc};

    use crate::report::{
        BackupReport, CheckReport, ReleaseReport, ResourceReport, RunReport, StageReport, Status,
        Trigger, exit_code,
    };

    /// Check message with a pipe and several lines, as a sql check reports a mismatch.
    pub(crate) const CHECK_FAILURE: &str = "expected 3 rows, got 2\n| id | sku |\n|  7 | NULL |";

    /// A failing migration's error as the database reports it: multi-line, indented, with a pipe.
    pub(crate) const MIGRATION_FAILURE: &str = "migration 0042_add_sku.sql failed at statement 2:\n    ALTER TABLE orders ALTER COLUMN sku SET NOT NULL;\nERROR:  column \"sku\" of relation \"orders\" contains null values\nCONTEXT:  line 2 | orders.sku";

    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, h, 0, 0).unwrap()
    }

    fn stage(name: &str, status: Status, duration_ms: u64, message: Option<&str>) -> StageReport {
        StageReport {
            name: serde_json::from_value(name.into()).expect("a stage name"),
            status,
            duration_ms,
            message: message.map(str::to_owned),
        }
    }

    fn check(name: &str, kind: &str, status: Status, message: Option<&str>) -> CheckReport {
        CheckReport {
            name: name.to_owned(),
            kind: serde_json::from_value(kind.into()).expect("a check kind"),
            status,
            duration_ms: if matches!(status, Status::Skipped | Status::Pending) {
                0
            } else {
                120
            },
            attempts: u32::from(!matches!(status, Status::Skipped | Status::Pending)),
            message: message.map(str::to_owned),
            output: None,
            timings_ms: Vec::new(),
        }
    }

    fn resource(address: &str, kind: &str, id: &str) -> ResourceReport {
        ResourceReport {
            address: address.to_owned(),
            kind: serde_json::from_value(kind.into()).expect("a resource kind"),
            id: id.to_owned(),
            destroyed: true,
            status: Status::Passed,
            message: None,
            steps: Vec::new(),
            install_steps: Vec::new(),
        }
    }

    /// A run of blueprint `shop` with release 2.0.0 on `local` that ended with `status`:
    /// `Failed` has the `orders-count` check fail with [`CHECK_FAILURE`] (3 attempts), `Error`
    /// has the restore stage fail for reasons of the environment; anything else passes.
    pub(crate) fn sample_report(status: Status) -> RunReport {
        let backup = BackupReport {
            id: "shop-db-2026-11-21T0300Z".to_owned(),
            source: "shop-db".to_owned(),
            resource: "database.db".to_owned(),
            taken_at: Utc.with_ymd_and_hms(2026, 11, 21, 3, 0, 0).unwrap(),
            age_seconds: 93_600,
            clone: None,
        };
        let mut report = RunReport {
            run_id: "dr-20261122-0300-a1b2".to_owned(),
            blueprint: "shop".to_owned(),
            blueprint_path: "blueprints/shop.yaml".to_owned(),
            release: ReleaseReport {
                reference: "./dist/shop-2.0.0.tar.gz".to_owned(),
                version: Some("2.0.0".to_owned()),
                git_sha: Some("9f8e7d6c5b4a39281706f5e4d3c2b1a098765432".to_owned()),
            },
            provider: "local".to_owned(),
            trigger: Trigger::Cli,
            status: Status::Passed,
            exit_code: 0,
            started_at: at(5),
            finished_at: at(5) + chrono::Duration::milliseconds(11_712),
            duration_ms: 11_712,
            backup: Some(backup.clone()),
            backups: vec![backup],
            restore_ms: Some(4_200),
            stages: vec![
                stage("compile", Status::Passed, 12, None),
                stage("provision", Status::Passed, 1_200, None),
                stage("restore", Status::Passed, 4_200, None),
                stage("install", Status::Passed, 2_100, None),
                stage("check", Status::Passed, 3_400, None),
                stage("teardown", Status::Passed, 800, None),
            ],
            checks: vec![
                check("home-page", "http", Status::Passed, None),
                check("orders-count", "sql", Status::Passed, None),
                check("migrations-applied", "command", Status::Passed, None),
            ],
            resources: vec![
                resource(
                    "database.db",
                    "database",
                    "/tmp/dryrun/dr-20261122-0300-a1b2/db",
                ),
                resource(
                    "bucket.assets",
                    "bucket",
                    "/tmp/dryrun/dr-20261122-0300-a1b2/assets",
                ),
                resource("service.web", "service", "pid 4242"),
            ],
            left_behind: vec![],
            kept_until: None,
            failure: None,
            api_calls: std::collections::BTreeMap::new(),
            masking: None,
            side_effects: crate::sinks::SideEffects::default(),
            migrations: Vec::new(),
            migration_trace: Vec::new(),
            guards: Vec::new(),
            hints: Vec::new(),
            baseline: None,
            cost: None,
            firewall: None,
        };
        match status {
            Status::Failed => {
                report.stages[4].status = Status::Failed;
                report.stages[4].message = Some("1 of 3 checks failed".to_owned());
                let failing = &mut report.checks[1];
                failing.status = Status::Failed;
                failing.attempts = 3;
                failing.duration_ms = 3_040;
                failing.message = Some(CHECK_FAILURE.to_owned());
                failing.output = Some("id | sku\n7 | NULL\n".to_owned());
                report.failure =
                    Some("check orders-count failed: expected 3 rows, got 2".to_owned());
            }
            Status::Error => {
                let message = "restore of shop-db-2026-11-21T0300Z into database.db failed:\npg_restore: error: could not open input file: Permission denied";
                report.stages[2] = stage("restore", Status::Error, 300, Some(message));
                report.stages[3] = stage("install", Status::Skipped, 0, Some("upstream failed"));
                report.stages[4] = stage("check", Status::Skipped, 0, Some("upstream failed"));
                report.restore_ms = None;
                for check in &mut report.checks {
                    *check = skipped_check(check);
                }
                report.failure = Some("restore of shop-db-2026-11-21T0300Z failed".to_owned());
            }
            _ => {}
        }
        report.status = status.max(Status::Passed);
        report.exit_code = exit_code(report.status, report.left_behind.len());
        report
    }

    fn skipped_check(c: &CheckReport) -> CheckReport {
        check(
            &c.name,
            c.kind.as_str(),
            Status::Skipped,
            Some("upstream failed"),
        )
    }

    /// A run whose install stage failed on a schema migration ([`MIGRATION_FAILURE`]); the
    /// checks were skipped.
    pub(crate) fn failing_migration_report() -> RunReport {
        let mut report = sample_report(Status::Passed);
        report.stages[3] = stage("install", Status::Failed, 2_100, Some(MIGRATION_FAILURE));
        report.stages[4] = stage("check", Status::Skipped, 0, Some("upstream failed"));
        for check in &mut report.checks {
            *check = skipped_check(check);
        }
        report.status = Status::Failed;
        report.exit_code = exit_code(report.status, 0);
        report.failure = Some("migration 0042_add_sku.sql failed on service.web".to_owned());
        report
    }

    /// A fresh, empty directory under the system temp dir, unique to this process and `name`.
    pub(crate) fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dryrun-report-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::testutil::{
        CHECK_FAILURE, MIGRATION_FAILURE, failing_migration_report, sample_report,
    };
    use super::*;
    use crate::report::LeftBehind;

    #[test]
    fn passing_summary_states_the_key_facts() {
        let text = summary(&sample_report(Status::Passed), false);
        let lines: Vec<&str> = text.lines().collect();

        assert_eq!(
            lines[0],
            "dry run PASSED: shop with release 2.0.0 (9f8e7d6c5b4a) on local (run dr-20261122-0300-a1b2) in 11.7 s"
        );
        assert_eq!(
            lines[1],
            "backup shop-db-2026-11-21T0300Z taken 2026-11-21 03:00 UTC, age 1 d 2 h, restored in 4.2 s"
        );
        assert!(text.contains("✓ compile 12 ms"), "{text}");
        assert!(text.contains("✓ teardown 800 ms"), "{text}");
        assert!(text.contains("checks: 3 passed\n"), "{text}");
        assert!(text.contains("  ✓ home-page           120 ms\n"), "{text}");
        assert!(
            text.contains("resources: 3 created, 3 destroyed\n"),
            "{text}"
        );
        assert!(!text.contains("failure:"), "{text}");
        assert_eq!(lines.last(), Some(&"left behind: none"));
    }

    #[test]
    fn failing_summary_quotes_the_check_message_verbatim_beneath_it() {
        let text = summary(&sample_report(Status::Failed), false);

        assert!(text.starts_with("dry run FAILED: shop"), "{text}");
        assert!(
            text.contains("failure: check orders-count failed: expected 3 rows, got 2\n"),
            "{text}"
        );
        assert!(
            text.contains("  ✗ orders-count        3.0 s, 3 attempts\n"),
            "{text}"
        );
        let quoted: String = CHECK_FAILURE
            .lines()
            .map(|l| "      ".to_owned() + l + "\n")
            .collect();
        assert!(text.contains(&quoted), "{text}");
        assert!(text.contains("✗ check 3.4 s"), "{text}");
        assert!(text.ends_with("left behind: none\n"), "{text}");
    }

    #[test]
    fn failing_migration_summary_quotes_the_database_error_verbatim() {
        let text = summary(&failing_migration_report(), false);

        let quoted: String = MIGRATION_FAILURE
            .lines()
            .map(|l| "      ".to_owned() + l + "\n")
            .collect();
        assert!(text.contains(&format!("  ✗ install\n{quoted}")), "{text}");
        assert!(
            text.contains("  - home-page           skipped: upstream failed\n"),
            "{text}"
        );
        assert!(text.contains("checks: 3 skipped\n"), "{text}");
    }

    #[test]
    fn error_summary_marks_the_environment_failure_with_a_bang() {
        let text = summary(&sample_report(Status::Error), false);
        assert!(text.starts_with("dry run ERROR: "), "{text}");
        assert!(text.contains("! restore 300 ms"), "{text}");
        assert!(text.contains("- install  - check"), "{text}");
        assert!(
            text.contains("pg_restore: error: could not open input file"),
            "{text}"
        );
    }

    #[test]
    fn summary_lists_each_left_behind_item_last() {
        let mut report = sample_report(Status::Passed);
        report.resources[0].destroyed = false;
        report.left_behind.push(LeftBehind {
            address: "database.db".to_owned(),
            id: "/tmp/dryrun/dr-20261122-0300-a1b2/db".to_owned(),
            reason: "permission denied".to_owned(),
        });
        let text = summary(&report, false);

        assert!(
            text.contains("resources: 3 created, 2 destroyed\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "left behind:\n  ! database.db /tmp/dryrun/dr-20261122-0300-a1b2/db: permission denied\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn summary_has_ansi_codes_only_when_color_is_on() {
        let report = sample_report(Status::Failed);
        assert!(!summary(&report, false).contains('\x1b'));
        let colored = summary(&report, true);
        assert!(colored.contains("\x1b[1;31mFAILED\x1b[0m"), "{colored}");
        assert!(colored.contains("\x1b[32m✓\x1b[0m"), "{colored}");
    }

    /// Sequences a hostile release could print: clear screen, window title, clipboard write
    /// (OSC 52), carriage return over the line, a bidi override.
    const HOSTILE: &str = "a\x1b[2Jb\x1b]0;title\x07c\x1b]52;c;cHduZWQ=\x07d\rPASSED\u{202e}e";

    #[test]
    fn printable_keeps_lines_and_tabs_and_drops_what_acts_on_a_terminal() {
        assert_eq!(printable(HOSTILE), "a[2Jb]0;titlec]52;c;cHduZWQ=dPASSEDe");
        assert_eq!(printable("one\n\ttwo"), "one\n\ttwo");
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
        // One line for `clean`: the line break goes too.
        assert_eq!(crate::sinks::clean("x\ny\u{2066}z", 10), "xyz");
    }

    #[test]
    fn release_text_in_a_summary_cannot_act_on_the_terminal() {
        let mut report = sample_report(Status::Failed);
        // The report round-trips unchanged when there is nothing to filter.
        assert_eq!(printable_report(&report).as_ref(), Some(&report));
        report.release.version = Some(format!("2.0.0{HOSTILE}"));
        report.failure = Some(format!("install step `{HOSTILE}` failed\n{HOSTILE}"));
        report.checks[0].message = Some(HOSTILE.to_owned());
        report.checks[0].output = Some(HOSTILE.to_owned());
        report.resources[0].message = Some(HOSTILE.to_owned());
        let plain = summary(&report, false);
        assert!(
            !plain.contains(|c: char| c != '\n' && acts_on_a_terminal(c)),
            "{plain:?}"
        );
        assert!(plain.contains("2.0.0a[2Jb"), "{plain}");
        // With colour, the only escape sequences are the summary's own colours.
        let colored = summary(&report, true);
        for seq in colored.split('\x1b').skip(1) {
            let code = seq.split_once('m').map(|(c, _)| c).unwrap_or(seq);
            assert!(
                matches!(code, "[32" | "[1;31" | "[33" | "[2" | "[1" | "[0"),
                "{seq:?} in {colored:?}"
            );
        }
    }

    #[test]
    fn progress_shows_event_text_without_what_acts_on_a_terminal() {
        let captured = Captured::default();
        let mut progress = Progress::with_writer(ProgressMode::Plain, Box::new(captured.clone()));
        for ev in [
            Event::RunStarted {
                run_id: "r".into(),
                blueprint: "b".into(),
                provider: "local".into(),
                release: HOSTILE.into(),
            },
            Event::StepFinished {
                address: "service.app".into(),
                step: Step::Install,
                status: Status::Failed,
                duration_ms: 5,
                message: Some(format!("install step `{HOSTILE}` failed\n{HOSTILE}")),
            },
            Event::CheckRetrying {
                name: "c".into(),
                attempt: 1,
                message: HOSTILE.into(),
            },
            Event::Warning {
                message: HOSTILE.into(),
            },
        ] {
            progress.handle(&ev);
        }
        progress.finish();
        let text = captured.text();
        assert!(
            !text.contains(|c: char| c != '\n' && acts_on_a_terminal(c)),
            "{text:?}"
        );
        assert!(text.contains("release a[2Jb"), "{text}");
    }

    #[test]
    fn summary_wraps_the_stage_line_within_eighty_columns() {
        let mut report = sample_report(Status::Passed);
        for stage in &mut report.stages {
            stage.duration_ms = 3_723_000;
        }
        let text = summary(&report, false);
        for line in text
            .lines()
            .filter(|l| l.contains("compile") || l.contains("teardown"))
        {
            assert!(line.chars().count() <= WRAP_AT, "{line:?}");
        }
        assert!(text.contains("stages: ✓ compile 1 h 02 min"), "{text}");
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn run_events() -> Vec<Event> {
        vec![
            Event::RunStarted {
                run_id: "dr-1".to_owned(),
                blueprint: "shop".to_owned(),
                provider: "local".to_owned(),
                release: "2.0.0".to_owned(),
            },
            Event::StageStarted {
                stage: Stage::Provision,
            },
            Event::StepStarted {
                address: "database.db".to_owned(),
                step: Step::Create,
                detail: None,
            },
            Event::StepFinished {
                address: "database.db".to_owned(),
                step: Step::Create,
                status: Status::Passed,
                duration_ms: 120,
                message: None,
            },
            Event::StageFinished {
                stage: Stage::Provision,
                status: Status::Passed,
                duration_ms: 130,
            },
            Event::StageStarted {
                stage: Stage::Restore,
            },
            Event::StepStarted {
                address: "database.db".to_owned(),
                step: Step::Restore,
                detail: Some("shop-db-2026-11-21T0300Z".to_owned()),
            },
            Event::Warning {
                message: "backup shop-db-2026-11-21T0300Z is 26 h old".to_owned(),
            },
            Event::StepFinished {
                address: "database.db".to_owned(),
                step: Step::Restore,
                status: Status::Passed,
                duration_ms: 4_200,
                message: None,
            },
            Event::StageFinished {
                stage: Stage::Restore,
                status: Status::Passed,
                duration_ms: 4_210,
            },
            Event::StageStarted {
                stage: Stage::Check,
            },
            Event::CheckStarted {
                name: "orders-count".to_owned(),
            },
            Event::CheckRetrying {
                name: "orders-count".to_owned(),
                attempt: 1,
                message: "expected 3 rows, got 2".to_owned(),
            },
            Event::CheckFinished {
                name: "orders-count".to_owned(),
                status: Status::Failed,
                duration_ms: 3_040,
                message: Some(CHECK_FAILURE.to_owned()),
            },
            Event::StageFinished {
                stage: Stage::Check,
                status: Status::Failed,
                duration_ms: 3_100,
            },
            Event::Interrupted {
                signal: "SIGINT",
                second: false,
            },
        ]
    }

    fn render(mode: ProgressMode) -> String {
        let captured = Captured::default();
        let mut progress = Progress::with_writer(mode, Box::new(captured.clone()));
        for ev in run_events() {
            progress.handle(&ev);
        }
        progress.finish();
        captured.text()
    }

    #[test]
    fn plain_progress_prints_one_deterministic_line_per_start_and_finish() {
        let expected = "\
dry run started: shop with release 2.0.0 on local (run dr-1)
[provision] started
[provision] database.db create ...
[provision] database.db create ... ok (120 ms)
[provision] ok (130 ms)
[restore] started
[restore] database.db restore ← shop-db-2026-11-21T0300Z ...
warning: backup shop-db-2026-11-21T0300Z is 26 h old
[restore] database.db restore ← shop-db-2026-11-21T0300Z ... ok (4.2 s)
[restore] ok (4.2 s)
[check] started
[check] orders-count ...
[check] orders-count attempt 1 failed, retrying
    expected 3 rows, got 2
[check] orders-count ... FAILED (3.0 s)
    expected 3 rows, got 2
    | id | sku |
    |  7 | NULL |
[check] FAILED (3.1 s)
interrupted by SIGINT: tearing down (send it again to stop once the journal is flushed)
";
        assert_eq!(render(ProgressMode::Plain), expected);
        assert_eq!(render(ProgressMode::Plain), render(ProgressMode::Plain));
    }

    #[test]
    fn plain_progress_prefixes_steps_outside_a_stage_with_their_loop_stage() {
        let captured = Captured::default();
        let mut progress = Progress::with_writer(ProgressMode::Plain, Box::new(captured.clone()));
        progress.handle(&Event::StepFinished {
            address: "service.web".to_owned(),
            step: Step::Delete,
            status: Status::Error,
            duration_ms: 5,
            message: Some("kill: no such process".to_owned()),
        });
        assert_eq!(
            captured.text(),
            "[teardown] service.web delete ... ERROR (5 ms)\n    kill: no such process\n"
        );
    }

    #[test]
    fn quiet_progress_prints_only_warnings_and_interruptions() {
        assert_eq!(
            render(ProgressMode::Quiet),
            "warning: backup shop-db-2026-11-21T0300Z is 26 h old\n\
             interrupted by SIGINT: tearing down (send it again to stop once the journal is flushed)\n"
        );
    }

    #[test]
    fn fancy_progress_writes_nothing_to_the_plain_writer_and_clears_its_spinners() {
        let captured = Captured::default();
        let mut progress = Progress::with_writer(ProgressMode::Fancy, Box::new(captured.clone()));
        for ev in run_events().into_iter().take(7) {
            progress.handle(&ev);
        }
        assert_eq!(
            progress.bars.len(),
            2,
            "restore stage and its step are running"
        );
        progress.finish();
        assert!(progress.bars.is_empty());
        progress.finish();
        assert_eq!(captured.text(), "");
    }
}
