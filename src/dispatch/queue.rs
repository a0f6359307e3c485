//! The ready queue: tasks in scheduling order, split by the pools a task
//! may use.
//!
//! Order is by priority (higher first) then age under the priority-ordered
//! policies, and by age alone under FIFO. Age is the task's `created_at` when
//! it has one, else the time it was first queued; ties keep arrival order.
//!
//! Tasks are kept per *route* — the set of pools their skill maps to — so a
//! scheduling pass looks at the head of each route whose pools have room and
//! never walks past tasks that cannot be placed: a pass costs O(picks x
//! routes x log n), not O(queued). Under fair share each route further keeps
//! one queue per spec name, so the round-robin finds the next spec with a
//! placeable task by a range lookup.
//!
//! The queue does not remember where a task is: the caller passes the task's
//! [`QueueKey`] to [`ReadyQueue::remove`] (the dispatcher holds it in the
//! task's entry), which keeps a queued task's cost to one 32-byte entry of a
//! [`SortedChunks`] (dense when tasks arrive in queue order). A
//! task is named by whatever the caller uses (`K`): the dispatcher queues
//! its tasks' slot numbers, 4 bytes each, not their ids.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use crate::dispatch::sorted_chunks::SortedChunks;
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

/// The pools a task may use, named by the skill-mapping key that routes it
/// (its skill, or `default`); `None` when any enabled pool may serve it.
pub type Route = Option<Arc<str>>;

/// Where a task sits in the queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueKey<'a> {
    pub order: QueueOrder,
    pub route: &'a Route,
    pub spec: &'a Arc<str>,
}

/// The sort key: (reversed priority or 0, age, seq); smaller goes first.
pub type Rank = (u64, i64, u64);

type Ordered<K> = SortedChunks<(Rank, K)>;

#[derive(Debug)]
enum Tasks<K> {
    Ordered(Ordered<K>),
    BySpec(BTreeMap<Arc<str>, Ordered<K>>),
}

#[derive(Debug)]
struct RouteQueue<K> {
    route: Route,
    tasks: Tasks<K>,
}

/// A route's index in the queue; stable until [`ReadyQueue::reset`].
pub type RouteIndex = usize;

#[derive(Debug)]
pub struct ReadyQueue<K = TaskId> {
    by_priority: bool,
    by_spec: bool,
    routes: Vec<RouteQueue<K>>,
    route_index: FastMap<Route, RouteIndex>,
    len: usize,
}

impl<K: Ord + Clone> ReadyQueue<K> {
    pub fn new(by_priority: bool, by_spec: bool) -> Self {
        ReadyQueue {
            by_priority,
            by_spec,
            routes: Vec::new(),
            route_index: FastMap::default(),
            len: 0,
        }
    }

    /// Empties the queue and sets how it orders; the caller queues its tasks
    /// again (after a policy or skill-mapping change).
    pub fn reset(&mut self, by_priority: bool, by_spec: bool) {
        *self = ReadyQueue::new(by_priority, by_spec);
    }

    pub fn by_priority(&self) -> bool {
        self.by_priority
    }

    pub fn by_spec(&self) -> bool {
        self.by_spec
    }

    fn rank(&self, o: QueueOrder) -> Rank {
        // Maps i64 onto u64 preserving order, then reverses it: higher first.
        let p = if self.by_priority {
            !((o.priority as u64) ^ (1 << 63))
        } else {
            0
        };
        (p, o.age, o.seq)
    }

    fn route_mut(&mut self, route: &Route) -> &mut RouteQueue<K> {
        let index = match self.route_index.get(route) {
            Some(&i) => i,
            None => {
                let i = self.routes.len();
                self.routes.push(RouteQueue {
                    route: route.clone(),
                    tasks: if self.by_spec {
                        Tasks::BySpec(BTreeMap::new())
                    } else {
                        Tasks::Ordered(SortedChunks::default())
                    },
                });
                self.route_index.insert(route.clone(), i);
                i
            }
        };
        &mut self.routes[index]
    }

    /// Adds a task; false (and no change) when it is already queued there.
    pub fn push(&mut self, id: K, key: QueueKey<'_>) -> bool {
        let rank = self.rank(key.order);
        let added = match &mut self.route_mut(key.route).tasks {
            Tasks::Ordered(set) => set.insert((rank, id)),
            Tasks::BySpec(specs) => specs
                .entry(key.spec.clone())
                .or_default()
                .insert((rank, id)),
        };
        self.len += usize::from(added);
        added
    }

    /// Removes a task queued with `key`; false when it is not there.
    pub fn remove(&mut self, id: &K, key: QueueKey<'_>) -> bool {
        let rank = self.rank(key.order);
        let Some(&index) = self.route_index.get(key.route) else {
            return false;
        };
        let entry = (rank, id.clone());
        let removed = match &mut self.routes[index].tasks {
            Tasks::Ordered(set) => set.remove(&entry),
            Tasks::BySpec(specs) => remove_by_spec(specs, key.spec, &entry),
        };
        self.len -= usize::from(removed);
        removed
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The routes that hold tasks, with their index.
    pub fn routes(&self) -> impl Iterator<Item = (RouteIndex, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| match &r.tasks {
                Tasks::Ordered(set) => !set.is_empty(),
                Tasks::BySpec(specs) => !specs.is_empty(),
            })
            .map(|(i, r)| (i, &r.route))
    }

    /// The rank of a route's first task (priority or FIFO order).
    pub fn head(&self, route: RouteIndex) -> Option<Rank> {
        match &self.routes[route].tasks {
            Tasks::Ordered(set) => set.first().map(|(rank, _)| *rank),
            Tasks::BySpec(_) => None,
        }
    }

    /// Takes a route's first task.
    pub fn pop_head(&mut self, route: RouteIndex) -> Option<K> {
        let taken = match &mut self.routes[route].tasks {
            Tasks::Ordered(set) => set.pop_first().map(|(_, id)| id),
            Tasks::BySpec(_) => None,
        };
        self.len -= usize::from(taken.is_some());
        taken
    }

    /// Fair share: the first spec name after `after` (cyclically, in name
    /// order) with tasks on this route, and whether the search wrapped.
    pub fn next_spec(
        &self,
        route: RouteIndex,
        after: Option<&Arc<str>>,
    ) -> Option<(bool, &Arc<str>)> {
        let Tasks::BySpec(specs) = &self.routes[route].tasks else {
            return None;
        };
        let later = match after {
            Some(a) => specs
                .range::<Arc<str>, _>((Bound::Excluded(a), Bound::Unbounded))
                .next(),
            None => specs.iter().next(),
        };
        match later {
            Some((spec, _)) => Some((false, spec)),
            None => specs.keys().next().map(|spec| (true, spec)),
        }
    }

    /// Fair share: the rank of the first task of `spec` on this route.
    pub fn spec_head(&self, route: RouteIndex, spec: &str) -> Option<Rank> {
        match &self.routes[route].tasks {
            Tasks::BySpec(specs) => specs.get(spec).and_then(|s| s.first()).map(|(r, _)| *r),
            Tasks::Ordered(_) => None,
        }
    }

    /// Fair share: takes the first task of `spec` on this route.
    pub fn pop_spec_head(&mut self, route: RouteIndex, spec: &str) -> Option<K> {
        let taken = match &mut self.routes[route].tasks {
            Tasks::BySpec(specs) => {
                let queue = specs.get_mut(spec)?;
                let taken = queue.pop_first().map(|(_, id)| id);
                if queue.is_empty() {
                    specs.remove(spec);
                }
                taken
            }
            Tasks::Ordered(_) => None,
        };
        self.len -= usize::from(taken.is_some());
        taken
    }

    /// Task ids in scheduling order (merged across routes and specs);
    /// O(n log n), for status and snapshots.
    pub fn ids_in_order(&self) -> Vec<K> {
        let mut all: Vec<&(Rank, K)> = Vec::with_capacity(self.len);
        for r in &self.routes {
            match &r.tasks {
                Tasks::Ordered(set) => all.extend(set.iter()),
                Tasks::BySpec(specs) => specs.values().for_each(|s| all.extend(s.iter())),
            }
        }
        all.sort_unstable();
        all.into_iter().map(|(_, id)| id.clone()).collect()
    }
}

fn remove_by_spec<K: Ord>(
    specs: &mut BTreeMap<Arc<str>, Ordered<K>>,
    spec: &str,
    entry: &(Rank, K),
) -> bool {
    let Some(queue) = specs.get_mut(spec) else {
        return false;
    };
    let removed = queue.remove(entry);
    if queue.is_empty() {
        specs.remove(spec);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(priority: i64, age: i64, seq: u64) -> QueueOrder {
        QueueOrder { priority, age, seq }
    }

    fn push(q: &mut ReadyQueue, id: &str, o: QueueOrder, route: &Route, spec: &str) -> bool {
        q.push(
            id.into(),
            QueueKey {
                order: o,
                route,
                spec: &spec.into(),
            },
        )
    }

    fn ids(q: &ReadyQueue) -> Vec<String> {
        q.ids_in_order().iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn priority_first_then_oldest_across_routes() {
        let mut q = ReadyQueue::new(true, false);
        let gpu: Route = Some("gpu".into());
        push(&mut q, "low-old", order(1, 10, 0), &None, "s");
        push(&mut q, "high-new", order(5, 30, 1), &gpu, "s");
        push(&mut q, "high-old", order(5, 20, 2), &None, "s");
        push(&mut q, "negative", order(-3, 0, 3), &gpu, "s");
        push(&mut q, "min", order(i64::MIN, 0, 4), &gpu, "s");
        push(&mut q, "max", order(i64::MAX, 99, 5), &None, "s");
        assert_eq!(
            ids(&q),
            ["max", "high-old", "high-new", "low-old", "negative", "min"]
        );
        let heads: Vec<_> = q.routes().map(|(i, _)| q.head(i).unwrap()).collect();
        assert!(
            heads[0] < heads[1],
            "the route without a skill holds the first task"
        );
    }

    #[test]
    fn fifo_ignores_priority() {
        let mut q = ReadyQueue::new(false, false);
        push(&mut q, "a", order(1, 10, 0), &None, "s");
        push(&mut q, "b", order(9, 20, 1), &None, "s");
        assert_eq!(ids(&q), ["a", "b"]);
    }

    #[test]
    fn duplicates_are_refused_and_any_task_can_leave() {
        let mut q = ReadyQueue::new(true, false);
        let o = order(0, 1, 2);
        assert!(push(&mut q, "a", order(0, 0, 0), &None, "s"));
        assert!(!push(&mut q, "a", order(0, 0, 0), &None, "s"));
        push(&mut q, "b", o, &None, "s");
        let spec: Arc<str> = "s".into();
        let key = QueueKey {
            order: o,
            route: &None,
            spec: &spec,
        };
        assert!(q.remove(&"b".into(), key));
        assert!(!q.remove(&"b".into(), key));
        assert_eq!(ids(&q), ["a"]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn heads_pop_in_order_and_empty_routes_are_not_listed() {
        let mut q = ReadyQueue::new(true, false);
        push(&mut q, "a", order(0, 0, 0), &None, "s");
        push(&mut q, "b", order(0, 1, 1), &None, "s");
        let (route, _) = q.routes().next().unwrap();
        assert_eq!(q.pop_head(route).as_deref(), Some("a"));
        assert_eq!(q.pop_head(route).as_deref(), Some("b"));
        assert_eq!(q.pop_head(route), None);
        assert_eq!(q.routes().count(), 0);
        assert!(q.is_empty());
    }

    #[test]
    fn fair_share_finds_the_next_spec_cyclically() {
        let mut q = ReadyQueue::new(true, true);
        push(&mut q, "a1", order(0, 0, 0), &None, "alpha");
        push(&mut q, "g1", order(0, 1, 1), &None, "gamma");
        let (route, _) = q.routes().next().unwrap();
        let next = |q: &ReadyQueue, after: Option<&str>| {
            let after: Option<Arc<str>> = after.map(Into::into);
            q.next_spec(route, after.as_ref())
                .map(|(w, s)| (w, s.to_string()))
        };
        assert_eq!(next(&q, None), Some((false, "alpha".into())));
        assert_eq!(next(&q, Some("alpha")), Some((false, "gamma".into())));
        assert_eq!(next(&q, Some("beta")), Some((false, "gamma".into())));
        assert_eq!(next(&q, Some("gamma")), Some((true, "alpha".into())));
        assert_eq!(q.pop_spec_head(route, "gamma").as_deref(), Some("g1"));
        assert_eq!(next(&q, Some("alpha")), Some((true, "alpha".into())));
        assert_eq!(q.spec_head(route, "gamma"), None);
        assert_eq!(q.len(), 1);
    }
}
