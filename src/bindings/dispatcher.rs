//! `DispatcherCore` as a Python class: converts arguments, holds the ports, and
//! performs the effects the core decided — always after releasing its lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::backoff::BackoffPolicy;
use crate::bindings::args;
use crate::bindings::retry::{PyRetryInfo, PyRetryManager};
use crate::bindings::{clock, datetime};
use crate::clock::{seconds_to_nanos, Clock, Now};
use crate::dispatcher::{
    DispatcherState, Effect, Limits, NewRunner, Outcome, Refusal, StateMetadata, TaskMeta,
};
use crate::pools::{PoolState, Pools};
use crate::retry_manager::{log_failure, RetryManager};
use crate::runners::RunnerDetails;

create_exception!(
    _core,
    DispatcherError,
    PyException,
    "Base of the dispatcher's errors."
);
create_exception!(
    _core,
    TaskAssignmentError,
    DispatcherError,
    "A task could not be assigned."
);
create_exception!(
    _core,
    SlotAllocationError,
    DispatcherError,
    "A slot could not be allocated."
);
create_exception!(
    _core,
    RunnerLaunchError,
    DispatcherError,
    "A runner could not be launched."
);
create_exception!(
    _core,
    PoolNotFoundError,
    DispatcherError,
    "No agent pool has that name."
);
create_exception!(
    _core,
    DeadlockDetectedError,
    DispatcherError,
    "Tasks wait on each other."
);

const LOG_TARGET: &str = "necrocode_dispatch::dispatcher_core";

fn refusal_to_py(refusal: Refusal) -> PyErr {
    match refusal {
        Refusal::UnknownPool(_) => PoolNotFoundError::new_err(refusal.to_string()),
        Refusal::PoolFull(_) | Refusal::GlobalLimitReached(_) => {
            TaskAssignmentError::new_err(refusal.to_string())
        }
        _ => PyValueError::new_err(refusal.to_string()),
    }
}

/// The outside world, injected. Each may be None (its calls are skipped).
struct Ports {
    config: Py<PyAny>,
    task_source: Py<PyAny>,
    task_registry: Py<PyAny>,
    repo_pool_manager: Py<PyAny>,
    runner_launcher: Py<PyAny>,
    event_recorder: Py<PyAny>,
    task_state_type: Py<PyAny>,
}

/// The dispatcher's state machine, with its ports, thread-safe.
#[pyclass(module = "necrocode_dispatch._core", name = "DispatcherCore", frozen)]
pub struct PyDispatcherCore {
    state: Mutex<DispatcherState<Py<PyAny>>>,
    clock: Arc<dyn Clock>,
    clock_obj: Py<PyAny>,
    retry: Mutex<(Arc<RetryManager>, Py<PyRetryManager>)>,
    ports: RwLock<Ports>,
    running: AtomicBool,
}

fn getattr_opt<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    if let Ok(dict) = obj.cast::<PyDict>() {
        return dict.get_item(name);
    }
    match obj.getattr(name) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(obj.py()) => Ok(None),
        Err(e) => Err(e),
    }
}

/// An enum member's `.value`, or the object itself.
fn enum_value<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    Ok(getattr_opt(obj, "value")?.unwrap_or_else(|| obj.clone()))
}

fn config_number(config: &Bound<'_, PyAny>, name: &str, default: f64) -> PyResult<f64> {
    match getattr_opt(config, name)? {
        Some(v) if !v.is_none() => args::number(&format!("config.{name}"), &v),
        _ => Ok(default),
    }
}

fn config_count(config: &Bound<'_, PyAny>, name: &str, default: u64) -> PyResult<u64> {
    match getattr_opt(config, name)? {
        Some(v) if !v.is_none() => args::non_negative_int(&format!("config.{name}"), &v),
        _ => Ok(default),
    }
}

fn non_negative_seconds(name: &str, value: f64) -> PyResult<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(PyValueError::new_err(format!(
            "{name} must be a finite number >= 0, got {}",
            crate::backoff::python_float_repr(value)
        )))
    }
}

/// The settings the core reads from a `DispatcherConfig`.
struct CoreSettings {
    limits: Limits,
    pools: Pools,
    by_priority: bool,
    policy: BackoffPolicy,
}

fn read_config(config: &Bound<'_, PyAny>) -> PyResult<CoreSettings> {
    let heartbeat = non_negative_seconds(
        "config.heartbeat_timeout",
        config_number(config, "heartbeat_timeout", 60.0)?,
    )?;
    let limits = Limits {
        max_global_concurrency: config_count(config, "max_global_concurrency", 10)?,
        heartbeat_timeout: seconds_to_nanos(heartbeat),
    };
    let policy = BackoffPolicy::new(
        config_count(config, "retry_max_attempts", 3)?,
        config_number(config, "retry_backoff_base", 2.0)?,
        config_number(config, "retry_initial_delay", 1.0)?,
        config_number(config, "retry_max_delay", 300.0)?,
    )
    .map_err(|e| PyValueError::new_err(format!("config.retry_{e}")))?;
    let mut pools = Vec::new();
    if let Some(list) = getattr_opt(config, "agent_pools")? {
        for pool in list.try_iter()? {
            let pool = pool?;
            let name = getattr_opt(&pool, "name")?
                .ok_or_else(|| PyTypeError::new_err("config.agent_pools: a pool has no name"))?;
            let kind = match getattr_opt(&pool, "type")? {
                Some(t) => enum_value(&t)?.str()?.to_string(),
                None => "local-process".to_owned(),
            };
            let max = match getattr_opt(&pool, "max_concurrency")? {
                Some(m) => args::non_negative_int("max_concurrency", &m)?,
                None => 1,
            };
            let enabled = match getattr_opt(&pool, "enabled")? {
                Some(e) => e.is_truthy()?,
                None => true,
            };
            pools.push(PoolState {
                name: Arc::from(args::string("config.agent_pools[].name", &name)?.as_ref()),
                kind: Arc::from(kind.as_str()),
                max_concurrency: max,
                running: 0,
                enabled,
            });
        }
    }
    let by_priority = match getattr_opt(config, "scheduling_policy")? {
        Some(p) if !p.is_none() => enum_value(&p)?.str()?.to_cow()? == "priority",
        _ => true,
    };
    Ok(CoreSettings {
        limits,
        pools: Pools::new(pools),
        by_priority,
        policy,
    })
}

/// A task object (or dict) as the core sees it.
fn task_meta(task: &Bound<'_, PyAny>) -> PyResult<TaskMeta> {
    let id = getattr_opt(task, "id")?
        .ok_or_else(|| args::type_error("task", "an object or dict with an 'id'", task))?;
    let id: Arc<str> = Arc::from(args::string("task.id", &id)?.as_ref());
    let priority = match getattr_opt(task, "priority")? {
        Some(p) if !p.is_none() => args::saturating_int("task.priority", &p)?,
        _ => 0,
    };
    let created_at = match getattr_opt(task, "created_at")? {
        Some(c) => datetime::optional_from_py("task.created_at", &c)?,
        None => None,
    };
    let required_skill = match getattr_opt(task, "required_skill")? {
        Some(s) => {
            args::optional_string("task.required_skill", Some(&s))?.map(|s| Arc::from(s.as_ref()))
        }
        None => None,
    };
    let metadata = getattr_opt(task, "metadata")?.filter(|m| !m.is_none());
    let lookup = |key: &str| -> PyResult<Option<Arc<str>>> {
        let Some(m) = &metadata else { return Ok(None) };
        match m.get_item(key) {
            Ok(v) if !v.is_none() => Ok(Some(Arc::from(v.str()?.to_cow()?.as_ref()))),
            Ok(_) => Ok(None),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyKeyError>(task.py()) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let spec_name = lookup("spec_name")?.unwrap_or_else(|| Arc::from("unknown"));
    let repo_name = lookup("repo_name")?.unwrap_or_else(|| spec_name.clone());
    Ok(TaskMeta {
        id,
        spec_name,
        repo_name,
        priority,
        created_at,
        required_skill,
    })
}

fn optional_arc(name: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Arc<str>>> {
    Ok(args::optional_string(name, obj)?.map(|s| Arc::from(s.as_ref())))
}

impl PyDispatcherCore {
    fn retry_core(&self) -> Arc<RetryManager> {
        self.retry.lock().0.clone()
    }

    fn port(&self, py: Python<'_>, pick: fn(&Ports) -> &Py<PyAny>) -> Py<PyAny> {
        pick(&self.ports.read()).clone_ref(py)
    }

    /// Runs `decide` on the state and the retry book under both locks (state
    /// first, then book), with one clock reading.
    fn decide<R>(
        &self,
        decide: impl FnOnce(
            &mut DispatcherState<Py<PyAny>>,
            &mut crate::retry_state::RetryBook,
            Now,
        ) -> R,
    ) -> R {
        let retry = self.retry_core();
        let mut state = self.state.lock();
        let mut book = retry.lock();
        let now = self.clock.now();
        decide(&mut state, &mut book, now)
    }

    /// Performs an outcome's effects on the ports, in order. A port that raises
    /// is logged and the rest still happen.
    fn perform(&self, py: Python<'_>, outcome: Outcome<Py<PyAny>>) -> PyResult<bool> {
        if let Some(failure) = &outcome.failure {
            log_failure(failure);
        }
        for effect in outcome.effects {
            if let Err(err) = self.perform_one(py, effect) {
                log::error!(target: LOG_TARGET, "{err}");
            }
        }
        Ok(outcome.applied)
    }

    fn perform_one(&self, py: Python<'_>, effect: Effect<Py<PyAny>>) -> Result<(), String> {
        let fail = |what: &str, e: PyErr| format!("{what} failed: {e}");
        match effect {
            Effect::Discard(handle) => drop(handle),
            Effect::ReleaseSlot { slot_id } => {
                let pool = self.port(py, |p| &p.repo_pool_manager).into_bound(py);
                if !pool.is_none() {
                    let kwargs = PyDict::new(py);
                    kwargs
                        .set_item("cleanup", true)
                        .map_err(|e| fail("release_slot", e))?;
                    pool.call_method("release_slot", (slot_id.as_ref(),), Some(&kwargs))
                        .map_err(|e| fail(&format!("release_slot({slot_id:?})"), e))?;
                }
            }
            Effect::ReportState {
                spec_name,
                task_id,
                state,
                metadata,
            } => {
                let registry = self.port(py, |p| &p.task_registry).into_bound(py);
                if registry.is_none() {
                    return Ok(());
                }
                let result = (|| -> PyResult<()> {
                    let state_type = self.port(py, |p| &p.task_state_type).into_bound(py);
                    let new_state = state_type.call1((state.value(),))?;
                    let kwargs = PyDict::new(py);
                    kwargs.set_item("spec_name", spec_name.as_ref())?;
                    kwargs.set_item("task_id", task_id.as_ref())?;
                    kwargs.set_item("new_state", new_state)?;
                    kwargs.set_item("metadata", metadata_dict(py, &metadata)?)?;
                    registry.call_method("update_task_state", (), Some(&kwargs))?;
                    Ok(())
                })();
                result.map_err(|e| {
                    fail(
                        &format!("update_task_state({task_id:?} -> {})", state.value()),
                        e,
                    )
                })?;
            }
            Effect::RunnerFinished {
                spec_name,
                task_id,
                runner_id,
                slot_id,
                success,
                execution_time_seconds,
                failure_reason,
            } => self
                .record_event(py, "record_runner_finished", |k| {
                    k.set_item("spec_name", spec_name.as_ref())?;
                    k.set_item("task_id", task_id.as_ref())?;
                    k.set_item("runner_id", runner_id.as_ref())?;
                    k.set_item("slot_id", slot_id.as_deref())?;
                    k.set_item("success", success)?;
                    k.set_item("execution_time_seconds", execution_time_seconds)?;
                    k.set_item("failure_reason", failure_reason.as_deref())
                })
                .map_err(|e| fail("record_runner_finished", e))?,
            Effect::TaskCompleted {
                spec_name,
                task_id,
                runner_id,
                execution_time_seconds,
            } => self
                .record_event(py, "record_task_completed", |k| {
                    k.set_item("spec_name", spec_name.as_ref())?;
                    k.set_item("task_id", task_id.as_ref())?;
                    k.set_item("runner_id", runner_id.as_ref())?;
                    k.set_item("execution_time_seconds", execution_time_seconds)
                })
                .map_err(|e| fail("record_task_completed", e))?,
            Effect::TaskFailed {
                spec_name,
                task_id,
                runner_id,
                failure_reason,
                retry_count,
            } => self
                .record_event(py, "record_task_failed", |k| {
                    k.set_item("spec_name", spec_name.as_ref())?;
                    k.set_item("task_id", task_id.as_ref())?;
                    k.set_item("runner_id", runner_id.as_deref())?;
                    k.set_item("failure_reason", failure_reason.as_ref())?;
                    k.set_item("retry_count", retry_count)
                })
                .map_err(|e| fail("record_task_failed", e))?,
            Effect::StopRunner { runner_id } => {
                let launcher = self.port(py, |p| &p.runner_launcher).into_bound(py);
                if !launcher.is_none() && launcher.hasattr("stop").unwrap_or(false) {
                    launcher
                        .call_method1("stop", (runner_id.as_ref(),))
                        .map_err(|e| fail(&format!("stop({runner_id:?})"), e))?;
                }
            }
        }
        Ok(())
    }

    fn record_event(
        &self,
        py: Python<'_>,
        method: &str,
        fill: impl FnOnce(&Bound<'_, PyDict>) -> PyResult<()>,
    ) -> PyResult<()> {
        let recorder = self.port(py, |p| &p.event_recorder).into_bound(py);
        if recorder.is_none() {
            return Ok(());
        }
        let kwargs = PyDict::new(py);
        fill(&kwargs)?;
        recorder.call_method(method, (), Some(&kwargs))?;
        Ok(())
    }

    fn set_port(&self, pick: fn(&mut Ports) -> &mut Py<PyAny>, value: &Bound<'_, PyAny>) {
        let old = {
            let mut ports = self.ports.write();
            std::mem::replace(pick(&mut ports), value.clone().unbind())
        };
        drop(old); // after the lock: dropping may run Python code
    }
}

fn metadata_dict<'py>(py: Python<'py>, metadata: &StateMetadata) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match metadata {
        StateMetadata::Running {
            runner_id,
            assigned_slot,
            pool_name,
            started_at,
        } => {
            d.set_item("runner_id", runner_id.as_ref())?;
            d.set_item("assigned_slot", assigned_slot.as_deref())?;
            d.set_item("pool_name", pool_name.as_ref())?;
            d.set_item("started_at", started_at.to_string())?;
        }
        StateMetadata::Retry {
            retry_count,
            next_retry_at,
            failure_reason,
        } => {
            d.set_item("retry_count", retry_count)?;
            d.set_item("next_retry_at", next_retry_at.to_string())?;
            d.set_item("failure_reason", failure_reason.as_ref())?;
        }
        StateMetadata::Interrupted => d.set_item("interrupted", true)?,
        StateMetadata::Done {
            runner_id,
            completed_at,
        } => {
            d.set_item("runner_id", runner_id.as_ref())?;
            d.set_item("completed_at", completed_at.to_string())?;
        }
        StateMetadata::Failed {
            reason,
            retries,
            runner_id,
        } => {
            d.set_item("reason", reason.as_ref())?;
            d.set_item("retries", retries)?;
            d.set_item("runner_id", runner_id.as_deref())?;
        }
    }
    Ok(d)
}

#[pymethods]
impl PyDispatcherCore {
    #[new]
    #[pyo3(signature = (config = None, *, task_source = None, task_registry = None, repo_pool_manager = None, runner_launcher = None, event_recorder = None, clock = None, task_state_type = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        config: Option<&Bound<'_, PyAny>>,
        task_source: Option<&Bound<'_, PyAny>>,
        task_registry: Option<&Bound<'_, PyAny>>,
        repo_pool_manager: Option<&Bound<'_, PyAny>>,
        runner_launcher: Option<&Bound<'_, PyAny>>,
        event_recorder: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        task_state_type: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let config = match config.filter(|c| !c.is_none()) {
            Some(c) => c.clone(),
            None => py
                .import("necrocode_dispatch.config")?
                .getattr("DispatcherConfig")?
                .call0()?,
        };
        let settings = read_config(&config)?;
        let task_state_type = match task_state_type.filter(|t| !t.is_none()) {
            Some(t) => t.clone(),
            None => py
                .import("necrocode_dispatch.models")?
                .getattr("TaskState")?,
        };
        let (core_clock, clock_obj) = clock::from_arg(py, clock)?;
        let retry = Arc::new(RetryManager::new(settings.policy, core_clock.clone()));
        let retry_obj = Py::new(
            py,
            PyRetryManager::from_core(retry.clone(), clock_obj.clone_ref(py)),
        )?;
        let none = || py.None();
        let or_none = |p: Option<&Bound<'_, PyAny>>| p.map_or_else(none, |p| p.clone().unbind());
        Ok(PyDispatcherCore {
            state: Mutex::new(DispatcherState::new(
                settings.limits,
                settings.pools,
                settings.by_priority,
            )),
            clock: core_clock,
            clock_obj,
            retry: Mutex::new((retry, retry_obj)),
            ports: RwLock::new(Ports {
                config: config.unbind(),
                task_source: or_none(task_source),
                task_registry: or_none(task_registry),
                repo_pool_manager: or_none(repo_pool_manager),
                runner_launcher: or_none(runner_launcher),
                event_recorder: or_none(event_recorder),
                task_state_type: task_state_type.unbind(),
            }),
            running: AtomicBool::new(false),
        })
    }

    #[getter]
    fn config(&self, py: Python<'_>) -> Py<PyAny> {
        self.port(py, |p| &p.config)
    }

    /// Assigning a config re-reads its limits, heartbeat timeout and retry
    /// settings; pools keep their running counts.
    #[setter]
    fn set_config(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let settings = read_config(value)?;
        self.state.lock().set_limits(settings.limits);
        let retry = self.retry_core();
        let mut book = retry.lock();
        book.set_policy(settings.policy);
        drop(book);
        self.set_port(|p| &mut p.config, value);
        Ok(())
    }

    #[getter]
    fn task_source(&self, py: Python<'_>) -> Py<PyAny> {
        self.port(py, |p| &p.task_source)
    }

    #[setter]
    fn set_task_source(&self, value: &Bound<'_, PyAny>) {
        self.set_port(|p| &mut p.task_source, value)
    }

    #[getter]
    fn task_registry(&self, py: Python<'_>) -> Py<PyAny> {
        self.port(py, |p| &p.task_registry)
    }

    #[setter]
    fn set_task_registry(&self, value: &Bound<'_, PyAny>) {
        self.set_port(|p| &mut p.task_registry, value)
    }

    #[getter]
    fn repo_pool_manager(&self, py: Python<'_>) -> Py<PyAny> {
        self.port(py, |p| &p.repo_pool_manager)
    }

    #[setter]
    fn set_repo_pool_manager(&self, value: &Bound<'_, PyAny>) {
        self.set_port(|p| &mut p.repo_pool_manager, value)
    }

    #[getter]
    fn runner_launcher(&self, py: Python<'_>) -> Py<PyAny> {
        self.port(py, |p| &p.runner_launcher)
    }

    #[setter]
    fn set_runner_launcher(&self, value: &Bound<'_, PyAny>) {
        self.set_port(|p| &mut p.runner_launcher, value)
    }

    #[getter]
    fn event_recorder(&self, py: Python<'_>) -> Py<PyAny> {
        self.port(py, |p| &p.event_recorder)
    }

    #[setter]
    fn set_event_recorder(&self, value: &Bound<'_, PyAny>) {
        self.set_port(|p| &mut p.event_recorder, value)
    }

    #[getter]
    fn task_state_type(&self, py: Python<'_>) -> Py<PyAny> {
        self.port(py, |p| &p.task_state_type)
    }

    #[setter]
    fn set_task_state_type(&self, value: &Bound<'_, PyAny>) {
        self.set_port(|p| &mut p.task_state_type, value)
    }

    #[getter]
    fn retry_manager(&self, py: Python<'_>) -> Py<PyRetryManager> {
        self.retry.lock().1.clone_ref(py)
    }

    #[setter]
    fn set_retry_manager(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let manager = value
            .cast::<PyRetryManager>()
            .map_err(|_| args::type_error("retry_manager", "a RetryManager", value))?;
        let core = manager.get().core.clone();
        let old = std::mem::replace(&mut *self.retry.lock(), (core, manager.clone().unbind()));
        drop(old);
        Ok(())
    }

    #[getter]
    fn clock(&self, py: Python<'_>) -> Py<PyAny> {
        self.clock_obj.clone_ref(py)
    }

    #[getter]
    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    #[setter]
    fn set_running(&self, value: bool) {
        self.running.store(value, Ordering::SeqCst);
    }

    /// Puts `task` into the dispatcher as running on a runner in `pool_name`,
    /// reserving the pool's and the global capacity. No port is called.
    #[pyo3(signature = (task, runner_id, pool_name, slot_id = None, *, started_at = None, pid = None, container_id = None, job_name = None))]
    #[allow(clippy::too_many_arguments)]
    fn track_running(
        &self,
        task: &Bound<'_, PyAny>,
        runner_id: &Bound<'_, PyAny>,
        pool_name: &Bound<'_, PyAny>,
        slot_id: Option<&Bound<'_, PyAny>>,
        started_at: Option<&Bound<'_, PyAny>>,
        pid: Option<&Bound<'_, PyAny>>,
        container_id: Option<&Bound<'_, PyAny>>,
        job_name: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let meta = task_meta(task)?;
        let runner = NewRunner {
            runner_id: Arc::from(args::string("runner_id", runner_id)?.as_ref()),
            pool_name: Arc::from(args::string("pool_name", pool_name)?.as_ref()),
            slot_id: optional_arc("slot_id", slot_id)?,
            started_at: match started_at {
                Some(s) => datetime::optional_from_py("started_at", s)?,
                None => None,
            },
            details: RunnerDetails {
                pid: match pid.filter(|p| !p.is_none()) {
                    Some(p) => Some(args::saturating_int("pid", p)?),
                    None => None,
                },
                container_id: optional_arc("container_id", container_id)?,
                job_name: optional_arc("job_name", job_name)?,
            },
        };
        let handle = task.clone().unbind();
        let result =
            self.decide(|state, _, now| state.track_running(meta, Some(handle), runner, now));
        result.map_err(refusal_to_py)
    }

    /// The failure path (SPEC §4.3). Returns False when `runner_id`'s outcome
    /// was already applied (nothing changed).
    #[pyo3(signature = (task_id, spec_name = None, failure_reason = None, runner_id = None, slot_id = None, pool_name = None))]
    #[allow(clippy::too_many_arguments)]
    fn handle_task_failure(
        &self,
        py: Python<'_>,
        task_id: &Bound<'_, PyAny>,
        spec_name: Option<&Bound<'_, PyAny>>,
        failure_reason: Option<&Bound<'_, PyAny>>,
        runner_id: Option<&Bound<'_, PyAny>>,
        slot_id: Option<&Bound<'_, PyAny>>,
        pool_name: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let task_id = args::string("task_id", task_id)?;
        let spec_name = args::optional_string("spec_name", spec_name)?;
        let reason = args::optional_string("failure_reason", failure_reason)?;
        let runner_id = args::optional_string("runner_id", runner_id)?;
        // Known from the tracked runner; checked for type only.
        args::optional_string("slot_id", slot_id)?;
        args::optional_string("pool_name", pool_name)?;
        let outcome = self
            .decide(|state, book, now| {
                state.fail_task(
                    &task_id,
                    spec_name.as_deref(),
                    reason.as_deref().unwrap_or("unknown"),
                    runner_id.as_deref(),
                    book,
                    now,
                )
            })
            .map_err(refusal_to_py)?;
        self.perform(py, outcome)
    }

    /// A runner finished. The first report for a runner wins; a later one
    /// returns False and changes nothing.
    #[pyo3(signature = (runner_id, task_id = None, spec_name = None, success = None, slot_id = None, pool_name = None, failure_reason = None))]
    #[allow(clippy::too_many_arguments)]
    fn handle_runner_completion(
        &self,
        py: Python<'_>,
        runner_id: &Bound<'_, PyAny>,
        task_id: Option<&Bound<'_, PyAny>>,
        spec_name: Option<&Bound<'_, PyAny>>,
        success: Option<&Bound<'_, PyAny>>,
        slot_id: Option<&Bound<'_, PyAny>>,
        pool_name: Option<&Bound<'_, PyAny>>,
        failure_reason: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let runner_id = args::string("runner_id", runner_id)?;
        for (name, value) in [
            ("task_id", task_id),
            ("spec_name", spec_name),
            ("slot_id", slot_id),
            ("pool_name", pool_name),
        ] {
            args::optional_string(name, value)?;
        }
        let success = match success {
            Some(s) if s.is_instance_of::<pyo3::types::PyBool>() => s.is_truthy()?,
            Some(s) => return Err(args::type_error("success", "a bool", s)),
            None => {
                return Err(PyTypeError::new_err(
                    "success must be given (True or False)",
                ))
            }
        };
        let reason = args::optional_string("failure_reason", failure_reason)?;
        let outcome = self.decide(|state, book, now| {
            state.complete(&runner_id, success, reason.as_deref(), book, now)
        });
        self.perform(py, outcome)
    }

    /// Records a heartbeat; False for a runner that is not tracked.
    fn update_heartbeat(&self, runner_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        let runner_id = args::string("runner_id", runner_id)?;
        Ok(self.decide(|state, _, now| state.heartbeat(&runner_id, now)))
    }

    /// Times out every runner silent for longer than `heartbeat_timeout`;
    /// returns how many.
    fn check_heartbeats(&self, py: Python<'_>) -> PyResult<usize> {
        let outcomes = self.decide(|state, book, now| state.check_heartbeats(book, now));
        let count = outcomes.len();
        for outcome in outcomes {
            self.perform(py, outcome)?;
        }
        Ok(count)
    }

    /// One runner's timeout (the failure path, reason `timeout`); the spec name
    /// comes from the tracked runner. `runner_info` is accepted for
    /// compatibility and not needed.
    #[pyo3(signature = (runner_id, runner_info = None))]
    fn _handle_runner_timeout(
        &self,
        py: Python<'_>,
        runner_id: &Bound<'_, PyAny>,
        runner_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let _ = runner_info;
        let runner_id = args::string("runner_id", runner_id)?;
        let outcome = self.decide(|state, book, now| state.time_out(&runner_id, book, now));
        self.perform(py, outcome)
    }

    /// One pass of the loop: poll the source, queue new tasks, move retries
    /// whose backoff has elapsed back to the queue, check heartbeats.
    fn tick<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let source = self.port(py, |p| &p.task_source).into_bound(py);
        let mut polled = Vec::new();
        if !source.is_none() {
            // A source that raises, or returns something odd, is logged; the
            // pass goes on with what it did return.
            let result = (|| -> PyResult<()> {
                let tasks = source.call_method0("poll_ready_tasks")?;
                for task in tasks.try_iter()? {
                    let task = task?;
                    match task_meta(&task) {
                        Ok(meta) => polled.push((meta, task.unbind())),
                        Err(e) => log::error!(target: LOG_TARGET, "ignoring a polled task: {e}"),
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                log::error!(target: LOG_TARGET, "poll_ready_tasks failed: {e}");
            }
        }
        let (enqueued, ignored, promoted) = self.decide(|state, _, now| {
            let mut enqueued = 0usize;
            let mut ignored = Vec::new();
            for (meta, handle) in polled {
                match state.offer(meta, handle, now) {
                    Ok(()) => enqueued += 1,
                    Err(handle) => ignored.push(handle),
                }
            }
            let promoted = state.promote_due(now.mono);
            (enqueued, ignored, promoted)
        });
        let ignored_count = ignored.len();
        drop(ignored);
        let timed_out = self.check_heartbeats(py)?;
        let out = PyDict::new(py);
        out.set_item("enqueued", enqueued)?;
        out.set_item("ignored", ignored_count)?;
        out.set_item("retries_ready", promoted)?;
        out.set_item("assigned", 0)?;
        out.set_item("timed_out", timed_out)?;
        Ok(out)
    }

    fn get_global_running_count(&self) -> u64 {
        self.state.lock().global_running()
    }

    fn can_accept_task_globally(&self) -> bool {
        self.state.lock().can_accept_globally()
    }

    /// Ids of queued tasks, in scheduling order.
    fn get_queued_task_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let ids = self.state.lock().queued_ids();
        PyList::new(py, ids.iter().map(|s| s.as_ref()))
    }

    /// Where the dispatcher holds a task: "queued", "delayed", "running" or None.
    fn get_task_place(&self, task_id: &Bound<'_, PyAny>) -> PyResult<Option<&'static str>> {
        let task_id = args::string("task_id", task_id)?;
        Ok(self.state.lock().place_of(&task_id).map(|p| match p {
            crate::dispatcher::Place::Queued => "queued",
            crate::dispatcher::Place::Delayed { .. } => "delayed",
            crate::dispatcher::Place::Running { .. } => "running",
        }))
    }

    fn get_status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let retry = self.retry_core();
        let (snapshot, retry_info) = {
            let state = self.state.lock();
            let book = retry.lock();
            (state.status(&book), book.all_info())
        };
        let policy = {
            let config = self.port(py, |p| &p.config).into_bound(py);
            match getattr_opt(&config, "scheduling_policy")? {
                Some(p) => enum_value(&p)?.str()?.unbind(),
                None => PyString::new(py, "priority").unbind(),
            }
        };
        let out = PyDict::new(py);
        out.set_item("running", self.running())?;
        out.set_item("scheduling_policy", policy)?;
        out.set_item("queue_size", snapshot.queue_size)?;
        let delayed = PyList::empty(py);
        for (id, next) in &snapshot.delayed {
            let d = PyDict::new(py);
            d.set_item("task_id", id.as_ref())?;
            d.set_item("next_retry_at", next.to_string())?;
            delayed.append(d)?;
        }
        out.set_item("delayed", delayed)?;
        out.set_item("running_tasks", snapshot.running_tasks)?;
        out.set_item("global_running_count", snapshot.global_running)?;
        out.set_item("max_global_concurrency", snapshot.max_global_concurrency)?;
        let pools = PyList::empty(py);
        for pool in &snapshot.pools {
            let d = PyDict::new(py);
            d.set_item("pool_name", pool.name.as_ref())?;
            d.set_item("type", pool.kind.as_ref())?;
            d.set_item("enabled", pool.enabled)?;
            d.set_item("max_concurrency", pool.max_concurrency)?;
            d.set_item("current_running", pool.running)?;
            d.set_item("utilization", pool.utilization())?;
            d.set_item("cpu_usage", py.None())?;
            d.set_item("memory_usage", py.None())?;
            pools.append(d)?;
        }
        out.set_item("pool_statuses", pools)?;
        let m = snapshot.metrics;
        let metrics = PyDict::new(py);
        metrics.set_item("tasks_enqueued", m.tasks_enqueued)?;
        metrics.set_item("tasks_assigned", m.tasks_assigned)?;
        metrics.set_item("tasks_completed", m.tasks_completed)?;
        metrics.set_item("tasks_failed", m.tasks_failed)?;
        metrics.set_item("retries_scheduled", m.retries_scheduled)?;
        metrics.set_item("runner_timeouts", m.runner_timeouts)?;
        metrics.set_item("runners_force_stopped", m.runners_force_stopped)?;
        out.set_item("metrics", metrics)?;
        let infos = PyDict::new(py);
        for info in retry_info {
            let key = info.task_id.clone();
            infos.set_item(key.as_ref(), PyRetryInfo::from(info).to_dict(py)?)?;
        }
        out.set_item("retry_info", infos)?;
        Ok(out)
    }

    /// Changes a held task's priority, reordering the queue; False when the
    /// dispatcher does not hold the task.
    fn update_task_priority(
        &self,
        spec_name: &Bound<'_, PyAny>,
        task_id: &Bound<'_, PyAny>,
        new_priority: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        args::string("spec_name", spec_name)?;
        let task_id = args::string("task_id", task_id)?;
        let priority = args::saturating_int("new_priority", new_priority)?;
        Ok(self.state.lock().set_priority(&task_id, priority))
    }

    fn enable_pool(&self, name: &Bound<'_, PyAny>) -> PyResult<()> {
        let name = args::string("name", name)?;
        self.state
            .lock()
            .set_pool_enabled(&name, true)
            .map_err(refusal_to_py)
    }

    fn disable_pool(&self, name: &Bound<'_, PyAny>) -> PyResult<()> {
        let name = args::string("name", name)?;
        self.state
            .lock()
            .set_pool_enabled(&name, false)
            .map_err(refusal_to_py)
    }

    /// Every invariant of SPEC §4.5 the state can check; raises AssertionError
    /// naming the first one broken. For tests.
    fn _check_invariants(&self) -> PyResult<()> {
        self.state
            .lock()
            .check_invariants()
            .map_err(pyo3::exceptions::PyAssertionError::new_err)
    }
}
