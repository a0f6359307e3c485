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
//! The queue holds only what names a task (`K`; the dispatcher's slot
//! numbers, 4 bytes each) in a [`SortedChunks`]: its order is read from the
//! task's own entry by the `order_of` each call is given, and the caller
//! passes a task's [`QueueKey`] to [`ReadyQueue::remove`]. So a queued task
//! costs 4 bytes here (dense when tasks arrive in queue order), not a
//! 32-byte (rank, slot) pair. A task's order must not change while it is
//! queued: the dispatcher takes it out, changes it, and puts it back.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use crate::dispatch::sorted_chunks::SortedChunks;
use crate::hashing::FastMap;

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

type Ordered<K> = SortedChunks<K>;

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
pub struct ReadyQueue<K> {
    by_priority: bool,
    by_spec: bool,
    routes: Vec<RouteQueue<K>>,
    route_index: FastMap<Route, RouteIndex>,
    len: usize,
}

impl<K: Eq + Clone> ReadyQueue<K> {
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
        rank(self.by_priority, o)
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
    /// `order_of` gives the order of each task queued.
    pub fn push(&mut self, id: K, key: QueueKey<'_>, order_of: impl Fn(&K) -> QueueOrder) -> bool {
        let cmp = against(self.rank(key.order), order_of, self.by_priority);
        let added = match &mut self.route_mut(key.route).tasks {
            Tasks::Ordered(set) => set.insert_by(id, |held, new| cmp(held, new)),
            Tasks::BySpec(specs) => specs
                .entry(key.spec.clone())
                .or_default()
                .insert_by(id, |held, new| cmp(held, new)),
        };
        self.len += usize::from(added);
        added
    }

    /// Removes a task queued with `key`; false when it is not there.
    pub fn remove(
        &mut self,
        id: &K,
        key: QueueKey<'_>,
        order_of: impl Fn(&K) -> QueueOrder,
    ) -> bool {
        let Some(&index) = self.route_index.get(key.route) else {
            return false;
        };
        let cmp = against(self.rank(key.order), order_of, self.by_priority);
        let found = |held: &K| cmp(held, id);
        let removed = match &mut self.routes[index].tasks {
            Tasks::Ordered(set) => set.remove_by(found).is_some(),
            Tasks::BySpec(specs) => remove_by_spec(specs, key.spec, found),
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
    pub fn head(&self, route: RouteIndex, order_of: impl Fn(&K) -> QueueOrder) -> Option<Rank> {
        match &self.routes[route].tasks {
            Tasks::Ordered(set) => set.first().map(|id| self.rank(order_of(id))),
            Tasks::BySpec(_) => None,
        }
    }

    /// Takes a route's first task.
    pub fn pop_head(&mut self, route: RouteIndex) -> Option<K> {
        let taken = match &mut self.routes[route].tasks {
            Tasks::Ordered(set) => set.pop_first(),
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
    pub fn spec_head(
        &self,
        route: RouteIndex,
        spec: &str,
        order_of: impl Fn(&K) -> QueueOrder,
    ) -> Option<Rank> {
        match &self.routes[route].tasks {
            Tasks::BySpec(specs) => specs
                .get(spec)
                .and_then(|s| s.first())
                .map(|id| self.rank(order_of(id))),
            Tasks::Ordered(_) => None,
        }
    }

    /// Fair share: takes the first task of `spec` on this route.
    pub fn pop_spec_head(&mut self, route: RouteIndex, spec: &str) -> Option<K> {
        let taken = match &mut self.routes[route].tasks {
            Tasks::BySpec(specs) => {
                let queue = specs.get_mut(spec)?;
                let taken = queue.pop_first();
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

    /// Whether every sub-queue is in the order `order_of` gives now: false
    /// when a task's order changed while it was queued (for
    /// `check_invariants`).
    pub fn in_order(&self, order_of: impl Fn(&K) -> QueueOrder) -> bool {
        let sorted = |set: &Ordered<K>| {
            let ranks: Vec<Rank> = set.iter().map(|id| self.rank(order_of(id))).collect();
            ranks.windows(2).all(|w| w[0] < w[1])
        };
        self.routes.iter().all(|r| match &r.tasks {
            Tasks::Ordered(set) => sorted(set),
            Tasks::BySpec(specs) => specs.values().all(sorted),
        })
    }

    /// Task ids in scheduling order (merged across routes and specs);
    /// O(n log n), for status and snapshots.
    pub fn ids_in_order(&self, order_of: impl Fn(&K) -> QueueOrder) -> Vec<K> {
        let sets = self.routes.iter().flat_map(|r| match &r.tasks {
            Tasks::Ordered(set) => vec![set],
            Tasks::BySpec(specs) => specs.values().collect(),
        });
        let mut all: Vec<(Rank, &K)> = Vec::with_capacity(self.len);
        for set in sets {
            all.extend(set.iter().map(|id| (self.rank(order_of(id)), id)));
        }
        // Ranks are unique (a task's arrival number is in it).
        all.sort_unstable_by_key(|(rank, _)| *rank);
        all.into_iter().map(|(_, id)| id.clone()).collect()
    }
}

/// A task's [`Rank`] under the queue's policy.
fn rank(by_priority: bool, o: QueueOrder) -> Rank {
    // Maps i64 onto u64 preserving order, then reverses it: higher first.
    let p = if by_priority {
        !((o.priority as u64) ^ (1 << 63))
    } else {
        0
    };
    (p, o.age, o.seq)
}

/// How a queued task compares to one whose rank is `target`: by rank, and
/// the task itself equal whatever its entry says (its entry may be gone
/// already, when it leaves).
fn against<K: Eq>(
    target: Rank,
    order_of: impl Fn(&K) -> QueueOrder,
    by_priority: bool,
) -> impl Fn(&K, &K) -> Ordering {
    move |held, task| match held == task {
        true => Ordering::Equal,
        false => rank(by_priority, order_of(held)).cmp(&target),
    }
}

fn remove_by_spec<K>(
    specs: &mut BTreeMap<Arc<str>, Ordered<K>>,
    spec: &str,
    found: impl Fn(&K) -> Ordering,
) -> bool {
    let Some(queue) = specs.get_mut(spec) else {
        return false;
    };
    let removed = queue.remove_by(found).is_some();
    if queue.is_empty() {
        specs.remove(spec);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued task that carries its own order, as a dispatcher's entry does.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Task(&'static str, QueueOrder);

    fn order_of(t: &Task) -> QueueOrder {
        t.1
    }

    fn task(name: &'static str, priority: i64, age: i64, seq: u64) -> Task {
        Task(name, QueueOrder { priority, age, seq })
    }

    fn key<'a>(t: Task, route: &'a Route, spec: &'a Arc<str>) -> QueueKey<'a> {
        QueueKey {
            order: t.1,
            route,
            spec,
        }
    }

    fn push(q: &mut ReadyQueue<Task>, t: Task, route: &Route, spec: &str) -> bool {
        q.push(t, key(t, route, &spec.into()), order_of)
    }

    fn names(q: &ReadyQueue<Task>) -> Vec<&'static str> {
        q.ids_in_order(order_of).iter().map(|t| t.0).collect()
    }

    #[test]
    fn priority_first_then_oldest_across_routes() {
        let mut q = ReadyQueue::new(true, false);
        let gpu: Route = Some("gpu".into());
        push(&mut q, task("low-old", 1, 10, 0), &None, "s");
        push(&mut q, task("high-new", 5, 30, 1), &gpu, "s");
        push(&mut q, task("high-old", 5, 20, 2), &None, "s");
        push(&mut q, task("negative", -3, 0, 3), &gpu, "s");
        push(&mut q, task("min", i64::MIN, 0, 4), &gpu, "s");
        push(&mut q, task("max", i64::MAX, 99, 5), &None, "s");
        assert_eq!(
            names(&q),
            ["max", "high-old", "high-new", "low-old", "negative", "min"]
        );
        let heads: Vec<_> = q
            .routes()
            .map(|(i, _)| q.head(i, order_of).unwrap())
            .collect();
        assert!(
            heads[0] < heads[1],
            "the route without a skill holds the first task"
        );
    }

    #[test]
    fn fifo_ignores_priority() {
        let mut q = ReadyQueue::new(false, false);
        push(&mut q, task("a", 1, 10, 0), &None, "s");
        push(&mut q, task("b", 9, 20, 1), &None, "s");
        assert_eq!(names(&q), ["a", "b"]);
    }

    #[test]
    fn equal_age_keeps_arrival_order() {
        let mut q = ReadyQueue::new(true, false);
        push(&mut q, task("second", 0, 5, 2), &None, "s");
        push(&mut q, task("first", 0, 5, 1), &None, "s");
        push(&mut q, task("third", 0, 5, 3), &None, "s");
        assert_eq!(names(&q), ["first", "second", "third"]);
    }

    #[test]
    fn duplicates_are_refused_and_any_task_can_leave() {
        let mut q = ReadyQueue::new(true, false);
        let a = task("a", 0, 0, 0);
        let b = task("b", 0, 1, 2);
        assert!(push(&mut q, a, &None, "s"));
        assert!(!push(&mut q, a, &None, "s"));
        push(&mut q, b, &None, "s");
        let spec: Arc<str> = "s".into();
        assert!(q.remove(&b, key(b, &None, &spec), order_of));
        assert!(!q.remove(&b, key(b, &None, &spec), order_of));
        assert_eq!(names(&q), ["a"]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_task_leaves_by_its_key_even_when_its_entry_says_otherwise() {
        // The dispatcher may take a task's entry away before the task leaves
        // the queue: the task is found by the key it was queued with.
        let mut q = ReadyQueue::new(true, false);
        for (i, name) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            push(&mut q, task(name, 0, i as i64, i as u64), &None, "s");
        }
        let c = task("c", 0, 2, 2);
        let spec: Arc<str> = "s".into();
        // What `order_of` reads for "c" now would place it last.
        let gone = |t: &Task| match t.0 {
            "c" => QueueOrder {
                priority: i64::MIN,
                age: i64::MAX,
                seq: u64::MAX,
            },
            _ => t.1,
        };
        assert!(q.remove(&c, key(c, &None, &spec), gone));
        assert_eq!(names(&q), ["a", "b", "d", "e"]);
    }

    #[test]
    fn an_order_changed_while_queued_is_noticed() {
        let mut q = ReadyQueue::new(true, true);
        push(&mut q, task("a", 5, 0, 0), &None, "s");
        push(&mut q, task("b", 1, 1, 1), &None, "s");
        assert!(q.in_order(order_of));
        // "b" raised above "a" behind the queue's back.
        let raised = |t: &Task| match t.0 {
            "b" => QueueOrder { priority: 9, ..t.1 },
            _ => t.1,
        };
        assert!(!q.in_order(raised));
    }

    #[test]
    fn heads_pop_in_order_and_empty_routes_are_not_listed() {
        let mut q = ReadyQueue::new(true, false);
        push(&mut q, task("a", 0, 0, 0), &None, "s");
        push(&mut q, task("b", 0, 1, 1), &None, "s");
        let (route, _) = q.routes().next().unwrap();
        assert_eq!(q.pop_head(route).map(|t| t.0), Some("a"));
        assert_eq!(q.pop_head(route).map(|t| t.0), Some("b"));
        assert_eq!(q.pop_head(route), None);
        assert_eq!(q.routes().count(), 0);
        assert!(q.is_empty());
    }

    #[test]
    fn fair_share_finds_the_next_spec_cyclically() {
        let mut q = ReadyQueue::new(true, true);
        push(&mut q, task("a1", 0, 0, 0), &None, "alpha");
        push(&mut q, task("g1", 0, 1, 1), &None, "gamma");
        let (route, _) = q.routes().next().unwrap();
        let next = |q: &ReadyQueue<Task>, after: Option<&str>| {
            let after: Option<Arc<str>> = after.map(Into::into);
            q.next_spec(route, after.as_ref())
                .map(|(w, s)| (w, s.to_string()))
        };
        assert_eq!(next(&q, None), Some((false, "alpha".into())));
        assert_eq!(next(&q, Some("alpha")), Some((false, "gamma".into())));
        assert_eq!(next(&q, Some("beta")), Some((false, "gamma".into())));
        assert_eq!(next(&q, Some("gamma")), Some((true, "alpha".into())));
        assert_eq!(q.pop_spec_head(route, "gamma").map(|t| t.0), Some("g1"));
        assert_eq!(next(&q, Some("alpha")), Some((true, "alpha".into())));
        assert_eq!(q.spec_head(route, "gamma", order_of), None);
        assert_eq!(q.len(), 1);
    }
}
