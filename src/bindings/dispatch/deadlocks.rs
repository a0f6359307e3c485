//! Dependency cycles among the tasks a task source holds: the source's
//! optional `dependency_graph()` gives `{task_id: [ids it waits for]}`; the
//! core finds the circles (`crate::dispatch::dependencies`, with the GIL released) and
//! keeps the last finding for `get_status()["deadlock_info"]`.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::{PyDispatcherCore, LOG_TARGET};
use crate::bindings::args;
use crate::dispatch::dependencies::{spell, Deadlocks, DependencyGraph};
use crate::time::wall::WallTime;

/// The last check: when, and what it found.
#[derive(Default)]
pub struct LastCheck {
    pub at: Option<WallTime>,
    pub found: Deadlocks,
}

impl PyDispatcherCore {
    /// Checks now; None when the task source gives no dependency graph.
    pub(super) fn check_deadlocks(&self, py: Python<'_>) -> PyResult<Option<Deadlocks>> {
        let source = self.port(py, |p| &p.task_source).into_bound(py);
        if source.is_none() || !source.hasattr("dependency_graph")? {
            return Ok(None);
        }
        let graph = source.call_method0("dependency_graph")?;
        let graph = graph
            .cast::<PyDict>()
            .map_err(|_| args::type_error("dependency_graph()", "a dict", &graph))?;
        let tasks = read_graph("dependency_graph() key", graph)?;
        let found = py.detach(|| {
            DependencyGraph::new(
                tasks
                    .iter()
                    .map(|(id, deps)| (id.as_str(), deps.iter().map(String::as_str).collect())),
            )
            .deadlocks()
        });
        for cycle in &found.cycles {
            log::warn!(
                target: LOG_TARGET,
                "deadlock: dependency cycle {}; {} other task(s) wait behind it ({})",
                spell(cycle),
                found.blocked.len(),
                found.blocked.join(", ")
            );
        }
        *self.deadlocks.lock() = LastCheck {
            at: Some(self.clock.now().wall),
            found: found.clone(),
        };
        Ok(Some(found))
    }

    /// `deadlock_info` as NecroCode reports it: `last_check`,
    /// `detected_cycles` (each circle without repeating its start) and the
    /// tasks blocked behind them.
    pub(super) fn deadlock_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (at, found) = {
            let last = self.deadlocks.lock();
            (last.at, last.found.clone())
        };
        let info = PyDict::new(py);
        info.set_item("last_check", at.map(|t| t.isoformat().as_str().to_owned()))?;
        let cycles = PyList::empty(py);
        for cycle in &found.cycles {
            cycles.append(&cycle[..cycle.len().saturating_sub(1)])?;
        }
        info.set_item("detected_cycles", cycles)?;
        info.set_item("blocked_tasks", found.blocked)?;
        Ok(info)
    }
}

/// `{task_id: [ids it waits for]}` as Rust strings.
fn read_graph(key_name: &str, graph: &Bound<'_, PyDict>) -> PyResult<Vec<(String, Vec<String>)>> {
    let mut tasks = Vec::with_capacity(graph.len());
    for (id, deps) in graph.iter() {
        let id = args::string(key_name, &id)?.into_owned();
        let mut waits_for = Vec::new();
        for dep in deps.try_iter()? {
            waits_for.push(args::string("a dependency", &dep?)?.into_owned());
        }
        tasks.push((id, waits_for));
    }
    Ok(tasks)
}

/// `check_dependencies({task_id: [ids it depends on]})`: what makes a set
/// of dependencies impossible to run, as `(unknown, cycles)` —
/// `unknown` lists `(task_id, missing_id)` in order, `cycles` each circle as
/// a path back to its start (`[a, b, c, a]`). Linear in tasks +
/// dependencies; the graph is checked with the GIL released. Used by job
/// files (`depends_on`), and the same check as the dispatcher's deadlock
/// detection.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn check_dependencies(
    py: Python<'_>,
    graph: &Bound<'_, PyDict>,
) -> PyResult<(Vec<(String, String)>, Vec<Vec<String>>)> {
    let tasks = read_graph("graph key", graph)?;
    Ok(py.detach(|| {
        let graph = DependencyGraph::new(
            tasks
                .iter()
                .map(|(id, deps)| (id.as_str(), deps.iter().map(String::as_str).collect())),
        );
        let unknown = graph
            .unknown_dependencies()
            .into_iter()
            .map(|(task, dep)| (task.to_owned(), dep.to_owned()))
            .collect();
        (unknown, graph.deadlocks().cycles)
    }))
}
