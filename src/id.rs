//! Task, runner and slot ids: up to 15 bytes kept inline, a longer one
//! shared.
//!
//! Every held task, runner, report and lane carries its task's id, and every
//! running task its runner's and its slot's. As an `Arc<str>` each id was
//! its own heap block (48 bytes to glibc for a 12-character id, more than
//! half a held task's 80-byte entry) and every copy an atomic increment. Ids are short (NecroCode's are "1", "1.2",
//! "task-0000042"), so one of up to 15 bytes lives in the 16 bytes the
//! `Arc<str>` pointer took, and a copy of it is a copy of those bytes.
//! Runner and slot ids ("runner-0000042", a container's short hash,
//! "slot-3") are alike.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

/// The longest id kept inline.
const INLINE: usize = 15;
/// The last byte: an inline id's length, or `Shared`. An enum, so that the
/// byte's other 239 values are free for `Option<Id>` and the enums holding
/// an id to keep their variant in (as an `Arc`'s non-null pointer allowed).
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
#[rustfmt::skip]
#[allow(dead_code)] // the lengths are made by transmuting, never by name
enum Tag {
    L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12, L13, L14, L15,
    Shared = 0xFF,
}

/// 16 bytes whatever the target: the first 15 hold an inline id's text, or
/// a shared id's `Arc` address and then its length, and the last says which.
#[repr(C)]
pub struct Id {
    head: Head,
    /// Inline: text bytes 8..15. Shared: the length, 7 bytes little-endian.
    rest: [u8; 7],
    tag: Tag,
}

/// A task's id.
pub type TaskId = Id;
/// A runner's id.
pub type RunnerId = Id;
/// A repo slot's id.
pub type SlotId = Id;

#[repr(C)]
#[derive(Clone, Copy)]
union Head {
    /// Inline: text bytes 0..8.
    text: [u8; 8],
    /// Shared: the text's address in an `Arc<str>` this id holds a count of.
    shared: NonNull<u8>,
}

// A shared id owns one strong count of an `Arc<str>`, which is Send + Sync.
unsafe impl Send for Id {}
unsafe impl Sync for Id {}

impl Id {
    pub fn new(text: &str) -> Id {
        if text.len() <= INLINE {
            Self::inline(text)
        } else {
            Self::shared(Arc::from(text))
        }
    }

    fn inline(text: &str) -> Id {
        let mut bytes = [0u8; 16];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        bytes[15] = text.len() as u8;
        // SAFETY: `Id` is 16 bytes of plain data when inline (the union
        // read as bytes), and a length of at most 15 is a valid `Tag`.
        unsafe { std::mem::transmute::<[u8; 16], Id>(bytes) }
    }

    fn shared(text: Arc<str>) -> Id {
        let len = text.len() as u64;
        // A length fits 7 bytes: nothing holds 2^56 bytes.
        debug_assert!(len < 1 << 56);
        let mut rest = [0u8; 7];
        rest.copy_from_slice(&len.to_le_bytes()[..7]);
        let address = Arc::into_raw(text) as *const u8 as *mut u8;
        // Zeroed first, so that a 4-byte pointer leaves no byte unset.
        let mut head = Head { text: [0; 8] };
        // SAFETY: an `Arc`'s data pointer is never null.
        head.shared = unsafe { NonNull::new_unchecked(address) };
        Id {
            head,
            rest,
            tag: Tag::Shared,
        }
    }

    #[inline]
    fn is_inline(&self) -> bool {
        self.tag != Tag::Shared
    }

    #[inline]
    fn shared_len(&self) -> usize {
        // The second word without its top byte (the tag).
        (self.words()[1] & ((1 << 56) - 1)) as usize
    }

    /// The `Arc<str>` a shared id holds a count of, as its raw pointer.
    fn shared_raw(&self) -> *const str {
        // SAFETY: only called on a shared id, whose head is the pointer.
        let address = unsafe { self.head.shared }.as_ptr() as *const u8;
        std::ptr::slice_from_raw_parts(address, self.shared_len()) as *const str
    }

    #[inline]
    pub fn as_str(&self) -> &str {
        let (address, len) = if self.is_inline() {
            (self as *const Id as *const u8, self.tag as u8 as usize)
        } else {
            // SAFETY: a shared id's head is the pointer.
            (
                unsafe { self.head.shared }.as_ptr() as *const u8,
                self.shared_len(),
            )
        };
        // SAFETY: an inline id's first `tag` bytes are the UTF-8 text it was
        // made from; a shared id holds a count of the `Arc<str>` at
        // `address`. Either lives as long as `self`.
        unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(address, len)) }
    }

    /// The id's 16 bytes as two little-endian words: equal words mean equal
    /// ids (the same inline text, or the same shared text while both ids
    /// live), and the second word's top byte is the tag.
    #[inline]
    pub fn words(&self) -> [u64; 2] {
        // SAFETY: all 16 bytes are initialised in both forms (`shared`
        // zeroes the head before a pointer narrower than 8 bytes goes in).
        let bytes = unsafe { std::ptr::read(self as *const Id as *const [u8; 16]) };
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(w)
        };
        [word(0), word(8)]
    }
}

impl Clone for Id {
    #[inline]
    fn clone(&self) -> Id {
        if !self.is_inline() {
            // SAFETY: the id holds a count of this `Arc`; the copy takes one.
            unsafe { Arc::increment_strong_count(self.shared_raw()) };
        }
        // SAFETY: a bitwise copy, now owning its own count if shared.
        unsafe { std::ptr::read(self) }
    }
}

impl Drop for Id {
    #[inline]
    fn drop(&mut self) {
        if !self.is_inline() {
            // SAFETY: the id's own count, given back once.
            unsafe { drop(Arc::from_raw(self.shared_raw())) };
        }
    }
}

impl Deref for Id {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Id {
    #[inline]
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Id {
    fn from(text: &str) -> Id {
        Id::new(text)
    }
}

impl From<String> for Id {
    fn from(text: String) -> Id {
        Id::new(&text)
    }
}

impl From<Arc<str>> for Id {
    /// Shares a long text's `Arc` instead of copying it.
    fn from(text: Arc<str>) -> Id {
        if text.len() <= INLINE {
            Id::inline(&text)
        } else {
            Id::shared(text)
        }
    }
}

impl PartialEq for Id {
    #[inline]
    fn eq(&self, other: &Id) -> bool {
        // Equal words are equal ids; inline ids are equal only then.
        self.words() == other.words()
            || (!self.is_inline() && !other.is_inline() && self.as_str() == other.as_str())
    }
}

impl Eq for Id {}

impl PartialEq<str> for Id {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Id {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Hash for Id {
    /// As its text, so that maps keyed by ids can be asked with a `&str`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl Ord for Id {
    fn cmp(&self, other: &Id) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for Id {
    fn partial_cmp(&self, other: &Id) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Id>(), 16);
        assert_eq!(std::mem::size_of::<Option<Id>>(), 16);
    }

    #[test]
    fn every_length_reads_back_its_text() {
        let text: String = ('a'..='z').chain('A'..='Z').collect();
        for n in 0..=text.len() {
            let id = Id::new(&text[..n]);
            assert_eq!(id.as_str(), &text[..n]);
            assert_eq!(id.is_inline(), n <= INLINE, "length {n}");
            let copy = id.clone();
            drop(id);
            assert_eq!(&*copy, &text[..n]);
        }
        let multibyte = "tâche-été-🚀-x"; // 19 bytes, inline limit in bytes
        assert_eq!(Id::new(multibyte).as_str(), multibyte);
        assert_eq!(Id::new("été").as_str(), "été");
    }

    #[test]
    fn a_long_id_shares_one_text_and_gives_its_counts_back() {
        let text: Arc<str> = Arc::from("a-task-id-longer-than-fifteen");
        let id = Id::from(Arc::clone(&text));
        assert_eq!(Arc::strong_count(&text), 2);
        let copies: Vec<Id> = (0..5).map(|_| id.clone()).collect();
        assert_eq!(Arc::strong_count(&text), 7);
        assert!(copies.iter().all(|c| c.as_str().as_ptr() == text.as_ptr()));
        drop(copies);
        drop(id);
        assert_eq!(Arc::strong_count(&text), 1);
        // A short text's `Arc` is copied inline and given back at once.
        let short: Arc<str> = Arc::from("t1");
        let id = Id::from(Arc::clone(&short));
        assert_eq!(Arc::strong_count(&short), 1);
        assert_eq!(id, Id::new("t1"));
    }

    #[test]
    fn equality_order_and_hash_follow_the_text() {
        use std::collections::hash_map::DefaultHasher;
        let hash = |x: &dyn Fn(&mut DefaultHasher)| {
            let mut h = DefaultHasher::new();
            x(&mut h);
            h.finish()
        };
        let names = [
            "",
            "a",
            "b",
            "ab",
            "task-000000001",
            "task-0000000001",
            "task-00000000001",
            "zz-long-id-000000000",
        ];
        for a in names {
            for b in names {
                let (x, y) = (Id::new(a), Id::new(b));
                assert_eq!(x == y, a == b, "{a:?} == {b:?}");
                assert_eq!(x.cmp(&y), a.cmp(b), "{a:?} cmp {b:?}");
                assert_eq!(x.words() == y.words(), a == b && a.len() <= INLINE);
            }
            // Two separately made long ids are equal by text.
            assert_eq!(Id::new(a), Id::new(a));
            assert_eq!(hash(&|h| Id::new(a).hash(h)), hash(&|h| a.hash(h)));
            assert!(Id::new(a) == *a);
        }
    }

    #[test]
    fn a_map_keyed_by_ids_is_asked_with_text() {
        let mut map = std::collections::HashMap::new();
        map.insert(Id::new("short"), 1);
        map.insert(Id::new("a-rather-longer-task-id"), 2);
        assert_eq!(map.get("short"), Some(&1));
        assert_eq!(map.get("a-rather-longer-task-id"), Some(&2));
        assert_eq!(map.get("other"), None);
    }

    #[test]
    fn copies_made_and_dropped_on_many_threads_give_every_count_back() {
        let text: Arc<str> = Arc::from("a-task-id-longer-than-fifteen");
        let id = Id::from(Arc::clone(&text));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let copies: Vec<Id> = (0..1000).map(|_| id.clone()).collect();
                    copies.iter().all(|c| *c == id)
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap());
        }
        assert_eq!(Arc::strong_count(&text), 2);
        drop(id);
        assert_eq!(Arc::strong_count(&text), 1);
    }
}
