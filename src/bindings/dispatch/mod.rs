//! `DispatcherCore` as a Python class: converts arguments, holds the ports,
//! and performs what the core decided — always after releasing its lock.

mod deadlocks;
mod delivery;
mod errors;
mod lifecycle;
mod ports;
mod run_loop;
mod settings;
mod status;

use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use pyo3::exceptions::{PyAssertionError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString};

pub use deadlocks::check_dependencies;
use errors::refusal_to_py;
pub use errors::{
    DeadlockDetectedError, DispatcherError, PoolNotFoundError, RunnerLaunchError,
    SlotAllocationError, TaskAssignmentError,
};
pub use lifecycle::{_after_fork_in_child, _stop_loops_at_exit, DispatchLoop, Waker};
use ports::{Assigned, KnownTexts, Ports};
use run_loop::LoopControl;
use settings::{config_number, optional_arc, optional_id, read_pools, read_tunables, task_meta};

use crate::bindings::args;
use crate::bindings::files;
use crate::bindings::names::name;
use crate::bindings::retry::options as retry_options;
use crate::bindings::retry::{self, PyRetryManager};
use crate::bindings::time::{clock, datetime};
use crate::dispatch::runners::RunnerDetails;
use crate::dispatch::scheduling::{Policy, Scheduler};
use crate::dispatch::snapshot as dispatcher_snapshot;
use crate::dispatch::state::{DispatcherState, NewRunner, Place};
use crate::id::RunnerId;
use crate::persist;
use crate::retry::manager::RetryManager;
use crate::retry::snapshot::SnapshotError;
use crate::retry::state::RetryBook;
use crate::time::clock::{Clock, Now};

const LOG_TARGET: &str = "necrocode_dispatch::dispatcher_core";

/// The dispatcher's state machine, with its ports, thread-safe.
// `subclass`: NecroCode's wiring (SPEC §8) and callers' tests subclass it.
#[pyclass(
    module = "necrocode_dispatch._core",
    name = "DispatcherCore",
    frozen,
    weakref,
    subclass
)]
pub struct PyDispatcherCore {
    state: Mutex<DispatcherState<Py<PyAny>>>,
    /// The global running count as of the last decision, for `stop()`
    /// waiting on runners without taking the state's lock.
    running_count: AtomicU64,
    clock: Arc<dyn Clock>,
    clock_obj: Py<PyAny>,
    retry: Mutex<(Arc<RetryManager>, Py<PyRetryManager>)>,
    ports: RwLock<Arc<Ports>>,
    running: AtomicBool,
    /// Replaced whole in a forked child (see `run_loop`).
    run_loop: RwLock<Arc<LoopControl>>,
    /// The last dependency-cycle check.
    deadlocks: Mutex<deadlocks::LastCheck>,
    /// Taken only with the GIL held, and never across a call into Python.
    name_texts: Mutex<ports::NameTexts>,
}

/// What one `tick()` did.
#[derive(Default)]
struct TickCounts {
    enqueued: usize,
    ignored: usize,
    retries_ready: usize,
    assigned: usize,
    no_slot: usize,
    launch_failed: usize,
    timed_out: usize,
}

impl PyDispatcherCore {
    /// In a forked child: the locks a vanished thread held are freed. Those
    /// holders only ever read under them with the GIL released, so the
    /// state is whole.
    fn unlock_after_fork(&self) {
        // SAFETY: only the forking thread exists in the child, and it held
        // none of these locks (it was running Python code).
        unsafe {
            if self.state.is_locked() {
                self.state.force_unlock();
            }
            let retry = &self.retry;
            if retry.is_locked() {
                retry.force_unlock();
            }
            retry.lock().0.force_unlock_after_fork();
        }
    }

    fn restore_json(&self, json: &str) -> Result<(), SnapshotError> {
        let snapshot = dispatcher_snapshot::from_json(json)?;
        let result = self
            .decide(|state, book, now| dispatcher_snapshot::restore(state, book, &snapshot, now));
        if result.is_ok() && self.running() {
            self.run_loop().nudge();
        }
        result
    }

    fn retry_core(&self) -> Arc<RetryManager> {
        self.retry.lock().0.clone()
    }

    /// Runs `decide` on the state and the retry book under both locks (state
    /// first, then book), with one clock reading.
    fn decide<R>(
        &self,
        decide: impl FnOnce(&mut DispatcherState<Py<PyAny>>, &mut RetryBook, Now) -> R,
    ) -> R {
        let retry = self.retry_core();
        let result = {
            let mut state = self.state.lock();
            let mut book = retry.lock();
            let now = self.clock.now();
            let result = decide(&mut state, &mut book, now);
            self.running_count
                .store(state.global_running(), Ordering::SeqCst);
            result
        };
        self.run_loop.read().changed();
        result
    }

    /// `task_source.poll_ready_tasks()`. A source that raises, or returns
    /// something odd, is logged; the pass goes on with what it did return.
    /// `task_source.poll_ready_tasks()`: the tasks not held yet, and how many
    /// were skipped as held. Each task's id is read first and held ones are
    /// skipped before anything else is read (a source that hands back every
    /// queued task on every poll costs little). A source that raises, or
    /// returns something odd, is logged; the pass goes on with what it did
    /// return.
    #[allow(clippy::type_complexity)]
    fn poll(
        &self,
        py: Python<'_>,
    ) -> PyResult<(Vec<(crate::dispatch::state::TaskMeta, Py<PyAny>)>, usize)> {
        let source = self.port(py, |p| &p.task_source).into_bound(py);
        let mut polled = Vec::new();
        if source.is_none() {
            return Ok((polled, 0));
        }
        let mut returned = Vec::new();
        let result = (|| -> PyResult<()> {
            let tasks = source.call_method0(name!(py, "poll_ready_tasks"))?;
            for task in tasks.try_iter()? {
                returned.push(task?);
            }
            Ok(())
        })();
        if let Err(e) = result {
            if delivery::is_interrupt(py, &e) {
                return Err(e);
            }
            log::error!(target: LOG_TARGET, "poll_ready_tasks failed: {e}");
        }
        let id_name = name!(py, "id");
        // Read once: the task's own reading below reuses it.
        let ids: Vec<PyResult<Option<Bound<'_, PyAny>>>> = returned
            .iter()
            .map(|task| settings::attr_opt(task, id_name))
            .collect();
        // The ids' text is read before the lock: nothing of Python under it.
        let texts: Vec<Option<Cow<'_, str>>> = ids
            .iter()
            .map(|id| {
                id.as_ref()
                    .ok()
                    .and_then(Option::as_ref)
                    .and_then(|id| id.cast::<pyo3::types::PyString>().ok())
                    .and_then(|id| args::text(id).ok())
            })
            .collect();
        let held: Vec<bool> = {
            let state = self.state.lock();
            texts
                .iter()
                .map(|id| id.as_deref().is_some_and(|id| state.ignores_offer(id)))
                .collect()
        };
        drop(texts);
        let mut skipped = 0;
        for ((task, id), held) in returned.into_iter().zip(ids).zip(held) {
            if held {
                skipped += 1;
                continue;
            }
            match settings::task_meta_with_id(&task, id) {
                Ok(meta) => polled.push((meta, task.unbind())),
                Err(e) => log::error!(target: LOG_TARGET, "ignoring a polled task: {e}"),
            }
        }
        Ok((polled, skipped))
    }

    /// One pass of the loop (SPEC §4.3).
    fn tick_once(&self, py: Python<'_>) -> PyResult<TickCounts> {
        // Reports whose delivery failed earlier go first: a task's next
        // report must not overtake them.
        self.deliver_pending(py, false)?;
        let (polled, skipped) = self.poll(py)?;
        let can_launch = !self.port(py, |p| &p.runner_launcher).is_none(py);
        let mut counts = TickCounts::default();
        let (ignored, reservations) = self.decide(|state, _, now| {
            let mut ignored = Vec::new();
            state.expect_offers(polled.len());
            for (meta, handle) in polled {
                match state.offer(meta, handle, now) {
                    Ok(()) => counts.enqueued += 1,
                    Err(handle) => ignored.push(handle),
                }
            }
            counts.retries_ready = state.promote_due(now.mono);
            let reservations = if can_launch {
                state.schedule()
            } else {
                Vec::new()
            };
            (ignored, reservations)
        });
        counts.ignored = ignored.len() + skipped;
        drop(ignored);
        let mut reservations = reservations.into_iter();
        while let Some(reservation) = reservations.next() {
            match self.assign(py, reservation) {
                Ok(Assigned::Launched) => counts.assigned += 1,
                Ok(Assigned::NoSlot) => counts.no_slot += 1,
                Ok(Assigned::LaunchFailed) => counts.launch_failed += 1,
                Err(interrupt) => {
                    // The rest go back to the queue before the interrupt
                    // reaches the caller: no capacity stays reserved.
                    let rest: Vec<_> = reservations.collect();
                    self.settle_all(py, |state, _, _| {
                        rest.into_iter()
                            .map(|r| state.abort_assignment(&r.meta.id, r.payload))
                            .collect()
                    })?;
                    return Err(interrupt);
                }
            }
        }
        counts.timed_out = self.sweep_heartbeats(py)?;
        Ok(counts)
    }

    fn sweep_heartbeats(&self, py: Python<'_>) -> PyResult<usize> {
        let timed_out =
            self.settle_all(py, |state, book, now| state.check_heartbeats(book, now))?;
        if timed_out > 0 {
            self.wake_for_capacity();
        }
        Ok(timed_out)
    }

    /// Waits until no runner runs, or `deadline` passes; true when none runs.
    /// Call with the GIL released.
    fn wait_for_runners(&self, deadline: Instant) -> bool {
        let control = self.run_loop();
        control.wait_for_change(deadline, || self.running_count.load(Ordering::SeqCst) == 0)
    }

    /// The loop's control as it is now (a forked child gets a new one).
    fn run_loop(&self) -> Arc<LoopControl> {
        self.run_loop.read().clone()
    }

    /// How long until the earliest delayed retry is due (at least 1 ms), so
    /// the loop wakes for it instead of waiting out a long poll interval.
    fn until_next_retry(&self) -> Duration {
        let next_due = {
            let mut state = self.state.lock();
            match (state.next_due(), state.next_delivery_retry()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        match next_due {
            Some(due) => {
                let wait = due.saturating_sub(self.clock.now().mono);
                Duration::from_nanos(wait).max(Duration::from_millis(1))
            }
            None => Duration::MAX,
        }
    }

    /// Sets the policy in the core and, where it can, in `config`.
    fn apply_policy(&self, py: Python<'_>, policy: Policy) -> PyResult<()> {
        self.state.lock().set_policy(policy);
        let config = self.port(py, |p| &p.config).into_bound(py);
        if !config.is_none() && config.hasattr("scheduling_policy")? {
            // The caller's own enum type is kept (NecroCode's config holds
            // NecroCode's SchedulingPolicy); anything else gets ours.
            let current = config.getattr("scheduling_policy")?;
            let value = match current.get_type().call1((policy.value(),)) {
                Ok(v) if current.hasattr("value")? => v,
                _ => py
                    .import("necrocode_dispatch.models")?
                    .getattr("SchedulingPolicy")?
                    .call1((policy.value(),))?,
            };
            if let Err(e) = config.setattr("scheduling_policy", value) {
                log::debug!(target: LOG_TARGET, "config.scheduling_policy not updated: {e}");
            }
        }
        log::info!(target: LOG_TARGET, "scheduling policy is now {}", policy.value());
        Ok(())
    }

    fn config_seconds(&self, py: Python<'_>, name: &str, default: f64) -> PyResult<f64> {
        let config = self.port(py, |p| &p.config).into_bound(py);
        settings::seconds(
            &format!("config.{name}"),
            config_number(&config, name, default)?,
        )
    }
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
        let (pools, pool_objects) = read_pools(&config)?;
        let pool_names = pools
            .iter()
            .map(|(_, pool)| PyString::new(py, &pool.name).unbind())
            .collect();
        let tunables = read_tunables(&config, &pools)?;
        let task_state_type = match task_state_type.filter(|t| !t.is_none()) {
            Some(t) => t.clone(),
            None => py
                .import("necrocode_dispatch.models")?
                .getattr("TaskState")?,
        };
        let (core_clock, clock_obj) = clock::from_arg(py, clock)?;
        let retry = Arc::new(RetryManager::with_options(
            tunables.backoff,
            tunables.retry_options,
            core_clock.clone(),
        ));
        let retry_obj = Py::new(
            py,
            PyRetryManager::from_core(retry.clone(), clock_obj.clone_ref(py)),
        )?;
        let none = || py.None();
        let or_none = |p: Option<&Bound<'_, PyAny>>| p.map_or_else(none, |p| p.clone().unbind());
        Ok(PyDispatcherCore {
            state: Mutex::new(DispatcherState::new(
                tunables.limits,
                pools,
                Scheduler::new(tunables.policy, tunables.mapping),
            )),
            running_count: AtomicU64::new(0),
            clock: core_clock,
            clock_obj,
            retry: Mutex::new((retry, retry_obj)),
            ports: RwLock::new(Arc::new(Ports {
                config: config.unbind(),
                task_source: or_none(task_source),
                task_registry: or_none(task_registry),
                repo_pool_manager: or_none(repo_pool_manager),
                runner_launcher: or_none(runner_launcher),
                event_recorder: or_none(event_recorder),
                states: ports::task_states(&task_state_type),
                task_state_type: task_state_type.unbind(),
                pool_objects,
                pool_names,
            })),
            running: AtomicBool::new(false),
            run_loop: RwLock::default(),
            deadlocks: Mutex::default(),
            name_texts: Mutex::default(),
        })
    }

    #[getter]
    fn config(&self, py: Python<'_>) -> Py<PyAny> {
        self.port(py, |p| &p.config)
    }

    /// Assigning a config re-reads its limits, heartbeat timeout, policy,
    /// skill mapping and retry settings and options. The pools stay those of
    /// the first config, with their running counts.
    #[setter]
    fn set_config(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let pools = { self.state.lock().pools().clone() };
        let tunables = read_tunables(value, &pools)?;
        {
            let mut state = self.state.lock();
            state.set_limits(tunables.limits);
            state.set_policy(tunables.policy);
            state.set_skill_mapping(tunables.mapping);
        }
        {
            let retry = self.retry_core();
            let mut book = retry.lock();
            book.set_policy(tunables.backoff);
            book.set_options(tunables.retry_options);
        }
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
        let states = ports::task_states(value);
        self.update_ports(value.py(), |ports| {
            ports.states = states;
            ports.task_state_type = value.clone().unbind();
        });
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

    /// Setting False ends the background loop after its current pass (it
    /// does not wait for runners; `stop()` does).
    #[setter]
    fn set_running(&self, value: bool) {
        self.running.store(value, Ordering::SeqCst);
        self.run_loop().nudge();
    }

    /// Runs `tick()` every `config.poll_interval` seconds on a background
    /// thread until `stop()`. Waits while another thread is in `stop()`.
    fn start(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::start_loop(slf)
    }

    /// Stops assigning at once, ends the loop without waiting out a poll
    /// interval, waits up to `timeout` seconds (default
    /// `config.graceful_shutdown_timeout`) for running runners with the GIL
    /// released, then forces the rest to stop. Ctrl-C during the wait
    /// forces them at once and comes out as KeyboardInterrupt. Concurrent
    /// calls return once the dispatcher is stopped.
    #[pyo3(signature = (timeout = None))]
    fn stop(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let timeout = match timeout.filter(|t| !t.is_none()) {
            Some(t) => settings::seconds("timeout", args::number("timeout", t)?)?,
            None => self.config_seconds(py, "graceful_shutdown_timeout", 300.0)?,
        };
        self.stop_loop(py, timeout)
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
        let pool_name = args::string("pool_name", pool_name)?;
        let runner = NewRunner {
            runner_id: RunnerId::from(args::string("runner_id", runner_id)?.as_ref()),
            slot_id: optional_id("slot_id", slot_id)?,
            started_at: match started_at {
                Some(s) => datetime::optional_from_py("started_at", s)?,
                None => None,
            },
            details: RunnerDetails::new(
                match pid.filter(|p| !p.is_none()) {
                    Some(p) => Some(args::saturating_int("pid", p)?),
                    None => None,
                },
                optional_arc("container_id", container_id)?,
                optional_arc("job_name", job_name)?,
            ),
        };
        let handle = task.clone().unbind();
        let result = self.decide(|state, _, now| {
            state.track_running(meta, Some(handle), &pool_name, runner, now)
        });
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
        let mut known = KnownTexts::default();
        let task_id_text = known.string("task_id", task_id)?;
        let spec_text = known.optional_string("spec_name", spec_name)?;
        let reason = known.optional_string("failure_reason", failure_reason)?;
        let runner_text = known.optional_string("runner_id", runner_id)?;
        // Known from the tracked runner; checked for type only.
        known.optional_string("slot_id", slot_id)?;
        known.optional_string("pool_name", pool_name)?;
        let mut refused = None;
        let applied = self.settle(py, known, |state, book, now| {
            state
                .fail_task(
                    &task_id_text,
                    spec_text.as_deref(),
                    reason.as_deref().unwrap_or("unknown"),
                    runner_text.as_deref(),
                    book,
                    now,
                )
                .unwrap_or_else(|refusal| {
                    refused = Some(refusal);
                    crate::dispatch::state::Outcome::default()
                })
        })?;
        match refused {
            Some(refusal) => Err(refusal_to_py(refusal)),
            None => {
                if applied {
                    self.wake_for_capacity();
                }
                Ok(applied)
            }
        }
    }

    /// A runner finished. The first report for a runner wins; a later one
    /// returns False and changes nothing. `timed_out=True` (with
    /// `success=False`): the runner was stopped at its time limit by
    /// whatever watches it; counted in `metrics["runner_timeouts"]`.
    #[pyo3(signature = (runner_id, task_id = None, spec_name = None, success = None, slot_id = None, pool_name = None, failure_reason = None, *, timed_out = false))]
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
        timed_out: bool,
    ) -> PyResult<bool> {
        let mut known = KnownTexts::default();
        let runner_text = known.string("runner_id", runner_id)?;
        let task_text = known.optional_string("task_id", task_id)?;
        for (name, value) in [
            ("spec_name", spec_name),
            ("slot_id", slot_id),
            ("pool_name", pool_name),
        ] {
            known.optional_string(name, value)?;
        }
        let success = match success {
            Some(s) if s.is_instance_of::<PyBool>() => s.is_truthy()?,
            Some(s) => return Err(args::type_error("success", "a bool", s)),
            None => {
                return Err(PyTypeError::new_err(
                    "success must be given (True or False)",
                ))
            }
        };
        let reason = known.optional_string("failure_reason", failure_reason)?;
        let applied = self.settle(py, known, |state, book, now| {
            state.complete(
                &runner_text,
                task_text.as_deref(),
                success,
                timed_out,
                reason.as_deref(),
                book,
                now,
            )
        })?;
        if applied {
            self.wake_for_capacity();
        }
        Ok(applied)
    }

    /// Records a heartbeat; False for a runner that is not tracked.
    fn update_heartbeat(&self, runner_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        let runner_id = args::string("runner_id", runner_id)?;
        Ok(self.decide(|state, _, now| state.heartbeat(&runner_id, now)))
    }

    /// Times out every runner silent for longer than `heartbeat_timeout`;
    /// returns how many.
    fn check_heartbeats(&self, py: Python<'_>) -> PyResult<usize> {
        self.sweep_heartbeats(py)
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
        let applied = self.settle(py, KnownTexts::default(), |state, book, now| {
            state.time_out(&runner_id, book, now)
        })?;
        if applied {
            self.wake_for_capacity();
        }
        Ok(applied)
    }

    /// One pass of the loop: poll the source, queue new tasks, move retries
    /// whose backoff has elapsed back to the queue, schedule and assign while
    /// capacity lasts, check heartbeats. Returns counts of what it did.
    fn tick<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.tick_once(py)?;
        let out = PyDict::new(py);
        out.set_item("enqueued", c.enqueued)?;
        out.set_item("ignored", c.ignored)?;
        out.set_item("retries_ready", c.retries_ready)?;
        out.set_item("assigned", c.assigned)?;
        out.set_item("no_slot", c.no_slot)?;
        out.set_item("launch_failed", c.launch_failed)?;
        out.set_item("timed_out", c.timed_out)?;
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
            Place::Queued => "queued",
            Place::Delayed { .. } => "delayed",
            Place::Assigning { .. } | Place::Running { .. } => "running",
        }))
    }

    /// The dispatcher's state as a JSON-ready dict. With
    /// `include_tasks=False` the per-task parts (`delayed` and `retry_info`)
    /// are left empty, so the call costs O(pools), not O(tasks held);
    /// `delayed_count` always says how many wait for a retry.
    #[pyo3(signature = (include_tasks = true))]
    fn get_status<'py>(
        &self,
        py: Python<'py>,
        include_tasks: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let retry = self.retry_core();
        let (snapshot, infos, policy, budget) = {
            let state = self.state.lock();
            let book = retry.lock();
            (
                state.status(&book, include_tasks),
                include_tasks.then(|| book.info_table()),
                state.policy(),
                book.budget_status(),
            )
        };
        let lists = match &infos {
            Some(infos) => Some(status::task_lists(py, &snapshot.delayed, infos)?),
            None => None,
        };
        let out = PyDict::new(py);
        out.set_item("running", self.running())?;
        out.set_item("scheduling_policy", policy.value())?;
        out.set_item("queue_size", snapshot.queue_size)?;
        match &lists {
            Some(lists) => out.set_item("delayed", &lists.delayed)?,
            None => out.set_item("delayed", PyList::empty(py))?,
        }
        out.set_item("delayed_count", snapshot.delayed_count)?;
        out.set_item("running_tasks", snapshot.running_tasks)?;
        // SPEC §9: reports decided and not yet delivered to the ports.
        out.set_item("pending_reports", snapshot.pending_reports)?;
        out.set_item("pending_report_tasks", snapshot.pending_report_tasks)?;
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
        metrics.set_item("reports_delivered", snapshot.delivery.delivered)?;
        metrics.set_item(
            "report_delivery_failures",
            snapshot.delivery.failed_attempts,
        )?;
        out.set_item("metrics", metrics)?;
        match &lists {
            Some(lists) => out.set_item("retry_info", &lists.retry_info)?,
            None => out.set_item("retry_info", PyDict::new(py))?,
        }
        out.set_item("retry_budget", retry_options::budget_to_py(py, budget)?)?;
        let stats = &snapshot.failure_stats;
        let by_reason = |counts: &crate::metrics::ReasonCounts| -> PyResult<Bound<'py, PyDict>> {
            let d = PyDict::new(py);
            for (reason, n) in counts.iter() {
                d.set_item(reason, n)?;
            }
            Ok(d)
        };
        out.set_item("retries_by_reason", by_reason(&stats.retries)?)?;
        out.set_item(
            "permanent_failures_by_reason",
            by_reason(&stats.permanent_failures)?,
        )?;
        let delays = PyDict::new(py);
        // Keyed by the upper bound as Prometheus writes it ("0.5", "+Inf").
        let buckets = PyDict::new(py);
        for (bound, n) in stats.delays.cumulative() {
            buckets.set_item(crate::metrics::prometheus::number(bound), n)?;
        }
        delays.set_item("buckets", buckets)?;
        delays.set_item("sum", stats.delays.sum)?;
        delays.set_item("count", stats.delays.count)?;
        out.set_item("backoff_delays", delays)?;
        out.set_item("deadlock_info", self.deadlock_info(py)?)?;
        Ok(out)
    }

    /// The state in the Prometheus text format: queue, delayed and running
    /// counts, each pool's load, retries and permanent failures by reason
    /// class, a histogram of backoff delays, and the retry budget.
    fn export_prometheus(&self) -> String {
        let retry = self.retry_core();
        let (status, budget) = {
            let state = self.state.lock();
            let book = retry.lock();
            (state.status(&book, false), book.budget_status())
        };
        crate::metrics::prometheus::render(&status, budget)
    }

    /// The retry state and the delayed set as a JSON-ready dict, due times
    /// as wall-clock times (tasks themselves stay with the task source).
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = dispatcher_snapshot::to_json(
            &self.decide(|state, book, now| dispatcher_snapshot::capture(state, book, now)),
        );
        retry::state_to_py(py, &json)
    }

    /// Restores a `snapshot()` into a dispatcher that holds no task yet:
    /// retry records, and delayed tasks held until their due time (their
    /// handles arrive with the next poll). A state that does not check out
    /// raises ValueError and changes nothing.
    fn restore(&self, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let json = retry::state_from_py("state", state)?;
        self.restore_json(&json)
            .map_err(|e| PyValueError::new_err(format!("state: {e}")))
    }

    /// Writes `snapshot()` to `path` atomically (temporary file, fsync,
    /// rename): a crash leaves the previous file whole.
    fn save(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let path = files::path_arg("path", path)?;
        let json = dispatcher_snapshot::to_json(
            &self.decide(|state, book, now| dispatcher_snapshot::capture(state, book, now)),
        );
        py.detach(|| persist::write_atomically(Path::new(&path), json.as_bytes()))
            .map_err(|e| files::io_error(&path, &e))
    }

    /// Restores what `save(path)` wrote; nothing is loaded on any error.
    fn load(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let path = files::path_arg("path", path)?;
        let bytes = py
            .detach(|| std::fs::read(&path))
            .map_err(|e| files::io_error(&path, &e))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            PyValueError::new_err(format!(
                "{path}: it is not a dispatcher state: not UTF-8 text (a binary file?)"
            ))
        })?;
        self.restore_json(&text)
            .map_err(|e| PyValueError::new_err(format!("{path}: {e}")))
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

    /// Switches the scheduling policy (a `SchedulingPolicy` or its value);
    /// `config.scheduling_policy` follows when it can be set.
    fn set_scheduling_policy(&self, py: Python<'_>, policy: &Bound<'_, PyAny>) -> PyResult<()> {
        let policy = settings::policy("policy", policy)?;
        self.apply_policy(py, policy)
    }

    /// The PRIORITY policy.
    fn enable_priority_scheduling(&self, py: Python<'_>) -> PyResult<()> {
        self.apply_policy(py, Policy::Priority)
    }

    /// The FIFO policy.
    fn disable_priority_scheduling(&self, py: Python<'_>) -> PyResult<()> {
        self.apply_policy(py, Policy::Fifo)
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

    /// Looks for dependency cycles among the task source's tasks now (its
    /// `dependency_graph()`), logs each with the tasks it blocks, and returns
    /// the cycles (each a list of ids; empty when none, or when the source
    /// gives no graph). With `raise_on_deadlock`, a cycle raises
    /// DeadlockDetectedError.
    #[pyo3(signature = (raise_on_deadlock = false))]
    fn check_deadlock_now<'py>(
        &self,
        py: Python<'py>,
        raise_on_deadlock: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let found = self.check_deadlocks(py)?.unwrap_or_default();
        if raise_on_deadlock && !found.is_empty() {
            let spelled: Vec<String> = found
                .cycles
                .iter()
                .map(|c| crate::dispatch::dependencies::spell(c))
                .collect();
            return Err(DeadlockDetectedError::new_err(format!(
                "dependency cycle(s): {}",
                spelled.join("; ")
            )));
        }
        let cycles = PyList::empty(py);
        for cycle in &found.cycles {
            cycles.append(&cycle[..cycle.len().saturating_sub(1)])?;
        }
        Ok(cycles)
    }

    /// Every invariant of SPEC §4.5 the state can check; raises AssertionError
    /// naming the first one broken. For tests.
    fn _check_invariants(&self) -> PyResult<()> {
        self.state
            .lock()
            .check_invariants()
            .map_err(PyAssertionError::new_err)
    }
}
