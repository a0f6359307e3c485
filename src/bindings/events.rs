//! `JsonLineLog`: the local event log's lines, made and written here
//! (`crate::events`) instead of with a dict, `json.dumps` and a buffered
//! file per event.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDateTime, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::bindings::{files, time::datetime};
use crate::events::{JsonLine, LineLog};
use crate::time::clock::{Clock, SystemClock};

/// An append-only file of JSON lines: `write(event, fields)` appends
/// `{"event": event, "time": <datetime.now() isoformat>, "elapsed":
/// <seconds since opened>, **fields}` with one write.
#[pyclass(module = "necrocode_dispatch._core", name = "JsonLineLog", frozen)]
pub struct PyJsonLineLog {
    log: LineLog,
    path: String,
}

/// Adds one field, as `json.dumps(..., default=str)` would write it.
fn add_field(line: &mut JsonLine, key: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
    if value.is_none() {
        line.null(key);
    } else if let Ok(flag) = value.cast::<PyBool>() {
        line.bool(key, flag.is_true());
    } else if let Ok(text) = value.cast::<PyString>() {
        line.string(key, text.to_str()?);
    } else if let Ok(number) = value.cast::<PyInt>() {
        match number.extract::<i64>() {
            Ok(n) => line.int(key, n),
            Err(_) => line.raw(key, number.str()?.to_str()?),
        }
    } else if let Ok(number) = value.cast::<PyFloat>() {
        line.float(key, number.value());
    } else if let Ok(moment) = value.cast::<PyDateTime>() {
        match datetime::from_py(key, value) {
            Ok(wall) => line.string(key, wall.isoformat().as_str()),
            // An aware datetime: its own isoformat, offset included.
            Err(_) => line.string(key, moment.call_method0("isoformat")?.extract()?),
        }
    } else if value.is_instance_of::<PyList>()
        || value.is_instance_of::<PyTuple>()
        || value.is_instance_of::<PyDict>()
    {
        let json = value.py().import("json")?;
        let kwargs = PyDict::new(value.py());
        kwargs.set_item("default", value.py().get_type::<PyString>())?;
        let text = json.call_method("dumps", (value,), Some(&kwargs))?;
        line.raw(key, text.extract()?);
    } else {
        line.string(key, value.str()?.to_str()?);
    }
    Ok(())
}

#[pymethods]
impl PyJsonLineLog {
    /// Opens `path` for appending (created if missing).
    #[new]
    fn new(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<Self> {
        let path = files::path_arg("path", path)?;
        let log = py
            .detach(|| LineLog::open(std::path::Path::new(&path)))
            .map_err(|e| files::io_error(&path, &e))?;
        Ok(PyJsonLineLog { log, path })
    }

    /// Appends the event's line; False (and nothing written) once closed.
    fn write(&self, py: Python<'_>, event: &str, fields: &Bound<'_, PyDict>) -> PyResult<bool> {
        let mut line = JsonLine::new(event, SystemClock.wall(), self.log.elapsed());
        for (key, value) in fields.iter() {
            let key = key
                .cast::<PyString>()
                .map_err(|_| crate::bindings::args::type_error("fields key", "a str", &key))?;
            add_field(&mut line, key.to_str()?, &value)?;
        }
        let bytes = line.finish();
        py.detach(|| self.log.append(&bytes))
            .map_err(|e| files::io_error(&self.path, &e))
    }

    fn close(&self) {
        self.log.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.log.is_closed()
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }
}
