//! Naive `datetime.datetime` objects to and from [`WallTime`].

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDateAccess, PyDateTime, PyString, PyTimeAccess, PyTzInfoAccess};

use crate::bindings::args::{describe, type_error};
use crate::time::wall::{DateTimeParts, WallTime};

pub fn to_py(py: Python<'_>, t: WallTime) -> PyResult<Bound<'_, PyDateTime>> {
    let p = t.parts();
    PyDateTime::new(
        py,
        p.year,
        p.month,
        p.day,
        p.hour,
        p.minute,
        p.second,
        p.microsecond,
        None,
    )
}

pub fn optional_to_py(py: Python<'_>, t: Option<WallTime>) -> PyResult<Py<PyAny>> {
    Ok(match t {
        Some(t) => to_py(py, t)?.into_any().unbind(),
        None => py.None(),
    })
}

/// `t.isoformat()` as a `str`, made as ASCII directly: a status report
/// makes two per retry record, and going through UTF-8 decoding (ours, then
/// CPython's) cost a fifth of the time of each.
pub fn iso_str(py: Python<'_>, t: WallTime) -> PyResult<Bound<'_, PyString>> {
    let text = t.isoformat();
    let bytes = text.as_bytes();
    // SAFETY: a fresh compact ASCII string of exactly `bytes.len()` chars
    // (PyUnicode_New with maxchar 127), filled before anyone else sees it;
    // the bytes are ASCII digits and separators.
    unsafe {
        let obj = pyo3::ffi::PyUnicode_New(bytes.len() as pyo3::ffi::Py_ssize_t, 127);
        if obj.is_null() {
            return Err(PyErr::fetch(py));
        }
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            pyo3::ffi::PyUnicode_DATA(obj).cast::<u8>(),
            bytes.len(),
        );
        Ok(Bound::from_owned_ptr(py, obj).cast_into_unchecked())
    }
}

/// A naive `datetime`; an aware one is refused, since every reading here is
/// naive local time.
pub fn from_py(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<WallTime> {
    let dt = obj
        .cast::<PyDateTime>()
        .map_err(|_| type_error(name, "a datetime", obj))?;
    if dt.get_tzinfo().is_some() {
        return Err(PyValueError::new_err(format!(
            "{name} must be a naive datetime (no tzinfo), got {}",
            obj.repr()?
        )));
    }
    let parts = DateTimeParts {
        year: dt.get_year(),
        month: dt.get_month(),
        day: dt.get_day(),
        hour: dt.get_hour(),
        minute: dt.get_minute(),
        second: dt.get_second(),
        microsecond: dt.get_microsecond(),
    };
    WallTime::from_parts(parts).ok_or_else(|| {
        PyTypeError::new_err(format!("{name}: unsupported datetime {}", describe(obj)))
    })
}

/// A naive `datetime` or `None`.
pub fn optional_from_py(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Option<WallTime>> {
    if obj.is_none() {
        Ok(None)
    } else {
        from_py(name, obj).map(Some)
    }
}

/// What `to_dict()` wrote back: an ISO 8601 string as `datetime.isoformat()`
/// writes it, a naive `datetime`, or `None`.
pub fn optional_from_iso(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Option<WallTime>> {
    if !obj.is_instance_of::<PyString>() {
        return optional_from_py(name, obj);
    }
    let parsed = obj
        .py()
        .get_type::<PyDateTime>()
        .call_method1("fromisoformat", (obj,))
        .map_err(|_| {
            PyValueError::new_err(format!(
                "{name} must be an ISO 8601 datetime string, got {}",
                describe(obj)
            ))
        })?;
    from_py(name, &parsed).map(Some)
}
