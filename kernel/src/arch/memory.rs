//! Host memory: the kernel heap, the host frame allocator built from the boot memory map, and
//! access to host-physical memory through the bootloader's physical-memory mapping.

use alloc::vec::Vec;

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use core::sync::atomic::{AtomicU64, Ordering};
use linked_list_allocator::LockedHeap;
use pgm::frames::{BitmapFrameAllocator, FrameCounts, HostFrameAllocator, HostMemory};
use pgm::{HostPhysAddr, PAGE_SIZE};
use spin::Mutex;

/// Kernel heap size: descriptors, the frame bitmap and test bookkeeping live here.
const HEAP_SIZE: usize = 8 * 1024 * 1024;
/// Frames below 1 MiB are left to firmware and real-mode structures.
const LOWEST_FRAME: u64 = 0x10_0000;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// The host's frames, shared by every VM (the counterpart of VirtualBox's GMM).
static FRAMES: Mutex<Option<BitmapFrameAllocator>> = Mutex::new(None);

/// Hands the heap its memory. Call once at boot, before anything allocates.
/// Bytes of the kernel heap free now (fragmented: the largest block may be smaller).
#[cfg_attr(feature = "kernel-tests", allow(dead_code))]
pub fn heap_free() -> usize {
    HEAP.lock().free()
}

pub fn init_heap() {
    static mut HEAP_SPACE: [u8; HEAP_SIZE] = [0; HEAP_SIZE];
    // SAFETY: HEAP_SPACE is used by nothing else, and init_heap runs once, before any allocation.
    unsafe { HEAP.lock().init((&raw mut HEAP_SPACE).cast(), HEAP_SIZE) };
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

/// The allocator's counters (all zero before [`init_frames`]).
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

pub fn frame_counts() -> FrameCounts {
    FRAMES.lock().as_ref().map(|f| f.counts()).unwrap_or_default()
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
