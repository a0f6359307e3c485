//! The ids of tasks that finished lately, so that a stale report for one of
//! them changes nothing (SPEC §4.5 #4). Bounded: past `capacity` ids the
//! oldest is forgotten, so memory stays flat however long a dispatcher runs.
//!
//! The ids sit in a ring, found through a [`SlotIndex`] of (32-bit hash,
//! ring position) pairs: at capacity 16 bytes an id and 16 of index,
//! where a hash map from id to stamp and a queue of (stamp, id) took about
//! 55. Every successful completion files its id here: the index grows from
//! its stored hashes without reading an id, and once the ring is full a new
//! id takes the oldest one's place, with no allocation.

use crate::hashing::{bytes_eq, short_hash};
use crate::retry::slot_index::{Slot, SlotIndex};
use crate::retry::state::TaskId;

/// How many finished ids a dispatcher remembers (about 2 MiB at the most).
pub const DEFAULT_CAPACITY: usize = 65_536;

#[derive(Debug)]
pub struct RecentlyFinished {
    capacity: usize,
    /// Up to `capacity` ids, in the order they came until the ring is full;
    /// then `oldest` is where the next one goes. A position whose id was
    /// finished again or handed back stays in the ring, unindexed, until it
    /// is overwritten.
    ring: Vec<TaskId>,
    oldest: usize,
    /// The positions of the ids remembered, by their ids' hashes. Sparse:
    /// every id filed is first looked for, and is mostly not there.
    index: SlotIndex,
}

impl Default for RecentlyFinished {
    fn default() -> Self {
        RecentlyFinished::with_capacity(DEFAULT_CAPACITY)
    }
}

/// Whether `position` of `ring` holds `id`.
fn holds<'a>(ring: &'a [TaskId], id: &'a str) -> impl Fn(Slot) -> bool + 'a {
    move |position| bytes_eq(ring[position as usize].as_str().as_bytes(), id.as_bytes())
}

impl RecentlyFinished {
    pub fn with_capacity(capacity: usize) -> Self {
        RecentlyFinished {
            // Positions are index slots, and `Slot::MAX` is none.
            capacity: capacity.clamp(1, Slot::MAX as usize),
            ring: Vec::new(),
            oldest: 0,
            index: SlotIndex::sparse(),
        }
    }

    /// Remembers `id` as the newest; an id remembered already moves there.
    pub fn insert(&mut self, id: &TaskId) {
        let position = if self.ring.len() < self.capacity {
            self.ring.push(id.clone());
            self.ring.len() - 1
        } else {
            let position = self.oldest;
            self.oldest = (position + 1) % self.capacity;
            let evicted = &self.ring[position];
            // Only if the index still points here: a newer position of the
            // same id is kept.
            self.index
                .remove(short_hash(evicted), |p| p as usize == position);
            self.ring[position] = id.clone();
            position
        };
        let hash = short_hash(id);
        match self.index.entry(hash, holds(&self.ring, id)) {
            Err(vacant) => self.index.insert_vacant(vacant, hash, position as Slot),
            // The id finished before: its older position is left behind.
            Ok(_) => {
                self.index.remove(hash, holds(&self.ring, id));
                self.index.insert(hash, position as Slot);
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.index
            .find(short_hash(id), holds(&self.ring, id))
            .is_some()
    }

    /// Forgets `id` (its task was handed back by a poll).
    pub fn remove(&mut self, id: &str) -> bool {
        self.index
            .remove(short_hash(id), holds(&self.ring, id))
            .is_some()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_remembers_up_to_its_capacity_oldest_forgotten_first() {
        let mut r = RecentlyFinished::with_capacity(3);
        for id in ["a", "b", "c", "d"] {
            r.insert(&TaskId::from(id));
        }
        assert!(!r.contains("a"));
        assert!(r.contains("b") && r.contains("d"));
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn an_id_finished_again_is_kept_by_its_newer_entry() {
        let mut r = RecentlyFinished::with_capacity(2);
        r.insert(&TaskId::from("a"));
        r.insert(&TaskId::from("b"));
        r.insert(&TaskId::from("a"));
        r.insert(&TaskId::from("c")); // evicts the old "a" entry, then "b"
        assert!(r.contains("a") && r.contains("c") && !r.contains("b"));
        assert!(r.remove("a"));
        assert!(!r.contains("a"));
    }

    #[test]
    fn random_changes_agree_with_a_model_of_the_ring() {
        // The model: the last `capacity` ids filed, each live until filed
        // again or removed.
        use std::collections::VecDeque;
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            seed >> 33
        };
        for capacity in [1, 2, 5, 64] {
            let mut r = RecentlyFinished::with_capacity(capacity);
            let mut model: VecDeque<(String, bool)> = VecDeque::new();
            for _ in 0..20_000 {
                // Short ids and ones past the inline limit.
                let n = next() % 90;
                let id = if n % 2 == 0 {
                    format!("t{n}")
                } else {
                    format!("a-task-id-longer-than-15-{n}")
                };
                match next() % 4 {
                    0 => {
                        let removed = r.remove(&id);
                        let live = model.iter_mut().find(|(m, live)| *live && *m == id);
                        assert_eq!(removed, live.is_some());
                        if let Some((_, live)) = live {
                            *live = false;
                        }
                    }
                    _ => {
                        r.insert(&TaskId::from(id.as_str()));
                        for (m, live) in model.iter_mut() {
                            if *m == id {
                                *live = false;
                            }
                        }
                        model.push_back((id, true));
                        if model.len() > capacity {
                            model.pop_front();
                        }
                    }
                }
                let probe = format!("t{}", next() % 90);
                let expected = model.iter().any(|(m, live)| *live && *m == probe);
                assert_eq!(r.contains(&probe), expected, "{probe}");
                assert_eq!(r.len(), model.iter().filter(|(_, live)| *live).count());
                assert!(r.ring.len() <= capacity);
            }
        }
    }

    #[test]
    fn memory_stays_bounded_when_the_same_ids_repeat() {
        let mut r = RecentlyFinished::with_capacity(4);
        for _ in 0..1000 {
            r.insert(&TaskId::from("x"));
        }
        assert!(r.ring.len() <= 4);
        assert_eq!(r.len(), 1);
        assert!(r.contains("x"));
    }
}
