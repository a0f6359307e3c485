//! Python objects made once per call site — attribute and method names,
//! keyword-name tuples — by whichever thread needs them first, never
//! waiting for another.
//!
//! pyo3's `intern!` keeps its string in a once-cell whose first fill lets go
//! of the GIL and takes it back while the cell is marked "being filled". A
//! fork taken meanwhile by the thread holding the GIL gives a child whose
//! cell stays in that state for good (the filling thread is not copied), and
//! the child's first use of the name waits forever: seen in the fork test,
//! the loop thread making its names while the main thread forked. Here a
//! cell is only ever empty or full: two threads may both make the object,
//! the first to store it wins and the other drops its own.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyString;

/// A `Py<T>` filled once, without a lock.
pub struct RaceCell<T> {
    made: AtomicPtr<Py<T>>,
}

impl<T> RaceCell<T> {
    pub const fn new() -> Self {
        RaceCell {
            made: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The stored object, made by `make` if there is none yet. Inlined: a
    /// port call reads a few of these names, and the filled case is one load.
    #[inline]
    pub fn get_or_try_init<E>(&self, make: impl FnOnce() -> Result<Py<T>, E>) -> Result<&Py<T>, E> {
        let found = self.made.load(Ordering::Acquire);
        if found.is_null() {
            return self.fill(make()?);
        }
        // SAFETY: a stored pointer is a leaked Box, freed only by `drop`,
        // which needs `&mut self`.
        Ok(unsafe { &*found })
    }

    /// Stores `made` unless another thread stored its own first; the stored one.
    #[cold]
    fn fill<E>(&self, made: Py<T>) -> Result<&Py<T>, E> {
        let mine = Box::into_raw(Box::new(made));
        let found = match self.made.compare_exchange(
            ptr::null_mut(),
            mine,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => mine,
            Err(first) => {
                // SAFETY: `mine` came from Box::into_raw above and was
                // never shared.
                drop(unsafe { Box::from_raw(mine) });
                first
            }
        };
        // SAFETY: as in `get_or_try_init`.
        Ok(unsafe { &*found })
    }
}

impl<T> Default for RaceCell<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Drop for RaceCell<T> {
    fn drop(&mut self) {
        let made = *self.made.get_mut();
        if !made.is_null() {
            // SAFETY: stored by `get_or_try_init` from Box::into_raw; no
            // reference to it outlives `&self`.
            drop(unsafe { Box::from_raw(made) });
        }
    }
}

/// An interned `str`, made the first time it is needed: see [`name!`].
pub struct Name {
    text: &'static str,
    cell: RaceCell<PyString>,
}

impl Name {
    pub const fn new(text: &'static str) -> Self {
        Name {
            text,
            cell: RaceCell::new(),
        }
    }

    #[inline]
    pub fn get<'py>(&self, py: Python<'py>) -> &Bound<'py, PyString> {
        let made = self.cell.get_or_try_init(|| {
            Ok::<_, std::convert::Infallible>(PyString::intern(py, self.text).unbind())
        });
        match made {
            Ok(made) => made.bind(py),
            Err(never) => match never {},
        }
    }
}

/// `name!(py, "text")`: the interned `str` for a literal, made once for this
/// call site (what pyo3's `intern!` gives, without its fork hazard).
macro_rules! name {
    ($py:expr, $text:literal) => {{
        static NAME: $crate::bindings::names::Name = $crate::bindings::names::Name::new($text);
        NAME.get($py)
    }};
}

pub(crate) use name;
