//! Names that many tasks share — spec, repo and skill names — held once.
//!
//! A dispatcher holding 10^6 tasks of a few specs would otherwise keep 10^6
//! copies of each spec name (a 32-byte allocation apiece, made when a task
//! arrives and freed when it finishes). Each thread keeps its own table, so
//! interning takes no lock (and a fork cannot catch one held). The table
//! forgets names nothing else holds any more once it has doubled since its
//! last sweep, so it stays within twice the names in use (at least
//! [`SWEEP_FLOOR`]), however many distinct names pass through.

use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use crate::hashing::FxHasher;

/// Table size below which no sweep happens.
pub const SWEEP_FLOOR: usize = 256;

/// Longer texts are not names: they are not kept.
pub const LONGEST_NAME: usize = 128;

#[derive(Debug)]
pub struct NameTable {
    names: HashSet<Arc<str>, BuildHasherDefault<FxHasher>>,
    sweep_at: usize,
}

impl Default for NameTable {
    fn default() -> Self {
        NameTable {
            names: HashSet::default(),
            sweep_at: SWEEP_FLOOR,
        }
    }
}

impl NameTable {
    /// The table's `Arc` for `text`, made (and kept) if it has none.
    pub fn name(&mut self, text: &str) -> Arc<str> {
        if let Some(name) = self.names.get(text) {
            return Arc::clone(name);
        }
        let name: Arc<str> = Arc::from(text);
        if text.len() > LONGEST_NAME {
            return name;
        }
        if self.names.len() >= self.sweep_at {
            // A count of 1 is the table's own reference; being thread-local,
            // no other thread can clone it meanwhile.
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.sweep_at = (2 * self.names.len()).max(SWEEP_FLOOR);
        }
        self.names.insert(Arc::clone(&name));
        name
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

thread_local! {
    static NAMES: RefCell<NameTable> = RefCell::new(NameTable::default());
}

/// The `Arc` this thread shares for the name `text`.
pub fn shared_name(text: &str) -> Arc<str> {
    NAMES.with(|table| match table.try_borrow_mut() {
        Ok(mut table) => table.name(text),
        // Not reentered in practice (nothing here calls out); never panic.
        Err(_) => Arc::from(text),
    })
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
