//! The Python face of the core: type conversion, argument checks, error mapping.
//! Nothing here decides anything.

mod args;
mod call;
mod clock;
mod datetime;
mod dispatcher;
mod files;
mod logging;
mod retry;
mod retry_options;

use pyo3::prelude::*;

#[pymodule(name = "_core")]
mod core_module {
    #[pymodule_export]
    use super::clock::{PyManualClock, PySystemClock};
    #[pymodule_export]
    use super::dispatcher::PyDispatcherCore;
    #[pymodule_export]
    use super::files::write_atomically;
    #[pymodule_export]
    use super::retry::{PyRetryInfo, PyRetryManager};

    use super::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        // Route the core's `log` records to Python's `logging`; a level set
        // later (e.g. by pytest's caplog) takes effect at once. Another copy
        // of this module may have installed the logger already, which is fine.
        super::logging::GatedLogger::install(m.py())?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        let py = m.py();
        use super::dispatcher as d;
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
