//! Format-independent 4-level nested page tables kept in host frames, and a software walker
//! that translates the way the CPU does. The bit encoding of entries comes from an
//! [`EntryFormat`]: [`crate::Ept`] for Intel EPT, [`crate::Npt`] for AMD nested paging.

use alloc::vec::Vec;
use core::marker::PhantomData;

use bitflags::bitflags;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::error::NoMemory;
use crate::frames::{HostFrameAllocator, HostMemory};

/// Number of table levels (PML4, PDPT, PD, PT); level 0 holds 4 KiB leaves.
pub const LEVELS: usize = 4;
const ENTRIES_PER_TABLE: u64 = 512;
/// The 2 MiB large-page size.
const LARGE_SIZE: u64 = 1 << 21;

bitflags! {
    /// What a mapping lets the guest do with a page.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Permissions: u8 {
        /// Data reads.
        const READ = 1 << 0;
        /// Data writes.
        const WRITE = 1 << 1;
        /// Instruction fetches.
        const EXECUTE = 1 << 2;
    }
}

/// The kind of guest access, as an EPT violation's exit qualification reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

impl Access {
    /// The permission this access needs.
    pub fn needs(self) -> Permissions {
        match self {
            Access::Read => Permissions::READ,
            Access::Write => Permissions::WRITE,
            Access::Execute => Permissions::EXECUTE,
        }
    }
}

/// Caching of a mapped page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// Uncacheable: device memory (MMIO).
    Uncacheable,
    /// Write-back: RAM.
    WriteBack,
}

/// A 4 KiB leaf mapping: which host frame, with what permissions and caching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The host frame the guest page maps to.
    pub frame: HostPhysAddr,
    /// What the guest may do without a fault. Never empty (an empty mapping is no mapping).
    pub permissions: Permissions,
    /// How the page is cached.
    pub memory_type: MemoryType,
}

/// One decoded table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// No mapping: any access faults.
    Absent,
    /// Points to the next-level table.
    Table(HostPhysAddr),
    /// Maps a page.
    Leaf(Leaf),
}

/// The bit encoding of one nested-paging format.
pub trait EntryFormat {
    /// The CPU can log the guest-physical addresses of the pages the guest writes through this
    /// format's tables (Intel's page-modification log, PML, for EPT), so write monitoring can
    /// take its writes from that log ([`crate::manager::DirtyLogMode::Pml`]) instead of write
    /// faults. Whether a given CPU offers it is the backend's to check as well.
    const CPU_WRITE_LOG: bool;
    /// Encodes an entry pointing at the next-level table at `table`.
    fn encode_table(table: HostPhysAddr) -> u64;
    /// Encodes a 4 KiB leaf.
    fn encode_leaf(leaf: &Leaf) -> u64;
    /// Encodes a 2 MiB leaf (in a level-1 table); `leaf.frame` is 2 MiB-aligned.
    fn encode_large_leaf(leaf: &Leaf) -> u64;
    /// Decodes the raw entry `raw` found at `level` (0 = page table).
    fn decode(raw: u64, level: usize) -> Entry;
    /// The permissions a non-leaf entry grants to everything below it.
    fn table_permissions(raw: u64) -> Permissions;
    /// The present entry `raw` (a table pointer or a 2 MiB leaf, or an awaiting-tables
    /// marker) marked as withholding writes for write monitoring, its write permission taken
    /// if it grants one. Marked whether it grants writes or not: the mark, not the permission,
    /// tells that the pages below are pending.
    fn withhold_write(raw: u64) -> u64;
    /// The entry `raw` unmarked, with the write permission [`withhold_write`](Self::withhold_write)
    /// took given back (none where it took none); unchanged if it is not marked.
    fn restore_write(raw: u64) -> u64;
    /// True when `raw` is marked as withholding writes.
    fn writes_withheld(raw: u64) -> bool;
    /// A not-present page-directory entry that marks its 2 MiB block as awaiting tables:
    /// unmapped for want of a page table, mapped again from the descriptors at its next
    /// access. The CPU sees no entry; [`withhold_write`](Self::withhold_write) and
    /// [`restore_write`](Self::restore_write) mark and unmark it as they do a present entry,
    /// granting nothing either way. The state lives in the tables, so no side record of it can
    /// outlive it.
    fn awaiting_tables() -> u64;
    /// True when `raw` is the [`awaiting_tables`](Self::awaiting_tables) marker (write
    /// permission withheld or not).
    fn awaits_tables(raw: u64) -> bool;
    /// The leaf `raw` with the dirty flag the CPU sets on a write cleared.
    fn without_dirty(raw: u64) -> u64;
    /// True when the CPU set the leaf `raw`'s dirty flag.
    fn is_dirty(raw: u64) -> bool;
}

/// Where a format keeps write monitoring's marks: the bit that grants writes, the bit that
/// marks an entry as withholding them, and the bit that remembers the grant was taken. One
/// rule over these serves every format's [`EntryFormat::withhold_write`] and
/// [`EntryFormat::restore_write`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct WithheldWriteBits {
    pub(crate) write: u64,
    pub(crate) withheld: u64,
    pub(crate) taken: u64,
}

impl WithheldWriteBits {
    /// `raw` marked as withholding writes, its write grant taken if it had one.
    pub(crate) fn withhold(self, raw: u64) -> u64 {
        if raw & self.write == 0 {
            // Nothing to take (a read-only leaf, a marker, or withheld already): marked only.
            return raw | self.withheld;
        }
        (raw & !self.write) | self.withheld | self.taken
    }

    /// `raw` unmarked, with the write grant [`withhold`](Self::withhold) took given back.
    pub(crate) fn restore(self, raw: u64) -> u64 {
        let unmarked = raw & !self.withheld;
        if unmarked & self.taken == 0 {
            return unmarked;
        }
        (unmarked | self.write) & !self.taken
    }
}

/// Which TLB invalidation a change to the tables needs before the guest runs again. Every
/// kind but `None` is a flush on every CPU that ran the VM: a translation another CPU cached
/// is as stale as the local one. Frames the change took from the guest are reused only after
/// that flush ([`Pgm::begin_tlb_flush`](crate::Pgm::begin_tlb_flush)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "the guest may still use a stale translation until this invalidation is carried out"]
pub enum Invalidation {
    /// Nothing is cached that the change made stale.
    None,
    /// A fault's resolution changed the frame of an entry that was present: the CPU that took
    /// the EPT violation has no stale translation left (the violation flushed it, SDM
    /// 29.4.3.1), but every other CPU that ran the VM may have one (INVEPT single-context
    /// there). Such a flush is not a complete one: the faulting CPU still caches the VM's other
    /// translations, so it must not end a [`crate::manager::Pgm::begin_tlb_flush`] bracket
    /// (frames retired meanwhile wait for the next complete flush).
    OtherCpus,
    /// Flush the translations of this VM's tables (INVEPT single-context).
    SingleContext,
    /// Flush the translations of every context (INVEPT all-context).
    AllContexts,
}

/// A guest access the tables do not allow, as the CPU would report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The faulting guest-physical address.
    pub gpa: GuestPhysAddr,
    /// The access that faulted.
    pub access: Access,
    /// What the translation allowed (empty when nothing is mapped); the CPU reports the same in
    /// bits 3..=5 of the exit qualification.
    pub permitted: Permissions,
}

/// 4-level nested page tables in host frames, encoded by `F`.
pub(crate) struct NestedTables<F: EntryFormat> {
    root: HostPhysAddr,
    table_frames: usize,
    format: PhantomData<F>,
}

/// What [`NestedTables::make_large`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LargeMapping {
    /// No page directory covers the block: nothing changed.
    Unreachable,
    /// The block is mapped by the one leaf. `detached` is the page table that mapped it before:
    /// out of the tables now, for the caller to free once no CPU can still walk it.
    Mapped {
        /// The page table the leaf replaced.
        detached: Option<HostPhysAddr>,
    },
}

/// How [`NestedTables::map_range`] maps one 2 MiB block: by one leaf in the page directory,
/// or with 4 KiB leaves in the page table (`None`: none was needed).
enum Planned {
    Large(HostPhysAddr, Leaf),
    Small(Option<HostPhysAddr>),
}

/// A table created during one [`NestedTables::map_range`] call, for rollback.
struct CreatedTable {
    parent_entry: HostPhysAddr,
    /// What the parent entry held before: absent, or a block's awaiting-tables marker.
    previous: u64,
    /// An address the table covers.
    covers: GuestPhysAddr,
    frame: HostPhysAddr,
}

/// The 2 MiB blocks among `created` whose page table replaced an awaiting-tables marker.
fn revived<F: EntryFormat>(created: &[CreatedTable]) -> Vec<GuestPhysAddr> {
    created
        .iter()
        .filter(|table| F::awaits_tables(table.previous))
        .map(|table| GuestPhysAddr::new_truncate(table.covers.as_u64() & !(LARGE_SIZE - 1)))
        .collect()
}

/// Host-physical address of the entry for `gpa` in the table at `table` of `level`.
fn entry_addr(table: HostPhysAddr, level: usize, gpa: GuestPhysAddr) -> HostPhysAddr {
    let index = (gpa.as_u64() >> (PAGE_SHIFT as usize + 9 * level)) % ENTRIES_PER_TABLE;
    HostPhysAddr::new_truncate(table.as_u64() + index * 8)
}

impl<F: EntryFormat> NestedTables<F> {
    /// Allocates an empty root table. Fails with [`NoMemory::OutOfFrames`].
    pub fn new(frames: &mut impl HostFrameAllocator, memory: &mut impl HostMemory) -> Result<Self, NoMemory> {
        let root = frames.allocate_frame().ok_or(NoMemory::OutOfFrames)?;
        memory.zero_frame(root);
        Ok(NestedTables {
            root,
            table_frames: 1,
            format: PhantomData,
        })
    }

    /// Host-physical address of the top-level table (what the EPT pointer names).
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Host frames the tables occupy, root included.
    pub fn table_frames(&self) -> usize {
        self.table_frames
    }

    /// Maps every page of `[base, base + pages * 4 KiB)` to `leaf_of(gpa)` (`None` leaves the
    /// page unmapped), creating the tables it needs, except that a 2 MiB block lying wholly in
    /// the range, for which `large_of(block)` gives a leaf and no page table exists yet, is
    /// mapped by that one 2 MiB leaf instead (no page table at all). All or nothing: when a
    /// table frame cannot be had, the tables created by this call are freed again and
    /// [`NoMemory::OutOfFrames`] is returned with no entry changed. Returns the blocks that
    /// awaited tables ([`unmap_large`](Self::unmap_large)) and now have a page table: their
    /// pages outside the range are left unmapped, for the caller to map.
    pub fn map_range(
        &mut self,
        frames: &mut impl HostFrameAllocator,
        memory: &mut impl HostMemory,
        base: GuestPhysAddr,
        pages: u64,
        mut leaf_of: impl FnMut(GuestPhysAddr) -> Option<Leaf>,
        mut large_of: impl FnMut(GuestPhysAddr) -> Option<Leaf>,
    ) -> Result<Vec<GuestPhysAddr>, NoMemory> {
        let end = base.as_u64() + pages * PAGE_SIZE;
        let mut created = Vec::new();
        let mut plan = Vec::new();
        let mut block = base.as_u64() & !(LARGE_SIZE - 1);
        while block < end {
            let gpa = GuestPhysAddr::new_truncate(block);
            let whole = block >= base.as_u64() && block + LARGE_SIZE <= end;
            let large = if whole { large_of(gpa) } else { None };
            let planned = match large {
                Some(leaf) => self
                    .ensure_table(frames, memory, gpa, 1, &mut created)
                    .map(|directory| {
                        match F::decode(
                            F::restore_write(memory.read_u64(entry_addr(directory, 1, gpa))),
                            1,
                        ) {
                            Entry::Absent => Planned::Large(directory, leaf),
                            _ => Planned::Small(None),
                        }
                    }),
                None => Some(Planned::Small(None)),
            };
            let planned = match planned {
                Some(Planned::Small(None)) => self
                    .ensure_table(frames, memory, gpa, 0, &mut created)
                    .map(|table| Planned::Small(Some(table))),
                other => other,
            };
            match planned {
                Some(planned) => plan.push((gpa, planned)),
                None => {
                    self.roll_back(frames, memory, created);
                    return Err(NoMemory::OutOfFrames);
                }
            }
            block += LARGE_SIZE;
        }
        for (block, planned) in plan {
            match planned {
                Planned::Large(directory, leaf) => {
                    memory.write_u64(entry_addr(directory, 1, block), F::encode_large_leaf(&leaf));
                }
                Planned::Small(table) => {
                    let Some(table) = table else { continue };
                    let first = block.as_u64().max(base.as_u64());
                    let last = (block.as_u64() + LARGE_SIZE).min(end);
                    for page in (first..last).step_by(PAGE_SIZE as usize) {
                        let gpa = GuestPhysAddr::new_truncate(page);
                        memory.write_u64(entry_addr(table, 0, gpa), encode::<F>(leaf_of(gpa)));
                    }
                }
            }
        }
        Ok(revived::<F>(&created))
    }

    /// Creates the tables `[base, base + pages * 4 KiB)` needs for 4 KiB leaves, leaving every
    /// leaf as it is. All or nothing, as [`map_range`](Self::map_range), and like it returns
    /// the blocks that awaited tables and now have an empty page table, for the caller to map.
    pub fn ensure_tables(
        &mut self,
        frames: &mut impl HostFrameAllocator,
        memory: &mut impl HostMemory,
        base: GuestPhysAddr,
        pages: u64,
    ) -> Result<Vec<GuestPhysAddr>, NoMemory> {
        let mut created = Vec::new();
        let mut page = 0;
        while page < pages {
            let gpa = GuestPhysAddr::new_truncate(base.as_u64() + page * PAGE_SIZE);
            match self.ensure_table(frames, memory, gpa, 0, &mut created) {
                Some(_) => {}
                None => {
                    self.roll_back(frames, memory, created);
                    return Err(NoMemory::OutOfFrames);
                }
            }
            // The next page that needs another leaf table starts the next 2 MiB block.
            let in_table = (gpa.as_u64() >> PAGE_SHIFT) % ENTRIES_PER_TABLE;
            page += ENTRIES_PER_TABLE - in_table;
        }
        Ok(revived::<F>(&created))
    }

    /// Replaces the leaf of `gpa`, whose tables must already exist (as for every page of a
    /// registered range). Never allocates. Returns `false`, changing nothing, when they do not.
    pub fn set_leaf(&mut self, memory: &mut impl HostMemory, gpa: GuestPhysAddr, leaf: Option<Leaf>) -> bool {
        match self.leaf_table(memory, gpa) {
            Some(table) => {
                memory.write_u64(entry_addr(table, 0, gpa), encode::<F>(leaf));
                true
            }
            None => false,
        }
    }

    /// Where the 4 KiB entry for `gpa` lives, if a page table reaches it (not under a 2 MiB
    /// leaf) through table entries that all grant `access` (a write under an entry that
    /// withholds writes is not the leaf's to resolve). Only reads the tables, so it may run
    /// while other threads change leaves.
    pub(crate) fn leaf_entry_addr(
        &self,
        memory: &impl HostMemory,
        gpa: GuestPhysAddr,
        access: Access,
    ) -> Option<HostPhysAddr> {
        let mut table = self.root;
        for level in (1..LEVELS).rev() {
            let raw = memory.read_u64(entry_addr(table, level, gpa));
            match F::decode(raw, level) {
                Entry::Table(next) if F::table_permissions(raw).contains(access.needs()) => table = next,
                _ => return None,
            }
        }
        Some(entry_addr(table, 0, gpa))
    }

    /// Clears the dirty flag of the leaf mapping `gpa` (4 KiB or 2 MiB), so that the CPU sets
    /// it, and logs the address with PML, at the next write. A compare-exchange: the CPU may
    /// set accessed and dirty flags meanwhile. Returns whether the flag was set.
    pub fn clear_dirty(&mut self, memory: &mut impl HostMemory, gpa: GuestPhysAddr) -> bool {
        let Some(slot) = self.leaf_slot(memory, gpa) else {
            return false;
        };
        loop {
            let raw = memory.read_u64(slot);
            if !F::is_dirty(raw) {
                return false;
            }
            if memory
                .compare_exchange_u64(slot, raw, F::without_dirty(raw))
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Clears the dirty flag of every leaf the CPU can reach (the start of PML dirty logging).
    pub fn clear_dirty_everywhere(&mut self, memory: &mut impl HostMemory) {
        let mut leaves = Vec::new();
        self.for_each_leaf(memory, |gpa, _, _, _| leaves.push(gpa));
        for gpa in leaves {
            self.clear_dirty(memory, gpa);
        }
    }

    /// Where the leaf mapping `gpa` lives: a 4 KiB entry, or the 2 MiB entry above it.
    pub(crate) fn leaf_slot(&self, memory: &impl HostMemory, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        let mut table = self.root;
        for level in (0..LEVELS).rev() {
            let slot = entry_addr(table, level, gpa);
            match F::decode(memory.read_u64(slot), level) {
                Entry::Table(next) => table = next,
                Entry::Leaf(_) => return Some(slot),
                Entry::Absent => return None,
            }
        }
        None
    }

    /// True when the CPU set the dirty flag of the leaf mapping `gpa` (for the tests of the
    /// CPU's write log, which NPT has not).
    #[cfg(test)]
    #[cfg_attr(feature = "sim-npt", allow(dead_code))]
    pub fn is_dirty(&self, memory: &impl HostMemory, gpa: GuestPhysAddr) -> bool {
        self.leaf_slot(memory, gpa)
            .is_some_and(|slot| F::is_dirty(memory.read_u64(slot)))
    }

    /// The decoded 4 KiB entry for `gpa` (`Entry::Absent` when no table reaches it).
    pub fn entry(&self, memory: &impl HostMemory, gpa: GuestPhysAddr) -> Entry {
        match self.leaf_table(memory, gpa) {
            Some(table) => F::decode(memory.read_u64(entry_addr(table, 0, gpa)), 0),
            None => Entry::Absent,
        }
    }

    /// Maps the 2 MiB block at `block` (2 MiB-aligned) with one large `leaf`, replacing a
    /// large leaf or a page table (which leaves the tables: see [`LargeMapping`]).
    pub fn make_large(
        &mut self,
        memory: &mut impl HostMemory,
        block: GuestPhysAddr,
        leaf: Leaf,
    ) -> LargeMapping {
        let Some(directory) = self.table_at(memory, block, 1) else {
            return LargeMapping::Unreachable;
        };
        let slot = entry_addr(directory, 1, block);
        let detached = match F::decode(memory.read_u64(slot), 1) {
            Entry::Table(page_table) => Some(page_table),
            Entry::Leaf(_) | Entry::Absent => None,
        };
        memory.write_u64(slot, F::encode_large_leaf(&leaf));
        if detached.is_some() {
            self.table_frames -= 1;
        }
        LargeMapping::Mapped { detached }
    }

    /// Maps the 2 MiB block at `block` with 4 KiB leaves from `leaf_of` again, in the page
    /// table `page_table` (a frame the caller gives; every entry is written). Returns `false`,
    /// changing nothing and leaving the frame the caller's, when the block is not mapped large.
    pub fn split_large(
        &mut self,
        memory: &mut impl HostMemory,
        block: GuestPhysAddr,
        page_table: HostPhysAddr,
        mut leaf_of: impl FnMut(GuestPhysAddr) -> Option<Leaf>,
    ) -> bool {
        let Some(directory) = self.table_at(memory, block, 1) else {
            return false;
        };
        let slot = entry_addr(directory, 1, block);
        let large = memory.read_u64(slot);
        if !matches!(F::decode(large, 1), Entry::Leaf(_)) {
            return false;
        }
        for page in 0..ENTRIES_PER_TABLE {
            let gpa = GuestPhysAddr::new_truncate(block.as_u64() + page * PAGE_SIZE);
            memory.write_u64(entry_addr(page_table, 0, gpa), encode::<F>(leaf_of(gpa)));
        }
        // A large leaf whose writes were withheld for write monitoring passes that on to the
        // table replacing it: the pages below still wait for their protection.
        let table = F::encode_table(page_table);
        let table = if F::writes_withheld(large) {
            F::withhold_write(table)
        } else {
            table
        };
        memory.write_u64(slot, table);
        self.table_frames += 1;
        true
    }

    /// Unmaps the 2 MiB block at `block`, mapped by one large leaf, when no page table can be
    /// had to split it: every access to it faults until it is mapped again, and its entry says
    /// so ([`EntryFormat::awaiting_tables`], write protection withheld as the leaf's was).
    /// Returns `false`, changing nothing, when the block is not mapped large.
    pub fn unmap_large(&mut self, memory: &mut impl HostMemory, block: GuestPhysAddr) -> bool {
        let Some(directory) = self.table_at(memory, block, 1) else {
            return false;
        };
        let slot = entry_addr(directory, 1, block);
        let large = memory.read_u64(slot);
        if !matches!(F::decode(large, 1), Entry::Leaf(_)) {
            return false;
        }
        let marker = if F::writes_withheld(large) {
            F::withhold_write(F::awaiting_tables())
        } else {
            F::awaiting_tables()
        };
        memory.write_u64(slot, marker);
        true
    }

    /// Where the page-directory entry of the 2 MiB block holding `gpa` lives, if a page
    /// directory covers it (for tests that plant entries).
    #[cfg(test)]
    pub(crate) fn directory_entry_addr(
        &self,
        memory: &impl HostMemory,
        gpa: GuestPhysAddr,
    ) -> Option<HostPhysAddr> {
        self.table_at(memory, gpa, 1)
            .map(|directory| entry_addr(directory, 1, gpa))
    }

    /// True when the 2 MiB block holding `gpa` awaits its tables: [`unmap_large`] left it
    /// unmapped and nothing has mapped it since. Three table reads.
    ///
    /// [`unmap_large`]: Self::unmap_large
    pub fn awaits_tables(&self, memory: &impl HostMemory, gpa: GuestPhysAddr) -> bool {
        self.table_at(memory, gpa, 1)
            .is_some_and(|directory| F::awaits_tables(memory.read_u64(entry_addr(directory, 1, gpa))))
    }

    /// The 2 MiB leaf mapping `gpa`, if one does, with the permissions it grants of its own:
    /// a write permission write monitoring withholds is counted as granted, as the entries
    /// above would grant theirs (the protection is monitoring's, layered above, and the
    /// auditor reads it so). Whatever the entries above grant.
    pub fn large_leaf(&self, memory: &impl HostMemory, gpa: GuestPhysAddr) -> Option<Leaf> {
        let directory = self.table_at(memory, gpa, 1)?;
        match F::decode(
            F::restore_write(memory.read_u64(entry_addr(directory, 1, gpa))),
            1,
        ) {
            Entry::Leaf(leaf) => Some(leaf),
            Entry::Absent | Entry::Table(_) => None,
        }
    }

    /// Calls `visit(gpa, pages, leaf, above)` for every leaf the CPU can reach from the root, in
    /// address order: 4 KiB leaves (`pages` = 1) and 2 MiB leaves (`pages` = 512, `gpa` the
    /// block); `above` is what the table entries on the way down grant (the CPU grants the
    /// intersection of `above` and the leaf's permissions).
    pub fn for_each_leaf(
        &self,
        memory: &impl HostMemory,
        mut visit: impl FnMut(GuestPhysAddr, u64, Leaf, Permissions),
    ) {
        walk_leaves::<F>(memory, self.root, LEVELS - 1, 0, Permissions::all(), &mut visit);
    }

    /// Withholds writes from every page at once (write monitoring's O(1) protection): every
    /// present root entry loses its write permission, whatever the leaves below grant, since
    /// the CPU grants the intersection over the walk. [`withheld_writes_at`] and
    /// [`push_write_protection_down`] move the protection towards the leaves lazily. Returns
    /// whether an entry was present (cached translations are then stale).
    ///
    /// [`withheld_writes_at`]: Self::withheld_writes_at
    /// [`push_write_protection_down`]: Self::push_write_protection_down
    pub fn withhold_writes_from_root(&mut self, memory: &mut impl HostMemory) -> bool {
        withhold_writes_in_table::<F>(memory, self.root, LEVELS - 1)
    }

    /// The level of the highest table entry on the walk to `gpa` that withholds writes (3: a
    /// root entry; 1: a page-directory entry, 2 MiB leaf or not). `None` when every table
    /// entry on the walk grants writes (or the walk ends at a missing entry).
    pub fn withheld_writes_at(&self, memory: &impl HostMemory, gpa: GuestPhysAddr) -> Option<usize> {
        let mut table = self.root;
        for level in (1..LEVELS).rev() {
            let raw = memory.read_u64(entry_addr(table, level, gpa));
            let entry = F::decode(raw, level);
            if (entry != Entry::Absent || F::awaits_tables(raw)) && F::writes_withheld(raw) {
                return Some(level);
            }
            match entry {
                Entry::Table(next) => table = next,
                Entry::Absent | Entry::Leaf(_) => return None,
            }
        }
        None
    }

    /// The page-directory entry on the walk to `gpa` when it alone withholds writes and points
    /// at a page table (the one case a settle through `&self` takes on: see pgm's
    /// `lazy_protection`): its address and the page table's. `None` when an entry above it
    /// withholds writes or is missing, or when it grants writes, maps 2 MiB or awaits tables.
    pub(crate) fn withheld_directory_entry(
        &self,
        memory: &impl HostMemory,
        gpa: GuestPhysAddr,
    ) -> Option<(HostPhysAddr, HostPhysAddr)> {
        let mut table = self.root;
        for level in (2..LEVELS).rev() {
            let raw = memory.read_u64(entry_addr(table, level, gpa));
            match F::decode(raw, level) {
                Entry::Table(next) if !F::writes_withheld(raw) => table = next,
                _ => return None,
            }
        }
        let slot = entry_addr(table, 1, gpa);
        let raw = memory.read_u64(slot);
        match F::decode(raw, 1) {
            Entry::Table(page_table) if F::writes_withheld(raw) => Some((slot, page_table)),
            _ => None,
        }
    }

    /// Gives the entry at `slot` the write permission it withholds back (as
    /// [`grant_writes_at`](Self::grant_writes_at)) through `&self`: a compare-exchange,
    /// retried while the CPU changes the entry's accessed flag.
    pub(crate) fn grant_withheld_writes(&self, memory: &impl HostMemory, slot: HostPhysAddr) {
        let mut raw = memory.read_u64(slot);
        while F::writes_withheld(raw) {
            match memory.compare_exchange_u64(slot, raw, F::restore_write(raw)) {
                Ok(()) => return,
                Err(now) => raw = now,
            }
        }
    }

    /// Moves the write protection of the table entry at `level` (2 or 3) on the walk to `gpa`
    /// one level down: every present entry of the table it points to loses its write permission
    /// first, then the entry gets its own back. No translation gains a permission it lacked
    /// before, so no TLB flush is needed. Returns `false`, changing nothing, when that entry is
    /// not a table pointer.
    pub fn push_write_protection_down(
        &mut self,
        memory: &mut impl HostMemory,
        gpa: GuestPhysAddr,
        level: usize,
    ) -> bool {
        debug_assert!(
            level >= 2,
            "level {level} points at leaves: the caller protects them"
        );
        let Some(table) = self.table_at(memory, gpa, level) else {
            return false;
        };
        let slot = entry_addr(table, level, gpa);
        let raw = memory.read_u64(slot);
        let Entry::Table(below) = F::decode(raw, level) else {
            return false;
        };
        withhold_writes_in_table::<F>(memory, below, level - 1);
        memory.write_u64(slot, F::restore_write(raw));
        true
    }

    /// Gives the table entry at `level` on the walk to `gpa` its write permission back, once
    /// whatever it protected is protected below it (by the caller, for a page-directory entry).
    /// Returns `false`, changing nothing, when the walk does not reach a present entry there.
    pub fn grant_writes_at(
        &mut self,
        memory: &mut impl HostMemory,
        gpa: GuestPhysAddr,
        level: usize,
    ) -> bool {
        let Some(table) = self.table_at(memory, gpa, level) else {
            return false;
        };
        let slot = entry_addr(table, level, gpa);
        let raw = memory.read_u64(slot);
        if F::decode(raw, level) == Entry::Absent && !F::awaits_tables(raw) {
            return false;
        }
        memory.write_u64(slot, F::restore_write(raw));
        true
    }

    /// Gives every table entry above the page tables (and every 2 MiB leaf that lost it to
    /// [`push_write_protection_down`](Self::push_write_protection_down)) its write
    /// permission back. Visits the upper levels only: 1 + 1 + 64 tables for a 64 GiB guest.
    pub fn grant_writes_everywhere(&mut self, memory: &mut impl HostMemory) {
        grant_writes_below::<F>(memory, self.root, LEVELS - 1);
    }

    /// True when `gpa` is mapped by a 2 MiB leaf.
    pub fn is_large(&self, memory: &impl HostMemory, gpa: GuestPhysAddr) -> bool {
        self.table_at(memory, gpa, 1).is_some_and(|directory| {
            matches!(
                F::decode(memory.read_u64(entry_addr(directory, 1, gpa)), 1),
                Entry::Leaf(_)
            )
        })
    }

    /// Frees every table frame, reserved ones included. The tables must no longer be in use by
    /// a CPU, and nothing may use them afterwards (the root is gone).
    pub fn destroy(&mut self, frames: &mut impl HostFrameAllocator, memory: &impl HostMemory) {
        free_table::<F>(frames, memory, self.root, LEVELS - 1);
        self.table_frames = 0;
    }

    /// The page table (level 0) covering `gpa`, if the walk reaches one.
    fn leaf_table(&self, memory: &impl HostMemory, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        self.table_at(memory, gpa, 0)
    }

    /// The table at `level` on the walk to `gpa` (the root is level 3), if the walk reaches it.
    fn table_at(&self, memory: &impl HostMemory, gpa: GuestPhysAddr, level: usize) -> Option<HostPhysAddr> {
        let mut table = self.root;
        for above in (level + 1..LEVELS).rev() {
            match F::decode(memory.read_u64(entry_addr(table, above, gpa)), above) {
                Entry::Table(next) => table = next,
                Entry::Absent | Entry::Leaf(_) => return None,
            }
        }
        Some(table)
    }

    /// Walks to the table at `level` covering `gpa` (0: the page table), creating missing
    /// tables (recorded in `created`). `None` when a frame could not be allocated, or when a
    /// 2 MiB leaf maps `gpa` and a page table was asked for (the caller splits such blocks).
    fn ensure_table(
        &mut self,
        frames: &mut impl HostFrameAllocator,
        memory: &mut impl HostMemory,
        gpa: GuestPhysAddr,
        level: usize,
        created: &mut Vec<CreatedTable>,
    ) -> Option<HostPhysAddr> {
        let mut table = self.root;
        for above in (level + 1..LEVELS).rev() {
            let slot = entry_addr(table, above, gpa);
            table = match F::decode(memory.read_u64(slot), above) {
                Entry::Table(next) => next,
                Entry::Leaf(_) => {
                    debug_assert!(false, "a page table was asked for under the 2 MiB leaf at {gpa}");
                    return None;
                }
                Entry::Absent => {
                    let frame = frames.allocate_frame()?;
                    memory.zero_frame(frame);
                    let previous = memory.read_u64(slot);
                    // A block awaiting tables keeps write monitoring's pending protection.
                    let entry = if F::awaits_tables(previous) && F::writes_withheld(previous) {
                        F::withhold_write(F::encode_table(frame))
                    } else {
                        F::encode_table(frame)
                    };
                    memory.write_u64(slot, entry);
                    created.push(CreatedTable {
                        parent_entry: slot,
                        previous,
                        covers: gpa,
                        frame,
                    });
                    self.table_frames += 1;
                    frame
                }
            };
        }
        Some(table)
    }

    /// Undoes the table creations of a failed [`map_range`](Self::map_range), newest first.
    fn roll_back(
        &mut self,
        frames: &mut impl HostFrameAllocator,
        memory: &mut impl HostMemory,
        created: Vec<CreatedTable>,
    ) {
        for table in created.into_iter().rev() {
            memory.write_u64(table.parent_entry, table.previous);
            frames.free_frame(table.frame);
            self.table_frames -= 1;
        }
    }
}

pub(crate) fn encode<F: EntryFormat>(leaf: Option<Leaf>) -> u64 {
    leaf.map_or(0, |leaf| F::encode_leaf(&leaf))
}

/// Visits the leaves under the table at `table` of `level`, which maps guest-physical addresses
/// from `base` up; the entries above grant `above`.
fn walk_leaves<F: EntryFormat>(
    memory: &impl HostMemory,
    table: HostPhysAddr,
    level: usize,
    base: u64,
    above: Permissions,
    visit: &mut impl FnMut(GuestPhysAddr, u64, Leaf, Permissions),
) {
    let span = PAGE_SIZE << (9 * level);
    for index in 0..ENTRIES_PER_TABLE {
        let slot = HostPhysAddr::new_truncate(table.as_u64() + index * 8);
        let gpa = base + index * span;
        let raw = memory.read_u64(slot);
        match F::decode(raw, level) {
            Entry::Absent => {}
            Entry::Table(next) => {
                let granted = above & F::table_permissions(raw);
                walk_leaves::<F>(memory, next, level - 1, gpa, granted, visit)
            }
            // A 2 MiB leaf whose writes are withheld grants what it granted before on its
            // own: the protection is monitoring's, layered above, as a table entry's would be.
            Entry::Leaf(_) if F::writes_withheld(raw) => {
                if let Entry::Leaf(own) = F::decode(F::restore_write(raw), level) {
                    visit(
                        GuestPhysAddr::new_truncate(gpa),
                        span / PAGE_SIZE,
                        own,
                        above - Permissions::WRITE,
                    )
                }
            }
            Entry::Leaf(leaf) => visit(GuestPhysAddr::new_truncate(gpa), span / PAGE_SIZE, leaf, above),
        }
    }
}

/// Withholds the write permission of every present entry of the table at `table` (of `level`
/// ≥ 1: table pointers and 2 MiB leaves), and marks blocks awaiting tables as withholding it.
/// Returns whether any entry was present.
fn withhold_writes_in_table<F: EntryFormat>(
    memory: &mut impl HostMemory,
    table: HostPhysAddr,
    level: usize,
) -> bool {
    let mut present = false;
    for index in 0..ENTRIES_PER_TABLE {
        let slot = HostPhysAddr::new_truncate(table.as_u64() + index * 8);
        let raw = memory.read_u64(slot);
        if F::decode(raw, level) != Entry::Absent {
            memory.write_u64(slot, F::withhold_write(raw));
            present = true;
        } else if F::awaits_tables(raw) {
            memory.write_u64(slot, F::withhold_write(raw));
        }
    }
    present
}

/// Gives every table entry under (and in) the table at `table` of `level` write permission,
/// 2 MiB leaves included, down to the page directories.
fn grant_writes_below<F: EntryFormat>(memory: &mut impl HostMemory, table: HostPhysAddr, level: usize) {
    for index in 0..ENTRIES_PER_TABLE {
        let slot = HostPhysAddr::new_truncate(table.as_u64() + index * 8);
        let raw = memory.read_u64(slot);
        match F::decode(raw, level) {
            Entry::Absent if !F::awaits_tables(raw) => continue,
            Entry::Absent => {}
            Entry::Table(next) if level > 1 => grant_writes_below::<F>(memory, next, level - 1),
            Entry::Table(_) | Entry::Leaf(_) => {}
        }
        if F::writes_withheld(raw) {
            memory.write_u64(slot, F::restore_write(raw));
        }
    }
}

/// Frees the table at `table` of `level` and every table below it.
fn free_table<F: EntryFormat>(
    frames: &mut impl HostFrameAllocator,
    memory: &impl HostMemory,
    table: HostPhysAddr,
    level: usize,
) {
    if level > 0 {
        for index in 0..ENTRIES_PER_TABLE {
            let slot = HostPhysAddr::new_truncate(table.as_u64() + index * 8);
            if let Entry::Table(next) = F::decode(memory.read_u64(slot), level) {
                free_table::<F>(frames, memory, next, level - 1);
            }
        }
    }
    frames.free_frame(table);
}

/// Translates `gpa` for `access` through the tables at `root` as the CPU does: permissions are
/// the intersection over all levels. Returns the host-physical address, or the violation the
/// CPU would raise.
pub fn translate<F: EntryFormat>(
    memory: &impl HostMemory,
    root: HostPhysAddr,
    gpa: GuestPhysAddr,
    access: Access,
) -> Result<HostPhysAddr, Violation> {
    let mut table = root;
    let mut permitted = Permissions::all();
    for level in (0..LEVELS).rev() {
        let raw = memory.read_u64(entry_addr(table, level, gpa));
        match F::decode(raw, level) {
            Entry::Absent => {
                return Err(Violation {
                    gpa,
                    access,
                    permitted: Permissions::empty(),
                });
            }
            Entry::Table(next) => {
                permitted &= F::table_permissions(raw);
                table = next;
            }
            Entry::Leaf(leaf) => {
                permitted &= leaf.permissions;
                if !permitted.contains(access.needs()) {
                    return Err(Violation {
                        gpa,
                        access,
                        permitted,
                    });
                }
                let size_mask = (PAGE_SIZE << (9 * level)) - 1;
                return Ok(HostPhysAddr::new_truncate(
                    leaf.frame.as_u64() + (gpa.as_u64() & size_mask),
                ));
            }
        }
    }
    Err(Violation {
        gpa,
        access,
        permitted: Permissions::empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimFormat, SimFrames, SimMemory};
    use crate::test_support::{gpa, MIB};

    fn leaf(frame: u64, permissions: Permissions) -> Option<Leaf> {
        Some(Leaf {
            frame: HostPhysAddr::new_truncate(frame),
            permissions,
            memory_type: MemoryType::WriteBack,
        })
    }

    /// The walker grants what every level grants: a mapped page translates for the accesses its
    /// leaf allows and faults, naming what it allows, for the others; unmapped space faults
    /// with nothing allowed.
    #[test]
    fn mapped_pages_translate_with_their_permissions_and_others_fault() {
        let (mut frames, mut memory) = (SimFrames::new(64), SimMemory::default());
        let mut tables = NestedTables::<SimFormat>::new(&mut frames, &mut memory).unwrap();
        let frame_of = |at: GuestPhysAddr| 0x4000_0000 + at.as_u64();
        tables
            .map_range(
                &mut frames,
                &mut memory,
                gpa(MIB),
                4,
                |at| leaf(frame_of(at), Permissions::READ),
                |_| None,
            )
            .unwrap();
        assert!(tables.set_leaf(
            &mut memory,
            gpa(MIB + 0x1000),
            leaf(0x7000_0000, Permissions::all())
        ));
        let translate = |at, access| translate::<SimFormat>(&memory, tables.root(), gpa(at), access);
        assert_eq!(
            translate(MIB + 0x2010, Access::Read),
            Ok(HostPhysAddr::new_truncate(0x4010_2010))
        );
        assert_eq!(
            translate(MIB + 0x1008, Access::Write),
            Ok(HostPhysAddr::new_truncate(0x7000_0008))
        );
        assert_eq!(
            translate(MIB + 0x3000, Access::Write),
            Err(Violation {
                gpa: gpa(MIB + 0x3000),
                access: Access::Write,
                permitted: Permissions::READ,
            })
        );
        assert_eq!(
            translate(MIB + 0x4000, Access::Read).map_err(|v| v.permitted),
            Err(Permissions::empty()),
            "past the range"
        );
        assert!(
            !tables.set_leaf(&mut memory, gpa(64 * MIB), leaf(0x7000_0000, Permissions::all())),
            "no tables there"
        );
    }

    /// A mapping that runs out of table frames changes no entry and gives back the tables it
    /// made; destroying the tables gives back every frame.
    #[test]
    fn a_mapping_without_table_frames_changes_nothing_and_destroy_frees_every_frame() {
        let (mut frames, mut memory) = (SimFrames::new(64), SimMemory::default());
        let mut tables = NestedTables::<SimFormat>::new(&mut frames, &mut memory).unwrap();
        let used = frames.inner.counts().used();
        frames.fail_after = Some(2);
        let result = tables.map_range(
            &mut frames,
            &mut memory,
            gpa(0),
            1,
            |at| leaf(0x4000_0000 + at.as_u64(), Permissions::all()),
            |_| None,
        );
        assert_eq!(
            result,
            Err(NoMemory::OutOfFrames),
            "a 4-level walk needs 3 tables below the root"
        );
        assert_eq!(
            frames.inner.counts().used(),
            used,
            "the tables made were given back"
        );
        assert_eq!(tables.table_frames(), 1);
        assert!(translate::<SimFormat>(&memory, tables.root(), gpa(0), Access::Read).is_err());
        frames.fail_after = None;
        tables
            .map_range(
                &mut frames,
                &mut memory,
                gpa(0),
                1,
                |at| leaf(0x4000_0000 + at.as_u64(), Permissions::all()),
                |_| None,
            )
            .unwrap();
        assert_eq!(tables.table_frames(), 4);
        tables.destroy(&mut frames, &memory);
        assert_eq!(frames.inner.counts().used(), 0, "every table frame went back");
    }
}
