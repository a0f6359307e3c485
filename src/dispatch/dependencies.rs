//! Task dependencies as a graph: which tasks wait for each other in a circle
//! (a deadlock: none of them can ever start), and which tasks are blocked
//! behind such a circle. Linear in tasks + dependencies (Tarjan's strongly
//! connected components, iterative so a 10^5-task chain needs no deep stack).

use std::collections::VecDeque;

use crate::hashing::FastMap;

/// A dependency graph: task `i` waits for each task in `waits_for[i]`.
#[derive(Debug, Default)]
pub struct DependencyGraph {
    ids: Vec<String>,
    waits_for: Vec<Vec<usize>>,
    /// Dependencies naming no task of the graph: (task, missing id).
    unknown: Vec<(usize, String)>,
}

/// What a check finds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deadlocks {
    /// Each circle as a path that returns to its start: `[a, b, c, a]` reads
    /// "a waits for b, b for c, c for a". Sorted by their first id.
    pub cycles: Vec<Vec<String>>,
    /// Tasks not in a circle that wait, directly or not, for one in it.
    pub blocked: Vec<String>,
}

impl Deadlocks {
    pub fn is_empty(&self) -> bool {
        self.cycles.is_empty()
    }
}

/// `a -> b -> c -> a`
pub fn spell(cycle: &[String]) -> String {
    cycle.join(" -> ")
}

impl DependencyGraph {
    /// Builds the graph; ids must be unique (a repeated id keeps its first
    /// entry's place and adds the later entry's dependencies).
    pub fn new<'a>(tasks: impl IntoIterator<Item = (&'a str, Vec<&'a str>)>) -> Self {
        let tasks: Vec<(&str, Vec<&str>)> = tasks.into_iter().collect();
        let mut index: FastMap<&str, usize> = FastMap::default();
        let mut ids = Vec::with_capacity(tasks.len());
        for (id, _) in &tasks {
            index.entry(id).or_insert_with(|| {
                ids.push((*id).to_owned());
                ids.len() - 1
            });
        }
        let mut waits_for = vec![Vec::new(); ids.len()];
        let mut unknown = Vec::new();
        for (id, deps) in &tasks {
            let from = index[id];
            for dep in deps {
                match index.get(dep) {
                    Some(&to) => waits_for[from].push(to),
                    None => unknown.push((from, (*dep).to_owned())),
                }
            }
        }
        DependencyGraph {
            ids,
            waits_for,
            unknown,
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Dependencies that name no task: (task id, missing id), in order.
    pub fn unknown_dependencies(&self) -> Vec<(&str, &str)> {
        self.unknown
            .iter()
            .map(|(task, dep)| (self.ids[*task].as_str(), dep.as_str()))
            .collect()
    }

    /// Every circle of tasks waiting for each other, and what waits behind.
    pub fn deadlocks(&self) -> Deadlocks {
        let components = self.strongly_connected();
        let mut in_cycle = vec![false; self.len()];
        let mut cycles = Vec::new();
        for component in components {
            let circular =
                component.len() > 1 || self.waits_for[component[0]].contains(&component[0]);
            if !circular {
                continue;
            }
            for &task in &component {
                in_cycle[task] = true;
            }
            cycles.push(self.one_cycle(&component));
        }
        cycles.sort();
        let blocked = self.waiting_behind(&in_cycle);
        Deadlocks { cycles, blocked }
    }

    /// Tarjan's algorithm without recursion; components in reverse
    /// topological order.
    fn strongly_connected(&self) -> Vec<Vec<usize>> {
        const UNSEEN: usize = usize::MAX;
        let n = self.len();
        let mut order = vec![UNSEEN; n];
        let mut low = vec![0; n];
        let mut on_stack = vec![false; n];
        let mut stack = Vec::new();
        let mut components = Vec::new();
        let mut next = 0;
        // (task, index of its next dependency to look at)
        let mut work: Vec<(usize, usize)> = Vec::new();
        for root in 0..n {
            if order[root] != UNSEEN {
                continue;
            }
            work.push((root, 0));
            while let Some(&mut (task, ref mut edge)) = work.last_mut() {
                if *edge == 0 && order[task] == UNSEEN {
                    order[task] = next;
                    low[task] = next;
                    next += 1;
                    stack.push(task);
                    on_stack[task] = true;
                }
                if let Some(&dep) = self.waits_for[task].get(*edge) {
                    *edge += 1;
                    if order[dep] == UNSEEN {
                        work.push((dep, 0));
                    } else if on_stack[dep] {
                        low[task] = low[task].min(order[dep]);
                    }
                    continue;
                }
                work.pop();
                if let Some(&(parent, _)) = work.last() {
                    low[parent] = low[parent].min(low[task]);
                }
                if low[task] == order[task] {
                    let mut component = Vec::new();
                    while let Some(member) = stack.pop() {
                        on_stack[member] = false;
                        component.push(member);
                        if member == task {
                            break;
                        }
                    }
                    components.push(component);
                }
            }
        }
        components
    }

    /// A circle through the component's smallest id, found breadth-first
    /// inside the component (so it is a shortest one through that task).
    fn one_cycle(&self, component: &[usize]) -> Vec<String> {
        let start = *component
            .iter()
            .min_by(|a, b| self.ids[**a].cmp(&self.ids[**b]))
            .expect("a component has a member");
        let member: FastMap<usize, ()> = component.iter().map(|&t| (t, ())).collect();
        let mut parent: FastMap<usize, usize> = FastMap::default();
        let mut queue = VecDeque::from([start]);
        let mut end = None;
        'search: while let Some(task) = queue.pop_front() {
            for &dep in &self.waits_for[task] {
                if dep == start {
                    end = Some(task);
                    break 'search;
                }
                if member.contains_key(&dep) && !parent.contains_key(&dep) {
                    parent.insert(dep, task);
                    queue.push_back(dep);
                }
            }
        }
        let mut path = vec![start];
        let mut at = end.expect("a strongly connected component has a circle");
        while at != start {
            path.push(at);
            at = parent[&at];
        }
        path.push(start);
        // Walked backwards from the end: put it in "waits for" order.
        let last = path.len() - 1;
        path[1..last].reverse();
        path.iter().map(|&t| self.ids[t].clone()).collect()
    }

    /// Tasks outside every circle that wait, transitively, for a task in one.
    fn waiting_behind(&self, in_cycle: &[bool]) -> Vec<String> {
        let mut waited_on_by = vec![Vec::new(); self.len()];
        for (task, deps) in self.waits_for.iter().enumerate() {
            for &dep in deps {
                waited_on_by[dep].push(task);
            }
        }
        let mut seen = in_cycle.to_vec();
        let mut queue: VecDeque<usize> = (0..self.len()).filter(|&t| in_cycle[t]).collect();
        let mut blocked = Vec::new();
        while let Some(task) = queue.pop_front() {
            for &waiter in &waited_on_by[task] {
                if !seen[waiter] {
                    seen[waiter] = true;
                    blocked.push(self.ids[waiter].clone());
                    queue.push_back(waiter);
                }
            }
        }
        blocked.sort();
        blocked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&'static str, &[&'static str])]) -> DependencyGraph {
        DependencyGraph::new(edges.iter().map(|(id, deps)| (*id, deps.to_vec())))
    }

    #[test]
    fn a_graph_without_circles_has_no_deadlock() {
        let g = graph(&[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])]);
        assert!(g.deadlocks().is_empty());
        assert!(g.deadlocks().blocked.is_empty());
    }

    #[test]
    fn a_circle_is_spelled_in_waiting_order_with_what_it_blocks() {
        let g = graph(&[
            ("a", &["b"]),
            ("b", &["c"]),
            ("c", &["a"]),
            ("d", &["c"]),
            ("e", &["d"]),
            ("free", &[]),
        ]);
        let found = g.deadlocks();
        assert_eq!(found.cycles, vec![vec!["a", "b", "c", "a"]]);
        assert_eq!(spell(&found.cycles[0]), "a -> b -> c -> a");
        assert_eq!(found.blocked, vec!["d", "e"]);
    }

    #[test]
    fn self_loops_and_separate_circles_are_each_reported() {
        let g = graph(&[("x", &["x"]), ("p", &["q"]), ("q", &["p"]), ("r", &["p"])]);
        let found = g.deadlocks();
        assert_eq!(found.cycles, vec![vec!["p", "q", "p"], vec!["x", "x"]]);
        assert_eq!(found.blocked, vec!["r"]);
    }

    #[test]
    fn unknown_dependencies_are_listed_not_followed() {
        let g = graph(&[("a", &["ghost"]), ("b", &["a"])]);
        assert!(g.deadlocks().is_empty());
        assert_eq!(g.unknown_dependencies(), vec![("a", "ghost")]);
    }

    #[test]
    fn a_long_chain_needs_no_deep_stack() {
        let ids: Vec<String> = (0..200_000).map(|i| format!("t{i}")).collect();
        let mut edges: Vec<(&str, Vec<&str>)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let deps = if i == 0 {
                vec![]
            } else {
                vec![ids[i - 1].as_str()]
            };
            edges.push((id.as_str(), deps));
        }
        // Close the chain into one big circle.
        edges[0].1.push(ids.last().unwrap().as_str());
        let found = DependencyGraph::new(edges).deadlocks();
        assert_eq!(found.cycles.len(), 1);
        assert_eq!(found.cycles[0].len(), 200_001);
    }
}
