//! Starting a task's shell for the local launcher (`crate::process`), with
//! the GIL released while the child starts.

use std::path::Path;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::bindings::{args, files};
use crate::process::{self, SpawnError};

/// As `open()` and `Popen` raise: the errno's own OSError subclass, naming
/// the file (or, when the shell cannot start, its directory).
fn os_error(error: &SpawnError, cwd: &str) -> PyErr {
    let io = error.io_error();
    let filename = match error {
        SpawnError::Open { path, .. } => path.as_str(),
        SpawnError::Start(_) => cwd,
    };
    let text = io.to_string();
    let strerror = text.split(" (os error").next().unwrap_or(&text).to_owned();
    match io.raw_os_error() {
        Some(errno) => PyOSError::new_err((errno, strerror, filename.to_owned())),
        None => PyOSError::new_err(format!("{error}")),
    }
}

/// Starts `/bin/sh -c command` in `cwd` with exactly `env`, stdout to the
/// file `stdout` and stderr to `stderr` (created or truncated), stdin from
/// /dev/null, in a new session (its own process group); returns its pid.
/// The caller reaps it (`os.waitpid`).
#[pyfunction]
#[pyo3(signature = (command, cwd, env, stdout, stderr))]
pub fn spawn_shell(
    py: Python<'_>,
    command: &Bound<'_, PyAny>,
    cwd: &Bound<'_, PyAny>,
    env: &Bound<'_, PyDict>,
    stdout: &Bound<'_, PyAny>,
    stderr: &Bound<'_, PyAny>,
) -> PyResult<u32> {
    let command = args::string("command", command)?.into_owned();
    if command.contains('\0') {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "command: contains a NUL character",
        ));
    }
    let cwd = files::str_or_path_arg("cwd", cwd)?;
    let stdout = files::str_or_path_arg("stdout", stdout)?;
    let stderr = files::str_or_path_arg("stderr", stderr)?;
    let mut variables = Vec::with_capacity(env.len());
    for (key, value) in env.iter() {
        let key = args::string("env key", &key)?.into_owned();
        let value = args::string("env value", &value)?.into_owned();
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "env: {} is not a valid environment variable",
                args::quoted(&key)
            )));
        }
        variables.push((key, value));
    }
    py.detach(|| {
        process::spawn_shell(
            &command,
            Path::new(&cwd),
            &variables,
            Path::new(&stdout),
            Path::new(&stderr),
        )
    })
    .map_err(|e| os_error(&e, &cwd))
}
