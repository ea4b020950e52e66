//! The memory manager of one VM: RAM ranges, page descriptors, host frames and the EPT tables
//! built from the descriptors, with fault resolution and host access to guest memory.
//!
//! Locking: a `Pgm` is not shared; every mutating call takes `&mut self`, so the caller's
//! ownership (one VM, one vCPU loop) is the lock.

use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::ept::{ept_pointer, Ept};
use crate::error::PgmError;
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::page::{transition, FrameEffect, PageDescriptor, PageEvent, PageState, PageType};
use crate::paging::{self, Access, Invalidation, Leaf, MemoryType, NestedTables, Permissions, Violation};
use crate::ram::{PageLocation, RamRange, RamRanges};

/// What a fault resolution decided. The caller resumes the guest only for `Resolved`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The mapping was updated; retry the access after the named invalidation.
    Resolved {
        /// The TLB flush needed before resuming.
        invalidation: Invalidation,
    },
    /// The address lies in no registered range.
    NotGuestMemory,
    /// A frame was needed and the allocator had none; nothing was changed.
    OutOfMemory,
}

/// Page counts of one VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Pages in all registered RAM ranges.
    pub ram_pages: u64,
    /// Pages reading as zeros from the shared zero frame.
    pub zero_pages: u64,
    /// Pages with a private host frame.
    pub allocated_pages: u64,
    /// Host frames holding EPT tables.
    pub table_frames: u64,
}

impl MemoryStats {
    /// Host frames this VM holds: private pages, tables and the shared zero frame.
    pub fn host_frames(&self) -> u64 {
        self.allocated_pages + self.table_frames + 1
    }
}

/// The memory manager of one VM, generic over the host's frame allocator `A` and its access to
/// host-physical memory `M`.
pub struct Pgm<A: HostFrameAllocator, M: HostMemory> {
    frames: A,
    memory: M,
    ranges: RamRanges,
    zero_frame: HostPhysAddr,
    tables: NestedTables<Ept>,
    zero_pages: u64,
    allocated_pages: u64,
}

impl<A: HostFrameAllocator, M: HostMemory> Pgm<A, M> {
    /// Creates an empty manager: allocates the shared zero frame and the EPT root table.
    /// Fails with [`PgmError::OutOfFrames`], holding no frame.
    pub fn new(mut frames: A, mut memory: M) -> Result<Self, PgmError> {
        let zero_frame = frames.allocate_frame().ok_or(PgmError::OutOfFrames)?;
        memory.zero_frame(zero_frame);
        let tables = match NestedTables::new(&mut frames, &mut memory) {
            Ok(tables) => tables,
            Err(error) => {
                frames.free_frame(zero_frame);
                return Err(error);
            }
        };
        Ok(Pgm {
            frames,
            memory,
            ranges: RamRanges::default(),
            zero_frame,
            tables,
            zero_pages: 0,
            allocated_pages: 0,
        })
    }

    /// Registers `size` bytes of RAM at `base`, every page ZERO and mapped read/execute to the
    /// zero frame. `base` and `size` must be page-aligned, `size` non-zero, the range inside the
    /// 48-bit guest-physical width and clear of every registered range. On error nothing changes.
    /// New mappings replace absent entries, so no invalidation is needed.
    pub fn register_ram(
        &mut self,
        base: GuestPhysAddr,
        size: u64,
        name: &'static str,
    ) -> Result<(), PgmError> {
        if size == 0 {
            return Err(PgmError::ZeroSize);
        }
        if !base.is_page_aligned() || !size.is_multiple_of(PAGE_SIZE) {
            return Err(PgmError::Misaligned);
        }
        base.checked_add(size - 1).ok_or(PgmError::BeyondAddressWidth)?;
        self.ranges.check_free(base, size)?;
        let pages = size / PAGE_SIZE;
        let zero = PageDescriptor::zero(PageType::Ram);
        let zero_leaf = leaf_for(zero, self.zero_frame);
        self.tables
            .map_range(&mut self.frames, &mut self.memory, base, pages, |_| zero_leaf)?;
        let mut descriptors = Vec::new();
        descriptors.resize(pages as usize, zero);
        self.ranges.insert(RamRange::new(base, descriptors, name));
        self.zero_pages += pages;
        Ok(())
    }

    /// Resolves an EPT violation at `gpa` for `access`. A write to a ZERO page gets a zero-filled
    /// private frame mapped read/write/execute. The violation itself flushed the CPU's cached
    /// translations for `gpa` (SDM 29.4.3.1), so a resolution that changes only that page's
    /// entry needs no INVEPT.
    pub fn resolve_fault(&mut self, gpa: GuestPhysAddr, access: Access) -> FaultOutcome {
        let Some(location) = self.ranges.find(gpa) else {
            return FaultOutcome::NotGuestMemory;
        };
        let result = match access {
            Access::Write => self.apply(location, PageEvent::Write).map(|_| ()),
            // Every RAM page is mapped readable and executable in every state, so a read or fetch
            // fault means the entry lost sync with the descriptor: rewrite it.
            Access::Read | Access::Execute => {
                self.sync_leaf(location);
                Ok(())
            }
        };
        match result {
            Ok(()) => FaultOutcome::Resolved {
                invalidation: Invalidation::None,
            },
            Err(_) => FaultOutcome::OutOfMemory,
        }
    }

    /// Copies guest memory at `gpa` into `buf`, across pages and ranges. ZERO pages read as
    /// zeros without allocating. Fails with [`PgmError::NotGuestMemory`] (naming the first
    /// address outside RAM) before copying anything.
    pub fn read_phys(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), PgmError> {
        let chunks = self.chunks(gpa, buf.len())?;
        let mut done = 0;
        for (location, offset, len) in chunks {
            let out = &mut buf[done..done + len];
            match self.ranges.page(location).frame() {
                Some(frame) => self.memory.read(frame_offset(frame, offset), out),
                None => out.fill(0),
            }
            done += len;
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`, across pages and ranges, giving ZERO pages a
    /// frame first. All or nothing: on [`PgmError::NotGuestMemory`] or
    /// [`PgmError::OutOfFrames`] guest memory and the frame counts are as before. Returns the
    /// invalidation needed because pages the guest may have cached changed their mapping.
    pub fn write_phys(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<Invalidation, PgmError> {
        let chunks = self.chunks(gpa, data.len())?;
        let mut newly_allocated = Vec::new();
        for &(location, _, _) in &chunks {
            match self.apply(location, PageEvent::Write) {
                Ok(true) => newly_allocated.push(location),
                Ok(false) => {}
                Err(error) => {
                    for location in newly_allocated {
                        // Reset frees the frame just given: cannot fail.
                        let _ = self.apply(location, PageEvent::Reset);
                    }
                    return Err(error);
                }
            }
        }
        let mut done = 0;
        for &(location, offset, len) in &chunks {
            if let Some(frame) = self.ranges.page(location).frame() {
                self.memory
                    .write(frame_offset(frame, offset), &data[done..done + len]);
            }
            done += len;
        }
        Ok(if newly_allocated.is_empty() {
            Invalidation::None
        } else {
            Invalidation::SingleContext
        })
    }

    /// Returns every page of every range to ZERO, freeing private frames (VM reset).
    pub fn reset_ram(&mut self) -> Invalidation {
        let mut changed = false;
        for range in 0..self.ranges.len() {
            let pages = self.ranges.get(range).map_or(0, |r| r.pages().len());
            for page in 0..pages {
                // Reset never allocates, so it cannot fail.
                changed |= self
                    .apply(PageLocation { range, page }, PageEvent::Reset)
                    .unwrap_or(false);
            }
        }
        if changed {
            Invalidation::SingleContext
        } else {
            Invalidation::None
        }
    }

    /// Frees every frame the VM holds (private pages, tables, zero frame) and hands back the
    /// allocator and memory. The tables must no longer be in use by a CPU.
    pub fn terminate(mut self) -> (A, M) {
        for range in self.ranges.iter_mut() {
            for page in range.pages_mut() {
                if let Some(frame) = page.frame() {
                    self.frames.free_frame(frame);
                }
            }
        }
        self.tables.destroy(&mut self.frames, &self.memory);
        self.frames.free_frame(self.zero_frame);
        (self.frames, self.memory)
    }

    /// The descriptor of the page holding `gpa`, if it is guest RAM.
    pub fn page(&self, gpa: GuestPhysAddr) -> Option<PageDescriptor> {
        self.ranges.find(gpa).map(|location| self.ranges.page(location))
    }

    /// The registered RAM ranges.
    pub fn ranges(&self) -> &RamRanges {
        &self.ranges
    }

    /// Page and frame counts.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            ram_pages: self.zero_pages + self.allocated_pages,
            zero_pages: self.zero_pages,
            allocated_pages: self.allocated_pages,
            table_frames: self.tables.table_frames() as u64,
        }
    }

    /// The shared zero frame every ZERO page maps to.
    pub fn zero_frame(&self) -> HostPhysAddr {
        self.zero_frame
    }

    /// The EPT pointer for the VMCS (A/D flags enabled when `accessed_dirty`).
    pub fn ept_pointer(&self, accessed_dirty: bool) -> u64 {
        ept_pointer(self.tables.root(), accessed_dirty)
    }

    /// The 4 KiB EPT entry mapping `gpa`, decoded.
    pub fn ept_entry(&self, gpa: GuestPhysAddr) -> paging::Entry {
        self.tables.entry(&self.memory, gpa)
    }

    /// Translates a guest access through the EPT tables exactly as the CPU would.
    pub fn translate(&self, gpa: GuestPhysAddr, access: Access) -> Result<HostPhysAddr, Violation> {
        paging::translate::<Ept>(&self.memory, self.tables.root(), gpa, access)
    }

    /// The frame allocator (for its counters).
    pub fn frames(&self) -> &A {
        &self.frames
    }

    /// The frame allocator, mutable (tests inject failures through it).
    pub fn frames_mut(&mut self) -> &mut A {
        &mut self.frames
    }

    /// Host-physical memory access.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// Host-physical memory access, mutable: what the guest does to its own frames (simulated
    /// guests in tests write through this). Writing the manager's tables here bypasses it.
    pub fn memory_mut(&mut self) -> &mut M {
        &mut self.memory
    }

    /// Runs `event` through the state machine for one page and carries out the frame work and
    /// the EPT update. Returns whether the page's mapping changed; on
    /// [`PgmError::OutOfFrames`] nothing changed.
    fn apply(&mut self, location: PageLocation, event: PageEvent) -> Result<bool, PgmError> {
        let page = self.ranges.page(location);
        let step = transition(page, event);
        if !step.changes_mapping(page.state()) {
            return Ok(false);
        }
        let new_frame = match step.effect {
            FrameEffect::AllocateZeroed => {
                let frame = self.frames.allocate_frame().ok_or(PgmError::OutOfFrames)?;
                self.memory.zero_frame(frame);
                Some(frame)
            }
            FrameEffect::None | FrameEffect::Free(_) => None,
        };
        let next = step.apply(page, new_frame);
        self.ranges.set_page(location, next);
        self.count(page.state(), next.state());
        self.sync_leaf(location);
        // Freed only now: the EPT entry no longer names the frame.
        if let FrameEffect::Free(frame) = step.effect {
            self.frames.free_frame(frame);
        }
        Ok(true)
    }

    /// Rewrites the EPT entry of the page at `location` from its descriptor.
    fn sync_leaf(&mut self, location: PageLocation) {
        let gpa = self.ranges.gpa_of(location);
        let leaf = leaf_for(self.ranges.page(location), self.zero_frame);
        // Tables exist for every page of a registered range.
        let present = self.tables.set_leaf(&mut self.memory, gpa, leaf);
        debug_assert!(present, "registered page {gpa} has no page table");
    }

    /// Moves one page from the count of `from` to the count of `to`.
    fn count(&mut self, from: PageState, to: PageState) {
        *self.counter(from) -= 1;
        *self.counter(to) += 1;
    }

    fn counter(&mut self, state: PageState) -> &mut u64 {
        match state {
            PageState::Zero => &mut self.zero_pages,
            PageState::Allocated => &mut self.allocated_pages,
        }
    }

    /// Splits `[gpa, gpa + len)` into per-page pieces `(page, offset in page, length)`, or names
    /// the first address that is not guest RAM.
    fn chunks(&self, gpa: GuestPhysAddr, len: usize) -> Result<Vec<(PageLocation, u64, usize)>, PgmError> {
        let mut chunks = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = gpa.checked_add(done as u64).ok_or(PgmError::BeyondAddressWidth)?;
            let location = self.ranges.find(at).ok_or(PgmError::NotGuestMemory(at))?;
            let offset = at.page_offset();
            let piece = ((PAGE_SIZE - offset) as usize).min(len - done);
            chunks.push((location, offset, piece));
            done += piece;
        }
        Ok(chunks)
    }
}

/// The EPT mapping a page's descriptor calls for: ZERO RAM maps the shared zero frame
/// read/execute, so the first write faults; ALLOCATED RAM maps its frame read/write/execute.
/// RAM is write-back.
fn leaf_for(page: PageDescriptor, zero_frame: HostPhysAddr) -> Option<Leaf> {
    let (frame, permissions) = match (page.page_type(), page.state()) {
        (PageType::Ram, PageState::Zero) => (zero_frame, Permissions::READ | Permissions::EXECUTE),
        (PageType::Ram, PageState::Allocated) => (page.frame()?, Permissions::all()),
    };
    Some(Leaf {
        frame,
        permissions,
        memory_type: MemoryType::WriteBack,
    })
}

fn frame_offset(frame: HostPhysAddr, offset: u64) -> HostPhysAddr {
    HostPhysAddr::new_truncate(frame.as_u64() + offset)
}
