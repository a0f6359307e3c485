//! Per-task retry records and the index of due times.
//!
//! [`RetryBook`] is plain data with no lock and no clock: callers pass the time
//! in, which keeps every decision deterministic and testable. Records of tasks
//! still below the attempt limit are also kept in an index ordered by due time,
//! so "which tasks are ready" costs O(k log n) for k ready tasks.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::backoff::BackoffPolicy;
use crate::clock::{MonoNanos, Now};
use crate::wall_time::{timedelta_micros, WallTime};

/// Task ids are shared between the record map and the due index.
pub type TaskId = Arc<str>;

#[derive(Clone, Debug, PartialEq)]
struct RetryRecord {
    retry_count: u32,
    last_retry_at: WallTime,
    next_retry_at: WallTime,
    /// Monotonic due time of the next retry: what decisions use.
    due: MonoNanos,
    failure_reason: Option<Arc<str>>,
}

/// A copy of one task's record, as reported to callers.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySnapshot {
    pub task_id: TaskId,
    pub retry_count: u64,
    pub last_retry_at: Option<WallTime>,
    pub next_retry_at: Option<WallTime>,
    pub failure_reason: Option<Arc<str>>,
}

/// What [`RetryBook::record_failure`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedFailure {
    pub info: RetrySnapshot,
    /// Monotonic due time of the next retry.
    pub due: MonoNanos,
    pub delay_seconds: f64,
    pub max_attempts: u64,
    /// The count has reached the attempt limit: no further retry.
    pub limit_reached: bool,
}

/// Why [`RetryBook::should_retry`] answered as it did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RetryDecision {
    Retry,
    LimitReached { retry_count: u64, max_attempts: u64 },
    BackingOff { remaining: MonoNanos },
}

impl RetryDecision {
    pub fn allowed(self) -> bool {
        matches!(self, RetryDecision::Retry)
    }
}

#[derive(Debug, Default)]
pub struct RetryBook {
    policy: BackoffPolicy,
    records: HashMap<TaskId, RetryRecord>,
    /// (due, task) of every record whose count is below `max_attempts`.
    due_index: BTreeSet<(MonoNanos, TaskId)>,
}

impl RetryBook {
    pub fn new(policy: BackoffPolicy) -> Self {
        RetryBook {
            policy,
            ..Default::default()
        }
    }

    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }

    /// Replaces the policy; every later decision uses it. A new attempt limit
    /// changes which records belong in the due index, so the index is rebuilt.
    pub fn set_policy(&mut self, policy: BackoffPolicy) {
        let limit_changed = policy.max_attempts() != self.policy.max_attempts();
        self.policy = policy;
        if limit_changed {
            self.due_index = self
                .records
                .iter()
                .filter(|(_, r)| u64::from(r.retry_count) < policy.max_attempts())
                .map(|(id, r)| (r.due, Arc::clone(id)))
                .collect();
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn contains(&self, task_id: &str) -> bool {
        self.records.contains_key(task_id)
    }

    /// One failure, in one step: count + 1, times and reason replaced, next due
    /// time = now + backoff delay for the new count.
    pub fn record_failure(
        &mut self,
        task_id: &str,
        failure_reason: Option<&str>,
        now: Now,
    ) -> RecordedFailure {
        let max_attempts = self.policy.max_attempts();
        let (id, previous) = match self.records.remove_entry(task_id) {
            Some((id, record)) => (id, Some(record)),
            None => (TaskId::from(task_id), None),
        };
        if let Some(old) = &previous {
            self.due_index.remove(&(old.due, Arc::clone(&id)));
        }
        let retry_count = previous.map_or(0, |r| r.retry_count).saturating_add(1);
        let delay_seconds = self.policy.delay(i64::from(retry_count));
        let record = RetryRecord {
            retry_count,
            last_retry_at: now.wall,
            next_retry_at: now
                .wall
                .saturating_add_micros(timedelta_micros(delay_seconds)),
            due: now
                .mono
                .saturating_add(crate::clock::seconds_to_nanos(delay_seconds)),
            failure_reason: failure_reason.map(Arc::from),
        };
        let limit_reached = u64::from(retry_count) >= max_attempts;
        if !limit_reached {
            self.due_index.insert((record.due, Arc::clone(&id)));
        }
        let info = snapshot(&id, &record);
        let due = record.due;
        self.records.insert(id, record);
        RecordedFailure {
            info,
            due,
            delay_seconds,
            max_attempts,
            limit_reached,
        }
    }

    pub fn should_retry(&self, task_id: &str, now: MonoNanos) -> RetryDecision {
        let record = self.records.get(task_id);
        let retry_count = record.map_or(0, |r| u64::from(r.retry_count));
        let max_attempts = self.policy.max_attempts();
        if retry_count >= max_attempts {
            return RetryDecision::LimitReached {
                retry_count,
                max_attempts,
            };
        }
        match record {
            Some(r) if now < r.due => RetryDecision::BackingOff {
                remaining: r.due - now,
            },
            _ => RetryDecision::Retry,
        }
    }

    pub fn retry_count(&self, task_id: &str) -> u64 {
        self.records
            .get(task_id)
            .map_or(0, |r| u64::from(r.retry_count))
    }

    pub fn info(&self, task_id: &str) -> Option<RetrySnapshot> {
        self.records
            .get_key_value(task_id)
            .map(|(id, r)| snapshot(id, r))
    }

    /// Forgets a task; false when it was not tracked.
    pub fn clear(&mut self, task_id: &str) -> bool {
        match self.records.remove_entry(task_id) {
            Some((id, record)) => {
                self.due_index.remove(&(record.due, id));
                true
            }
            None => false,
        }
    }

    pub fn all_info(&self) -> Vec<RetrySnapshot> {
        self.records.iter().map(|(id, r)| snapshot(id, r)).collect()
    }

    /// Tasks below the attempt limit whose backoff has elapsed, earliest due
    /// first. Walks only the due part of the index.
    pub fn ready_for_retry(&self, now: MonoNanos) -> Vec<TaskId> {
        self.due_index
            .iter()
            .take_while(|(due, _)| *due <= now)
            .map(|(_, id)| Arc::clone(id))
            .collect()
    }
}

fn snapshot(id: &TaskId, r: &RetryRecord) -> RetrySnapshot {
    RetrySnapshot {
        task_id: Arc::clone(id),
        retry_count: u64::from(r.retry_count),
        last_retry_at: Some(r.last_retry_at),
        next_retry_at: Some(r.next_retry_at),
        failure_reason: r.failure_reason.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: MonoNanos = 1_000_000_000;

    fn at(seconds: u64) -> Now {
        Now {
            mono: seconds * SECOND,
            wall: WallTime::from_micros(63_000_000_000_000_000 + seconds as i64 * 1_000_000)
                .unwrap(),
        }
    }

    fn book(max_attempts: u64) -> RetryBook {
        RetryBook::new(BackoffPolicy::default().with_max_attempts(max_attempts))
    }

    #[test]
    fn failures_increment_the_count_and_keep_the_last_reason() {
        let mut b = book(3);
        assert_eq!(b.retry_count("t"), 0);
        b.record_failure("t", Some("first"), at(0));
        let r = b.record_failure("t", Some("second"), at(10));
        assert_eq!(r.info.retry_count, 2);
        assert_eq!(r.info.failure_reason.as_deref(), Some("second"));
        assert_eq!(r.delay_seconds, 2.0);
        assert_eq!(b.retry_count("t"), 2);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn next_retry_at_is_last_retry_at_plus_delay() {
        let mut b = book(3);
        let r = b.record_failure("t", None, at(5));
        let info = r.info;
        assert_eq!(
            info.next_retry_at.unwrap().micros() - info.last_retry_at.unwrap().micros(),
            1_000_000
        );
    }

    #[test]
    fn should_retry_waits_for_the_backoff_then_allows() {
        let mut b = book(3);
        assert!(b.should_retry("t", 0).allowed());
        b.record_failure("t", None, at(100));
        assert_eq!(
            b.should_retry("t", 100 * SECOND),
            RetryDecision::BackingOff { remaining: SECOND }
        );
        assert!(b.should_retry("t", 101 * SECOND).allowed());
    }

    #[test]
    fn should_retry_refuses_at_the_limit() {
        let mut b = book(2);
        b.record_failure("t", None, at(0));
        let r = b.record_failure("t", None, at(0));
        assert!(r.limit_reached);
        assert_eq!(
            b.should_retry("t", 1_000 * SECOND),
            RetryDecision::LimitReached {
                retry_count: 2,
                max_attempts: 2
            }
        );
    }

    #[test]
    fn ready_list_is_ordered_by_due_time_and_excludes_limit() {
        let mut b = RetryBook::new(BackoffPolicy::new(2, 2.0, 10.0, 300.0).unwrap());
        b.record_failure("late", None, at(30)); // due 40
        b.record_failure("early", None, at(0)); // due 10
        b.record_failure("mid", None, at(15)); // due 25
        b.record_failure("done", None, at(0));
        b.record_failure("done", None, at(0)); // at the limit
        b.record_failure("future", None, at(100)); // due 110
        let ready: Vec<String> = b
            .ready_for_retry(50 * SECOND)
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(ready, ["early", "mid", "late"]);
        assert!(b.ready_for_retry(5 * SECOND).is_empty());
    }

    #[test]
    fn raising_the_limit_brings_records_back_into_the_index() {
        let mut b = book(1);
        b.record_failure("t", None, at(0));
        assert!(b.ready_for_retry(100 * SECOND).is_empty());
        let policy = b.policy().with_max_attempts(5);
        b.set_policy(policy);
        assert_eq!(b.ready_for_retry(100 * SECOND).len(), 1);
        let policy = b.policy().with_max_attempts(1);
        b.set_policy(policy);
        assert!(b.ready_for_retry(100 * SECOND).is_empty());
    }

    #[test]
    fn clearing_forgets_the_task_everywhere() {
        let mut b = book(3);
        b.record_failure("t", None, at(0));
        assert!(b.clear("t"));
        assert!(!b.clear("t"));
        assert!(!b.contains("t"));
        assert_eq!(b.info("t"), None);
        assert!(b.ready_for_retry(u64::MAX).is_empty());
    }

    #[test]
    fn index_holds_exactly_the_records_below_the_limit() {
        let mut b = book(3);
        for i in 0..200u64 {
            let id = format!("t{}", i % 37);
            b.record_failure(&id, None, at(i));
            if i % 11 == 0 {
                b.clear(&format!("t{}", i % 5));
            }
        }
        let below: usize = b.all_info().iter().filter(|s| s.retry_count < 3).count();
        assert_eq!(b.ready_for_retry(u64::MAX).len(), below);
    }

    #[test]
    fn huge_delays_saturate_instead_of_overflowing() {
        let mut b = RetryBook::new(BackoffPolicy::new(3, 2.0, 1e300, 1e300).unwrap());
        let r = b.record_failure("t", None, at(0));
        assert_eq!(r.info.next_retry_at, Some(WallTime::MAX));
        assert!(!b.should_retry("t", u64::MAX - 1).allowed());
    }
}
