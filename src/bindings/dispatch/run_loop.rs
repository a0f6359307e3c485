//! The background loop's control: which run of the loop is current, waking
//! it early, and waking `stop()` when runners finish.
//!
//! Built on `std::sync` (futexes on Linux), not parking_lot, on purpose:
//! these are the only locks threads wait on with the GIL released, so a
//! thread may be inside one when another forks. parking_lot parks through a
//! process-wide table whose bucket locks a vanished thread can hold in the
//! child; a futex is a word of this object's own. A forked child replaces
//! its dispatchers' controls instead of touching the old ones.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Instant;

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
    /// Bumped when there may be work for a pass now: capacity freed (a
    /// runner finished) or a task source has new tasks.
    work: u64,
    /// Bumped by every decision while `stop()` waits for runners.
    changes: u64,
    thread: Option<Py<PyAny>>,
}

#[derive(Default)]
pub struct LoopControl {
    /// `start()` and `stop()` one at a time.
    pub serial: Serial,
    control: Mutex<Control>,
    wake: Condvar,
    changed: Condvar,
    /// Threads in `wait_for_change`: decisions notify only when some wait.
    change_waiters: AtomicUsize,
}

impl LoopControl {
    fn lock(&self) -> MutexGuard<'_, Control> {
        // Nothing panics while holding it; a poisoned lock is still whole.
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new run of the loop; returns its generation.
    pub fn begin(&self) -> u64 {
        let mut c = self.lock();
        c.generation += 1;
        c.generation
    }

    /// Keeps the thread of the current run, for `stop()` to join. Returns the
    /// previous one, to be dropped by the caller outside the lock.
    pub fn set_thread(&self, thread: Option<Py<PyAny>>) -> Option<Py<PyAny>> {
        std::mem::replace(&mut self.lock().thread, thread)
    }

    /// Ends the current run and wakes it; hands back its thread.
    pub fn end(&self) -> Option<Py<PyAny>> {
        let mut c = self.lock();
        c.generation += 1;
        self.wake.notify_all();
        c.thread.take()
    }

    /// In a forked child: the thread, if the lock is free (else it stays,
    /// leaked with this control, rather than risk waiting forever).
    pub fn take_thread_after_fork(&self) -> Option<Py<PyAny>> {
        match self.control.try_lock() {
            Ok(mut c) => c.thread.take(),
            Err(_) => None,
        }
    }

    /// Wakes a sleeping loop so it looks again at the `running` flag and at
    /// when the next retry is due.
    pub fn nudge(&self) {
        let mut c = self.lock();
        c.nudges = c.nudges.wrapping_add(1);
        self.wake.notify_all();
    }

    /// Asks the loop for a pass now (it is not lost if the loop is busy: the
    /// loop compares the count it saw before its pass).
    pub fn wake_for_work(&self) {
        let mut c = self.lock();
        c.work = c.work.wrapping_add(1);
        self.wake.notify_all();
    }

    /// The nudge and work counts, to pass to `sleep_until`.
    pub fn seen(&self) -> Seen {
        let c = self.lock();
        Seen {
            nudges: c.nudges,
            work: c.work,
        }
    }

    pub fn is_current(&self, generation: u64) -> bool {
        self.lock().generation == generation
    }

    /// Sleeps until `deadline`, the run's end or a nudge after the count
    /// `seen`. Call with the GIL released.
    pub fn sleep_until(&self, generation: u64, seen: Seen, deadline: Instant) -> Wake {
        let mut c = self.lock();
        loop {
            if c.generation != generation {
                return Wake::Ended;
            }
            if c.work != seen.work {
                return Wake::Work;
            }
            if c.nudges != seen.nudges {
                return Wake::Nudged;
            }
            let now = Instant::now();
            if now >= deadline {
                return Wake::TimedOut;
            }
            c = self
                .wake
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// After a decision: wakes `stop()` if it waits for runners.
    pub fn changed(&self) {
        if self.change_waiters.load(Ordering::SeqCst) > 0 {
            let mut c = self.lock();
            c.changes = c.changes.wrapping_add(1);
            self.changed.notify_all();
        }
    }

    /// Waits until `done()` holds or `deadline` passes; returns `done()`.
    /// Call with the GIL released.
    pub fn wait_for_change(&self, deadline: Instant, done: impl Fn() -> bool) -> bool {
        self.change_waiters.fetch_add(1, Ordering::SeqCst);
        let mut c = self.lock();
        let result = loop {
            let seen = c.changes;
            // Checked with our lock held: a decision that lands now bumps
            // `changes` after this check, so its wake is not lost.
            if done() {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            while c.changes == seen {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                c = self
                    .changed
                    .wait_timeout(c, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        drop(c);
        self.change_waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// Lets one thread at a time through `start()`/`stop()`; a nested call from
/// the same thread (a port calling `stop()` during `stop()`) passes at once.
#[derive(Default)]
pub struct Serial {
    owner: Mutex<Option<ThreadId>>,
    free: Condvar,
}

pub struct SerialGuard<'a>(&'a Serial);

impl Drop for SerialGuard<'_> {
    fn drop(&mut self) {
        *self.0.lock() = None;
        self.0.free.notify_all();
    }
}

impl Serial {
    fn lock(&self) -> MutexGuard<'_, Option<ThreadId>> {
        self.owner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters, waiting with the GIL released while another thread is
    /// inside. None when this thread is inside already.
    pub fn enter(&self, py: Python<'_>) -> Option<SerialGuard<'_>> {
        let me = std::thread::current().id();
        {
            let mut owner = self.lock();
            if *owner == Some(me) {
                return None;
            }
            if owner.is_none() {
                *owner = Some(me);
                return Some(SerialGuard(self));
            }
        }
        py.detach(|| {
            let mut owner = self.lock();
            while owner.is_some() {
                owner = self.free.wait(owner).unwrap_or_else(|e| e.into_inner());
            }
            *owner = Some(me);
        });
        Some(SerialGuard(self))
    }
}

/// The counts a loop saw, for `sleep_until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub nudges: u64,
    pub work: u64,
}

/// Why a loop's sleep ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// `stop()` ended this run of the loop.
    Ended,
    TimedOut,
    /// Something changed (a retry was scheduled, `running` was set).
    Nudged,
    /// There may be work for a pass now.
    Work,
}
