//! The Python face of the core: type conversion, argument checks, error mapping.
//! Nothing here decides anything.

mod args;
mod clock;
mod datetime;
mod retry;

use pyo3::prelude::*;

#[pymodule(name = "_core")]
mod core_module {
    #[pymodule_export]
    use super::clock::{PyManualClock, PySystemClock};
    #[pymodule_export]
    use super::retry::{PyRetryInfo, PyRetryManager};

    use super::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        // Route the core's `log` records to Python's `logging`. Loggers are
        // cached, levels are not: a level set later (e.g. by pytest's caplog)
        // takes effect at once. Another copy of this module may have installed
        // the logger already, which is fine.
        let _ = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::Loggers)?
            .filter(log::LevelFilter::Debug)
            .install();
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
