//! Entries by id — the tasks and runners a dispatcher holds: a dense slab of
//! entries and an index of 4-byte slot numbers hashed by each entry's own id.
//!
//! A hash map of whole entries keeps every entry in its table, which doubles
//! as it grows (at 10^6 tasks it is half empty by design) and holds each id a
//! second time as the key; here the table holds only slot numbers, and the
//! entries sit in one vector (SPEC §6, memory per held task).

use std::hash::{BuildHasher, BuildHasherDefault};

use hashbrown::hash_table::OccupiedEntry;
use hashbrown::HashTable;

use crate::hashing::{bytes_eq, FxHasher};

/// An entry that knows its own key.
pub trait Keyed {
    fn key(&self) -> &str;
}

#[derive(Debug)]
pub struct KeyedSlab<V> {
    slots: Vec<Option<V>>,
    free: Vec<u32>,
    index: HashTable<u32>,
}

impl<V> Default for KeyedSlab<V> {
    fn default() -> Self {
        KeyedSlab {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
        }
    }
}

/// The index's entry for `key`, if an entry in `slots` has that key.
fn indexed<'a, V: Keyed>(
    index: &'a mut HashTable<u32>,
    slots: &[Option<V>],
    key: &str,
) -> Option<OccupiedEntry<'a, u32>> {
    let same = |&slot: &u32| {
        slots[slot as usize]
            .as_ref()
            .is_some_and(|v| bytes_eq(v.key().as_bytes(), key.as_bytes()))
    };
    index.find_entry(hash(key), same).ok()
}

fn hash(key: &str) -> u64 {
    BuildHasherDefault::<FxHasher>::default().hash_one(key)
}

impl<V: Keyed> KeyedSlab<V> {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.slot_of(key).is_some()
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        let slot = self.slot_of(key)?;
        self.slots[slot as usize].as_ref()
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let slot = self.slot_of(key)?;
        self.slots[slot as usize].as_mut()
    }

    /// The slot of the entry under `key`: its number until it is removed.
    pub fn slot_of(&self, key: &str) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash(key), |&slot| {
                slots[slot as usize]
                    .as_ref()
                    .is_some_and(|v| bytes_eq(v.key().as_bytes(), key.as_bytes()))
            })
            .copied()
    }

    /// The entry in `slot`, if one is there.
    pub fn at(&self, slot: u32) -> Option<&V> {
        self.slots.get(slot as usize)?.as_ref()
    }

    pub fn at_mut(&mut self, slot: u32) -> Option<&mut V> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Makes room for `additional` more entries at once: a batch grows the
    /// slab and its index once instead of doubling them step by step, each
    /// step moving what was there.
    pub fn reserve(&mut self, additional: usize) {
        self.slots
            .reserve(additional.saturating_sub(self.free.len()));
        let slots = &self.slots;
        self.index.reserve(additional, |&s| {
            slots[s as usize].as_ref().map_or(0, |v| hash(v.key()))
        });
    }

    /// Holds `value` under its key; returns the entry it replaces, if any.
    pub fn insert(&mut self, value: V) -> Option<V> {
        self.insert_in_slot(value).1
    }

    /// [`Self::insert`], also telling the slot the entry went to.
    pub fn insert_in_slot(&mut self, value: V) -> (u32, Option<V>) {
        if let Some(slot) = self.slot_of(value.key()) {
            return (slot, self.slots[slot as usize].replace(value));
        }
        (self.insert_absent(value), None)
    }

    /// Holds `value`, whose key the caller has just found absent (one
    /// lookup instead of two); returns its slot.
    pub fn insert_absent(&mut self, value: V) -> u32 {
        debug_assert!(self.slot_of(value.key()).is_none());
        let h = hash(value.key());
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(value);
                slot
            }
            None => {
                self.slots.push(Some(value));
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        // Growing the index rehashes each entry from its id.
        self.index.insert_unique(h, slot, |&s| {
            slots[s as usize].as_ref().map_or(0, |v| hash(v.key()))
        });
        slot
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.remove_from_slot(key).map(|(_, value)| value)
    }

    /// [`Self::remove`], also telling the slot the entry was in.
    pub fn remove_from_slot(&mut self, key: &str) -> Option<(u32, V)> {
        let entry = indexed(&mut self.index, &self.slots, key)?;
        let (slot, _) = entry.remove();
        Some((slot, self.vacate(slot)?))
    }

    /// [`Self::remove`], but only when `wanted` says so of the entry;
    /// otherwise it stays, and `Err` tells its slot. One lookup either way.
    pub fn remove_if(
        &mut self,
        key: &str,
        wanted: impl FnOnce(&V) -> bool,
    ) -> Option<Result<V, u32>> {
        let entry = indexed(&mut self.index, &self.slots, key)?;
        let slot = *entry.get();
        if !self.slots[slot as usize].as_ref().is_some_and(wanted) {
            return Some(Err(slot));
        }
        entry.remove();
        self.vacate(slot).map(Ok)
    }

    /// Removes the entry in `slot`, if one is there.
    pub fn remove_at(&mut self, slot: u32) -> Option<V> {
        let key = self.slots.get(slot as usize)?.as_ref()?.key();
        let entry = self.index.find_entry(hash(key), |&s| s == slot).ok()?;
        entry.remove();
        self.vacate(slot)
    }

    /// Takes the entry out of `slot`, already unindexed.
    fn vacate(&mut self, slot: u32) -> Option<V> {
        let value = self.slots[slot as usize].take()?;
        if slot as usize + 1 == self.slots.len() {
            self.slots.pop();
        } else {
            self.free.push(slot);
        }
        Some(value)
    }

    /// Every entry, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().flatten()
    }

    /// Every entry with its slot, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (u32, &V)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, v)| Some((slot as u32, v.as_ref()?)))
    }

    /// [`Self::get_mut`], also telling the entry's slot.
    pub fn get_mut_in_slot(&mut self, key: &str) -> Option<(u32, &mut V)> {
        let slot = self.slot_of(key)?;
        Some((slot, self.slots[slot as usize].as_mut()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone, PartialEq)]
    struct Entry(String, u32);

    impl Keyed for Entry {
        fn key(&self) -> &str {
            &self.0
        }
    }

    #[test]
    fn behaves_like_a_map_under_random_operations() {
        let mut slab = KeyedSlab::default();
        let mut model: HashMap<String, u32> = HashMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("t{}", x % 300);
            match x % 5 {
                0 | 1 => {
                    let old = slab.insert(Entry(key.clone(), step)).map(|e| e.1);
                    assert_eq!(old, model.insert(key.clone(), step));
                }
                2 if step % 3 == 0 => {
                    assert_eq!(slab.remove(&key).map(|e| e.1), model.remove(&key));
                }
                // Kept when not wanted; taken when wanted.
                2 if step % 3 == 1 => {
                    let kept = slab.remove_if(&key, |_| false);
                    assert_eq!(kept.map(|r| r.is_err()), model.get(&key).map(|_| true));
                    let taken = slab.remove_if(&key, |_| true).and_then(Result::ok);
                    assert_eq!(taken.map(|e| e.1), model.remove(&key));
                }
                // By its slot, as a running task names its runner.
                2 => {
                    let taken = slab.slot_of(&key).and_then(|at| slab.remove_at(at));
                    assert_eq!(taken.map(|e| e.1), model.remove(&key));
                }
                3 => {
                    if let Some(e) = slab.get_mut(&key) {
                        e.1 += 1;
                    }
                    if let Some(v) = model.get_mut(&key) {
                        *v += 1;
                    }
                }
                _ => assert_eq!(slab.get(&key).map(|e| e.1), model.get(&key).copied()),
            }
            assert_eq!(slab.len(), model.len());
            assert_eq!(slab.contains_key(&key), model.contains_key(&key));
        }
        let mut all: Vec<(String, u32)> = slab.values().map(|e| (e.0.clone(), e.1)).collect();
        all.sort();
        let mut expected: Vec<(String, u32)> = model.into_iter().collect();
        expected.sort();
        assert_eq!(all, expected);
    }

    #[test]
    fn a_reserved_batch_fits_without_growing_and_earlier_entries_stay_found() {
        let mut slab = KeyedSlab::default();
        for i in 0..10 {
            slab.insert(Entry(format!("old{i}"), i));
        }
        slab.remove("old3");
        slab.reserve(1_000);
        let (slots, buckets) = (slab.slots.capacity(), slab.index.capacity());
        assert!(slots >= 1_009 && buckets >= 1_009);
        for i in 0..1_000 {
            slab.insert(Entry(format!("new{i}"), i));
        }
        assert_eq!(slab.slots.capacity(), slots);
        assert_eq!(slab.index.capacity(), buckets);
        assert_eq!(slab.len(), 1_009);
        assert_eq!(slab.get("old9").map(|e| e.1), Some(9));
        assert_eq!(slab.get("new999").map(|e| e.1), Some(999));
        assert!(slab.get("old3").is_none());
    }
}
