//! `heap`: the kernel heap, which grows from the host frame allocator.
//!
//! The kernel heap holds every VM's page descriptors (8 bytes per guest page), the frame
//! bitmap, the auditor's bookkeeping and the exit logs. A fixed heap caps the guest size: 8 MiB
//! held about 4 GiB of registered RAM. Here the heap starts from a static *seed* region and,
//! when no region can serve an allocation, takes a *chunk* of contiguous host memory from a
//! [`ChunkSource`] (the kernel's frame allocator) big enough for it. A chunk goes back to the
//! source as soon as nothing in it is allocated, so descriptor memory is returned when a VM is
//! destroyed. One empty chunk of the smallest size is kept as a spare, so that an exit path
//! that allocates and frees one buffer at the edge of the heap does not take and return 2 MiB
//! of frames at every exit.
//!
//! Each region (the seed and every chunk) is a first-fit [`linked_list_allocator::Heap`] of
//! its own; an address tells which region it belongs to. [`GrowingHeap`] has no lock: the
//! kernel wraps it in one and implements `GlobalAlloc` over it.
//!
//! The crate is a piece of the kernel that is tested on the host.
#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

use core::alloc::Layout;
use core::ptr::NonNull;

use linked_list_allocator::Heap;

/// Chunk sizes are multiples of this: one 2 MiB page of host frames.
pub const CHUNK_GRAIN: usize = 2 << 20;

/// Regions a heap can hold: the seed and up to `MAX_REGIONS - 1` chunks.
pub const MAX_REGIONS: usize = 64;

/// Slack added to an allocation's size when sizing a chunk for it: the hole list's own
/// alignment and minimum-size rounding.
const CHUNK_SLACK: usize = 64;

/// Where a heap's chunks come from and go back to.
///
/// # Safety
///
/// [`take`](ChunkSource::take) returns the start of `bytes` bytes, aligned to 4 KiB, that are
/// readable and writable, used by nothing else, and stay so until the same range is passed to
/// [`give_back`](ChunkSource::give_back). The heap hands such ranges to its allocations, so a
/// range that something else still uses would alias them.
pub unsafe trait ChunkSource {
    /// `bytes` (a multiple of [`CHUNK_GRAIN`]) of contiguous memory, or `None` when the
    /// source has no such run.
    fn take(&mut self, bytes: usize) -> Option<NonNull<u8>>;

    /// Returns a range that [`take`](ChunkSource::take) gave out; nothing in it is used any
    /// more.
    fn give_back(&mut self, start: NonNull<u8>, bytes: usize);
}

/// What a heap holds and has held, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// The seed region's size.
    pub seed_bytes: usize,
    /// Chunk bytes held now (taken from the source and not given back).
    pub chunk_bytes: usize,
    /// The most chunk bytes held at once.
    pub peak_chunk_bytes: usize,
    /// Bytes allocated now, as the allocations asked (without the regions' rounding).
    pub allocated: usize,
    /// The most bytes allocated at once.
    pub peak_allocated: usize,
    /// Chunks taken from the source.
    pub grows: u64,
    /// Chunks given back.
    pub returns: u64,
    /// Allocations refused: no region had room and the source had no chunk (or the region
    /// table was full).
    pub failures: u64,
}

/// A heap made of a seed region and chunks taken from `S` on demand (see the crate docs).
pub struct GrowingHeap<S> {
    /// Slot 0 is the seed; a slot whose heap has size 0 is free.
    regions: [Heap; MAX_REGIONS],
    source: S,
    stats: HeapStats,
}

impl<S: core::fmt::Debug> core::fmt::Debug for GrowingHeap<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GrowingHeap")
            .field("source", &self.source)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<S: ChunkSource> GrowingHeap<S> {
    /// A heap with no seed yet; it grows from `source` from its first allocation on.
    pub const fn new(source: S) -> Self {
        GrowingHeap {
            regions: [const { Heap::empty() }; MAX_REGIONS],
            source,
            stats: HeapStats {
                seed_bytes: 0,
                chunk_bytes: 0,
                peak_chunk_bytes: 0,
                allocated: 0,
                peak_allocated: 0,
                grows: 0,
                returns: 0,
                failures: 0,
            },
        }
    }

    /// Gives the heap its seed region, which is used first and never given back. Call it once,
    /// before the first allocation; a second call is ignored.
    ///
    /// # Safety
    ///
    /// `start..start + bytes` is readable and writable memory that nothing else uses for as
    /// long as the heap lives.
    pub unsafe fn seed(&mut self, start: *mut u8, bytes: usize) {
        if self.regions[0].size() != 0 || self.stats.allocated != 0 {
            return;
        }
        // SAFETY: the caller hands the range over for the heap's life (this function's
        // contract), and slot 0 was empty.
        unsafe { self.regions[0].init(start, bytes) };
        self.stats.seed_bytes = self.regions[0].size();
    }

    /// The counters.
    pub fn stats(&self) -> HeapStats {
        self.stats
    }

    /// Bytes free in the regions held now (fragmented: the largest block may be smaller).
    pub fn free_bytes(&self) -> usize {
        self.regions.iter().map(Heap::free).sum()
    }

    /// The source, for its own counters.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Allocates `layout` from the first region with room, growing by a chunk when none has;
    /// `None` when the source has no chunk for it (nothing changes then but the failure count).
    pub fn allocate(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        let found = self
            .regions
            .iter_mut()
            .filter(|region| region.size() != 0)
            .find_map(|region| region.allocate_first_fit(layout).ok());
        let block = found.or_else(|| self.grow_for(layout));
        match block {
            Some(_) => {
                self.stats.allocated += layout.size();
                self.stats.peak_allocated = self.stats.peak_allocated.max(self.stats.allocated);
            }
            None => self.stats.failures += 1,
        }
        block
    }

    /// Frees the block at `block`, and gives its chunk back if nothing else in it is allocated
    /// (unless it becomes the spare).
    ///
    /// # Safety
    ///
    /// `block` came from [`allocate`](Self::allocate) on this heap with the same `layout`, and
    /// is not used after this call.
    pub unsafe fn deallocate(&mut self, block: NonNull<u8>, layout: Layout) {
        let Some(slot) = self.region_of(block) else {
            // Not ours: the caller broke the contract. Dropping the block leaks it, which is
            // safer than threading it into a hole list.
            return;
        };
        // SAFETY: `block` was allocated with `layout` from this heap (the caller's contract),
        // and the region whose range holds it is the one that allocated it.
        unsafe { self.regions[slot].deallocate(block, layout) };
        self.stats.allocated -= layout.size();
        if slot != 0 && self.regions[slot].used() == 0 && !self.keeps_as_spare(slot) {
            self.give_back(slot);
        }
    }

    /// The slot of the region whose range holds `block`.
    fn region_of(&self, block: NonNull<u8>) -> Option<usize> {
        let address = block.as_ptr() as usize;
        self.regions.iter().position(|region| {
            region.size() != 0 && (region.bottom() as usize..region.top() as usize).contains(&address)
        })
    }

    /// Whether the empty chunk in `slot` stays as the spare: it is of the smallest size and no
    /// other chunk is empty.
    fn keeps_as_spare(&self, slot: usize) -> bool {
        let is_grain = self.regions[slot].size() == CHUNK_GRAIN;
        let other_empty = self.regions[1..]
            .iter()
            .enumerate()
            .any(|(index, region)| index + 1 != slot && region.size() != 0 && region.used() == 0);
        is_grain && !other_empty
    }

    /// Takes a chunk big enough for `layout` into a free slot and allocates from it.
    fn grow_for(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        let slot = self.regions.iter().position(|region| region.size() == 0)?;
        let bytes = chunk_bytes_for(layout)?;
        let start = self.source.take(bytes)?;
        // SAFETY: the source gave `bytes` bytes at `start` to the heap alone until they are
        // given back (`ChunkSource`'s contract), and the slot was empty.
        unsafe { self.regions[slot].init(start.as_ptr(), bytes) };
        self.stats.chunk_bytes += bytes;
        self.stats.peak_chunk_bytes = self.stats.peak_chunk_bytes.max(self.stats.chunk_bytes);
        self.stats.grows += 1;
        let block = self.regions[slot].allocate_first_fit(layout).ok();
        if block.is_none() {
            // Sized for the layout, so this is not expected; give the chunk back rather than
            // keep memory that serves nothing.
            self.give_back(slot);
        }
        block
    }

    /// Gives the (empty) chunk in `slot` back to the source and frees the slot.
    fn give_back(&mut self, slot: usize) {
        let region = core::mem::replace(&mut self.regions[slot], Heap::empty());
        let bytes = region.size();
        if let Some(start) = NonNull::new(region.bottom()) {
            self.source.give_back(start, bytes);
        }
        self.stats.chunk_bytes -= bytes;
        self.stats.returns += 1;
    }
}

/// The chunk size that serves `layout` on its own: its size and alignment with the hole list's
/// slack, rounded up to [`CHUNK_GRAIN`]; `None` when that overflows.
fn chunk_bytes_for(layout: Layout) -> Option<usize> {
    let needed = layout
        .size()
        .checked_add(layout.align())?
        .checked_add(CHUNK_SLACK)?;
    needed.checked_next_multiple_of(CHUNK_GRAIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{alloc, dealloc};
    use std::vec::Vec;

    /// Chunks from the host's allocator, at most `limit` bytes held at once.
    #[derive(Debug)]
    struct TestSource {
        limit: usize,
        held: Vec<(usize, usize)>,
        taken: u64,
    }

    // SAFETY: each chunk is a fresh allocation of the host's allocator, aligned to 4 KiB, held
    // in `held` until it is given back and freed.
    unsafe impl ChunkSource for TestSource {
        fn take(&mut self, bytes: usize) -> Option<NonNull<u8>> {
            let held: usize = self.held.iter().map(|&(_, size)| size).sum();
            if held + bytes > self.limit {
                return None;
            }
            let layout = Layout::from_size_align(bytes, 4096).ok()?;
            // SAFETY: the layout's size is not zero (a multiple of CHUNK_GRAIN).
            let start = NonNull::new(unsafe { alloc(layout) })?;
            self.held.push((start.as_ptr() as usize, bytes));
            self.taken += 1;
            Some(start)
        }

        fn give_back(&mut self, start: NonNull<u8>, bytes: usize) {
            let at = start.as_ptr() as usize;
            let index = self
                .held
                .iter()
                .position(|&chunk| chunk == (at, bytes))
                .expect("a chunk given back is one that was taken, with its size");
            self.held.swap_remove(index);
            // SAFETY: allocated in `take` with this size and alignment, and no longer used.
            unsafe { dealloc(start.as_ptr(), Layout::from_size_align(bytes, 4096).unwrap()) };
        }
    }

    impl Drop for TestSource {
        fn drop(&mut self) {
            for &(at, bytes) in &self.held {
                // SAFETY: as in `give_back`; the heap that used them is being dropped.
                unsafe { dealloc(at as *mut u8, Layout::from_size_align(bytes, 4096).unwrap()) };
            }
        }
    }

    const SEED: usize = 64 * 1024;

    /// A heap with a 64 KiB seed (leaked for the test's life) over a source of `limit` bytes.
    fn heap(limit: usize) -> GrowingHeap<TestSource> {
        let mut heap = GrowingHeap::new(TestSource {
            limit,
            held: Vec::new(),
            taken: 0,
        });
        let seed = Vec::leak(std::vec![0u8; SEED]);
        // SAFETY: the leaked vector is the heap's alone and lives forever.
        unsafe { heap.seed(seed.as_mut_ptr(), SEED) };
        heap
    }

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    /// Fills the block with `byte`, as a user would, so overlapping blocks show up in `check`.
    fn fill(block: NonNull<u8>, size: usize, byte: u8) {
        // SAFETY: the block is `size` bytes allocated to the test.
        unsafe { core::ptr::write_bytes(block.as_ptr(), byte, size) };
    }

    fn holds(block: NonNull<u8>, size: usize, byte: u8) -> bool {
        // SAFETY: as in `fill`.
        let bytes = unsafe { core::slice::from_raw_parts(block.as_ptr(), size) };
        bytes.iter().all(|&b| b == byte)
    }

    #[test]
    fn small_allocations_stay_in_the_seed() {
        let mut heap = heap(16 * CHUNK_GRAIN);
        let block = heap.allocate(layout(1024)).unwrap();
        assert_eq!(heap.stats().grows, 0);
        assert_eq!(heap.stats().allocated, 1024);
        // SAFETY: allocated above with this layout.
        unsafe { heap.deallocate(block, layout(1024)) };
        assert_eq!(heap.stats().allocated, 0);
        assert_eq!(heap.stats().peak_allocated, 1024);
    }

    #[test]
    fn an_allocation_larger_than_the_seed_gets_a_chunk_of_its_own() {
        let mut heap = heap(16 * CHUNK_GRAIN);
        let size = 5 * 1024 * 1024;
        let block = heap.allocate(layout(size)).unwrap();
        fill(block, size, 0xA5);
        let stats = heap.stats();
        assert_eq!(stats.grows, 1);
        assert_eq!(stats.chunk_bytes, 3 * CHUNK_GRAIN, "5 MiB rounds up to 6 MiB");
        // SAFETY: allocated above with this layout.
        unsafe { heap.deallocate(block, layout(size)) };
        let stats = heap.stats();
        assert_eq!(
            (stats.chunk_bytes, stats.returns),
            (0, 1),
            "a 6 MiB chunk is no spare"
        );
        assert_eq!(stats.peak_chunk_bytes, 3 * CHUNK_GRAIN);
        assert!(heap.source().held.is_empty());
    }

    #[test]
    fn a_full_seed_grows_and_the_chunks_go_back_when_empty_but_one_spare() {
        let mut heap = heap(16 * CHUNK_GRAIN);
        let size = 48 * 1024;
        let blocks: Vec<_> = (0..100u8)
            .map(|i| {
                let block = heap.allocate(layout(size)).unwrap();
                fill(block, size, i);
                block
            })
            .collect();
        // 100 blocks of 48 KiB: one in the seed, 42 in each 2 MiB chunk.
        assert_eq!(heap.stats().grows, 3);
        for (i, &block) in blocks.iter().enumerate() {
            assert!(holds(block, size, i as u8), "block {i} was overwritten");
        }
        for block in blocks {
            // SAFETY: allocated above with this layout.
            unsafe { heap.deallocate(block, layout(size)) };
        }
        let stats = heap.stats();
        assert_eq!(stats.allocated, 0);
        assert_eq!(
            stats.chunk_bytes, CHUNK_GRAIN,
            "one empty 2 MiB chunk stays as the spare"
        );
        assert_eq!(stats.returns, 2);
        assert_eq!(heap.source().held.len(), 1);
    }

    #[test]
    fn the_spare_serves_the_next_growth_without_taking_frames() {
        let mut heap = heap(16 * CHUNK_GRAIN);
        let seed_filler = heap.allocate(layout(SEED - 1024)).unwrap();
        let block = heap.allocate(layout(4096)).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { heap.deallocate(block, layout(4096)) };
        assert_eq!(heap.stats().chunk_bytes, CHUNK_GRAIN);
        let taken = heap.source().taken;
        let again = heap.allocate(layout(4096)).unwrap();
        assert_eq!(heap.source().taken, taken, "the spare chunk served it");
        // SAFETY: allocated above with these layouts.
        unsafe {
            heap.deallocate(again, layout(4096));
            heap.deallocate(seed_filler, layout(SEED - 1024));
        }
    }

    #[test]
    fn a_source_without_a_chunk_fails_the_allocation_and_changes_nothing_else() {
        let mut heap = heap(CHUNK_GRAIN);
        let before = heap.stats();
        assert!(heap.allocate(layout(3 * 1024 * 1024)).is_none());
        let after = heap.stats();
        assert_eq!(after.failures, 1);
        assert_eq!(HeapStats { failures: 0, ..after }, before);
        // What fits the source still works.
        let block = heap.allocate(layout(1024 * 1024)).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { heap.deallocate(block, layout(1024 * 1024)) };
    }

    #[test]
    fn a_full_region_table_fails_instead_of_growing() {
        let mut heap = heap(usize::MAX);
        let size = CHUNK_GRAIN + 4096; // each needs a chunk of 2 grains, alone
        let blocks: Vec<_> = (1..MAX_REGIONS)
            .map(|_| heap.allocate(layout(size)).unwrap())
            .collect();
        assert_eq!(heap.stats().grows, (MAX_REGIONS - 1) as u64);
        assert!(heap.allocate(layout(size)).is_none());
        assert_eq!(heap.stats().failures, 1);
        for block in blocks {
            // SAFETY: allocated above with this layout.
            unsafe { heap.deallocate(block, layout(size)) };
        }
        assert_eq!(
            heap.stats().chunk_bytes,
            0,
            "2-grain chunks are never kept as spares"
        );
    }

    #[test]
    fn large_alignments_are_honoured_in_a_chunk() {
        let mut heap = heap(16 * CHUNK_GRAIN);
        let wide = Layout::from_size_align(SEED * 2, 1 << 16).unwrap();
        let block = heap.allocate(wide).unwrap();
        assert_eq!(block.as_ptr() as usize % (1 << 16), 0);
        // SAFETY: allocated above with this layout.
        unsafe { heap.deallocate(block, wide) };
    }

    #[test]
    fn random_allocations_never_overlap_and_every_chunk_but_the_spare_returns() {
        let mut heap = heap(64 * CHUNK_GRAIN);
        let mut live: Vec<(NonNull<u8>, usize, u8)> = Vec::new();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for step in 0..4000u32 {
            let roll = next();
            if roll % 3 != 0 || live.is_empty() {
                let size = 1 + (next() % 300_000) as usize;
                if let Some(block) = heap.allocate(layout(size)) {
                    let byte = step as u8;
                    fill(block, size, byte);
                    live.push((block, size, byte));
                }
            } else {
                let (block, size, byte) = live.swap_remove((next() % live.len() as u64) as usize);
                assert!(holds(block, size, byte), "a live block was overwritten");
                // SAFETY: allocated above with this layout and removed from `live`.
                unsafe { heap.deallocate(block, layout(size)) };
            }
        }
        for (block, size, byte) in live.drain(..) {
            assert!(holds(block, size, byte), "a live block was overwritten");
            // SAFETY: as above.
            unsafe { heap.deallocate(block, layout(size)) };
        }
        let stats = heap.stats();
        assert_eq!(stats.allocated, 0);
        assert!(stats.grows > 10, "the run grew the heap ({} times)", stats.grows);
        assert!(
            stats.chunk_bytes <= CHUNK_GRAIN,
            "only the spare stays: {stats:?}"
        );
        assert_eq!(stats.grows - stats.returns, heap.source().held.len() as u64);
    }
}
