//! An allocator that asks Linux for transparent huge pages, for the publish index's two big arrays.
//!
//! Publishes read the index at random places. With a million registrations it spans about 85 MiB, far more
//! than the CPU's TLB maps in 4 KiB pages, so nearly every lookup paid for page-table walks (dear under
//! virtualisation, where each walk is two). On the usual THP setting, `madvise`, memory gets 2 MiB pages
//! only where a program asks. Measured by bench/run scale at a million registrations, in one run each:
//! publishes/s at window 64 went from 0.77x to 0.87x of a 1,000-registration store's, and p99 latency
//! against that store from 1.21x / 1.36x (windows 1 / 64) to 1.18x / 1.06x.
//!
//! It is advice: where THP is off or unsupported, the kernel refuses it and the memory works as before.

use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};

/// A transparent huge page on x86-64 and on aarch64 with 4 KiB base pages.
const HUGE_PAGE: usize = 2 << 20;

/// Blocks this big get mappings of their own, advised for huge pages; smaller ones come from `Global`.
/// Advice on blocks inside malloc's heap would outlive them: the kernel's khugepaged would later fill the
/// heap's sparse free pages there into whole huge pages, growing RSS for nothing.
const OWN_MAPPING: usize = 2 * HUGE_PAGE;

/// Memory for the index's big arrays: a mapping of its own per big block, advised for huge pages.
#[derive(Clone, Copy, Debug, Default)]
pub struct HugePages;

fn own(layout: Layout) -> bool {
    // Elsewhere than Linux, there is no mremap and no THP advice: everything comes from Global.
    cfg!(target_os = "linux") && layout.size() >= OWN_MAPPING && layout.align() <= 4096
}

// SAFETY: a block is mapped here exactly when `own(layout)`, and the caller hands back the layout it was
// made with, so each block returns to where it came from. Mappings are page-aligned, which meets every
// alignment `own` accepts; fresh mappings are zeroed, as `allocate_zeroed` needs.
unsafe impl Allocator for HugePages {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if own(layout) {
            map(layout.size())
        } else {
            Global.allocate(layout)
        }
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if own(layout) {
            map(layout.size())
        } else {
            Global.allocate_zeroed(layout)
        }
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if own(layout) {
            unmap(ptr, layout.size());
        } else {
            // SAFETY: `ptr` came from Global with `layout`.
            unsafe { Global.deallocate(ptr, layout) }
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { self.resize(ptr, old, new) }
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: the caller's guarantees, passed on.
        let block = unsafe { self.resize(ptr, old, new) }?;
        if !own(old) || !own(new) {
            // A block that changed home was copied, not remapped: zero what is new.
            // SAFETY: `block` holds `new.size()` bytes, of which the first `old.size()` are the old ones.
            unsafe {
                std::ptr::write_bytes(
                    block.cast::<u8>().as_ptr().add(old.size()),
                    0,
                    new.size() - old.size(),
                )
            };
        }
        Ok(block)
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { self.resize(ptr, old, new) }
    }
}

impl HugePages {
    /// Move a block to a new size: by mremap between own mappings (no copy), by Global within the heap,
    /// and by copying when it crosses from one to the other.
    ///
    /// # Safety
    /// As for [`Allocator::grow`] and [`Allocator::shrink`].
    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        match (own(old), own(new)) {
            (true, true) => remap(ptr, old.size(), new.size()),
            // SAFETY: the caller's guarantees are Global's.
            (false, false) if new.size() >= old.size() => unsafe { Global.grow(ptr, old, new) },
            (false, false) => unsafe { Global.shrink(ptr, old, new) },
            _ => {
                let block = self.allocate(new)?;
                // SAFETY: both blocks are live and distinct, each at least this long.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        ptr.as_ptr(),
                        block.cast::<u8>().as_ptr(),
                        old.size().min(new.size()),
                    );
                    self.deallocate(ptr, old);
                }
                Ok(block)
            }
        }
    }
}

#[cfg(target_os = "linux")]
use self::linux::{map, remap, unmap};

#[cfg(not(target_os = "linux"))]
use self::elsewhere::{map, remap, unmap};

/// Mappings of their own, for big blocks.
#[cfg(target_os = "linux")]
mod linux {
    use std::ptr::NonNull;

    use allocator_api2::alloc::AllocError;

    use super::HUGE_PAGE;

    /// A fresh mapping of `len` bytes, advised for huge pages.
    pub fn map(len: usize) -> Result<NonNull<[u8]>, AllocError> {
        let ptr = reserve(len)?;
        advise(ptr, len);
        block(ptr, len)
    }

    /// The mapping at `ptr`, now `new` bytes long: where it is if the address space after it is free,
    /// else moved to a huge-page boundary. Moved between boundaries, the kernel carries whole huge pages
    /// over; moved anywhere else, it splits each into 512 small mappings, and the TLB misses are back until
    /// khugepaged mends them minutes later.
    pub fn remap(ptr: NonNull<u8>, old: usize, new: usize) -> Result<NonNull<[u8]>, AllocError> {
        let old_ptr = ptr.as_ptr().cast::<libc::c_void>();
        // SAFETY: `ptr` is a mapping of `old` bytes made by `map` or `remap`; without MREMAP_MAYMOVE it
        // stays where it is or the call fails.
        let here = unsafe { libc::mremap(old_ptr, old, new, 0) };
        if here != libc::MAP_FAILED {
            advise(here, new);
            return block(here, new);
        }
        let target = reserve(new)?;
        // SAFETY: as above; `target` is address space reserved just now for this, which MREMAP_FIXED
        // replaces, and it does not overlap the old mapping.
        let moved = unsafe {
            libc::mremap(
                old_ptr,
                old,
                new,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target,
            )
        };
        if moved == libc::MAP_FAILED {
            // SAFETY: `target` was reserved above and nothing else uses it.
            unsafe { libc::munmap(target, new) };
            return Err(AllocError);
        }
        advise(moved, new);
        block(moved, new)
    }

    /// Address space for `len` bytes that starts on a huge-page boundary: a mapping one huge page longer,
    /// trimmed at both ends.
    fn reserve(len: usize) -> Result<*mut libc::c_void, AllocError> {
        // SAFETY: sysconf only reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = len.next_multiple_of(page);
        let span = len + HUGE_PAGE;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no existing
        // memory.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(AllocError);
        }
        let head = (raw as usize).next_multiple_of(HUGE_PAGE) - raw as usize;
        let tail = span - head - len;
        // SAFETY: both ends lie inside the mapping just made, page-aligned, and are unused.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap(raw.cast::<u8>().add(head + len).cast(), tail);
            }
            Ok(raw.cast::<u8>().add(head).cast())
        }
    }

    pub fn unmap(ptr: NonNull<u8>, len: usize) {
        // SAFETY: `ptr` is a mapping of `len` bytes made by `map` or `remap`, and no longer used.
        unsafe {
            libc::munmap(ptr.as_ptr().cast(), len);
        }
    }

    fn block(ptr: *mut libc::c_void, len: usize) -> Result<NonNull<[u8]>, AllocError> {
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(ptr, len))
    }

    /// Ask for huge pages on a mapping. A refusal (THP off or not built in) leaves 4 KiB pages, which work.
    fn advise(ptr: *mut libc::c_void, len: usize) {
        // SAFETY: the range is a whole mapping this module made; MADV_HUGEPAGE does not change its contents.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_HUGEPAGE);
        }
    }
}

/// Never called: `own` is false elsewhere than Linux.
#[cfg(not(target_os = "linux"))]
mod elsewhere {
    use std::ptr::NonNull;

    use allocator_api2::alloc::AllocError;

    pub fn map(_: usize) -> Result<NonNull<[u8]>, AllocError> {
        Err(AllocError)
    }

    pub fn remap(_: NonNull<u8>, _: usize, _: usize) -> Result<NonNull<[u8]>, AllocError> {
        Err(AllocError)
    }

    pub fn unmap(_: NonNull<u8>, _: usize) {}
}

/// A `Vec` in huge pages, empty by default.
pub struct HugeVec<T>(allocator_api2::vec::Vec<T, HugePages>);

impl<T> Default for HugeVec<T> {
    fn default() -> HugeVec<T> {
        HugeVec(allocator_api2::vec::Vec::new_in(HugePages))
    }
}

impl<T> std::ops::Deref for HugeVec<T> {
    type Target = allocator_api2::vec::Vec<T, HugePages>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<T> std::ops::DerefMut for HugeVec<T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_blocks_are_advised_and_keep_their_contents() {
        let mut v = HugeVec::<u64>::default();
        for i in 0..(9 * HUGE_PAGE / 8) as u64 {
            v.push(i);
            if v.capacity() * 8 >= OWN_MAPPING {
                // Mapped here, and moved by remap as it grows: always on a huge-page boundary.
                assert_eq!(v.as_ptr() as usize % HUGE_PAGE, 0, "at {i}");
            }
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
        v.truncate(10);
        v.shrink_to_fit();
        assert_eq!(&v[..], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        // Where the kernel has THP at all, it marks an advised mapping `hg` in its VmFlags.
        #[cfg(target_os = "linux")]
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            let mut big: allocator_api2::vec::Vec<u8, HugePages> =
                allocator_api2::vec::Vec::with_capacity_in(8 * HUGE_PAGE, HugePages);
            big.resize(8 * HUGE_PAGE, 1);
            let addr = big.as_ptr() as usize + 4 * HUGE_PAGE;
            let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
            assert!(advised(&smaps, addr), "no `hg` flag on the block");
        }
    }

    /// Whether the mapping holding `addr` carries the `hg` (MADV_HUGEPAGE) flag.
    #[cfg(target_os = "linux")]
    fn advised(smaps: &str, addr: usize) -> bool {
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = lo <= addr && addr < hi;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().any(|f| f == "hg");
                }
            }
        }
        false
    }
}
