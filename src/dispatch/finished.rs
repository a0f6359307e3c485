//! The ids of tasks that finished lately, so that a stale report for one of
//! them changes nothing (SPEC §4.5 #4). Bounded: past `capacity` ids the
//! oldest is forgotten, so memory stays flat however long a dispatcher runs.

use std::collections::VecDeque;

use crate::hashing::FastMap;
use crate::retry::state::TaskId;

/// How many finished ids a dispatcher remembers (about 5 MiB at the most).
pub const DEFAULT_CAPACITY: usize = 65_536;

#[derive(Debug)]
pub struct RecentlyFinished {
    capacity: usize,
    /// id -> the stamp of its latest entry in `order`.
    ids: FastMap<TaskId, u64>,
    order: VecDeque<(u64, TaskId)>,
    next_stamp: u64,
}

impl Default for RecentlyFinished {
    fn default() -> Self {
        RecentlyFinished::with_capacity(DEFAULT_CAPACITY)
    }
}

impl RecentlyFinished {
    pub fn with_capacity(capacity: usize) -> Self {
        RecentlyFinished {
            capacity: capacity.max(1),
            ids: FastMap::default(),
            order: VecDeque::new(),
            next_stamp: 0,
        }
    }

    pub fn insert(&mut self, id: &TaskId) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.ids.insert(id.clone(), stamp);
        self.order.push_back((stamp, id.clone()));
        while self.ids.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((stamp, id)) = self.order.pop_front() else {
                break;
            };
            // An id finished again later has a newer stamp: keep it.
            if self.ids.get(&id) == Some(&stamp) {
                self.ids.remove(&id);
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    /// Forgets `id` (its task was handed back by a poll).
    pub fn remove(&mut self, id: &str) -> bool {
        self.ids.remove(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
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
    fn memory_stays_bounded_when_the_same_ids_repeat() {
        let mut r = RecentlyFinished::with_capacity(4);
        for _ in 0..1000 {
            r.insert(&TaskId::from("x"));
        }
        assert!(r.order.len() <= 8);
        assert_eq!(r.len(), 1);
    }
}
