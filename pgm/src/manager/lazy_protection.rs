//! Write monitoring's protection, armed for every page in O(1) and pushed down lazily.
//!
//! The CPU grants a guest access only what every entry on the EPT walk grants (SDM 29.3.3.2),
//! so taking the write permission from the root table's entries write-protects the whole guest
//! at once: one to a few entries, however large the guest. Starting monitoring and re-arming it
//! at a harvest do just that, and a harvest only hands over the list of written pages: no
//! descriptor and no leaf is touched. A page under an entry that withholds writes is
//! *pending*: its descriptor is read through [`monitored_view`] (ALLOCATED means
//! WRITE_MONITORED, the written-to flag is left from a harvested round), so the state machine
//! and the counts see it protected from the moment of arming.
//!
//! Whatever is about to change or act on a pending page first *settles* it: the protection is
//! pushed down the walk to its address. At each entry that withholds writes, every entry of the
//! table below loses its write permission first and the entry gets its own back; at the
//! page-directory entry, the pages of its 2 MiB block get the descriptors `monitored_view`
//! gives them (and read-only leaves where they became WRITE_MONITORED), then the entry gets its
//! write permission back (a 2 MiB leaf is rewritten as its pages call for, or split). Which
//! pages a block settle looks at is kept per range (`RamRange::take_unsettled`): all of them
//! at the first settle since monitoring started, afterwards only the pages listed written (or
//! kept writable by a write lock) since the block's last settle, as every other page is as
//! that settle left it. A guest write fault settles its page before it is resolved, so the
//! first write under an entry costs at most 512 entries per level and the pages its block's
//! earlier rounds wrote; later ones in the block are ordinary (and lock-free) write-monitor
//! faults.
//!
//! Invariant (checked by the auditor): while monitoring is on, every page the view calls
//! WRITE_MONITORED is write-protected on its walk, by its leaf or by an entry above it; an
//! entry above the leaves withholds writes only while monitoring is on; and a page whose walk
//! grants writes down to its leaf has the descriptor the view gives (it is settled).
//!
//! Locking: everything here runs under `&mut self` but one case, [`Pgm::settle_block_shared`],
//! which the lock-free fault path takes through `&self` so that vCPUs settle their blocks in
//! parallel: a page-directory entry alone withholding writes above a page table, its block in
//! one range, settled in full once since monitoring started, every page listed since plain
//! RAM the lock-free path may handle. The settler claims the block first (a bit per block in
//! its range), so no two settle it at once; no other change to the block's descriptors runs
//! meanwhile (the lock-free path resolves no write under an entry that withholds writes,
//! `NestedTables::leaf_entry_addr` declines it, and its read remaps change no descriptor and
//! never replace a leaf that grants reads). The entry gets its write permission back only after
//! every descriptor and leaf is settled, by a compare-exchange whose release the lock-free
//! path's walk acquires. Everything else is the locked path's. No push-down gives a
//! translation a permission another CPU may not already use, so none needs a TLB flush; arming
//! does.

use alloc::vec::Vec;

use super::lock_free::takes_lock_free_faults;
use super::mapping::{block_of, leaf_for};
use super::Pgm;
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frames::{HostFrameAllocator, HostMemory, FRAMES_PER_LARGE_PAGE};
use crate::page::{monitored_view, PageDescriptor, PageState};
use crate::paging::EntryFormat;
use crate::paging::{encode, Invalidation, Leaf};
use crate::ram::{PageLocation, RamRange};
use crate::sync::Ordering;

const BLOCK_SIZE: u64 = FRAMES_PER_LARGE_PAGE * PAGE_SIZE;
const BLOCK_PAGES: usize = FRAMES_PER_LARGE_PAGE as usize;

/// # Write monitoring's bookkeeping (settle and recount, for statistics and the auditor)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// True when write monitoring's protection armed above the leaf of `gpa` has not come down
    /// to it yet. Three table reads while monitoring is on, none otherwise.
    #[inline]
    pub(super) fn is_pending(&self, gpa: GuestPhysAddr) -> bool {
        self.protects_lazily() && self.tables.withheld_writes_at(&self.memory, gpa).is_some()
    }

    /// True while entries above the leaves may withhold writes: monitoring is on in
    /// write-protect mode (PML mode and monitoring off arm nothing, and stopping gives every
    /// entry its permission back). Outside it, no walk is needed to know a page is settled.
    #[inline]
    fn protects_lazily(&self) -> bool {
        self.monitoring && self.dirty_log_mode == super::DirtyLogMode::WriteProtect
    }

    /// The descriptor at `location` as the state machine sees it ([`monitored_view`]).
    #[inline]
    pub(super) fn logical_page(&self, location: PageLocation) -> PageDescriptor {
        let page = self.ranges.page(location);
        monitored_view(page, self.is_pending(self.ranges.gpa_of(location)))
    }

    /// Write-protects every page at once at the top of the EPT. Returns the invalidation that
    /// needs (single-context: every cached translation may allow writes).
    pub(super) fn arm_write_protection(&mut self) -> Invalidation {
        if self.tables.withhold_writes_from_root(&mut self.memory) {
            Invalidation::SingleContext
        } else {
            Invalidation::None
        }
    }

    /// Settles the page at `location` before something changes or acts on it: see the module
    /// docs. Nothing to do (one walk) for a settled page.
    #[inline]
    pub(super) fn settle(&mut self, location: PageLocation) {
        self.open_write_path(self.ranges.gpa_of(location));
    }

    /// Pushes every protection withheld above the leaf of `gpa` down to the leaves, so the
    /// pages of its 2 MiB block have the descriptors [`monitored_view`] gives them and the walk
    /// grants what the leaf grants. A guest write fault at `gpa` (the address the CPU walked)
    /// does this first. A walk that withholds nothing costs three table reads, and none is
    /// made unless monitoring protects lazily.
    pub(crate) fn open_write_path(&mut self, gpa: GuestPhysAddr) {
        if !self.protects_lazily() {
            return;
        }
        while let Some(level) = self.tables.withheld_writes_at(&self.memory, gpa) {
            let pushed = if level >= 2 {
                self.tables
                    .push_write_protection_down(&mut self.memory, gpa, level)
            } else {
                self.protect_block(gpa);
                // A 2 MiB leaf is rewritten as its pages now call for (or split, the page
                // table inheriting the withheld permission); a page-directory entry pointing
                // at a page table, or marking a block that awaits tables, gets its permission
                // back.
                self.refresh_large_leaf(block_of(gpa))
                    || self.tables.grant_writes_at(&mut self.memory, gpa, 1)
            };
            if !pushed {
                // Unreachable: the walk just found that entry. Never loop on it.
                debug_assert!(false, "no entry at level {level} above {gpa}");
                return;
            }
        }
    }

    /// Settles the 2 MiB block of `gpa` through `&self`, when the case is the one the read side
    /// may take (see the module docs): the pages listed written since the block's last settle
    /// get the descriptors [`monitored_view`] gives them and read-only leaves where they became
    /// WRITE_MONITORED, then the page-directory entry gets its write permission back, as
    /// [`open_write_path`](Self::open_write_path) would leave them. Returns false, having
    /// changed nothing, for every other case (the caller takes the lock) and when another vCPU
    /// is settling the block.
    ///
    /// Locking: shared (the read side of the VM's lock), with lock-free faults running.
    pub(super) fn settle_block_shared(&self, gpa: GuestPhysAddr) -> bool {
        if !self.protects_lazily() || !self.a20_enabled {
            return false;
        }
        let Some((slot, page_table)) = self.tables.withheld_directory_entry(&self.memory, gpa) else {
            return false;
        };
        let block = GuestPhysAddr::new_truncate(gpa.as_u64() & !(BLOCK_SIZE - 1));
        let Some(location) = self.ranges.find(block) else {
            return false;
        };
        let Some(range) = self.ranges.get(location.range) else {
            return false;
        };
        if range.end() < block.as_u64() + BLOCK_SIZE || !range.claim_block(location.page) {
            return false;
        }
        let settled = self.protect_claimed_block(range, location.page, page_table);
        if settled {
            range.clear_listed(location.page, BLOCK_PAGES);
            self.tables.grant_withheld_writes(&self.memory, slot);
            self.shared_settles.fetch_add(1, Ordering::Relaxed);
        }
        range.release_block(location.page);
        settled
    }

    /// How many 2 MiB blocks lock-free faults settled through `&self` so far (the rest took
    /// the lock).
    pub fn shared_settles(&self) -> u64 {
        self.shared_settles.load(Ordering::Relaxed)
    }

    /// The descriptors and leaves of [`settle_block_shared`](Self::settle_block_shared), for
    /// the block from page `first` of `range` that the caller claimed, whose page table is at
    /// `page_table`. False, changing nothing, when a page listed is one the read side may not
    /// change.
    fn protect_claimed_block(&self, range: &RamRange, first: usize, page_table: HostPhysAddr) -> bool {
        let descriptor = |page: usize| {
            range
                .descriptor_word(page)
                .map(|word| (word, PageDescriptor::from_raw(word.load(Ordering::Acquire))))
        };
        let all_plain = range.each_listed(first, BLOCK_PAGES, |page| {
            descriptor(page).is_some_and(|(_, current)| takes_lock_free_faults(current))
        });
        if !all_plain {
            return false;
        }
        range.each_listed(first, BLOCK_PAGES, |page| {
            let Some((word, current)) = descriptor(page) else {
                return true;
            };
            let settled = monitored_view(current, true);
            if settled != current {
                // The block is claimed and its entry withholds writes: no other thread
                // changes this descriptor now (see the module docs).
                word.store(settled.raw(), Ordering::Release);
            }
            if settled.state() != current.state() {
                let entry = HostPhysAddr::new_truncate(page_table.as_u64() + (page - first) as u64 * 8);
                self.replace_leaf(entry, leaf_for(settled, self.zero_frame));
            }
            true
        });
        true
    }

    /// Makes the leaf at `entry` exactly `leaf`, through `&self`: a compare-exchange, retried
    /// while the leaf changes (a read remap, the CPU's accessed flag).
    fn replace_leaf(&self, entry: HostPhysAddr, leaf: Option<Leaf>) {
        let wanted = encode::<F>(leaf);
        let mut raw = self.memory.read_u64(entry);
        while raw != wanted {
            match self.memory.compare_exchange_u64(entry, raw, wanted) {
                Ok(()) => return,
                Err(now) => raw = now,
            }
        }
    }

    /// Gives every page of the 2 MiB block around `gpa` (whose walk withholds writes) the
    /// descriptor [`monitored_view`] gives it, and a read-only leaf where it became
    /// WRITE_MONITORED: descriptors first, since a 2 MiB leaf split by the first leaf write
    /// takes all 512 leaves from them. The counts already see the view.
    fn protect_block(&mut self, gpa: GuestPhysAddr) {
        let block = GuestPhysAddr::new_truncate(gpa.as_u64() & !(BLOCK_SIZE - 1));
        let mut protected = Vec::new();
        for location in self.unsettled_pages(block) {
            let page = self.ranges.page(location);
            let settled = monitored_view(page, true);
            if settled != page {
                self.ranges.set_page(location, settled);
                if settled.state() != page.state() {
                    protected.push(location);
                }
            }
            if settled.state() == PageState::Allocated && settled.write_locks() > 0 {
                // Kept writable by its lock only: a later settle must look at it again.
                if let Some(range) = self.ranges.get_mut(location.range) {
                    range.note_listed(location.page);
                }
            }
        }
        self.sync_block(block, &protected);
    }

    /// If `block` is mapped by one 2 MiB leaf: rewrites it as its 512 pages now call for, when
    /// one leaf can show them all (all write-monitored, say), else splits the block. Returns
    /// whether the block is still mapped by one leaf.
    fn refresh_large_leaf(&mut self, block: GuestPhysAddr) -> bool {
        if self.tables.large_leaf(&self.memory, block).is_none() {
            return false;
        }
        let source = self.leaf_source();
        let first = source.expected(block);
        let uniform = first.is_some_and(|large| {
            (0..FRAMES_PER_LARGE_PAGE).all(|page| {
                let at = GuestPhysAddr::new_truncate(block.as_u64() + page * PAGE_SIZE);
                source.large_leaf_shows(large, at, source.expected(at))
            })
        });
        match first {
            Some(large) if uniform => {
                let _ = self.tables.make_large(&mut self.memory, block, large);
                true
            }
            _ => {
                self.map_block_small(block);
                false
            }
        }
    }

    /// The pages of the 2 MiB block at `block` a settle must look at: every page the first
    /// time since monitoring started, afterwards only those listed written since the last
    /// settle (every other page of the block is as the last settle left it). So a settle
    /// costs O(pages written), not O(512).
    fn unsettled_pages(&mut self, block: GuestPhysAddr) -> Vec<PageLocation> {
        let mut pages = Vec::new();
        for (range, first, count) in self.ranges.parts(block, block.as_u64() + BLOCK_SIZE) {
            if let Some(part) = self.ranges.get_mut(range) {
                pages.extend(
                    part.take_unsettled(first, count)
                        .into_iter()
                        .map(|page| PageLocation { range, page }),
                );
            }
        }
        pages
    }

    /// Lists the page at `location` written (monitoring on): the harvest reports it, and the
    /// next settle of its block looks at it.
    pub(super) fn list_written(&mut self, location: PageLocation) {
        self.written.push(self.ranges.gpa_of(location));
        if let Some(range) = self.ranges.get_mut(location.range) {
            range.note_listed(location.page);
        }
    }

    /// Before monitoring ends: settles every page (one walk per 2 MiB block and a pass over
    /// the pending blocks' descriptors), then every entry above the leaves grants writes again.
    pub(super) fn settle_every_page(&mut self) {
        for range in 0..self.ranges.len() {
            let Some((base, end)) = self.ranges.get(range).map(|r| (r.base().as_u64(), r.end())) else {
                continue;
            };
            let mut block = base & !(BLOCK_SIZE - 1);
            while block < end {
                self.open_write_path(GuestPhysAddr::new_truncate(block.max(base)));
                block += BLOCK_SIZE;
            }
        }
        self.tables.grant_writes_everywhere(&mut self.memory);
    }

    /// The pages under the state machine (RAM and ROM shadows) per state as the state machine
    /// sees them (zero, allocated, write-monitored, shared, ballooned), counted one by one: the
    /// oracle of the kept counts. O(pages).
    #[cfg(any(test, feature = "sim"))]
    pub fn recount_states(&self) -> [u64; 5] {
        let mut counts = [0; 5];
        for (index, range) in self.ranges.iter().enumerate() {
            for page in 0..range.page_count() {
                let page = self.logical_page(PageLocation { range: index, page });
                if matches!(
                    page.page_type(),
                    crate::page::PageType::Ram | crate::page::PageType::RomShadow
                ) {
                    counts[page.state() as usize] += 1;
                }
            }
        }
        counts
    }

    /// Moves one settled page's count from the state it had to the state it has. MMIO2 pages
    /// are not counted (their region's frames are).
    pub(super) fn recount(&mut self, before: PageDescriptor, after: PageDescriptor) {
        if before.page_type() == crate::page::PageType::Mmio2 || before.state() == after.state() {
            return;
        }
        *self.counts.of(before.state()) -= 1;
        *self.counts.of(after.state()) += 1;
    }

    /// At a harvest or a start, when every page becomes pending: every counted ALLOCATED page
    /// that is not write-locked becomes WRITE_MONITORED in the view. `locked_allocated`: the
    /// counted ALLOCATED pages holding write locks.
    pub(super) fn count_rearmed(&mut self, locked_allocated: u64) {
        let protected = self.counts.allocated - locked_allocated;
        self.counts.allocated -= protected;
        self.counts.write_monitored += protected;
    }
}

/// True for a page that counts in the state counts as ALLOCATED and holds a write lock.
pub(super) fn counted_locked_allocated(page: PageDescriptor) -> bool {
    page.state() == PageState::Allocated
        && page.write_locks() > 0
        && page.page_type() != crate::page::PageType::Mmio2
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
mod tests {
    use std::vec::Vec;

    use super::*;
    use crate::manager::{FaultOutcome, Problem, Resolution};
    use crate::page::PageState;
    use crate::paging::{Access, Entry, Permissions};
    use crate::test_support::*;

    /// 64 MiB of RAM at 0 with one page written in each of the first `blocks` 2 MiB blocks
    /// (page 3 of each) before monitoring starts.
    fn written_vm(blocks: u64) -> SimPgm {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), 64 * MIB, "ram").unwrap();
        for block in 0..blocks {
            guest_write(&mut pgm, page_in(block, 3), &[1]);
        }
        pgm
    }

    fn page_in(block: u64, page: u64) -> GuestPhysAddr {
        gpa(block * BLOCK_SIZE + page * PAGE_SIZE)
    }

    fn harvest(pgm: &mut SimPgm) -> Vec<GuestPhysAddr> {
        let mut out = Vec::new();
        let _ = pgm.harvest_written(&mut out);
        out
    }

    fn leaf_permissions(pgm: &SimPgm, at: GuestPhysAddr) -> Permissions {
        match pgm.nested_entry(at) {
            Entry::Leaf(leaf) => leaf.permissions,
            other => panic!("{at} has no leaf: {other:?}"),
        }
    }

    fn problems(pgm: &SimPgm) -> Vec<Problem> {
        pgm.audit_simulated().findings.iter().map(|f| f.problem).collect()
    }

    /// RAM of two 2 MiB blocks at 2 MiB, every page written, under monitoring settled in full
    /// once (a write in each block), then pages `again` of each block written and harvested:
    /// the root withholds writes again, and each block's next settle looks at those pages.
    fn rearmed_vm(again: &[u64]) -> SimPgm {
        let mut pgm = pgm_with_frames(2048);
        pgm.register_ram(gpa(BLOCK_SIZE), 2 * BLOCK_SIZE, "ram").unwrap();
        pgm.set_large_pages(false);
        for page in 0..2 * BLOCK_PAGES as u64 {
            guest_write(&mut pgm, page_in(1, page), &[1]);
        }
        let _ = pgm.start_write_monitoring();
        pgm.set_lock_free_vcpus(2);
        for block in 1..3 {
            guest_write(&mut pgm, page_in(block, 0), &[2]);
            for &page in again {
                guest_write(&mut pgm, page_in(block, page), &[3]);
            }
        }
        harvest(&mut pgm);
        pgm
    }

    /// What a block shows: each page's descriptor and EPT entry, and whether it is pending.
    fn block_state(pgm: &SimPgm, block: u64) -> Vec<(Option<PageDescriptor>, Entry, bool)> {
        (0..BLOCK_PAGES as u64)
            .map(|page| page_in(block, page))
            .map(|at| (pgm.page(at), pgm.nested_entry(at), pgm.is_pending(at)))
            .collect()
    }

    /// The lock-free fault path settles a block on the read side, and leaves it exactly as
    /// the locked settle does: the same descriptors, leaves and pending state for all 512
    /// pages, the same harvest after, the auditor and the counts content.
    #[test]
    fn a_settle_on_the_read_side_leaves_what_the_locked_settle_leaves() {
        let again = [0, 5, 63, 64, 200, 511];
        let (mut shared, mut locked) = (rearmed_vm(&again), rearmed_vm(&again));
        // The round's first write takes the lock in both: it pushes the protection down from
        // the root, and settles its own block.
        for pgm in [&mut shared, &mut locked] {
            guest_write(pgm, page_in(1, 9), &[4]);
        }
        let at = page_in(2, 7);
        assert!(shared.is_pending(at), "the second block is still pending");
        let outcome = shared.resolve_fault_lock_free(0, at, Access::Write);
        assert!(
            matches!(
                outcome,
                Some(FaultOutcome::Resolved {
                    resolution: Resolution::WriteMonitor,
                    ..
                })
            ),
            "{outcome:?}"
        );
        assert_eq!(shared.shared_settles(), 1);
        let _ = locked.resolve_fault(at, Access::Write);
        assert_eq!(locked.shared_settles(), 0);
        assert!(
            block_state(&shared, 2) == block_state(&locked, 2),
            "the block differs"
        );
        for &page in &again {
            let at = page_in(2, page);
            assert_eq!(
                leaf_permissions(&shared, at),
                Permissions::READ | Permissions::EXECUTE
            );
        }
        assert!(problems(&shared).is_empty(), "{:?}", problems(&shared));
        let (mut from_shared, mut from_locked) = (harvest(&mut shared), harvest(&mut locked));
        from_shared.sort();
        from_locked.sort();
        assert_eq!(from_shared, from_locked);
        assert_eq!(from_shared, [page_in(1, 9), at]);
        assert_eq!(shared.stats().state_counts(), shared.recount_states());
    }

    /// A block the read side may not settle (a page listed is write-locked: the last settle
    /// kept it writable and listed) is left as it was for the locked path, which then settles
    /// it.
    #[test]
    fn a_settle_the_read_side_may_not_take_changes_nothing() {
        let mut pgm = rearmed_vm(&[]);
        guest_write(&mut pgm, page_in(1, 9), &[4]);
        guest_write(&mut pgm, page_in(2, 0), &[4]);
        let lock = pgm.lock_page_for_write(page_in(2, 5)).unwrap().lock;
        harvest(&mut pgm);
        guest_write(&mut pgm, page_in(1, 9), &[4]);
        let before = block_state(&pgm, 2);
        assert!(pgm.is_pending(page_in(2, 7)));
        assert_eq!(pgm.resolve_fault_lock_free(0, page_in(2, 7), Access::Write), None);
        assert!(block_state(&pgm, 2) == before, "the block changed");
        assert_eq!(pgm.shared_settles(), 0);
        assert!(matches!(
            guest_write(&mut pgm, page_in(2, 7), &[5]),
            GuestAccess::Done { .. }
        ));
        assert!(!pgm.is_pending(page_in(2, 7)));
        assert!(problems(&pgm).is_empty(), "{:?}", problems(&pgm));
        pgm.release_page_lock(lock);
    }

    /// With the A20 gate closed, a block on the zero chunk stays one read-only 2 MiB leaf
    /// after the host writes pages with bit 20 set (the guest sees the zeros 1 MiB below
    /// there). Monitoring's protection pushed down onto that read-only leaf must still mark it,
    /// or its written pages stop being pending without being settled, and the per-state
    /// counts (taken on the pending view) drift from the descriptors.
    #[test]
    fn a_read_only_large_leaf_keeps_its_pages_pending_when_protection_comes_down() {
        let mut pgm = pgm_with_defaults(3072);
        pgm.register_ram(gpa(0), 64 * PAGE_SIZE, "low").unwrap();
        pgm.register_ram(gpa(0x60_0000), 2 * MIB, "block").unwrap();
        let _ = pgm.set_a20(false);
        let _ = pgm.write_phys(gpa(0x70_0BD8), &[0x77; 3142]).unwrap();
        assert!(pgm.is_mapped_large(gpa(0x60_0000)), "zeros seen through the gate");
        let _ = pgm.start_write_monitoring();
        let counts = pgm.stats().state_counts();
        assert_eq!(counts[PageState::WriteMonitored as usize], 2);
        // A fault in low RAM pushes the protection down through the page directory that holds
        // the block's leaf.
        guest_write(&mut pgm, gpa(0x1000), &[1]);
        assert!(
            pgm.is_pending(gpa(0x70_0000)),
            "the block's pages are still pending"
        );
        assert_eq!(pgm.stats().state_counts(), pgm.recount_states());
        assert!(problems(&pgm).is_empty(), "{:?}", problems(&pgm));
        let _ = pgm.stop_write_monitoring();
        assert_sound_after_flush(&mut pgm, "after monitoring stopped");
    }

    /// A written page replaced by MMIO stays listed; an MMIO2 alias made and undone on it,
    /// then RAM restored, must keep its written-to flag throughout, or a write lock taken on
    /// it lists it a second time and the next harvest counts it twice (the per-state counts
    /// then wrapped below zero).
    #[test]
    fn a_page_aliased_and_restored_while_monitoring_is_listed_once() {
        let mut pgm = pgm_with_defaults(1024);
        pgm.register_ram(gpa(0), 64 * PAGE_SIZE, "low").unwrap();
        guest_write(&mut pgm, gpa(0x1000), &[1]);
        let region = pgm.create_mmio2(mmio2_spec(3 * PAGE_SIZE, 0)).unwrap();
        let _ = pgm.start_write_monitoring();
        let (mmio, _) = pgm.register_mmio(gpa(0x1000), PAGE_SIZE).unwrap();
        let _ = pgm
            .alias_mmio_to_mmio2(mmio, gpa(0x1000), region, 2 * PAGE_SIZE)
            .unwrap();
        let _ = pgm.deregister_mmio(mmio).unwrap();
        let lock = pgm.lock_page_for_write(gpa(0x1000)).unwrap().lock;
        assert_eq!(
            pgm.written.iter().filter(|&&at| at == gpa(0x1000)).count(),
            1,
            "listed once"
        );
        assert_eq!(harvest(&mut pgm), [gpa(0x1000)]);
        assert_eq!(pgm.stats().state_counts(), pgm.recount_states());
        pgm.release_page_lock(lock);
        let _ = pgm.stop_write_monitoring();
        assert_sound_after_flush(&mut pgm, "after monitoring stopped");
    }

    #[test]
    fn starting_monitoring_protects_every_page_without_touching_a_leaf() {
        let mut pgm = written_vm(8);
        let tables = pgm.stats().table_frames;
        assert_eq!(pgm.start_write_monitoring(), Invalidation::SingleContext);
        for block in 0..8 {
            let at = page_in(block, 3);
            assert!(pgm.translate(at, Access::Write).is_err(), "{at} is protected");
            assert_eq!(
                leaf_permissions(&pgm, at),
                Permissions::all(),
                "its leaf is untouched"
            );
            assert_eq!(pgm.page(at).unwrap().state(), PageState::WriteMonitored);
        }
        let stats = pgm.stats();
        assert_eq!((stats.write_monitored_pages, stats.allocated_pages), (8, 0));
        assert_eq!(stats.table_frames, tables);
        assert_isolated(&pgm, "after arming");
        assert_accounting(&pgm);
    }

    #[test]
    fn the_first_write_brings_the_protection_down_to_its_own_block_only() {
        let mut pgm = written_vm(8);
        let _ = pgm.start_write_monitoring();
        assert_eq!(
            pgm.resolve_fault(page_in(2, 3), Access::Write),
            FaultOutcome::Resolved {
                invalidation: Invalidation::None,
                resolution: Resolution::WriteMonitor,
            }
        );
        assert_eq!(leaf_permissions(&pgm, page_in(2, 3)), Permissions::all());
        for block in [0, 1, 3, 7] {
            let at = page_in(block, 3);
            assert_eq!(
                leaf_permissions(&pgm, at),
                Permissions::all(),
                "block {block} waits"
            );
            assert!(pgm.translate(at, Access::Write).is_err());
        }
        assert_isolated(&pgm, "after the push-down");
        assert_accounting(&pgm);
        assert_eq!(harvest(&mut pgm), [page_in(2, 3)]);
    }

    #[test]
    fn lazily_protected_pages_are_reported_exactly_once_per_round() {
        let mut pgm = written_vm(16);
        let _ = pgm.start_write_monitoring();
        let touched: Vec<GuestPhysAddr> = [(1, 3), (1, 4), (9, 3), (15, 3), (9, 200)]
            .iter()
            .map(|&(block, page)| page_in(block, page))
            .collect();
        for round in 0..4u8 {
            for &at in touched.iter().chain(&touched) {
                guest_write(&mut pgm, at, &[round]);
            }
            // The host writes a page still awaiting protection: seen once too.
            pgm.write_phys(page_in(4, 3), &[round]).unwrap();
            guest_write(&mut pgm, page_in(4, 3), &[round]);
            let mut expected = touched.clone();
            expected.push(page_in(4, 3));
            assert_eq!(harvest(&mut pgm), expected, "round {round}");
            assert_isolated(&pgm, "after a harvest");
            assert_accounting(&pgm);
            for &at in &expected {
                assert!(
                    pgm.translate(at, Access::Write).is_err(),
                    "{at} is protected again"
                );
            }
        }
        assert_eq!(harvest(&mut pgm), []);
        let _ = pgm.stop_write_monitoring();
        assert!(pgm.translate(page_in(9, 3), Access::Write).is_ok());
        let stats = pgm.stats();
        assert_eq!((stats.write_monitored_pages, stats.allocated_pages), (0, 18));
        assert_isolated(&pgm, "after stopping");
    }

    #[test]
    fn a_page_unlocked_after_its_block_settled_is_protected_at_the_next_settle() {
        let mut pgm = written_vm(2);
        let lock = pgm.lock_page_for_write(page_in(1, 3)).unwrap().lock;
        let _ = pgm.start_write_monitoring();
        // A settle of block 1 while the lock keeps page 3 writable.
        guest_write(&mut pgm, page_in(1, 9), &[1]);
        pgm.release_page_lock(lock);
        assert_eq!(harvest(&mut pgm), [page_in(1, 3), page_in(1, 9)]);
        // The next settle of block 1 must protect page 3 as well.
        guest_write(&mut pgm, page_in(1, 10), &[1]);
        assert!(
            pgm.translate(page_in(1, 3), Access::Write).is_err(),
            "unlocked and unwritten: protected"
        );
        assert_eq!(
            pgm.page(page_in(1, 3)).unwrap().state(),
            PageState::WriteMonitored
        );
        assert_isolated(&pgm, "after the second settle");
        assert_accounting(&pgm);
        assert_eq!(harvest(&mut pgm), [page_in(1, 10)]);
    }

    #[test]
    fn a_settle_looks_only_at_the_pages_written_since_the_last_one() {
        let mut pgm = written_vm(1);
        for page in 0..512 {
            guest_write(&mut pgm, page_in(0, page), &[1]);
        }
        let _ = pgm.start_write_monitoring();
        guest_write(&mut pgm, page_in(0, 5), &[2]);
        let _ = harvest(&mut pgm);
        // Unsettled pages left behind only where the harvest listed them: the settle of the
        // next write finds just page 5 to re-protect.
        let location = pgm.ranges.find(page_in(0, 0)).unwrap();
        let range = pgm.ranges.get_mut(location.range).unwrap();
        assert_eq!(range.take_unsettled(0, 512), [5]);
        range.note_listed(5);
        guest_write(&mut pgm, page_in(0, 7), &[2]);
        assert!(pgm.translate(page_in(0, 5), Access::Write).is_err());
        assert_isolated(&pgm, "after the settle");
        assert_accounting(&pgm);
    }

    #[test]
    fn ram_given_back_by_mmio_after_a_harvest_reports_its_next_write() {
        let mut pgm = written_vm(1);
        let _ = pgm.start_write_monitoring();
        guest_write(&mut pgm, page_in(0, 3), &[2]);
        // MMIO replaces the written page; the harvest reports it and re-arms.
        let (id, _) = pgm.register_mmio(page_in(0, 3), PAGE_SIZE).unwrap();
        assert_eq!(harvest(&mut pgm), [page_in(0, 3)]);
        // A write beside it settles the block while the page is MMIO.
        guest_write(&mut pgm, page_in(0, 4), &[2]);
        // RAM comes back (ZERO) and the guest writes it: a new write, reported once.
        let _ = pgm.deregister_mmio(id).unwrap();
        guest_write(&mut pgm, page_in(0, 3), &[3]);
        assert_eq!(harvest(&mut pgm), [page_in(0, 4), page_in(0, 3)]);
        assert_isolated(&pgm, "after the second harvest");
        assert_accounting(&pgm);
        assert_eq!(pgm.stats().state_counts(), pgm.recount_states());
    }

    #[test]
    fn a_page_of_a_range_registered_again_is_listed_once() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), 4 * MIB, "ram").unwrap();
        let _ = pgm.start_write_monitoring();
        guest_write(&mut pgm, page_in(1, 0), &[1]);
        pgm.unregister_ram(gpa(0), 4 * MIB).unwrap();
        pgm.register_ram(gpa(0), 4 * MIB, "ram").unwrap();
        guest_write(&mut pgm, page_in(1, 0), &[2]);
        assert_eq!(harvest(&mut pgm), [page_in(1, 0)]);
        assert_accounting(&pgm);
    }

    #[test]
    fn the_auditor_finds_a_monitored_page_left_writable_and_a_stray_protection() {
        let mut pgm = written_vm(2);
        let _ = pgm.start_write_monitoring();
        assert!(problems(&pgm).is_empty());
        pgm.tables.grant_writes_everywhere(&mut pgm.memory);
        assert_eq!(problems(&pgm), [Problem::MonitoredPageWritable; 2]);
        let _ = pgm.stop_write_monitoring();
        assert!(problems(&pgm).is_empty());
        pgm.tables.withhold_writes_from_root(&mut pgm.memory);
        let found = problems(&pgm);
        assert!(!found.is_empty());
        assert!(
            found.iter().all(|&p| p == Problem::TableEntryRestricts),
            "{found:?}"
        );
    }

    #[test]
    fn a_large_block_split_under_withheld_protection_stays_protected() {
        let mut pgm = pgm_with_frames(4096);
        pgm.register_ram(gpa(0), 8 * MIB, "ram").unwrap();
        pgm.set_large_pages(true);
        guest_write(&mut pgm, page_in(2, 0), &[1]);
        guest_write(&mut pgm, page_in(0, 1), &[1]);
        assert!(pgm.is_mapped_large(page_in(2, 0)));
        let _ = pgm.start_write_monitoring();
        // A write in block 0 pushes the protection down to every page-directory entry,
        // the 2 MiB leaf of block 2 among them.
        guest_write(&mut pgm, page_in(0, 1), &[2]);
        assert!(pgm.is_mapped_large(page_in(2, 0)));
        // Ballooning one of its pages splits block 2 without a fault.
        pgm.balloon_inflate(&[page_in(2, 9)]).unwrap();
        assert!(!pgm.is_mapped_large(page_in(2, 0)));
        assert!(pgm.translate(page_in(2, 10), Access::Write).is_err());
        assert_isolated(&pgm, "after the split");
        assert_eq!(harvest(&mut pgm), [page_in(0, 1), page_in(2, 9)]);
    }
}
