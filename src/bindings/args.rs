//! Checking Python arguments, with messages that name the argument and the value.

use std::borrow::Cow;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};

/// An argument that may be left out. Unlike `Option`, an explicit `None` is
/// "given" and gets checked like any other value.
pub enum Arg<'py> {
    Missing,
    Given(Bound<'py, PyAny>),
}

impl<'a, 'py> FromPyObject<'a, 'py> for Arg<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Arg::Given(obj.to_owned()))
    }
}

/// `type value` as a message shows it, e.g. `str 'x'`.
pub fn describe(obj: &Bound<'_, PyAny>) -> String {
    let type_name = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".to_owned());
    let repr = obj
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "<unprintable>".to_owned());
    format!("{type_name} {repr}")
}

/// A text quoted the way Python's `repr` quotes a simple str: `'name'`.
pub fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub fn type_error(name: &str, expected: &str, obj: &Bound<'_, PyAny>) -> PyErr {
    PyTypeError::new_err(format!("{name} must be {expected}, got {}", describe(obj)))
}

/// The text of a `str`. A compact ASCII `str`, what ids and names nearly
/// always are, is read in place (its bytes are its UTF-8) without the call
/// into CPython that checks and finds them (SPEC §6: every id argument).
#[inline]
pub fn text<'a>(s: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    // The layout's accessors exist up to 3.13 (3.14 hides its bit fields).
    #[cfg(not(any(Py_LIMITED_API, Py_3_14, PyPy, GraalPy)))]
    // SAFETY: `s` is a live `str`, held for 'a; a compact ASCII str keeps its
    // `length` ASCII bytes right after its header, and a str never changes
    // once made.
    unsafe {
        use pyo3::ffi;
        let p = s.as_ptr();
        if ffi::PyUnicode_IS_COMPACT_ASCII(p) != 0 {
            let len = ffi::PyUnicode_GET_LENGTH(p) as usize;
            let data = ffi::PyUnicode_DATA(p).cast::<u8>();
            let bytes = std::slice::from_raw_parts(data, len);
            return Ok(Cow::Borrowed(std::str::from_utf8_unchecked(bytes)));
        }
    }
    s.to_cow()
}

/// A `str` argument, such as a task id.
pub fn string<'a>(name: &str, obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, str>> {
    match obj.cast::<PyString>() {
        // A str that is not valid Unicode text (a lone surrogate) cannot be
        // an id or a name: say which argument, not just the codec's complaint.
        Ok(s) => text(s).map_err(|e| {
            PyValueError::new_err(format!(
                "{name} must be valid Unicode text, got {}: {e}",
                obj.repr()
                    .map_or_else(|_| "?".to_owned(), |r| r.to_string())
            ))
        }),
        Err(_) => Err(type_error(name, "a str", obj)),
    }
}

/// A checked `str` argument (`text` is what [`string`] read) as an object to
/// keep: the argument itself when it is exactly a `str`, so that nothing is
/// copied; a plain `str` of its text for a subclass, whose behaviour stays
/// out of what we hand back.
pub fn plain_str<'py>(obj: &Bound<'py, PyAny>, text: &str) -> Bound<'py, PyString> {
    match obj.cast_exact::<PyString>() {
        Ok(s) => s.clone(),
        Err(_) => PyString::new(obj.py(), text),
    }
}

/// A `str` or `None`.
pub fn optional_string<'a>(
    name: &str,
    obj: Option<&'a Bound<'_, PyAny>>,
) -> PyResult<Option<Cow<'a, str>>> {
    match obj {
        Some(o) if !o.is_none() => string(name, o).map(Some),
        _ => Ok(None),
    }
}

fn is_int(obj: &Bound<'_, PyAny>) -> bool {
    obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<PyBool>()
}

/// An `int`, any size, as `i64` with out-of-range values held at the ends.
pub fn saturating_int(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    if !is_int(obj) {
        return Err(type_error(name, "an int", obj));
    }
    match obj.extract::<i64>() {
        Ok(v) => Ok(v),
        Err(_) if obj.lt(0)? => Ok(i64::MIN),
        Err(_) => Ok(i64::MAX),
    }
}

/// An `int >= 0`; values beyond `u64` are held at `u64::MAX` ("unlimited").
pub fn non_negative_int(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    let value = saturating_int(name, obj)?;
    if value < 0 {
        return Err(PyValueError::new_err(format!(
            "{name} must be an int >= 0, got {}",
            obj.repr()?
        )));
    }
    match obj.extract::<u64>() {
        Ok(v) => Ok(v),
        Err(_) => Ok(u64::MAX),
    }
}

/// A real number (`int` or `float`, not `bool`) as `f64`; the range is checked
/// by the caller.
pub fn number(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<f64> {
    if obj.is_instance_of::<PyFloat>() || is_int(obj) {
        // An int too large for a float is out of every range we accept.
        match obj.extract::<f64>() {
            Ok(v) => Ok(v),
            Err(_) if obj.lt(0)? => Ok(f64::NEG_INFINITY),
            Err(_) => Ok(f64::INFINITY),
        }
    } else {
        Err(type_error(name, "a number", obj))
    }
}
