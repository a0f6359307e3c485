//! Calling a Python method with keyword arguments the way Python itself does:
//! one vectorcall with a tuple of keyword names, made once per call site,
//! instead of building a dict and a bound method for every call. Port calls
//! are on every outcome's path (SPEC §6).

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::bindings::names::RaceCell;

/// A call site's keyword names, as a tuple of interned strings made once
/// (without waiting on another thread: see `names`).
pub struct KeywordNames {
    names: &'static [&'static str],
    tuple: RaceCell<PyTuple>,
}

impl KeywordNames {
    pub const fn new(names: &'static [&'static str]) -> Self {
        KeywordNames {
            names,
            tuple: RaceCell::new(),
        }
    }

    fn tuple<'py>(&self, py: Python<'py>) -> PyResult<&Bound<'py, PyTuple>> {
        let tuple = self.tuple.get_or_try_init(|| {
            let names = self.names.iter().map(|n| PyString::intern(py, n));
            PyTuple::new(py, names).map(Bound::unbind)
        })?;
        Ok(tuple.bind(py))
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
}

/// The most arguments a port call passes, `self` included.
const MAX_ARGUMENTS: usize = 16;

/// `obj.<method>(*positional, **dict(zip(keywords.names, values)))`.
pub fn call_method<'py>(
    obj: &Bound<'py, PyAny>,
    method: &Bound<'py, PyString>,
    positional: &[Bound<'py, PyAny>],
    keywords: &KeywordNames,
    values: &[Bound<'py, PyAny>],
) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    if values.len() != keywords.len() {
        return Err(pyo3::exceptions::PySystemError::new_err(
            "keyword values do not match their names",
        ));
    }
    let kwnames = keywords.tuple(py)?;
    // On the stack: a port call should not allocate for its arguments.
    let mut args = [std::ptr::null_mut::<ffi::PyObject>(); MAX_ARGUMENTS];
    let count = 1 + positional.len() + values.len();
    if count > MAX_ARGUMENTS {
        return Err(pyo3::exceptions::PySystemError::new_err(
            "too many arguments for a port call",
        ));
    }
    args[0] = obj.as_ptr();
    for (slot, value) in args[1..count]
        .iter_mut()
        .zip(positional.iter().chain(values))
    {
        *slot = value.as_ptr();
    }
    // SAFETY: every pointer is a live object borrowed for the call (`obj`,
    // `positional` and `values` outlive it); `args[0]` is `self` and the
    // positional count includes it; the keyword values follow, one per name
    // in `kwnames`. The result is a new reference or NULL with an exception.
    unsafe {
        let result = ffi::PyObject_VectorcallMethod(
            method.as_ptr(),
            args.as_ptr(),
            (1 + positional.len()) as libc::size_t,
            kwnames.as_ptr(),
        );
        Bound::from_owned_ptr_or_err(py, result)
    }
}
