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
//!
//! Where CPython keeps a dict's version tag (3.10-3.13: it changes with every
//! change of the dict), a level found disabled is remembered with the tag it
//! was read at, and the next record of that level compares one number
//! instead of looking the level up (SPEC §6, `should_retry`). A binding that
//! holds the GIL asks [`most_verbose`] before a hot call, so that the core
//! does not even build the records known to be unwanted.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// How many log targets the gate remembers; the core has two, and a target
/// beyond these simply goes to pyo3-log unfiltered.
const TARGETS: usize = 8;

/// A log target and its Python logger's `_cache` dict, if it has one.
struct TargetCache {
    target: String,
    /// The address of a `&'static str` of the same text that asked
    /// [`most_verbose`] (0: none yet): with the length, it finds the entry
    /// without comparing text.
    static_target: AtomicUsize,
    cache: Option<Py<PyDict>>,
    /// Per level (ERROR to TRACE): the dict's version tag when it last said
    /// the level is disabled; 0 (never a tag) when it has not. Read and
    /// written with the GIL held, which orders them.
    disabled_at: [AtomicU64; 5],
}

/// The dict's version tag, where CPython has one that changes with every
/// change of the dict (3.10-3.13 with the GIL; a new dict takes a tag never
/// used before).
#[cfg(not(any(Py_3_14, PyPy, GraalPy, Py_GIL_DISABLED)))]
fn version_tag(dict: &Py<PyDict>) -> Option<u64> {
    // SAFETY: a live dict (we hold a reference), read with the GIL held.
    #[allow(deprecated)]
    let tag = unsafe { (*dict.as_ptr().cast::<pyo3::ffi::PyDictObject>()).ma_version_tag };
    Some(tag)
}

#[cfg(any(Py_3_14, PyPy, GraalPy, Py_GIL_DISABLED))]
fn version_tag(_dict: &Py<PyDict>) -> Option<u64> {
    None
}

/// Filled in order, once per target, never changed after: the check on
/// every record reads them without any lock (a DEBUG record nobody wants
/// sits on `should_retry`'s path, SPEC §6). One set per process, as the
/// logger is.
static LEVEL_CACHES: [OnceLock<TargetCache>; TARGETS] = [const { OnceLock::new() }; TARGETS];

pub struct GatedLogger {
    inner: pyo3_log::Logger,
}

/// Whether Python's cache said `level` is disabled for the entry's logger
/// and has not changed since (where the dict has a version tag).
fn known_disabled(entry: &TargetCache, level: Level) -> bool {
    let (Some(cache), disabled_at) = (&entry.cache, &entry.disabled_at[level as usize - 1]) else {
        return false;
    };
    version_tag(cache).is_some_and(|t| t != 0 && disabled_at.load(Ordering::Relaxed) == t)
}

/// The most verbose level whose records for `target` may be wanted: a level
/// Python's cache said is disabled, unchanged since, is left out. The GIL
/// held (`py`) is what makes reading the cache safe; unsure means wanted.
/// The core's hot calls take it to skip building records (DEBUG on every
/// `should_retry` that backs off) that the logger would drop.
pub fn most_verbose(_py: Python<'_>, target: &'static str) -> LevelFilter {
    let address = target.as_ptr() as usize;
    for cell in &LEVEL_CACHES {
        let Some(entry) = cell.get() else {
            break;
        };
        // Address and length: a static of another text could start at the
        // same address (one literal a prefix of another), never with both.
        if entry.static_target.load(Ordering::Relaxed) != address
            || entry.target.len() != target.len()
        {
            if entry.target != target {
                continue;
            }
            // Static text never changes: its address names it from now on.
            entry.static_target.store(address, Ordering::Relaxed);
        }
        // Python's levels are ordered: INFO off means DEBUG off too.
        return if known_disabled(entry, Level::Info) {
            LevelFilter::Warn
        } else if known_disabled(entry, Level::Debug) {
            LevelFilter::Info
        } else {
            LevelFilter::Trace
        };
    }
    LevelFilter::Trace
}

/// Whether a record of `level` for `target` may be wanted: a hot path asks
/// before making one ([`most_verbose`]).
pub fn may_want(py: Python<'_>, target: &'static str, level: Level) -> bool {
    most_verbose(py, target) >= level
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
        let logger = GatedLogger { inner };
        if log::set_boxed_logger(Box::new(logger)).is_err() {
            return Ok(false);
        }
        log::set_max_level(LevelFilter::Debug);
        Ok(true)
    }

    /// What Python's cache says of the level for the record's logger; None
    /// when it does not say (not cached yet, or no such cache). On the path
    /// of every DEBUG record nobody wants (one per `should_retry` that backs
    /// off): the dict is read with a borrowed lookup compared against
    /// `False` itself.
    fn cached_enabled(&self, py: Python<'_>, target: &str, level: Level) -> Option<bool> {
        for cell in &LEVEL_CACHES {
            let Some(entry) = cell.get() else {
                break;
            };
            if entry.target != target {
                continue;
            }
            let cache = entry.cache.as_ref()?;
            if known_disabled(entry, level) {
                return Some(false); // unchanged since it said so
            }
            let disabled_at = &entry.disabled_at[level as usize - 1];
            let tag = version_tag(cache);
            // A small int: CPython hands out its cached object.
            let key = python_level(level).into_pyobject(py).ok()?;
            // SAFETY: the GIL is held; both are live objects; the result is
            // a borrowed reference (or NULL), read before anything else runs.
            // (Not PyDict_GetItem: it saves and restores the error state.)
            let found = unsafe { pyo3::ffi::PyDict_GetItemWithError(cache.as_ptr(), key.as_ptr()) };
            if found.is_null() {
                // An int key cannot fail to hash or compare; clear anyway.
                let _ = PyErr::take(py);
                return None;
            }
            // SAFETY: as above; `Py_False`/`Py_True` are static objects.
            unsafe {
                if found == pyo3::ffi::Py_False() {
                    if let Some(t) = tag {
                        disabled_at.store(t, Ordering::Relaxed);
                    }
                    return Some(false);
                }
                if found == pyo3::ffi::Py_True() {
                    return Some(true);
                }
                return Bound::from_borrowed_ptr(py, found).is_truthy().ok();
            }
        }
        self.remember(py, target);
        None
    }

    /// Finds the Python logger's `_cache` for a target, the first time the
    /// target logs.
    fn remember(&self, py: Python<'_>, target: &str) {
        if LEVEL_CACHES.iter().all(|cell| cell.get().is_some()) {
            return; // no room: such a target's records go to pyo3-log as they are
        }
        // Looked up before touching the cells: this calls Python, which may
        // let another thread log meanwhile.
        let cache = py
            .import("logging")
            .and_then(|logging| logging.call_method1("getLogger", (target.replace("::", "."),)))
            .and_then(|logger| logger.getattr("_cache"))
            .ok()
            .and_then(|c| c.cast_into::<PyDict>().ok())
            .map(Bound::unbind);
        let mut entry = TargetCache {
            target: target.to_owned(),
            static_target: AtomicUsize::new(0),
            cache,
            disabled_at: Default::default(),
        };
        for cell in &LEVEL_CACHES {
            if cell.get().is_some_and(|known| known.target == target) {
                return;
            }
            // A cell another thread filled first is skipped; the first cell
            // naming a target is the one read.
            match cell.set(entry) {
                Ok(()) => return,
                Err(back) => entry = back,
            }
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
