//! What a rehearsal costs on a billed provider, before it starts and after it ended.
//!
//! A provider that bills ([`crate::provider::Provider::billed`]) says what a run would create
//! in billing units ([`Unit`]: an EC2 instance type, an RDS class and its storage, an S3 copy
//! of N objects); this module prices them from a bundled, dated table (`prices.toml`,
//! us-east-1 on-demand list prices) and multiplies by two durations: the expected one (the
//! median of the blueprint's recent runs, or an hour when there is no history) and the worst
//! case (the resources' TTL plus the teardown deadline: the longest anything can stay before
//! `dryrun cleanup` or the next run's sweep reaps it). `budget.max_usd` is judged against the
//! worst case, before anything is created.
//!
//! The table is embedded rather than fetched: plan and run must work without the Price List
//! API's permissions, and the same blueprint must give the same estimate on every machine.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Hours in a billing month (AWS's storage prices are per GB-month of 730 hours).
const MONTH_HOURS: f64 = 730.0;

/// Assumed when the blueprint has no run history.
pub const DEFAULT_EXPECTED: Duration = Duration::from_secs(3600);

/// The bundled price table.
#[derive(Debug, Deserialize)]
struct Table {
    as_of: String,
    region: String,
    ec2: BTreeMap<String, f64>,
    rds: BTreeMap<String, BTreeMap<String, f64>>,
    aurora: BTreeMap<String, BTreeMap<String, f64>>,
    storage: BTreeMap<String, f64>,
    requests: BTreeMap<String, f64>,
}

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    toml::from_str(include_str!("prices.toml")).expect("src/cost/prices.toml is valid TOML")
});

/// The date the bundled prices were taken.
#[must_use]
pub fn prices_as_of() -> &'static str {
    &TABLE.as_of
}

/// Something a run creates, in the units it is billed by.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Unit {
    /// An EC2 instance and its root volume.
    Ec2 {
        /// Instance type, e.g. `t3.micro`.
        instance_type: String,
        /// Root volume size (gp3).
        volume_gb: u64,
    },
    /// An RDS instance restored from a snapshot.
    Rds {
        /// `postgres`, `mysql` or `mariadb`.
        engine: String,
        /// Instance class, e.g. `db.t3.medium`.
        class: String,
        /// Allocated storage.
        storage_gb: u64,
    },
    /// An Aurora clone: one instance; the clone's storage is shared with production until
    /// pages change (only changed pages are billed, which a rehearsal rarely makes many of).
    Aurora {
        /// `aurora-postgresql` or `aurora-mysql`.
        engine: String,
        /// Instance class.
        class: String,
    },
    /// A bucket copy: one LIST per 1 000 objects, one COPY per object, the copy's storage.
    S3Copy {
        /// Objects copied.
        objects: u64,
        /// Their size.
        bytes: u64,
    },
}

/// One priced resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Resource address (`database.db`).
    pub address: String,
    /// What is billed, in words (`db.t3.medium RDS postgres, 20 GB gp2`).
    pub what: String,
    /// Per hour while it exists.
    pub hourly_usd: f64,
    /// Once per run (requests).
    pub once_usd: f64,
    /// The billing minimum (RDS: 10 minutes; EC2: 1 minute), in hours.
    pub min_hours: f64,
    /// Why it has no price (a class the table does not list).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unpriced: Option<String>,
}

impl Item {
    /// Its cost if it exists `hours`.
    #[must_use]
    pub fn over(&self, hours: f64) -> f64 {
        self.once_usd + self.hourly_usd * hours.max(self.min_hours)
    }
}

/// A run's estimate (`dryrun plan` `cost`, report.json `cost.estimate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The run's region.
    pub region: String,
    /// Whose prices: the table's region (other regions differ, usually by 0–30 %).
    pub prices_region: String,
    /// When the table's prices were taken.
    pub prices_as_of: String,
    /// Per resource.
    pub items: Vec<Item>,
    /// Everything together, per hour.
    pub hourly_usd: f64,
    /// The expected duration, in hours.
    pub expected_hours: f64,
    /// Where that comes from (`median of 7 runs`, `no history: assumed 1 h`).
    pub expected_basis: String,
    /// The expected run's cost.
    pub expected_usd: f64,
    /// The worst case's duration, in hours (TTL plus the teardown deadline).
    pub max_hours: f64,
    /// Its cost: what `budget.max_usd` is judged against.
    pub max_usd: f64,
    /// What the estimate leaves out or assumes.
    pub notes: Vec<String>,
}

/// Rounds to a tenth of a cent (for display and JSON; sums are taken before rounding).
fn usd(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn hours(d: Duration) -> f64 {
    d.as_secs_f64() / 3600.0
}

/// Prices `units` for a run in `region` expected to last `expected` (with its basis in words)
/// and at worst `max`.
#[must_use]
pub fn estimate(
    units: &[(String, Unit)],
    region: &str,
    expected: (Duration, String),
    max: Duration,
) -> Estimate {
    let t = &*TABLE;
    let storage = |k: &str| t.storage.get(k).copied().unwrap_or(0.0);
    let request = |k: &str| t.requests.get(k).copied().unwrap_or(0.0);
    let mut notes = Vec::new();
    let items: Vec<Item> = units
        .iter()
        .map(|(address, u)| {
            let item = |what: String, hourly: Option<f64>, once: f64, min_hours: f64, missing: &str| {
                Item {
                    address: address.clone(),
                    what,
                    hourly_usd: hourly.unwrap_or(0.0),
                    once_usd: once,
                    min_hours,
                    unpriced: hourly.is_none().then(|| {
                        format!("{missing} is not in the price table (src/cost/prices.toml, prices of {})", t.as_of)
                    }),
                }
            };
            match u {
                Unit::Ec2 { instance_type, volume_gb } => {
                    #[allow(clippy::cast_precision_loss)]
                    let volume = *volume_gb as f64 * storage("ebs_gp3") / MONTH_HOURS;
                    item(
                        format!("EC2 {instance_type}, {volume_gb} GB gp3 root volume"),
                        t.ec2.get(instance_type).map(|p| p + volume),
                        0.0,
                        1.0 / 60.0,
                        &format!("instance type {instance_type}"),
                    )
                }
                Unit::Rds { engine, class, storage_gb } => {
                    let family = if engine == "postgres" { "postgres" } else { "mysql" };
                    #[allow(clippy::cast_precision_loss)]
                    let disk = *storage_gb as f64 * storage("rds_gp2") / MONTH_HOURS;
                    item(
                        format!("RDS {engine} {class}, {storage_gb} GB storage"),
                        t.rds.get(family).and_then(|m| m.get(class)).map(|p| p + disk),
                        0.0,
                        10.0 / 60.0,
                        &format!("RDS {engine} class {class}"),
                    )
                }
                Unit::Aurora { engine, class } => {
                    let family = engine.strip_prefix("aurora-").unwrap_or(engine);
                    item(
                        format!("Aurora {family} {class} (clone: storage shared with production)"),
                        t.aurora.get(family).and_then(|m| m.get(class)).copied(),
                        0.0,
                        10.0 / 60.0,
                        &format!("Aurora {family} class {class}"),
                    )
                }
                Unit::S3Copy { objects, bytes } => {
                    #[allow(clippy::cast_precision_loss)]
                    let (n, gb) = (*objects as f64, *bytes as f64 / f64::from(1u32 << 30));
                    let once = (n / 1000.0).ceil().max(1.0) * request("s3_list") / 1000.0
                        + n * request("s3_copy") / 1000.0;
                    item(
                        format!("S3 copy of {objects} object(s), {}", human_bytes(*bytes)),
                        Some(gb * storage("s3_standard") / MONTH_HOURS),
                        once,
                        0.0,
                        "",
                    )
                }
            }
        })
        .collect();
    notes.push("not included: RDS and Aurora I/O, data transfer, public IPv4 addresses, and CloudWatch/SSM usage beyond the free tiers".into());
    if region != t.region {
        notes.push(format!(
            "prices are {}'s; {region}'s differ, usually by 0–30 %",
            t.region
        ));
    }
    let hourly: f64 = items.iter().map(|i| i.hourly_usd).sum();
    let (expected_d, basis) = expected;
    let (eh, mh) = (hours(expected_d), hours(max));
    Estimate {
        region: region.to_string(),
        prices_region: t.region.clone(),
        prices_as_of: t.as_of.clone(),
        hourly_usd: usd(hourly),
        expected_hours: (eh * 100.0).round() / 100.0,
        expected_basis: basis,
        expected_usd: usd(items.iter().map(|i| i.over(eh)).sum()),
        max_hours: (mh * 100.0).round() / 100.0,
        max_usd: usd(items.iter().map(|i| i.over(mh)).sum()),
        items,
        notes,
    }
}

impl Estimate {
    /// Resources without a price (their cost is missing from the sums).
    #[must_use]
    pub fn unpriced(&self) -> Vec<&Item> {
        self.items.iter().filter(|i| i.unpriced.is_some()).collect()
    }

    /// Judges `budget.max_usd`: `Err` with the reason to refuse the run.
    ///
    /// # Errors
    /// The worst case exceeds the budget, or a resource has no price (the worst case is then
    /// unknown).
    pub fn within(&self, max_usd: f64) -> Result<(), String> {
        self.within_times(max_usd, 1)
    }

    /// [`Estimate::within`] for `copies` runs of the same blueprint on one budget (a baseline
    /// and its candidate each make their own copy).
    ///
    /// # Errors
    /// As [`Estimate::within`].
    pub fn within_times(&self, max_usd: f64, copies: u32) -> Result<(), String> {
        let copies_f = f64::from(copies.max(1));
        if let Some(i) = self.unpriced().first() {
            return Err(format!(
                "{}: {}; the worst case cannot be known, so budget.max_usd ({max_usd}) cannot be honoured: add the price to src/cost/prices.toml (docs/cost.md) or remove `budget:`",
                i.address,
                i.unpriced.as_deref().unwrap_or_default()
            ));
        }
        if self.max_usd * copies_f > max_usd {
            let worst = self
                .items
                .iter()
                .max_by(|a, b| a.over(self.max_hours).total_cmp(&b.over(self.max_hours)));
            return Err(format!(
                "the worst case costs ${:.2}{} (all resources for {} h: the ttl, any keep time and the teardown deadline), over budget.max_usd ${max_usd:.2}{}; lower `ttl`, choose smaller classes (providers.aws.db_instance_class, services' aws.instance_type) or raise the budget",
                self.max_usd * copies_f,
                if copies > 1 {
                    format!(
                        " ({copies} copies of ${:.2}: the baseline and the candidate)",
                        self.max_usd
                    )
                } else {
                    String::new()
                },
                self.max_hours,
                worst.map_or(String::new(), |w| format!(
                    "; the largest part is {} ({}): ${:.2}",
                    w.address,
                    w.what,
                    w.over(self.max_hours)
                ))
            ));
        }
        Ok(())
    }

    /// What the run cost, from how long each resource existed (`lifetimes`: address → hours;
    /// a resource never created costs nothing).
    #[must_use]
    pub fn actual(&self, lifetimes: &BTreeMap<String, f64>) -> f64 {
        usd(self
            .items
            .iter()
            .filter_map(|i| lifetimes.get(&i.address).map(|h| i.over(*h)))
            .sum())
    }

    /// The estimate as text lines (plan and the terminal summary).
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "cost: ${:.3}/h; expected ${:.2} ({} h, {}); worst case ${:.2} ({} h: ttl + keep time + teardown deadline); {} on-demand prices of {}",
            self.hourly_usd,
            self.expected_usd,
            self.expected_hours,
            self.expected_basis,
            self.max_usd,
            self.max_hours,
            self.prices_region,
            self.prices_as_of
        )];
        for i in &self.items {
            out.push(match &i.unpriced {
                Some(why) => format!("  {}: {} — no price: {why}", i.address, i.what),
                None if i.once_usd > 0.0 => format!(
                    "  {}: {} — ${:.4}/h + ${:.5} once",
                    i.address, i.what, i.hourly_usd, i.once_usd
                ),
                None => format!("  {}: {} — ${:.4}/h", i.address, i.what, i.hourly_usd),
            });
        }
        out.extend(self.notes.iter().map(|n| format!("  note: {n}")));
        out
    }
}

/// The longest a run's resources can exist: the TTL (after which `dryrun cleanup --expired`
/// or the next run's sweep reaps what a crash left), plus a kept copy's keep time (the
/// blueprint's `teardown.keep_for`, `--keep`: it starts when the run ends), plus the teardown
/// deadline.
#[must_use]
pub fn worst_case(
    bp: &crate::blueprint::Blueprint,
    keep: Option<Duration>,
    teardown: Duration,
) -> Duration {
    use crate::blueprint::TeardownPolicy;
    let kept = match &bp.teardown {
        TeardownPolicy::Always => Duration::ZERO,
        TeardownPolicy::OnSuccess { keep_for } | TeardownPolicy::Keep { keep_for } => *keep_for,
    };
    bp.ttl + kept.max(keep.unwrap_or_default()) + teardown
}

/// Estimate vs actual (report.json `cost`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostReport {
    /// The estimate made before the run.
    pub estimate: Estimate,
    /// From how long each resource existed (create to delete), at the estimate's prices.
    pub actual_usd: f64,
}

impl CostReport {
    /// One line: actual against the estimate.
    #[must_use]
    pub fn line(&self) -> String {
        format!(
            "cost: ${:.3} at {} on-demand prices of {} (estimated ${:.2} expected, ${:.2} worst case)",
            self.actual_usd,
            self.estimate.prices_region,
            self.estimate.prices_as_of,
            self.estimate.expected_usd,
            self.estimate.max_usd
        )
    }
}

/// The expected duration from the blueprint's recent run times (ms): their median, or
/// [`DEFAULT_EXPECTED`] without history.
#[must_use]
pub fn expected_from(durations_ms: &[i64]) -> (Duration, String) {
    let mut d: Vec<u64> = durations_ms
        .iter()
        .filter_map(|x| u64::try_from(*x).ok())
        .collect();
    if d.is_empty() {
        return (DEFAULT_EXPECTED, "no history: assumed 1 h".into());
    }
    d.sort_unstable();
    let m = d[d.len() / 2];
    (
        Duration::from_millis(m),
        format!("median of the last {} run(s)", d.len()),
    )
}

fn human_bytes(b: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let f = b as f64;
    if b >= 1 << 30 {
        format!("{:.1} GiB", f / f64::from(1u32 << 30))
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", f / f64::from(1u32 << 20))
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units() -> Vec<(String, Unit)> {
        vec![
            (
                "database.db".into(),
                Unit::Rds {
                    engine: "postgres".into(),
                    class: "db.t3.medium".into(),
                    storage_gb: 20,
                },
            ),
            (
                "service.app".into(),
                Unit::Ec2 {
                    instance_type: "t3.micro".into(),
                    volume_gb: 8,
                },
            ),
            (
                "bucket.files".into(),
                Unit::S3Copy {
                    objects: 2500,
                    bytes: 1 << 30,
                },
            ),
        ]
    }

    #[test]
    fn the_bundled_table_parses_and_is_dated() {
        assert!(TABLE.ec2.contains_key("t3.micro"));
        assert!(TABLE.rds["postgres"].contains_key("db.t3.medium"));
        assert!(chrono::NaiveDate::parse_from_str(prices_as_of(), "%Y-%m-%d").is_ok());
    }

    #[test]
    fn an_estimate_prices_each_unit_for_the_expected_and_the_worst_duration() {
        let e = estimate(
            &units(),
            "us-east-1",
            (Duration::from_secs(1800), "x".into()),
            Duration::from_secs(4 * 3600),
        );
        // RDS: 0.072/h + 20 GB × 0.115 / 730; EC2: 0.0104/h + 8 GB × 0.08 / 730;
        // S3: 1 GiB × 0.023 / 730 per hour, 3 LISTs and 2 500 COPYs once.
        let rds = 0.072 + 20.0 * 0.115 / 730.0;
        let ec2 = 0.0104 + 8.0 * 0.08 / 730.0;
        let s3h = 0.023 / 730.0;
        let s3once = 3.0 * 0.005 / 1000.0 + 2500.0 * 0.005 / 1000.0;
        assert!((e.hourly_usd - usd(rds + ec2 + s3h)).abs() < 1e-9, "{e:#?}");
        let exp = (rds + ec2 + s3h) * 0.5 + s3once;
        assert!((e.expected_usd - usd(exp)).abs() < 1e-9, "{e:#?}");
        let max = (rds + ec2 + s3h) * 4.0 + s3once;
        assert!((e.max_usd - usd(max)).abs() < 1e-9, "{e:#?}");
        assert!(e.notes.iter().all(|n| !n.contains("differ")));
        assert!(e.within(1.0).is_ok());
        let over = e.within(0.10).unwrap_err();
        assert!(over.contains("over budget.max_usd $0.10"), "{over}");
        assert!(over.contains("largest part is database.db"), "{over}");
    }

    #[test]
    fn a_baseline_and_its_candidate_share_one_budget() {
        let e = estimate(
            &units()[..1],
            "us-east-1",
            (Duration::from_secs(60), "x".into()),
            Duration::from_secs(3600),
        );
        let max = e.max_usd * 1.5;
        assert!(e.within(max).is_ok());
        let why = e.within_times(max, 2).unwrap_err();
        assert!(why.contains("(2 copies of $"), "{why}");
    }

    #[test]
    fn the_worst_case_adds_a_kept_copys_time_to_the_ttl() {
        let bp = |extra: &str| {
            crate::blueprint::compile::compile(
                std::path::Path::new("t.yaml"),
                &format!(
                    "name: t\nresources:\n  b:\n    type: bucket\n    source: s\nttl: 1h\n{extra}"
                ),
                &BTreeMap::new(),
            )
            .unwrap()
        };
        let td = Duration::from_secs(600);
        assert_eq!(
            worst_case(&bp(""), None, td),
            Duration::from_secs(3600 + 600)
        );
        let kept = bp("teardown:\n  policy: keep\n  keep_for: 2h\n");
        assert_eq!(
            worst_case(&kept, None, td),
            Duration::from_secs(3 * 3600 + 600)
        );
        assert_eq!(
            worst_case(&bp(""), Some(Duration::from_secs(5 * 3600)), td),
            Duration::from_secs(6 * 3600 + 600)
        );
    }

    #[test]
    fn billing_minimums_apply_to_short_runs() {
        let e = estimate(
            &units()[..1],
            "eu-west-1",
            (Duration::from_secs(60), "x".into()),
            Duration::from_secs(60),
        );
        // RDS bills at least 10 minutes.
        let rds = 0.072 + 20.0 * 0.115 / 730.0;
        assert!((e.expected_usd - usd(rds / 6.0)).abs() < 1e-9, "{e:#?}");
        assert!(e.notes.iter().any(|n| n.contains("eu-west-1's differ")));
        let lifetimes = BTreeMap::from([("database.db".to_string(), 0.05)]);
        assert!((e.actual(&lifetimes) - usd(rds / 6.0)).abs() < 1e-9);
        assert!(e.actual(&BTreeMap::new()).abs() < 1e-12);
    }

    #[test]
    fn an_unknown_class_has_no_price_and_refuses_a_budget() {
        let e = estimate(
            &[(
                "database.db".into(),
                Unit::Rds {
                    engine: "postgres".into(),
                    class: "db.x99.huge".into(),
                    storage_gb: 5,
                },
            )],
            "us-east-1",
            (Duration::from_secs(60), "x".into()),
            Duration::from_secs(3600),
        );
        assert_eq!(e.unpriced().len(), 1);
        let why = e.within(1000.0).unwrap_err();
        assert!(
            why.contains("RDS postgres class db.x99.huge is not in the price table"),
            "{why}"
        );
        assert!(e.lines()[1].contains("no price"), "{:?}", e.lines());
    }

    #[test]
    fn the_expected_duration_is_the_median_of_history_or_an_hour() {
        assert_eq!(expected_from(&[]).0, DEFAULT_EXPECTED);
        let (d, basis) = expected_from(&[3000, 1000, 2000, -1]);
        assert_eq!(d, Duration::from_millis(2000));
        assert_eq!(basis, "median of the last 3 run(s)");
    }
}
