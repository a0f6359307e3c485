//! Delivering what the core decided (SPEC §9): the reports of a decision are
//! filed in the outbox under the same lock as the decision, then delivered
//! lane by lane with the lock released. A port that raises leaves its report
//! at the front of its lane for a retry with backoff; `KeyboardInterrupt`
//! and `SystemExit` do the same, then reach the caller.

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;

use super::ports::KnownTexts;
use super::{PyDispatcherCore, LOG_TARGET};
use crate::time::clock::Now;
use std::collections::VecDeque;

use crate::bindings::logging;
use crate::dispatch::state::{DispatcherState, Effect, Filing, Outcome};
use crate::retry::manager::{log_failure, LOG_TARGET as RETRY_LOG_TARGET};
use crate::retry::state::{RecordedFailure, RetryBook, TaskId};

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
        let (applied, failures, filing) = self.decide(|state, book, now| {
            let outcome = decide(state, book, now);
            // The usual case, one task with no reports waiting: they are
            // taken for delivery at once, saving a round trip through the lock.
            let filing = state.file_and_take(outcome.effects);
            (outcome.applied, outcome.failure, filing)
        });
        match filing {
            Filing::Taken {
                task,
                reports,
                discard,
            } => {
                drop(discard);
                self.note_failures(py, failures.iter());
                self.deliver_lane(py, &task, Some(reports), known, false)?;
            }
            Filing::Filed(filed) => {
                drop(filed.discards);
                self.note_failures(py, failures.iter());
                self.deliver(py, &filed.lanes, known, false)?;
            }
        }
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
        self.note_failures(py, failures.iter());
        self.deliver(py, &filed.lanes, KnownTexts::default(), false)?;
        Ok(applied)
    }

    /// Logs recorded failures (after the lock: logging runs Python code).
    fn note_failures<'a>(
        &self,
        py: Python<'_>,
        failures: impl Iterator<Item = &'a (TaskId, RecordedFailure)>,
    ) {
        let mut delayed = false;
        let verbose = logging::most_verbose(py, RETRY_LOG_TARGET);
        for (task_id, failure) in failures {
            log_failure(task_id, failure, verbose);
            delayed |= !failure.limit_reached;
        }
        if delayed && self.running() {
            // A retry is now delayed: the loop may have to wake sooner.
            self.run_loop().nudge();
        }
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
        let mut known = Some(known);
        for task in lanes {
            self.deliver_lane(py, task, None, known.take().unwrap_or_default(), force)?;
        }
        Ok(())
    }

    /// Delivers one lane until it is empty, waits for a retry, or another
    /// thread has it; `taken` are its reports when the caller took them.
    fn deliver_lane(
        &self,
        py: Python<'_>,
        task: &TaskId,
        mut taken: Option<VecDeque<Effect<Py<PyAny>>>>,
        known: KnownTexts<'_, '_>,
        force: bool,
    ) -> PyResult<()> {
        let ports = self.effect_ports(py, known);
        loop {
            let reports = match taken.take() {
                Some(reports) => Some(reports),
                None => {
                    let now = self.clock.monotonic();
                    self.state.lock().take_reports(task, now, force)
                }
            };
            let Some(mut reports) = reports else {
                return Ok(());
            };
            ports.start_batch();
            let mut delivered = 0;
            let mut failed = None;
            while let Some(mut report) = reports.pop_front() {
                match ports.perform(py, &mut report, &mut delivered) {
                    Ok(()) => {}
                    Err(failure) => {
                        reports.push_front(report);
                        failed = Some(failure);
                        break;
                    }
                }
            }
            // The clock matters only for a retry's due time.
            let now = if reports.is_empty() {
                0
            } else {
                self.clock.monotonic()
            };
            let more = self
                .state
                .lock()
                .finish_reports(task, delivered, reports, now);
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
                    return Err(failure.error);
                }
                return Ok(());
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Delivers the lanes whose retry is due (every waiting lane with
    /// `all`, ignoring their backoff).
    pub(super) fn deliver_pending(&self, py: Python<'_>, all: bool) -> PyResult<()> {
        let lanes = {
            let now = self.clock.monotonic();
            self.state.lock().lanes_to_deliver(now, all)
        };
        self.deliver(py, &lanes, KnownTexts::default(), all)
    }
}
