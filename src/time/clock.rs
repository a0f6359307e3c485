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

/// A monotonic reading that may be behind the exact one, by at most `max_lag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaggingReading {
    pub at: MonoNanos,
    pub max_lag: MonoNanos,
}

impl LaggingReading {
    /// Whether `time` is certainly still ahead of the exact clock.
    pub fn is_before(self, time: MonoNanos) -> bool {
        self.at.saturating_add(self.max_lag) < time
    }

    /// Whether `time` has certainly come: the exact clock is never behind
    /// the lagging one.
    pub fn has_reached(self, time: MonoNanos) -> bool {
        self.at >= time
    }
}

pub trait Clock: Send + Sync + fmt::Debug {
    fn monotonic(&self) -> MonoNanos;
    fn wall(&self) -> WallTime;
    /// The monotonic clock where reading it is cheaper, possibly behind
    /// `monotonic()`: enough to tell that a time far enough ahead has not
    /// come (a task still backing off), with `monotonic()` read only near
    /// it. By default the exact reading.
    fn monotonic_lagging(&self) -> LaggingReading {
        LaggingReading {
            at: self.monotonic(),
            max_lag: 0,
        }
    }
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
        let nanos = seconds * 1e9;
        // Whole nanoseconds (any delay in whole milliseconds) need no
        // rounding: `round` is a library call on x86-64.
        if nanos < 9.0e18 && (nanos as u64) as f64 == nanos {
            return nanos as u64;
        }
        // `as` saturates at u64::MAX for huge values.
        nanos.round() as u64
    }
}

pub fn nanos_to_seconds(nanos: MonoNanos) -> f64 {
    nanos as f64 / 1e9
}

/// The operating system's clocks, read as CPython reads them: the monotonic
/// clock of `time.monotonic()` and the local time of `datetime.now()`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn monotonic(&self) -> MonoNanos {
        sys::monotonic_nanos()
    }

    fn wall(&self) -> WallTime {
        sys::local_now()
    }

    fn monotonic_lagging(&self) -> LaggingReading {
        sys::monotonic_coarse().unwrap_or_else(|| LaggingReading {
            at: sys::monotonic_nanos(),
            max_lag: 0,
        })
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

/// The system clocks as CPython reads them, so that `SystemClock` agrees with
/// `time.monotonic()` and `datetime.now()` on every platform.
mod sys {
    use crate::time::wall::WallTime;

    #[cfg(unix)]
    fn read_timespec(clock: libc::clockid_t) -> libc::timespec {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock always exists.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts
    }

    /// A clock that never reads before 1970 (monotonic ones), in nanoseconds.
    #[cfg(unix)]
    fn read(clock: libc::clockid_t) -> u64 {
        let ts = read_timespec(clock);
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    }

    /// Linux's `CLOCK_MONOTONIC_COARSE`: the monotonic clock as of the
    /// kernel's last timekeeping update, read from memory the kernel shares
    /// (no counter read: about 6 ns against 27-34 ns for `CLOCK_MONOTONIC`
    /// on this machine kind, a quarter of a `should_retry` call). It is
    /// never ahead of `CLOCK_MONOTONIC`; it lags by up to about a tick and a
    /// half (6.1 ms measured here with 4 ms ticks, loaded or not). The bound
    /// allows two ticks and 20 ms more, for an update that comes late (a VM
    /// whose timekeeping CPU the host holds back): a decision taken from it
    /// can only be late, never early.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub fn monotonic_coarse() -> Option<super::LaggingReading> {
        use std::sync::atomic::{AtomicU64, Ordering};
        // 0: not known yet (computed once; two threads may both compute it).
        static MAX_LAG: AtomicU64 = AtomicU64::new(0);
        let mut max_lag = MAX_LAG.load(Ordering::Relaxed);
        if max_lag == 0 {
            let mut res = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `res` is a valid, writable timespec.
            if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
                return None;
            }
            let tick = (res.tv_sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(res.tv_nsec as u64);
            max_lag = tick.saturating_mul(2).saturating_add(20_000_000);
            MAX_LAG.store(max_lag, Ordering::Relaxed);
        }
        Some(super::LaggingReading {
            at: read(libc::CLOCK_MONOTONIC_COARSE),
            max_lag,
        })
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub fn monotonic_coarse() -> Option<super::LaggingReading> {
        None
    }

    /// `time.monotonic()` in nanoseconds: `CLOCK_MONOTONIC` on Linux and
    /// the BSDs; `CLOCK_UPTIME_RAW` on Apple systems (CPython reads
    /// `mach_absolute_time()`, which stops while the machine sleeps, unlike
    /// Apple's `CLOCK_MONOTONIC`).
    #[cfg(unix)]
    pub fn monotonic_nanos() -> u64 {
        #[cfg(target_vendor = "apple")]
        const CLOCK: libc::clockid_t = libc::CLOCK_UPTIME_RAW;
        #[cfg(not(target_vendor = "apple"))]
        const CLOCK: libc::clockid_t = libc::CLOCK_MONOTONIC;
        read(CLOCK)
    }

    /// `time.monotonic()` on Windows: `QueryPerformanceCounter` from
    /// CPython 3.13, `GetTickCount64` (milliseconds) before.
    #[cfg(windows)]
    pub fn monotonic_nanos() -> u64 {
        #[cfg(Py_3_13)]
        {
            use windows_sys::Win32::System::Performance::{
                QueryPerformanceCounter, QueryPerformanceFrequency,
            };
            let (mut ticks, mut frequency) = (0i64, 0i64);
            // SAFETY: both are valid, writable i64s; neither call fails on
            // Windows XP and later.
            unsafe {
                QueryPerformanceCounter(&mut ticks);
                QueryPerformanceFrequency(&mut frequency);
            }
            let nanos = i128::from(ticks) * 1_000_000_000 / i128::from(frequency.max(1));
            u64::try_from(nanos).unwrap_or(0)
        }
        #[cfg(not(Py_3_13))]
        {
            // SAFETY: no arguments, no failure.
            let millis = unsafe { windows_sys::Win32::System::SystemInformation::GetTickCount64() };
            millis.saturating_mul(1_000_000)
        }
    }

    /// Elsewhere: the standard library's monotonic clock, from the first read.
    #[cfg(not(any(unix, windows)))]
    pub fn monotonic_nanos() -> u64 {
        use std::sync::OnceLock;
        use std::time::Instant;
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    /// CPython's `datetime.now()`: the real-time clock floored to microseconds,
    /// broken down to local time by the C library, a leap second folded into
    /// second 59.
    pub fn local_now() -> WallTime {
        let (secs, micros) = real_time();
        // Local time only changes offset at a whole second, so one
        // conversion per second (and thread) is enough.
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

    /// The real-time clock: Unix seconds, and microseconds floored.
    #[cfg(unix)]
    fn real_time() -> (i64, u32) {
        // tv_nsec is in 0..10^9 also before 1970 (tv_sec then negative).
        let ts = read_timespec(libc::CLOCK_REALTIME);
        #[allow(clippy::unnecessary_cast)] // time_t is 32 bits on some targets
        (ts.tv_sec as i64, (ts.tv_nsec / 1_000) as u32)
    }

    #[cfg(not(unix))]
    fn real_time() -> (i64, u32) {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (since_epoch.as_secs() as i64, since_epoch.subsec_micros())
    }

    /// The local time at the start of the Unix second `secs`.
    fn local_second(secs: i64) -> WallTime {
        let Some(tm) = localtime(secs) else {
            return from_utc(secs, 0);
        };
        let parts = crate::time::wall::DateTimeParts {
            year: tm.tm_year + 1900,
            month: (tm.tm_mon + 1) as u8,
            day: tm.tm_mday as u8,
            hour: tm.tm_hour as u8,
            minute: tm.tm_min as u8,
            second: tm.tm_sec.min(59) as u8,
            microsecond: 0,
        };
        WallTime::from_parts(parts).unwrap_or_else(|| from_utc(secs, 0))
    }

    /// `localtime_r`, as CPython calls it on POSIX systems.
    #[cfg(unix)]
    fn localtime(secs: i64) -> Option<libc::tm> {
        let secs = secs as libc::time_t;
        // SAFETY: `tm` is plain old data, fully written by a successful call.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let converted = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
        converted.then_some(tm)
    }

    /// `localtime_s`, as CPython calls it on Windows.
    #[cfg(windows)]
    fn localtime(secs: i64) -> Option<libc::tm> {
        let secs = secs as libc::time_t;
        // SAFETY: `tm` is plain old data, fully written by a successful call.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let failed = unsafe { libc::localtime_s(&mut tm, &secs) };
        (failed == 0).then_some(tm)
    }

    /// Without a C library's local time: UTC (only reports are affected).
    #[cfg(not(any(unix, windows)))]
    fn localtime(_secs: i64) -> Option<libc::tm> {
        None
    }

    fn from_utc(secs: i64, micros: u32) -> WallTime {
        WallTime::from_unix_days(secs.div_euclid(86_400), secs.rem_euclid(86_400), micros)
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
    fn the_lagging_reading_is_never_ahead_nor_further_behind_than_it_says() {
        for _ in 0..1000 {
            let lagging = SystemClock.monotonic_lagging();
            let exact = SystemClock.monotonic();
            assert!(lagging.at <= exact, "{lagging:?} ahead of {exact}");
            assert!(
                exact - lagging.at <= lagging.max_lag,
                "{lagging:?}, {exact}"
            );
        }
        // A time just past the bound is not certain to be ahead; one beyond is.
        let r = LaggingReading { at: 10, max_lag: 5 };
        assert!(!r.is_before(15));
        assert!(r.is_before(16));
        assert!(!LaggingReading {
            at: u64::MAX,
            max_lag: 5
        }
        .is_before(u64::MAX));
    }

    #[test]
    fn a_manual_clock_lags_by_nothing() {
        let clock = ManualClock::new(start());
        clock.advance(2.0).unwrap();
        assert_eq!(
            clock.monotonic_lagging(),
            LaggingReading {
                at: 2_000_000_000,
                max_lag: 0
            }
        );
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
        assert_eq!(seconds_to_nanos(f64::INFINITY), u64::MAX);
        assert_eq!(seconds_to_nanos(0.1), 100_000_000);
        assert_eq!(seconds_to_nanos(1.5e-9), 2); // not whole: rounded
        assert_eq!(seconds_to_nanos(2.5e-9), 3); // half away from zero
        assert_eq!(seconds_to_nanos(8.9e9), 8_900_000_000_000_000_000);
        assert_eq!(nanos_to_seconds(2_500_000_000), 2.5);
    }
}
