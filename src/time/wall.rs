//! Naive local wall-clock times, as Python's `datetime.datetime` without tzinfo.
//!
//! Reported times (`last_retry_at`, `next_retry_at`, event timestamps) are naive
//! local datetimes. Storing them as a count of microseconds since
//! 0001-01-01T00:00:00 makes `datetime + timedelta` plain integer addition, exactly
//! as CPython does it for naive datetimes, and keeps records small.

use std::cell::Cell;
use std::fmt;
use std::num::NonZeroU64;

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// Days from 0001-01-01 to 1970-01-01 (Python: `date(1970, 1, 1).toordinal() - 1`).
const UNIX_EPOCH_DAYS: i64 = 719_162;

/// The broken-down fields of a naive datetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTimeParts {
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub microsecond: u32,
}

/// A naive wall-clock time with microsecond precision, in `datetime`'s range
/// (years 1 to 9999).
/// `Default` is `datetime.min`.
///
/// Held as its microseconds plus one, never zero: an `Option<WallTime>` (a
/// task's `created_at`, a record's times) then takes 8 bytes, not 16.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WallTime(NonZeroU64);

impl WallTime {
    /// `datetime.min`.
    pub const MIN: WallTime = WallTime::within_range(0);
    /// `datetime.max` (9999-12-31T23:59:59.999999).
    pub const MAX: WallTime = WallTime::within_range(315_537_897_599_999_999);

    /// The time `micros` after `datetime.min`, which the caller has checked
    /// is within `datetime`'s range (0 ..= MAX's).
    const fn within_range(micros: i64) -> WallTime {
        match NonZeroU64::new((micros as u64).wrapping_add(1)) {
            Some(held) => WallTime(held),
            // Not reached for a time in range; `datetime.min` otherwise.
            None => WallTime(NonZeroU64::MIN),
        }
    }

    /// Builds a time from its fields; `None` when any field is out of range.
    pub fn from_parts(p: DateTimeParts) -> Option<WallTime> {
        if !(1..=9999).contains(&p.year)
            || !(1..=12).contains(&p.month)
            || p.day < 1
            || p.day > days_in_month(p.year, p.month)
            || p.hour > 23
            || p.minute > 59
            || p.second > 59
            || p.microsecond > 999_999
        {
            return None;
        }
        let days = days_from_civil(p.year, p.month, p.day) + UNIX_EPOCH_DAYS;
        let secs = i64::from(p.hour) * 3600 + i64::from(p.minute) * 60 + i64::from(p.second);
        Some(WallTime::within_range(
            days * MICROS_PER_DAY + secs * MICROS_PER_SECOND + i64::from(p.microsecond),
        ))
    }

    /// Microseconds since 0001-01-01T00:00:00.
    pub const fn micros(self) -> i64 {
        (self.0.get() - 1) as i64
    }

    /// The inverse of [`WallTime::micros`]; `None` outside `datetime`'s range.
    pub fn from_micros(micros: i64) -> Option<WallTime> {
        (Self::MIN.micros()..=Self::MAX.micros())
            .contains(&micros)
            .then(|| WallTime::within_range(micros))
    }

    pub fn parts(self) -> DateTimeParts {
        let days = self.micros().div_euclid(MICROS_PER_DAY);
        let in_day = self.micros().rem_euclid(MICROS_PER_DAY);
        let (year, month, day) = civil_from_days(days - UNIX_EPOCH_DAYS);
        let secs = in_day / MICROS_PER_SECOND;
        DateTimeParts {
            year,
            month,
            day,
            hour: (secs / 3600) as u8,
            minute: (secs / 60 % 60) as u8,
            second: (secs % 60) as u8,
            microsecond: (in_day % MICROS_PER_SECOND) as u32,
        }
    }

    /// `self + timedelta(microseconds=delta)`, held at `datetime.max` / `datetime.min`
    /// where Python would raise `OverflowError`.
    pub fn saturating_add_micros(self, delta: i64) -> WallTime {
        WallTime::within_range(
            self.micros()
                .saturating_add(delta)
                .clamp(Self::MIN.micros(), Self::MAX.micros()),
        )
    }

    /// Whole days since 1970-01-01 plus the time of day: the fields the system
    /// clock conversion produces.
    pub fn from_unix_days(days_since_epoch: i64, second_of_day: i64, micros: u32) -> Option<Self> {
        let total = (days_since_epoch + UNIX_EPOCH_DAYS)
            .checked_mul(MICROS_PER_DAY)?
            .checked_add(second_of_day * MICROS_PER_SECOND + i64::from(micros))?;
        Self::from_micros(total)
    }
}

impl WallTime {
    /// The inverse of [`WallTime::isoformat`]: `YYYY-MM-DDTHH:MM:SS` with an
    /// optional `.ffffff`; `None` for anything else (other separators, a
    /// time zone, fields out of range).
    pub fn parse_isoformat(text: &str) -> Option<WallTime> {
        let b = text.as_bytes();
        if !(b.len() == 19 || b.len() == 26) {
            return None;
        }
        let digits = |range: std::ops::Range<usize>| -> Option<u32> {
            b[range].iter().try_fold(0u32, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        };
        let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
        if separators.iter().any(|&(i, c)| b[i] != c) || (b.len() == 26 && b[19] != b'.') {
            return None;
        }
        let microsecond = if b.len() == 26 { digits(20..26)? } else { 0 };
        WallTime::from_parts(DateTimeParts {
            year: digits(0..4)? as i32,
            month: digits(5..7)? as u8,
            day: digits(8..10)? as u8,
            hour: digits(11..13)? as u8,
            minute: digits(14..16)? as u8,
            second: digits(17..19)? as u8,
            microsecond,
        })
    }
}

/// `datetime.isoformat()` of a naive datetime: microseconds only when non-zero.
impl WallTime {
    /// `datetime.isoformat()`: `YYYY-MM-DDTHH:MM:SS[.ffffff]`, written two
    /// digits at a time from a table (it is in every state report and three
    /// times per record in a status report; `write!` costs several times more).
    /// The date's text is kept per thread for the next time on the same day:
    /// the calendar arithmetic was half of the cost.
    pub fn isoformat(self) -> IsoFormat {
        thread_local! {
            static LAST_DATE: Cell<(i64, [u8; 10])> = const { Cell::new((i64::MIN, [0; 10])) };
        }
        let days = self.micros().div_euclid(MICROS_PER_DAY);
        let in_day = self.micros().rem_euclid(MICROS_PER_DAY);
        let mut buf = *b"0000-00-00T00:00:00.000000";
        let date = LAST_DATE.with(|last| match last.get() {
            (day, text) if day == days => text,
            _ => {
                let text = date_text(days);
                last.set((days, text));
                text
            }
        });
        buf[..10].copy_from_slice(&date);
        let secs = (in_day / MICROS_PER_SECOND) as u32;
        let micros = (in_day % MICROS_PER_SECOND) as u32;
        put2(&mut buf, 11, secs / 3600);
        put2(&mut buf, 14, secs / 60 % 60);
        put2(&mut buf, 17, secs % 60);
        put2(&mut buf, 20, micros / 10_000);
        put2(&mut buf, 22, micros / 100);
        put2(&mut buf, 24, micros);
        let len = if micros == 0 { 19 } else { 26 };
        IsoFormat { buf, len }
    }
}

/// `YYYY-MM-DD` of a day counted as `WallTime` counts them.
fn date_text(days: i64) -> [u8; 10] {
    let (year, month, day) = civil_from_days(days - UNIX_EPOCH_DAYS);
    let mut text = *b"0000-00-00";
    let year = year as u32;
    put2(&mut text, 0, year / 100);
    put2(&mut text, 2, year);
    put2(&mut text, 5, u32::from(month));
    put2(&mut text, 8, u32::from(day));
    text
}

/// `value % 100` as two digits at `buf[at..at + 2]`.
fn put2(buf: &mut [u8], at: usize, value: u32) {
    let i = 2 * (value % 100) as usize;
    buf[at..at + 2].copy_from_slice(&TWO_DIGITS[i..i + 2]);
}

/// "00" to "99", each number's two digits at twice its index.
const TWO_DIGITS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// The text of [`WallTime::isoformat`], on the stack.
pub struct IsoFormat {
    buf: [u8; 26],
    len: usize,
}

impl IsoFormat {
    /// The text's bytes, all ASCII.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl fmt::Display for WallTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.isoformat().as_str())
    }
}

/// `timedelta(seconds=seconds)` in whole microseconds, rounded the way CPython's
/// `timedelta` constructor rounds a float: the integral part exactly, the
/// fractional part scaled by 10**6 and rounded half to even.
///
/// Saturates at the `i64` range; callers only pass finite values >= 0.
pub fn timedelta_micros(seconds: f64) -> i64 {
    if seconds.is_nan() {
        return 0;
    }
    // Whole seconds (every delay of the default backoff) are exact: what
    // the general path below gives them, without its i128 and rounding.
    // (`as` conversions only: `trunc` is a library call on x86-64.)
    if seconds.abs() < 9.0e12 {
        let whole = seconds as i64;
        if whole as f64 == seconds {
            return whole * MICROS_PER_SECOND;
        }
    }
    let whole_seconds = seconds.trunc();
    let mut micros = (whole_seconds as i128).saturating_mul(i128::from(MICROS_PER_SECOND));
    let scaled_fraction = (seconds - whole_seconds) * 1e6;
    let whole_fraction = scaled_fraction.trunc();
    micros = micros.saturating_add(whole_fraction as i128);
    let leftover = scaled_fraction - whole_fraction;
    if leftover != 0.0 {
        let mut rounded = leftover.round();
        if (rounded - leftover).abs() == 0.5 {
            let odd = (micros & 1) as f64;
            rounded = 2.0 * ((leftover + odd) * 0.5).round() - odd;
        }
        micros = micros.saturating_add(rounded as i128);
    }
    micros.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn is_leap(year: i32) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i32, month: u8, day: u8) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

impl Default for WallTime {
    fn default() -> Self {
        WallTime::MIN
    }
}

impl fmt::Debug for WallTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WallTime({})", self.micros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(year: i32, month: u8, day: u8, hour: u8, minute: u8, second: u8, us: u32) -> WallTime {
        WallTime::from_parts(DateTimeParts {
            year,
            month,
            day,
            hour,
            minute,
            second,
            microsecond: us,
        })
        .unwrap()
    }

    #[test]
    fn an_optional_time_takes_8_bytes_and_keeps_order_and_text() {
        assert_eq!(std::mem::size_of::<Option<WallTime>>(), 8);
        assert_eq!(WallTime::default(), WallTime::MIN);
        assert_eq!(WallTime::MIN.micros(), 0);
        assert_eq!(WallTime::MAX.micros(), 315_537_897_599_999_999);
        let (a, b) = (
            WallTime::from_micros(5).unwrap(),
            WallTime::from_micros(6).unwrap(),
        );
        assert!(WallTime::MIN < a && a < b && b < WallTime::MAX);
        assert_eq!(format!("{a:?}"), "WallTime(5)");
        assert_eq!(WallTime::from_micros(-1), None);
        assert_eq!(WallTime::MAX.saturating_add_micros(1), WallTime::MAX);
        assert_eq!(WallTime::MIN.saturating_add_micros(-1), WallTime::MIN);
    }

    #[test]
    fn range_ends_match_python_datetime() {
        assert_eq!(at(1, 1, 1, 0, 0, 0, 0), WallTime::MIN);
        assert_eq!(at(9999, 12, 31, 23, 59, 59, 999_999), WallTime::MAX);
    }

    #[test]
    fn parts_round_trip_across_calendar_edges() {
        for &(y, m, d) in &[
            (1, 1, 1),
            (1600, 2, 29),
            (1900, 2, 28),
            (1970, 1, 1),
            (2000, 2, 29),
            (2024, 12, 31),
            (9999, 12, 31),
        ] {
            let t = at(y, m, d, 13, 5, 7, 42);
            let p = t.parts();
            assert_eq!((p.year, p.month, p.day), (y, m, d));
            assert_eq!((p.hour, p.minute, p.second, p.microsecond), (13, 5, 7, 42));
        }
    }

    #[test]
    fn every_day_of_four_centuries_round_trips() {
        let start = at(1999, 1, 1, 0, 0, 0, 0).micros() / MICROS_PER_DAY;
        for day in start..start + 146_097 {
            let t = WallTime::from_micros(day * MICROS_PER_DAY).unwrap();
            assert_eq!(WallTime::from_parts(t.parts()), Some(t));
        }
    }

    #[test]
    fn invalid_fields_are_rejected() {
        let ok = at(2023, 2, 28, 0, 0, 0, 0).parts();
        for bad in [
            DateTimeParts { day: 29, ..ok },
            DateTimeParts { month: 13, ..ok },
            DateTimeParts { year: 0, ..ok },
            DateTimeParts { year: 10_000, ..ok },
            DateTimeParts { hour: 24, ..ok },
            DateTimeParts {
                microsecond: 1_000_000,
                ..ok
            },
        ] {
            assert_eq!(WallTime::from_parts(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn isoformat_matches_python() {
        assert_eq!(
            at(2024, 3, 5, 7, 8, 9, 0).to_string(),
            "2024-03-05T07:08:09"
        );
        assert_eq!(
            at(2024, 3, 5, 7, 8, 9, 120).to_string(),
            "2024-03-05T07:08:09.000120"
        );
        assert_eq!(at(12, 1, 1, 0, 0, 0, 0).to_string(), "0012-01-01T00:00:00");
    }

    #[test]
    fn timedelta_rounding_matches_cpython() {
        // Values checked against CPython's `timedelta(seconds=x) / timedelta(microseconds=1)`.
        assert_eq!(timedelta_micros(1.0), 1_000_000);
        assert_eq!(timedelta_micros(0.1), 100_000);
        assert_eq!(timedelta_micros(2.5e-6), 2); // half to even
        assert_eq!(timedelta_micros(3.5e-6), 4);
        assert_eq!(timedelta_micros(1.0000005), 1_000_001);
        assert_eq!(timedelta_micros(5e-7), 0);
        assert_eq!(timedelta_micros(1.5e-6), 2);
        assert_eq!(timedelta_micros(4.5e-6), 4);
        assert_eq!(timedelta_micros(123.4567895), 123_456_789);
        assert_eq!(timedelta_micros(300.0), 300_000_000);
        assert_eq!(timedelta_micros(0.0), 0);
        assert_eq!(timedelta_micros(1e300), i64::MAX);
        assert_eq!(timedelta_micros(-2.0), -2_000_000);
        assert_eq!(timedelta_micros(8.9e12), 8_900_000_000_000_000_000);
        assert_eq!(timedelta_micros(9.3e12), i64::MAX);
        assert_eq!(timedelta_micros(-1e300), i64::MIN);
    }

    #[test]
    fn adding_saturates_at_datetime_max() {
        let t = at(9999, 12, 31, 0, 0, 0, 0);
        assert_eq!(t.saturating_add_micros(i64::MAX), WallTime::MAX);
        assert_eq!(
            t.saturating_add_micros(1_000_000),
            at(9999, 12, 31, 0, 0, 1, 0)
        );
    }

    #[test]
    fn isoformat_matches_the_formatted_parts() {
        let mut t = WallTime::MIN;
        let step = 7_777_777_777_777i64; // walks all fields, years 1 to 9999
        while t < WallTime::MAX {
            let p = t.parts();
            let mut expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                p.year, p.month, p.day, p.hour, p.minute, p.second
            );
            if p.microsecond != 0 {
                expected.push_str(&format!(".{:06}", p.microsecond));
            }
            assert_eq!(t.isoformat().as_str(), expected);
            t = t.saturating_add_micros(step);
        }
        assert_eq!(WallTime::MAX.to_string(), "9999-12-31T23:59:59.999999");
        assert_eq!(WallTime::MIN.to_string(), "0001-01-01T00:00:00");
    }

    #[test]
    fn isoformat_keeps_no_stale_date_across_midnight() {
        // The date's text is reused for the next time on the same day only.
        let before = at(2026, 12, 31, 23, 59, 59, 999_999);
        let after = before.saturating_add_micros(1);
        for (t, text) in [
            (before, "2026-12-31T23:59:59.999999"),
            (at(2026, 12, 31, 0, 0, 0, 0), "2026-12-31T00:00:00"),
            (after, "2027-01-01T00:00:00"),
            (after.saturating_add_micros(5), "2027-01-01T00:00:00.000005"),
            (before, "2026-12-31T23:59:59.999999"),
        ] {
            assert_eq!(t.isoformat().as_str(), text);
        }
    }

    #[test]
    fn isoformat_parses_back() {
        for micros in [0, 1, 63_000_000_000_123_456, WallTime::MAX.micros()] {
            let t = WallTime::from_micros(micros).unwrap();
            assert_eq!(WallTime::parse_isoformat(t.isoformat().as_str()), Some(t));
        }
        for bad in [
            "",
            "2026-11-29",
            "2026-11-29 04:30:07",
            "2026-13-01T00:00:00",
            "2026-02-30T00:00:00",
            "2026-11-29T04:30:07+00:00",
            "2026-11-29T04:30:07.12",
            "2026-11-29T04:3a:07",
        ] {
            assert_eq!(WallTime::parse_isoformat(bad), None, "{bad}");
        }
    }
}
