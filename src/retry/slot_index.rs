//! The retry book's index from task ids to record slots: an open-addressing
//! table of (32-bit hash, slot) pairs, probed linearly.
//!
//! A Swiss table (hashbrown) keeps its control bytes and its buckets in two
//! places, so a lookup in a table larger than the cache waits for two
//! misses before it reaches the record; here a probe sequence is a few
//! neighbouring 8-byte entries, almost always one cache line (SPEC §6,
//! `should_retry` at 10^5 records and up). The stored hash rebuilds the
//! table when it grows without reading any id, and settles most mismatches
//! without comparing ids. The caller compares ids: the index knows slots.

use crate::huge_pages;

/// A slot number, as the book numbers its records (`u32::MAX` is never one).
pub type Slot = u32;

const EMPTY: Slot = Slot::MAX;

#[derive(Clone, Copy, Debug)]
struct Entry {
    hash: u32,
    slot: Slot,
}

const VACANT: Entry = Entry {
    hash: 0,
    slot: EMPTY,
};

/// Where [`SlotIndex::entry`] would file a key it did not find.
#[derive(Debug)]
pub struct Vacant(Option<usize>);

#[derive(Debug)]
pub struct SlotIndex {
    /// A power of two long (or empty); at most `max_eighths` eighths full.
    entries: Vec<Entry>,
    len: usize,
    max_eighths: usize,
}

impl Default for SlotIndex {
    /// At most seven eighths full, as a Swiss table: the same memory for its
    /// entries, and no control bytes. For tables mostly asked for keys they
    /// hold (a probe that finds its key walks about 4.5 entries at 7/8).
    fn default() -> Self {
        SlotIndex {
            entries: Vec::new(),
            len: 0,
            max_eighths: 7,
        }
    }
}

impl SlotIndex {
    /// At most half full: for tables mostly asked for keys they do not hold.
    /// A probe that misses walks about (1 + 1/(1-load)^2)/2 entries: 2.5 at
    /// 1/2, 32 at 7/8.
    pub fn sparse() -> Self {
        SlotIndex {
            max_eighths: 4,
            ..SlotIndex::default()
        }
    }

    fn has_room_for_one_more(&self) -> bool {
        (self.len + 1) * 8 <= self.entries.len() * self.max_eighths
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    /// Where `hash` starts probing.
    fn home(&self, hash: u32) -> usize {
        hash as usize & self.mask()
    }

    /// The position of the entry for `hash` whose slot `is_key` accepts, or
    /// else of the empty entry that ended the probe (None: no entries).
    fn probe(
        &self,
        hash: u32,
        mut is_key: impl FnMut(Slot) -> bool,
    ) -> Result<usize, Option<usize>> {
        if self.entries.is_empty() {
            return Err(None);
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            // Never endless: the table always keeps an eighth or more empty.
            let e = self.entries[i];
            if e.slot == EMPTY {
                return Err(Some(i));
            }
            if e.hash == hash && is_key(e.slot) {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Starts fetching where `hash` is filed, for a [`SlotIndex::find`] of
    /// it after some other work: in a table larger than the cache, that
    /// entry is a miss to main memory.
    pub fn prefetch(&self, hash: u32) {
        if self.entries.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the address is that of an entry; a prefetch reads nothing
        // the program sees and cannot fault.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(self.entries.as_ptr().add(self.home(hash)).cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = hash;
    }

    /// The slot filed under `hash` that `is_key` accepts.
    pub fn find(&self, hash: u32, is_key: impl FnMut(Slot) -> bool) -> Option<Slot> {
        self.probe(hash, is_key).ok().map(|i| self.entries[i].slot)
    }

    /// The slot filed under `hash` that `is_key` accepts, or where the key
    /// would go, for [`SlotIndex::insert_vacant`]: one probe for a lookup
    /// that may insert.
    pub fn entry(&self, hash: u32, is_key: impl FnMut(Slot) -> bool) -> Result<Slot, Vacant> {
        self.probe(hash, is_key)
            .map(|i| self.entries[i].slot)
            .map_err(Vacant)
    }

    /// Files `slot` under `hash`; the caller knows its key is not filed yet.
    pub fn insert(&mut self, hash: u32, slot: Slot) {
        self.insert_vacant(Vacant(None), hash, slot);
    }

    /// Files `slot` under `hash` where [`SlotIndex::entry`] found room (the
    /// index unchanged since).
    pub fn insert_vacant(&mut self, vacant: Vacant, hash: u32, slot: Slot) {
        debug_assert_ne!(slot, EMPTY);
        let entry = Entry { hash, slot };
        match vacant.0 {
            Some(i) if self.has_room_for_one_more() => self.entries[i] = entry,
            _ => {
                if !self.has_room_for_one_more() {
                    self.grow();
                }
                self.place(entry);
            }
        }
        self.len += 1;
    }

    fn place(&mut self, entry: Entry) {
        let mask = self.mask();
        let mut i = self.home(entry.hash);
        while self.entries[i].slot != EMPTY {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry;
    }

    fn grow(&mut self) {
        let capacity = (self.entries.len() * 2).max(16);
        let old = std::mem::replace(&mut self.entries, huge_pages::vec_filled(VACANT, capacity));
        for entry in old.into_iter().filter(|e| e.slot != EMPTY) {
            self.place(entry);
        }
    }

    /// Takes out the slot filed under `hash` that `is_key` accepts.
    pub fn remove(&mut self, hash: u32, is_key: impl FnMut(Slot) -> bool) -> Option<Slot> {
        let found = self.probe(hash, is_key).ok()?;
        let slot = self.entries[found].slot;
        // Backward-shift deletion: entries after the hole that may sit in it
        // (their home is not between the hole and them) move back, so every
        // probe still meets its entry before an empty one; no tombstones.
        let mask = self.mask();
        let mut hole = found;
        let mut j = (found + 1) & mask;
        loop {
            let e = self.entries[j];
            if e.slot == EMPTY {
                break;
            }
            let from_home = j.wrapping_sub(self.home(e.hash)) & mask;
            let from_hole = j.wrapping_sub(hole) & mask;
            if from_home >= from_hole {
                self.entries[hole] = e;
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.entries[hole] = VACANT;
        self.len -= 1;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tiny generator, so the test needs no dependency.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }
    }

    #[test]
    fn random_inserts_and_removes_agree_with_a_hash_map() {
        // Few distinct hashes: long probe runs, wrapping at the end, and
        // entries sharing a hash that only the key check tells apart.
        for (hash_bits, sparse) in [(3, false), (8, false), (32, false), (8, true), (32, true)] {
            let mut rng = Lcg(hash_bits);
            let mut index = if sparse {
                SlotIndex::sparse()
            } else {
                SlotIndex::default()
            };
            let mut model: HashMap<u64, Slot> = HashMap::new(); // key -> slot
            let hash_of = |key: u64| {
                (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32 >> (32 - hash_bits)
            };
            let mut key_of_slot: HashMap<Slot, u64> = HashMap::new();
            let mut next_slot = 0;
            for _ in 0..20_000 {
                let key = rng.next() % 600;
                let hash = hash_of(key);
                let is_key = |slot: Slot| key_of_slot[&slot] == key;
                if rng.next() % 3 == 0 {
                    let removed = index.remove(hash, is_key);
                    assert_eq!(removed, model.remove(&key));
                    if let Some(slot) = removed {
                        key_of_slot.remove(&slot);
                    }
                } else if let Err(vacant) = index.entry(hash, is_key) {
                    assert!(!model.contains_key(&key));
                    if key % 2 == 0 {
                        index.insert_vacant(vacant, hash, next_slot);
                    } else {
                        index.insert(hash, next_slot);
                    }
                    model.insert(key, next_slot);
                    key_of_slot.insert(next_slot, key);
                    next_slot += 1;
                }
                assert_eq!(index.len(), model.len());
                let eighths = if sparse { 4 } else { 7 };
                assert!(index.len() * 8 <= index.entries.len() * eighths);
            }
            for key in 0..600 {
                let found = index.find(hash_of(key), |slot| key_of_slot[&slot] == key);
                assert_eq!(found, model.get(&key).copied(), "key {key}");
            }
        }
    }

    #[test]
    fn an_empty_index_finds_and_removes_nothing() {
        let mut index = SlotIndex::default();
        assert_eq!(index.find(7, |_| true), None);
        assert_eq!(index.remove(7, |_| true), None);
        index.insert(7, 0);
        assert_eq!(index.find(7, |_| false), None);
        assert_eq!(index.find(7, |s| s == 0), Some(0));
        assert_eq!(index.remove(7, |s| s == 0), Some(0));
        assert_eq!(index.find(7, |_| true), None);
        assert_eq!(index.len(), 0);
    }
}
