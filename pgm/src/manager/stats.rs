//! The counts a VM keeps of its pages and frames, and the seed's memory reports built from
//! them (PGMR3QueryMemoryStats, PGMR3QueryGlobalMemoryStats).

use crate::addr::PAGE_SIZE;
use crate::frames::FrameCounts;
use crate::page::PageState;

/// Page and frame counts of one VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Pages under the page-state machine: RAM pages and the shadows of shadowed ROM.
    pub ram_pages: u64,
    /// Pages reading as zeros from the shared zero frame.
    pub zero_pages: u64,
    /// Pages with a private frame, writable.
    pub allocated_pages: u64,
    /// Pages with a private frame, write-protected by write monitoring.
    pub write_monitored_pages: u64,
    /// Pages mapping a shared frame.
    pub shared_pages: u64,
    /// Distinct shared frames.
    pub shared_frames: u64,
    /// Pages given to the balloon.
    pub ballooned_pages: u64,
    /// MMIO pages (in ranges of their own or replacing RAM).
    pub mmio_pages: u64,
    /// ROM pages, each holding a frame with its part of the image.
    pub rom_pages: u64,
    /// Frames of MMIO2 regions, mapped or not.
    pub mmio2_frames: u64,
    /// Frames waiting in the handy pool.
    pub handy_frames: u64,
    /// Freed frames not yet given back to the allocator.
    pub pending_free_frames: u64,
    /// Host frames holding EPT tables.
    pub table_frames: u64,
    /// Frames of the zero chunk (2 MiB of zeros mapping untouched large blocks): 0 or 512.
    pub zero_chunk_frames: u64,
    /// Private frames handed out since creation.
    pub private_allocations: u64,
    /// Pages holding at least one read map lock (cReadLockedPages).
    pub read_locked_pages: u64,
    /// Pages holding at least one write map lock (cWriteLockedPages).
    pub write_locked_pages: u64,
}

impl MemoryStats {
    /// The pages per state: zero, allocated, write-monitored, shared, ballooned.
    pub fn state_counts(&self) -> [u64; 5] {
        [
            self.zero_pages,
            self.allocated_pages,
            self.write_monitored_pages,
            self.shared_pages,
            self.ballooned_pages,
        ]
    }

    /// Frames backing guest pages.
    pub fn private_frames(&self) -> u64 {
        self.allocated_pages + self.write_monitored_pages
    }

    /// Host frames this VM holds from the allocator: private, handy, pending, tables and the
    /// shared zero frame.
    pub fn host_frames(&self) -> u64 {
        self.private_frames()
            + self.rom_pages
            + self.shared_frames
            + self.mmio2_frames
            + self.handy_frames
            + self.pending_free_frames
            + self.table_frames
            + self.zero_chunk_frames
            + 1
    }
}

impl MemoryStats {
    /// What PGMR3QueryMemoryStats reports for this VM, in bytes.
    pub fn report(&self) -> VmMemoryReport {
        VmMemoryReport {
            total: (self.ram_pages + self.rom_pages + self.mmio2_frames) * PAGE_SIZE,
            private: (self.private_frames() + self.rom_pages + self.mmio2_frames) * PAGE_SIZE,
            shared: self.shared_pages * PAGE_SIZE,
            zero: self.zero_pages * PAGE_SIZE,
        }
    }
}

/// One VM's memory as PGMR3QueryMemoryStats reports it, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmMemoryReport {
    /// Every page the VM has memory for: RAM and ROM shadows, ROM images, MMIO2 (cbTotalMem).
    pub total: u64,
    /// Pages backed by a frame of their own (cbPrivateMem).
    pub private: u64,
    /// Pages backed by a shared frame (cbSharedMem).
    pub shared: u64,
    /// Pages reading as zeros from the zero frame (cbZeroMem).
    pub zero: u64,
}

/// The host's memory as PGMR3QueryGlobalMemoryStats reports it, in bytes: the frame
/// allocator's counts with the VMs' balloons and shared frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalMemoryReport {
    /// Frames the allocator manages (cbTotalMem).
    pub total: u64,
    /// Frames handed out (cbUsedMem).
    pub used: u64,
    /// Frames free (cbFreeMem).
    pub free: u64,
    /// Pages the VMs gave to their balloons (cbBalloonedMem).
    pub ballooned: u64,
    /// Shared frames of the VMs (cbSharedMem).
    pub shared: u64,
}

impl GlobalMemoryReport {
    /// The report for a host whose allocator counts `host`, running VMs with `vms`.
    pub fn new(host: FrameCounts, vms: &[MemoryStats]) -> Self {
        GlobalMemoryReport {
            total: host.total * PAGE_SIZE,
            used: host.used() * PAGE_SIZE,
            free: host.free * PAGE_SIZE,
            ballooned: vms.iter().map(|vm| vm.ballooned_pages).sum::<u64>() * PAGE_SIZE,
            shared: vms.iter().map(|vm| vm.shared_frames).sum::<u64>() * PAGE_SIZE,
        }
    }
}

/// Pages per state, kept in step with every transition.
#[derive(Clone, Copy, Default)]
pub(super) struct StateCounts {
    pub(super) zero: u64,
    pub(super) allocated: u64,
    pub(super) write_monitored: u64,
    pub(super) shared: u64,
    pub(super) ballooned: u64,
    pub(super) mmio: u64,
    pub(super) rom: u64,
}

impl StateCounts {
    /// Counts `pages` write-monitored pages that lock-free faults made ALLOCATED.
    pub(super) fn lock_free_written(&mut self, pages: u64) {
        self.write_monitored -= pages;
        self.allocated += pages;
    }

    pub(super) fn of(&mut self, state: PageState) -> &mut u64 {
        match state {
            PageState::Zero => &mut self.zero,
            PageState::Allocated => &mut self.allocated,
            PageState::WriteMonitored => &mut self.write_monitored,
            PageState::Shared => &mut self.shared,
            PageState::Ballooned => &mut self.ballooned,
        }
    }
}
