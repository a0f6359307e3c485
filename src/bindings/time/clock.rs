//! `SystemClock` and `ManualClock` as Python classes.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDateTime;

use crate::bindings::args::{number, type_error};
use crate::bindings::time::datetime;
use crate::time::clock::{nanos_to_seconds, Clock, ManualClock, SystemClock};

/// The operating system's clocks: `monotonic()` is `time.monotonic()`, `now()`
/// is `datetime.now()`.
#[pyclass(module = "necrocode_dispatch._core", name = "SystemClock", frozen)]
pub struct PySystemClock;

#[pymethods]
impl PySystemClock {
    #[new]
    fn new() -> Self {
        PySystemClock
    }

    /// The naive local wall-clock time, as `datetime.now()`.
    fn now<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDateTime>> {
        datetime::to_py(py, SystemClock.wall())
    }

    /// Seconds of the monotonic clock, as `time.monotonic()`.
    fn monotonic(&self) -> f64 {
        nanos_to_seconds(SystemClock.monotonic())
    }

    fn __repr__(&self) -> &'static str {
        "SystemClock()"
    }
}

/// A clock for tests: `now()` and `monotonic()` move only by `advance(seconds)`.
#[pyclass(module = "necrocode_dispatch._core", name = "ManualClock", frozen)]
pub struct PyManualClock {
    inner: Arc<ManualClock>,
}

#[pymethods]
impl PyManualClock {
    /// `start` is the first `now()` (default: the current local time);
    /// `monotonic()` starts at 0.0.
    #[new]
    #[pyo3(signature = (start = None))]
    fn new(start: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let start = match start {
            Some(s) if !s.is_none() => datetime::from_py("start", s)?,
            _ => SystemClock.wall(),
        };
        Ok(PyManualClock {
            inner: Arc::new(ManualClock::new(start)),
        })
    }

    fn now<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDateTime>> {
        datetime::to_py(py, self.inner.wall())
    }

    fn monotonic(&self) -> f64 {
        nanos_to_seconds(self.inner.monotonic())
    }

    /// Moves both readings forward by `seconds` (a finite number >= 0).
    fn advance(&self, seconds: &Bound<'_, PyAny>) -> PyResult<()> {
        let value = number("seconds", seconds)?;
        self.inner.advance(value).map_err(|_| {
            PyValueError::new_err(format!(
                "seconds must be a finite number >= 0, got {}",
                crate::retry::backoff::python_float_repr(value)
            ))
        })
    }

    /// Sets the wall-clock reading alone, as a system clock jump would; the
    /// monotonic reading, and so every decision, is unaffected.
    fn set_wall_time(&self, now: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.set_wall(datetime::from_py("now", now)?);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "ManualClock(now={}, monotonic={})",
            self.inner.wall(),
            nanos_to_seconds(self.inner.monotonic())
        )
    }
}

/// The `clock=` argument: `None` for a new `SystemClock`, or one of ours. Returns
/// the core clock and the Python object to hand back from `.clock`.
pub fn from_arg(
    py: Python<'_>,
    clock: Option<&Bound<'_, PyAny>>,
) -> PyResult<(Arc<dyn Clock>, Py<PyAny>)> {
    match clock {
        None => Ok((
            Arc::new(SystemClock),
            Py::new(py, PySystemClock)?.into_any(),
        )),
        Some(c) if c.is_none() => from_arg(py, None),
        Some(c) => {
            if let Ok(manual) = c.cast::<PyManualClock>() {
                let core: Arc<dyn Clock> = manual.get().inner.clone();
                Ok((core, c.clone().unbind()))
            } else if c.is_instance_of::<PySystemClock>() {
                Ok((Arc::new(SystemClock), c.clone().unbind()))
            } else {
                Err(type_error(
                    "clock",
                    "a SystemClock, a ManualClock or None",
                    c,
                ))
            }
        }
    }
}
