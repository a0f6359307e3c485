//! The per-task parts of `get_status()`: a dict per delayed task and per
//! retry record, for 10^5 records or more (SPEC §6: <= 50 ms at 10^5).
//!
//! Each dict is a copy of a template holding its keys (CPython copies the key
//! table whole instead of inserting key by key), and a task's id and next
//! retry time become `str` objects once, shared by both lists: a delayed
//! task finds its record's strings by the record's row, not by its id.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::bindings::names::name;
use crate::bindings::time::datetime::iso_str;
use crate::dispatch::state::DelayedTask;
use crate::retry::state::InfoTable;

pub(super) struct TaskLists<'py> {
    /// `[{"task_id", "next_retry_at"}]`, in the order given.
    pub delayed: Bound<'py, PyList>,
    /// `{task_id: {"task_id", "retry_count", "last_retry_at",
    /// "next_retry_at", "failure_reason"}}`.
    pub retry_info: Bound<'py, PyDict>,
}

/// A dict with `keys`, each set to None: what each record's dict copies.
fn template<'py>(py: Python<'py>, keys: &[&Bound<'py, PyString>]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for key in keys {
        d.set_item(key, py.None())?;
    }
    Ok(d)
}

pub(super) fn task_lists<'py>(
    py: Python<'py>,
    delayed: &[DelayedTask],
    infos: &InfoTable,
) -> PyResult<TaskLists<'py>> {
    let task_id = name!(py, "task_id");
    let retry_count = name!(py, "retry_count");
    let last_retry_at = name!(py, "last_retry_at");
    let next_retry_at = name!(py, "next_retry_at");
    let failure_reason = name!(py, "failure_reason");

    let info_template = template(
        py,
        &[
            task_id,
            retry_count,
            last_retry_at,
            next_retry_at,
            failure_reason,
        ],
    )?;
    let retry_info = PyDict::new(py);
    // Each row's id and next retry time, for the delayed list to reuse.
    let mut made: Vec<(Bound<'py, PyString>, Bound<'py, PyString>)> = Vec::new();
    if !delayed.is_empty() {
        made.reserve_exact(infos.len());
    }
    // Records failing alike share their reason's `Arc`: make its str once.
    let mut last_reason: Option<(&Arc<str>, Bound<'py, PyString>)> = None;
    for (id, row) in infos.iter() {
        let id_obj = PyString::new(py, id);
        let next = iso_str(py, row.next_retry_at)?;
        let reason = match (&row.failure_reason, &last_reason) {
            (None, _) => None,
            (Some(text), Some((seen, made))) if Arc::ptr_eq(text, seen) => Some(made.clone()),
            (Some(text), _) => {
                let made = PyString::new(py, text);
                last_reason = Some((text, made.clone()));
                Some(made)
            }
        };
        let d = info_template.copy()?;
        d.set_item(task_id, &id_obj)?;
        d.set_item(retry_count, row.retry_count)?;
        d.set_item(last_retry_at, iso_str(py, row.last_retry_at)?)?;
        d.set_item(next_retry_at, &next)?;
        d.set_item(failure_reason, reason)?;
        retry_info.set_item(&id_obj, d)?;
        if !delayed.is_empty() {
            made.push((id_obj, next));
        }
    }

    let delayed_template = template(py, &[task_id, next_retry_at])?;
    let mut entries = Vec::with_capacity(delayed.len());
    for task in delayed {
        // The row was read under the same locks as this list: same record.
        let shared = task
            .record
            .and_then(|r| infos.row(r))
            .and_then(|row| made.get(row));
        let d = delayed_template.copy()?;
        match shared {
            Some((id_obj, next)) => {
                d.set_item(task_id, id_obj)?;
                d.set_item(next_retry_at, next)?;
            }
            None => {
                d.set_item(task_id, task.task_id.as_ref())?;
                d.set_item(next_retry_at, iso_str(py, task.next_retry_at)?)?;
            }
        }
        entries.push(d);
    }
    Ok(TaskLists {
        delayed: PyList::new(py, entries)?,
        retry_info,
    })
}
