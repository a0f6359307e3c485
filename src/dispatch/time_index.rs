//! Entries (time, slot), earliest first: the delayed tasks by due time
//! ([`TimeIndex`]), the tracked runners by last heartbeat ([`TimeQueue`]).
//!
//! Both are dense, 12 bytes an entry, where a B-tree filled in time order
//! (as these mostly are) keeps its leaves half empty, about 30 bytes an
//! entry (SPEC §6, memory per task held). Due times come in any order: a
//! binary min-heap, where a time later than any held (the common case) costs
//! one comparison. Heartbeats come in the clock's order: a sorted deque,
//! where filing one and taking the oldest cost O(1).
//!
//! Removal is deferred. The owner changes its own record (the task's place,
//! the runner's heartbeat), which makes the entry stale, and says so with
//! [`TimeIndex::forget`]; whether an entry is live is the owner's to say (an
//! `is_live` test: its slot still holds a record at that time). Stale
//! entries are dropped when they reach the top, and all at once when they
//! outnumber the live ones, so the heap stays within about twice the live
//! count. Two entries can look alike (a slot reused at the same time): the
//! owner acting on the first makes the second stale, and the lists below
//! give each once.

use std::collections::VecDeque;

use crate::time::clock::MonoNanos;

pub type Entry = (MonoNanos, u32);

/// An entry as stored: 12 bytes, where the tuple takes 16 (its `u64`
/// aligned to 8). Ordered by time, then slot, as the tuple. Packed to
/// 4 bytes, so its fields are copied, never borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C, packed(4))]
struct Stored {
    time: MonoNanos,
    slot: u32,
}

impl Stored {
    fn new((time, slot): Entry) -> Self {
        Stored { time, slot }
    }

    fn entry(self) -> Entry {
        (self.time, self.slot)
    }

    fn is_live(self, is_live: impl Fn(MonoNanos, u32) -> bool) -> bool {
        is_live(self.time, self.slot)
    }
}

#[derive(Debug, Default)]
pub struct TimeIndex {
    /// A min-heap: each entry is no later than its two children.
    heap: Vec<Stored>,
    /// Entries filed and not forgotten.
    live: usize,
}

/// Stale entries kept at most, beyond as many as the live ones.
const SLACK: usize = 64;

impl TimeIndex {
    /// How many entries are live.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn insert(&mut self, time: MonoNanos, slot: u32) {
        self.heap.push(Stored::new((time, slot)));
        self.sift_up(self.heap.len() - 1);
        self.live += 1;
    }

    /// One entry went stale (the owner changed its record, or is about to).
    pub fn forget(&mut self, is_live: impl Fn(MonoNanos, u32) -> bool) {
        self.live = self.live.saturating_sub(1);
        self.drop_stale_top(&is_live);
        if self.heap.len() > 2 * self.live + SLACK {
            // A sorted vector is a min-heap.
            self.heap = self
                .live_sorted(&is_live)
                .into_iter()
                .map(Stored::new)
                .collect();
        }
    }

    /// The earliest live time.
    pub fn earliest(&mut self, is_live: impl Fn(MonoNanos, u32) -> bool) -> Option<MonoNanos> {
        self.drop_stale_top(&is_live);
        self.heap.first().map(|top| top.time)
    }

    /// Takes the earliest live entry if its time is `now` or earlier; the
    /// caller acts on it (an entry taken is not live any more).
    pub fn pop_due(
        &mut self,
        now: MonoNanos,
        is_live: impl Fn(MonoNanos, u32) -> bool,
    ) -> Option<Entry> {
        self.drop_stale_top(&is_live);
        if self.heap.first()?.time > now {
            return None;
        }
        self.live = self.live.saturating_sub(1);
        self.pop_top().map(Stored::entry)
    }

    /// The live entries, earliest first, each once.
    pub fn live_sorted(&self, is_live: impl Fn(MonoNanos, u32) -> bool) -> Vec<Entry> {
        let mut live: Vec<Entry> = self
            .heap
            .iter()
            .filter(|e| e.is_live(&is_live))
            .map(|e| e.entry())
            .collect();
        live.sort_unstable();
        live.dedup();
        live
    }

    /// The live entries earlier than `bound`, earliest first, each once:
    /// O(found) (the heap's subtrees that start at `bound` or later are not
    /// visited).
    pub fn live_before(
        &self,
        bound: MonoNanos,
        is_live: impl Fn(MonoNanos, u32) -> bool,
    ) -> Vec<Entry> {
        let mut found = Vec::new();
        let mut pending = vec![0usize];
        while let Some(i) = pending.pop() {
            let Some(&e) = self.heap.get(i) else {
                continue;
            };
            let (time, slot) = e.entry();
            if time >= bound {
                continue;
            }
            if is_live(time, slot) {
                found.push((time, slot));
            }
            pending.extend([2 * i + 1, 2 * i + 2]);
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    fn drop_stale_top(&mut self, is_live: &impl Fn(MonoNanos, u32) -> bool) {
        while let Some(&top) = self.heap.first() {
            if top.is_live(is_live) {
                break;
            }
            self.pop_top();
        }
    }

    fn pop_top(&mut self) -> Option<Stored> {
        let last = self.heap.pop()?;
        let Some(top) = self.heap.first_mut() else {
            return Some(last);
        };
        let top = std::mem::replace(top, last);
        self.sift_down(0);
        Some(top)
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[parent] <= self.heap[i] {
                break;
            }
            self.heap.swap(parent, i);
            i = parent;
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let left = 2 * i + 1;
            if left >= n {
                break;
            }
            let right = left + 1;
            let child = if right < n && self.heap[right] < self.heap[left] {
                right
            } else {
                left
            };
            if self.heap[i] <= self.heap[child] {
                break;
            }
            self.heap.swap(i, child);
            i = child;
        }
    }
}

/// Entries filed in time order (a later time than any held, but for a rare
/// race: filed then in its place), for [`TimeQueue::live_before`] from the
/// front. Removal deferred, as in [`TimeIndex`].
#[derive(Debug, Default)]
pub struct TimeQueue {
    entries: VecDeque<Stored>,
    live: usize,
}

impl TimeQueue {
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn insert(&mut self, time: MonoNanos, slot: u32) {
        let entry = Stored::new((time, slot));
        match self.entries.back() {
            Some(&last) if entry < last => {
                let at = self.entries.partition_point(|&e| e <= entry);
                self.entries.insert(at, entry);
            }
            _ => self.entries.push_back(entry),
        }
        self.live += 1;
    }

    /// One entry went stale (the owner changed its record, or is about to).
    /// Runners mostly finish in the order they started: stale entries at
    /// the front go at once, O(1) each, and a sweep is rarely needed.
    pub fn forget(&mut self, is_live: impl Fn(MonoNanos, u32) -> bool) {
        self.live = self.live.saturating_sub(1);
        while let Some(&front) = self.entries.front() {
            if front.is_live(&is_live) {
                break;
            }
            self.entries.pop_front();
        }
        if self.entries.len() > 2 * self.live + SLACK {
            self.entries.retain(|e| e.is_live(&is_live));
            // Entries that look alike stand next to each other.
            let mut kept: Vec<Stored> = self.entries.drain(..).collect();
            kept.dedup();
            self.entries = kept.into();
        }
    }

    /// The live entries earlier than `bound`, earliest first, each once;
    /// stale entries met at the front are dropped: O(found + dropped).
    pub fn live_before(
        &mut self,
        bound: MonoNanos,
        is_live: impl Fn(MonoNanos, u32) -> bool,
    ) -> Vec<Entry> {
        while let Some(&front) = self.entries.front() {
            if front.time >= bound || front.is_live(&is_live) {
                break;
            }
            self.entries.pop_front();
        }
        let mut found: Vec<Entry> = self
            .entries
            .iter()
            .take_while(|e| e.time < bound)
            .filter(|e| e.is_live(&is_live))
            .map(|e| e.entry())
            .collect();
        found.dedup();
        found
    }

    /// The live entries, earliest first, each once.
    pub fn live_sorted(&self, is_live: impl Fn(MonoNanos, u32) -> bool) -> Vec<Entry> {
        let mut found: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.is_live(&is_live))
            .map(|e| e.entry())
            .collect();
        found.dedup();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A deterministic pseudo-random sequence (SplitMix64).
    fn numbers(mut state: u64) -> impl Iterator<Item = u64> {
        std::iter::from_fn(move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            Some(z ^ (z >> 31))
        })
    }

    #[test]
    fn an_entry_takes_12_bytes_and_orders_as_its_tuple() {
        // SPEC §6, memory per delayed and per running task.
        assert_eq!(std::mem::size_of::<Stored>(), 12);
        let pairs = [(1, 9), (2, 0), (2, 1), (u64::MAX, 0), (0, u32::MAX)];
        for a in pairs {
            for b in pairs {
                assert_eq!(Stored::new(a).cmp(&Stored::new(b)), a.cmp(&b));
            }
        }
    }

    /// What an owner keeps: each slot's one live time.
    #[derive(Default)]
    struct Owner(BTreeMap<u32, MonoNanos>);

    impl Owner {
        fn is_live(&self) -> impl Fn(MonoNanos, u32) -> bool + '_ {
            |t, s| self.0.get(&s) == Some(&t)
        }

        /// The live entries earlier than `bound`, earliest first.
        fn before(&self, bound: MonoNanos) -> Vec<Entry> {
            let mut found: Vec<Entry> = self
                .0
                .iter()
                .filter(|(_, &t)| t < bound)
                .map(|(&s, &t)| (t, s))
                .collect();
            found.sort_unstable();
            found
        }
    }

    /// `step(index, owner, now, r, slot)` 400 times over a fresh index and
    /// owner, for each of 200 seeds; `r` random, `slot` one of 16.
    fn random_steps<I: Default>(
        mut step: impl FnMut(&mut I, &mut Owner, &mut MonoNanos, u64, u32),
    ) {
        for seed in 0..200 {
            let (mut index, mut owner, mut now) = (I::default(), Owner::default(), 0);
            for r in numbers(seed).take(400) {
                step(&mut index, &mut owner, &mut now, r, (r % 16) as u32);
            }
        }
    }

    #[test]
    fn the_heap_agrees_with_an_ordered_map_of_the_live_entries() {
        random_steps(|index: &mut TimeIndex, owner, now, r, slot| {
            match (r >> 40) % 5 {
                0 | 1 => {
                    if owner.0.insert(slot, *now + (r >> 8) % 50).is_some() {
                        index.forget(owner.is_live());
                    }
                    index.insert(owner.0[&slot], slot);
                }
                2 => {
                    if owner.0.remove(&slot).is_some() {
                        index.forget(owner.is_live());
                    }
                }
                3 => {
                    *now += (r >> 16) % 20;
                    while let Some((t, s)) = index.pop_due(*now, owner.is_live()) {
                        assert!(t <= *now);
                        assert_eq!(owner.0.remove(&s), Some(t));
                    }
                    assert!(owner.0.values().all(|&t| t > *now));
                }
                _ => {
                    let bound = *now + (r >> 16) % 30;
                    assert_eq!(
                        index.live_before(bound, owner.is_live()),
                        owner.before(bound)
                    );
                }
            }
            let all = owner.before(MonoNanos::MAX);
            assert_eq!(index.live_sorted(owner.is_live()), all);
            assert_eq!(index.len(), owner.0.len());
            assert_eq!(
                index.earliest(owner.is_live()),
                all.first().map(|&(t, _)| t)
            );
            assert!(index.heap.len() <= 2 * owner.0.len() + SLACK + 1);
        });
    }

    #[test]
    fn the_queue_agrees_with_an_ordered_map_of_the_live_entries() {
        random_steps(|queue: &mut TimeQueue, owner, now, r, slot| {
            match (r >> 40) % 4 {
                0 | 1 => {
                    *now += (r >> 16) % 3;
                    // Mostly the clock's order; now and then a late one.
                    let late = if (r >> 50) % 8 == 0 {
                        (r >> 20) % 10
                    } else {
                        0
                    };
                    let time = now.saturating_sub(late);
                    if owner.0.insert(slot, time).is_some() {
                        queue.forget(owner.is_live());
                    }
                    queue.insert(time, slot);
                }
                2 => {
                    if owner.0.remove(&slot).is_some() {
                        queue.forget(owner.is_live());
                    }
                }
                _ => {
                    let bound = now.saturating_sub((r >> 16) % 30);
                    assert_eq!(
                        queue.live_before(bound, owner.is_live()),
                        owner.before(bound)
                    );
                }
            }
            let all = owner.before(MonoNanos::MAX);
            assert_eq!(queue.live_sorted(owner.is_live()), all);
            assert_eq!(queue.len(), owner.0.len());
            assert!(queue.entries.len() <= 2 * owner.0.len() + SLACK + 1);
        });
    }

    #[test]
    fn runners_leaving_in_start_order_leave_nothing_behind() {
        let mut queue = TimeQueue::default();
        let mut owner = Owner::default();
        for slot in 0..1000 {
            owner.0.insert(slot, u64::from(slot));
            queue.insert(u64::from(slot), slot);
        }
        for slot in 0..1000 {
            owner.0.remove(&slot);
            queue.forget(owner.is_live());
            // Each stale entry goes at once, not at the next sweep.
            assert_eq!(queue.entries.len(), owner.0.len());
        }
    }

    #[test]
    fn times_filed_in_order_cost_one_comparison_and_stay_dense() {
        let mut index = TimeIndex::default();
        for i in 0..1000 {
            index.insert(i, i as u32);
        }
        // Filed in order, the vector is already sorted: nothing moved.
        assert!(index.heap.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(index.heap.len(), 1000);
    }
}
