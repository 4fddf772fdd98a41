//! Scheduled rehearsals: cron expressions read in a time zone; each firing submits a run
//! through the same queue and leases as the webhook.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// Parses a cron expression (5 fields, or 6 with seconds first).
///
/// # Errors
/// croner's message.
pub fn parse(expr: &str) -> Result<Cron, String> {
    Cron::from_str(expr).map_err(|e| e.to_string())
}

/// The next firing strictly after `now`, computed in `tz` (so "03:00" means 03:00 local time,
/// across daylight-saving changes).
#[must_use]
pub fn next_after(cron: &Cron, tz: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&now.with_timezone(&tz), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_schedule_follows_its_time_zone() {
        let c = parse("0 3 * * *").unwrap();
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // 2026-11-22 is winter time in Berlin (UTC+1): 03:00 local is 02:00 UTC.
        let now: DateTime<Utc> = "2026-11-22T01:00:00Z".parse().unwrap();
        assert_eq!(
            next_after(&c, tz, now).unwrap().to_rfc3339(),
            "2026-11-22T02:00:00+00:00"
        );
        let now: DateTime<Utc> = "2026-11-22T02:00:00Z".parse().unwrap();
        assert_eq!(
            next_after(&c, tz, now).unwrap().to_rfc3339(),
            "2026-11-23T02:00:00+00:00"
        );
    }

    #[test]
    fn seconds_field_allows_short_test_schedules() {
        let c = parse("*/2 * * * * *").unwrap();
        let now: DateTime<Utc> = "2026-11-22T01:00:01Z".parse().unwrap();
        assert_eq!(
            next_after(&c, Tz::UTC, now).unwrap().to_rfc3339(),
            "2026-11-22T01:00:02+00:00"
        );
    }
}
