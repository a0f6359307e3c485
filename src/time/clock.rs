//! Time sources.
//!
//! A clock gives two readings: a monotonic one, used for every decision (backoff
//! due times, heartbeat timeouts), and a naive local wall-clock one, used only for
//! what is reported. A jump of the system's wall clock therefore never changes a
//! decision.

use std::fmt;

use parking_lot::Mutex;

use crate::time::wall::{timedelta_micros, WallTime};

/// A monotonic reading in nanoseconds. Integer nanoseconds keep due times exact
/// and totally ordered (`advance(0.1)` ten times is exactly one second).
pub type MonoNanos = u64;

/// Both readings of a clock, taken together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub mono: MonoNanos,
    pub wall: WallTime,
}

pub trait Clock: Send + Sync + fmt::Debug {
    fn monotonic(&self) -> MonoNanos;
    fn wall(&self) -> WallTime;
    fn now(&self) -> Now {
        Now {
            mono: self.monotonic(),
            wall: self.wall(),
        }
    }
}

/// Seconds as a whole number of nanoseconds, saturating (a delay beyond ~584
/// years is "never" for every practical purpose).
pub fn seconds_to_nanos(seconds: f64) -> MonoNanos {
    if seconds.is_nan() || seconds <= 0.0 {
        0
    } else {
        // `as` saturates at u64::MAX for huge values.
        (seconds * 1e9).round() as u64
    }
}

pub fn nanos_to_seconds(nanos: MonoNanos) -> f64 {
    nanos as f64 / 1e9
}

/// The operating system's clocks: `CLOCK_MONOTONIC` (Python's `time.monotonic()`)
/// and the local time of `CLOCK_REALTIME` (Python's `datetime.now()`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn monotonic(&self) -> MonoNanos {
        sys::monotonic_nanos()
    }

    fn wall(&self) -> WallTime {
        sys::local_now()
    }
}

/// A clock for tests: both readings move only when [`ManualClock::advance`] is
/// called. [`ManualClock::set_wall`] moves the wall reading alone, to play a
/// system clock jump.
#[derive(Debug)]
pub struct ManualClock {
    state: Mutex<Now>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InvalidAdvance(pub f64);

impl ManualClock {
    pub fn new(start: WallTime) -> Self {
        ManualClock {
            state: Mutex::new(Now {
                mono: 0,
                wall: start,
            }),
        }
    }

    /// Moves both readings forward by `seconds` (finite, >= 0).
    pub fn advance(&self, seconds: f64) -> Result<(), InvalidAdvance> {
        if !seconds.is_finite() || seconds < 0.0 {
            return Err(InvalidAdvance(seconds));
        }
        let mut state = self.state.lock();
        state.mono = state.mono.saturating_add(seconds_to_nanos(seconds));
        state.wall = state.wall.saturating_add_micros(timedelta_micros(seconds));
        Ok(())
    }

    pub fn set_wall(&self, wall: WallTime) {
        self.state.lock().wall = wall;
    }
}

impl Clock for ManualClock {
    fn monotonic(&self) -> MonoNanos {
        self.state.lock().mono
    }

    fn wall(&self) -> WallTime {
        self.state.lock().wall
    }

    fn now(&self) -> Now {
        *self.state.lock()
    }
}

#[cfg(unix)]
mod sys {
    use crate::time::wall::WallTime;

    pub fn monotonic_nanos() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    }

    /// CPython's `datetime.now()`: the real-time clock floored to microseconds,
    /// broken down by `localtime_r`, a leap second folded into second 59.
    pub fn local_now() -> WallTime {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since_epoch.as_secs() as i64;
        let micros = since_epoch.subsec_micros();
        // Local time only changes offset at a whole second, so one
        // `localtime_r` per second (and thread) is enough.
        thread_local! {
            static SECOND: std::cell::Cell<Option<(i64, WallTime)>> =
                const { std::cell::Cell::new(None) };
        }
        let start = match SECOND.get() {
            Some((cached, start)) if cached == secs => start,
            _ => {
                let start = local_second(secs);
                SECOND.set(Some((secs, start)));
                start
            }
        };
        start.saturating_add_micros(i64::from(micros))
    }

    /// The local time at the start of the Unix second `secs`.
    fn local_second(secs: i64) -> WallTime {
        let micros = 0;
        let secs = secs as libc::time_t;
        // SAFETY: `tm` is plain old data, fully written by a successful localtime_r.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let converted = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
        if !converted {
            return from_utc(secs as i64, micros);
        }
        let parts = crate::time::wall::DateTimeParts {
            year: tm.tm_year + 1900,
            month: (tm.tm_mon + 1) as u8,
            day: tm.tm_mday as u8,
            hour: tm.tm_hour as u8,
            minute: tm.tm_min as u8,
            second: tm.tm_sec.min(59) as u8,
            microsecond: micros,
        };
        WallTime::from_parts(parts).unwrap_or_else(|| from_utc(secs as i64, micros))
    }

    fn from_utc(secs: i64, micros: u32) -> WallTime {
        WallTime::from_unix_days(secs.div_euclid(86_400), secs.rem_euclid(86_400), micros)
            .unwrap_or(WallTime::MAX)
    }
}

#[cfg(not(unix))]
mod sys {
    use crate::time::wall::WallTime;
    use std::sync::OnceLock;
    use std::time::Instant;

    pub fn monotonic_nanos() -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    /// Without `localtime_r` the wall reading is UTC; only reports are affected.
    pub fn local_now() -> WallTime {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since_epoch.as_secs() as i64;
        WallTime::from_unix_days(
            secs.div_euclid(86_400),
            secs.rem_euclid(86_400),
            since_epoch.subsec_micros(),
        )
        .unwrap_or(WallTime::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::wall::DateTimeParts;

    fn start() -> WallTime {
        WallTime::from_parts(DateTimeParts {
            year: 2024,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
            microsecond: 0,
        })
        .unwrap()
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(start());
        assert_eq!(clock.now(), clock.now());
        clock.advance(1.5).unwrap();
        assert_eq!(clock.monotonic(), 1_500_000_000);
        assert_eq!(clock.wall().micros() - start().micros(), 1_500_000);
    }

    #[test]
    fn small_steps_add_up_exactly() {
        let clock = ManualClock::new(start());
        for _ in 0..10 {
            clock.advance(0.1).unwrap();
        }
        assert_eq!(clock.monotonic(), 1_000_000_000);
    }

    #[test]
    fn bad_advances_are_rejected_without_moving() {
        let clock = ManualClock::new(start());
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(clock.advance(bad).is_err());
        }
        assert_eq!(clock.now().mono, 0);
        assert_eq!(clock.wall(), start());
    }

    #[test]
    fn wall_jump_leaves_monotonic_alone() {
        let clock = ManualClock::new(start());
        clock.set_wall(WallTime::MIN);
        assert_eq!(clock.monotonic(), 0);
        assert_eq!(clock.wall(), WallTime::MIN);
    }

    #[test]
    fn system_clock_readings_are_sane() {
        let clock = SystemClock;
        let a = clock.monotonic();
        let b = clock.monotonic();
        assert!(b >= a);
        assert!(clock.wall().parts().year >= 2020);
    }

    #[test]
    fn seconds_convert_to_nanos_saturating() {
        assert_eq!(seconds_to_nanos(1.0), 1_000_000_000);
        assert_eq!(seconds_to_nanos(-3.0), 0);
        assert_eq!(seconds_to_nanos(1e300), u64::MAX);
        assert_eq!(nanos_to_seconds(2_500_000_000), 2.5);
    }
}
