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
        // The length first, so that words overlapping (below) or padded with
        // zeros cannot make two different strings feed the same words.
        self.add(bytes.len() as u64);
        let n = bytes.len();
        if n >= 8 {
            let mut chunks = bytes.chunks_exact(8);
            for chunk in &mut chunks {
                self.add(word(chunk));
            }
            if !chunks.remainder().is_empty() {
                // The last 8 bytes, overlapping the previous word: plain
                // loads instead of copying the tail into a buffer.
                self.add(word(&bytes[n - 8..]));
            }
        } else if n >= 4 {
            let low = u64::from(half_word(&bytes[..4]));
            let high = u64::from(half_word(&bytes[n - 4..]));
            self.add(low | high << 32);
        } else if n > 0 {
            let b = |i: usize| u64::from(bytes[i]);
            self.add(b(0) | b(n / 2) << 8 | b(n - 1) << 16);
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

    /// A final mix (MurmurHash3's fmix64): the multiply leaves the low
    /// bits, which pick the bucket, depending only on the low bytes of each
    /// word; ids that differ in their last characters would all collide
    /// without it.
    #[inline]
    fn finish(&self) -> u64 {
        let mut h = self.hash;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// Eight bytes as a little-endian word.
#[inline]
fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes"))
}

#[inline]
fn half_word(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("four bytes"))
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// 32 bits of an id's hash, as the slot indexes keep them.
#[inline]
pub fn short_hash(id: &str) -> u32 {
    use std::hash::BuildHasher;
    (BuildHasherDefault::<FxHasher>::default().hash_one(id) >> 32) as u32
}

/// Whether two byte strings are equal, comparing ids of up to 16 bytes by
/// overlapping word loads inline: the C library's `memcmp` behind `==` costs a
/// call and its size dispatch on every lookup that finds its key.
#[inline]
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a == b,
        4..=7 => half_word(a) == half_word(b) && half_word(&a[n - 4..]) == half_word(&b[n - 4..]),
        8..=16 => word(a) == word(b) && word(&a[n - 8..]) == word(&b[n - 8..]),
        _ => a == b,
    }
}

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
        // Every length, short ones included, tells strings apart that
        // differ in any one byte.
        for len in 1..=24 {
            let base = vec![b'x'; len];
            let mut seen = std::collections::HashSet::new();
            assert!(seen.insert(hash(std::str::from_utf8(&base).unwrap())));
            for i in 0..len {
                let mut other = base.clone();
                other[i] = b'y';
                let other = String::from_utf8(other).unwrap();
                assert!(seen.insert(hash(&other)), "length {len}, byte {i}");
            }
        }
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
    fn bytes_eq_agrees_with_slice_equality_at_every_length_and_position() {
        for len in 0..=24 {
            let base: Vec<u8> = (0..len as u8).map(|i| b'a' + i % 26).collect();
            assert!(bytes_eq(&base, &base.clone()), "length {len}");
            for i in 0..len {
                let mut other = base.clone();
                other[i] ^= 0x20;
                assert!(!bytes_eq(&base, &other), "length {len}, byte {i}");
            }
            let mut longer = base.clone();
            longer.push(b'z');
            assert!(!bytes_eq(&base, &longer) && !bytes_eq(&longer, &base));
        }
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
