//! 2 MiB large pages, on by default. RAM registered meanwhile maps every 2 MiB block wholly
//! inside it with one read-only leaf on the VM's zero chunk (2 MiB of zeros, taken once): no
//! page table, so registering 64 GiB writes 32,768 directory entries and a guest pays tables
//! only for the blocks it needs at 4 KiB. A write fault in an untouched, unhandled block fills
//! the whole block from one contiguous host chunk and maps it with a single EPT entry.
//! Whatever later needs 4 KiB granularity inside a block (a handler, write monitoring, a reset
//! or balloon of one page, the A20 gate closing, a fill that found no chunk) splits it, in a
//! page table from the handy pool, which faults leave topped up; when none can be had the
//! block is unmapped instead and mapped again, tables from the host, at its first access (a
//! fault then reports `OutOfMemory` if even that fails: the VM pauses, the host never panics).
//! When the need is gone and the frames are still the contiguous chunk, the block is merged
//! again and its page table retired.

use alloc::vec::Vec;

use super::mapping::block_of;
use super::Pgm;
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frames::{HostFrameAllocator, HostMemory, FRAMES_PER_LARGE_PAGE};
use crate::page::{HandlerState, LargePageState, PageDescriptor, PageState, PageType};
use crate::paging::EntryFormat;
use crate::paging::Invalidation;
use crate::ram::PageLocation;

const LARGE_PAGE_SIZE: u64 = FRAMES_PER_LARGE_PAGE * PAGE_SIZE;

/// # Large pages (2 MiB mappings of RAM blocks)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Lets write faults fill whole 2 MiB blocks from contiguous host memory, and RAM
    /// registered from now on map its untouched blocks on the zero chunk (on by default; off,
    /// every page is mapped with 4 KiB leaves and a block costs one frame at its first write).
    pub fn set_large_pages(&mut self, enabled: bool) {
        self.large_pages = enabled;
    }

    /// Takes the zero chunk (2 MiB of zeros) when large pages are on and it is not held yet.
    /// Without a contiguous chunk from the host, RAM is mapped with 4 KiB leaves.
    pub(super) fn take_zero_chunk(&mut self) {
        if !self.large_pages || self.zero_chunk.is_some() {
            return;
        }
        if let Some(chunk) = self.frames.allocate_large() {
            for page in 0..FRAMES_PER_LARGE_PAGE {
                self.memory
                    .zero_frame(HostPhysAddr::new_truncate(chunk.as_u64() + page * PAGE_SIZE));
            }
            self.zero_chunk = Some(chunk);
        }
    }

    /// Gives the zero chunk back (VM termination).
    pub(super) fn release_zero_chunk(&mut self) {
        if let Some(chunk) = self.zero_chunk.take() {
            for page in 0..FRAMES_PER_LARGE_PAGE {
                self.frames
                    .free_frame(HostPhysAddr::new_truncate(chunk.as_u64() + page * PAGE_SIZE));
            }
        }
    }

    /// Frames the zero chunk holds (0 or 512).
    pub(super) fn zero_chunk_frames(&self) -> u64 {
        if self.zero_chunk.is_some() {
            FRAMES_PER_LARGE_PAGE
        } else {
            0
        }
    }

    /// True when `gpa` is mapped by a 2 MiB EPT entry.
    pub fn is_mapped_large(&self, gpa: GuestPhysAddr) -> bool {
        self.tables.is_large(&self.memory, gpa)
    }

    /// Fills the 2 MiB block around the ZERO page at `location` with one contiguous chunk and
    /// maps it large, when large pages are on and the whole block is untouched, unhandled,
    /// unlocked RAM of one range. `None` when the block does not qualify or no chunk could be had; the caller
    /// then falls back to a 4 KiB page. The other 511 pages lose cached zero-frame translations,
    /// so the fill needs a single-context INVEPT.
    pub(super) fn try_large_fill(&mut self, location: PageLocation) -> Option<Invalidation> {
        if !self.large_pages || self.monitoring || !self.a20_enabled {
            return None;
        }
        let pages = self.block_pages(location)?;
        // A locked page keeps its descriptor (its lock counts) through a 4 KiB fill; the
        // block's fill writes 512 descriptors anew.
        let untouched = pages.iter().all(|&at| {
            let page = self.ranges.page(at);
            page.page_type() == PageType::Ram
                && page.state() == PageState::Zero
                && page.handler() == HandlerState::None
                && !page.is_locked()
        });
        if !untouched {
            return None;
        }
        let chunk = self.pool.take_large(&mut self.frames).ok()?;
        for (i, &at) in pages.iter().enumerate() {
            let frame = HostPhysAddr::new_truncate(chunk.as_u64() + i as u64 * PAGE_SIZE);
            self.memory.zero_frame(frame);
            let page = PageDescriptor::allocated(PageType::Ram, frame).with_large_page(LargePageState::Large);
            self.ranges.set_page(at, page);
        }
        self.counts.zero -= FRAMES_PER_LARGE_PAGE;
        self.counts.allocated += FRAMES_PER_LARGE_PAGE;
        let block = self.ranges.gpa_of(pages[0]);
        self.map_block_large(block, chunk);
        Some(Invalidation::SingleContext)
    }

    /// Maps the large block holding `location` with 4 KiB entries again; its pages remember
    /// that they were large, so [`merge_large_blocks`](Self::merge_large_blocks) can try later.
    /// Returns whether the block is now mapped with 4 KiB leaves (`false`: no page table could
    /// be had and the block was left unmapped).
    pub(super) fn split_large_block(&mut self, location: PageLocation) -> bool {
        let block = block_of(self.ranges.gpa_of(location));
        for at in self.located(block, FRAMES_PER_LARGE_PAGE) {
            let page = self.ranges.page(at);
            if page.large_page() == LargePageState::Large {
                self.ranges
                    .set_page(at, page.with_large_page(LargePageState::Disabled));
            }
        }
        self.map_block_small(block)
    }

    /// Maps every split block large again whose pages are all plain, writable RAM still backed
    /// by their original contiguous chunk. Returns the invalidation the remapping needs.
    pub(super) fn merge_large_blocks(&mut self) -> Invalidation {
        if self.monitoring || !self.a20_enabled {
            return Invalidation::None;
        }
        let mut invalidation = Invalidation::None;
        for range in 0..self.ranges.len() {
            let Some(pages) = self.ranges.get(range).map(|r| r.page_count()) else {
                continue;
            };
            let mut page = 0;
            while page < pages {
                let location = PageLocation { range, page };
                if self.ranges.page(location).large_page() == LargePageState::Disabled {
                    if let Some(block) = self.block_pages(location) {
                        if self.merge(&block) {
                            invalidation = Invalidation::SingleContext;
                        }
                        page = block[block.len() - 1].page + 1;
                        continue;
                    }
                }
                page += 1;
            }
        }
        invalidation
    }

    fn merge(&mut self, block: &[PageLocation]) -> bool {
        let Some(chunk) = self.ranges.page(block[0]).frame() else {
            return false;
        };
        let eligible = chunk.as_u64() % LARGE_PAGE_SIZE == 0
            && block.iter().enumerate().all(|(i, &at)| {
                let page = self.ranges.page(at);
                page.page_type() == PageType::Ram
                    && page.state() == PageState::Allocated
                    && page.handler() == HandlerState::None
                    && page.frame() == Some(HostPhysAddr::new_truncate(chunk.as_u64() + i as u64 * PAGE_SIZE))
            });
        if !eligible {
            return false;
        }
        for &at in block {
            let page = self.ranges.page(at);
            self.ranges
                .set_page(at, page.with_large_page(LargePageState::Large));
        }
        let gpa = self.ranges.gpa_of(block[0]);
        self.map_block_large(gpa, chunk)
    }

    /// The 512 locations of the 2 MiB block holding `location`, when the block lies wholly in
    /// that page's range.
    pub(super) fn block_pages(&self, location: PageLocation) -> Option<Vec<PageLocation>> {
        let gpa = self.ranges.gpa_of(location).as_u64();
        let block = gpa & !(LARGE_PAGE_SIZE - 1);
        let range = self.ranges.get(location.range)?;
        if block < range.base().as_u64() || block + LARGE_PAGE_SIZE > range.end() {
            return None;
        }
        let first = location.page - ((gpa - block) / PAGE_SIZE) as usize;
        Some(
            (first..first + FRAMES_PER_LARGE_PAGE as usize)
                .map(|page| PageLocation {
                    range: location.range,
                    page,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
mod tests {
    use super::*;
    use crate::handlers::HandlerKind;
    use crate::manager::FaultOutcome;
    use crate::paging::Access;
    use crate::test_support::*;

    const GIB: u64 = 1 << 30;
    const BLOCK: u64 = 2 * MIB;

    #[test]
    fn registered_ram_maps_its_blocks_on_the_zero_chunk_without_page_tables() {
        let mut pgm = pgm_with_defaults(1024);
        let tables = pgm.stats().table_frames;
        pgm.register_ram(gpa(0), GIB, "ram").unwrap();
        let stats = pgm.stats();
        assert_eq!(
            stats.table_frames - tables,
            2,
            "a PDPT and a page directory, no page table"
        );
        assert_eq!(stats.zero_chunk_frames, 512);
        assert!(pgm.is_mapped_large(gpa(0x1234_5000)));
        assert!(
            pgm.translate(gpa(0x1234_5678), Access::Write).is_err(),
            "zeros are read-only"
        );
        let zeros = pgm.translate(gpa(0x1234_5678), Access::Read).unwrap();
        let mut byte = [1u8];
        pgm.memory().read(zeros, &mut byte);
        assert_eq!(byte, [0]);
        assert_isolated(&pgm, "after registering");
        assert_accounting(&pgm);
    }

    #[test]
    fn a_guest_touched_everywhere_takes_one_fault_and_no_page_table_per_2mib() {
        const GUEST: u64 = 64 * MIB;
        let mut pgm = pgm_with_defaults(GUEST / PAGE_SIZE + 2048);
        pgm.register_ram(gpa(0), GUEST, "ram").unwrap();
        let tables = pgm.stats().table_frames;
        let mut faults = 0;
        for page in 0..GUEST / PAGE_SIZE {
            if let GuestAccess::Done { faults: taken } = guest_write(&mut pgm, gpa(page * PAGE_SIZE), &[1]) {
                faults += taken;
            }
        }
        assert_eq!(u64::from(faults), GUEST / BLOCK);
        assert_eq!(pgm.stats().table_frames, tables, "no page table");
        assert_eq!(pgm.stats().allocated_pages, GUEST / PAGE_SIZE);
        assert_isolated(&pgm, "after touching everything");
        assert_accounting(&pgm);
    }

    #[test]
    fn registering_64_gib_writes_only_page_directories() {
        let mut pgm = pgm_with_defaults(1024);
        pgm.register_ram(gpa(0), 64 * GIB, "ram").unwrap();
        // Root, one PDPT, 64 page directories.
        assert_eq!(pgm.stats().table_frames, 1 + 1 + 64);
        let table_bytes = pgm.stats().table_frames * PAGE_SIZE;
        assert!(
            table_bytes * 32 < 64 * GIB / PAGE_SIZE,
            "under 1/32 B of tables per page"
        );
        assert_eq!(pgm.stats().zero_pages, 64 * GIB / PAGE_SIZE);
    }

    #[test]
    fn a_split_without_a_page_table_unmaps_the_block_until_an_access_maps_it_again() {
        let mut pgm = pgm_with_defaults(2048);
        pgm.register_ram(gpa(0), 8 * MIB, "ram").unwrap();
        guest_write(&mut pgm, gpa(2 * BLOCK), &[9]);
        assert!(pgm.is_mapped_large(gpa(2 * BLOCK)), "a large fill");
        // No frame from the host any more, and the handy pool used up by host writes.
        pgm.frames_mut().fail_after = Some(0);
        let mut page = 0;
        while pgm.write_phys(gpa(page * PAGE_SIZE), &[1]).is_ok() {
            page += 1;
        }
        // A handler on one page needs a page table to split the block: none to be had.
        pgm.register_handler(HandlerKind::Write, gpa(2 * BLOCK + 0x5000), PAGE_SIZE)
            .unwrap();
        assert!(!pgm.is_mapped_large(gpa(2 * BLOCK)));
        assert!(
            pgm.translate(gpa(2 * BLOCK), Access::Read).is_err(),
            "left unmapped"
        );
        assert_isolated(&pgm, "with the block unmapped");
        assert_eq!(
            pgm.resolve_fault(gpa(2 * BLOCK + 0x6000), Access::Read),
            FaultOutcome::OutOfMemory,
            "the VM pauses: no frame for the page table either"
        );
        pgm.frames_mut().fail_after = None;
        assert!(matches!(
            pgm.resolve_fault(gpa(2 * BLOCK + 0x6000), Access::Read),
            FaultOutcome::Resolved { .. }
        ));
        assert_eq!(guest_read(&pgm, gpa(2 * BLOCK), 1), [9]);
        assert!(
            pgm.translate(gpa(2 * BLOCK + 0x5000), Access::Write).is_err(),
            "the handler's page"
        );
        assert_isolated(&pgm, "mapped again");
        assert_accounting(&pgm);
    }
}

/// Regressions: a 2 MiB block left unmapped for want of a page table, then mapped again by a
/// path other than its next access (re-registration, a merge, a pre-allocation fill). Each
/// ends with a complete flush, the auditor, and the host allocator asked about every frame the
/// guest can still reach.
#[cfg(test)]
mod unmapped_block_regressions {
    use super::*;
    use crate::handlers::HandlerKind;
    use crate::paging::Access;
    use crate::test_support::*;

    const BLOCK: u64 = 0x60_0000;
    const BLOCK_SIZE: u64 = 2 * MIB;

    /// One 2 MiB block of RAM at `BLOCK` on the zero chunk, and a handler registered in it
    /// while the host refuses every frame: the block is left unmapped. Returns the handler.
    fn block_left_unmapped(pgm: &mut SimPgm, kind: HandlerKind) -> crate::handlers::HandlerId {
        pgm.register_ram(gpa(BLOCK), BLOCK_SIZE, "block").unwrap();
        assert!(pgm.is_mapped_large(gpa(BLOCK)));
        pgm.frames_mut().fail_after = Some(0);
        let (id, _) = pgm
            .register_handler(kind, gpa(BLOCK + 0x5000), PAGE_SIZE)
            .unwrap();
        assert!(
            pgm.translate(gpa(BLOCK), Access::Read).is_err(),
            "no page table for the split: the block is unmapped"
        );
        pgm.frames_mut().fail_after = None;
        id
    }

    /// [`assert_sound_after_flush`](crate::test_support::assert_sound_after_flush), and every
    /// frame any page of the block reaches, for any access, is allocated at the host.
    fn assert_block_sound_after_flush(pgm: &mut SimPgm, context: &str) {
        assert_sound_after_flush(pgm, context);
        for page in 0..BLOCK_SIZE / PAGE_SIZE {
            let at = gpa(BLOCK + page * PAGE_SIZE);
            for access in [Access::Read, Access::Write, Access::Execute] {
                if let Ok(frame) = pgm.translate(at, access) {
                    assert!(
                        pgm.frames().inner.is_allocated(frame.page_base()),
                        "{context}: {access:?} at {at} reaches {frame}, which the host has free"
                    );
                }
            }
        }
    }

    #[test]
    fn a_block_unmapped_then_unregistered_and_registered_again_frees_no_reachable_frame() {
        let mut pgm = pgm_with_defaults(2048);
        let id = block_left_unmapped(&mut pgm, HandlerKind::All);
        let _ = pgm.deregister_handler(id).unwrap();
        let _ = pgm.unregister_ram(gpa(BLOCK), BLOCK_SIZE).unwrap();
        flush_every_cpu(&mut pgm);
        pgm.register_ram(gpa(BLOCK), BLOCK_SIZE, "again").unwrap();
        assert!(pgm.is_mapped_large(gpa(BLOCK)));
        let _ = pgm.write_phys(gpa(BLOCK + 0x1000), &[7]).unwrap();
        let _ = pgm.balloon_inflate(&[gpa(BLOCK + 0x1000)]).unwrap();
        assert!(
            pgm.translate(gpa(BLOCK + 0x1000), Access::Read).is_err(),
            "ballooned"
        );
        assert_block_sound_after_flush(&mut pgm, "after the balloon");
    }

    #[test]
    fn a_block_unmapped_then_merged_by_deregistering_frees_no_reachable_frame() {
        let mut pgm = pgm_with_defaults(2048);
        // The block filled large first, so its frames are one chunk and can merge again.
        pgm.register_ram(gpa(BLOCK), BLOCK_SIZE, "block").unwrap();
        guest_write(&mut pgm, gpa(BLOCK), &[1]);
        assert!(pgm.is_mapped_large(gpa(BLOCK)));
        pgm.frames_mut().fail_after = Some(0);
        let mut page = 0;
        while pgm.write_phys(gpa(page * PAGE_SIZE), &[1]).is_ok() && page < 4096 {
            page += 1;
        }
        let (id, _) = pgm
            .register_handler(HandlerKind::All, gpa(BLOCK + 0x5000), PAGE_SIZE)
            .unwrap();
        assert!(pgm.translate(gpa(BLOCK), Access::Read).is_err(), "unmapped");
        pgm.frames_mut().fail_after = None;
        let _ = pgm.deregister_handler(id).unwrap();
        assert!(pgm.is_mapped_large(gpa(BLOCK)), "merged and mapped large again");
        let _ = pgm
            .balloon_inflate(&[gpa(BLOCK + 0x1000), gpa(BLOCK + 0x2000)])
            .unwrap();
        assert_block_sound_after_flush(&mut pgm, "after the balloon");
    }

    #[test]
    fn a_block_unmapped_then_filled_by_preallocation_frees_no_reachable_frame() {
        let mut pgm = pgm_with_defaults(2048);
        let id = block_left_unmapped(&mut pgm, HandlerKind::All);
        let _ = pgm.deregister_handler(id).unwrap();
        let _ = pgm.preallocate_ram().unwrap();
        assert!(pgm.is_mapped_large(gpa(BLOCK)), "filled with one chunk");
        let _ = pgm
            .balloon_inflate(&[gpa(BLOCK + 0x1000), gpa(BLOCK + 0x2000)])
            .unwrap();
        assert_block_sound_after_flush(&mut pgm, "after the balloon");
    }

    /// The block is filled (by a pre-allocation or a guest write) and mapped by one 2 MiB
    /// leaf; monitoring starts, and a settle elsewhere in the first GiB pushes its protection
    /// down onto that leaf. A write handler registered in the block then must split it: the
    /// leaf's write permission is only withheld by monitoring, not taken away.
    fn write_handler_in_a_filled_block_while_monitoring(fill: impl FnOnce(&mut SimPgm)) {
        let mut pgm = pgm_with_defaults(2048);
        pgm.register_ram(gpa(0), MIB, "low").unwrap();
        pgm.register_ram(gpa(BLOCK), BLOCK_SIZE, "block").unwrap();
        fill(&mut pgm);
        assert!(pgm.is_mapped_large(gpa(BLOCK)));
        let _ = pgm.start_write_monitoring();
        // MMIO over a low RAM page settles that page, pushing monitoring's protection down to
        // the page directory that holds the block's leaf.
        let _ = pgm.register_mmio(gpa(0x3F000), PAGE_SIZE).unwrap();
        let _ = pgm
            .register_handler(HandlerKind::Write, gpa(BLOCK + 0x1000), 2 * PAGE_SIZE)
            .unwrap();
        assert_block_sound_after_flush(&mut pgm, "with the handler");
        guest_write(&mut pgm, gpa(BLOCK + 0x6000), &[3]);
        assert_block_sound_after_flush(&mut pgm, "after a write beside the handler");
        let _ = pgm.stop_write_monitoring();
        assert_block_sound_after_flush(&mut pgm, "after monitoring stopped");
        assert!(
            pgm.translate(gpa(BLOCK + 0x1000), Access::Write).is_err(),
            "still handled"
        );
    }

    #[test]
    fn a_write_handler_in_a_preallocated_block_while_monitoring_splits_it() {
        write_handler_in_a_filled_block_while_monitoring(|pgm| {
            let _ = pgm.preallocate_ram().unwrap();
        });
    }

    #[test]
    fn a_write_handler_in_a_block_filled_by_a_write_while_monitoring_splits_it() {
        write_handler_in_a_filled_block_while_monitoring(|pgm| {
            guest_write(pgm, gpa(BLOCK + 0x1000), &[1]);
        });
    }

    /// A write that fills a page of a block on the zero chunk needs a page table to split it;
    /// with none to be had the block is left awaiting tables. The fault must not claim it is
    /// resolved (the retried write would fault again, a loop the kernel stops the VM for): it
    /// pauses the VM, and the write goes through once frames are back.
    #[test]
    fn a_fill_that_leaves_its_block_awaiting_tables_pauses_instead_of_looping() {
        let mut pgm = pgm_with_defaults(2048);
        pgm.register_ram(gpa(BLOCK), BLOCK_SIZE, "block").unwrap();
        pgm.set_large_pages(false);
        pgm.frames_mut().fail_after = Some(1);
        assert_eq!(
            pgm.resolve_fault(gpa(BLOCK), Access::Write),
            crate::manager::FaultOutcome::OutOfMemory
        );
        assert!(pgm.awaits_tables(gpa(BLOCK)));
        assert_block_sound_after_flush(&mut pgm, "paused");
        pgm.frames_mut().fail_after = None;
        assert_eq!(
            guest_write(&mut pgm, gpa(BLOCK), &[5]),
            GuestAccess::Done { faults: 1 }
        );
        assert_eq!(guest_read(&pgm, gpa(BLOCK), 1), [5]);
        assert_block_sound_after_flush(&mut pgm, "resumed");
    }
}

/// Regressions found by the auditor's count of locked pages.
#[cfg(test)]
mod locked_block_regressions {
    use crate::paging::Access;
    use crate::test_support::*;

    /// A read lock on a ZERO page of a block on the zero chunk, then a guest write elsewhere in
    /// the block: the write fills a 4 KiB page instead of the whole block, whose fill would
    /// have written 512 descriptors anew and dropped the lock's count.
    #[test]
    fn a_read_lock_on_a_zero_page_survives_a_write_elsewhere_in_its_block() {
        let mut pgm = pgm_with_defaults(2048);
        pgm.register_ram(gpa(0x60_0000), 2 * MIB, "block").unwrap();
        let lock = pgm.lock_page_for_read(gpa(0x60_0000)).unwrap().lock;
        guest_write(&mut pgm, gpa(0x70_0000), &[1]);
        assert_eq!(pgm.page_lock_count(gpa(0x60_0000), false), 1);
        flush_every_cpu(&mut pgm);
        assert_isolated(&pgm, "with the lock held");
        pgm.release_page_lock(lock);
        assert_eq!(pgm.page_lock_count(gpa(0x60_0000), false), 0);
        assert!(pgm.translate(gpa(0x70_0000), Access::Write).is_ok());
        flush_every_cpu(&mut pgm);
        assert_isolated(&pgm, "after the release");
        assert_accounting(&pgm);
    }
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
#[path = "large_tests.rs"]
mod large_tests;
