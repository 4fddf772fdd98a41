//! `junit.xml`: the run as a `JUnit` test suite, so CI systems show a failed dry run like a failed
//! test.
//!
//! One `<testsuite>` named after the blueprint holds a test case per stage (classname `stages`,
//! so a failed migration in `install` shows up even when no check ran), a test case per check
//! (classname `checks`) and one `teardown` case, `nothing left behind`, that fails when teardown
//! left something behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use quick_junit::{NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestSuite};

use super::json::{ReportError, write_atomic};
use super::{RunReport, Status};

/// File name of the `JUnit` report inside the report directory.
pub const FILE_NAME: &str = "junit.xml";

/// The report as `JUnit` XML.
///
/// Failed stages and checks become `<failure>`, errors `<error>`, skipped and not reached ones
/// `<skipped>`; the first line of the message is the `message` attribute and the whole message
/// is the element's text. A check's captured output goes to its `<system-out>`.
///
/// # Panics
/// Never in practice: serializing into memory has no I/O that could fail.
#[must_use]
pub fn to_junit(report: &RunReport) -> String {
    let mut suite = TestSuite::new(report.blueprint.as_str());
    suite
        .set_timestamp(report.started_at)
        .set_time(Duration::from_millis(report.duration_ms))
        .add_properties(properties(report));

    for stage in &report.stages {
        let mut case = TestCase::new(
            stage.name.as_str(),
            case_status(stage.status, stage.message.as_deref(), "stage"),
        );
        case.set_classname("stages")
            .set_time(Duration::from_millis(stage.duration_ms));
        suite.add_test_case(case);
    }
    for check in &report.checks {
        let mut case = TestCase::new(
            check.name.as_str(),
            case_status(check.status, check.message.as_deref(), check.kind.as_str()),
        );
        case.set_classname("checks")
            .set_time(Duration::from_millis(check.duration_ms));
        if let Some(output) = &check.output {
            case.set_system_out(output.as_str());
        }
        suite.add_test_case(case);
    }
    suite.add_test_case(left_behind_case(report));

    let mut junit = Report::new("dryrun");
    junit
        .set_timestamp(report.started_at)
        .set_time(Duration::from_millis(report.duration_ms))
        .add_test_suite(suite);
    // Serializing into memory has no I/O to fail, and XmlString has already dropped characters
    // XML cannot carry.
    let mut xml = junit
        .to_string()
        .expect("a JUnit report serializes into memory");
    if !xml.ends_with('\n') {
        xml.push('\n');
    }
    xml
}

/// Writes `junit.xml` into `dir` (created if missing) and returns its path.
///
/// # Guarantees
/// The file is replaced atomically, like report.json.
///
/// # Errors
/// [`ReportError`] when the directory cannot be created or the file cannot be written or
/// renamed into place.
pub fn write(report: &RunReport, dir: &Path) -> Result<PathBuf, ReportError> {
    write_atomic(dir, FILE_NAME, to_junit(report).as_bytes())
}

fn properties(report: &RunReport) -> Vec<Property> {
    let mut props = vec![
        Property::new("run_id", report.run_id.as_str()),
        Property::new("status", report.status.as_str()),
        Property::new("release", report.release.reference.as_str()),
    ];
    if let Some(version) = &report.release.version {
        props.push(Property::new("release.version", version.as_str()));
    }
    if let Some(sha) = &report.release.git_sha {
        props.push(Property::new("release.git_sha", sha.as_str()));
    }
    props.push(Property::new("provider", report.provider.as_str()));
    if let Some(backup) = &report.backup {
        props.push(Property::new("backup.id", backup.id.as_str()));
        props.push(Property::new(
            "backup.taken_at",
            backup.taken_at.to_rfc3339(),
        ));
        props.push(Property::new(
            "backup.age_seconds",
            backup.age_seconds.to_string(),
        ));
    }
    if let Some(ms) = report.restore_ms {
        props.push(Property::new("restore_ms", ms.to_string()));
    }
    props
}

fn case_status(status: Status, message: Option<&str>, ty: &str) -> TestCaseStatus {
    let mut case = match status {
        Status::Passed => return TestCaseStatus::success(),
        Status::Failed => TestCaseStatus::non_success(NonSuccessKind::Failure),
        Status::Error => TestCaseStatus::non_success(NonSuccessKind::Error),
        Status::Skipped | Status::Pending => TestCaseStatus::skipped(),
    };
    case.set_type(ty);
    match message {
        Some(message) => {
            case.set_message(message.lines().next().unwrap_or_default())
                .set_description(message);
        }
        None if status == Status::Pending => {
            case.set_message("not reached");
        }
        None => {}
    }
    case
}

fn left_behind_case(report: &RunReport) -> TestCase {
    let status = if report.left_behind.is_empty() {
        TestCaseStatus::success()
    } else {
        let listing: Vec<String> = report
            .left_behind
            .iter()
            .map(|l| format!("{} {}: {}", l.address, l.id, l.reason))
            .collect();
        let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
        status
            .set_type("left_behind")
            .set_message(format!(
                "{} item(s) left behind; run `dryrun cleanup {}`",
                listing.len(),
                report.run_id
            ))
            .set_description(listing.join("\n"));
        status
    };
    let mut case = TestCase::new("nothing left behind", status);
    case.set_classname("teardown");
    case
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::LeftBehind;
    use crate::report::terminal::testutil::{
        CHECK_FAILURE, MIGRATION_FAILURE, failing_migration_report, sample_report, scratch_dir,
    };

    fn element_count(xml: &str, tag: &str) -> usize {
        [" ", ">", "/>"]
            .iter()
            .map(|end| xml.matches(&format!("<{tag}{end}")).count())
            .sum()
    }

    #[test]
    fn junit_is_one_suite_named_after_the_blueprint() {
        let xml = to_junit(&sample_report(Status::Passed));
        assert!(xml.starts_with("<?xml"), "{xml}");
        assert!(xml.contains("<testsuites name=\"dryrun\""), "{xml}");
        assert_eq!(xml.matches("<testsuite ").count(), 1, "{xml}");
        assert!(
            xml.contains("<testsuite name=\"shop\" tests=\"10\""),
            "{xml}"
        );
        assert!(xml.contains("classname=\"stages\""), "{xml}");
        assert!(xml.contains("classname=\"checks\""), "{xml}");
        assert!(!xml.contains("<failure"), "{xml}");
        assert!(
            xml.contains("name=\"backup.age_seconds\" value=\"93600\""),
            "{xml}"
        );
    }

    #[test]
    fn junit_has_one_failure_element_for_a_failed_check() {
        let xml = to_junit(&sample_report(Status::Failed));
        let checks_failed = xml
            .split("<testcase ")
            .filter(|case| case.contains("classname=\"checks\"") && case.contains("<failure"))
            .count();
        assert_eq!(checks_failed, 1, "{xml}");
        assert!(
            xml.contains("<testcase name=\"orders-count\" classname=\"checks\" time=\"3.040\">"),
            "{xml}"
        );
        assert!(
            xml.contains("<failure message=\"expected 3 rows, got 2\" type=\"sql\">"),
            "{xml}"
        );
        assert!(xml.contains("| id | sku |"), "{xml}");
        assert!(xml.contains("<system-out>id | sku"), "{xml}");
        // The check stage failed too, so CI counts it once more among the stages.
        assert_eq!(element_count(&xml, "failure"), 2, "{xml}");
    }

    #[test]
    fn junit_shows_a_failed_migration_as_a_failed_install_stage() {
        let xml = to_junit(&failing_migration_report());
        let install = xml
            .split("<testcase ")
            .find(|case| case.starts_with("name=\"install\""))
            .unwrap();
        assert!(install.contains("classname=\"stages\""), "{install}");
        assert!(install.contains("<failure"), "{install}");
        assert!(
            install.contains("ALTER TABLE orders ALTER COLUMN sku SET NOT NULL;"),
            "{install}"
        );
        assert!(
            install.contains("column &quot;sku&quot; of relation")
                || install.contains("column \"sku\" of relation"),
            "{install}"
        );
        assert!(MIGRATION_FAILURE.contains('|'));
        assert_eq!(
            xml.matches("<skipped").count(),
            4,
            "check stage and 3 checks: {xml}"
        );
    }

    #[test]
    fn junit_marks_infrastructure_failures_as_errors() {
        let xml = to_junit(&sample_report(Status::Error));
        assert_eq!(element_count(&xml, "error"), 1, "{xml}");
        assert!(
            xml.contains("<error message=\"restore of shop-db-2026-11-21T0300Z"),
            "{xml}"
        );
        assert!(!xml.contains("<failure"), "{xml}");
    }

    #[test]
    fn junit_fails_the_teardown_case_when_something_is_left_behind() {
        let mut report = sample_report(Status::Passed);
        report.left_behind.push(LeftBehind {
            address: "database.db".to_owned(),
            id: "/tmp/db".to_owned(),
            reason: "permission denied".to_owned(),
        });
        let xml = to_junit(&report);
        let teardown = xml
            .split("<testcase ")
            .find(|case| case.contains("classname=\"teardown\""))
            .unwrap();
        assert!(teardown.contains("<failure"), "{teardown}");
        assert!(
            teardown.contains("database.db /tmp/db: permission denied"),
            "{teardown}"
        );
    }

    #[test]
    fn junit_parses_back_with_the_same_cases() {
        let xml = to_junit(&sample_report(Status::Failed));
        let parsed = Report::deserialize_from_str(&xml).unwrap();
        assert_eq!(parsed.test_suites.len(), 1);
        let suite = &parsed.test_suites[0];
        assert_eq!(suite.tests, 10);
        assert_eq!(suite.failures, 2);
        let check = suite
            .test_cases
            .iter()
            .find(|c| c.name.as_str() == "orders-count")
            .unwrap();
        match &check.status {
            TestCaseStatus::NonSuccess { description, .. } => {
                assert_eq!(description.as_ref().unwrap().as_str(), CHECK_FAILURE);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn write_puts_junit_xml_in_the_report_dir() {
        let dir = scratch_dir("junit-write");
        let path = write(&sample_report(Status::Failed), &dir).unwrap();
        assert_eq!(path, dir.join("junit.xml"));
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("<testsuite ")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
