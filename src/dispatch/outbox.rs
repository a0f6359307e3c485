//! Reports waiting to reach the ports, one lane per task (SPEC §9).
//!
//! Every report the core decides for a task (registry updates, events, slot
//! releases, runner stops) is filed in that task's lane, in the order it was
//! decided. One caller at a time delivers a lane, front first, so a task's
//! reports reach the ports in order even when several threads decide for it.
//! A delivery that fails goes back to the front of its lane, and the lane
//! waits for a retry with backoff: nothing is lost, nothing overtakes.
//!
//! Pure bookkeeping: the caller takes a lane's reports under its lock,
//! delivers them with the lock released, and says how it went.

use std::collections::{BTreeSet, VecDeque};

use crate::hashing::FastMap;
use crate::retry::state::TaskId;
use crate::time::clock::{seconds_to_nanos, MonoNanos};

/// Delays between delivery attempts of a lane: 0.05 s doubling to 5 s.
const RETRY_INITIAL_SECONDS: f64 = 0.05;
const RETRY_MAX_SECONDS: f64 = 5.0;

#[derive(Debug)]
struct Lane<R> {
    reports: VecDeque<R>,
    /// A caller holds this lane's front reports and is delivering them.
    busy: bool,
    /// After a failed delivery: not retried before this time.
    retry_at: Option<MonoNanos>,
    /// Failed delivery attempts in a row that delivered nothing.
    failures: u32,
}

/// What the outbox files. Its counts are of port calls: a report may stand
/// for several, delivered one by one.
pub trait Report {
    /// The port calls this report has still to make.
    fn parts(&self) -> usize;
}

/// Counters for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub delivered: u64,
    pub failed_attempts: u64,
}

#[derive(Debug)]
pub struct Outbox<R> {
    lanes: FastMap<TaskId, Lane<R>>,
    /// Lanes waiting for a retry, by when.
    retries: BTreeSet<(MonoNanos, TaskId)>,
    pending: usize,
    stats: OutboxStats,
}

impl<R> Default for Outbox<R> {
    fn default() -> Self {
        Outbox {
            lanes: FastMap::default(),
            retries: BTreeSet::new(),
            pending: 0,
            stats: OutboxStats::default(),
        }
    }
}

impl<R: Report> Outbox<R> {
    /// Files `report` at the back of `task`'s lane.
    pub fn push(&mut self, task: &TaskId, report: R) {
        let lane = self.lanes.entry(task.clone()).or_insert_with(|| Lane {
            reports: VecDeque::new(),
            busy: false,
            retry_at: None,
            failures: 0,
        });
        self.pending += report.parts();
        lane.reports.push_back(report);
    }

    /// Files `reports` for a task that has no lane and takes them for
    /// delivery at once (the lane is busy until [`Self::finish`]); hands
    /// them back when the task has a lane already.
    pub fn push_and_take(
        &mut self,
        task: &TaskId,
        reports: VecDeque<R>,
    ) -> Result<VecDeque<R>, VecDeque<R>> {
        if self.lanes.contains_key(task) {
            return Err(reports);
        }
        self.pending += reports.iter().map(R::parts).sum::<usize>();
        self.lanes.insert(
            task.clone(),
            Lane {
                reports: VecDeque::new(),
                busy: true,
                retry_at: None,
                failures: 0,
            },
        );
        Ok(reports)
    }

    /// Whether `task` has reports not yet delivered (or being delivered).
    pub fn holds(&self, task: &str) -> bool {
        self.lanes.contains_key(task)
    }

    /// Port calls not yet made, in all lanes.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Tasks with reports not yet delivered.
    pub fn pending_tasks(&self) -> usize {
        self.lanes.len()
    }

    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    /// Takes every report of `task`'s lane for delivery, unless another
    /// caller is delivering it or it waits for a retry after `now` (`force`
    /// ignores the wait). The lane stays, busy, until [`Self::finish`].
    pub fn take(&mut self, task: &str, now: MonoNanos, force: bool) -> Option<VecDeque<R>> {
        let (id, lane) = self.lanes.get_key_value(task)?;
        if lane.busy || lane.reports.is_empty() {
            return None;
        }
        if let Some(at) = lane.retry_at {
            if at > now && !force {
                return None;
            }
            self.retries.remove(&(at, id.clone()));
        }
        let lane = self.lanes.get_mut(task)?;
        lane.retry_at = None;
        lane.busy = true;
        Some(std::mem::take(&mut lane.reports))
    }

    /// Ends a delivery of `task`'s lane: `delivered` port calls landed;
    /// `undelivered` (the one that failed first, then the rest) go back to
    /// the front, and the lane waits `failures`-long backoff from `now`.
    /// A lane left empty is dropped: the task is no longer held here.
    /// Returns whether reports filed meanwhile wait in the lane.
    pub fn finish(
        &mut self,
        task: &str,
        delivered: usize,
        mut undelivered: VecDeque<R>,
        now: MonoNanos,
    ) -> bool {
        self.pending = self.pending.saturating_sub(delivered);
        self.stats.delivered += delivered as u64;
        let Some(lane) = self.lanes.get_mut(task) else {
            return false;
        };
        lane.busy = false;
        if undelivered.is_empty() {
            lane.failures = 0;
            if lane.reports.is_empty() {
                self.lanes.remove(task);
                return false;
            }
            return true;
        }
        self.stats.failed_attempts += 1;
        // Backoff grows with attempts that made no progress at all.
        lane.failures = if delivered > 0 {
            1
        } else {
            lane.failures.saturating_add(1)
        };
        undelivered.append(&mut lane.reports);
        lane.reports = undelivered;
        let at = now.saturating_add(retry_delay(lane.failures));
        lane.retry_at = Some(at);
        let id = self.lanes.get_key_value(task).map(|(id, _)| id.clone());
        self.retries.extend(id.map(|id| (at, id)));
        false
    }

    /// Makes an idle lane wait until `at` (a restored lane: the loop's next
    /// pass delivers it).
    pub fn schedule(&mut self, task: &str, at: MonoNanos) {
        let Some((id, lane)) = self.lanes.get_key_value(task) else {
            return;
        };
        if lane.busy || lane.retry_at.is_some() {
            return;
        }
        let id = id.clone();
        if let Some(lane) = self.lanes.get_mut(task) {
            lane.retry_at = Some(at);
        }
        self.retries.insert((at, id));
    }

    /// Lanes whose retry is due at `now`, earliest first.
    pub fn due(&self, now: MonoNanos) -> Vec<TaskId> {
        self.retries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Every lane with reports and no delivery in progress.
    pub fn idle_lanes(&self) -> Vec<TaskId> {
        self.lanes
            .iter()
            .filter(|(_, l)| !l.busy && !l.reports.is_empty())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// When the earliest waiting lane may be retried.
    pub fn next_retry(&self) -> Option<MonoNanos> {
        self.retries.first().map(|(at, _)| *at)
    }

    /// The reports waiting in every lane, by task (for snapshots).
    pub fn lanes(&self) -> impl Iterator<Item = (&TaskId, &VecDeque<R>)> {
        self.lanes.iter().map(|(id, lane)| (id, &lane.reports))
    }
}

/// The wait after the `failures`-th failed attempt in a row.
fn retry_delay(failures: u32) -> MonoNanos {
    let exponent = failures.saturating_sub(1).min(30) as i32;
    seconds_to_nanos((RETRY_INITIAL_SECONDS * 2f64.powi(exponent)).min(RETRY_MAX_SECONDS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TaskId {
        TaskId::from(s)
    }

    impl Report for i32 {
        fn parts(&self) -> usize {
            1
        }
    }

    /// A report of several port calls, `.0` of them still to make.
    #[derive(Debug, PartialEq)]
    struct Calls(usize);

    impl Report for Calls {
        fn parts(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn counts_are_of_port_calls_and_follow_a_report_delivered_in_part() {
        let mut o = Outbox::default();
        o.push(&id("a"), Calls(3));
        o.push(&id("a"), Calls(1));
        assert_eq!(o.pending(), 4);
        let mut taken = o.take("a", 0, false).unwrap();
        assert_eq!(taken.len(), 2);
        // The first report's first two calls landed, its third raised.
        taken[0] = Calls(1);
        assert!(!o.finish("a", 2, taken, 10));
        assert_eq!(o.pending(), 2);
        assert_eq!(o.stats().delivered, 2);
        let taken = o.take("a", 0, true).unwrap();
        assert_eq!(taken, [Calls(1), Calls(1)]);
        assert!(!o.finish("a", 2, VecDeque::new(), 20));
        assert_eq!((o.pending(), o.stats().delivered), (0, 4));
        assert!(!o.holds("a"));
    }

    #[test]
    fn a_lane_is_delivered_in_order_and_dropped_when_empty() {
        let mut o = Outbox::default();
        o.push(&id("a"), 1);
        o.push(&id("a"), 2);
        assert!(o.holds("a"));
        assert_eq!(o.pending(), 2);
        let taken = o.take("a", 0, false).unwrap();
        assert_eq!(Vec::from(taken), vec![1, 2]);
        assert!(o.holds("a"), "held while being delivered");
        assert!(!o.finish("a", 2, VecDeque::new(), 0));
        assert!(!o.holds("a"));
        assert_eq!(o.pending(), 0);
        assert_eq!(o.stats().delivered, 2);
    }

    #[test]
    fn a_busy_lane_is_not_taken_twice_and_keeps_what_is_filed_meanwhile() {
        let mut o = Outbox::default();
        o.push(&id("a"), 1);
        let first = o.take("a", 0, false).unwrap();
        o.push(&id("a"), 2);
        assert!(o.take("a", 0, false).is_none());
        assert_eq!(first.len(), 1);
        assert!(o.finish("a", 1, VecDeque::new(), 0), "report 2 waits");
        assert_eq!(Vec::from(o.take("a", 0, false).unwrap()), vec![2]);
    }

    #[test]
    fn a_failed_report_goes_back_to_the_front_and_waits_with_backoff() {
        let mut o = Outbox::default();
        for n in 1..=3 {
            o.push(&id("a"), n);
        }
        let mut taken = o.take("a", 0, false).unwrap();
        taken.pop_front(); // 1 delivered
        o.push(&id("a"), 4);
        assert!(!o.finish("a", 1, taken, 0));
        assert_eq!(o.pending(), 3);
        assert_eq!(o.stats().failed_attempts, 1);
        let first_wait = seconds_to_nanos(RETRY_INITIAL_SECONDS);
        assert_eq!(o.next_retry(), Some(first_wait));
        assert!(o.due(first_wait - 1).is_empty());
        assert!(o.take("a", first_wait - 1, false).is_none());
        assert_eq!(o.due(first_wait), vec![id("a")]);
        let again = o.take("a", first_wait, false).unwrap();
        assert_eq!(Vec::from(again.clone()), vec![2, 3, 4]);
        // A second failure in a row waits twice as long.
        assert!(!o.finish("a", 0, again, first_wait));
        assert_eq!(o.next_retry(), Some(first_wait * 3));
        // An attempt that delivered something starts the backoff over.
        let mut again = o.take("a", first_wait * 3, false).unwrap();
        again.pop_front();
        assert!(!o.finish("a", 1, again, first_wait * 3));
        assert_eq!(o.next_retry(), Some(first_wait * 4));
        assert!(
            o.take("a", first_wait, true).is_some(),
            "force ignores the wait"
        );
        assert!(o.next_retry().is_none());
    }

    #[test]
    fn reports_for_a_task_without_a_lane_are_taken_at_once() {
        let mut o = Outbox::default();
        let taken = o.push_and_take(&id("a"), VecDeque::from([1, 2])).unwrap();
        assert_eq!(Vec::from(taken), vec![1, 2]);
        assert!(o.holds("a"));
        o.push(&id("a"), 3);
        assert!(o.take("a", 0, false).is_none(), "busy");
        let again = o.push_and_take(&id("a"), VecDeque::from([4])).unwrap_err();
        assert_eq!(Vec::from(again), vec![4]);
        assert!(o.finish("a", 2, VecDeque::new(), 0));
        assert_eq!(o.pending(), 1);
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        assert_eq!(retry_delay(1), seconds_to_nanos(0.05));
        assert_eq!(retry_delay(2), seconds_to_nanos(0.1));
        assert_eq!(retry_delay(40), seconds_to_nanos(RETRY_MAX_SECONDS));
    }
}
