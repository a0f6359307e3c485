//! A fast hasher for the maps keyed by task and runner ids.
//!
//! The standard SipHash resists collision attacks from untrusted keys; ids
//! here come from the caller's own task system, and every lookup sits on a
//! hot path (SPEC §6), so we use the multiply-rotate hash of rustc's FxHasher:
//! a few cycles per 8 bytes instead of tens of nanoseconds per key.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

#[derive(Clone, Copy, Default)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // The length first, so that zero padding of the last word cannot
        // make "a" and "a\0" collide.
        self.add(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    /// A final mix: the multiply leaves the low bits, which pick the
    /// bucket, depending only on the low bytes of each word; ids that differ
    /// in their last characters would all collide without it.
    #[inline]
    fn finish(&self) -> u64 {
        let h = self.hash ^ (self.hash >> 32);
        h.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (h >> 29)
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash(s: &str) -> u64 {
        BuildHasherDefault::<FxHasher>::default().hash_one(s)
    }

    #[test]
    fn equal_keys_hash_equal_and_nearby_keys_differ() {
        assert_eq!(hash("task-0000001"), hash(&String::from("task-0000001")));
        let hashes: std::collections::HashSet<u64> =
            (0..10_000).map(|i| hash(&format!("task-{i:07}"))).collect();
        assert_eq!(hashes.len(), 10_000);
        // Length is part of a str's hash: "a" and "a\0" differ.
        assert_ne!(hash("a"), hash("a\0"));
    }

    #[test]
    fn ids_differing_in_their_last_characters_spread_over_buckets() {
        // The low bits pick a bucket: they must vary too.
        let low: std::collections::HashSet<u64> = (0..4096)
            .map(|i| hash(&format!("r-task-{i:07}")) & 0xfff)
            .collect();
        assert!(low.len() > 2048, "only {} of 4096 buckets used", low.len());
    }

    #[test]
    fn a_map_works_as_a_map() {
        let mut m: FastMap<String, u32> = FastMap::default();
        for i in 0..1000 {
            m.insert(i.to_string(), i);
        }
        assert!((0..1000).all(|i| m[&i.to_string()] == i));
        let mut h = FxHasher::default();
        1u8.hash(&mut h);
        assert_ne!(h.finish(), FxHasher::default().finish());
    }
}
