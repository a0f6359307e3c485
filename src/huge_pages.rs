//! Tables probed at random that reach several MiB ask the kernel for 2 MiB
//! pages: at 10^6 records the retry book's index is 16 MiB, and with 4 KiB
//! pages nearly every lookup also misses the TLB (SPEC §6, `should_retry`).
//! Linux backs such a range with huge pages when it is advised to, as
//! `transparent_hugepage=madvise` (the common default) asks; elsewhere, or
//! when the kernel declines, the memory is the same, in ordinary pages.

/// Huge pages are asked for only for tables at least this large: smaller
/// ones stay in the cache, or would round up to a huge page they don't fill.
const MIN_ADVISED_BYTES: usize = 4 << 20;

/// `vec![value; len]`, its memory advised for huge pages before it is first
/// written (a page is backed when first touched).
pub fn vec_filled<T: Copy>(value: T, len: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    let bytes = len * std::mem::size_of::<T>();
    if bytes >= MIN_ADVISED_BYTES {
        advise_huge_pages(v.as_mut_ptr().cast(), bytes);
    }
    v.resize(len, value);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(start: *mut u8, bytes: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    // Only the whole huge pages inside the allocation: advice applies to
    // whole pages, and the allocation's edges may share them with others.
    let begin = (start as usize).next_multiple_of(HUGE_PAGE);
    let end = (start as usize + bytes) & !(HUGE_PAGE - 1);
    if end > begin {
        // SAFETY: the range lies within an allocation we own. The advice
        // changes how it is backed, never its contents; a kernel without
        // transparent huge pages refuses it, and the table works as before.
        unsafe {
            libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: *mut u8, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_vec_holds_its_values_small_and_advised() {
        for len in [0, 1, 1000, MIN_ADVISED_BYTES / 8 + 3] {
            let v = vec_filled(u64::MAX - 1, len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == u64::MAX - 1));
        }
    }
}
