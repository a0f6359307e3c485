//! `RetryManager` and `RetryInfo` as Python classes.

pub mod options;

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple, PyType};

use crate::bindings::args::{self, Arg};
use crate::bindings::files::{io_error, path_arg};
use crate::bindings::logging;
use crate::bindings::names::name;
use crate::bindings::retry::options::{self as retry_options, OptionArgs, KEYWORD_NAMES};
use crate::bindings::time::{clock, datetime};
use crate::retry::backoff::{BackoffPolicy, InvalidSetting, Setting};
use crate::retry::manager::{LoadError, RetryManager, LOG_TARGET};
use crate::retry::snapshot::{self as retry_snapshot, RetryState};
use crate::retry::state::{FailureInfo, RetrySnapshot};
use crate::time::wall::WallTime;

fn invalid_setting(err: InvalidSetting) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Saved state as a Python dict (through JSON: the same form as a file).
pub fn state_to_py<'py>(py: Python<'py>, json: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (json,))
}

/// A dict (as `snapshot()` gives) back to JSON text, or a clear error.
pub fn state_from_py(what: &str, state: &Bound<'_, PyAny>) -> PyResult<String> {
    if !state.is_instance_of::<PyDict>() {
        return Err(args::type_error(what, "a dict", state));
    }
    let json = state
        .py()
        .import("json")?
        .call_method1("dumps", (state,))
        .map_err(|e| PyValueError::new_err(format!("{what}: not JSON data: {e}")))?;
    json.extract::<String>()
}

/// Retry information of one task. Attributes are writable; `to_dict()` and
/// `from_dict()` give and take the original's serialised form. One is made
/// per `record_failure`: freed objects are kept for reuse (a free list)
/// instead of going back to Python's allocator.
#[pyclass(module = "necrocode_dispatch._core", name = "RetryInfo", freelist = 64)]
#[derive(Debug)]
pub struct PyRetryInfo {
    /// The caller's own `str` when it passed exactly a `str`: a recorded
    /// failure's result copies no id.
    task_id: Py<PyString>,
    retry_count: u64,
    last_retry_at: Option<WallTime>,
    next_retry_at: Option<WallTime>,
    failure_reason: Option<Arc<str>>,
}

impl PyRetryInfo {
    fn from_snapshot(py: Python<'_>, s: RetrySnapshot) -> Self {
        PyRetryInfo {
            task_id: PyString::new(py, &s.task_id).unbind(),
            retry_count: s.retry_count,
            last_retry_at: s.last_retry_at,
            next_retry_at: s.next_retry_at,
            failure_reason: s.failure_reason,
        }
    }

    fn from_failure(task_id: Bound<'_, PyString>, info: FailureInfo) -> Self {
        PyRetryInfo {
            task_id: task_id.unbind(),
            retry_count: info.retry_count,
            last_retry_at: Some(info.last_retry_at),
            next_retry_at: Some(info.next_retry_at),
            failure_reason: info.failure_reason,
        }
    }

    fn copy(&self, py: Python<'_>) -> Self {
        PyRetryInfo {
            task_id: self.task_id.clone_ref(py),
            retry_count: self.retry_count,
            last_retry_at: self.last_retry_at,
            next_retry_at: self.next_retry_at,
            failure_reason: self.failure_reason.clone(),
        }
    }

    fn equals(&self, py: Python<'_>, other: &Self) -> PyResult<bool> {
        Ok(self.retry_count == other.retry_count
            && self.last_retry_at == other.last_retry_at
            && self.next_retry_at == other.next_retry_at
            && self.failure_reason == other.failure_reason
            && args::text(self.task_id.bind(py))? == args::text(other.task_id.bind(py))?)
    }

    fn fields<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(
            py,
            [
                self.task_id.bind(py).clone().into_any(),
                self.retry_count.into_pyobject(py)?.into_any(),
                datetime::optional_to_py(py, self.last_retry_at)?.into_bound(py),
                datetime::optional_to_py(py, self.next_retry_at)?.into_bound(py),
                self.failure_reason.as_deref().into_pyobject(py)?.into_any(),
            ],
        )
    }
}

const FIELD_NAMES: [&str; 5] = [
    "task_id",
    "retry_count",
    "last_retry_at",
    "next_retry_at",
    "failure_reason",
];

#[pymethods]
impl PyRetryInfo {
    #[new]
    #[pyo3(signature = (task_id, retry_count = Arg::Missing, last_retry_at = None, next_retry_at = None, failure_reason = None))]
    #[pyo3(
        text_signature = "(task_id, retry_count=0, last_retry_at=None, next_retry_at=None, failure_reason=None)"
    )]
    fn new(
        task_id: &Bound<'_, PyAny>,
        retry_count: Arg<'_>,
        last_retry_at: Option<&Bound<'_, PyAny>>,
        next_retry_at: Option<&Bound<'_, PyAny>>,
        failure_reason: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let none = task_id.py().None().into_bound(task_id.py());
        let id = args::string("task_id", task_id)?;
        Ok(PyRetryInfo {
            task_id: args::plain_str(task_id, &id).unbind(),
            retry_count: match retry_count {
                Arg::Missing => 0,
                Arg::Given(n) => args::non_negative_int("retry_count", &n)?,
            },
            last_retry_at: datetime::optional_from_py(
                "last_retry_at",
                last_retry_at.unwrap_or(&none),
            )?,
            next_retry_at: datetime::optional_from_py(
                "next_retry_at",
                next_retry_at.unwrap_or(&none),
            )?,
            failure_reason: args::optional_string("failure_reason", failure_reason)?
                .map(|r| Arc::from(r.as_ref())),
        })
    }

    #[getter]
    fn task_id(&self, py: Python<'_>) -> Py<PyString> {
        self.task_id.clone_ref(py)
    }

    #[setter]
    fn set_task_id(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = args::string("task_id", value)?;
        self.task_id = args::plain_str(value, &id).unbind();
        Ok(())
    }

    #[getter]
    fn retry_count(&self) -> u64 {
        self.retry_count
    }

    #[setter]
    fn set_retry_count(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.retry_count = args::non_negative_int("retry_count", value)?;
        Ok(())
    }

    #[getter]
    fn last_retry_at(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        datetime::optional_to_py(py, self.last_retry_at)
    }

    #[setter]
    fn set_last_retry_at(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.last_retry_at = datetime::optional_from_py("last_retry_at", value)?;
        Ok(())
    }

    #[getter]
    fn next_retry_at(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        datetime::optional_to_py(py, self.next_retry_at)
    }

    #[setter]
    fn set_next_retry_at(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.next_retry_at = datetime::optional_from_py("next_retry_at", value)?;
        Ok(())
    }

    #[getter]
    fn failure_reason(&self) -> Option<&str> {
        self.failure_reason.as_deref()
    }

    #[setter]
    fn set_failure_reason(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.failure_reason =
            args::optional_string("failure_reason", Some(value))?.map(|r| Arc::from(r.as_ref()));
        Ok(())
    }

    /// `{"task_id", "retry_count", "last_retry_at", "next_retry_at",
    /// "failure_reason"}`, datetimes as `isoformat()` strings or None.
    pub(crate) fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item(name!(py, "task_id"), self.task_id.bind(py))?;
        d.set_item(name!(py, "retry_count"), self.retry_count)?;
        d.set_item(
            name!(py, "last_retry_at"),
            self.last_retry_at.map(|t| t.to_string()),
        )?;
        d.set_item(
            name!(py, "next_retry_at"),
            self.next_retry_at.map(|t| t.to_string()),
        )?;
        d.set_item(name!(py, "failure_reason"), self.failure_reason.as_deref())?;
        Ok(d)
    }

    /// The inverse of `to_dict()`; datetimes may be ISO strings or datetimes.
    #[classmethod]
    fn from_dict(_cls: &Bound<'_, PyType>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = data.py();
        let get = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
            match data.get_item(key) {
                Ok(v) => Ok(Some(v)),
                Err(e) if e.is_instance_of::<pyo3::exceptions::PyKeyError>(py) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let task_id = get("task_id")?.ok_or_else(|| {
            pyo3::exceptions::PyKeyError::new_err("data must have a 'task_id' key")
        })?;
        let none = py.None().into_bound(py);
        let retry_count = match get("retry_count")? {
            Some(n) => args::non_negative_int("retry_count", &n)?,
            None => 0,
        };
        let last = get("last_retry_at")?.unwrap_or_else(|| none.clone());
        let next = get("next_retry_at")?.unwrap_or_else(|| none.clone());
        let reason = get("failure_reason")?;
        let id = args::string("task_id", &task_id)?;
        Ok(PyRetryInfo {
            task_id: args::plain_str(&task_id, &id).unbind(),
            retry_count,
            last_retry_at: datetime::optional_from_iso("last_retry_at", &last)?,
            next_retry_at: datetime::optional_from_iso("next_retry_at", &next)?,
            failure_reason: args::optional_string("failure_reason", reason.as_ref())?
                .map(|r| Arc::from(r.as_ref())),
        })
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let py = other.py();
        Ok(match other.cast::<PyRetryInfo>() {
            Ok(o) => {
                let equal = self.equals(py, &o.borrow())?;
                pyo3::types::PyBool::new(py, equal)
                    .to_owned()
                    .into_any()
                    .unbind()
            }
            Err(_) => py.NotImplemented(),
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let values = self.fields(py)?;
        let mut out = String::from("RetryInfo(");
        for (i, (name, value)) in FIELD_NAMES.iter().zip(values.iter()).enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(name);
            out.push('=');
            out.push_str(&value.repr()?.to_cow()?);
        }
        out.push(')');
        Ok(out)
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyType>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        Ok((slf.get_type(), slf.borrow().fields(py)?))
    }

    fn __copy__(&self, py: Python<'_>) -> Self {
        self.copy(py)
    }

    fn __deepcopy__(&self, py: Python<'_>, _memo: &Bound<'_, PyAny>) -> Self {
        self.copy(py)
    }
}

/// Retry bookkeeping with exponential backoff, safe to share between threads.
#[pyclass(module = "necrocode_dispatch._core", name = "RetryManager", frozen)]
pub struct PyRetryManager {
    pub(crate) core: Arc<RetryManager>,
    clock: Py<PyAny>,
}

fn float_setting(setting: Setting, arg: Arg<'_>, default: f64) -> PyResult<f64> {
    match arg {
        Arg::Missing => Ok(default),
        Arg::Given(v) => args::number(setting.name(), &v),
    }
}

impl PyRetryManager {
    /// A manager around an existing core, as the dispatcher builds it.
    pub fn from_core(core: Arc<RetryManager>, clock: Py<PyAny>) -> Self {
        PyRetryManager { core, clock }
    }

    fn set_float(&self, setting: Setting, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let number = args::number(setting.name(), value)?;
        self.core
            .set_float(setting, number)
            .map_err(invalid_setting)
    }
}

#[pymethods]
impl PyRetryManager {
    #[new]
    #[pyo3(signature = (
        max_attempts = Arg::Missing, backoff_base = Arg::Missing, initial_delay = Arg::Missing,
        max_delay = Arg::Missing, *, clock = None, jitter = None, seed = None,
        non_retryable = None, policies = None, max_retry_duration = None, retry_budget = None,
    ))]
    // The real defaults for `inspect.signature` and stubtest (the `Arg`
    // sentinel tells "not given" from an explicit value).
    #[pyo3(
        text_signature = "(max_attempts=3, backoff_base=2.0, initial_delay=1.0, max_delay=300.0, *, clock=None, jitter=None, seed=None, non_retryable=None, policies=None, max_retry_duration=None, retry_budget=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        max_attempts: Arg<'_>,
        backoff_base: Arg<'_>,
        initial_delay: Arg<'_>,
        max_delay: Arg<'_>,
        clock: Option<&Bound<'_, PyAny>>,
        jitter: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
        non_retryable: Option<&Bound<'_, PyAny>>,
        policies: Option<&Bound<'_, PyAny>>,
        max_retry_duration: Option<&Bound<'_, PyAny>>,
        retry_budget: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let options = retry_options::read(
            &OptionArgs {
                jitter,
                seed,
                non_retryable,
                policies,
                max_retry_duration,
                retry_budget,
            },
            &KEYWORD_NAMES,
        )?;
        let defaults = BackoffPolicy::default();
        let max_attempts = match max_attempts {
            Arg::Missing => defaults.max_attempts(),
            Arg::Given(v) => args::non_negative_int("max_attempts", &v)?,
        };
        let policy = BackoffPolicy::new(
            max_attempts,
            float_setting(Setting::BackoffBase, backoff_base, defaults.backoff_base())?,
            float_setting(
                Setting::InitialDelay,
                initial_delay,
                defaults.initial_delay(),
            )?,
            float_setting(Setting::MaxDelay, max_delay, defaults.max_delay())?,
        )
        .map_err(invalid_setting)?;
        let (core_clock, clock) = clock::from_arg(py, clock)?;
        Ok(PyRetryManager {
            core: Arc::new(RetryManager::with_options(policy, options, core_clock)),
            clock,
        })
    }

    /// "none", "full", "equal" or "decorrelated" (read-only).
    #[getter]
    fn jitter(&self) -> &'static str {
        self.core.options().jitter.name()
    }

    #[getter]
    fn seed(&self) -> Option<u64> {
        self.core.options().seed
    }

    /// Reasons (or reason classes, `name` for `name: ...`) never retried.
    #[getter]
    fn non_retryable<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        retry_options::non_retryable_to_py(py, &self.core.options())
    }

    /// Per-reason overrides of the four settings (a copy).
    #[getter]
    fn policies<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        retry_options::policies_to_py(py, &self.core.options())
    }

    #[getter]
    fn max_retry_duration(&self) -> Option<f64> {
        self.core.options().max_retry_duration
    }

    /// The retry budget's settings and level, or None without one.
    #[getter]
    fn retry_budget<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        retry_options::budget_to_py(py, self.core.budget_status())
    }

    /// `{"tracked": n, "retry_budget": {...} or None}`.
    fn get_status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        out.set_item("tracked", self.core.len())?;
        out.set_item(
            "retry_budget",
            retry_options::budget_to_py(py, self.core.budget_status())?,
        )?;
        Ok(out)
    }

    /// The task succeeded: its retry information is cleared and the retry
    /// budget refilled. No error for an unknown task.
    fn record_success(&self, task_id: &Bound<'_, PyAny>) -> PyResult<()> {
        self.core.record_success(&args::string("task_id", task_id)?);
        Ok(())
    }

    /// Every record as a JSON-ready dict; due times as wall-clock times.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = retry_snapshot::to_json(&self.core.snapshot());
        state_to_py(py, &json)
    }

    /// Replaces every record with those of a `snapshot()`; a state that does
    /// not check out raises ValueError and changes nothing.
    fn restore(&self, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let json = state_from_py("state", state)?;
        let state: RetryState = retry_snapshot::from_json(&json)
            .map_err(|e| PyValueError::new_err(format!("state: {e}")))?;
        self.core
            .restore(&state)
            .map_err(|e| PyValueError::new_err(format!("state: {e}")))
    }

    /// Writes `snapshot()` to `path` as JSON, atomically: a crash leaves the
    /// previous file whole.
    fn save(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let path = path_arg("path", path)?;
        let core = Arc::clone(&self.core);
        py.detach(|| core.save(std::path::Path::new(&path)))
            .map_err(|e| io_error(&path, &e))
    }

    /// Restores what `save(path)` wrote; a missing file raises
    /// FileNotFoundError, a truncated or corrupted one ValueError, and
    /// either way nothing is loaded.
    fn load(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let path = path_arg("path", path)?;
        let core = Arc::clone(&self.core);
        py.detach(|| core.load(std::path::Path::new(&path)))
            .map_err(|e| match e {
                LoadError::Io(e) => io_error(&path, &e),
                LoadError::Invalid(e) => PyValueError::new_err(format!("{path}: {e}")),
            })
    }

    #[getter]
    fn max_attempts(&self) -> u64 {
        self.core.policy().max_attempts()
    }

    #[setter]
    fn set_max_attempts(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let n = args::non_negative_int("max_attempts", value)?;
        self.core.set_max_attempts(n);
        Ok(())
    }

    #[getter]
    fn backoff_base(&self) -> f64 {
        self.core.policy().backoff_base()
    }

    #[setter]
    fn set_backoff_base(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_float(Setting::BackoffBase, value)
    }

    #[getter]
    fn initial_delay(&self) -> f64 {
        self.core.policy().initial_delay()
    }

    #[setter]
    fn set_initial_delay(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_float(Setting::InitialDelay, value)
    }

    #[getter]
    fn max_delay(&self) -> f64 {
        self.core.policy().max_delay()
    }

    #[setter]
    fn set_max_delay(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_float(Setting::MaxDelay, value)
    }

    /// The clock every decision of this manager reads.
    #[getter]
    fn clock(&self, py: Python<'_>) -> Py<PyAny> {
        self.clock.clone_ref(py)
    }

    /// Records one failure and returns the task's new `RetryInfo`.
    #[pyo3(signature = (task_id, failure_reason = None))]
    fn record_failure(
        &self,
        task_id: &Bound<'_, PyAny>,
        failure_reason: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyRetryInfo> {
        let id = args::string("task_id", task_id)?;
        let reason = args::optional_string("failure_reason", failure_reason)?;
        let verbose = logging::most_verbose(task_id.py(), LOG_TARGET);
        let recorded = self
            .core
            .record_failure_logging(&id, reason.as_deref(), verbose);
        Ok(PyRetryInfo::from_failure(
            args::plain_str(task_id, &id),
            recorded.info,
        ))
    }

    fn should_retry(&self, task_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        let verbose = logging::most_verbose(task_id.py(), LOG_TARGET);
        Ok(self
            .core
            .should_retry_logging(&args::string("task_id", task_id)?, verbose))
    }

    fn get_retry_count(&self, task_id: &Bound<'_, PyAny>) -> PyResult<u64> {
        Ok(self.core.retry_count(&args::string("task_id", task_id)?))
    }

    /// A copy of the task's retry information, or None when it has none.
    fn get_retry_info(&self, task_id: &Bound<'_, PyAny>) -> PyResult<Option<PyRetryInfo>> {
        let py = task_id.py();
        Ok(self
            .core
            .info(&args::string("task_id", task_id)?)
            .map(|s| PyRetryInfo::from_snapshot(py, s)))
    }

    fn clear_retry_info(&self, task_id: &Bound<'_, PyAny>) -> PyResult<()> {
        self.core.clear(&args::string("task_id", task_id)?);
        Ok(())
    }

    fn get_all_retry_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let all = self.core.all_info();
        let out = PyDict::new(py);
        for info in all {
            let info = PyRetryInfo::from_snapshot(py, info);
            // The key is the very `str` the value holds.
            let key = info.task_id.clone_ref(py);
            out.set_item(key, Py::new(py, info)?)?;
        }
        Ok(out)
    }

    /// Tasks below `max_attempts` whose backoff has elapsed, earliest due first.
    fn get_tasks_ready_for_retry<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let ready = self.core.ready_for_retry();
        PyList::new(py, ready.iter().map(|id| id.as_ref()))
    }

    fn _calculate_backoff_delay(&self, retry_count: &Bound<'_, PyAny>) -> PyResult<f64> {
        let policy = self.core.policy();
        let count = args::saturating_int("retry_count", retry_count)?;
        if count == i64::MAX {
            // Beyond i64: the exponent as Python's float(retry_count - 1) sees it.
            let exponent = retry_count
                .sub(1)?
                .extract::<f64>()
                .unwrap_or(f64::INFINITY);
            return Ok(policy.delay_for_exponent(exponent));
        }
        Ok(policy.delay(count))
    }

    fn __len__(&self) -> usize {
        self.core.len()
    }

    fn __contains__(&self, task_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.core.contains(&args::string("task_id", task_id)?))
    }

    fn __repr__(&self) -> String {
        let p = self.core.policy();
        format!(
            "RetryManager(max_attempts={}, backoff_base={}, initial_delay={}, max_delay={}, tracked={})",
            p.max_attempts(),
            crate::retry::backoff::python_float_repr(p.backoff_base()),
            crate::retry::backoff::python_float_repr(p.initial_delay()),
            crate::retry::backoff::python_float_repr(p.max_delay()),
            self.core.len()
        )
    }
}
