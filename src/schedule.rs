//! When a sync runs in schedule mode: `every = "15m"` (a fixed rate from the first run, which
//! starts at once) or `schedule = "CRON"` (five fields, in UTC: minute, hour, day of month,
//! month, day of week; `*`, lists, ranges, steps, and month and day names).
//!
//! Pure time arithmetic on unix seconds, so it is tested without a clock.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How often a sync runs in schedule mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Every(Duration),
    Cron(Cron),
}

impl Schedule {
    /// The first run at or after `now` (unix seconds): at once for `every`, the next matching
    /// minute for a cron schedule.
    pub fn first(&self, now: u64) -> u64 {
        match self {
            Schedule::Every(_) => now,
            Schedule::Cron(c) => c.next_after(now),
        }
    }

    /// The next run after the one due at `due`, once `now` has come: the next occurrence after
    /// `due` that is not yet past, and how many occurrences were missed in between (a run that
    /// took longer than the interval).
    pub fn next(&self, due: u64, now: u64) -> (u64, u64) {
        let mut next = self.after(due);
        let mut missed = 0;
        while next < now {
            missed += 1;
            next = self.after(next);
        }
        (next, missed)
    }

    fn after(&self, t: u64) -> u64 {
        match self {
            Schedule::Every(d) => t + d.as_secs().max(1),
            Schedule::Cron(c) => c.next_after(t),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Schedule::Cron(c) => write!(f, "on schedule '{}' (UTC)", c.text),
        }
    }
}

/// Parses `every` and `schedule` values: one of the two, never both.
pub fn parse(every: Option<&str>, cron: Option<&str>) -> Result<Option<Schedule>, String> {
    match (every, cron) {
        (Some(_), Some(_)) => Err("give every or schedule, not both".into()),
        (Some(e), None) => {
            let d = humantime::parse_duration(e.trim()).map_err(|err| {
                format!("every '{e}' is not a duration ({err}); e.g. 15m, 1h, 1d")
            })?;
            if d < Duration::from_secs(1) {
                return Err(format!("every '{e}' is shorter than a second"));
            }
            Ok(Some(Schedule::Every(d)))
        }
        (None, Some(c)) => Ok(Some(Schedule::Cron(c.parse()?))),
        (None, None) => Ok(None),
    }
}

/// A five-field cron expression; each field is the set of values it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Whether day of month and day of week were both restricted (then either may match, as in
    /// Vixie cron).
    either_day: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl FromStr for Cron {
    type Err = String;
    fn from_str(s: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = s.split_whitespace().collect();
        let [mi, h, dom, mon, dow] = fields[..] else {
            return Err(format!(
                "schedule '{s}' needs five fields (minute hour day-of-month month day-of-week), e.g. '0 2 * * *' for 02:00 UTC daily"
            ));
        };
        let bad = |field: &str, why: String| format!("schedule '{s}': {field}: {why}");
        let weekdays = field(dow, 0, 7, &WEEKDAYS).map_err(|e| bad("day of week", e))?;
        // 7 is Sunday too.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        Ok(Cron {
            text: s.split_whitespace().collect::<Vec<_>>().join(" "),
            minutes: field(mi, 0, 59, &[]).map_err(|e| bad("minute", e))?,
            hours: field(h, 0, 23, &[]).map_err(|e| bad("hour", e))?,
            days: field(dom, 1, 31, &[]).map_err(|e| bad("day of month", e))?,
            months: field(mon, 1, 12, &MONTHS).map_err(|e| bad("month", e))? >> 1,
            weekdays,
            either_day: !dom.starts_with('*') && !dow.starts_with('*'),
        })
    }
}

/// One field as a bit set of the values it allows (bit v for value v).
fn field(text: &str, lo: u64, hi: u64, names: &[&str]) -> Result<u64, String> {
    let value = |v: &str| -> Result<u64, String> {
        let first = if names.len() == 12 { 1 } else { 0 };
        let n = match names.iter().position(|n| n.eq_ignore_ascii_case(v)) {
            Some(i) => i as u64 + first,
            None => v
                .parse()
                .map_err(|_| format!("'{v}' is not a number from {lo} to {hi}"))?,
        };
        if !(lo..=hi).contains(&n) {
            return Err(format!("{n} is outside {lo}-{hi}"));
        }
        Ok(n)
    };
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("step '{s}' is not a positive number"))?,
            ),
            None => (part, 1),
        };
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                // `5/15`: from 5 to the end, every 15.
                None if step > 1 => (value(r)?, hi),
                None => {
                    let v = value(r)?;
                    (v, v)
                }
            },
        };
        if a > b {
            return Err(format!("range {a}-{b} runs backwards"));
        }
        let mut v = a;
        while v <= b {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

impl Cron {
    /// The first minute strictly after `t` (unix seconds) that matches, in UTC.
    pub fn next_after(&self, t: u64) -> u64 {
        let mut m = t / 60 + 1;
        // Every schedule matches within a few years (29 February on a Monday, at worst 28).
        for _ in 0..(60 * 24 * 366 * 30) {
            let days = m / (60 * 24);
            let (_, month, day) = civil(days as i64);
            let weekday = (days + 4) % 7; // 1970-01-01 was a Thursday.
            let dom_ok = self.days & (1 << day) != 0;
            let dow_ok = self.weekdays & (1 << weekday) != 0;
            let day_ok = match self.either_day {
                true => dom_ok || dow_ok,
                false => dom_ok && dow_ok,
            };
            if self.months & (1 << (month - 1)) == 0 || !day_ok {
                m = (days + 1) * 60 * 24;
                continue;
            }
            let hour = (m / 60) % 24;
            if self.hours & (1 << hour) == 0 {
                m = (m / 60 + 1) * 60;
                continue;
            }
            if self.minutes & (1 << (m % 60)) != 0 {
                return m * 60;
            }
            m += 1;
        }
        u64::MAX
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, mo: i64, d: i64, h: u64, mi: u64) -> u64 {
        // Days from civil, the inverse of `civil`.
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = (mo + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = (era * 146_097 + doe - 719_468) as u64;
        days * 86_400 + h * 3600 + mi * 60
    }

    fn next(expr: &str, from: u64) -> u64 {
        expr.parse::<Cron>().unwrap().next_after(from)
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(at(2026, 12, 2, 13, 5), 1_796_216_700);
    }

    #[test]
    fn cron_next_times() {
        let now = at(2026, 12, 2, 13, 5); // a Wednesday
        assert_eq!(next("0 2 * * *", now), at(2026, 12, 3, 2, 0));
        assert_eq!(next("*/15 * * * *", now), at(2026, 12, 2, 13, 15));
        assert_eq!(
            next("5 13 * * *", now),
            at(2026, 12, 3, 13, 5),
            "strictly after"
        );
        assert_eq!(next("30 9 * * mon-fri", now), at(2026, 12, 3, 9, 30));
        assert_eq!(next("0 0 * * 0", now), at(2026, 12, 6, 0, 0), "Sunday");
        assert_eq!(next("0 0 * * 7", now), at(2026, 12, 6, 0, 0), "7 is Sunday");
        assert_eq!(next("0 0 1 jan *", now), at(2027, 1, 1, 0, 0));
        assert_eq!(next("0 12 29 2 *", now), at(2028, 2, 29, 12, 0));
        assert_eq!(next("0,30 8-10/2 * * *", now), at(2026, 12, 3, 8, 0));
        // Day of month and day of week both given: either matches (the 13th, or a Friday).
        assert_eq!(next("0 0 13 * fri", now), at(2026, 12, 4, 0, 0));
        assert_eq!(next("10/20 * * * *", now), at(2026, 12, 2, 13, 10));
    }

    #[test]
    fn bad_cron_expressions_say_what_is_wrong() {
        for (expr, want) in [
            ("* * *", "five fields"),
            ("60 * * * *", "minute: 60 is outside 0-59"),
            ("* * * foo *", "month: 'foo'"),
            ("*/0 * * * *", "step '0'"),
            ("5-1 * * * *", "backwards"),
        ] {
            let e = expr.parse::<Cron>().unwrap_err();
            assert!(e.contains(want), "{expr}: {e}");
        }
    }

    #[test]
    fn every_is_a_fixed_rate_and_counts_missed_runs() {
        let s = parse(Some("15m"), None).unwrap().unwrap();
        assert_eq!(s.first(1000), 1000);
        assert_eq!(s.next(1000, 1500), (1900, 0));
        // A run that took 40 minutes missed two occurrences.
        assert_eq!(s.next(1000, 1000 + 2400), (1000 + 2700, 2));
        assert!(parse(Some("1m"), Some("* * * * *")).is_err());
        assert!(parse(Some("soon"), None)
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse(Some("10ms"), None).is_err());
        assert_eq!(parse(None, None), Ok(None));
    }
}
