//! The one owner of what the EPT maps. Every leaf is computed here from the page descriptors
//! (`LeafSource::expected`, the counterpart of KVM's single `make_spte`), every leaf is written
//! here (`write_leaf` and the range and block writers beside it), and here is recorded where the
//! frames that can be mapped at more than one guest address are mapped: the reverse map.
//!
//! A frame that one page owns alone (a private RAM or shadow frame, a ROM's image frame) is
//! mapped at that page's own address or nowhere, so its one mapping needs no record. Every other
//! mapping of a frame other than the zero frame is recorded: frames of MMIO2 regions (at their
//! own addresses and through MMIO2 aliases), shared frames, special-alias frames, and every A20
//! alias (an address with bit 20 set showing the page 1 MiB below). The zero frame is never
//! freed while the VM lives, so its countless mappings are not recorded.
//!
//! The payoff: a frame about to be freed or re-purposed has its mappings in the record, so
//! `Pgm::unmap_frame` takes every one of them away without walking the tables, and asserts
//! (in debug and test builds) that nothing maps the frame any more — O(log n) instead of the
//! table walk it replaces. The auditor checks the record against the tables leaf by leaf, so a
//! mapping written past the record is found by every test that audits.
//!
//! Cost: about 70 bytes per recorded mapping (two B-tree entries), none for plain RAM.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use super::rom::{self, RomRange, RomTarget};
use super::{Pgm, A20_BIT};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::NoMemory;
use crate::frames::{HostFrameAllocator, HostMemory, FRAMES_PER_LARGE_PAGE};
use crate::page::{HandlerState, LargePageState, PageDescriptor, PageState, PageType};
use crate::paging::EntryFormat;
use crate::paging::{Access, Invalidation, LargeMapping, Leaf, MemoryType, Permissions};
use crate::ram::{PageLocation, RamRange, RamRanges};

/// Where the frames that are not owned by one page alone are mapped, indexed both ways.
#[derive(Default)]
pub(super) struct ReverseMap {
    by_gpa: BTreeMap<GuestPhysAddr, HostPhysAddr>,
    by_frame: BTreeSet<(HostPhysAddr, GuestPhysAddr)>,
    /// Every recorded address lies in `[first, last]` (not shrunk on removal). Lets the fault
    /// path skip the search where nothing can be recorded — a RAM page below a mapped
    /// framebuffer, say.
    span: Option<(GuestPhysAddr, GuestPhysAddr)>,
}

impl ReverseMap {
    /// Records that `gpa` maps `frame` (`None`: that nothing recorded is mapped there),
    /// replacing what was recorded for `gpa`.
    #[inline]
    fn set(&mut self, gpa: GuestPhysAddr, frame: Option<HostPhysAddr>) {
        let outside = self.span.is_none_or(|(first, last)| gpa < first || gpa > last);
        if frame.is_some() || !outside {
            self.replace(gpa, frame);
        }
        // Else the common case on the fault path: nothing recorded anywhere near.
    }

    /// [`set`](Self::set) where the indexes must be searched.
    fn replace(&mut self, gpa: GuestPhysAddr, frame: Option<HostPhysAddr>) {
        let old = match frame {
            Some(frame) => {
                let (first, last) = self.span.unwrap_or((gpa, gpa));
                self.span = Some((first.min(gpa), last.max(gpa)));
                self.by_gpa.insert(gpa, frame)
            }
            None => self.by_gpa.remove(&gpa),
        };
        if self.by_gpa.is_empty() {
            self.span = None;
        }
        if let Some(old) = old {
            self.by_frame.remove(&(old, gpa));
        }
        if let Some(frame) = frame {
            self.by_frame.insert((frame, gpa));
        }
    }

    /// Forgets every record of `[base, base + pages * 4 KiB)` (its leaves were rewritten in
    /// bulk).
    fn forget_range(&mut self, base: GuestPhysAddr, pages: u64) {
        let end = GuestPhysAddr::new_truncate(base.as_u64() + pages * PAGE_SIZE);
        let gone: Vec<GuestPhysAddr> = self.by_gpa.range(base..end).map(|(&gpa, _)| gpa).collect();
        for gpa in gone {
            self.set(gpa, None);
        }
    }

    /// The guest addresses recorded as mapping `frame`, in address order.
    pub(super) fn mappings_of(&self, frame: HostPhysAddr) -> impl Iterator<Item = GuestPhysAddr> + '_ {
        let first = (frame, GuestPhysAddr::default());
        self.by_frame
            .range(first..)
            .take_while(move |(recorded, _)| *recorded == frame)
            .map(|&(_, gpa)| gpa)
    }

    /// The frame recorded as mapped at `gpa`.
    pub(super) fn frame_at(&self, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        self.by_gpa.get(&gpa).copied()
    }

    /// Every record, by guest address.
    pub(super) fn iter(&self) -> impl Iterator<Item = (GuestPhysAddr, HostPhysAddr)> + '_ {
        self.by_gpa.iter().map(|(&gpa, &frame)| (gpa, frame))
    }

    /// True when both indexes hold the same records.
    pub(super) fn is_consistent(&self) -> bool {
        self.by_gpa.len() == self.by_frame.len()
            && self
                .by_frame
                .iter()
                .all(|&(frame, gpa)| self.by_gpa.get(&gpa) == Some(&frame))
    }

    /// Records held.
    pub(super) fn len(&self) -> usize {
        self.by_gpa.len()
    }
}

/// A [`LeafSource`] over `$pgm`'s fields, borrowing them apart from its tables (a macro, so
/// the borrow checker sees the fields).
macro_rules! leaf_source {
    ($pgm:ident) => {
        LeafSource {
            ranges: &$pgm.ranges,
            roms: &$pgm.roms,
            zero_frame: $pgm.zero_frame,
            zero_chunk: $pgm.zero_chunk,
            a20_enabled: $pgm.a20_enabled,
        }
    };
}

/// What leaves are computed from: the descriptors, the ROMs, the zero frame and the A20 gate.
/// Borrowed apart from the tables, so leaves can be computed while tables are written.
pub(super) struct LeafSource<'a> {
    ranges: &'a RamRanges,
    roms: &'a [RomRange],
    zero_frame: HostPhysAddr,
    zero_chunk: Option<HostPhysAddr>,
    a20_enabled: bool,
}

impl LeafSource<'_> {
    /// True for the zero frame and the frames of the zero chunk: zeros, never written, never
    /// freed while the VM lives, so their mappings are not recorded.
    #[inline]
    pub(super) fn reads_zeros(&self, frame: HostPhysAddr) -> bool {
        frame == self.zero_frame || self.zero_chunk.is_some_and(|chunk| chunk_holds(chunk, frame))
    }

    /// True when `actual`, the 4 KiB view of the leaf mapping `gpa`, shows what `expected`
    /// calls for: the same mapping, or zeros from the zero chunk where the zero frame is
    /// called for (a 2 MiB block of ZERO pages mapped on the zero chunk).
    pub(super) fn shows_as_called_for(
        &self,
        gpa: GuestPhysAddr,
        actual: Leaf,
        expected: Option<Leaf>,
    ) -> bool {
        let Some(expected) = expected else {
            return false;
        };
        let frame_in_block = HostPhysAddr::new_truncate(
            actual
                .frame
                .as_u64()
                .wrapping_sub(gpa.as_u64() & (LARGE_BLOCK - 1) & !0xFFF),
        );
        actual == expected
            || (expected.frame == self.zero_frame
                && self.zero_chunk == Some(frame_in_block)
                && actual.permissions == expected.permissions
                && actual.memory_type == expected.memory_type)
    }

    /// True when the 2 MiB leaf `large` shows at `gpa` what `expected` (the 4 KiB mapping the
    /// page there calls for) does: the same frame at `gpa`'s offset in the block, or zeros from
    /// the zero chunk where the zero frame is called for.
    pub(super) fn large_leaf_shows(&self, large: Leaf, gpa: GuestPhysAddr, expected: Option<Leaf>) -> bool {
        let offset = gpa.as_u64() & (LARGE_BLOCK - 1) & !0xFFF;
        let view = Leaf {
            frame: HostPhysAddr::new_truncate(large.frame.as_u64() + offset),
            ..large
        };
        self.shows_as_called_for(gpa, view, expected)
    }

    /// The page a guest access to `gpa` reaches: through the A20 gate, so with the gate closed
    /// an address with bit 20 set reaches the page 1 MiB below.
    #[inline]
    fn shown(&self, gpa: GuestPhysAddr) -> Option<PageLocation> {
        self.ranges.find(a20_mask(gpa, self.a20_enabled))
    }

    /// The mapping the EPT must hold at `gpa` (when it holds one): what the page the guest
    /// reaches there calls for. `None`: nothing may be mapped.
    #[inline]
    pub(super) fn expected(&self, gpa: GuestPhysAddr) -> Option<Leaf> {
        self.own(self.shown(gpa)?)
    }

    /// [`expected`](Self::expected), noting in `records` the mapping if the reverse map
    /// records it (for bulk writers, which record after the tables are written).
    fn expected_noting(
        &self,
        gpa: GuestPhysAddr,
        records: &mut Vec<(GuestPhysAddr, HostPhysAddr)>,
    ) -> Option<Leaf> {
        let leaf = self.expected(gpa);
        if let Some(frame) = self.recorded_frame(gpa, leaf) {
            records.push((gpa, frame));
        }
        leaf
    }

    /// The mapping the page at `location` calls for by its own descriptor.
    #[inline]
    pub(super) fn own(&self, location: PageLocation) -> Option<Leaf> {
        let page = self.ranges.page(location);
        match page.page_type() {
            PageType::Rom | PageType::RomShadow => self.rom(self.ranges.gpa_of(location), page),
            PageType::Ram
            | PageType::Mmio
            | PageType::Mmio2
            | PageType::Mmio2AliasMmio
            | PageType::SpecialAliasMmio => leaf_for(page, self.zero_frame),
        }
    }

    /// The mapping of the ROM page `page` at `gpa`, as its protection routes reads and writes
    /// ([`RomProtection::target`]): the image frame read/execute while reads go to the ROM; the
    /// shadow mapped like RAM while reads go to it, without write permission unless writes are
    /// mapped to it too.
    fn rom(&self, gpa: GuestPhysAddr, page: PageDescriptor) -> Option<Leaf> {
        let rom = rom::covering(self.roms, gpa)?;
        let protection = rom.protection_at(gpa);
        let read_execute = Permissions::READ | Permissions::EXECUTE;
        if protection.target(Access::Read) == RomTarget::Image {
            return Some(Leaf {
                frame: rom.virgin_frame(gpa)?,
                permissions: read_execute,
                memory_type: MemoryType::WriteBack,
            });
        }
        let as_ram = leaf_for(page.with_type(PageType::Ram), self.zero_frame)?;
        Some(if protection.maps_writes() {
            as_ram
        } else {
            Leaf {
                permissions: read_execute,
                ..as_ram
            }
        })
    }

    /// The frame the reverse map records for `leaf` at `gpa`, if it records one: every mapping
    /// of a frame no single page owns (MMIO2, shared, alias frames) and every A20 alias, never
    /// the zero frame.
    #[inline]
    pub(super) fn recorded_frame(&self, gpa: GuestPhysAddr, leaf: Option<Leaf>) -> Option<HostPhysAddr> {
        let leaf = leaf?;
        if self.reads_zeros(leaf.frame) {
            return None;
        }
        let Some(location) = self.shown(gpa) else {
            // Mapped where no page is: never right, but recorded so it can be taken away.
            return Some(leaf.frame);
        };
        let a20_alias = self.ranges.gpa_of(location) != gpa;
        (a20_alias || borrows_frame(self.ranges.page(location))).then_some(leaf.frame)
    }
}

/// # Where frames are mapped (the reverse map)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    pub(super) fn leaf_source(&self) -> LeafSource<'_> {
        leaf_source!(self)
    }

    /// The mapping the EPT must hold at `gpa` (see [`LeafSource::expected`]).
    pub(super) fn expected_leaf(&self, gpa: GuestPhysAddr) -> Option<Leaf> {
        self.leaf_source().expected(gpa)
    }

    /// The guest addresses at which the EPT maps `frame` besides a page that owns it alone:
    /// its MMIO2 region's address and MMIO2 aliases, the pages sharing it, A20 aliases.
    /// Empty for a frame that is mapped only by its own page, or not at all.
    pub fn recorded_mappings(&self, frame: HostPhysAddr) -> Vec<GuestPhysAddr> {
        self.reverse.mappings_of(frame).collect()
    }

    /// Writes the 4 KiB leaf of `gpa` and keeps the reverse map in step. With the own-page write
    /// of [`sync_leaf`](Self::sync_leaf), which applies the same rule without a lookup, the way
    /// a single leaf changes. Returns `false`, changing nothing, where no tables reach `gpa`.
    pub(super) fn write_leaf(&mut self, gpa: GuestPhysAddr, leaf: Option<Leaf>) -> bool {
        let recorded = self.leaf_source().recorded_frame(gpa, leaf);
        if !self.tables.set_leaf(&mut self.memory, gpa, leaf) {
            return false;
        }
        self.reverse.set(gpa, recorded);
        true
    }

    /// [`sync_leaf`](Self::sync_leaf) for `pages`, all in the 2 MiB block at `block`: plain RAM
    /// pages (the A20 gate open, the block mapped with 4 KiB leaves) have their leaves written
    /// straight into the block's page table, found once; nothing records them in the reverse
    /// map (their frames are their own). Every other page goes through `sync_leaf`.
    pub(super) fn sync_block(&mut self, block: GuestPhysAddr, pages: &[PageLocation]) {
        let table = self
            .tables
            .leaf_entry_addr(&self.memory, block, Access::Read)
            .filter(|_| self.a20_enabled);
        for &location in pages {
            let page = self.ranges.page(location);
            let plain = page.page_type() == PageType::Ram && page.large_page() != LargePageState::Large;
            match table {
                Some(first) if plain && !borrows_frame(page) => {
                    let gpa = self.ranges.gpa_of(location);
                    let index = (gpa.as_u64() - block.as_u64()) / PAGE_SIZE;
                    let entry = HostPhysAddr::new_truncate(first.as_u64() + index * 8);
                    let leaf = leaf_for(page, self.zero_frame);
                    self.memory.write_u64(entry, crate::paging::encode::<F>(leaf));
                }
                _ => self.sync_leaf(location),
            }
        }
    }

    /// Rewrites the EPT entry of the page at `location` from its descriptor. With the A20 gate
    /// closed, a page with bit 20 set shows its alias 1 MiB below, and the alias of this page
    /// (bit 20 set) shows this page, wherever that alias is mapped. A page under a 2 MiB leaf
    /// that no longer shows it as it should has its block split first (or left unmapped when
    /// no page table can be had: see `large`).
    pub(super) fn sync_leaf(&mut self, location: PageLocation) {
        let gpa = self.ranges.gpa_of(location);
        if let Some(large) = self.tables.large_leaf(&self.memory, gpa) {
            if self.large_leaf_still_shows(large, gpa) {
                return;
            }
            // One page of a 2 MiB mapping changes: map the block with 4 KiB entries first.
            if !self.split_large_block(location) {
                return;
            }
        }
        if !self.a20_enabled && gpa.as_u64() & A20_BIT != 0 {
            let shown = self.expected_leaf(gpa);
            self.write_leaf(gpa, shown);
            return;
        }
        let leaf = self.leaf_source().own(location);
        // At the page's own address the rule needs no lookup: the fault path's write.
        let page = self.ranges.page(location);
        let recorded = leaf
            .filter(|leaf| leaf.frame != self.zero_frame && borrows_frame(page))
            .map(|leaf| leaf.frame);
        // A page table exists for every page mapped at 4 KiB, except in a block left awaiting
        // tables (mapped from the descriptors at its next access); MMIO in unassigned space
        // has none and needs none.
        let present = self.tables.set_leaf(&mut self.memory, gpa, leaf);
        debug_assert!(
            present || leaf.is_none() || self.tables.awaits_tables(&self.memory, gpa),
            "page {gpa} has no page table"
        );
        if present {
            self.reverse.set(gpa, recorded);
        }
        if !self.a20_enabled {
            let alias = GuestPhysAddr::new_truncate(gpa.as_u64() | A20_BIT);
            if self.ranges.find(alias).is_some() || self.a20_aliases.contains(&alias) {
                self.write_leaf(alias, leaf);
            }
        }
    }

    /// True when the 2 MiB leaf `large` over `gpa` still shows the page there, and, with the
    /// A20 gate closed, its alias in the same block, as they call for.
    fn large_leaf_still_shows(&self, large: Leaf, gpa: GuestPhysAddr) -> bool {
        let source = self.leaf_source();
        let shows = |at: GuestPhysAddr| source.large_leaf_shows(large, at, source.expected(at));
        shows(gpa) && (self.a20_enabled || shows(GuestPhysAddr::new_truncate(gpa.as_u64() ^ A20_BIT)))
    }

    /// Inserts `ranges` (contiguous, in address order, in space that
    /// [`RamRanges::check_free`] accepted) and maps each page as its descriptor calls for,
    /// creating the tables needed; with the A20 gate closed, aliases already mapped 1 MiB above
    /// the new pages show them. `zero_ram`: the ranges are fresh ZERO RAM, so with large pages
    /// on every 2 MiB block wholly inside them is mapped by one read-only leaf on the zero
    /// chunk, without a page table. All or nothing: when table frames run out the ranges are
    /// taken out again and [`NoMemory::OutOfFrames`] is returned.
    pub(super) fn insert_mapped(&mut self, ranges: Vec<RamRange>, zero_ram: bool) -> Result<(), NoMemory> {
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
            return Ok(());
        };
        let base = first.base();
        let pages = (last.end() - base.as_u64()) / PAGE_SIZE;
        let bases: Vec<GuestPhysAddr> = ranges.iter().map(RamRange::base).collect();
        self.ranges.insert_all(ranges);
        let source = leaf_source!(self);
        let zero_block = self
            .zero_chunk
            .filter(|_| zero_ram && self.large_pages && self.a20_enabled)
            .map(|chunk| Leaf {
                frame: chunk,
                permissions: Permissions::READ | Permissions::EXECUTE,
                memory_type: MemoryType::WriteBack,
            });
        let mut records = Vec::new();
        let revived = self.tables.map_range(
            &mut self.frames,
            &mut self.memory,
            base,
            pages,
            |gpa| source.expected_noting(gpa, &mut records),
            |_| zero_block,
        );
        let revived = match revived {
            Ok(revived) => revived,
            Err(error) => {
                for base in bases {
                    if let Some(location) = self.ranges.find(base) {
                        self.ranges.remove(location.range);
                    }
                }
                return Err(error);
            }
        };
        // Whatever was recorded there (A20 aliases outside every range) was overwritten.
        self.reverse.forget_range(base, pages);
        self.forget_a20_aliases(base, pages);
        for (gpa, frame) in records {
            self.reverse.set(gpa, Some(frame));
        }
        self.map_revived_blocks(&revived);
        self.apply_a20_to_new_pages(base, pages);
        Ok(())
    }

    /// With the A20 gate closed, re-syncs every page of a new range, so aliases already mapped
    /// 1 MiB above its pages show them (see [`sync_leaf`](Self::sync_leaf)).
    pub(super) fn apply_a20_to_new_pages(&mut self, base: GuestPhysAddr, pages: u64) {
        if self.a20_enabled {
            return;
        }
        for page in 0..pages {
            let gpa = GuestPhysAddr::new_truncate(base.as_u64() + page * PAGE_SIZE);
            if let Some(location) = self.ranges.find(gpa) {
                self.sync_leaf(location);
            }
        }
    }

    /// Removes the range at index `range` from the address space: the guest reaches none of its
    /// pages any more, neither at their own addresses nor, with the A20 gate closed, through
    /// their aliases 1 MiB up. The one way every range leaves (RAM unregistered, MMIO2 unmapped,
    /// MMIO in unassigned space deregistered); its frames are the caller's to free afterwards.
    pub(super) fn remove_range(&mut self, range: usize) {
        let removed = self.ranges.remove(range);
        // 2 MiB leaves over it go first: split (its pages now call for nothing), or unmapped.
        let mut block = block_of(removed.base()).as_u64();
        while block < removed.end() {
            let at = GuestPhysAddr::new_truncate(block);
            if self.tables.large_leaf(&self.memory, at).is_some() {
                self.map_block_small(at);
            }
            block += LARGE_BLOCK;
        }
        // Its written pages have nothing left to report, and must not be listed twice when
        // a new range takes their addresses.
        self.fold_lock_free_writes();
        let (base, end) = (removed.base(), removed.end());
        self.written.retain(|&gpa| gpa < base || gpa.as_u64() >= end);
        for page in 0..removed.page_count() as u64 {
            let gpa = GuestPhysAddr::new_truncate(removed.base().as_u64() + page * PAGE_SIZE);
            self.write_leaf(gpa, None);
            let alias = GuestPhysAddr::new_truncate(gpa.as_u64() | A20_BIT);
            if !self.a20_enabled && alias != gpa {
                // The alias showed this page; now it shows what the descriptors say (nothing,
                // unless a range of its own covers it). Tables exist wherever it was mapped.
                let shown = self.expected_leaf(alias);
                self.write_leaf(alias, shown);
            }
        }
    }

    /// Maps the alias page `alias` (bit 20 set, gate closed) to what the page at `location` maps,
    /// creating tables where no range had any.
    pub(super) fn map_a20_alias(
        &mut self,
        alias: GuestPhysAddr,
        location: PageLocation,
    ) -> Result<(), NoMemory> {
        if self.ranges.find(alias).is_none() && !self.a20_aliases.contains(&alias) {
            self.ensure_tables(alias, 1)?;
            self.a20_aliases.push(alias);
        }
        let leaf = self.leaf_source().own(location);
        self.write_leaf(alias, leaf);
        Ok(())
    }

    /// Takes `[base, base + pages * 4 KiB)`, which a range now covers, off the list of A20
    /// aliases outside every range. Their leaves need no record: opening the gate re-syncs
    /// every page of every range with bit 20 set, as its descriptor calls for.
    pub(super) fn forget_a20_aliases(&mut self, base: GuestPhysAddr, pages: u64) {
        let end = base.as_u64() + pages * PAGE_SIZE;
        self.a20_aliases
            .retain(|alias| alias.as_u64() < base.as_u64() || alias.as_u64() >= end);
    }

    /// Creates the tables `[base, base + pages * 4 KiB)` needs, leaving its leaves as they are,
    /// except in blocks that awaited tables: those are mapped from their descriptors.
    pub(super) fn ensure_tables(&mut self, base: GuestPhysAddr, pages: u64) -> Result<(), NoMemory> {
        let revived = self
            .tables
            .ensure_tables(&mut self.frames, &mut self.memory, base, pages)?;
        self.map_revived_blocks(&revived);
        Ok(())
    }

    /// Maps every page of `blocks` from its descriptor: blocks that awaited tables and have
    /// just been given an empty page table. Every path that gives such a block its table ends
    /// here, so none is left half mapped.
    fn map_revived_blocks(&mut self, blocks: &[GuestPhysAddr]) {
        for &block in blocks {
            for location in self.located(block, FRAMES_PER_LARGE_PAGE) {
                self.sync_leaf(location);
            }
        }
    }

    /// Maps the 2 MiB block at `block` with one leaf to the contiguous chunk at `chunk` (the
    /// pages' own private frames, so nothing in it is recorded). `false` when the block has no
    /// tables.
    pub(super) fn map_block_large(&mut self, block: GuestPhysAddr, chunk: HostPhysAddr) -> bool {
        let leaf = Leaf {
            frame: chunk,
            permissions: Permissions::all(),
            memory_type: MemoryType::WriteBack,
        };
        match self.tables.make_large(&mut self.memory, block, leaf) {
            LargeMapping::Unreachable => false,
            LargeMapping::Mapped { detached } => {
                self.reverse.forget_range(block, FRAMES_PER_LARGE_PAGE);
                if let Some(page_table) = detached {
                    // CPUs may still walk it until the flush the caller carries out.
                    self.pool.discard(page_table);
                }
                true
            }
        }
    }

    /// Maps the large block at `block` with 4 KiB leaves again, each as its page calls for, in
    /// a page table from the handy pool. With none to be had the block is left awaiting tables
    /// ([`NestedTables::unmap_large`](crate::paging::NestedTables::unmap_large)) until its next
    /// access maps it again ([`remap_unmapped_block`](Self::remap_unmapped_block)). Returns
    /// whether the block is now mapped with 4 KiB leaves.
    pub(super) fn map_block_small(&mut self, block: GuestPhysAddr) -> bool {
        let Ok(page_table) = self.pool.take_table(&mut self.frames) else {
            if self.tables.unmap_large(&mut self.memory, block) {
                self.reverse.forget_range(block, FRAMES_PER_LARGE_PAGE);
            }
            return false;
        };
        let source = leaf_source!(self);
        let mut records = Vec::new();
        let split = self
            .tables
            .split_large(&mut self.memory, block, page_table, |gpa| {
                source.expected_noting(gpa, &mut records)
            });
        if split {
            for (gpa, frame) in records {
                self.reverse.set(gpa, Some(frame));
            }
        } else {
            self.pool.return_table(page_table);
        }
        split
    }

    /// Maps the block around `gpa` again if it awaits tables (left unmapped for want of a page
    /// table): tables from the host, every page's leaf from its descriptor. For other blocks,
    /// nothing to do but the three table reads that tell.
    pub(super) fn remap_unmapped_block(&mut self, gpa: GuestPhysAddr) -> Result<(), NoMemory> {
        if !self.tables.awaits_tables(&self.memory, gpa) {
            return Ok(());
        }
        self.ensure_tables(block_of(gpa), FRAMES_PER_LARGE_PAGE)
    }

    /// Takes away every mapping of `frame` before it is freed or given another use: each
    /// recorded place is rewritten as its page now calls for. The caller has already changed
    /// every descriptor that named the frame (the page's own transition, or the MMIO2 aliases
    /// undone); `own` is the page that held it alone, if one did. Asserts, in debug and test
    /// builds, that nothing maps the frame any more. Returns the invalidation the unmapping
    /// needs.
    pub(super) fn unmap_frame(&mut self, frame: HostPhysAddr, own: Option<GuestPhysAddr>) -> Invalidation {
        let places = self.recorded_mappings(frame);
        for &gpa in &places {
            let leaf = self.expected_leaf(gpa);
            self.write_leaf(gpa, leaf);
        }
        self.debug_assert_unmapped(frame, own);
        if places.is_empty() {
            Invalidation::None
        } else {
            Invalidation::SingleContext
        }
    }

    /// Asserts, in debug and test builds, that no leaf maps `frame`: none is recorded, and the
    /// page `own` that held it alone (if any) maps something else. Enough because a frame one
    /// page owns is mapped only at that page or in the record; the auditor checks the record
    /// against every leaf.
    fn debug_assert_unmapped(&self, frame: HostPhysAddr, own: Option<GuestPhysAddr>) {
        if !cfg!(debug_assertions) {
            return;
        }
        if let Some(gpa) = self.reverse.mappings_of(frame).next() {
            panic!("frame {frame} is given up while {gpa} still maps it");
        }
        if let Some(gpa) = own {
            let reached = self.translate(gpa, Access::Read).map(HostPhysAddr::page_base);
            assert!(
                reached != Ok(frame),
                "frame {frame} is given up while {gpa} still maps it"
            );
        }
    }
}

/// The size of a 2 MiB block.
const LARGE_BLOCK: u64 = FRAMES_PER_LARGE_PAGE * PAGE_SIZE;

/// The first address of the 2 MiB block holding `gpa`.
#[inline]
pub(super) fn block_of(gpa: GuestPhysAddr) -> GuestPhysAddr {
    GuestPhysAddr::new_truncate(gpa.as_u64() & !(LARGE_BLOCK - 1))
}

/// True when `frame` lies in the 2 MiB chunk at `chunk`.
#[inline]
fn chunk_holds(chunk: HostPhysAddr, frame: HostPhysAddr) -> bool {
    (chunk.as_u64()..chunk.as_u64() + LARGE_BLOCK).contains(&frame.as_u64())
}

/// True when the frame `page` maps is not its own alone: an MMIO2 frame, an alias's, a shared
/// one.
#[inline]
fn borrows_frame(page: PageDescriptor) -> bool {
    matches!(
        page.page_type(),
        PageType::Mmio2 | PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio
    ) || page.state() == PageState::Shared
}

/// `gpa` as the A20 gate lets it through.
#[inline]
pub(super) fn a20_mask(gpa: GuestPhysAddr, a20_enabled: bool) -> GuestPhysAddr {
    if a20_enabled {
        gpa
    } else {
        GuestPhysAddr::new_truncate(gpa.as_u64() & !A20_BIT)
    }
}

/// The EPT mapping a page's descriptor calls for. By state: ZERO maps the shared zero frame
/// read/execute (the first write faults); ALLOCATED maps its frame read/write/execute; an MMIO
/// alias maps its frame read/write/execute; WRITE_MONITORED and SHARED map it read/execute;
/// BALLOONED and MMIO pages are not mapped. An active handler then takes away what it
/// intercepts: writes (write handler) or everything (all). RAM (and MMIO2) is write-back; a
/// special alias (a device page) is uncacheable.
#[inline]
pub(super) fn leaf_for(page: PageDescriptor, zero_frame: HostPhysAddr) -> Option<Leaf> {
    let read_execute = Permissions::READ | Permissions::EXECUTE;
    // MMIO2 maps like RAM; its pages are never ZERO or BALLOONED.
    let page = if page.page_type() == PageType::Mmio2 {
        page.with_type(PageType::Ram)
    } else {
        page
    };
    let (frame, mut permissions) = match (page.page_type(), page.state()) {
        // ROM pages are mapped by `LeafSource::rom`, which calls back here for a shadow mapped
        // as RAM.
        (PageType::Mmio | PageType::Mmio2 | PageType::Rom | PageType::RomShadow, _)
        | (PageType::Ram, PageState::Ballooned) => {
            return None;
        }
        // An alias maps its frame straight through.
        (PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio, _) => (page.frame()?, Permissions::all()),
        (PageType::Ram, PageState::Zero) => (zero_frame, read_execute),
        (PageType::Ram, PageState::Allocated) => (page.frame()?, Permissions::all()),
        (PageType::Ram, PageState::WriteMonitored | PageState::Shared) => (page.frame()?, read_execute),
    };
    match page.handler() {
        HandlerState::None | HandlerState::Disabled => {}
        HandlerState::Write => permissions.remove(Permissions::WRITE),
        HandlerState::All => return None,
    }
    // A special alias maps a device page (e.g. the APIC-access page): uncacheable, as MMIO is.
    let memory_type = match page.page_type() {
        PageType::SpecialAliasMmio => MemoryType::Uncacheable,
        _ => MemoryType::WriteBack,
    };
    Some(Leaf {
        frame,
        permissions,
        memory_type,
    })
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
mod tests {
    use super::*;
    use crate::manager::Problem;
    use crate::test_support::*;

    /// RAM at [0, 1 MiB) and a one-page MMIO2 region mapped at 2 MiB; returns its frame.
    fn vm_with_mmio2() -> (SimPgm, HostPhysAddr) {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "ram").unwrap();
        let region = pgm.create_mmio2(mmio2_spec(PAGE_SIZE, 0)).unwrap();
        pgm.map_mmio2(region, gpa(0x20_0000)).unwrap();
        let frame = pgm.translate(gpa(0x20_0000), Access::Read).unwrap();
        (pgm, frame)
    }

    fn problems(pgm: &SimPgm) -> Vec<Problem> {
        pgm.audit_simulated().findings.iter().map(|f| f.problem).collect()
    }

    fn only_reverse_map_findings(pgm: &SimPgm) {
        let found = problems(pgm);
        assert!(!found.is_empty(), "the broken reverse map went unnoticed");
        assert!(found.iter().all(|&p| p == Problem::ReverseMapWrong), "{found:?}");
    }

    #[test]
    fn the_auditor_finds_a_leaf_written_past_the_reverse_map() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), 2 * MIB, "ram").unwrap();
        guest_write(&mut pgm, gpa(0x1000), &[1]);
        pgm.set_a20(false);
        assert!(problems(&pgm).is_empty());
        // The alias leaf the gate calls for, written straight into the tables.
        let leaf = pgm.expected_leaf(gpa(0x10_2000));
        pgm.tables.set_leaf(&mut pgm.memory, gpa(0x10_2000), leaf);
        assert!(problems(&pgm).is_empty(), "a zero-frame alias needs no record");
        pgm.write_leaf(gpa(0x10_1000), None);
        let leaf = pgm.expected_leaf(gpa(0x10_1000));
        pgm.tables.set_leaf(&mut pgm.memory, gpa(0x10_1000), leaf);
        only_reverse_map_findings(&pgm);
    }

    #[test]
    fn the_auditor_finds_a_lost_record() {
        let (mut pgm, _) = vm_with_mmio2();
        assert!(problems(&pgm).is_empty());
        pgm.reverse.set(gpa(0x20_0000), None);
        only_reverse_map_findings(&pgm);
    }

    #[test]
    fn the_auditor_finds_a_record_without_its_leaf_and_split_indexes() {
        let (mut pgm, frame) = vm_with_mmio2();
        pgm.reverse.set(gpa(0x2000), Some(frame));
        only_reverse_map_findings(&pgm);
        pgm.reverse.set(gpa(0x2000), None);
        assert!(problems(&pgm).is_empty());
        pgm.reverse.by_frame.insert((frame, gpa(0x3000)));
        only_reverse_map_findings(&pgm);
    }

    #[test]
    #[should_panic(expected = "still maps it")]
    fn giving_up_a_frame_that_is_still_recorded_panics_in_test_builds() {
        let (pgm, frame) = vm_with_mmio2();
        pgm.debug_assert_unmapped(frame, None);
    }

    #[test]
    #[should_panic(expected = "still maps it")]
    fn giving_up_a_frame_its_own_page_still_maps_panics_in_test_builds() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "ram").unwrap();
        guest_write(&mut pgm, gpa(0x5000), &[1]);
        let frame = pgm.translate(gpa(0x5000), Access::Read).unwrap();
        pgm.debug_assert_unmapped(frame, Some(gpa(0x5000)));
    }
}
