//! The memory manager of one VM: RAM ranges, page descriptors, host frames and the EPT tables
//! built from the descriptors, with fault resolution and host access to guest memory.
//!
//! Locking, for every public call (the seed's "caller holds the PGM lock"): a VM's vCPUs share
//! one `Pgm` behind one reader-writer lock the host keeps (the kernel's `VmMemory::lock`, a
//! `brlock::BrLock`). [`Pgm::resolve_fault_lock_free`] runs on its read side, concurrently with
//! other lock-free faults (see `lock_free`); every other call runs on its write side, `&self`
//! calls included (they may read tables word by word while a lock-free fault exchanges an
//! entry, and their counts would be snapshots). None blocks, sleeps or waits for another CPU.
//! A call that returns an [`Invalidation`] other than `None` has changed what CPUs may cache:
//! the caller carries it out on every CPU that ran the VM after releasing the lock, and frames
//! the change took from the guest stay unused until a complete flush that began after it has
//! ended ([`Pgm::begin_tlb_flush`] / [`Pgm::end_tlb_flush`], each under the lock, the CPUs'
//! flushes between them without it). Nothing here needs the vCPUs stopped: a harvest,
//! write-protect-all or balloon change runs while they run, their faults waiting for the lock;
//! the host stops them only where the guest must not run meanwhile (a reset).

use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::ept::Ept;
use crate::error::{AccessError, Failure, NoMemory, PageError, RamError, RangeError};
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::handlers::{HandlerId, Handlers};
use crate::page::{
    transition, FrameEffect, HandlerState, LargePageState, PageDescriptor, PageEvent, PageState, PageType,
};
use crate::paging::EntryFormat;
use crate::paging::{self, Access, Invalidation, NestedTables, Violation};
use crate::pool::FramePool;
use crate::ram::{PageLocation, RamRange, RamRanges};

mod audit;
mod dirty_log;
mod dump;
mod handlers;
mod large;
mod lazy_protection;
mod lock_free;
mod locks;
mod mapping;
mod mmio2;
mod rom;
mod sharing;
mod stats;

pub use audit::{AuditReport, Finding, Problem};
pub use dirty_log::DirtyLogMode;
pub use handlers::{AccessHandlers, HandlerAction, MmioTarget};
use lazy_protection::counted_locked_allocated;
pub use lock_free::WRITTEN_LOG_ENTRIES;
pub use locks::{PageMapLock, PageMapping, PAGE_MAX_LOCKS};
pub use mmio2::{DeviceId, Mmio2Handle, Mmio2Spec, MMIO2_MAX_PAGES, MMIO2_MAX_REGIONS};
pub use rom::{RomId, RomImage, RomProtection, RomTarget};
pub use sharing::SharingReport;
use stats::StateCounts;
pub use stats::{GlobalMemoryReport, MemoryStats, VmMemoryReport};

/// What a resolved fault did to its page (for the VMM's exit statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A ZERO page got a zero-filled frame of its own (or its whole 2 MiB block did).
    ZeroFill,
    /// A write-monitored page was marked written and made writable.
    WriteMonitor,
    /// A SHARED page got a private copy.
    CopyOnWrite,
    /// The page kept its frame and only its entry was rewritten: a tracked MMIO2 page marked
    /// dirty, a ROM shadow in read/write-RAM mode, an entry that lost sync, an A20 alias.
    Remap,
}

/// What a fault resolution decided. The caller resumes the guest only for `Resolved`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The mapping was updated; retry the access after the named invalidation.
    Resolved {
        /// The TLB flush needed before resuming.
        invalidation: Invalidation,
        /// What was done.
        resolution: Resolution,
    },
    /// The address lies in no registered range.
    NotGuestMemory,
    /// The guest touched a page it gave to the balloon. The page stays unmapped (it has no
    /// frame); the VMM emulates the access as the seed does (PGMAllBth.h 840-849: "emulate
    /// reads from ballooned pages"): [`Pgm::read_phys`] reads it as zeros and
    /// [`Pgm::write_phys`] drops what is written to it.
    Ballooned,
    /// A write to ROM whose protection ignores writes: the VMM skips the instruction.
    WriteIgnored,
    /// A write to ROM that goes to its shadow while reads still come from the ROM image, so the
    /// page cannot be mapped for it: the VMM emulates the instruction and hands the data to
    /// [`Pgm::write_phys`], which routes it to the shadow.
    EmulateWrite,
    /// The access belongs to an access handler or MMIO region: the VMM performs (emulates) it.
    Handler {
        /// The handler or MMIO region.
        handler: HandlerId,
    },
    /// A frame was needed and none could be had (host exhausted or the VM's limit reached).
    /// The page may have changed state (a write filled it, say), but its mapping could not be
    /// completed: the VMM pauses the VM; the same access, retried once frames are back,
    /// resolves (the kernel stops the VM instead, with `StopCause::OutOfMemory`).
    OutOfMemory,
}

/// Little-endian 1/2/4/8-byte accessors, each in two variants (a value may straddle pages and
/// ranges):
/// - `read_phys_uN` / `write_phys_uN` are the seed's PGMR3PhysReadU8..U64 and
///   PGMR3PhysWriteU8..U64, which go through PGMPhysRead/PGMPhysWrite: bytes an access handler
///   or MMIO region intercepts go to `handlers`, unassigned space reads as all ones and drops
///   writes (see [`Pgm::read_phys_external`]).
/// - `read_phys_uN_bypassing_handlers` / `write_phys_uN_bypassing_handlers` touch memory only,
///   as [`Pgm::read_phys`] / [`Pgm::write_phys`] do (the seed's PGMPhysSimpleReadGCPhys).
macro_rules! typed_phys_access {
    ($($read:ident, $write:ident, $read_raw:ident, $write_raw:ident, $ty:ty;)*) => {$(
        #[doc = concat!("Reads a little-endian `", stringify!($ty), "` at `gpa` as the guest \
            would see it, handlers and MMIO included (see `read_phys_external`).")]
        pub fn $read(
            &self,
            gpa: GuestPhysAddr,
            handlers: &mut impl AccessHandlers,
        ) -> Result<$ty, AccessError> {
            let mut bytes = [0u8; core::mem::size_of::<$ty>()];
            self.read_phys_external(gpa, &mut bytes, handlers)?;
            Ok(<$ty>::from_le_bytes(bytes))
        }

        #[doc = concat!("Writes a little-endian `", stringify!($ty), "` at `gpa` as a guest \
            store would land, handlers and MMIO included (see `write_phys_external`).")]
        pub fn $write(
            &mut self,
            gpa: GuestPhysAddr,
            value: $ty,
            handlers: &mut impl AccessHandlers,
        ) -> Result<Invalidation, AccessError> {
            self.write_phys_external(gpa, &value.to_le_bytes(), handlers)
        }

        #[doc = concat!("Reads a little-endian `", stringify!($ty), "` at `gpa` from memory \
            only, bypassing access handlers (see `read_phys`).")]
        pub fn $read_raw(&self, gpa: GuestPhysAddr) -> Result<$ty, AccessError> {
            let mut bytes = [0u8; core::mem::size_of::<$ty>()];
            self.read_phys(gpa, &mut bytes)?;
            Ok(<$ty>::from_le_bytes(bytes))
        }

        #[doc = concat!("Writes a little-endian `", stringify!($ty), "` at `gpa` to memory \
            only, bypassing access handlers (see `write_phys`).")]
        pub fn $write_raw(
            &mut self,
            gpa: GuestPhysAddr,
            value: $ty,
        ) -> Result<Invalidation, AccessError> {
            self.write_phys(gpa, &value.to_le_bytes())
        }
    )*};
}

/// A TLB flush begun with [`Pgm::begin_tlb_flush`]: the frames retired before it wait until
/// [`Pgm::end_tlb_flush`] is given it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the frames retired before the flush are freed only when it ends"]
pub struct TlbFlush(u64);

/// The memory manager of one VM, generic over the host's frame allocator `A`, its access to
/// host-physical memory `M` and the nested-paging format `F` ([`Ept`] or [`crate::Npt`]).
///
/// Its methods come in facets, each an `impl` block below with the seed's names in its title:
///
/// | facet | methods | the seed's |
/// |---|---|---|
/// | creation, frames, flushes | `new`, `set_frame_limit`, `begin_tlb_flush` / `end_tlb_flush` | PGMR3Init, the handy pages |
/// | RAM | `register_ram`, `unregister_ram`, `preallocate_ram`, `set_ram_preallocation` | PGMR3PhysRegisterRam |
/// | guest faults | `resolve_fault`, `resolve_fault_lock_free`, `mmio_target` | PGMR0Trap0eHandlerNestedPaging |
/// | host access, handlers bypassed | `read_phys`, `write_phys`, `read_phys_u32_bypassing_handlers`, … | PGMPhysSimpleReadGCPhys |
/// | host access, as the guest sees it | `read_phys_handled`, `read_phys_external`, `read_phys_u32`, `read_mmio`, … | PGMPhysRead, PGMR3PhysReadU32 |
/// | access handlers and MMIO | `register_handler`, `register_mmio`, `alias_mmio_to_mmio2`, `reset_handler`, … | PGMHandlerPhysical*, PGMR3PhysMMIORegister |
/// | ROM | `register_rom`, `protect_rom_range`, `deregister_rom` | PGMR3PhysRomRegister / Protect |
/// | MMIO2 | `create_mmio2`, `map_mmio2`, `query_and_reset_mmio2_dirty`, … | PGMR3PhysMmio2* |
/// | page-map locks | `lock_page_for_write`, `lock_pages`, `release_page_lock` | PGMPhysGCPhys2CCPtr |
/// | write monitoring | `start_write_monitoring`, `harvest_written`, `set_dirty_log_mode`, `log_written` | PGMR3PhysWriteProtectRAM |
/// | balloon | `balloon_inflate`, `balloon_deflate` | PGMR3PhysChangeMemBalloon |
/// | reset | `reset_ram`, `set_zero_ram_on_reset` | pgmR3PhysRamReset |
/// | large pages, sharing | `set_large_pages`, `share_identical_pages` | PGMR3PhysAllocateLargeHandyPage, page fusion |
/// | A20 | `set_a20`, `a20_apply` | PGMR3PhysSetA20 |
/// | inspection | `page`, `ranges`, `stats`, `translate`, `audit`, `physical_map` | PGMR3QueryMemoryStats, `info phys` |
///
/// Errors are per family ([`crate::error`]); every call that changes mappings returns the
/// [`Invalidation`] the caller carries out.
///
/// Side records: every field that describes the tables or the descriptors rather than being
/// them says, in its doc, the rule that ties it to them, and the auditor (`audit`) checks that
/// rule after every step of the whole-API script: a stale entry is a finding before it writes
/// a wrong leaf. State that can live in the tables lives there instead (a block unmapped for
/// want of a page table is marked in its own directory entry; write monitoring's pending
/// protection is a mark on the entries above the leaves).
pub struct Pgm<A: HostFrameAllocator, M: HostMemory, F: EntryFormat = Ept> {
    frames: A,
    memory: M,
    ranges: RamRanges,
    zero_frame: HostPhysAddr,
    /// 2 MiB of zeros, mapped read-only by one 2 MiB leaf for every untouched block of RAM
    /// registered while large pages are on (see `large`); taken at the first such registration.
    zero_chunk: Option<HostPhysAddr>,
    tables: NestedTables<F>,
    /// Rule: no frame in the pool (handy, free batch, awaiting a flush) is held by a page, ROM,
    /// MMIO2 region or shared count, or reached by a leaf; each is allocated at the host.
    pool: FramePool,
    /// Rule: equal, state by state, to the pages counted one by one through the pending view
    /// (`recount_states`); the script checks it after every step.
    counts: StateCounts,
    /// Write monitoring is on: content changes mark pages written-to.
    monitoring: bool,
    /// How monitoring learns of guest writes (see `dirty_log`).
    dirty_log_mode: DirtyLogMode,
    /// Pages whose written-to flag was set since the last harvest, in order. Addresses, not
    /// locations: range indices shift when ranges come and go. Rule: empty while monitoring
    /// is off; every entry lies in a range (a range that leaves takes its entries along).
    written: Vec<GuestPhysAddr>,
    /// Rule: registrations do not overlap and lie in ranges; every page under one shows its
    /// kind or is disabled, every page outside them shows none.
    handlers: Handlers,
    roms: Vec<rom::RomRange>,
    /// The A20 gate: when off, bit 20 of every guest-physical address reads as 0.
    a20_enabled: bool,
    /// Pages outside every range mapped as A20 aliases while the gate was off (unmapped again
    /// when it opens). Rule: recorded only while the gate is closed, each once, with bit 20
    /// set and outside every range (a range that takes an address over drops it: opening the
    /// gate re-syncs every page of every range with bit 20 set).
    a20_aliases: Vec<GuestPhysAddr>,
    mmio2: Vec<mmio2::Mmio2Region>,
    next_mmio2: u32,
    /// Write faults may fill whole 2 MiB blocks (see `set_large_pages`).
    large_pages: bool,
    /// RAM registrations made so far (ids of `RamRange::registration`).
    registrations: u32,
    /// Shared frames and how many pages map each. Rule: each count is the pages whose
    /// descriptors share the frame plus the read locks pinning it (`share_pins`).
    shared: alloc::collections::BTreeMap<HostPhysAddr, u64>,
    /// Where frames no single page owns are mapped (see `mapping`). Rule: every leaf of such a
    /// frame and every A20-alias leaf is recorded with its frame, and every record has its
    /// leaf.
    reverse: mapping::ReverseMap,
    /// References read locks hold on shared frames (counted in `shared` as well).
    share_pins: alloc::collections::BTreeMap<HostPhysAddr, u64>,
    /// Lock counts too large for their descriptors (see `locks`). Rule: only for pages in a
    /// range whose descriptor shows the saturated count.
    lock_overflow: locks::LockOverflow,
    /// Pages holding read locks and pages holding write locks.
    locked_pages: LockedPages,
    /// Reset zeroes RAM (ZeroRamPagesOnReset; on by default).
    zero_on_reset: bool,
    /// RAM is pre-allocated, now and after every reset (fRamPreAlloc).
    preallocated: bool,
    /// Every frame has gone back to the host (`release_all` ran; only the drop may follow).
    released: bool,
    /// The vCPUs' written logs of the lock-free fault path (see `lock_free`). Rule: folded
    /// into `written` before a range leaves and before every harvest, so they follow its rule
    /// once folded (the auditor, reading only, does not drain them).
    lock_free: lock_free::LockFreeLogs,
    /// 2 MiB blocks the lock-free fault path settled (see `lazy_protection`), for the
    /// statistics.
    shared_settles: crate::sync::AtomicU64,
}

impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Drop for Pgm<A, M, F> {
    /// Gives back every frame the VM's memory holds — RAM, ROM images and shadows, MMIO2
    /// regions, shared frames, the pool, the EPT tables and the zero frame — so that a manager
    /// cannot leak frames by being forgotten. The caller must first make sure no CPU can still
    /// reach them (the kernel flushes every CPU that ran the VM before dropping it).
    fn drop(&mut self) {
        self.release_all();
    }
}

/// Shows the layout and the modes, with the page counts; not descriptors or tables.
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> core::fmt::Debug for Pgm<A, M, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Pgm")
            .field("ranges", &self.ranges)
            .field("nested_root", &self.tables.root())
            .field("stats", &self.stats())
            .field("monitoring", &self.monitoring)
            .field("a20_enabled", &self.a20_enabled)
            .field("large_pages", &self.large_pages)
            .finish_non_exhaustive()
    }
}

/// Pages holding map locks, by kind (cReadLockedPages, cWriteLockedPages).
#[derive(Clone, Copy, Default)]
struct LockedPages {
    read: u64,
    write: u64,
}

/// # Creating the manager, its frame supply and TLB flushes
///
/// The host's side of the bargain: frames come from `A` within the VM's limit, and frames
/// taken from the guest wait for a complete TLB flush before they are reused.
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Creates an empty manager: allocates the shared zero frame and the EPT root table.
    /// Fails with [`NoMemory::OutOfFrames`], holding no frame.
    pub fn new(mut frames: A, mut memory: M) -> Result<Self, NoMemory> {
        let zero_frame = frames.allocate_frame().ok_or(NoMemory::OutOfFrames)?;
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
            zero_chunk: None,
            tables,
            pool: FramePool::default(),
            counts: StateCounts::default(),
            monitoring: false,
            dirty_log_mode: DirtyLogMode::WriteProtect,
            written: Vec::new(),
            handlers: Handlers::default(),
            roms: Vec::new(),
            a20_enabled: true,
            a20_aliases: Vec::new(),
            mmio2: Vec::new(),
            next_mmio2: 0,
            large_pages: true,
            shared: alloc::collections::BTreeMap::new(),
            registrations: 0,
            reverse: mapping::ReverseMap::default(),
            share_pins: alloc::collections::BTreeMap::new(),
            lock_overflow: locks::LockOverflow::new(),
            locked_pages: LockedPages::default(),
            zero_on_reset: true,
            preallocated: false,
            released: false,
            lock_free: lock_free::LockFreeLogs::default(),
            shared_settles: crate::sync::AtomicU64::new(0),
        })
    }

    /// Caps the frames backing this VM's pages (`None`: no cap but the host's memory). A write
    /// that would need a frame beyond the cap faults as [`FaultOutcome::OutOfMemory`].
    pub fn set_frame_limit(&mut self, limit: Option<u64>) {
        self.pool.set_limit(limit);
    }

    /// Starts a TLB flush of this VM's translations: call it before flushing (INVEPT) every
    /// CPU that ran the VM, and pass the ticket to [`end_tlb_flush`](Self::end_tlb_flush) once
    /// all have flushed every translation of the VM — the calling CPU included, so an
    /// [`Invalidation::OtherCpus`] flush does not qualify. Frames taken from the guest before
    /// this call (freed pages, removed ROMs and MMIO2 regions) are neither reused nor given
    /// back until then, since a stale translation on any CPU could still reach them. Locking:
    /// with the rest of the manager (the caller's VM lock); the lock need not be held while the
    /// CPUs flush.
    pub fn begin_tlb_flush(&mut self) -> TlbFlush {
        TlbFlush(self.pool.begin_flush())
    }

    /// Every CPU that ran the VM has flushed since `flush` began: the frames retired before it
    /// join the pending-free batch (reused by the next faults, or given back a batch at a
    /// time). Locking: as [`begin_tlb_flush`](Self::begin_tlb_flush).
    pub fn end_tlb_flush(&mut self, flush: TlbFlush) {
        self.pool.flushed(flush.0, &mut self.frames);
    }

    /// Frames taken from the guest that wait for a TLB flush to end before they can be reused.
    pub fn frames_awaiting_flush(&self) -> usize {
        self.pool.awaiting_flush()
    }

    /// Gives the frames the VM holds in reserve (the handy pool and the batch waiting to be
    /// freed) back to the host now, for a host under memory pressure (the seed's GMM can
    /// reclaim a VM's free pages). Faults and splits refill the pool when they next need a
    /// frame; frames awaiting a TLB flush stay until it ends. Needs no invalidation.
    pub fn release_idle_frames(&mut self) {
        self.pool.give_back_idle(&mut self.frames);
    }

    /// True when `frame` was taken from the guest and waits for a TLB flush to end.
    #[cfg(test)]
    pub(crate) fn is_awaiting_flush(&self, frame: HostPhysAddr) -> bool {
        self.pool.is_awaiting_flush(frame)
    }
}

/// # RAM (PGMR3PhysRegisterRam, pgmR3PhysRamPreAllocate, fRamPreAlloc)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Registers `size` bytes of RAM at `base`, every page ZERO and mapped read/execute to the
    /// zero frame (or given its frame now while pre-allocation is on). `base` and `size` must be
    /// page-aligned, `size` non-zero, the range inside the 48-bit guest-physical width and clear
    /// of every registered range. On error nothing changes.
    /// New mappings replace absent entries, so no invalidation is needed.
    pub fn register_ram(
        &mut self,
        base: GuestPhysAddr,
        size: u64,
        name: &'static str,
    ) -> Result<(), RamError> {
        let pages = page_count(base, size)?;
        self.ranges.check_free(base, size)?;
        // Large RAM becomes several ranges of at most RAM_CHUNK_PAGES, so no descriptor array
        // is a huge allocation; lookups do not care.
        let registration = self.registrations + 1;
        let mut chunks = Vec::new();
        let mut first = 0;
        while first < pages {
            let count = (pages - first).min(RAM_CHUNK_PAGES);
            let chunk_base = GuestPhysAddr::new_truncate(base.as_u64() + first * PAGE_SIZE);
            let chunk = RamRange::zero_ram(chunk_base, count as usize, name).ok_or(NoMemory::OutOfHeap)?;
            chunks.push(chunk.with_registration(registration));
            first += count;
        }
        self.take_zero_chunk();
        self.insert_mapped(chunks, true)?;
        self.registrations = registration;
        self.counts.zero += pages;
        if self.preallocated {
            if let Err(error) = self.preallocate_ram() {
                // All or nothing: the new pages are ZERO again, so they can go.
                let _ = self.unregister_ram(base, size);
                return Err(error);
            }
        }
        Ok(())
    }

    /// Unregisters the RAM at `[base, base + size)`, which must be exactly the pages of one
    /// `register_ram` call (all its chunks; otherwise [`RangeError::Overlap`] naming the
    /// registration it cuts into): their frames go back to the host and the guest addresses
    /// are unmapped. Refused, changing nothing, while a page there has a handler
    /// ([`PageError::HandlerPresent`]), a map lock ([`PageError::Locked`]) or an MMIO region
    /// or alias on it ([`PageError::NotRam`]). RAM can thus leave before the VM ends (the
    /// seed's RAM ranges stay until termination).
    pub fn unregister_ram(&mut self, base: GuestPhysAddr, size: u64) -> Result<Invalidation, RamError> {
        let pages = page_count(base, size)?;
        let mut chunks = Vec::new();
        let mut at = base.as_u64();
        while at < base.as_u64() + size {
            let location = self
                .ranges
                .find(GuestPhysAddr::new_truncate(at))
                .ok_or(PageError::NotGuestMemory(GuestPhysAddr::new_truncate(at)))?;
            let range = self
                .ranges
                .get(location.range)
                .ok_or(PageError::NotGuestMemory(base))?;
            if range.base().as_u64() != at || range.end() > base.as_u64() + size {
                return Err(RamError::Range(RangeError::Overlap {
                    existing: range.base(),
                }));
            }
            chunks.push(location.range);
            at = range.end();
        }
        // The ranges must be all of one registration, not part of it.
        let registration_of = |range: usize| self.ranges.get(range).map_or(0, |r| r.registration());
        let registration = registration_of(chunks[0]);
        let requested = chunks
            .iter()
            .filter(|&&range| registration_of(range) == registration)
            .count();
        let registered = self
            .ranges
            .iter()
            .filter(|r| r.registration() == registration)
            .count();
        if registration == 0 || requested != chunks.len() || registered != chunks.len() {
            return Err(RangeError::Overlap { existing: base }.into());
        }
        for &range in &chunks {
            let Some(pages) = self.ranges.get(range).map(RamRange::descriptors) else {
                continue;
            };
            for (index, page) in pages.into_iter().enumerate() {
                let gpa = || self.ranges.gpa_of(PageLocation { range, page: index });
                if page.page_type() != PageType::Ram {
                    return Err(PageError::NotRam(gpa()).into());
                }
                if page.handler() != HandlerState::None {
                    return Err(PageError::HandlerPresent(gpa()).into());
                }
                if page.is_locked() {
                    return Err(PageError::Locked(gpa()).into());
                }
            }
        }
        for &range in &chunks {
            let count = self.ranges.get(range).map_or(0, |r| r.page_count());
            for page in 0..count {
                // Reset only frees; then the page leaves the counts with its range.
                let _ = self.apply(PageLocation { range, page }, PageEvent::Reset);
            }
        }
        self.counts.zero -= pages;
        // Ranges are contiguous in address order: remove from the last so indices stay valid.
        for &range in chunks.iter().rev() {
            self.remove_range(range);
        }
        self.pool.flush(&mut self.frames);
        Ok(Invalidation::SingleContext)
    }

    /// Gives every ZERO RAM page its frame now (pgmR3PhysRamPreAllocate), as 2 MiB chunks where
    /// large pages are on and a block qualifies. All or nothing: when frames run out, the pages
    /// this call filled are ZERO again. Returns the invalidation the remapping needs.
    pub fn preallocate_ram(&mut self) -> Result<Invalidation, RamError> {
        let mut filled = Vec::new();
        for range in 0..self.ranges.len() {
            let pages = self.ranges.get(range).map_or(0, |r| r.page_count());
            for page in 0..pages {
                let location = PageLocation { range, page };
                let descriptor = self.ranges.page(location);
                if descriptor.page_type() != PageType::Ram || descriptor.state() != PageState::Zero {
                    continue;
                }
                if self.try_large_fill(location).is_some() {
                    filled.push(location);
                    continue;
                }
                match self.apply(location, PageEvent::Write) {
                    Ok(_) => filled.push(location),
                    Err(error) => {
                        self.unfill(&filled);
                        return Err(error.into());
                    }
                }
            }
        }
        self.pool.flush(&mut self.frames);
        Ok(if filled.is_empty() {
            Invalidation::None
        } else {
            Invalidation::SingleContext
        })
    }

    /// Returns pages filled by a failed call to ZERO: single pages, or the whole block of a
    /// large fill (recorded by the location of its first written page).
    fn unfill(&mut self, filled: &[PageLocation]) {
        for &location in filled.iter().rev() {
            let pages = match self.ranges.page(location).large_page() {
                LargePageState::Large => self.block_pages(location).unwrap_or_default(),
                _ => alloc::vec![location],
            };
            for page in pages {
                // Reset only frees: it cannot fail.
                let _ = self.apply(page, PageEvent::Reset);
            }
        }
        self.pool.flush(&mut self.frames);
    }

    /// Turns RAM pre-allocation on or off as a persistent mode (fRamPreAlloc). On, every RAM
    /// page gets its frame now ([`preallocate_ram`](Self::preallocate_ram); all or nothing: on
    /// failure the mode stays off), RAM registered later is pre-allocated too, and reset zeroes
    /// pages in place instead of freeing them. Off, pages keep their frames until the next
    /// reset frees them. Returns the invalidation the allocation needs.
    pub fn set_ram_preallocation(&mut self, enabled: bool) -> Result<Invalidation, RamError> {
        let invalidation = if enabled && !self.preallocated {
            self.preallocate_ram()?
        } else {
            Invalidation::None
        };
        self.preallocated = enabled;
        Ok(invalidation)
    }

    /// True while RAM pre-allocation is on.
    pub fn ram_preallocation(&self) -> bool {
        self.preallocated
    }
}

/// # Guest faults (the nested-paging violation handler)
///
/// See also [`resolve_fault_lock_free`](Self::resolve_fault_lock_free) and
/// [`mmio_target`](Self::mmio_target).
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Resolves an EPT violation at `faulting` (through the A20 gate) for `access`. A write to a ZERO page gets a zero-filled
    /// private frame; a write to a WRITE_MONITORED page makes it writable and marks it written.
    /// The violation itself flushed the CPU's cached translations for `gpa` (SDM 29.4.3.1), so
    /// a resolution that changes only that page's entry needs no INVEPT.
    pub fn resolve_fault(&mut self, faulting: GuestPhysAddr, access: Access) -> FaultOutcome {
        if access == Access::Write {
            // Write monitoring's protection withheld above the leaf comes down first, so the
            // descriptor read below says what the page is.
            self.open_write_path(faulting);
        }
        if self.remap_unmapped_block(faulting).is_err() {
            return FaultOutcome::OutOfMemory;
        }
        let gpa = self.a20_apply(faulting);
        let Some(location) = self.ranges.find(gpa) else {
            return FaultOutcome::NotGuestMemory;
        };
        let page = self.ranges.page(location);
        if let Some(handler) = self.intercepting_handler(gpa, page, access) {
            return FaultOutcome::Handler { handler };
        }
        if page.state() == PageState::Ballooned {
            return FaultOutcome::Ballooned;
        }
        if access == Access::Write && page.page_type() == PageType::Ram && page.state() == PageState::Zero {
            if let Some(invalidation) = self.try_large_fill(location) {
                return FaultOutcome::Resolved {
                    invalidation,
                    resolution: Resolution::ZeroFill,
                };
            }
        }
        let resolution = match (access, page.state()) {
            (Access::Write, PageState::Zero) => Resolution::ZeroFill,
            (Access::Write, PageState::WriteMonitored) => Resolution::WriteMonitor,
            (Access::Write, PageState::Shared) => Resolution::CopyOnWrite,
            _ => Resolution::Remap,
        };
        let result = match access {
            // An alias is mapped for every access: the entry lost sync with the descriptor, or
            // the access came through the A20 gate (mapped below).
            _ if page.page_type().is_mmio_alias() => {
                self.sync_leaf(location);
                Ok(())
            }
            Access::Write if page.page_type() == PageType::Rom || page.page_type() == PageType::RomShadow => {
                match self.rom_protection_at(gpa) {
                    Some(protection) if protection.maps_writes() => {
                        self.apply(location, PageEvent::Write).map(|_| ())
                    }
                    Some(protection) if protection.writes_shadow() => return FaultOutcome::EmulateWrite,
                    _ => return FaultOutcome::WriteIgnored,
                }
            }
            // A page the write changes nothing for (already ALLOCATED, e.g. by a lock-free fault
            // that has not written its leaf yet) faulted because its leaf lags: rewrite it.
            Access::Write => self.apply(location, PageEvent::Write).map(|changed| {
                if !changed {
                    self.sync_leaf(location);
                }
            }),
            // RAM is readable and executable in every mapped state, so a read or fetch fault
            // means the entry lost sync with the descriptor: rewrite it.
            Access::Read | Access::Execute => {
                self.sync_leaf(location);
                Ok(())
            }
        };
        let result = match result {
            Ok(()) if gpa != faulting => self
                .map_a20_alias(faulting.page_base(), location)
                .map_err(Failure::from),
            other => other,
        };
        // A split that found no page table left the block awaiting tables: map it now, or the
        // retried access would fault again (the VM pauses instead, and resumes once frames
        // are back).
        let result = result.and_then(|()| self.remap_unmapped_block(faulting).map_err(Failure::from));
        if self.pool.needs_refill() {
            // After the mapping is done: the next faults find frames waiting.
            self.pool.refill(&mut self.frames);
        }
        // Filling a ZERO page or copying a SHARED one replaces the frame its read-only entry
        // named: other CPUs must not go on reading the old one.
        let invalidation = match resolution {
            Resolution::ZeroFill | Resolution::CopyOnWrite => Invalidation::OtherCpus,
            Resolution::WriteMonitor | Resolution::Remap => Invalidation::None,
        };
        match result {
            Ok(()) => FaultOutcome::Resolved {
                invalidation,
                resolution,
            },
            Err(_) => FaultOutcome::OutOfMemory,
        }
    }

    /// True when the 2 MiB block holding `gpa` is unmapped, awaiting the page table that could
    /// not be had to split it: its next access maps it again from the descriptors.
    pub fn awaits_tables(&self, gpa: GuestPhysAddr) -> bool {
        self.tables.awaits_tables(&self.memory, gpa)
    }
}

/// # Host access bypassing handlers (PGMPhysSimpleReadGCPhys, PGMPhysSimpleWriteGCPhys)
///
/// The typed accessors come in both kinds: `read_phys_u32` goes through handlers as the
/// seed's PGMR3PhysReadU32 does, `read_phys_u32_bypassing_handlers` does not. For the
/// guest's view see [`read_phys_handled`](Self::read_phys_handled) and
/// [`read_phys_external`](Self::read_phys_external).
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Copies guest memory at `gpa` into `buf`, across pages and ranges, bypassing access
    /// handlers (PGMPhysSimpleReadGCPhys; see [`read_phys_handled`](Self::read_phys_handled)
    /// for the guest's view). ZERO and BALLOONED pages read as zeros without allocating (the
    /// seed maps both to its zero page, PGMAllPhys.cpp 1261-1277). Fails with [`PageError::NotGuestMemory`] (naming the
    /// first address outside RAM) before copying anything.
    pub fn read_phys(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), AccessError> {
        if gpa.page_offset() + buf.len() as u64 <= PAGE_SIZE {
            // Within one page (a guest paging entry, an instruction): one lookup, no pieces.
            return self.read_in_page(gpa, buf).map(|_| ());
        }
        let chunks = self.chunks(gpa, buf.len())?;
        let mut done = 0;
        for &(location, offset, len) in chunks.iter() {
            let out = &mut buf[done..done + len];
            match self.read_source(location) {
                Some(frame) => self.memory.read(frame_offset(frame, offset), out),
                None => out.fill(0),
            }
            done += len;
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`, across pages and ranges, bypassing access
    /// handlers (PGMPhysSimpleWriteGCPhys), giving ZERO pages a frame first. Bytes for
    /// ballooned pages and for ROM that ignores writes are dropped, as the guest's would be. All or nothing: on an error guest memory and the frame counts are as
    /// before. Returns the invalidation needed because pages the guest may have cached changed
    /// their mapping.
    pub fn write_phys(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<Invalidation, AccessError> {
        let chunks = self.chunks(gpa, data.len())?;
        // Each piece with where its bytes start in `data`.
        let pieces = || {
            chunks.iter().scan(0, |start, &(location, offset, len)| {
                *start += len;
                Some((location, offset, len, *start - len))
            })
        };
        // Bytes for ROM that ignores writes are dropped, as the guest's would be; MMIO aliases
        // write straight into the aliased frame, outside the state machine.
        let stateful = |pgm: &Self, location| {
            pgm.takes_writes(location) && !pgm.ranges.page(location).page_type().is_mmio_alias()
        };
        for (location, ..) in pieces() {
            let page = self.ranges.page(location);
            if stateful(self, location) {
                transition(page, PageEvent::Write)
                    .map(|_| ())
                    .map_err(|_| PageError::State {
                        gpa: self.ranges.gpa_of(location),
                        state: page.state(),
                    })?;
            }
        }
        let mut newly_allocated = Vec::new();
        let mut remapped = false;
        for (location, ..) in pieces() {
            if !stateful(self, location) {
                continue;
            }
            let was_zero = self.ranges.page(location).state() == PageState::Zero;
            // A ZERO page gets a frame, a SHARED page a private copy: both remap it.
            match self.apply_remapping(location, PageEvent::Write) {
                Ok(frame_changed) => {
                    remapped |= frame_changed;
                    if was_zero {
                        newly_allocated.push(location);
                    }
                }
                Err(error) => {
                    for location in newly_allocated {
                        // Reset frees the frame just given: cannot fail.
                        let _ = self.apply(location, PageEvent::Reset);
                    }
                    return Err(error.into());
                }
            }
        }
        for (location, offset, len, start) in pieces() {
            if !self.takes_writes(location) {
                continue;
            }
            if let Some(frame) = self.ranges.page(location).frame() {
                self.memory
                    .write(frame_offset(frame, offset), &data[start..start + len]);
            }
        }
        Ok(if remapped {
            Invalidation::SingleContext
        } else {
            Invalidation::None
        })
    }

    typed_phys_access! {
        read_phys_u8, write_phys_u8, read_phys_u8_bypassing_handlers,
            write_phys_u8_bypassing_handlers, u8;
        read_phys_u16, write_phys_u16, read_phys_u16_bypassing_handlers,
            write_phys_u16_bypassing_handlers, u16;
        read_phys_u32, write_phys_u32, read_phys_u32_bypassing_handlers,
            write_phys_u32_bypassing_handlers, u32;
        read_phys_u64, write_phys_u64, read_phys_u64_bypassing_handlers,
            write_phys_u64_bypassing_handlers, u64;
    }
}

/// # Reset (pgmR3PhysRamReset, /PGM/ZeroRamPagesOnReset)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Resets guest memory for a VM reset (pgmR3PhysRamZeroAll, pgmR3PhysRomReset): the
    /// balloon is deflated, MMIO aliases are undone (the pages trap as plain MMIO again), every
    /// ROM page goes back to read-ROM/write-ignore with its image restored, and RAM and ROM
    /// shadows are cleared as the reset modes say:
    ///
    /// - by default, pages give their frames back and become ZERO — except pages of a 2 MiB
    ///   block, which are zeroed in place and keep their mapping, and locked pages, which keep
    ///   their frame and are zeroed in place;
    /// - with pre-allocation on ([`set_ram_preallocation`](Self::set_ram_preallocation)), every
    ///   page keeps its frame and is zeroed in place;
    /// - with zeroing off ([`set_zero_ram_on_reset`](Self::set_zero_ram_on_reset)), RAM pages
    ///   keep their frames and contents (ROM shadows are still cleared).
    ///
    /// Returns the invalidation the remapping needs.
    pub fn reset_ram(&mut self) -> Invalidation {
        let mut invalidation = Invalidation::None;
        self.for_each_page(|pgm, location| invalidation = invalidation.max(pgm.reset_page(location)));
        self.pool.flush(&mut self.frames);
        invalidation.max(self.reset_mmio_aliases()).max(self.reset_roms())
    }

    /// Resets one RAM or ROM-shadow page (see [`reset_ram`](Self::reset_ram)); returns the
    /// invalidation that needs.
    fn reset_page(&mut self, location: PageLocation) -> Invalidation {
        let page = self.ranges.page(location);
        let (free, zero) = match page.page_type() {
            PageType::Ram => (self.zero_on_reset && !self.preallocated, self.zero_on_reset),
            // pgmR3PhysRomReset clears shadows whatever the zeroing mode.
            PageType::RomShadow => (!self.preallocated, true),
            _ => return Invalidation::None,
        };
        let in_large_block = page.large_page() != LargePageState::None;
        let keeps_frame = !free || page.is_locked() || in_large_block;
        match page.state() {
            // New mappings of the zero frame only: nothing cached to flush.
            PageState::Zero | PageState::Ballooned => {
                let _: Invalidation = self.reset_to_zero(location);
                Invalidation::None
            }
            // A shared frame is never cleared in place: the page gets a copy first.
            PageState::Shared if keeps_frame && zero => {
                match self.apply_remapping(location, PageEvent::Write) {
                    Ok(_) => {
                        self.zero_in_place(location);
                        Invalidation::SingleContext
                    }
                    // No frame for a copy: the page lets the shared frame go and reads zeros.
                    Err(_) => self.reset_to_zero(location),
                }
            }
            PageState::Shared if keeps_frame => Invalidation::None,
            PageState::Allocated | PageState::WriteMonitored if keeps_frame => {
                if zero {
                    self.zero_in_place(location);
                }
                Invalidation::None
            }
            PageState::Shared | PageState::Allocated | PageState::WriteMonitored => {
                self.reset_to_zero(location)
            }
        }
    }

    /// Returns the page at `location` to ZERO, freeing its frame.
    fn reset_to_zero(&mut self, location: PageLocation) -> Invalidation {
        // Reset only frees: it cannot fail.
        match self.apply(location, PageEvent::Reset) {
            Ok(true) => Invalidation::SingleContext,
            _ => Invalidation::None,
        }
    }

    /// Clears the frame of the page at `location` in place (a content change monitoring sees).
    fn zero_in_place(&mut self, location: PageLocation) {
        if let Some(frame) = self.ranges.page(location).frame() {
            self.memory.zero_frame(frame);
            if self.monitoring {
                self.mark_written(location);
            }
        }
    }

    /// Whether [`reset_ram`](Self::reset_ram) zeroes RAM (ZeroRamPagesOnReset; on by
    /// default). Off, RAM pages keep their frames and contents across a reset.
    pub fn set_zero_ram_on_reset(&mut self, zero: bool) {
        self.zero_on_reset = zero;
    }

    /// True while reset zeroes RAM.
    pub fn zero_ram_on_reset(&self) -> bool {
        self.zero_on_reset
    }
}

/// # Write monitoring (dirty-page harvests for migration and snapshots)
///
/// See also [`set_dirty_log_mode`](Self::set_dirty_log_mode) and
/// [`log_written`](Self::log_written).
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Starts write monitoring: every page with a private frame becomes WRITE_MONITORED
    /// (read-only), written-to flags are cleared, and from now on every content change marks
    /// its page written (see [`harvest_written`](Self::harvest_written)). Costs O(1) for RAM
    /// (see `lazy_protection`), plus the pages of mapped MMIO2 regions and, when a page is
    /// write-locked, one pass to find the locked pages.
    pub fn start_write_monitoring(&mut self) -> Invalidation {
        if self.monitoring {
            // Started again: what was written so far is dropped, and everything re-armed.
            return self.harvest_written(&mut Vec::new());
        }
        self.clear_written_flags();
        self.monitoring = true;
        // Every block is looked at in full at its first settle.
        for range in 0..self.ranges.len() {
            if let Some(range) = self.ranges.get_mut(range) {
                range.forget_settled_blocks();
            }
        }
        let locked_allocated = if self.locked_pages.write > 0 {
            self.mark_write_locked_pages()
        } else {
            0
        };
        let mmio2 = self.refresh_mmio2_protection();
        if self.dirty_log_mode == DirtyLogMode::Pml {
            return mmio2.max(self.start_pml_logging());
        }
        // Every page is pending from here: unwritten, and WRITE_MONITORED if it has a frame.
        let invalidation = self.arm_write_protection();
        self.count_rearmed(locked_allocated);
        mmio2.max(invalidation)
    }

    /// Appends to `out` every page written since monitoring started or since the last harvest,
    /// each once, in the order recorded (lock-free faults' pages in their vCPU's order, from
    /// when their logs were folded), and write-protects them again by re-arming the protection
    /// of every page at once (see `lazy_protection`): O(written pages) to list them, one root
    /// table to re-arm, and no descriptor read — unless a page is write-locked or an MMIO2
    /// region is mapped, when the listed pages' descriptors are read to find those pages
    /// (written again, and protected one by one). Returns the invalidation the re-protection
    /// needs.
    pub fn harvest_written(&mut self, out: &mut Vec<GuestPhysAddr>) -> Invalidation {
        self.fold_lock_free_writes();
        if !self.monitoring {
            return Invalidation::None;
        }
        let written = core::mem::take(&mut self.written);
        if self.dirty_log_mode == DirtyLogMode::Pml {
            return self.harvest_pml(written, out);
        }
        // Every listed page has its range: a range that goes takes its pages off the list
        // (`remove_range`).
        out.extend_from_slice(&written);
        let one_by_one = self.locked_pages.write > 0 || self.mmio2_mapped();
        let mut still_written = Vec::new();
        let mut locked_allocated = 0;
        let mut invalidation = Invalidation::None;
        for &gpa in written.iter().filter(|_| one_by_one) {
            let Some(location) = self.ranges.find(gpa) else {
                continue;
            };
            let page = self.ranges.page(location);
            if page.write_locks() > 0 {
                // The host can write it through its mapping at any time: written again.
                still_written.push(gpa);
                locked_allocated += u64::from(counted_locked_allocated(page));
            } else if page.page_type() == PageType::Mmio2 {
                // Protected one by one: their region's dirty tracking shares the leaves.
                self.ranges.set_page(location, page.with_written_to(false));
                invalidation = invalidation.max(self.refresh_protection(location));
            }
        }
        invalidation = invalidation.max(self.arm_write_protection());
        self.count_rearmed(locked_allocated);
        // Reuse the list's memory for the next round.
        self.written = written;
        self.written.clear();
        // Written again: listed for the next harvest and for its block's next settle.
        for gpa in still_written {
            if let Some(location) = self.ranges.find(gpa) {
                self.list_written(location);
            }
        }
        invalidation
    }

    /// [`harvest_written`](Self::harvest_written) in PML mode: lists `written`, re-arms the
    /// listed pages' dirty flags, and protects MMIO2 pages whose tracking wants it.
    fn harvest_pml(&mut self, written: Vec<GuestPhysAddr>, out: &mut Vec<GuestPhysAddr>) -> Invalidation {
        out.extend_from_slice(&written);
        let mut still_written = self.rearm_pml_pages(&written);
        let mut invalidation = Invalidation::None;
        for &gpa in &written {
            if let Some(location) = self.ranges.find(gpa) {
                if self.ranges.page(location).page_type() == PageType::Mmio2 {
                    invalidation = invalidation.max(self.refresh_protection(location));
                }
            }
        }
        if !written.is_empty() {
            // The CPU caches dirty flags with its translations: it must forget them to log
            // the next write.
            invalidation = invalidation.max(Invalidation::SingleContext);
        }
        self.written = written;
        self.written.clear();
        self.written.append(&mut still_written);
        invalidation
    }

    /// Ends write monitoring: pages become writable again (except MMIO2 pages whose dirty
    /// tracking still wants their next write) and the written-to flags are dropped.
    pub fn stop_write_monitoring(&mut self) -> Invalidation {
        self.fold_lock_free_writes();
        if self.monitoring {
            self.settle_every_page();
        }
        self.monitoring = false;
        self.clear_written_flags();
        for range in 0..self.ranges.len() {
            if let Some(range) = self.ranges.get_mut(range) {
                range.reset_settle_bits();
            }
        }
        let protection = self.refresh_protection_all();
        protection.max(self.merge_large_blocks())
    }

    /// True while write monitoring is on.
    pub fn is_write_monitoring(&self) -> bool {
        self.monitoring
    }

    /// True when the next guest write to the page at `location` must trap: write monitoring has
    /// not seen it written since the last harvest, or its MMIO2 region's dirty tracking has not
    /// seen it written since the last query.
    fn wants_write_protection(&self, location: PageLocation) -> bool {
        let page = self.ranges.page(location);
        let protects = self.monitoring && self.dirty_log_mode == DirtyLogMode::WriteProtect;
        (protects && !page.written_to()) || self.mmio2_wants_protection(location)
    }

    /// Protects or unprotects the page at `location` as [`Self::wants_write_protection`] says;
    /// returns the invalidation that needs (only adding protection needs one).
    fn refresh_protection(&mut self, location: PageLocation) -> Invalidation {
        // The written-to flag decides: it must not be one left from a harvested round.
        self.settle(location);
        let event = if self.wants_write_protection(location) {
            PageEvent::Protect
        } else {
            PageEvent::Unprotect
        };
        match self.apply(location, event) {
            Ok(true) if event == PageEvent::Protect => Invalidation::SingleContext,
            _ => Invalidation::None,
        }
    }

    fn refresh_protection_all(&mut self) -> Invalidation {
        let mut invalidation = Invalidation::None;
        self.for_each_page(|pgm, location| invalidation = invalidation.max(pgm.refresh_protection(location)));
        invalidation
    }

    fn clear_written_flags(&mut self) {
        self.fold_lock_free_writes();
        for gpa in core::mem::take(&mut self.written) {
            if let Some(location) = self.ranges.find(gpa) {
                let page = self.ranges.page(location);
                let unwritten = page.with_written_to(false);
                self.ranges.set_page(location, unwritten);
                // Under monitoring, an ALLOCATED page is WRITE_MONITORED again.
                self.recount(page, unwritten);
            }
        }
    }
}

/// # The balloon (PGMR3PhysChangeMemBalloon)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Gives the pages at `pages` (page-aligned guest RAM addresses) to the balloon: their frames
    /// go back to the host and any later guest access faults as [`FaultOutcome::Ballooned`].
    /// All or nothing: an address that is not page-aligned RAM, or a page already ballooned,
    /// fails the call before any page changes.
    pub fn balloon_inflate(&mut self, pages: &[GuestPhysAddr]) -> Result<Invalidation, RamError> {
        let locations = self.balloon_pages(pages, PageEvent::Inflate)?;
        for &location in &locations {
            self.apply(location, PageEvent::Inflate)?;
        }
        self.pool.flush(&mut self.frames);
        Ok(if locations.is_empty() {
            Invalidation::None
        } else {
            Invalidation::SingleContext
        })
    }

    /// Takes pages back from the balloon: they become ZERO (mapped to the zero frame). All or
    /// nothing, as [`balloon_inflate`](Self::balloon_inflate); every page must be ballooned.
    /// New mappings only, so no invalidation is needed.
    pub fn balloon_deflate(&mut self, pages: &[GuestPhysAddr]) -> Result<Invalidation, RamError> {
        for location in self.balloon_pages(pages, PageEvent::Deflate)? {
            self.apply(location, PageEvent::Deflate)?;
        }
        Ok(Invalidation::None)
    }

    /// Locates the balloon pages and checks that `event` applies to every one of them.
    fn balloon_pages(
        &self,
        pages: &[GuestPhysAddr],
        event: PageEvent,
    ) -> Result<Vec<PageLocation>, RamError> {
        let mut locations = Vec::with_capacity(pages.len());
        let mut seen = alloc::collections::BTreeSet::new();
        for &gpa in pages {
            if !gpa.is_page_aligned() {
                return Err(RangeError::Misaligned(gpa.as_u64()).into());
            }
            let location = self.ranges.find(gpa).ok_or(PageError::NotGuestMemory(gpa))?;
            let page = self.ranges.page(location);
            if page.page_type() != PageType::Ram {
                return Err(PageError::NotRam(gpa).into());
            }
            if page.handler() != HandlerState::None {
                return Err(PageError::HandlerPresent(gpa).into());
            }
            if page.is_locked() {
                return Err(PageError::Locked(gpa).into());
            }
            transition(page, event)
                .map(|_| ())
                .map_err(|_| PageError::State {
                    gpa,
                    state: page.state(),
                })?;
            if !seen.insert(location) {
                // The same page twice would fail half-way through; refuse it up front.
                return Err(PageError::State {
                    gpa,
                    state: page.state(),
                }
                .into());
            }
            locations.push(location);
        }
        Ok(locations)
    }
}

/// # Inspection: descriptors, ranges, statistics and the nested tables
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// The descriptor of the page holding `gpa`, if it is registered, as the state machine
    /// sees it: an unwritten page under write monitoring is WRITE_MONITORED even before its
    /// descriptor is brought in line.
    pub fn page(&self, gpa: GuestPhysAddr) -> Option<PageDescriptor> {
        let (location, page) = self.ranges.find_page(gpa)?;
        if self.monitoring {
            return Some(self.logical_page(location));
        }
        Some(page)
    }

    /// The registered ranges.
    pub fn ranges(&self) -> &RamRanges {
        &self.ranges
    }

    /// Page and frame counts, including what lock-free faults changed.
    pub fn stats(&self) -> MemoryStats {
        let mut counts = self.counts;
        // Exact under `&mut self`; while lock-free faults run, a snapshot.
        counts.lock_free_written(self.lock_free_writes_unfolded().min(counts.write_monitored));
        MemoryStats {
            ram_pages: counts.zero
                + counts.allocated
                + counts.write_monitored
                + counts.shared
                + counts.ballooned,
            zero_pages: counts.zero,
            allocated_pages: counts.allocated,
            write_monitored_pages: counts.write_monitored,
            shared_pages: counts.shared,
            shared_frames: self.shared.len() as u64,
            ballooned_pages: counts.ballooned,
            mmio_pages: counts.mmio,
            rom_pages: counts.rom,
            mmio2_frames: self.mmio2_frames(),
            handy_frames: self.pool.handy() as u64,
            pending_free_frames: self.pool.pending_free() as u64,
            table_frames: self.tables.table_frames() as u64,
            zero_chunk_frames: self.zero_chunk_frames(),
            private_allocations: self.pool.taken(),
            read_locked_pages: self.locked_pages.read,
            write_locked_pages: self.locked_pages.write,
        }
    }

    /// The shared zero frame every ZERO page maps to.
    pub fn zero_frame(&self) -> HostPhysAddr {
        self.zero_frame
    }

    /// The host-physical address of the nested tables' top-level table: what the backend
    /// points the CPU at (VMX: the EPT pointer, see [`crate::ept::pointer`]; SVM: nCR3).
    pub fn nested_root(&self) -> HostPhysAddr {
        self.tables.root()
    }

    /// The 4 KiB nested-table entry mapping `gpa`, decoded.
    pub fn nested_entry(&self, gpa: GuestPhysAddr) -> paging::Entry {
        self.tables.entry(&self.memory, gpa)
    }

    /// Translates a guest access through the nested tables exactly as the CPU would.
    pub fn translate(&self, gpa: GuestPhysAddr, access: Access) -> Result<HostPhysAddr, Violation> {
        paging::translate::<F>(&self.memory, self.tables.root(), gpa, access)
    }

    /// The frame allocator (for its counters).
    pub fn frames(&self) -> &A {
        &self.frames
    }

    /// The frame allocator, mutable (tests inject failures through it).
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn frames_mut(&mut self) -> &mut A {
        &mut self.frames
    }

    /// Host-physical memory access (crate-only: `HostMemory::compare_exchange_u64` writes
    /// through a shared reference, and the tables live there).
    pub(crate) fn memory(&self) -> &M {
        &self.memory
    }

    /// Host-physical memory access, mutable: what the guest does to its own frames (simulated
    /// guests in tests write through this). Writing the manager's tables here bypasses it.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn memory_mut(&mut self) -> &mut M {
        &mut self.memory
    }
}

/// # The A20 gate (PGMR3PhysSetA20)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Opens (`true`) or closes the A20 gate. Closed, guest accesses to any address with bit 20
    /// set reach the page 1 MiB below, as on a PC with the gate off. Host accesses
    /// ([`read_phys`](Self::read_phys), [`write_phys`](Self::write_phys)) are never masked.
    pub fn set_a20(&mut self, enabled: bool) -> Invalidation {
        if self.a20_enabled == enabled {
            return Invalidation::None;
        }
        self.a20_enabled = enabled;
        if enabled {
            for alias in core::mem::take(&mut self.a20_aliases) {
                self.write_leaf(alias, None);
            }
        } else {
            // Aliases are 4 KiB mappings kept in step page by page: no large blocks meanwhile.
            self.split_all_large_blocks();
        }
        self.for_each_page(|pgm, location| {
            if pgm.ranges.gpa_of(location).as_u64() & A20_BIT != 0 {
                pgm.sync_leaf(location);
            }
        });
        Invalidation::SingleContext
    }

    /// True while the A20 gate is open.
    pub fn a20_enabled(&self) -> bool {
        self.a20_enabled
    }

    /// What the A20 gate makes of a guest access to `gpa`.
    pub fn a20_apply(&self, gpa: GuestPhysAddr) -> GuestPhysAddr {
        mapping::a20_mask(gpa, self.a20_enabled)
    }

    pub(super) fn split_all_large_blocks(&mut self) {
        self.for_each_page(|pgm, location| {
            if pgm.ranges.page(location).large_page() == LargePageState::Large {
                pgm.split_large_block(location);
            }
        });
    }
}

/// Machinery shared by the facets above.
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Calls `visit` for every page of every range in address order; `visit` must not add or
    /// remove ranges.
    fn for_each_page(&mut self, mut visit: impl FnMut(&mut Self, PageLocation)) {
        for range in 0..self.ranges.len() {
            let pages = self.ranges.get(range).map_or(0, |r| r.page_count());
            for page in 0..pages {
                visit(self, PageLocation { range, page });
            }
        }
    }

    /// The locations of `[base, base + pages)`: every page that is registered.
    pub(super) fn located(&self, base: GuestPhysAddr, pages: u64) -> Vec<PageLocation> {
        let end = base.as_u64() + pages * PAGE_SIZE;
        let mut locations = Vec::with_capacity(pages as usize);
        let mut gpa = base.as_u64();
        while gpa < end {
            let Some(first) = self.ranges.find(GuestPhysAddr::new_truncate(gpa)) else {
                gpa += PAGE_SIZE;
                continue;
            };
            // The rest of this range up to `end` in one go: one lookup per range, not per page.
            let range_end = self
                .ranges
                .get(first.range)
                .map_or(gpa + PAGE_SIZE, |r| r.end().min(end));
            let count = ((range_end - gpa) / PAGE_SIZE).max(1) as usize;
            locations.extend((first.page..first.page + count).map(|page| PageLocation {
                range: first.range,
                page,
            }));
            gpa += count as u64 * PAGE_SIZE;
        }
        locations
    }

    /// Where a new ROM or MMIO2 mapping of `size` bytes (`pages` pages) at `base` goes: `None`
    /// for space no range covers, or the RAM pages it is to replace (see
    /// [`replaceable_ram`](Self::replaceable_ram)). Part RAM, part unassigned is refused as
    /// an overlap.
    pub(super) fn placement<E: From<RangeError> + From<PageError>>(
        &self,
        base: GuestPhysAddr,
        size: u64,
        pages: u64,
    ) -> Result<Option<Vec<PageLocation>>, E> {
        match self.ranges.check_free(base, size) {
            Ok(()) => Ok(None),
            Err(overlap) => match self.replaceable_ram(base, pages) {
                Ok(locations) => Ok(Some(locations)),
                Err(PageError::NotGuestMemory(_)) => Err(overlap.into()),
                Err(other) => Err(other.into()),
            },
        }
    }

    /// Locates the RAM pages of `[base, base + pages)` that a ROM or an MMIO2 mapping is to
    /// replace: all registered RAM, without handlers or map locks.
    pub(super) fn replaceable_ram(
        &self,
        base: GuestPhysAddr,
        pages: u64,
    ) -> Result<Vec<PageLocation>, PageError> {
        let locations = self.ram_pages(base, pages)?;
        for &location in &locations {
            let page = self.ranges.page(location);
            let gpa = self.ranges.gpa_of(location);
            if page.handler() != HandlerState::None {
                return Err(PageError::HandlerPresent(gpa));
            }
            if page.is_locked() {
                return Err(PageError::Locked(gpa));
            }
        }
        Ok(locations)
    }

    /// Frees what the RAM page at `location` held and makes it `replacement` (a page that is
    /// not RAM, with no frame of its own yet or one that is not the page's), mapped as that
    /// calls for. The page leaves the state counts; the caller counts what it became.
    pub(super) fn replace_page(&mut self, location: PageLocation, replacement: PageDescriptor) {
        // Reset cannot fail and leaves a ZERO page without a frame.
        let _ = self.apply(location, PageEvent::Reset);
        self.replace_descriptor(location, replacement);
        if replacement.page_type() != PageType::RomShadow {
            self.counts.zero -= 1;
        }
        self.sync_leaf(location);
    }

    /// Gives the page at `location` the descriptor `replacement` of another type (MMIO over
    /// RAM, an alias, RAM back), keeping its written-to flag: a page in the written list keeps
    /// its flag whatever it becomes, so a later write does not list it twice (the harvest
    /// counts each listed page once).
    pub(super) fn replace_descriptor(&mut self, location: PageLocation, replacement: PageDescriptor) {
        let written = self.ranges.page(location).written_to();
        self.ranges
            .set_page(location, replacement.with_written_to(written));
    }

    /// Makes the page at `location`, which replaced RAM and holds no frame of its own any more,
    /// a ZERO RAM page again (undoes [`replace_page`](Self::replace_page)), counted and mapped.
    pub(super) fn restore_ram_page(&mut self, location: PageLocation) {
        let page = self.ranges.page(location);
        self.replace_descriptor(location, PageDescriptor::zero(PageType::Ram));
        // A shadow was counted as a ZERO page already.
        if page.page_type() != PageType::RomShadow {
            self.counts.zero += 1;
        }
        self.sync_leaf(location);
    }

    /// Refuses, naming the first one, when a map lock holds a page of `locations`.
    pub(super) fn check_unlocked(&self, locations: &[PageLocation]) -> Result<(), PageError> {
        match locations.iter().find(|&&at| self.ranges.page(at).is_locked()) {
            Some(&locked) => Err(PageError::Locked(self.ranges.gpa_of(locked))),
            None => Ok(()),
        }
    }

    /// Gives every frame the VM holds back to the host, once: what dropping the manager does
    /// (see the `Drop` impl). Nothing may use the manager afterwards but its drop.
    pub(crate) fn release_all(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        for range in self.ranges.iter() {
            for page in range.descriptors() {
                // MMIO2 frames belong to their region (freed below), alias frames to their owner,
                // shared frames to sharing (freed below, once each).
                let owned = page.page_type().owns_frame() && page.state() != PageState::Shared;
                if let (Some(frame), true) = (page.frame(), owned) {
                    self.frames.free_frame(frame);
                }
            }
        }
        self.release_mmio2();
        self.release_shared();
        self.pool.drain(&mut self.frames);
        self.release_roms();
        self.tables.destroy(&mut self.frames, &self.memory);
        self.frames.free_frame(self.zero_frame);
        self.release_zero_chunk();
    }

    /// [`apply`](Self::apply), answering instead whether the page's frame changed: then the
    /// CPU's cached translations of the page are stale (a mere permission increase is not).
    fn apply_remapping(&mut self, location: PageLocation, event: PageEvent) -> Result<bool, Failure> {
        let before = self.ranges.page(location).frame();
        self.apply(location, event)?;
        Ok(self.ranges.page(location).frame() != before)
    }

    /// Runs `event` through the state machine for one page and carries out the frame work, the
    /// written-to bookkeeping and the EPT update. Returns whether the page changed; on an error
    /// nothing changed.
    fn apply(&mut self, location: PageLocation, event: PageEvent) -> Result<bool, Failure> {
        self.apply_with(location, event, None)
    }

    /// [`apply`](Self::apply) with the shared frame a `Share` event adopts.
    fn apply_with(
        &mut self,
        location: PageLocation,
        event: PageEvent,
        shared_frame: Option<HostPhysAddr>,
    ) -> Result<bool, Failure> {
        // The counts below must include what lock-free faults changed.
        self.fold_lock_free_writes();
        self.settle(location);
        let page = self.ranges.page(location);
        let step = transition(page, event).map_err(|refused| PageError::State {
            gpa: self.ranges.gpa_of(location),
            state: refused.state,
        })?;
        if !step.changes_page(page.state()) {
            return Ok(false);
        }
        let new_frame = match step.effect {
            FrameEffect::AllocateZeroed => {
                let frame = self.pool.take(&mut self.frames)?;
                self.memory.zero_frame(frame);
                Some(frame)
            }
            FrameEffect::AllocateCopyOf(shared) => {
                let frame = self.pool.take(&mut self.frames)?;
                let mut contents = [0u8; PAGE_SIZE as usize];
                self.memory.read(shared, &mut contents);
                self.memory.write(frame, &contents);
                Some(frame)
            }
            FrameEffect::AdoptShared(_) => Some(shared_frame.ok_or(PageError::State {
                gpa: self.ranges.gpa_of(location),
                state: page.state(),
            })?),
            FrameEffect::None | FrameEffect::Free(_) | FrameEffect::DropShare(_) => None,
        };
        let mut next = step.apply(page, new_frame);
        if self.monitoring && changes_contents(event) && !next.written_to() {
            next = next.with_written_to(true);
            self.list_written(location);
        }
        self.ranges.set_page(location, next);
        if page.page_type() == PageType::Mmio2 && event == PageEvent::Write {
            self.mark_mmio2_dirty(location);
        }
        self.recount(page, next);
        self.sync_leaf(location);
        // Released only now: neither the descriptor nor the EPT entry names the frame any more.
        match step.effect {
            FrameEffect::Free(frame) => {
                // The page's own entry changed above, so the invalidation its caller reports
                // covers whatever else mapped the frame.
                let _: Invalidation = self.unmap_frame(frame, Some(self.ranges.gpa_of(location)));
                self.pool.release(frame)
            }
            FrameEffect::AllocateCopyOf(shared) | FrameEffect::DropShare(shared) => self.drop_share(shared),
            FrameEffect::AdoptShared(own) => self.adopt_share(own, next.frame(), location),
            FrameEffect::None | FrameEffect::AllocateZeroed => {}
        }
        Ok(true)
    }

    /// Copies guest memory at `gpa` into `buf`, which ends within the page of `gpa`, as
    /// [`read_phys`](Self::read_phys) does. Returns the frame read when only an exclusive change
    /// of the manager can replace it ([`stable_frame`]), so a caller may
    /// remember where the bytes came from.
    pub(crate) fn read_in_page(
        &self,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
    ) -> Result<Option<HostPhysAddr>, AccessError> {
        let (location, page) = self.ranges.find_page(gpa).ok_or(PageError::NotGuestMemory(gpa))?;
        if page.page_type() == PageType::Mmio {
            return Err(PageError::NotRam(gpa).into());
        }
        match self.read_source(location) {
            Some(frame) => self.memory.read(frame_offset(frame, gpa.page_offset()), buf),
            None => buf.fill(0),
        }
        Ok(stable_frame(page))
    }

    /// The frame guest reads of the page at `location` see (`None`: the page reads as zeros).
    fn read_source(&self, location: PageLocation) -> Option<HostPhysAddr> {
        let page = self.ranges.page(location);
        let gpa = self.ranges.gpa_of(location);
        match page.page_type() {
            PageType::Rom | PageType::RomShadow => match self.rom_protection_at(gpa)?.reads_shadow() {
                true => page.frame(),
                false => self.virgin_frame(gpa),
            },
            PageType::Ram
            | PageType::Mmio
            | PageType::Mmio2
            | PageType::Mmio2AliasMmio
            | PageType::SpecialAliasMmio => page.frame(),
        }
    }

    /// True when guest writes to the page at `location` reach memory (RAM not in the balloon,
    /// MMIO2, or a ROM shadow whose protection lets writes through).
    fn takes_writes(&self, location: PageLocation) -> bool {
        let page = self.ranges.page(location);
        match page.page_type() {
            // The seed ignores writes to ballooned pages (PGMPhysWrite, PGMAllPhys.cpp
            // 2788-2801): the guest gave the page away, so what it writes there is lost.
            PageType::Ram if page.state() == PageState::Ballooned => false,
            PageType::Ram | PageType::Mmio2 | PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio => true,
            PageType::Rom | PageType::RomShadow => self
                .rom_protection_at(self.ranges.gpa_of(location))
                .is_some_and(RomProtection::writes_shadow),
            PageType::Mmio => false,
        }
    }

    /// Splits `[gpa, gpa + len)` into per-page pieces `(page, offset in page, length)`, or names
    /// the first address that is not guest RAM.
    fn chunks(&self, gpa: GuestPhysAddr, len: usize) -> Result<Pieces, AccessError> {
        let pieces = self.pieces(gpa, len)?;
        let mmio = pieces
            .iter()
            .find(|(location, _, _)| self.ranges.page(*location).page_type() == PageType::Mmio)
            .copied();
        match mmio {
            Some((location, offset, _)) => {
                let at = self.ranges.gpa_of(location).as_u64() + offset;
                Err(PageError::NotRam(GuestPhysAddr::new_truncate(at)).into())
            }
            None => Ok(pieces),
        }
    }

    /// Splits `[gpa, gpa + len)` into per-page pieces of any registered page, or names the first
    /// address that is not registered.
    fn pieces(&self, gpa: GuestPhysAddr, len: usize) -> Result<Pieces, AccessError> {
        let mut pieces = Pieces::default();
        let mut done = 0usize;
        while done < len {
            let at = gpa
                .checked_add(done as u64)
                .ok_or(RangeError::BeyondAddressWidth(gpa.as_u64()))?;
            let location = self.ranges.find(at).ok_or(PageError::NotGuestMemory(at))?;
            let offset = at.page_offset();
            let piece = ((PAGE_SIZE - offset) as usize).min(len - done);
            pieces.push((location, offset, piece));
            done += piece;
        }
        Ok(pieces)
    }
}

/// One page's part of an access: the page, the offset in it, the length.
type Piece = (PageLocation, u64, usize);

/// The per-page pieces of an access (`T`: what a piece is). Up to two stay inline — every
/// access of an emulated instruction (at most 8 bytes) — so the exit path does not go to the
/// heap.
pub(super) enum Pieces<T: Copy = Piece> {
    Inline([Option<T>; 2]),
    Heap(Vec<T>),
}

impl<T: Copy> Default for Pieces<T> {
    fn default() -> Self {
        Pieces::Inline([None; 2])
    }
}

impl<T: Copy> Pieces<T> {
    pub(super) fn push(&mut self, piece: T) {
        match self {
            Pieces::Inline(slots) => match slots.iter_mut().find(|slot| slot.is_none()) {
                Some(free) => *free = Some(piece),
                None => {
                    let mut all: Vec<T> = slots.iter().flatten().copied().collect();
                    all.push(piece);
                    *self = Pieces::Heap(all);
                }
            },
            Pieces::Heap(all) => all.push(piece),
        }
    }

    /// The pieces in address order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        let (inline, heap): (&[Option<T>], &[T]) = match self {
            Pieces::Inline(slots) => (slots, &[]),
            Pieces::Heap(all) => (&[], all),
        };
        inline.iter().flatten().chain(heap)
    }
}

/// Pages per RAM range at most (16 GiB, 32 MiB of descriptors): larger RAM is registered as
/// several ranges. Large enough that a host allocator hands each descriptor array out as fresh
/// zeroed memory it maps lazily (glibc does from 32 MiB on, whatever its heap did before), so
/// registering RAM writes no descriptor; small enough that no array is a huge allocation.
pub const RAM_CHUNK_PAGES: u64 = 4 * 1024 * 1024;

/// Bit 20 of a guest-physical address: what the A20 gate masks.
pub(super) const A20_BIT: u64 = 1 << 20;

/// Checks a range for registration: page-aligned, non-empty, inside the guest-physical width.
/// Returns its page count.
fn page_count(base: GuestPhysAddr, size: u64) -> Result<u64, RangeError> {
    if size == 0 {
        return Err(RangeError::ZeroSize(base));
    }
    if !base.is_page_aligned() {
        return Err(RangeError::Misaligned(base.as_u64()));
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(RangeError::Misaligned(size));
    }
    base.checked_add(size - 1)
        .ok_or(RangeError::BeyondAddressWidth(base.as_u64()))?;
    Ok(size / PAGE_SIZE)
}

/// True for events after which the page may read differently (what write monitoring reports).
/// Deflating is not one: a ballooned page reads as zeros, and so does the ZERO page it becomes.
fn changes_contents(event: PageEvent) -> bool {
    matches!(event, PageEvent::Write | PageEvent::Reset | PageEvent::Inflate)
}

/// The frame of `page` if it is one nothing but an exclusive change of the manager can
/// replace: a RAM page with a frame of its own (ALLOCATED or WRITE_MONITORED; the lock-free
/// path only moves a page between the two, keeping its frame). ZERO and SHARED pages get a new
/// frame at their first write, and ROM reads follow its protection.
fn stable_frame(page: PageDescriptor) -> Option<HostPhysAddr> {
    let owned = matches!(page.state(), PageState::Allocated | PageState::WriteMonitored);
    (page.page_type() == PageType::Ram && owned)
        .then(|| page.frame())
        .flatten()
}

fn frame_offset(frame: HostPhysAddr, offset: u64) -> HostPhysAddr {
    HostPhysAddr::new_truncate(frame.as_u64() + offset)
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
mod tests;
