//! Starting and stopping: the background loop, `start()`/`stop()` one at a
//! time, and the process around them — interpreter exit, `fork()`, Ctrl-C.
//!
//! - The loop's thread holds its dispatcher by a weak reference between
//!   passes, so a dispatcher dropped while running ends its loop.
//! - At interpreter exit an `atexit` hook ends every loop and joins its
//!   thread, so no loop is inside a Rust frame when CPython finalises (a
//!   daemon thread ended there would abort the process).
//! - In a forked child every dispatcher is stopped, its locks free.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyWeakrefMethods, PyWeakrefReference};

use super::ports::KnownTexts;
use super::run_loop::{LoopControl, Seen, Wake};
use super::{PyDispatcherCore, LOG_TARGET};
use crate::dispatch::state::Effect;

/// `stop()` wakes at least this often to let signal handlers run.
const STOP_SLICE: Duration = Duration::from_millis(50);

/// Dispatchers that were started, by weak reference: the exit and fork hooks
/// visit them.
static STARTED: Mutex<Vec<Py<PyWeakrefReference>>> = Mutex::new(Vec::new());

/// The loop thread's target: passes of `tick()` until its run ends. It holds
/// its dispatcher only during a pass.
#[pyclass(module = "necrocode_dispatch._core", name = "_DispatchLoop", frozen)]
pub struct DispatchLoop {
    dispatcher: Py<PyWeakrefReference>,
    control: std::sync::Arc<LoopControl>,
    generation: u64,
}

#[pymethods]
impl DispatchLoop {
    /// Runs until `stop()`, the dispatcher is dropped, or a port raises
    /// Ctrl-C or `SystemExit`: a pass, then sleep until the next poll or the
    /// next retry or redelivery due, whichever is sooner.
    fn __call__(&self, py: Python<'_>) {
        let mut next_poll: Option<Instant> = None;
        let mut next_deadlock_check: Option<Instant> = None;
        // The work count as of the last pass: work asked for since (even
        // during that pass) brings another pass.
        let mut work_seen = self.control.seen().work;
        loop {
            let Ok(Some(dispatcher)) = self.dispatcher.bind(py).upgrade_as::<PyDispatcherCore>()
            else {
                return;
            };
            let this = dispatcher.get();
            if !this.running() || !self.control.is_current(self.generation) {
                return;
            }
            let now = Instant::now();
            if next_poll.is_none_or(|at| at <= now) {
                work_seen = self.control.seen().work;
                if let Err(e) = this.tick_once(py) {
                    log::error!(target: LOG_TARGET, "the dispatch loop ends: {e}");
                    this.running.store(false, Ordering::SeqCst);
                    return;
                }
                next_poll = Instant::now().checked_add(this.poll_interval(py));
                if next_deadlock_check.is_none_or(|at| at <= Instant::now()) {
                    // As NecroCode's loop does (every 60 s by default).
                    if let Err(e) = this.check_deadlocks(py) {
                        log::error!(target: LOG_TARGET, "checking for dependency cycles failed: {e}");
                    }
                    let every = this
                        .config_seconds(py, "deadlock_check_interval", 60.0)
                        .unwrap_or(60.0)
                        .max(0.001);
                    next_deadlock_check =
                        Instant::now().checked_add(Duration::from_secs_f64(every));
                }
            }
            let seen = Seen {
                nudges: self.control.seen().nudges,
                work: work_seen,
            };
            let now = Instant::now();
            let poll_in = next_poll.map_or(Duration::MAX, |t| t.saturating_duration_since(now));
            let retry_in = this.until_next_retry();
            drop(dispatcher);
            let wait = poll_in.min(retry_in);
            if wait.is_zero() {
                next_poll = None;
                continue;
            }
            let deadline = now
                .checked_add(wait)
                .unwrap_or(now + Duration::from_secs(86_400));
            let control = &self.control;
            match py.detach(|| control.sleep_until(self.generation, seen, deadline)) {
                Wake::Ended => return,
                // A retry or redelivery may be due: pass now.
                Wake::TimedOut if retry_in <= poll_in => next_poll = None,
                Wake::Work => next_poll = None,
                Wake::TimedOut | Wake::Nudged => {}
            }
        }
    }
}

/// Given to a task source that has `set_waker(callback)`: calling it asks the
/// loop for a pass now (the source has new tasks). It holds the loop's
/// control only, not the dispatcher.
#[pyclass(module = "necrocode_dispatch._core", name = "_Waker", frozen)]
pub struct Waker {
    control: std::sync::Arc<LoopControl>,
}

#[pymethods]
impl Waker {
    fn __call__(&self) {
        self.control.wake_for_work();
    }
}

impl PyDispatcherCore {
    /// After an outcome that freed capacity: the loop passes now instead of
    /// waiting out its poll interval.
    pub(super) fn wake_for_capacity(&self) {
        if self.running() {
            self.run_loop().wake_for_work();
        }
    }

    /// Hands the task source a waker, if it takes one.
    fn give_waker(&self, py: Python<'_>, control: &std::sync::Arc<LoopControl>) -> PyResult<()> {
        let source = self.port(py, |p| &p.task_source).into_bound(py);
        if !source.is_none() && source.hasattr("set_waker")? {
            let waker = Bound::new(
                py,
                Waker {
                    control: control.clone(),
                },
            )?;
            source.call_method1("set_waker", (waker,))?;
        }
        Ok(())
    }

    /// `config.poll_interval`, checked when the config was set; a config
    /// changed since to something invalid polls every 5 s (logged).
    fn poll_interval(&self, py: Python<'_>) -> Duration {
        match self.config_seconds(py, "poll_interval", 5.0) {
            Ok(s) if s > 0.0 => Duration::from_secs_f64(s),
            Ok(s) => {
                log::error!(target: LOG_TARGET, "config.poll_interval must be > 0, got {s}; polling every 5 s");
                Duration::from_secs(5)
            }
            Err(e) => {
                log::error!(target: LOG_TARGET, "{e}; polling every 5 s");
                Duration::from_secs(5)
            }
        }
    }

    pub(super) fn start_loop(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let control = this.run_loop();
        let Some(_serial) = control.serial.enter(py) else {
            return Ok(()); // start() from a port during start()/stop()
        };
        if this.running.load(Ordering::SeqCst) {
            log::warn!(target: LOG_TARGET, "the dispatcher is already running");
            return Ok(());
        }
        remember_started(slf)?;
        this.give_waker(py, &control)?;
        let can_run = {
            let mut state = this.state.lock();
            state.resume();
            let any = state
                .pools()
                .iter()
                .any(|(_, p)| p.enabled && p.max_concurrency > 0);
            any
        };
        if !can_run {
            // A `DispatcherConfig()` has no pools: say so rather than idle.
            log::warn!(
                target: LOG_TARGET,
                "started with no enabled agent pool that can run a task (config.agent_pools): nothing will be assigned"
            );
        }
        let generation = control.begin();
        this.running.store(true, Ordering::SeqCst);
        let started = (|| -> PyResult<()> {
            let target = Bound::new(
                py,
                DispatchLoop {
                    dispatcher: PyWeakrefReference::new(slf.as_any())?.unbind(),
                    control: control.clone(),
                    generation,
                },
            )?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("target", target)?;
            kwargs.set_item("name", "necrocode-dispatch-loop")?;
            kwargs.set_item("daemon", true)?;
            let thread = py
                .import("threading")?
                .getattr("Thread")?
                .call((), Some(&kwargs))?;
            drop(control.set_thread(Some(thread.clone().unbind())));
            thread.call_method0("start")?;
            Ok(())
        })();
        if let Err(e) = started {
            this.running.store(false, Ordering::SeqCst);
            drop(control.end());
            return Err(e);
        }
        log::info!(target: LOG_TARGET, "dispatcher started");
        Ok(())
    }

    /// Ends the loop's run and joins its thread (unless called from it).
    fn end_loop(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(thread) = self.run_loop().end() {
            let thread = thread.into_bound(py);
            let current = py.import("threading")?.call_method0("current_thread")?;
            // stop() called from a port inside the loop: it ends on its own.
            if !thread.is(&current) {
                thread.call_method0("join")?;
            }
        }
        Ok(())
    }

    /// `stop()`: see the method's doc. One at a time: a concurrent call
    /// waits, then finds the dispatcher stopped.
    pub(super) fn stop_loop(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let control = self.run_loop();
        let Some(_serial) = control.serial.enter(py) else {
            return Ok(()); // stop() from a port during stop()
        };
        if !self.running.swap(false, Ordering::SeqCst) {
            log::warn!(target: LOG_TARGET, "the dispatcher is not running");
            return Ok(());
        }
        self.state.lock().stop_assigning();
        let result = self.end_loop(py).and_then(|()| {
            let deadline = Instant::now().checked_add(Duration::from_secs_f64(timeout));
            self.wait_for_runners_in_slices(py, deadline)
        });
        // Whether the wait ran out or was interrupted, what still runs is
        // stopped on the way out.
        let mut forced = 0;
        let forcing = self.settle(py, KnownTexts::default(), |state, _, now| {
            let outcome = state.force_stop(now);
            forced = outcome
                .effects
                .iter()
                .filter(|e| matches!(e, Effect::StopRunner { .. }))
                .count();
            outcome
        });
        if forced > 0 {
            log::warn!(target: LOG_TARGET, "forced {forced} runner(s) to stop");
        }
        // A last try for reports still waiting; what stays is in snapshot().
        let delivered = self.deliver_pending(py, true);
        log::info!(target: LOG_TARGET, "dispatcher stopped");
        result.and(forcing).and(delivered).map(drop)
    }

    /// Waits until no runner runs or `deadline` passes, in short slices with
    /// the GIL released; between slices signal handlers run (a Ctrl-C
    /// comes out as the error) and due redeliveries are made.
    fn wait_for_runners_in_slices(
        &self,
        py: Python<'_>,
        deadline: Option<Instant>,
    ) -> PyResult<()> {
        loop {
            let now = Instant::now();
            let mut slice = now + STOP_SLICE;
            if let Some(d) = deadline {
                slice = slice.min(d);
            }
            if py.detach(|| self.wait_for_runners(slice)) {
                return Ok(());
            }
            py.check_signals()?;
            self.deliver_pending(py, false)?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
        }
    }

    /// At exit or in a forked child: the loop ends, nothing waits.
    fn abandon_loop(&self) -> Option<Py<PyAny>> {
        self.running.store(false, Ordering::SeqCst);
        self.run_loop().end()
    }
}

impl Drop for PyDispatcherCore {
    fn drop(&mut self) {
        // A dispatcher dropped while running: its loop ends at its next wake.
        drop(self.abandon_loop());
    }
}

fn remember_started(dispatcher: &Bound<'_, PyDispatcherCore>) -> PyResult<()> {
    let py = dispatcher.py();
    let weak = PyWeakrefReference::new(dispatcher.as_any())?.unbind();
    let dead = {
        let mut started = STARTED.lock();
        let (live, dead): (Vec<_>, Vec<_>) = std::mem::take(&mut *started)
            .into_iter()
            .partition(|w| w.bind(py).upgrade().is_some());
        *started = live;
        if !started
            .iter()
            .any(|w| w.bind(py).upgrade().is_some_and(|d| d.is(dispatcher)))
        {
            started.push(weak);
        }
        dead
    };
    drop(dead); // after the lock: dropping may run Python code
    Ok(())
}

fn started_dispatchers(py: Python<'_>) -> Vec<Bound<'_, PyDispatcherCore>> {
    let refs: Vec<Py<PyWeakrefReference>> =
        STARTED.lock().iter().map(|w| w.clone_ref(py)).collect();
    refs.iter()
        .filter_map(|w| w.bind(py).upgrade_as::<PyDispatcherCore>().ok().flatten())
        .collect()
}

/// The `atexit` hook: ends every running loop and joins its thread before
/// CPython finalises. A loop inside a port call finishes that call first.
#[pyfunction]
pub fn _stop_loops_at_exit(py: Python<'_>) {
    for dispatcher in started_dispatchers(py) {
        if let Some(thread) = dispatcher.get().abandon_loop() {
            if let Err(e) = thread.bind(py).call_method0("join") {
                log::debug!(target: LOG_TARGET, "joining a dispatch loop at exit: {e}");
            }
        }
    }
}

/// The `os.register_at_fork(after_in_child=...)` hook: the child holds
/// stopped dispatchers whose locks are free (their holders were threads
/// that the child does not have).
#[pyfunction]
pub fn _after_fork_in_child(py: Python<'_>) {
    for dispatcher in started_dispatchers(py) {
        let this = dispatcher.get();
        this.running.store(false, Ordering::SeqCst);
        this.unlock_after_fork();
        // A fresh control: the old one may have had waiters, now gone.
        let old = std::mem::take(&mut *this.run_loop.write());
        let thread = old.take_thread_after_fork();
        drop(old);
        drop(thread);
    }
}
