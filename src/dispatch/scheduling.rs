//! Scheduling: which queued tasks go to which pools in one pass (SPEC §4.4).
//!
//! A pass works on a copy of the pools' loads and the global budget, so it
//! can never plan past a limit; the dispatcher then reserves what was planned.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::dispatch::pools::{PoolIndex, Pools};
use crate::retry::state::TaskId;

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

/// A queued task as scheduling sees it, in queue order.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub id: &'a TaskId,
    pub spec: &'a Arc<str>,
    pub skill: Option<&'a str>,
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
struct Pass<'m> {
    loads: Vec<Load>,
    budget: u64,
    mapping: &'m SkillMapping,
    picks: Vec<(TaskId, PoolIndex)>,
}

impl Pass<'_> {
    fn exhausted(&self) -> bool {
        self.budget == 0 || !self.loads.iter().any(Load::has_room)
    }

    /// The least loaded pool with room among the task's pools: lowest
    /// utilisation, then fewest running, then configuration order.
    fn choose(&self, skill: Option<&str>) -> Option<PoolIndex> {
        let better = |a: PoolIndex, b: PoolIndex| {
            let (la, lb) = (&self.loads[a], &self.loads[b]);
            let ua = u128::from(la.running) * u128::from(lb.max);
            let ub = u128::from(lb.running) * u128::from(la.max);
            (ua, la.running, a) < (ub, lb.running, b)
        };
        let mut best: Option<PoolIndex> = None;
        let mut consider = |i: PoolIndex| {
            if self.loads.get(i).is_some_and(Load::has_room) && best.is_none_or(|b| better(i, b)) {
                best = Some(i);
            }
        };
        match self.mapping.pools_for(skill) {
            Some(pools) => pools.iter().copied().for_each(&mut consider),
            None => (0..self.loads.len()).for_each(&mut consider),
        }
        best
    }

    /// Plans `task` into a pool; false when none of its pools has room.
    fn place(&mut self, task: &Candidate<'_>) -> bool {
        if self.budget == 0 {
            return false;
        }
        let Some(pool) = self.choose(task.skill) else {
            return false;
        };
        self.loads[pool].running += 1;
        self.budget -= 1;
        self.picks.push((task.id.clone(), pool));
        true
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

    /// Plans one pass: `(task id, pool)` pairs, at most `budget` of them, no
    /// pool past its `max_concurrency`. A task none of whose pools has room
    /// is skipped and does not block the tasks behind it.
    pub fn plan<'a>(
        &mut self,
        queue: impl Iterator<Item = Candidate<'a>>,
        pools: &Pools,
        budget: u64,
    ) -> Vec<(TaskId, PoolIndex)> {
        let mut pass = Pass {
            loads: pools
                .iter()
                .map(|(_, p)| Load {
                    running: p.running,
                    max: p.max_concurrency,
                    enabled: p.enabled,
                })
                .collect(),
            budget,
            mapping: &self.mapping,
            picks: Vec::new(),
        };
        if self.policy == Policy::FairShare {
            self.last_spec = fair_share(&mut pass, queue, self.last_spec.take());
        } else {
            for task in queue {
                if pass.exhausted() {
                    break;
                }
                pass.place(&task);
            }
        }
        pass.picks
    }
}

/// Round-robin across spec names (in name order, starting after the one
/// served last), each spec's tasks in queue order. Returns the spec served
/// last. Pools only fill up during a pass, so a task that does not fit now
/// will not fit later in the same pass and is dropped from consideration.
fn fair_share<'a>(
    pass: &mut Pass<'_>,
    queue: impl Iterator<Item = Candidate<'a>>,
    mut last: Option<Arc<str>>,
) -> Option<Arc<str>> {
    if pass.exhausted() {
        // Nothing can be placed: do not group the queue for nothing.
        return last;
    }
    let mut by_spec: BTreeMap<&'a Arc<str>, VecDeque<Candidate<'a>>> = BTreeMap::new();
    for task in queue {
        by_spec.entry(task.spec).or_default().push_back(task);
    }
    let mut specs: Vec<&Arc<str>> = by_spec.keys().copied().collect();
    if let Some(prev) = &last {
        let start = specs.partition_point(|s| **s <= *prev);
        specs.rotate_left(start);
    }
    while !specs.is_empty() && !pass.exhausted() {
        specs.retain(|spec| {
            if pass.exhausted() {
                return true;
            }
            let tasks = by_spec.get_mut(spec).expect("every listed spec has tasks");
            while let Some(task) = tasks.pop_front() {
                if pass.place(&task) {
                    last = Some((*spec).clone());
                    break;
                }
            }
            !tasks.is_empty()
        });
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::pools::PoolState;

    fn pools(spec: &[(&str, u64, u64)]) -> Pools {
        Pools::new(spec.iter().map(|&(name, max, running)| PoolState {
            running,
            ..PoolState::new(name, "local-process", max)
        }))
    }

    struct Queue(Vec<(TaskId, Arc<str>, Option<String>)>);

    impl Queue {
        fn new(tasks: &[(&str, &str, Option<&str>)]) -> Self {
            Queue(
                tasks
                    .iter()
                    .map(|&(id, spec, skill)| (id.into(), spec.into(), skill.map(str::to_owned)))
                    .collect(),
            )
        }

        fn candidates(&self) -> impl Iterator<Item = Candidate<'_>> {
            self.0.iter().map(|(id, spec, skill)| Candidate {
                id,
                spec,
                skill: skill.as_deref(),
            })
        }
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
        let q = Queue::new(&[("t1", "s", Some("ml")), ("t2", "s", Some("web"))]);
        let picks = s.plan(q.candidates(), &pools, 10);
        assert_eq!(names(&picks, &pools), ["t2@cpu"]);
    }

    #[test]
    fn a_pass_never_exceeds_a_pool_or_the_budget() {
        let pools = pools(&[("a", 3, 1)]);
        let q = Queue::new(&[
            ("t1", "s", None),
            ("t2", "s", None),
            ("t3", "s", None),
            ("t4", "s", None),
        ]);
        let mut s = Scheduler::new(Policy::Fifo, SkillMapping::default());
        assert_eq!(s.plan(q.candidates(), &pools, 10).len(), 2);
        assert_eq!(s.plan(q.candidates(), &pools, 1).len(), 1);
        assert!(s.plan(q.candidates(), &pools, 0).is_empty());
    }

    #[test]
    fn least_loaded_pool_wins_and_default_is_the_fallback() {
        // "big" is at 2/8 = 25 %, "small" at 1/2 = 50 %.
        let pools = pools(&[("small", 2, 1), ("big", 8, 2), ("other", 9, 0)]);
        let small = pools.index("small").unwrap();
        let big = pools.index("big").unwrap();
        let mapping = SkillMapping::new([("default".into(), vec![small, big])]);
        let mut s = Scheduler::new(Policy::SkillBased, mapping);
        let q = Queue::new(&[("t1", "s", Some("unmapped")), ("t2", "s", None)]);
        let picks = s.plan(q.candidates(), &pools, 10);
        assert_eq!(names(&picks, &pools), ["t1@big", "t2@big"]);
    }

    #[test]
    fn without_a_mapping_any_enabled_pool_serves() {
        let mut p = pools(&[("off", 5, 0), ("on", 1, 0)]);
        p.set_enabled(p.index("off").unwrap(), false);
        let mut s = Scheduler::new(Policy::Priority, SkillMapping::default());
        let q = Queue::new(&[("t1", "s", Some("x")), ("t2", "s", None)]);
        assert_eq!(names(&s.plan(q.candidates(), &p, 10), &p), ["t1@on"]);
    }

    #[test]
    fn equal_load_keeps_configuration_order() {
        let pools = pools(&[("first", 4, 0), ("second", 4, 0)]);
        let mut s = Scheduler::new(Policy::Priority, SkillMapping::default());
        let q = Queue::new(&[("t1", "s", None), ("t2", "s", None), ("t3", "s", None)]);
        let picks = s.plan(q.candidates(), &pools, 10);
        assert_eq!(names(&picks, &pools), ["t1@first", "t2@second", "t3@first"]);
    }

    #[test]
    fn fair_share_alternates_between_specs_across_passes() {
        let pools = pools(&[("a", 100, 0)]);
        let mut s = Scheduler::new(Policy::FairShare, SkillMapping::default());
        let q = Queue::new(&[
            ("a1", "alpha", None),
            ("a2", "alpha", None),
            ("a3", "alpha", None),
            ("b1", "beta", None),
            ("b2", "beta", None),
            ("c1", "gamma", None),
        ]);
        let picks = s.plan(q.candidates(), &pools, 4);
        assert_eq!(names(&picks, &pools), ["a1@a", "b1@a", "c1@a", "a2@a"]);
        // The next pass starts after "alpha", the spec served last.
        let q = Queue::new(&[("a3", "alpha", None), ("b2", "beta", None)]);
        let picks = s.plan(q.candidates(), &pools, 1);
        assert_eq!(names(&picks, &pools), ["b2@a"]);
    }

    #[test]
    fn fair_share_skips_a_spec_whose_tasks_do_not_fit() {
        let pools = pools(&[("gpu", 1, 1), ("cpu", 5, 0)]);
        let gpu = pools.index("gpu").unwrap();
        let mapping = SkillMapping::new([("ml".into(), vec![gpu])]);
        let mut s = Scheduler::new(Policy::FairShare, mapping);
        let q = Queue::new(&[
            ("a1", "alpha", Some("ml")),
            ("b1", "beta", None),
            ("b2", "beta", None),
        ]);
        let picks = s.plan(q.candidates(), &pools, 10);
        assert_eq!(names(&picks, &pools), ["b1@cpu", "b2@cpu"]);
    }
}
