//! The thread-safe retry manager: a [`RetryBook`] behind one lock, a clock, and
//! logging.
//!
//! Every method reads the clock and updates the book under the lock, then logs
//! after releasing it: log records may reach Python handlers, and no outside code
//! runs while the lock is held.

use std::path::Path;
use std::sync::Arc;

use log::LevelFilter;
use parking_lot::{Mutex, MutexGuard};

use crate::persist;
use crate::retry::backoff::{BackoffPolicy, InvalidSetting, Setting};
use crate::retry::failure_policy::GiveUp;
use crate::retry::snapshot::{self as retry_snapshot, RetryState, SnapshotError};
use crate::retry::state::{
    BudgetStatus, RecordedFailure, RetryBook, RetryDecision, RetryOptions, RetrySnapshot, TaskId,
};
use crate::time::clock::{nanos_to_seconds, Clock, MonoNanos};

/// The log target; pyo3-log maps it to the Python logger
/// `necrocode_dispatch.retry_manager`.
pub const LOG_TARGET: &str = "necrocode_dispatch::retry_manager";

/// The seconds left until a due time, as a log message shows them: the clock
/// is read only if the message is written (the decision may have come from
/// its cheaper lagging reading).
struct SecondsUntil<'a> {
    due: MonoNanos,
    clock: &'a dyn Clock,
}

impl std::fmt::Display for SecondsUntil<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let left = self.due.saturating_sub(self.clock.monotonic());
        write!(f, "{:.1}", nanos_to_seconds(left))
    }
}

/// Why [`RetryManager::load`] failed.
#[derive(Debug)]
pub enum LoadError {
    Io(std::io::Error),
    Invalid(SnapshotError),
}

#[derive(Debug)]
pub struct RetryManager {
    clock: Arc<dyn Clock>,
    book: Mutex<RetryBook>,
}

impl RetryManager {
    pub fn new(policy: BackoffPolicy, clock: Arc<dyn Clock>) -> Self {
        Self::with_options(policy, RetryOptions::default(), clock)
    }

    pub fn with_options(
        policy: BackoffPolicy,
        options: RetryOptions,
        clock: Arc<dyn Clock>,
    ) -> Self {
        log::info!(
            target: LOG_TARGET,
            "RetryManager initialized: max_attempts={}, backoff_base={}, initial_delay={}s, max_delay={}s",
            policy.max_attempts(),
            policy.backoff_base(),
            policy.initial_delay(),
            policy.max_delay()
        );
        RetryManager {
            clock,
            book: Mutex::new(RetryBook::with_options(policy, options)),
        }
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The book itself, for callers (the dispatcher) that must combine several
    /// steps atomically. They must not run outside code while holding it.
    pub fn lock(&self) -> MutexGuard<'_, RetryBook> {
        self.book.lock()
    }

    /// In a forked child, frees the book's lock if a thread that the child
    /// does not have held it.
    ///
    /// # Safety
    /// Call only in a forked child, from the one thread it has, which must
    /// not hold the lock itself.
    pub unsafe fn force_unlock_after_fork(&self) {
        if self.book.is_locked() {
            self.book.force_unlock();
        }
    }

    pub fn policy(&self) -> BackoffPolicy {
        *self.book.lock().policy()
    }

    pub fn set_max_attempts(&self, max_attempts: u64) {
        let mut book = self.book.lock();
        let policy = book.policy().with_max_attempts(max_attempts);
        book.set_policy(policy);
    }

    /// Replaces one float setting; an invalid value changes nothing.
    pub fn set_float(&self, setting: Setting, value: f64) -> Result<(), InvalidSetting> {
        let mut book = self.book.lock();
        let policy = book.policy().with_float(setting, value)?;
        book.set_policy(policy);
        Ok(())
    }

    pub fn record_failure(&self, task_id: &str, failure_reason: Option<&str>) -> RecordedFailure {
        self.record_failure_logging(task_id, failure_reason, LevelFilter::Trace)
    }

    /// [`Self::record_failure`], making no log record more verbose than
    /// `most_verbose` (a caller that knows its logger drops them).
    pub fn record_failure_logging(
        &self,
        task_id: &str,
        failure_reason: Option<&str>,
        most_verbose: LevelFilter,
    ) -> RecordedFailure {
        let recorded = {
            let mut book = self.book.lock();
            let now = self.clock.now();
            book.record_failure(task_id, failure_reason, now)
        };
        log_failure(task_id, &recorded, most_verbose);
        recorded
    }

    pub fn should_retry(&self, task_id: &str) -> bool {
        self.should_retry_logging(task_id, LevelFilter::Trace)
    }

    /// [`Self::should_retry`], making no log record more verbose than
    /// `most_verbose`: its records are DEBUG, one per call that backs off.
    pub fn should_retry_logging(&self, task_id: &str, most_verbose: LevelFilter) -> bool {
        let decision = self.book.lock().retry_decision(task_id, &*self.clock);
        if most_verbose < LevelFilter::Debug {
            return decision.allowed();
        }
        match decision {
            RetryDecision::Retry => {}
            RetryDecision::LimitReached {
                retry_count,
                max_attempts,
            } => log::debug!(
                target: LOG_TARGET,
                "Task {task_id} has reached max retry attempts ({retry_count}/{max_attempts})"
            ),
            RetryDecision::GaveUp(why) => log::debug!(
                target: LOG_TARGET,
                "Task {task_id} is not retried: {}",
                why.explanation().unwrap_or("limit reached")
            ),
            RetryDecision::BackingOff { due } => log::debug!(
                target: LOG_TARGET,
                "Task {task_id} must wait {}s before retry",
                SecondsUntil {
                    due,
                    clock: &*self.clock
                }
            ),
        }
        decision.allowed()
    }

    pub fn retry_count(&self, task_id: &str) -> u64 {
        self.book.lock().retry_count(task_id)
    }

    pub fn info(&self, task_id: &str) -> Option<RetrySnapshot> {
        self.book.lock().info(task_id)
    }

    pub fn clear(&self, task_id: &str) -> bool {
        let cleared = self.book.lock().clear(task_id);
        if cleared {
            log::debug!(target: LOG_TARGET, "Cleared retry info for task {task_id}");
        }
        cleared
    }

    /// A task succeeded: its record is forgotten and the retry budget refilled.
    pub fn record_success(&self, task_id: &str) -> bool {
        let cleared = self.book.lock().record_success(task_id);
        if cleared {
            log::debug!(target: LOG_TARGET, "Cleared retry info for task {task_id} after its success");
        }
        cleared
    }

    pub fn options(&self) -> RetryOptions {
        self.book.lock().options().clone()
    }

    pub fn set_options(&self, options: RetryOptions) {
        self.book.lock().set_options(options);
    }

    /// The whole state, due times as wall-clock times.
    pub fn snapshot(&self) -> RetryState {
        let book = self.book.lock();
        retry_snapshot::capture(&book, self.clock.now())
    }

    /// Replaces every record with saved ones; nothing changes on error.
    pub fn restore(&self, state: &RetryState) -> Result<(), SnapshotError> {
        let mut book = self.book.lock();
        let now = self.clock.now();
        retry_snapshot::restore(&mut book, state, now)
    }

    /// Writes the state to `path` atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = retry_snapshot::to_json(&self.snapshot());
        persist::write_atomically(path, json.as_bytes())
    }

    /// Reads state saved by [`RetryManager::save`] and restores it.
    pub fn load(&self, path: &Path) -> Result<(), LoadError> {
        let bytes = std::fs::read(path).map_err(LoadError::Io)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            LoadError::Invalid(SnapshotError(
                "it is not a retry state: not UTF-8 text (a binary file?)".to_owned(),
            ))
        })?;
        let state = retry_snapshot::from_json(&text).map_err(LoadError::Invalid)?;
        self.restore(&state).map_err(LoadError::Invalid)
    }

    pub fn budget_status(&self) -> Option<BudgetStatus> {
        self.book.lock().budget_status()
    }

    pub fn all_info(&self) -> Vec<RetrySnapshot> {
        self.book.lock().all_info()
    }

    pub fn ready_for_retry(&self) -> Vec<TaskId> {
        let mut book = self.book.lock();
        book.ready_for_retry(self.clock.monotonic())
    }

    pub fn len(&self) -> usize {
        self.book.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, task_id: &str) -> bool {
        self.book.lock().contains(task_id)
    }
}

/// The log lines of one recorded failure: INFO for the failure and for reaching
/// the limit, DEBUG for the delay and the reason; none more verbose than
/// `most_verbose`.
pub fn log_failure(task_id: &str, recorded: &RecordedFailure, most_verbose: LevelFilter) {
    // One level check for all four records: none is wanted without INFO.
    if most_verbose < LevelFilter::Info || !log::log_enabled!(target: LOG_TARGET, log::Level::Info)
    {
        return;
    }
    let info = &recorded.info;
    log::info!(
        target: LOG_TARGET,
        "Recorded failure for task {task_id}: retry_count={}/{}, next_retry_at={}, delay={:.1}s",
        info.retry_count,
        recorded.max_attempts,
        // Formatted only if the record is wanted.
        info.next_retry_at,
        recorded.delay_seconds
    );
    if most_verbose >= LevelFilter::Debug {
        log::debug!(
            target: LOG_TARGET,
            "Calculated backoff delay for retry {}: {}s",
            info.retry_count,
            recorded.delay_seconds
        );
        if let Some(reason) = &info.failure_reason {
            log::debug!(target: LOG_TARGET, "Failure reason for task {task_id}: {reason}");
        }
    }
    match recorded.gave_up.map(GiveUp::explanation) {
        // The limit: the original's message.
        Some(None) => log::info!(
            target: LOG_TARGET,
            "Task {task_id} has reached max retry attempts ({}/{})",
            info.retry_count,
            recorded.max_attempts
        ),
        Some(Some(why)) => {
            log::info!(target: LOG_TARGET, "Task {task_id} will not be retried: {why}")
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::clock::ManualClock;
    use crate::time::wall::WallTime;
    use std::thread;

    fn manager(max_attempts: u64) -> (RetryManager, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(WallTime::from_micros(0).unwrap()));
        let policy = BackoffPolicy::default().with_max_attempts(max_attempts);
        (RetryManager::new(policy, clock.clone()), clock)
    }

    #[test]
    fn decisions_follow_the_shared_clock() {
        let (m, clock) = manager(3);
        m.record_failure("t", Some("boom"));
        assert!(!m.should_retry("t"));
        clock.advance(0.999).unwrap();
        assert!(!m.should_retry("t"));
        clock.advance(0.001).unwrap();
        assert!(m.should_retry("t"));
        assert_eq!(m.ready_for_retry().len(), 1);
    }

    #[test]
    fn a_wall_clock_jump_changes_no_decision() {
        let (m, clock) = manager(3);
        m.record_failure("t", None);
        clock.set_wall(WallTime::MAX);
        assert!(!m.should_retry("t"));
        clock.set_wall(WallTime::MIN);
        clock.advance(1.0).unwrap();
        assert!(m.should_retry("t"));
    }

    #[test]
    fn an_invalid_setting_changes_nothing() {
        let (m, _) = manager(3);
        assert!(m.set_float(Setting::MaxDelay, -1.0).is_err());
        assert_eq!(m.policy(), BackoffPolicy::default());
        m.set_float(Setting::MaxDelay, 5.0).unwrap();
        assert_eq!(m.policy().max_delay(), 5.0);
    }

    #[test]
    fn concurrent_failures_are_all_counted() {
        let (m, _) = manager(u64::MAX);
        let m = Arc::new(m);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let m = Arc::clone(&m);
                thread::spawn(move || {
                    for i in 0..5_000 {
                        m.record_failure(&format!("task-{}", (i + t) % 10), None);
                        m.should_retry("task-0");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = m.all_info().iter().map(|i| i.retry_count).sum();
        assert_eq!(total, 40_000);
    }
}
