//! Delivering what the core decided (SPEC §9): the reports of a decision are
//! filed in the outbox under the same lock as the decision, then delivered
//! lane by lane with the lock released. A port that raises leaves its report
//! at the front of its lane for a retry with backoff; `KeyboardInterrupt`
//! and `SystemExit` do the same, then reach the caller.

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;

use super::ports::KnownTexts;
use super::{PyDispatcherCore, LOG_TARGET};
use crate::clock::Now;
use crate::dispatcher::{DispatcherState, Outcome};
use crate::retry_manager::log_failure;
use crate::retry_state::{RecordedFailure, RetryBook, TaskId};

/// Whether `err` is Ctrl-C or `sys.exit()`: let through, never swallowed.
pub fn is_interrupt(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PyKeyboardInterrupt>(py) || err.is_instance_of::<PySystemExit>(py)
}

impl PyDispatcherCore {
    /// Decides one outcome, files its reports and delivers them. Returns
    /// whether the outcome was applied.
    pub(super) fn settle<'a, 'py>(
        &self,
        py: Python<'py>,
        known: KnownTexts<'a, 'py>,
        decide: impl FnOnce(&mut DispatcherState<Py<PyAny>>, &mut RetryBook, Now) -> Outcome<Py<PyAny>>,
    ) -> PyResult<bool> {
        let (applied, failures, lanes) = self.decide(|state, book, now| {
            let outcome = decide(state, book, now);
            let filed = state.file(outcome.effects);
            (outcome.applied, outcome.failure, filed)
        });
        let (lanes, discards) = (lanes.lanes, lanes.discards);
        drop(discards);
        self.after_decision(py, failures.iter(), &lanes, known)?;
        Ok(applied)
    }

    /// [`Self::settle`] for several outcomes decided in one step. Returns how
    /// many were applied.
    pub(super) fn settle_all(
        &self,
        py: Python<'_>,
        decide: impl FnOnce(
            &mut DispatcherState<Py<PyAny>>,
            &mut RetryBook,
            Now,
        ) -> Vec<Outcome<Py<PyAny>>>,
    ) -> PyResult<usize> {
        let (applied, failures, filed) = self.decide(|state, book, now| {
            let mut applied = 0;
            let mut failures = Vec::new();
            let mut effects = Vec::new();
            for outcome in decide(state, book, now) {
                applied += usize::from(outcome.applied);
                failures.extend(outcome.failure);
                effects.extend(outcome.effects);
            }
            (applied, failures, state.file(effects))
        });
        drop(filed.discards);
        self.after_decision(py, failures.iter(), &filed.lanes, KnownTexts::default())?;
        Ok(applied)
    }

    fn after_decision<'a, 'py>(
        &self,
        py: Python<'py>,
        failures: impl Iterator<Item = &'a RecordedFailure>,
        lanes: &[TaskId],
        known: KnownTexts<'_, 'py>,
    ) -> PyResult<()> {
        let mut delayed = false;
        for failure in failures {
            log_failure(failure);
            delayed |= !failure.limit_reached;
        }
        if delayed && self.running() {
            // A retry is now delayed: the loop may have to wake sooner.
            self.run_loop().nudge();
        }
        self.deliver(py, lanes, known, false)
    }

    /// Delivers the pending reports of `lanes`, front first. A lane another
    /// thread is delivering is left to it (it picks up what was filed
    /// meanwhile); a lane waiting for a retry is left until then, unless
    /// `force`.
    pub(super) fn deliver(
        &self,
        py: Python<'_>,
        lanes: &[TaskId],
        known: KnownTexts<'_, '_>,
        force: bool,
    ) -> PyResult<()> {
        if lanes.is_empty() {
            return Ok(());
        }
        let ports = self.effect_ports(py, known);
        let mut interrupted = None;
        for task in lanes {
            loop {
                let taken = {
                    let now = self.clock.now().mono;
                    self.state.lock().take_reports(task, now, force)
                };
                let Some(mut reports) = taken else { break };
                let mut delivered = 0;
                let mut failed = None;
                while let Some(report) = reports.pop_front() {
                    match ports.perform(py, &report) {
                        Ok(()) => delivered += 1,
                        Err(failure) => {
                            reports.push_front(report);
                            failed = Some(failure);
                            break;
                        }
                    }
                }
                let more = {
                    let now = self.clock.now().mono;
                    self.state
                        .lock()
                        .finish_reports(task, delivered, reports, now)
                };
                if let Some(failure) = failed {
                    log::error!(
                        target: LOG_TARGET,
                        "{} failed (task {task:?}; delivered again later): {}",
                        failure.what,
                        failure.error
                    );
                    if self.running() {
                        self.run_loop().nudge();
                    }
                    if is_interrupt(py, &failure.error) {
                        interrupted.get_or_insert(failure.error);
                    }
                    break;
                }
                if !more {
                    break;
                }
            }
            if interrupted.is_some() {
                break;
            }
        }
        match interrupted {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Delivers the lanes whose retry is due (every waiting lane with
    /// `all`, ignoring their backoff).
    pub(super) fn deliver_pending(&self, py: Python<'_>, all: bool) -> PyResult<()> {
        let lanes = {
            let now = self.clock.now().mono;
            self.state.lock().lanes_to_deliver(now, all)
        };
        self.deliver(py, &lanes, KnownTexts::default(), all)
    }
}
