//! The ready queue: task ids in scheduling order.
//!
//! Order is by priority (higher first) then age under the PRIORITY policy, and by
//! age alone otherwise. Age is the task's `created_at` when it has one, else the
//! time it was first queued; ties keep arrival order. Removing any task, not only
//! the head, is O(log n): a scheduling pass takes the task it chose, not the head.

use std::collections::BTreeSet;

use crate::hashing::FastMap;

use crate::retry::state::TaskId;

/// What the queue needs to know to order a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOrder {
    pub priority: i64,
    /// Microseconds of the task's age reference (smaller is older).
    pub age: i64,
    /// Arrival order, unique per task.
    pub seq: u64,
}

/// The sort key: (-priority or 0, age, seq).
type Rank = (i128, i64, u64);

#[derive(Debug, Default)]
pub struct ReadyQueue {
    by_priority: bool,
    ranks: FastMap<TaskId, (Rank, QueueOrder)>,
    order: BTreeSet<(Rank, TaskId)>,
}

impl ReadyQueue {
    pub fn new(by_priority: bool) -> Self {
        ReadyQueue {
            by_priority,
            ..Default::default()
        }
    }

    fn rank(&self, o: QueueOrder) -> Rank {
        let p = if self.by_priority {
            -i128::from(o.priority)
        } else {
            0
        };
        (p, o.age, o.seq)
    }

    /// Switches between priority and age order; O(n log n).
    pub fn set_by_priority(&mut self, by_priority: bool) {
        if self.by_priority == by_priority {
            return;
        }
        self.by_priority = by_priority;
        let entries: Vec<(TaskId, QueueOrder)> = self
            .ranks
            .drain()
            .map(|(id, (_, order))| (id, order))
            .collect();
        self.order.clear();
        for (id, order) in entries {
            self.push(id, order);
        }
    }

    /// Adds a task; false (and no change) when it is already queued.
    pub fn push(&mut self, id: TaskId, order: QueueOrder) -> bool {
        if self.ranks.contains_key(&id) {
            return false;
        }
        let rank = self.rank(order);
        self.order.insert((rank, id.clone()));
        self.ranks.insert(id, (rank, order));
        true
    }

    pub fn remove(&mut self, id: &str) -> bool {
        match self.ranks.remove_entry(id) {
            Some((id, (rank, _))) => {
                self.order.remove(&(rank, id));
                true
            }
            None => false,
        }
    }

    /// Changes a queued task's priority; false when it is not queued.
    pub fn set_priority(&mut self, id: &str, priority: i64) -> bool {
        let Some((id, (_, order))) = self.ranks.get_key_value(id).map(|(k, v)| (k.clone(), *v))
        else {
            return false;
        };
        self.remove(&id);
        self.push(id, QueueOrder { priority, ..order });
        true
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ranks.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    /// Task ids in scheduling order.
    pub fn iter(&self) -> impl Iterator<Item = &TaskId> {
        self.order.iter().map(|(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(priority: i64, age: i64, seq: u64) -> QueueOrder {
        QueueOrder { priority, age, seq }
    }

    fn ids(q: &ReadyQueue) -> Vec<String> {
        q.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn priority_first_then_oldest() {
        let mut q = ReadyQueue::new(true);
        q.push("low-old".into(), order(1, 10, 0));
        q.push("high-new".into(), order(5, 30, 1));
        q.push("high-old".into(), order(5, 20, 2));
        q.push("negative".into(), order(-3, 0, 3));
        assert_eq!(ids(&q), ["high-old", "high-new", "low-old", "negative"]);
    }

    #[test]
    fn fifo_ignores_priority_and_switching_reorders() {
        let mut q = ReadyQueue::new(false);
        q.push("a".into(), order(1, 10, 0));
        q.push("b".into(), order(9, 20, 1));
        assert_eq!(ids(&q), ["a", "b"]);
        q.set_by_priority(true);
        assert_eq!(ids(&q), ["b", "a"]);
    }

    #[test]
    fn duplicates_are_refused_and_any_task_can_leave() {
        let mut q = ReadyQueue::new(true);
        assert!(q.push("a".into(), order(0, 0, 0)));
        assert!(!q.push("a".into(), order(9, 0, 1)));
        q.push("b".into(), order(0, 1, 2));
        assert!(q.remove("b"));
        assert!(!q.remove("b"));
        assert_eq!(ids(&q), ["a"]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn changing_priority_moves_the_task() {
        let mut q = ReadyQueue::new(true);
        q.push("a".into(), order(1, 0, 0));
        q.push("b".into(), order(2, 1, 1));
        assert!(q.set_priority("a", 3));
        assert_eq!(ids(&q), ["a", "b"]);
        assert!(!q.set_priority("zzz", 3));
    }
}
