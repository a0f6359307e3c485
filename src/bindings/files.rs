//! Files: path arguments, I/O errors as Python exceptions, atomic writes,
//! emptying a directory.

use pyo3::prelude::*;

use pyo3::types::PyString;

use crate::bindings::args;
use crate::{directory, persist};

/// An I/O error as the matching Python exception, naming the path.
pub fn io_error(path: &str, err: &std::io::Error) -> PyErr {
    use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError};
    let message = format!("{path}: {err}");
    match err.kind() {
        std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
        std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
        _ => PyOSError::new_err(message),
    }
}

/// A path argument (`str` or `os.PathLike`) as text.
pub fn path_arg(name: &str, path: &Bound<'_, PyAny>) -> PyResult<String> {
    let fspath = path
        .py()
        .import("os")?
        .call_method1("fspath", (path,))
        .map_err(|_| args::type_error(name, "a path", path))?;
    Ok(args::string(name, &fspath)?.into_owned())
}

/// A path argument: a `str` as is (the local launcher's case, once or twice
/// a task, kept cheap), else anything `os.fspath` takes.
pub fn str_or_path_arg(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<String> {
    match obj.cast::<PyString>() {
        Ok(text) => Ok(text.to_str()?.to_owned()),
        Err(_) => path_arg(name, obj),
    }
}

/// Removes everything in the directory `path` (subdirectories whole, best
/// effort; links themselves, never what they name), keeping `path`; one
/// release of the GIL for all of it. FileNotFoundError when `path` is gone.
#[pyfunction]
pub fn empty_directory(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
    let path = str_or_path_arg("path", path)?;
    py.detach(|| directory::empty(std::path::Path::new(&path)))
        .map_err(|e| io_error(&path, &e))
}

/// Replaces the file at `path` with `text` atomically: a temporary file
/// beside it, flushed to disk, renamed over it. A crash at any moment leaves
/// the old contents or the new, never a mix.
#[pyfunction]
pub fn write_atomically(py: Python<'_>, path: &Bound<'_, PyAny>, text: &str) -> PyResult<()> {
    let path = path_arg("path", path)?;
    let bytes = text.as_bytes();
    py.detach(|| persist::write_atomically(std::path::Path::new(&path), bytes))
        .map_err(|e| io_error(&path, &e))
}
