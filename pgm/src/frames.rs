//! Host frames in place of VirtualBox's GMM: the traits the kernel implements (frame allocation
//! and access to host-physical memory) and a bitmap allocator over the boot memory map.

use alloc::vec::Vec;

use crate::addr::{HostPhysAddr, PAGE_SIZE};

/// Source of 4 KiB host frames. The kernel implements it over its boot memory map; tests use
/// [`BitmapFrameAllocator`] over a simulated map.
///
/// # Safety
///
/// The manager maps the frames it is given into guests and writes page tables into them, so an
/// implementer must hand out only real, unused RAM: every frame (and every frame of a large
/// allocation) is 4 KiB-aligned, exists, belongs to no one else (not the kernel's image, heap
/// or stacks, not another VM, not a device), and is not handed out again until it was freed.
/// A frame given to [`free_frame`](Self::free_frame) is one this allocator handed out.
#[allow(unsafe_code)] // Declares the contract; performs nothing unsafe.
pub unsafe trait HostFrameAllocator {
    /// Takes one free 4 KiB frame; `None` when none is left. The frame's contents are undefined.
    fn allocate_frame(&mut self) -> Option<HostPhysAddr>;

    /// Gives back a frame that [`allocate_frame`](Self::allocate_frame) returned and that is no
    /// longer referenced (not by a descriptor, not by an EPT entry).
    fn free_frame(&mut self, frame: HostPhysAddr);

    /// Takes up to `count` frames into `out` and returns how many it took. One call per batch
    /// lets an implementation take its lock once.
    fn allocate_frames(&mut self, count: usize, out: &mut Vec<HostPhysAddr>) -> usize {
        let mut taken = 0;
        while taken < count {
            match self.allocate_frame() {
                Some(frame) => out.push(frame),
                None => break,
            }
            taken += 1;
        }
        taken
    }

    /// Gives back a batch of frames, as [`free_frame`](Self::free_frame) would one by one.
    fn free_frames(&mut self, frames: &[HostPhysAddr]) {
        for &frame in frames {
            self.free_frame(frame);
        }
    }

    /// Takes 512 contiguous frames starting at a 2 MiB-aligned address, for a 2 MiB mapping;
    /// `None` when no such run is free (or the host does not offer large frames). The frames are
    /// given back one by one with [`free_frame`](Self::free_frame).
    fn allocate_large(&mut self) -> Option<HostPhysAddr> {
        None
    }
}

/// Frames in a 2 MiB large page.
pub const FRAMES_PER_LARGE_PAGE: u64 = 512;

/// Access to host-physical memory by address. Accesses never cross a 4 KiB frame boundary.
///
/// # Safety
///
/// The manager reads and writes through this only frames it holds (from its
/// [`HostFrameAllocator`]) and, for reads, frames a caller gave it as special aliases. An
/// implementer must make every address of those frames real memory that it may touch, and a
/// write must change only the bytes addressed (no other frame, no device state).
#[allow(unsafe_code)] // Declares the contract; performs nothing unsafe.
pub unsafe trait HostMemory {
    /// Copies `buf.len()` bytes starting at `addr` into `buf`.
    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]);

    /// Copies `data` to host-physical memory starting at `addr`.
    fn write(&mut self, addr: HostPhysAddr, data: &[u8]);

    /// Reads a little-endian `u64` (an EPT entry) at 8-byte aligned `addr`.
    fn read_u64(&self, addr: HostPhysAddr) -> u64 {
        let mut bytes = [0u8; 8];
        self.read(addr, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    /// Writes a little-endian `u64` (an EPT entry) at 8-byte aligned `addr`.
    fn write_u64(&mut self, addr: HostPhysAddr, value: u64) {
        self.write(addr, &value.to_le_bytes());
    }

    /// Atomically replaces the `u64` at 8-byte aligned `addr` with `new` if it holds `current`
    /// (an EPT entry, changed by the lock-free fault path while other CPUs, and the processor's
    /// accessed/dirty updates, reach the same table). `Err` carries the value found instead.
    /// Implementations must make [`read_u64`](Self::read_u64) an atomic load as well.
    fn compare_exchange_u64(&self, addr: HostPhysAddr, current: u64, new: u64) -> Result<(), u64>;

    /// Fills the 4 KiB frame at `frame` with zeros.
    fn zero_frame(&mut self, frame: HostPhysAddr) {
        self.write(frame, &[0u8; PAGE_SIZE as usize]);
    }
}

/// Why the bitmap allocator refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The address is not the start of a frame this allocator manages.
    NotManaged(HostPhysAddr),
    /// The frame is already free (double free).
    AlreadyFree(HostPhysAddr),
}

/// A run of usable frames `[first, first + count)` and where its bits start in the bitmap.
#[derive(Clone, Copy, Debug)]
struct Region {
    first_frame: u64,
    frame_count: u64,
    first_bit: u64,
}

/// Allocation counters of a [`BitmapFrameAllocator`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounts {
    /// Frames managed in all.
    pub total: u64,
    /// Frames currently free.
    pub free: u64,
    /// Successful allocations since creation.
    pub allocations: u64,
    /// Frees since creation.
    pub frees: u64,
}

impl FrameCounts {
    /// Frames currently handed out.
    pub fn used(&self) -> u64 {
        self.total - self.free
    }
}

/// Shows the regions and the counts, not the bitmap.
impl core::fmt::Debug for BitmapFrameAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BitmapFrameAllocator")
            .field("regions", &self.regions)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

/// A next-fit bitmap allocator of 4 KiB frames over a list of usable physical regions.
///
/// One bit per frame (set = allocated): 32 KiB of bitmap per GiB of RAM.
pub struct BitmapFrameAllocator {
    regions: Vec<Region>,
    bitmap: Vec<u64>,
    /// Bit index where the next search starts.
    cursor: u64,
    counts: FrameCounts,
}

impl BitmapFrameAllocator {
    /// Builds an allocator over `usable`, a list of `[start, end)` host-physical byte ranges.
    /// Partial frames at either end of a range are left out, as are empty ranges; ranges are
    /// taken as given and must not overlap. Every frame starts free.
    pub fn new(usable: impl IntoIterator<Item = (HostPhysAddr, HostPhysAddr)>) -> Self {
        let mut regions = Vec::new();
        let mut bits = 0u64;
        for (start, end) in usable {
            let first_frame = start.as_u64().div_ceil(PAGE_SIZE);
            let end_frame = end.as_u64() / PAGE_SIZE;
            if end_frame <= first_frame {
                continue;
            }
            let frame_count = end_frame - first_frame;
            regions.push(Region {
                first_frame,
                frame_count,
                first_bit: bits,
            });
            bits += frame_count;
        }
        BitmapFrameAllocator {
            regions,
            bitmap: alloc::vec![0; bits.div_ceil(64) as usize],
            cursor: 0,
            counts: FrameCounts {
                total: bits,
                free: bits,
                ..FrameCounts::default()
            },
        }
    }

    /// The allocator's counters.
    pub fn counts(&self) -> FrameCounts {
        self.counts
    }

    /// Takes a free frame, searching from where the last search stopped.
    pub fn allocate(&mut self) -> Option<HostPhysAddr> {
        if self.counts.free == 0 {
            return None;
        }
        let total = self.counts.total;
        let mut bit = self.cursor;
        for _ in 0..self.bitmap.len() + 1 {
            let word = (bit / 64) as usize;
            let free_bits = !self.bitmap[word] & (!0u64 << (bit % 64));
            if free_bits != 0 {
                let found = word as u64 * 64 + u64::from(free_bits.trailing_zeros());
                if found < total {
                    self.bitmap[word] |= 1 << (found % 64);
                    self.cursor = found;
                    self.counts.free -= 1;
                    self.counts.allocations += 1;
                    return self.frame_of_bit(found);
                }
            }
            bit = if (word + 1) * 64 >= total as usize {
                0
            } else {
                (word as u64 + 1) * 64
            };
        }
        None
    }

    /// Takes 512 free frames in a row starting at a 2 MiB-aligned address.
    pub fn allocate_large(&mut self) -> Option<HostPhysAddr> {
        self.allocate_run(FRAMES_PER_LARGE_PAGE)
    }

    /// Takes `count` free frames in a row starting at a 2 MiB-aligned address (the kernel
    /// heap grows by such runs; a large page is a run of 512). Each frame is freed on its own
    /// with [`free`](Self::free). `None` when no region has such a run, or `count` is 0.
    pub fn allocate_run(&mut self, count: u64) -> Option<HostPhysAddr> {
        if count == 0 || count > self.counts.free {
            return None;
        }
        let (first_bit, start) = self
            .regions
            .iter()
            .find_map(|region| self.free_run_in(region, count))?;
        for bit in first_bit..first_bit + count {
            self.bitmap[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.counts.free -= count;
        self.counts.allocations += count;
        HostPhysAddr::new(start * PAGE_SIZE)
    }

    /// The first bit and frame number of `count` free frames in a row in `region`, starting
    /// at a 2 MiB-aligned frame. A used frame moves the search to the next aligned start past
    /// it.
    fn free_run_in(&self, region: &Region, count: u64) -> Option<(u64, u64)> {
        let end = region.first_frame + region.frame_count;
        let mut start = region.first_frame.next_multiple_of(FRAMES_PER_LARGE_PAGE);
        while start + count <= end {
            let first_bit = region.first_bit + start - region.first_frame;
            match (first_bit..first_bit + count).rev().find(|&bit| self.bit(bit)) {
                None => return Some((first_bit, start)),
                Some(used) => {
                    let used_frame = region.first_frame + used - region.first_bit;
                    start = (used_frame + 1).next_multiple_of(FRAMES_PER_LARGE_PAGE);
                }
            }
        }
        None
    }

    fn bit(&self, bit: u64) -> bool {
        self.bitmap[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Frees `frame`; refuses addresses it does not manage and frames already free.
    pub fn free(&mut self, frame: HostPhysAddr) -> Result<(), FrameError> {
        let bit = self.bit_of_frame(frame).ok_or(FrameError::NotManaged(frame))?;
        let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if self.bitmap[word] & mask == 0 {
            return Err(FrameError::AlreadyFree(frame));
        }
        self.bitmap[word] &= !mask;
        self.counts.free += 1;
        self.counts.frees += 1;
        Ok(())
    }

    /// True when `frame` is managed here and currently allocated.
    pub fn is_allocated(&self, frame: HostPhysAddr) -> bool {
        self.bit_of_frame(frame)
            .is_some_and(|bit| self.bitmap[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    fn frame_of_bit(&self, bit: u64) -> Option<HostPhysAddr> {
        let region = self
            .regions
            .iter()
            .find(|r| bit >= r.first_bit && bit < r.first_bit + r.frame_count)?;
        HostPhysAddr::new((region.first_frame + bit - region.first_bit) * PAGE_SIZE)
    }

    fn bit_of_frame(&self, frame: HostPhysAddr) -> Option<u64> {
        if !frame.is_page_aligned() {
            return None;
        }
        let number = frame.page_number();
        self.regions
            .iter()
            .find(|r| number >= r.first_frame && number < r.first_frame + r.frame_count)
            .map(|r| r.first_bit + number - r.first_frame)
    }
}

// SAFETY: the bitmap hands out each frame of the usable regions it was built from once until it
// is freed (`free` refuses a frame that is not out); whether those regions are real, unused RAM
// is the promise of whoever built it (the kernel from the boot memory map, the tests over
// simulated memory).
#[allow(unsafe_code)]
unsafe impl HostFrameAllocator for BitmapFrameAllocator {
    fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
        self.allocate()
    }

    fn allocate_large(&mut self) -> Option<HostPhysAddr> {
        BitmapFrameAllocator::allocate_large(self)
    }

    fn free_frame(&mut self, frame: HostPhysAddr) {
        // The manager frees only frames it allocated; a refusal here would be a manager bug and
        // is visible in `counts()`, which tests compare against the manager's own accounting.
        let _ = self.free(frame);
    }
}

// SAFETY: every call goes to the allocator borrowed, which keeps its own promise; borrowing
// adds no frame and hands none out twice. (Lets a caller lend its allocator to a manager and
// look at it again once the manager is gone.)
#[allow(unsafe_code)]
unsafe impl<A: HostFrameAllocator + ?Sized> HostFrameAllocator for &mut A {
    fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
        (**self).allocate_frame()
    }

    fn free_frame(&mut self, frame: HostPhysAddr) {
        (**self).free_frame(frame)
    }

    fn allocate_frames(&mut self, count: usize, out: &mut Vec<HostPhysAddr>) -> usize {
        (**self).allocate_frames(count, out)
    }

    fn free_frames(&mut self, frames: &[HostPhysAddr]) {
        (**self).free_frames(frames)
    }

    fn allocate_large(&mut self) -> Option<HostPhysAddr> {
        (**self).allocate_large()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::hpa;

    #[test]
    fn partial_frames_are_left_out_and_all_frames_are_found() {
        // 0x1800..0x5000 holds whole frames 0x2000, 0x3000, 0x4000; 0x9000..0x9800 holds none.
        let mut frames = BitmapFrameAllocator::new([
            (hpa(0x1800), hpa(0x5000)),
            (hpa(0x9000), hpa(0x9800)),
            (hpa(0x100000), hpa(0x102000)),
        ]);
        assert_eq!(frames.counts().total, 5);
        let mut got: Vec<u64> = (0..5).map(|_| frames.allocate().unwrap().as_u64()).collect();
        got.sort();
        assert_eq!(got, [0x2000, 0x3000, 0x4000, 0x100000, 0x101000]);
        assert_eq!(frames.allocate(), None);
        assert_eq!(frames.counts().free, 0);
    }

    #[test]
    fn free_makes_a_frame_allocatable_again_and_refuses_bad_frees() {
        let mut frames = BitmapFrameAllocator::new([(hpa(0x10000), hpa(0x12000))]);
        let a = frames.allocate().unwrap();
        let b = frames.allocate().unwrap();
        assert_eq!(frames.allocate(), None);
        assert_eq!(frames.free(a), Ok(()));
        assert_eq!(frames.free(a), Err(FrameError::AlreadyFree(a)));
        assert_eq!(
            frames.free(hpa(0x20000)),
            Err(FrameError::NotManaged(hpa(0x20000)))
        );
        assert_eq!(
            frames.free(hpa(0x10800)),
            Err(FrameError::NotManaged(hpa(0x10800)))
        );
        assert!(frames.is_allocated(b) && !frames.is_allocated(a));
        assert_eq!(frames.allocate(), Some(a));
        let counts = frames.counts();
        assert_eq!((counts.allocations, counts.frees, counts.used()), (3, 1, 2));
    }

    #[test]
    fn large_allocations_are_aligned_contiguous_runs_of_free_frames() {
        // 6 MiB starting at 1 MiB + 4 KiB: the aligned runs start at 2 MiB and 4 MiB.
        let mut frames = BitmapFrameAllocator::new([(hpa(0x10_1000), hpa(0x70_1000))]);
        let taken = frames.allocate().unwrap();
        assert_eq!(taken, hpa(0x10_1000));
        assert_eq!(frames.allocate_large(), Some(hpa(0x20_0000)));
        assert!(frames.is_allocated(hpa(0x3F_F000)));
        // One used frame inside the next run makes it unusable.
        frames.free(hpa(0x10_1000)).unwrap();
        let mut filler = Vec::new();
        while let Some(frame) = frames.allocate() {
            if frame == hpa(0x40_0000) {
                break;
            }
            filler.push(frame);
        }
        for frame in filler {
            frames.free(frame).unwrap();
        }
        assert_eq!(
            frames.allocate_large(),
            None,
            "the only other run has a used frame"
        );
        frames.free(hpa(0x40_0000)).unwrap();
        assert_eq!(frames.allocate_large(), Some(hpa(0x40_0000)));
        assert_eq!(frames.counts().used(), 1024);
    }

    #[test]
    fn runs_longer_than_a_large_page_skip_past_used_frames() {
        // 8 MiB from 2 MiB: a 3 MiB run cannot start at 2 MiB once 4 MiB + 4 KiB is used, nor
        // at 4 MiB; it starts at 6 MiB and reaches 9 MiB.
        let mut frames = BitmapFrameAllocator::new([(hpa(0x20_0000), hpa(0xA0_0000))]);
        let mut taken = Vec::new();
        while let Some(frame) = frames.allocate() {
            taken.push(frame);
            if frame == hpa(0x40_1000) {
                break;
            }
        }
        for &frame in &taken[..taken.len() - 1] {
            frames.free(frame).unwrap();
        }
        assert_eq!(frames.allocate_run(768), Some(hpa(0x60_0000)));
        assert!(frames.is_allocated(hpa(0x8F_F000)) && !frames.is_allocated(hpa(0x90_0000)));
        assert_eq!(frames.counts().used(), 769);
        assert_eq!(
            frames.allocate_run(768),
            None,
            "only 2 MiB from an aligned start is left"
        );
        assert_eq!(frames.allocate_run(0), None);
        assert_eq!(frames.counts().used(), 769, "a refused run takes nothing");
    }

    #[test]
    fn allocation_wraps_around_past_word_boundaries() {
        // 130 frames: the bitmap has a partial last word.
        let mut frames = BitmapFrameAllocator::new([(hpa(0), hpa(130 * PAGE_SIZE))]);
        let all: Vec<_> = (0..130).map(|_| frames.allocate().unwrap()).collect();
        assert_eq!(frames.allocate(), None);
        frames.free(all[3]).unwrap();
        frames.free(all[129]).unwrap();
        let mut again = [frames.allocate().unwrap(), frames.allocate().unwrap()];
        again.sort();
        assert_eq!(again, [all[3], all[129]]);
    }
}
