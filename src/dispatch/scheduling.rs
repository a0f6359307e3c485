//! Scheduling: which queued tasks go to which pools in one pass (SPEC §4.4).
//!
//! A pass works on a copy of the pools' loads and the global budget, so it
//! can never plan past a limit; the dispatcher then reserves what was planned.

use std::collections::HashMap;
use std::sync::Arc;

use crate::dispatch::pools::{PoolIndex, Pools};
use crate::dispatch::queue::{QueueOrder, ReadyQueue, Route, RouteIndex};

/// How queued tasks are ordered and taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Oldest first.
    Fifo,
    /// Higher priority first, equal priority oldest first.
    Priority,
    /// Priority order; the point is the routing by `required_skill`.
    SkillBased,
    /// Round-robin across spec names, priority order within one spec.
    FairShare,
}

impl Policy {
    pub const ALL: [Policy; 4] = [
        Policy::Fifo,
        Policy::Priority,
        Policy::SkillBased,
        Policy::FairShare,
    ];

    /// The `SchedulingPolicy` enum value.
    pub fn value(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::Priority => "priority",
            Policy::SkillBased => "skill-based",
            Policy::FairShare => "fair-share",
        }
    }

    pub fn from_value(value: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.value() == value)
    }

    /// Whether the ready queue orders by priority under this policy.
    pub fn orders_by_priority(self) -> bool {
        self != Policy::Fifo
    }
}

/// `skill_mapping`: skill name to the pools that serve it. The key `default`
/// serves tasks whose skill has no entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkillMapping {
    pools_by_skill: HashMap<Arc<str>, Vec<PoolIndex>>,
}

impl SkillMapping {
    pub fn new(entries: impl IntoIterator<Item = (Arc<str>, Vec<PoolIndex>)>) -> Self {
        SkillMapping {
            pools_by_skill: entries.into_iter().collect(),
        }
    }

    /// The pools a task may use: its skill's, else `default`'s; `None` means
    /// any enabled pool.
    pub fn pools_for(&self, skill: Option<&str>) -> Option<&[PoolIndex]> {
        skill
            .and_then(|s| self.pools_by_skill.get(s))
            .or_else(|| self.pools_by_skill.get("default"))
            .map(Vec::as_slice)
    }
}

#[derive(Clone, Copy, Debug)]
struct Load {
    running: u64,
    max: u64,
    enabled: bool,
}

impl Load {
    fn has_room(&self) -> bool {
        self.enabled && self.running < self.max
    }
}

/// One scheduling pass over a snapshot of the loads.
struct Pass<'m, K> {
    loads: Vec<Load>,
    budget: u64,
    mapping: &'m SkillMapping,
    picks: Vec<(K, PoolIndex)>,
}

impl<'m, K> Pass<'m, K> {
    /// A pass over a copy of the pools' loads: planning never touches them.
    fn new(pools: &Pools, budget: u64, mapping: &'m SkillMapping) -> Self {
        Pass {
            loads: pools
                .iter()
                .map(|(_, p)| Load {
                    running: p.running,
                    max: p.max_concurrency,
                    enabled: p.enabled,
                })
                .collect(),
            budget,
            mapping,
            picks: Vec::new(),
        }
    }

    fn exhausted(&self) -> bool {
        self.budget == 0 || !self.loads.iter().any(Load::has_room)
    }

    /// Calls `f` with each pool a route may use.
    fn route_pools(&self, route: &Route, f: impl FnMut(PoolIndex)) {
        match route {
            Some(key) => self
                .mapping
                .pools_by_skill
                .get(key)
                .into_iter()
                .flatten()
                .copied()
                .for_each(f),
            None => (0..self.loads.len()).for_each(f),
        }
    }

    /// The least loaded pool with room on the route: lowest utilisation,
    /// then fewest running, then configuration order.
    fn choose(&self, route: &Route) -> Option<PoolIndex> {
        let better = |a: PoolIndex, b: PoolIndex| {
            let (la, lb) = (&self.loads[a], &self.loads[b]);
            let ua = u128::from(la.running) * u128::from(lb.max);
            let ub = u128::from(lb.running) * u128::from(la.max);
            (ua, la.running, a) < (ub, lb.running, b)
        };
        let mut best: Option<PoolIndex> = None;
        self.route_pools(route, |i| {
            if self.loads.get(i).is_some_and(Load::has_room) && best.is_none_or(|b| better(i, b)) {
                best = Some(i);
            }
        });
        best
    }

    fn has_room(&self, route: &Route) -> bool {
        self.choose(route).is_some()
    }

    /// Plans `id` into the route's best pool, which has room.
    fn place(&mut self, id: K, route: &Route) {
        let pool = self
            .choose(route)
            .expect("placed only on a route with room");
        self.loads[pool].running += 1;
        self.budget -= 1;
        self.picks.push((id, pool));
    }
}

/// The scheduler's own state: the policy and where fair share left off.
#[derive(Clone, Debug)]
pub struct Scheduler {
    pub policy: Policy,
    pub mapping: SkillMapping,
    /// The spec name fair share served last; the next pass starts after it.
    last_spec: Option<Arc<str>>,
}

impl Scheduler {
    pub fn new(policy: Policy, mapping: SkillMapping) -> Self {
        Scheduler {
            policy,
            mapping,
            last_spec: None,
        }
    }

    /// The route of a task with this skill: its skill's mapping key, else
    /// `default`'s, else any pool.
    pub fn route_of(&self, skill: Option<&str>) -> Route {
        let key = |k: &str| {
            self.mapping
                .pools_by_skill
                .get_key_value(k)
                .map(|(k, _)| k.clone())
        };
        skill.and_then(key).or_else(|| key("default"))
    }

    /// Plans one pass and takes the planned tasks out of `queue`: `(task id,
    /// pool)` pairs, at most `budget` of them, no pool past its
    /// `max_concurrency`. A task none of whose pools has room stays queued
    /// and does not block the tasks behind it; its route is not looked at
    /// again in the pass, so the pass costs O(picks x routes x log n).
    pub fn plan<K: Eq + Clone>(
        &mut self,
        queue: &mut ReadyQueue<K>,
        order_of: impl Fn(&K) -> QueueOrder,
        pools: &Pools,
        budget: u64,
    ) -> Vec<(K, PoolIndex)> {
        let mut pass = Pass::new(pools, budget, &self.mapping);
        if queue.by_spec() {
            self.last_spec = fair_share(&mut pass, queue, &order_of, self.last_spec.take());
        } else {
            in_queue_order(&mut pass, queue, &order_of);
        }
        pass.picks
    }
}

/// Routes that hold tasks and whose pools have room (pools only fill up
/// during a pass, so a route once full stays out of it).
fn open_routes<K: Eq + Clone>(
    pass: &Pass<'_, K>,
    queue: &ReadyQueue<K>,
) -> Vec<(RouteIndex, Route)> {
    queue
        .routes()
        .filter(|(_, route)| pass.has_room(route))
        .map(|(i, route)| (i, route.clone()))
        .collect()
}

/// Queue order: repeatedly the first task among the open routes' heads.
fn in_queue_order<K: Eq + Clone>(
    pass: &mut Pass<'_, K>,
    queue: &mut ReadyQueue<K>,
    order_of: &impl Fn(&K) -> QueueOrder,
) {
    let mut open = open_routes(pass, queue);
    while !pass.exhausted() {
        open.retain(|(i, route)| queue.head(*i, order_of).is_some() && pass.has_room(route));
        let Some((i, route)) = open.iter().min_by_key(|(i, _)| queue.head(*i, order_of)) else {
            break;
        };
        let id = queue.pop_head(*i).expect("an open route has a head");
        pass.place(id, route);
    }
}

/// Round-robin across spec names (in name order, starting after the one
/// served last), each spec's tasks in queue order; a spec with no task that
/// fits is passed over. Returns the spec served last.
fn fair_share<K: Eq + Clone>(
    pass: &mut Pass<'_, K>,
    queue: &mut ReadyQueue<K>,
    order_of: &impl Fn(&K) -> QueueOrder,
    mut last: Option<Arc<str>>,
) -> Option<Arc<str>> {
    let mut open = open_routes(pass, queue);
    while !pass.exhausted() {
        open.retain(|(_, route)| pass.has_room(route));
        // The spec that comes next after `last` on any open route.
        let Some(spec) = open
            .iter()
            .filter_map(|(i, _)| queue.next_spec(*i, last.as_ref()))
            .min()
            .map(|(_, spec)| spec.clone())
        else {
            break;
        };
        // Its first task among the open routes.
        let (i, route) = open
            .iter()
            .filter_map(|(i, route)| {
                queue
                    .spec_head(*i, &spec, order_of)
                    .map(|rank| (rank, *i, route))
            })
            .min_by_key(|(rank, _, _)| *rank)
            .map(|(_, i, route)| (i, route.clone()))
            .expect("the spec was found on an open route");
        let id = queue.pop_spec_head(i, &spec).expect("the spec has a head");
        pass.place(id, &route);
        last = Some(spec);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::pools::PoolState;
    use crate::dispatch::queue::{QueueKey, QueueOrder};
    use crate::retry::state::TaskId;

    fn pools(spec: &[(&str, u64, u64)]) -> Pools {
        Pools::new(spec.iter().map(|&(name, max, running)| PoolState {
            running,
            ..PoolState::new(name, "local-process", max)
        }))
    }

    /// A queue and the order of each task it holds, as a dispatcher keeps
    /// them.
    struct Queued {
        q: ReadyQueue<TaskId>,
        orders: HashMap<TaskId, QueueOrder>,
    }

    impl Queued {
        fn order_of(&self) -> impl Fn(&TaskId) -> QueueOrder + '_ {
            |id| self.orders[id]
        }

        fn ids_in_order(&self) -> Vec<String> {
            let ids = self.q.ids_in_order(self.order_of());
            ids.iter().map(|id| id.to_string()).collect()
        }
    }

    /// A queue as the dispatcher would build it for `s`, in the given order.
    fn queue(s: &Scheduler, tasks: &[(&str, &str, Option<&str>)]) -> Queued {
        let mut q = Queued {
            q: ReadyQueue::new(s.policy.orders_by_priority(), s.policy == Policy::FairShare),
            orders: HashMap::new(),
        };
        for (seq, &(id, spec, skill)) in tasks.iter().enumerate() {
            let order = arrival(seq);
            q.orders.insert(id.into(), order);
            let route = s.route_of(skill);
            let key = QueueKey {
                order,
                route: &route,
                spec: &spec.into(),
            };
            let orders = &q.orders;
            q.q.push(id.into(), key, |id| orders[id]);
        }
        q
    }

    /// The n-th task to arrive: priority 0, age 0 (also for `route_tests`).
    pub(super) fn arrival(n: usize) -> QueueOrder {
        QueueOrder {
            priority: 0,
            age: 0,
            seq: n as u64,
        }
    }

    /// `s.plan` of the tasks queued in `q`.
    fn plan(
        s: &mut Scheduler,
        q: &mut Queued,
        pools: &Pools,
        budget: u64,
    ) -> Vec<(TaskId, PoolIndex)> {
        let orders = &q.orders;
        s.plan(&mut q.q, |id| orders[id], pools, budget)
    }

    fn names(picks: &[(TaskId, PoolIndex)], pools: &Pools) -> Vec<String> {
        picks
            .iter()
            .map(|(id, p)| format!("{id}@{}", pools.get(*p).name))
            .collect()
    }

    #[test]
    fn policy_values_round_trip() {
        for p in Policy::ALL {
            assert_eq!(Policy::from_value(p.value()), Some(p));
        }
        assert_eq!(Policy::from_value("lifo"), None);
        assert!(!Policy::Fifo.orders_by_priority());
    }

    #[test]
    fn a_full_pool_does_not_block_tasks_for_other_pools() {
        let pools = pools(&[("gpu", 1, 1), ("cpu", 2, 0)]);
        let gpu = pools.index("gpu").unwrap();
        let cpu = pools.index("cpu").unwrap();
        let mapping = SkillMapping::new([("ml".into(), vec![gpu]), ("web".into(), vec![cpu])]);
        let mut s = Scheduler::new(Policy::Priority, mapping);
        let mut q = queue(&s, &[("t1", "s", Some("ml")), ("t2", "s", Some("web"))]);
        let picks = plan(&mut s, &mut q, &pools, 10);
        assert_eq!(names(&picks, &pools), ["t2@cpu"]);
    }

    #[test]
    fn a_pass_never_exceeds_a_pool_or_the_budget() {
        let pools = pools(&[("a", 3, 1)]);
        let mut s = Scheduler::new(Policy::Fifo, SkillMapping::default());
        let tasks = [
            ("t1", "s", None),
            ("t2", "s", None),
            ("t3", "s", None),
            ("t4", "s", None),
        ];
        for (budget, planned) in [(10, 2), (1, 1), (0, 0)] {
            let mut q = queue(&s, &tasks);
            assert_eq!(plan(&mut s, &mut q, &pools, budget).len(), planned);
        }
        // What was not planned stays queued, in order.
        let mut q = queue(&s, &tasks);
        plan(&mut s, &mut q, &pools, 10);
        assert_eq!(q.ids_in_order(), ["t3", "t4"]);
    }

    #[test]
    fn least_loaded_pool_wins_and_default_is_the_fallback() {
        // "big" is at 2/8 = 25 %, "small" at 1/2 = 50 %.
        let pools = pools(&[("small", 2, 1), ("big", 8, 2), ("other", 9, 0)]);
        let small = pools.index("small").unwrap();
        let big = pools.index("big").unwrap();
        let mapping = SkillMapping::new([("default".into(), vec![small, big])]);
        let mut s = Scheduler::new(Policy::SkillBased, mapping);
        let mut q = queue(&s, &[("t1", "s", Some("unmapped")), ("t2", "s", None)]);
        let picks = plan(&mut s, &mut q, &pools, 10);
        assert_eq!(names(&picks, &pools), ["t1@big", "t2@big"]);
    }

    #[test]
    fn without_a_mapping_any_enabled_pool_serves() {
        let mut p = pools(&[("off", 5, 0), ("on", 1, 0)]);
        p.set_enabled(p.index("off").unwrap(), false);
        let mut s = Scheduler::new(Policy::Priority, SkillMapping::default());
        let mut q = queue(&s, &[("t1", "s", Some("x")), ("t2", "s", None)]);
        assert_eq!(names(&plan(&mut s, &mut q, &p, 10), &p), ["t1@on"]);
    }

    #[test]
    fn equal_load_keeps_configuration_order() {
        let pools = pools(&[("first", 4, 0), ("second", 4, 0)]);
        let mut s = Scheduler::new(Policy::Priority, SkillMapping::default());
        let mut q = queue(
            &s,
            &[("t1", "s", None), ("t2", "s", None), ("t3", "s", None)],
        );
        let picks = plan(&mut s, &mut q, &pools, 10);
        assert_eq!(names(&picks, &pools), ["t1@first", "t2@second", "t3@first"]);
    }

    #[test]
    fn fair_share_alternates_between_specs_across_passes() {
        let pools = pools(&[("a", 100, 0)]);
        let mut s = Scheduler::new(Policy::FairShare, SkillMapping::default());
        let mut q = queue(
            &s,
            &[
                ("a1", "alpha", None),
                ("a2", "alpha", None),
                ("a3", "alpha", None),
                ("b1", "beta", None),
                ("b2", "beta", None),
                ("c1", "gamma", None),
            ],
        );
        let picks = plan(&mut s, &mut q, &pools, 4);
        assert_eq!(names(&picks, &pools), ["a1@a", "b1@a", "c1@a", "a2@a"]);
        // The next pass starts after "alpha", the spec served last.
        let mut q = queue(&s, &[("a3", "alpha", None), ("b2", "beta", None)]);
        let picks = plan(&mut s, &mut q, &pools, 1);
        assert_eq!(names(&picks, &pools), ["b2@a"]);
    }

    #[test]
    fn fair_share_skips_a_spec_whose_tasks_do_not_fit() {
        let pools = pools(&[("gpu", 1, 1), ("cpu", 5, 0)]);
        let gpu = pools.index("gpu").unwrap();
        let mapping = SkillMapping::new([("ml".into(), vec![gpu])]);
        let mut s = Scheduler::new(Policy::FairShare, mapping);
        let mut q = queue(
            &s,
            &[
                ("a1", "alpha", Some("ml")),
                ("b1", "beta", None),
                ("b2", "beta", None),
            ],
        );
        let picks = plan(&mut s, &mut q, &pools, 10);
        assert_eq!(names(&picks, &pools), ["b1@cpu", "b2@cpu"]);
    }
}

#[cfg(test)]
mod route_tests {
    use super::tests::arrival;
    use super::*;
    use crate::dispatch::pools::PoolState;
    use crate::dispatch::queue::{QueueKey, QueueOrder};
    use crate::retry::state::TaskId;

    #[test]
    fn routes_resolve_through_the_mapping() {
        let mapping = SkillMapping::new([("ml".into(), vec![0]), ("default".into(), vec![1])]);
        let s = Scheduler::new(Policy::SkillBased, mapping);
        assert_eq!(s.route_of(Some("ml")).as_deref(), Some("ml"));
        assert_eq!(s.route_of(Some("web")).as_deref(), Some("default"));
        assert_eq!(s.route_of(None).as_deref(), Some("default"));
        let plain = Scheduler::new(Policy::SkillBased, SkillMapping::default());
        assert_eq!(plain.route_of(Some("ml")), None);
    }

    #[test]
    fn a_full_route_is_passed_over_whatever_its_length() {
        // 1,000 "ml" tasks ahead of one "web" task, the ml pool full: the
        // pass places the web task and leaves every ml task queued.
        let pools = Pools::new([
            PoolState {
                running: 1,
                ..PoolState::new("gpu", "local-process", 1)
            },
            PoolState::new("cpu", "local-process", 4),
        ]);
        let mapping = SkillMapping::new([("ml".into(), vec![0]), ("web".into(), vec![1])]);
        let mut s = Scheduler::new(Policy::SkillBased, mapping);
        let mut q: ReadyQueue<TaskId> = ReadyQueue::new(true, false);
        let mut orders: HashMap<TaskId, QueueOrder> = HashMap::new();
        let spec: Arc<str> = "s".into();
        for seq in 0..1_001u64 {
            let (id, skill) = if seq < 1_000 {
                (format!("ml{seq}"), "ml")
            } else {
                ("web".to_owned(), "web")
            };
            let route = s.route_of(Some(skill));
            let order = arrival(seq as usize);
            orders.insert(id.as_str().into(), order);
            let key = QueueKey {
                order,
                route: &route,
                spec: &spec,
            };
            q.push(id.as_str().into(), key, |id| orders[id]);
        }
        let picks = s.plan(&mut q, |id| orders[id], &pools, 10);
        assert_eq!(picks, [("web".into(), 1)]);
        assert_eq!(q.len(), 1_000);
    }

    /// The plan as the specification states it, by walking the whole queue
    /// (what the dispatcher did before routes): the oracle for the test below.
    fn naive_plan(
        s: &Scheduler,
        tasks: &[(String, Arc<str>, Option<&str>)],
        pools: &Pools,
        budget: u64,
        last: Option<&Arc<str>>,
    ) -> Vec<(TaskId, PoolIndex)> {
        let mut pass = Pass::new(pools, budget, &s.mapping);
        let try_place = |pass: &mut Pass<'_, TaskId>, id: &str, skill: Option<&str>| {
            let route = s.route_of(skill);
            let ok = pass.budget > 0 && pass.has_room(&route);
            if ok {
                pass.place(id.into(), &route);
            }
            ok
        };
        if s.policy != Policy::FairShare {
            for (id, _, skill) in tasks {
                try_place(&mut pass, id, *skill);
            }
            return pass.picks;
        }
        let mut by_spec: std::collections::BTreeMap<&Arc<str>, std::collections::VecDeque<_>> =
            Default::default();
        for (id, spec, skill) in tasks {
            by_spec.entry(spec).or_default().push_back((id, *skill));
        }
        let mut specs: Vec<&Arc<str>> = by_spec.keys().copied().collect();
        if let Some(prev) = last {
            let start = specs.partition_point(|sp| **sp <= *prev);
            specs.rotate_left(start);
        }
        while !specs.is_empty() && !pass.exhausted() {
            specs.retain(|spec| {
                let queue = by_spec.get_mut(spec).unwrap();
                while let Some((id, skill)) = queue.pop_front() {
                    if try_place(&mut pass, id, skill) {
                        break;
                    }
                }
                !queue.is_empty()
            });
        }
        pass.picks
    }

    #[test]
    fn routes_plan_exactly_what_walking_the_queue_plans() {
        // A small xorshift generator: deterministic cases without a dependency.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let skills = [None, Some("ml"), Some("web"), Some("other")];
        for case in 0..2_000 {
            let mut pools = Pools::new((0..3).map(|i| PoolState {
                running: next(3),
                ..PoolState::new(&format!("p{i}"), "local-process", 1 + next(3))
            }));
            if next(4) == 0 {
                pools.set_enabled(next(3) as usize, false);
            }
            let mut entries: Vec<(Arc<str>, Vec<PoolIndex>)> = Vec::new();
            for key in ["ml", "web", "default"] {
                if next(2) == 0 {
                    let set = (0..3).filter(|_| next(2) == 0).collect();
                    entries.push((key.into(), set));
                }
            }
            let policy = Policy::ALL[case % 4];
            let mut s = Scheduler::new(policy, SkillMapping::new(entries));
            let last: Option<Arc<str>> = (next(2) == 0).then(|| format!("s{}", next(4)).into());
            s.last_spec = last.clone();
            let tasks: Vec<(String, Arc<str>, Option<&str>)> = (0..next(12))
                .map(|i| {
                    (
                        format!("t{i}"),
                        format!("s{}", next(4)).into(),
                        skills[next(4) as usize],
                    )
                })
                .collect();
            let mut q = ReadyQueue::new(policy.orders_by_priority(), policy == Policy::FairShare);
            let mut orders: HashMap<TaskId, QueueOrder> = HashMap::new();
            for (seq, (id, spec, skill)) in tasks.iter().enumerate() {
                let route = s.route_of(*skill);
                let order = arrival(seq);
                orders.insert(id.as_str().into(), order);
                let key = QueueKey {
                    order,
                    route: &route,
                    spec,
                };
                q.push(id.as_str().into(), key, |id| orders[id]);
            }
            let budget = next(6);
            let expected = naive_plan(&s, &tasks, &pools, budget, last.as_ref());
            let picks = s.plan(&mut q, |id| orders[id], &pools, budget);
            assert_eq!(picks, expected, "case {case}: {policy:?}, tasks {tasks:?}");
            assert_eq!(q.len(), tasks.len() - picks.len());
        }
    }
}
