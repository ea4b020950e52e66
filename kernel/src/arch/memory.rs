//! Host memory: the kernel heap, the host frame allocator built from the boot memory map, and
//! access to host-physical memory through the bootloader's physical-memory mapping.

use alloc::vec::Vec;

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use heap::{ChunkSource, GrowingHeap, HeapStats};
use pgm::frames::{BitmapFrameAllocator, FrameCounts, HostFrameAllocator, HostMemory};
use pgm::{HostPhysAddr, PAGE_SIZE};
use spin::Mutex;

/// The heap's static seed: what the kernel allocates before the frame allocator exists (its
/// own bitmap among it), and the first region every allocation tries.
const HEAP_SEED_SIZE: usize = 8 * 1024 * 1024;
/// Frames below 1 MiB are left to firmware and real-mode structures.
const LOWEST_FRAME: u64 = 0x10_0000;

/// The kernel heap: descriptors, the frame bitmap and test bookkeeping live here. It grows by
/// runs of host frames once [`grow_heap_from`] has run (the `heap` crate).
static HEAP: Mutex<GrowingHeap<FrameChunks>> = Mutex::new(GrowingHeap::new(FrameChunks));

/// Where the physical-memory mapping is (0 until [`grow_heap_from`]): heap chunks are frames
/// reached through it.
static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);

/// The host frames, shared by every VM (the counterpart of VirtualBox's GMM).
///
/// Lock order: `HEAP` before `FRAMES` (a heap that grows takes frames). Nothing allocates on
/// the heap while holding `FRAMES`.
static FRAMES: Mutex<Option<BitmapFrameAllocator>> = Mutex::new(None);

/// The global allocator: [`HEAP`] behind its lock.
struct KernelHeap;

#[global_allocator]
static ALLOCATOR: KernelHeap = KernelHeap;

// SAFETY: `GrowingHeap` hands out blocks of the seed (the kernel's alone) and of frame runs
// taken from the frame allocator (taken out of it until given back), never one block twice; a
// null result reports failure, and `dealloc` returns a block to the region it came from.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.lock()
            .allocate(layout)
            .map_or(core::ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if let Some(block) = NonNull::new(block) {
            // SAFETY: `block` came from `alloc` with `layout` (GlobalAlloc's contract).
            unsafe { HEAP.lock().deallocate(block, layout) }
        }
    }
}

/// Heap chunks: runs of host frames, reached through the physical-memory mapping.
#[derive(Debug)]
struct FrameChunks;

// SAFETY: a chunk is a run of frames the frame allocator hands out once (they stay allocated
// until `give_back` frees them), reached through the mapping of all physical memory at
// PHYS_OFFSET (`PhysMap::new`'s contract, stored by `grow_heap_from`): readable, writable,
// 4 KiB aligned and used by nothing else.
unsafe impl ChunkSource for FrameChunks {
    fn take(&mut self, bytes: usize) -> Option<NonNull<u8>> {
        let offset = PHYS_OFFSET.load(Ordering::Acquire);
        if offset == 0 {
            return None;
        }
        let start = FRAMES.lock().as_mut()?.allocate_run(bytes as u64 / PAGE_SIZE)?;
        NonNull::new((offset + start.as_u64()) as *mut u8)
    }

    fn give_back(&mut self, start: NonNull<u8>, bytes: usize) {
        let first = start.as_ptr() as u64 - PHYS_OFFSET.load(Ordering::Acquire);
        let mut guard = FRAMES.lock();
        let Some(frames) = guard.as_mut() else {
            return;
        };
        for frame in (first..first + bytes as u64).step_by(PAGE_SIZE as usize) {
            if let Err(error) = frames.free(HostPhysAddr::new_truncate(frame)) {
                log::error!("frame allocator refused a heap chunk's frame: {error:?}");
            }
        }
    }
}

/// Hands the heap its seed. Call once at boot, before anything allocates.
pub fn init_heap() {
    static mut HEAP_SEED: [u8; HEAP_SEED_SIZE] = [0; HEAP_SEED_SIZE];
    // SAFETY: HEAP_SEED is used by nothing else, and init_heap runs once, before any allocation.
    unsafe { HEAP.lock().seed((&raw mut HEAP_SEED).cast(), HEAP_SEED_SIZE) };
}

/// Lets the heap grow by frames of the allocator [`init_frames`] built, reached through
/// `phys` (which lives as long as the kernel: the heap keeps using the mapping).
pub fn grow_heap_from(phys: &'static PhysMap) {
    PHYS_OFFSET.store(phys.offset, Ordering::Release);
}

/// Bytes the heap could still hand out: what its regions have free (fragmented: the largest
/// block may be smaller) and the free frames it could grow by.
#[cfg_attr(feature = "kernel-tests", allow(dead_code))]
pub fn heap_available() -> usize {
    let free_frames = frame_counts().free;
    let growth = usize::try_from(free_frames * PAGE_SIZE).unwrap_or(usize::MAX);
    HEAP.lock().free_bytes().saturating_add(growth)
}

/// The heap's counters: its seed, the chunks it holds and has held, the bytes allocated now
/// and at most.
pub fn heap_stats() -> HeapStats {
    HEAP.lock().stats()
}

/// Builds the host frame allocator from the usable regions of the boot memory map.
pub fn init_frames(regions: &MemoryRegions) {
    let usable = regions
        .iter()
        .filter(|r| r.kind == MemoryRegionKind::Usable && r.end > LOWEST_FRAME)
        .map(|r| {
            let start = HostPhysAddr::new_truncate(r.start.max(LOWEST_FRAME));
            (start, HostPhysAddr::new_truncate(r.end))
        });
    *FRAMES.lock() = Some(BitmapFrameAllocator::new(usable));
}

/// A free frame below 1 MiB for the application processors' start-up trampoline (a start-up
/// IPI names a page below 1 MiB). Frames there never enter the frame allocator, so the one
/// picked stays reserved. The lowest page (the real-mode interrupt table) is skipped.
pub fn trampoline_frame(regions: &MemoryRegions) -> Option<HostPhysAddr> {
    const PAGE: u64 = 0x1000;
    regions
        .iter()
        .filter(|r| r.kind == MemoryRegionKind::Usable)
        .find_map(|r| {
            let start = r.start.max(PAGE).next_multiple_of(PAGE);
            (start + PAGE <= r.end.min(LOWEST_FRAME)).then_some(start)
        })
        .map(HostPhysAddr::new_truncate)
}

/// Frames cleared through the physical window, and the ticks the clears took.
static CLEARS: AtomicU64 = AtomicU64::new(0);
static CLEAR_TICKS: AtomicU64 = AtomicU64::new(0);

/// Frames cleared so far (a zero-fill's 4 KiB clear, a large fill's 512) and the ticks they
/// took in all: what a zero-fill exit costs without its clear is its mean less this mean.
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn frame_clears() -> (u64, u64) {
    (
        CLEARS.load(Ordering::Relaxed),
        CLEAR_TICKS.load(Ordering::Relaxed),
    )
}

/// The allocator's counters (all zero before [`init_frames`]).
pub fn frame_counts() -> FrameCounts {
    FRAMES.lock().as_ref().map(|f| f.counts()).unwrap_or_default()
}

/// Frames in use by everything but the heap (its chunks come and go with the kernel's own
/// allocations): what a VM's frames are counted against, and what the leak checks compare.
pub fn frames_in_use_outside_heap() -> u64 {
    let heap_frames = heap_stats().chunk_bytes as u64 / PAGE_SIZE;
    frame_counts().used() - heap_frames
}

/// True when `frame` is allocated at the host (what the EPT auditor asks of every frame a VM
/// holds).
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn is_allocated(frame: HostPhysAddr) -> bool {
    FRAMES.lock().as_ref().is_some_and(|f| f.is_allocated(frame))
}

/// A handle to the shared frame allocator, for `pgm` and the VMX code.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelFrames;

impl KernelFrames {
    /// `count` physically contiguous frames (the first one's address), for structures the CPU
    /// reads as one block (SVM's I/O and MSR permission maps).
    #[cfg_attr(not(feature = "svm"), allow(dead_code))]
    pub fn allocate_run(count: u64) -> Option<HostPhysAddr> {
        FRAMES.lock().as_mut()?.allocate_run(count)
    }
}

// SAFETY: the allocator was built from the usable regions of the boot memory map above 1 MiB
// (RAM the firmware and the bootloader left free: not the kernel image, heap or stacks), and
// the bitmap hands out each frame once until it is freed.
unsafe impl HostFrameAllocator for KernelFrames {
    fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
        FRAMES.lock().as_mut()?.allocate()
    }

    fn free_frame(&mut self, frame: HostPhysAddr) {
        self.free_frames(&[frame]);
    }

    fn allocate_large(&mut self) -> Option<HostPhysAddr> {
        FRAMES.lock().as_mut()?.allocate_large()
    }

    fn allocate_frames(&mut self, count: usize, out: &mut Vec<HostPhysAddr>) -> usize {
        // Grow `out` before taking the frame lock: the heap may need frames to grow it.
        out.reserve(count);
        let mut guard = FRAMES.lock();
        let Some(frames) = guard.as_mut() else {
            return 0;
        };
        let before = out.len();
        out.extend((0..count).map_while(|_| frames.allocate()));
        out.len() - before
    }

    fn free_frames(&mut self, batch: &[HostPhysAddr]) {
        let mut guard = FRAMES.lock();
        let Some(frames) = guard.as_mut() else {
            return;
        };
        for &frame in batch {
            if let Err(error) = frames.free(frame) {
                log::error!("frame allocator refused a free: {error:?}");
            }
        }
    }
}

/// Host-physical memory, reached through the bootloader's mapping of all physical memory.
/// There is one, made at boot ([`PhysMap::new`] is unsafe) and shared by reference: safe code
/// cannot forge a window onto memory that is not mapped.
#[derive(Debug)]
pub struct PhysMap {
    offset: u64,
}

impl PhysMap {
    /// The mapping at virtual `offset`.
    ///
    /// # Safety
    ///
    /// All physical memory must be mapped, readable and writable, at virtual `offset` (the
    /// bootloader's `physical_memory_offset`) for as long as the `PhysMap` is used.
    pub unsafe fn new(offset: u64) -> PhysMap {
        PhysMap { offset }
    }

    /// Virtual address of host-physical `addr`.
    pub fn virt(&self, addr: HostPhysAddr) -> *mut u8 {
        (self.offset + addr.as_u64()) as *mut u8
    }

    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
        // SAFETY: all physical memory is mapped at `offset` (`new`'s contract); callers (pgm,
        // the VMX code) pass frames they hold and stay inside one frame (HostMemory's contract).
        unsafe { core::ptr::copy_nonoverlapping(self.virt(addr), buf.as_mut_ptr(), buf.len()) }
    }

    /// Clears the frame at `frame` in place (one fill, no zeroed buffer to copy from) and
    /// counts the ticks it took (see [`frame_clears`]).
    fn clear(&self, frame: HostPhysAddr) {
        let start = super::ticks();
        // SAFETY: as in `write`: the whole frame is the caller's and mapped at `offset`.
        unsafe { core::ptr::write_bytes(self.virt(frame.page_base()), 0, PAGE_SIZE as usize) }
        CLEAR_TICKS.fetch_add(super::ticks() - start, Ordering::Relaxed);
        CLEARS.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, addr: HostPhysAddr, data: &[u8]) {
        // SAFETY: as in `read`; the frame is held by the caller, so no Rust reference aliases
        // the bytes written.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.virt(addr), data.len()) }
    }

    /// The 8-byte aligned word at `addr` as an atomic (an EPT entry that other CPUs, and the
    /// processor's accessed/dirty updates, change concurrently).
    fn word(&self, addr: HostPhysAddr) -> &AtomicU64 {
        assert!(addr.as_u64().is_multiple_of(8), "EPT entries are 8-byte aligned");
        // SAFETY: all physical memory is mapped at `offset` (`new`'s contract) and stays mapped
        // while `self` lives; the address is 8-byte aligned (checked above), and the words
        // reached this way (EPT entries of tables the caller holds) are only accessed
        // atomically while other CPUs may reach them.
        unsafe { AtomicU64::from_ptr(self.virt(addr).cast::<u64>()) }
    }

    fn load_word(&self, addr: HostPhysAddr) -> u64 {
        self.word(addr).load(Ordering::SeqCst)
    }

    fn exchange_word(&self, addr: HostPhysAddr, current: u64, new: u64) -> Result<(), u64> {
        self.word(addr)
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())
    }
}

// SAFETY: every physical address is mapped at `offset` (`PhysMap::new`'s contract), and a
// write copies exactly the bytes addressed. The reference is what each VM's manager holds (the
// window is shared, not copied).
unsafe impl HostMemory for &PhysMap {
    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
        PhysMap::read(self, addr, buf)
    }

    fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
        PhysMap::write(self, addr, data)
    }

    fn read_u64(&self, addr: HostPhysAddr) -> u64 {
        PhysMap::load_word(self, addr)
    }

    fn compare_exchange_u64(&self, addr: HostPhysAddr, current: u64, new: u64) -> Result<(), u64> {
        PhysMap::exchange_word(self, addr, current, new)
    }

    fn zero_frame(&mut self, frame: HostPhysAddr) {
        PhysMap::clear(self, frame)
    }
}

/// The ramdisk the bootloader loaded with the kernel (`cargo xtask` packs guest images into
/// it), if there is one.
#[cfg_attr(feature = "kernel-tests", allow(dead_code))]
pub fn ramdisk(boot_info: &bootloader_api::BootInfo) -> Option<&'static [u8]> {
    let start = boot_info.ramdisk_addr.into_option()?;
    let len = usize::try_from(boot_info.ramdisk_len).ok()?;
    if len == 0 {
        return None;
    }
    // SAFETY: the bootloader mapped the ramdisk's `len` bytes at `start` in the kernel's
    // address space for the kernel's whole life, and reported its frames as used (not
    // `Usable`), so the frame allocator never hands them out and nothing writes them.
    Some(unsafe { core::slice::from_raw_parts(start as *const u8, len) })
}
