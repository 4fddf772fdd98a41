//! report.md: the run for people, as GitHub-flavoured Markdown (a PR comment, a CI summary).
//!
//! A headline table (status, blueprint, release, provider, trigger, run id, backup identity and
//! age, restore time), tables of stages, checks and resources, what was left behind, and every
//! failure message quoted verbatim in a fenced code block. Table cells are escaped (`|` and
//! inline markup) and show only a message's first line; the fenced blocks below hold the rest.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::json::{ReportError, write_atomic};
use super::{RunReport, Status, human_ms, human_secs};

/// File name of the Markdown report inside the report directory.
pub const FILE_NAME: &str = "report.md";

/// The report as Markdown.
#[must_use]
pub fn to_markdown(report: &RunReport) -> String {
    let mut md = String::new();
    headline(&mut md, report);
    stages(&mut md, report);
    checks(&mut md, report);
    migrations(&mut md, report);
    resources(&mut md, report);
    data_safety(&mut md, report);
    if let Some(c) = &report.cost {
        let _ = writeln!(md, "{}\n", c.line());
    }
    left_behind(&mut md, report);
    failures(&mut md, report);
    let end = md.trim_end_matches('\n').len();
    md.truncate(end);
    md.push('\n');
    // Release output is quoted verbatim; a job summary renders it, but a terminal that shows
    // the file (`cat report.md` in a CI log) must not act on it.
    super::terminal::printable(&md).into_owned()
}

/// Writes `report.md` into `dir` (created if missing) and returns its path.
///
/// # Guarantees
/// The file is replaced atomically, like report.json.
///
/// # Errors
/// [`ReportError`] when the directory cannot be created or the file cannot be written or
/// renamed into place.
pub fn write(report: &RunReport, dir: &Path) -> Result<PathBuf, ReportError> {
    write_atomic(dir, FILE_NAME, to_markdown(report).as_bytes())
}

fn headline(md: &mut String, report: &RunReport) {
    let word = report.status.as_str().to_uppercase();
    let _ = writeln!(md, "# Dry run {word}: {}\n", cell(&report.blueprint));

    let mut rows: Vec<(&str, String)> = vec![
        (
            "Status",
            format!("**{word}** (exit code {})", report.exit_code),
        ),
        (
            "Blueprint",
            format!(
                "{} ({})",
                cell(&report.blueprint),
                cell(&report.blueprint_path)
            ),
        ),
    ];
    let release = &report.release;
    let mut release_cell = cell(release.version.as_deref().unwrap_or(&release.reference));
    if let Some(sha) = &release.git_sha {
        let _ = write!(release_cell, ", git {}", cell(sha));
    }
    if release.version.is_some() {
        let _ = write!(release_cell, " from {}", cell(&release.reference));
    }
    rows.push(("Release", release_cell));
    rows.push(("Provider", cell(&report.provider)));
    rows.push(("Trigger", trigger_name(report).to_owned()));
    rows.push(("Run id", cell(&report.run_id)));
    rows.push((
        "Started",
        report
            .started_at
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string(),
    ));
    rows.push(("Duration", human_ms(report.duration_ms)));

    let backups: Vec<_> = if report.backups.is_empty() {
        report.backup.iter().collect()
    } else {
        report.backups.iter().collect()
    };
    for backup in &backups {
        rows.push((
            "Backup",
            format!(
                "{} of {} into {}, taken {}, age {}",
                cell(&backup.id),
                cell(&backup.source),
                cell(&backup.resource),
                backup.taken_at.format("%Y-%m-%d %H:%M UTC"),
                human_secs(backup.age_seconds),
            ),
        ));
        if let Some(c) = &backup.clone {
            rows.push(("Copy", cell(&super::describe_clone(c))));
        }
    }
    if backups.is_empty() {
        rows.push(("Backup", "none restored".to_owned()));
    }
    if let Some(ms) = report.restore_ms {
        rows.push(("Restore time", human_ms(ms)));
    }
    if let Some(until) = report.kept_until {
        rows.push((
            "Kept until",
            format!(
                "{} (then `dryrun cleanup --expired` removes it)",
                until.format("%Y-%m-%d %H:%M UTC")
            ),
        ));
    }
    if let Some(failure) = &report.failure {
        rows.push(("Failure", cell(failure)));
    }

    md.push_str("| | |\n|---|---|\n");
    for (key, value) in rows {
        let _ = writeln!(md, "| {key} | {value} |");
    }
    md.push('\n');
}

fn trigger_name(report: &RunReport) -> &'static str {
    match report.trigger {
        super::Trigger::Cli => "cli",
        super::Trigger::Webhook => "webhook",
        super::Trigger::Schedule => "schedule",
    }
}

fn stages(md: &mut String, report: &RunReport) {
    md.push_str("## Stages\n\n");
    if report.stages.is_empty() {
        md.push_str("None: the run stopped before its first stage.\n\n");
        return;
    }
    md.push_str("| Stage | Status | Duration | Message |\n|---|---|---|---|\n");
    for stage in &report.stages {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            cell(stage.name.as_str()),
            status_cell(stage.status),
            duration_cell(stage.status, stage.duration_ms),
            message_cell(stage.message.as_deref()),
        );
    }
    md.push('\n');
}

fn checks(md: &mut String, report: &RunReport) {
    md.push_str("## Checks\n\n");
    if report.checks.is_empty() {
        md.push_str("None.\n\n");
        return;
    }
    md.push_str(
        "| Check | Kind | Status | Duration | Attempts | Message |\n|---|---|---|---|---|---|\n",
    );
    for check in &report.checks {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            cell(&check.name),
            cell(check.kind.as_str()),
            status_cell(check.status),
            duration_cell(check.status, check.duration_ms),
            check.attempts,
            message_cell(check.message.as_deref()),
        );
    }
    md.push('\n');
}

/// Guards, the worst statements, hints and the baseline: the same lines as the terminal's, as a
/// fenced block (statements keep their spacing and no cell escaping is needed).
fn migrations(md: &mut String, report: &RunReport) {
    let lines = crate::migrations::summary_lines(report, 10);
    if lines.is_empty() {
        return;
    }
    md.push_str("## Migrations\n\n");
    fenced(md, &lines.join("\n"));
    md.push('\n');
}

fn resources(md: &mut String, report: &RunReport) {
    md.push_str("## Resources\n\n");
    if report.resources.is_empty() {
        md.push_str("None created.\n\n");
        return;
    }
    md.push_str("| Resource | Kind | Id | Status | Destroyed |\n|---|---|---|---|---|\n");
    for resource in &report.resources {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            cell(&resource.address),
            cell(resource.kind.as_str()),
            cell(&resource.id),
            status_cell(resource.status),
            if resource.destroyed { "yes" } else { "**no**" },
        );
    }
    md.push('\n');
}

/// What was masked, what the release sent to the sinks, what the firewall refused.
fn data_safety(md: &mut String, report: &RunReport) {
    let se = &report.side_effects;
    let masking = report.masking.as_ref();
    if masking.is_none_or(|m| m.databases.is_empty()) && se.is_empty() && report.firewall.is_none()
    {
        return;
    }
    md.push_str(
        "## Data safety

",
    );
    if let Some(m) = masking {
        for d in &m.databases {
            let cols: Vec<String> = d
                .columns
                .iter()
                .map(|c| format!("{}.{} ({})", c.table, c.column, c.strategy.as_str()))
                .collect();
            let _ = writeln!(
                md,
                "- masking, {}: {} row(s); {}",
                cell(&d.resource),
                d.rows,
                cell(&cols.join(", "))
            );
        }
    }
    if let Some(f) = &report.firewall {
        let state = if f.enforced {
            "enforced"
        } else {
            "**not enforced**"
        };
        let _ = writeln!(md, "- firewall: {state}: {}", cell(&f.how));
    }
    for m in &se.mail {
        let _ = writeln!(
            md,
            "- mail (sink): {} → {}: {}",
            cell(&m.from),
            cell(&m.to.join(", ")),
            cell(&m.subject)
        );
    }
    for r in &se.http {
        let _ = writeln!(
            md,
            "- http (sink): {} {}{}",
            cell(&r.method),
            cell(&r.host),
            cell(&r.path)
        );
    }
    if !se.blocked.is_empty() {
        let _ = writeln!(md, "- blocked: {}", cell(&se.blocked.join(", ")));
    }
    md.push('\n');
}

fn left_behind(md: &mut String, report: &RunReport) {
    if report.left_behind.is_empty() {
        md.push_str("Left behind: none\n\n");
        return;
    }
    md.push_str("## Left behind\n\n");
    for item in &report.left_behind {
        let _ = writeln!(
            md,
            "- {} ({}): {}",
            cell(&item.address),
            cell(&item.id),
            message_cell(Some(&item.reason)),
        );
    }
    let _ = writeln!(
        md,
        "\nRemove with `dryrun cleanup {}`.\n",
        report.run_id.replace('`', "")
    );
    for item in report
        .left_behind
        .iter()
        .filter(|i| i.reason.contains('\n'))
    {
        let _ = writeln!(md, "{} ({}):\n", cell(&item.address), cell(&item.id));
        fenced(md, &item.reason);
    }
}

/// Every failure message in full, verbatim: stages, checks (with their output) and resources.
fn failures(md: &mut String, report: &RunReport) {
    let failed = |s: Status| matches!(s, Status::Failed | Status::Error);
    let mut blocks: Vec<(String, Option<&str>, Option<&str>)> = Vec::new();
    for stage in report.stages.iter().filter(|s| failed(s.status)) {
        blocks.push((
            format!("Stage {} ({})", cell(stage.name.as_str()), stage.status),
            stage.message.as_deref(),
            None,
        ));
    }
    for check in report.checks.iter().filter(|c| failed(c.status)) {
        blocks.push((
            format!("Check {} ({})", cell(&check.name), check.status),
            check.message.as_deref(),
            check.output.as_deref(),
        ));
    }
    for resource in report.resources.iter().filter(|r| failed(r.status)) {
        blocks.push((
            format!("Resource {} ({})", cell(&resource.address), resource.status),
            resource.message.as_deref(),
            None,
        ));
    }
    let blocks: Vec<_> = blocks
        .into_iter()
        .filter(|(_, message, output)| message.is_some() || output.is_some())
        .collect();
    if blocks.is_empty() {
        return;
    }
    md.push_str("## Failures\n\n");
    for (title, message, output) in blocks {
        let _ = writeln!(md, "### {title}\n");
        if let Some(message) = message {
            fenced(md, message);
        }
        if let Some(output) = output {
            md.push_str("Output:\n\n");
            fenced(md, output);
        }
    }
}

/// Appends `text` verbatim in a fenced code block whose fence no line of `text` can close.
fn fenced(md: &mut String, text: &str) {
    let longest_run = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest_run.max(2) + 1);
    let _ = writeln!(md, "{fence}text");
    md.push_str(text);
    if !text.ends_with('\n') {
        md.push('\n');
    }
    let _ = writeln!(md, "{fence}\n");
}

/// Text safe inside a table cell (and inline elsewhere): one line, pipes and inline markup
/// escaped.
fn cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' | '|' | '`' | '*' | '[' | ']' => {
                out.push('\\');
                out.push(c);
            }
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The first line of a message, escaped, with ` …` when there is more (quoted in Failures).
fn message_cell(message: Option<&str>) -> String {
    let Some(message) = message else {
        return String::new();
    };
    let mut lines = message.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or_default();
    if lines.next().is_some() {
        format!("{} …", cell(first))
    } else {
        cell(first)
    }
}

fn status_cell(status: Status) -> String {
    match status {
        Status::Failed | Status::Error => format!("**{status}**"),
        _ => status.to_string(),
    }
}

fn duration_cell(status: Status, duration_ms: u64) -> String {
    match status {
        Status::Pending | Status::Skipped => String::new(),
        _ => human_ms(duration_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::LeftBehind;
    use crate::report::terminal::testutil::{
        CHECK_FAILURE, MIGRATION_FAILURE, failing_migration_report, sample_report, scratch_dir,
    };

    #[test]
    fn markdown_headline_names_status_release_backup_and_restore_time() {
        let md = to_markdown(&sample_report(Status::Passed));
        assert!(md.starts_with("# Dry run PASSED: shop\n"), "{md}");
        assert!(md.contains("| Status | **PASSED** (exit code 0) |"), "{md}");
        assert!(
            md.contains(
                "| Release | 2.0.0, git 9f8e7d6c5b4a39281706f5e4d3c2b1a098765432 from ./dist/shop-2.0.0.tar.gz |"
            ),
            "{md}"
        );
        assert!(md.contains("| Provider | local |"), "{md}");
        assert!(md.contains("| Trigger | cli |"), "{md}");
        assert!(md.contains("| Run id | dr-20261122-0300-a1b2 |"), "{md}");
        assert!(
            md.contains(
                "| Backup | shop-db-2026-11-21T0300Z of shop-db into database.db, taken 2026-11-21 03:00 UTC, age 1 d 2 h |"
            ),
            "{md}"
        );
        assert!(md.contains("| Restore time | 4.2 s |"), "{md}");
        assert!(md.contains("| restore | passed | 4.2 s |  |"), "{md}");
        assert!(
            md.contains(
                "| database.db | database | /tmp/dryrun/dr-20261122-0300-a1b2/db | passed | yes |"
            ),
            "{md}"
        );
        assert!(md.contains("\nLeft behind: none\n"), "{md}");
        assert!(!md.contains("## Failures"), "{md}");
        assert!(!md.contains("ERROR") && !md.contains("FAILED"), "{md}");
    }

    #[test]
    fn markdown_escapes_pipes_in_table_cells() {
        let mut report = sample_report(Status::Failed);
        report.checks[0].name = "a|b".to_owned();
        let md = to_markdown(&report);

        assert!(md.contains("| a\\|b | http | passed |"), "{md}");
        assert!(
            md.contains(
                "| orders-count | sql | **failed** | 3.0 s | 3 | expected 3 rows, got 2 … |"
            ),
            "{md}"
        );
        let checks_section = md
            .split("## Checks")
            .nth(1)
            .unwrap()
            .split("## ")
            .next()
            .unwrap();
        let rows: Vec<&str> = checks_section
            .lines()
            .filter(|l| l.starts_with('|'))
            .collect();
        assert_eq!(rows.len(), 5, "{checks_section}");
        for row in rows {
            assert_eq!(row.replace("\\|", "").matches('|').count(), 7, "{row}");
        }
    }

    #[test]
    fn markdown_quotes_a_failing_migration_verbatim_in_a_fence() {
        let md = to_markdown(&failing_migration_report());
        assert!(md.starts_with("# Dry run FAILED: shop\n"), "{md}");
        assert!(
            md.contains(&format!(
                "### Stage install (failed)\n\n```text\n{MIGRATION_FAILURE}\n```\n"
            )),
            "{md}"
        );
        assert!(
            md.contains("| install | **failed** | 2.1 s | migration 0042_add_sku.sql failed at statement 2: … |"),
            "{md}"
        );
    }

    #[test]
    fn markdown_quotes_a_failing_check_and_its_output() {
        let md = to_markdown(&sample_report(Status::Failed));
        assert!(
            md.contains(&format!(
                "### Check orders-count (failed)\n\n```text\n{CHECK_FAILURE}\n```\n\nOutput:\n\n```text\nid | sku\n7 | NULL\n```\n"
            )),
            "{md}"
        );
    }

    #[test]
    fn markdown_fence_outlasts_backticks_in_the_message() {
        let mut report = failing_migration_report();
        report.stages[3].message = Some("before\n```\nstill quoted\n````".to_owned());
        let md = to_markdown(&report);
        assert!(
            md.contains("`````text\nbefore\n```\nstill quoted\n````\n`````\n"),
            "{md}"
        );
    }

    #[test]
    fn markdown_lists_what_was_left_behind() {
        let mut report = sample_report(Status::Passed);
        report.resources[2].destroyed = false;
        report.left_behind.push(LeftBehind {
            address: "service.web".to_owned(),
            id: "pid 4242".to_owned(),
            reason: "kill: operation not permitted".to_owned(),
        });
        let md = to_markdown(&report);
        assert!(
            md.contains("| service.web | service | pid 4242 | passed | **no** |"),
            "{md}"
        );
        assert!(
            md.contains(
                "## Left behind\n\n- service.web (pid 4242): kill: operation not permitted\n"
            ),
            "{md}"
        );
        assert!(
            md.contains("`dryrun cleanup dr-20261122-0300-a1b2`"),
            "{md}"
        );
        assert!(!md.contains("Left behind: none"), "{md}");
    }

    #[test]
    fn markdown_shows_masking_side_effects_and_the_firewall() {
        let mut report = sample_report(Status::Passed);
        assert!(
            !to_markdown(&report).contains("## Data safety"),
            "nothing to say"
        );
        report.side_effects.mail.push(crate::sinks::Mail {
            from: "shop@example.com".into(),
            to: vec!["ada.x@example.com".into()],
            subject: "Order | #1".into(),
        });
        report.side_effects.blocked.push("192.0.2.10:80".into());
        report.firewall = Some(crate::firewall::FirewallReport {
            mode: crate::firewall::Mode::Auto,
            enforced: false,
            how: "cannot create a network namespace".into(),
            allowed: Vec::new(),
        });
        let md = to_markdown(&report);
        assert!(md.contains("## Data safety\n\n- firewall: **not enforced**: cannot create a network namespace\n"), "{md}");
        assert!(
            md.contains("- mail (sink): shop@example.com → ada.x@example.com: Order \\| #1\n"),
            "{md}"
        );
        assert!(md.contains("- blocked: 192.0.2.10:80\n"), "{md}");
    }

    #[test]
    fn write_puts_report_md_in_the_report_dir() {
        let dir = scratch_dir("markdown-write");
        let path = write(&sample_report(Status::Error), &dir).unwrap();
        assert_eq!(path, dir.join("report.md"));
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .starts_with("# Dry run ERROR: shop")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
