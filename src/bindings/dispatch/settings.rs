//! Reading a `DispatcherConfig` and task objects into the core's types.

use std::sync::Arc;

use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::errors::PoolNotFoundError;
use crate::bindings::names::name;
use crate::bindings::retry::options::{self as retry_options, OptionArgs, CONFIG_NAMES};
use crate::bindings::{args, time::datetime};
use crate::dispatch::pools::{PoolState, Pools};
use crate::dispatch::scheduling::{Policy, SkillMapping};
use crate::dispatch::state::{Limits, TaskMeta};
use crate::dispatch::task_names::TaskNames;
use crate::id::{Id, TaskId};
use crate::interning::shared_name;
use crate::retry::backoff::{python_float_repr, BackoffPolicy};
use crate::retry::state::RetryOptions;
use crate::time::clock::seconds_to_nanos;

/// `obj.name` (or `obj[name]` for a dict); None when absent.
pub fn getattr_opt<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    attr_opt(obj, &PyString::new(obj.py(), name))
}

/// What [`getattr_opt`] reads, by a name made once: per task and per runner
/// the name is interned once (`name!`), since a fresh `str` misses CPython's type
/// attribute cache (it keeps interned names only) and is compared by content.
pub fn attr_opt<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if let Ok(dict) = obj.cast::<PyDict>() {
        return dict.get_item(name);
    }
    lookup_optional(obj, name)
}

/// An attribute that may be missing, without raising and clearing an
/// AttributeError for it: creating one cost more than the rest of reading a
/// runner (CPython's own lookup for this, by version).
pub fn lookup_optional<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = obj.py();
    let mut found: *mut pyo3::ffi::PyObject = std::ptr::null_mut();
    // SAFETY: both pointers are live objects and the GIL is held; on 1 the
    // result is a new reference we take over, on 0 nothing was found, on -1
    // an exception (not AttributeError) is set.
    let status = unsafe { optional_attr(obj.as_ptr(), name.as_ptr(), &mut found) };
    match status {
        1 => Ok(Some(unsafe { Bound::from_owned_ptr(py, found) })),
        0 => Ok(None),
        _ => Err(PyErr::fetch(py)),
    }
}

#[cfg(Py_3_13)]
use pyo3::ffi::PyObject_GetOptionalAttr as optional_attr;

// CPython 3.7-3.12 export this (the private name of what 3.13 made public);
// a generic attribute lookup then skips creating the AttributeError.
#[cfg(not(Py_3_13))]
extern "C" {
    #[link_name = "_PyObject_LookupAttr"]
    fn optional_attr(
        obj: *mut pyo3::ffi::PyObject,
        name: *mut pyo3::ffi::PyObject,
        result: *mut *mut pyo3::ffi::PyObject,
    ) -> std::os::raw::c_int;
}

/// An enum member's `.value`, or the object itself.
fn enum_value<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    Ok(getattr_opt(obj, "value")?.unwrap_or_else(|| obj.clone()))
}

fn present<'py>(config: &Bound<'py, PyAny>, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    Ok(getattr_opt(config, name)?.filter(|v| !v.is_none()))
}

pub fn config_number(config: &Bound<'_, PyAny>, name: &str, default: f64) -> PyResult<f64> {
    match present(config, name)? {
        Some(v) => args::number(&format!("config.{name}"), &v),
        None => Ok(default),
    }
}

fn config_count(config: &Bound<'_, PyAny>, name: &str, default: u64) -> PyResult<u64> {
    match present(config, name)? {
        Some(v) => args::non_negative_int(&format!("config.{name}"), &v),
        None => Ok(default),
    }
}

/// A duration in seconds: finite and >= 0.
pub fn seconds(name: &str, value: f64) -> PyResult<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(PyValueError::new_err(format!(
            "{name} must be a finite number >= 0, got {}",
            python_float_repr(value)
        )))
    }
}

/// A `SchedulingPolicy` member or its value.
pub fn policy(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Policy> {
    let value = enum_value(obj)?;
    let text = value
        .cast::<PyString>()
        .map_err(|_| args::type_error(name, "a SchedulingPolicy", obj))?
        .to_cow()?;
    Policy::from_value(&text).ok_or_else(|| {
        let known: Vec<&str> = Policy::ALL.iter().map(|p| p.value()).collect();
        PyValueError::new_err(format!(
            "{name} must be one of {known:?}, got {}",
            args::describe(obj)
        ))
    })
}

/// The settings the core takes from a `DispatcherConfig` that can change
/// while it runs.
pub struct Tunables {
    pub limits: Limits,
    pub policy: Policy,
    pub mapping: SkillMapping,
    pub backoff: BackoffPolicy,
    pub retry_options: RetryOptions,
}

pub fn read_tunables(config: &Bound<'_, PyAny>, pools: &Pools) -> PyResult<Tunables> {
    // Read again on every pass and at stop(): checked now, so that a bad
    // value is refused where it was set rather than when it is used.
    let poll = config_number(config, "poll_interval", 5.0)?;
    if !(poll.is_finite() && poll > 0.0) {
        return Err(PyValueError::new_err(format!(
            "config.poll_interval must be a finite number > 0, got {}",
            python_float_repr(poll)
        )));
    }
    seconds(
        "config.graceful_shutdown_timeout",
        config_number(config, "graceful_shutdown_timeout", 300.0)?,
    )?;
    let heartbeat = seconds(
        "config.heartbeat_timeout",
        config_number(config, "heartbeat_timeout", 60.0)?,
    )?;
    let limits = Limits {
        max_global_concurrency: config_count(config, "max_global_concurrency", 10)?,
        heartbeat_timeout: seconds_to_nanos(heartbeat),
    };
    let backoff = BackoffPolicy::new(
        config_count(config, "retry_max_attempts", 3)?,
        config_number(config, "retry_backoff_base", 2.0)?,
        config_number(config, "retry_initial_delay", 1.0)?,
        config_number(config, "retry_max_delay", 300.0)?,
    )
    .map_err(|e| PyValueError::new_err(format!("config.retry_{e}")))?;
    let policy = match present(config, "scheduling_policy")? {
        Some(p) => policy("config.scheduling_policy", &p)?,
        None => Policy::Priority,
    };
    let options = |name| getattr_opt(config, name);
    let retry_options = retry_options::read(
        &OptionArgs {
            jitter: options("retry_jitter")?.as_ref(),
            seed: options("retry_seed")?.as_ref(),
            non_retryable: options("retry_non_retryable")?.as_ref(),
            policies: options("retry_policies")?.as_ref(),
            max_retry_duration: options("retry_max_duration")?.as_ref(),
            retry_budget: options("retry_budget")?.as_ref(),
        },
        &CONFIG_NAMES,
    )?;
    Ok(Tunables {
        limits,
        policy,
        mapping: skill_mapping(config, pools)?,
        backoff,
        retry_options,
    })
}

/// `skill_mapping`: each skill to a pool name or a list of them; every name
/// must be a configured pool.
fn skill_mapping(config: &Bound<'_, PyAny>, pools: &Pools) -> PyResult<SkillMapping> {
    let Some(mapping) = present(config, "skill_mapping")? else {
        return Ok(SkillMapping::default());
    };
    let mapping = mapping
        .cast::<PyDict>()
        .map_err(|_| args::type_error("config.skill_mapping", "a dict", &mapping))?;
    let mut entries = Vec::new();
    for (skill, names) in mapping.iter() {
        let skill: Arc<str> = Arc::from(args::string("config.skill_mapping key", &skill)?.as_ref());
        let where_ = format!("config.skill_mapping[{skill:?}]");
        let names: Vec<Bound<'_, PyAny>> = if names.is_instance_of::<PyString>() {
            vec![names]
        } else {
            names
                .try_iter()
                .map_err(|_| args::type_error(&where_, "a pool name or a list of them", &names))?
                .collect::<PyResult<_>>()?
        };
        let mut indexes = Vec::new();
        for name in names {
            let name = args::string(&where_, &name)?;
            let index = pools.index(&name).ok_or_else(|| {
                PoolNotFoundError::new_err(format!("{where_}: no pool named {name:?}"))
            })?;
            indexes.push(index);
        }
        entries.push((skill, indexes));
    }
    Ok(SkillMapping::new(entries))
}

/// The pools of `config.agent_pools`, with the Python pool objects (handed to
/// `launch`) in the same order. A repeated name keeps its first definition.
pub fn read_pools(config: &Bound<'_, PyAny>) -> PyResult<(Pools, Vec<Py<PyAny>>)> {
    let mut states: Vec<PoolState> = Vec::new();
    let mut objects = Vec::new();
    if let Some(list) = present(config, "agent_pools")? {
        for pool in list.try_iter()? {
            let pool = pool?;
            let name = getattr_opt(&pool, "name")?
                .ok_or_else(|| PyTypeError::new_err("config.agent_pools: a pool has no name"))?;
            let name: Arc<str> =
                Arc::from(args::string("config.agent_pools[].name", &name)?.as_ref());
            if states.iter().any(|p| p.name == name) {
                continue;
            }
            let kind = match getattr_opt(&pool, "type")? {
                Some(t) => enum_value(&t)?.str()?.to_string(),
                None => "local-process".to_owned(),
            };
            let max = match getattr_opt(&pool, "max_concurrency")? {
                Some(m) => args::non_negative_int(&format!("pool {name:?} max_concurrency"), &m)?,
                None => 1,
            };
            let enabled = match getattr_opt(&pool, "enabled")? {
                Some(e) => e.is_truthy()?,
                None => true,
            };
            states.push(PoolState {
                enabled,
                ..PoolState::new(&name, &kind, max)
            });
            objects.push(pool.unbind());
        }
    }
    Ok((Pools::new(states), objects))
}

/// A task object (or dict) as the core sees it.
pub fn task_meta(task: &Bound<'_, PyAny>) -> PyResult<TaskMeta> {
    task_meta_with_id(task, attr_opt(task, name!(task.py(), "id")))
}

/// [`task_meta`] for a task whose `id` attribute the caller has read.
pub fn task_meta_with_id<'py>(
    task: &Bound<'py, PyAny>,
    id: PyResult<Option<Bound<'py, PyAny>>>,
) -> PyResult<TaskMeta> {
    let py = task.py();
    let id = id?.ok_or_else(|| args::type_error("task", "an object or dict with an 'id'", task))?;
    let id = TaskId::from(args::string("task.id", &id)?.as_ref());
    let priority = match attr_opt(task, name!(py, "priority"))?.filter(|p| !p.is_none()) {
        Some(p) => args::saturating_int("task.priority", &p)?,
        None => 0,
    };
    let created_at = match attr_opt(task, name!(py, "created_at"))? {
        Some(c) => datetime::optional_from_py("task.created_at", &c)?,
        None => None,
    };
    let required_skill = match attr_opt(task, name!(py, "required_skill"))? {
        Some(s) => args::optional_string("task.required_skill", Some(&s))?.map(|s| shared_name(&s)),
        None => None,
    };
    let metadata = attr_opt(task, name!(py, "metadata"))?.filter(|m| !m.is_none());
    let lookup = |key: &Bound<'_, PyString>| -> PyResult<Option<Arc<str>>> {
        let Some(m) = &metadata else { return Ok(None) };
        match m.get_item(key) {
            Ok(v) if !v.is_none() => Ok(Some(shared_name(&v.str()?.to_cow()?))),
            Ok(_) => Ok(None),
            Err(e) if e.is_instance_of::<PyKeyError>(py) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let spec_name = lookup(name!(py, "spec_name"))?.unwrap_or_else(|| shared_name("unknown"));
    let repo_name = lookup(name!(py, "repo_name"))?.unwrap_or_else(|| spec_name.clone());
    Ok(TaskMeta {
        id,
        names: TaskNames::shared(spec_name, repo_name, required_skill),
        priority,
        created_at,
    })
}

pub fn optional_arc(name: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Arc<str>>> {
    Ok(args::optional_string(name, obj)?.map(|s| Arc::from(s.as_ref())))
}

/// [`optional_arc`] for an id.
pub fn optional_id(name: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Id>> {
    Ok(args::optional_string(name, obj)?.map(|s| Id::from(s.as_ref())))
}
