//! Maintenance windows: the built-in schedules of the seed and user-defined ones, each a time
//! zone and weekly windows that may cross midnight. A task is offered only inside a window.

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Why a schedule definition is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("schedule name must be 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadName,
    #[error("{0:?} is a built-in schedule and cannot be changed")]
    BuiltIn(String),
    #[error("unknown time zone {0:?}; use an IANA name such as Europe/Warsaw")]
    UnknownZone(String),
    #[error("windows[{index}]: {message}")]
    BadWindow { index: usize, message: String },
    #[error("a schedule needs at least one window and at most 64")]
    WindowCount,
    #[error("schedule {0:?} not found")]
    NotFound(String),
}

impl ScheduleError {
    pub fn code(&self) -> (&'static str, crate::error::Kind) {
        use crate::error::Kind;
        match self {
            ScheduleError::NotFound(_) => ("schedule-not-found", Kind::NotFound),
            ScheduleError::BuiltIn(_) => ("schedule-built-in", Kind::Conflict),
            // Well-formed but meaningless (an unknown zone, an empty window list).
            ScheduleError::UnknownZone(_) | ScheduleError::WindowCount => {
                ("invalid-schedule", Kind::Unprocessable)
            }
            _ => ("invalid-schedule", Kind::BadRequest),
        }
    }
}

/// One weekly window: on each of `days`, from `start` to `end` local time. An `end` at or
/// before `start` ends on the next day (a night window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Three-letter English day names: `mon` ... `sun`.
    pub days: Vec<String>,
    /// `HH:MM`, 00:00 to 23:59.
    pub start: String,
    /// `HH:MM`, 00:00 to 24:00.
    pub end: String,
}

/// A named schedule as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Schedule {
    #[serde(default)]
    pub name: String,
    /// IANA time zone; built-in schedules use UTC.
    #[serde(default = "utc")]
    pub time_zone: String,
    /// Empty means always open (`always`).
    pub windows: Vec<Window>,
    /// Shown; ignored in a `PUT`, which always defines a user schedule.
    #[serde(default)]
    pub built_in: bool,
}

fn utc() -> String {
    "UTC".into()
}

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];
const WORKDAYS: [&str; 5] = ["mon", "tue", "wed", "thu", "fri"];
const ALL_DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const WEEKEND: [&str; 2] = ["sat", "sun"];

fn window(days: &[&str], start: &str, end: &str) -> Window {
    Window {
        days: days.iter().map(|d| d.to_string()).collect(),
        start: start.into(),
        end: end.into(),
    }
}

/// The seed's built-in schedules, in UTC.
pub fn built_ins() -> Vec<Schedule> {
    let s = |name: &str, windows: Vec<Window>| Schedule {
        name: name.into(),
        time_zone: utc(),
        windows,
        built_in: true,
    };
    vec![
        s("always", vec![]),
        s("weekends", vec![window(&WEEKEND, "00:00", "24:00")]),
        s("nights-home", vec![window(&ALL_DAYS, "01:00", "06:00")]),
        s(
            "nights-enterprise",
            vec![window(&WORKDAYS, "20:00", "06:00")],
        ),
        s(
            "nights-enterprise-weekends",
            vec![
                window(&WORKDAYS, "20:00", "06:00"),
                window(&WEEKEND, "00:00", "24:00"),
            ],
        ),
    ]
}

pub fn built_in(name: &str) -> Option<Schedule> {
    built_ins().into_iter().find(|s| s.name == name)
}

pub fn check_name(name: &str) -> Result<(), ScheduleError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ScheduleError::BadName)
    }
}

/// Minutes since midnight from `HH:MM`; `24:00` only where `allow_24` is set.
fn minutes(s: &str, allow_24: bool) -> Option<i32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) if allow_24 => Some(1440),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

/// A window parsed once: day set, start and length in minutes.
#[derive(Debug, Clone, Copy)]
struct Span {
    days: [bool; 7],
    start: i32,
    len: i32,
}

/// A schedule ready to answer "open now?" and "when does it open next?".
#[derive(Debug, Clone)]
pub struct Calendar {
    tz: TimeZone,
    spans: Vec<Span>,
}

impl Schedule {
    /// Checks a user's definition (at least one window) and compiles it.
    pub fn check(&self) -> Result<Calendar, ScheduleError> {
        if self.windows.is_empty() || self.windows.len() > 64 {
            return Err(ScheduleError::WindowCount);
        }
        self.calendar()
    }

    /// Compiles the definition; no windows means always open.
    pub fn calendar(&self) -> Result<Calendar, ScheduleError> {
        let tz = TimeZone::get(&self.time_zone)
            .map_err(|_| ScheduleError::UnknownZone(self.time_zone.clone()))?;
        let mut spans = Vec::new();
        for (index, w) in self.windows.iter().enumerate() {
            let bad = |message: String| ScheduleError::BadWindow { index, message };
            let start = minutes(&w.start, false)
                .ok_or_else(|| bad(format!("start {:?} is not HH:MM (00:00-23:59)", w.start)))?;
            let end = minutes(&w.end, true)
                .ok_or_else(|| bad(format!("end {:?} is not HH:MM (00:00-24:00)", w.end)))?;
            if w.days.is_empty() {
                return Err(bad("days is empty".into()));
            }
            let mut days = [false; 7];
            for d in &w.days {
                let i = DAYS
                    .iter()
                    .position(|(n, _)| n.eq_ignore_ascii_case(d))
                    .ok_or_else(|| bad(format!("day {d:?} is not one of mon..sun")))?;
                days[i] = true;
            }
            let len = if end > start {
                end - start
            } else {
                end + 1440 - start
            };
            spans.push(Span { days, start, len });
        }
        Ok(Calendar { tz, spans })
    }
}

fn day_index(d: Date) -> usize {
    d.weekday().to_monday_zero_offset() as usize
}

impl Calendar {
    /// Always open.
    pub fn always() -> Calendar {
        Calendar {
            tz: TimeZone::UTC,
            spans: Vec::new(),
        }
    }

    /// Local start and end (Unix ms) of the window `span` opening on `date`.
    fn bounds(&self, span: &Span, date: Date) -> Option<(i64, i64)> {
        let at = |d: Date, mins: i32| -> Option<i64> {
            let extra_days = mins / 1440;
            let mins = mins % 1440;
            let d = d.checked_add(jiff::Span::new().days(extra_days)).ok()?;
            let dt = d.at((mins / 60) as i8, (mins % 60) as i8, 0, 0);
            // A local time skipped by a DST change resolves to the instant after the gap.
            Some(
                dt.to_zoned(self.tz.clone())
                    .ok()?
                    .timestamp()
                    .as_millisecond(),
            )
        };
        Some((at(date, span.start)?, at(date, span.start + span.len)?))
    }

    /// The window open at `now_ms`, as its end; `None` when closed.
    pub fn open_until(&self, now_ms: i64) -> Option<i64> {
        if self.spans.is_empty() {
            return Some(i64::MAX);
        }
        let today = Timestamp::from_millisecond(now_ms)
            .ok()?
            .to_zoned(self.tz.clone())
            .date();
        let mut until = None;
        // A window from yesterday (or the day before, for 24:00 ends) may still be open.
        for back in 0..=2 {
            let Ok(date) = today.checked_sub(jiff::Span::new().days(back)) else {
                continue;
            };
            for span in self.spans.iter().filter(|s| s.days[day_index(date)]) {
                if let Some((start, end)) = self.bounds(span, date) {
                    if start <= now_ms && now_ms < end {
                        until = until.max(Some(end));
                    }
                }
            }
        }
        until
    }

    pub fn is_open(&self, now_ms: i64) -> bool {
        self.open_until(now_ms).is_some()
    }

    /// When the next window opens after `now_ms` (now itself when open).
    pub fn next_open(&self, now_ms: i64) -> Option<i64> {
        if self.is_open(now_ms) {
            return Some(now_ms);
        }
        let today = Timestamp::from_millisecond(now_ms)
            .ok()?
            .to_zoned(self.tz.clone())
            .date();
        (0..=8)
            .filter_map(|ahead| today.checked_add(jiff::Span::new().days(ahead)).ok())
            .flat_map(|date| {
                self.spans
                    .iter()
                    .filter(move |s| s.days[day_index(date)])
                    .filter_map(move |s| self.bounds(s, date))
            })
            .map(|(start, _)| start)
            .filter(|&start| start > now_ms)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn cal(name: &str) -> Calendar {
        built_in(name).unwrap().calendar().unwrap()
    }

    #[test]
    fn built_in_windows() {
        // 2026-11-20 is a Friday.
        let always = cal("always");
        assert!(always.is_open(ms("2026-11-20T12:00:00Z")));
        let weekends = cal("weekends");
        assert!(!weekends.is_open(ms("2026-11-20T23:59:00Z")));
        assert!(weekends.is_open(ms("2026-11-21T00:00:00Z")));
        assert!(weekends.is_open(ms("2026-11-22T23:59:59Z")));
        assert!(!weekends.is_open(ms("2026-11-23T00:00:00Z")));
        assert_eq!(
            weekends.next_open(ms("2026-11-23T00:00:00Z")),
            Some(ms("2026-11-28T00:00:00Z"))
        );
        let home = cal("nights-home");
        assert!(home.is_open(ms("2026-11-20T01:00:00Z")));
        assert!(!home.is_open(ms("2026-11-20T06:00:00Z")));
        assert_eq!(
            home.next_open(ms("2026-11-20T06:00:00Z")),
            Some(ms("2026-11-21T01:00:00Z"))
        );
        let ent = cal("nights-enterprise");
        // Friday night runs into Saturday morning; Saturday night is not a work night.
        assert!(ent.is_open(ms("2026-11-21T05:59:00Z")));
        assert!(!ent.is_open(ms("2026-11-21T06:00:00Z")));
        assert!(!ent.is_open(ms("2026-11-21T21:00:00Z")));
        // Monday 03:00 belongs to Sunday night, which is not listed.
        assert!(!ent.is_open(ms("2026-11-23T03:00:00Z")));
        assert_eq!(
            ent.next_open(ms("2026-11-21T06:00:00Z")),
            Some(ms("2026-11-23T20:00:00Z"))
        );
        let both = cal("nights-enterprise-weekends");
        assert!(both.is_open(ms("2026-11-21T21:00:00Z")));
        assert!(both.is_open(ms("2026-11-20T20:00:00Z")));
        assert!(!both.is_open(ms("2026-11-23T03:00:00Z")));
        assert_eq!(
            both.open_until(ms("2026-11-22T12:00:00Z")),
            Some(ms("2026-11-23T00:00:00Z"))
        );
    }

    #[test]
    fn user_defined_in_a_zone_across_midnight_and_dst() {
        let s = Schedule {
            name: "berlin".into(),
            time_zone: "Europe/Berlin".into(),
            windows: vec![window(&["sat"], "22:00", "02:00")],
            built_in: false,
        };
        let c = s.calendar().unwrap();
        // 2026-11-21 is a Saturday; Berlin is UTC+1 in November.
        assert!(c.is_open(ms("2026-11-21T21:00:00Z")));
        assert!(c.is_open(ms("2026-11-22T00:59:00Z")));
        assert!(!c.is_open(ms("2026-11-22T01:00:00Z")));
        assert_eq!(
            c.next_open(ms("2026-11-22T01:00:00Z")),
            Some(ms("2026-11-28T21:00:00Z"))
        );
        // 2026-03-28 is a Saturday before the spring change; still UTC+1 at 22:00.
        assert!(c.is_open(ms("2026-03-28T21:30:00Z")));
        // In summer Berlin is UTC+2.
        assert!(c.is_open(ms("2026-06-27T20:00:00Z")));
        assert!(!c.is_open(ms("2026-06-27T19:59:00Z")));
    }

    #[test]
    fn bad_definitions() {
        let mut s = Schedule {
            name: "x".into(),
            time_zone: "Mars/Olympus".into(),
            windows: vec![window(&["mon"], "01:00", "02:00")],
            built_in: false,
        };
        assert!(matches!(s.calendar(), Err(ScheduleError::UnknownZone(_))));
        s.time_zone = "UTC".into();
        for (days, start, end) in [
            (vec!["mon"], "24:00", "01:00"),
            (vec!["mon"], "1:00", "02:00"),
            (vec!["mon"], "01:00", "24:01"),
            (vec!["funday"], "01:00", "02:00"),
            (vec![], "01:00", "02:00"),
        ] {
            s.windows = vec![window(&days, start, end)];
            assert!(
                matches!(s.calendar(), Err(ScheduleError::BadWindow { index: 0, .. })),
                "{days:?} {start} {end}"
            );
        }
        s.windows.clear();
        assert_eq!(s.check().unwrap_err(), ScheduleError::WindowCount);
        assert!(check_name("ok-name_1.2").is_ok());
        assert!(check_name("no/slash").is_err());
        assert!(check_name("").is_err());
    }
}
