//! Values that many tasks share — spec, repo and skill names, and the
//! combinations of them that tasks carry — held once.
//!
//! A dispatcher holding 10^6 tasks of a few specs would otherwise keep 10^6
//! copies of each spec name (a 32-byte allocation apiece, made when a task
//! arrives and freed when it finishes). Each thread keeps its own table, so
//! interning takes no lock (and a fork cannot catch one held). The table
//! forgets names nothing else holds any more once it has doubled since its
//! last sweep, and keeps at most [`MAX_NAMES`]: past that a name is made
//! afresh (not shared) until a sweep makes room, so a thread's table never
//! holds more than a few hundred kilobytes, however many names pass through.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hash};
use std::sync::Arc;
use std::thread::LocalKey;

use crate::hashing::FxHasher;

/// Table size below which no sweep happens.
pub const SWEEP_FLOOR: usize = 256;

/// The most entries a table keeps.
pub const MAX_NAMES: usize = 4096;

/// Longer texts are not names: they are not kept.
pub const LONGEST_NAME: usize = 128;

/// Shared values of one kind, each held once, swept of those no one else
/// holds (see the module's comment).
#[derive(Debug)]
pub struct SharedTable<T: ?Sized> {
    items: HashSet<Arc<T>, BuildHasherDefault<FxHasher>>,
    sweep_at: usize,
    /// Values not kept since the last sweep, the table being full.
    refused: usize,
}

impl<T: ?Sized> Default for SharedTable<T> {
    fn default() -> Self {
        SharedTable {
            items: HashSet::default(),
            sweep_at: SWEEP_FLOOR,
            refused: 0,
        }
    }
}

impl<T: ?Sized + Eq + Hash> SharedTable<T> {
    /// The table's `Arc` equal to `key`, if it has one.
    pub fn get<Q: ?Sized + Eq + Hash>(&self, key: &Q) -> Option<Arc<T>>
    where
        Arc<T>: Borrow<Q>,
    {
        self.items.get(key).cloned()
    }

    /// Keeps `made` (not in the table) if there is room; hands it back.
    pub fn keep(&mut self, made: Arc<T>) -> Arc<T> {
        // A full table of values in use is swept again only after as many
        // refusals as it holds: a sweep costs O(1) a value, amortized.
        if self.items.len() >= self.sweep_at || self.refused >= MAX_NAMES {
            // A count of 1 is the table's own reference; being thread-local,
            // no other thread can clone it meanwhile.
            self.items.retain(|n| Arc::strong_count(n) > 1);
            self.sweep_at = (2 * self.items.len()).max(SWEEP_FLOOR);
            self.refused = 0;
        }
        if self.items.len() < MAX_NAMES {
            self.items.insert(Arc::clone(&made));
        } else {
            self.refused += 1;
        }
        made
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The spec, repo and skill names.
pub type NameTable = SharedTable<str>;

impl NameTable {
    /// The table's `Arc` for `text`, made (and kept) if it has none.
    pub fn name(&mut self, text: &str) -> Arc<str> {
        if text.len() > LONGEST_NAME {
            return Arc::from(text);
        }
        match self.get(text) {
            Some(name) => name,
            None => self.keep(Arc::from(text)),
        }
    }
}

/// `f` applied to this thread's `table`; None while the table is being
/// destroyed (the thread's exit) or if it were ever reentered, so that this
/// never panics.
pub fn with_thread_table<T: ?Sized + 'static, R>(
    table: &'static LocalKey<RefCell<SharedTable<T>>>,
    f: impl FnOnce(&mut SharedTable<T>) -> R,
) -> Option<R> {
    table
        .try_with(|t| t.try_borrow_mut().ok().map(|mut t| f(&mut t)))
        .ok()
        .flatten()
}

thread_local! {
    static NAMES: RefCell<NameTable> = RefCell::new(NameTable::default());
}

/// The `Arc` this thread shares for the name `text`.
pub fn shared_name(text: &str) -> Arc<str> {
    with_thread_table(&NAMES, |t| t.name(text)).unwrap_or_else(|| Arc::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_held_once_and_shared() {
        let mut table = NameTable::default();
        let a = table.name("spec");
        let b = table.name("spec");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "spec");
        assert!(!Arc::ptr_eq(&a, &table.name("other")));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn names_no_one_holds_are_forgotten_and_the_table_stays_bounded() {
        let mut table = NameTable::default();
        let kept: Vec<Arc<str>> = (0..100).map(|i| table.name(&format!("kept-{i}"))).collect();
        for i in 0..100_000 {
            table.name(&format!("passing-{i}"));
            assert!(table.len() <= 2 * SWEEP_FLOOR.max(2 * kept.len()));
        }
        // The names still held are still shared.
        for (i, name) in kept.iter().enumerate() {
            assert!(Arc::ptr_eq(name, &table.name(&format!("kept-{i}"))));
        }
    }

    #[test]
    fn a_table_full_of_names_in_use_stops_growing_and_recovers_when_they_go() {
        let mut table = NameTable::default();
        let mut held: Vec<Arc<str>> = (0..3 * MAX_NAMES)
            .map(|i| table.name(&format!("live-{i}")))
            .collect();
        assert_eq!(table.len(), MAX_NAMES);
        // Names past the limit are still right, just not shared.
        assert_eq!(&*held[2 * MAX_NAMES], format!("live-{}", 2 * MAX_NAMES));
        held.clear();
        for i in 0..MAX_NAMES + 1 {
            table.name(&format!("new-{i}"));
        }
        let a = table.name("shared again");
        assert!(Arc::ptr_eq(&a, &table.name("shared again")));
        assert!(table.len() <= MAX_NAMES);
    }

    #[test]
    fn long_texts_are_not_kept() {
        let mut table = NameTable::default();
        let long = "x".repeat(LONGEST_NAME + 1);
        assert_eq!(&*table.name(&long), long.as_str());
        assert!(table.is_empty());
    }

    #[test]
    fn each_thread_shares_its_own_names() {
        let a = shared_name("spec");
        assert!(Arc::ptr_eq(&a, &shared_name("spec")));
        let other = std::thread::spawn(|| shared_name("spec")).join().unwrap();
        assert_eq!(a, other);
    }
}
