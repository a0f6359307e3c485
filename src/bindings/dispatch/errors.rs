//! The dispatcher's exceptions, created here so the core can raise them.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::PyErr;

use crate::dispatch::state::Refusal;

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

pub fn refusal_to_py(refusal: Refusal) -> PyErr {
    match refusal {
        Refusal::UnknownPool(_) => PoolNotFoundError::new_err(refusal.to_string()),
        Refusal::PoolFull(_) | Refusal::GlobalLimitReached(_) => {
            TaskAssignmentError::new_err(refusal.to_string())
        }
        _ => PyValueError::new_err(refusal.to_string()),
    }
}
