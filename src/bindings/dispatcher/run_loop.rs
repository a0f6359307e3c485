//! The background loop's control: which run of the loop is current, and
//! waking it early when it is asked to stop.

use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;

#[derive(Default)]
struct Control {
    /// Bumped by every start and stop; a loop runs while its generation is
    /// the current one, so a late-finishing old loop never outlives a stop.
    generation: u64,
    /// Bumped by every nudge, so one that comes while the loop is not yet
    /// asleep is not lost: the loop compares it with what it saw before
    /// computing how long to sleep.
    nudges: u64,
    thread: Option<Py<PyAny>>,
}

#[derive(Default)]
pub struct LoopControl {
    control: Mutex<Control>,
    wake: Condvar,
}

impl LoopControl {
    /// A new run of the loop; returns its generation.
    pub fn begin(&self) -> u64 {
        let mut c = self.control.lock();
        c.generation += 1;
        c.generation
    }

    /// Keeps the thread of the current run, for `stop()` to join. Returns the
    /// previous one, to be dropped by the caller outside the lock.
    pub fn set_thread(&self, thread: Option<Py<PyAny>>) -> Option<Py<PyAny>> {
        std::mem::replace(&mut self.control.lock().thread, thread)
    }

    /// Ends the current run and wakes it; hands back its thread.
    pub fn end(&self) -> Option<Py<PyAny>> {
        let mut c = self.control.lock();
        c.generation += 1;
        self.wake.notify_all();
        c.thread.take()
    }

    /// Wakes a sleeping loop so it looks again at the `running` flag and at
    /// when the next retry is due.
    pub fn nudge(&self) {
        let mut c = self.control.lock();
        c.nudges = c.nudges.wrapping_add(1);
        self.wake.notify_all();
    }

    /// The nudge count, to pass to `sleep_until`.
    pub fn nudges(&self) -> u64 {
        self.control.lock().nudges
    }

    pub fn is_current(&self, generation: u64) -> bool {
        self.control.lock().generation == generation
    }

    /// Sleeps until `deadline`, the run's end or a nudge after the count
    /// `seen`. Call with the GIL released.
    pub fn sleep_until(&self, generation: u64, seen: u64, deadline: Instant) -> Wake {
        let mut c = self.control.lock();
        if c.generation != generation {
            return Wake::Ended;
        }
        if c.nudges != seen {
            return Wake::Nudged;
        }
        let timed_out = self.wake.wait_until(&mut c, deadline).timed_out();
        if c.generation != generation {
            Wake::Ended
        } else if timed_out {
            Wake::TimedOut
        } else {
            Wake::Nudged
        }
    }
}

/// Why a loop's sleep ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// `stop()` ended this run of the loop.
    Ended,
    TimedOut,
    /// Something changed (a retry was scheduled, `running` was set).
    Nudged,
}
