//! The Python face of the core: type conversion, argument checks, error mapping.
//! Nothing here decides anything.

mod args;
mod call;
mod dispatch;
mod events;
mod files;
mod logging;
pub(crate) mod names;
#[cfg(unix)]
mod process;
mod retry;
mod time;

use pyo3::prelude::*;

#[pymodule(name = "_core")]
mod core_module {
    #[pymodule_export]
    use super::dispatch::{
        _after_fork_in_child, _stop_loops_at_exit, check_dependencies, DispatchLoop,
        PyDispatcherCore, Waker,
    };
    #[pymodule_export]
    use super::events::PyJsonLineLog;
    #[pymodule_export]
    use super::files::{empty_directory, write_atomically};
    #[cfg(unix)]
    #[pymodule_export]
    use super::process::spawn_shell;
    #[pymodule_export]
    use super::retry::{PyRetryInfo, PyRetryManager};
    #[pymodule_export]
    use super::time::clock::{PyManualClock, PySystemClock};

    use super::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        // Route the core's `log` records to Python's `logging`; a level set
        // later (e.g. by pytest's caplog) takes effect at once. Another copy
        // of this module may have installed the logger already, which is fine.
        super::logging::GatedLogger::install(m.py())?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        let py = m.py();
        // Running loops end before CPython finalises; forked children get
        // stopped dispatchers with free locks.
        py.import("atexit")?
            .call_method1("register", (m.getattr("_stop_loops_at_exit")?,))?;
        let os = py.import("os")?;
        if os.hasattr("register_at_fork")? {
            let kwargs = pyo3::types::PyDict::new(py);
            kwargs.set_item("after_in_child", m.getattr("_after_fork_in_child")?)?;
            os.call_method("register_at_fork", (), Some(&kwargs))?;
        }
        use super::dispatch as d;
        m.add("DispatcherError", py.get_type::<d::DispatcherError>())?;
        m.add(
            "TaskAssignmentError",
            py.get_type::<d::TaskAssignmentError>(),
        )?;
        m.add(
            "SlotAllocationError",
            py.get_type::<d::SlotAllocationError>(),
        )?;
        m.add("RunnerLaunchError", py.get_type::<d::RunnerLaunchError>())?;
        m.add("PoolNotFoundError", py.get_type::<d::PoolNotFoundError>())?;
        m.add(
            "DeadlockDetectedError",
            py.get_type::<d::DeadlockDetectedError>(),
        )?;
        Ok(())
    }
}
