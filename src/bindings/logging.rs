//! Routing the core's `log` records to Python's `logging` through pyo3-log,
//! behind a fast level check.
//!
//! pyo3-log formats a record and calls `logger.isEnabledFor` before it can
//! drop it: about a microsecond for every DEBUG record nobody wants. Python's
//! own loggers answer `isEnabledFor` from a per-logger dict, `logger._cache`,
//! which `logging` clears in place whenever levels change (`setLevel`,
//! `logging.disable`, `dictConfig`). We hold that dict and read it first: a
//! record whose level it marks disabled is dropped at once; anything else
//! (enabled, or not cached yet) goes to pyo3-log, which decides as before and
//! so also refills the cache.

use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::RwLock;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub struct GatedLogger {
    inner: pyo3_log::Logger,
    /// Per log target: the Python logger's `_cache` dict, if it has one.
    level_caches: RwLock<Vec<(String, Option<Py<PyDict>>)>>,
}

/// Python's number for a level, as pyo3-log maps it.
fn python_level(level: Level) -> u8 {
    match level {
        Level::Error => 40,
        Level::Warn => 30,
        Level::Info => 20,
        Level::Debug => 10,
        Level::Trace => 5,
    }
}

impl GatedLogger {
    /// Installs the logger for the whole process; false when another logger
    /// (e.g. from another copy of this module) was installed first.
    pub fn install(py: Python<'_>) -> PyResult<bool> {
        let inner =
            pyo3_log::Logger::new(py, pyo3_log::Caching::Loggers)?.filter(LevelFilter::Debug);
        let logger = GatedLogger {
            inner,
            level_caches: RwLock::new(Vec::new()),
        };
        if log::set_boxed_logger(Box::new(logger)).is_err() {
            return Ok(false);
        }
        log::set_max_level(LevelFilter::Debug);
        Ok(true)
    }

    /// What Python's cache says of the level for the record's logger; None
    /// when it does not say (not cached yet, or no such cache).
    fn cached_enabled(&self, py: Python<'_>, target: &str, level: Level) -> Option<bool> {
        {
            let caches = self.level_caches.read();
            if let Some((_, cache)) = caches.iter().find(|(t, _)| t == target) {
                // A dict lookup by int runs no Python code: fine under our lock.
                let hit = cache
                    .as_ref()?
                    .bind(py)
                    .get_item(python_level(level))
                    .ok()??;
                return hit.is_truthy().ok();
            }
        }
        self.remember(py, target);
        None
    }

    /// Finds the Python logger's `_cache` for a target, the first time the
    /// target logs.
    fn remember(&self, py: Python<'_>, target: &str) {
        // Looked up without holding our lock: this calls Python.
        let cache = py
            .import("logging")
            .and_then(|logging| logging.call_method1("getLogger", (target.replace("::", "."),)))
            .and_then(|logger| logger.getattr("_cache"))
            .ok()
            .and_then(|c| c.cast_into::<PyDict>().ok())
            .map(Bound::unbind);
        let mut caches = self.level_caches.write();
        if !caches.iter().any(|(t, _)| t == target) {
            caches.push((target.to_owned(), cache));
        }
    }
}

impl Log for GatedLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        let disabled = Python::attach(|py| {
            self.cached_enabled(py, metadata.target(), metadata.level()) == Some(false)
        });
        !disabled && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        let disabled = Python::attach(|py| {
            self.cached_enabled(py, record.target(), record.level()) == Some(false)
        });
        if !disabled {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}
