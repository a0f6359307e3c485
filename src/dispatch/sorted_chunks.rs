//! An ordered set kept as a run of sorted chunks: the ready queue's tasks in
//! scheduling order.
//!
//! The order is the value's own (`Ord`) or one the caller gives with each
//! change (`insert_by`, `remove_by`): the ready queue holds bare slot numbers
//! and reads each task's rank from its entry, so a queued task costs 4 bytes
//! here, not the 32 of a `(rank, slot)` pair.
//!
//! A `BTreeSet` filled in ascending order (tasks mostly arrive in queue
//! order) splits each full leaf in half and never fills it again: about
//! twice its entries' size. Here a value past the last is appended to the
//! last chunk, and a new chunk is started only when that one is full, so a
//! queue filled in order is dense. A value in the middle goes into its
//! chunk in place, splitting it in half when full. Every chunk
//! but the first and the last keeps at least a quarter of `CHUNK` (a removal
//! that leaves fewer merges or rebalances with a neighbour), so memory stays
//! within four times the dense size whatever the order of changes.
//!
//! Costs: finding a value's chunk is a binary search over the chunks' last
//! values; inside a chunk, a binary search and a move of at most `CHUNK`
//! entries. The first value is one step away. A split or a merge also moves
//! the chunks' headers after it (O(n / CHUNK)); it comes once per `CHUNK / 2`
//! values put in the middle or `LOW` taken out at most, and never for a queue
//! filled in order.

use std::cmp::Ordering;
use std::collections::VecDeque;

/// Entries per chunk at most.
const CHUNK: usize = 128;
/// Entries below which a chunk that is neither first nor last is merged.
const LOW: usize = CHUNK / 4;

#[derive(Debug)]
pub struct SortedChunks<T> {
    /// Sorted, non-empty, each chunk's values below the next chunk's.
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Default for SortedChunks<T> {
    fn default() -> Self {
        SortedChunks {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

fn chunk<T>() -> VecDeque<T> {
    VecDeque::with_capacity(CHUNK)
}

impl<T> SortedChunks<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where a value goes: its chunk (`chunks.len()` when it is past every
    /// value) and, inside it, `Ok` with the position of an equal value or
    /// `Err` with where to put it. `cmp` compares a value held to it.
    fn locate(&self, cmp: impl Fn(&T) -> Ordering) -> (usize, Result<usize, usize>) {
        let i = self
            .chunks
            .partition_point(|c| c.back().is_some_and(|last| cmp(last) == Ordering::Less));
        match self.chunks.get(i) {
            Some(c) => (i, c.binary_search_by(&cmp)),
            None => (i, Err(0)),
        }
    }

    /// Adds `value`; false (and no change) when it is already there.
    pub fn insert(&mut self, value: T) -> bool
    where
        T: Ord,
    {
        self.insert_by(value, T::cmp)
    }

    /// Adds `value` in the order `cmp(held, value)` gives; false (and no
    /// change) when a value comparing equal is there.
    pub fn insert_by(&mut self, value: T, cmp: impl Fn(&T, &T) -> Ordering) -> bool {
        let place = self.locate(|held| cmp(held, &value));
        self.put(place, value)
    }

    fn put(&mut self, (i, at): (usize, Result<usize, usize>), value: T) -> bool {
        if i == self.chunks.len() {
            // Past every value: the common case, an append.
            match self.chunks.back_mut() {
                Some(last) if last.len() < CHUNK => last.push_back(value),
                _ => {
                    // Grown by doubling up to CHUNK (exactly: 4, 8, ... 128),
                    // so a set of a few values (one spec's, under fair share)
                    // stays small.
                    let mut fresh = VecDeque::new();
                    fresh.push_back(value);
                    self.chunks.push_back(fresh);
                }
            }
            self.len += 1;
            return true;
        }
        let Err(at) = at else {
            return false;
        };
        if self.chunks[i].len() == CHUNK {
            let mut upper = chunk();
            upper.extend(self.chunks[i].drain(CHUNK / 2..));
            if at <= CHUNK / 2 {
                self.chunks[i].insert(at, value);
            } else {
                upper.insert(at - CHUNK / 2, value);
            }
            self.chunks.insert(i + 1, upper);
        } else {
            self.chunks[i].insert(at, value);
        }
        self.len += 1;
        true
    }

    /// Removes `value`; false when it is not there.
    pub fn remove(&mut self, value: &T) -> bool
    where
        T: Ord,
    {
        self.remove_by(|held| held.cmp(value)).is_some()
    }

    /// Removes and returns the value `cmp` finds equal; `None` when there is
    /// none.
    pub fn remove_by(&mut self, cmp: impl Fn(&T) -> Ordering) -> Option<T> {
        let (i, Ok(at)) = self.locate(cmp) else {
            return None;
        };
        let value = self.chunks[i].remove(at);
        self.len -= usize::from(value.is_some());
        self.settle(i);
        value
    }

    /// Keeps chunk `i` within the bounds after a removal: gone when empty,
    /// merged or rebalanced with a neighbour when below `LOW` (unless it is
    /// the first or the last, which may be small).
    fn settle(&mut self, i: usize) {
        let n = self.chunks[i].len();
        if n == 0 {
            self.chunks.remove(i);
            return;
        }
        if n >= LOW || i == 0 || i + 1 == self.chunks.len() {
            return;
        }
        // A middle chunk has both neighbours: join it to the next one.
        let next = self.chunks.remove(i + 1).unwrap_or_default();
        if n + next.len() <= CHUNK {
            self.chunks[i].extend(next);
        } else {
            // Too many for one: the two share them evenly (each > LOW).
            let mut all: Vec<T> = self.chunks[i].drain(..).chain(next).collect();
            let mut upper = chunk();
            upper.extend(all.drain(all.len() / 2..));
            self.chunks[i].extend(all);
            self.chunks.insert(i + 1, upper);
        }
    }

    pub fn first(&self) -> Option<&T> {
        self.chunks.front()?.front()
    }

    pub fn pop_first(&mut self) -> Option<T> {
        let front = self.chunks.front_mut()?;
        let value = front.pop_front();
        if front.is_empty() {
            self.chunks.pop_front();
        }
        self.len -= usize::from(value.is_some());
        value
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    /// Checks the layout: sorted, no empty chunk, no chunk over `CHUNK`,
    /// every middle chunk at least `LOW`, the count right.
    #[cfg(test)]
    fn check(&self)
    where
        T: Ord,
    {
        let mut previous: Option<&T> = None;
        for (i, c) in self.chunks.iter().enumerate() {
            assert!(!c.is_empty() && c.len() <= CHUNK, "chunk {i}: {}", c.len());
            if i > 0 && i + 1 < self.chunks.len() {
                assert!(c.len() >= LOW, "middle chunk {i} holds {}", c.len());
            }
            for v in c {
                assert!(previous.is_none_or(|p| p < v), "out of order");
                previous = Some(v);
            }
        }
        assert_eq!(self.iter().count(), self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A small deterministic generator (xorshift), so failures repeat.
    struct Steps(u64);

    impl Steps {
        fn next(&mut self, below: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % below
        }
    }

    #[test]
    fn behaves_like_a_btree_set_under_random_operations() {
        for seed in 1..=60u64 {
            let mut steps = Steps(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut set = SortedChunks::default();
            let mut model = BTreeSet::new();
            // Mostly ascending keys with some in the middle, as a queue sees.
            let mut next_key = 0u64;
            let range = [50u64, 1_000, 100_000][seed as usize % 3];
            for step in 0..3_000 {
                if step % 100 == 0 {
                    set.check();
                }
                match steps.next(10) {
                    0..=3 => {
                        next_key += 1 + steps.next(3);
                        assert_eq!(set.insert(next_key), model.insert(next_key));
                    }
                    4..=5 => {
                        let k = steps.next(range.max(next_key + 1));
                        assert_eq!(set.insert(k), model.insert(k));
                    }
                    6..=7 => {
                        let k = steps.next(range.max(next_key + 1));
                        assert_eq!(set.remove(&k), model.remove(&k));
                    }
                    8 => assert_eq!(set.pop_first(), model.pop_first()),
                    _ => {
                        // Remove a present value, so that chunks thin out.
                        if let Some(&k) = model
                            .iter()
                            .nth(steps.next(model.len() as u64 + 1) as usize)
                        {
                            assert!(set.remove(&k));
                            model.remove(&k);
                        }
                    }
                }
                assert_eq!(set.first(), model.first());
                assert_eq!(set.len(), model.len());
            }
            set.check();
            assert!(set.iter().eq(model.iter()));
        }
    }

    #[test]
    fn a_small_set_takes_little() {
        let mut set = SortedChunks::default();
        set.insert(1u64);
        assert!(set.chunks[0].capacity() <= 4);
    }

    #[test]
    fn values_filled_in_order_fill_their_chunks() {
        let mut set = SortedChunks::default();
        for k in 0..10 * CHUNK as u64 {
            assert!(set.insert(k));
        }
        assert_eq!(set.chunks.len(), 10);
        assert!(set
            .chunks
            .iter()
            .all(|c| c.len() == CHUNK && c.capacity() == CHUNK));
        assert!(!set.insert(5));
        set.check();
    }

    #[test]
    fn thinning_the_middle_merges_chunks() {
        let mut set = SortedChunks::default();
        for k in 0..20 * CHUNK as u64 {
            set.insert(k);
        }
        // Remove all but every 16th value: middle chunks fall below LOW.
        for k in 0..20 * CHUNK as u64 {
            if k % 16 != 0 {
                assert!(set.remove(&k));
            }
            if k % 97 == 0 {
                set.check();
            }
        }
        set.check();
        assert_eq!(set.len(), 20 * CHUNK / 16);
        // Middle chunks hold LOW or more: the thinned set is not left spread
        // over its 20 chunks.
        assert!(
            set.chunks.len() <= 2 + set.len() / LOW,
            "{} chunks",
            set.chunks.len()
        );
        while set.pop_first().is_some() {}
        assert!(set.is_empty() && set.chunks.is_empty());
    }
}
