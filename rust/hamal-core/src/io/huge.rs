//! Large buffers of private anonymous memory that the kernel may back with 2 MiB pages.
//!
//! Every page a process touches for the first time costs a fault, and on the VMs measured
//! (free pages handed back to the host) about 0.5 ms per MiB: a sync that read into or encoded
//! into fresh 4 MiB buffers spent a third of its CPU in `clear_page`. A buffer here starts on a
//! 2 MiB boundary and asks for huge pages (one fault per 2 MiB, ~4x cheaper there); callers
//! keep such buffers and reuse them instead of allocating one per chunk.

use std::ops::{Deref, DerefMut};

const HUGE: usize = 2 << 20;

/// The least room a reused object buffer gets: a 4 MiB chunk's object with its header, in
/// whole 4 KiB blocks. Pages are touched only as they are filled, and spares then fit the next
/// objects.
pub const OBJECT_ROOM: usize = (4 << 20) + 4096;

pub struct HugeBuf {
    map: *mut u8,
    map_len: usize,
    /// Where the buffer starts in the mapping (a 2 MiB boundary when it is that large).
    start: usize,
    capacity: usize,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value alone.
unsafe impl Send for HugeBuf {}
// SAFETY: shared references only read it.
unsafe impl Sync for HugeBuf {}

impl HugeBuf {
    /// `len` zero bytes; their pages are allocated when first written.
    pub fn zeroed(len: usize) -> HugeBuf {
        let pad = if len >= HUGE { HUGE } else { 0 };
        let map_len = (len + pad).max(1);
        // SAFETY: a new private anonymous mapping; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(std::alloc::Layout::array::<u8>(map_len).unwrap());
        }
        let map = map.cast::<u8>();
        let start = map.align_offset(HUGE).min(pad);
        if pad > 0 {
            // SAFETY: advice on whole huge pages inside our own mapping; it changes no data.
            unsafe {
                libc::madvise(
                    map.add(start).cast(),
                    len / HUGE * HUGE,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
        HugeBuf {
            map,
            map_len,
            start,
            capacity: len,
            len,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length, up to the capacity; the bytes keep what they held.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "HugeBuf::set_len beyond the capacity");
        self.len = len;
    }
}

impl Deref for HugeBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `start + len` lies inside the mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.add(self.start), self.len) }
    }
}

impl DerefMut for HugeBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.map.add(self.start), self.len) }
    }
}

impl AsRef<[u8]> for HugeBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping this value created; no slice of it outlives `self`.
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
    }
}

/// Makes the C allocator give every large block (128 KiB and up) back to the system when it
/// is freed. By default glibc raises that threshold to the largest block freed so far, so
/// after the first chunk-sized free (an object fetched, a compression context) such blocks
/// stay in its per-thread arenas: a job of 8 disks held 20-70 MiB beyond its memory budget
/// there, varying from run to run. Chunk buffers that are used again are `HugeBuf`s, which
/// this does not touch. Called once when the Python module loads; the setting is the
/// process's.
pub fn return_large_frees() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; 128 KiB is glibc's own default value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_resizable() {
        for len in [1, 4096, 3 << 20, 4 << 20] {
            let mut b = HugeBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len >= HUGE {
                assert_eq!(b.as_ptr() as usize % HUGE, 0);
            }
            b[len - 1] = 7;
            b.set_len(len / 2);
            assert_eq!(b.len(), len / 2);
            b.set_len(len);
            assert_eq!(b[len - 1], 7);
        }
    }

    #[test]
    #[should_panic(expected = "beyond the capacity")]
    fn set_len_past_capacity_panics() {
        HugeBuf::zeroed(4096).set_len(4097);
    }
}
