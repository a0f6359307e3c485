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
use std::sync::Arc;

use crate::hashing::{bytes_eq, short_hash, FastMap};
use crate::retry::backoff::BackoffPolicy;
use crate::retry::budget::{BudgetSettings, RetryBudget};
use crate::retry::failure_policy::{FailureClass, FailureClasses, GiveUp};
use crate::retry::jitter::{Jitter, Rng};
use crate::retry::slot_index::{Slot, SlotIndex};
use crate::time::clock::{
    nanos_to_seconds, seconds_to_nanos, Clock, LaggingReading, MonoNanos, Now,
};
use crate::time::wall::{timedelta_micros, WallTime};

pub use crate::id::TaskId;

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

/// Failure reasons, stored once each with their class, and counted by the
/// records using them.
#[derive(Debug, Default)]
struct Reasons {
    texts: Vec<(Arc<str>, u32, FailureClass)>,
    by_text: FastMap<Arc<str>, u32>,
    free: Vec<u32>,
    /// The reason acquired last: failures come in runs of the same reason,
    /// and comparing it is cheaper than hashing the text.
    last: u32,
}

impl Reasons {
    fn acquire(&mut self, text: &str, classes: &FailureClasses) -> u32 {
        if let Some(entry) = self.texts.get_mut(self.last as usize) {
            if entry.1 > 0 && bytes_eq(entry.0.as_bytes(), text.as_bytes()) {
                entry.1 += 1;
                return self.last;
            }
        }
        if let Some(&index) = self.by_text.get(text) {
            self.texts[index as usize].1 += 1;
            self.last = index;
            return index;
        }
        let class = classes.classify(Some(text));
        let text: Arc<str> = Arc::from(text);
        let index = match self.free.pop() {
            Some(index) => {
                self.texts[index as usize] = (text.clone(), 1, class);
                index
            }
            None => {
                self.texts.push((text.clone(), 1, class));
                (self.texts.len() - 1) as u32
            }
        };
        self.by_text.insert(text, index);
        self.last = index;
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

    fn class(&self, index: u32) -> FailureClass {
        if index == NO_REASON {
            FailureClass::Default
        } else {
            self.texts[index as usize].2
        }
    }
}

/// The options beyond the original's four settings. The defaults keep the
/// original's behaviour exactly.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetryOptions {
    pub jitter: Jitter,
    /// Makes the jitter reproducible.
    pub seed: Option<u64>,
    pub classes: FailureClasses,
    /// No retry once a task's first failure is this old (seconds).
    pub max_retry_duration: Option<f64>,
    pub budget: Option<BudgetSettings>,
}

/// The retry budget's state, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetStatus {
    pub settings: BudgetSettings,
    pub tokens: u64,
    pub refused: u64,
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

/// Every record's information, ids in one buffer: see [`RetryBook::info_table`].
#[derive(Debug)]
pub struct InfoTable {
    ids: String,
    rows: Vec<InfoRow>,
    /// Each slot's row, `u32::MAX` for a free slot: how a caller holding a
    /// [`RecordIndex`] finds the row without hashing the id again.
    row_of_slot: Vec<u32>,
}

/// Where a record sits in the book while the book is not changed: see
/// [`RetryBook::due_of`] and [`InfoTable::row`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordIndex(Slot);

#[derive(Debug)]
pub struct InfoRow {
    id_start: u32,
    id_len: u32,
    pub retry_count: u64,
    pub last_retry_at: WallTime,
    pub next_retry_at: WallTime,
    pub failure_reason: Option<Arc<str>>,
}

impl InfoTable {
    /// Each record's task id and information.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &InfoRow)> {
        self.rows.iter().map(|row| {
            let start = row.id_start as usize;
            (&self.ids[start..start + row.id_len as usize], row)
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The row of the record at `index` (taken from the same book, unchanged
    /// since), or None.
    pub fn row(&self, index: RecordIndex) -> Option<usize> {
        match self.row_of_slot.get(index.0 as usize) {
            Some(&row) if row != u32::MAX => Some(row as usize),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A record as saved and restored, with its monotonic times.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRecord {
    pub task_id: TaskId,
    pub retry_count: u32,
    pub last_retry_at: WallTime,
    pub next_retry_at: WallTime,
    pub failure_reason: Option<Arc<str>>,
    pub due: MonoNanos,
    /// Why it is not retried again, if it is not.
    pub gave_up: Option<GiveUp>,
    /// Its first failure, where the book keeps it (with `max_retry_duration`).
    pub first_failure: Option<MonoNanos>,
}

/// A record's values as a failure left them. Without the id: the caller
/// has it, and copying it for every failure would cost an allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureInfo {
    pub retry_count: u64,
    pub last_retry_at: WallTime,
    pub next_retry_at: WallTime,
    pub failure_reason: Option<Arc<str>>,
}

/// What [`RetryBook::record_failure`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedFailure {
    pub info: FailureInfo,
    /// Monotonic due time of the next retry.
    pub due: MonoNanos,
    pub delay_seconds: f64,
    pub max_attempts: u64,
    /// No further retry (`gave_up` says why).
    pub limit_reached: bool,
    pub gave_up: Option<GiveUp>,
}

impl RecordedFailure {
    /// The reason to report for a task that failed for good: the failure's
    /// own, with why it was not retried when that was not the limit.
    pub fn final_reason(&self, reason: &Arc<str>) -> Arc<str> {
        match self.gave_up {
            Some(why) => why.final_reason(reason),
            None => reason.clone(),
        }
    }
}

/// Why [`RetryBook::should_retry`] answered as it did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RetryDecision {
    Retry,
    LimitReached {
        retry_count: u64,
        max_attempts: u64,
    },
    /// Not retried for a reason other than the limit.
    GaveUp(GiveUp),
    /// Due at `due` (monotonic), not yet.
    BackingOff {
        due: MonoNanos,
    },
}

impl RetryDecision {
    pub fn allowed(self) -> bool {
        matches!(self, RetryDecision::Retry)
    }
}

/// [`RetryBook::retry_check`]'s answer: decided, or depending on whether a
/// due time has come, which the caller reads its clock for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum RetryCheck {
    Decided(RetryDecision),
    DueAt(MonoNanos),
}

impl RetryCheck {
    fn at(self, now: MonoNanos) -> RetryDecision {
        match self {
            RetryCheck::Decided(decision) => decision,
            RetryCheck::DueAt(due) if now < due => RetryDecision::BackingOff { due },
            RetryCheck::DueAt(_) => RetryDecision::Retry,
        }
    }

    /// The decision, given a `lagging` reading of `clock`: its exact reading
    /// is taken only when the due time is near. A task far from due, or
    /// already past it, is answered from the cheaper lagging reading.
    fn read(self, lagging: LaggingReading, clock: &dyn Clock) -> RetryDecision {
        match self {
            RetryCheck::Decided(decision) => decision,
            RetryCheck::DueAt(due) if lagging.is_before(due) || lagging.has_reached(due) => {
                self.at(lagging.at)
            }
            RetryCheck::DueAt(_) => self.at(clock.monotonic()),
        }
    }
}

#[derive(Debug, Default)]
pub struct RetryBook {
    policy: BackoffPolicy,
    slots: Vec<RetryRecord>,
    free_slots: Vec<Slot>,
    /// Slots by their id's hash (one cache line a lookup; growing reads no id).
    by_id: SlotIndex,
    ids: String,
    /// Arena bytes of forgotten ids, reclaimed by compaction.
    wasted_id_bytes: usize,
    reasons: Reasons,
    /// Entries not yet due, earliest first.
    pending: BinaryHeap<Reverse<DueEntry>>,
    /// Entries found due by a query, in due order; they stay until their
    /// record changes.
    due_now: Vec<DueEntry>,
    /// Records still retrying (below their limit, not given up): each has
    /// one valid entry.
    indexed: usize,
    len: usize,
    next_seq: u64,
    options: RetryOptions,
    rng: Option<Rng>,
    /// Records given up for a reason other than the limit. Rare, so kept
    /// aside rather than in every record.
    stopped: FastMap<Slot, GiveUp>,
    /// Monotonic time of each slot's first failure; kept only with a
    /// `max_retry_duration`, so that records stay small without one.
    first_failure: Vec<MonoNanos>,
    budget: Option<RetryBudget>,
}

/// The id bytes of the record in `slot` (bytes: comparing them skips the
/// char-boundary checks of slicing a `str`, on every lookup). A free
/// function, so that a caller changing the index can read records and arena.
fn stored_id<'a>(slots: &'a [RetryRecord], ids: &'a str, slot: Slot) -> &'a [u8] {
    let r = &slots[slot as usize];
    let start = r.id_start as usize;
    &ids.as_bytes()[start..start + r.id_len as usize]
}

impl RetryBook {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self::with_options(policy, RetryOptions::default())
    }

    pub fn with_options(policy: BackoffPolicy, options: RetryOptions) -> Self {
        let rng = match (options.jitter, options.seed) {
            (Jitter::None, _) => None,
            (_, Some(seed)) => Some(Rng::seeded(seed)),
            (_, None) => Some(Rng::from_entropy()),
        };
        RetryBook {
            policy,
            next_seq: 1,
            rng,
            budget: options.budget.map(RetryBudget::new),
            options,
            ..Default::default()
        }
    }

    pub fn options(&self) -> &RetryOptions {
        &self.options
    }

    /// Replaces the options; later decisions use them. Reasons are classified
    /// anew, a changed budget starts full, a changed jitter or seed restarts
    /// the generator, and a newly set `max_retry_duration` counts from each
    /// record's next due time (when its failures happened was not kept).
    pub fn set_options(&mut self, options: RetryOptions) {
        if options == self.options {
            return;
        }
        if (options.jitter, options.seed) != (self.options.jitter, self.options.seed) {
            self.rng = Self::with_options(self.policy, options.clone()).rng;
        }
        if options.budget != self.options.budget {
            self.budget = options.budget.map(RetryBudget::new);
        }
        for entry in self.reasons.texts.iter_mut().filter(|e| e.1 > 0) {
            entry.2 = options.classes.classify(Some(&entry.0));
        }
        if options.max_retry_duration.is_some() && self.options.max_retry_duration.is_none() {
            self.first_failure = self.slots.iter().map(|r| r.due).collect();
        }
        self.options = options;
        self.rebuild_index();
    }

    pub fn budget_status(&self) -> Option<BudgetStatus> {
        self.budget.as_ref().map(|b| BudgetStatus {
            settings: b.settings(),
            tokens: b.tokens(),
            refused: b.refused(),
        })
    }

    /// The attempt limit of a record: its reason's policy's, if it has one.
    fn limit_of(&self, record: &RetryRecord) -> u64 {
        match self.reasons.class(record.reason) {
            FailureClass::Override(i) => self.options.classes.overrides()[usize::from(i)]
                .1
                .max_attempts
                .unwrap_or(self.policy.max_attempts()),
            FailureClass::Default | FailureClass::NonRetryable => self.policy.max_attempts(),
        }
    }

    /// Why a record is not retried again, if it is not: decided at its
    /// failure (time limit, budget) or by the current settings (reason
    /// class, attempt limit), so that a changed setting applies at once.
    fn gave_up_of(&self, slot: Slot, record: &RetryRecord) -> Option<GiveUp> {
        if !self.stopped.is_empty() {
            if let Some(&why) = self.stopped.get(&slot) {
                return Some(why);
            }
        }
        if self.reasons.class(record.reason) == FailureClass::NonRetryable {
            return Some(GiveUp::NonRetryable);
        }
        (u64::from(record.retry_count) >= self.limit_of(record)).then_some(GiveUp::MaxAttempts)
    }

    /// Whether a live record is still retrying.
    fn retrying(&self, slot: Slot, record: &RetryRecord) -> bool {
        record.seq != 0 && self.gave_up_of(slot, record).is_none()
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
        let entries: Vec<Reverse<DueEntry>> = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(slot, r)| self.retrying(slot as Slot, r))
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

    fn find(&self, task_id: &str) -> Option<Slot> {
        self.find_hashed(short_hash(task_id), task_id)
    }

    fn find_hashed(&self, hash: u32, task_id: &str) -> Option<Slot> {
        self.by_id.find(hash, |slot| {
            bytes_eq(stored_id(&self.slots, &self.ids, slot), task_id.as_bytes())
        })
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

    /// A new record for `task_id` (not tracked), with its id in the arena.
    fn insert_new(&mut self, task_id: &str) -> Slot {
        let slot = self.new_record(task_id);
        self.by_id.insert(short_hash(task_id), slot);
        slot
    }

    /// The task's record slot, a new record if it has none: one hash and
    /// one probe of the index either way.
    fn find_or_insert(&mut self, task_id: &str) -> Slot {
        let hash = short_hash(task_id);
        let (slots, ids) = (&self.slots, &self.ids);
        let vacant = match self.by_id.entry(hash, |slot| {
            bytes_eq(stored_id(slots, ids, slot), task_id.as_bytes())
        }) {
            Ok(slot) => return slot,
            Err(vacant) => vacant,
        };
        // Only the records and the arena change: the index's room stays.
        let slot = self.new_record(task_id);
        self.by_id.insert_vacant(vacant, hash, slot);
        slot
    }

    /// A record for `task_id` in a free slot, not yet in the index.
    fn new_record(&mut self, task_id: &str) -> Slot {
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
        let slot = self.find_or_insert(task_id);
        let reason = match failure_reason {
            Some(text) => self.reasons.acquire(text, &self.options.classes),
            None => NO_REASON,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let before = self.slots[slot as usize];
        let was_indexed = self.retrying(slot, &before);
        if !self.stopped.is_empty() {
            self.stopped.remove(&slot);
        }
        let retry_count = before.retry_count.saturating_add(1);
        let class = self.reasons.class(reason);
        let policy = self.options.classes.policy_for(class, &self.policy);
        let gave_up = self.give_up(slot, retry_count, class, &policy, now);
        let mut delay_seconds = policy.delay(i64::from(retry_count));
        if gave_up.is_none() {
            if let Some(rng) = self.rng.as_mut() {
                // The previous wait, as the record reports it.
                let previous = (before.seq != 0 && before.retry_count > 0).then(|| {
                    (before.next_retry_at.micros() - before.last_retry_at.micros()) as f64 / 1e6
                });
                delay_seconds = self.options.jitter.apply(
                    delay_seconds,
                    previous,
                    policy.initial_delay(),
                    policy.max_delay(),
                    rng,
                );
            }
        }
        if let Some(why @ (GiveUp::MaxRetryDuration | GiveUp::RetryBudget)) = gave_up {
            self.stopped.insert(slot, why);
        }
        let record = &mut self.slots[slot as usize];
        record.reason = reason;
        record.retry_count = retry_count;
        record.last_retry_at = now.wall;
        record.next_retry_at = now
            .wall
            .saturating_add_micros(timedelta_micros(delay_seconds));
        record.due = now.mono.saturating_add(seconds_to_nanos(delay_seconds));
        record.seq = seq;
        let record = *record;
        self.reasons.release(before.reason);
        let limit_reached = gave_up.is_some();
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
            info: FailureInfo {
                retry_count: u64::from(record.retry_count),
                last_retry_at: record.last_retry_at,
                next_retry_at: record.next_retry_at,
                failure_reason: self.reasons.get(record.reason).cloned(),
            },
            due: record.due,
            delay_seconds,
            max_attempts: policy.max_attempts(),
            limit_reached,
            gave_up,
        }
    }

    /// Whether failure number `retry_count` of the record in `slot` ends its
    /// retries, and why. The budget is paid last, only for a retry that
    /// every other rule allows.
    fn give_up(
        &mut self,
        slot: Slot,
        retry_count: u32,
        class: FailureClass,
        policy: &BackoffPolicy,
        now: Now,
    ) -> Option<GiveUp> {
        // The first failure is noted whatever the outcome: a later setting
        // may make this record retry again.
        let too_old = self.options.max_retry_duration.is_some_and(|limit| {
            let index = slot as usize;
            if self.first_failure.len() <= index {
                self.first_failure.resize(index + 1, now.mono);
            }
            if retry_count == 1 {
                self.first_failure[index] = now.mono;
            }
            nanos_to_seconds(now.mono.saturating_sub(self.first_failure[index])) >= limit
        });
        if class == FailureClass::NonRetryable {
            return Some(GiveUp::NonRetryable);
        }
        if u64::from(retry_count) >= policy.max_attempts() {
            return Some(GiveUp::MaxAttempts);
        }
        if too_old {
            return Some(GiveUp::MaxRetryDuration);
        }
        match self.budget.as_mut() {
            Some(budget) => (!budget.try_acquire()).then_some(GiveUp::RetryBudget),
            None => None,
        }
    }

    fn compact_index_if_stale(&mut self) {
        if self.pending.len() + self.due_now.len() > 2 * self.indexed + 1024 {
            self.rebuild_index();
        }
    }

    pub fn should_retry(&self, task_id: &str, now: MonoNanos) -> RetryDecision {
        self.retry_check(self.find(task_id)).at(now)
    }

    /// `should_retry`, reading `clock` only as far as the answer needs.
    pub fn retry_decision(&self, task_id: &str, clock: &dyn Clock) -> RetryDecision {
        let hash = short_hash(task_id);
        // At 10^6 records the index entry is a cache miss: the clock is read
        // while it is on its way.
        self.by_id.prefetch(hash);
        let lagging = clock.monotonic_lagging();
        self.retry_check(self.find_hashed(hash, task_id))
            .read(lagging, clock)
    }

    /// `should_retry` for the record in `slot` (None: untracked), up to the
    /// reading of the clock.
    fn retry_check(&self, slot: Option<Slot>) -> RetryCheck {
        let Some(slot) = slot else {
            return RetryCheck::Decided(if self.policy.max_attempts() == 0 {
                RetryDecision::LimitReached {
                    retry_count: 0,
                    max_attempts: 0,
                }
            } else {
                RetryDecision::Retry
            });
        };
        let r = &self.slots[slot as usize];
        match self.gave_up_of(slot, r) {
            Some(GiveUp::MaxAttempts) => RetryCheck::Decided(RetryDecision::LimitReached {
                retry_count: u64::from(r.retry_count),
                max_attempts: self.limit_of(r),
            }),
            Some(why) => RetryCheck::Decided(RetryDecision::GaveUp(why)),
            None => RetryCheck::DueAt(r.due),
        }
    }

    pub fn retry_count(&self, task_id: &str) -> u64 {
        self.record(task_id).map_or(0, |r| u64::from(r.retry_count))
    }

    pub fn info(&self, task_id: &str) -> Option<RetrySnapshot> {
        self.record(task_id).map(|r| self.snapshot(r))
    }

    /// The task's next retry time, without copying its record.
    pub fn next_retry_at(&self, task_id: &str) -> Option<WallTime> {
        self.record(task_id).map(|r| r.next_retry_at)
    }

    /// The task's next retry time and where its record sits (for
    /// [`InfoTable::row`]), or None when it has no record.
    pub fn due_of(&self, task_id: &str) -> Option<(WallTime, RecordIndex)> {
        self.find(task_id)
            .map(|slot| (self.slots[slot as usize].next_retry_at, RecordIndex(slot)))
    }

    /// Forgets a task; false when it was not tracked.
    pub fn clear(&mut self, task_id: &str) -> bool {
        let (slots, ids) = (&self.slots, &self.ids);
        let Some(slot) = self.by_id.remove(short_hash(task_id), |slot| {
            bytes_eq(stored_id(slots, ids, slot), task_id.as_bytes())
        }) else {
            return false;
        };
        if self.retrying(slot, &self.slots[slot as usize]) {
            self.indexed -= 1;
        }
        if !self.stopped.is_empty() {
            self.stopped.remove(&slot);
        }
        let record = std::mem::take(&mut self.slots[slot as usize]);
        self.reasons.release(record.reason);
        self.wasted_id_bytes += record.id_len as usize;
        self.free_slots.push(slot);
        self.len -= 1;
        true
    }

    /// A task succeeded: its record is forgotten and the retry budget, if
    /// any, refilled (by what its retry took, or by the success refill when
    /// it needed none). False when it had no record.
    pub fn record_success(&mut self, task_id: &str) -> bool {
        if self.budget.is_some() {
            let retried = self
                .find(task_id)
                .is_some_and(|slot| self.slots[slot as usize].retry_count > 0);
            if let Some(budget) = self.budget.as_mut() {
                budget.on_success(retried);
            }
        }
        self.clear(task_id)
    }

    /// Every record, for saving.
    pub fn stored_records(&self) -> Vec<StoredRecord> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, r)| r.seq != 0)
            .map(|(slot, r)| {
                let slot = slot as Slot;
                let gave_up = self.gave_up_of(slot, r);
                StoredRecord {
                    task_id: TaskId::from(self.id_of(r)),
                    retry_count: r.retry_count,
                    last_retry_at: r.last_retry_at,
                    next_retry_at: r.next_retry_at,
                    failure_reason: self.reasons.get(r.reason).cloned(),
                    due: r.due,
                    gave_up,
                    first_failure: self.first_failure.get(slot as usize).copied(),
                }
            })
            .collect()
    }

    /// Replaces every record (and the budget's level) with saved ones. The
    /// caller has checked them: ids are unique.
    pub fn replace_records(&mut self, records: &[StoredRecord], budget_tokens: Option<u64>) {
        let mut fresh = RetryBook::with_options(self.policy, self.options.clone());
        fresh.rng = self.rng.take();
        fresh.budget = self.budget.take();
        if let (Some(budget), Some(tokens)) = (fresh.budget.as_mut(), budget_tokens) {
            budget.set_tokens(tokens);
        }
        for stored in records {
            fresh.insert_stored(stored);
        }
        *self = fresh;
    }

    fn insert_stored(&mut self, stored: &StoredRecord) {
        let slot = self.insert_new(&stored.task_id);
        let reason = match &stored.failure_reason {
            Some(text) => self.reasons.acquire(text, &self.options.classes),
            None => NO_REASON,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let record = &mut self.slots[slot as usize];
        record.retry_count = stored.retry_count;
        record.reason = reason;
        record.last_retry_at = stored.last_retry_at;
        record.next_retry_at = stored.next_retry_at;
        record.due = stored.due;
        record.seq = seq;
        let record = *record;
        if let Some(why @ (GiveUp::NonRetryable | GiveUp::MaxRetryDuration | GiveUp::RetryBudget)) =
            stored.gave_up
        {
            self.stopped.insert(slot, why);
        }
        if self.options.max_retry_duration.is_some() {
            let index = slot as usize;
            if self.first_failure.len() <= index {
                self.first_failure.resize(index + 1, 0);
            }
            self.first_failure[index] = stored.first_failure.unwrap_or(stored.due);
        }
        if self.retrying(slot, &record) {
            self.indexed += 1;
            self.pending.push(Reverse(DueEntry {
                due: record.due,
                seq,
                slot,
            }));
        }
    }

    pub fn all_info(&self) -> Vec<RetrySnapshot> {
        self.slots
            .iter()
            .filter(|r| r.seq != 0)
            .map(|r| self.snapshot(r))
            .collect()
    }

    /// What [`RetryBook::all_info`] gives, in the same order, copied in two
    /// allocations instead of one per record: a status report lists every
    /// record, possibly millions.
    pub fn info_table(&self) -> InfoTable {
        let mut rows = Vec::with_capacity(self.slots.len());
        let mut row_of_slot = Vec::with_capacity(self.slots.len());
        for r in &self.slots {
            if r.seq == 0 {
                row_of_slot.push(u32::MAX);
                continue;
            }
            // Rows never outnumber slots, whose numbers are u32.
            row_of_slot.push(rows.len() as u32);
            rows.push(InfoRow {
                id_start: r.id_start,
                id_len: r.id_len,
                retry_count: u64::from(r.retry_count),
                last_retry_at: r.last_retry_at,
                next_retry_at: r.next_retry_at,
                failure_reason: self.reasons.get(r.reason).cloned(),
            });
        }
        InfoTable {
            ids: self.ids.clone(),
            rows,
            row_of_slot,
        }
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
            .map(|e| TaskId::from(self.id_of(&self.slots[e.slot as usize])))
            .collect()
    }

    fn snapshot(&self, r: &RetryRecord) -> RetrySnapshot {
        RetrySnapshot {
            task_id: TaskId::from(self.id_of(r)),
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
    use crate::retry::failure_policy::{PolicyOverride, ReasonPattern};

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
    fn a_record_stays_48_bytes() {
        // SPEC §6's memory target rests on it: options beyond the original's
        // keep their per-record data aside.
        assert_eq!(std::mem::size_of::<RetryRecord>(), 48);
    }

    #[test]
    fn failures_share_the_kept_reason() {
        let mut b = book(3);
        let first = b.record_failure("t", Some("exit 1"), at(0));
        let other = b.record_failure("u", Some("exit 1"), at(0));
        // One copy of the reason text for both records.
        let (a, c) = (first.info.failure_reason, other.info.failure_reason);
        assert!(Arc::ptr_eq(a.as_ref().unwrap(), c.as_ref().unwrap()));
        // The same record either way.
        let again = b.record_failure("t", None, at(5));
        assert_eq!(again.info.retry_count, 2);
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
            info.next_retry_at.micros() - info.last_retry_at.micros(),
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
            RetryDecision::BackingOff { due: 101 * SECOND }
        );
        assert!(b.should_retry("t", 101 * SECOND).allowed());
    }

    /// A clock whose lagging reading is `lag` behind its exact one, counting
    /// exact reads.
    #[derive(Debug)]
    struct LaggingClock {
        exact: MonoNanos,
        lag: MonoNanos,
        exact_reads: std::sync::atomic::AtomicU32,
    }

    impl Clock for LaggingClock {
        fn monotonic(&self) -> MonoNanos {
            self.exact_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.exact
        }
        fn wall(&self) -> WallTime {
            WallTime::MIN
        }
        fn monotonic_lagging(&self) -> crate::time::clock::LaggingReading {
            crate::time::clock::LaggingReading {
                at: self.exact.saturating_sub(self.lag),
                max_lag: 2 * self.lag,
            }
        }
    }

    #[test]
    fn a_check_reads_the_exact_clock_only_near_the_due_time() {
        let mut b = book(3);
        b.record_failure("t", None, at(100)); // due at 101 s
        let clock = |exact| LaggingClock {
            exact,
            lag: SECOND / 100,
            exact_reads: Default::default(),
        };
        let reads = |c: &LaggingClock| c.exact_reads.load(std::sync::atomic::Ordering::Relaxed);
        // Far from due: answered from the lagging reading alone.
        let far = clock(100 * SECOND);
        let due = RetryDecision::BackingOff { due: 101 * SECOND };
        assert_eq!(b.retry_decision("t", &far), due);
        assert_eq!(reads(&far), 0);
        // Within the lag bound: the exact reading decides, either way.
        let near = clock(101 * SECOND - SECOND / 100);
        assert_eq!(b.retry_decision("t", &near), due);
        assert_eq!(reads(&near), 1);
        let come = clock(101 * SECOND);
        assert!(b.retry_decision("t", &come).allowed());
        assert_eq!(reads(&come), 1);
        // Past due by more than the lag: the lagging reading has reached it.
        let past = clock(101 * SECOND + SECOND / 100);
        assert!(b.retry_decision("t", &past).allowed());
        assert_eq!(reads(&past), 0);
        // Decided without the exact time: no record, or past the limit.
        let untouched = clock(0);
        assert!(b.retry_decision("other", &untouched).allowed());
        assert_eq!(reads(&untouched), 0);
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
        assert_eq!(r.info.next_retry_at, WallTime::MAX);
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

    fn book_with(options: RetryOptions) -> RetryBook {
        RetryBook::with_options(BackoffPolicy::default(), options)
    }

    fn classes(non_retryable: &[&str], overrides: Vec<(&str, PolicyOverride)>) -> FailureClasses {
        FailureClasses::new(
            non_retryable
                .iter()
                .map(|p| ReasonPattern::new(p))
                .collect(),
            overrides
                .into_iter()
                .map(|(p, o)| (ReasonPattern::new(p), o))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_non_retryable_reason_fails_at_once() {
        let mut b = book_with(RetryOptions {
            classes: classes(&["auth"], vec![]),
            ..Default::default()
        });
        let r = b.record_failure("t", Some("auth: token expired"), at(0));
        assert_eq!(r.gave_up, Some(GiveUp::NonRetryable));
        assert!(r.limit_reached);
        assert_eq!(r.info.retry_count, 1);
        assert_eq!(
            b.should_retry("t", u64::MAX),
            RetryDecision::GaveUp(GiveUp::NonRetryable)
        );
        assert!(b.ready_for_retry(u64::MAX).is_empty());
        // A retryable failure of another task is unaffected.
        let other = b.record_failure("u", Some("authority unreachable"), at(0));
        assert_eq!(other.gave_up, None);
        assert_eq!(b.ready_for_retry(u64::MAX).len(), 1);
    }

    #[test]
    fn a_reason_policy_overrides_the_limit_and_the_delays() {
        let patient = PolicyOverride {
            max_attempts: Some(5),
            initial_delay: Some(10.0),
            ..Default::default()
        };
        let mut b = book_with(RetryOptions {
            classes: classes(&[], vec![("timeout", patient)]),
            ..Default::default()
        });
        let mut last = None;
        for i in 1..=4u64 {
            let r = b.record_failure("slow", Some("timeout"), at(i * 1000));
            assert_eq!(r.gave_up, None, "failure {i}");
            assert_eq!(r.max_attempts, 5);
            last = Some(r.delay_seconds);
        }
        // initial_delay 10, base 2 (the manager's): 10, 20, 40, 80.
        assert_eq!(last, Some(80.0));
        assert_eq!(
            b.record_failure("slow", Some("timeout"), at(9000)).gave_up,
            Some(GiveUp::MaxAttempts)
        );
        // Other reasons keep the manager's limit of 3.
        for i in 0..2 {
            assert_eq!(b.record_failure("t", Some("exit 1"), at(i)).gave_up, None);
        }
        assert_eq!(
            b.record_failure("t", Some("exit 1"), at(3)).gave_up,
            Some(GiveUp::MaxAttempts)
        );
    }

    #[test]
    fn retries_stop_once_the_first_failure_is_too_old() {
        let mut b = RetryBook::with_options(
            BackoffPolicy::new(100, 2.0, 1.0, 300.0).unwrap(),
            RetryOptions {
                max_retry_duration: Some(60.0),
                ..Default::default()
            },
        );
        assert_eq!(b.record_failure("t", None, at(100)).gave_up, None);
        assert_eq!(b.record_failure("t", None, at(159)).gave_up, None);
        let r = b.record_failure("t", None, at(160));
        assert_eq!(r.gave_up, Some(GiveUp::MaxRetryDuration));
        assert!(b.ready_for_retry(u64::MAX).is_empty());
        // Cleared, the task starts a new window.
        b.clear("t");
        assert_eq!(b.record_failure("t", None, at(500)).gave_up, None);
        assert_eq!(b.ready_for_retry(u64::MAX).len(), 1);
    }

    #[test]
    fn the_budget_trips_under_a_burst_and_recovers_after_successes() {
        let mut b = RetryBook::with_options(
            BackoffPolicy::new(10, 2.0, 1.0, 300.0).unwrap(),
            RetryOptions {
                budget: Some(BudgetSettings {
                    capacity: 10,
                    retry_cost: 5,
                    success_refill: 1,
                }),
                ..Default::default()
            },
        );
        assert_eq!(b.record_failure("a", None, at(0)).gave_up, None);
        assert_eq!(b.record_failure("b", None, at(0)).gave_up, None);
        let refused = b.record_failure("c", None, at(0));
        assert_eq!(refused.gave_up, Some(GiveUp::RetryBudget));
        assert_eq!(b.budget_status().unwrap().refused, 1);
        assert_eq!(b.ready_for_retry(u64::MAX).len(), 2);
        // "a" succeeds after its retry: its cost comes back.
        assert!(b.record_success("a"));
        assert_eq!(b.budget_status().unwrap().tokens, 5);
        assert_eq!(b.record_failure("d", None, at(1)).gave_up, None);
        // Five first-try successes refill one retry.
        for i in 0..5 {
            b.record_success(&format!("fresh{i}"));
        }
        assert_eq!(b.record_failure("e", None, at(2)).gave_up, None);
        assert_eq!(b.budget_status().unwrap().tokens, 0);
    }

    #[test]
    fn seeded_jitter_is_reproducible_and_bounded() {
        let run = |seed| {
            let mut b = book_with(RetryOptions {
                jitter: Jitter::Full,
                seed: Some(seed),
                ..Default::default()
            });
            (0..100)
                .map(|i| {
                    b.record_failure(&format!("t{i}"), None, at(0))
                        .delay_seconds
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert!(run(1).iter().all(|d| (0.0..=1.0).contains(d)));
    }

    #[test]
    fn decorrelated_jitter_grows_from_the_previous_wait() {
        let mut b = RetryBook::with_options(
            BackoffPolicy::new(50, 2.0, 1.0, 30.0).unwrap(),
            RetryOptions {
                jitter: Jitter::Decorrelated,
                seed: Some(9),
                ..Default::default()
            },
        );
        let mut previous = 1.0f64;
        for i in 0..40 {
            let r = b.record_failure("t", None, at(i * 100));
            let d = r.delay_seconds;
            assert!(
                d >= 1.0 && d <= (previous * 3.0).min(30.0) + 1e-6,
                "{d} after {previous}"
            );
            // The report is exact to the microsecond.
            let info = r.info;
            let waited = info.next_retry_at.micros() - info.last_retry_at.micros();
            assert_eq!(waited, timedelta_micros(d));
            previous = waited as f64 / 1e6;
        }
    }

    #[test]
    fn changed_options_apply_to_the_records_already_kept() {
        let mut b = book(3);
        b.record_failure("oom-task", Some("oom: 4 GiB"), at(0));
        b.record_failure("other", Some("exit 1"), at(0));
        assert_eq!(b.ready_for_retry(u64::MAX).len(), 2);
        b.set_options(RetryOptions {
            classes: classes(&["oom"], vec![]),
            ..Default::default()
        });
        assert_eq!(
            b.should_retry("oom-task", u64::MAX),
            RetryDecision::GaveUp(GiveUp::NonRetryable)
        );
        assert_eq!(
            b.ready_for_retry(u64::MAX)
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
            ["other"]
        );
        b.set_options(RetryOptions::default());
        assert_eq!(b.ready_for_retry(u64::MAX).len(), 2);
    }

    #[test]
    fn a_record_index_finds_its_own_row_even_in_a_reused_slot() {
        let mut b = book(3);
        b.record_failure("a", None, at(0));
        b.record_failure("b", None, at(1));
        b.clear("a");
        b.record_failure("c", None, at(2)); // may take a's slot
        let table = b.info_table();
        for id in ["b", "c"] {
            let (next, index) = b.due_of(id).unwrap();
            let row = table.row(index).unwrap();
            let (row_id, info) = table.iter().nth(row).unwrap();
            assert_eq!((row_id, info.next_retry_at), (id, next));
        }
        assert_eq!(b.due_of("a"), None);
    }

    #[test]
    fn info_table_lists_what_all_info_does() {
        let mut b = book(3);
        b.record_failure("a", Some("exit 1"), at(0));
        b.record_failure("bb", None, at(5));
        b.record_failure("ccc", Some("timeout"), at(7));
        b.clear("bb");
        b.record_failure("a", Some("exit 2"), at(9));
        let table = b.info_table();
        let from_table: Vec<RetrySnapshot> = table
            .iter()
            .map(|(id, row)| RetrySnapshot {
                task_id: TaskId::from(id),
                retry_count: row.retry_count,
                last_retry_at: Some(row.last_retry_at),
                next_retry_at: Some(row.next_retry_at),
                failure_reason: row.failure_reason.clone(),
            })
            .collect();
        assert_eq!(from_table, b.all_info());
        assert_eq!(table.len(), 2);
        assert_eq!(b.next_retry_at("ccc"), b.info("ccc").unwrap().next_retry_at);
        assert_eq!(b.next_retry_at("bb"), None);
    }
}
