//! Per-task retry records and the index of due times.
//!
//! [`RetryBook`] is plain data with no lock and no clock: callers pass the time
//! in, which keeps every decision deterministic and testable.
//!
//! Layout, chosen for SPEC §6 (speed and memory per tracked task): records
//! live in a slab; a hash table of slot numbers (4 bytes a bucket) finds them
//! by id; ids live back to back in one string arena; failure reasons, which
//! repeat, are stored once each. Due times of records below the attempt limit
//! sit in a min-heap; "which tasks are ready" pops the due ones into a list
//! kept in due order, so a query costs O(ready), not O(tracked). A record
//! failing again leaves its old heap entry behind: entries carry the record's
//! sequence number, stale ones are skipped, and the index is rebuilt when
//! they outnumber the live ones.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use hashbrown::HashTable;

use crate::backoff::BackoffPolicy;
use crate::clock::{MonoNanos, Now};
use crate::hashing::{FastMap, FxHasher};
use crate::wall_time::{timedelta_micros, WallTime};

/// Task ids as handed out to callers.
pub type TaskId = Arc<str>;

type Slot = u32;
const NO_REASON: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, Default)]
struct RetryRecord {
    /// The id's place in the arena.
    id_start: u32,
    id_len: u32,
    retry_count: u32,
    /// Index in the reason table, or [`NO_REASON`].
    reason: u32,
    last_retry_at: WallTime,
    next_retry_at: WallTime,
    /// Monotonic due time of the next retry: what decisions use.
    due: MonoNanos,
    /// Sequence number of the latest failure; 0 marks a free slot.
    seq: u64,
}

/// A due-index entry: valid while its record still has this `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DueEntry {
    due: MonoNanos,
    seq: u64,
    slot: Slot,
}

/// Failure reasons, stored once each and counted by the records using them.
#[derive(Debug, Default)]
struct Reasons {
    texts: Vec<(Arc<str>, u32)>,
    by_text: FastMap<Arc<str>, u32>,
    free: Vec<u32>,
}

impl Reasons {
    fn acquire(&mut self, text: &str) -> u32 {
        if let Some(&index) = self.by_text.get(text) {
            self.texts[index as usize].1 += 1;
            return index;
        }
        let text: Arc<str> = Arc::from(text);
        let index = match self.free.pop() {
            Some(index) => {
                self.texts[index as usize] = (text.clone(), 1);
                index
            }
            None => {
                self.texts.push((text.clone(), 1));
                (self.texts.len() - 1) as u32
            }
        };
        self.by_text.insert(text, index);
        index
    }

    fn release(&mut self, index: u32) {
        if index == NO_REASON {
            return;
        }
        let entry = &mut self.texts[index as usize];
        entry.1 -= 1;
        if entry.1 == 0 {
            let text = std::mem::replace(&mut entry.0, Arc::from(""));
            self.by_text.remove(&text);
            self.free.push(index);
        }
    }

    fn get(&self, index: u32) -> Option<&Arc<str>> {
        (index != NO_REASON).then(|| &self.texts[index as usize].0)
    }
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
    slots: Vec<RetryRecord>,
    free_slots: Vec<Slot>,
    /// (slot, 32 bits of its id's hash): growing the table rehashes from
    /// the stored bits instead of reading every record and id again.
    by_id: HashTable<(Slot, u32)>,
    ids: String,
    /// Arena bytes of forgotten ids, reclaimed by compaction.
    wasted_id_bytes: usize,
    reasons: Reasons,
    /// Entries not yet due, earliest first.
    pending: BinaryHeap<Reverse<DueEntry>>,
    /// Entries found due by a query, in due order; they stay until their
    /// record changes.
    due_now: Vec<DueEntry>,
    /// Records below the attempt limit: each has one valid entry.
    indexed: usize,
    len: usize,
    next_seq: u64,
}

/// 32 bits of an id's hash, kept in the table.
fn short_hash(id: &str) -> u32 {
    use std::hash::BuildHasher;
    (BuildHasherDefault::<FxHasher>::default().hash_one(id) >> 32) as u32
}

/// The table's 64-bit hash, rebuilt from the stored 32 bits.
fn table_hash(short: u32) -> u64 {
    (u64::from(short) << 32) | u64::from(short)
}

impl RetryBook {
    pub fn new(policy: BackoffPolicy) -> Self {
        RetryBook {
            policy,
            next_seq: 1,
            ..Default::default()
        }
    }

    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }

    /// Replaces the policy; every later decision uses it. A new attempt limit
    /// changes which records belong in the due index, so it is rebuilt.
    pub fn set_policy(&mut self, policy: BackoffPolicy) {
        let limit_changed = policy.max_attempts() != self.policy.max_attempts();
        self.policy = policy;
        if limit_changed {
            self.rebuild_index();
        }
    }

    fn rebuild_index(&mut self) {
        let limit = self.policy.max_attempts();
        let entries: Vec<Reverse<DueEntry>> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, r)| r.seq != 0 && u64::from(r.retry_count) < limit)
            .map(|(slot, r)| {
                Reverse(DueEntry {
                    due: r.due,
                    seq: r.seq,
                    slot: slot as Slot,
                })
            })
            .collect();
        self.indexed = entries.len();
        self.pending = BinaryHeap::from(entries);
        self.due_now.clear();
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn id_of(&self, record: &RetryRecord) -> &str {
        let start = record.id_start as usize;
        &self.ids[start..start + record.id_len as usize]
    }

    /// The id's bytes: comparing bytes skips the char-boundary checks of
    /// slicing a `str`, on every lookup.
    fn id_bytes(&self, record: &RetryRecord) -> &[u8] {
        let start = record.id_start as usize;
        &self.ids.as_bytes()[start..start + record.id_len as usize]
    }

    fn find(&self, task_id: &str) -> Option<Slot> {
        let short = short_hash(task_id);
        self.by_id
            .find(table_hash(short), |&(slot, h)| {
                h == short && self.id_bytes(&self.slots[slot as usize]) == task_id.as_bytes()
            })
            .map(|&(slot, _)| slot)
    }

    fn record(&self, task_id: &str) -> Option<&RetryRecord> {
        self.find(task_id).map(|slot| &self.slots[slot as usize])
    }

    pub fn contains(&self, task_id: &str) -> bool {
        self.find(task_id).is_some()
    }

    fn entry_is_valid(&self, entry: &DueEntry) -> bool {
        self.slots
            .get(entry.slot as usize)
            .is_some_and(|r| r.seq == entry.seq)
    }

    /// A new record for `task_id`, with its id in the arena.
    fn insert_new(&mut self, task_id: &str) -> Slot {
        if self.wasted_id_bytes > 4096 && self.wasted_id_bytes > self.ids.len() / 2 {
            self.compact_ids();
        }
        let record = RetryRecord {
            id_start: self.ids.len() as u32,
            id_len: task_id.len() as u32,
            reason: NO_REASON,
            ..Default::default()
        };
        self.ids.push_str(task_id);
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot as usize] = record;
                slot
            }
            None => {
                self.slots.push(record);
                (self.slots.len() - 1) as Slot
            }
        };
        let short = short_hash(task_id);
        self.by_id
            .insert_unique(table_hash(short), (slot, short), |&(_, h)| table_hash(h));
        self.len += 1;
        slot
    }

    fn compact_ids(&mut self) {
        let mut ids = String::with_capacity(self.ids.len() - self.wasted_id_bytes);
        for record in self.slots.iter_mut().filter(|r| r.seq != 0) {
            let start = record.id_start as usize;
            let id = &self.ids[start..start + record.id_len as usize];
            record.id_start = ids.len() as u32;
            ids.push_str(id);
        }
        self.ids = ids;
        self.wasted_id_bytes = 0;
    }

    /// One failure, in one step: count + 1, times and reason replaced, next due
    /// time set. Returns the new record and what it means.
    pub fn record_failure(
        &mut self,
        task_id: &str,
        failure_reason: Option<&str>,
        now: Now,
    ) -> RecordedFailure {
        let max_attempts = self.policy.max_attempts();
        let slot = match self.find(task_id) {
            Some(slot) => slot,
            None => self.insert_new(task_id),
        };
        let reason = match failure_reason {
            Some(text) => self.reasons.acquire(text),
            None => NO_REASON,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let record = &mut self.slots[slot as usize];
        let was_indexed = record.seq != 0 && u64::from(record.retry_count) < max_attempts;
        let old_reason = std::mem::replace(&mut record.reason, reason);
        record.retry_count = record.retry_count.saturating_add(1);
        let delay_seconds = self.policy.delay(i64::from(record.retry_count));
        record.last_retry_at = now.wall;
        record.next_retry_at = now
            .wall
            .saturating_add_micros(timedelta_micros(delay_seconds));
        record.due = now
            .mono
            .saturating_add(crate::clock::seconds_to_nanos(delay_seconds));
        record.seq = seq;
        let record = *record;
        self.reasons.release(old_reason);
        let limit_reached = u64::from(record.retry_count) >= max_attempts;
        match (was_indexed, limit_reached) {
            (false, false) => self.indexed += 1,
            (true, true) => self.indexed -= 1,
            _ => {}
        }
        if !limit_reached {
            self.pending.push(Reverse(DueEntry {
                due: record.due,
                seq,
                slot,
            }));
            self.compact_index_if_stale();
        }
        RecordedFailure {
            info: self.snapshot(&record),
            due: record.due,
            delay_seconds,
            max_attempts,
            limit_reached,
        }
    }

    fn compact_index_if_stale(&mut self) {
        if self.pending.len() + self.due_now.len() > 2 * self.indexed + 1024 {
            self.rebuild_index();
        }
    }

    pub fn should_retry(&self, task_id: &str, now: MonoNanos) -> RetryDecision {
        let record = self.record(task_id);
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
        self.record(task_id).map_or(0, |r| u64::from(r.retry_count))
    }

    pub fn info(&self, task_id: &str) -> Option<RetrySnapshot> {
        self.record(task_id).map(|r| self.snapshot(r))
    }

    /// Forgets a task; false when it was not tracked.
    pub fn clear(&mut self, task_id: &str) -> bool {
        let short = short_hash(task_id);
        let (slots, ids) = (&self.slots, &self.ids);
        let Ok(entry) = self.by_id.find_entry(table_hash(short), |&(slot, h)| {
            let r = &slots[slot as usize];
            let start = r.id_start as usize;
            h == short && &ids.as_bytes()[start..start + r.id_len as usize] == task_id.as_bytes()
        }) else {
            return false;
        };
        let ((slot, _), _) = entry.remove();
        let record = std::mem::take(&mut self.slots[slot as usize]);
        self.reasons.release(record.reason);
        if u64::from(record.retry_count) < self.policy.max_attempts() {
            self.indexed -= 1;
        }
        self.wasted_id_bytes += record.id_len as usize;
        self.free_slots.push(slot);
        self.len -= 1;
        true
    }

    pub fn all_info(&self) -> Vec<RetrySnapshot> {
        self.slots
            .iter()
            .filter(|r| r.seq != 0)
            .map(|r| self.snapshot(r))
            .collect()
    }

    /// Tasks below the attempt limit whose backoff has elapsed, earliest due
    /// first. Costs O(ready + stale entries dropped), not O(tracked).
    pub fn ready_for_retry(&mut self, now: MonoNanos) -> Vec<TaskId> {
        while let Some(Reverse(top)) = self.pending.peek().copied() {
            if top.due > now {
                break;
            }
            self.pending.pop();
            if self.entry_is_valid(&top) {
                self.due_now.push(top);
            }
        }
        let slots = &self.slots;
        self.due_now
            .retain(|e| slots.get(e.slot as usize).is_some_and(|r| r.seq == e.seq));
        // Sorted by due time; an earlier `now` than a past query's (only
        // possible for callers passing time in by hand) sees a prefix.
        self.due_now
            .iter()
            .take_while(|e| e.due <= now)
            .map(|e| Arc::from(self.id_of(&self.slots[e.slot as usize])))
            .collect()
    }

    fn snapshot(&self, r: &RetryRecord) -> RetrySnapshot {
        RetrySnapshot {
            task_id: Arc::from(self.id_of(r)),
            retry_count: u64::from(r.retry_count),
            last_retry_at: Some(r.last_retry_at),
            next_retry_at: Some(r.next_retry_at),
            failure_reason: self.reasons.get(r.reason).cloned(),
        }
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

    #[test]
    fn repeated_failures_and_clears_keep_the_index_and_arena_bounded() {
        let mut b = RetryBook::new(BackoffPolicy::new(u64::MAX, 2.0, 1.0, 300.0).unwrap());
        for i in 0..20_000u64 {
            b.record_failure("same", Some("again"), at(i));
        }
        // Each failure leaves a stale entry; compaction keeps them few.
        assert!(b.pending.len() + b.due_now.len() <= 2 * b.indexed + 1024 + 1);
        assert_eq!(b.indexed, 1);
        for i in 0..20_000u64 {
            let id = format!("task-{i:07}");
            b.record_failure(&id, Some(&format!("reason {}", i % 3)), at(i));
            assert!(b.clear(&id));
        }
        assert_eq!(b.len(), 1);
        assert!(
            b.ids.len() <= 4096 + 2 * "same".len() + 64,
            "arena {}",
            b.ids.len()
        );
        // Reasons no record uses any more are forgotten.
        assert_eq!(b.reasons.by_text.len(), 1);
        assert_eq!(b.ready_for_retry(u64::MAX).len(), 1);
    }
}
